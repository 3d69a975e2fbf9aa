//! Amounts for people: minor units shown in the currency's units with thousands separators and
//! the currency code (`1,780,900 KRW`, `1,394.18 USD`). Amounts stay integer minor units
//! everywhere else; this is only how they are printed.

pub use tapgate_http::show::units;

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
