//! One tap at the gate, start to end: session with the card under the SAM, settlement of an
//! earlier torn debit, blocklist, fare quote from the card's trip records, the debit journalled
//! *before* the card is touched, commit, receipt, the signed tap journalled with the pending
//! entry cleared in the same LMDB transaction, and the answer to the passenger.
//!
//! Exactly once: the pending entry is durable before the card can commit, and it is cleared
//! only together with journalling the tap that records the commit. If the card is pulled or the
//! power fails anywhere in between, the entry survives; at the card's next tap here its counter
//! says whether the debit happened ([`purse::txn::settle`]): the tap is then journalled once
//! (committed) or the entry dropped (not committed).

use crate::journal::{Journal, JournalError, PendingPickup, PendingTap};
use fare_rules::engine::{CardView, Engine, Rider, Tap, TapQuote};
use fare_rules::record::{TapKind, TripRecord};
use fare_rules::table::NONE;
use purse::actionlist::{self, ActionList};
use purse::apdu::ins;
use purse::blocklist::Blocklist;
use purse::keys::KeyKind;
use purse::receipt::TxKind;
use purse::sam::{Authenticator, Sam, SoftwareSam};
use purse::tap::{RefusalReason, TapFlags, TapMeta, TapRecord, TAP_LEN};
use purse::txn::{self, Decision, Outcome, PendingChange, Settlement, Transport, TxError};
use rand::rngs::StdRng;

/// Where the gate is and what kind of tap it takes.
#[derive(Clone, Debug)]
pub struct Placement {
    pub device_id: u32,
    /// The operator this gate serves (its taps' topics and revenue): the device MAC of every
    /// tap covers it, so the tap verifies only as this operator's.
    pub operator: String,
    /// The stop's id in the fare table.
    pub stop: String,
    /// The route's id in the fare table.
    pub route: String,
    /// `in`, `out` or `entry`.
    pub kind: TapKind,
    /// Local time = UTC + this offset.
    pub utc_offset_s: i32,
    /// A charge point (kind `Charge`: a hotel pay-TV box) sells this at every presentation;
    /// stop and route are not used then.
    pub sale: Option<Sale>,
}

