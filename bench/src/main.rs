//! The scenario runner: `cargo run --release -p bench -- SCENARIO [--n N] [--json]`.
//!
//! Prints a readable table and, with `--json`, one JSON object as its last line:
//! `{"scenario": "...", ...figures}`. Every figure in the docs and issue notes comes from here.
#![forbid(unsafe_code)]

use anyhow::Result;
use clap::Parser;

mod blocklist_bench;
mod blocklist_size;
mod clearing;
mod fare;
mod gateway_bench;
mod gateway_store;
mod limits;
mod loads;
mod mqtt;
mod payments;
mod purse_bench;
mod reconcile;
mod stats;
mod system;
mod validator_bench;

/// One scenario's result: named figures, in print order.
pub type Figures = Vec<(&'static str, serde_json::Value)>;

#[derive(Parser)]
#[command(name = "bench", about = "tapgate benchmark scenarios")]
struct Args {
    /// Scenario to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Number of iterations (scenario-specific default when absent).
    #[arg(long)]
    n: Option<u64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// For `gateway` and `blocklist`: `embedded` (rumqttd) or `mosquitto`.
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// For `gateway`: taps per MQTT message (1 = live taps; more = an outbox draining).
    #[arg(long = "taps-per-message", default_value_t = 1)]
    taps_per_message: usize,
    /// For `loads`: concurrent client threads (default 8, or TAPGATE_BENCH_CLIENTS).
    #[arg(long)]
    clients: Option<usize>,
    /// For `loads` and `clearing`: the ledger, `lmdb` (default) or `postgres` (a throwaway
    /// cluster on loopback; then the same run on LMDB, and the ratio).
    #[arg(long, value_enum, default_value = "lmdb")]
    ledger: loads::LedgerChoice,
    /// For `loads --ledger postgres`: charging servers on the one database (the client
    /// threads spread over them round robin; with more than one, the one-server figures of
    /// the same invocation too).
    #[arg(long, default_value_t = 1)]
    servers: usize,
    /// For `validator`: cards on the blocklist loaded (default 1,000,000).
    #[arg(long = "blocklist-cards")]
    blocklist_cards: Option<u64>,
    /// For `gateway-store`: taps already stored at which to measure, in increasing order
    /// (comma-separated; default 0,1000000,10000000).
    #[arg(long, value_delimiter = ',')]
    stored: Vec<u64>,
    /// For `gateway-store`: messages (one tap each) in a live ingest batch (default 256).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// For the hidden `blocklist-validators` (a child of `blocklist`): the broker's port.
    #[arg(long, hide = true)]
    port: Option<u16>,
    /// For the hidden `blocklist-validators`: the first device id of this process.
    #[arg(long = "first-device", hide = true)]
    first_device: Option<u32>,
    /// For the hidden `blocklist-validators`: the blocklist's verifying key, hex.
    #[arg(long, hide = true)]
    pk: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Scenario {
    Debit,
    Load,
    Fare,
    Loads,
    Payments,
    Reconcile,
    Clearing,
    Gateway,
    GatewayStore,
    Validator,
    Blocklist,
    BlocklistSize,
    System,
    /// A share of `blocklist`'s simulated validators, in a process of their own.
    #[value(hide = true)]
    BlocklistValidators,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Debit => "debit",
            Scenario::Load => "load",
            Scenario::Fare => "fare",
            Scenario::Loads => "loads",
            Scenario::Payments => "payments",
            Scenario::Reconcile => "reconcile",
            Scenario::Clearing => "clearing",
            Scenario::Gateway => "gateway",
            Scenario::GatewayStore => "gateway-store",
            Scenario::Validator => "validator",
            Scenario::Blocklist => "blocklist",
            Scenario::BlocklistSize => "blocklist-size",
            Scenario::System => "system",
            Scenario::BlocklistValidators => "blocklist-validators",
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let figures: Figures = match args.scenario {
        Scenario::Debit => purse_bench::debit(args.n)?,
        Scenario::Load => purse_bench::load(args.n)?,
        Scenario::Fare => fare::run(args.n)?,
        Scenario::Loads => loads::run(args.n, args.clients, args.ledger, args.servers)?,
        Scenario::Payments => payments::run(args.n)?,
        Scenario::Reconcile => reconcile::run(args.n)?,
        Scenario::Clearing => clearing::run(args.n, args.ledger)?,
        Scenario::Validator => validator_bench::run(args.n, args.blocklist_cards)?,
        Scenario::Blocklist => blocklist_bench::run_scenario(args.n, &args.broker)?,
        Scenario::BlocklistSize => blocklist_size::run(args.n)?,
        Scenario::System => system::run(args.n)?,
        Scenario::BlocklistValidators => {
            let missing = |f: &str| anyhow::anyhow!("blocklist-validators needs --{f}");
            return blocklist_bench::run_validators(
                args.port.ok_or_else(|| missing("port"))?,
                args.first_device.ok_or_else(|| missing("first-device"))?,
                args.n.ok_or_else(|| missing("n"))? as u32,
                args.pk.as_deref().ok_or_else(|| missing("pk"))?,
            );
        }
        Scenario::GatewayStore => {
            let stored = if args.stored.is_empty() {
                vec![0, 1_000_000, 10_000_000]
            } else {
                args.stored.clone()
            };
            gateway_store::run(&stored, args.batch)?
        }
        Scenario::Gateway => {
            gateway_bench::run_scenario(args.n, &args.broker, args.taps_per_message)?
        }
    };
    println!("scenario: {}", args.scenario.name());
    for (name, value) in &figures {
        println!("  {name:<24} {value}");
    }
    if args.json {
        let mut obj = serde_json::Map::new();
        obj.insert("scenario".into(), args.scenario.name().into());
        for (name, value) in figures {
            obj.insert(name.into(), value);
        }
        println!("{}", serde_json::Value::Object(obj));
    }
    Ok(())
}
