//! Value bought online, picked up at the next tap (the action list): the gate credits a listed
//! order once, within the ceiling the back office granted its SAM, whatever happens — a tear
//! mid-credit, two validators holding the same order, an expired order, an exhausted ceiling,
//! a stolen validator.

use fare_rules::record::TapKind;
use purse::actionlist::{self, ActionList, ActionUpdate, Entry, Order};
use purse::blocklist::{Blocklist, ListKind};
use purse::card::Card;
use purse::keys::KeySet;
use purse::receipt::TxKind;
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use purse::tap::TapRecord;
use purse::txn::EmulatedReader;
use rand::rngs::StdRng;
use rand::SeedableRng;
use validator::gate::{Answer, Gate, Pickup, PickupRefusal, TapOutcome};
use validator::journal::Journal;

mod support;
use support::{metro_gate, personalise, Rig, START_MINOR, T0_MS, UID};

const DAY_S: u64 = 86_400;

fn rig() -> Rig {
    Rig::new(17)
}

/// A gate of device `device_id` whose SAM the back office granted `ceiling_minor`.
fn gate(r: &Rig, device_id: u32, stop: &str, ceiling_minor: i64) -> Gate {
    let mut sam = SoftwareSam::validator(&r.keys, device_id).unwrap();
    if ceiling_minor > 0 {
        let grant = r.hsm.action_grant(device_id, 1, ceiling_minor).unwrap();
        sam.apply_action_grant(&grant).unwrap();
    }
    metro_gate(sam, device_id, stop, TapKind::Entry, u64::from(device_id))
}

fn order(r: &Rig, uid: [u8; 7], id: u64, amount: i32, expires_s: u64) -> Order {
    Order {
        order_id: id,
        uid,
        amount_minor: amount,
        expires_s,
        key_version: 1,
        wrapped_key: r.hsm.wrap_order_key(&uid, 1).unwrap(),
    }
}

/// The back office's signed snapshot of `orders`, as a validator applies it.
fn list(r: &Rig, orders: Vec<Order>) -> ActionList {
    let u = ActionUpdate {
        kind: ListKind::Snapshot,
        operator: "metro".into(),
        from_version: 0,
        to_version: 1,
        entries: orders.into_iter().map(Entry::Add).collect(),
    };
    let mut l = ActionList::new("metro");
    l.apply(
        &u.sign_with(|b| r.hsm.sign(b).unwrap()),
        &r.hsm.verifying_key(),
    )
    .unwrap();
    l
}

fn repower(hsm: &SoftwareHsm, card: &mut Card) {
    if card.is_torn() {
        let nvm = card.nvm().clone();
        let uid = card.state().uid;
        *card = Card::power_on(nvm, hsm.card_keys(&uid, 1).unwrap());
    }
    card.remove_from_field();
}

fn tap(g: &mut Gate, r: &mut Rig, j: &Journal, l: &ActionList, at_ms: u64) -> (Pickup, TapOutcome) {
    let mut reader = EmulatedReader {
        card: &mut r.card,
        rng: &mut r.card_rng,
    };
    let out = g
        .tap_with_actions(&mut reader, j, l, at_ms, &mut |_| {})
        .unwrap();
    repower(&r.hsm, &mut r.card);
    out
}

/// Every journalled tap, verified with device `device_id`'s key.
fn journalled(j: &Journal, r: &Rig, device_id: u32) -> Vec<TapRecord> {
    let key = r.hsm.device_key(device_id).unwrap();
    j.outbox_after(0, 1000)
        .unwrap()
        .into_iter()
        .map(|(_, w)| TapRecord::decode_verified(&w, "metro", |_| Some(key.clone())).unwrap())
        .collect()
}

fn sum(taps: &[TapRecord], kind: TxKind) -> i64 {
    taps.iter()
        .filter(|t| t.refusal().is_none() && t.kind() == kind)
        .map(|t| i64::from(t.amount_minor()))
        .sum()
}

fn journal() -> (tempfile::TempDir, Journal) {
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 100, 1 << 24).unwrap();
    (d, j)
}