impl Placement {
    /// Whether `engine`'s table knows this gate (its stop and route, or its sale's charge): a
    /// table that does not would refuse every tap.
    pub fn check(&self, engine: &Engine) -> Result<(), String> {
        let version = engine.table().meta.version;
        match &self.sale {
            Some(s) => {
                if !engine.table().charges.iter().any(|c| c.id == s.charge) {
                    return Err(format!(
                        "charge {:?} is not in fare table version {version}",
                        s.charge
                    ));
                }
            }
            None => {
                for (what, id, found) in [
                    ("stop", &self.stop, engine.stop(&self.stop).is_some()),
                    ("route", &self.route, engine.route(&self.route).is_some()),
                ] {
                    if !found {
                        return Err(format!(
                            "{what} {id:?} is not in fare table version {version}"
                        ));
                    }
                }
                // A table that lists the route's stops (a TOML source does; a GTFS feed's
                // routes carry none) must list this one: elsewhere every tap would be refused
                // as a fare error.
                let t = engine.table();
                let (stop, route) = (engine.stop(&self.stop), engine.route(&self.route));
                if let (Some(stop), Some(route)) = (stop, route) {
                    let served = &t.routes[route as usize].chainage;
                    if !served.is_empty() && !served.iter().any(|&(s, _)| s == stop) {
                        let names: Vec<&str> = served
                            .iter()
                            .map(|&(s, _)| t.stops[s as usize].id.as_str())
                            .collect();
                        return Err(format!(
                            "stop {:?} is not on route {:?} in fare table version {version} (its stops: {}): set stop and route to a stop the route serves",
                            self.stop,
                            self.route,
                            names.join(", ")
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a charge point (a hotel pay-TV box, a kiosk) sells at one presentation: `items` of the
/// fare table's charge `charge` (a film), or `minutes` of it (sports by the started hour); the
/// table's per-day cap applies from the card's own records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sale {
    /// The charge's id in the fare table.
    pub charge: String,
    pub items: u32,
    pub minutes: u32,
}

/// Steps of a tap, for the fault-injection hook (a crash or a pulled card at each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The card answered the reads; nothing journalled yet.
    Read,
    /// The debit is journalled as pending; the card has not committed.
    PendingJournalled,
    /// The card committed (receipt verified); the tap is not journalled yet.
    Committed,
    /// The tap is journalled and the pending entry cleared.
    Journalled,
}

/// What the passenger sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Accepted {
        fare_minor: u32,
        balance_minor: i32,
        seq: u64,
    },
    Refused {
        reason: RefusalReason,
        seq: Option<u64>,
    },
    /// The card left mid-transaction: the debit, if any, is settled at its next tap.
    Torn,
    /// The same tap again within seconds: already validated, nothing charged or journalled.
    Repeat,
}

/// Tap failures the gate cannot answer a passenger for.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("no fare table is installed")]
    NoFareTable,
    #[error("this gate's {what} \"{id}\" is not in fare table version {version}")]
    Placement {
        what: &'static str,
        id: String,
        version: u32,
    },
}

/// A settled earlier debit, journalled during this tap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    None,
    Committed {
        seq: u64,
    },
    NotCommitted,
    /// The card committed it but has transacted elsewhere since: kept as unresolved.
    Unprovable,
}

/// What an action-list pick-up did at a tap ([`Gate::pick_up`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pickup {
    /// No live order on the list that this validator has not applied.
    Nothing,
    /// The card committed the order's credit; its tap (kind Credit, the order id in its stop
    /// and route fields) is journalled as `seq`.
    Applied {
        order_id: u64,
        amount_minor: i32,
        balance_minor: i32,
        seq: u64,
    },
    /// The card already holds the order's pick-up record (another validator applied it).
    AlreadyOnCard { order_id: u64 },
    /// Not applied now; the order stays on the list (for this validator too unless its SAM
    /// already authorised it).
    NotApplied { order_id: u64, why: PickupRefusal },
    /// The card left mid-credit: settled from its counter and records at its next tap here.
    Torn { order_id: u64 },
    /// An earlier torn pick-up awaits settlement: this tap settles it, no new one starts.
    Settling,
}

/// Why an order was not applied at this tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PickupRefusal {
    /// The SAM's remaining ceiling is below the order's amount (the back office tops it up).
    CeilingExhausted { remaining_minor: i64 },
    /// The SAM refused the order (one it already authorised, or expired).
    Sam(String),
    /// The card is on the blocklist.
    Blocklisted,
    /// No room to journal the credit.
    OutboxFull,
    /// The card refused the credit (its upper limit) or the dialogue failed.
    Card(String),
}

/// The result of one tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapOutcome {
    pub answer: Answer,
    pub uid: Option<[u8; 7]>,
    pub settled: Settled,
}

/// The gate: SAM, fare table, blocklist and placement.
pub struct Gate {
    pub sam: SoftwareSam,
    pub engine: Option<Engine>,
    pub blocklist: Blocklist,
    pub placement: Placement,
    pub rng: StdRng,
}

fn local_s(now_ms: u64, offset_s: i32) -> u32 {
    let t = (now_ms / 1000) as i64 + i64::from(offset_s);
    t.clamp(0, i64::from(u32::MAX)) as u32
}

impl Gate {
    /// The fare table version in force (0: none).
    pub fn fare_version(&self) -> u32 {
        self.engine.as_ref().map_or(0, |e| e.table().meta.version)
    }

    fn meta(&self, seq: u64, now_ms: u64, stop_code: u32, route_code: u32) -> TapMeta {
        TapMeta {
            device_id: self.placement.device_id,
            device_seq: seq,
            device_time_ms: now_ms,
            stop_id: stop_code,
            route_id: route_code,
            fare_table_version: self.fare_version(),
            blocklist_version: self.blocklist.version(),
        }
    }

    fn sign(&self, rec: &TapRecord) -> [u8; TAP_LEN] {
        rec.sign_with(&self.placement.operator, |b| self.sam.device_mac(b))
    }

    /// Journals a refusal and answers it.
    fn refuse(
        &self,
        p: &Presented<'_>,
        reason: RefusalReason,
        shown: Option<&txn::CardSnapshot>,
    ) -> Result<Answer, GateError> {
        let (kv, tmc, bal) =
            shown.map_or((0, 0, 0), |s| (s.key_version(), s.tmc(), s.balance_minor()));
        let seq = match p.journal.append_tap(None, |seq| {
            let rec = TapRecord::refused(
                reason,
                p.uid,
                kv,
                tmc,
                bal,
                self.meta(seq, p.now_ms, p.codes.0, p.codes.1),
            );
            self.sign(&rec)
        }) {
            Ok(s) => Some(s),
            Err(JournalError::OutboxFull(_)) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Answer::Refused { reason, seq })
    }

