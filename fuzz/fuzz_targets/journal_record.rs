//! What a validator reads back from its own LMDB journal: pending debits (the tear-recovery
//! record), and the downlink blobs it restores at start (signed fare table, blocklist updates).
//! Typed errors, never a panic; a pending debit that decodes encodes back to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use purse::rotation::SignedMessage;
use validator::journal::PendingTap;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = PendingTap::decode(data) {
        assert_eq!(&p.encode()[..], data, "a decoded pending debit re-encodes to its bytes");
        assert_eq!(PendingTap::decode(&p.encode()).ok(), Some(p));
    }
    // The downlink blobs, as `validator::daemon::restore` reads them (the key does not matter:
    // the fare table's peek and unverified decoding read the whole blob; the blocklist reads its
    // length, magic and format before the signature check fails).
    let _ = fare_rules::signed::peek(data);
    let _ = fare_rules::signed::decode_unverified(data);
    let _ = purse::blocklist::ListUpdate::verify(data, &[7u8; 32]);
});