#[test]
fn an_order_is_picked_up_once_at_the_next_tap_and_clearing_can_prove_it() {
    let mut r = rig();
    let (_d, j) = journal();
    let l = list(&r, vec![order(&r, UID, 41, 5_000, T0_MS / 1000 + DAY_S)]);
    let mut g = gate(&r, 1001, "Central", 20_000);
    let (p, t) = tap(&mut g, &mut r, &j, &l, T0_MS);
    assert!(
        matches!(
            p,
            Pickup::Applied {
                order_id: 41,
                amount_minor: 5_000,
                balance_minor: 15_000,
                ..
            }
        ),
        "{p:?}"
    );
    assert!(matches!(t.answer, Answer::Accepted { .. }), "{t:?}");
    assert_eq!(g.sam.ceiling_minor(), 15_000);
    let taps = journalled(&j, &r, 1001);
    let credit: Vec<&TapRecord> = taps.iter().filter(|t| t.kind() == TxKind::Credit).collect();
    assert_eq!(credit.len(), 1);
    assert_eq!(actionlist::order_of_tap(credit[0]), Some(41));
    // The credit's transaction MAC is the card's: the HSM verifies it (clearing's proof).
    let claim = purse::receipt::TxClaim {
        uid: UID,
        tmc: credit[0].tmc(),
        tmv: credit[0].tmv(),
        kind: TxKind::Credit,
        amount_minor: 5_000,
        balance_after_minor: credit[0].balance_after_minor(),
        key_version: 1,
        reader_id: None,
    };
    r.hsm.verify_claim(&claim).unwrap();
    assert!(j.order_applied(41).unwrap());
    // The next taps pick nothing up; the card's value moved by the credit once.
    for k in 1..4 {
        let (p, _) = tap(&mut g, &mut r, &j, &l, T0_MS + k * 3_600_000);
        assert_eq!(p, Pickup::Nothing);
    }
    let taps = journalled(&j, &r, 1001);
    assert_eq!(
        i64::from(r.card.state().balance_minor),
        i64::from(START_MINOR) + sum(&taps, TxKind::Credit) - sum(&taps, TxKind::Debit)
    );
    assert_eq!(sum(&taps, TxKind::Credit), 5_000);
}

#[test]
fn two_validators_holding_the_same_order_apply_it_once() {
    let mut r = rig();
    let (_da, ja) = journal();
    let (_db, jb) = journal();
    let l = list(&r, vec![order(&r, UID, 7, 3_000, T0_MS / 1000 + DAY_S)]);
    let mut a = gate(&r, 1001, "Central", 10_000);
    let mut b = gate(&r, 1002, "Market", 10_000);
    let (pa, _) = tap(&mut a, &mut r, &ja, &l, T0_MS);
    assert!(matches!(pa, Pickup::Applied { order_id: 7, .. }), "{pa:?}");
    // B has not heard of A's tap: the card's own pick-up record tells it.
    let (pb, tb) = tap(&mut b, &mut r, &jb, &l, T0_MS + 3_600_000);
    assert_eq!(pb, Pickup::AlreadyOnCard { order_id: 7 });
    assert!(matches!(tb.answer, Answer::Accepted { .. }), "{tb:?}");
    assert!(jb.order_applied(7).unwrap());
    assert_eq!(b.sam.ceiling_minor(), 10_000, "B's ceiling untouched");
    let (pb, _) = tap(&mut b, &mut r, &jb, &l, T0_MS + 7_200_000);
    assert_eq!(pb, Pickup::Nothing);
    let (ta, tb) = (journalled(&ja, &r, 1001), journalled(&jb, &r, 1002));
    assert_eq!(sum(&ta, TxKind::Credit) + sum(&tb, TxKind::Credit), 3_000);
    assert_eq!(
        i64::from(r.card.state().balance_minor),
        i64::from(START_MINOR) + 3_000 - sum(&ta, TxKind::Debit) - sum(&tb, TxKind::Debit)
    );
}

#[test]
fn an_expired_order_or_a_blocked_card_is_not_credited_and_the_tap_goes_on() {
    let mut r = rig();
    let (_d, j) = journal();
    let now_s = T0_MS / 1000;
    let l = list(&r, vec![order(&r, UID, 9, 2_000, now_s)]);
    let mut g = gate(&r, 1001, "Central", 10_000);
    let (p, t) = tap(&mut g, &mut r, &j, &l, T0_MS);
    assert_eq!(p, Pickup::Nothing, "expired at its expiry");
    let Answer::Accepted { balance_minor, .. } = t.answer else {
        panic!("{t:?}")
    };
    assert!(balance_minor < START_MINOR);
    assert_eq!(g.sam.ceiling_minor(), 10_000);

    let l = list(&r, vec![order(&r, UID, 10, 2_000, now_s + DAY_S)]);
    let mut blocked = Blocklist::new("metro");
    let u = purse::blocklist::ListUpdate {
        kind: ListKind::Snapshot,
        operator: "metro".into(),
        from_version: 0,
        to_version: 1,
        entries: vec![(UID, true)],
    };
    blocked
        .apply(
            &u.sign_with(|b| r.hsm.sign(b).unwrap()),
            &r.hsm.verifying_key(),
        )
        .unwrap();
    g.blocklist = blocked;
    let before = r.card.state().balance_minor;
    let (p, _) = tap(&mut g, &mut r, &j, &l, T0_MS + 3_600_000);
    assert_eq!(
        p,
        Pickup::NotApplied {
            order_id: 10,
            why: PickupRefusal::Blocklisted
        }
    );
    assert_eq!(r.card.state().balance_minor, before);
}

