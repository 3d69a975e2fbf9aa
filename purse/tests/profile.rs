//! The profile file (`03`): the rider category the issuer writes at personalisation, read by
//! every terminal under the session MAC with the balance, written by no command.

mod common;

use common::Rig;
use purse::apdu::{self, ins};
use purse::card::{
    decode_profile, encode_profile, Card, Nvm, Personalisation, ProfileError, FILE_PROFILE,
    PROFILE_SIZE,
};
use purse::txn::{self, Decision, EmulatedReader, Outcome, Transport, TransportError, TxError};
use rand::rngs::StdRng;
use rand::SeedableRng;

const UID: [u8; 7] = [0x04, 0x51, 0x2E, 0x21, 0x80, 0x1D, 0x80];

fn card(rig: &Rig, category: &str) -> Card {
    let mut p = Personalisation::transit(UID, 10_000);
    p.rider_category = category.into();
    Card::personalise(&p, rig.hsm.card_keys(&UID, 1).unwrap())
}

fn snapshot(o: &Outcome) -> &txn::CardSnapshot {
    match o {
        Outcome::Committed { snapshot, .. } | Outcome::Refused { snapshot } => snapshot,
    }
}

#[test]
fn a_terminal_reads_the_rider_category_the_issuer_wrote() {
    let mut rig = Rig::new(31);
    let mut child = card(&rig, "child");
    let o = rig.debit(&mut child, 125).unwrap();
    assert_eq!(snapshot(&o).rider_category(), Some("child"));
    // Kept through committed transactions (the journal carries the whole state).
    assert_eq!(child.state().rider_category, "child");
    match rig.load(&mut child, 500).unwrap() {
        txn::LoadOutcome::Loaded { snapshot, .. } => {
            assert_eq!(snapshot.rider_category(), Some("child"))
        }
        other => panic!("{other:?}"),
    }
    let o = rig.debit(&mut child, 125).unwrap();
    assert_eq!(snapshot(&o).rider_category(), Some("child"));

    let mut plain = card(&rig, "");
    let o = rig.debit(&mut plain, 125).unwrap();
    assert_eq!(snapshot(&o).rider_category(), None);
}

/// Changes the answer to ReadData(profile) on its way back to the terminal.
struct Tamper<'a> {
    inner: EmulatedReader<'a, StdRng>,
}

impl Transport for Tamper<'_> {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        self.inner.card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        let mut resp = self.inner.transmit(command)?;
        if command.get(1) == Some(&ins::READ_DATA) && command.get(5) == Some(&FILE_PROFILE) {
            // "child" → "adult" in the id (bytes 2..7 of the file).
            resp[2..7].copy_from_slice(b"adult");
        }
        Ok(resp)
    }
}

#[test]
fn a_profile_changed_between_card_and_terminal_fails_the_mac() {
    let mut rig = Rig::new(32);
    let mut child = card(&rig, "child");
    let mut t = Tamper {
        inner: EmulatedReader {
            card: &mut child,
            rng: StdRng::seed_from_u64(1),
        },
    };
    let err = txn::debit(&mut t, &mut rig.sam, &mut rig.rng, |_| Decision::Apply {
        amount_minor: 100,
        record: None,
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            TxError::Sm {
                step: "read profile",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(child.state().balance_minor, 10_000);
}

#[test]
fn the_profile_file_is_read_under_mac_and_written_by_no_command() {
    let rig = Rig::new(33);
    let mut child = card(&rig, "child");
    let mut rng = StdRng::seed_from_u64(2);
    child.remove_from_field();
    let select = apdu::wrap(ins::SELECT_APPLICATION, &child.state().aid.clone());
    assert_eq!(child.process(&select, &mut rng).unwrap(), [0x91, 0x00]);
    // Without a session: authentication error, nothing read.
    let plain_read = apdu::wrap(ins::READ_DATA, &[FILE_PROFILE, 0, 0, 0, 0, 0, 0]);
    assert_eq!(child.process(&plain_read, &mut rng).unwrap(), [0x91, 0xAE]);
    // WriteRecord aimed at the profile file is refused (it is not the record file), and there
    // is no WriteData: the category stays what the issuer wrote.
    let write = apdu::wrap(ins::WRITE_RECORD, &[FILE_PROFILE, 0, 0, 0, 5, 0, 0, b'a']);
    assert_ne!(child.process(&write, &mut rng).unwrap(), [0x91, 0x00]);
    assert_eq!(
        child
            .process(&apdu::wrap(0x3D, &[FILE_PROFILE]), &mut rng)
            .unwrap(),
        [0x91, 0x1C]
    );
    assert_eq!(child.state().rider_category, "child");
}

#[test]
fn the_profile_encoding_is_strict() {
    let p = encode_profile("senior").unwrap();
    assert_eq!(p.len(), PROFILE_SIZE);
    assert_eq!(&p[..8], b"\x01\x06senior");
    assert_eq!(decode_profile(&p), Ok(Some("senior")));
    assert_eq!(decode_profile(&encode_profile("").unwrap()), Ok(None));
    let longest = "x".repeat(30);
    assert_eq!(
        decode_profile(&encode_profile(&longest).unwrap()),
        Ok(Some(&longest[..]))
    );
    assert_eq!(encode_profile(&"x".repeat(31)), Err(ProfileError::TooLong));
    assert_eq!(
        encode_profile("young adult"),
        Err(ProfileError::NotPrintable)
    );
    assert_eq!(encode_profile("a\nb"), Err(ProfileError::NotPrintable));
    let mut other_format = p;
    other_format[0] = 2;
    assert_eq!(decode_profile(&other_format), Err(ProfileError::Format));
    let mut trailing = p;
    trailing[20] = 1;
    assert_eq!(decode_profile(&trailing), Err(ProfileError::Format));
    let mut too_long = p;
    too_long[1] = 31;
    assert_eq!(decode_profile(&too_long), Err(ProfileError::Format));
    assert_eq!(decode_profile(&p[..31]), Err(ProfileError::Format));
}

/// Card images from before the profile file have no `rider_category`: they load as cards
/// with none. A card with none is written without the field, so its image is as before.
#[test]
fn card_images_stay_compatible() {
    let rig = Rig::new(34);
    let plain = card(&rig, "");
    let json = serde_json::to_string(plain.nvm()).unwrap();
    assert!(!json.contains("rider_category"), "{json}");
    let back: Nvm = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, plain.nvm());
    assert_eq!(back.main.rider_category, "");

    let child = card(&rig, "child");
    let json = serde_json::to_string(child.nvm()).unwrap();
    assert!(json.contains("\"rider_category\":\"child\""), "{json}");
    let back: Nvm = serde_json::from_str(&json).unwrap();
    assert_eq!(back.main.rider_category, "child");
    assert!(back.validate().is_ok());

    let mut bad = back;
    bad.main.rider_category = "x".repeat(31);
    assert!(bad.validate().is_err());
}
