//! `tapgate charge`: the cardholder's client. It finds the card (on a PC/SC reader with
//! `--reader pcsc[:NAME]`, or an emulated card image with `--card`/`--keys`), relays the card
//! dialogue to the charging server, and shows the result. It holds no key and cannot change the
//! amount.

use crate::cli_util::{input_err, write_atomic};
use crate::keys_cmd::load_keyset;
use anyhow::{Context, Result};
use clap::Args;
use purse::card::{Card, Nvm};
use purse::sam::SoftwareHsm;
use purse::txn::{EmulatedReader, Transport};
use std::path::PathBuf;

/// `tapgate charge`.
#[derive(Args)]
pub struct ChargeArgs {
    /// The charging server, e.g. https://charging.example or http://127.0.0.1:8443.
    #[arg(long)]
    server: String,
    /// Amount to load, minor units.
    #[arg(long)]
    amount: i32,
    /// Funding as SOURCE:INSTRUMENT, e.g. card:tok_visa (a card token, registered to your account
    /// on first use), mileage:M123456 (a membership the programme linked to your account),
    /// voucher:ABCD-EFGH-… (a voucher code).
    #[arg(long)]
    funding: String,
    /// The API token (default: $TAPGATE_TOKEN).
    #[arg(long, env = "TAPGATE_TOKEN", hide_env_values = true)]
    token: String,
    /// Idempotency key (default: a new random one; reuse it to retry the same load safely).
    #[arg(long = "idempotency-key")]
    idempotency_key: Option<String>,
    /// The card on a PC/SC reader: `pcsc` (any reader) or `pcsc:NAME` (a reader whose name
    /// contains NAME). Needs a build with the `pcsc` feature.
    #[arg(long, conflicts_with_all = ["card", "keys"])]
    reader: Option<String>,
    /// With --reader: how long to wait for the card, seconds.
    #[arg(long = "wait", default_value_t = 60)]
    wait_s: u64,
    /// The emulated card image to load (updated in place).
    #[arg(long, requires = "keys")]
    card: Option<PathBuf>,
    /// The issuer key directory the emulated card's secure element derives its keys from.
    #[arg(long, requires = "card")]
    keys: Option<PathBuf>,
    /// Read the key-set passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
    #[arg(long = "passphrase-file")]
    passphrase_file: Option<PathBuf>,
    /// Drill for an emulated card: it loses power after this many NVM writes of the load's
    /// commit (1–6), as a card pulled from the reader at that instant; the load is left pending
    /// and settled by the server from the card's record at its next load.
    #[arg(long = "tear-after-writes", requires = "card")]
    tear_after_writes: Option<u32>,
}

/// The outcome of a relayed load.
#[derive(Debug)]
pub struct Relayed {
    /// The server's final answer.
    pub reply: serde_json::Value,
    /// HTTP round trips.
    pub round_trips: u32,
}

/// What to load.
pub struct LoadAsk<'a> {
    /// Amount, minor units.
    pub amount_minor: i32,
    /// Funding source name.
    pub source: &'a str,
    /// Instrument at the source.
    pub instrument: &'a str,
    /// Idempotency key.
    pub idempotency_key: &'a str,
    /// Fault injection (demo, tests): the client vanishes at the n-th command, after
    /// delivering it to the card (`true`) or not.
    pub vanish_at: Option<(usize, bool)>,
}

/// Registers a card-processor token to the caller's account (`POST /v1/instruments`): a load
/// is funded only from the caller's own instruments. Already the caller's: nothing to do;
/// another account's: an error.
pub fn register_card_token(
    agent: &ureq::Agent,
    base: &str,
    token: &str,
    instrument: &str,
) -> Result<()> {
    let base = base.trim_end_matches('/');
    match agent
        .post(&format!("{base}/v1/instruments"))
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(serde_json::json!({"source": "card", "instrument": instrument}))
    {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, r)) => {
            let body: serde_json::Value = r.into_json().unwrap_or_default();
            anyhow::bail!(
                "registering card token {instrument:?}: server answered {code}: {}",
                body["detail"].as_str().unwrap_or("(no detail)")
            )
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("reaching {base}"))),
    }
}