#[test]
fn an_exhausted_ceiling_applies_nothing_and_the_debit_still_works() {
    let mut r = rig();
    let (_d, j) = journal();
    let l = list(&r, vec![order(&r, UID, 3, 5_000, T0_MS / 1000 + DAY_S)]);
    let mut g = gate(&r, 1001, "Central", 4_999);
    let (p, t) = tap(&mut g, &mut r, &j, &l, T0_MS);
    assert_eq!(
        p,
        Pickup::NotApplied {
            order_id: 3,
            why: PickupRefusal::CeilingExhausted {
                remaining_minor: 4_999
            }
        }
    );
    let Answer::Accepted { fare_minor, .. } = t.answer else {
        panic!("{t:?}")
    };
    assert_eq!(
        r.card.state().balance_minor,
        START_MINOR - fare_minor as i32
    );
    // The back office tops the ceiling up (a MAC'd, numbered grant): the next tap picks it up.
    g.sam
        .apply_action_grant(&r.hsm.action_grant(1001, 2, 5_000).unwrap())
        .unwrap();
    let (p, _) = tap(&mut g, &mut r, &j, &l, T0_MS + 3_600_000);
    assert!(matches!(p, Pickup::Applied { order_id: 3, .. }), "{p:?}");
    assert_eq!(g.sam.ceiling_minor(), 0);
}

#[test]
fn a_stolen_validator_credits_at_most_its_ceiling_and_only_listed_cards() {
    let mut r = rig();
    let other_uid = [0x04, 0x99, 0x22, 0x33, 0x44, 0x55, 0x66];
    let unlisted_uid = [0x04, 0x77, 0x22, 0x33, 0x44, 0x55, 0x66];
    let exp = T0_MS / 1000 + DAY_S;
    let l = list(
        &r,
        vec![
            order(&r, UID, 1, 6_000, exp),
            order(&r, other_uid, 2, 6_000, exp),
        ],
    );
    let mut g = gate(&r, 1001, "Central", 8_000);
    let mut cards = [
        std::mem::replace(&mut r.card, personalise(&r.hsm, UID)),
        personalise(&r.hsm, other_uid),
        personalise(&r.hsm, unlisted_uid),
    ];
    // The thief taps every card again and again, wiping the journal each time so it forgets
    // what it applied: the SAM still credits each order at most once, within its ceiling.
    for round in 0..3u64 {
        for card in cards.iter_mut() {
            let (_d, j) = journal();
            let mut reader = EmulatedReader {
                card,
                rng: StdRng::seed_from_u64(round),
            };
            g.pick_up(&mut reader, &j, &l, T0_MS + round * 60_000, &mut |_| {})
                .unwrap();
            repower(&r.hsm, card);
        }
    }
    let credited: i64 = cards
        .iter()
        .map(|c| i64::from(c.state().balance_minor - START_MINOR))
        .sum();
    assert_eq!(credited, 6_000, "one order fits the 8 000 ceiling, not two");
    assert_eq!(cards[2].state().balance_minor, START_MINOR, "unlisted");
    assert_eq!(g.sam.ceiling_minor(), 2_000);
    // Driving the SAM directly: no credit key for any card, not even a listed one.
    let mut reader = EmulatedReader {
        card: &mut cards[2],
        rng: StdRng::seed_from_u64(5),
    };
    assert!(purse::txn::run(
        &mut reader,
        &mut g.sam,
        purse::keys::KeyKind::Credit,
        purse::apdu::ins::CREDIT,
        &mut StdRng::seed_from_u64(6),
        |_| purse::txn::Decision::Apply {
            amount_minor: 1,
            record: None
        },
    )
    .is_err());
    assert_eq!(cards[2].state().balance_minor, START_MINOR);
}

