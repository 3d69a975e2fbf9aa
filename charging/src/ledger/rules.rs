//! The ledger's business rules, independent of the storage: each takes plain records and values
//! and says what to write. Both backends (`lmdb/`, `postgres/`) call them and keep only their
//! reads and writes.

use super::records::*;
use super::LedgerError;

/// A posting's own checks: a positive amount between two different accounts.
pub(super) fn check_posting(from: &str, to: &str, amount_minor: i64) -> Result<(), LedgerError> {
    if amount_minor <= 0 {
        return Err(LedgerError::InvalidPosting("amount must be positive"));
    }
    if from == to {
        return Err(LedgerError::InvalidPosting(
            "from and to are the same account",
        ));
    }
    Ok(())
}

/// What the gap sweep does with one card whose lowest gap is due.
#[derive(Debug)]
pub(super) enum GapDecision {
    /// Nothing is booked above the card's counters any more: the gap clock goes.
    Closed,
    /// Report the gap (once) as this anomaly, and block the card if `block`.
    Report {
        /// the `counter_gap` anomaly
        anomaly: Anomaly,
        /// value appeared across the gap with no load pending there
        block: bool,
    },
}

/// The sweep's decision for a card (`c`, its open intents `open`) whose lowest gap has been
/// open since `since_ms`: see `LedgerWrite::sweep_gaps`. Value *appearing* across the gap with
/// no load pending there blocks the card; missing debits and pending changes are reported only.
pub(super) fn gap_decision(
    uid: &[u8; 7],
    c: &CardShadow,
    open: &[LoadIntent],
    since_ms: u64,
    now_ms: u64,
) -> GapDecision {
    let Some(&(first_above, balance_after, delta)) = c.booked_above.first() else {
        return GapDecision::Closed;
    };
    let from_tmc = c.booked_through_tmc.saturating_add(1);
    let to_tmc = first_above - 1;
    let hours = now_ms.saturating_sub(since_ms) / 3_600_000;
    let waiting = open
        .iter()
        .find(|i| i.tmc_before + 1 >= from_tmc && i.tmc_before < first_above);
    // What the missing counters changed: the balance before the first booked counter above
    // the gap, minus the balance after the last one below it.
    let missing = c
        .booked_balance_minor
        .map(|below| i64::from(balance_after) - delta - i64::from(below));
    let (block, detail) = match (waiting, missing) {
        (Some(i), _) => (
            false,
            format!(
                "counters {from_tmc}..={to_tmc} missing for {hours} h; a pending {:?} at counter {} waits for the card",
                i.kind,
                i.tmc_before + 1
            ),
        ),
        (None, Some(m)) if m > 0 => (
            true,
            format!(
                "counters {from_tmc}..={to_tmc} missing for {hours} h and {m} minor units appeared across them with no load booked"
            ),
        ),
        (None, Some(m)) => (
            false,
            format!(
                "counters {from_tmc}..={to_tmc} missing for {hours} h: {} minor units of debits never cleared",
                -m
            ),
        ),
        (None, None) => (
            false,
            format!("counters {from_tmc}..={to_tmc} missing for {hours} h"),
        ),
    };
    GapDecision::Report {
        anomaly: Anomaly {
            kind: "counter_gap".into(),
            card_uid: hex::encode_upper(uid),
            tmc: from_tmc,
            device_id: 0,
            device_seq: 0,
            detail,
        },
        block,
    }
}

/// The HSM proved *a* change (`proved_kind` of `proved_minor`) at an intent's counter: it must
/// be the intent's own (its kind and amount), not another transaction that took that counter.
pub(super) fn check_proof(
    intent: &LoadIntent,
    uid: &[u8; 7],
    tmc_before: u32,
    proved_kind: purse::receipt::TxKind,
    proved_minor: i32,
) -> Result<(), LedgerError> {
    let kind = match intent.kind {
        IntentKind::Load | IntentKind::Refund => purse::receipt::TxKind::Credit,
        IntentKind::Reversal | IntentKind::Payment => purse::receipt::TxKind::Debit,
    };
    if proved_kind != kind || proved_minor != intent.amount_minor {
        return Err(LedgerError::ProofNotIntent {
            uid: hex::encode_upper(uid),
            tmc: tmc_before,
            why: format!(
                "proved {:?} of {}, pending {:?} of {}",
                proved_kind, proved_minor, kind, intent.amount_minor
            ),
        });
    }
    Ok(())
}

