//! Fare tables the back office publishes to validators: rules uploaded (TOML source or a zipped
//! GTFS feed) are compiled and checked ([`propose`], `fare check`'s review), their revenue
//! impact replayed against a tap log ([`simulate`], `fare simulate`), then signed in the HSM and
//! kept in the ledger as the published table ([`publish`]) — refused, and nothing kept, when
//! the check finds an error or the version is not newer than the one published (validators
//! would refuse it). The gateways fetch it (`GET /v1/fares/signed/snapshot`) and relay it
//! retained on `tapgate/v1/<operator>/fares/table`, where validators take it. `tapgate fare
//! publish` (`POST /v1/fares`) and the operator console's *Publish* are this one operation.

use crate::ledger::{LedgerError, LedgerRead};
use crate::load::LoadService;
use fare_rules::check::Authored;
use fare_rules::engine::Engine;
use fare_rules::publish::{self, Review, SignError};
use fare_rules::simulate::Report;
use serde::{Deserialize, Serialize};

/// Where the published table is kept in the ledger's key-value records.
pub const PUBLISHED_KEY: &str = "fares:published";
/// The largest upload accepted (rules or a zipped feed; a tap log).
pub const MAX_UPLOAD_BYTES: usize = 16 << 20;

/// The fare table published, as the ledger keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    /// The table's version (validators take only a newer one).
    pub version: u32,
    /// The table's name.
    pub name: String,
    /// The file it was uploaded as.
    pub source: String,
    /// The signed table (`.tgft`), hex.
    pub table_hex: String,
    /// When (unix ms).
    pub published_ms: u64,
    /// Who: the operator's page login or API token name.
    pub by: String,
}

impl Published {
    /// The signed table's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        hex::decode(&self.table_hex).unwrap_or_default()
    }
}

/// The published table, if any.
pub fn published(r: &dyn LedgerRead) -> Result<Option<Published>, LedgerError> {
    Ok(r.idempotent(PUBLISHED_KEY)?
        .and_then(|v| serde_json::from_value(v).ok()))
}

/// Why rules could not be considered or published.
#[derive(Debug, thiserror::Error)]
pub enum FaresError {
    /// The upload is not rules that compile (bad input: the message says where).
    #[error("{0}")]
    Rules(String),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The HSM could not sign, or what it signed does not verify.
    #[error("{0}")]
    Signing(String),
}

/// Rules uploaded, compiled and checked.
pub struct Proposal {
    /// The compiled, validated table.
    pub engine: Engine,
    /// What the check held them to.
    pub authored: Authored,
    /// `fare check`'s findings and summary.
    pub review: Review,
    /// The file's name.
    pub name: String,
}

/// An error and its causes in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Rules uploaded as `name` (`.toml` source, or a zipped GTFS feed), compiled and checked as
/// `tapgate fare check` checks a file.
pub fn propose(name: &str, bytes: &[u8]) -> Result<Proposal, FaresError> {
    if bytes.len() > MAX_UPLOAD_BYTES {
        return Err(FaresError::Rules(format!(
            "{name}: {} bytes; at most {MAX_UPLOAD_BYTES} are accepted",
            bytes.len()
        )));
    }
    let (table, authored) =
        fare_rules::load_bytes(name, bytes).map_err(|e| FaresError::Rules(chain(&e)))?;
    let engine = Engine::new(table).map_err(|e| FaresError::Rules(format!("{name}: {e}")))?;
    let review = publish::review(&engine, authored);
    Ok(Proposal {
        engine,
        authored,
        review,
        name: name.to_string(),
    })
}

/// The revenue impact of `p` against the published table, over a tap log (`fare simulate`'s
/// CSV: card,rider,at,route,stop,kind), as `tapgate fare simulate` replays it.
pub fn simulate(
    p: &Proposal,
    baseline: &Published,
    log_name: &str,
    log: &str,
) -> Result<Report, String> {
    let base = fare_rules::signed::decode_unverified(&baseline.bytes())
        .map_err(|e| format!("the published table: {e}"))?;
    fare_rules::simulate::simulate(&p.engine, &base, log_name, log)
}

/// What [`publish`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Signed and kept: the gateways relay it.
    Published(Published),
    /// Nothing published, and why.
    Refused(String),
}

/// Signs `p` in the HSM and keeps it as the published table — unless `fare check` found an
/// error in it or its version is not newer than the published one (then nothing changes).
pub fn publish(
    loads: &LoadService,
    p: &Proposal,
    by: &str,
    now_ms: u64,
) -> Result<Outcome, FaresError> {
    if p.review.errors > 0 {
        return Ok(Outcome::Refused(format!(
            "fare check found {} error(s): nothing was published",
            p.review.errors
        )));
    }
    let version = p.engine.table().meta.version;
    let not_newer = |held: u32| {
        Outcome::Refused(format!(
            "version {version} is not newer than the published version {held}: validators would refuse it (raise [table] version)"
        ))
    };
    if let Some(cur) = published(&*loads.ledger().read()?)? {
        if version <= cur.version {
            return Ok(not_newer(cur.version));
        }
    }
    let bytes = {
        let hsm = loads.hsm().lock().expect("hsm lock");
        let key = hsm.verifying_key();
        publish::sign_checked(&p.engine, p.authored, false, |m| hsm.sign(m), &key)
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(SignError::Findings(f)) => {
            return Ok(Outcome::Refused(format!(
                "fare check found {} error(s): nothing was published",
                f.len()
            )))
        }
        Err(e) => return Err(FaresError::Signing(e.to_string())),
    };
    let record = Published {
        version,
        name: p.engine.table().meta.name.clone(),
        source: p.name.clone(),
        table_hex: hex::encode(&bytes),
        published_ms: now_ms,
        by: by.to_string(),
    };
    let kept = record.clone();
    // Checked again in the transaction: two publishes at once keep only the newer.
    let held = loads.ledger().transact(move |w| {
        let cur: Option<Published> = w
            .idempotent(PUBLISHED_KEY)?
            .and_then(|v| serde_json::from_value(v).ok());
        match cur {
            Some(c) if c.version >= kept.version => Ok(Some(c.version)),
            _ => {
                let v = serde_json::to_value(&kept).expect("a published table serialises");
                w.put_idempotent(PUBLISHED_KEY, &v)?;
                Ok(None)
            }
        }
    })?;
    Ok(match held {
        Some(v) => not_newer(v),
        None => Outcome::Published(record),
    })
}
