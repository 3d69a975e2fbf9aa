//! Whole card transactions over the [`Authenticator`] traits, so a validator or a server only
//! moves bytes through a [`Transport`].
//!
//! One transaction: SelectApplication → GetKeyVersion → AuthenticateEV2First (two frames) →
//! GetValue (MAC) → ReadData of the TM file (TMC ‖ TMV, MAC) → ReadRecords (MAC) → the caller's
//! decision (fare quote, ledger check) → Debit/Credit/LimitedCredit (FULL) → WriteRecord (MAC)
//! → CommitTransaction (MAC, returns TMC ‖ TMV) → a [`CommitReceipt`], built only after the
//! commit response's MAC verified and its counter is exactly the old one plus one.
//!
//! A card pulled at any step is a [`TxError::Transport`]; whether a value change happened is then
//! settled at the card's next contact by comparing its TMC with the counter read here
//! ([`CardSnapshot::tmc`]): `tmc == before + 1` with the expected balance means it committed.

use crate::apdu::{self, ins, Status};
use crate::card::{Card, FILE_RECORDS, FILE_TMAC, FILE_VALUE, INS_GET_KEY_VERSION};
use crate::keys::{KeyKind, DEFAULT_AID};
use crate::receipt::{CommitReceipt, TxKind};
use crate::sam::{Authenticator, Hsm, SamError, TmacVerified};
use crate::sm::{Channel, CommMode, SmError};
use rand_core::RngCore;

/// Moves APDUs to a card and back (an emulated card, a PC/SC reader, an HTTP relay).
pub trait Transport {
    /// The card's UID as the reader learnt it in anticollision.
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError>;
    /// Sends a command APDU and returns the response APDU.
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError>;
}

/// The card or the link went away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No card in the field, or it was pulled / lost power mid-dialogue.
    #[error("card removed or lost power")]
    CardGone,
    /// The link failed (reader unplugged, relay broken).
    #[error("link failed: {0}")]
    Link(String),
}

/// Why a transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The card went away mid-transaction (a possible tear: settle from the counter later).
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The card refused a step with a status word.
    #[error("card refused {step}: {status}")]
    Card {
        /// which step
        step: &'static str,
        /// the card's status
        status: Status,
    },
    /// The card's key version is not held by this SAM/HSM.
    #[error("card key version {0} is not held here")]
    UnknownKeyVersion(u8),
    /// The SAM/HSM refused or failed.
    #[error(transparent)]
    Sam(#[from] SamError),
    /// A response failed secure-messaging verification (altered or forged answer).
    #[error("response from the card failed verification at {step}: {source}")]
    Sm {
        /// which step
        step: &'static str,
        /// why
        source: SmError,
    },
    /// A response had the wrong shape.
    #[error("unexpected response at {step}: {what}")]
    Protocol {
        /// which step
        step: &'static str,
        /// what was wrong
        what: &'static str,
    },
}

/// What the terminal learnt from the card before deciding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardSnapshot {
    /// Card UID.
    pub uid: [u8; 7],
    /// Card key version.
    pub key_version: u8,
    /// Balance, minor units.
    pub balance_minor: i32,
    /// The transaction counter (committed transactions so far).
    pub tmc: u32,
    /// The transaction MAC of the last committed transaction.
    pub last_tmv: [u8; 8],
    /// Trip records, newest first.
    pub records: Vec<crate::card::TripRecord>,
}

/// What the caller decides after seeing the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Move `amount_minor` (> 0, or 0 to only write the record) and write `record`, if any.
    Apply {
        /// amount to debit/credit, minor units
        amount_minor: i32,
        /// trip/load record to append
        record: Option<Vec<u8>>,
    },
    /// Change nothing.
    Refuse,
}

/// How a transaction ended.
#[derive(Debug)]
pub enum Outcome {
    /// Committed: the card proved it with its MAC'd commit response.
    Committed {
        /// state before
        snapshot: CardSnapshot,
        /// the proof
        receipt: CommitReceipt,
    },
    /// The caller refused; the card is unchanged.
    Refused {
        /// state read
        snapshot: CardSnapshot,
    },
}

/// The record size the terminal expects on the card.
pub const RECORD_SIZE: usize = crate::card::RECORD_SIZE;

