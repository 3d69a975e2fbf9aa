//! The ledger's steps, written once for every backend: each reads and writes through the
//! storage primitives of [`LedgerWrite`] (a card's shadow, an intent, a payment, a refund, a gap
//! clock, a block change, a day total) and asks `ledger::rules` what to decide. The trait's
//! provided methods call them; a backend implements the primitives only.

use super::{Completion, LedgerOnly, LedgerWrite, NewPosting};
use crate::ledger::records::*;
use crate::ledger::rules::{self, GapAfterBooking, GapDecision, Settled, Voided};
use crate::ledger::LedgerError;

/// See [`LedgerWrite::observe_counter`].
pub(super) fn observe<W: LedgerWrite + ?Sized>(
    w: &mut W,
    uid: &[u8; 7],
    tmc: u32,
    balance_minor: i32,
) -> Result<CardShadow, LedgerError> {
    let mut c = w.card(uid)?;
    if tmc >= c.last_tmc {
        c.last_tmc = tmc;
        c.last_reported_balance_minor = Some(balance_minor);
        w.put_card(LedgerOnly(()), uid, &c)?;
    }
    Ok(c)
}

/// See [`LedgerWrite::book_counter`].
pub(super) fn book<W: LedgerWrite + ?Sized>(
    w: &mut W,
    uid: &[u8; 7],
    (tmc, balance_after_minor, delta_minor): (u32, i32, i64),
    now_ms: u64,
) -> Result<Booking, LedgerError> {
    let mut c = w.card(uid)?;
    let booking = c.book(tmc, balance_after_minor, delta_minor);
    if booking != Booking::Duplicate {
        w.put_card(LedgerOnly(()), uid, &c)?;
        match rules::gap_after_booking(&c, now_ms, || w.counter_gap(uid))? {
            GapAfterBooking::Filled { unblock } => {
                w.put_gap(LedgerOnly(()), uid, None)?;
                if unblock {
                    w.set_blocked(uid, false, rules::GAP_FILLED, now_ms)?;
                }
            }
            GapAfterBooking::Start(clock) => w.put_gap(LedgerOnly(()), uid, Some(&clock))?,
            GapAfterBooking::Keep => {}
        }
    }
    Ok(booking)
}

/// See [`LedgerWrite::set_blocked`].
pub(super) fn set_blocked<W: LedgerWrite + ?Sized>(
    w: &mut W,
    uid: &[u8; 7],
    blocked: bool,
    reason: &str,
    time_ms: u64,
) -> Result<Option<u64>, LedgerError> {
    let before = w.card(uid)?;
    if before.blocked == blocked {
        return Ok(None);
    }
    let c = CardShadow {
        blocked,
        block_reason: blocked.then(|| reason.to_string()),
        ..before.clone()
    };
    w.index_card(LedgerOnly(()), uid, &before, &c)?;
    w.put_card(LedgerOnly(()), uid, &c)?;
    let change = BlockChange {
        version: 0,
        card_uid: hex::encode_upper(uid),
        action: if blocked { "block" } else { "unblock" }.into(),
        reason: reason.to_string(),
        time_ms,
    };
    w.append_block_change(LedgerOnly(()), change).map(Some)
}

/// See [`LedgerWrite::sweep_gaps`].
pub(super) fn sweep_gaps<W: LedgerWrite + ?Sized>(
    w: &mut W,
    now_ms: u64,
    older_than_ms: u64,
) -> Result<GapSweep, LedgerError> {
    let due: Vec<_> = w
        .unreported_gaps()?
        .into_iter()
        .filter(|(_, clock)| now_ms.saturating_sub(clock.since_ms) >= older_than_ms)
        .collect();
    let mut sweep = GapSweep::default();
    for (uid, mut clock) in due {
        let c = w.card(&uid)?;
        let open = w.open_intents(&uid)?;
        let (anomaly, block) = match rules::gap_decision(&uid, &c, &open, clock.since_ms, now_ms) {
            GapDecision::Closed => {
                w.put_gap(LedgerOnly(()), &uid, None)?;
                continue;
            }
            GapDecision::Report { anomaly, block } => (anomaly, block),
        };
        w.record_anomaly(&anomaly)?;
        sweep.anomalies.push(anomaly);
        if block
            && w.set_blocked(&uid, true, GAP_BLOCK_REASON, now_ms)?
                .is_some()
        {
            sweep.cards_blocked += 1;
        }
        // Reported once; the clock restarts when the gap moves or a new one opens.
        clock.reported = true;
        w.put_gap(LedgerOnly(()), &uid, Some(&clock))?;
    }
    Ok(sweep)
}

