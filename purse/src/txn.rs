//! Whole card transactions over the [`Authenticator`] traits, so a validator or a server only
//! moves bytes: [`Dialogue`] is the sans-IO state machine (answer in, next command out), and
//! [`run`], [`debit`], [`load_online`] drive it over a [`Transport`].
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
use crate::card::{
    Card, FILE_PROFILE, FILE_RECORDS, FILE_TMAC, FILE_VALUE, INS_GET_KEY_VERSION, PROFILE_SIZE,
};
use crate::keys::{KeyKind, DEFAULT_AID};
use crate::receipt::{CommitReceipt, TxClaim, TxKind};
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

/// What the terminal learnt from the card before deciding, read under the session MAC. Only a
/// [`Dialogue`] builds one (its fields are read through getters), so a snapshot handed to
/// [`settle`] is what a card really showed:
///
/// ```compile_fail
/// let forged = purse::txn::CardSnapshot {
///     uid: [4; 7], key_version: 1, balance_minor: 0, tmc: 1, last_tmv: [0; 8], records: vec![],
/// };
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardSnapshot {
    uid: [u8; 7],
    key_version: u8,
    balance_minor: i32,
    tmc: u32,
    last_tmv: [u8; 8],
    records: Vec<crate::card::TripRecord>,
    /// The profile file, checked ([`crate::card::decode_profile`] accepts it).
    profile: [u8; PROFILE_SIZE],
    _read: ReadUnderMac,
}

/// Zero-sized witness that a dialogue read the snapshot under MAC; private to this module.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ReadUnderMac;

impl CardSnapshot {
    /// Card UID.
    pub fn uid(&self) -> [u8; 7] {
        self.uid
    }

    /// Card key version.
    pub fn key_version(&self) -> u8 {
        self.key_version
    }

    /// Balance, minor units.
    pub fn balance_minor(&self) -> i32 {
        self.balance_minor
    }

    /// The transaction counter (committed transactions so far).
    pub fn tmc(&self) -> u32 {
        self.tmc
    }

    /// The transaction MAC of the last committed transaction.
    pub fn last_tmv(&self) -> [u8; 8] {
        self.last_tmv
    }

    /// Trip records, newest first.
    pub fn records(&self) -> &[crate::card::TripRecord] {
        &self.records
    }

    /// The holder's rider category id, as the issuer personalised it (`None`: none, priced as
    /// the fare table's default). Read under the session MAC, so no one between the card and
    /// the terminal can change it, and no terminal can write it.
    pub fn rider_category(&self) -> Option<&str> {
        crate::card::decode_profile(&self.profile).ok().flatten()
    }
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

/// What a [`Dialogue`] wants next.
#[derive(Debug)]
pub enum Step {
    /// Send these command APDUs to the card, in order, and feed each answer to
    /// [`Dialogue::on_response`] in the same order. Commands that do not depend on each
    /// other's answers are pipelined into one batch (one round trip over a relay).
    Transmit(Vec<Vec<u8>>),
    /// More answers of the current batch are expected.
    Continue,
    /// The card has been read under MAC: call [`Dialogue::decide`].
    Decide(CardSnapshot),
    /// Finished (committed or refused).
    Done(Outcome),
}

/// A command of the value batch whose answer is still expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmd {
    Value,
    ReaderId,
    WriteRecord,
    Commit,
}

impl Cmd {
    fn step(self) -> &'static str {
        match self {
            Cmd::Value => "value command",
            Cmd::ReaderId => "commit reader id",
            Cmd::WriteRecord => "write record",
            Cmd::Commit => "commit",
        }
    }
}

/// The change the caller decided, sent to the card in the value batch.
#[derive(Clone, Copy, Debug)]
struct Change {
    kind: TxKind,
    amount_minor: i32,
    reader_id: Option<[u8; 16]>,
}

