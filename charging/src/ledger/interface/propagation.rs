//! How far each blocklist version has reached the validators, as the gateways report it.
//!
//! A gateway measures, per blocklist version it published, how many of its online validators
//! hold that version or a later one (their heartbeats say) and how long until 50, 99 and 100 %
//! of them did (`gateway::propagation`). It reports these figures to the charging server over
//! its gateway token (`POST /v1/blocklist/propagation`); the ledger keeps, per gateway, the
//! latest figure of each of the newest [`KEPT_VERSIONS`] versions it reported, so the
//! cardholder's page and the console show a block reaching the validators.
//!
//! Written once for both backends, in the ledger's key-value records (the idempotency
//! answers): `block-propagation:<gateway>` holds the gateway's figures, and
//! `block-propagation-gateways` the names of the gateways that reported. No table of its own:
//! a figure is replaced whole, read by key, and a handful of gateways report.

use super::{LedgerRead, LedgerWrite};
use crate::ledger::LedgerError;
use serde::{Deserialize, Serialize};

/// Versions kept per gateway (the gateway itself tracks its newest 64).
pub const KEPT_VERSIONS: usize = 64;

const INDEX: &str = "block-propagation-gateways";

fn key(gateway: &str) -> String {
    format!("block-propagation:{gateway}")
}

/// One gateway's figure for one blocklist version (the gateway's `GET
/// /v1/blocklist/propagation` answer, and when the charging server received it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockReach {
    /// The blocklist version.
    pub version: u64,
    /// When the gateway first published it to its validators (unix ms, gateway clock).
    pub published_at_ms: u64,
    /// The gateway's validators whose last heartbeat said online.
    pub online_validators: u64,
    /// Those of them holding this version or a later one.
    pub holding: u64,
    /// Time from publication until half of them held it (`None`: not yet).
    #[serde(default)]
    pub ms_to_50: Option<u64>,
    /// … until 99 % held it.
    #[serde(default)]
    pub ms_to_99: Option<u64>,
    /// … until all of them held it.
    #[serde(default)]
    pub ms_to_100: Option<u64>,
    /// When the charging server received this figure (unix ms; set on receipt).
    #[serde(default)]
    pub reported_ms: u64,
}

impl BlockReach {
    /// Whether the figure is one a gateway could measure: no more holders than validators, a
    /// percentile reached only with holders, and reached in order (50 ≤ 99 ≤ 100).
    pub fn check(&self) -> Result<(), String> {
        if self.holding > self.online_validators {
            return Err(format!(
                "version {}: {} holding of {} online",
                self.version, self.holding, self.online_validators
            ));
        }
        let order = [self.ms_to_50, self.ms_to_99, self.ms_to_100];
        let mut last = 0;
        let mut open = false;
        for t in order {
            match t {
                Some(_) if open || self.holding == 0 => {
                    return Err(format!(
                        "version {}: a percentile reached after one not reached, or with no holder",
                        self.version
                    ))
                }
                Some(t) if t < last => {
                    return Err(format!(
                        "version {}: percentiles reached out of order",
                        self.version
                    ))
                }
                Some(t) => last = t,
                None => open = true,
            }
        }
        Ok(())
    }

    /// The share of the online validators holding it, in whole percent (rounded down; 0 with
    /// none online).
    pub fn percent(&self) -> u64 {
        share(self.holding, self.online_validators).unwrap_or(0)
    }
}

/// `holding` of `online` in whole percent, rounded down (`None` with none online); no
/// overflow at any count a report may carry (`holding ≤ online` up to `u64::MAX`).
pub fn share(holding: u64, online: u64) -> Option<u64> {
    (u128::from(holding) * 100)
        .checked_div(u128::from(online))
        .map(|p| u64::try_from(p).unwrap_or(u64::MAX))
}

/// A gateway's figure for the card blocked (or unblocked) at `version`: the figure of the
/// oldest version the gateway published at or after it — its validators only ever hold the
/// versions it published, so holding that one is holding `version` or later. `None`: the
/// gateway has not published it yet (or reported nothing since).
pub fn reach_of(figures: &[BlockReach], version: u64) -> Option<&BlockReach> {
    figures
        .iter()
        .filter(|f| f.version >= version)
        .min_by_key(|f| f.version)
}

/// See [`LedgerRead::block_propagation`].
pub(super) fn all<R: LedgerRead + ?Sized>(
    r: &R,
) -> Result<Vec<(String, Vec<BlockReach>)>, LedgerError> {
    let mut out = Vec::new();
    for gateway in gateways(r)? {
        let figures: Vec<BlockReach> = r
            .idempotent(&key(&gateway))?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        out.push((gateway, figures));
    }
    Ok(out)
}

fn gateways<R: LedgerRead + ?Sized>(r: &R) -> Result<Vec<String>, LedgerError> {
    Ok(r.idempotent(INDEX)?
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default())
}

/// See [`LedgerWrite::record_block_propagation`].
pub(super) fn record<W: LedgerWrite + ?Sized>(
    w: &mut W,
    gateway: &str,
    figures: &[BlockReach],
    now_ms: u64,
) -> Result<usize, LedgerError> {
    let mut names = gateways(w)?;
    if let Err(at) = names.binary_search_by(|n| n.as_str().cmp(gateway)) {
        names.insert(at, gateway.to_string());
        w.put_idempotent(INDEX, &serde_json::json!(names))?;
    }
    let k = key(gateway);
    let mut kept: Vec<BlockReach> = w
        .idempotent(&k)?
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    for f in figures {
        let f = BlockReach {
            reported_ms: now_ms,
            ..f.clone()
        };
        match kept.binary_search_by_key(&f.version, |k| k.version) {
            Ok(i) => kept[i] = f,
            Err(i) => kept.insert(i, f),
        }
    }
    let excess = kept.len().saturating_sub(KEPT_VERSIONS);
    kept.drain(..excess);
    w.put_idempotent(&k, &serde_json::json!(kept))?;
    Ok(kept.len())
}
