//! Several `tapgate charging` processes on one PostgreSQL (issue 17): loads, clearing, blocks and
//! the signed blocklist served by two servers together, each a real process, the ledger in a
//! throwaway cluster (`tapgate_testkit::postgres`).
//!
//! A load's relay session (the card's session keys) stays in the server that opened it: a step
//! that reaches another server is refused (`unknown_session`) and the typed client starts again
//! with the same Idempotency-Key on a server it reaches; the server resolves that key's earlier
//! attempt against the card (docs/postgres.md, "Several charging servers").
//!
//! After each scenario the books are checked the same way: every card's shadow purse equals the
//! card with no load pending (`GET /v1/cards/{uid}`), `tapgate charging reconcile` finds every
//! card balanced, no idempotency key completed two loads, no posting reference (a load's, a
//! tap's counter) booked twice, and the postings sum to zero.

mod support;

use charging::client::{Client, Ending, LoadAsk, Relayed, Vanish};
use charging::load::Reply;
use purse::apdu::ins;
use purse::card::Card;
use purse::keys::KeySet;
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use tapgate_testkit::http::{call, post};
use tapgate_testkit::postgres::TestDb;
use tapgate_testkit::Kill;

const PASS: &str = "charging-servers-pass";
const HOLDER: &str = "tg_servers_holder";
const GW: &str = "tg_servers_gw";
const OPS: &str = "tg_servers_ops";
const TOKEN: &str = "tok_visa_servers";

/// Two (or more) charging servers on one database, and what the test needs to reach them.
struct Servers {
    /// The database's cluster (restarted by a test).
    db: Mutex<TestDb>,
    /// Its URL and name.
    url: String,
    name: String,
    dir: tempfile::TempDir,
    keys: KeySet,
    /// Each server's process (`None` once killed).
    procs: Vec<Mutex<Option<Kill>>>,
    bases: Vec<String>,
}

fn tapgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tapgate"));
    c.env("TAPGATE_KEY_PASSPHRASE", PASS);
    c
}

fn start(n: usize) -> Servers {
    let db = TestDb::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = support::keys_init(dir.path(), PASS);
    let pw = dir.path().join("ledger-password");
    tapgate_secrets::write_file(&pw, db.password()).unwrap();
    let mut s = Servers {
        url: db.url.clone(),
        name: db.name().to_string(),
        db: Mutex::new(db),
        dir,
        keys,
        procs: Vec::new(),
        bases: Vec::new(),
    };
    for i in 0..n {
        let cfg = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\noperator = \"metro\"\n\n[ledger]\nkind = \"postgres\"\nurl = {:?}\npassword_file = {:?}\n{}",
            s.dir.path().join(format!("data-{i}")),
            s.url,
            pw,
            support::tokens_toml(&[
                ("holder", "cardholder", HOLDER),
                ("gw", "gateway", GW),
                ("ops", "operator", OPS),
            ])
        );
        std::fs::write(s.config(i), cfg).unwrap();
    }
    s.charging(&["migrate"]);
    for i in 0..n {
        let log = std::fs::File::create(s.dir.path().join(format!("charging-{i}.log"))).unwrap();
        let (process, base) = tapgate_testkit::spawn_charging(
            tapgate()
                .arg("charging")
                .arg("--config")
                .arg(s.config(i))
                .arg("--keys")
                .arg(s.dir.path().join("keys"))
                .stderr(Stdio::from(log)),
        );
        s.procs.push(Mutex::new(Some(process)));
        s.bases.push(base);
    }
    let (code, body) = post(
        &format!("{}/v1/instruments", s.bases[0]),
        HOLDER,
        serde_json::json!({"source": "card", "instrument": TOKEN}),
    );
    assert_eq!(code, 201, "{body}");
    s
}

