//! The console's default tap log for a fare table's revenue impact (on LMDB, and on
//! PostgreSQL with `TAPGATE_TEST_LEDGER=postgres`): the fares the back office booked in the
//! window with the card's taps cleared without a charge between them, in counter order, at
//! the stop and route clearing kept; a tap cleared without its stop left out and counted.

use charging::clearing::{clear_batch, ClearingBatch, ClearingTap};
use charging::load::LoadConfig;
use charging::pages::recent_taps::recent_tap_log;
use purse::card::Card;
use purse::keys::KeySet;
use purse::receipt::CommitReceipt;
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::charging::load_service;
use tapgate_testkit::fixtures::{clearing_tap, transit_card};

/// 2023-11-14T22:13:20Z.
const T0: u64 = 1_700_000_000_000;
const DAY_MS: u64 = 86_400_000;

/// A tap at validator 1001 debiting `amount` (0: a tap without a charge, a transfer).
fn debit(sam: &mut SoftwareSam, card: &mut Card, amount: i32) -> CommitReceipt {
    let mut reader = EmulatedReader {
        card,
        rng: StdRng::seed_from_u64(1),
    };
    let decide = |_: &_| Decision::Apply {
        amount_minor: amount,
        record: Some(vec![1; 32]),
    };
    match txn::debit(&mut reader, sam, &mut StdRng::seed_from_u64(2), decide).unwrap() {
        Outcome::Committed { receipt, .. } => receipt,
        Outcome::Refused { .. } => panic!("refused"),
    }
}

#[test]
fn the_recent_taps_are_a_tap_log_in_the_cards_order() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(18));
    let (_pg, svc, _) = load_service(dir.path(), &keys, LoadConfig::default());
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let mut sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let uid = [0x04, 0x18, 7, 7, 7, 7, 7];
    svc.register_card(&uid, 5_000, T0).unwrap();
    let mut card = transit_card(&hsm, uid, 5_000);
    // A fare, a transfer (no charge), a fare cleared without its stop (an older gateway).
    let fare = debit(&mut sam, &mut card, 1_400);
    let transfer = debit(&mut sam, &mut card, 0);
    let unplaced = debit(&mut sam, &mut card, 1_400);
    let placed = |t: ClearingTap, stop: Option<u32>| ClearingTap {
        stop_id: stop,
        route_id: stop.map(|_| 9),
        kind: if t.amount_minor == 0 {
            "record_only".into()
        } else {
            t.kind.clone()
        },
        ..t
    };
    let taps = vec![
        placed(clearing_tap(&fare, 1), Some(12)),
        placed(clearing_tap(&transfer, 2), Some(13)),
        placed(clearing_tap(&unplaced, 3), None),
    ];
    let batch = ClearingBatch {
        batch_id: "gw-1-3".into(),
        taps,
    };
    let out = clear_batch(svc.ledger(), svc.hsm(), batch, T0).unwrap();
    assert_eq!(out.cleared, 3, "{out:?}");

    let l = svc.ledger();
    let r = l.read().unwrap();
    let log = recent_tap_log(&*r, T0 + 60_000, 7, 540).unwrap();
    assert_eq!(
        (log.taps, log.free, log.without_stop, log.beyond_limit),
        (2, 1, 1, 0),
        "{log:?}"
    );
    // Codes named as they are (no table published); local time UTC+9; the transfer at the
    // time of the tap before it.
    assert_eq!(
        log.csv,
        "card,rider,at,route,stop,kind\n\
         04180707070707,,2023-11-15T07:13:20,9,12,\n\
         04180707070707,,2023-11-15T07:13:20,9,13,\n"
    );
    // A week later the window is empty.
    let later = recent_tap_log(&*r, T0 + 8 * DAY_MS, 7, 0).unwrap();
    assert_eq!((later.taps, later.csv.lines().count()), (0, 1));
}
