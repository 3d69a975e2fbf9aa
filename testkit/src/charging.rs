//! The charging server in process on a loopback port, with the software HSM or a SoftHSM2
//! token, and the HTTP calls its tests make.

use charging::api::AppState;
use charging::server::{self, ServerConfig, ServerError};

/// The HTTP calls its tests make (the kit's [`crate::http`]).
pub use crate::http::{post, post_with_key};

/// A charging server serving on a loopback port from its own runtime; stopped (and its data
/// directory removed) when dropped.
pub struct ChargingServer {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The server's state (ledger, load service, …), for tests that look inside.
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
    handle: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
    _dir: tempfile::TempDir,
    /// The PostgreSQL cluster of a server whose ledger is there (stopped after the server).
    _pg: Option<crate::postgres::TestDb>,
}

impl Drop for ChargingServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (Some(rt), Some(h)) = (self.rt.take(), self.handle.take()) else {
            return;
        };
        // On a thread of its own: a runtime can be neither blocked on nor dropped from inside
        // another one (an async test holding a server).
        let _ = std::thread::spawn(move || {
            let _ = rt.block_on(h);
            drop(rt);
        })
        .join();
    }
}

/// Which HSM a test's server uses: the suites that touch the HSM run once with each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HsmKind {
    /// `purse::sam::SoftwareHsm`.
    Software,
    /// `tapgate_pkcs11::Pkcs11Hsm` on a fresh SoftHSM2 token (SoftHSM2 must be installed;
    /// `./test.sh` installs it — without it these tests fail and say so).
    Pkcs11,
}

/// The HSM of `kind` holding the HSM role's keys of `keys`.
pub fn hsm(kind: HsmKind, keys: &purse::keys::KeySet) -> Box<dyn purse::sam::Hsm + Send> {
    match kind {
        HsmKind::Software => Box::new(purse::sam::SoftwareHsm::new(keys).expect("software HSM")),
        HsmKind::Pkcs11 => {
            let (_token, hsm) = crate::softhsm::hsm_for(keys).unwrap_or_else(|e| panic!("{e}"));
            Box::new(hsm)
        }
    }
}

/// `both_hsms!(a, b)`: for each `fn a(kind: HsmKind)`, the tests `a::software` and
/// `a::pkcs11` — the same scenario and the same expected outcomes with either HSM.
#[macro_export]
macro_rules! both_hsms {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn software() {
                    super::$name($crate::charging::HsmKind::Software)
                }
                #[test]
                fn pkcs11() {
                    super::$name($crate::charging::HsmKind::Pkcs11)
                }
            }
        )*
    };
}

/// Starts a server with the software HSM; `edit` adjusts the configuration.
pub fn start(keys: &purse::keys::KeySet, edit: impl FnOnce(&mut ServerConfig)) -> ChargingServer {
    start_with(HsmKind::Software, keys, edit)
}

/// Starts a server with an HSM of `kind`; `edit` adjusts the configuration.
pub fn start_with(
    kind: HsmKind,
    keys: &purse::keys::KeySet,
    edit: impl FnOnce(&mut ServerConfig),
) -> ChargingServer {
    start_with_hsm(hsm(kind, keys), edit)
}

/// Starts a server with this HSM; `edit` adjusts the configuration (its data directory is a
/// new temporary one, the ledger's map 32 MiB).
pub fn start_with_hsm(
    hsm: Box<dyn purse::sam::Hsm + Send>,
    edit: impl FnOnce(&mut ServerConfig),
) -> ChargingServer {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut cfg = ServerConfig::from_toml(&format!(
        "data_dir = {:?}\nledger_map_size_bytes = 33554432",
        dir.path().to_str().expect("utf-8 path")
    ))
    .expect("server config");
    edit(&mut cfg);
    let pg = ledger_in_postgres(&mut cfg, dir.path());
    let state = server::build(&cfg, hsm).expect("building the charging server");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback listener");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let handle = rt.spawn(async move {
        server::serve_on(listener, &cfg, st, async {
            let _ = stopped.await;
        })
        .await
    });
    ChargingServer {
        base,
        state,
        stop: Some(stop),
        rt: Some(rt),
        handle: Some(handle),
        _dir: dir,
        _pg: pg,
    }
}

