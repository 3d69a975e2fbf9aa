//! `tapgate charging …`: the charging server daemon and its tools.

use crate::cli_util::{input_err, write_atomic};
use crate::keys_cmd::load_keyset;
use anyhow::{Context, Result};
use charging::api::{Auth, Role};
use charging::server::{self, HsmConfig, HsmKind, ServerConfig};
use clap::{Args, Subcommand};
use purse::sam::{Hsm, SoftwareHsm};
use std::path::PathBuf;

/// `tapgate charging`.
#[derive(Args)]
pub struct ChargingArgs {
    #[command(subcommand)]
    cmd: Option<ChargingCmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML); see docs/charging.md.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address (overrides the config).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Data directory (overrides the config).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The issuer key directory (the software HSM's sealed key set).
    #[arg(long)]
    keys: Option<PathBuf>,
    /// Read the key-set passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
    #[arg(long = "passphrase-file")]
    passphrase_file: Option<PathBuf>,
}

// The ledger an offline command reads (`reconcile`, `settlement`): the LMDB ledger of a data
// directory, or the one a server configuration's `[ledger]` names. (No doc comment: clap
// would take it for the subcommands' about text.)
#[derive(Args)]
struct LedgerArgs {
    /// The charging data directory.
    #[arg(long, default_value = "data/charging")]
    data: PathBuf,
    /// The server's configuration: its `[ledger]` (PostgreSQL or LMDB in its data_dir)
    /// instead of `--data`.
    #[arg(long, conflicts_with = "data")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ChargingCmd {
    /// Reconcile every card: the ledger's shadow purse against what the card proved; lists
    /// every difference with its cause.
    Reconcile {
        #[command(flatten)]
        ledger: LedgerArgs,
        /// Print the report as one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Write a business day's settlement files (per franchise, per operator, summary) as CSV.
    Settlement {
        #[command(flatten)]
        ledger: LedgerArgs,
        /// The business day, YYYY-MM-DD (UTC).
        #[arg(long)]
        day: String,
        /// Directory to write the CSV files into.
        #[arg(long)]
        out: PathBuf,
        /// Merchants' fee on their online sales, in basis points (150 = 1.5 %; at most 10000,
        /// the whole sale).
        #[arg(long = "merchant-fee-bps", default_value_t = 0,
              value_parser = clap::value_parser!(u32).range(0..=10_000))]
        merchant_fee_bps: u32,
    },
    /// Apply the ledger database's migrations (`[ledger] kind = "postgres"`): creates or
    /// upgrades its schema to the one this build runs on, each migration once (running it again
    /// changes nothing). A database newer than this build is refused.
    Migrate {
        /// Configuration file (TOML), as for `tapgate charging`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Create an API token: prints the token once and the [[tokens]] entry for the config.
    Token {
        /// Caller name.
        #[arg(long)]
        name: String,
        /// Role: cardholder, operator, partner, gateway, metrics (a Prometheus scraper:
        /// `/metrics` only, charging and gateway) or merchant (an internet merchant: makes
        /// online payments and reads its own, charging).
        #[arg(long, value_parser = role_parser())]
        role: Role,
        /// Append the entry to this config file.
        #[arg(long)]
        append_to: Option<PathBuf>,
    },
    /// Let a cardholder (or, with --role operator, an operator) sign in to the pages: reads
    /// the password from standard input (its first line) and prints the [[pages.cardholders]]
    /// (or [[pages.operators]]) entry with its Argon2id hash (docs/pages.md).
    PageLogin {
        /// The account name (a cardholder's: the owner of their cards).
        #[arg(long)]
        name: String,
        /// cardholder (their cards) or operator (the console).
        #[arg(long, default_value = "cardholder", value_parser = ["cardholder", "operator"])]
        role: String,
        /// Append the entry to this config file.
        #[arg(long)]
        append_to: Option<PathBuf>,
    },
}

/// `--role`: one of the API's roles, by the name the config files use.
fn role_parser() -> impl clap::builder::TypedValueParser<Value = Role> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Role::ALL.map(Role::name)).try_map(|s| {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or("not a role")
    })
}

