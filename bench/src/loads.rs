//! Bench scenario `loads`: online loads end to end over HTTP against the real charging server
//! (axum, software HSM, LMDB ledger, sandbox processor) on loopback. Client threads each own
//! emulated cards and only relay APDUs.
//!
//! The limit, measured in the same run: `raw_round_trips_per_s`, the same client threads making
//! the same number of HTTP round trips, with bodies of the same sizes (recorded from one load
//! relayed through a byte-recording relay before the clock starts), to an endpoint that does
//! nothing on the same server code ([`crate::limits::raw_round_trips`]) — half right before the
//! loads and half right after — and `ratio` = loads/s × round trips per load / raw; and the
//! CPU of it: `raw_cpu_us_per_round_trip` (process CPU, server and clients) and `cpu_ratio` =
//! CPU per load / (round trips per load × raw CPU per round trip).

use crate::Figures;
use charging::api::{Auth, Role, TokenEntry};
use charging::client::{Client, LoadAsk};
use charging::server::{self, ServerConfig};
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use purse::txn::EmulatedReader;
use rand::SeedableRng;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub(crate) const TOKEN: &str = "tg_bench_cardholder";
static ROUND_TRIPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn relay(
    agent: &ureq::Agent,
    base: &str,
    card: &mut Card,
    key: &str,
    amount: i32,
) -> anyhow::Result<()> {
    let instrument = format!("tok_visa_{key}");
    let ask = LoadAsk {
        amount_minor: amount,
        source: "card",
        instrument: &instrument,
        idempotency_key: key,
        vanish: None,
    };
    let mut reader = EmulatedReader {
        card,
        rng: rand::rngs::StdRng::seed_from_u64(7),
    };
    let relayed = Client::with_agent(agent.clone(), base, TOKEN).load(&mut reader, &ask)?;
    ROUND_TRIPS.store(
        relayed.round_trips.into(),
        std::sync::atomic::Ordering::Relaxed,
    );
    anyhow::ensure!(
        relayed.completed().is_some(),
        "load did not complete: {:?}",
        relayed.ending
    );
    Ok(())
}

/// Registers the card tokens the bench loads with `keys` pay with (`tok_visa_<key>`) to the
/// bench caller — a load is funded only from the caller's own instruments — before the clock
/// starts.
pub(crate) fn register_tokens(
    agent: &ureq::Agent,
    base: &str,
    keys: impl IntoIterator<Item = String>,
) -> anyhow::Result<()> {
    let client = Client::with_agent(agent.clone(), base, TOKEN);
    for key in keys {
        client.register_card_token(&format!("tok_visa_{key}"))?;
    }
    Ok(())
}

/// The ledger a `loads` run keeps its books in (`--ledger`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LedgerChoice {
    /// The embedded default, in the run's temporary directory.
    Lmdb,
    /// A throwaway PostgreSQL cluster on loopback (the test kit's), migrated as `tapgate
    /// charging migrate` migrates; then the same scenario on LMDB, for the ratio.
    Postgres,
}

