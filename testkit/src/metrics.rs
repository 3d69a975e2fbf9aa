//! Reading the Prometheus text the daemons serve on `/metrics`.

/// The value of the unlabelled sample `name value` in `text`, if there is one.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of every sample of `name`, labelled or not (0 when there is none).
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x\n\
        tapgate_taps_total{kind=\"in\"} 3\n\
        tapgate_taps_total{kind=\"out\"} 4\n\
        tapgate_taps_total_other 100\n\
        tapgate_stored_total 7\n";

    #[test]
    fn an_unlabelled_sample_is_read_and_a_longer_name_is_not_taken_for_it() {
        assert_eq!(sample(TEXT, "tapgate_stored_total"), Some(7.0));
        assert_eq!(sample(TEXT, "tapgate_stored"), None);
        assert_eq!(sample(TEXT, "tapgate_missing"), None);
    }

    #[test]
    fn labelled_samples_are_summed_without_their_longer_named_neighbours() {
        assert_eq!(sum(TEXT, "tapgate_taps_total"), 7.0);
        assert_eq!(sum(TEXT, "tapgate_missing"), 0.0);
    }
}
