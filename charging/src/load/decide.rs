//! The decision before any Credit leaves the server: the card's state, limits (per card, per source, per instrument), the funding authorisation and the intent, durable first.

use super::attempts::{claim_attempt, mark_attempt, taken_attempt};
use super::*;
use crate::ledger::postgres::read_committed;
use crate::ledger::{CardShadow, FundingDay};

/// What the transaction recording a load's intent did.
enum Recorded {
    /// Recorded.
    Done,
    /// The instrument's day total would pass its limit (what was loaded so far).
    OverLimit(i64),
    /// Another attempt with the idempotency key is completed or open.
    Taken(Box<LoadIntent>),
    /// The card, read again in the transaction, is not to be loaded now: blocked, or its
    /// counter seen beyond the card's (its shadow, for [`LoadService::card_refusal`]).
    CardRefused(Box<CardShadow>),
    /// The card's loads of the day, read again in the transaction, leave no room for this one
    /// (what was loaded so far): another load of the card recorded since the read-ahead.
    CardDayLimit(i64),
}

/// What a step's decision reads ([`LoadService::read_ahead`]).
struct Ahead {
    /// The earlier attempt with the session's key, if asked for and in the ledger.
    earlier: Option<LoadIntent>,
    /// The card's open intents (settled before the decision).
    open: Vec<LoadIntent>,
    /// Whether there were any (then the rest is read again after they are settled).
    settled_some: bool,
    /// The card's shadow.
    shadow: CardShadow,
    /// A load's instrument's total today (0 for another purpose).
    instrument_today: i64,
}

impl LoadService {
    /// Checks the ledger and limits, authorises funding and records the intent.
    /// Returns the decision, or a final refusal.
    /// At `Step::Decide`: older intents settled from the card's snapshot, the card's state and
    /// the limits checked, the funding authorised and the intent durable — or a refusal.
    pub(super) async fn decide(
        &self,
        s: &mut Session,
        snap: &CardSnapshot,
        now_ms: u64,
    ) -> Result<Result<Decision, Reply>, LoadError> {
        // An attempt with this key on another server (or before a restart) is resolved by the
        // card first: never a second load for one key. What the decision reads is read in one go
        // (`read_ahead`); the card's open intents, if any, are settled from its snapshot and the
        // shadow and day total read again after.
        let today = day_of(now_ms);
        let mut ahead = self.read_ahead(s, &snap.uid(), today, true)?;
        let earlier = ahead.earlier.take();
        if !ahead.open.is_empty() {
            self.settle_open(snap, std::mem::take(&mut ahead.open), now_ms)?;
        }
        if let Some(earlier) = &earlier {
            if let Some(answer) = self.after_earlier(s, earlier)? {
                return Ok(Err(answer));
            }
        }
        if ahead.settled_some {
            ahead = self.read_ahead(s, &snap.uid(), today, false)?;
        }
        let Ahead {
            shadow,
            instrument_today,
            ..
        } = ahead;
        if let Some(refusal) = self.card_refusal(s, snap, &shadow) {
            return Ok(Err(refusal));
        }
        match s.purpose.clone() {
            Purpose::Load => {}
            Purpose::Reversal(load_tmc) => return self.decide_reversal(s, snap, load_tmc, now_ms),
            Purpose::Payment(id) => return self.decide_payment(s, snap, &id, now_ms),
            Purpose::Refund(id) => return self.decide_refund(s, snap, &id, now_ms),
        }
        if let Some(refusal) = self.limit_refusal(s, snap, &shadow, today, instrument_today) {
            return Ok(Err(refusal));
        }
        let source = self.sources[&s.request.funding_source].clone();
        // Unique per session (a retry inside the session reuses it; two racing sessions never
        // share an authorisation).
        let reference = format!(
            "load:{}:{}:{}",
            hex::encode_upper(snap.uid()),
            snap.tmc() + 1,
            s.id
        );
        let req = FundingRequest {
            amount_minor: i64::from(s.request.amount_minor),
            reference: &reference,
            instrument: &s.request.instrument,
        };
        let auth = funding_call(&*source, || match source.authorise(&req) {
            Err(FundingError::Timeout) => source.authorise(&req), // same reference: safe
            other => other,
        });
        let auth = match auth {
            Ok(a) => a,
            Err(e) => return Ok(Err(self.refused(s, "funding_declined", &e.to_string()))),
        };
        self.record_intent(s, snap, &*source, auth, now_ms).await
    }

