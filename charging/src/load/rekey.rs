//! Key rotation at the card's next online load (docs/key-rotation.md): once a load is
//! completed and booked, a card whose credit key is older than the version the HSM moves cards
//! to ([`purse::sam::Hsm::card_key_version`]) is moved there in the same relay session with
//! [`purse::rekey::Rekey`] (ChangeKey in FULL mode under key 0, inside the HSM) before the
//! client gets the load's final answer.
//!
//! The load is already complete when the rotation starts, so nothing the rotation meets changes
//! it: a card pulled, an answer that does not verify, an HSM error — the client gets the load's
//! answer all the same, and the card, with every key at the old or the new version and each
//! usable, is moved at its next load (the credit key changes last, so a card whose credit key
//! is still old has not finished). The client notices nothing but more steps.

use super::{LoadService, Reply, Session};
use purse::rekey::{Rekey, RekeyStep};

/// A rotation under way after a completed load, and the load's answer it ends with.
pub(super) struct Migration {
    rekey: Rekey,
    then: Reply,
}

impl LoadService {
    /// After the load of `s` completed with its credit key at `credit_version`: the load's
    /// `reply`, or — when the card is to move to a newer version — the rotation's first batch,
    /// the reply kept for its end.
    pub(super) fn migrate_after_load(
        &self,
        s: &mut Session,
        credit_version: u8,
        reply: Reply,
    ) -> Reply {
        let target = self.with_hsm(|hsm| hsm.card_key_version());
        let Some(target) = target.filter(|&t| t > credit_version) else {
            return reply;
        };
        let (rekey, first) = Rekey::start(s.request.uid, target);
        s.migration = Some(Migration { rekey, then: reply });
        Reply::Command {
            session_id: s.id.clone(),
            seq: s.seq + 1,
            commands: first.iter().map(hex::encode_upper).collect(),
        }
    }

    /// The card's answers to a rotation batch: the next batch, or the load's answer once the
    /// rotation is done or broke off.
    pub(super) fn advance_migration(&self, s: &mut Session, responses: &[Vec<u8>]) -> Reply {
        let Some(mut m) = s.migration.take() else {
            return Reply::Refused {
                session_id: s.id.clone(),
                reason: "no_migration".into(),
                detail: "no key rotation is under way in this session".into(),
            };
        };
        let mut step = RekeyStep::Continue;
        for response in responses {
            let fed =
                self.with_hsm(|hsm| m.rekey.on_response(hsm, &mut rand::rngs::OsRng, response));
            match fed {
                Ok(st) => step = st,
                Err(e) => {
                    tracing::warn!(card = %purse::tap::masked_uid(&s.request.uid), target = m.rekey.target(), err = %e, "key rotation broke off; resumed at the card's next load");
                    return m.then;
                }
            }
        }
        match step {
            RekeyStep::Transmit(batch) => {
                let next = Reply::Command {
                    session_id: s.id.clone(),
                    seq: s.seq + 1,
                    commands: batch.iter().map(hex::encode_upper).collect(),
                };
                s.migration = Some(m);
                next
            }
            RekeyStep::Done(out) => {
                tracing::info!(card = %purse::tap::masked_uid(&out.uid), from = ?out.before, to = out.after, "card moved to the new key version");
                self.stats.lock().expect("stats").keys_rotated += 1;
                m.then
            }
            RekeyStep::Continue => {
                // Fewer answers than commands: the card left the field mid-batch.
                tracing::warn!(card = %purse::tap::masked_uid(&s.request.uid), "key rotation broke off (card left); resumed at the card's next load");
                m.then
            }
        }
    }
}
