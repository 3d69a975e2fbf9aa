//! Shared test rig: an issuer key set, an HSM, a validator SAM, and emulated cards.
#![allow(dead_code)]

use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, Outcome, Transport, TransportError};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub struct Rig {
    pub keys: KeySet,
    pub hsm: SoftwareHsm,
    pub sam: SoftwareSam,
    pub rng: StdRng,
}

impl Rig {
    pub fn new(seed: u64) -> Rig {
        let mut rng = StdRng::seed_from_u64(seed);
        let keys = KeySet::generate(&mut rng);
        let hsm = SoftwareHsm::new(&keys).unwrap();
        let sam = SoftwareSam::validator(&keys, 1001).unwrap();
        Rig {
            keys,
            hsm,
            sam,
            rng,
        }
    }

    pub fn card(&self, uid_byte: u8, balance_minor: i32) -> Card {
        let uid = [0x04, uid_byte, 0x2E, 0x21, 0x80, 0x1D, 0x80];
        let p = Personalisation::transit(uid, balance_minor);
        Card::personalise(&p, self.hsm.card_keys(&uid, 1).unwrap())
    }

    pub fn debit(&mut self, card: &mut Card, amount: i32) -> Result<Outcome, txn::TxError> {
        let mut reader = EmulatedReader {
            card,
            rng: StdRng::seed_from_u64(99),
        };
        txn::debit(&mut reader, &mut self.sam, &mut self.rng, |_| {
            Decision::Apply {
                amount_minor: amount,
                record: Some(vec![0xAB; 32]),
            }
        })
    }

    pub fn load(&mut self, card: &mut Card, amount: i32) -> Result<txn::LoadOutcome, txn::TxError> {
        let mut reader = EmulatedReader {
            card,
            rng: StdRng::seed_from_u64(98),
        };
        txn::load_online(&mut reader, &mut self.hsm, &mut self.rng, |_| {
            Decision::Apply {
                amount_minor: amount,
                record: None,
            }
        })
    }
}

/// A transport that records every command and can pull the card after N APDUs.
pub struct Flaky<'a> {
    pub inner: EmulatedReader<'a, StdRng>,
    pub pull_after: Option<usize>,
    pub sent: Vec<Vec<u8>>,
}

impl<'a> Flaky<'a> {
    pub fn new(card: &'a mut Card, pull_after: Option<usize>) -> Self {
        Flaky {
            inner: EmulatedReader {
                card,
                rng: StdRng::seed_from_u64(5),
            },
            pull_after,
            sent: vec![],
        }
    }
}

impl Transport for Flaky<'_> {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        self.inner.card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        if let Some(n) = self.pull_after {
            if self.sent.len() >= n {
                self.inner.card.remove_from_field();
                return Err(TransportError::CardGone);
            }
        }
        self.sent.push(command.to_vec());
        self.inner.transmit(command)
    }
}

/// Where a transaction is torn.
#[derive(Clone, Copy, Debug)]
pub enum Tear {
    /// Not at all.
    None,
    /// The card leaves the field before the n-th APDU.
    PullBefore(usize),
    /// The n-th APDU reaches the card but its answer is lost and the card leaves.
    LoseAnswer(usize),
    /// Power is lost right after the k-th NVM write (of a commit, of a ChangeKey).
    Power(u32),
}

/// A transport that tears as its [`Tear`] says (the power tear is armed on the card).
pub struct TearingReader<'a> {
    pub inner: EmulatedReader<'a, StdRng>,
    pub tear: Tear,
    pub sent: usize,
}

impl Transport for TearingReader<'_> {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        self.inner.card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.sent += 1;
        match self.tear {
            Tear::PullBefore(n) if self.sent >= n => {
                self.inner.card.remove_from_field();
                Err(TransportError::CardGone)
            }
            Tear::LoseAnswer(n) if self.sent >= n => {
                let _ = self.inner.transmit(command);
                self.inner.card.remove_from_field();
                Err(TransportError::CardGone)
            }
            _ => self.inner.transmit(command),
        }
    }
}