    /// Processes the card in the field (a charge point sells its placement's sale). `now_ms` is
    /// the device clock (unix ms); `hook` is called at each [`Step`] (fault injection: it may
    /// tear the card or end the process).
    pub fn tap(
        &mut self,
        card: &mut dyn Transport,
        journal: &Journal,
        now_ms: u64,
        hook: &mut dyn FnMut(Step),
    ) -> Result<TapOutcome, GateError> {
        let sale = self.placement.sale.clone();
        self.transact(card, journal, now_ms, sale.as_ref(), hook)
    }

    /// A charge point's presentation: the card pays for `sale` (priced by the fare table's
    /// charge, capped per day from the card's records), exactly once like a tap.
    pub fn charge(
        &mut self,
        card: &mut dyn Transport,
        journal: &Journal,
        now_ms: u64,
        sale: &Sale,
        hook: &mut dyn FnMut(Step),
    ) -> Result<TapOutcome, GateError> {
        self.transact(card, journal, now_ms, Some(sale), hook)
    }

    /// A tap with the action list: the card's first live order this validator has not applied
    /// is picked up ([`Gate::pick_up`]), then the tap goes on as [`Gate::tap`] (a pick-up that
    /// tore ends the presentation: the card is gone).
    pub fn tap_with_actions(
        &mut self,
        card: &mut dyn Transport,
        journal: &Journal,
        actions: &ActionList,
        now_ms: u64,
        hook: &mut dyn FnMut(Step),
    ) -> Result<(Pickup, TapOutcome), GateError> {
        let pickup = self.pick_up(card, journal, actions, now_ms, hook)?;
        if let Pickup::Torn { .. } = pickup {
            let uid = card.card_uid().ok();
            let outcome = TapOutcome {
                answer: Answer::Torn,
                uid,
                settled: Settled::None,
            };
            return Ok((pickup, outcome));
        }
        let outcome = self.tap(card, journal, now_ms, hook)?;
        Ok((pickup, outcome))
    }

    /// Picks up the card's first live order on `actions` that this validator has not applied:
    /// a Credit of the order's amount in a session under the card's own credit key, which only
    /// the order carries (wrapped) and only the SAM unwraps, within the SAM's granted ceiling.
    /// Exactly once: the order is skipped when the card shows its pick-up record (another
    /// validator applied it) or this journal has it; the pick-up is journalled as pending
    /// before the card is touched, and the credit's tap, the order marked applied and the
    /// pending entry cleared are one journal transaction. A tear is settled at the card's next
    /// tap here from its counter and records, like a torn debit.
    pub fn pick_up(
        &mut self,
        card: &mut dyn Transport,
        journal: &Journal,
        actions: &ActionList,
        now_ms: u64,
        hook: &mut dyn FnMut(Step),
    ) -> Result<Pickup, GateError> {
        let now_s = now_ms / 1000;
        let Ok(uid) = card.card_uid() else {
            return Ok(Pickup::Nothing);
        };
        if journal.pending_pickup(&uid)?.is_some() {
            return Ok(Pickup::Settling);
        }
        let Some(listed) = next_order(journal, actions, &uid, now_s)? else {
            return Ok(Pickup::Nothing);
        };
        let o = listed.order().clone();
        let not_applied = |why| {
            Ok(Pickup::NotApplied {
                order_id: o.order_id,
                why,
            })
        };
        if let Some(why) = self.pickup_refusal(journal, &uid, &o)? {
            return not_applied(why);
        }
        let codes = actionlist::order_tap_codes(o.order_id);
        let meta = self.meta(0, now_ms, codes.0, codes.1);
        let device_key = self.sam.device_key().clone();
        let mut sam = match self.sam.pickup(listed, now_s) {
            Ok(s) => s,
            Err(e) => return not_applied(PickupRefusal::Sam(e.to_string())),
        };
        let mut verdict: Result<(), Result<Pickup, GateError>> = Ok(());
        // The SAM is borrowed for the dialogue only (the tap is signed with the key copy).
        let out = txn::run(
            card,
            &mut sam,
            KeyKind::Credit,
            ins::CREDIT,
            &mut self.rng,
            |snap| {
                hook(Step::Read);
                if snap
                    .records()
                    .iter()
                    .any(|r| actionlist::order_on_record(r) == Some(o.order_id))
                {
                    let recorded = journal_applied_elsewhere(
                        journal,
                        snap,
                        &o,
                        meta,
                        &self.placement.operator,
                        &device_key,
                    );
                    verdict = Err(recorded
                        .map(|()| Pickup::AlreadyOnCard {
                            order_id: o.order_id,
                        })
                        .map_err(GateError::from));
                    return Decision::Refuse;
                }
                let pending = pending_pickup(snap, &o, now_ms, meta);
                if let Err(e) = journal.put_pending_pickup(&pending) {
                    verdict = Err(Err(e.into()));
                    return Decision::Refuse;
                }
                hook(Step::PendingJournalled);
                Decision::Apply {
                    amount_minor: o.amount_minor,
                    record: Some(pending.tap.record.to_vec()),
                }
            },
        );
        match out {
            Ok(Outcome::Committed { receipt, .. }) => {
                hook(Step::Committed);
                let operator = &self.placement.operator;
                let seq = journal.append_pickup(&uid, o.order_id, o.expires_s, |seq| {
                    TapRecord::accepted(
                        &receipt,
                        TapMeta {
                            device_seq: seq,
                            ..meta
                        },
                    )
                    .sign(operator, &device_key)
                })?;
                hook(Step::Journalled);
                Ok(Pickup::Applied {
                    order_id: o.order_id,
                    amount_minor: o.amount_minor,
                    balance_minor: receipt.balance_after_minor(),
                    seq,
                })
            }
            Ok(Outcome::Refused { .. }) => match verdict {
                Err(answer) => answer,
                Ok(()) => not_applied(PickupRefusal::Card("refused".into())),
            },
            // The pending entry (if written) is settled at the card's next tap.
            Err(TxError::Transport(_)) => Ok(Pickup::Torn {
                order_id: o.order_id,
            }),
            Err(e) => not_applied(PickupRefusal::Card(e.to_string())),
        }
    }

