//! A blocklist beyond one chunk (issue 22) through the real pieces: the charging server signs
//! it in chunks, the gateway relays each chunk retained on `…/blocklist/snapshot/<i>`, and
//! validators — one connected before the gateway relays anything, one that connects after —
//! assemble the chunks and hold exactly the blocked cards, journalled; later changes reach
//! both as deltas.

mod support;

use purse::blocklist::chunked::CHUNK_ENTRIES;
use purse::blocklist::Blocklist;
use purse::keys::{KeySet, Role as KeyRole};
use purse::sam::SoftwareSam;
use purse::txn::Transport;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tapgate_http::auth::Role;
use tapgate_testkit::fixtures::token;
use tapgate_testkit::wait_until_async;
use validator::daemon::{Metrics, MqttSettings, Settings};
use validator::journal::Journal;
use validator::reader::Reader;

/// Cards blocked: three chunks.
const CARDS: u32 = 2 * CHUNK_ENTRIES as u32 + 500;

fn uid(i: u32) -> [u8; 7] {
    let mut u = [4, 0x11, 0, 0, 0, 0, 0];
    u[3..].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
    u
}

/// A reader with no card, until shutdown.
struct NoCards(Arc<AtomicBool>);

impl Reader for NoCards {
    fn wait_card(&mut self) -> Option<&mut dyn Transport> {
        while !self.0.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
    fn card_removed(&mut self) {}
}

/// A validator daemon in this process: its metrics, its journal, its shutdown flag and task.
struct Running {
    metrics: Arc<Metrics>,
    journal: Arc<Journal>,
    shutdown: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start_validator(keys: &KeySet, device: u32, port: u16) -> Running {
    start_validator_on(keys, device, port, vec![], Duration::from_secs(30))
}

/// A validator whose first broker is `port`, then the `fallback` ones, each given `timeout`
/// to accept a connection.
fn start_validator_on(
    keys: &KeySet,
    device: u32,
    port: u16,
    fallback: Vec<(String, u16)>,
    connect_timeout: Duration,
) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(Journal::open(dir.path(), 100, 1 << 28).unwrap());
    let sam_keys = keys.for_role(KeyRole::ValidatorSam, device).unwrap();
    let sam = SoftwareSam::validator(keys, device).unwrap();
    let gate = support::gate::downlink_gate(sam, device, u64::from(device));
    let settings = Settings {
        operator: "metro".into(),
        card_scheme: "metro".into(),
        device_id: device,
        heartbeat: Duration::from_secs(1),
        signing_pub: sam_keys.trusted_signing_keys(),
        mqtt: Some(MqttSettings {
            host: "127.0.0.1".into(),
            port,
            fallback,
            connect_timeout,
            username: Some(device.to_string()),
            password: Some(format!("dev{device}-secret")),
            tls_ca_pem: None,
        }),
        drain_timeout: Duration::from_secs(1),
        crash_at: None,
    };
    let metrics = Arc::new(Metrics::new(device));
    let shutdown = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let (j, m, s) = (journal.clone(), metrics.clone(), shutdown.clone());
        async move {
            validator::daemon::run(settings, gate, j, Box::new(NoCards(s.clone())), m, s)
                .await
                .unwrap();
        }
    });
    Running {
        metrics,
        journal,
        shutdown,
        task,
        _dir: dir,
    }
}

impl Running {
    async fn wait_version(&self, who: &str, v: u64) {
        let m = self.metrics.clone();
        wait_until_async(
            &format!("{who} to hold blocklist version {v}"),
            Duration::from_secs(60),
            move || m.blocklist_version.get() as u64 >= v,
        )
        .await;
        assert_eq!(self.metrics.blocklist_version.get() as u64, v);
    }