/// The longest one run drives loads: past it, clients start no new load and the figures are
/// over the loads done.
const RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs `n` loads from `clients` client threads (`--clients`, else TAPGATE_BENCH_CLIENTS, else
/// 8) with the ledger on `ledger`, against `servers` charging servers (`--servers`; more than
/// one needs PostgreSQL: the client threads are spread over them round robin). On PostgreSQL
/// the figures are the PostgreSQL run's, then `ledger_retries` (transactions the database
/// aborted and the ledger ran again), `ledger_round_trips_per_load` (statements sent to the
/// database per load, `BEGIN` and `COMMIT` included), with several servers the one-server run's of the same
/// invocation (`one_server_loads_per_s`, `one_server_p99_ms`, `ratio_to_one_server`), and the
/// LMDB run's: `lmdb_loads_per_s`, `lmdb_p99_ms`, `ratio_to_lmdb`. On LMDB the figures end
/// with the ledger's group commits over the loads: `ledger_group_commits_per_load` (each one
/// fsync) and `ledger_transactions_per_group_commit`.
pub fn run(
    n: Option<u64>,
    clients: Option<usize>,
    ledger: LedgerChoice,
    servers: usize,
) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(2_000);
    let clients: usize = clients
        .or_else(|| {
            std::env::var("TAPGATE_BENCH_CLIENTS")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(8)
        .max(1);
    anyhow::ensure!(servers >= 1, "--servers must be at least 1");
    match ledger {
        LedgerChoice::Lmdb if servers > 1 => anyhow::bail!(
            "--servers {servers} needs --ledger postgres: an LMDB ledger is one process's file"
        ),
        LedgerChoice::Lmdb => Ok(run_once(n, clients, None, 1, &|| 0.0)?.0),
        LedgerChoice::Postgres => {
            let mut cluster = tapgate_testkit::postgres::Cluster::try_start()
                .map_err(|e| anyhow::anyhow!("--ledger postgres: {e}"))?;
            let db_cpu = cluster.cpu_reader();
            let one = if servers > 1 {
                let url = cluster.create_database();
                Some(run_once(n, clients, Some((&url, cluster.password())), 1, &db_cpu)?.1)
            } else {
                None
            };
            let url = cluster.create_database();
            let retries_before = charging::ledger::PgLedger::retries();
            let (mut figures, pg) = run_once(
                n,
                clients,
                Some((&url, cluster.password())),
                servers,
                &db_cpu,
            )?;
            let retries = charging::ledger::PgLedger::retries() - retries_before;
            drop(cluster);
            let (_, lmdb) = run_once(n, clients, None, 1, &|| 0.0)?;
            figures.insert(0, ("ledger", "postgres".into()));
            figures.insert(1, ("servers", (servers as u64).into()));
            figures.push(("ledger_retries", retries.into()));
            figures.push((
                "ledger_round_trips_per_load",
                ((pg.round_trips_per_load * 10.0).round() / 10.0).into(),
            ));
            if let Some(one) = one {
                figures.push((
                    "one_server_loads_per_s",
                    (one.loads_per_s.round() as u64).into(),
                ));
                figures.push(("one_server_p99_ms", one.p99_ms.into()));
                figures.push((
                    "ratio_to_one_server",
                    crate::limits::ratio(pg.loads_per_s, one.loads_per_s),
                ));
            }
            // The machine's CPU per load, whoever spends it: this process (servers and
            // clients) and, on PostgreSQL, the database's processes; the ratio the two runs
            // would have if CPU alone bounded them.
            let pg_cpu = pg.cpu_us_per_load + pg.db_cpu_us_per_load;
            figures.push(("db_cpu_us_per_load", (pg.db_cpu_us_per_load as u64).into()));
            figures.push(("cpu_us_per_load", (pg_cpu as u64).into()));
            figures.push(("lmdb_cpu_us_per_load", (lmdb.cpu_us_per_load as u64).into()));
            figures.push((
                "cpu_bound_ratio_to_lmdb",
                crate::limits::ratio(lmdb.cpu_us_per_load, pg_cpu),
            ));
            figures.push(("lmdb_loads_per_s", (lmdb.loads_per_s.round() as u64).into()));
            figures.push(("lmdb_p99_ms", lmdb.p99_ms.into()));
            figures.push((
                "ratio_to_lmdb",
                crate::limits::ratio(pg.loads_per_s, lmdb.loads_per_s),
            ));
            Ok(figures)
        }
    }
}

/// What the ratio to LMDB needs of a run.
struct Headline {
    loads_per_s: f64,
    p99_ms: f64,
    /// Statements sent to PostgreSQL per load, `BEGIN` and `COMMIT` included (0 on LMDB).
    round_trips_per_load: f64,
    /// This process's CPU per load (servers and clients), µs.
    cpu_us_per_load: f64,
    /// The database's processes' CPU per load (0 on LMDB), µs.
    db_cpu_us_per_load: f64,
}

/// One run on fresh servers: one on LMDB, or `servers` on the PostgreSQL database at `pg`
/// (URL, password), the client threads spread over them round robin; `db_cpu` reads the
/// database's CPU seconds so far (0 without one).
fn run_once(
    n: u64,
    clients: usize,
    pg: Option<(&str, &str)>,
    servers: usize,
    db_cpu: &dyn Fn() -> f64,
) -> anyhow::Result<(Figures, Headline)> {
    let dir = tempfile::tempdir()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let keys = KeySet::generate(&mut rng);
    let mut hsm_kind = String::new();
    let mut running = Vec::with_capacity(servers);
    for i in 0..servers {
        let (kind, server_hsm) = server_hsm(&keys)?;
        hsm_kind = kind;
        let data = dir.path().join(format!("server-{i}"));
        std::fs::create_dir_all(&data)?;
        running.push(Server::start(&data, pg, server_hsm)?);
    }
    let bases: Vec<String> = running.iter().map(|s| s.base.clone()).collect();
    let hsm = SoftwareHsm::new(&keys)?;
    let per_client = n.div_ceil(clients as u64);
    register_tokens(
        &ureq::AgentBuilder::new().build(),
        &bases[0],
        (0..clients)
            .flat_map(|c| (0..per_client).map(move |i| format!("c{c}-{i}")))
            .chain(["calibration".to_string()]),
    )?;
    let plan = calibrate(running[0].addr, &hsm)?;
    let raw_before = crate::limits::raw_round_trips(clients, per_client / 2, &plan, TOKEN)?;
    let round_trips_before = charging::ledger::PgLedger::round_trips();
    let commits_before = charging::ledger::LmdbLedger::group_commits();
    let db_cpu_before = db_cpu();
    let driven = drive(clients, per_client, n, &bases, &hsm)?;
    let db_cpu_s = (db_cpu() - db_cpu_before).max(0.0);
    let round_trips = charging::ledger::PgLedger::round_trips() - round_trips_before;
    let commits_after = charging::ledger::LmdbLedger::group_commits();
    // On LMDB: the group commits (one fsync each) over the loads, and the transactions in them.
    let group_commits = pg.is_none().then(|| {
        (
            commits_after.0 - commits_before.0,
            commits_after.1 - commits_before.1,
        )
    });
    let raw_after =
        crate::limits::raw_round_trips(clients, per_client - per_client / 2, &plan, TOKEN)?;
    for server in running {
        server.stop();
    }
    let loads = driven.lat.len().max(1) as f64;
    let headline = Headline {
        loads_per_s: driven.lat.len() as f64 / driven.wall.as_secs_f64(),
        p99_ms: crate::stats::quantile(&driven.lat, 0.99) as f64 / 1000.0,
        round_trips_per_load: round_trips as f64 / loads,
        cpu_us_per_load: driven.total_cpu * 1e6 / loads,
        db_cpu_us_per_load: db_cpu_s * 1e6 / loads,
    };
    let mut figures = report(&hsm_kind, clients, &driven, &plan, raw_before, raw_after);
    if let Some((commits, transactions)) = group_commits {
        let loads = driven.lat.len().max(1) as f64;
        figures.push((
            "ledger_group_commits_per_load",
            ((commits as f64 / loads * 100.0).round() / 100.0).into(),
        ));
        figures.push((
            "ledger_transactions_per_group_commit",
            ((transactions as f64 / commits.max(1) as f64 * 100.0).round() / 100.0).into(),
        ));
    }
    Ok((figures, headline))
}

/// The server's HSM: TAPGATE_BENCH_HSM=pkcs11 puts its keys in a SoftHSM2 token
/// (docs/hsm.md); the default is the software HSM. Its name and the HSM.
fn server_hsm(keys: &KeySet) -> anyhow::Result<(String, Box<dyn purse::sam::Hsm + Send>)> {
    let hsm_kind = std::env::var("TAPGATE_BENCH_HSM").unwrap_or_else(|_| "software".into());
    let hsm: Box<dyn purse::sam::Hsm + Send> = match hsm_kind.as_str() {
        "software" => Box::new(SoftwareHsm::new(keys)?),
        "pkcs11" => Box::new(
            tapgate_testkit::softhsm::hsm_for(keys)
                .map_err(|e| anyhow::anyhow!("TAPGATE_BENCH_HSM=pkcs11: {e}"))?
                .1,
        ),
        other => anyhow::bail!("TAPGATE_BENCH_HSM={other:?}: use software or pkcs11"),
    };
    Ok((hsm_kind, hsm))
}

/// The charging server on loopback, on a runtime of its own.
struct Server {
    addr: std::net::SocketAddr,
    /// `http://<addr>`.
    base: String,
    rt: tokio::runtime::Runtime,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), charging::server::ServerError>>,
}

impl Server {
    /// The server with its data in `dir`, the bench caller's token, no load rate limit; its
    /// ledger in LMDB there, or with `pg` (URL, password) in that PostgreSQL database, through
    /// the `[ledger]` table a deployment writes and migrated as `tapgate charging migrate` does.
    fn start(
        dir: &std::path::Path,
        pg: Option<(&str, &str)>,
        hsm: Box<dyn purse::sam::Hsm + Send>,
    ) -> anyhow::Result<Self> {
        let mut toml = format!("data_dir = {:?}\n", dir.to_str().unwrap_or_default());
        if let Some((url, password)) = pg {
            let pw = dir.join("ledger-password");
            tapgate_secrets::write_file(&pw, password)?;
            toml.push_str(&format!(
                "[ledger]\nkind = \"postgres\"\nurl = {url:?}\npassword_file = {:?}\n",
                pw.to_str().unwrap_or_default()
            ));
        }
        let mut cfg = ServerConfig {
            tokens: vec![TokenEntry {
                name: "bench".into(),
                role: Role::Cardholder,
                sha256: Auth::hash_token(TOKEN),
            }],
            ..ServerConfig::from_toml(&toml)?
        };
        if pg.is_some() {
            charging::ledger::postgres::migrate(&cfg.ledger.postgres()?)?;
        }
        // One bench caller drives every load (each load has its own card token: the
        // per-instrument daily limit is per rider).
        cfg.limits.loads_per_minute_per_client = 0;
        let state = server::build(&cfg, hsm)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = rt.spawn(async move {
            server::serve_on(listener, &cfg, state, async {
                let _ = stopped.await;
            })
            .await
        });
        Ok(Server {
            addr,
            base: format!("http://{addr}"),
            rt,
            stop,
            handle,
        })
    }

    /// Stops the server and waits until it has.
    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.rt.block_on(self.handle);
    }
}

