//! `tapgate validator`: the validator daemon, configured by a TOML file and flags.
//!
//! ```toml
//! device_id = 1001
//! operator = "metro"
//! stop = "Central"                 # the stop and route ids in the fare table
//! route = "M1"
//! kind = "in"                      # in, out, entry, or charge (a pay-TV box: see [sale])
//! utc_offset_minutes = 540
//! journal = "data/validator-1001"
//! outbox_capacity_taps = 1000000
//! keys = "keys"                    # issuer key dir, or `tapgate keys provision --role validator`
//! fare_table = "metro.tgft"        # optional; later tables arrive over MQTT
//! heartbeat_s = 30
//! [mqtt]                           # optional: without it the validator works offline
//! broker = "mqtt://127.0.0.1:18830"
//! password_env = "TAPGATE_MQTT_PASSWORD"
//! [metrics]
//! listen = "127.0.0.1:9101"
//! [crowd]                          # the emulated reader (tests, demo, load)
//! cards = 50
//! taps = 200
//! # reader = "pcsc"                # or a PC/SC reader (build with the `pcsc` feature)
//! # reader_name = "ACS ACR1252"    # part of the reader's name (default: any reader)
//! # [sale]                         # kind = "charge": what every presentation buys
//! # charge = "movie"               # a charge id of the fare table
//! # items = 1
//! # minutes = 0
//! ```

