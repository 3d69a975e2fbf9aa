//! `tapgate validator`: the validator daemon, configured by a TOML file (its schema and the
//! start-up choices it decides: `validator::config`) and flags.

use crate::cli_util::input_err;
use crate::keys_cmd::load_keyset;
use crate::pcsc_cmd::{parse_reader, ReaderChoice};
use anyhow::{bail, Context, Result};
use clap::Args;
use purse::blocklist::Blocklist;
use purse::sam::{SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use validator::config::{choose_fare_table, Config, ConfigError, JOURNAL_MAP_BYTES};
use validator::daemon;
use validator::gate::{Gate, Step};
use validator::journal::Journal;
use validator::reader::{Crowd, Reader};

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

/// A configuration error: what the operator must fix is an input error (exit 2), named after
/// the file where the original did (`in_file`).
fn config_err(in_file: Option<&Path>, e: ConfigError) -> anyhow::Error {
    match (e, in_file) {
        (e @ (ConfigError::Parse(_) | ConfigError::Invalid(_)), Some(p)) => {
            input_err(format!("{}: {e}", p.display()))
        }
        (
            e
            @ (ConfigError::Invalid(_) | ConfigError::NoFareTable | ConfigError::FareTable { .. }),
            _,
        ) => input_err(e.to_string()),
        (other, _) => anyhow::Error::new(other),
    }
}

/// Runs `tapgate validator`.
pub fn run(a: ValidatorArgs) -> Result<()> {
    let path = a.config.as_path();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cfg = Config::from_toml(&text).map_err(|e| config_err(Some(path), e))?;
    if let Some(d) = a.device {
        cfg.device_id = d;
    }
    if let Some(j) = a.journal {
        cfg.journal = j;
    }
    if let Some(b) = a.broker {
        cfg.set_broker(b);
    }
    if let Some(c) = cfg.crowd.as_mut() {
        if let Some(n) = a.crowd_taps {
            c.taps = Some(n);
        }
        if let Some(s) = a.crowd_seed {
            c.seed = s;
        }
    }
    let placement = cfg.placement().map_err(|e| config_err(Some(path), e))?;
    let crash_at = a.crash_at.as_deref().map(parse_crash).transpose()?;
    let choice = match (&a.reader, cfg.reader.as_deref()) {
        (Some(flag), _) => parse_reader("--reader", flag)?,
        (None, None | Some("crowd")) => ReaderChoice::Emulated,
        (None, Some("pcsc")) => ReaderChoice::Pcsc(cfg.reader_name.clone()),
        (None, Some(r)) => bail!(input_err(format!(
            "{}: reader {r:?} must be \"crowd\" or \"pcsc\"",
            path.display()
        ))),
    };

    let keys = load_keyset(&cfg.keys, a.passphrase_file.as_deref())?;
    let sam = SoftwareSam::validator(&keys, cfg.device_id).with_context(|| {
        format!(
            "the key set cannot act as validator {}'s SAM",
            cfg.device_id
        )
    })?;
    let signing_pub = cfg.signing_pub().map_err(|e| config_err(None, e))?;
    crate::data_dir::ensure_dir(
        &cfg.journal,
        &format!("journal in {} / --journal", path.display()),
    )?;
    let journal = Arc::new(
        Journal::open(&cfg.journal, cfg.outbox_capacity_taps, JOURNAL_MAP_BYTES)
            .with_context(|| format!("opening the journal {}", cfg.journal.display()))?,
    );
    let mut gate = Gate {
        sam,
        engine: None,
        blocklist: Blocklist::new(cfg.card_scheme()),
        placement,
        rng: StdRng::from_entropy(),
    };
    let table = match &cfg.fare_table {
        Some(p) => Some((
            p.as_path(),
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )),
        None => None,
    };
    choose_fare_table(
        &mut gate,
        &journal,
        &signing_pub,
        table.as_ref().map(|(p, b)| (*p, b.as_slice())),
    )
    .map_err(|e| config_err(None, e))?;
    // The summary's amounts in the fare table's currency.
    let currency = gate.engine.as_ref().map(|e| {
        let m = &e.table().meta;
        (m.currency.clone(), m.currency_exponent)
    });
    let pend = journal.pendings()?;
    if !pend.is_empty() {
        eprintln!(
            "journal: {} debit(s) were in progress when the validator stopped; each is settled at the card's next tap here",
            pend.len()
        );
    }

    let shutdown = Arc::new(AtomicBool::new(false));
    let reader = open_reader(choice, &cfg, a.passphrase_file.as_deref(), &shutdown)?;

    let settings = cfg
        .settings(signing_pub, crash_at)
        .map_err(|e| config_err(None, e))?;
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
            spawn_metrics(mc, metrics.clone(), shutdown.clone())?;
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

    print_summary(cfg.device_id, &summary, currency.as_ref(), a.json)?;
    let fare_errors = summary.taps_refused.get("fare_error").copied().unwrap_or(0);
    if fare_errors > 0 && summary.taps_accepted == 0 {
        eprintln!(
            "warning: all {fare_errors} priced taps were refused as fare_error: the fare table cannot price this gate; check stop, route and kind in {} against the table (`tapgate fare explain`)",
            path.display()
        );
    }
    if summary.outbox_left > 0 {
        let why = if cfg.mqtt.is_some() {
            "the gateway has not confirmed them"
        } else {
            "no [mqtt]: this validator works offline"
        };
        eprintln!(
            "warning: {} taps are not confirmed ({why}): they stay in the journal {} and are sent at the next start with [mqtt]; never delete it",
            summary.outbox_left,
            cfg.journal.display()
        );
    }
    Ok(())
}

/// The reader of `choice`: the emulated crowd of `[crowd]`, or a PC/SC reader.
fn open_reader(
    choice: ReaderChoice,
    cfg: &Config,
    passphrase_file: Option<&Path>,
    shutdown: &Arc<AtomicBool>,
) -> Result<Box<dyn Reader>> {
    Ok(match choice {
        ReaderChoice::Emulated => {
            let (Some(section), Some(crowd)) = (&cfg.crowd, cfg.crowd()) else {
                bail!(input_err(
                    "no reader: add a [crowd] section (emulated cards) or set reader = \"pcsc\"",
                ));
            };
            let issuer = load_keyset(
                section.issuer_keys.as_ref().unwrap_or(&cfg.keys),
                passphrase_file,
            )?;
            let hsm =
                SoftwareHsm::new(&issuer).context("the emulated crowd needs the issuer key set")?;
            Box::new(Crowd::new(crowd, hsm, shutdown.clone()).context("card images directory")?)
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
    })
}

/// Serves `/metrics` on `[metrics]`'s listener until `shutdown` (on the current runtime).
fn spawn_metrics(
    mc: &validator::config::MetricsConfig,
    metrics: Arc<daemon::Metrics>,
    shutdown: Arc<AtomicBool>,
) -> Result<()> {
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
    let (m, s) = (metrics, shutdown);
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
    Ok(())
}

/// The day's summary in words (and as JSON with `--json`).
fn print_summary(
    device_id: u32,
    summary: &daemon::Summary,
    currency: Option<&(String, u8)>,
    json: bool,
) -> Result<()> {
    let fares = summary.fares_minor;
    println!(
        "validator {}: {} taps: {} accepted ({}), {} refused, {} torn, {} repeats; {} earlier tears settled",
        device_id,
        summary.taps,
        summary.taps_accepted,
        match currency {
            Some((cur, exp)) => crate::money::amount(fares, *exp, cur),
            None => format!("{fares} minor units"),
        },
        summary.taps_refused.values().sum::<u64>(),
        summary.taps_torn,
        summary.taps_repeat,
        summary.tears_settled
    );
    for (reason, n) in &summary.taps_refused {
        println!("  refused {reason}: {n}");
    }
    println!(
        "tap time median {:.1} ms, 99% within {:.1} ms; outbox: {} taps not yet confirmed",
        summary.tap_latency_us_p50 as f64 / 1000.0,
        summary.tap_latency_us_p99 as f64 / 1000.0,
        summary.outbox_left
    );
    if json {
        println!("{}", serde_json::to_string(summary)?);
    }
    Ok(())
}