    /// Why order `o` is not picked up on card `uid`, decided before the card is touched: the
    /// card is blocklisted, the outbox is full, or the SAM's granted ceiling is below the amount.
    fn pickup_refusal(
        &self,
        journal: &Journal,
        uid: &[u8; 7],
        o: &actionlist::Order,
    ) -> Result<Option<PickupRefusal>, JournalError> {
        Ok(if self.blocklist.is_blocked(uid) {
            Some(PickupRefusal::Blocklisted)
        } else if journal.outbox_full()? {
            Some(PickupRefusal::OutboxFull)
        } else if self.sam.ceiling_minor() < i64::from(o.amount_minor) {
            Some(PickupRefusal::CeilingExhausted {
                remaining_minor: self.sam.ceiling_minor(),
            })
        } else {
            None
        })
    }

    fn transact(
        &mut self,
        card: &mut dyn Transport,
        journal: &Journal,
        now_ms: u64,
        sale: Option<&Sale>,
        hook: &mut dyn FnMut(Step),
    ) -> Result<TapOutcome, GateError> {
        let engine = self.engine.as_ref().ok_or(GateError::NoFareTable)?;
        let time_s = local_s(now_ms, self.placement.utc_offset_s);
        let (codes, priced) = self.placement.priced(engine, sale, time_s)?;
        let Ok(uid) = card.card_uid() else {
            return Ok(TapOutcome {
                answer: Answer::Torn,
                uid: None,
                settled: Settled::None,
            });
        };
        if journal.outbox_full()? {
            // It could not journal a debit: take no value (the alarm is raised by the daemon).
            return Ok(TapOutcome {
                answer: Answer::Refused {
                    reason: RefusalReason::Other,
                    seq: None,
                },
                uid: Some(uid),
                settled: Settled::None,
            });
        }
        // The SAM is busy with the card during the dialogue; a settled earlier debit is signed
        // with a copy of the device key that lives for this tap only (zeroized on drop).
        let device_key = self.sam.device_key().clone();
        let mut decider = Decider {
            journal,
            blocklist: &self.blocklist,
            engine,
            priced: &priced,
            operator: &self.placement.operator,
            device_key: &device_key,
            meta_base: self.meta(0, now_ms, codes.0, codes.1),
            now_ms,
            time_s,
            hook: &mut *hook,
            verdict: Verdict::Undecided,
            settled: Settled::None,
        };
        let out = txn::debit(card, &mut self.sam, &mut self.rng, |snap| {
            decider.decide(snap)
        });
        let Decider {
            verdict, settled, ..
        } = decider;
        let presented = Presented {
            journal,
            uid,
            now_ms,
            codes,
            settled,
        };
        self.conclude(&presented, out, verdict, hook)
    }

