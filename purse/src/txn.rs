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

/// The commands of a [`Dialogue`], in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Select,
    KeyVersion,
    Auth1,
    Auth2,
    GetValue,
    ReadTm,
    ReadRecords,
    Value,
    ReaderId,
    WriteRecord,
    Commit,
}

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

/// One card transaction as a sans-IO state machine: it takes the card's answers and returns
/// the next commands, so the bytes can travel over anything — an emulated card, a PC/SC
/// reader, or an HTTP relay (the charging server).
///
/// Four batches: [SelectApplication, GetKeyVersion, AuthenticateEV2First] → [authentication
/// part 2] → [GetValue, ReadData(TM file), ReadRecords] under MAC → [`Step::Decide`] →
/// [value command (FULL), WriteRecord, CommitTransaction] → [`Outcome`]. Answers are verified
/// strictly in order; the first failure ends the dialogue (the card has ended the session too,
/// so later commands of the batch are refused by it).
pub struct Dialogue {
    uid: [u8; 7],
    key: KeyKind,
    value_code: u8,
    outstanding: std::collections::VecDeque<Stage>,
    awaiting_decision: bool,
    finished: bool,
    key_version: Option<u8>,
    pending_auth: Option<crate::sam::PendingAuth>,
    ch: Option<Channel>,
    balance_minor: i32,
    tmc: u32,
    last_tmv: [u8; 8],
    snapshot: Option<CardSnapshot>,
    decided: Option<(TxKind, i32)>,
    reader_id: Option<[u8; 16]>,
    tm: Option<Vec<u8>>,
}

impl std::fmt::Debug for Dialogue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialogue")
            .field("uid", &hex::encode_upper(self.uid))
            .field("outstanding", &self.outstanding)
            .finish_non_exhaustive()
    }
}