/// A tear after `n` card NVM writes of the pick-up's commit, then the card's next taps.
#[test]
fn a_card_pulled_mid_credit_at_every_write_is_credited_at_most_once_and_settled() {
    for n in 0..8u32 {
        let mut r = rig();
        let (_d, j) = journal();
        let (_d2, j2) = journal();
        let l = list(&r, vec![order(&r, UID, 5, 2_500, T0_MS / 1000 + DAY_S)]);
        let mut g = gate(&r, 1001, "Central", 10_000);
        r.card.tear_after_writes(Some(n));
        let (first, _) = tap(&mut g, &mut r, &j, &l, T0_MS);
        r.card.tear_after_writes(None);
        // The next tap here settles the tear; then another validator holding the order.
        let (second, _) = tap(&mut g, &mut r, &j, &l, T0_MS + 3_600_000);
        let mut g2 = gate(&r, 1002, "Market", 10_000);
        let (third, _) = tap(&mut g2, &mut r, &j2, &l, T0_MS + 7_200_000);
        match first {
            Pickup::Torn { order_id: 5 } => assert_eq!(second, Pickup::Settling, "n={n}"),
            Pickup::Applied { order_id: 5, .. } => assert_eq!(second, Pickup::Nothing, "n={n}"),
            other => panic!("n={n}: {other:?}"),
        }
        assert!(j.pending_pickup(&UID).unwrap().is_none(), "n={n}: settled");
        let (t1, t2) = (journalled(&j, &r, 1001), journalled(&j2, &r, 1002));
        let credits = sum(&t1, TxKind::Credit) + sum(&t2, TxKind::Credit);
        assert_eq!(
            credits, 2_500,
            "n={n}: applied exactly once: {first:?} {second:?} {third:?}"
        );
        assert_eq!(
            i64::from(r.card.state().balance_minor),
            i64::from(START_MINOR) + credits - sum(&t1, TxKind::Debit) - sum(&t2, TxKind::Debit),
            "n={n}: value conserved"
        );
        let on_card = r
            .card
            .state()
            .records
            .iter()
            .filter(|rec| actionlist::order_on_record(&rec[..]) == Some(5))
            .count();
        assert_eq!(on_card, 1, "n={n}");
    }
}

#[test]
fn the_action_list_from_the_downlink_is_verified_journalled_and_restored() {
    use validator::daemon::{apply_actions, restore_actions, DownlinkOutcome};
    let r = rig();
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 100, 1 << 24).unwrap();
    let pk = r.hsm.verifying_key();
    let sign = |u: &ActionUpdate| u.sign_with(|b| r.hsm.sign(b).unwrap());
    let exp = T0_MS / 1000 + DAY_S;
    let snap = ActionUpdate {
        kind: ListKind::Snapshot,
        operator: "metro".into(),
        from_version: 0,
        to_version: 4,
        entries: vec![Entry::Add(order(&r, UID, 1, 500, exp))],
    };
    let delta = ActionUpdate {
        kind: ListKind::Delta,
        operator: "metro".into(),
        from_version: 4,
        to_version: 5,
        entries: vec![Entry::Add(order(&r, UID, 2, 700, exp))],
    };
    let mut l = ActionList::new("metro");
    assert_eq!(
        apply_actions(&mut l, &j, &pk, &sign(&snap), T0_MS),
        Ok(DownlinkOutcome::Applied(4))
    );
    assert_eq!(
        apply_actions(&mut l, &j, &pk, &sign(&snap), T0_MS),
        Ok(DownlinkOutcome::AlreadyHeld { held: 4, got: 4 })
    );
    // Forged (another key) or altered: refused, nothing changes or is journalled.
    let forger = SoftwareHsm::new(&KeySet::generate(&mut StdRng::seed_from_u64(99))).unwrap();
    let forged = delta.sign_with(|b| forger.sign(b).unwrap());
    assert!(apply_actions(&mut l, &j, &pk, &forged, T0_MS).is_err());
    let mut altered = sign(&delta);
    let n = altered.len();
    altered[n - 70] ^= 1;
    assert!(apply_actions(&mut l, &j, &pk, &altered, T0_MS).is_err());
    assert_eq!(l.version(), 4);
    assert_eq!(
        apply_actions(&mut l, &j, &pk, &sign(&delta), T0_MS),
        Ok(DownlinkOutcome::Applied(5))
    );
    drop(j);
    let j = Journal::open(d.path(), 100, 1 << 24).unwrap();
    let back = restore_actions("metro", &j, &pk).unwrap();
    assert_eq!(back, l);
    assert_eq!(back.for_card(&UID, T0_MS / 1000).len(), 2);
}

