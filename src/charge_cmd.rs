//! `tapgate charge`: the cardholder's client. It finds the card (on a PC/SC reader with
//! `--reader pcsc[:NAME]`, or an emulated card image with `--card`/`--keys`), relays the card
//! dialogue to the charging server, and shows the result. It holds no key and cannot change the
//! amount.

use crate::cli_util::input_err;
use crate::keys_cmd::load_keyset;
use anyhow::{Context, Result};
use charging::client::{Client, ClientError, LoadAsk, Relayed};
use charging::load::Reply;
use clap::Args;
use purse::card::Card;
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
    /// Which card.
    #[command(flatten)]
    card: CardFlags,
}

/// The card flags of `tapgate charge` and `tapgate pay`.
#[derive(Args)]
pub struct CardFlags {
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
    /// Drill for an emulated card: it loses power after this many NVM writes of the commit
    /// (1–6), as a card pulled from the reader at that instant; the load (or payment) is left
    /// pending and settled by the server from the card's record at its next contact.
    #[arg(long = "tear-after-writes", requires = "card")]
    tear_after_writes: Option<u32>,
}

/// The card a load or a payment goes to.
pub(crate) enum CardTarget<'a> {
    /// A card on a PC/SC reader whose name contains this (`None`: any reader).
    #[cfg(feature = "pcsc")]
    Pcsc(Option<String>),
    /// An emulated card image and the key set that opens it.
    Image {
        image: &'a std::path::Path,
        keys: &'a std::path::Path,
    },
}

/// Checks the card flags (`--reader`, or `--card` with `--keys`, `--tear-after-writes`).
pub(crate) fn card_target(a: &CardFlags) -> Result<CardTarget<'_>> {
    match (&a.reader, &a.card, &a.keys) {
        (Some(spec), _, _) => match crate::pcsc_cmd::parse_reader("--reader", spec)? {
            crate::pcsc_cmd::ReaderChoice::Emulated => Err(input_err(
                "--reader: the emulated card is given with --card and --keys",
            )),
            #[cfg(feature = "pcsc")]
            crate::pcsc_cmd::ReaderChoice::Pcsc(filter) => Ok(CardTarget::Pcsc(filter)),
            #[cfg(not(feature = "pcsc"))]
            crate::pcsc_cmd::ReaderChoice::Pcsc(_) => Err(crate::pcsc_cmd::not_built()),
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
            Ok(CardTarget::Image { image, keys })
        }
        _ => Err(input_err(
            "which card? --reader pcsc[:NAME] for a card on a PC/SC reader, or --card IMAGE --keys DIR for an emulated card",
        )),
    }
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
    let key = idempotency_key(a.idempotency_key.clone());
    // Which card, checked before anything goes to the server.
    let target = card_target(&a.card)?;
    let client = Client::new(&a.server, &a.token);
    if source == "card" {
        client
            .register_card_token(instrument)
            .with_context(|| format!("registering card token {instrument:?}"))?;
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
        vanish: None,
    };
    let r = relay_with_card(&a.card, target, |card| client.load(card, &ask))
        .with_context(retry_hint)?;
    print_outcome("load", "", &r, &key)
}

/// The given idempotency key, or a new random one.
pub(crate) fn idempotency_key(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        use rand::RngCore;
        let mut b = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut b);
        hex::encode(b)
    })
}

/// Prints how a relayed `what` (`load`, `payment`) ended — `<what> completed: <label>amount_minor=…
/// balance_minor=… tmc=… round_trips=…`, `<what> refused: reason=… detail=…` (an error),
/// `<what> pending: … (retry with --idempotency-key KEY)`.
pub(crate) fn print_outcome(what: &str, label: &str, r: &Relayed, key: &str) -> Result<()> {
    match r.reply() {
        Some(Reply::Completed {
            amount_minor,
            balance_minor,
            tmc,
            ..
        }) => println!(
            "{what} completed: {label}amount_minor={amount_minor} balance_minor={balance_minor} tmc={tmc} round_trips={}",
            r.round_trips
        ),
        Some(Reply::Refused { reason, detail, .. }) => {
            println!("{what} refused: reason={reason} detail={detail}");
            anyhow::bail!("{what} refused");
        }
        Some(Reply::Pending { detail, .. }) => {
            println!("{what} pending: {detail} (retry with --idempotency-key {key})");
        }
        Some(Reply::Command { .. }) | None => {
            println!("{what} pending:  (retry with --idempotency-key {key})");
        }
    }
    Ok(())
}

/// Runs `relay` (a load, a payment) on the card the flags chose: a card on a PC/SC reader, or
/// an emulated card image, written back (atomically) whatever the relay's outcome.
pub(crate) fn relay_with_card(
    flags: &CardFlags,
    target: CardTarget<'_>,
    relay: impl FnOnce(&mut dyn Transport) -> Result<Relayed, ClientError>,
) -> Result<Relayed> {
    match target {
        #[cfg(feature = "pcsc")]
        CardTarget::Pcsc(filter) => crate::pcsc_cmd::with_card(
            filter,
            std::time::Duration::from_secs(flags.wait_s),
            |card| Ok(relay(card)?),
        ),
        CardTarget::Image { image, keys } => {
            // Held from the read to the write: a validator's crowd presenting the same card
            // waits, and reads the changed image after.
            let _lock = crate::card_image::lock_image(image)?;
            let nvm = crate::card_image::read_image(image)?;
            let ks = load_keyset(keys, flags.passphrase_file.as_deref())?;
            let hsm = SoftwareHsm::new(&ks)?;
            let mut card = Card::power_on(nvm.clone(), hsm.card_keys_of(&nvm.main)?);
            card.tear_after_writes(flags.tear_after_writes);
            let result = {
                let mut t = EmulatedReader {
                    card: &mut card,
                    rng: rand::rngs::OsRng,
                };
                relay(&mut t)
            };
            crate::card_image::write_image(image, card.nvm())?;
            Ok(result?)
        }
    }
}
