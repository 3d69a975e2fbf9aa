//! Card images read back from storage (JSON): malformed ones are refused, valid ones power on.
#![no_main]
use libfuzzer_sys::fuzz_target;
use purse::card::{Card, CardKeys, Nvm};
use purse::crypto::AesKey;

fuzz_target!(|data: &[u8]| {
    if let Ok(nvm) = serde_json::from_slice::<Nvm>(data) {
        if nvm.validate().is_ok() {
            let keys =
                CardKeys::from_keys(core::array::from_fn(|i| AesKey::from_bytes([i as u8; 16])));
            let card = Card::power_on(nvm, keys);
            assert!(card.nvm().validate().is_ok());
        }
    }
});
