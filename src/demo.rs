//! `tapgate demo`: a day of taps and loads, in one process, on the real parts built so far.
//!
//! - The charging server (axum, software HSM, LMDB ledger with group commit, sandbox card
//!   processor, a mileage programme, a partner mall selling vouchers) runs on a loopback port.
//! - Riders who run short top up online through `tapgate charge`'s relay over HTTP, funded by
//!   card, mileage or a voucher bought from the mall; some clients vanish mid-load.
//! - Validators are the validator crate's gates (`validator::gate::Gate`, what `tapgate
//!   validator` runs): a software SAM, the signed metro-city fare table, the blocklist from MQTT
//!   and an LMDB journal each, at rail gates (tap in/out), bus doors and the night bus. They
//!   quote fares from the cards' trip records (distance, transfers, caps, tap-out penalties),
//!   debit emulated cards offline, and publish signed tap records over MQTT to the embedded
//!   broker (rumqttd, a password per device), keeping them until the gateway confirms. About 2%
//!   of dialogues are torn (power lost after any NVM write, card pulled before any APDU, answer
//!   lost after it); the rider taps that gate again and its journal settles the debit from the
//!   card's counter. The gateway stores taps durably, forwards them to clearing, and is killed
//!   and restarted mid-day.
//! - A hotel's pay-TV box (a charge gate with the hotel's signed table) sells films and sports
//!   hours on the same cards over the hotel's topics to a second gateway (operator "hotel",
//!   relaying no blocklist: the box holds the card scheme's list from the metro's topics), so
//!   the revenue per operator is booked apart and checked against what each side collected.
//! - The day ends with the conservation check: every card's balance equals the ledger's shadow
//!   purse, reconciliation balances every card, no counter is lost or booked twice.

use anyhow::{ensure, Context, Result};
use charging::api::{Auth, Role, TokenEntry};
use charging::client::{Client, LoadAsk, Vanish};
use charging::load::Reply;
use charging::partner::{PartnerConfig, Partners};
use charging::server::{self, ServerConfig};
use clap::Args;
use ed25519_dalek::Signer;
use fare_rules::record::TapKind as GateKind;
use purse::card::{Card, Personalisation, COMMIT_WRITES};
use purse::keys::KeySet;
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::Hsm;
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::tap::RefusalReason;
use purse::txn::{self, Decision, EmulatedReader, Outcome, Transport, TransportError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use validator::gate::{Answer, Gate, Placement, Settled};
use validator::journal::Journal;

/// `tapgate demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Number of validators.
    #[arg(long, default_value_t = 8)]
    validators: u32,
    /// Number of cards.
    #[arg(long, default_value_t = 200)]
    cards: u32,
    /// Number of taps.
    #[arg(long, default_value_t = 5_000)]
    taps: u32,
    /// Random seed (a run with the same seed and sizes repeats, but for timings).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-mille of card dialogues torn at a random point.
    #[arg(long = "tear-per-mille", default_value_t = 20)]
    tear_per_mille: u32,
    /// Keep the charging data here (default: a temporary directory removed at the end).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug)]
enum Tear {
    PullBefore(usize),
    LoseAnswer(usize),
    Power(u32),
}

struct DemoReader<'a> {
    inner: EmulatedReader<'a, &'a mut StdRng>,
    tear: Option<Tear>,
    sent: usize,
}

impl Transport for DemoReader<'_> {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        self.inner.card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.sent += 1;
        match self.tear {
            Some(Tear::PullBefore(n)) if self.sent >= n => {
                self.inner.card.remove_from_field();
                Err(TransportError::CardGone)
            }
            Some(Tear::LoseAnswer(n)) if self.sent >= n => {
                let _ = self.inner.transmit(command);
                self.inner.card.remove_from_field();
                Err(TransportError::CardGone)
            }
            _ => self.inner.transmit(command),
        }
    }
}

struct Rider {
    card: Card,
    /// The rider's cardholder token (its account is `rider-<i>`).
    token: String,
    /// The rider's card token at the processor, registered to the rider's account.
    card_token: String,
    /// The rider's mileage member id, linked to the rider's account by the airline.
    member: String,
    /// The validator where the card was last torn: the rider taps there again, and its journal
    /// settles the debit from the card's counter.
    torn_at: Option<usize>,
    /// The network of a trip tapped in and not yet out.
    trip_network: Option<u16>,
    /// A load whose client vanished (settled by the server at the next load or by clearing).
    pending_load: bool,
}

#[derive(Default)]
struct Tally {
    taps_refused_blocked: u64,
    taps_accepted: u64,
    taps_refused: u64,
    taps_torn: u64,
    taps_repeat: u64,
    /// Accepted taps that continued a journey under a transfer rule, were lowered by a cap, or
    /// carried a missing-tap-out penalty (from the trip record the gate wrote on the card).
    taps_transfer: u64,
    taps_capped: u64,
    taps_penalty: u64,
    refusals: std::collections::BTreeMap<&'static str, u64>,
    debits_settled_committed: u64,
    debits_settled_not_committed: u64,
    /// Torn debits the card committed but its gate could no longer prove (kept unresolved).
    debits_unresolved: u64,
    loads_completed: u64,
    loads_refused: u64,
    loads_torn: u64,
    loads_by_source: std::collections::BTreeMap<String, u64>,
    revenue_minor: i64,
    /// What the validators collected, by the operator the taps are booked to.
    revenue_by_operator: std::collections::BTreeMap<&'static str, i64>,
    /// Presentations at the hotel's pay-TV box, and sales it made.
    tv_sales: u64,
    tv_accepted: u64,
    latencies_ns: Vec<u64>,
    taps_cleared: u64,
    clearing_duplicates: u64,
    clearing_anomalies: u64,
    loads_completed_by_clearing: u64,
}