/// Relays one load for the card behind `card` (an emulated card, a PC/SC reader) through the
/// server at `base`: the client side of the protocol. The card's answers go back unread, except
/// that a batch stops at the first answer that is not DESFire OK / additional frame (the card has
/// ended the session, so it would refuse the rest).
pub fn relay_load(
    agent: &ureq::Agent,
    base: &str,
    token: &str,
    card: &mut dyn Transport,
    ask: &LoadAsk<'_>,
) -> Result<Relayed> {
    let base = base.trim_end_matches('/');
    let call =
        |path: &str, body: serde_json::Value, key: Option<&str>| -> Result<serde_json::Value> {
            let mut req = agent
                .post(&format!("{base}{path}"))
                .set("Authorization", &format!("Bearer {token}"));
            if let Some(k) = key {
                req = req.set("Idempotency-Key", k);
            }
            match req.send_json(body) {
                Ok(r) => Ok(r.into_json()?),
                Err(ureq::Error::Status(code, r)) => {
                    let body: serde_json::Value = r.into_json().unwrap_or_default();
                    anyhow::bail!(
                        "server answered {code}: {}",
                        body["detail"].as_str().unwrap_or("(no detail)")
                    )
                }
                Err(e) => Err(anyhow::Error::new(e).context(format!("reaching {base}"))),
            }
        };
    let uid = card
        .card_uid()
        .context("the card left the field before the load started")?;
    let mut reply = call(
        "/v1/loads",
        serde_json::json!({
            "card_uid": hex::encode_upper(uid),
            "amount_minor": ask.amount_minor,
            "funding": {"source": ask.source, "instrument": ask.instrument},
        }),
        Some(ask.idempotency_key),
    )?;
    let mut round_trips = 1;
    let mut sent = 0usize;
    while reply["status"] == "command" {
        let mut answers = Vec::new();
        for c in reply["commands"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let cmd = hex::decode(c.as_str().unwrap_or_default())
                .context("the server sent a command that is not hex")?;
            sent += 1;
            if let Some((n, deliver)) = ask.vanish_at {
                if sent >= n {
                    if deliver {
                        let _ = card.transmit(&cmd);
                    }
                    return Ok(Relayed {
                        reply: serde_json::json!({"status": "vanished", "session_id": reply["session_id"]}),
                        round_trips,
                    });
                }
            }
            match card.transmit(&cmd) {
                Ok(resp) => {
                    let ok = resp.len() >= 2
                        && resp[resp.len() - 2] == 0x91
                        && matches!(resp[resp.len() - 1], 0x00 | 0xAF);
                    answers.push(hex::encode_upper(resp));
                    if !ok {
                        break;
                    }
                }
                Err(e) => {
                    // The card left the field (or the reader failed): what it received is
                    // settled at its next contact.
                    if answers.is_empty() {
                        anyhow::bail!(
                            "{e}: the card left the field; the load is settled at its next contact"
                        );
                    }
                    break;
                }
            }
        }
        if answers.is_empty() {
            anyhow::bail!("the server sent no command to relay");
        }
        let id = reply["session_id"].as_str().unwrap_or_default().to_string();
        reply = call(
            &format!("/v1/loads/{id}/steps"),
            serde_json::json!({"seq": reply["seq"], "responses": answers}),
            None,
        )?;
        round_trips += 1;
    }
    Ok(Relayed { reply, round_trips })
}

