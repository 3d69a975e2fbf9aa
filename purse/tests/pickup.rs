//! Action-list pick-ups at the SAM: a validator SAM credits only listed cards, only the order's
//! amount, once per order, under the ceiling the back office granted — even driven by a thief
//! who holds the validator (its SAM and every message it received).

mod common;

use common::Rig;
use purse::actionlist::{ActionList, ActionUpdate, Entry, Order};
use purse::apdu::ins;
use purse::blocklist::ListKind;
use purse::card::Card;
use purse::keys::KeyKind;
use purse::receipt::TxKind;
use purse::sam::{Hsm, SamError, SoftwareSam};
use purse::txn::TxError;
use tapgate_testkit::fixtures::value_tx;

const NOW: u64 = 1_800_000_000;

fn order(rig: &Rig, card: &Card, id: u64, amount: i32) -> Order {
    let uid = card.state().uid;
    Order {
        order_id: id,
        uid,
        amount_minor: amount,
        expires_s: NOW + 86_400,
        key_version: 1,
        wrapped_key: rig.hsm.wrap_order_key(&uid, 1).unwrap(),
    }
}

fn list(rig: &Rig, orders: Vec<Order>) -> ActionList {
    let u = ActionUpdate {
        kind: ListKind::Snapshot,
        operator: "metro".into(),
        from_version: 0,
        to_version: 1,
        entries: orders.into_iter().map(Entry::Add).collect(),
    };
    let bytes = u.sign_with(|b| rig.hsm.sign(b).unwrap());
    let mut l = ActionList::new("metro");
    l.apply(&bytes, &rig.hsm.verifying_key()).unwrap();
    l
}

#[test]
fn a_listed_order_is_credited_once_within_the_ceiling() {
    let rig = Rig::new(40);
    let mut sam = SoftwareSam::validator(&rig.keys, 1001).unwrap();
    sam.apply_action_grant(&rig.hsm.action_grant(1001, 1, 1_000).unwrap())
        .unwrap();
    let mut card = rig.card(40, 100);
    let l = list(&rig, vec![order(&rig, &card, 7, 600)]);
    let o = l.get(7).unwrap();
    let r = value_tx(
        &mut sam.pickup(o, NOW).unwrap(),
        &mut card,
        KeyKind::Credit,
        ins::CREDIT,
        600,
    )
    .unwrap();
    assert_eq!((r.kind(), r.balance_after_minor()), (TxKind::Credit, 700));
    rig.hsm.verify_tmac(&r).unwrap();
    assert_eq!(sam.ceiling_minor(), 400);
    // Once per order, whatever the host says.
    assert!(matches!(sam.pickup(o, NOW), Err(SamError::NotAllowed(_))));
    assert_eq!(card.state().balance_minor, 700);
}