/// The ledger a test opens in `dir`: LMDB (a 64 MiB map), or with
/// `TAPGATE_TEST_LEDGER=postgres` a throwaway PostgreSQL database, migrated — the guard stops
/// its cluster, so keep it as long as the ledger (declare it before what holds the ledger).
pub fn test_ledger(
    dir: &std::path::Path,
) -> (charging::ledger::Ledger, Option<crate::postgres::TestDb>) {
    if std::env::var("TAPGATE_TEST_LEDGER").is_ok_and(|v| v == "postgres") {
        let db = crate::postgres::TestDb::start();
        let cfg = charging::ledger::PgConfig::new(&db.url, Some(db.password()));
        charging::ledger::postgres::migrate(&cfg).expect("migrating the test database");
        let ledger = charging::ledger::Ledger::open_postgres(cfg).expect("opening the ledger");
        return (ledger, Some(db));
    }
    let ledger = charging::ledger::Ledger::open(dir, 64 << 20).expect("opening the ledger");
    (ledger, None)
}

/// A load service on `ledger` with the software HSM of `keys` and the sandbox card processor
/// (funding source `card`, kept in `dir`), as the charging server wires it; the processor too,
/// for tests that look at its authorisations.
pub fn load_service_on(
    ledger: charging::ledger::Ledger,
    keys: &purse::keys::KeySet,
    dir: &std::path::Path,
    cfg: charging::load::LoadConfig,
) -> (
    charging::load::LoadService,
    std::sync::Arc<charging::funding::SandboxProcessor>,
) {
    use charging::funding::{FundingSource, SandboxProcessor};
    let processor =
        std::sync::Arc::new(SandboxProcessor::open(&dir.join("processor")).expect("processor"));
    let svc = charging::load::LoadService::new(
        ledger,
        Box::new(purse::sam::SoftwareHsm::new(keys).expect("software HSM")),
        vec![processor.clone() as std::sync::Arc<dyn FundingSource>],
        cfg,
    );
    (svc, processor)
}

/// [`load_service_on`] the [`test_ledger`] in `dir`. The guard of its PostgreSQL cluster (if
/// any) comes first: bound first, it is dropped after the service.
pub fn load_service(
    dir: &std::path::Path,
    keys: &purse::keys::KeySet,
    cfg: charging::load::LoadConfig,
) -> (
    Option<crate::postgres::TestDb>,
    charging::load::LoadService,
    std::sync::Arc<charging::funding::SandboxProcessor>,
) {
    let (ledger, pg) = test_ledger(&dir.join("ledger"));
    let (svc, processor) = load_service_on(ledger, keys, dir, cfg);
    (pg, svc, processor)
}

/// A load intent as the load service records it once the funding is authorised: `amount_minor`
/// onto card `uid` at counter `tmc_before` with `balance_before_minor`, asked by `alice` (idempotency
/// key `k`) at `created_ms`, funded by the sandbox's authorisation `auth-1`.
pub fn authorised_load(
    uid: [u8; 7],
    tmc_before: u32,
    balance_before_minor: i32,
    amount_minor: i32,
    created_ms: u64,
) -> charging::ledger::LoadIntent {
    use charging::ledger::{IntentKind, IntentState, LoadIntent};
    LoadIntent {
        uid: hex::encode_upper(uid),
        tmc_before,
        attempt: 0,
        balance_before_minor,
        amount_minor,
        key_version: 1,
        funding_source: "sandbox".into(),
        funding_auth: "auth-1".into(),
        instrument: String::new(),
        idempotency_key: "k".into(),
        requested_by: "alice".into(),
        state: IntentState::Authorised,
        created_ms,
        settled_ms: None,
        kind: IntentKind::Load,
        reverses_tmc: None,
        reversed_at_tmc: None,
        payment_id: None,
    }
}