/// Where a [`Dialogue`] is. Each stage names the answer it expects next and holds exactly what
/// the card has shown so far, so no later stage can run without what an earlier one proved.
/// The channel and the pending authentication keep their key schedules (about a kilobyte
/// each) behind a box of their own, so moving from one stage to the next copies pointers.
enum Stage {
    /// SelectApplication's answer (GetKeyVersion's and part 1's follow in the same batch).
    Select,
    /// GetKeyVersion's answer.
    KeyVersion,
    /// AuthenticateEV2First part 1's answer: E(K, RndB).
    Auth1 { key_version: u8 },
    /// Part 2's answer: the card's proof of the key.
    Auth2 {
        key_version: u8,
        pending: crate::sam::PendingAuth,
    },
    /// GetValue's answer under MAC (the TM file and the records follow in the same batch).
    ReadValue { ch: Channel, key_version: u8 },
    /// ReadData(TM file)'s answer under MAC.
    ReadTm {
        ch: Channel,
        key_version: u8,
        balance_minor: i32,
    },
    /// ReadRecords' answer under MAC.
    ReadRecords(ReadSoFar),
    /// ReadData(profile file)'s answer under MAC.
    ReadProfile {
        read: ReadSoFar,
        records: Vec<crate::card::TripRecord>,
    },
    /// The card has been read: the caller's [`Dialogue::decide`] is next.
    Deciding { ch: Channel, snapshot: CardSnapshot },
    /// The value batch is out: the answers of `outstanding` are expected, the commit's last.
    Committing {
        ch: Channel,
        snapshot: CardSnapshot,
        change: Change,
        outstanding: std::collections::VecDeque<Cmd>,
    },
    /// Finished or failed; a failed dialogue keeps the snapshot it had read.
    Ended { snapshot: Option<CardSnapshot> },
}

/// What the reads under MAC have given once the TM file is read: the channel, the key
/// version, the balance and the card's transaction counter and last TMV.
struct ReadSoFar {
    ch: Channel,
    key_version: u8,
    balance_minor: i32,
    tmc: u32,
    last_tmv: [u8; 8],
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Select => "select",
            Stage::KeyVersion => "key version",
            Stage::Auth1 { .. } => "authentication part 1",
            Stage::Auth2 { .. } => "authentication part 2",
            Stage::ReadValue { .. } => "get value",
            Stage::ReadTm { .. } => "read TM file",
            Stage::ReadRecords(_) => "read records",
            Stage::ReadProfile { .. } => "read profile",
            Stage::Deciding { .. } => "deciding",
            Stage::Committing { .. } => "committing",
            Stage::Ended { .. } => "ended",
        }
    }
}

/// One card transaction as a sans-IO state machine: it takes the card's answers and returns
/// the next commands, so the bytes can travel over anything — an emulated card, a PC/SC
/// reader, or an HTTP relay (the charging server).
///
/// Four batches: [SelectApplication, GetKeyVersion, AuthenticateEV2First] → [authentication
/// part 2] → [GetValue, ReadData(TM file), ReadRecords, ReadData(profile)] under MAC → [`Step::Decide`] →
/// [value command (FULL), WriteRecord, CommitTransaction] → [`Outcome`]. Answers are verified
/// strictly in order; the first failure ends the dialogue (the card has ended the session too,
/// so later commands of the batch are refused by it).
pub struct Dialogue {
    uid: [u8; 7],
    key: KeyKind,
    value_code: u8,
    stage: Stage,
}

impl std::fmt::Debug for Dialogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialogue")
            .field("uid", &hex::encode_upper(self.uid))
            .field("stage", &self.stage.name())
            .finish_non_exhaustive()
    }
}

impl Dialogue {
    /// Starts a dialogue with the card `uid` (from anticollision) using card key `key`;
    /// `value_code` is Debit, Credit or LimitedCredit. Returns the first batch of APDUs.
    ///
    /// # Panics
    /// If `key` is not a card key (the device keys are not on cards).
    pub fn start(uid: [u8; 7], key: KeyKind, value_code: u8) -> (Dialogue, Vec<Vec<u8>>) {
        let key_no = key.card_key_no().expect("a card key");
        (
            Dialogue {
                uid,
                key,
                value_code,
                stage: Stage::Select,
            },
            vec![
                apdu::wrap(ins::SELECT_APPLICATION, &DEFAULT_AID),
                apdu::wrap(INS_GET_KEY_VERSION, &[key_no]),
                apdu::wrap(ins::AUTH_EV2_FIRST, &[key_no, 0x00]),
            ],
        )
    }