    /// Stops the daemon; the list its journal gives back.
    async fn stop(self, keys: &KeySet, device: u32) -> Blocklist {
        self.shutdown.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let sam_keys = keys.for_role(KeyRole::ValidatorSam, device).unwrap();
        let sam = SoftwareSam::validator(keys, device).unwrap();
        let mut g = support::gate::downlink_gate(sam, device, 0);
        validator::daemon::restore(&mut g, &self.journal, &sam_keys.trusted_signing_keys())
            .unwrap();
        g.blocklist
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocklist_in_chunks_reaches_early_and_late_validators() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(22));
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = tapgate_testkit::broker::embedded(&[
        ("gateway", "gw-secret"),
        ("7", "dev7-secret"),
        ("8", "dev8-secret"),
    ]);
    let back_office = tapgate_testkit::charging::start(&keys, |cfg| {
        cfg.tokens = vec![token("gw", Role::Gateway, "tg_gw")];
        cfg.operator = "metro".into();
        cfg.ledger_map_size_bytes = 512 << 20;
    });
    let ledger = back_office.state.loads.ledger().clone();
    let l = ledger.clone();
    let v1 = tokio::task::spawn_blocking(move || {
        l.transact(|t| {
            let mut v = 0;
            for i in 0..CARDS {
                v = t.set_blocked(&uid(i), true, "lost", 0)?.unwrap_or(v);
            }
            Ok(v)
        })
        .unwrap()
    })
    .await
    .unwrap();
    assert!(v1 >= u64::from(CARDS));

    // A validator connected before the gateway relays anything.
    let early = start_validator(&keys, 7, mqtt_port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = support::spawn_metro_gateway(mqtt_port, &back_office.base, dir.path(), &keys);
    early.wait_version("the early validator", v1).await;
    assert_eq!(stats.blocklists_refused.load(Ordering::Relaxed), 0);

    // A validator that connects afterwards: the retained chunks (and no delta) bring it there.
    let late = start_validator(&keys, 8, mqtt_port);
    late.wait_version("the late validator", v1).await;

    // A change afterwards reaches both as a delta.
    let l = ledger.clone();
    let v2 = tokio::task::spawn_blocking(move || {
        l.transact(|t| {
            t.set_blocked(&uid(3), false, "found", 0)?;
            Ok(t.set_blocked(&uid(CARDS + 1), true, "stolen", 0)?.unwrap())
        })
        .unwrap()
    })
    .await
    .unwrap();
    early.wait_version("the early validator", v2).await;
    late.wait_version("the late validator", v2).await;

    for (v, device) in [(early, 7), (late, 8)] {
        let chunks = v.journal.blobs("blocklist/0-chunk/").unwrap().len();
        assert_eq!(
            chunks, 3,
            "validator {device} journals the snapshot's three chunks"
        );
        let list = v.stop(&keys, device).await;
        assert_eq!(list.version(), v2, "validator {device} restores");
        assert_eq!(list.len(), CARDS as usize, "validator {device}");
        assert!((0..CARDS)
            .filter(|i| *i != 3)
            .all(|i| list.is_blocked(&uid(i))));
        assert!(!list.is_blocked(&uid(3)) && list.is_blocked(&uid(CARDS + 1)));
    }
}

/// A broker node that takes the TCP connection and never answers the CONNECT (a node hung, or a
/// black hole in front of it): the validator gives up after `[mqtt] connect_timeout_s` and
/// connects to the cluster's next node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_passes_a_silent_broker_for_the_next_node() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(23));
    let live = tapgate_testkit::broker::embedded(&[("9", "dev9-secret")]);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let held = accepted.clone();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for conn in silent.incoming().flatten() {
            held.fetch_add(1, Ordering::Relaxed);
            open.push(conn);
        }
    });
    let v = start_validator_on(
        &keys,
        9,
        silent_port,
        vec![("127.0.0.1".into(), live)],
        Duration::from_secs(1),
    );
    let m = v.metrics.clone();
    wait_until_async(
        "the validator to connect to the next node",
        Duration::from_secs(30),
        move || m.mqtt_connected.get() == 1,
    )
    .await;
    assert!(
        accepted.load(Ordering::Relaxed) >= 1,
        "the validator tried the silent node first"
    );
    v.stop(&keys, 9).await;
}
