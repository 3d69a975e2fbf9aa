//! The load path's transactions at `READ COMMITTED` on PostgreSQL (`docs/postgres.md`,
//! "Locking rule"): what the rule must still rule out, through the load service on either
//! backend (`TAPGATE_TEST_LEDGER=postgres` for PostgreSQL) — two loads from one instrument
//! whose daily limit fits one, a block committed between a step's read-ahead and its intent —
//! and, on PostgreSQL only, the isolation itself: a `READ COMMITTED` transaction sees what
//! committed after it began, a read outside the rule runs it again at `SERIALIZABLE`, and a
//! `SERIALIZABLE` transaction (clearing's) that read a card a `READ COMMITTED` load then
//! changed is run again, keeping both changes.

use charging::funding::{FundingError, FundingRequest, FundingSource, SandboxProcessor};
use charging::ledger::postgres::{self, read_committed};
use charging::ledger::{FundingDay, IntentState, Ledger, LedgerWrite, PgConfig};
use charging::load::{LoadConfig, LoadRequest, LoadService, Reply};
use purse::card::Card;
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tapgate_testkit::charging::relay_in_process;
use tapgate_testkit::fixtures::transit_card;
use tapgate_testkit::postgres::TestDb;

const T0: u64 = 1_700_000_000_000;

/// What the funding source does when a load asks it for an authorisation (after the step's
/// read-ahead, before the intent's transaction).
enum OnAuthorise {
    /// Waits (at most 30 s) until `parties` loads have asked: each has read ahead by then.
    Meet {
        arrived: Mutex<usize>,
        all: Condvar,
        parties: usize,
    },
    /// Blocks the card in the ledger (a cardholder reporting it lost, committed meanwhile).
    Block(Mutex<Option<(Ledger, [u8; 7])>>),
    /// Counts this much into the card's loads of the day (another load of the card — a clone
    /// at another counter — recorded meanwhile).
    LoadDay(Mutex<Option<(Ledger, [u8; 7], i64)>>),
}

/// The sandbox card processor (source `card`), with a hook in `authorise`.
struct Hooked {
    inner: Arc<SandboxProcessor>,
    on: OnAuthorise,
    /// The authorisations given.
    given: Mutex<Vec<String>>,
}

impl FundingSource for Hooked {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn check_instrument(&self, id: &str) -> Result<(), FundingError> {
        self.inner.check_instrument(id)
    }

    fn authorise(&self, req: &FundingRequest<'_>) -> Result<String, FundingError> {
        match &self.on {
            OnAuthorise::Meet {
                arrived,
                all,
                parties,
            } => {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut n = arrived.lock().unwrap();
                *n += 1;
                all.notify_all();
                while *n < *parties && Instant::now() < deadline {
                    n = all
                        .wait_timeout(n, deadline.saturating_duration_since(Instant::now()))
                        .unwrap()
                        .0;
                }
            }
            OnAuthorise::Block(target) => {
                if let Some((ledger, uid)) = target.lock().unwrap().take() {
                    ledger
                        .transact(move |t| t.set_blocked(&uid, true, "reported lost", T0))
                        .unwrap();
                }
            }
            OnAuthorise::LoadDay(target) => {
                if let Some((ledger, uid, amount)) = target.lock().unwrap().take() {
                    let day = T0 / 86_400_000;
                    ledger
                        .transact(move |t| t.add_load_day(&uid, day, amount))
                        .unwrap();
                }
            }
        }
        let id = self.inner.authorise(req)?;
        self.given.lock().unwrap().push(id.clone());
        Ok(id)
    }

    fn capture(&self, auth_id: &str) -> Result<(), FundingError> {
        self.inner.capture(auth_id)
    }

    fn void(&self, auth_id: &str) -> Result<(), FundingError> {
        self.inner.void(auth_id)
    }

    fn refund(&self, auth_id: &str, amount_minor: i64) -> Result<(), FundingError> {
        self.inner.refund(auth_id, amount_minor)
    }
}

