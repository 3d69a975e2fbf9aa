//! Completion: the card's proof posted, intents voided, torn loads and reversals settled from the card's next snapshot, cards registered.

use super::*;
use crate::ledger::postgres::read_committed;
use crate::ledger::wait_for;

impl LoadService {
    /// Completes the intent the HSM-verified change `proof` proves, storing the client's
    /// answer with it; the calling thread waits for the commit ([`Self::complete_async`]
    /// driven by [`wait_for`], as [`LoadService::respond`] is).
    pub(super) fn complete(
        &self,
        proof: &TmacVerified,
        now_ms: u64,
        idem: Option<(String, serde_json::Value)>,
    ) -> Result<(), LoadError> {
        wait_for(self.complete_async(proof, now_ms, idem))
    }

    /// [`Self::complete`] for a task: it awaits the group commit.
    pub(super) async fn complete_async(
        &self,
        proof: &TmacVerified,
        now_ms: u64,
        idem: Option<(String, serde_json::Value)>,
    ) -> Result<(), LoadError> {
        let done = self
            .ledger
            .transact_async(completion(proof.clone(), now_ms, idem))
            .await?;
        if let Some(action) = done {
            self.apply_funding(&action);
        }
        Ok(())
    }

    pub(super) fn void_intent(
        &self,
        uid: &[u8; 7],
        tmc_before: u32,
        now_ms: u64,
    ) -> Result<(), LoadError> {
        let uid = *uid;
        let voided = self
            .ledger
            .transact(move |t| t.void_intent(&uid, tmc_before, now_ms))?;
        if let Some(action) = voided {
            self.apply_funding(&action);
        }
        Ok(())
    }

    /// Settles the card's open intents from a snapshot read under MAC (a later load session,
    /// or the counter and balance of a cleared tap). Returns how many were settled.
    pub fn settle_from_snapshot(
        &self,
        snap: &CardSnapshot,
        now_ms: u64,
    ) -> Result<usize, LoadError> {
        let open = {
            let r = self.ledger.read()?;
            r.open_intents(&snap.uid())?
        };
        self.settle_open(snap, open, now_ms)
    }

    /// [`Self::settle_from_snapshot`] of the card's open intents `open`, read already (each is
    /// settled in a transaction that finds it still open, or leaves it).
    pub(super) fn settle_open(
        &self,
        snap: &CardSnapshot,
        open: Vec<LoadIntent>,
        now_ms: u64,
    ) -> Result<usize, LoadError> {
        let mut settled = 0;
        for intent in open {
            // Whether the card made *this* change is decided by the record the server wrote
            // with it (read under MAC in this session), never by counter and balance alone: a
            // validator's debit (or a franchise credit) of the same amount at the same counter
            // has the same counter, balance and kind of transaction MAC.
            let ours = intent_record(&intent);
            let at = intent.tmc_before + 1;
            let on_card = snap.records().iter().any(|r| r[..] == ours[..]);
            if snap.tmc() == at && snap.records().first().is_some_and(|r| r[..] == ours[..]) {
                let pending = intent.pending_change(snap.uid());
                let Ok(Settlement::Committed(settled)) = txn::settle(&pending, snap) else {
                    tracing::error!(card = %purse::tap::masked_uid(&snap.uid()), tmc = intent.tmc_before, "pending change: the card holds its record but not its balance; left for clearing");
                    continue;
                };
                let verified = self.with_hsm(|hsm| hsm.verify_claim(settled.claim()));
                let proof = match verified {
                    Ok(proof) => proof,
                    // The HSM failing says nothing about the card: fail the request, the
                    // intent stays open for the next contact.
                    Err(e @ SamError::Hsm(_)) => return Err(e.into()),
                    Err(_) => {
                        tracing::error!(card = %purse::tap::masked_uid(&snap.uid()), tmc = intent.tmc_before, "pending change: the card's transaction MAC does not verify");
                        continue;
                    }
                };
                self.complete(&proof, now_ms, None)?;
            } else if snap.tmc() > at && on_card {
                // Applied, and the card has transacted since (its MAC for this one is gone):
                // the record, read under MAC, proves it.
                let after = i64::from(intent.balance_before_minor) + intent.delta_minor();
                let Ok(after) = i32::try_from(after) else {
                    continue;
                };
                let (snapshot, tmc_before) = (snap.clone(), intent.tmc_before);
                let done = self.ledger.transact(read_committed(move |t| {
                    // The card's row first (locked on PostgreSQL), then its counter's intents.
                    t.card(&snapshot.uid())?;
                    let proof = Completion::OnCard {
                        snapshot: &snapshot,
                        tmc_before,
                        balance_after_minor: after,
                    };
                    t.complete_intent(proof, now_ms)
                }))?;
                if let Some(action) = done {
                    self.apply_funding(&action);
                }
            } else if snap.tmc() == intent.tmc_before
                || (snap.tmc() >= at
                    && !on_card
                    && ((snap.tmc() - at) as usize) < snap.records().len())
            {
                // The counter never moved; or the record is not on the card and fewer
                // transactions followed than the card holds records (whatever size its cyclic
                // file is, ours could not have been pushed out): the card never applied it.
                self.void_intent(&snap.uid(), intent.tmc_before, now_ms)?;
                self.stats.lock().expect("stats").settled_voided += 1;
                settled += 1;
                continue;
            } else {
                // Counter behind (a restored card) or too far ahead to tell: clearing decides.
                continue;
            }
            self.stats.lock().expect("stats").settled_completed += 1;
            settled += 1;
        }
        Ok(settled)
    }

