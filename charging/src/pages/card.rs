//! What the cardholder pages show of a card, read from the ledger: the balance, the history of
//! trips and loads from the postings, the load intents, and the top-ups asked for on the pages.

use crate::clearing::{tap_detail, TapDetail};
use crate::ledger::{IntentKind, IntentState, LedgerError, LedgerRead, Posting};
use serde::{Deserialize, Serialize};
use tapgate_http::show::{units, utc};
use time::macros::format_description;

/// One line of a card's history: a posting to or from the card's account.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    /// The posting's sequence number.
    pub seq: u64,
    /// When the back office booked it (unix ms).
    pub time_ms: u64,
    /// `trip`, `load`, `reversal`, `payment`, `refund`, `issue` or `other`.
    pub kind: &'static str,
    /// Where: the operator of a trip, the funding source of a load, the merchant of a payment.
    pub place: String,
    /// The change to the card's value, minor units (negative for a fare or a payment).
    pub amount_minor: i64,
    /// The card's transaction counter the change consumed, when the reference names one.
    pub tmc: Option<u32>,
    /// A trip's stop and route as the validator's record gave them ([`stop_words`]), when its
    /// gateway sent them.
    pub stop: Option<String>,
    /// A trip's fare flags: `transfer`, `capped`, `penalty` ([`flag_words`]).
    pub marks: Vec<&'static str>,
}

/// The stop and route names of the published fare table (its stops' and routes' ids, which the
/// codes in tap records are hashes of), for naming a tap's place.
pub struct Places(Option<fare_rules::engine::Engine>);

impl Places {
    /// The names in the table published now; none when none is (or it does not decode: the
    /// back office signed it itself, so this is only read, not verified).
    pub fn published(r: &dyn LedgerRead) -> Result<Places, LedgerError> {
        Ok(Places(crate::fares::published(r)?.and_then(|p| {
            fare_rules::signed::decode_unverified(&p.bytes()).ok()
        })))
    }

    pub(super) fn stop(&self, code: u32) -> String {
        self.0
            .as_ref()
            .and_then(|e| Some(e.table().stops[e.stop_by_code(code)? as usize].id.clone()))
            .unwrap_or_else(|| code.to_string())
    }

    pub(super) fn route(&self, code: u32) -> String {
        self.0
            .as_ref()
            .and_then(|e| Some(e.table().routes[e.route_by_code(code)? as usize].id.clone()))
            .unwrap_or_else(|| code.to_string())
    }
}

/// How a page names a tap's place: its stop and route as the published fare table names them,
/// else their codes.
pub fn stop_words(d: &TapDetail, places: &Places) -> Option<String> {
    match (d.stop_id, d.route_id) {
        (Some(s), Some(r)) => Some(format!(
            "stop {}, route {}",
            places.stop(s),
            places.route(r)
        )),
        (Some(s), None) => Some(format!("stop {}", places.stop(s))),
        (None, Some(r)) => Some(format!("route {}", places.route(r))),
        (None, None) => None,
    }
}

/// The words of a tap's fare flags (none when not sent or none set).
pub fn flag_words(d: &TapDetail) -> Vec<&'static str> {
    let Some(f) = d.flags else {
        return Vec::new();
    };
    [
        (f.transfer(), "transfer"),
        (f.capped(), "capped"),
        (f.penalty(), "penalty"),
    ]
    .into_iter()
    .filter_map(|(on, w)| on.then_some(w))
    .collect()
}

/// A cleared tap's stop and marks, from its clearing marker.
fn tap_words(
    r: &dyn LedgerRead,
    places: &Places,
    uid: &[u8; 7],
    tmc: u32,
) -> Result<(Option<String>, Vec<&'static str>), LedgerError> {
    let d = tap_detail(r, uid, tmc)?.unwrap_or_default();
    Ok((stop_words(&d, places), flag_words(&d)))
}

/// The account on the other side of `p` from `card`, without its kind prefix.
fn other_side<'a>(p: &'a Posting, card: &str) -> &'a str {
    let other = if p.from == card { &p.to } else { &p.from };
    other
        .split_once(':')
        .map_or(other.as_str(), |(_, name)| name)
}