struct World {
    svc: LoadService,
    source: Arc<Hooked>,
    hsm: SoftwareHsm,
    _dir: tempfile::TempDir,
    /// The ledger's PostgreSQL cluster with TAPGATE_TEST_LEDGER=postgres (stopped last).
    _pg: Option<TestDb>,
}

fn world(cfg: LoadConfig, on: OnAuthorise) -> World {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(1));
    let (ledger, pg) = tapgate_testkit::charging::test_ledger(&dir.path().join("ledger"));
    let inner = Arc::new(SandboxProcessor::open(&dir.path().join("processor")).unwrap());
    let source = Arc::new(Hooked {
        inner,
        on,
        given: Mutex::default(),
    });
    let svc = LoadService::new(
        ledger,
        Box::new(SoftwareHsm::new(&keys).unwrap()),
        vec![source.clone() as Arc<dyn FundingSource>],
        cfg,
    );
    svc.register_instrument("alice", "card", "tok_visa", 0)
        .unwrap();
    World {
        svc,
        source,
        hsm: SoftwareHsm::new(&keys).unwrap(),
        _dir: dir,
        _pg: pg,
    }
}

impl World {
    /// A load refused for `reason` inside its intent's transaction: no Credit reached the card
    /// (still 1,000), no open intent, the instrument's day total untouched, and the one
    /// authorisation given before the refusal voided.
    fn assert_refused_and_voided(&self, reply: &Reply, reason: &str, card: &Card) {
        assert!(
            matches!(reply, Reply::Refused { reason: r, .. } if r == reason),
            "{reply:?}"
        );
        assert_eq!(
            card.state().balance_minor,
            1_000,
            "no Credit reached the card"
        );
        let uid = card.state().uid;
        let r = self.svc.ledger().read().unwrap();
        assert!(r.open_intents(&uid).unwrap().is_empty());
        assert_eq!(
            r.funding_day_total(FundingDay::new("card", "tok_visa", T0 / 86_400_000))
                .unwrap(),
            0
        );
        let given = self.source.given.lock().unwrap().clone();
        assert_eq!(given.len(), 1, "authorised before the refusal");
        assert_eq!(
            self.source.inner.authorisation(&given[0]).unwrap().state,
            "voided"
        );
    }

    fn card(&self, n: u8) -> Card {
        let uid = [0x04, n, 7, 7, 7, 7, 7];
        self.svc.register_card(&uid, 1_000, T0).unwrap();
        transit_card(&self.hsm, uid, 1_000)
    }

    /// Alice's load of `amount` from her card token, relayed to its final reply.
    fn load(&self, card: &mut Card, amount: i32, key: &str) -> Reply {
        let mut now = T0;
        let req = LoadRequest {
            uid: card.state().uid,
            amount_minor: amount,
            funding_source: "card".into(),
            instrument: "tok_visa".into(),
            idempotency_key: key.into(),
        };
        let r = self.svc.start("alice", req, now).unwrap();
        relay_in_process(&self.svc, "alice", card, r, &mut now, 5, None)
            .unwrap()
            .0
    }
}

/// Two cards loading from one instrument at once, each having read its day total (nothing)
/// before either records its intent, with a limit that fits one load: exactly one loads.
#[test]
fn two_cards_one_instrument_at_once_only_one_fits_the_limit() {
    let cfg = LoadConfig {
        max_daily_per_instrument_minor: 1_000,
        ..LoadConfig::default()
    };
    let meet = OnAuthorise::Meet {
        arrived: Mutex::new(0),
        all: Condvar::new(),
        parties: 2,
    };
    let w = world(cfg, meet);
    let (mut a, mut b) = (w.card(1), w.card(2));
    let (ra, rb) = std::thread::scope(|s| {
        let ra = s.spawn(|| w.load(&mut a, 600, "key-a"));
        let rb = s.spawn(|| w.load(&mut b, 600, "key-b"));
        (ra.join().unwrap(), rb.join().unwrap())
    });
    let loaded = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Reply::Completed { .. }))
        .count();
    let refused = [&ra, &rb]
        .iter()
        .filter(
            |r| matches!(r, Reply::Refused { reason, .. } if reason == "instrument_daily_limit"),
        )
        .count();
    assert_eq!((loaded, refused), (1, 1), "{ra:?} / {rb:?}");
    let r = w.svc.ledger().read().unwrap();
    let day = T0 / 86_400_000;
    assert_eq!(
        r.funding_day_total(FundingDay::new("card", "tok_visa", day))
            .unwrap(),
        600
    );
    let balances = [a.state().balance_minor, b.state().balance_minor];
    assert!(
        balances.contains(&1_600) && balances.contains(&1_000),
        "{balances:?}"
    );
    let given = w.source.given.lock().unwrap().clone();
    let mut states: Vec<String> = given
        .iter()
        .map(|id| w.source.inner.authorisation(id).unwrap().state)
        .collect();
    states.sort();
    assert_eq!(states, ["captured", "voided"]);
}