impl Servers {
    fn config(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("charging-{i}.toml"))
    }

    /// `tapgate charging <args> --config <the first server's>`, which must succeed: its output.
    fn charging(&self, args: &[&str]) -> String {
        let out = tapgate()
            .arg("charging")
            .args(args)
            .arg("--config")
            .arg(self.config(0))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tapgate charging {args:?}: {err}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILL: the server dies wherever it is, mid-request.
    fn kill(&self, i: usize) {
        let mut p = self.procs[i]
            .lock()
            .unwrap()
            .take()
            .expect("server running");
        p.0.kill().unwrap();
        p.0.wait().unwrap();
    }

    /// The first server still running.
    fn alive(&self) -> &str {
        let i = self
            .procs
            .iter()
            .position(|p| p.lock().unwrap().is_some())
            .expect("a server");
        &self.bases[i]
    }

    /// Stops the database (fast shutdown: every connection cut) and starts it again.
    fn restart_database(&self) {
        let mut db = self.db.lock().unwrap();
        db.cluster.stop();
        std::thread::sleep(std::time::Duration::from_millis(300));
        db.cluster.start_server().unwrap();
    }

    /// A transit card of `balance`, issued by the operator (on the first server alive).
    fn card(&self, uid: [u8; 7], balance: i32) -> Card {
        let (code, out) = post(
            &format!("{}/v1/cards", self.alive()),
            OPS,
            serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": balance}),
        );
        assert_eq!(code, 201, "{out}");
        tapgate_testkit::fixtures::transit_card(
            &SoftwareHsm::new(&self.keys).unwrap(),
            uid,
            balance,
        )
    }

    /// The holder's client of the servers, in this order.
    fn client(&self, order: &[usize]) -> Client {
        let bases: Vec<&str> = order.iter().map(|&i| self.bases[i].as_str()).collect();
        let agent = ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(30))
            .build();
        Client::with_servers(agent, &bases, HOLDER)
    }

    fn psql(&self, sql: &str) -> String {
        self.db
            .lock()
            .unwrap()
            .cluster
            .psql(&self.name, sql)
            .unwrap()
            .trim()
            .to_string()
    }

    /// The books agree with `cards` (value conserved, nothing twice); `loads` loads completed.
    fn assert_books(&self, cards: &[&Card], loads: usize) {
        for card in cards {
            support::assert_shadow_equals_card(self.alive(), OPS, card);
        }
        let stdout = self.charging(&["reconcile", "--json"]);
        let report: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
        assert_eq!(report["cards"], cards.len(), "{report}");
        assert_eq!(report["balanced"], cards.len(), "{report}");
        let twice = self.psql(
            "SELECT count(*) FROM (SELECT 1 FROM load_intents WHERE state = 'completed' \
             AND kind = 'load' GROUP BY record->>'requested_by', record->>'idempotency_key' \
             HAVING count(*) > 1) d",
        );
        assert_eq!(twice, "0", "an idempotency key completed two loads");
        let completed = self
            .psql("SELECT count(*) FROM load_intents WHERE state = 'completed' AND kind = 'load'");
        assert_eq!(completed, loads.to_string());
        let booked_twice = self.psql(
            "SELECT count(*) FROM (SELECT reference FROM postings GROUP BY reference \
             HAVING count(*) > 1) d",
        );
        assert_eq!(booked_twice, "0", "a posting reference booked twice");
        assert_eq!(self.psql("SELECT sum(balance_minor) FROM balances"), "0");
    }
}

fn uid(group: u8, i: u8) -> [u8; 7] {
    [0x04, 0x5E, 0x17, group, 0, 0, i]
}

/// Relays a load of `amount` with `key` for `card` through `client`.
fn load(
    client: &Client,
    card: &mut Card,
    key: &str,
    amount: i32,
    vanish: Option<Vanish>,
) -> Relayed {
    let ask = LoadAsk {
        amount_minor: amount,
        source: "card",
        instrument: TOKEN,
        idempotency_key: key,
        vanish,
    };
    let mut reader = EmulatedReader {
        card,
        rng: StdRng::seed_from_u64(7),
    };
    client
        .load(&mut reader, &ask)
        .unwrap_or_else(|e| panic!("load {key}: {e}"))
}

