//! Arbitrary bytes as a sealed key-set file: refused cleanly (cost parameters are bounded by the
//! decoder before any key derivation runs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = purse::keys::KeySet::unseal(data, b"pw");
});