    /// After the dialogue: the committed debit journalled as a signed tap, a refusal
    /// journalled and answered, a tear left for the card's next tap.
    fn conclude(
        &self,
        p: &Presented<'_>,
        out: Result<Outcome, TxError>,
        verdict: Verdict,
        hook: &mut dyn FnMut(Step),
    ) -> Result<TapOutcome, GateError> {
        let answer = match out {
            Ok(Outcome::Committed { receipt, .. }) => {
                hook(Step::Committed);
                let (fare_minor, flags) = match verdict {
                    Verdict::Apply { fare_minor, flags } => (fare_minor, flags),
                    _ => (receipt.amount_minor().max(0) as u32, TapFlags::NONE),
                };
                let meta = self.meta(0, p.now_ms, p.codes.0, p.codes.1);
                let seq = p.journal.append_tap(Some(&p.uid), |seq| {
                    self.sign(
                        &TapRecord::accepted(
                            &receipt,
                            TapMeta {
                                device_seq: seq,
                                ..meta
                            },
                        )
                        .with_flags(flags),
                    )
                })?;
                hook(Step::Journalled);
                Answer::Accepted {
                    fare_minor,
                    balance_minor: receipt.balance_after_minor(),
                    seq,
                }
            }
            Ok(Outcome::Refused { snapshot }) => match verdict {
                Verdict::Repeat => Answer::Repeat,
                Verdict::Failed(e) => return Err(e),
                Verdict::Refuse(r) => self.refuse(p, r, Some(&snapshot))?,
                _ => self.refuse(p, RefusalReason::Other, Some(&snapshot))?,
            },
            // The pending entry (if it was written) stays until the card's next tap.
            Err(TxError::Transport(_)) => Answer::Torn,
            Err(e) => {
                let reason = match e {
                    // A version the operator retired has its own reason: the card is
                    // migrated at its next online load.
                    TxError::UnknownKeyVersion(v)
                        if self.sam.retired_version(KeyKind::Debit, v) =>
                    {
                        RefusalReason::KeyVersionRetired
                    }
                    TxError::UnknownKeyVersion(_) => RefusalReason::UnknownKeyVersion,
                    _ => RefusalReason::CardError,
                };
                // A dialogue that failed after the pending entry was written (a card that
                // refused its commit): the counter settles it at the next tap, as for a tear.
                self.refuse(p, reason, None)?
            }
        };
        Ok(TapOutcome {
            answer,
            uid: Some(p.uid),
            settled: p.settled,
        })
    }
}

/// The card in the field, once its UID is known: what the steps after the dialogue need.
struct Presented<'j> {
    journal: &'j Journal,
    uid: [u8; 7],
    now_ms: u64,
    /// The stop and route codes of the tap (a sale: 0 and its charge code).
    codes: (u32, u32),
    /// An earlier torn debit settled during this tap.
    settled: Settled,
}

/// What is priced: a transit tap here, or a sale (its charge code in the route field).
enum Priced {
    Tap(Tap),
    Charge { code: u16, items: u32, minutes: u32 },
}

/// What the decision found out, for after the dialogue.
enum Verdict {
    Undecided,
    Repeat,
    Refuse(RefusalReason),
    Apply { fare_minor: u32, flags: TapFlags },
    Failed(GateError),
}

/// The tap record's fare flags from the trip record the fare engine wrote (its transfer,
/// capped and penalty bits; the pass bit stays on the card).
fn tap_flags(trip: &[u8; fare_rules::record::RECORD_LEN]) -> TapFlags {
    use fare_rules::record::flags;
    let f = TripRecord::decode(trip).map_or(0, |r| r.flags);
    TapFlags::new(
        f & flags::TRANSFER != 0,
        f & flags::CAPPED != 0,
        f & flags::PENALTY != 0,
    )
}