    /// What a step's decision reads, each the latest committed (what it decides is checked
    /// again in [`Self::record_intent`]'s transaction: the key, the instrument's day total,
    /// one intent per counter): with `earlier`, the earlier attempt with the session's key
    /// too ([`LoadService::earlier_attempt`]).
    fn read_ahead(
        &self,
        s: &Session,
        uid: &[u8; 7],
        today: u64,
        earlier: bool,
    ) -> Result<Ahead, LoadError> {
        let r = self.ledger.read_latest()?;
        // All of it in one round trip where a read costs one (PostgreSQL).
        let load = s.purpose == Purpose::Load;
        r.look_up(&crate::ledger::Lookups {
            keys: match earlier && load {
                true => vec![super::attempts::attempt_key(&s.idem)],
                false => vec![],
            },
            cards: vec![*uid],
            open_intents: vec![*uid],
            funding_days: match load {
                true => vec![(
                    s.request.funding_source.clone(),
                    s.request.instrument.clone(),
                    today,
                )],
                false => vec![],
            },
            ..Default::default()
        })?;
        let earlier = match earlier {
            true => self.earlier_attempt(&*r, s)?,
            false => None,
        };
        let open = r.open_intents(uid)?;
        let shadow = r.card(uid)?;
        let instrument_today = if s.purpose == Purpose::Load {
            let key = FundingDay::new(&s.request.funding_source, &s.request.instrument, today);
            r.funding_day_total(key)?
        } else {
            0
        };
        Ok(Ahead {
            earlier,
            settled_some: !open.is_empty(),
            open,
            shadow,
            instrument_today,
        })
    }

    /// A card the back office will not load: blocked, or a counter behind what was seen (a
    /// restored or cloned card).
    fn card_refusal(&self, s: &Session, snap: &CardSnapshot, shadow: &CardShadow) -> Option<Reply> {
        if shadow.blocked {
            return Some(self.refused(
                s,
                "card_blocked",
                shadow.block_reason.as_deref().unwrap_or("blocked"),
            ));
        }
        if snap.tmc() < shadow.last_tmc {
            return Some(self.refused(
                s,
                "counter_behind",
                &format!(
                    "card reports counter {} but {} was already seen: a restored or cloned card",
                    snap.tmc(),
                    shadow.last_tmc
                ),
            ));
        }
        None
    }

    /// The load's limits: the balance ceiling, the card's daily limit and the instrument's
    /// daily limit (`instrument_today`, read in the step's snapshot; checked again where it is
    /// raised, in [`Self::record_intent`]).
    fn limit_refusal(
        &self,
        s: &Session,
        snap: &CardSnapshot,
        shadow: &CardShadow,
        today: u64,
        instrument_today: i64,
    ) -> Option<Reply> {
        let amount = s.request.amount_minor;
        if i64::from(snap.balance_minor()) + i64::from(amount)
            > i64::from(self.cfg.balance_ceiling_minor)
        {
            return Some(self.refused(
                s,
                "balance_ceiling",
                &format!(
                    "balance {} + {} would exceed the ceiling of {}",
                    snap.balance_minor(),
                    amount,
                    self.cfg.balance_ceiling_minor
                ),
            ));
        }
        let loaded_today = loaded_on(shadow, today);
        if loaded_today + i64::from(amount) > self.cfg.max_daily_per_card_minor {
            return Some(self.card_day_limit(s, loaded_today));
        }
        let max_daily = self.cfg.max_daily_for(&s.request.funding_source);
        if instrument_today + i64::from(amount) > max_daily {
            return Some(self.instrument_limit(s, instrument_today, max_daily));
        }
        None
    }

