//! Horizontal bar charts drawn as SVG by the shared template `console_chart.html` (its `bars`
//! macro): each bar's geometry is computed here from the numbers (no script, no library). A row
//! is its label (left) and value (right) on one line and the bar under them.

/// A chart: its height and its bars.
#[derive(serde::Serialize)]
pub struct Chart {
    /// The chart's height in SVG units (the width is [`CHART_WIDTH`]).
    pub height: u32,
    /// The bars, top to bottom.
    pub bars: Vec<Bar>,
}

/// One bar.
#[derive(serde::Serialize)]
pub struct Bar {
    /// What the bar counts.
    pub label: String,
    /// Its value as shown.
    pub value: String,
    /// The label's baseline.
    pub y_label: u32,
    /// The bar's top.
    pub y: u32,
    /// The bar's width (0 to [`BAR_MAX`]).
    pub w: u32,
    /// The bar is a negative value.
    pub negative: bool,
}

/// A chart's width in SVG units.
pub const CHART_WIDTH: u32 = 400;
/// The longest bar.
pub const BAR_MAX: u32 = CHART_WIDTH;
/// A row's height.
pub const ROW: u32 = 38;

/// Bars for `(label, value, shown as)`: the longest is [`BAR_MAX`], a non-zero value at least 2.
pub fn chart(rows: Vec<(String, i64, String)>) -> Chart {
    let max = rows
        .iter()
        .map(|(_, v, _)| v.unsigned_abs())
        .max()
        .unwrap_or(0)
        .max(1);
    let bars = rows
        .into_iter()
        .enumerate()
        .map(|(i, (label, v, value))| {
            let i = i as u32;
            let w = (u128::from(v.unsigned_abs()) * u128::from(BAR_MAX) / u128::from(max)) as u32;
            let w = if v != 0 { w.max(2) } else { 0 };
            Bar {
                label,
                value,
                y_label: i * ROW + 13,
                y: i * ROW + 18,
                w,
                negative: v < 0,
            }
        })
        .collect::<Vec<_>>();
    Chart {
        height: (bars.len() as u32 * ROW).max(ROW),
        bars,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_drawn_to_scale() {
        let c = chart(vec![
            ("a".into(), 1_000, "1000".into()),
            ("b".into(), 500, "500".into()),
            ("c".into(), 0, "0".into()),
            ("d".into(), 1, "1".into()),
            ("e".into(), -1_000, "-1000".into()),
        ]);
        let w: Vec<u32> = c.bars.iter().map(|b| b.w).collect();
        assert_eq!(w, vec![BAR_MAX, BAR_MAX / 2, 0, 2, BAR_MAX]);
        assert!(c.bars[4].negative);
        assert_eq!(c.height, 5 * ROW);
        assert_eq!(chart(Vec::new()).height, ROW);
    }
}
