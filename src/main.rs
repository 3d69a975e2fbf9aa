//! `tapgate`: one CLI over the tapgate library crates.
#![forbid(unsafe_code)]

mod card_cmd;
mod card_image;
mod card_serve;
mod charge_cmd;
mod charging_cmd;
mod cli_util;
mod data_dir;
mod demo;
mod fare_cmd;
mod gateway_cmd;
mod keys_cmd;
mod money;
mod pay_cmd;
mod pcsc_cmd;
mod validator_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tapgate",
    version,
    about = "Stored-value smart-card transit and ticketing gateway"
)]
struct Cli {
    /// Log lines on standard error: `text`, or `json` (one JSON object a line; a line about a
    /// tap or an HTTP request carries `device`, `card` (masked UID), `seq`, `request_id`).
    #[arg(long = "log-format", global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole system on its embedded defaults and print a summary.
    Demo(demo::DemoArgs),
    /// Load a card online through a charging server (the cardholder's client): a card on a
    /// PC/SC reader, or an emulated card image.
    Charge(charge_cmd::ChargeArgs),
    /// Pay a merchant's online payment from a card through a charging server (the
    /// cardholder's client): a card on a PC/SC reader, or an emulated card image.
    Pay(pay_cmd::PayArgs),
    /// The charging server: online loads through the HSM, funding, ledger.
    Charging(charging_cmd::ChargingArgs),
    /// The gateway: taps from MQTT, verified, de-duplicated, stored, confirmed, forwarded.
    Gateway(Box<gateway_cmd::GatewayArgs>),
    /// The validator daemon: offline debits at the gate, journal, MQTT store-and-forward.
    Validator(validator_cmd::ValidatorArgs),
    /// Key tools: diversification, session keys, issuer key sets.
    Keys(keys_cmd::KeysArgs),
    /// Emulated cards: issue, show, debit, load, serve (to PC/SC through vpcd).
    Card(card_cmd::CardArgs),
    /// Fare rules: check, compile, test, explain, simulate, quote.
    Fare(fare_cmd::FareArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr; TAPGATE_LOG takes tracing's filter syntax. The demo keeps the embedded
    // broker's connection chatter (clients coming and going at its end) out of its output.
    // A validator says when it connects and what its broker refuses; the gateway's embedded
    // broker speaks through its front (`gateway::broker`), not rumqttd's connection chatter
    // (a client's clean disconnect is not an error).
    let default_filter = match cli.command {
        Command::Demo(_) => "warn,rumqttd=off",
        Command::Validator(_) => "warn,validator=info",
        Command::Gateway(_) => "warn,gateway=info,rumqttd=off",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TAPGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One JSON object a line: the event's fields at the top level beside timestamp, level,
        // target and message; the innermost span's fields (an HTTP request's request_id,
        // method, path) under "span".
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    match cli.command {
        Command::Demo(args) => report(demo::run(args)),
        Command::Charge(args) => report(charge_cmd::run(args)),
        Command::Pay(args) => report(pay_cmd::run(args)),
        Command::Charging(args) => report(charging_cmd::run(args)),
        Command::Gateway(args) => report(gateway_cmd::run_cmd(*args)),
        Command::Validator(args) => report(validator_cmd::run(args)),
        Command::Keys(args) => report(keys_cmd::run(args)),
        Command::Card(args) => report(card_cmd::run(args)),
        Command::Fare(args) => match fare_cmd::run(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => report(Err(e)),
        },
    }
}

/// Prints an error with its context chain; input errors exit 2, everything else 1.
fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<cli_util::InputError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