    /// Makes the authorised load's intent durable before any Credit leaves the server (group
    /// commit: shared fsync), raising the instrument's day total where it is checked again (two
    /// cards loading from one instrument at once); voids the authorisation if it cannot. On
    /// PostgreSQL the transaction runs at `READ COMMITTED` under the locking rule
    /// ([`crate::ledger::postgres::read_committed`]): the card's row is locked first, and a
    /// block committed since the step's read-ahead refuses the load here.
    async fn record_intent(
        &self,
        s: &mut Session,
        snap: &CardSnapshot,
        source: &dyn FundingSource,
        auth: String,
        now_ms: u64,
    ) -> Result<Result<Decision, Reply>, LoadError> {
        let (uid, amount, today) = (snap.uid(), s.request.amount_minor, day_of(now_ms));
        let source_name = s.request.funding_source.clone();
        let instrument = s.request.instrument.clone();
        let max_daily = self.cfg.max_daily_for(&source_name);
        let max_card_daily = self.cfg.max_daily_per_card_minor;
        let mut intent = LoadIntent {
            uid: hex::encode_upper(uid),
            tmc_before: snap.tmc(),
            attempt: 0,
            balance_before_minor: snap.balance_minor(),
            amount_minor: amount,
            key_version: snap.key_version(),
            funding_source: source_name.clone(),
            funding_auth: auth.clone(),
            instrument: instrument.clone(),
            idempotency_key: s.request.idempotency_key.clone(),
            requested_by: s.caller.clone(),
            state: IntentState::Authorised,
            created_ms: now_ms,
            settled_ms: None,
            kind: IntentKind::Load,
            reverses_tmc: None,
            reversed_at_tmc: None,
            payment_id: None,
        };
        let record = intent_record(&intent).to_vec();
        let snapshot = snap.clone();
        let claimant = s.claimant();
        let recorded = self.ledger.transact_async(read_committed(move |t| {
            // The card first (on PostgreSQL its row locked until the commit: a block, a
            // reversal, a completion or a clearing booking of this card waits or retries),
            // checked again: a block committed since the read-ahead refuses the load.
            let shadow = t.card(&uid)?;
            if shadow.blocked || snapshot.tmc() < shadow.last_tmc {
                return Ok(Recorded::CardRefused(Box::new(shadow)));
            }
            // The idempotency key is claimed in the same transaction: of two servers starting
            // one key at once, the database lets one record its intent (looked at before the
            // limits, which the other's load may have raised).
            // A key never used is claimed by inserting its marker (nothing read first); a
            // marker found is read, and taken over only when its attempt was voided.
            if !claim_attempt(t, &claimant, &intent)? {
                if let Some(earlier) = taken_attempt(t, &claimant)? {
                    return Ok(Recorded::Taken(earlier));
                }
                mark_attempt(t, &claimant, &intent)?;
            }
            // The card's daily limit checked again on the shadow locked above (the read-ahead's
            // may miss a load of the card recorded since: a clone at another counter).
            let loaded_today = loaded_on(&shadow, today);
            if loaded_today + i64::from(amount) > max_card_daily {
                return Ok(Recorded::CardDayLimit(loaded_today));
            }
            // Raised only within the limit, in one step (a marker claimed by a load refused
            // here points at no intent of its key: the key's next start loads afresh).
            let day = FundingDay::new(&source_name, &instrument, today);
            if let Err(so_far) = t.add_funding_day_within(day, i64::from(amount), max_daily)? {
                return Ok(Recorded::OverLimit(so_far));
            }
            t.insert_intent(&uid, &mut intent)?;
            t.observe_card(&snapshot)?;
            t.add_load_day(&uid, today, i64::from(amount))?;
            Ok(Recorded::Done)
        }));
        let recorded = recorded.await;
        let void = |auth: &str| funding_call(source, || source.void(auth));
        match recorded {
            Ok(Recorded::Done) => {}
            Ok(Recorded::OverLimit(so_far)) => {
                let _ = void(&auth);
                return Ok(Err(self.instrument_limit(s, so_far, max_daily)));
            }
            Ok(Recorded::Taken(earlier)) => {
                let _ = void(&auth);
                return self.taken_answer(s, &earlier).map(Err);
            }
            Ok(Recorded::CardDayLimit(so_far)) => {
                let _ = void(&auth);
                return Ok(Err(self.card_day_limit(s, so_far)));
            }
            Ok(Recorded::CardRefused(shadow)) => {
                let _ = void(&auth);
                let refusal = self.card_refusal(s, snap, &shadow);
                return Ok(Err(refusal.unwrap_or_else(|| {
                    self.refused(s, "card_blocked", "the card changed meanwhile")
                })));
            }
            Err(LedgerError::IntentExists { .. }) => {
                let _ = void(&auth);
                return Ok(Err(self.refused(
                    s,
                    "load_in_progress",
                    "another load for this card at this counter is in progress",
                )));
            }
            Err(e) => {
                // No intent, so no Credit will be sent: release the funds now (nothing else
                // would — settlement only knows intents in the ledger).
                if let Err(ve) = void(&auth) {
                    tracing::error!(%ve, auth, source = %s.request.funding_source, "the intent could not be written and its authorisation could not be voided; void it at the source");
                }
                return Err(e.into());
            }
        }
        s.intent_recorded = true;
        Ok(Ok(Decision::Apply {
            amount_minor: amount,
            record: Some(record),
        }))
    }

