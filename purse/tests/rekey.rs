//! Key rotation on the emulated card: ChangeKey driven by the HSM ([`purse::rekey`]), both
//! versions working in the window, a rotation torn at every APDU and every NVM write resumed
//! with every key usable throughout, and the refusals a card owes a terminal that is not key 0.

mod common;

use common::{Tear, TearingReader};
use purse::apdu::{self, ins};
use purse::card::{Card, CardKeys, Personalisation, INS_GET_KEY_VERSION};
use purse::keys::{KeyKind, KeySet};
use purse::rekey::{self, INS_CHANGE_KEY};
use purse::sam::{Authenticator, Hsm, SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, Outcome, Transport, TxError};
use rand::rngs::StdRng;
use rand::SeedableRng;

const UID: [u8; 7] = [0x04, 0x52, 0x2E, 0x21, 0x80, 0x1D, 0x80];

/// The ChangeKey of card key `kind` of [`UID`] from version `from` to `to`.
fn change(kind: KeyKind, from: u8, to: u8) -> rekey::KeyChange {
    rekey::KeyChange {
        kind,
        from,
        to,
        uid: UID,
    }
}

/// An issuer with card keys at versions 1 and 2, its HSM and a validator SAM holding both.
struct Rotated {
    keys: KeySet,
    hsm: SoftwareHsm,
    sam: SoftwareSam,
    rng: StdRng,
}

fn rotated() -> Rotated {
    let mut rng = StdRng::seed_from_u64(31);
    let mut keys = KeySet::generate(&mut rng);
    assert_eq!(keys.rotate_card_keys(&mut rng).unwrap(), 2);
    Rotated {
        hsm: SoftwareHsm::new(&keys).unwrap(),
        sam: SoftwareSam::validator(&keys, 77).unwrap(),
        keys,
        rng,
    }
}

fn card_v1(r: &Rotated, balance: i32) -> Card {
    let p = Personalisation::transit(UID, balance);
    Card::personalise(&p, r.hsm.card_keys(&UID, 1).unwrap())
}

fn reader(card: &mut Card) -> EmulatedReader<'_, StdRng> {
    EmulatedReader {
        card,
        rng: StdRng::seed_from_u64(8),
    }
}

/// A debit at the validator, its transaction MAC checked by the HSM as clearing does.
fn debit_cleared(r: &mut Rotated, card: &mut Card, amount: i32) -> Result<(), TxError> {
    let out = txn::debit(&mut reader(card), &mut r.sam, &mut r.rng, |_| {
        Decision::Apply {
            amount_minor: amount,
            record: Some(vec![7; 32]),
        }
    })?;
    let Outcome::Committed { receipt, .. } = out else {
        panic!("a debit the validator applied is committed");
    };
    r.hsm.verify_tmac(&receipt)?;
    Ok(())
}

fn power_cycle(r: &Rotated, card: Card) -> Card {
    let nvm = card.into_nvm();
    let keys = r.hsm.card_keys_of(&nvm.main).unwrap();
    Card::power_on(nvm, keys)
}

