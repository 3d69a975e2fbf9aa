//! Arbitrary bytes into the APDU parsers.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = purse::apdu::parse_command(data);
    let _ = purse::apdu::parse_response(data);
});
