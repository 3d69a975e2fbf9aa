//! Every decoder, fed arbitrary bytes, answers with a typed error and never panics — including
//! decoders of what the project itself persisted (key sets, card images). The same targets run
//! under cargo-fuzz in fuzz/.

use proptest::prelude::*;
use purse::card::{Card, CardKeys, Nvm, Personalisation};
use purse::crypto::AesKey;
use purse::rotation::SignedMessage;

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
    fn card_images_are_validated_before_use(
        image in valid_image(),
        mutations in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<i64>()), 0..4),
    ) {
        // A real card's image (it validates and survives power-on as it is), then mutated leaf
        // by leaf: whatever still decodes and validates must power on into a valid card.
        let original: Nvm = serde_json::from_value(image.clone()).expect("a valid image decodes");
        prop_assert!(original.validate().is_ok(), "a real card's image validates");
        let mut image = image;
        for (at, how, value) in mutations {
            mutate(&mut image, at, how, value);
        }
        if let Ok(nvm) = serde_json::from_value::<Nvm>(image) {
            if nvm.validate().is_ok() {
                prop_assert!(Card::power_on(nvm, card_keys()).nvm().validate().is_ok());
            }
        }
    }
}

fn card_keys() -> CardKeys {
    CardKeys::from_keys(core::array::from_fn(|i| AesKey::from_bytes([i as u8; 16])))
}

/// The image of a personalised card (balance, limits, trip records as a card holds them),
/// sometimes in the middle of a commit: a journal, flagged or not.
fn valid_image() -> impl Strategy<Value = serde_json::Value> {
    (
        0i32..100_000,
        0usize..6,
        prop::option::of((any::<bool>(), -5_000i32..5_000, 0usize..6)),
    )
        .prop_map(|(balance, records, journal)| {
            let p = Personalisation::transit([4, 1, 2, 3, 4, 5, 6], balance);
            let mut nvm = Card::personalise(&p, card_keys()).nvm().clone();
            let max = usize::from(nvm.main.max_records);
            nvm.main.records = (0..records.min(max)).map(|i| [i as u8; 32]).collect();
            if let Some((flag, change, more)) = journal {
                let mut next = nvm.main.clone();
                next.balance_minor =
                    (balance + change).clamp(next.lower_limit_minor, next.upper_limit_minor);
                next.tmc += 1;
                next.records.truncate(max.saturating_sub(more.min(max)));
                nvm.journal = Some(next);
                nvm.commit_flag = flag;
            }
            serde_json::to_value(&nvm).expect("an image serialises")
        })
}

/// Every leaf of `v` (numbers, booleans, strings, nulls) by JSON pointer.
fn leaves(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .for_each(|(k, c)| leaves(c, format!("{at}/{k}"), out)),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, c)| leaves(c, format!("{at}/{i}"), out)),
        _ => out.push(at),
    }
}

/// Changes one leaf: a number set to `value` (or to a value near a limit), a boolean flipped,
/// a leaf nulled.
fn mutate(image: &mut serde_json::Value, at: prop::sample::Index, how: u8, value: i64) {
    let mut all = Vec::new();
    leaves(image, String::new(), &mut all);
    // The state's scalars far more often than the trip records' bytes.
    let scalars: Vec<&String> = all.iter().filter(|p| !p.contains("/records/")).collect();
    let Some(path) = (if how == 3 {
        all.get(at.index(all.len()))
    } else {
        scalars.get(at.index(scalars.len())).copied()
    }) else {
        return;
    };
    let Some(leaf) = image.pointer_mut(path) else {
        return;
    };
    *leaf = match (how, &*leaf) {
        (_, serde_json::Value::Bool(b)) => serde_json::Value::Bool(!b),
        (0, _) => value.into(),
        (1, _) => (value % 10_000).into(),
        (2, _) => serde_json::Value::Null,
        _ => (value & 0xff).into(),
    };
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
