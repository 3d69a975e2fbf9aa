//! Reversals: a Debit under the credit key that takes a completed load back, then a refund.

use super::*;

impl LoadService {
    /// Starts the reversal of the completed load that consumed counter `load_tmc` of card
    /// `uid`: the server debits the load's amount from the card (a Debit with the debit key,
    /// inside the HSM, proved by the card's transaction MAC) and refunds the load's funding.
    /// Only the caller who made the load, or an operator (`any_caller`), may; within
    /// `reversal_window_ms` of the load; once. Returns the first command for the card, like
    /// [`LoadService::start`]; the relay goes on with [`LoadService::respond`].
    pub fn start_reversal(
        &self,
        caller: &str,
        any_caller: bool,
        uid: [u8; 7],
        load_tmc: u32,
        idempotency_key: String,
        now_ms: u64,
    ) -> Result<Reply, LoadError> {
        let not_found = || LoadError::NoSuchLoad {
            uid: hex::encode_upper(uid),
            tmc: load_tmc,
        };
        let load = {
            let r = self.ledger.read()?;
            match load_tmc.checked_sub(1) {
                Some(before) => r.intent(&uid, before)?,
                None => None,
            }
        }
        .filter(|i| {
            i.kind == IntentKind::Load
                && i.state == IntentState::Completed
                && (any_caller || i.requested_by == caller)
        });
        let fingerprint = reversal_fingerprint(&uid, load_tmc);
        let Some(load) = load else {
            // An idempotent retry of a finished reversal still gets its answer.
            if let Some(v) = self.stored_answer(caller, &idempotency_key, &fingerprint)? {
                return Ok(v);
            }
            return Err(not_found());
        };
        let req = LoadRequest {
            uid,
            amount_minor: load.amount_minor,
            funding_source: load.funding_source.clone(),
            instrument: String::new(),
            idempotency_key,
        };
        if let Some(v) = self.stored_answer(caller, &req.idempotency_key, &fingerprint)? {
            return Ok(v);
        }
        if let Some(at) = load.reversed_at_tmc {
            return Err(LoadError::NotReversible(format!(
                "a reversal at counter {at} took it back or is in progress"
            )));
        }
        // From when the load was made (a load completed late by clearing gets no extra days).
        let age = now_ms.saturating_sub(load.created_ms);
        if age > self.cfg.reversal_window_ms {
            return Err(LoadError::NotReversible(format!(
                "loaded {} h ago; loads are reversed within {} h",
                age / 3_600_000,
                self.cfg.reversal_window_ms / 3_600_000
            )));
        }
        match self.sources.get(&load.funding_source) {
            Some(src) if src.refundable() => {}
            _ => {
                return Err(LoadError::NotReversible(format!(
                    "{} funding is not refunded",
                    load.funding_source
                )))
            }
        }
        self.open_session(caller, req, Purpose::Reversal(load_tmc), now_ms)
    }

    /// A reversal: the card must still hold the load's value; the reversal intent and the
    /// load's "being reversed" mark are durable before the Debit leaves the server.
    pub(super) fn decide_reversal(
        &self,
        s: &mut Session,
        snap: &CardSnapshot,
        load_tmc: u32,
        now_ms: u64,
    ) -> Result<Result<Decision, Reply>, LoadError> {
        let amount = s.request.amount_minor;
        let partly_spent = format!("the load of {amount} was partly spent");
        if let Some(refusal) = self.too_little(s, snap, &partly_spent) {
            return Ok(Err(refusal));
        }
        let uid = snap.uid();
        let (tmc, balance) = (snap.tmc(), snap.balance_minor());
        let (caller, key, key_version) = (
            s.caller.clone(),
            s.request.idempotency_key.clone(),
            snap.key_version(),
        );
        let mut reversal = LoadIntent {
            uid: hex::encode_upper(uid),
            tmc_before: tmc,
            attempt: 0,
            balance_before_minor: balance,
            amount_minor: amount,
            key_version,
            funding_source: String::new(),
            funding_auth: String::new(),
            instrument: String::new(),
            idempotency_key: key,
            requested_by: caller,
            state: IntentState::Authorised,
            created_ms: now_ms,
            settled_ms: None,
            kind: IntentKind::Reversal,
            reverses_tmc: Some(load_tmc),
            reversed_at_tmc: None,
            payment_id: None,
        };
        let record = intent_record(&reversal).to_vec();
        let snapshot = snap.clone();
        let recorded = self.ledger.transact(move |t| {
            let Some(load) = t.intent(&uid, load_tmc - 1)? else {
                return Ok(Err(("not_reversible", "the load is gone".into())));
            };
            if load.state != IntentState::Completed || load.reversed_at_tmc.is_some() {
                return Ok(Err((
                    "not_reversible",
                    "another reversal took it back or is in progress".into(),
                )));
            }
            reversal.funding_source = load.funding_source.clone();
            reversal.funding_auth = load.funding_auth.clone();
            reversal.instrument = load.instrument.clone();
            t.insert_intent(&uid, &mut reversal)?;
            t.mark_load_reversing(&uid, load_tmc, tmc + 1)?;
            t.observe_card(&snapshot)?;
            Ok(Ok(()))
        });
        self.apply_once_recorded(s, recorded, record)
    }
}
