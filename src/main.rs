//! `tapgate`: one CLI over the tapgate library crates.
#![forbid(unsafe_code)]

mod fare_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tapgate", version, about = "Stored-value smart-card transit and ticketing gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Key tools: diversification, session keys, issuer key sets.
    Keys,
    /// Fare rules: check, compile, test, explain, simulate, quote.
    Fare(fare_cmd::FareArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keys => ExitCode::SUCCESS,
        Command::Fare(args) => match fare_cmd::run(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}