/// Reads a card's state in an authenticated session and returns the open channel.
pub fn open_session(
    t: &mut dyn Transport,
    auth: &mut dyn Authenticator,
    key: KeyKind,
    rng: &mut dyn RngCore,
) -> Result<(Channel, CardSnapshot), TxError> {
    let uid = t.card_uid()?;
    expect_ok(
        t,
        &apdu::wrap(ins::SELECT_APPLICATION, &DEFAULT_AID),
        "select",
    )?;
    let kv = expect_ok(
        t,
        &apdu::wrap(INS_GET_KEY_VERSION, &[key.card_key_no().expect("card key")]),
        "get key version",
    )?;
    let [key_version] = kv[..] else {
        return Err(TxError::Protocol {
            step: "get key version",
            what: "not one byte",
        });
    };
    if !auth.holds_version(key, key_version) {
        return Err(TxError::UnknownKeyVersion(key_version));
    }
    let key_no = key.card_key_no().expect("card key");
    let resp = t.transmit(&apdu::wrap(ins::AUTH_EV2_FIRST, &[key_no, 0x00]))?;
    let (ek_rnd_b, status) = split(&resp, "authenticate")?;
    if status != Status::AdditionalFrame {
        return Err(TxError::Card {
            step: "authenticate",
            status,
        });
    }
    let (pending, frame) = auth.auth_part1(key, key_version, &uid, ek_rnd_b, rng)?;
    let answer = expect_ok(
        t,
        &apdu::wrap(ins::ADDITIONAL_FRAME, &frame),
        "authenticate",
    )?;
    let mut ch = auth.auth_part2(pending, &answer)?;

    let v = secure(t, &mut ch, ins::GET_VALUE, &[FILE_VALUE], &[], "get value")?;
    let balance_minor = i32::from_le_bytes(v[..].try_into().map_err(|_| TxError::Protocol {
        step: "get value",
        what: "value is not 4 bytes",
    })?);
    let tm = secure(
        t,
        &mut ch,
        ins::READ_DATA,
        &[FILE_TMAC, 0, 0, 0, 0, 0, 0],
        &[],
        "read TM file",
    )?;
    if tm.len() != 12 {
        return Err(TxError::Protocol {
            step: "read TM file",
            what: "TM file is not 12 bytes",
        });
    }
    let tmc = u32::from_le_bytes(tm[..4].try_into().expect("4"));
    let last_tmv: [u8; 8] = tm[4..].try_into().expect("8");
    let recs = secure(
        t,
        &mut ch,
        ins::READ_RECORDS,
        &[FILE_RECORDS, 0, 0, 0, 0, 0, 0],
        &[],
        "read records",
    )?;
    if recs.len() % RECORD_SIZE != 0 {
        return Err(TxError::Protocol {
            step: "read records",
            what: "records are not whole",
        });
    }
    let records = recs
        .chunks_exact(RECORD_SIZE)
        .map(|c| c.try_into().expect("whole record"))
        .collect();
    Ok((
        ch,
        CardSnapshot {
            uid,
            key_version,
            balance_minor,
            tmc,
            last_tmv,
            records,
        },
    ))
}

