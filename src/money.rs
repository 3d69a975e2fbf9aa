//! Amounts for people: minor units shown in the currency's units with thousands separators and
//! the currency code (`1,780,900 KRW`, `1,394.18 USD`). Amounts stay integer minor units
//! everywhere else; this is only how they are printed.

/// `minor` in currency units with thousands separators: `1,780,900` (exponent 0),
/// `1,394.18` (exponent 2), `-0.05`.
pub fn units(minor: i64, exponent: u8) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.unsigned_abs();
    let p = 10u64.pow(u32::from(exponent));
    let whole = (m / p).to_string();
    let mut grouped = String::with_capacity(whole.len() + whole.len() / 3);
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if exponent == 0 {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{:0w$}", m % p, w = usize::from(exponent))
    }
}

/// [`units`] followed by the currency code: `1,780,900 KRW`.
pub fn amount(minor: i64, exponent: u8, currency: &str) -> String {
    format!("{} {currency}", units(minor, exponent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands_and_places_the_decimal_point() {
        assert_eq!(amount(1_780_900, 0, "KRW"), "1,780,900 KRW");
        assert_eq!(amount(139_418, 2, "USD"), "1,394.18 USD");
        assert_eq!(units(5, 2), "0.05");
        assert_eq!(units(-5, 2), "-0.05");
        assert_eq!(units(999, 0), "999");
        assert_eq!(units(1_000, 0), "1,000");
        assert_eq!(units(100_000_000, 2), "1,000,000.00");
        assert_eq!(units(i64::MIN, 0), "-9,223,372,036,854,775,808");
    }
}
