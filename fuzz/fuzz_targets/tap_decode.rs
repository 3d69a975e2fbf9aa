//! Arbitrary bytes into the tap-record decoder and the payload splitter (v2 and v3 records):
//! typed errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = purse::crypto::AesKey::from_bytes([0x42; 16]);
    let _ = purse::tap::TapRecord::peek_device_id(data);
    let _ = purse::tap::TapRecord::decode_verified(data, "metro", |_| Some(key.clone()));
    if let Ok(records) = purse::tap::split_records(data) {
        for r in records {
            let _ = purse::tap::TapRecord::decode_verified(r, "metro", |_| Some(key.clone()));
        }
    }
});