    /// Registers a newly personalised card: posts its initial value from `issuer:float`. A
    /// card already known keeps its balance (registering it again with the same value is an
    /// idempotent success). A card clearing learned from its first transaction (counter 1)
    /// proved the value it was personalised with: registering it with another value is
    /// refused ([`LoadError::RegistrationConflict`]) and recorded as a
    /// `registration_mismatch` anomaly. (Learned from a later counter, the card's changes
    /// before it sit between the two values, and the value is not checked.)
    pub fn register_card(
        &self,
        uid: &[u8; 7],
        personalised_minor: i64,
        now_ms: u64,
    ) -> Result<(), LoadError> {
        // The card holds an i32: a value beyond it would be booked as one amount and held as
        // another (4 294 967 396 as 100).
        let Ok(personalised_i32) = i32::try_from(personalised_minor) else {
            return Err(LoadError::BadRequest(format!(
                "personalised value {personalised_minor} does not fit a card's 32-bit balance"
            )));
        };
        let uid_hex = hex::encode_upper(uid);
        let reference = format!("issue:{uid_hex}");
        let uid = *uid;
        let registered = self.ledger.transact(move |t| {
            if let Some(learned) = t.learned_card(&uid)? {
                if learned.tmc == 1 && learned.balance_before_minor != personalised_i32 {
                    let detail = format!(
                        "card {uid_hex} was learned by clearing from its first transaction, \
                         which proved it was personalised with {}; registering it with \
                         personalised_minor {personalised_i32} contradicts that (the ledger \
                         keeps the proved value)",
                        learned.balance_before_minor
                    );
                    t.record_anomaly(&crate::ledger::Anomaly {
                        kind: "registration_mismatch".into(),
                        card_uid: uid_hex.clone(),
                        tmc: 0,
                        device_id: 0,
                        device_seq: 0,
                        detail: detail.clone(),
                    })?;
                    return Ok(Err(detail));
                }
            }
            t.issue_card(&uid, personalised_i32, &reference, now_ms)?;
            Ok(Ok(()))
        })?;
        registered.map_err(LoadError::RegistrationConflict)
    }
}

/// The transaction completing the intent `proof` proves: the posting, the intent's state, the
/// card's shadow and the client's stored answer become durable together (one group commit).
/// On PostgreSQL at `READ COMMITTED` under the locking rule
/// ([`crate::ledger::postgres::read_committed`]): the prefetch locks the card's row first, then
/// the counter's intents; a payment's or a refund's completion reads outside the rule and runs
/// at `SERIALIZABLE`.
fn completion(
    proof: TmacVerified,
    now_ms: u64,
    idem: Option<(String, serde_json::Value)>,
) -> impl FnMut(&mut dyn crate::ledger::LedgerWrite) -> Result<Option<FundingAction>, LedgerError>
       + Send
       + 'static {
    crate::ledger::postgres::read_committed(move |t| {
        // What completing reads, in one go where a backend pays a round trip a read: the
        // card (its shadow, account and gap clock), the state clearing learned it from, the
        // intents at its counter.
        let uid = proof.receipt().uid();
        let tmc_before = Completion::Proved(&proof).tmc_before();
        t.prefetch(&crate::ledger::ReadsAhead {
            cards: vec![uid],
            keys: vec![crate::ledger::learned_card_key(&uid)],
            counters: vec![(uid, tmc_before)],
            ..Default::default()
        })?;
        let action = t.complete_intent(Completion::Proved(&proof), now_ms)?;
        if let Some((key, value)) = &idem {
            t.put_idempotent(key, value)?;
        }
        Ok(action)
    })
}