/// A load with `key` cut right after the card got the command `at` (the client vanishes: the
/// server never hears the card's answer).
fn cut(client: &Client, card: &mut Card, key: &str, amount: i32, at: u8) {
    let r = load(client, card, key, amount, Some(Vanish::AfterIns(at)));
    assert!(matches!(r.ending, Ending::Vanished { .. }), "{r:?}");
}

/// `threads` client threads each load `per_thread` cards of their own (of group `group`) once,
/// their clients spread over the servers round robin; `during(done)` runs on this thread
/// meanwhile, `done` counting the loads answered. Returns the cards and how many loads
/// completed (a load left pending by a failure is settled by one more load of its card).
fn crowd(
    s: &Servers,
    group: u8,
    threads: usize,
    per_thread: usize,
    during: impl FnOnce(&AtomicUsize),
) -> (Vec<Card>, usize) {
    let done = AtomicUsize::new(0);
    let n = s.bases.len();
    let results: Mutex<Vec<Card>> = Mutex::new(Vec::new());
    let work: Vec<(Client, Vec<Card>)> = (0..threads)
        .map(|t| {
            let order: Vec<usize> = (0..n).map(|k| (t + k) % n).collect();
            let cards = (0..per_thread)
                .map(|i| s.card(uid(group, (t * per_thread + i) as u8), 1_000))
                .collect();
            (s.client(&order), cards)
        })
        .collect();
    std::thread::scope(|scope| {
        for (t, (client, mine)) in work.into_iter().enumerate() {
            let (done, results) = (&done, &results);
            scope.spawn(move || {
                for (i, mut card) in mine.into_iter().enumerate() {
                    let key = format!("crowd-{group}-{t}-{i}");
                    let r = load(&client, &mut card, &key, 300, None);
                    match r.reply() {
                        Some(Reply::Completed { .. }) => {}
                        // A server failed after the intent: it is settled at the card's next
                        // contact, which is this next load.
                        Some(Reply::Pending { .. }) => {
                            let next = load(&client, &mut card, &format!("{key}-next"), 300, None);
                            assert!(next.completed().is_some(), "{next:?}");
                        }
                        other => panic!("load {key}: {other:?}"),
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    results.lock().unwrap().push(card);
                }
            });
        }
        during(&done);
    });
    let cards = results.into_inner().unwrap();
    // Each completed load added 300 to its card.
    let completed = cards
        .iter()
        .map(|c| ((c.state().balance_minor - 1_000) / 300) as usize)
        .sum();
    (cards, completed)
}

fn wait_for(done: &AtomicUsize, n: usize) {
    tapgate_testkit::wait_until(
        "loads to complete",
        std::time::Duration::from_secs(60),
        || done.load(Ordering::SeqCst) >= n,
    );
}

#[test]
fn loads_spread_over_two_servers_survive_one_killed_mid_load() {
    let s = start(2);
    // Two loads cut on server 0 mid-dialogue: the card committed the first (the server never
    // heard it), and only got the second's credit staged.
    let first = s.client(&[0, 1]);
    let mut committed = s.card(uid(1, 1), 1_000);
    let mut staged = s.card(uid(1, 2), 1_000);
    cut(
        &first,
        &mut committed,
        "cut-at-commit",
        500,
        ins::COMMIT_TRANSACTION,
    );
    assert_eq!(committed.state().balance_minor, 1_500);
    cut(&first, &mut staged, "cut-at-credit", 500, ins::CREDIT);
    assert_eq!(staged.state().balance_minor, 1_000);

    // A crowd loads over both servers; server 0 dies (SIGKILL) mid-way, mid-request for some.
    let (crowd_cards, crowd_loads) = crowd(&s, 2, 4, 5, |done| {
        wait_for(done, 6);
        s.kill(0);
    });
    assert_eq!(crowd_cards.len(), 20);

    // The cut loads again with their keys: server 0 is gone, server 1 resolves each earlier
    // attempt against the card — the committed one is answered, never loaded twice; the
    // staged one was never applied, so it is voided and loaded now.
    let again = load(&first, &mut committed, "cut-at-commit", 500, None);
    assert!(again.restarts >= 1, "{again:?}");
    let (amount, balance, tmc) = again.completed().expect("completed");
    assert_eq!((amount, balance), (500, 1_500));
    assert_eq!(committed.state().balance_minor, 1_500, "loaded once");
    assert_eq!(committed.state().tmc, tmc);
    let again = load(&first, &mut staged, "cut-at-credit", 500, None);
    assert_eq!(again.completed().map(|c| (c.0, c.1)), Some((500, 1_500)));
    assert_eq!(staged.state().balance_minor, 1_500);
    // The same key once more: the stored answer, nothing moves.
    let third = load(&s.client(&[1]), &mut committed, "cut-at-commit", 500, None);
    assert_eq!(third.completed().map(|c| c.1), Some(1_500));
    assert_eq!(committed.state().balance_minor, 1_500);

    let mut all: Vec<&Card> = crowd_cards.iter().collect();
    all.extend([&committed, &staged]);
    s.assert_books(&all, crowd_loads + 2);
    // A step of a session another server holds: 409 unknown_session, not a second load.
    let (code, body) = post(
        &format!("{}/v1/loads/{}/steps", s.bases[1], "00".repeat(16)),
        HOLDER,
        serde_json::json!({"seq": 2, "responses": ["9100"]}),
    );
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("unknown_session")),
        "{body}"
    );
    s.kill(1);
}