/// A card blocked after the decision step read it ahead and before its intent's transaction:
/// the transaction reads the card again (on PostgreSQL, locked) and refuses the load — no
/// intent, no Credit, the authorisation voided, the day totals untouched.
#[test]
fn a_block_committed_after_the_read_ahead_refuses_the_load() {
    let w = world(LoadConfig::default(), OnAuthorise::Block(Mutex::new(None)));
    let mut card = w.card(3);
    let uid = card.state().uid;
    if let OnAuthorise::Block(target) = &w.source.on {
        *target.lock().unwrap() = Some((w.svc.ledger().clone(), uid));
    }
    let reply = w.load(&mut card, 500, "key-blocked");
    w.assert_refused_and_voided(&reply, "card_blocked", &card);
    let r = w.svc.ledger().read().unwrap();
    assert!(r.card(&uid).unwrap().blocked);
    assert!(r
        .all_intents()
        .unwrap()
        .iter()
        .all(|i| i.state == IntentState::Voided));
    assert_eq!(r.card(&uid).unwrap().load_day_minor, 0);
}

/// The card's loads of the day raised after the decision step read them ahead and before its
/// intent's transaction (another load of the card, at another counter: a clone): the
/// transaction reads the card again (on PostgreSQL, locked) and refuses a load past the card's
/// daily limit — no intent, no Credit, the authorisation voided, the instrument's total
/// untouched.
#[test]
fn a_card_day_total_raised_after_the_read_ahead_refuses_the_load() {
    let cfg = LoadConfig {
        max_daily_per_card_minor: 1_000,
        ..LoadConfig::default()
    };
    let w = world(cfg, OnAuthorise::LoadDay(Mutex::new(None)));
    let mut card = w.card(4);
    let uid = card.state().uid;
    if let OnAuthorise::LoadDay(target) = &w.source.on {
        *target.lock().unwrap() = Some((w.svc.ledger().clone(), uid, 600));
    }
    let reply = w.load(&mut card, 600, "key-card-day");
    w.assert_refused_and_voided(&reply, "daily_limit", &card);
    let r = w.svc.ledger().read().unwrap();
    assert_eq!(
        r.card(&uid).unwrap().load_day_minor,
        600,
        "only the other load's"
    );
}

