//! What a gateway reads back from its own LMDB store: a device's state (JSON) then updated by
//! arriving sequence numbers, quarantine entries and aggregates. Typed errors, never a panic;
//! the gap list of any state read back stays sorted, disjoint, below the highest sequence number
//! and bounded whatever sequence numbers follow.
#![no_main]
use gateway::store::{Aggregate, DeviceState, MAX_GAPS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first bytes choose sequence numbers; the rest is the stored record.
    let (seqs, record) = data.split_at(data.len().min(64));
    if let Ok(mut st) = serde_json::from_slice::<DeviceState>(record) {
        for s in seqs.chunks_exact(8) {
            st.record_seq(u64::from_be_bytes(s.try_into().unwrap()));
            assert!(st.gaps.len() <= MAX_GAPS);
            let mut last: Option<u64> = None;
            for &(a, b) in &st.gaps {
                assert!(a <= b && b < st.highest_seq && last.is_none_or(|e| a > e));
                last = Some(b);
            }
        }
    }
    let _ = serde_json::from_slice::<Aggregate>(record);
    let _ = serde_json::from_slice::<gateway::store::Quarantined>(record);
});
