//! Key rotation through a SoftHSM2 token holding two versions of every card master (what
//! `tapgate keys import-hsm` imports after `tapgate keys rotate`): the token's ChangeKey
//! plaintexts equal the software HSM's, it moves a card to the new version, and the card then
//! loads through it; the token reports the version cards move to and its TMAC versions.
//!
//! SoftHSM2 must be installed (`./test.sh` installs it); these tests fail, not skip, without it.

use purse::card::{Card, Personalisation};
use purse::keys::{KeyKind, KeySet, CARD_MASTERS};
use purse::rekey;
use purse::sam::{Hsm, SoftwareHsm};
use purse::txn::{self, Decision, EmulatedReader, LoadOutcome};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::softhsm;

const UID: [u8; 7] = [0x04, 0x66, 0x2E, 0x21, 0x80, 0x1D, 0x80];

/// The ChangeKey of card key `kind` of [`UID`] from version `from` to `to`.
fn change(kind: KeyKind, from: u8, to: u8) -> rekey::KeyChange {
    rekey::KeyChange {
        kind,
        from,
        to,
        uid: UID,
    }
}

#[test]
fn the_token_rotates_a_card_as_the_software_hsm_does() {
    let mut rng = StdRng::seed_from_u64(41);
    let mut keys = KeySet::generate(&mut rng);
    assert_eq!(keys.rotate_card_keys(&mut rng).unwrap(), 2);
    let soft = SoftwareHsm::new(&keys).unwrap();
    let (_token, mut hw) = softhsm::hsm_for(&keys).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hw.card_key_version(), Some(2));
    assert_eq!(hw.tmac_versions(), vec![2, 1]);
    for kind in CARD_MASTERS {
        assert_eq!(
            *hw.change_key_data(&change(kind, 1, 2)).unwrap(),
            *soft.change_key_data(&change(kind, 1, 2)).unwrap(),
            "{kind:?}"
        );
    }
    assert!(hw.change_key_data(&change(KeyKind::Debit, 1, 3)).is_err());

    let p = Personalisation::transit(UID, 1_000);
    let mut card = Card::personalise(&p, soft.card_keys(&UID, 1).unwrap());
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(5),
    };
    let out = rekey::run(&mut reader, &mut hw, 2, &mut rng).unwrap();
    assert_eq!(out.changed, vec![0, 1, 3, 2]);
    let nvm = card.into_nvm();
    assert_eq!(nvm.main.key_versions(), [2; 4]);
    let mut card = Card::power_on(nvm.clone(), soft.card_keys_of(&nvm.main).unwrap());
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(6),
    };
    let loaded = txn::load_online(&mut reader, &mut hw, &mut rng, |_| Decision::Apply {
        amount_minor: 400,
        record: None,
    })
    .unwrap();
    let LoadOutcome::Loaded { proof, .. } = loaded else {
        panic!("the load is applied");
    };
    assert_eq!(proof.receipt().key_version(), 2);
    assert_eq!(card.state().balance_minor, 1_400);
}