/// Two loads at once on one card the ledger has no row for (two clones at one counter, both
/// having read ahead before either records its intent): on PostgreSQL the card is locked by
/// the neutral row the first intent's transaction inserts, so the second waits for it and then
/// finds its intent (or its completion's counter). Exactly one intent at the counter is not
/// voided, one load reaches a card, the other's authorisation is voided, and the card's
/// account holds exactly the one load.
#[test]
fn two_loads_at_once_on_one_unregistered_card_record_one_intent() {
    let meet = OnAuthorise::Meet {
        arrived: Mutex::new(0),
        all: Condvar::new(),
        parties: 2,
    };
    let w = world(LoadConfig::default(), meet);
    let uid = [0x04, 6, 6, 6, 6, 6, 6];
    let (mut a, mut b) = (
        transit_card(&w.hsm, uid, 1_000),
        transit_card(&w.hsm, uid, 1_000),
    );
    let (ra, rb) = std::thread::scope(|s| {
        let ra = s.spawn(|| w.load(&mut a, 600, "key-a"));
        let rb = s.spawn(|| w.load(&mut b, 600, "key-b"));
        (ra.join().unwrap(), rb.join().unwrap())
    });
    let loaded = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Reply::Completed { .. }))
        .count();
    assert_eq!(loaded, 1, "{ra:?} / {rb:?}");
    let mut balances = [a.state().balance_minor, b.state().balance_minor];
    balances.sort();
    assert_eq!(balances, [1_000, 1_600]);
    let r = w.svc.ledger().read().unwrap();
    let live: Vec<_> = r
        .all_intents()
        .unwrap()
        .into_iter()
        .filter(|i| i.state != IntentState::Voided)
        .collect();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(
        (live[0].tmc_before, live[0].state),
        (0, IntentState::Completed)
    );
    assert_eq!(
        r.balance(&charging::ledger::card_account(&uid)).unwrap(),
        600
    );
    assert_eq!(r.card(&uid).unwrap().load_day_minor, 600);
    let given = w.source.given.lock().unwrap().clone();
    let mut states: Vec<String> = given
        .iter()
        .map(|id| w.source.inner.authorisation(id).unwrap().state)
        .collect();
    states.sort();
    assert_eq!(states, ["captured", "voided"]);
}

/// A PostgreSQL ledger in a throwaway cluster (kept as long as the ledger).
fn pg_ledger() -> (Ledger, TestDb) {
    let db = TestDb::start();
    let cfg = PgConfig::new(&db.url, Some(db.password()));
    postgres::migrate(&cfg).unwrap();
    (Ledger::open_postgres(cfg).unwrap(), db)
}

fn issue(ledger: &Ledger, uid: [u8; 7]) {
    ledger
        .transact(move |t| t.issue_card(&uid, 1_000, &format!("issue:{uid:?}"), T0))
        .unwrap();
}

/// A closure run with [`read_committed`] runs at `READ COMMITTED`: a card changed and
/// committed after its first statement is read as changed (a `SERIALIZABLE` transaction keeps
/// reading its snapshot).
#[test]
fn a_read_committed_transaction_sees_what_committed_after_it_began() {
    let (ledger, _db) = pg_ledger();
    let (x, y) = ([0x04, 1, 1, 1, 1, 1, 1], [0x04, 2, 2, 2, 2, 2, 2]);
    issue(&ledger, x);
    issue(&ledger, y);
    let owner_seen = |rc: bool, owner: &'static str| {
        let (began, began_rx, changed_tx) = pause();
        let l = ledger.clone();
        let seen = std::thread::spawn(move || {
            let f = move |t: &mut dyn LedgerWrite| {
                t.card(&x)?;
                began.hold();
                Ok::<_, charging::ledger::LedgerError>(t.card(&y)?.owner)
            };
            let seen = match rc {
                true => l.transact(read_committed(f)),
                false => l.transact(f),
            };
            seen.unwrap()
        });
        began_rx.recv().unwrap();
        ledger.transact(move |t| t.set_owner(&y, owner)).unwrap();
        changed_tx.send(()).unwrap();
        seen.join().unwrap()
    };
    assert_eq!(owner_seen(true, "bob").as_deref(), Some("bob"));
    // SERIALIZABLE (read-only here, so never aborted): the snapshot of its first statement.
    assert_eq!(owner_seen(false, "carol").as_deref(), Some("bob"));
    ledger.close();
}

/// At `READ COMMITTED`, a read the locking rule does not cover (a balance summed over shards)
/// aborts the attempt and runs the closure again at `SERIALIZABLE`: same answer, one more run.
/// A card with no row is not such a read: it is locked by a neutral row, still read as
/// unknown, and left without a row when the transaction does not write it.
#[test]
fn a_read_outside_the_locking_rule_runs_again_at_serializable() {
    let (ledger, _db) = pg_ledger();
    let known = [0x04, 3, 3, 3, 3, 3, 3];
    issue(&ledger, known);
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let (float, known_card) = ledger
        .transact(read_committed(move |t| {
            counted.fetch_add(1, Ordering::SeqCst);
            let known_card = t.card_known(&known)?;
            Ok((t.balance("issuer:float")?, known_card))
        }))
        .unwrap();
    assert_eq!((float, known_card), (-1_000, true));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "run again at SERIALIZABLE");

    let (unknown, counted) = ([0x04, 4, 4, 4, 4, 4, 4], runs.clone());
    runs.store(0, Ordering::SeqCst);
    let known = ledger
        .transact(read_committed(move |t| {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok((t.card_known(&unknown)?, t.card(&unknown)?))
        }))
        .unwrap();
    assert_eq!(known, (false, Default::default()));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a card with no row: locked, still READ COMMITTED"
    );
    let r = ledger.read().unwrap();
    assert!(!r.card_known(&unknown).unwrap(), "no row left behind");
    drop(r);
    ledger.close();
}