#[test]
fn a_card_moves_to_the_new_version_and_both_work_until_retirement() {
    let mut r = rotated();
    let mut card = card_v1(&r, 10_000);
    debit_cleared(&mut r, &mut card, 100).unwrap();
    assert_eq!(r.hsm.card_key_version(), Some(2));
    let out = rekey::run(&mut reader(&mut card), &mut r.hsm, 2, &mut r.rng).unwrap();
    assert_eq!(out.before, [1; 4]);
    assert_eq!(out.changed, vec![0, 1, 3, 2]);
    assert_eq!(card.state().key_versions(), [2; 4]);
    assert_eq!(card.state().key_versions, None);
    // The new keys work before and after a power cycle: debits, loads, their TMACs.
    debit_cleared(&mut r, &mut card, 100).unwrap();
    let mut card = power_cycle(&r, card);
    debit_cleared(&mut r, &mut card, 100).unwrap();
    let loaded = txn::load_online(&mut reader(&mut card), &mut r.hsm, &mut r.rng, |_| {
        Decision::Apply {
            amount_minor: 500,
            record: None,
        }
    })
    .unwrap();
    assert!(matches!(loaded, txn::LoadOutcome::Loaded { .. }));
    assert_eq!(card.state().balance_minor, 10_200);
    // A second rotation to the same version finds nothing to do.
    let again = rekey::run(&mut reader(&mut card), &mut r.hsm, 2, &mut r.rng).unwrap();
    assert!(again.changed.is_empty());
    // After retirement the validator refuses a card still on version 1, with the reason to say.
    let mut laggard = card_v1(&r, 5_000);
    r.keys.retire(1).unwrap();
    let mut sam = SoftwareSam::validator(&r.keys, 77).unwrap();
    let e = txn::debit(&mut reader(&mut laggard), &mut sam, &mut r.rng, |_| {
        Decision::Refuse
    })
    .unwrap_err();
    assert!(matches!(e, TxError::UnknownKeyVersion(1)), "{e}");
    assert!(sam.retired_version(KeyKind::Debit, 1));
    assert!(!sam.retired_version(KeyKind::Debit, 2));
    // The HSM still holds version 1: the laggard is migrated at its next load.
    let mut hsm = SoftwareHsm::new(&r.keys).unwrap();
    rekey::run(&mut reader(&mut laggard), &mut hsm, 2, &mut r.rng).unwrap();
    r.sam = sam;
    debit_cleared(&mut r, &mut laggard, 100).unwrap();
    assert_eq!(laggard.state().balance_minor, 4_900);
}

/// APDUs of a whole rotation: select, four GetKeyVersion, two authentication frames, ChangeKey
/// 0, two authentication frames, three ChangeKey.
const REKEY_APDUS: usize = 13;

#[test]
fn a_rotation_torn_anywhere_leaves_every_key_usable_and_is_resumed() {
    let tears = (1..=REKEY_APDUS)
        .flat_map(|n| [Tear::PullBefore(n), Tear::LoseAnswer(n)])
        .chain((1..=4).map(Tear::Power));
    let mut mixed_seen = 0;
    for tear in tears {
        let mut r = rotated();
        let mut card = card_v1(&r, 10_000);
        if let Tear::Power(k) = tear {
            card.tear_after_writes(Some(k));
        }
        let mut t = TearingReader {
            inner: reader(&mut card),
            tear,
            sent: 0,
        };
        let res = rekey::run(&mut t, &mut r.hsm, 2, &mut r.rng);
        assert!(res.is_err(), "{tear:?}: the rotation was torn");
        let versions = card.state().key_versions();
        assert!(versions.iter().all(|v| [1, 2].contains(v)), "{tear:?}");
        if versions.iter().any(|&v| v != versions[0]) {
            mixed_seen += 1;
        }
        // The credit key changes last: a load that finds it new finds every key new.
        if versions[2] == 2 {
            assert_eq!(versions, [2; 4], "{tear:?}");
        }
        // Whatever happened, the card answers with working keys, in the same field and
        // after a power cycle: a validator debits it and the HSM verifies its TMAC.
        let mut card = if card.is_torn() {
            power_cycle(&r, card)
        } else {
            card.remove_from_field();
            card
        };
        debit_cleared(&mut r, &mut card, 100).unwrap_or_else(|e| panic!("{tear:?}: {e}"));
        let mut card = power_cycle(&r, card);
        debit_cleared(&mut r, &mut card, 100).unwrap_or_else(|e| panic!("{tear:?}: {e}"));
        // The next contact finishes the rotation, changing only what is still old.
        let out = rekey::run(&mut reader(&mut card), &mut r.hsm, 2, &mut r.rng)
            .unwrap_or_else(|e| panic!("{tear:?}: {e}"));
        let still_old = versions.iter().filter(|&&v| v == 1).count();
        assert_eq!(out.changed.len(), still_old, "{tear:?}");
        assert_eq!(card.state().key_versions(), [2; 4], "{tear:?}");
        debit_cleared(&mut r, &mut card, 100).unwrap();
        assert_eq!(card.state().balance_minor, 9_700, "{tear:?}");
    }
    assert!(mixed_seen >= 3, "tears between ChangeKeys were exercised");
}