impl Dialogue {
    /// Starts a dialogue with the card `uid` (from anticollision) using card key `key`;
    /// `value_code` is Debit, Credit or LimitedCredit. Returns the first batch of APDUs.
    pub fn start(uid: [u8; 7], key: KeyKind, value_code: u8) -> (Dialogue, Vec<Vec<u8>>) {
        let key_no = key.card_key_no().expect("card key");
        (
            Dialogue {
                uid,
                key,
                value_code,
                outstanding: [Stage::Select, Stage::KeyVersion, Stage::Auth1].into(),
                awaiting_decision: false,
                finished: false,
                key_version: None,
                pending_auth: None,
                ch: None,
                balance_minor: 0,
                tmc: 0,
                last_tmv: [0; 8],
                snapshot: None,
                decided: None,
                reader_id: None,
                tm: None,
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
        self.snapshot.as_ref()
    }

    /// Whether the commit command has been handed out (after that, a lost answer leaves the
    /// outcome unknown until the card's next contact).
    pub fn commit_sent(&self) -> bool {
        self.outstanding.contains(&Stage::Commit)
    }

    /// Takes the open secure channel (for read-only sessions that stop at the decision).
    pub fn into_channel(self) -> Option<Channel> {
        self.ch
    }

    fn channel(&mut self) -> &mut Channel {
        self.ch
            .as_mut()
            .expect("channel exists after authentication")
    }

    fn fail(&mut self, e: TxError) -> Result<Step, TxError> {
        self.finished = true;
        self.outstanding.clear();
        Err(e)
    }

    /// Feeds the card's answer to the oldest outstanding command.
    pub fn on_response(
        &mut self,
        auth: &mut dyn Authenticator,
        rng: &mut dyn RngCore,
        resp: &[u8],
    ) -> Result<Step, TxError> {
        let Some(stage) = self.outstanding.pop_front() else {
            return Err(TxError::Protocol {
                step: "dialogue",
                what: "no command is outstanding",
            });
        };
        if let Err(e) = self.process(stage, auth, rng, resp) {
            return self.fail(e);
        }
        if !self.outstanding.is_empty() {
            return Ok(Step::Continue);
        }
        let next = match stage {
            Stage::Auth1 => self.auth2_batch(),
            Stage::Auth2 => self.read_batch(),
            Stage::ReadRecords => {
                self.awaiting_decision = true;
                return Ok(Step::Decide(self.snapshot.clone().expect("built")));
            }
            Stage::Commit => {
                let tm = self.tm.take().expect("commit answer kept");
                match self.finish(&tm) {
                    Ok(o) => {
                        self.finished = true;
                        return Ok(Step::Done(o));
                    }
                    Err(e) => return self.fail(e),
                }
            }
            _ => Err(TxError::Protocol {
                step: "dialogue",
                what: "batch ended at an unexpected command",
            }),
        };
        match next {
            Ok(st) => Ok(st),
            Err(e) => self.fail(e),
        }
    }

    fn process(
        &mut self,
        stage: Stage,
        auth: &mut dyn Authenticator,
        rng: &mut dyn RngCore,
        resp: &[u8],
    ) -> Result<(), TxError> {
        match stage {
            Stage::Select => {
                ok_data(resp, "select")?;
            }
            Stage::KeyVersion => {
                let [v] = ok_data(resp, "get key version")?[..] else {
                    return Err(TxError::Protocol {
                        step: "get key version",
                        what: "not one byte",
                    });
                };
                if !auth.holds_version(self.key, v) {
                    return Err(TxError::UnknownKeyVersion(v));
                }
                self.key_version = Some(v);
            }
            Stage::Auth1 => {
                let (ek_rnd_b, status) = split(resp, "authenticate")?;
                if status != Status::AdditionalFrame {
                    return Err(TxError::Card {
                        step: "authenticate",
                        status,
                    });
                }
                let v = self.key_version.ok_or(TxError::Protocol {
                    step: "authenticate",
                    what: "key version unknown",
                })?;
                let (pending, frame) = auth.auth_part1(self.key, v, &self.uid, ek_rnd_b, rng)?;
                self.pending_auth = Some(pending);
                self.tm = Some(frame.to_vec());
            }
            Stage::Auth2 => {
                let answer = ok_data(resp, "authenticate")?;
                let pending = self.pending_auth.take().expect("part 1 ran");
                self.ch = Some(auth.auth_part2(pending, answer)?);
            }
            Stage::GetValue => {
                let v = open(resp, self.channel(), CommMode::Mac, "get value")?;
                self.balance_minor =
                    i32::from_le_bytes(v[..].try_into().map_err(|_| TxError::Protocol {
                        step: "get value",
                        what: "value is not 4 bytes",
                    })?);
            }
            Stage::ReadTm => {
                let tm = open(resp, self.channel(), CommMode::Mac, "read TM file")?;
                if tm.len() != 12 {
                    return Err(TxError::Protocol {
                        step: "read TM file",
                        what: "TM file is not 12 bytes",
                    });
                }
                self.tmc = u32::from_le_bytes(tm[..4].try_into().expect("4"));
                self.last_tmv = tm[4..].try_into().expect("8");
            }
            Stage::ReadRecords => {
                let recs = open(resp, self.channel(), CommMode::Mac, "read records")?;
                if !recs.len().is_multiple_of(RECORD_SIZE) {
                    return Err(TxError::Protocol {
                        step: "read records",
                        what: "records are not whole",
                    });
                }
                self.snapshot = Some(CardSnapshot {
                    uid: self.uid,
                    key_version: self.key_version.unwrap_or_default(),
                    balance_minor: self.balance_minor,
                    tmc: self.tmc,
                    last_tmv: self.last_tmv,
                    records: recs
                        .chunks_exact(RECORD_SIZE)
                        .map(|c| c.try_into().expect("whole record"))
                        .collect(),
                });
            }
            Stage::Value => {
                open(resp, self.channel(), CommMode::Mac, "value command")?;
            }
            Stage::ReaderId => {
                open(resp, self.channel(), CommMode::Mac, "commit reader id")?;
            }
            Stage::WriteRecord => {
                open(resp, self.channel(), CommMode::Mac, "write record")?;
            }
            Stage::Commit => {
                let tm = open(resp, self.channel(), CommMode::Mac, "commit")?;
                self.tm = Some(tm);
            }
        }
        Ok(())
    }

    fn auth2_batch(&mut self) -> Result<Step, TxError> {
        let frame = self.tm.take().expect("auth part 1 frame");
        self.outstanding.push_back(Stage::Auth2);
        Ok(Step::Transmit(vec![apdu::wrap(
            ins::ADDITIONAL_FRAME,
            &frame,
        )]))
    }

    fn secure_ahead(
        &mut self,
        ahead: u16,
        code: u8,
        header: &[u8],
        data: &[u8],
        step: &'static str,
    ) -> Result<Vec<u8>, TxError> {
        self.channel()
            .command_apdu_ahead(ahead, code, header, data, CommMode::Mac)
            .map_err(|source| TxError::Sm { step, source })
    }

    fn read_batch(&mut self) -> Result<Step, TxError> {
        let cmds = vec![
            self.secure_ahead(0, ins::GET_VALUE, &[FILE_VALUE], &[], "get value")?,
            self.secure_ahead(
                1,
                ins::READ_DATA,
                &[FILE_TMAC, 0, 0, 0, 0, 0, 0],
                &[],
                "read TM file",
            )?,
            self.secure_ahead(
                2,
                ins::READ_RECORDS,
                &[FILE_RECORDS, 0, 0, 0, 0, 0, 0],
                &[],
                "read records",
            )?,
        ];
        self.outstanding
            .extend([Stage::GetValue, Stage::ReadTm, Stage::ReadRecords]);
        Ok(Step::Transmit(cmds))
    }

    /// Applies the caller's decision (after [`Step::Decide`]).
    pub fn decide(
        &mut self,
        auth: &mut dyn Authenticator,
        decision: Decision,
    ) -> Result<Step, TxError> {
        if !self.awaiting_decision {
            return Err(TxError::Protocol {
                step: "decide",
                what: "the card has not been read yet",
            });
        }
        self.awaiting_decision = false;
        let (amount_minor, record) = match decision {
            Decision::Refuse => {
                self.finished = true;
                let snapshot = self.snapshot.take().expect("read before deciding");
                return Ok(Step::Done(Outcome::Refused { snapshot }));
            }
            Decision::Apply {
                amount_minor,
                record,
            } => (amount_minor, record),
        };
        if amount_minor < 0 {
            return self.fail(TxError::Protocol {
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
                return self.fail(TxError::Protocol {
                    step: "decide",
                    what: "not a value command",
                })
            }
        };
        if amount_minor == 0 && record.is_none() {
            self.finished = true;
            let snapshot = self.snapshot.take().expect("read before deciding");
            return Ok(Step::Done(Outcome::Refused { snapshot }));
        }
        self.decided = Some((kind, amount_minor));
        let mut cmds = Vec::with_capacity(3);
        let mut ahead = 0u16;
        if amount_minor > 0 {
            let code = self.value_code;
            let body = match auth.wrap_value(self.channel(), code, amount_minor) {
                Ok(b) => b,
                Err(e) => return self.fail(e.into()),
            };
            cmds.push(apdu::wrap(code, &body));
            self.outstanding.push_back(Stage::Value);
            ahead += 1;
        }
        // A SAM with a reader id (a franchise terminal's) commits it, so the card's
        // transaction MAC proves which SAM made the change.
        if let Some(rid) = auth.reader_id() {
            match self.secure_ahead(ahead, ins::COMMIT_READER_ID, &[], &rid, "commit reader id") {
                Ok(c) => cmds.push(c),
                Err(e) => return self.fail(e),
            }
            self.reader_id = Some(rid);
            self.outstanding.push_back(Stage::ReaderId);
            ahead += 1;
        }
        if let Some(rec) = record {
            // WriteRecord carries a 24-bit length; a record is at most RECORD_SIZE bytes.
            if rec.len() > RECORD_SIZE {
                return self.fail(TxError::Protocol {
                    step: "decide",
                    what: "record longer than a trip record",
                });
            }
            let l = u32::try_from(rec.len()).unwrap_or(u32::MAX).to_le_bytes();
            match self.secure_ahead(
                ahead,
                ins::WRITE_RECORD,
                &[FILE_RECORDS, 0, 0, 0, l[0], l[1], l[2]],
                &rec,
                "write record",
            ) {
                Ok(c) => cmds.push(c),
                Err(e) => return self.fail(e),
            }
            self.outstanding.push_back(Stage::WriteRecord);
            ahead += 1;
        }
        match self.secure_ahead(ahead, ins::COMMIT_TRANSACTION, &[], &[0x01], "commit") {
            Ok(c) => cmds.push(c),
            Err(e) => return self.fail(e),
        }
        self.outstanding.push_back(Stage::Commit);
        Ok(Step::Transmit(cmds))
    }

    fn finish(&mut self, tm: &[u8]) -> Result<Outcome, TxError> {
        let snapshot = self.snapshot.take().expect("read before commit");
        let (kind, amount_minor) = self.decided.take().expect("decided before commit");
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
            TxKind::Debit => snapshot.balance_minor.checked_sub(amount_minor),
            TxKind::Credit | TxKind::LimitedCredit => {
                snapshot.balance_minor.checked_add(amount_minor)
            }
            TxKind::RecordOnly => Some(snapshot.balance_minor),
        }
        .ok_or(TxError::Protocol {
            step: "commit",
            what: "the balance after does not fit 32 bits",
        })?;
        let receipt = CommitReceipt::verified(
            snapshot.uid,
            tmc,
            tmv,
            kind,
            amount_minor,
            balance_after_minor,
            snapshot.key_version,
        )
        .with_reader(self.reader_id);
        Ok(Outcome::Committed { snapshot, receipt })
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
                return Ok((d.into_channel().expect("authenticated"), snapshot))
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
            let f = decide.take().expect("one decision per dialogue");
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
        match self.kind {
            TxKind::Debit => self.balance_before_minor.checked_sub(self.amount_minor),
            TxKind::Credit | TxKind::LimitedCredit => {
                self.balance_before_minor.checked_add(self.amount_minor)
            }
            TxKind::RecordOnly => Some(self.balance_before_minor),
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
        if Some(next.balance_minor) != pending.balance_after_minor() {
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
