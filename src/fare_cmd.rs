//! `tapgate fare …`: check, compile, test, explain, simulate and quote fare rules.
//! (Filled in under issue 3.)

use clap::Args;

/// Arguments of `tapgate fare`.
#[derive(Args)]
pub struct FareArgs {}

/// Run `tapgate fare …`; returns the process exit code.
pub fn run(_args: FareArgs) -> anyhow::Result<u8> {
    anyhow::bail!("tapgate fare: not built yet")
}