    /// The card this dialogue is with.
    pub fn uid(&self) -> [u8; 7] {
        self.uid
    }

    /// The snapshot, once the card has been read.
    pub fn snapshot(&self) -> Option<&CardSnapshot> {
        match &self.stage {
            Stage::Deciding { snapshot, .. } | Stage::Committing { snapshot, .. } => Some(snapshot),
            Stage::Ended { snapshot } => snapshot.as_ref(),
            _ => None,
        }
    }

    /// Whether the commit command has been handed out (after that, a lost answer leaves the
    /// outcome unknown until the card's next contact).
    pub fn commit_sent(&self) -> bool {
        matches!(self.stage, Stage::Committing { .. })
    }

    /// Takes the open secure channel (for read-only sessions that stop at the decision).
    pub fn into_channel(self) -> Option<Channel> {
        match self.stage {
            Stage::ReadValue { ch, .. }
            | Stage::ReadTm { ch, .. }
            | Stage::ReadRecords(ReadSoFar { ch, .. })
            | Stage::ReadProfile {
                read: ReadSoFar { ch, .. },
                ..
            }
            | Stage::Deciding { ch, .. }
            | Stage::Committing { ch, .. } => Some(ch),
            _ => None,
        }
    }

    /// Feeds the card's answer to the oldest outstanding command.
    pub fn on_response(
        &mut self,
        auth: &mut dyn Authenticator,
        rng: &mut dyn RngCore,
        resp: &[u8],
    ) -> Result<Step, TxError> {
        if matches!(self.stage, Stage::Deciding { .. } | Stage::Ended { .. }) {
            return Err(TxError::Protocol {
                step: "dialogue",
                what: "no command is outstanding",
            });
        }
        let stage = std::mem::replace(&mut self.stage, Stage::Ended { snapshot: None });
        match self.advance(stage, auth, rng, resp) {
            Ok((next, step)) => {
                self.stage = next;
                Ok(step)
            }
            Err(failed) => {
                let (snapshot, e) = *failed;
                self.stage = Stage::Ended { snapshot };
                Err(e)
            }
        }
    }

    /// One answer: the stage after it and what to tell the caller, or the error that ends the
    /// dialogue (with the snapshot, if the card had been read).
    fn advance(
        &self,
        stage: Stage,
        auth: &mut dyn Authenticator,
        rng: &mut dyn RngCore,
        resp: &[u8],
    ) -> Result<(Stage, Step), Failed> {
        let none_outstanding = TxError::Protocol {
            step: "dialogue",
            what: "no command is outstanding",
        };
        match stage {
            Stage::Committing {
                ch,
                snapshot,
                change,
                outstanding,
            } => advance_commit(ch, snapshot, change, outstanding, resp),
            Stage::Deciding { snapshot, .. } => Err(Box::new((Some(snapshot), none_outstanding))),
            Stage::Ended { snapshot } => Err(Box::new((snapshot, none_outstanding))),
            Stage::ReadValue { .. }
            | Stage::ReadTm { .. }
            | Stage::ReadRecords(_)
            | Stage::ReadProfile { .. } => self
                .advance_read(stage, resp)
                .map_err(|e| Box::new((None, e))),
            Stage::Select | Stage::KeyVersion | Stage::Auth1 { .. } | Stage::Auth2 { .. } => self
                .advance_auth(stage, auth, rng, resp)
                .map_err(|e| Box::new((None, e))),
        }
    }