/// The record an intent's completion settled besides the card: a refund credited, a payment
/// made (the backend stores those first; a load or a reversal settles none).
pub(super) enum Settled {
    /// a load or a reversal: the funding source is the other side
    Funding,
    /// the refund credited to the card
    Refund(Refund),
    /// the payment the card made
    Payment(Payment),
}

/// A posting to make: `amount_minor` from `from` to `to`, traced by `reference`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Move {
    /// debited account
    pub from: String,
    /// credited account
    pub to: String,
    /// minor units
    pub amount_minor: i64,
    /// trace
    pub reference: String,
}

/// The card proved `intent`'s change at counter `tmc`: marks the intent completed at `now_ms`
/// and says what to post (a load funding → card, a reversal card → funding, a refund
/// `refunds:pending` → card, a payment card → merchant) and what to do with the funding once
/// the transaction is durable (a refund or payment without its record is refused). `before_learned`: the change happened before the state clearing
/// learned the card from, so `issuer:float` (which funded the learned balance, this change
/// included) stands in for the card.
pub(super) fn complete(
    intent: &mut LoadIntent,
    uid: &[u8; 7],
    tmc: u32,
    before_learned: bool,
    settled: Settled,
    now_ms: u64,
) -> Result<(Move, FundingAction), LedgerError> {
    let funding = format!("funding:{}", intent.funding_source);
    let card = if before_learned {
        "issuer:float".to_string()
    } else {
        super::card_account(uid)
    };
    let amount_minor = i64::from(intent.amount_minor);
    let counter_ref = |what: &str| format!("{what}:{}:{tmc}", hex::encode_upper(uid));
    let (from, to, reference, action) = match (intent.kind, settled) {
        (IntentKind::Refund, Settled::Refund(r)) => (
            "refunds:pending".to_string(),
            card,
            format!("refund:{}", r.id),
            FundingAction::RefundCredited { refund_id: r.id },
        ),
        (IntentKind::Payment, Settled::Payment(p)) => (
            card,
            format!("merchant:{}", p.merchant),
            format!("payment:{}", p.id),
            FundingAction::Paid {
                payment_id: p.id,
                merchant: p.merchant,
            },
        ),
        (IntentKind::Reversal, _) => (
            card,
            funding,
            counter_ref("reversal"),
            FundingAction::Refund {
                source: intent.funding_source.clone(),
                auth: intent.funding_auth.clone(),
                amount_minor,
            },
        ),
        (IntentKind::Load, _) => (
            funding,
            card,
            counter_ref("load"),
            FundingAction::Capture {
                source: intent.funding_source.clone(),
                auth: intent.funding_auth.clone(),
            },
        ),
        (IntentKind::Refund | IntentKind::Payment, _) => {
            return Err(LedgerError::InvalidPosting(
                "a refund or payment completes only with its own record",
            ))
        }
    };
    intent.state = IntentState::Completed;
    intent.settled_ms = Some(now_ms);
    Ok((
        Move {
            from,
            to,
            amount_minor,
            reference,
        },
        action,
    ))
}

/// The card made `intent`'s payment `p` at counter `tmc`: `p` is completed, and the merchant is
/// told, durably, if it gave a URL: the notification returned is due now and retried until its
/// URL answers 2xx (the backend stores it unless one is stored already).
pub(super) fn pay(
    p: &mut Payment,
    intent: &LoadIntent,
    tmc: u32,
    now_ms: u64,
) -> Option<Notification> {
    p.state = PaymentState::Completed;
    p.card_uid = Some(intent.uid.clone());
    p.tmc = Some(tmc);
    p.paid_ms = Some(now_ms);
    p.notify_url.as_ref().map(|url| Notification {
        payment_id: p.id.clone(),
        url: url.clone(),
        attempts: 0,
        next_attempt_ms: now_ms,
        delivered_ms: None,
        last_error: None,
    })
}

/// The card never made `intent`'s payment `p`: it is open again if it still is this intent's
/// (then `true`: store it). The day totals the payment took are the backend's to give back.
pub(super) fn reopen_payment(p: &mut Payment, intent: &LoadIntent) -> bool {
    if p.state == PaymentState::Pending
        && p.card_uid.as_deref() == Some(intent.uid.as_str())
        && p.tmc == intent.tmc_before.checked_add(1)
    {
        p.state = PaymentState::Open;
        p.card_uid = None;
        p.tmc = None;
        true
    } else {
        false
    }
}

