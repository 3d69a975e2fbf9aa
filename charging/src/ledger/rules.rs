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
}