impl Tally {
    fn book(&mut self, operator: &'static str, amount_minor: i64) {
        self.revenue_minor += amount_minor;
        *self.revenue_by_operator.entry(operator).or_default() += amount_minor;
    }
}

/// What a guest buys at the pay-TV box: a film, or a few started hours of sports (capped per
/// TV day by the hotel's table, from the card's own records).
fn tv_sale(rng: &mut StdRng) -> validator::gate::Sale {
    if rng.gen_bool(0.5) {
        validator::gate::Sale {
            charge: "movie".into(),
            items: 1,
            minutes: 0,
        }
    } else {
        validator::gate::Sale {
            charge: "sports".into(),
            items: 0,
            minutes: rng.gen_range(30..=240),
        }
    }
}

/// Each rider's phone app has its own cardholder token (`rider_token`); the airline credits
/// miles through the partner API with its own.
const AIRLINE: &str = "tg_demo_airline";
const GATEWAY: &str = "tg_demo_gateway";
const HOTEL_GATEWAY: &str = "tg_demo_hotel_gateway";
const OPS: &str = "tg_demo_operator";

fn pick_tear(rng: &mut StdRng, per_mille: u32) -> Option<Tear> {
    if rng.gen_range(0..1000) >= per_mille {
        return None;
    }
    Some(match rng.gen_range(0..3) {
        0 => Tear::PullBefore(rng.gen_range(1..=10)),
        1 => Tear::LoseAnswer(rng.gen_range(1..=10)),
        _ => Tear::Power(rng.gen_range(1..=COMMIT_WRITES)),
    })
}

fn rider_token(i: u32) -> String {
    format!("tg_demo_rider_{i}")
}

/// The validator signs the tap record (wire format v2: the MAC covers its operator, the metro)
/// with its device key.
fn tap_wire(
    sam: &SoftwareSam,
    r: &CommitReceipt,
    device_id: u32,
    seq: u64,
    now_ms: u64,
) -> [u8; purse::tap::TAP_LEN] {
    use purse::sam::Sam;
    let record = purse::tap::TapRecord::accepted(
        r,
        purse::tap::TapMeta {
            device_id,
            device_seq: seq,
            device_time_ms: now_ms,
            ..Default::default()
        },
    );
    record.sign_with("metro", |body| sam.device_mac(body))
}

/// The gates of the day, by validator index (cycled): entries and exits on the metro lines, a
/// bus route with tap-out, the flat night bus.
const GATES: [(&str, &str, GateKind); 8] = [
    ("M1", "Central", GateKind::In),
    ("M1", "University", GateKind::Out),
    ("M2", "Old Town", GateKind::In),
    ("M2", "Stadium", GateKind::Out),
    ("B7", "University", GateKind::In),
    ("B7", "Lakeside", GateKind::Out),
    ("N1", "Market", GateKind::Entry),
    ("M1", "Harbor", GateKind::Out),
];

/// 2026-12-01 05:00 in Metro City (UTC+9), unix ms.
const DAY0_MS: u64 = 1_796_068_800_000;

/// Publishes a journalled tap over MQTT; returns the debit it records (0 for others).
fn publish_journalled(net: &mut Network, journal: &Journal, vi: usize, seq: u64) -> Result<i64> {
    let (s, wire) = journal
        .outbox_after(seq - 1, 1)?
        .into_iter()
        .next()
        .context("a journalled tap is missing")?;
    ensure!(s == seq, "journal returned tap {s} for {seq}");
    let amount = if wire[1] == 0 && wire[2] == TxKind::Debit as u8 {
        i64::from(i32::from_be_bytes([wire[15], wire[16], wire[17], wire[18]]))
    } else {
        0
    };
    net.publish(vi, seq, wire)?;
    Ok(amount)
}

fn post(
    agent: &ureq::Agent,
    url: &str,
    token: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    match agent
        .post(url)
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(body)
    {
        Ok(r) => Ok(r.into_json().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => {
            let b: serde_json::Value = r.into_json().unwrap_or_default();
            anyhow::bail!("{url}: {code} {}", b["detail"])
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("POST {url}"))),
    }
}

/// The validators' side of MQTT: one authenticated client per validator, an outbox of signed
/// taps kept until the gateway confirms them (store-and-forward), resent when unconfirmed.
struct Network<'a> {
    rt: &'a tokio::runtime::Runtime,
    clients: Vec<rumqttc::AsyncClient>,
    outbox: Vec<std::collections::BTreeMap<u64, Vec<u8>>>,
    /// Each device's operator (its topics).
    operators: Vec<&'static str>,
    confirmed: Arc<Mutex<Vec<std::collections::BTreeSet<u64>>>>,
}

impl Network<'_> {
    fn topic(&self, vi: usize) -> String {
        format!("tapgate/v1/{}/taps/{}", self.operators[vi], 1000 + vi)
    }

    fn publish(&mut self, vi: usize, seq: u64, wire: Vec<u8>) -> Result<()> {
        self.rt.block_on(self.clients[vi].publish(
            self.topic(vi),
            rumqttc::QoS::AtLeastOnce,
            false,
            wire.clone(),
        ))?;
        self.outbox[vi].insert(seq, wire);
        Ok(())
    }

    /// Drops confirmed taps from the outboxes; returns how many remain.
    fn prune(&mut self) -> usize {
        let confirmed = self.confirmed.lock().expect("confirmed lock");
        let mut left = 0;
        for (vi, ob) in self.outbox.iter_mut().enumerate() {
            ob.retain(|seq, _| !confirmed[vi].contains(seq));
            left += ob.len();
        }
        left
    }

    fn resend_unconfirmed(&self) -> Result<()> {
        for (vi, ob) in self.outbox.iter().enumerate() {
            for wire in ob.values() {
                self.rt.block_on(self.clients[vi].publish(
                    self.topic(vi),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    wire.clone(),
                ))?;
            }
        }
        Ok(())
    }
}