#[test]
fn the_ceiling_grant_from_the_downlink_survives_a_restart_less_what_was_spent() {
    use validator::daemon::{apply_action_grant, restore_action_ceiling, DownlinkOutcome};
    let mut r = rig();
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 100, 1 << 24).unwrap();
    let mut g = gate(&r, 1001, "Central", 0);
    let grant = |seq, total| r.hsm.action_grant(1001, seq, total).unwrap().encode();
    assert_eq!(
        apply_action_grant(&mut g, &j, &grant(1, 5_000)),
        Ok(DownlinkOutcome::Applied(1))
    );
    assert_eq!(
        apply_action_grant(&mut g, &j, &grant(1, 5_000)),
        Ok(DownlinkOutcome::AlreadyHeld { held: 1, got: 1 })
    );
    let other = r.hsm.action_grant(1002, 2, 90_000).unwrap().encode();
    assert!(apply_action_grant(&mut g, &j, &other).is_err());
    let mut forged = grant(2, 90_000);
    forged[27] ^= 1;
    assert!(apply_action_grant(&mut g, &j, &forged).is_err());
    assert!(apply_action_grant(&mut g, &j, b"nonsense").is_err());
    assert_eq!(g.sam.ceiling_minor(), 5_000);
    let l = list(&r, vec![order(&r, UID, 8, 3_000, T0_MS / 1000 + DAY_S)]);
    let (p, _) = tap(&mut g, &mut r, &j, &l, T0_MS);
    assert!(matches!(p, Pickup::Applied { order_id: 8, .. }), "{p:?}");
    assert_eq!(j.ceiling_spent().unwrap(), 3_000);
    // The validator restarts: a fresh SAM gets its ceiling back from the journal, not more.
    drop(j);
    let j = Journal::open(d.path(), 100, 1 << 24).unwrap();
    let mut g = gate(&r, 1001, "Central", 0);
    restore_action_ceiling(&mut g, &j).unwrap();
    assert_eq!(g.sam.ceiling_minor(), 2_000);
    assert_eq!(g.sam.action_grant(), (1, 5_000));
}

/// A tear mid-credit at one validator, then the card at another before it comes back: the
/// credit is journalled once, by whichever validator can still prove it.
#[test]
fn a_credit_torn_at_one_validator_is_proved_by_the_next_one_the_card_meets() {
    for n in 0..8u32 {
        let mut r = rig();
        let (_da, ja) = journal();
        let (_db, jb) = journal();
        let l = list(&r, vec![order(&r, UID, 6, 2_500, T0_MS / 1000 + DAY_S)]);
        let mut a = gate(&r, 1001, "Central", 10_000);
        let mut b = gate(&r, 1002, "Market", 10_000);
        r.card.tear_after_writes(Some(n));
        let (first, _) = tap(&mut a, &mut r, &ja, &l, T0_MS);
        r.card.tear_after_writes(None);
        let (at_b, _) = tap(&mut b, &mut r, &jb, &l, T0_MS + 3_600_000);
        let (back_at_a, _) = tap(&mut a, &mut r, &ja, &l, T0_MS + 7_200_000);
        let (ta, tb) = (journalled(&ja, &r, 1001), journalled(&jb, &r, 1002));
        // Both may hold it (the same card counter and TMV: one tap to clearing); by counter,
        // it is there once.
        let by_counter: std::collections::BTreeMap<u32, i32> = ta
            .iter()
            .chain(&tb)
            .filter(|t| t.kind() == TxKind::Credit)
            .map(|t| (t.tmc(), t.amount_minor()))
            .collect();
        let credits: i64 = by_counter.values().map(|a| i64::from(*a)).sum();
        for t in ta.iter().chain(&tb).filter(|t| t.kind() == TxKind::Credit) {
            let mut same = ta.iter().chain(&tb).filter(|u| u.tmc() == t.tmc());
            assert!(
                same.all(|u| u.tmv() == t.tmv()),
                "n={n}: one proof per counter"
            );
        }
        assert_eq!(
            credits, 2_500,
            "n={n}: journalled once: {first:?} {at_b:?} {back_at_a:?}"
        );
        assert_eq!(
            i64::from(r.card.state().balance_minor),
            i64::from(START_MINOR) + credits - sum(&ta, TxKind::Debit) - sum(&tb, TxKind::Debit),
            "n={n}: value conserved"
        );
        assert!(ja.pending_pickup(&UID).unwrap().is_none(), "n={n}");
        assert!(jb.order_applied(6).unwrap(), "n={n}");
    }
}