/// Clearing stays `SERIALIZABLE`. One of its transactions that read a card before a
/// `READ COMMITTED` load changed the card's row and committed cannot write the row over it
/// (first updater wins: a serialization failure), so it runs again, reads the load's change
/// and keeps it: both changes stand.
#[test]
fn a_serializable_writer_behind_a_read_committed_load_runs_again_and_keeps_both() {
    let (ledger, _db) = pg_ledger();
    let uid = [0x04, 5, 5, 5, 5, 5, 5];
    issue(&ledger, uid);
    let (read, read_rx, loaded_tx) = pause();
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let l = ledger.clone();
    let clearing = std::thread::spawn(move || {
        l.transact(move |t| {
            counted.fetch_add(1, Ordering::SeqCst);
            t.card(&uid)?;
            read.hold();
            t.set_blocked(&uid, true, "clearing", T0)
        })
        .unwrap()
    });
    read_rx.recv().unwrap();
    ledger
        .transact(read_committed(move |t| {
            t.card(&uid)?;
            t.add_load_day(&uid, 7, 250)
        }))
        .unwrap();
    loaded_tx.send(()).unwrap();
    assert!(clearing.join().unwrap().is_some(), "the block is new");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "run again after the load");
    let card = ledger.read().unwrap().card(&uid).unwrap();
    assert!(card.blocked);
    assert_eq!((card.load_day, card.load_day_minor), (7, 250));
    ledger.close();
}

/// Two `READ COMMITTED` transactions on one card with no row: the first locks it by inserting
/// its neutral row and holds it; the second (started meanwhile, waiting on that row) runs
/// only after the first commits and reads its change, so both changes to the card's day
/// stand (without the lock the second would read the card as new and write 200 over 100).
#[test]
fn a_card_with_no_row_is_locked_by_its_neutral_row() {
    let (ledger, db) = pg_ledger();
    let uid = [0x04, 8, 8, 8, 8, 8, 8];
    let (held, held_rx, go_tx) = pause();
    let l = ledger.clone();
    let first = std::thread::spawn(move || {
        l.transact(read_committed(move |t| {
            assert!(!t.card_known(&uid)?, "no row yet");
            held.hold();
            t.add_load_day(&uid, 7, 100)
        }))
        .unwrap()
    });
    held_rx.recv().unwrap();
    let l = ledger.clone();
    let second = std::thread::spawn(move || {
        l.transact(read_committed(move |t| {
            t.card(&uid)?;
            t.add_load_day(&uid, 7, 200)
        }))
        .unwrap()
    });
    // Released once the second waits on the first's row (seen by the database).
    until_one_waits(&db);
    go_tx.send(()).unwrap();
    first.join().unwrap();
    second.join().unwrap();
    let card = ledger.read().unwrap().card(&uid).unwrap();
    assert_eq!((card.load_day, card.load_day_minor), (7, 300));
    ledger.close();
}