#[test]
fn postgres_restarted_mid_load() {
    let s = start(2);
    let client = s.client(&[0, 1]);
    let mut card = s.card(uid(3, 1), 1_000);
    cut(
        &client,
        &mut card,
        "cut-before-restart",
        400,
        ins::COMMIT_TRANSACTION,
    );
    let (cards, loads) = crowd(&s, 4, 3, 5, |done| {
        wait_for(done, 4);
        s.restart_database();
    });
    // After the restart, the cut load's key on the other server: completed once.
    let again = load(
        &s.client(&[1, 0]),
        &mut card,
        "cut-before-restart",
        400,
        None,
    );
    assert_eq!(again.completed().map(|c| c.1), Some(1_400), "{again:?}");
    assert_eq!(card.state().balance_minor, 1_400);
    let mut all: Vec<&Card> = cards.iter().collect();
    all.push(&card);
    s.assert_books(&all, loads + 1);
    s.kill(0);
    s.kill(1);
}

/// A validator's debits of `card` (`fares` of them, 150 each) as clearing taps.
fn taps(
    sam: &mut SoftwareSam,
    card: &mut Card,
    fares: usize,
    seq: &mut u64,
) -> Vec<serde_json::Value> {
    (0..fares)
        .map(|_| {
            let mut reader = EmulatedReader {
                card: &mut *card,
                rng: StdRng::seed_from_u64(1),
            };
            let decide = |_: &_| Decision::Apply {
                amount_minor: 150,
                record: Some(vec![1; 32]),
            };
            let r = match txn::debit(&mut reader, sam, &mut StdRng::seed_from_u64(2), decide)
                .unwrap()
            {
                Outcome::Committed { receipt, .. } => receipt,
                Outcome::Refused { .. } => panic!("refused"),
            };
            *seq += 1;
            serde_json::json!({
                "device_id": 1001, "device_seq": *seq, "card_uid": hex::encode_upper(r.uid()),
                "tmc": r.tmc(), "kind": "debit", "amount_minor": r.amount_minor(),
                "balance_after_minor": r.balance_after_minor(), "tmv": hex::encode_upper(r.tmv()),
                "key_version": r.key_version(), "operator": "metro",
            })
        })
        .collect()
}

