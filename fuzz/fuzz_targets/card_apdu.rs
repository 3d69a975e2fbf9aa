//! A sequence of arbitrary APDUs into an emulated card (length-prefixed chunks of the input):
//! the card never panics and its image stays valid.
#![no_main]
use libfuzzer_sys::fuzz_target;
use purse::card::{Card, CardKeys, Personalisation};
use purse::crypto::AesKey;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let keys = CardKeys::from_keys(core::array::from_fn(|i| AesKey::from_bytes([i as u8; 16])));
    let mut card = Card::personalise(
        &Personalisation::transit([4, 1, 2, 3, 4, 5, 6], 1_000),
        keys,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        let _ = card.process(&tail[..n], &mut rng);
        rest = &tail[n..];
    }
    assert!(card.nvm().validate().is_ok());
});