    /// The card's daily limit refusal (`loaded_today`: what the card loaded today so far).
    fn card_day_limit(&self, s: &Session, loaded_today: i64) -> Reply {
        self.refused(
            s,
            "daily_limit",
            &format!(
                "{loaded_today} already loaded today; the daily limit is {}",
                self.cfg.max_daily_per_card_minor
            ),
        )
    }

    pub(super) fn instrument_limit(&self, s: &Session, so_far: i64, max: i64) -> Reply {
        self.refused(
            s,
            "instrument_daily_limit",
            &format!(
                "{so_far} already loaded today from this {} instrument; its daily limit is {max}",
                s.request.funding_source
            ),
        )
    }

    /// A load may be funded only from an instrument of the caller's own: a well-formed id,
    /// registered to the caller (card tokens, points memberships); bearer instruments
    /// (voucher codes) only need to be well-formed.
    pub(super) fn check_instrument(
        &self,
        caller: &str,
        source: &dyn FundingSource,
        instrument: &str,
    ) -> Result<(), LoadError> {
        let owner = {
            let r = self.ledger.read()?;
            instrument_of(&*r, source, instrument)?
        };
        self.check_owned(caller, source, instrument, owner)
    }

    /// [`Self::check_instrument`] with what [`instrument_of`] read.
    pub(super) fn check_owned(
        &self,
        caller: &str,
        source: &dyn FundingSource,
        instrument: &str,
        owner: Option<crate::ledger::Instrument>,
    ) -> Result<(), LoadError> {
        if !crate::funding::valid_instrument_id(instrument) {
            return Err(LoadError::BadRequest(format!(
                "funding.instrument must be 1 to {} letters, digits, '-', '_' or '.' (not starting with '.')",
                crate::funding::MAX_INSTRUMENT_ID_LEN
            )));
        }
        if source.holding() == Holding::Bearer {
            return Ok(());
        }
        match owner {
            Some(i) if i.owner == caller => Ok(()),
            _ => Err(LoadError::NotYourInstrument {
                source_name: source.name().to_string(),
                instrument: instrument.to_string(),
            }),
        }
    }