#[test]
fn a_stolen_validator_credits_at_most_its_ceiling_and_only_listed_cards() {
    let rig = Rig::new(41);
    // The thief holds the validator: its SAM (granted 1 000) and the list it received.
    let mut sam = SoftwareSam::validator(&rig.keys, 1001).unwrap();
    sam.apply_action_grant(&rig.hsm.action_grant(1001, 1, 1_000).unwrap())
        .unwrap();
    let mut listed = rig.card(41, 0);
    let mut other_listed = rig.card(42, 0);
    let mut unlisted = rig.card(43, 0);
    let l = list(
        &rig,
        vec![
            order(&rig, &listed, 1, 700),
            order(&rig, &other_listed, 2, 700),
        ],
    );
    let (o1, o2) = (l.get(1).unwrap(), l.get(2).unwrap());

    // An unlisted card: the SAM has no credit master and no key for it, through any order.
    let err = value_tx(&mut sam, &mut unlisted, KeyKind::Credit, ins::CREDIT, 100).unwrap_err();
    assert!(matches!(err, TxError::UnknownKeyVersion(1)), "{err}");
    let err = value_tx(
        &mut sam.pickup(o1, NOW).unwrap(),
        &mut unlisted,
        KeyKind::Credit,
        ins::CREDIT,
        700,
    )
    .unwrap_err();
    assert!(
        matches!(err, TxError::Sam(SamError::KeyNotHeld { .. })),
        "{err}"
    );
    // The debit key cannot credit either (the card's access rights).
    assert!(value_tx(&mut sam, &mut unlisted, KeyKind::Debit, ins::CREDIT, 100).is_err());
    assert_eq!(unlisted.state().balance_minor, 0);

    // A listed card, but more than its order: refused before the card is touched.
    let err = value_tx(
        &mut sam.pickup(o1, NOW).unwrap(),
        &mut listed,
        KeyKind::Credit,
        ins::CREDIT,
        100_000,
    )
    .unwrap_err();
    assert!(
        matches!(err, TxError::Sam(SamError::NotAllowed(_))),
        "{err}"
    );
    // The order's amount: credited once.
    value_tx(
        &mut sam.pickup(o1, NOW).unwrap(),
        &mut listed,
        KeyKind::Credit,
        ins::CREDIT,
        700,
    )
    .unwrap();
    // The second listed order is over the remaining ceiling (300).
    let err = value_tx(
        &mut sam.pickup(o2, NOW).unwrap(),
        &mut other_listed,
        KeyKind::Credit,
        ins::CREDIT,
        700,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            TxError::Sam(SamError::CeilingExceeded {
                remaining_minor: 300,
                ..
            })
        ),
        "{err}"
    );
    // A replayed or forged grant adds nothing.
    let grant = rig.hsm.action_grant(1001, 1, 1_000).unwrap();
    assert!(sam.apply_action_grant(&grant).is_err());
    let mut forged = rig.hsm.action_grant(1001, 2, 1).unwrap();
    forged.total_minor = 1_000_000;
    assert!(sam.apply_action_grant(&forged).is_err());
    assert_eq!(sam.ceiling_minor(), 300);
    // An expired order opens nothing.
    assert!(sam.pickup(o2, NOW + 86_400).is_err());
    let total: i32 = [&listed, &other_listed, &unlisted]
        .iter()
        .map(|c| c.state().balance_minor)
        .sum();
    assert_eq!(
        total, 700,
        "at most the granted ceiling, only to listed cards"
    );
}

#[test]
fn action_grants_are_cumulative_numbered_and_restored_with_what_was_spent() {
    use purse::sam::ActionGrant;
    let rig = Rig::new(44);
    let mut sam = SoftwareSam::validator(&rig.keys, 1001).unwrap();
    let g = |seq, total| rig.hsm.action_grant(1001, seq, total).unwrap();
    // A missed grant does not matter: the next one carries the total.
    sam.apply_action_grant(&g(3, 5_000)).unwrap();
    assert_eq!(sam.ceiling_minor(), 5_000);
    assert!(sam.apply_action_grant(&g(3, 9_000)).is_err(), "same number");
    assert!(
        sam.apply_action_grant(&g(4, 4_000)).is_err(),
        "a smaller total"
    );
    sam.apply_action_grant(&g(5, 8_000)).unwrap();
    assert_eq!(sam.ceiling_minor(), 8_000);
    assert_eq!(sam.action_grant(), (5, 8_000));
    // Another device's grant, a franchise grant, an altered one: refused.
    assert!(sam
        .apply_action_grant(&rig.hsm.action_grant(1002, 9, 1_000_000).unwrap())
        .is_err());
    assert!(sam
        .apply_ceiling_grant(&rig.hsm.ceiling_grant(1001, 9, 1_000_000).unwrap())
        .is_err());
    let mut altered = g(6, 9_000);
    altered.total_minor = 90_000;
    assert!(sam.apply_action_grant(&altered).is_err());
    assert_eq!(
        ActionGrant::decode(&g(6, 9_000).encode()),
        Some(g(6, 9_000))
    );
    assert_eq!(ActionGrant::decode(&[0; 28]), None);
    // A restarted software SAM: the last grant less what its host journalled as spent.
    let mut again = SoftwareSam::validator(&rig.keys, 1001).unwrap();
    again.restore_action_ceiling(&g(5, 8_000), 3_000).unwrap();
    assert_eq!(again.ceiling_minor(), 5_000);
    assert!(
        again.restore_action_ceiling(&g(5, 8_000), 0).is_err(),
        "once"
    );
    // A franchise SAM takes no action grant.
    let mut f = SoftwareSam::franchise(&rig.keys, 1001, 0).unwrap();
    assert!(f.apply_action_grant(&g(7, 1_000)).is_err());
}