/// The card credited refund `r` at counter `tmc`.
pub(super) fn credit_refund(r: &mut Refund, tmc: u32, now_ms: u64) {
    r.state = RefundState::Credited;
    r.tmc = Some(tmc);
    r.credited_ms = Some(now_ms);
}

/// The card never applied `intent`'s refund credit `r`: it is pending again if it still is this
/// intent's (then `true`: store it).
pub(super) fn reopen_refund(r: &mut Refund, intent: &LoadIntent) -> bool {
    if r.state == RefundState::Collecting && r.tmc == intent.tmc_before.checked_add(1) {
        r.state = RefundState::Pending;
        r.tmc = None;
        true
    } else {
        false
    }
}

/// What a booked counter does to the card's gap clock (see `LedgerWrite::book_counter`).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum GapAfterBooking {
    /// No counter waits above a gap: the clock goes, and the card is unblocked if `unblock`
    /// (it was blocked for a gap: every booked counter is proved by the card's MAC, so the
    /// value that seemed to appear came from a real transaction, a late franchise report say).
    Filled {
        /// lift the gap's block ([`GAP_FILLED`])
        unblock: bool,
    },
    /// A new lowest gap (or the same one after the counters below it arrived): store this clock.
    Start(GapClock),
    /// The lowest gap's clock runs on.
    Keep,
}

/// Why a gap's block is lifted.
pub(super) const GAP_FILLED: &str = "the counter gap filled";

/// The gap clock after card `c` booked a counter at `now_ms`; `current` reads the card's
/// stored clock (only when a gap is open).
pub(super) fn gap_after_booking(
    c: &CardShadow,
    now_ms: u64,
    current: impl FnOnce() -> Result<Option<GapClock>, LedgerError>,
) -> Result<GapAfterBooking, LedgerError> {
    if c.booked_above.is_empty() {
        return Ok(GapAfterBooking::Filled {
            unblock: c.blocked && c.block_reason.as_deref() == Some(GAP_BLOCK_REASON),
        });
    }
    // The lowest gap starts at the first counter not booked.
    let from_tmc = c.booked_through_tmc.saturating_add(1);
    Ok(if current()?.is_none_or(|g| g.from_tmc != from_tmc) {
        GapAfterBooking::Start(GapClock {
            from_tmc,
            since_ms: now_ms,
            reported: false,
        })
    } else {
        GapAfterBooking::Keep
    })
}

/// What voiding an intent leaves the backend to do besides storing it (see `void`).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Voided {
    /// A load: its day totals are given back (the card's, see `give_back_load_day`, and its
    /// instrument's when it has one): the day it counted in (unix days) and what it counted
    /// (minor units); and its funding is released (the action).
    Load(u64, i64, FundingAction),
    /// A payment: its day totals are given back and it reopens (`reopen_payment`).
    Payment,
    /// A refund: it is pending again (`reopen_refund`).
    Refund,
    /// A reversal: the load it reverses (the intent at this counter-before) is free to be
    /// reversed again (`free_reversed_load`).
    Reversal {
        /// the reversed load's counter before it
        load_tmc_before: Option<u32>,
    },
}

/// The card never applied `intent`'s change: marks it voided at `now_ms` and says what else
/// follows.
pub(super) fn void(intent: &mut LoadIntent, now_ms: u64) -> Voided {
    intent.state = IntentState::Voided;
    intent.settled_ms = Some(now_ms);
    match intent.kind {
        IntentKind::Load => Voided::Load(
            intent.created_ms / 86_400_000,
            i64::from(intent.amount_minor),
            FundingAction::Release {
                source: intent.funding_source.clone(),
                auth: intent.funding_auth.clone(),
            },
        ),
        IntentKind::Payment => Voided::Payment,
        IntentKind::Refund => Voided::Refund,
        IntentKind::Reversal => Voided::Reversal {
            load_tmc_before: intent.reverses_tmc.and_then(|t| t.checked_sub(1)),
        },
    }
}

