//! Arbitrary bytes into the tap-record decoder: typed errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = purse::crypto::AesKey::from_bytes([0x42; 16]);
    let _ = purse::tap::TapRecord::peek_device_id(data);
    let _ = purse::tap::TapRecord::decode_verified(data, "metro", |_| Some(key));
});