/// A fare table signed by the back office, as validators receive it.
fn sign_table(hsm: &SoftwareHsm, table: &fare_rules::table::Table) -> Result<Vec<u8>> {
    let mut sign_err = None;
    let signed = fare_rules::signed::encode(table, |m| {
        hsm.sign(m).unwrap_or_else(|e| {
            sign_err = Some(e);
            [0; 64]
        })
    })?;
    match sign_err {
        Some(e) => Err(e.into()),
        None => Ok(signed),
    }
}

fn repower(card: &mut Card, hsm: &SoftwareHsm) -> Result<()> {
    if card.is_torn() {
        let uid = card.state().uid;
        let nvm = card.nvm().clone();
        *card = Card::power_on(nvm, hsm.card_keys(&uid, 1)?);
    }
    card.remove_from_field();
    Ok(())
}

fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    (sorted[i] as f64 / 100.0).round() / 10.0
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    ensure!(
        args.validators > 0 && args.cards > 0,
        "--validators and --cards must be > 0"
    );
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut card_rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let keys = KeySet::generate(&mut rng);
    let hsm = SoftwareHsm::new(&keys)?;

    // The charging server on a loopback port.
    let tmp = tempfile::tempdir()?;
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| tmp.path().join("charging"));
    let partner_key = ed25519_dalek::SigningKey::from_bytes(&{
        let mut b = [0u8; 32];
        rng.fill(&mut b);
        b
    });
    let mut cfg = ServerConfig::from_toml(&format!(
        "data_dir = {:?}\nledger_map_size_bytes = 1073741824",
        data.to_str().context("data path is not UTF-8")?
    ))?;
    let token = |name: &str, role, t: &str| TokenEntry {
        name: name.into(),
        role,
        sha256: Auth::hash_token(t),
    };
    cfg.tokens = vec![
        token("airline", Role::Partner, AIRLINE),
        token("gateway", Role::Gateway, GATEWAY),
        token("hotel-gateway", Role::Gateway, HOTEL_GATEWAY),
        token("ops", Role::Operator, OPS),
    ];
    for i in 0..args.cards {
        cfg.tokens.push(token(
            &format!("rider-{i}"),
            Role::Cardholder,
            &rider_token(i),
        ));
    }
    cfg.limits.loads_per_minute_per_client = 0;
    cfg.operator = "metro".into();
    // The hotel's gateway books the pay-TV sales to the hotel, and only there.
    cfg.gateway_operators
        .insert("hotel-gateway".into(), vec!["hotel".into()]);
    cfg.points.push(charging::server::PointsConfig {
        name: "mileage".into(),
        minor_per_point_num: 2,
        minor_per_point_den: 1,
        partners: vec!["airline".into()],
    });
    cfg.partners.push(PartnerConfig {
        name: "mall".into(),
        public_key: hex::encode(partner_key.verifying_key().to_bytes()),
        max_voucher_minor: 100_000,
    });
    let state = server::build(&cfg, Box::new(SoftwareHsm::new(&keys)?))
        .context("starting the charging server")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_state = state.clone();
    let server_cfg = cfg.clone();
    let server = rt.spawn(async move {
        server::serve_on(listener, &server_cfg, server_state, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(30))
        .build();
    if !args.json {
        println!(
            "tapgate demo: {} validators, {} cards, {} taps, seed {}; charging server on {base}",
            args.validators, args.cards, args.taps, args.seed
        );
    }

    // Cards, registered with the back office to their riders; each rider registers a card
    // token, and the airline credits some miles to the rider's membership (partner API).
    let mut riders: Vec<Rider> = Vec::with_capacity(args.cards as usize);
    for i in 0..args.cards {
        let mut uid = [0x04, 0, 0, 0, 0, 0x1D, 0x80];
        uid[1..5].copy_from_slice(&i.to_be_bytes());
        let balance: i32 = rng.gen_range(0..30_000);
        let name = format!("rider-{i}");
        post(
            &agent,
            &format!("{base}/v1/cards"),
            OPS,
            serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": balance, "owner": name}),
        )?;
        let (token, card_token, member) =
            (rider_token(i), format!("tok_visa_{i}"), format!("M{i:06}"));
        post(
            &agent,
            &format!("{base}/v1/instruments"),
            &token,
            serde_json::json!({"source": "card", "instrument": card_token}),
        )?;
        post(
            &agent,
            &format!("{base}/v1/partner/points"),
            AIRLINE,
            serde_json::json!({"program": "mileage", "member_id": member, "account": name, "points": 50_000, "reference": format!("welcome-flight-{i}")}),
        )?;
        riders.push(Rider {
            token,
            card_token,
            member,
            card: Card::personalise(
                &Personalisation::transit(uid, balance),
                hsm.card_keys(&uid, 1)?,
            ),
            torn_at: None,
            trip_network: None,
            pending_load: false,
        });
    }
    let sams: Vec<SoftwareSam> = (0..args.validators)
        .map(|i| SoftwareSam::validator(&keys, 1000 + i))
        .collect::<Result<_, _>>()?;
    let n_val = sams.len();
    // The Grand Hotel's pay-TV box (device 1000 + n_val), on the hotel's own topics and gateway:
    // its sales are the hotel's revenue, priced by the hotel's signed table.
    let tv = n_val;
    let n_dev = n_val + 1;
    let hotel_table = fare_rules::source::compile(
        "fare-rules/samples/hotel/rules.toml",
        include_str!("../fare-rules/samples/hotel/rules.toml"),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The fare table every validator holds: the metro-city sample, signed by the back office,
    // verified by each validator as it would be over MQTT.
    let table = fare_rules::source::compile(
        "fare-rules/samples/metro-city/rules.toml",
        include_str!("../fare-rules/samples/metro-city/rules.toml"),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let signed_table = sign_table(&hsm, &table).context("signing the fare table")?;
    let mut gates = Vec::with_capacity(n_dev);
    let mut journals = Vec::with_capacity(n_dev);
    let mut gate_net = Vec::with_capacity(n_dev);
    let mut gate_kind = Vec::with_capacity(n_dev);
    for (i, sam) in sams.into_iter().enumerate() {
        let (route, stop, kind) = GATES[i % GATES.len()];
        let engine = fare_rules::signed::verify(&signed_table, &keys.verifying_key)?;
        let net = engine
            .route(route)
            .map_or(u16::MAX, |r| engine.table().routes[r as usize].network);
        gates.push(Gate {
            sam,
            engine: Some(engine),
            blocklist: purse::blocklist::Blocklist::new("metro"),
            placement: Placement {
                device_id: 1000 + i as u32,
                operator: "metro".into(),
                stop: stop.into(),
                route: route.into(),
                kind,
                utc_offset_s: 9 * 3600,
                sale: None,
            },
            rng: StdRng::seed_from_u64(args.seed ^ (i as u64 + 1)),
        });
        journals.push(Journal::open(
            &tmp.path().join(format!("validator-{}", 1000 + i)),
            10_000_000,
            1 << 30,
        )?);
        gate_net.push(net);
        gate_kind.push(kind);
    }
    {
        let signed = sign_table(&hsm, &hotel_table).context("signing the hotel table")?;
        let placement = Placement {
            device_id: 1000 + tv as u32,
            operator: "hotel".into(),
            stop: String::new(),
            route: String::new(),
            kind: GateKind::Charge,
            utc_offset_s: 9 * 3600,
            sale: Some(validator::gate::Sale {
                charge: "movie".into(),
                items: 1,
                minutes: 0,
            }),
        };
        let engine = fare_rules::signed::verify(&signed, &keys.verifying_key)?;
        placement.check(&engine).map_err(|e| anyhow::anyhow!(e))?;
        gates.push(Gate {
            sam: SoftwareSam::validator(&keys, 1000 + tv as u32)?,
            engine: Some(engine),
            blocklist: purse::blocklist::Blocklist::new("metro"),
            placement,
            rng: StdRng::seed_from_u64(args.seed ^ 0x7e1e),
        });
        journals.push(Journal::open(
            &tmp.path().join(format!("validator-{}", 1000 + tv)),
            10_000_000,
            1 << 30,
        )?);
        gate_net.push(u16::MAX);
        gate_kind.push(GateKind::Charge);
    }
    // Which operator each device's taps are booked to (its topics and its gateway).
    let device_operator = |vi: usize| if vi == tv { "hotel" } else { "metro" };
    // A day in fast time: 05:00 to 24:00 in Metro City (UTC+9) on 2026-12-01.
    let ms_per_tap = (19 * 3_600_000 / u64::from(args.taps.max(1))).max(1);
    // The embedded MQTT broker and the gateway, forwarding to the charging server.
    let mqtt_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut users = std::collections::HashMap::new();
    let secret = |rng: &mut StdRng| hex::encode(rng.gen::<[u8; 12]>());
    let gateway_password = secret(&mut rng);
    users.insert("gateway".to_string(), gateway_password.clone());
    let device_passwords: Vec<String> = (0..n_dev).map(|_| secret(&mut rng)).collect();
    for (i, p) in device_passwords.iter().enumerate() {
        users.insert((1000 + i).to_string(), p.clone());
    }
    gateway::daemon::start_embedded_broker(format!("127.0.0.1:{mqtt_port}").parse()?, users);
    let waited = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_err() {
        ensure!(
            waited.elapsed() < std::time::Duration::from_secs(10),
            "the embedded broker did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let gw_store = gateway::store::Store::open(&tmp.path().join("gateway"), 1 << 30)?;
    let gw_stats = Arc::new(gateway::daemon::GatewayStats::default());
    let gw_cfg = gateway::daemon::GatewayConfig {
        broker: ("127.0.0.1".into(), mqtt_port),
        mqtt_credentials: Some(("gateway".into(), gateway_password)),
        charging: Some((base.clone(), GATEWAY.into())),
        operator: "metro".into(),
        ..Default::default()
    };
    let gw_keys = keys.for_role(purse::keys::Role::Gateway, 0)?;
    let start_gateway = |stats: Arc<gateway::daemon::GatewayStats>| {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(gateway::daemon::run(
            gw_cfg.clone(),
            gw_store.clone(),
            gw_keys.clone(),
            stats,
            async {
                let _ = stopped.await;
            },
        ));
        (stop, task)
    };
    let mut gateway_run = Some(start_gateway(gw_stats.clone()));
    // The hotel's gateway: the same broker, the hotel's topics, its revenue booked to "hotel".
    let hotel_store = gateway::store::Store::open(&tmp.path().join("gateway-hotel"), 1 << 30)?;
    let hotel_stats = Arc::new(gateway::daemon::GatewayStats::default());
    let (hotel_stop, hotel_stopped) = tokio::sync::oneshot::channel::<()>();
    let hotel_gateway = rt.spawn(gateway::daemon::run(
        gateway::daemon::GatewayConfig {
            gateway_id: "gw-hotel".into(),
            operator: "hotel".into(),
            charging: Some((base.clone(), HOTEL_GATEWAY.into())),
            // The box holds the card scheme's list, from the metro's topics.
            relay_blocklists: false,
            ..gw_cfg.clone()
        },
        hotel_store.clone(),
        gw_keys.clone(),
        hotel_stats.clone(),
        async {
            let _ = hotel_stopped.await;
        },
    ));
    let waited = Instant::now();
    while ![&gw_stats, &hotel_stats]
        .iter()
        .all(|s| s.subscribed.load(std::sync::atomic::Ordering::Acquire))
    {
        ensure!(
            waited.elapsed() < std::time::Duration::from_secs(10),
            "the gateway did not subscribe"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let confirmed = Arc::new(Mutex::new(vec![std::collections::BTreeSet::new(); n_dev]));
    // Each validator keeps the blocklist it verified (the back office's public key) and applied.
    let lists = Arc::new(Mutex::new(vec![
        purse::blocklist::Blocklist::new("metro");
        n_dev
    ]));
    let verifying_key = keys.verifying_key;
    let mut clients = Vec::new();
    for (vi, password) in device_passwords.iter().enumerate() {
        let id = (1000 + vi).to_string();
        let mut opts = rumqttc::MqttOptions::new(format!("validator-{id}"), "127.0.0.1", mqtt_port);
        opts.set_credentials(id.clone(), password.clone())
            .set_clean_session(false)
            .set_keep_alive(std::time::Duration::from_secs(30));
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 10_000);
        let topic = format!("tapgate/v1/{}/devices/{id}/confirm", device_operator(vi));
        let sub = client.clone();
        let conf = confirmed.clone();
        let lists = lists.clone();
        rt.spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = sub
                            .subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce)
                            .await;
                        let _ = sub
                            .subscribe("tapgate/v1/metro/blocklist/#", rumqttc::QoS::AtLeastOnce)
                            .await;
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))
                        if p.topic.contains("/blocklist/") =>
                    {
                        // Forged, stale or out-of-order lists are refused and change nothing.
                        let _ =
                            lists.lock().expect("lists lock")[vi].apply(&p.payload, &verifying_key);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                            let mut c = conf.lock().expect("confirmed lock");
                            for s in v["seqs"].as_array().map(Vec::as_slice).unwrap_or_default() {
                                if let Some(s) = s.as_u64() {
                                    c[vi].insert(s);
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
        });
        clients.push(client);
    }
    let mut net = Network {
        rt: &rt,
        clients,
        outbox: vec![Default::default(); n_dev],
        operators: (0..n_dev).map(device_operator).collect(),
        confirmed,
    };
    let mut gateway_restarts = 0u64;
    let mut t = Tally::default();
    let step = (args.taps / 10).max(1);

    let mut propagation_ms: Vec<u64> = Vec::new();
    let mut lost_card: Option<[u8; 7]> = None;
    // A rider who just tapped out often changes lines right away (a transfer).
    let mut next_rider: Option<usize> = None;
    for tap in 0..args.taps {
        if tap == args.taps / 3 {
            // A rider reports a card lost: the back office blocks it; the signed delta reaches
            // every validator through the gateway. Measure how long until each one holds it.
            let uid = riders[0].card.state().uid;
            post(
                &agent,
                &format!("{base}/v1/cards/{}/block", hex::encode_upper(uid)),
                OPS,
                serde_json::json!({"reason": "reported lost"}),
            )?;
            let blocked_at = Instant::now();
            let mut seen = vec![None; n_dev];
            while seen.iter().any(Option::is_none) {
                ensure!(
                    blocked_at.elapsed() < std::time::Duration::from_secs(30),
                    "the block did not reach every validator"
                );
                {
                    let l = lists.lock().expect("lists lock");
                    for (vi, s) in seen.iter_mut().enumerate() {
                        if s.is_none() && l[vi].is_blocked(&uid) {
                            *s = Some(blocked_at.elapsed().as_millis() as u64);
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            propagation_ms = seen.into_iter().flatten().collect();
            propagation_ms.sort_unstable();
            lost_card = Some(uid);
        }
        let ri = next_rider
            .take()
            .unwrap_or_else(|| rng.gen_range(0..riders.len()));
        let r = &mut riders[ri];
        // Which gate: back to the one where the card was torn; an exit on the network of a trip
        // in progress; else an entry.
        let vi = match r.torn_at.take() {
            Some(v) => v,
            // A hotel guest buys a film or sports hours on the room's pay-TV.
            None if rng.gen_ratio(1, 40) => tv,
            None => {
                let fits: Vec<usize> = (0..n_val)
                    .filter(|&v| match r.trip_network {
                        Some(net) => gate_kind[v] == GateKind::Out && gate_net[v] == net,
                        None => gate_kind[v] != GateKind::Out,
                    })
                    .collect();
                if fits.is_empty() {
                    rng.gen_range(0..n_val)
                } else {
                    fits[rng.gen_range(0..fits.len())]
                }
            }
        };
        let tear = pick_tear(&mut rng, args.tear_per_mille);
        {
            // The validator holds the blocklist it verified and applied from MQTT.
            let l = lists.lock().expect("lists lock");
            if l[vi].version() != gates[vi].blocklist.version() {
                gates[vi].blocklist = l[vi].clone();
            }
        }
        if let Some(Tear::Power(k)) = tear {
            r.card.tear_after_writes(Some(k));
        }
        let now_ms = DAY0_MS + u64::from(tap) * ms_per_tap;
        let began = Instant::now();
        let out = {
            let mut reader = DemoReader {
                inner: EmulatedReader {
                    card: &mut r.card,
                    rng: &mut card_rng,
                },
                tear,
                sent: 0,
            };
            if vi == tv {
                let sale = tv_sale(&mut rng);
                t.tv_sales += 1;
                gates[vi].charge(&mut reader, &journals[vi], now_ms, &sale, &mut |_| {})
            } else {
                gates[vi].tap(&mut reader, &journals[vi], now_ms, &mut |_| {})
            }
            .map_err(|e| anyhow::anyhow!("tap {tap}: {e}"))?
        };
        let elapsed = began.elapsed().as_nanos() as u64;
        r.card.tear_after_writes(None);
        match out.settled {
            Settled::Committed { seq } => {
                t.debits_settled_committed += 1;
                t.taps_accepted += 1;
                let amount = publish_journalled(&mut net, &journals[vi], vi, seq)?;
                t.book(device_operator(vi), amount);
            }
            Settled::NotCommitted => t.debits_settled_not_committed += 1,
            Settled::Unprovable => t.debits_unresolved += 1,
            Settled::None => {}
        }
        let mut short = false;
        match out.answer {
            Answer::Accepted { seq, .. } => {
                t.latencies_ns.push(elapsed);
                t.taps_accepted += 1;
                let amount = publish_journalled(&mut net, &journals[vi], vi, seq)?;
                t.book(device_operator(vi), amount);
                if vi == tv {
                    t.tv_accepted += 1;
                } else if let Some(Ok(rec)) = r
                    .card
                    .state()
                    .records
                    .last()
                    .map(fare_rules::record::TripRecord::decode)
                {
                    use fare_rules::record::flags;
                    t.taps_transfer += u64::from(rec.flags & flags::TRANSFER != 0);
                    t.taps_capped += u64::from(rec.flags & flags::CAPPED != 0);
                    t.taps_penalty += u64::from(rec.flags & flags::PENALTY != 0);
                }
                if vi != tv {
                    r.trip_network = (gate_kind[vi] == GateKind::In).then_some(gate_net[vi]);
                }
                if gate_kind[vi] == GateKind::Out && rng.gen_bool(0.4) {
                    next_rider = Some(ri);
                }
            }
            Answer::Refused { reason, seq } => {
                if let Some(seq) = seq {
                    // Refusals are reported to the gateway too.
                    publish_journalled(&mut net, &journals[vi], vi, seq)?;
                }
                *t.refusals.entry(reason.name()).or_default() += 1;
                match reason {
                    RefusalReason::Blocklisted => t.taps_refused_blocked += 1,
                    RefusalReason::InsufficientValue => {
                        t.taps_refused += 1;
                        short = true;
                    }
                    _ => t.taps_refused += 1,
                }
                if vi != tv {
                    r.trip_network = None;
                }
            }
            Answer::Torn => {
                t.taps_torn += 1;
                r.torn_at = Some(vi);
            }
            Answer::Repeat => t.taps_repeat += 1,
        }
        repower(&mut r.card, &hsm)?;
        if tap % 200 == 199 {
            net.prune();
        }
        if tap + 1 == args.taps / 2 {
            // The gateway is killed mid-day and restarted: its persistent MQTT session and the
            // validators' outboxes lose nothing; duplicates are dropped by (device, sequence).
            if let Some((stop, task)) = gateway_run.take() {
                let _ = stop.send(());
                let _ = rt.block_on(task);
            }
            gateway_run = Some(start_gateway(gw_stats.clone()));
            gateway_restarts += 1;
        }
        if short && r.torn_at.is_none() {
            // Top up online through the charging server, funded by card, mileage or a voucher.
            let (source, instrument) = match rng.gen_range(0..3) {
                0 => ("card".to_string(), r.card_token.clone()),
                1 => ("mileage".to_string(), r.member.clone()),
                _ => {
                    let order = serde_json::json!({"order_id": format!("order-{tap}"), "kind": "gift", "amount_minor": 20_000});
                    let body = serde_json::to_vec(&order)?;
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_millis() as u64;
                    let sig = partner_key.sign(&Partners::signed_message(
                        "POST",
                        "/v1/partner/vouchers",
                        ts,
                        &body,
                    ));
                    let v: serde_json::Value = agent
                        .post(&format!("{base}/v1/partner/vouchers"))
                        .set("X-Tapgate-Partner", "mall")
                        .set("X-Tapgate-Timestamp", &ts.to_string())
                        .set("X-Tapgate-Signature", &hex::encode(sig.to_bytes()))
                        .set("Content-Type", "application/json")
                        .send_bytes(&body)?
                        .into_json()?;
                    (
                        "voucher".to_string(),
                        v["code"].as_str().unwrap_or_default().to_string(),
                    )
                }
            };
            let vanish_at = if rng.gen_range(0..1000) < args.tear_per_mille {
                Some(Vanish::AtCommand {
                    n: rng.gen_range(1..=10),
                    deliver: rng.gen_bool(0.5),
                })
            } else {
                None
            };
            let key = format!("demo-load-{tap}");
            let ask = LoadAsk {
                amount_minor: 20_000,
                source: &source,
                instrument: &instrument,
                idempotency_key: &key,
                vanish: vanish_at,
            };
            let relayed = Client::with_agent(agent.clone(), &base, &r.token).load(
                &mut purse::txn::EmulatedReader {
                    card: &mut r.card,
                    rng: rand::rngs::OsRng,
                },
                &ask,
            )?;
            match relayed.reply() {
                Some(Reply::Completed { .. }) => {
                    t.loads_completed += 1;
                    *t.loads_by_source.entry(source).or_default() += 1;
                    r.pending_load = false; // older pending loads were settled by the server
                }
                Some(Reply::Refused { .. }) => t.loads_refused += 1,
                _ => {
                    t.loads_torn += 1;
                    r.pending_load = true;
                }
            }
            repower(&mut r.card, &hsm)?;
        }
        if !args.json && (tap + 1) % step == 0 {
            println!(
                "[{:>3}%] taps accepted {:>6}  refused {:>5}  torn {:>4}  loads {:>5} (torn {:>3})  cleared {:>6}",
                (tap + 1) * 100 / args.taps,
                t.taps_accepted,
                t.taps_refused,
                t.taps_torn,
                t.loads_completed,
                t.loads_torn,
                gw_stats.forwarded.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    }

    // End of day: a card torn at a validator meets it once more (its journal settles the
    // debit from the card's counter); a card with a torn load makes a free check-in tap, which
    // books the next counter so clearing settles the load.
    let end_ms = DAY0_MS + u64::from(args.taps) * ms_per_tap;
    for r in riders.iter_mut() {
        if let Some(vi) = r.torn_at.take() {
            let mut reader = EmulatedReader {
                card: &mut r.card,
                rng: &mut card_rng,
            };
            // At the pay-TV box the guest buys again what the torn presentation did not sell.
            let out = if vi == tv {
                let sale = tv_sale(&mut rng);
                t.tv_sales += 1;
                gates[vi].charge(&mut reader, &journals[vi], end_ms, &sale, &mut |_| {})
            } else {
                gates[vi].tap(&mut reader, &journals[vi], end_ms, &mut |_| {})
            }
            .map_err(|e| anyhow::anyhow!("end-of-day tap: {e}"))?;
            match out.settled {
                Settled::Committed { seq } => {
                    t.debits_settled_committed += 1;
                    t.taps_accepted += 1;
                    let amount = publish_journalled(&mut net, &journals[vi], vi, seq)?;
                    t.book(device_operator(vi), amount);
                }
                Settled::NotCommitted => t.debits_settled_not_committed += 1,
                Settled::Unprovable => t.debits_unresolved += 1,
                Settled::None => {}
            }
            match out.answer {
                Answer::Accepted { seq, .. } => {
                    t.taps_accepted += 1;
                    let amount = publish_journalled(&mut net, &journals[vi], vi, seq)?;
                    t.book(device_operator(vi), amount);
                }
                Answer::Refused { seq: Some(seq), .. } => {
                    publish_journalled(&mut net, &journals[vi], vi, seq)?;
                }
                _ => {}
            }
            r.card.remove_from_field();
        }
        if !r.pending_load {
            continue;
        }
        let mut reader = EmulatedReader {
            card: &mut r.card,
            rng: &mut card_rng,
        };
        let out = txn::debit(&mut reader, &mut gates[0].sam, &mut rng, |_| {
            Decision::Apply {
                amount_minor: 0,
                record: None,
            }
        })?;
        if let Outcome::Committed { receipt, .. } = out {
            let seq = journals[0].append_tap(None, |seq| {
                tap_wire(&gates[0].sam, &receipt, 1000, seq, end_ms)
            })?;
            publish_journalled(&mut net, &journals[0], 0, seq)?;
        }
        r.pending_load = false;
        r.card.remove_from_field();
    }
    // Drain: every tap confirmed by the gateway (resending what is not), then forwarded to
    // and cleared by the charging server.
    let drain = Instant::now();
    let mut last_resend = Instant::now();
    while net.prune() > 0 {
        ensure!(
            drain.elapsed() < std::time::Duration::from_secs(120),
            "taps not confirmed by the gateway in time"
        );
        if last_resend.elapsed() > std::time::Duration::from_secs(2) {
            net.resend_unconfirmed()?;
            last_resend = Instant::now();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    while gw_store.outbox_len()? + hotel_store.outbox_len()? > 0 {
        ensure!(
            drain.elapsed() < std::time::Duration::from_secs(120),
            "taps not forwarded to clearing in time"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for c in &net.clients {
        let _ = rt.block_on(c.disconnect());
    }
    if let Some((stop, task)) = gateway_run.take() {
        let _ = stop.send(());
        let _ = rt.block_on(task);
    }
    let _ = hotel_stop.send(());
    let _ = rt.block_on(hotel_gateway);
    let both = |f: fn(&gateway::daemon::GatewayStats) -> &std::sync::atomic::AtomicU64| {
        [&gw_stats, &hotel_stats]
            .iter()
            .map(|s| f(s).load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
    };
    t.taps_cleared = both(|s| &s.forwarded);
    t.clearing_duplicates = both(|s| &s.duplicates);
    t.clearing_anomalies = both(|s| &s.quarantined);

    // Conservation: the ledger's shadow purse equals every card's balance; reconciliation
    // balances every card; every counter a card consumed is booked exactly once.
    let ledger = state.loads.ledger();
    let mut out_of_balance = 0u64;
    let mut lost = 0u64;
    {
        let r = ledger.read()?;
        for rider in &riders {
            let s = rider.card.state();
            if ledger.balance(&r, &charging::ledger::card_account(&s.uid))?
                != i64::from(s.balance_minor)
            {
                out_of_balance += 1;
            }
            let shadow = ledger.card(&r, &s.uid)?;
            lost += u64::from(s.tmc.saturating_sub(shadow.booked_through_tmc));
        }
    }
    let report = charging::reconcile::reconcile(ledger)?;
    if std::env::var("TAPGATE_DEMO_DEBUG").is_ok() {
        for d in &report.differences {
            eprintln!("difference: {d:?}");
        }
    }
    let load_postings = {
        let r = ledger.read()?;
        ledger.postings_with_prefix(&r, "load:")?
    };
    let tap_double_bookings = {
        let r = ledger.read()?;
        let taps = ledger.postings_with_prefix(&r, "tap:")?;
        let mut seen = std::collections::HashSet::new();
        taps.iter()
            .filter(|p| !seen.insert(p.reference.clone()))
            .count() as u64
    };
    let mut seen = std::collections::HashSet::new();
    let paid_twice = load_postings
        .iter()
        .filter(|p| !seen.insert(p.reference.clone()))
        .count() as u64;
    let loads_voided = {
        let r = ledger.read()?;
        ledger
            .all_intents(&r)?
            .iter()
            .filter(|i| i.state == charging::ledger::IntentState::Voided)
            .count() as u64
    };
    // Revenue per operator as the ledger booked it from cleared taps, against what each
    // operator's validators collected.
    let ledger_revenue: std::collections::BTreeMap<&str, i64> = {
        let r = ledger.read()?;
        let mut m = std::collections::BTreeMap::new();
        for op in ["metro", "hotel"] {
            m.insert(op, ledger.balance(&r, &format!("operator:{op}"))?);
        }
        m
    };
    let revenue_agrees = ["metro", "hotel"].iter().all(|op| {
        ledger_revenue.get(op).copied().unwrap_or(0)
            == t.revenue_by_operator.get(op).copied().unwrap_or(0)
    });
    let value_conserved = revenue_agrees
        && out_of_balance == 0
        && report.differences.is_empty()
        && lost == 0
        && paid_twice == 0
        && tap_double_bookings == 0
        && t.clearing_anomalies == 0;
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    let mut lat = t.latencies_ns.clone();
    lat.sort_unstable();
    let (p50, p99) = (percentile_us(&lat, 0.5), percentile_us(&lat, 0.99));
    let mut summary = serde_json::json!({
        "validators": args.validators,
        "cards": args.cards,
        "seed": args.seed,
        "taps_accepted": t.taps_accepted,
        "taps_refused": t.taps_refused + t.taps_refused_blocked,
        "taps_refused_insufficient": t.taps_refused,
        "taps_refused_blocklisted": t.taps_refused_blocked,
        "taps_refused_by_reason": t.refusals,
        "taps_repeat": t.taps_repeat,
        "taps_transfer": t.taps_transfer,
        "taps_capped": t.taps_capped,
        "taps_penalty": t.taps_penalty,
        "fare_table_version": table.meta.version,
        "block_propagation_ms_p50": propagation_ms.get(propagation_ms.len() / 2).copied().unwrap_or(0),
        "block_propagation_ms_p99": propagation_ms.last().copied().unwrap_or(0),
        "lost_card_blocked": lost_card.is_some(),
        "taps_torn": t.taps_torn,
        "taps_cleared": t.taps_cleared,
        "taps_lost": lost,
        "taps_duplicated": tap_double_bookings,
        "duplicates_dropped": t.clearing_duplicates,
        "gateway_restarts": gateway_restarts,
        "clearing_anomalies": t.clearing_anomalies,
        "loads_completed": t.loads_completed + t.loads_completed_by_clearing,
        "loads_refused": t.loads_refused,
        "loads_torn": t.loads_torn,
        "loads_voided": loads_voided,
        "loads_paid_twice": paid_twice,
        "loads_by_source": t.loads_by_source,
        "debits_settled_committed": t.debits_settled_committed,
        "debits_settled_not_committed": t.debits_settled_not_committed,
        "debits_unresolved": t.debits_unresolved,
        "revenue_minor": t.revenue_minor,
        "cards_out_of_balance": out_of_balance,
        "reconcile_differences": report.differences.len(),
        "value_conserved": value_conserved,
        "tap_latency_us_p50": p50,
        "tap_latency_us_p99": p99,
        "wall_ms": started.elapsed().as_millis() as u64,
    });
    // (More fields than one json! call may hold.)
    summary["revenue_minor_by_operator"] = serde_json::json!(ledger_revenue);
    summary["revenue_agrees"] = revenue_agrees.into();
    summary["tv_sales"] = t.tv_sales.into();
    summary["tv_sales_accepted"] = t.tv_accepted.into();
    if args.json {
        println!("{summary}");
    } else {
        println!("summary");
        println!(
            "  taps accepted          {} ({} torn and settled later)",
            t.taps_accepted, t.debits_settled_committed
        );
        println!(
            "  fares                  {} (version {}): {} minor units collected; {} taps continued a journey (transfer), {} were capped, {} carried a missing-tap-out penalty",
            table.meta.name, table.meta.version, t.revenue_by_operator.get("metro").copied().unwrap_or(0), t.taps_transfer, t.taps_capped, t.taps_penalty
        );
        println!(
            "  taps refused           {} by reason {:?} (insufficient value: the rider tops up online)",
            t.taps_refused + t.taps_refused_blocked,
            t.refusals
        );
        println!(
            "  taps cleared           {} via MQTT, the gateway and clearing; gateway killed and restarted {gateway_restarts}x mid-day; {} duplicates dropped, {} quarantined",
            t.taps_cleared, t.clearing_duplicates, t.clearing_anomalies
        );
        println!(
            "  loads completed        {} over HTTP by source {:?}; {} completed from cleared taps",
            t.loads_completed, t.loads_by_source, t.loads_completed_by_clearing
        );
        println!(
            "  loads torn             {} (client vanished); {} voided in all, none paid twice: {}",
            t.loads_torn,
            loads_voided,
            paid_twice == 0
        );
        println!(
            "  revenue                by operator as booked from cleared taps: {}; {} what the validators collected",
            ledger_revenue
                .iter()
                .map(|(op, v)| format!("{op} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            if revenue_agrees { "equals" } else { "DIFFERS FROM" }
        );
        println!(
            "  hotel pay-TV           {} sales of {} presentations (films, sports hours under the TV-day cap), through the hotel's own gateway",
            t.tv_accepted, t.tv_sales
        );
        println!(
            "  lost card blocked      reached all {} validators in {} ms (p50 {} ms); {} taps refused as blocklisted",
            propagation_ms.len(),
            propagation_ms.last().copied().unwrap_or(0),
            propagation_ms.get(propagation_ms.len() / 2).copied().unwrap_or(0),
            t.taps_refused_blocked
        );
        println!("  tap latency            p50 {p50} µs, p99 {p99} µs (card + SAM in process)");
        println!(
            "  reconciliation         {} cards, {} balanced, {} differences",
            report.cards,
            report.balanced,
            report.differences.len()
        );
        println!(
            "  conservation           {}",
            if value_conserved {
                "held: every card's balance = personalised + loads − debits = the ledger's shadow purse"
            } else {
                "FAILED"
            }
        );
    }
    ensure!(value_conserved, "conservation check failed: {summary}");
    Ok(())
}
