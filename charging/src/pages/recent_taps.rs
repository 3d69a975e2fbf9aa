//! The back office's recent cleared taps as `fare simulate`'s tap log, for the console's fare
//! tables: the revenue impact of a proposed table against what riders actually did.
//!
//! A tap's fare is a posting `tap:<UID>:<counter>` to `operator:<id>`; clearing keeps the stop,
//! route and fare flags the gateway sent in the tap's marker ([`crate::clearing::tap_detail`]).
//! The log holds the newest [`MAX_TAPS`] fares booked in the window, and each card's taps
//! cleared without a charge (a transfer, a capped fare) between and after them, in the card's
//! counter order. What the ledger does not have, the log cannot say:
//!
//! - a tap's time is when the back office **booked** it (clearing receives a tap seconds after
//!   it was made while the gateway is connected); a tap without a charge has no posting and
//!   takes the time of the card's tap before it;
//! - the rider category is the table's default (the back office does not keep a card's);
//! - a tap cleared without its stop (before gateways sent it, or a v2 tap record) is left out,
//!   and counted.

use super::card::Places;
use crate::clearing::tap_detail;
use crate::ledger::{LedgerError, LedgerRead};
use std::collections::{BTreeMap, HashSet};

/// Most taps in the log (the newest fares).
pub const MAX_TAPS: usize = 50_000;
/// Most days back.
pub const MAX_DAYS: u64 = 31;
/// Counters probed past a card's newest fare for taps without a charge.
const TRAILING_PROBE: u32 = 32;

/// The log and what went into it.
#[derive(Debug, Default)]
pub struct RecentTaps {
    /// `card,rider,at,route,stop,kind` CSV.
    pub csv: String,
    /// Tap lines in it.
    pub taps: usize,
    /// Of which cleared without a charge.
    pub free: usize,
    /// Taps left out: cleared without their stop.
    pub without_stop: usize,
    /// Fares booked in the window beyond [`MAX_TAPS`] (left out: older ones).
    pub beyond_limit: usize,
}

/// A CSV field, quoted when it needs to be.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `ms` (unix) as local `YYYY-MM-DDTHH:MM:SS`, `offset_min` minutes from UTC.
/// (A local time before 1970 is shown as 1970-01-01T00:00:00.)
fn local(ms: u64, offset_min: i32) -> String {
    tapgate_http::show::utc(
        ms.saturating_add_signed(i64::from(offset_min) * 60_000),
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
    )
}

/// `tap:<UID>:<counter>` → (UID, counter).
fn tap_ref(reference: &str) -> Option<([u8; 7], u32)> {
    let mut it = reference.strip_prefix("tap:")?.split(':');
    let uid: [u8; 7] = hex::decode(it.next()?).ok()?.try_into().ok()?;
    Some((uid, it.next()?.parse().ok()?))
}

/// The fares booked since `since_ms` per card (counter → booking time), the newest
/// [`MAX_TAPS`], with how many were left beyond it; and every counter a `tap:` posting names
/// (fares, undone fares, pick-ups), which are not taps without a charge.
type Fares = (
    BTreeMap<[u8; 7], BTreeMap<u32, u64>>,
    usize,
    HashSet<([u8; 7], u32)>,
);

fn fares_since(r: &dyn LedgerRead, since_ms: u64) -> Result<Fares, LedgerError> {
    let mut fares = Vec::new();
    let mut charged = HashSet::new();
    for p in r.postings_with_prefix("tap:")? {
        let Some((uid, tmc)) = tap_ref(&p.reference) else {
            continue;
        };
        charged.insert((uid, tmc));
        if p.time_ms >= since_ms && p.to.starts_with("operator:") {
            fares.push((p.time_ms, uid, tmc));
        }
    }
    fares.sort_unstable_by(|a, b| b.cmp(a));
    let beyond = fares.len().saturating_sub(MAX_TAPS);
    fares.truncate(MAX_TAPS);
    let mut by_card: BTreeMap<[u8; 7], BTreeMap<u32, u64>> = BTreeMap::new();
    for (time_ms, uid, tmc) in fares {
        by_card.entry(uid).or_default().insert(tmc, time_ms);
    }
    Ok((by_card, beyond, charged))
}

/// The log of the taps cleared in the `days` before `now_ms`, stops and routes named as the
/// published table names them, times local at `offset_min` minutes from UTC.
pub fn recent_tap_log(
    r: &dyn LedgerRead,
    now_ms: u64,
    days: u64,
    offset_min: i32,
) -> Result<RecentTaps, LedgerError> {
    let since = now_ms.saturating_sub(days.clamp(1, MAX_DAYS) * 86_400_000);
    let (by_card, beyond, charged) = fares_since(r, since)?;
    let places = Places::published(r)?;
    let mut out = RecentTaps {
        csv: "card,rider,at,route,stop,kind\n".into(),
        beyond_limit: beyond,
        ..RecentTaps::default()
    };
    for (uid, paid) in &by_card {
        let (Some((&first, _)), Some((&newest, _))) =
            (paid.first_key_value(), paid.last_key_value())
        else {
            continue;
        };
        let last = r
            .card(uid)?
            .last_tmc
            .min(newest.saturating_add(TRAILING_PROBE));
        let card = hex::encode_upper(uid);
        let mut at = paid[&first];
        for tmc in first..=last.max(newest) {
            let free = match paid.get(&tmc) {
                Some(&t) => {
                    at = t;
                    false
                }
                None if charged.contains(&(*uid, tmc)) => continue,
                None => true,
            };
            let Some(d) = tap_detail(r, uid, tmc)? else {
                continue;
            };
            let Some(stop) = d.stop_id else {
                out.without_stop += 1;
                continue;
            };
            let route = d.route_id.map(|c| places.route(c)).unwrap_or_default();
            out.csv.push_str(&format!(
                "{card},,{},{},{},\n",
                local(at, offset_min),
                field(&route),
                field(&places.stop(stop))
            ));
            out.taps += 1;
            out.free += usize::from(free);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_times_and_references() {
        assert_eq!(field("Market"), "Market");
        assert_eq!(field("A, \"B\""), "\"A, \"\"B\"\"\"");
        assert_eq!(local(1_700_000_000_000, 540), "2023-11-15T07:13:20");
        assert_eq!(local(1_700_000_000_000, 0), "2023-11-14T22:13:20");
        assert_eq!(
            tap_ref("tap:04010203040506:17"),
            Some(([4, 1, 2, 3, 4, 5, 6], 17))
        );
        assert_eq!(tap_ref("load:04010203040506:17"), None);
        assert_eq!(tap_ref("tap:0401:17"), None);
    }
}
