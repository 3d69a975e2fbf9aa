//! What the charging server reads back from its own ledger: a card's shadow purse (JSON) then
//! booked with counters, load intents and postings. Typed errors, never a panic; the shadow's
//! counters above a gap stay sorted, unique, above the contiguous ones and bounded.
#![no_main]
use charging::ledger::{CardShadow, BOOKED_ABOVE_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (tmcs, record) = data.split_at(data.len().min(32));
    if let Ok(mut c) = serde_json::from_slice::<CardShadow>(record) {
        for t in tmcs.chunks_exact(4) {
            c.book(u32::from_be_bytes(t.try_into().unwrap()), 0, 0);
            assert!(c.booked_above.len() <= BOOKED_ABOVE_MAX);
            let mut last = c.booked_through_tmc;
            for &(t, _, _) in &c.booked_above {
                assert!(t > last);
                last = t;
            }
        }
    }
    let _ = serde_json::from_slice::<charging::ledger::LoadIntent>(record);
    let _ = serde_json::from_slice::<charging::ledger::Posting>(record);
});
