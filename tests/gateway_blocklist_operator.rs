//! A back office that signs another operator's blocklists (a charging server left at the default
//! operator) would have every validator refuse every update, silently: the gateway relays none
//! of them, says so (a log line and `tapgate_gateway_blocklists_refused_total`) and keeps its
//! version where it was. (In the root tests: it runs the real charging server.)

mod support;

use purse::keys::KeySet;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tapgate_http::auth::Role;
use tapgate_testkit::fixtures::token;
use tapgate_testkit::wait_until_async;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_operators_blocklist_is_not_relayed() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(15));
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = tapgate_testkit::broker::embedded(&[("gateway", "gw-secret")]);

    // The charging server signs for operator "default" (its config left unset).
    let back_office = tapgate_testkit::charging::start(&keys, |cfg| {
        cfg.tokens = vec![token("gw", Role::Gateway, "tg_gw")];
        assert_eq!(cfg.operator, "default");
    });
    let uid = [4, 9, 9, 9, 9, 9, 9];
    let ledger = back_office.state.loads.ledger().clone();
    tokio::task::spawn_blocking(move || {
        ledger
            .transact(move |t| t.set_blocked(&uid, true, "lost", 0).map(|_| ()))
            .unwrap()
    })
    .await
    .unwrap();

    // A listener on the metro blocklist topics, and the metro gateway.
    let mut opts = MqttOptions::new("listener", "127.0.0.1", mqtt_port);
    opts.set_credentials("gateway", "gw-secret");
    let (client, mut ev) = AsyncClient::new(opts, 100);
    client
        .subscribe("tapgate/v1/+/blocklist/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let heard = Arc::new(AtomicU64::new(0));
    let listening = Arc::new(tokio::sync::Notify::new());
    let (h2, l2) = (heard.clone(), listening.clone());
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => l2.notify_one(),
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    h2.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), listening.notified())
        .await
        .expect("the listener subscribed");
    let stats = support::spawn_metro_gateway(mqtt_port, &back_office.base, dir.path(), &keys);
    // The positive signal: the gateway fetched version 1, checked it and refused it.
    wait_until_async(
        "the gateway to refuse the other operator's list",
        Duration::from_secs(20),
        || stats.blocklists_refused.load(Ordering::Relaxed) >= 1,
    )
    .await;
    assert_eq!(
        stats.blocklists_refused.load(Ordering::Relaxed),
        1,
        "refused once per version"
    );
    assert_eq!(stats.blocklist_version.load(Ordering::Relaxed), 0);
    assert_eq!(heard.load(Ordering::Relaxed), 0, "nothing relayed");
}
