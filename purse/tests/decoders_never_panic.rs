//! Every decoder, fed arbitrary bytes, answers with a typed error and never panics — including
//! decoders of what the project itself persisted (key sets, card images). The same targets run
//! under cargo-fuzz in fuzz/.

use proptest::prelude::*;
use purse::card::{Card, CardKeys, Nvm};
use purse::crypto::AesKey;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn tap_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..160)) {
        let key = AesKey::from_bytes([7; 16]);
        let _ = purse::tap::TapRecord::peek_device_id(&bytes);
        let _ = purse::tap::TapRecord::decode_verified(&bytes, "metro", |_| Some(key));
    }

    #[test]
    fn blocklist_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut bl = purse::blocklist::Blocklist::new("metro");
        let _ = bl.apply(&bytes, &[7; 32]);
        let mut framed = b"TGBL\x01\x02".to_vec();
        framed.extend_from_slice(&bytes);
        let _ = purse::blocklist::ListUpdate::verify(&framed, &[7; 32]);
    }

    #[test]
    fn apdu_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = purse::apdu::parse_command(&bytes);
        let _ = purse::apdu::parse_response(&bytes);
    }

    #[test]
    fn card_images_are_validated_before_use(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(nvm) = serde_json::from_slice::<Nvm>(&bytes) {
            if nvm.validate().is_ok() {
                let keys = CardKeys::from_keys(core::array::from_fn(|i| AesKey::from_bytes([i as u8; 16])));
                prop_assert!(Card::power_on(nvm, keys).nvm().validate().is_ok());
            }
        }
    }
}

proptest! {
    // Unsealing runs Argon2 when the header parses: fewer cases, small bodies.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn keyset_unseal_never_panics(tail in prop::collection::vec(any::<u8>(), 0..120), m in 0u32..512, t in 0u32..3) {
        // A plausible header (so the decoder goes deep) with cheap cost parameters.
        let mut file = b"TGKS\x01".to_vec();
        file.extend_from_slice(&m.to_be_bytes());
        file.extend_from_slice(&t.to_be_bytes());
        file.push(1);
        file.extend_from_slice(&tail);
        let _ = purse::keys::KeySet::unseal(&file, b"pw");
        let _ = purse::keys::KeySet::unseal(&tail, b"pw");
    }
}

#[test]
fn a_hostile_kdf_cost_is_refused_before_any_work() {
    let mut file = b"TGKS\x01".to_vec();
    file.extend_from_slice(&u32::MAX.to_be_bytes());
    file.extend_from_slice(&1u32.to_be_bytes());
    file.push(1);
    file.extend_from_slice(&[0u8; 64]);
    assert!(matches!(
        purse::keys::KeySet::unseal(&file, b"pw"),
        Err(purse::keys::KeyError::Kdf(_))
    ));
}