use crate::cli_util::input_err;
use crate::keys_cmd::{load_keyset, SIGNING_PUB_FILE};
use crate::pcsc_cmd::{parse_reader, ReaderChoice};
use anyhow::{bail, Context, Result};
use clap::Args;
use fare_rules::record::TapKind;
use purse::blocklist::Blocklist;
use purse::sam::{SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use validator::daemon::{self, MqttSettings, Settings};
use validator::gate::{Gate, Placement, Step};
use validator::journal::Journal;
use validator::reader::{Crowd, CrowdConfig, Reader};

/// `tapgate validator`.
#[derive(Args)]
pub struct ValidatorArgs {
    /// The configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Override the device id.
    #[arg(long)]
    device: Option<u32>,
    /// Override the broker, mqtt://host:port or mqtts://host:port.
    #[arg(long)]
    broker: Option<String>,
    /// Override the journal directory.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Override the crowd's number of taps.
    #[arg(long = "crowd-taps")]
    crowd_taps: Option<u64>,
    /// Override the crowd's random seed (which cards come, in which order).
    #[arg(long = "crowd-seed")]
    crowd_seed: Option<u64>,
    /// Read the key-set passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
    #[arg(long = "passphrase-file")]
    passphrase_file: Option<PathBuf>,
    /// Fault injection: abort the process at STEP of tap N (read, pending, committed,
    /// journalled), e.g. `3:committed`.
    #[arg(long = "crash-at")]
    crash_at: Option<String>,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// The reader: `crowd` (the emulated crowd of [crowd]), `pcsc` (any PC/SC reader) or
    /// `pcsc:NAME` (a PC/SC reader whose name contains NAME). Overrides `reader` in the config.
    #[arg(long)]
    reader: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    device_id: u32,
    operator: String,
    /// The card scheme whose signed blocklist this validator holds (default: `operator`).
    #[serde(default)]
    card_scheme: Option<String>,
    #[serde(default)]
    stop: String,
    #[serde(default)]
    route: String,
    #[serde(default = "default_kind")]
    kind: String,
    #[serde(default)]
    utc_offset_minutes: i32,
    journal: PathBuf,
    #[serde(default = "default_capacity")]
    outbox_capacity_taps: u64,
    keys: PathBuf,
    /// The back office's Ed25519 public key (hex); default: `signing.pub` beside the keys.
    signing_pub: Option<String>,
    fare_table: Option<PathBuf>,
    #[serde(default = "default_heartbeat")]
    heartbeat_s: u64,
    #[serde(default = "default_drain")]
    drain_timeout_s: u64,
    mqtt: Option<MqttConfig>,
    metrics: Option<MetricsConfig>,
    crowd: Option<CrowdToml>,
    /// `crowd` (default) or `pcsc`.
    reader: Option<String>,
    /// With `reader = "pcsc"`: part of the reader's name (case-insensitive).
    reader_name: Option<String>,
    /// With `kind = "charge"`: what every presentation buys.
    sale: Option<SaleToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaleToml {
    charge: String,
    #[serde(default)]
    items: u32,
    #[serde(default)]
    minutes: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MqttConfig {
    broker: String,
    /// Default: the device id.
    username: Option<String>,
    /// The environment variable holding the password (default TAPGATE_MQTT_PASSWORD).
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    /// PEM CA file: connect over TLS.
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsConfig {
    listen: std::net::SocketAddr,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CrowdToml {
    /// The issuer key set the emulated cards are personalised under (default: `keys`).
    issuer_keys: Option<PathBuf>,
    #[serde(default = "default_cards")]
    cards: u32,
    #[serde(default = "default_balance")]
    balance_minor: i32,
    taps: Option<u64>,
    #[serde(default)]
    rate_per_s: f64,
    #[serde(default = "default_seed")]
    seed: u64,
    dir: Option<PathBuf>,
    #[serde(default)]
    tear_per_mille: u32,
}

fn default_kind() -> String {
    "entry".into()
}
fn default_capacity() -> u64 {
    1_000_000
}
fn default_heartbeat() -> u64 {
    30
}
fn default_drain() -> u64 {
    10
}
fn default_cards() -> u32 {
    50
}
fn default_balance() -> i32 {
    50_000
}
fn default_seed() -> u64 {
    1
}

fn parse_broker(url: &str) -> Result<(String, u16, bool)> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else {
        bail!(input_err(format!(
            "broker {url:?} must look like mqtt://host:port or mqtts://host:port"
        )));
    };
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
        input_err(format!(
            "broker {url:?} needs a port, e.g. mqtt://127.0.0.1:1883"
        ))
    })?;
    let port = port
        .parse()
        .map_err(|_| input_err(format!("broker {url:?}: {port:?} is not a port")))?;
    Ok((host.to_string(), port, tls))
}

fn parse_crash(s: &str) -> Result<(u64, Step)> {
    let bad = || {
        input_err(format!("--crash-at {s:?}: expected N:STEP, e.g. 3:committed (steps: read, pending, committed, journalled)"))
    };
    let (n, step) = s.split_once(':').ok_or_else(bad)?;
    let n: u64 = n.parse().map_err(|_| bad())?;
    let step = match step {
        "read" => Step::Read,
        "pending" => Step::PendingJournalled,
        "committed" => Step::Committed,
        "journalled" => Step::Journalled,
        _ => return Err(bad()),
    };
    Ok((n, step))
}

/// Runs `tapgate validator`.
pub fn run(a: ValidatorArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let mut cfg: Config =
        toml::from_str(&text).map_err(|e| input_err(format!("{}: {e}", a.config.display())))?;
    if let Some(d) = a.device {
        cfg.device_id = d;
    }
    for (what, v) in [
        ("operator", Some(&cfg.operator)),
        ("card_scheme", cfg.card_scheme.as_ref()),
    ] {
        if let Some(v) = v {
            if v.is_empty() || v.contains(['/', '+', '#']) {
                return Err(input_err(format!(
                    "{}: {what} {v:?} must be a non-empty name without '/', '+' or '#' (it is part of MQTT topics)",
                    a.config.display()
                )));
            }
        }
    }
    if let Some(j) = a.journal {
        cfg.journal = j;
    }
    if let Some(b) = a.broker {
        match &mut cfg.mqtt {
            Some(m) => m.broker = b,
            None => {
                cfg.mqtt = Some(MqttConfig {
                    broker: b,
                    username: None,
                    password_env: None,
                    password_file: None,
                    ca_file: None,
                })
            }
        }
    }
    if let Some(c) = cfg.crowd.as_mut() {
        if let Some(n) = a.crowd_taps {
            c.taps = Some(n);
        }
        if let Some(s) = a.crowd_seed {
            c.seed = s;
        }
    }
    let kind = match cfg.kind.as_str() {
        "in" => TapKind::In,
        "out" => TapKind::Out,
        "entry" => TapKind::Entry,
        "charge" => TapKind::Charge,
        k => bail!(input_err(format!(
            "{}: kind {k:?} must be in, out, entry or charge",
            a.config.display()
        ))),
    };
    let sale = match (&cfg.sale, kind) {
        (Some(s), TapKind::Charge) => {
            if s.items == 0 && s.minutes == 0 {
                bail!(input_err(format!(
                    "{}: [sale] sells nothing: set items or minutes",
                    a.config.display()
                )));
            }
            Some(validator::gate::Sale {
                charge: s.charge.clone(),
                items: s.items,
                minutes: s.minutes,
            })
        }
        (None, TapKind::Charge) => bail!(input_err(format!(
            "{}: kind \"charge\" needs a [sale] (charge, items or minutes)",
            a.config.display()
        ))),
        (Some(_), _) => bail!(input_err(format!(
            "{}: [sale] is for kind = \"charge\" only",
            a.config.display()
        ))),
        (None, _) => None,
    };
    let crash_at = a.crash_at.as_deref().map(parse_crash).transpose()?;
    let choice = match (&a.reader, cfg.reader.as_deref()) {
        (Some(flag), _) => parse_reader("--reader", flag)?,
        (None, None | Some("crowd")) => ReaderChoice::Emulated,
        (None, Some("pcsc")) => ReaderChoice::Pcsc(cfg.reader_name.clone()),
        (None, Some(r)) => bail!(input_err(format!(
            "{}: reader {r:?} must be \"crowd\" or \"pcsc\"",
            a.config.display()
        ))),
    };

    let keys = load_keyset(&cfg.keys, a.passphrase_file.as_deref())?;
    let sam = SoftwareSam::validator(&keys, cfg.device_id).with_context(|| {
        format!(
            "the key set cannot act as validator {}'s SAM",
            cfg.device_id
        )
    })?;
    let signing_pub: [u8; 32] = {
        let hex_text = match &cfg.signing_pub {
            Some(h) => h.clone(),
            None => {
                let p = if cfg.keys.is_dir() {
                    cfg.keys.join(SIGNING_PUB_FILE)
                } else {
                    cfg.keys.with_file_name(SIGNING_PUB_FILE)
                };
                std::fs::read_to_string(&p).with_context(|| {
                    format!("reading {} (or set signing_pub in the config)", p.display())
                })?
            }
        };
        hex::decode(hex_text.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| input_err("signing_pub must be 64 hex digits"))?
    };
    let journal = Arc::new(
        Journal::open(&cfg.journal, cfg.outbox_capacity_taps, 1 << 30)
            .with_context(|| format!("opening the journal {}", cfg.journal.display()))?,
    );
    let mut gate = Gate {
        sam,
        engine: None,
        blocklist: Blocklist::new(cfg.card_scheme.as_deref().unwrap_or(&cfg.operator)),
        placement: Placement {
            device_id: cfg.device_id,
            operator: cfg.operator.clone(),
            stop: cfg.stop.clone(),
            route: cfg.route.clone(),
            kind,
            utc_offset_s: cfg.utc_offset_minutes * 60,
            sale,
        },
        rng: StdRng::from_entropy(),
    };
    // What the journal holds first (a newer table may have arrived over MQTT); the configured
    // table only if it is newer still.
    daemon::restore(&mut gate, &journal, &signing_pub)?;
    if let Some(p) = &cfg.fare_table {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        daemon::apply_downlink(
            &mut gate,
            &journal,
            &signing_pub,
            daemon::Downlink::FareTable,
            &bytes,
        )
        .or_else(|e| if gate.engine.is_some() { Ok(0) } else { Err(e) })
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    let Some(engine) = &gate.engine else {
        bail!(input_err(
            "no fare table: set fare_table in the config (later ones arrive over MQTT)"
        ));
    };
    if let Err(why) = gate.placement.check(engine) {
        bail!(input_err(why));
    }
    let pend = journal.pendings()?;
    if !pend.is_empty() {
        eprintln!(
            "journal: {} debit(s) were in progress when the validator stopped; each is settled at the card's next tap here",
            pend.len()
        );
    }

    let shutdown = Arc::new(AtomicBool::new(false));
    let reader: Box<dyn Reader> = match choice {
        ReaderChoice::Emulated => {
            let crowd_cfg = cfg.crowd.as_ref().ok_or_else(|| {
                input_err(
                    "no reader: add a [crowd] section (emulated cards) or set reader = \"pcsc\"",
                )
            })?;
            let issuer = load_keyset(
                crowd_cfg.issuer_keys.as_ref().unwrap_or(&cfg.keys),
                a.passphrase_file.as_deref(),
            )?;
            let hsm =
                SoftwareHsm::new(&issuer).context("the emulated crowd needs the issuer key set")?;
            Box::new(
                Crowd::new(
                    CrowdConfig {
                        cards: crowd_cfg.cards,
                        balance_minor: crowd_cfg.balance_minor,
                        taps: crowd_cfg.taps,
                        rate_per_s: crowd_cfg.rate_per_s,
                        seed: crowd_cfg.seed,
                        dir: crowd_cfg.dir.clone(),
                        tear_per_mille: crowd_cfg.tear_per_mille,
                    },
                    hsm,
                    shutdown.clone(),
                )
                .context("card images directory")?,
            )
        }
        #[cfg(feature = "pcsc")]
        ReaderChoice::Pcsc(name) => {
            eprintln!(
                "validator {}: PC/SC reader {}",
                cfg.device_id,
                name.as_deref()
                    .map_or_else(|| "(any)".to_string(), |n| format!("matching {n:?}"))
            );
            Box::new(validator::pcsc_reader::PcscReader::new(
                name,
                shutdown.clone(),
            ))
        }
        #[cfg(not(feature = "pcsc"))]
        ReaderChoice::Pcsc(_) => return Err(crate::pcsc_cmd::not_built()),
    };

    let mqtt = match &cfg.mqtt {
        None => None,
        Some(m) => {
            let (host, port, tls) = parse_broker(&m.broker)?;
            let password = match (&m.password_file, &m.password_env) {
                (Some(f), _) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                (None, env) => {
                    std::env::var(env.as_deref().unwrap_or("TAPGATE_MQTT_PASSWORD")).ok()
                }
            };
            let tls_ca_pem = match (&m.ca_file, tls) {
                (Some(f), _) => {
                    Some(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?)
                }
                (None, true) => bail!(input_err("mqtts:// needs ca_file in [mqtt]")),
                (None, false) => None,
            };
            Some(MqttSettings {
                host,
                port,
                username: Some(
                    m.username
                        .clone()
                        .unwrap_or_else(|| cfg.device_id.to_string()),
                ),
                password,
                tls_ca_pem,
            })
        }
    };
    let settings = Settings {
        operator: cfg.operator.clone(),
        card_scheme: cfg
            .card_scheme
            .clone()
            .unwrap_or_else(|| cfg.operator.clone()),
        device_id: cfg.device_id,
        heartbeat: Duration::from_secs(cfg.heartbeat_s.max(1)),
        signing_pub,
        mqtt,
        drain_timeout: Duration::from_secs(cfg.drain_timeout_s),
        crash_at,
    };
    let metrics = Arc::new(daemon::Metrics::new(cfg.device_id));

    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let summary = rt.block_on(async {
        {
            let s = shutdown.clone();
            tokio::spawn(async move {
                crate::cli_util::shutdown_signal().await;
                s.store(true, std::sync::atomic::Ordering::Relaxed);
            });
        }
        if let Some(mc) = &cfg.metrics {
            let listener = std::net::TcpListener::bind(mc.listen)
                .with_context(|| format!("metrics listen {}", mc.listen))?;
            let tls = match (&mc.tls_cert, &mc.tls_key) {
                (Some(c), Some(k)) => Some(tapgate_http::serve::TlsFiles {
                    cert: c.clone(),
                    key: k.clone(),
                }),
                (None, None) => None,
                _ => bail!(input_err(
                    "[metrics] needs both tls_cert and tls_key, or neither"
                )),
            };
            let (m, s) = (metrics.clone(), shutdown.clone());
            tokio::spawn(async move {
                let stop = async move {
                    while !s.load(std::sync::atomic::Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                };
                if let Err(e) = daemon::serve_metrics(listener, tls, m, stop).await {
                    eprintln!("metrics: {e}");
                }
            });
        }
        let summary = daemon::run(
            settings,
            gate,
            journal.clone(),
            reader,
            metrics,
            shutdown.clone(),
        )
        .await
        .context("validator")?;
        shutdown.store(true, std::sync::atomic::Ordering::Relaxed);
        anyhow::Ok(summary)
    })?;

    println!(
        "validator {}: {} taps: {} accepted ({} minor units), {} refused, {} torn, {} repeats; {} earlier tears settled",
        cfg.device_id,
        summary.taps,
        summary.taps_accepted,
        summary.fares_minor,
        summary.taps_refused.values().sum::<u64>(),
        summary.taps_torn,
        summary.taps_repeat,
        summary.tears_settled
    );
    for (reason, n) in &summary.taps_refused {
        println!("  refused {reason}: {n}");
    }
    println!(
        "tap latency p50 {} us, p99 {} us; outbox: {} taps not yet confirmed",
        summary.tap_latency_us_p50, summary.tap_latency_us_p99, summary.outbox_left
    );
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}