    /// An answer of the first two batches: select, key version, authentication.
    fn advance_auth(
        &self,
        stage: Stage,
        auth: &mut dyn Authenticator,
        rng: &mut dyn RngCore,
        resp: &[u8],
    ) -> Result<(Stage, Step), TxError> {
        Ok(match stage {
            Stage::Select => {
                ok_data(resp, "select")?;
                (Stage::KeyVersion, Step::Continue)
            }
            Stage::KeyVersion => {
                let key_version = self.key_version(auth, resp)?;
                (Stage::Auth1 { key_version }, Step::Continue)
            }
            Stage::Auth1 { key_version } => {
                let (pending, frame) = self.auth1(auth, rng, key_version, resp)?;
                let cmd = apdu::wrap(ins::ADDITIONAL_FRAME, &frame);
                let next = Stage::Auth2 {
                    key_version,
                    pending,
                };
                (next, Step::Transmit(vec![cmd]))
            }
            Stage::Auth2 {
                key_version,
                pending,
            } => {
                let answer = ok_data(resp, "authenticate")?;
                let mut ch = auth.auth_part2(pending, answer)?;
                let cmds = read_batch(&mut ch)?;
                (Stage::ReadValue { ch, key_version }, Step::Transmit(cmds))
            }
            _ => return Err(not_expected("authentication")),
        })
    }

    /// An answer of the reads under MAC: value, TM file, records, profile (then the snapshot).
    fn advance_read(&self, stage: Stage, resp: &[u8]) -> Result<(Stage, Step), TxError> {
        Ok(match stage {
            Stage::ReadValue {
                mut ch,
                key_version,
            } => {
                let balance_minor = read_value(resp, &mut ch)?;
                let next = Stage::ReadTm {
                    ch,
                    key_version,
                    balance_minor,
                };
                (next, Step::Continue)
            }
            Stage::ReadTm {
                mut ch,
                key_version,
                balance_minor,
            } => {
                let tm = open(resp, &mut ch, CommMode::Mac, "read TM file")?;
                let (tmc, last_tmv) = tmc_tmv(&tm, "read TM file", "TM file is not 12 bytes")?;
                let next = Stage::ReadRecords(ReadSoFar {
                    ch,
                    key_version,
                    balance_minor,
                    tmc,
                    last_tmv,
                });
                (next, Step::Continue)
            }
            Stage::ReadRecords(mut read) => {
                let records = read_records(resp, &mut read.ch)?;
                (Stage::ReadProfile { read, records }, Step::Continue)
            }
            Stage::ReadProfile {
                read:
                    ReadSoFar {
                        mut ch,
                        key_version,
                        balance_minor,
                        tmc,
                        last_tmv,
                    },
                records,
            } => {
                let snapshot = CardSnapshot {
                    uid: self.uid,
                    key_version,
                    balance_minor,
                    tmc,
                    last_tmv,
                    records,
                    profile: read_profile(resp, &mut ch)?,
                    _read: ReadUnderMac,
                };
                let step = Step::Decide(snapshot.clone());
                (Stage::Deciding { ch, snapshot }, step)
            }
            _ => return Err(not_expected("read")),
        })
    }

    /// GetKeyVersion's answer: one byte, a version this SAM/HSM holds.
    fn key_version(&self, auth: &dyn Authenticator, resp: &[u8]) -> Result<u8, TxError> {
        let [v] = ok_data(resp, "get key version")?[..] else {
            return Err(TxError::Protocol {
                step: "get key version",
                what: "not one byte",
            });
        };
        if !auth.holds_version(self.key, v) {
            return Err(TxError::UnknownKeyVersion(v));
        }
        Ok(v)
    }

    /// Part 1's answer (AF, E(K, RndB)): the SAM's half and the frame part 2 sends.
    fn auth1(
        &self,
        auth: &mut dyn Authenticator,
        rng: &mut dyn RngCore,
        key_version: u8,
        resp: &[u8],
    ) -> Result<(crate::sam::PendingAuth, [u8; 32]), TxError> {
        let (ek_rnd_b, status) = split(resp, "authenticate")?;
        if status != Status::AdditionalFrame {
            return Err(TxError::Card {
                step: "authenticate",
                status,
            });
        }
        Ok(auth.auth_part1(self.key, key_version, &self.uid, ek_rnd_b, rng)?)
    }