/// A pause in a transaction's first run: [`Pause::hold`] there tells the test (the receiver
/// [`pause`] returns) and waits for the sender it returns; a run again passes straight on.
struct Pause {
    reached: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// A pause, the receiver told when it is reached, and the sender that releases it.
fn pause() -> (
    Pause,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (reached, reached_rx) = std::sync::mpsc::channel();
    let (release_tx, release) = std::sync::mpsc::channel();
    let pause = Pause {
        reached: Mutex::new(Some(reached)),
        release: Mutex::new(release),
    };
    (pause, reached_rx, release_tx)
}

impl Pause {
    fn hold(&self) {
        if let Some(tx) = self.reached.lock().unwrap().take() {
            tx.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
    }
}

/// Returns once a transaction of the ledger waits on a lock (as the database sees it), or
/// after 30 s.
fn until_one_waits(db: &TestDb) {
    let mut config: ::postgres::Config = db.url.parse().unwrap();
    let mut client = config
        .password(db.password())
        .connect(::postgres::NoTls)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND application_name = 'tapgate-charging'",
                &[],
            )
            .unwrap()
            .get(0);
        if waiting > 0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How the `READ COMMITTED` load holding a card's neutral row ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum LoadEnds {
    /// Refused: the card not written (its neutral row deleted before `COMMIT`).
    Refused,
    /// The card written (its day counted) and committed.
    Written,
    /// The card written, then the transaction failed (rolled back).
    WrittenThenFailed,
}

/// Clearing learning a card (`SERIALIZABLE`: it reads the card as unknown and issues it) while
/// a `READ COMMITTED` load holds the card's neutral row: the learner's write of the card waits
/// for the load. A load that did not write the card (refused, or rolled back) leaves no row,
/// and the card is issued as learned; a load that wrote it commits its row, so the learner runs
/// again, finds the card known and issues nothing over the load's day. Never a neutral row
/// taken for a card, never the learned value posted twice or lost.
#[test]
fn a_serializable_learner_behind_a_neutral_row_sees_what_the_load_left() {
    let (ledger, db) = pg_ledger();
    let ends = [
        LoadEnds::Refused,
        LoadEnds::Written,
        LoadEnds::WrittenThenFailed,
    ];
    for (n, ends) in (9u8..).zip(ends) {
        let uid = [0x04, n, n, n, n, n, n];
        let (held, held_rx, go_tx) = pause();
        let l = ledger.clone();
        let load = std::thread::spawn(move || {
            l.transact(read_committed(move |t| {
                assert!(!t.card_known(&uid)?, "no row yet");
                held.hold();
                if ends != LoadEnds::Refused {
                    t.add_load_day(&uid, 7, 100)?;
                }
                match ends {
                    LoadEnds::WrittenThenFailed => Err(charging::ledger::LedgerError::Database(
                        "failed after writing".into(),
                    )),
                    _ => Ok(()),
                }
            }))
        });
        held_rx.recv().unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let l = ledger.clone();
        let learner = std::thread::spawn(move || {
            l.transact(move |t| {
                counted.fetch_add(1, Ordering::SeqCst);
                t.issue_card(&uid, 500, "learned:test", T0)
            })
            .unwrap()
        });
        until_one_waits(&db);
        go_tx.send(()).unwrap();
        let loaded = load.join().unwrap();
        let issued = learner.join().unwrap();
        let r = ledger.read().unwrap();
        let card = r.card(&uid).unwrap();
        let balance = r.balance(&charging::ledger::card_account(&uid)).unwrap();
        assert!(r.card_known(&uid).unwrap(), "{ends:?}");
        match ends {
            LoadEnds::Written => {
                assert!(loaded.is_ok(), "{loaded:?}");
                assert!(!issued, "known by the time the learner ran again");
                assert_eq!(runs.load(Ordering::SeqCst), 2, "run again after the load");
                assert_eq!(
                    (card.load_day_minor, card.booked_balance_minor),
                    (100, None)
                );
                assert_eq!(balance, 0);
            }
            LoadEnds::Refused | LoadEnds::WrittenThenFailed => {
                assert_eq!(loaded.is_ok(), ends == LoadEnds::Refused, "{loaded:?}");
                assert!(issued, "{ends:?}: the card issued as learned");
                assert_eq!(
                    runs.load(Ordering::SeqCst),
                    1,
                    "{ends:?}: nothing to run again"
                );
                assert_eq!(
                    (card.load_day_minor, card.booked_balance_minor),
                    (0, Some(500))
                );
                assert_eq!(balance, 500);
            }
        }
    }
    ledger.close();
}