/// A card's postings as history lines, newest first (one scan of the postings: the ledger
/// keeps no index by account).
pub fn history(r: &dyn LedgerRead, uid: &[u8; 7]) -> Result<Vec<Entry>, LedgerError> {
    let card = crate::ledger::card_account(uid);
    let places = Places::published(r)?;
    let mut out: Vec<Entry> = r
        .postings_with_prefix("")?
        .into_iter()
        .filter(|p| p.from == card || p.to == card)
        .map(|p| {
            let sign = if p.to == card { 1 } else { -1 };
            let word = p.reference.split(':').next().unwrap_or("");
            let other = if p.from == card { &p.to } else { &p.from };
            let kind = match word {
                "tap" => "trip",
                "load" | "franchise-load" => "load",
                "reversal" => "reversal",
                "refund" => "refund",
                "issue" | "learned" => "issue",
                _ if other.starts_with("merchant:") => "payment",
                _ if other.starts_with("franchise:") => "load",
                _ => "other",
            };
            let tmc = match word {
                "tap" | "load" | "franchise-load" | "reversal" => {
                    p.reference.rsplit(':').next().and_then(|t| t.parse().ok())
                }
                _ => None,
            };
            let (stop, marks) = match (kind, tmc) {
                ("trip", Some(tmc)) => tap_words(r, &places, uid, tmc)?,
                _ => (None, Vec::new()),
            };
            Ok(Entry {
                seq: p.seq,
                time_ms: p.time_ms,
                kind,
                place: other_side(&p, &card).to_string(),
                amount_minor: sign * p.amount_minor,
                tmc,
                stop,
                marks,
            })
        })
        .collect::<Result<_, LedgerError>>()?;
    out.sort_by_key(|e| std::cmp::Reverse(e.seq));
    Ok(out)
}

/// Counters looked at for taps cleared without a charge (the newest).
const FREE_TAPS_SCANNED: u32 = 2_000;

/// A tap cleared without a charge, as the pages show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FreeTap {
    /// The card's counter.
    pub tmc: u32,
    /// Its stop and route, when its gateway sent them ([`stop_words`]).
    pub stop: Option<String>,
    /// Its fare flags ([`flag_words`]): `transfer` or `capped` tell which kind of free tap.
    pub marks: Vec<&'static str>,
}

/// The card's taps clearing booked without a charge, newest first: a tap record of kind
/// `record_only` (a journey's transfer, or a fare a cap brought to zero) leaves its clearing
/// marker `tap:<UID>:<counter>` and no posting; the marker keeps the stop and fare flags a
/// gateway sent ([`tap_detail`]).
pub fn free_taps(
    r: &dyn LedgerRead,
    uid: &[u8; 7],
    last_tmc: u32,
) -> Result<Vec<FreeTap>, LedgerError> {
    let prefix = format!("tap:{}:", hex::encode_upper(uid));
    let charged: std::collections::HashSet<String> = r
        .postings_with_prefix(&prefix)?
        .into_iter()
        .map(|p| p.reference)
        .collect();
    let places = Places::published(r)?;
    let mut out = Vec::new();
    for tmc in (last_tmc.saturating_sub(FREE_TAPS_SCANNED) + 1..=last_tmc).rev() {
        let marker = format!("{prefix}{tmc}");
        if charged.contains(&marker) {
            continue;
        }
        if let Some(d) = tap_detail(r, uid, tmc)? {
            out.push(FreeTap {
                tmc,
                stop: stop_words(&d, &places),
                marks: flag_words(&d),
            });
        }
    }
    Ok(out)
}

/// A load as the pages show it.
#[derive(Clone, Debug, Serialize)]
pub struct LoadView {
    /// The card's counter before the load.
    pub tmc_before: u32,
    /// Minor units.
    pub amount_minor: i64,
    /// Funding source.
    pub source: String,
    /// `pending`, `completed` or `voided`.
    pub state: &'static str,
    /// Asked for (unix ms).
    pub created_ms: u64,
    /// The idempotency key the client gave.
    pub idempotency_key: String,
    /// Who asked.
    pub requested_by: String,
}

/// The word a page shows for an intent's state.
pub fn state_word(s: IntentState) -> &'static str {
    match s {
        IntentState::Authorised => "pending",
        IntentState::Completed => "completed",
        IntentState::Voided => "voided",
    }
}

/// The card's load intents (not reversals, payments or refunds), newest first.
pub fn loads(r: &dyn LedgerRead, uid: &[u8; 7]) -> Result<Vec<LoadView>, LedgerError> {
    let hex_uid = hex::encode_upper(uid);
    let mut v: Vec<LoadView> = r
        .all_intents()?
        .into_iter()
        .filter(|i| i.uid.eq_ignore_ascii_case(&hex_uid) && i.kind == IntentKind::Load)
        .map(|i| LoadView {
            tmc_before: i.tmc_before,
            amount_minor: i64::from(i.amount_minor),
            source: i.funding_source,
            state: state_word(i.state),
            created_ms: i.created_ms,
            idempotency_key: i.idempotency_key,
            requested_by: i.requested_by,
        })
        .collect();
    v.sort_by_key(|l| std::cmp::Reverse(l.created_ms));
    Ok(v)
}

