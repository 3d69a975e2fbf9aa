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

use crate::journal::{Journal, JournalError, PendingTap};
use fare_rules::engine::{CardView, Engine, Rider, Tap};
use fare_rules::record::{TapKind, TripRecord};
use fare_rules::table::NONE;
use purse::blocklist::Blocklist;
use purse::receipt::TxKind;
use purse::sam::{Sam, SoftwareSam};
use purse::tap::{RefusalReason, TapMeta, TapRecord, TAP_LEN};
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
        journal: &Journal,
        reason: RefusalReason,
        uid: [u8; 7],
        snap: Option<(u8, u32, i32)>,
        now_ms: u64,
        codes: (u32, u32),
    ) -> Result<Answer, GateError> {
        let (kv, tmc, bal) = snap.unwrap_or((0, 0, 0));
        let seq = match journal.append_tap(None, |seq| {
            let rec = TapRecord::refused(
                reason,
                uid,
                kv,
                tmc,
                bal,
                self.meta(seq, now_ms, codes.0, codes.1),
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

    fn transact(
        &mut self,
        card: &mut dyn Transport,
        journal: &Journal,
        now_ms: u64,
        sale: Option<&Sale>,
        hook: &mut dyn FnMut(Step),
    ) -> Result<TapOutcome, GateError> {
        let engine = self.engine.as_ref().ok_or(GateError::NoFareTable)?;
        let version = engine.table().meta.version;
        let time_s = local_s(now_ms, self.placement.utc_offset_s);
        // What is priced: a transit tap here, or a sale (its charge code in the route field).
        enum Priced {
            Tap(Tap),
            Charge { code: u16, items: u32, minutes: u32 },
        }
        let (codes, priced) = match sale {
            None => {
                let stop =
                    engine
                        .stop(&self.placement.stop)
                        .ok_or_else(|| GateError::Placement {
                            what: "stop",
                            id: self.placement.stop.clone(),
                            version,
                        })?;
                let route =
                    engine
                        .route(&self.placement.route)
                        .ok_or_else(|| GateError::Placement {
                            what: "route",
                            id: self.placement.route.clone(),
                            version,
                        })?;
                (
                    (
                        engine.table().stops[stop as usize].code,
                        engine.table().routes[route as usize].code,
                    ),
                    Priced::Tap(Tap {
                        kind: self.placement.kind,
                        time_s,
                        route,
                        stop,
                    }),
                )
            }
            Some(sale) => {
                let c = engine
                    .table()
                    .charges
                    .iter()
                    .find(|c| c.id == sale.charge)
                    .ok_or_else(|| GateError::Placement {
                        what: "charge",
                        id: sale.charge.clone(),
                        version,
                    })?;
                (
                    (0, u32::from(c.code)),
                    Priced::Charge {
                        code: c.code,
                        items: sale.items,
                        minutes: sale.minutes,
                    },
                )
            }
        };
        let uid = match card.card_uid() {
            Ok(u) => u,
            Err(_) => {
                return Ok(TapOutcome {
                    answer: Answer::Torn,
                    uid: None,
                    settled: Settled::None,
                })
            }
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

        // What the decision closure found out, for after the dialogue.
        enum Verdict {
            Undecided,
            Repeat,
            Refuse(RefusalReason),
            Apply { fare_minor: u32 },
            Failed(GateError),
        }
        let mut verdict = Verdict::Undecided;
        let mut settled = Settled::None;
        let blocklist = &self.blocklist;
        let meta_base = self.meta(0, now_ms, codes.0, codes.1);
        // The SAM is busy with the card during the dialogue; a settled earlier debit is signed
        // with a copy of the device key that lives for this tap only (zeroized on drop).
        let device_key = self.sam.device_key().clone();
        let operator = self.placement.operator.as_str();
        let sign = |rec: &TapRecord| rec.sign(operator, &device_key);
        let decide = |snap: &txn::CardSnapshot| -> Decision {
            hook(Step::Read);
            // An earlier torn debit on this card: its counter says what happened.
            match journal.pending(&snap.uid()) {
                Err(e) => {
                    verdict = Verdict::Failed(e.into());
                    return Decision::Refuse;
                }
                Ok(Some(p)) => {
                    // Did *this* debit commit? Its trip record on the card says so: the counter
                    // alone cannot tell it from another validator's transaction.
                    let newest_is_ours = snap
                        .records()
                        .first()
                        .is_some_and(|r| r[..] == p.record[..]);
                    let ours_on_card = snap.records().iter().any(|r| r[..] == p.record[..]);
                    if snap.tmc() == p.change.tmc_before.wrapping_add(1) && newest_is_ours {
                        let Ok(Settlement::Committed(receipt)) = txn::settle(&p.change, snap)
                        else {
                            verdict = Verdict::Refuse(RefusalReason::TornUnresolved);
                            return Decision::Refuse;
                        };
                        let meta = TapMeta {
                            device_time_ms: p.time_ms,
                            stop_id: p.stop_code,
                            route_id: p.route_code,
                            fare_table_version: p.fare_table_version,
                            blocklist_version: p.blocklist_version,
                            ..meta_base
                        };
                        match journal.append_tap(Some(&snap.uid()), |seq| {
                            sign(&TapRecord::settled(
                                &receipt,
                                TapMeta {
                                    device_seq: seq,
                                    ..meta
                                },
                            ))
                        }) {
                            Ok(seq) => settled = Settled::Committed { seq },
                            Err(e) => {
                                verdict = Verdict::Failed(e.into());
                                return Decision::Refuse;
                            }
                        }
                    } else if !ours_on_card {
                        // Never committed: any counter steps since are other transactions.
                        if let Err(e) = journal.clear_pending(&snap.uid()) {
                            verdict = Verdict::Failed(e.into());
                            return Decision::Refuse;
                        }
                        settled = Settled::NotCommitted;
                    } else {
                        // Committed, but the card has transacted since: its MAC for that
                        // transaction is gone, so this validator cannot prove it. Kept for the
                        // back office (the card's counter chain shows the step), never dropped.
                        tracing::warn!(uid = ?snap.uid(), tmc = p.change.tmc_before + 1,
                            "a torn debit committed but can no longer be proved here; kept as unresolved");
                        if let Err(e) = journal.resolve_unprovable(&p) {
                            verdict = Verdict::Failed(e.into());
                            return Decision::Refuse;
                        }
                        settled = Settled::Unprovable;
                    }
                }
                Ok(None) => {}
            }
            if blocklist.is_blocked(&snap.uid()) {
                verdict = Verdict::Refuse(RefusalReason::Blocklisted);
                return Decision::Refuse;
            }
            let history: Vec<TripRecord> = snap
                .records()
                .iter()
                .filter_map(|r| TripRecord::decode(r).ok())
                .collect();
            let view = CardView {
                rider: Rider {
                    category: NONE,
                    medium: NONE,
                },
                history: &history,
                passes: &[],
            };
            let quoted = match &priced {
                Priced::Tap(t) => engine.quote_tap(&view, t),
                Priced::Charge {
                    code,
                    items,
                    minutes,
                } => engine.quote_charge(&view, *code, *items, *minutes, time_s),
            };
            let q = match quoted {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(error = %e, "fare quote failed");
                    verdict = Verdict::Refuse(RefusalReason::FareError);
                    return Decision::Refuse;
                }
            };
            if q.repeat {
                verdict = Verdict::Repeat;
                return Decision::Refuse;
            }
            if i64::from(q.fare_minor) > i64::from(snap.balance_minor()) {
                verdict = Verdict::Refuse(RefusalReason::InsufficientValue);
                return Decision::Refuse;
            }
            let kind = if q.fare_minor > 0 {
                TxKind::Debit
            } else {
                TxKind::RecordOnly
            };
            // A settlement may have taken the outbox's last place: no room, no debit.
            match journal.outbox_full() {
                Ok(false) => {}
                Ok(true) => {
                    verdict = Verdict::Refuse(RefusalReason::Other);
                    return Decision::Refuse;
                }
                Err(e) => {
                    verdict = Verdict::Failed(e.into());
                    return Decision::Refuse;
                }
            }
            let record = q.record.encode();
            let pending = PendingTap {
                change: PendingChange::new(snap, kind, q.fare_minor as i32),
                time_ms: now_ms,
                stop_code: codes.0,
                route_code: codes.1,
                fare_table_version: meta_base.fare_table_version,
                blocklist_version: meta_base.blocklist_version,
                record,
            };
            if let Err(e) = journal.put_pending(&pending) {
                verdict = Verdict::Failed(e.into());
                return Decision::Refuse;
            }
            hook(Step::PendingJournalled);
            verdict = Verdict::Apply {
                fare_minor: q.fare_minor,
            };
            Decision::Apply {
                amount_minor: q.fare_minor as i32,
                record: Some(record.to_vec()),
            }
        };
        let out = txn::debit(card, &mut self.sam, &mut self.rng, decide);
        let verdict = verdict;
        match out {
            Ok(Outcome::Committed { receipt, .. }) => {
                hook(Step::Committed);
                let fare_minor = match verdict {
                    Verdict::Apply { fare_minor } => fare_minor,
                    _ => receipt.amount_minor().max(0) as u32,
                };
                let meta = self.meta(0, now_ms, codes.0, codes.1);
                let seq = journal.append_tap(Some(&uid), |seq| {
                    self.sign(&TapRecord::accepted(
                        &receipt,
                        TapMeta {
                            device_seq: seq,
                            ..meta
                        },
                    ))
                })?;
                hook(Step::Journalled);
                Ok(TapOutcome {
                    answer: Answer::Accepted {
                        fare_minor,
                        balance_minor: receipt.balance_after_minor(),
                        seq,
                    },
                    uid: Some(uid),
                    settled,
                })
            }
            Ok(Outcome::Refused { snapshot }) => {
                let reason = match verdict {
                    Verdict::Repeat => {
                        return Ok(TapOutcome {
                            answer: Answer::Repeat,
                            uid: Some(uid),
                            settled,
                        })
                    }
                    Verdict::Failed(e) => return Err(e),
                    Verdict::Refuse(r) => r,
                    _ => RefusalReason::Other,
                };
                let answer = self.refuse(
                    journal,
                    reason,
                    uid,
                    Some((
                        snapshot.key_version(),
                        snapshot.tmc(),
                        snapshot.balance_minor(),
                    )),
                    now_ms,
                    codes,
                )?;
                Ok(TapOutcome {
                    answer,
                    uid: Some(uid),
                    settled,
                })
            }
            Err(TxError::Transport(_)) => Ok(TapOutcome {
                // The pending entry (if it was written) stays until the card's next tap.
                answer: Answer::Torn,
                uid: Some(uid),
                settled,
            }),
            Err(e) => {
                let reason = match e {
                    TxError::UnknownKeyVersion(_) => RefusalReason::UnknownKeyVersion,
                    _ => RefusalReason::CardError,
                };
                // A dialogue that failed after the pending entry was written (a card that
                // refused its commit): the counter settles it at the next tap, as for a tear.
                let answer = self.refuse(journal, reason, uid, None, now_ms, codes)?;
                Ok(TapOutcome {
                    answer,
                    uid: Some(uid),
                    settled,
                })
            }
        }
    }
}
