//! A step's reads at once ([`crate::ledger::LedgerRead::look_up`] of a [`super::PgRead`]): the
//! same statements the single reads run, sent in one round trip, their answers kept
//! ([`Found`]) for the reads that follow.

use super::read::{big, record, uid_hex};
use super::{cards, db_error, Db, LedgerError};
use crate::ledger::interface::Lookups;
use crate::ledger::records::*;
use postgres::types::ToSql;
use std::collections::HashMap;

/// The answers of a look-up, by what was looked up.
#[derive(Default)]
pub(crate) struct Found {
    pub keys: HashMap<String, Option<serde_json::Value>>,
    pub cards: HashMap<[u8; 7], Option<CardShadow>>,
    pub open_intents: HashMap<[u8; 7], Vec<LoadIntent>>,
    pub instruments: HashMap<(String, String), Option<Instrument>>,
    pub funding_days: HashMap<(String, String, u64), i64>,
}

/// The statements of the single reads too (`read::q`): a look-up answers as they do.
pub(super) const KEY: &str = "SELECT answer FROM idempotency WHERE key = $1";
pub(super) const CARD: &str = concat!(
    "SELECT ",
    cards::columns!(),
    " FROM cards c WHERE c.uid = $1"
);
pub(super) const OPEN_INTENTS: &str = "SELECT record FROM load_intents WHERE uid = $1 \
     AND state = 'authorised' ORDER BY tmc_before, attempt";
pub(super) const INSTRUMENT: &str = "SELECT record FROM instruments WHERE source = $1 AND id = $2";
pub(super) const FUNDING_DAY: &str =
    "SELECT total_minor FROM funding_days WHERE source = $1 AND instrument = $2 AND day = $3";

/// Reads everything `ahead` names in one round trip.
pub(super) fn look_up(db: &mut Db<'_>, ahead: &Lookups) -> Result<Found, LedgerError> {
    let uids: Vec<String> = ahead.cards.iter().map(uid_hex).collect();
    let open_uids: Vec<String> = ahead.open_intents.iter().map(uid_hex).collect();
    let days: Vec<i64> = ahead.funding_days.iter().map(|d| big(d.2)).collect();
    let mut params: Vec<(&'static str, Vec<&(dyn ToSql + Sync)>)> = Vec::new();
    params.extend(ahead.keys.iter().map(|k| (KEY, vec![k as _])));
    params.extend(uids.iter().map(|u| (CARD, vec![u as _])));
    params.extend(open_uids.iter().map(|u| (OPEN_INTENTS, vec![u as _])));
    let instruments = ahead.instruments.iter();
    params.extend(instruments.map(|(s, i)| (INSTRUMENT, vec![s as _, i as _])));
    for ((s, i, _), day) in ahead.funding_days.iter().zip(&days) {
        params.push((FUNDING_DAY, vec![s as _, i as _, day as _]));
    }
    if params.is_empty() {
        return Ok(Found::default());
    }
    let queries: Vec<(&'static str, &[&(dyn ToSql + Sync)])> =
        params.iter().map(|(sql, p)| (*sql, p.as_slice())).collect();
    let mut answers = db
        .query_all(&queries)
        .map_err(|e| db_error(&e))?
        .into_iter();
    let mut next = || answers.next().unwrap_or_default();
    let mut found = Found::default();
    for k in &ahead.keys {
        let answer = next().first().map(|r| r.get(0));
        found.keys.insert(k.clone(), answer);
    }
    for uid in &ahead.cards {
        let shadow = next().first().map(|r| cards::from_row(r, 0)).transpose()?;
        found.cards.insert(*uid, shadow);
    }
    for uid in &ahead.open_intents {
        let rows = next();
        let open = rows.iter().map(record).collect::<Result<_, _>>()?;
        found.open_intents.insert(*uid, open);
    }
    for key in &ahead.instruments {
        let registration = next().first().map(record).transpose()?;
        found.instruments.insert(key.clone(), registration);
    }
    for key in &ahead.funding_days {
        let total = next().first().map_or(0, |r| r.get(0));
        found.funding_days.insert(key.clone(), total);
    }
    Ok(found)
}
