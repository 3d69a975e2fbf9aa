//! `tapgate pay`: the cardholder pays a merchant's online payment from the card. Like `tapgate
//! charge`, it finds the card (`--reader pcsc[:NAME]`, or an emulated card image with
//! `--card`/`--keys`) and relays the card dialogue to the charging server; it holds no key and
//! cannot change the amount or the merchant. With `--refund REF` it collects a merchant's refund
//! of a payment onto the card that paid (a credit the HSM makes).

use crate::charge_cmd::{card_target, idempotency_key, print_outcome, relay_with_card, CardFlags};
use crate::cli_util::input_err;
use anyhow::{Context, Result};
use charging::client::Client;
use clap::Args;

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
    /// The card's payment PIN, when its holder set one and the payment is above its amount
    /// (default: $TAPGATE_PAYMENT_PIN).
    #[arg(long, env = "TAPGATE_PAYMENT_PIN", hide_env_values = true)]
    pin: Option<String>,
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
        client.pay_with_pin(card, id, &key, a.pin.as_deref(), None)
    })
    .with_context(retry_hint)?;
    print_outcome("payment", &format!("payment={id} "), &r, &key)
}
