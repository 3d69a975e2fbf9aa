//! Arbitrary input into the emulated card: random bytes, random wrapped commands, and — the
//! deep end — commands with random headers and data that carry a valid session MAC, so they
//! reach every command's parser. The card never panics, its image stays valid, and value moves
//! only through a commit that consumes exactly one counter value.

mod common;

use common::Rig;
use proptest::prelude::*;
use purse::apdu::{self, ins};
use purse::keys::KeyKind;
use purse::sm::CommMode;
use purse::txn::{self, EmulatedReader, Transport};
use rand::rngs::StdRng;
use rand::SeedableRng;

const CODES: [u8; 14] = [
    ins::AUTH_EV2_FIRST,
    ins::ADDITIONAL_FRAME,
    ins::SELECT_APPLICATION,
    ins::GET_VALUE,
    ins::CREDIT,
    ins::DEBIT,
    ins::LIMITED_CREDIT,
    ins::WRITE_RECORD,
    ins::READ_RECORDS,
    ins::READ_DATA,
    ins::COMMIT_TRANSACTION,
    ins::ABORT_TRANSACTION,
    ins::GET_CARD_UID,
    0x64,
];

#[derive(Debug, Clone)]
enum Input {
    Raw(Vec<u8>),
    Wrapped(u8, Vec<u8>),
    Macd {
        code: u8,
        header_len: usize,
        body: Vec<u8>,
        full: bool,
    },
    Reauth,
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Input::Raw),
        (
            prop::sample::select(CODES.to_vec()),
            prop::collection::vec(any::<u8>(), 0..48)
        )
            .prop_map(|(c, d)| Input::Wrapped(c, d)),
        (
            prop::sample::select(CODES.to_vec()),
            0usize..8,
            prop::collection::vec(any::<u8>(), 0..40),
            any::<bool>()
        )
            .prop_map(|(code, header_len, body, full)| Input::Macd {
                code,
                header_len,
                body,
                full
            }),
        Just(Input::Reauth),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_commands_never_panic_and_never_move_value_without_a_counter(
        inputs in prop::collection::vec(input(), 1..40),
        key in prop::sample::select(vec![KeyKind::Debit, KeyKind::Credit]),
    ) {
        let mut rig = Rig::new(21);
        let mut card = rig.card(21, 10_000);
        let mut rng = StdRng::seed_from_u64(3);
        let mut reader = EmulatedReader { card: &mut card, rng: StdRng::seed_from_u64(4) };
        let mut open = |reader: &mut EmulatedReader<'_, StdRng>| {
            if key == KeyKind::Debit {
                txn::open_session(reader, &mut rig.sam, key, &mut rng).unwrap().0
            } else {
                txn::open_session(reader, &mut rig.hsm, key, &mut rng).unwrap().0
            }
        };
        let mut ch = open(&mut reader);
        let mut last = reader.card.state().clone();
        for inp in inputs {
            let apdu = match inp {
                Input::Reauth => {
                    // Any earlier error ended the session; a staged change is discarded.
                    ch = open(&mut reader);
                    last = reader.card.state().clone();
                    continue;
                }
                Input::Raw(b) => b,
                Input::Wrapped(c, d) => apdu::wrap(c, &d[..d.len().min(255)]),
                Input::Macd { code, header_len, body, full } => {
                    let h = header_len.min(body.len());
                    let mode = if full { CommMode::Full } else { CommMode::Mac };
                    match ch.command_apdu_ahead(0, code, &body[..h], &body[h..], mode) {
                        Ok(a) => a,
                        Err(_) => continue,
                    }
                }
            };
            let resp = reader.transmit(&apdu).expect("no tear injected");
            prop_assert!(resp.len() >= 2, "every answer ends in a status word");
            let (data, _) = apdu::parse_response(&resp).unwrap();
            // Keep the terminal's counter in step when the card answered under MAC.
            let _ = ch.open_response(data, CommMode::Mac);
            let now = reader.card.state().clone();
            prop_assert!(reader.card.nvm().validate().is_ok());
            if now.balance_minor != last.balance_minor || now.records != last.records {
                prop_assert_eq!(now.tmc, last.tmc + 1, "value or records moved without one counter step");
            } else {
                prop_assert!(now.tmc == last.tmc || now.tmc == last.tmc + 1);
            }
            prop_assert!(now.balance_minor >= 0 && now.balance_minor <= now.upper_limit_minor);
            last = now;
        }
    }
}

/// GetCardUID answers in FULL mode: only the session holder can read the real UID.
#[test]
fn get_card_uid_is_encrypted_and_macd() {
    let mut rig = Rig::new(22);
    let mut card = rig.card(22, 100);
    let uid = card.state().uid;
    let mut rng = StdRng::seed_from_u64(3);
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(4),
    };
    let (mut ch, _) =
        txn::open_session(&mut reader, &mut rig.sam, KeyKind::Debit, &mut rng).unwrap();
    let cmd = ch
        .command_apdu_ahead(0, ins::GET_CARD_UID, &[], &[], CommMode::Mac)
        .unwrap();
    let resp = reader.transmit(&cmd).unwrap();
    let (data, status) = apdu::parse_response(&resp).unwrap();
    assert_eq!(status, apdu::Status::Ok);
    assert!(!data.windows(7).any(|w| w == uid), "UID in clear");
    assert_eq!(
        ch.open_response(data, CommMode::Full).unwrap(),
        uid.to_vec()
    );
}