/// A voided load gives its amount back to the card's load day total if that is still its day
/// (then `true`: store the shadow).
pub(super) fn give_back_load_day(shadow: &mut CardShadow, day: u64, amount_minor: i64) -> bool {
    if shadow.load_day == day {
        shadow.load_day_minor -= amount_minor;
        true
    } else {
        false
    }
}

/// A reversal voided at `reversal_tmc_before` frees `load` to be reversed again if it was
/// marked reversed by it (then `true`: store the load).
pub(super) fn free_reversed_load(load: &mut LoadIntent, reversal_tmc_before: u32) -> bool {
    if load.reversed_at_tmc == reversal_tmc_before.checked_add(1) {
        load.reversed_at_tmc = None;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(through: u32, below: Option<i32>, above: (u32, i32, i64)) -> CardShadow {
        CardShadow {
            booked_through_tmc: through,
            booked_balance_minor: below,
            booked_above: vec![above],
            ..CardShadow::default()
        }
    }

    #[test]
    fn a_posting_moves_a_positive_amount_between_two_accounts() {
        assert!(check_posting("a", "b", 1).is_ok());
        assert!(check_posting("a", "b", 0).is_err());
        assert!(check_posting("a", "a", 5).is_err());
    }

    #[test]
    fn value_appearing_across_a_gap_blocks_and_missing_debits_do_not() {
        let uid = [1; 7];
        // Counters 3..=4 missing; 500 below, the change at 5 was +100 and left 900: 300 appeared.
        let c = card(2, Some(500), (5, 900, 100));
        let GapDecision::Report { anomaly, block } = gap_decision(&uid, &c, &[], 0, 7_200_000)
        else {
            panic!("a gap is reported");
        };
        assert!(block);
        assert_eq!((anomaly.kind.as_str(), anomaly.tmc), ("counter_gap", 3));
        assert!(anomaly
            .detail
            .contains("missing for 2 h and 300 minor units appeared"));
        let c = card(2, Some(500), (5, 300, -100));
        let GapDecision::Report { anomaly, block } = gap_decision(&uid, &c, &[], 0, 0) else {
            panic!("a gap is reported");
        };
        assert!(!block);
        assert!(anomaly
            .detail
            .contains("100 minor units of debits never cleared"));
        let c = CardShadow::default();
        assert!(matches!(
            gap_decision(&uid, &c, &[], 0, 0),
            GapDecision::Closed
        ));
    }

    #[test]
    fn a_completion_books_a_load_from_its_funding_and_refuses_a_refund_without_its_record() {
        let intent: LoadIntent = serde_json::from_value(serde_json::json!({
            "uid": "01010101010101", "tmc_before": 4, "balance_before_minor": 0,
            "amount_minor": 250, "key_version": 1, "funding_source": "card",
            "funding_auth": "a1", "idempotency_key": "k", "requested_by": "t", "created_ms": 0, "state": "authorised", "kind": "load"
        }))
        .expect("an intent");
        let uid = [1; 7];
        let mut load = intent.clone();
        let (m, action) = complete(&mut load, &uid, 5, false, Settled::Funding, 9).expect("load");
        assert_eq!(
            (
                m.from.as_str(),
                m.to.as_str(),
                m.amount_minor,
                m.reference.as_str()
            ),
            (
                "funding:card",
                "card:01010101010101",
                250,
                "load:01010101010101:5"
            )
        );
        assert!(matches!(action, FundingAction::Capture { .. }));
        assert_eq!(
            (load.state, load.settled_ms),
            (IntentState::Completed, Some(9))
        );
        let (m, _) =
            complete(&mut intent.clone(), &uid, 5, true, Settled::Funding, 9).expect("load");
        assert_eq!(m.to, "issuer:float");
        let mut refund = intent;
        refund.kind = IntentKind::Refund;
        assert!(complete(&mut refund, &uid, 5, false, Settled::Funding, 9).is_err());
        assert_eq!(refund.state, IntentState::Authorised);
    }

    #[test]
    fn a_payment_paid_tells_its_merchant_and_reopens_only_for_its_own_intent() {
        let intent: LoadIntent = serde_json::from_value(serde_json::json!({
            "uid": "01010101010101", "tmc_before": 4, "balance_before_minor": 0,
            "amount_minor": 250, "key_version": 1, "funding_source": "payment",
            "funding_auth": "", "idempotency_key": "k", "requested_by": "t",
            "created_ms": 0, "state": "authorised", "kind": "payment"
        }))
        .expect("an intent");
        let mut p = Payment {
            id: "p1".into(),
            merchant: "m".into(),
            order_id: "o".into(),
            amount_minor: 250,
            currency: "EUR".into(),
            description: String::new(),
            expires_ms: 10,
            notify_url: Some("https://m.example/n".into()),
            state: PaymentState::Pending,
            created_ms: 0,
            card_uid: Some("01010101010101".into()),
            tmc: Some(5),
            paid_ms: None,
            refunded_minor: 0,
        };
        let mut other = p.clone();
        other.tmc = Some(6);
        assert!(!reopen_payment(&mut other, &intent));
        assert_eq!(other.state, PaymentState::Pending);
        let mut open = p.clone();
        assert!(reopen_payment(&mut open, &intent));
        assert_eq!(
            (open.state, open.card_uid, open.tmc),
            (PaymentState::Open, None, None)
        );
        let n = pay(&mut p, &intent, 5, 77).expect("the merchant gave a URL");
        assert_eq!((n.payment_id.as_str(), n.next_attempt_ms), ("p1", 77));
        assert_eq!((p.state, p.paid_ms), (PaymentState::Completed, Some(77)));
        p.notify_url = None;
        assert!(pay(&mut p, &intent, 5, 78).is_none());
    }

    #[test]
    fn a_booking_starts_a_gap_clock_once_and_a_filled_gap_lifts_only_its_own_block() {
        let c = card(2, Some(500), (5, 900, 100));
        let started = gap_after_booking(&c, 42, || Ok(None)).expect("no storage");
        let clock = GapClock {
            from_tmc: 3,
            since_ms: 42,
            reported: false,
        };
        assert_eq!(started, GapAfterBooking::Start(clock.clone()));
        let kept = gap_after_booking(&c, 99, || Ok(Some(clock.clone()))).expect("no storage");
        assert_eq!(kept, GapAfterBooking::Keep);
        let mut filled = CardShadow {
            blocked: true,
            block_reason: Some(GAP_BLOCK_REASON.into()),
            ..CardShadow::default()
        };
        let read = || -> Result<Option<GapClock>, LedgerError> { panic!("not read") };
        assert_eq!(
            gap_after_booking(&filled, 1, read).expect("no storage"),
            GapAfterBooking::Filled { unblock: true }
        );
        filled.block_reason = Some("lost".into());
        assert_eq!(
            gap_after_booking(&filled, 1, || Ok(None)).expect("no storage"),
            GapAfterBooking::Filled { unblock: false }
        );
    }

    #[test]
    fn a_voided_load_gives_its_day_back_and_a_voided_reversal_frees_only_its_load() {
        let mut load: LoadIntent = serde_json::from_value(serde_json::json!({
            "uid": "01010101010101", "tmc_before": 4, "balance_before_minor": 0,
            "amount_minor": 250, "key_version": 1, "funding_source": "card",
            "funding_auth": "a1", "idempotency_key": "k", "requested_by": "t",
            "created_ms": 86_400_000, "state": "authorised", "kind": "load"
        }))
        .expect("an intent");
        let mut voided = load.clone();
        let Voided::Load(day, amount_minor, _) = void(&mut voided, 5) else {
            panic!("a load voids as a load");
        };
        assert_eq!((day, amount_minor), (1, 250));
        assert_eq!(
            (voided.state, voided.settled_ms),
            (IntentState::Voided, Some(5))
        );
        let mut shadow = CardShadow {
            load_day: 1,
            load_day_minor: 300,
            ..CardShadow::default()
        };
        assert!(give_back_load_day(&mut shadow, 1, 250));
        assert_eq!(shadow.load_day_minor, 50);
        assert!(!give_back_load_day(&mut shadow, 2, 250));
        let mut reversal = load.clone();
        reversal.kind = IntentKind::Reversal;
        reversal.reverses_tmc = Some(5);
        reversal.tmc_before = 7;
        assert_eq!(
            void(&mut reversal, 6),
            Voided::Reversal {
                load_tmc_before: Some(4)
            }
        );
        load.reversed_at_tmc = Some(9);
        assert!(!free_reversed_load(&mut load, 7));
        load.reversed_at_tmc = Some(8);
        assert!(free_reversed_load(&mut load, 7));
        assert_eq!(load.reversed_at_tmc, None);
    }
}
