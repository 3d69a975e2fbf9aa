//! Reports from the gateway's store: a TIDES-compatible `fare_transactions.csv` export.
//!
//! Columns (TIDES `fare_transactions` schema): `transaction_id` (`<device>-<sequence>`),
//! `service_date`, `event_timestamp` (device clock, UTC), `amount` (major units, exact decimal
//! from the integer minor units), `currency_type`, `fare_action` (`Enter` for a tap that
//! debited or was free; refusals are not transactions and are left out), `device_id`,
//! `stop_id` (the GTFS `stops.stop_id` of the fare table the gate priced with — see [`Places`]),
//! `num_riders` (1), `fare_media_id` (`Smart card or ticket`), `fare_capped` (`true`/`false`:
//! the fare engine's cap flag, carried by tap record format v3 under the device MAC; empty — a
//! missing value, which the TIDES schema allows: the field has no `required` constraint — for a
//! v2 record journalled before the upgrade, which carries no flag, so the export does not guess
//! `false`; a pick-up is never capped: `false`), `token_id` (card UID), `balance` (major units),
//! and one column beyond the TIDES schema, last: `route_id` (GTFS `routes.route_id`), so a
//! transaction joins to the agency's GTFS by stop and route.

use crate::store::{Store, StoreError};
use purse::rotation::DeviceKeyRing;
use purse::tap::TapFlags;
use std::collections::{BTreeMap, HashMap};

/// Formats integer minor units as an exact decimal with `exponent` fraction digits.
pub fn decimal(minor: i64, exponent: u32) -> String {
    if exponent == 0 {
        return minor.to_string();
    }
    let unit = 10i64.pow(exponent);
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!(
        "{sign}{}.{:0width$}",
        abs / unit as u64,
        abs % unit as u64,
        width = exponent as usize
    )
}

/// What the 24-bit stop and route codes of tap records stand for: the stop and route ids of the
/// GTFS feed or TOML source the fare tables were compiled from (`fare_rules::table::code24`).
/// A code no table names is written as its number.
#[derive(Clone, Debug, Default)]
pub struct Places {
    /// Stop code → GTFS `stop_id`.
    pub stops: HashMap<u32, String>,
    /// Route code → GTFS `route_id`.
    pub routes: HashMap<u32, String>,
}

impl Places {
    fn name(map: &HashMap<u32, String>, code: u32) -> String {
        let id = map.get(&code).cloned().unwrap_or_else(|| code.to_string());
        // CSV: an id with a comma, a quote or a line break is quoted.
        if id.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", id.replace('"', "\"\""))
        } else {
            id
        }
    }
}

/// The `fare_capped` cell of a tap with fare `flags` (`None`: a v2 record, which carries none):
/// empty when the record cannot say, except for a pick-up, which no cap ever reduces.
fn fare_capped(flags: Option<TapFlags>, pickup: bool) -> &'static str {
    match flags {
        Some(f) if f.capped() => "true",
        Some(_) => "false",
        None if pickup => "false",
        None => "",
    }
}

fn utc(ms: u64) -> (String, String) {
    use time::macros::format_description;
    let t = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let date = t
        .format(format_description!("[year]-[month]-[day]"))
        .unwrap_or_default();
    let ts = t
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
        ))
        .unwrap_or_default();
    (date, ts)
}

/// The TIDES `fare_transactions.csv` for taps with device time in `[from_ms, to_ms)` (taps
/// whose device MAC verifies for `operator`, the gateway's, under any version of the device's
/// ring: a tap MAC'd under the previous or a since-retired device-key version is still a tap).
#[allow(clippy::too_many_arguments)]
pub fn tides_fare_transactions(
    store: &Store,
    operator: &str,
    device_key: impl Fn(u32) -> DeviceKeyRing,
    from_ms: u64,
    to_ms: u64,
    currency: &str,
    exponent: u32,
    places: &Places,
    limit: usize,
) -> Result<String, StoreError> {
    let mut csv = String::from(
        "transaction_id,service_date,event_timestamp,amount,currency_type,fare_action,device_id,stop_id,num_riders,fare_media_id,fare_capped,token_id,balance,route_id\n",
    );
    let mut rings = BTreeMap::new();
    for raw in store.taps(limit)? {
        let Ok(t) = crate::forward::verify_stored(&raw, operator, &mut rings, &device_key) else {
            continue;
        };
        if t.refusal().is_some()
            || t.meta().device_time_ms < from_ms
            || t.meta().device_time_ms >= to_ms
        {
            continue;
        }
        let (date, ts) = utc(t.meta().device_time_ms);
        // An action-list pick-up added value (its stop and route fields hold the order id).
        let pickup = purse::actionlist::order_of_tap(&t).is_some();
        let capped = fare_capped(t.flags(), pickup);
        let (action, stop, route) = if pickup {
            ("Add", String::new(), String::new())
        } else {
            (
                "Enter",
                Places::name(&places.stops, t.meta().stop_id),
                Places::name(&places.routes, t.meta().route_id),
            )
        };
        csv.push_str(&format!(
            "{}-{},{date},{ts},{},{currency},{action},{},{stop},1,Smart card or ticket,{capped},{},{},{route}\n",
            t.meta().device_id,
            t.meta().device_seq,
            decimal(i64::from(t.amount_minor()), exponent),
            t.meta().device_id,
            hex::encode_upper(t.uid()),
            decimal(i64::from(t.balance_after_minor()), exponent),
        ));
    }
    Ok(csv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact() {
        assert_eq!(decimal(125, 2), "1.25");
        assert_eq!(decimal(5, 2), "0.05");
        assert_eq!(decimal(-1_050, 2), "-10.50");
        assert_eq!(decimal(1_234, 0), "1234");
        assert_eq!(decimal(1_234, 3), "1.234");
    }

    #[test]
    fn places_name_codes_and_quote_what_csv_needs() {
        let p = Places {
            stops: [(7, "Central".to_string()), (8, "Stop, \"A\"".to_string())].into(),
            routes: HashMap::new(),
        };
        assert_eq!(Places::name(&p.stops, 7), "Central");
        assert_eq!(Places::name(&p.stops, 8), "\"Stop, \"\"A\"\"\"");
        assert_eq!(Places::name(&p.stops, 9), "9");
        assert_eq!(Places::name(&p.routes, 12), "12");
    }

    #[test]
    fn fare_capped_is_the_flag_or_empty_when_a_v2_record_cannot_say() {
        let capped = TapFlags::new(false, true, false);
        let transfer = TapFlags::new(true, false, false);
        assert_eq!(fare_capped(Some(capped), false), "true");
        assert_eq!(fare_capped(Some(transfer), false), "false");
        assert_eq!(fare_capped(Some(TapFlags::NONE), true), "false");
        assert_eq!(fare_capped(None, false), "");
        assert_eq!(fare_capped(None, true), "false");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), ("1970-01-01".into(), "1970-01-01T00:00:00Z".into()));
        assert_eq!(
            utc(1_764_000_000_000),
            ("2025-11-24".into(), "2025-11-24T16:00:00Z".into())
        );
        assert_eq!(utc(951_782_400_000).0, "2000-02-29");
    }
}
