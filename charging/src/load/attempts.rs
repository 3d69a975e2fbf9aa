//! Earlier attempts of a load with the same idempotency key: on another charging server (one
//! that died, or that the client left), or on this one before a restart.
//!
//! A relay session, with the card's session keys, lives only in the server that opened it; a
//! step that reaches another server is refused (`unknown_session`) and the client starts again
//! with the same Idempotency-Key. So a start may find that key's load already in the ledger:
//! its intent, recorded with a marker `attempt:<idempotency key as stored>` in the same
//! transaction. Before deciding anything, the new session resolves it against the card it just
//! read under MAC ([`LoadService::settle_from_snapshot`]): applied → the load is completed and
//! answered, never loaded twice; never applied → voided, and the load goes on. Two starts with
//! one key racing on two servers are decided by the database: the marker is read and written in
//! the transaction that records the intent, so only one records it; the other answers
//! [`LoadError::InProgress`] (retry with the same key).

use super::*;
use crate::ledger::{LedgerRead, LedgerWrite};

/// An intent recorded less than this before a session opened may belong to a session still
/// relaying to the card (on another server, whose clock may differ by up to this much):
/// voiding it from this session's snapshot could race that session's commit, so the start is
/// answered [`LoadError::InProgress`] instead. Older, the card's session for it was ended by
/// this session's own authentication, and the card's counter settles it.
pub(super) const LIVE_MARGIN_MS: u64 = 1_000;

/// The marker of a load's intent under its idempotency key (as stored).
pub(super) fn attempt_key(idem: &str) -> String {
    format!("attempt:{idem}")
}

/// The marker's value: where the intent is, and what was asked.
fn attempt_value(intent: &LoadIntent, fingerprint: &str) -> serde_json::Value {
    serde_json::json!({
        "uid": intent.uid,
        "tmc_before": intent.tmc_before,
        "request_sha256": fingerprint,
    })
}

/// Who claims an idempotency key, owned (a ledger transaction may run on another thread, and
/// again).
#[derive(Clone)]
pub(super) struct Claimant {
    /// The key as stored (`LoadService::idem_key`).
    idem: String,
    /// The client's key.
    key: String,
    caller: String,
    fingerprint: String,
}