/// Runs one value transaction: `value_code` is Debit, Credit or LimitedCredit; `key` the card
/// key it authenticates with. `decide` sees the card before anything changes.
pub fn run(
    t: &mut dyn Transport,
    auth: &mut dyn Authenticator,
    key: KeyKind,
    value_code: u8,
    rng: &mut dyn RngCore,
    decide: impl FnOnce(&CardSnapshot) -> Decision,
) -> Result<Outcome, TxError> {
    let (mut ch, snapshot) = open_session(t, auth, key, rng)?;
    let (amount_minor, record) = match decide(&snapshot) {
        Decision::Refuse => return Ok(Outcome::Refused { snapshot }),
        Decision::Apply {
            amount_minor,
            record,
        } => (amount_minor, record),
    };
    if amount_minor < 0 {
        return Err(TxError::Protocol {
            step: "decide",
            what: "negative amount",
        });
    }
    let kind = match (amount_minor, value_code) {
        (0, _) => TxKind::RecordOnly,
        (_, ins::DEBIT) => TxKind::Debit,
        (_, ins::CREDIT) => TxKind::Credit,
        (_, ins::LIMITED_CREDIT) => TxKind::LimitedCredit,
        _ => {
            return Err(TxError::Protocol {
                step: "decide",
                what: "not a value command",
            })
        }
    };
    if amount_minor > 0 {
        let body = auth.wrap_value(&mut ch, value_code, amount_minor)?;
        let resp = t.transmit(&apdu::wrap(value_code, &body))?;
        open(&resp, &mut ch, CommMode::Mac, "value command")?;
    }
    if let Some(rec) = &record {
        let len = rec.len() as u32;
        let l = len.to_le_bytes();
        secure(
            t,
            &mut ch,
            ins::WRITE_RECORD,
            &[FILE_RECORDS, 0, 0, 0, l[0], l[1], l[2]],
            rec,
            "write record",
        )?;
    }
    if amount_minor == 0 && record.is_none() {
        return Ok(Outcome::Refused { snapshot });
    }
    let tm = secure(t, &mut ch, ins::COMMIT_TRANSACTION, &[], &[0x01], "commit")?;
    if tm.len() != 12 {
        return Err(TxError::Protocol {
            step: "commit",
            what: "TMC ‖ TMV is not 12 bytes",
        });
    }
    let tmc = u32::from_le_bytes(tm[..4].try_into().expect("4"));
    if Some(tmc) != snapshot.tmc.checked_add(1) {
        return Err(TxError::Protocol {
            step: "commit",
            what: "counter did not advance by exactly one",
        });
    }
    let tmv: [u8; 8] = tm[4..].try_into().expect("8");
    let balance_after_minor = match kind {
        TxKind::Debit => snapshot.balance_minor - amount_minor,
        TxKind::Credit | TxKind::LimitedCredit => snapshot.balance_minor + amount_minor,
        TxKind::RecordOnly => snapshot.balance_minor,
    };
    let receipt = CommitReceipt::verified(
        snapshot.uid,
        tmc,
        tmv,
        kind,
        amount_minor,
        balance_after_minor,
        snapshot.key_version,
    );
    Ok(Outcome::Committed { snapshot, receipt })
}

/// A debit at a validator (debit key).
pub fn debit(
    t: &mut dyn Transport,
    sam: &mut dyn crate::sam::Sam,
    rng: &mut dyn RngCore,
    decide: impl FnOnce(&CardSnapshot) -> Decision,
) -> Result<Outcome, TxError> {
    run(t, sam, KeyKind::Debit, ins::DEBIT, rng, decide)
}

/// An online load by the back office (credit key in the HSM), ending with the HSM's check of
/// the card's transaction MAC. `decide` is where the server records its pending intent
/// (card, counter, amount) before the card is touched.
pub fn load_online<H: Hsm>(
    t: &mut dyn Transport,
    hsm: &mut H,
    rng: &mut dyn RngCore,
    decide: impl FnOnce(&CardSnapshot) -> Decision,
) -> Result<LoadOutcome, TxError> {
    match run(t, hsm, KeyKind::Credit, ins::CREDIT, rng, decide)? {
        Outcome::Refused { snapshot } => Ok(LoadOutcome::Refused { snapshot }),
        Outcome::Committed { snapshot, receipt } => {
            let proof = hsm.verify_tmac(&receipt)?;
            Ok(LoadOutcome::Loaded { snapshot, proof })
        }
    }
}

/// How an online load ended.
#[derive(Debug)]
pub enum LoadOutcome {
    /// The card applied the credit and its transaction MAC verified in the HSM.
    Loaded {
        /// state before
        snapshot: CardSnapshot,
        /// the HSM's proof
        proof: TmacVerified,
    },
    /// Refused by the server's decision; nothing changed.
    Refused {
        /// state read
        snapshot: CardSnapshot,
    },
}

fn split<'a>(resp: &'a [u8], step: &'static str) -> Result<(&'a [u8], Status), TxError> {
    apdu::parse_response(resp).ok_or(TxError::Protocol {
        step,
        what: "response shorter than a status word",
    })
}

fn expect_ok(t: &mut dyn Transport, cmd: &[u8], step: &'static str) -> Result<Vec<u8>, TxError> {
    let resp = t.transmit(cmd)?;
    let (data, status) = split(&resp, step)?;
    if status != Status::Ok {
        return Err(TxError::Card { step, status });
    }
    Ok(data.to_vec())
}