impl Placement {
    /// The tap's stop and route codes and what is priced: this gate's stop and route, or the
    /// sale's charge.
    fn priced(
        &self,
        engine: &Engine,
        sale: Option<&Sale>,
        time_s: u32,
    ) -> Result<((u32, u32), Priced), GateError> {
        let version = engine.table().meta.version;
        let missing = |what: &'static str, id: &str| GateError::Placement {
            what,
            id: id.to_string(),
            version,
        };
        let Some(sale) = sale else {
            let stop = engine
                .stop(&self.stop)
                .ok_or_else(|| missing("stop", &self.stop))?;
            let route = engine
                .route(&self.route)
                .ok_or_else(|| missing("route", &self.route))?;
            let codes = (
                engine.table().stops[stop as usize].code,
                engine.table().routes[route as usize].code,
            );
            let tap = Tap {
                kind: self.kind,
                time_s,
                route,
                stop,
            };
            return Ok((codes, Priced::Tap(tap)));
        };
        let c = engine
            .table()
            .charges
            .iter()
            .find(|c| c.id == sale.charge)
            .ok_or_else(|| missing("charge", &sale.charge))?;
        let priced = Priced::Charge {
            code: c.code,
            items: sale.items,
            minutes: sale.minutes,
        };
        Ok(((0, u32::from(c.code)), priced))
    }
}

/// The gate's decision while the card is in the field (called by the dialogue once the card
/// has been read under MAC): settle an earlier torn debit, the blocklist, the fare, the
/// balance, room in the outbox, the debit journalled as pending — then apply or refuse.
struct Decider<'a> {
    journal: &'a Journal,
    blocklist: &'a Blocklist,
    engine: &'a Engine,
    priced: &'a Priced,
    operator: &'a str,
    device_key: &'a purse::crypto::AesKey,
    meta_base: TapMeta,
    now_ms: u64,
    time_s: u32,
    hook: &'a mut dyn FnMut(Step),
    verdict: Verdict,
    settled: Settled,
}