/// Runs `tapgate charging …`.
pub fn run(args: ChargingArgs) -> Result<()> {
    match args.cmd {
        Some(ChargingCmd::Reconcile { ledger, json }) => {
            let ledger = ledger.open()?;
            let started = std::time::Instant::now();
            let report = charging::reconcile::reconcile(&ledger)?;
            let elapsed_ms = started.elapsed().as_millis() as u64;
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["elapsed_ms"] = elapsed_ms.into();
                println!("{v}");
            } else {
                for d in &report.differences {
                    println!("{}", serde_json::to_string(d)?);
                }
                println!(
                    "reconciled {} cards in {elapsed_ms} ms: {} balanced, {} differences",
                    report.cards,
                    report.balanced,
                    report.differences.len()
                );
            }
            ledger.close();
            Ok(())
        }
        Some(ChargingCmd::Settlement {
            ledger,
            day,
            out,
            merchant_fee_bps,
        }) => {
            charging::settlement::day_bounds(&day).map_err(input_err)?;
            let ledger = ledger.open()?;
            let files =
                charging::settlement::settlement_with_fees(&ledger, &day, merchant_fee_bps)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for f in &files {
                write_atomic(&out.join(&f.name), f.csv.as_bytes())?;
                println!("wrote {}", out.join(&f.name).display());
            }
            ledger.close();
            Ok(())
        }
        Some(ChargingCmd::Token {
            name,
            role,
            append_to,
        }) => {
            use rand::RngCore;
            let mut b = [0u8; 24];
            rand::rngs::OsRng.fill_bytes(&mut b);
            let token = format!("tg_{}", hex::encode(b));
            let role_name = role.name();
            let entry = format!(
                "\n[[tokens]]\nname = {name:?}\nrole = {role_name:?}\nsha256 = \"{}\"\n",
                Auth::hash_token(&token)
            );
            append_or_print(&entry, append_to.as_deref())?;
            println!("token={token}");
            Ok(())
        }
        Some(ChargingCmd::PageLogin {
            name,
            role,
            append_to,
        }) => {
            let mut password = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(input_err(
                    "give the password on standard input (an empty one is refused)",
                ));
            }
            let entry = format!(
                "\n[[pages.{}]]\nname = {name:?}\npassword_argon2 = \"{}\"\n",
                if role == "operator" {
                    "operators"
                } else {
                    "cardholders"
                },
                charging::pages::hash_password(password)
            );
            append_or_print(&entry, append_to.as_deref())
        }
        Some(ChargingCmd::Migrate { config }) => migrate(config.as_deref()),
        None => serve(args.serve),
    }
}

/// The server's configuration file (the built-in default without `--config`).
/// A config entry (`charging token`, `charging page-login`) appended to the config file, or
/// printed when none is named.
fn append_or_print(entry: &str, append_to: Option<&std::path::Path>) -> Result<()> {
    if let Some(path) = append_to {
        let mut text = std::fs::read_to_string(path).unwrap_or_default();
        text.push_str(entry);
        write_atomic(path, text.as_bytes())?;
    } else {
        print!("{entry}");
    }
    Ok(())
}

fn read_config(path: Option<&std::path::Path>) -> Result<ServerConfig> {
    Ok(match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            ServerConfig::from_toml(&text)
                .map_err(|e| input_err(format!("config {}: {e}", path.display())))?
        }
        None => ServerConfig::from_toml("data_dir = \"data/charging\"").expect("default config"),
    })
}

/// `tapgate charging migrate`: the PostgreSQL ledger's schema, brought to this build's.
fn migrate(config: Option<&std::path::Path>) -> Result<()> {
    let cfg = read_config(config)?;
    if cfg.ledger.kind == server::LedgerKind::Lmdb {
        println!("ledger kind lmdb: nothing to migrate (LMDB needs no schema)");
        return Ok(());
    }
    let pg = cfg
        .ledger
        .postgres()
        .map_err(|e| input_err(e.to_string()))?;
    let url = charging::ledger::postgres::redact_url(&pg.url);
    let applied = charging::ledger::postgres::migrate(&pg)
        .with_context(|| format!("migrating the ledger database {url}"))?;
    for v in &applied {
        let name = charging::ledger::postgres::MIGRATIONS
            .iter()
            .find(|m| m.0 == *v)
            .map(|m| m.1)
            .unwrap_or_default();
        println!("applied migration {v:04}_{name}");
    }
    println!(
        "ledger database {url}: schema version {}{}",
        charging::ledger::postgres::known_version(),
        if applied.is_empty() {
            " (up to date)"
        } else {
            ""
        }
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let mut cfg = read_config(a.config.as_deref())?;
    // A [ledger] table that cannot work is the config's error (exit 2), before anything starts.
    cfg.ledger.check().map_err(|e| input_err(format!("{e}")))?;
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(d) = a.data {
        cfg.data_dir = d;
    }
    let setting = match &a.config {
        Some(p) => format!("data_dir in {} / --data", p.display()),
        None => "--data".into(),
    };
    crate::data_dir::ensure_dir(&cfg.data_dir, &setting)?;
    let hsm = open_hsm(&cfg.hsm, a.keys.as_deref(), a.passphrase_file.as_deref())?;
    if cfg.tokens.is_empty() {
        eprintln!("warning: no API tokens configured: every authenticated endpoint will refuse (see `tapgate charging token`)");
    }
    let state = server::build(&cfg, hsm).context("starting the charging server")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let shutdown = crate::cli_util::shutdown_signal();
        server::serve(&cfg, state, shutdown).await
    })?;
    Ok(())
}

