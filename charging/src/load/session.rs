//! Relay sessions: opening one (or answering a retried start), each step of the card dialogue, refusals, and expiry.

use super::*;
use crate::ledger::wait_for;

/// An Idempotency-Key is 1 to 128 characters (a load's, a payment's or refund's relay, a
/// refund made by a merchant).
pub(super) fn check_idempotency_key(key: &str) -> Result<(), LoadError> {
    if key.is_empty() || key.len() > 128 {
        return Err(LoadError::BadRequest(
            "an Idempotency-Key of 1 to 128 characters is required".into(),
        ));
    }
    Ok(())
}

impl LoadService {
    pub(super) fn open_session(
        &self,
        caller: &str,
        req: LoadRequest,
        purpose: Purpose,
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        check_idempotency_key(&req.idempotency_key)?;
        let ikey = Self::idem_key(&purpose, caller, &req.idempotency_key);
        let fingerprint = request_fingerprint(&req, &purpose);
        let differs = match purpose {
            Purpose::Load => LOAD_DIFFERS,
            Purpose::Reversal(_) => REVERSAL_DIFFERS,
            Purpose::Payment(_) | Purpose::Refund(_) => PAYMENT_DIFFERS,
        };
        // The stored answer and a load's instrument read before the sessions' lock is taken
        // (no other start waits for these reads), each the latest committed (a key's
        // marker, the limits and the intent are checked again when the intent is recorded).
        let owner = {
            let r = self.ledger.read_latest()?;
            // Both in one round trip where a read costs one (PostgreSQL).
            let source = self.sources.get(&req.funding_source);
            r.look_up(&crate::ledger::Lookups {
                keys: vec![ikey.clone()],
                instruments: match (&purpose, source) {
                    (Purpose::Load, Some(source)) => {
                        vec![(source.name().to_string(), req.instrument.clone())]
                    }
                    _ => vec![],
                },
                ..Default::default()
            })?;
            if let Some(reply) = stored_reply_in(&*r, &ikey, &fingerprint, differs)? {
                return Ok(reply);
            }
            match (&purpose, self.sources.get(&req.funding_source)) {
                (Purpose::Load, Some(source)) => {
                    super::decide::instrument_of(&*r, source.as_ref(), &req.instrument)?
                }
                _ => None,
            }
        };
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if let Some(reply) = sessions.answer_again(&ikey, &fingerprint, differs)? {
            return Ok(reply);
        }
        if req.amount_minor <= 0 {
            return Err(LoadError::BadRequest(format!(
                "amount_minor must be positive, got {}",
                req.amount_minor
            )));
        }
        // A reversal takes back exactly what was loaded, whatever the limits are today; a
        // payment's limits were checked when it was made.
        if purpose == Purpose::Load {
            let max_load = self.cfg.max_load_for(&req.funding_source);
            if req.amount_minor > max_load {
                return Err(LoadError::BadRequest(format!(
                    "amount_minor {} exceeds the per-load limit of {max_load} for {} funding",
                    req.amount_minor, req.funding_source
                )));
            }
            let Some(source) = self.sources.get(&req.funding_source) else {
                return Err(LoadError::BadRequest(format!(
                    "unknown funding source {:?}; available: {}",
                    req.funding_source,
                    self.source_names().join(", ")
                )));
            };
            // The instrument is looked up, never formatted into an account from the request.
            self.check_owned(caller, source.as_ref(), &req.instrument, owner)?;
        }
        if let Purpose::Reversal(_) = purpose {
            if !self.sources.contains_key(&req.funding_source) {
                return Err(LoadError::BadRequest(format!(
                    "unknown funding source {:?}; available: {}",
                    req.funding_source,
                    self.source_names().join(", ")
                )));
            }
        }
        if sessions.active.len() >= self.cfg.max_sessions {
            return Err(LoadError::Busy);
        }
        let (dialogue, first) = match purpose {
            Purpose::Load | Purpose::Refund(_) => {
                Dialogue::start(req.uid, KeyKind::Credit, ins::CREDIT)
            }
            // A reversal or a payment debits under the credit key: the card does not arm
            // LimitedCredit for a debit under that key, so no debit-key holder (a validator)
            // can credit it back.
            Purpose::Reversal(_) | Purpose::Payment(_) => {
                Dialogue::start(req.uid, KeyKind::Credit, ins::DEBIT)
            }
        };
        let id = session_id();
        let reply = Reply::Command {
            session_id: id.clone(),
            seq: 1,
            commands: first.iter().map(hex::encode_upper).collect(),
        };
        sessions.insert(Session {
            id,
            caller: caller.to_string(),
            request: req,
            dialogue,
            seq: 1,
            last_reply: reply.clone(),
            touched_ms: now_ms,
            started_ms: now_ms,
            intent_recorded: false,
            commit_sent: false,
            idempotent_stored: false,
            migration: None,
            purpose,
            idem: ikey,
            fingerprint,
        });
        Ok(reply)
    }