impl Decider<'_> {
    fn decide(&mut self, snap: &txn::CardSnapshot) -> Decision {
        (self.hook)(Step::Read);
        match self.apply(snap) {
            Ok(decision) => decision,
            Err(verdict) => {
                self.verdict = verdict;
                Decision::Refuse
            }
        }
    }

    /// The debit to apply, or why not.
    fn apply(&mut self, snap: &txn::CardSnapshot) -> Result<Decision, Verdict> {
        self.settle_pickup(snap)?;
        self.settle_earlier(snap)?;
        if self.blocklist.is_blocked(&snap.uid()) {
            return Err(Verdict::Refuse(RefusalReason::Blocklisted));
        }
        let q = self.quote(snap)?;
        if q.repeat {
            return Err(Verdict::Repeat);
        }
        if i64::from(q.fare_minor) > i64::from(snap.balance_minor()) {
            return Err(Verdict::Refuse(RefusalReason::InsufficientValue));
        }
        let kind = if q.fare_minor > 0 {
            TxKind::Debit
        } else {
            TxKind::RecordOnly
        };
        // A settlement may have taken the outbox's last place: no room, no debit.
        match self.journal.outbox_full() {
            Ok(false) => {}
            Ok(true) => return Err(Verdict::Refuse(RefusalReason::Other)),
            Err(e) => return Err(Verdict::Failed(e.into())),
        }
        let record = q.record.encode();
        let pending = PendingTap {
            change: PendingChange::new(snap, kind, q.fare_minor as i32),
            time_ms: self.now_ms,
            stop_code: self.meta_base.stop_id,
            route_code: self.meta_base.route_id,
            fare_table_version: self.meta_base.fare_table_version,
            blocklist_version: self.meta_base.blocklist_version,
            record,
        };
        if let Err(e) = self.journal.put_pending(&pending) {
            return Err(Verdict::Failed(e.into()));
        }
        (self.hook)(Step::PendingJournalled);
        self.verdict = Verdict::Apply {
            fare_minor: q.fare_minor,
            flags: tap_flags(&record),
        };
        Ok(Decision::Apply {
            amount_minor: q.fare_minor as i32,
            record: Some(record.to_vec()),
        })
    }

    /// An earlier torn debit on this card: its counter and trip record say what happened. A
    /// committed one is journalled as a signed tap now, one never committed is dropped, one
    /// committed but no longer provable here is kept as unresolved.
    fn settle_earlier(&mut self, snap: &txn::CardSnapshot) -> Result<(), Verdict> {
        let failed = |e: JournalError| Verdict::Failed(e.into());
        let uid = snap.uid();
        let Some(p) = self.journal.pending(&uid).map_err(failed)? else {
            return Ok(());
        };
        // Did *this* debit commit? Its trip record on the card says so: the counter alone
        // cannot tell it from another validator's transaction.
        let newest_is_ours = snap
            .records()
            .first()
            .is_some_and(|r| r[..] == p.record[..]);
        let ours_on_card = snap.records().iter().any(|r| r[..] == p.record[..]);
        if snap.tmc() == p.change.tmc_before.wrapping_add(1) && newest_is_ours {
            let Ok(Settlement::Committed(settled)) = txn::settle(&p.change, snap) else {
                return Err(Verdict::Refuse(RefusalReason::TornUnresolved));
            };
            let meta = TapMeta {
                device_time_ms: p.time_ms,
                stop_id: p.stop_code,
                route_id: p.route_code,
                fare_table_version: p.fare_table_version,
                blocklist_version: p.blocklist_version,
                ..self.meta_base
            };
            let (operator, device_key) = (self.operator, self.device_key);
            let flags = tap_flags(&p.record);
            let seq = self
                .journal
                .append_tap(Some(&uid), |seq| {
                    let meta = TapMeta {
                        device_seq: seq,
                        ..meta
                    };
                    TapRecord::settled(&settled, meta)
                        .with_flags(flags)
                        .sign(operator, device_key)
                })
                .map_err(failed)?;
            self.settled = Settled::Committed { seq };
        } else if !ours_on_card {
            // Never committed: any counter steps since are other transactions.
            self.journal.clear_pending(&uid).map_err(failed)?;
            self.settled = Settled::NotCommitted;
        } else {
            // Committed, but the card has transacted since: its MAC for that transaction is
            // gone, so this validator cannot prove it. Kept for the back office (the card's
            // counter chain shows the step), never dropped.
            tracing::warn!(device = self.meta_base.device_id,
                card = %purse::tap::masked_uid(&uid), tmc = p.change.tmc_before + 1,
                "a torn debit committed but can no longer be proved here; kept as unresolved");
            self.journal.resolve_unprovable(&p).map_err(failed)?;
            self.settled = Settled::Unprovable;
        }
        Ok(())
    }

    /// An earlier torn pick-up on this card, settled as a torn debit is: its pick-up record
    /// newest on the card one counter step later → committed, journalled as the credit's tap
    /// and the order applied; not on the card → never committed, dropped (the order is not
    /// applied here; this SAM authorised it once and will not again, another validator may);
    /// on the card but no longer provable here → the order applied, the change kept with the
    /// unresolved ones for the back office.
    fn settle_pickup(&mut self, snap: &txn::CardSnapshot) -> Result<(), Verdict> {
        let failed = |e: JournalError| Verdict::Failed(e.into());
        let uid = snap.uid();
        let Some(p) = self.journal.pending_pickup(&uid).map_err(failed)? else {
            return Ok(());
        };
        let rec = &p.tap.record;
        let newest_is_ours = snap.records().first().is_some_and(|r| r[..] == rec[..]);
        let ours_on_card = snap.records().iter().any(|r| r[..] == rec[..]);
        if snap.tmc() == p.tap.change.tmc_before.wrapping_add(1) && newest_is_ours {
            let Ok(Settlement::Committed(settled)) = txn::settle(&p.tap.change, snap) else {
                return Err(Verdict::Refuse(RefusalReason::TornUnresolved));
            };
            let meta = TapMeta {
                device_time_ms: p.tap.time_ms,
                stop_id: p.tap.stop_code,
                route_id: p.tap.route_code,
                fare_table_version: p.tap.fare_table_version,
                blocklist_version: p.tap.blocklist_version,
                ..self.meta_base
            };
            let (operator, device_key) = (self.operator, self.device_key);
            self.journal
                .append_pickup(&uid, p.order_id, p.expires_s, |seq| {
                    let meta = TapMeta {
                        device_seq: seq,
                        ..meta
                    };
                    TapRecord::settled(&settled, meta).sign(operator, device_key)
                })
                .map_err(failed)?;
        } else if !ours_on_card {
            self.journal.clear_pending_pickup(&uid).map_err(failed)?;
        } else {
            tracing::warn!(device = self.meta_base.device_id,
                card = %purse::tap::masked_uid(&uid), order = p.order_id,
                "a torn pick-up committed but can no longer be proved here; kept as unresolved");
            self.journal
                .mark_applied(p.order_id, p.expires_s, Some(&p))
                .map_err(failed)?;
        }
        Ok(())
    }

    /// The rider category the card was personalised with, in this fare table: `NONE` (the
    /// table's default) for a card with none, or with one the table does not distinguish — a
    /// table with no child fare charges a child card its default fare, never refuses it.
    fn rider_category(&self, snap: &txn::CardSnapshot) -> fare_rules::table::Idx {
        let Some(id) = snap.rider_category() else {
            return NONE;
        };
        self.engine.category(id).unwrap_or_else(|| {
            tracing::debug!(
                rider_category = id,
                "the fare table has no such rider category; its default applies"
            );
            NONE
        })
    }

    /// The fare (or the sale's price) from the card's trip records.
    fn quote(&self, snap: &txn::CardSnapshot) -> Result<TapQuote, Verdict> {
        let history: Vec<TripRecord> = snap
            .records()
            .iter()
            .filter_map(|r| TripRecord::decode(r).ok())
            .collect();
        let view = CardView {
            rider: Rider {
                category: self.rider_category(snap),
                medium: NONE,
            },
            history: &history,
            passes: &[],
        };
        let quoted = match self.priced {
            Priced::Tap(t) => self.engine.quote_tap(&view, t),
            Priced::Charge {
                code,
                items,
                minutes,
            } => self
                .engine
                .quote_charge(&view, *code, *items, *minutes, self.time_s),
        };
        quoted.map_err(|e| {
            tracing::warn!(error = %e, "fare quote failed");
            Verdict::Refuse(RefusalReason::FareError)
        })
    }
}