/// A top-up asked for on the pages: the amount and funding the holder chose, waiting for the
/// card at a reader (`tapgate charge` with the order's idempotency key makes the load).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopUp {
    /// Random id.
    pub id: String,
    /// Card UID, hex.
    pub card_uid: String,
    /// Minor units.
    pub amount_minor: i64,
    /// Funding source.
    pub source: String,
    /// The instrument at the source.
    pub instrument: String,
    /// Asked for (unix ms).
    pub created_ms: u64,
    /// Picked up at the card's next tap: the action-list order that paid for it (none: made
    /// at a reader with `tapgate charge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<u64>,
}

impl TopUp {
    /// The idempotency key `tapgate charge` is given for this top-up: the load it makes is
    /// found by it.
    pub fn idempotency_key(&self) -> String {
        format!("page-topup-{}", self.id)
    }

    /// Where the top-up stands: the state of the load made with its key by its holder, or
    /// `pending` while no load was made yet.
    pub fn state(&self, holder: &str, loads: &[LoadView]) -> (&'static str, Option<u32>) {
        let key = self.idempotency_key();
        match loads
            .iter()
            .find(|l| l.idempotency_key == key && l.requested_by == holder)
        {
            Some(l) => (l.state, Some(l.tmc_before)),
            None => ("pending", None),
        }
    }
}

/// The most top-ups kept per holder (the oldest are forgotten beyond it).
pub const MAX_TOPUPS_PER_HOLDER: usize = 50;

/// Where a holder's top-ups are kept in the ledger's key-value records.
pub fn topups_key(holder: &str) -> String {
    format!("pages-topups:{holder}")
}

/// A holder's top-ups, newest first.
pub fn topups(r: &dyn LedgerRead, holder: &str) -> Result<Vec<TopUp>, LedgerError> {
    Ok(r.idempotent(&topups_key(holder))?
        .and_then(|v| serde_json::from_value::<Vec<TopUp>>(v).ok())
        .unwrap_or_default())
}

/// Attempts at writing a top-up's record when the ledger cannot say whether a write committed
/// or is unavailable (the write is idempotent, so writing it again is safe).
const RECORD_ATTEMPTS: usize = 3;

/// Adds `t` to its holder's top-ups, newest first, unless one with its id is there already:
/// idempotent, so a form posted again with the same token, or a write retried after its
/// outcome was lost, records it once. Retried here when the outcome is unknown or the ledger
/// unavailable (a conflict or a lost connection the ledger retries itself).
pub fn record_topup(l: &crate::ledger::Ledger, holder: &str, t: &TopUp) -> Result<(), LedgerError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (key, new) = (topups_key(holder), t.clone());
        let written = l.transact(move |w| {
            let mut list: Vec<TopUp> = w
                .idempotent(&key)?
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            if list.iter().any(|x| x.id == new.id) {
                return Ok(());
            }
            list.insert(0, new.clone());
            list.truncate(MAX_TOPUPS_PER_HOLDER);
            w.put_idempotent(
                &key,
                &serde_json::to_value(&list).expect("top-ups serialise"),
            )
        });
        match written {
            Err(LedgerError::CommitUnknown(_) | LedgerError::Unavailable(_))
                if attempt < RECORD_ATTEMPTS => {}
            other => return other,
        }
    }
}

/// The month (`YYYY-MM`, UTC) of a time.
pub fn month_of(ms: u64) -> String {
    utc(ms, format_description!("[year]-[month]"))
}

/// A time as `YYYY-MM-DD HH:MM UTC`.
pub fn when(ms: u64) -> String {
    utc(
        ms,
        format_description!("[year]-[month]-[day] [hour]:[minute] UTC"),
    )
}