/// One load through a recording relay before the clock starts: the round trips' body sizes
/// for the raw limit.
fn calibrate(
    server: std::net::SocketAddr,
    hsm: &SoftwareHsm,
) -> anyhow::Result<Vec<crate::limits::RoundTrip>> {
    let recorder = crate::limits::Recorder::start(server)?;
    let uid = [0x04, 0xCA, 0x1B, 0, 0, 0, 1];
    let mut card = Card::personalise(&Personalisation::transit(uid, 0), hsm.card_keys(&uid, 1)?);
    let agent = ureq::AgentBuilder::new().build();
    relay(
        &agent,
        &format!("http://{}", recorder.addr),
        &mut card,
        "calibration",
        1_000,
    )?;
    drop(agent);
    recorder.finish()
}

/// What the loads measured.
struct Driven {
    /// Each load's latency, sorted (µs).
    lat: Vec<u64>,
    wall: std::time::Duration,
    /// Process CPU over the loads, and the client threads' share of it (s).
    total_cpu: f64,
    clients_cpu: f64,
}

/// `clients` threads each load `per_client` cards of their own, relaying APDUs; client `c`
/// to server `c % bases.len()`.
fn drive(
    clients: usize,
    per_client: u64,
    n: u64,
    bases: &[String],
    hsm: &SoftwareHsm,
) -> anyhow::Result<Driven> {
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let client_cpu = Arc::new(Mutex::new(0.0f64));
    let cpu_before = crate::stats::cpu_s();
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for c in 0..clients {
            let base = bases[c % bases.len()].clone();
            let lat = latencies.clone();
            let ccpu = client_cpu.clone();
            let mut cards: Vec<Card> = (0..per_client)
                .map(|i| {
                    let mut uid = [0x04, c as u8, 0, 0, 0, 0, 0];
                    uid[3..7].copy_from_slice(&(i as u32).to_be_bytes());
                    Card::personalise(
                        &Personalisation::transit(uid, 0),
                        hsm.card_keys(&uid, 1).expect("keys"),
                    )
                })
                .collect();
            handles.push(scope.spawn(move || -> anyhow::Result<()> {
                let agent = ureq::AgentBuilder::new()
                    .timeout(std::time::Duration::from_secs(60))
                    .build();
                for (i, card) in cards.iter_mut().enumerate() {
                    if started.elapsed() > RUN_LIMIT {
                        break;
                    }
                    let t = Instant::now();
                    relay(&agent, &base, card, &format!("c{c}-{i}"), 1_000)?;
                    lat.lock()
                        .expect("lat")
                        .push(t.elapsed().as_micros() as u64);
                }
                *ccpu.lock().expect("cpu") += crate::stats::thread_cpu_s();
                Ok(())
            }));
        }
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        }
        Ok(())
    })?;
    let wall = started.elapsed();
    let total_cpu = crate::stats::cpu_s() - cpu_before;
    let clients_cpu = *client_cpu.lock().expect("cpu");
    let mut lat = latencies.lock().expect("lat").clone();
    lat.sort_unstable();
    Ok(Driven {
        lat,
        wall,
        total_cpu,
        clients_cpu,
    })
}