    /// Applies the caller's decision (after [`Step::Decide`]).
    pub fn decide(
        &mut self,
        auth: &mut dyn Authenticator,
        decision: Decision,
    ) -> Result<Step, TxError> {
        let (mut ch, snapshot) =
            match std::mem::replace(&mut self.stage, Stage::Ended { snapshot: None }) {
                Stage::Deciding { ch, snapshot } => (ch, snapshot),
                other => {
                    self.stage = other;
                    return Err(TxError::Protocol {
                        step: "decide",
                        what: "the card has not been read yet",
                    });
                }
            };
        let (amount_minor, record) = match decision {
            Decision::Refuse => return Ok(Step::Done(Outcome::Refused { snapshot })),
            Decision::Apply {
                amount_minor,
                record,
            } => (amount_minor, record),
        };
        let change = match self.change(auth, amount_minor) {
            Ok(c) => c,
            Err(e) => {
                self.stage = Stage::Ended {
                    snapshot: Some(snapshot),
                };
                return Err(e);
            }
        };
        if amount_minor == 0 && record.is_none() {
            return Ok(Step::Done(Outcome::Refused { snapshot }));
        }
        match self.value_batch(auth, &mut ch, change, record) {
            Ok((cmds, outstanding)) => {
                self.stage = Stage::Committing {
                    ch,
                    snapshot,
                    change,
                    outstanding,
                };
                Ok(Step::Transmit(cmds))
            }
            Err(e) => {
                self.stage = Stage::Ended {
                    snapshot: Some(snapshot),
                };
                Err(e)
            }
        }
    }

