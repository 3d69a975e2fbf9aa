//! A device's sequence-gap state: any sequence numbers (a device chooses them) and any state read
//! back from the store (a corrupt one included) leave the gaps well formed, and a gap is exactly
//! what has not arrived.

use gateway::store::{DeviceState, MAX_GAPS};
use proptest::prelude::*;
use std::collections::BTreeSet;

fn well_formed(st: &DeviceState) -> Result<(), String> {
    if st.gaps.len() > MAX_GAPS {
        return Err(format!("{} gaps", st.gaps.len()));
    }
    let mut last: Option<u64> = None;
    for &(a, b) in &st.gaps {
        if a > b || b >= st.highest_seq || last.is_some_and(|e| a <= e) {
            return Err(format!("gap ({a}, {b}) in {:?}", st.gaps));
        }
        last = Some(b);
    }
    Ok(())
}

proptest! {
    #[test]
    fn gaps_are_exactly_the_missing_sequence_numbers(seqs in proptest::collection::vec(1u64..200, 0..80)) {
        let mut st = DeviceState::default();
        let mut seen = BTreeSet::new();
        for s in seqs {
            if seen.insert(s) {
                st.record_seq(s);
            }
            well_formed(&st).map_err(TestCaseError::fail)?;
        }
        let missing: BTreeSet<u64> = (1..st.highest_seq).filter(|s| !seen.contains(s)).collect();
        let in_gaps: BTreeSet<u64> = st.gaps.iter().flat_map(|&(a, b)| a..=b).collect();
        prop_assert_eq!(missing, in_gaps);
    }

    #[test]
    fn any_stored_state_and_any_sequence_number_stay_well_formed(
        highest in prop_oneof![Just(u64::MAX), Just(u64::MAX - 1), Just(0u64), any::<u64>()],
        gaps in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..300),
        seqs in proptest::collection::vec(prop_oneof![Just(u64::MAX), Just(0u64), any::<u64>()], 1..20),
    ) {
        let mut st = DeviceState { highest_seq: highest, gaps, ..Default::default() };
        for s in seqs {
            st.record_seq(s);
            well_formed(&st).map_err(TestCaseError::fail)?;
        }
    }
}

#[test]
fn the_oldest_gap_is_dropped_beyond_the_bound() {
    let mut st = DeviceState::default();
    let mut dropped = Vec::new();
    for i in 0..=MAX_GAPS as u64 {
        if let Some(d) = st.record_seq(2 * i + 2) {
            dropped.push(d);
        }
    }
    assert_eq!(st.gaps.len(), MAX_GAPS);
    assert_eq!(dropped, vec![(1, 1)], "only the oldest gap is dropped");
}
