//! `tapgate pay`: the cardholder pays a merchant's online payment from the card. Like `tapgate
//! charge`, it finds the card (`--reader pcsc[:NAME]`, or an emulated card image with
//! `--card`/`--keys`) and relays the card dialogue to the charging server; it holds no key and
//! cannot change the amount or the merchant. With `--refund REF` it collects a merchant's refund
//! of a payment onto the card that paid (a credit the HSM makes).

use crate::charge_cmd::{card_target, idempotency_key, print_outcome, relay_with_card, CardFlags};
use crate::cli_util::input_err;
use crate::keys_cmd::pin_source;
use anyhow::{Context, Result};
use charging::client::Client;
use clap::Args;
use std::path::PathBuf;
use zeroize::Zeroizing;

/// The variable the payment PIN is read from when neither `--pin-file` nor `--pin-env` is given.
pub const PIN_ENV: &str = "TAPGATE_PAYMENT_PIN";

/// The payment PIN from `--pin-file` or `--pin-env` (through the same [`pin_source`] as the
/// token PIN of `tapgate keys import-hsm`), else from `$TAPGATE_PAYMENT_PIN` if it is set, else
/// none.
fn payment_pin(
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
) -> Result<Option<Zeroizing<String>>> {
    let source = match (pin_file, pin_env) {
        (None, None) if std::env::var_os(PIN_ENV).is_none() => return Ok(None),
        (None, None) => pin_source(None, Some(PIN_ENV.to_string()))?,
        (f, e) => pin_source(f, e)?,
    };
    let pin = source
        .read()
        .map_err(|e| input_err(format!("the payment PIN: {e}")))?;
    Ok(Some(pin))
}

/// `tapgate pay`.
#[derive(Args)]
pub struct PayArgs {
    /// The charging server, e.g. https://charging.example or http://127.0.0.1:8443.
    #[arg(long)]
    server: String,
    /// The merchant's payment id (`pay_…`), as the merchant's page gave it.
    #[arg(long, required_unless_present = "refund", conflicts_with = "refund")]
    payment: Option<String>,
    /// Collect this refund (`ref_…`) onto the card that paid, instead of paying.
    #[arg(long)]
    refund: Option<String>,
    /// The API token (default: $TAPGATE_TOKEN).
    #[arg(long, env = "TAPGATE_TOKEN", hide_env_values = true)]
    token: String,
    /// Idempotency key (default: a new random one; reuse it to retry the same payment safely).
    #[arg(long = "idempotency-key")]
    idempotency_key: Option<String>,
    /// Read the card's payment PIN (when its holder set one and the payment is above its
    /// amount) from this file: its first line, the file the owner's alone (chmod 600). The PIN
    /// is never an argument: it would show in the process list. Default: $TAPGATE_PAYMENT_PIN
    /// when it is set.
    #[arg(long = "pin-file", conflicts_with = "pin_env")]
    pin_file: Option<PathBuf>,
    /// Read the card's payment PIN from this environment variable (instead of
    /// $TAPGATE_PAYMENT_PIN).
    #[arg(long = "pin-env")]
    pin_env: Option<String>,
    /// Which card.
    #[command(flatten)]
    card: CardFlags,
}

/// Runs `tapgate pay`.
pub fn run(a: PayArgs) -> Result<()> {
    let (prefix, id) = match (&a.payment, &a.refund) {
        (Some(p), _) => ("pay_", p.as_str()),
        (None, Some(r)) => ("ref_", r.as_str()),
        (None, None) => {
            return Err(input_err(
                "which payment? --payment pay_… or --refund ref_…",
            ))
        }
    };
    if !id.starts_with(prefix) || id.len() > 100 {
        return Err(input_err(format!(
            "{id:?} is not an id of the form {prefix}…"
        )));
    }
    let key = idempotency_key(a.idempotency_key.clone());
    let pin = payment_pin(a.pin_file.clone(), a.pin_env.clone())?;
    let target = card_target(&a.card)?;
    let client = Client::new(&a.server, &a.token);
    let retry_hint = || {
        format!("it did not finish: retry with --idempotency-key {key} (the same key never moves value twice)")
    };
    if a.payment.is_none() {
        let r = relay_with_card(&a.card, target, |card| {
            client.collect_refund(card, id, &key, None)
        })
        .with_context(retry_hint)?;
        return print_outcome("refund", &format!("refund={id} "), &r, &key);
    }
    let asked = client
        .payment(id)
        .with_context(|| format!("reading payment {id}"))?;
    println!(
        "paying {} {} to {}: {}",
        asked["amount_minor"],
        asked["currency"].as_str().unwrap_or_default(),
        asked["merchant"].as_str().unwrap_or_default(),
        asked["description"].as_str().unwrap_or_default()
    );
    let r = relay_with_card(&a.card, target, |card| {
        client.pay_with_pin(card, id, &key, pin.as_deref().map(String::as_str), None)
    })
    .with_context(retry_hint)?;
    print_outcome("payment", &format!("payment={id} "), &r, &key)
}