/// With `TAPGATE_TEST_LEDGER=postgres`, a server whose test left the ledger at its default
/// (LMDB) keeps it in a throwaway PostgreSQL database instead — so every suite that starts its
/// server here runs on either backend:
/// `TAPGATE_TEST_LEDGER=postgres cargo test -p charging --test clearing`.
fn ledger_in_postgres(
    cfg: &mut ServerConfig,
    dir: &std::path::Path,
) -> Option<crate::postgres::TestDb> {
    let wanted = std::env::var("TAPGATE_TEST_LEDGER").is_ok_and(|v| v == "postgres");
    if !wanted || cfg.ledger != server::LedgerConfig::default() {
        return None;
    }
    let db = crate::postgres::TestDb::start();
    let pw = dir.join("ledger-password");
    tapgate_secrets::write_file(&pw, db.password()).expect("writing the password file");
    charging::ledger::postgres::migrate(&charging::ledger::PgConfig::new(
        &db.url,
        Some(db.password()),
    ))
    .expect("migrating the test database");
    cfg.ledger = server::LedgerConfig {
        kind: server::LedgerKind::Postgres,
        url: Some(db.url.clone()),
        password_file: Some(pw),
        password_env: None,
        max_connections: None,
        ca_file: None,
    };
    Some(db)
}

/// Registers a funding instrument (a card token) to the token's account: 201 or 200.
pub fn register_instrument(base: &str, token: &str, source: &str, instrument: &str) {
    let (code, body) = post(
        &format!("{base}/v1/instruments"),
        token,
        serde_json::json!({"source": source, "instrument": instrument}),
    );
    assert!(
        code == 201 || code == 200,
        "registering {source}:{instrument}: {code} {body}"
    );
}

/// Where an in-process relay takes the card away (a tear, a client that vanishes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tear {
    /// The command (counted from 1 over the whole relay) at which the card leaves.
    pub at: usize,
    /// Whether that command reached the card before it left.
    pub delivered: bool,
}

/// Relays the load service's commands to `card` as `caller` until a final reply (the
/// in-process twin of the HTTP relay): each step's answers posted `step_ms` after the last
/// (`now_ms` advances). With `tear`, the card leaves the field at that command and the reply
/// then outstanding comes back unanswered. Returns the last reply and how many commands the
/// card answered; the service's refusals are returned as errors.
pub fn relay_in_process(
    svc: &charging::load::LoadService,
    caller: &str,
    card: &mut purse::card::Card,
    mut reply: charging::load::Reply,
    now_ms: &mut u64,
    step_ms: u64,
    tear: Option<Tear>,
) -> Result<(charging::load::Reply, usize), charging::load::LoadError> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut n = 0;
    loop {
        let charging::load::Reply::Command {
            session_id,
            seq,
            commands,
        } = &reply
        else {
            return Ok((reply, n));
        };
        let mut answers = Vec::with_capacity(commands.len());
        for c in commands {
            let apdu = hex::decode(c).expect("a hex command");
            if let Some(t) = tear.filter(|t| t.at == n + 1) {
                if t.delivered {
                    let _ = card.process(&apdu, &mut rng);
                }
                card.remove_from_field();
                return Ok((reply, n));
            }
            answers.push(card.process(&apdu, &mut rng).expect("the card answers"));
            n += 1;
        }
        *now_ms += step_ms;
        reply = svc.respond(caller, session_id, *seq, &answers, *now_ms)?;
    }
}

/// `caller`'s load of `amount_minor` onto `card`, funded by the sandbox's card `tok_visa`, under
/// idempotency key `key`: started at `now_ms` and relayed in process ([`relay_in_process`], a
/// step every 5 ms) until its final reply or `tear`; the card is out of the field afterwards.
/// Returns the last reply and how many commands the card answered.
pub fn load_in_process(
    svc: &charging::load::LoadService,
    caller: &str,
    card: &mut purse::card::Card,
    amount_minor: i32,
    key: &str,
    now_ms: &mut u64,
    tear: Option<Tear>,
) -> (charging::load::Reply, usize) {
    let req = charging::load::LoadRequest {
        uid: card.state().uid,
        amount_minor,
        funding_source: "card".into(),
        instrument: "tok_visa".into(),
        idempotency_key: key.into(),
    };
    let first = svc.start(caller, req, *now_ms).expect("the load starts");
    let out = relay_in_process(svc, caller, card, first, now_ms, 5, tear).expect("relayed");
    card.remove_from_field();
    out
}