impl Session {
    pub(super) fn claimant(&self) -> Claimant {
        Claimant {
            idem: self.idem.clone(),
            key: self.request.idempotency_key.clone(),
            caller: self.caller.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// The intent the marker of `s`'s key points at, if it is still this key's (a later attempt at
/// the same counter under another key means this key's was voided).
fn marked_intent(
    r: &dyn LedgerRead,
    s: &Claimant,
) -> Result<Result<Option<LoadIntent>, LoadError>, LedgerError> {
    let Some(v) = r.idempotent(&attempt_key(&s.idem))? else {
        return Ok(Ok(None));
    };
    if same_request(&v, &s.fingerprint, LOAD_DIFFERS).is_err() {
        return Ok(Err(LoadError::IdempotencyKeyReused(LOAD_DIFFERS)));
    }
    let uid: Option<[u8; 7]> = v["uid"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| b.try_into().ok());
    let tmc = v["tmc_before"].as_u64().and_then(|t| u32::try_from(t).ok());
    let (Some(uid), Some(tmc)) = (uid, tmc) else {
        return Ok(Ok(None));
    };
    Ok(Ok(r.intent(&uid, tmc)?.filter(|i| {
        i.idempotency_key == s.key && i.requested_by == s.caller && i.kind == IntentKind::Load
    })))
}

/// Inside the transaction that records a load's intent: the attempt with its idempotency key
/// that is completed or still open (another server's, racing this one), if any. Read in that
/// transaction, so the database decides between two servers; [`mark_attempt`] then claims the
/// key in it.
pub(super) fn taken_attempt(
    t: &mut dyn LedgerWrite,
    s: &Claimant,
) -> Result<Option<Box<LoadIntent>>, LedgerError> {
    match marked_intent(t, s)? {
        Ok(Some(earlier)) if earlier.state != IntentState::Voided => Ok(Some(Box::new(earlier))),
        Ok(_) => Ok(None),
        // A key used for another request was refused at the start already; a marker of
        // another request here means one was made meanwhile: do not take the key.
        Err(_) => Err(LedgerError::Commit(LOAD_DIFFERS.into())),
    }
}

/// Claims the idempotency key for `intent` if no marker is stored under it yet (in the
/// transaction that records it): whether it did. A key claimed by an insert, not read first,
/// leaves no read of the marker's index page in the transaction (on PostgreSQL, fewer false
/// serialization conflicts with concurrent loads); when a marker is there,
/// [`taken_attempt`] reads it and [`mark_attempt`] takes the key over if it may.
pub(super) fn claim_attempt(
    t: &mut dyn LedgerWrite,
    s: &Claimant,
    intent: &LoadIntent,
) -> Result<bool, LedgerError> {
    t.claim_idempotent(
        &attempt_key(&s.idem),
        &attempt_value(intent, &s.fingerprint),
    )
}

/// Claims the idempotency key for `intent` (in the transaction that records it).
pub(super) fn mark_attempt(
    t: &mut dyn LedgerWrite,
    s: &Claimant,
    intent: &LoadIntent,
) -> Result<(), LedgerError> {
    t.put_idempotent(
        &attempt_key(&s.idem),
        &attempt_value(intent, &s.fingerprint),
    )
}

impl LoadService {
    /// The load's earlier attempt with this key, if its intent is in the ledger. An open one
    /// that may still be relayed by another session ([`LIVE_MARGIN_MS`]) is
    /// [`LoadError::InProgress`].
    /// Read in the step's snapshot `r` ([`LoadService::decide`] reads what it needs in one).
    pub(super) fn earlier_attempt(
        &self,
        r: &dyn LedgerRead,
        s: &Session,
    ) -> Result<Option<LoadIntent>, LoadError> {
        if s.purpose != Purpose::Load {
            return Ok(None);
        }
        let earlier = marked_intent(r, &s.claimant())??;
        match earlier {
            Some(i)
                if i.state == IntentState::Authorised
                    && i.created_ms.saturating_add(LIVE_MARGIN_MS) > s.started_ms =>
            {
                Err(LoadError::InProgress)
            }
            other => Ok(other),
        }
    }

    /// After the card's snapshot settled it: the earlier attempt's answer (completed: the
    /// load, never a second one; still open: the card cannot tell yet, pending), or `None`
    /// when it was voided and this session loads.
    pub(super) fn after_earlier(
        &self,
        s: &Session,
        earlier: &LoadIntent,
    ) -> Result<Option<Reply>, LoadError> {
        let uid = s.request.uid;
        let now = {
            let r = self.ledger.read()?;
            r.intent(&uid, earlier.tmc_before)?
        };
        let Some(now) = now.filter(|i| i.attempt == earlier.attempt) else {
            return Ok(None);
        };
        Ok(match now.state {
            IntentState::Voided => None,
            IntentState::Completed => Some(completed_reply(s, &now)),
            IntentState::Authorised => Some(Reply::Pending {
                session_id: s.id.clone(),
                detail: format!(
                    "an earlier attempt with this Idempotency-Key (card counter {}) is not settled yet; it is settled at the card's next contact",
                    now.tmc_before
                ),
            }),
        })
    }

    /// The answer to an attempt the database found taken while recording this session's
    /// intent: the completed load's, or [`LoadError::InProgress`].
    pub(super) fn taken_answer(
        &self,
        s: &Session,
        earlier: &LoadIntent,
    ) -> Result<Reply, LoadError> {
        match earlier.state {
            IntentState::Completed => Ok(completed_reply(s, earlier)),
            _ => Err(LoadError::InProgress),
        }
    }
}

/// A completed load's answer, from its intent.
fn completed_reply(s: &Session, i: &LoadIntent) -> Reply {
    Reply::Completed {
        session_id: s.id.clone(),
        amount_minor: i.amount_minor,
        balance_minor: i.balance_before_minor.saturating_add(i.amount_minor),
        tmc: i.tmc_before.saturating_add(1),
    }
}
