//! The shadow purse's counter booking: a counter is booked once, whoever reports it and in
//! whatever order; any shadow read back from the ledger (a corrupt one included) and any
//! counter leave it well formed.

use charging::ledger::{Booking, CardShadow, BOOKED_ABOVE_MAX};
use proptest::prelude::*;
use std::collections::BTreeSet;

fn well_formed(c: &CardShadow) -> Result<(), String> {
    if c.booked_above.len() > BOOKED_ABOVE_MAX {
        return Err(format!("{} counters above the gap", c.booked_above.len()));
    }
    let mut last = c.booked_through_tmc;
    for &(t, _, _) in &c.booked_above {
        if t <= last {
            return Err(format!(
                "{:?} after {}",
                c.booked_above, c.booked_through_tmc
            ));
        }
        last = t;
    }
    Ok(())
}

proptest! {
    #[test]
    fn every_counter_is_booked_once_in_any_order(order in Just((1u32..=40).collect::<Vec<_>>()).prop_shuffle(), repeats in proptest::collection::vec(1u32..=40, 0..20)) {
        let mut c = CardShadow::default();
        let mut booked = BTreeSet::new();
        for tmc in order.iter().copied().chain(repeats) {
            let b = c.book(tmc, 100 - tmc as i32, -1);
            prop_assert_eq!(b == Booking::Duplicate, !booked.insert(tmc), "counter {}", tmc);
            well_formed(&c).map_err(TestCaseError::fail)?;
        }
        prop_assert_eq!(c.booked_through_tmc, 40);
        prop_assert!(c.booked_above.is_empty());
        prop_assert_eq!(c.booked_balance_minor, Some(60));
    }

    #[test]
    fn any_stored_shadow_and_any_counter_stay_well_formed(
        through in prop_oneof![Just(u32::MAX), Just(u32::MAX - 1), Just(0u32), any::<u32>()],
        above in proptest::collection::vec((any::<u32>(), any::<i32>(), any::<i64>()), 0..100),
        tmcs in proptest::collection::vec(prop_oneof![Just(u32::MAX), Just(0u32), any::<u32>()], 1..20),
    ) {
        let mut c = CardShadow { booked_through_tmc: through, booked_above: above, ..Default::default() };
        for tmc in tmcs {
            c.book(tmc, 0, 0);
            well_formed(&c).map_err(TestCaseError::fail)?;
        }
    }
}