/// Digits after the decimal point of a currency (ISO 4217).
fn exponent(currency: &str) -> u8 {
    const ZERO: [&str; 17] = [
        "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
        "VUV", "XAF", "XOF", "XPF",
    ];
    const THREE: [&str; 7] = ["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
    if ZERO.contains(&currency) {
        0
    } else if THREE.contains(&currency) {
        3
    } else {
        2
    }
}

/// An amount of minor units in its currency: `5,000 KRW`, `-12.50 USD`.
pub fn money(minor: i64, currency: &str) -> String {
    format!("{} {currency}", units(minor, exponent(currency)))
}

/// An amount typed by a holder (`5000`, `12.50`, `1,000`) in minor units of `currency`.
pub fn parse_money(text: &str, currency: &str) -> Option<i64> {
    let exp = exponent(currency) as usize;
    let t: String = text.trim().chars().filter(|c| *c != ',').collect();
    let (whole, frac) = t.split_once('.').unwrap_or((&t, ""));
    if whole.is_empty() && frac.is_empty()
        || frac.len() > exp
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
        || whole.len() > 12
    {
        return None;
    }
    let w: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let f: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<exp$}").parse().ok()?
    };
    w.checked_mul(10i64.pow(exp as u32))?.checked_add(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_shown_and_read_in_its_currency() {
        assert_eq!(money(5_000, "KRW"), "5,000 KRW");
        assert_eq!(money(-1_234_567, "KRW"), "-1,234,567 KRW");
        assert_eq!(money(1_250, "USD"), "12.50 USD");
        assert_eq!(money(5, "USD"), "0.05 USD");
        assert_eq!(parse_money("5,000", "KRW"), Some(5_000));
        assert_eq!(parse_money("12.5", "USD"), Some(1_250));
        assert_eq!(parse_money("12.505", "USD"), None);
        assert_eq!(parse_money("1.5", "KRW"), None);
        assert_eq!(parse_money("-3", "KRW"), None);
        assert_eq!(parse_money("", "KRW"), None);
        assert_eq!(parse_money("1e9", "KRW"), None);
    }

    #[test]
    fn a_tap_cleared_without_a_posting_is_a_free_tap() {
        let dir = tempfile::tempdir().unwrap();
        let l = crate::ledger::Ledger::open(dir.path(), 16 << 20).unwrap();
        let uid = [4, 0xA1, 0xA1, 0xA1, 0xA1, 0xA1, 0xA1];
        l.transact(|w| {
            // Counter 2: a fare (posted under its marker); 3: a record-only tap (the marker
            // alone); 1: no tap of this card cleared.
            w.post(
                0,
                "issuer:float",
                "operator:metro",
                1_250,
                "tap:04A1A1A1A1A1A1:2",
            )?;
            for tmc in [2, 3] {
                let marker = format!("tap:04A1A1A1A1A1A1:{tmc}");
                w.put_idempotent(&marker, &serde_json::json!("TMV"))?;
            }
            // 4: a free tap whose gateway sent its stop and a transfer flag.
            w.put_idempotent(
                "tap:04A1A1A1A1A1A1:4",
                &serde_json::json!({"tmv": "TMV", "stop_id": 12, "route_id": 3, "fare_flags": 1}),
            )?;
            Ok(())
        })
        .unwrap();
        let r = l.read().unwrap();
        let plain = FreeTap {
            tmc: 3,
            stop: None,
            marks: vec![],
        };
        assert_eq!(free_taps(&*r, &uid, 3).unwrap(), vec![plain.clone()]);
        assert_eq!(free_taps(&*r, &uid, 2).unwrap(), Vec::<FreeTap>::new());
        let transfer = FreeTap {
            tmc: 4,
            stop: Some("stop 12, route 3".into()),
            marks: vec!["transfer"],
        };
        assert_eq!(free_taps(&*r, &uid, 4).unwrap(), vec![transfer, plain]);
    }

    #[test]
    fn a_tap_is_named_by_the_published_tables_stop_and_route() {
        let src = include_str!("../../../fare-rules/samples/metro-city/rules.toml");
        let p = crate::fares::propose("rules.toml", src.as_bytes()).unwrap();
        let bytes = fare_rules::signed::encode(p.engine.table(), |_| [0; 64]).unwrap();
        let code = fare_rules::table::code24;
        let places = Places(Some(fare_rules::signed::decode_unverified(&bytes).unwrap()));
        let d = TapDetail {
            stop_id: Some(code("Market")),
            route_id: Some(code("M1")),
            flags: None,
        };
        assert_eq!(
            stop_words(&d, &places).as_deref(),
            Some("stop Market, route M1")
        );
        let unknown = TapDetail {
            stop_id: Some(7),
            ..d
        };
        assert_eq!(
            stop_words(&unknown, &places).as_deref(),
            Some("stop 7, route M1")
        );
        assert_eq!(
            stop_words(&d, &Places(None)).as_deref(),
            Some(format!("stop {}, route {}", code("Market"), code("M1")).as_str())
        );
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(when(0), "1970-01-01 00:00 UTC");
        assert_eq!(month_of(1_700_000_000_000), "2023-11");
    }
}
