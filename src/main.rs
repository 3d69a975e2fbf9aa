//! `tapgate`: one CLI over the tapgate library crates.
#![forbid(unsafe_code)]

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keys => ExitCode::SUCCESS,
    }
}