/// See [`LedgerWrite::insert_intent`].
pub(super) fn insert_intent<W: LedgerWrite + ?Sized>(
    w: &mut W,
    uid: &[u8; 7],
    intent: &mut LoadIntent,
) -> Result<(), LedgerError> {
    // The counter's first intent, stored without a read when the backend can (the database's
    // unique keys refuse it if the counter has one).
    let first = LoadIntent {
        attempt: 0,
        ..intent.clone()
    };
    if w.put_first_intent(LedgerOnly(()), uid, &first)? {
        *intent = first;
        return Ok(());
    }
    let existing = w.intents_at(uid, intent.tmc_before)?;
    if existing.iter().any(|i| i.state != IntentState::Voided) {
        return Err(LedgerError::IntentExists {
            uid: hex::encode_upper(uid),
            tmc: intent.tmc_before,
        });
    }
    intent.attempt = u16::try_from(existing.len())
        .map_err(|_| LedgerError::InvalidPosting("too many attempts at one counter"))?;
    w.put_intent(LedgerOnly(()), uid, intent)
}

/// See [`LedgerWrite::add_funding_day`].
pub(super) fn add_funding_day<W: LedgerWrite + ?Sized>(
    w: &mut W,
    key: FundingDay<'_>,
    delta_minor: i64,
) -> Result<(), LedgerError> {
    let total = w
        .funding_day_total(key)?
        .checked_add(delta_minor)
        .ok_or(LedgerError::InvalidPosting("a day total would overflow"))?;
    w.put_funding_day(LedgerOnly(()), key, total)
}

/// See [`LedgerWrite::complete_intent`].
pub(super) fn complete_intent<W: LedgerWrite + ?Sized>(
    w: &mut W,
    proof: Completion<'_>,
    now_ms: u64,
) -> Result<Option<FundingAction>, LedgerError> {
    let (uid, tmc_before) = (proof.uid(), proof.tmc_before());
    if let Completion::Proved(v) = &proof {
        // The HSM proved *a* change at the intent's counter: it must be the intent's own
        // (its kind and amount), not another transaction that took that counter.
        let r = v.receipt();
        if let Some(intent) = w.intent(&uid, tmc_before)? {
            rules::check_proof(&intent, &uid, tmc_before, r.kind(), r.amount_minor())?;
        }
    }
    // A change below the counter clearing learned the card at is inside the balance the
    // card was issued with: its value moves against the float that funded that balance.
    let before_learned = match tmc_before.checked_add(1) {
        Some(tmc) => w.changed_before_learned(&uid, tmc)?,
        None => false,
    };
    let no_intent = || LedgerError::NoIntent {
        uid: hex::encode_upper(uid),
        tmc: tmc_before,
    };
    let mut intent = w.intent(&uid, tmc_before)?.ok_or_else(no_intent)?;
    if intent.state != IntentState::Authorised {
        return Ok(None); // completed already, or voided: never both
    }
    // A card at the last counter cannot commit another change: no intent completes there.
    let tmc = tmc_before.checked_add(1).ok_or_else(no_intent)?;
    let settled = match intent.kind {
        IntentKind::Load | IntentKind::Reversal => Settled::Funding,
        IntentKind::Refund => Settled::Refund(refund_credited(w, &intent, tmc, now_ms)?),
        IntentKind::Payment => Settled::Payment(payment_completed(w, &intent, tmc, now_ms)?),
    };
    let (m, action) = rules::complete(&mut intent, &uid, tmc, before_learned, settled, now_ms)?;
    let entry = NewPosting::new(now_ms, &m.from, &m.to, m.amount_minor, &m.reference);
    w.post_any(LedgerOnly(()), entry)?;
    w.put_intent(LedgerOnly(()), &uid, &intent)?;
    let balance_after_minor = proof.balance_after_minor();
    observe(w, &uid, tmc, balance_after_minor)?;
    let change = (tmc, balance_after_minor, intent.delta_minor());
    book(w, &uid, change, now_ms)?;
    Ok(Some(action))
}