/// The HSM of the `[hsm]` table: the software HSM over `--keys`, or a PKCS#11 token.
fn open_hsm(
    h: &HsmConfig,
    keys: Option<&std::path::Path>,
    passphrase_file: Option<&std::path::Path>,
) -> Result<Box<dyn Hsm + Send>> {
    match h.kind {
        HsmKind::Software => {
            let keys = keys.ok_or_else(|| {
                input_err("--keys DIR is required (the issuer key set for the software HSM)")
            })?;
            let ks = load_keyset(keys, passphrase_file)?;
            Ok(Box::new(SoftwareHsm::new(&ks)?))
        }
        HsmKind::Pkcs11 => {
            let module = h.module.clone().ok_or_else(|| {
                input_err("[hsm] kind = \"pkcs11\" needs module = \"/path/to/module.so\"")
            })?;
            if h.token_label.is_none() && h.slot.is_none() {
                return Err(input_err(
                    "[hsm] kind = \"pkcs11\" needs token_label (or slot)",
                ));
            }
            let pin = tapgate_pkcs11::PinSource::one_of(h.pin_file.clone(), h.pin_env.clone());
            let Ok(Some(pin)) = pin else {
                return Err(input_err(
                    "[hsm] kind = \"pkcs11\" needs exactly one of pin_file, pin_env (the PIN itself never goes in the config)",
                ));
            };
            if keys.is_some() {
                eprintln!("note: --keys is not used: the keys are in the PKCS#11 token");
            }
            let cfg = tapgate_pkcs11::Pkcs11Config {
                module,
                token_label: h.token_label.clone(),
                slot: h.slot,
                pin,
                prefix: h
                    .prefix
                    .clone()
                    .unwrap_or_else(|| tapgate_pkcs11::DEFAULT_PREFIX.into()),
            };
            let hsm =
                tapgate_pkcs11::Pkcs11Hsm::open(&cfg).map_err(|e| input_err(e.to_string()))?;
            eprintln!("hsm: PKCS#11 token {:?}", hsm.token_label());
            Ok(Box::new(hsm))
        }
    }
}

/// The ledger of `--config` (its `[ledger]` table), else the LMDB ledger of `--data`.
impl LedgerArgs {
    /// Opens the ledger these arguments name.
    fn open(&self) -> Result<charging::ledger::Ledger> {
        let Some(path) = self.config.as_deref() else {
            return open_ledger(&self.data);
        };
        let cfg = read_config(Some(path))?;
        cfg.ledger.check().map_err(|e| input_err(format!("{e}")))?;
        if cfg.ledger.kind == server::LedgerKind::Lmdb {
            return open_ledger(&cfg.data_dir);
        }
        server::open_ledger(&cfg).context("opening the ledger")
    }
}

fn open_ledger(data: &std::path::Path) -> Result<charging::ledger::Ledger> {
    let dir = data.join("ledger");
    if !dir.join("data.mdb").exists() {
        return Err(input_err(format!(
            "no ledger at {} (is --data the charging data directory?)",
            dir.display()
        )));
    }
    charging::ledger::Ledger::open(&dir, charging::ledger::DEFAULT_MAP_SIZE_BYTES)
        .with_context(|| format!("opening the ledger at {}", dir.display()))
}