    /// The change an amount makes with this dialogue's value command (and the reader id this
    /// SAM commits, if any).
    fn change(&self, auth: &dyn Authenticator, amount_minor: i32) -> Result<Change, TxError> {
        if amount_minor < 0 {
            return Err(TxError::Protocol {
                step: "decide",
                what: "negative amount",
            });
        }
        let kind = match (amount_minor, self.value_code) {
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
        Ok(Change {
            kind,
            amount_minor,
            reader_id: auth.reader_id(),
        })
    }

    /// The value batch: [value command (FULL)], [CommitReaderID], [WriteRecord], Commit, and
    /// the answers it expects.
    fn value_batch(
        &self,
        auth: &mut dyn Authenticator,
        ch: &mut Channel,
        change: Change,
        record: Option<Vec<u8>>,
    ) -> Result<(Vec<Vec<u8>>, std::collections::VecDeque<Cmd>), TxError> {
        let mut cmds = Vec::with_capacity(4);
        let mut outstanding = std::collections::VecDeque::with_capacity(4);
        if change.amount_minor > 0 {
            let code = self.value_code;
            let body = auth.wrap_value(ch, code, change.amount_minor)?;
            cmds.push(apdu::wrap(code, &body));
            outstanding.push_back(Cmd::Value);
        }
        // A SAM with a reader id (a franchise terminal's) commits it, so the card's
        // transaction MAC proves which SAM made the change.
        if let Some(rid) = change.reader_id {
            let ahead = outstanding.len() as u16;
            cmds.push(secure_ahead(
                ch,
                ahead,
                ins::COMMIT_READER_ID,
                &[],
                &rid,
                "commit reader id",
            )?);
            outstanding.push_back(Cmd::ReaderId);
        }
        if let Some(rec) = record {
            // WriteRecord carries a 24-bit length; a record is at most RECORD_SIZE bytes.
            if rec.len() > RECORD_SIZE {
                return Err(TxError::Protocol {
                    step: "decide",
                    what: "record longer than a trip record",
                });
            }
            let l = u32::try_from(rec.len()).unwrap_or(u32::MAX).to_le_bytes();
            let header = [FILE_RECORDS, 0, 0, 0, l[0], l[1], l[2]];
            let ahead = outstanding.len() as u16;
            cmds.push(secure_ahead(
                ch,
                ahead,
                ins::WRITE_RECORD,
                &header,
                &rec,
                "write record",
            )?);
            outstanding.push_back(Cmd::WriteRecord);
        }
        let ahead = outstanding.len() as u16;
        cmds.push(secure_ahead(
            ch,
            ahead,
            ins::COMMIT_TRANSACTION,
            &[],
            &[0x01],
            "commit",
        )?);
        outstanding.push_back(Cmd::Commit);
        Ok((cmds, outstanding))
    }
}

/// An answer of the value batch: a command's MAC'd answer, then the commit's, which ends the
/// dialogue with the receipt.
fn advance_commit(
    mut ch: Channel,
    snapshot: CardSnapshot,
    change: Change,
    mut outstanding: std::collections::VecDeque<Cmd>,
    resp: &[u8],
) -> Result<(Stage, Step), Failed> {
    let Some(cmd) = outstanding.pop_front() else {
        return Err(Box::new((Some(snapshot), not_expected("value batch"))));
    };
    let answer = match open(resp, &mut ch, CommMode::Mac, cmd.step()) {
        Ok(a) => a,
        Err(e) => return Err(Box::new((Some(snapshot), e))),
    };
    if cmd != Cmd::Commit {
        let next = Stage::Committing {
            ch,
            snapshot,
            change,
            outstanding,
        };
        return Ok((next, Step::Continue));
    }
    match finish(&snapshot, change, &answer) {
        Ok(receipt) => Ok((
            Stage::Ended { snapshot: None },
            Step::Done(Outcome::Committed { snapshot, receipt }),
        )),
        Err(e) => Err(Box::new((Some(snapshot), e))),
    }
}

/// How an answer ended the dialogue: the snapshot read so far (if any) and why (boxed: the
/// error path is rare and keeps the happy path's result small).
type Failed = Box<(Option<CardSnapshot>, TxError)>;

/// A stage that got an answer it does not take (unreachable through [`Dialogue::on_response`]).
fn not_expected(step: &'static str) -> TxError {
    TxError::Protocol {
        step,
        what: "an answer at a stage that expects none of this kind",
    }
}

/// A command under MAC, `ahead` commands after the ones already wrapped in this batch.
fn secure_ahead(
    ch: &mut Channel,
    ahead: u16,
    code: u8,
    header: &[u8],
    data: &[u8],
    step: &'static str,
) -> Result<Vec<u8>, TxError> {
    ch.command_apdu_ahead(ahead, code, header, data, CommMode::Mac)
        .map_err(|source| TxError::Sm { step, source })
}

/// The reads under MAC: GetValue, ReadData(TM file), ReadRecords, ReadData(profile file).
fn read_batch(ch: &mut Channel) -> Result<Vec<Vec<u8>>, TxError> {
    let whole = [0, 0, 0, 0, 0, 0];
    let tm_file = [
        FILE_TMAC, whole[0], whole[1], whole[2], whole[3], whole[4], whole[5],
    ];
    let records = [FILE_RECORDS, 0, 0, 0, 0, 0, 0];
    let profile = [FILE_PROFILE, 0, 0, 0, 0, 0, 0];
    Ok(vec![
        secure_ahead(ch, 0, ins::GET_VALUE, &[FILE_VALUE], &[], "get value")?,
        secure_ahead(ch, 1, ins::READ_DATA, &tm_file, &[], "read TM file")?,
        secure_ahead(ch, 2, ins::READ_RECORDS, &records, &[], "read records")?,
        secure_ahead(ch, 3, ins::READ_DATA, &profile, &[], "read profile")?,
    ])
}

/// GetValue's answer: the balance (4 bytes LE).
fn read_value(resp: &[u8], ch: &mut Channel) -> Result<i32, TxError> {
    let v = open(resp, ch, CommMode::Mac, "get value")?;
    let v: [u8; 4] = v[..].try_into().map_err(|_| TxError::Protocol {
        step: "get value",
        what: "value is not 4 bytes",
    })?;
    Ok(i32::from_le_bytes(v))
}

/// ReadRecords' answer: whole trip records, newest first.
fn read_records(resp: &[u8], ch: &mut Channel) -> Result<Vec<crate::card::TripRecord>, TxError> {
    let recs = open(resp, ch, CommMode::Mac, "read records")?;
    let (records, rest) = recs.as_chunks::<RECORD_SIZE>();
    if !rest.is_empty() {
        return Err(TxError::Protocol {
            step: "read records",
            what: "records are not whole",
        });
    }
    Ok(records.to_vec())
}

/// ReadData(profile file)'s answer: a well-formed profile.
fn read_profile(resp: &[u8], ch: &mut Channel) -> Result<[u8; PROFILE_SIZE], TxError> {
    let file = open(resp, ch, CommMode::Mac, "read profile")?;
    let bad = || TxError::Protocol {
        step: "read profile",
        what: "the profile file is not a format-1 profile",
    };
    let file: [u8; PROFILE_SIZE] = file[..].try_into().map_err(|_| bad())?;
    crate::card::decode_profile(&file).map_err(|_| bad())?;
    Ok(file)
}

/// TMC (u32 LE) ‖ TMV (8 bytes): the TM file and the commit's answer.
fn tmc_tmv(
    bytes: &[u8],
    step: &'static str,
    what: &'static str,
) -> Result<(u32, [u8; 8]), TxError> {
    let Ok([c0, c1, c2, c3, tmv @ ..]) = <[u8; 12]>::try_from(bytes) else {
        return Err(TxError::Protocol { step, what });
    };
    Ok((u32::from_le_bytes([c0, c1, c2, c3]), tmv))
}

/// The commit's answer, verified: the counter advanced by exactly one, and the receipt.
fn finish(snapshot: &CardSnapshot, change: Change, tm: &[u8]) -> Result<CommitReceipt, TxError> {
    let (tmc, tmv) = tmc_tmv(tm, "commit", "TMC ‖ TMV is not 12 bytes")?;
    if Some(tmc) != snapshot.tmc.checked_add(1) {
        return Err(TxError::Protocol {
            step: "commit",
            what: "counter did not advance by exactly one",
        });
    }
    let balance_after_minor =
        balance_after(change.kind, snapshot.balance_minor, change.amount_minor).ok_or(
            TxError::Protocol {
                step: "commit",
                what: "the balance after does not fit 32 bits",
            },
        )?;
    Ok(CommitReceipt::verified(TxClaim {
        uid: snapshot.uid,
        tmc,
        tmv,
        kind: change.kind,
        amount_minor: change.amount_minor,
        balance_after_minor,
        key_version: snapshot.key_version,
        reader_id: change.reader_id,
    }))
}

/// The balance after a change of `kind`, or `None` when it does not fit 32 bits (no card can
/// have committed it).
fn balance_after(kind: TxKind, before_minor: i32, amount_minor: i32) -> Option<i32> {
    match kind {
        TxKind::Debit => before_minor.checked_sub(amount_minor),
        TxKind::Credit | TxKind::LimitedCredit => before_minor.checked_add(amount_minor),
        TxKind::RecordOnly => Some(before_minor),
    }
}

/// Sends a batch over a transport and feeds the answers, returning the last step.
fn exchange(
    t: &mut dyn Transport,
    d: &mut Dialogue,
    auth: &mut dyn Authenticator,
    rng: &mut dyn RngCore,
    batch: Vec<Vec<u8>>,
) -> Result<Step, TxError> {
    let mut step = Step::Continue;
    for cmd in batch {
        let resp = t.transmit(&cmd)?;
        step = d.on_response(auth, rng, &resp)?;
    }
    Ok(step)
}

/// Reads a card's state in an authenticated session and returns the open channel.
pub fn open_session(
    t: &mut dyn Transport,
    auth: &mut dyn Authenticator,
    key: KeyKind,
    rng: &mut dyn RngCore,
) -> Result<(Channel, CardSnapshot), TxError> {
    let uid = t.card_uid()?;
    let (mut d, mut batch) = Dialogue::start(uid, key, ins::DEBIT);
    loop {
        match exchange(t, &mut d, auth, rng, batch)? {
            Step::Transmit(next) => batch = next,
            Step::Decide(snapshot) => {
                let ch = d.into_channel().ok_or(TxError::Protocol {
                    step: "open session",
                    what: "read without a channel",
                })?;
                return Ok((ch, snapshot));
            }
            Step::Continue | Step::Done(_) => unreachable!("a dialogue decides before it finishes"),
        }
    }
}

/// Runs one value transaction over a transport: `value_code` is Debit, Credit or
/// LimitedCredit; `key` the card key it authenticates with. `decide` sees the card before
/// anything changes.
pub fn run(
    t: &mut dyn Transport,
    auth: &mut dyn Authenticator,
    key: KeyKind,
    value_code: u8,
    rng: &mut dyn RngCore,
    decide: impl FnOnce(&CardSnapshot) -> Decision,
) -> Result<Outcome, TxError> {
    let uid = t.card_uid()?;
    let (mut d, mut batch) = Dialogue::start(uid, key, value_code);
    let mut decide = Some(decide);
    loop {
        let mut step = exchange(t, &mut d, auth, rng, batch)?;
        if let Step::Decide(snapshot) = step {
            let Some(f) = decide.take() else {
                return Err(TxError::Protocol {
                    step: "decide",
                    what: "a second decision in one dialogue",
                });
            };
            step = d.decide(auth, f(&snapshot))?;
        }
        match step {
            Step::Transmit(next) => batch = next,
            Step::Done(outcome) => return Ok(outcome),
            Step::Continue | Step::Decide(_) => unreachable!("batches end in a step"),
        }
    }
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

fn ok_data<'a>(resp: &'a [u8], step: &'static str) -> Result<&'a [u8], TxError> {
    let (data, status) = split(resp, step)?;
    if status != Status::Ok {
        return Err(TxError::Card { step, status });
    }
    Ok(data)
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

    /// `None` when it does not fit 32 bits (no card can have committed it).
    fn balance_after_minor(&self) -> Option<i32> {
        balance_after(self.kind, self.balance_before_minor, self.amount_minor)
    }
}

/// What the card's next contact says about a pending change.
#[derive(Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The card committed it: the change as a claim, with the card's own TMV read under MAC —
    /// not a receipt (the terminal never saw the commit answer): clearing, or the back office's
    /// HSM ([`crate::sam::Hsm::verify_claim`]), checks its transaction MAC like any other.
    Committed(SettledClaim),
    /// The card never committed it: nothing moved.
    NotCommitted,
    /// The card has moved on by more than one transaction since; the pending change is settled
    /// by clearing from the card's transaction chain instead.
    MovedOn,
}

/// A pending change the card's counter and balance, read under MAC at its next contact, show
/// committed: a [`TxClaim`] built only by [`settle`] from a [`CardSnapshot`] a dialogue read.
/// A validator journals it as a tap ([`crate::tap::TapRecord::settled`]); the back office has
/// its HSM verify the claim.
///
/// ```compile_fail
/// # fn forge(claim: purse::receipt::TxClaim) {
/// let forged = purse::txn::SettledClaim { claim };
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettledClaim {
    claim: TxClaim,
}

impl SettledClaim {
    /// The change the card made, as a claim for the HSM to verify.
    pub fn claim(&self) -> &TxClaim {
        &self.claim
    }
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
        if Some(next.balance_minor) != pending.balance_after_minor() {
            return Err(TxError::Protocol {
                step: "settle",
                what: "counter advanced by one but the balance is not the expected one",
            });
        }
        return Ok(Settlement::Committed(SettledClaim {
            claim: TxClaim {
                uid: pending.uid,
                tmc: next.tmc,
                tmv: next.last_tmv,
                kind: pending.kind,
                amount_minor: pending.amount_minor,
                balance_after_minor: next.balance_minor,
                key_version: pending.key_version,
                reader_id: None,
            },
        }));
    }
    if next.tmc < pending.tmc_before {
        return Err(TxError::Protocol {
            step: "settle",
            what: "card counter went backwards (clone or restored image)",
        });
    }
    Ok(Settlement::MovedOn)
}