/// See [`LedgerWrite::void_intent`].
pub(super) fn void_intent<W: LedgerWrite + ?Sized>(
    w: &mut W,
    uid: &[u8; 7],
    tmc_before: u32,
    now_ms: u64,
) -> Result<Option<FundingAction>, LedgerError> {
    let Some(mut intent) = w.intent(uid, tmc_before)? else {
        return Ok(None);
    };
    if intent.state != IntentState::Authorised {
        return Ok(None);
    }
    let voided = rules::void(&mut intent, now_ms);
    w.put_intent(LedgerOnly(()), uid, &intent)?;
    match voided {
        Voided::Load(day, amount_minor, action) => {
            let mut shadow = w.card(uid)?;
            if rules::give_back_load_day(&mut shadow, day, amount_minor) {
                w.put_card(LedgerOnly(()), uid, &shadow)?;
            }
            if !intent.instrument.is_empty() {
                let key = FundingDay::new(&intent.funding_source, &intent.instrument, day);
                add_funding_day(w, key, -amount_minor)?;
            }
            Ok(Some(action))
        }
        Voided::Payment => {
            payment_voided(w, &intent)?;
            Ok(None)
        }
        Voided::Refund => {
            refund_voided(w, &intent)?;
            Ok(None)
        }
        Voided::Reversal { load_tmc_before } => {
            if let Some(before) = load_tmc_before {
                if let Some(mut load) = w.intent(uid, before)? {
                    if rules::free_reversed_load(&mut load, tmc_before) {
                        w.put_intent(LedgerOnly(()), uid, &load)?;
                    }
                }
            }
            Ok(None)
        }
    }
}

/// The payment an intent pays, completed by the card at counter `tmc` (`now_ms`).
fn payment_completed<W: LedgerWrite + ?Sized>(
    w: &mut W,
    intent: &LoadIntent,
    tmc: u32,
    now_ms: u64,
) -> Result<Payment, LedgerError> {
    let id = intent.payment_id.as_deref().unwrap_or_default();
    let mut p = w.payment(id)?.ok_or_else(|| LedgerError::PaymentNotOpen {
        id: id.to_string(),
        why: "the intent's payment is gone".into(),
    })?;
    let notification = rules::pay(&mut p, intent, tmc, now_ms);
    w.put_payment(LedgerOnly(()), &p)?;
    if let Some(n) = notification {
        if w.notification(&p.id)?.is_none() {
            w.put_notification(&n)?;
        }
    }
    Ok(p)
}

/// The card never made the intent's payment: the day totals are given back and the payment
/// is open again (if it still is this intent's).
fn payment_voided<W: LedgerWrite + ?Sized>(
    w: &mut W,
    intent: &LoadIntent,
) -> Result<(), LedgerError> {
    let id = intent.payment_id.as_deref().unwrap_or_default();
    let Some(mut p) = w.payment(id)? else {
        return Ok(());
    };
    let day = intent.created_ms / 86_400_000;
    let amount = i64::from(intent.amount_minor);
    let card = FundingDay::new(PAYMENT_CARD_DAY, &intent.uid, day);
    let merchant = FundingDay::new(PAYMENT_MERCHANT_DAY, &p.merchant, day);
    add_funding_day(w, card, -amount)?;
    add_funding_day(w, merchant, -amount)?;
    if rules::reopen_payment(&mut p, intent) {
        w.put_payment(LedgerOnly(()), &p)?;
    }
    Ok(())
}

/// The refund an intent collects, credited by the card at counter `tmc`.
fn refund_credited<W: LedgerWrite + ?Sized>(
    w: &mut W,
    intent: &LoadIntent,
    tmc: u32,
    now_ms: u64,
) -> Result<Refund, LedgerError> {
    let id = intent.payment_id.as_deref().unwrap_or_default();
    let mut r = w
        .refund(id)?
        .ok_or_else(|| LedgerError::RefundRefused(format!("refund {id} is gone")))?;
    rules::credit_refund(&mut r, tmc, now_ms);
    w.put_refund(LedgerOnly(()), &r)?;
    Ok(r)
}

/// The card never applied the refund's credit: it is pending again (if it still is this
/// intent's).
fn refund_voided<W: LedgerWrite + ?Sized>(
    w: &mut W,
    intent: &LoadIntent,
) -> Result<(), LedgerError> {
    let id = intent.payment_id.as_deref().unwrap_or_default();
    let Some(mut r) = w.refund(id)? else {
        return Ok(());
    };
    if rules::reopen_refund(&mut r, intent) {
        w.put_refund(LedgerOnly(()), &r)?;
    }
    Ok(())
}
