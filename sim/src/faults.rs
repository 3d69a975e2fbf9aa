//! Faults of a card dialogue: a card pulled away, an answer lost, power lost mid-commit.

use charging::client::Vanish;
use purse::card::COMMIT_WRITES;
use purse::txn::{EmulatedReader, Transport, TransportError};
use rand::rngs::StdRng;
use rand::Rng;

/// How a dialogue is torn.
#[derive(Clone, Copy, Debug)]
pub enum Tear {
    /// The card leaves the field before the n-th command reaches it.
    PullBefore(usize),
    /// The n-th command reaches the card, its answer is lost, and the card leaves.
    LoseAnswer(usize),
    /// The card loses power after its n-th NVM write of a commit.
    Power(u32),
}

/// Draws whether (per mille) and how a dialogue is torn.
pub fn pick_tear(rng: &mut StdRng, per_mille: u32) -> Option<Tear> {
    if rng.gen_range(0..1000) >= per_mille {
        return None;
    }
    Some(match rng.gen_range(0..3) {
        0 => Tear::PullBefore(rng.gen_range(1..=10)),
        1 => Tear::LoseAnswer(rng.gen_range(1..=10)),
        _ => Tear::Power(rng.gen_range(1..=COMMIT_WRITES)),
    })
}

/// Draws whether (per mille) and where the cardholder's client vanishes from an online relay
/// (a load, a payment, a refund's collection): at one of its first ten commands, delivered to
/// the card or not.
pub fn pick_vanish(rng: &mut StdRng, per_mille: u32) -> Option<Vanish> {
    if rng.gen_range(0..1000) >= per_mille {
        return None;
    }
    Some(Vanish::AtCommand {
        n: rng.gen_range(1..=10),
        deliver: rng.gen_bool(0.5),
    })
}

/// An emulated reader that tears the dialogue as told (a [`Tear::Power`] is armed on the card
/// itself, with `Card::tear_after_writes`).
pub struct TornReader<'a> {
    /// The reader over the card.
    pub inner: EmulatedReader<'a, &'a mut StdRng>,
    /// The tear, if any.
    pub tear: Option<Tear>,
    /// Commands sent so far.
    pub sent: usize,
}

impl Transport for TornReader<'_> {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        self.inner.card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.sent += 1;
        match self.tear {
            Some(Tear::PullBefore(n)) if self.sent >= n => {
                self.inner.card.remove_from_field();
                Err(TransportError::CardGone)
            }
            Some(Tear::LoseAnswer(n)) if self.sent >= n => {
                let _ = self.inner.transmit(command);
                self.inner.card.remove_from_field();
                Err(TransportError::CardGone)
            }
            _ => self.inner.transmit(command),
        }
    }
}