/// Runs `tapgate charge`.
pub fn run(a: ChargeArgs) -> Result<()> {
    let (source, instrument) = a.funding.split_once(':').ok_or_else(|| {
        input_err(format!(
            "--funding {:?} must be SOURCE:INSTRUMENT, e.g. card:tok_visa",
            a.funding
        ))
    })?;
    if a.amount <= 0 {
        return Err(input_err(format!(
            "--amount {} must be a positive number of minor units",
            a.amount
        )));
    }
    let key = a.idempotency_key.unwrap_or_else(|| {
        use rand::RngCore;
        let mut b = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut b);
        hex::encode(b)
    });
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(30))
        .build();
    if source == "card" {
        register_card_token(&agent, &a.server, &a.token, instrument)?;
    }
    // Whatever breaks once the load has started, the same key resumes it and never loads twice.
    let retry_hint = || {
        format!("the load did not finish: retry with --idempotency-key {key} (the same key never loads twice)")
    };
    let ask = LoadAsk {
        amount_minor: a.amount,
        source,
        instrument,
        idempotency_key: &key,
        vanish_at: None,
    };
    let r = match (&a.reader, &a.card, &a.keys) {
        (Some(spec), _, _) => match crate::pcsc_cmd::parse_reader("--reader", spec)? {
            crate::pcsc_cmd::ReaderChoice::Emulated => {
                return Err(input_err(
                    "--reader: the emulated card is given with --card and --keys",
                ))
            }
            #[cfg(feature = "pcsc")]
            crate::pcsc_cmd::ReaderChoice::Pcsc(filter) => crate::pcsc_cmd::with_card(
                filter,
                std::time::Duration::from_secs(a.wait_s),
                |card| relay_load(&agent, &a.server, &a.token, card, &ask),
            )
            .with_context(retry_hint)?,
            #[cfg(not(feature = "pcsc"))]
            crate::pcsc_cmd::ReaderChoice::Pcsc(_) => return Err(crate::pcsc_cmd::not_built()),
        },
        (None, Some(image), Some(keys)) => {
            if let Some(k) = a.tear_after_writes {
                if !(1..=purse::card::COMMIT_WRITES).contains(&k) {
                    return Err(input_err(format!(
                        "--tear-after-writes {k}: a commit makes 1 to {} NVM writes",
                        purse::card::COMMIT_WRITES
                    )));
                }
            }
            let text = std::fs::read_to_string(image)
                .with_context(|| format!("reading card {}", image.display()))?;
            let nvm: Nvm = serde_json::from_str(&text)
                .map_err(|e| input_err(format!("card image {}: {e}", image.display())))?;
            let ks = load_keyset(keys, a.passphrase_file.as_deref())?;
            let hsm = SoftwareHsm::new(&ks)?;
            let uid = nvm.main.uid;
            let mut card = Card::power_on(nvm.clone(), hsm.card_keys(&uid, nvm.main.key_version)?);
            card.tear_after_writes(a.tear_after_writes);
            let result = {
                let mut t = EmulatedReader {
                    card: &mut card,
                    rng: rand::rngs::OsRng,
                };
                relay_load(&agent, &a.server, &a.token, &mut t, &ask)
            };
            let mut s = serde_json::to_string_pretty(card.nvm())?;
            s.push('\n');
            write_atomic(image, s.as_bytes())?;
            result.with_context(retry_hint)?
        }
        _ => {
            return Err(input_err(
                "which card? --reader pcsc[:NAME] for a card on a PC/SC reader, or --card IMAGE --keys DIR for an emulated card",
            ))
        }
    };
    match r.reply["status"].as_str() {
        Some("completed") => println!(
            "load completed: amount_minor={} balance_minor={} tmc={} round_trips={}",
            r.reply["amount_minor"], r.reply["balance_minor"], r.reply["tmc"], r.round_trips
        ),
        Some("refused") => {
            println!(
                "load refused: reason={} detail={}",
                r.reply["reason"].as_str().unwrap_or("?"),
                r.reply["detail"].as_str().unwrap_or("")
            );
            anyhow::bail!("load refused");
        }
        _ => {
            println!(
                "load pending: {} (retry with --idempotency-key {key})",
                r.reply["detail"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