#[test]
fn key_zero_refusing_its_reported_version_is_tried_at_the_target() {
    let mut r = rotated();
    let card = card_v1(&r, 1_000);
    // A card whose key 0 is already at version 2 while its version byte still says 1.
    let keys = CardKeys::derive_each(&r.keys, &UID, [2, 1, 1, 1]).unwrap();
    let mut card = Card::power_on(card.into_nvm(), keys);
    let out = rekey::run(&mut reader(&mut card), &mut r.hsm, 2, &mut r.rng).unwrap();
    assert_eq!(out.changed, vec![0, 1, 3, 2]);
    assert_eq!(card.state().key_versions(), [2; 4]);
    let mut card = power_cycle(&r, card);
    debit_cleared(&mut r, &mut card, 100).unwrap();
}

fn status(resp: &[u8]) -> [u8; 2] {
    resp[resp.len() - 2..].try_into().unwrap()
}

#[test]
fn change_key_outside_a_key_zero_session_or_with_a_bad_cryptogram_is_refused() {
    let mut r = rotated();
    let mut card = card_v1(&r, 1_000);
    let mut rng = StdRng::seed_from_u64(3);
    // In a debit-key session: permission denied, nothing changes.
    let mut t = reader(&mut card);
    let (mut ch, _) = txn::open_session(&mut t, &mut r.sam, KeyKind::Debit, &mut rng).unwrap();
    let data = r
        .hsm
        .change_key_data(&change(KeyKind::Debit, 1, 2))
        .unwrap();
    let cmd = rekey::change_key_apdu(&mut ch, 0, 1, &data).unwrap();
    assert_eq!(status(&t.transmit(&cmd).unwrap()), [0x91, 0x9D]);
    // Unauthenticated: authentication error.
    assert_eq!(
        status(&t.transmit(&apdu::wrap(INS_CHANGE_KEY, &[1; 41])).unwrap()),
        [0x91, 0xAE]
    );
    // In a key-0 session, a cryptogram whose CRC does not match the key: integrity error.
    let mut app = SoftwareHsm::new(&r.keys).unwrap();
    let (mut ch, _) = txn::open_session(&mut t, &mut app, KeyKind::App, &mut rng).unwrap();
    let mut bad = r
        .hsm
        .change_key_data(&change(KeyKind::Debit, 1, 2))
        .unwrap();
    bad[0] ^= 1;
    let cmd = rekey::change_key_apdu(&mut ch, 0, 1, &bad).unwrap();
    assert_eq!(status(&t.transmit(&cmd).unwrap()), [0x91, 0x1E]);
    // A key number past the four keys: no such key.
    let (mut ch, _) = txn::open_session(&mut t, &mut app, KeyKind::App, &mut rng).unwrap();
    let cmd = rekey::change_key_apdu(&mut ch, 0, 4, &data).unwrap();
    assert_eq!(status(&t.transmit(&cmd).unwrap()), [0x91, 0x40]);
    // A tampered MAC: integrity error.
    let (mut ch, _) = txn::open_session(&mut t, &mut app, KeyKind::App, &mut rng).unwrap();
    let mut cmd = rekey::change_key_apdu(&mut ch, 0, 1, &data).unwrap();
    let at = cmd.len() - 2;
    cmd[at] ^= 1;
    assert_eq!(status(&t.transmit(&cmd).unwrap()), [0x91, 0x1E]);
    assert_eq!(card.state().key_versions(), [1; 4]);
    debit_cleared(&mut r, &mut card, 10).unwrap();
    // GetKeyVersion answers per key; past key 3 there is no key.
    let mut t = reader(&mut card);
    t.transmit(&apdu::wrap(
        ins::SELECT_APPLICATION,
        &purse::keys::DEFAULT_AID,
    ))
    .unwrap();
    assert_eq!(
        t.transmit(&apdu::wrap(INS_GET_KEY_VERSION, &[3])).unwrap(),
        vec![1, 0x91, 0x00]
    );
    assert_eq!(
        status(&t.transmit(&apdu::wrap(INS_GET_KEY_VERSION, &[4])).unwrap()),
        [0x91, 0x40]
    );
}