/// The order to pick up on card `uid`: its first live listed order this journal has not
/// applied.
fn next_order<'a>(
    journal: &Journal,
    actions: &'a ActionList,
    uid: &[u8; 7],
    now_s: u64,
) -> Result<Option<&'a actionlist::ListedOrder>, JournalError> {
    for o in actions.for_card(uid, now_s) {
        if !journal.order_applied(o.order().order_id)? {
            return Ok(Some(o));
        }
    }
    Ok(None)
}

/// What is journalled, before the card is touched, for picking up order `o` on the card read
/// as `snap`: the pending credit, with the pick-up record it writes on the card.
fn pending_pickup(
    snap: &txn::CardSnapshot,
    o: &actionlist::Order,
    now_ms: u64,
    meta: TapMeta,
) -> PendingPickup {
    let time_s = u32::try_from(now_ms / 1000).unwrap_or(u32::MAX);
    PendingPickup {
        tap: PendingTap {
            change: PendingChange::new(snap, TxKind::Credit, o.amount_minor),
            time_ms: now_ms,
            stop_code: meta.stop_id,
            route_code: meta.route_id,
            fare_table_version: meta.fare_table_version,
            blocklist_version: meta.blocklist_version,
            record: actionlist::pickup_record(o.order_id, o.amount_minor, time_s, meta.device_id),
        },
        order_id: o.order_id,
        expires_s: o.expires_s,
    }
}

/// Order `o` is on the card already: another validator applied it. When that pick-up is still
/// the card's last transaction (its validator may have lost the card mid-commit), the card's
/// TMV is still its proof: journalled here too, so clearing completes the order whatever became
/// of the other validator (a duplicate there is one tap by counter). Otherwise the order is
/// only marked applied.
fn journal_applied_elsewhere(
    journal: &Journal,
    snap: &txn::CardSnapshot,
    o: &actionlist::Order,
    meta: TapMeta,
    operator: &str,
    device_key: &purse::crypto::AesKey,
) -> Result<(), JournalError> {
    let last = snap
        .records()
        .first()
        .and_then(|r| actionlist::order_on_record(r));
    if last != Some(o.order_id) {
        return journal.mark_applied(o.order_id, o.expires_s, None);
    }
    let change = PendingChange {
        uid: snap.uid(),
        tmc_before: snap.tmc().wrapping_sub(1),
        balance_before_minor: snap.balance_minor().wrapping_sub(o.amount_minor),
        kind: TxKind::Credit,
        amount_minor: o.amount_minor,
        key_version: snap.key_version(),
    };
    match txn::settle(&change, snap) {
        Ok(Settlement::Committed(settled)) => journal
            .append_pickup(&snap.uid(), o.order_id, o.expires_s, |seq| {
                TapRecord::settled(
                    &settled,
                    TapMeta {
                        device_seq: seq,
                        ..meta
                    },
                )
                .sign(operator, device_key)
            })
            .map(|_| ()),
        _ => journal.mark_applied(o.order_id, o.expires_s, None),
    }
}