    /// The final answer stored in the ledger under idempotency key `ikey`, if any (refused
    /// when the key was used for another request).
    pub(super) fn stored_reply(
        &self,
        ikey: &str,
        fingerprint: &str,
        differs: &'static str,
    ) -> Result<Option<Reply>, LoadError> {
        let r = self.ledger.read()?;
        stored_reply_in(&*r, ikey, fingerprint, differs)
    }

    /// Feeds the card's answers to the commands of step `seq` of session `id`: the calling
    /// thread waits for the ledger's commits ([`LoadService::respond_async`] from a task).
    pub fn respond(
        &self,
        caller: &str,
        id: &str,
        seq: u32,
        responses: &[Vec<u8>],
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        wait_for(self.respond_async(caller, id, seq, responses, now_ms))
    }

    /// [`LoadService::respond`] for a task: a step that decides or completes the load awaits
    /// its group commit ([`crate::ledger::Ledger::transact_async`]) instead of holding a
    /// thread. The session is taken out while the step is worked on and put back at the end:
    /// run this to completion (the API runs it in a task of its own, which a client hanging
    /// up does not cancel), or the session stays in flight until the server restarts.
    pub async fn respond_async(
        &self,
        caller: &str,
        id: &str,
        seq: u32,
        responses: &[Vec<u8>],
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        if responses.is_empty() || responses.len() > 8 {
            return Err(LoadError::BadRequest(format!(
                "{} responses: a step has 1 to 8",
                responses.len()
            )));
        }
        // Take the session out while we work on it (no lock held across HSM or ledger work).
        let mut s = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            if let Some(f) = sessions.finished.get(id) {
                if f.caller != caller {
                    return Err(LoadError::NotYours);
                }
                if seq == f.seq {
                    // A retry of the last step: the same final answer again.
                    return Ok(f.reply.clone());
                }
                return Err(LoadError::OutOfOrder {
                    expected: f.seq,
                    got: seq,
                });
            }
            if sessions.in_flight.contains(id) {
                return Err(LoadError::InProgress);
            }
            let s = sessions
                .active
                .get(id)
                .ok_or_else(|| LoadError::NoSession(id.to_string()))?;
            if s.caller != caller {
                return Err(LoadError::NotYours);
            }
            if seq == s.seq.wrapping_sub(1) {
                // A retry of the previous step: the same answer again.
                return Ok(s.last_reply.clone());
            }
            if seq != s.seq {
                return Err(LoadError::OutOfOrder {
                    expected: s.seq,
                    got: seq,
                });
            }
            sessions.take(id).expect("present")
        };
        s.touched_ms = now_ms;
        let reply = match self.advance(&mut s, responses, now_ms).await {
            Ok(reply) if reply.is_final() && !s.idempotent_stored => {
                let (key, value) = (s.idem.clone(), stored_value(&reply, &s.fingerprint));
                // No `?`: a failure goes on to the session's handling below.
                let stored = self
                    .ledger
                    // A write of the session's own key, nothing read: `READ COMMITTED` on
                    // PostgreSQL.
                    .transact_async(crate::ledger::postgres::read_committed(move |t| {
                        t.put_idempotent(&key, &value)
                    }))
                    .await;
                stored.map_err(LoadError::from).map(|()| {
                    s.idempotent_stored = true;
                    reply
                })
            }
            other => other,
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // Our own failure (storage, HSM): the session ends; an intent already recorded
                // is settled at the card's next contact.
                let mut sessions = self.sessions.lock().expect("sessions lock");
                if s.intent_recorded {
                    self.stats.lock().expect("stats").pending += 1;
                    // A retried start with this key must not begin a second load while this
                    // one is undecided: it gets this answer (kept in memory; the ledger could
                    // not take it).
                    s.last_reply = Reply::Pending {
                        session_id: s.id.clone(),
                        detail: format!("the server failed ({e}); the load is settled at the card's next contact"),
                    };
                    s.seq += 1;
                    sessions.finish(s, self.cfg.max_finished_sessions);
                } else {
                    sessions.forget(&s.id, &s.idem);
                }
                return Err(e);
            }
        };
        s.last_reply = reply.clone();
        if let Reply::Command { seq, .. } = &reply {
            s.seq = *seq;
        } else {
            s.seq += 1;
        }
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if reply.is_final() {
            // Finished sessions stay for retries until they expire.
            sessions.finish(s, self.cfg.max_finished_sessions);
        } else {
            sessions.insert(s);
        }
        Ok(reply)
    }

    pub(super) async fn advance(
        &self,
        s: &mut Session,
        responses: &[Vec<u8>],
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        if s.migration.is_some() {
            return Ok(self.advance_migration(s, responses));
        }
        let mut step = Step::Continue;
        for response in responses {
            let fed = self.with_hsm(|hsm| {
                s.dialogue
                    .on_response(hsm, &mut rand::rngs::OsRng, response)
            });
            step = match fed {
                Ok(st) => st,
                Err(e) => return Ok(self.dialogue_failed(s, e)),
            };
        }
        if matches!(step, Step::Continue) {
            // Fewer answers than commands: the card left the field mid-batch.
            return Ok(
                self.dialogue_failed(s, TxError::Transport(purse::txn::TransportError::CardGone))
            );
        }
        let step = match step {
            // The decision reads and writes the ledger and asks the funding source: its
            // intent's group commit is awaited, a funding source that waits hands the
            // worker's other tasks over (`FundingSource::waits`).
            Step::Decide(snapshot) => match self.decide(s, &snapshot, now_ms).await? {
                Ok(decision) => match self.with_hsm(|hsm| s.dialogue.decide(hsm, decision)) {
                    Ok(st) => st,
                    Err(e) => return Ok(self.dialogue_failed(s, e)),
                },
                Err(refusal) => return Ok(refusal),
            },
            other => other,
        };
        match step {
            Step::Transmit(batch) => {
                if s.dialogue.commit_sent() {
                    s.commit_sent = true;
                }
                Ok(Reply::Command {
                    session_id: s.id.clone(),
                    seq: s.seq + 1,
                    commands: batch.iter().map(hex::encode_upper).collect(),
                })
            }
            Step::Done(Outcome::Committed { receipt, .. }) => {
                let verified = self.with_hsm(|hsm| hsm.verify_tmac(&receipt));
                match verified {
                    Ok(proof) => {
                        let reply = Reply::Completed {
                            session_id: s.id.clone(),
                            amount_minor: receipt.amount_minor(),
                            balance_minor: receipt.balance_after_minor(),
                            tmc: receipt.tmc(),
                        };
                        let stored = (s.idem.clone(), stored_value(&reply, &s.fingerprint));
                        self.complete_async(&proof, now_ms, Some(stored)).await?;
                        s.idempotent_stored = true;
                        self.stats.lock().expect("stats").completed += 1;
                        Ok(self.migrate_after_load(s, receipt.key_version(), reply))
                    }
                    Err(e) => {
                        // The commit answer verified under the session MAC but the TMV does
                        // not: a broken card or key mismatch. Leave it for settlement.
                        self.stats.lock().expect("stats").pending += 1;
                        Ok(Reply::Pending {
                            session_id: s.id.clone(),
                            detail: format!("transaction MAC check failed: {e}"),
                        })
                    }
                }
            }
            Step::Done(Outcome::Refused { .. }) => {
                Ok(self.refused(s, "refused", "nothing to load"))
            }
            Step::Decide(_) | Step::Continue => unreachable!("handled above"),
        }
    }

    pub(super) fn refused(&self, s: &Session, reason: &str, detail: &str) -> Reply {
        self.stats.lock().expect("stats").refused += 1;
        Reply::Refused {
            session_id: s.id.clone(),
            reason: reason.to_string(),
            detail: detail.to_string(),
        }
    }

    pub(super) fn dialogue_failed(&self, s: &Session, e: TxError) -> Reply {
        if s.commit_sent {
            // The card may or may not have committed: settle at next contact.
            self.stats.lock().expect("stats").pending += 1;
            return Reply::Pending {
                session_id: s.id.clone(),
                detail: format!("the card's answer to the commit could not be verified ({e}); the load is settled at the card's next contact"),
            };
        }
        if s.intent_recorded {
            // The card refused before any commit (limit, wrong MAC): nothing is staged on a
            // card after an error, so the intent can be voided now.
            let uid = s.request.uid;
            if let Some(snap) = s.dialogue.snapshot().cloned() {
                if let Err(err) = self.void_intent(&uid, snap.tmc(), 0) {
                    tracing::warn!(%err, "voiding after a refused credit failed; left for settlement");
                }
            }
        }
        let reason = match &e {
            TxError::UnknownKeyVersion(_) => "unknown_key_version",
            TxError::Card { .. } => "card_refused",
            TxError::Sam(_) => "authentication_failed",
            _ => "card_dialogue_failed",
        };
        self.refused(s, reason, &e.to_string())
    }

    /// Drops relay sessions idle longer than the configured timeout.
    pub fn expire_sessions(&self, now_ms: u64) -> usize {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let sessions = &mut *sessions;
        let before = sessions.active.len() + sessions.finished.len();
        let timeout = self.cfg.session_idle_timeout_ms;
        let mut pending = 0;
        let by_idem = &mut sessions.by_idem;
        sessions.active.retain(|_, s| {
            let keep = now_ms.saturating_sub(s.touched_ms) < timeout;
            if !keep {
                if s.intent_recorded {
                    pending += 1;
                }
                if by_idem.get(&s.idem).is_some_and(|v| *v == s.id) {
                    by_idem.remove(&s.idem);
                }
            }
            keep
        });
        let by_idem = &mut sessions.by_idem;
        sessions.finished.retain(|id, f| {
            let keep = now_ms.saturating_sub(f.touched_ms) < timeout;
            if !keep && by_idem.get(&f.idem).is_some_and(|v| v == id) {
                by_idem.remove(&f.idem);
            }
            keep
        });
        let finished = &sessions.finished;
        sessions
            .finished_order
            .retain(|id| finished.contains_key(id));
        self.stats.lock().expect("stats").pending += pending;
        before - sessions.active.len() - sessions.finished.len()
    }
}

/// [`LoadService::stored_reply`] read in snapshot `r`.
fn stored_reply_in(
    r: &dyn crate::ledger::LedgerRead,
    ikey: &str,
    fingerprint: &str,
    differs: &'static str,
) -> Result<Option<Reply>, LoadError> {
    match r.idempotent(ikey)? {
        Some(v) => {
            same_request(&v, fingerprint, differs)?;
            Ok(Some(reply_from_json(&v)))
        }
        None => Ok(None),
    }
}