#[test]
fn an_hsm_without_the_target_version_changes_nothing() {
    let mut r = rotated();
    let mut card = card_v1(&r, 1_000);
    let e = rekey::run(&mut reader(&mut card), &mut r.hsm, 3, &mut r.rng).unwrap_err();
    assert!(matches!(e, TxError::Sam(_)), "{e}");
    assert_eq!(card.state().key_versions(), [1; 4]);
    // A card newer than the target is not rolled back.
    rekey::run(&mut reader(&mut card), &mut r.hsm, 2, &mut r.rng).unwrap();
    let e = rekey::run(&mut reader(&mut card), &mut r.hsm, 1, &mut r.rng).unwrap_err();
    assert!(matches!(e, TxError::Protocol { .. }), "{e}");
    assert_eq!(card.state().key_versions(), [2; 4]);
    debit_cleared(&mut r, &mut card, 10).unwrap();
}

/// A transport that keeps every command and answer.
struct Recording<'a> {
    inner: EmulatedReader<'a, StdRng>,
    log: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Transport for Recording<'_> {
    fn card_uid(&mut self) -> Result<[u8; 7], purse::txn::TransportError> {
        self.inner.card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, purse::txn::TransportError> {
        let answer = self.inner.transmit(command)?;
        self.log.push((command.to_vec(), answer.clone()));
        Ok(answer)
    }
}

/// Feeds recorded answers to a fresh rotation (the same HSM randomness, so the same commands):
/// how it ended — `Some(Ok)` done, `Some(Err)` an error, `None` answers ran out.
fn replay(r: &mut Rotated, answers: &[Vec<u8>]) -> Option<Result<(), TxError>> {
    let (mut rk, _) = rekey::Rekey::start(UID, 2);
    let mut rng = StdRng::seed_from_u64(77);
    for a in answers {
        match rk.on_response(&mut r.hsm, &mut rng, a) {
            Ok(rekey::RekeyStep::Done(_)) => return Some(Ok(())),
            Ok(_) => {}
            Err(e) => return Some(Err(e)),
        }
    }
    None
}

#[test]
fn an_altered_answer_never_panics_and_an_altered_change_key_answer_is_refused() {
    let mut r = rotated();
    let mut card = card_v1(&r, 1_000);
    let mut t = Recording {
        inner: reader(&mut card),
        log: Vec::new(),
    };
    rekey::run(&mut t, &mut r.hsm, 2, &mut StdRng::seed_from_u64(77)).unwrap();
    let log = t.log;
    assert_eq!(log.len(), REKEY_APDUS);
    let answers: Vec<Vec<u8>> = log.iter().map(|(_, a)| a.clone()).collect();
    assert!(
        matches!(replay(&mut r, &answers), Some(Ok(()))),
        "a faithful replay"
    );
    for i in 0..answers.len() {
        let a = &answers[i];
        // Each variant with whether it changes the answer's data (a status byte may be
        // changed into an equivalent one: 90 00 reads as 91 00).
        let mut variants = vec![
            (Vec::new(), true),
            (a[a.len() - 2..].to_vec(), a.len() > 2),
            (a[..a.len() - 1].to_vec(), true),
        ];
        for at in 0..a.len() {
            let mut v = a.clone();
            v[at] ^= 0x01;
            variants.push((v, at + 2 < a.len()));
        }
        for (v, data_changed) in variants {
            let mut altered = answers.clone();
            altered[i] = v.clone();
            let end = replay(&mut r, &altered);
            // ChangeKey 1, 3, 2 are answered under the session MAC: any change is refused.
            let is_mac_d_change_key = log[i].0[1] == INS_CHANGE_KEY && log[i].0[5] != 0;
            if is_mac_d_change_key && data_changed {
                assert!(
                    matches!(end, Some(Err(_))),
                    "answer {i} altered to {v:02X?}: {end:?}"
                );
            }
        }
    }
}
