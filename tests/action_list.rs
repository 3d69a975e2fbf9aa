//! Value bought online, picked up at the next tap, end to end: an order made at the charging
//! server reaches a validator over the gateway's MQTT relay (signed, applied with the
//! validator's own downlink code), the gate credits it at the card's next tap under the ceiling
//! the back office granted, the pick-up's tap goes back over MQTT through the gateway to
//! clearing, which completes the order once — and the withdrawal reaches the validator.

mod support;

use purse::actionlist::ActionList;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::txn::EmulatedReader;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::Duration;
use tapgate_http::auth::Role;
use tapgate_testkit::fixtures::token;
use validator::gate::Pickup;
use validator::journal::Journal;

const UID: [u8; 7] = [0x04, 0x1A, 0xC7, 0x10, 0x20, 0x30, 0x40];

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_reaches_the_validator_is_picked_up_once_and_completed_by_clearing() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(1919));
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port =
        tapgate_testkit::broker::embedded(&[("gateway", "gw-secret"), ("1001", "dev-secret")]);
    let back_office = tapgate_testkit::charging::start(&keys, |cfg| {
        cfg.tokens = vec![token("gw", Role::Gateway, "tg_gw")];
        cfg.operator = "metro".into();
    });

    // The cardholder's order: 5 000 from a registered card token.
    let svc = back_office.state.loads.clone();
    let order = tokio::task::spawn_blocking(move || {
        svc.register_card(&UID, 1_000, now_ms()).unwrap();
        svc.register_instrument("alice", "card", "tok_visa", now_ms())
            .unwrap();
        svc.create_order(
            "alice",
            &charging::load::OrderLimits::default(),
            charging::load::OrderRequest {
                uid: UID,
                amount_minor: 5_000,
                funding_source: "card".into(),
                instrument: "tok_visa".into(),
                idempotency_key: "o-1".into(),
            },
            now_ms(),
        )
        .unwrap()
    })
    .await
    .unwrap();

    // The validator's MQTT session: it reads the action list, and publishes its taps.
    let mut opts = MqttOptions::new("1001", "127.0.0.1", mqtt_port);
    opts.set_credentials("1001", "dev-secret");
    let (device, mut ev) = AsyncClient::new(opts, 100);
    device
        .subscribe("tapgate/v1/metro/actions/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    device
        .subscribe("tapgate/v1/metro/devices/1001/ceiling", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(bool, Vec<u8>)>();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.ends_with("/ceiling"), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _stats = support::spawn_metro_gateway(mqtt_port, &back_office.base, dir.path(), &keys);

    // The validator applies what the gateway relays, with its own downlink code.
    let journal = Journal::open(&dir.path().join("validator"), 100, 1 << 24).unwrap();
    let mut list = ActionList::new("metro");
    let pk = keys.verifying_key;
    tokio::time::timeout(Duration::from_secs(20), async {
        while list.get(order.id).is_none() {
            let (_, msg) = rx.recv().await.expect("the device's session");
            let _ = validator::daemon::apply_actions(&mut list, &journal, &pk, &msg, now_ms());
        }
    })
    .await
    .expect("the order reached the validator");

    // Its SAM's ceiling, granted by the back office (the gateway's grant relay asks the same
    // endpoint for every validator it has heard from).
    let sam = SoftwareSam::validator(&keys, 1001).unwrap();
    let mut gate =
        support::gate::metro_gate(sam, 1001, "Central", fare_rules::record::TapKind::Entry, 3);
    let base = back_office.base.clone();
    let grant: serde_json::Value = tokio::task::spawn_blocking(move || {
        ureq::post(&format!("{base}/v1/validators/1001/ceiling"))
            .set("Authorization", "Bearer tg_gw")
            .send_json(serde_json::json!({}))
            .unwrap()
            .into_json()
            .unwrap()
    })
    .await
    .unwrap();
    let bytes = hex::decode(grant["grant"].as_str().unwrap()).unwrap();
    validator::daemon::apply_action_grant(&mut gate, &journal, &bytes).unwrap();

    // The card's next tap: the order is credited, then the fare.
    let issuer = SoftwareHsm::new(&keys).unwrap();
    let mut card = Card::personalise(
        &Personalisation::transit(UID, 1_000),
        issuer.card_keys(&UID, 1).unwrap(),
    );
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(4),
    };
    let (pickup, tap) = gate
        .tap_with_actions(&mut reader, &journal, &list, now_ms(), &mut |_| {})
        .unwrap();
    assert!(
        matches!(
            pickup,
            Pickup::Applied {
                amount_minor: 5_000,
                ..
            }
        ),
        "{pickup:?}"
    );
    assert!(
        matches!(tap.answer, validator::gate::Answer::Accepted { .. }),
        "{tap:?}"
    );
    card.remove_from_field();
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(5),
    };
    let (again, tap2) = gate
        .tap_with_actions(
            &mut reader,
            &journal,
            &list,
            now_ms() + 3_600_000,
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(again, Pickup::Nothing, "once");

    // The journalled taps go to the gateway over MQTT; clearing completes the order.
    for (_, record) in journal.outbox_after(0, 100).unwrap() {
        device
            .publish(
                "tapgate/v1/metro/taps/1001",
                QoS::AtLeastOnce,
                false,
                record,
            )
            .await
            .unwrap();
    }
    let svc = back_office.state.loads.clone();
    let id = order.id;
    let completed = tokio::time::timeout(Duration::from_secs(30), async move {
        loop {
            let s = svc.clone();
            let o = tokio::task::spawn_blocking(move || s.order(id).unwrap())
                .await
                .unwrap();
            if o.state == charging::load::OrderState::Completed {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("clearing completed the order");
    assert_eq!(completed.picked_up.as_ref().unwrap().device_id, 1001);

    // The withdrawal reaches the validator, and so does its ceiling grant, which the gateway
    // asks for once it has heard from the device.
    let mut granted = false;
    tokio::time::timeout(Duration::from_secs(20), async {
        while list.get(order.id).is_some() || !granted {
            let (ceiling, msg) = rx.recv().await.expect("the device's session");
            if ceiling {
                let r = validator::daemon::apply_action_grant(&mut gate, &journal, &msg);
                assert!(r.is_ok(), "{r:?}");
                granted = true;
            } else {
                let _ = validator::daemon::apply_actions(&mut list, &journal, &pk, &msg, now_ms());
            }
        }
    })
    .await
    .expect("the withdrawal and the grant reached the validator");

    // The ledger follows the card: its shadow purse is the card's balance.
    let ledger = back_office.state.loads.ledger().clone();
    let shadow = tokio::task::spawn_blocking(move || {
        ledger
            .read()
            .unwrap()
            .balance(&charging::ledger::card_account(&UID))
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(shadow, i64::from(card.state().balance_minor));
    let fare = |a: &validator::gate::Answer| match a {
        validator::gate::Answer::Accepted { fare_minor, .. } => *fare_minor as i32,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        card.state().balance_minor + fare(&tap.answer) + fare(&tap2.answer),
        1_000 + 5_000,
        "the order credited once"
    );
}
