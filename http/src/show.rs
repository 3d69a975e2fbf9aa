//! How times and amounts are shown to people, the same on every page and in the CLI: a time
//! in UTC ([`utc`]) and an amount with thousands separators ([`units`]). Stored values stay
//! milliseconds and integer minor units; this is only how they are printed.

use time::formatting::Formattable;
use time::OffsetDateTime;

/// The last second `time` formats with a four-digit year: 9999-12-31T23:59:59 UTC.
const LAST_SECOND: u64 = 253_402_300_799;

/// `ms` (unix milliseconds) in UTC as `format` spells it (a `time::macros::format_description!`).
/// A time past year 9999 is shown as its last second, so a corrupt or far-future time still
/// prints (the pages and keys never fail on a time).
pub fn utc(ms: u64, format: &(impl Formattable + ?Sized)) -> String {
    let s = (ms / 1000).min(LAST_SECOND) as i64;
    OffsetDateTime::from_unix_timestamp(s)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .format(format)
        .unwrap_or_default()
}

/// `minor` units in currency units with thousands separators and `exponent` decimals:
/// `1,780,900` (exponent 0), `1,394.18` (exponent 2), `-0.05`.
pub fn units(minor: i64, exponent: u8) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.unsigned_abs();
    let p = 10u64.pow(u32::from(exponent));
    let whole = (m / p).to_string();
    let mut grouped = String::with_capacity(whole.len() + whole.len() / 3);
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i).is_multiple_of(3) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::format_description;

    #[test]
    fn times_are_utc_and_clamped_to_year_9999() {
        let f = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
        assert_eq!(utc(0, f), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000_999, f), "2023-11-14 22:13:20");
        assert_eq!(utc(u64::MAX, f), "9999-12-31 23:59:59");
    }

    #[test]
    fn groups_thousands_and_places_the_decimal_point() {
        assert_eq!(units(1_780_900, 0), "1,780,900");
        assert_eq!(units(139_418, 2), "1,394.18");
        assert_eq!(units(5, 2), "0.05");
        assert_eq!(units(-5, 2), "-0.05");
        assert_eq!(units(999, 0), "999");
        assert_eq!(units(1_000, 3), "1.000");
        assert_eq!(units(i64::MIN, 0), "-9,223,372,036,854,775,808");
    }
}