fn open(
    resp: &[u8],
    ch: &mut Channel,
    mode: CommMode,
    step: &'static str,
) -> Result<Vec<u8>, TxError> {
    let (data, status) = split(resp, step)?;
    if status != Status::Ok {
        return Err(TxError::Card { step, status });
    }
    ch.open_response(data, mode)
        .map_err(|source| TxError::Sm { step, source })
}

fn secure(
    t: &mut dyn Transport,
    ch: &mut Channel,
    code: u8,
    header: &[u8],
    data: &[u8],
    step: &'static str,
) -> Result<Vec<u8>, TxError> {
    let cmd = ch
        .command_apdu(code, header, data, CommMode::Mac)
        .map_err(|source| TxError::Sm { step, source })?;
    let resp = t.transmit(&cmd)?;
    open(&resp, ch, CommMode::Mac, step)
}

/// A [`Transport`] over an emulated card in the same process.
pub struct EmulatedReader<'a, R: RngCore> {
    /// The card in the field.
    pub card: &'a mut Card,
    /// The card's randomness source.
    pub rng: R,
}

impl<R: RngCore> Transport for EmulatedReader<'_, R> {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        if self.card.is_torn() {
            return Err(TransportError::CardGone);
        }
        Ok(self.card.state().uid)
    }

    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.card
            .process(command, &mut self.rng)
            .map_err(|_| TransportError::CardGone)
    }
}

/// A value change the terminal sent but whose commit it never saw confirmed (card pulled,
/// power lost, answer lost). Recorded from the snapshot before the value command is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingChange {
    /// Card UID.
    pub uid: [u8; 7],
    /// The card's TMC before the change.
    pub tmc_before: u32,
    /// The balance before the change.
    pub balance_before_minor: i32,
    /// What was attempted.
    pub kind: TxKind,
    /// The amount attempted.
    pub amount_minor: i32,
    /// The card's key version.
    pub key_version: u8,
}

impl PendingChange {
    /// Records an attempt from the snapshot it was decided on.
    pub fn new(snapshot: &CardSnapshot, kind: TxKind, amount_minor: i32) -> Self {
        PendingChange {
            uid: snapshot.uid,
            tmc_before: snapshot.tmc,
            balance_before_minor: snapshot.balance_minor,
            kind,
            amount_minor,
            key_version: snapshot.key_version,
        }
    }

    fn balance_after_minor(&self) -> i32 {
        match self.kind {
            TxKind::Debit => self.balance_before_minor - self.amount_minor,
            TxKind::Credit | TxKind::LimitedCredit => self.balance_before_minor + self.amount_minor,
            TxKind::RecordOnly => self.balance_before_minor,
        }
    }
}

/// What the card's next contact says about a pending change.
#[derive(Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The card committed it: here is its receipt, with the card's own TMV read under MAC
    /// (clearing verifies it in the HSM like any other).
    Committed(CommitReceipt),
    /// The card never committed it: nothing moved.
    NotCommitted,
    /// The card has moved on by more than one transaction since; the pending change is settled
    /// by clearing from the card's transaction chain instead.
    MovedOn,
}

/// Settles a pending change from a snapshot read (under MAC) at the card's next contact.
pub fn settle(pending: &PendingChange, next: &CardSnapshot) -> Result<Settlement, TxError> {
    if next.uid != pending.uid {
        return Err(TxError::Protocol {
            step: "settle",
            what: "snapshot is of another card",
        });
    }
    if next.tmc == pending.tmc_before {
        if next.balance_minor != pending.balance_before_minor {
            return Err(TxError::Protocol {
                step: "settle",
                what: "balance moved without the counter",
            });
        }
        return Ok(Settlement::NotCommitted);
    }
    if Some(next.tmc) == pending.tmc_before.checked_add(1) {
        if next.balance_minor != pending.balance_after_minor() {
            return Err(TxError::Protocol {
                step: "settle",
                what: "counter advanced by one but the balance is not the expected one",
            });
        }
        return Ok(Settlement::Committed(CommitReceipt::verified(
            pending.uid,
            next.tmc,
            next.last_tmv,
            pending.kind,
            pending.amount_minor,
            next.balance_minor,
            pending.key_version,
        )));
    }
    if next.tmc < pending.tmc_before {
        return Err(TxError::Protocol {
            step: "settle",
            what: "card counter went backwards (clone or restored image)",
        });
    }
    Ok(Settlement::MovedOn)
}