fn clear(base: &str, id: &str, taps: &[serde_json::Value]) -> (u16, serde_json::Value) {
    post(
        &format!("{base}/v1/clearing/batches"),
        GW,
        serde_json::json!({"batch_id": id, "taps": taps}),
    )
}

fn operator_revenue(s: &Servers) -> String {
    s.psql("SELECT coalesce(sum(balance_minor), 0) FROM account_balances WHERE account = 'operator:metro'")
}

#[test]
fn the_same_clearing_batch_is_booked_once_on_two_servers_and_after_one_dies_mid_batch() {
    let s = start(2);
    let mut sam = SoftwareSam::validator(&s.keys, 1001).unwrap();
    let mut cards: Vec<Card> = (0..4).map(|i| s.card(uid(5, i), 100_000)).collect();
    let mut seq = 0;
    let batch = |cards: &mut Vec<Card>, sam: &mut SoftwareSam, seq: &mut u64| {
        let mut all = Vec::new();
        for c in cards.iter_mut() {
            all.extend(taps(sam, c, 60, seq));
        }
        all
    };
    // The same batch to both servers at once: both answer it, it is booked once.
    let first = batch(&mut cards, &mut sam, &mut seq);
    let barrier = Barrier::new(2);
    let answers: Vec<(u16, serde_json::Value)> = std::thread::scope(|scope| {
        let hs: Vec<_> = s
            .bases
            .iter()
            .map(|b| {
                let (first, barrier) = (&first, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    clear(b, "gw-000001", first)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (code, out) in &answers {
        assert_eq!(*code, 200, "{out}");
        assert_eq!(out["cleared"], 240, "{out}");
    }
    assert_eq!(answers[0].1, answers[1].1, "one outcome, stored once");
    assert_eq!(operator_revenue(&s), (240 * 150).to_string());

    // A batch sent to server 0, which dies mid-batch; the gateway resends it to server 1.
    let second = batch(&mut cards, &mut sam, &mut seq);
    std::thread::scope(|scope| {
        // The answer, or the connection cut by the kill: either is fine here.
        let h = scope.spawn(|| {
            ureq::post(&format!("{}/v1/clearing/batches", s.bases[0]))
                .set("Authorization", &format!("Bearer {GW}"))
                .send_json(serde_json::json!({"batch_id": "gw-000002", "taps": &second}))
                .map(|r| r.status())
                .map_err(|e| e.to_string())
        });
        std::thread::sleep(std::time::Duration::from_millis(40));
        s.kill(0);
        let first_try = h.join().unwrap();
        eprintln!("the batch sent to the server killed 40 ms in: {first_try:?}");
    });
    let (code, out) = clear(&s.bases[1], "gw-000002", &second);
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["cleared"], 240, "{out}");
    let (_, again) = clear(&s.bases[1], "gw-000002", &second);
    assert_eq!(again, out);
    assert_eq!(operator_revenue(&s), (480 * 150).to_string());
    let refs: Vec<&Card> = cards.iter().collect();
    s.assert_books(&refs, 0);
    s.kill(1);
}

/// The signed blocklist as a server answers it (bytes).
fn signed(base: &str, path: &str) -> Vec<u8> {
    let r = ureq::get(&format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {GW}"))
        .call()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes).unwrap();
    bytes
}

#[test]
fn the_same_key_on_both_servers_at_once_loads_once_and_blocks_are_one_sequence() {
    let s = start(2);
    let card = Arc::new(Mutex::new(s.card(uid(6, 1), 1_000)));
    // Both servers get the start with one key at once; then the card is relayed to each in
    // turn (one card, one field): the first loads it, the second finds that key's load done.
    for round in 0..3 {
        let key = format!("twice-{round}");
        let before = card.lock().unwrap().state().balance_minor;
        let barrier = Barrier::new(2);
        let replies: Vec<Relayed> = std::thread::scope(|scope| {
            let hs: Vec<_> = (0..2)
                .map(|i| {
                    let (card, barrier, key, client) = (&card, &barrier, &key, s.client(&[i]));
                    scope.spawn(move || {
                        let uid = card.lock().unwrap().state().uid;
                        let ask = LoadAsk {
                            amount_minor: 250,
                            source: "card",
                            instrument: TOKEN,
                            idempotency_key: key,
                            vanish: None,
                        };
                        barrier.wait();
                        let first = client.start_load(&uid, &ask).unwrap();
                        let mut c = card.lock().unwrap();
                        let mut reader = EmulatedReader {
                            card: &mut c,
                            rng: StdRng::seed_from_u64(7),
                        };
                        match client.relay(&mut reader, first, None) {
                            Ok(r) => r,
                            // Its intent found the other server's still open (409 in_progress):
                            // start again with the key.
                            Err(e) => {
                                assert!(e.to_string().contains("in_progress"), "{e}");
                                drop(c);
                                let mut c = card.lock().unwrap();
                                load(&client, &mut c, key, 250, None)
                            }
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let after = card.lock().unwrap().state().balance_minor;
        assert_eq!(after, before + 250, "loaded once");
        for r in &replies {
            assert_eq!(
                r.completed().map(|c| (c.0, c.1)),
                Some((250, after)),
                "{r:?}"
            );
        }
    }
    // A step that reaches the other server (a balancer without affinity): 409 unknown_session,
    // and the load started again there with the key completes, once.
    let mut card = card.lock().unwrap();
    let ask = LoadAsk {
        amount_minor: 100,
        source: "card",
        instrument: TOKEN,
        idempotency_key: "moved",
        vanish: None,
    };
    let Reply::Command {
        session_id, seq, ..
    } = s.client(&[0]).start_load(&card.state().uid, &ask).unwrap()
    else {
        panic!("no command");
    };
    let elsewhere = s.client(&[1]).step(&session_id, seq, &[vec![0x91, 0x00]]);
    assert!(
        matches!(&elsewhere, Err(charging::client::ClientError::StartAgain { code: 409, error, .. }) if error == "unknown_session"),
        "{elsewhere:?}"
    );
    let before = card.state().balance_minor;
    let moved = load(&s.client(&[1]), &mut card, "moved", 100, None);
    assert_eq!(
        moved.completed().map(|c| c.1),
        Some(before + 100),
        "{moved:?}"
    );
    assert_eq!(card.state().balance_minor, before + 100);
    s.assert_books(&[&card], 4);

    // Blocks made on either server are one numbered sequence; both sign the same list.
    for (i, (u, action)) in [
        (uid(6, 1), "block"),
        (uid(6, 2), "block"),
        (uid(6, 1), "unblock"),
    ]
    .into_iter()
    .enumerate()
    {
        let (code, out) = post(
            &format!(
                "{}/v1/cards/{}/{action}",
                s.bases[i % 2],
                hex::encode_upper(u)
            ),
            OPS,
            serde_json::json!({"reason": "lost"}),
        );
        assert_eq!(code, 200, "{out}");
    }
    let changes: Vec<serde_json::Value> = s
        .bases
        .iter()
        .map(|b| {
            call(
                "GET",
                &format!("{b}/v1/blocklist/changes?after=0"),
                Some(GW),
                None,
                None,
            )
            .1
        })
        .collect();
    assert_eq!(changes[0], changes[1]);
    assert_eq!(changes[0]["latest_version"], 3, "{}", changes[0]);
    for path in [
        "/v1/blocklist/signed/delta?after=0",
        "/v1/blocklist/signed/delta?after=1",
        "/v1/blocklist/signed/snapshot",
    ] {
        let (a, b) = (signed(&s.bases[0], path), signed(&s.bases[1], path));
        assert!(!a.is_empty(), "{path}");
        assert_eq!(a, b, "{path}: the same bytes from either server");
    }
    s.kill(0);
    s.kill(1);
}