/// The figures, in print order (names are a contract: docs/benchmarks.md); `raw_before` and
/// `raw_after` are the raw limit's (round trips, seconds, CPU seconds) either side.
fn report(
    hsm_kind: &str,
    clients: usize,
    d: &Driven,
    plan: &[crate::limits::RoundTrip],
    raw_before: (u64, f64, f64),
    raw_after: (u64, f64, f64),
) -> Figures {
    let server_cpu = (d.total_cpu - d.clients_cpu).max(0.0);
    let raw_round_trips = (raw_before.0 + raw_after.0) as f64;
    let raw_per_s = raw_round_trips / (raw_before.1 + raw_after.1);
    let raw_cpu_us_per_round_trip = (raw_before.2 + raw_after.2) * 1e6 / raw_round_trips;
    let lat = &d.lat;
    let total = lat.len() as u64;
    let loads_per_s = total as f64 / d.wall.as_secs_f64();
    let round_trips_per_load = plan.len() as u64;
    let bytes = |f: fn(&crate::limits::RoundTrip) -> usize| -> u64 {
        plan.iter().map(|r| f(r) as u64).sum()
    };
    vec![
        ("hsm", hsm_kind.into()),
        ("loads", total.into()),
        ("clients", (clients as u64).into()),
        (
            "server_cpu_us_per_load",
            (((server_cpu * 1e6) / total.max(1) as f64) as u64).into(),
        ),
        (
            "client_cpu_us_per_load",
            (((d.clients_cpu * 1e6) / total.max(1) as f64) as u64).into(),
        ),
        ("loads_per_s", (loads_per_s.round() as u64).into()),
        (
            "p50_ms",
            (crate::stats::quantile(lat, 0.5) as f64 / 1000.0).into(),
        ),
        (
            "p99_ms",
            (crate::stats::quantile(lat, 0.99) as f64 / 1000.0).into(),
        ),
        (
            "http_round_trips_per_load",
            ROUND_TRIPS
                .load(std::sync::atomic::Ordering::Relaxed)
                .into(),
        ),
        ("round_trips", described(plan).into()),
        ("request_bytes_per_load", bytes(|r| r.request_bytes).into()),
        (
            "response_bytes_per_load",
            bytes(|r| r.response_bytes).into(),
        ),
        ("raw_round_trips_per_s", (raw_per_s.round() as u64).into()),
        (
            "raw_cpu_us_per_round_trip",
            (raw_cpu_us_per_round_trip.round() as u64).into(),
        ),
        (
            "cpu_ratio",
            crate::limits::ratio(
                d.total_cpu * 1e6 / total.max(1) as f64,
                raw_cpu_us_per_round_trip * round_trips_per_load as f64,
            ),
        ),
        (
            "ratio",
            crate::limits::ratio(loads_per_s * round_trips_per_load as f64, raw_per_s),
        ),
    ]
}

/// Each recorded round trip as `<request line>: <request bytes> B / <response bytes> B`.
fn described(plan: &[crate::limits::RoundTrip]) -> Vec<String> {
    plan.iter()
        .map(|r| {
            format!(
                "{}: {} B / {} B",
                r.request_line, r.request_bytes, r.response_bytes
            )
        })
        .collect()
}