    /// Registers instrument `id` of `source` to `caller`'s account (a card-processor token).
    /// Returns whether it is new (false: it was already the caller's). Points memberships are
    /// linked by their programme ([`crate::funding::PointsProgram::earn`]); voucher codes are
    /// bearer instruments and are not registered.
    pub fn register_instrument(
        &self,
        caller: &str,
        source_name: &str,
        id: &str,
        now_ms: u64,
    ) -> Result<bool, LoadError> {
        let source = self.sources.get(source_name).ok_or_else(|| {
            LoadError::BadRequest(format!(
                "unknown funding source {source_name:?}; available: {}",
                self.source_names().join(", ")
            ))
        })?;
        match source.holding() {
            Holding::SelfRegistered => {}
            Holding::LinkedByProgramme => {
                return Err(LoadError::BadRequest(format!(
                    "{source_name} memberships are linked to accounts by the programme (partner API), not registered by holders"
                )))
            }
            Holding::Bearer => {
                return Err(LoadError::BadRequest(format!(
                    "{source_name} instruments are bearer codes: nothing to register"
                )))
            }
        }
        if !crate::funding::valid_instrument_id(id) {
            return Err(LoadError::BadRequest(format!(
                "instrument must be 1 to {} letters, digits, '-', '_' or '.' (not starting with '.')",
                crate::funding::MAX_INSTRUMENT_ID_LEN
            )));
        }
        if !crate::funding::valid_account_name(caller) {
            return Err(LoadError::BadRequest(format!(
                "account {caller:?} cannot hold instruments (its name must be letters, digits, '-', '_' or '.')"
            )));
        }
        source
            .check_instrument(id)
            .map_err(|e| LoadError::BadRequest(e.to_string()))?;
        let (source_name, id, caller) =
            (source_name.to_string(), id.to_string(), caller.to_string());
        let taken = format!("{source_name}:{id} is registered to another account");
        self.ledger
            .transact(move |t| match t.instrument(&source_name, &id)? {
                Some(i) if i.owner == caller => Ok(Ok(false)),
                Some(_) => Ok(Err(LoadError::InstrumentTaken(taken.clone()))),
                None => {
                    t.put_instrument(&crate::ledger::Instrument {
                        source: source_name.clone(),
                        id: id.clone(),
                        owner: caller.clone(),
                        registered_by: caller.clone(),
                        registered_ms: now_ms,
                    })?;
                    Ok(Ok(true))
                }
            })?
    }

    /// The points programme called `name`, if it is one of the funding sources.
    pub fn points_program(&self, name: &str) -> Option<&crate::funding::PointsProgram> {
        self.sources.get(name).and_then(|s| s.as_points())
    }
}

/// The registration of `instrument` at `source` that [`LoadService::check_owned`] checks, read
/// in `r` (none read for a bearer source or an id that is not well-formed).
pub(super) fn instrument_of(
    r: &dyn crate::ledger::LedgerRead,
    source: &dyn FundingSource,
    instrument: &str,
) -> Result<Option<crate::ledger::Instrument>, LedgerError> {
    if source.holding() == Holding::Bearer || !crate::funding::valid_instrument_id(instrument) {
        return Ok(None);
    }
    r.instrument(source.name(), instrument)
}

/// Runs `f`, a call to funding source `source`: through [`crate::ledger::may_block`] when the
/// source waits for a remote system ([`FundingSource::waits`]), on the caller's thread when
/// it does not.
pub(super) fn funding_call<R>(source: &dyn FundingSource, f: impl FnOnce() -> R) -> R {
    if source.waits() {
        crate::ledger::may_block(f)
    } else {
        f()
    }
}

/// What the card loaded on UTC day `today` by its shadow (0 when its count is of another day).
fn loaded_on(shadow: &CardShadow, today: u64) -> i64 {
    if shadow.load_day == today {
        shadow.load_day_minor
    } else {
        0
    }
}
