//! `tapgate card …`: personalise, inspect, debit and load emulated cards.

use crate::card_image::{lock_image, read_image, write_image};
use crate::cli_util::{input_err, uid7};
use crate::keys_cmd::KeyOpts;
use anyhow::Result;
use clap::{Args, Subcommand};
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::{SoftwareHsm, SoftwareSam};
use purse::txn::{self, Decision, EmulatedReader, LoadOutcome, Outcome};
use rand::rngs::OsRng;
use std::path::PathBuf;

/// `tapgate card`.
#[derive(Args)]
pub struct CardArgs {
    #[command(subcommand)]
    cmd: CardCmd,
}

/// What a value transaction on a card image needs: `card debit` and `card load`.
#[derive(Args)]
struct TxOpts {
    #[command(flatten)]
    keys: KeyOpts,
    /// Card image (updated in place).
    #[arg(long)]
    card: PathBuf,
    /// Amount in minor units.
    #[arg(long)]
    amount: i32,
    /// Inject a tear: the card loses power after this many NVM writes of the commit.
    #[arg(long = "tear-after-writes")]
    tear_after_writes: Option<u32>,
}

#[derive(Subcommand)]
enum CardCmd {
    /// Personalise an emulated card and write its image (no keys in it).
    Issue {
        #[command(flatten)]
        keys: KeyOpts,
        /// Card UID, 7 bytes hex.
        #[arg(long)]
        uid: String,
        /// Initial balance in minor units.
        #[arg(long)]
        balance: i32,
        /// Balance ceiling in minor units.
        #[arg(long = "upper-limit", default_value_t = 500_000)]
        upper_limit: i32,
        /// The holder's rider category id as the fare tables name it (child, senior, student
        /// …), written to the card's profile file: every validator prices the card as it.
        /// Default: none (the table's default category).
        #[arg(long = "rider-category", value_name = "ID")]
        rider_category: Option<String>,
        /// Output card image.
        #[arg(long)]
        out: PathBuf,
        /// Replace an image that already exists at --out: the card it held, with its value and
        /// counter, is gone (without it, an existing image is an error and is left untouched).
        #[arg(long)]
        force: bool,
    },
    /// Print a card's state (never its keys).
    Show {
        /// Card image.
        card: PathBuf,
    },
    /// Debit the card at an emulated validator (software SAM with the debit key only).
    Debit {
        #[command(flatten)]
        tx: TxOpts,
        /// Validator device id.
        #[arg(long, default_value_t = 1)]
        device: u32,
    },
    /// Load value onto the card online (software HSM with the credit key).
    Load {
        #[command(flatten)]
        tx: TxOpts,
    },
    /// Present the card to PC/SC as a virtual ICC through vsmartcard's vpcd (docs/readers.md),
    /// until Ctrl-C or SIGTERM.
    Serve {
        #[command(flatten)]
        keys: KeyOpts,
        /// Card image (written after every command that changed the card).
        #[arg(long)]
        card: PathBuf,
        /// vpcd's address (its first reader slot listens on 35963).
        #[arg(long, default_value = validator::vpcd::VPCD_DEFAULT)]
        vpcd: String,
        /// Fault injection: the card leaves the field at its N-th command APDU, or at its first
        /// CommitTransaction with `commit`, after executing it and before the answer reaches
        /// the reader; then the process ends.
        #[arg(long = "pull-at", value_name = "N|commit")]
        pull_at: Option<validator::vpcd::PullAt>,
    },
}

fn amount_arg(amount: i32) -> Result<i32> {
    if amount <= 0 {
        return Err(input_err(format!(
            "--amount: {amount} is not a positive number of minor units"
        )));
    }
    Ok(amount)
}

/// Runs `tapgate card …`.
pub fn run(args: CardArgs) -> Result<()> {
    match args.cmd {
        CardCmd::Issue {
            keys,
            uid,
            balance,
            upper_limit,
            rider_category,
            out,
            force,
        } => {
            let uid = uid7("--uid", &uid)?;
            let rider_category = rider_category.unwrap_or_default();
            purse::card::check_rider_category(&rider_category)
                .map_err(|e| input_err(format!("--rider-category {rider_category:?}: {e}")))?;
            if balance < 0 || balance > upper_limit {
                return Err(input_err(format!(
                    "--balance {balance} must be within 0..={upper_limit} (--upper-limit)"
                )));
            }
            let ks = keys.load()?;
            let hsm = SoftwareHsm::new(&ks)?;
            let mut p = Personalisation::transit(uid, balance);
            p.upper_limit_minor = upper_limit;
            p.rider_category.clone_from(&rider_category);
            let card = Card::personalise(&p, hsm.card_keys(&uid, p.key_version)?);
            // As every writer of an image: not while a crowd or a load has the card.
            let _lock = lock_image(&out)?;
            if !force && out.exists() {
                return Err(input_err(format!(
                    "--out {}: a card image is already there (its card holds value and a counter); \
                     pass --force to replace it",
                    out.display()
                )));
            }
            write_image(&out, card.nvm())?;
            let category = if rider_category.is_empty() {
                String::new()
            } else {
                format!(" rider_category={rider_category}")
            };
            println!(
                "card issued: uid={} balance_minor={balance}{category} image={}",
                hex::encode_upper(uid),
                out.display()
            );
        }
        CardCmd::Serve {
            keys,
            card,
            vpcd,
            pull_at,
        } => {
            return crate::card_serve::run(crate::card_serve::ServeOpts {
                card,
                keys: keys.keys,
                passphrase_file: keys.passphrase_file,
                vpcd,
                pull_at,
            })
        }
        CardCmd::Show { card } => {
            let mut nvm = read_image(&card)?;
            let pending = nvm.journal.is_some();
            nvm.recover();
            let s = &nvm.main;
            println!("uid             {}", hex::encode_upper(s.uid));
            println!("aid             {}", hex::encode_upper(s.aid));
            match s.key_versions {
                None => println!("key_version     {}", s.key_version),
                // Part way through a rotation: each key's version (key numbers 0..=3).
                Some(v) => println!("key_versions    {v:?} (rotation part way)"),
            }
            if s.rider_category.is_empty() {
                println!("rider_category  none (the fare table's default)");
            } else {
                println!("rider_category  {}", s.rider_category);
            }
            println!("balance_minor   {}", s.balance_minor);
            println!(
                "limits_minor    {}..={}",
                s.lower_limit_minor, s.upper_limit_minor
            );
            println!("limited_credit  {}", s.limited_credit_minor);
            println!("tmc             {}", s.tmc);
            println!("last_tmv        {}", hex::encode_upper(s.tmv));
            println!("records         {} of {}", s.records.len(), s.max_records);
            for (i, r) in s.records.iter().rev().enumerate() {
                println!("  record {i}      {}", hex::encode_upper(r));
            }
            if pending {
                println!("recovered       a torn commit was settled at power-on");
            }
        }
        CardCmd::Debit { tx, device } => {
            let amount = amount_arg(tx.amount)?;
            let ks = tx.keys.load()?;
            let mut sam = SoftwareSam::validator(&ks, device)?;
            let (result, torn) = on_card(&tx, &ks, |reader| {
                txn::debit(reader, &mut sam, &mut OsRng, |_| Decision::Apply {
                    amount_minor: amount,
                    record: Some(trip_record(device, amount)),
                })
            })?;
            match result {
                Ok(Outcome::Committed { receipt, .. }) => println!(
                    "debit accepted: amount_minor={} balance_minor={} tmc={} tmv={}",
                    receipt.amount_minor(),
                    receipt.balance_after_minor(),
                    receipt.tmc(),
                    hex::encode_upper(receipt.tmv())
                ),
                Ok(Outcome::Refused { .. }) => println!("debit refused"),
                Err(e) => return torn_or_refused(e, torn, "debit"),
            }
        }
        CardCmd::Load { tx } => {
            let amount = amount_arg(tx.amount)?;
            let ks = tx.keys.load()?;
            let mut hsm = SoftwareHsm::new(&ks)?;
            let (result, torn) = on_card(&tx, &ks, |reader| {
                txn::load_online(reader, &mut hsm, &mut OsRng, |_| Decision::Apply {
                    amount_minor: amount,
                    record: None,
                })
            })?;
            match result {
                Ok(LoadOutcome::Loaded { proof, .. }) => println!(
                    "load completed: amount_minor={} balance_minor={} tmc={} tmv={} tmac=verified",
                    proof.receipt().amount_minor(),
                    proof.receipt().balance_after_minor(),
                    proof.receipt().tmc(),
                    hex::encode_upper(proof.receipt().tmv())
                ),
                Ok(LoadOutcome::Refused { .. }) => println!("load refused"),
                Err(e) => return torn_or_refused(e, torn, "load"),
            }
        }
    }
    Ok(())
}

/// Runs one transaction (`tx` drives it through an emulated reader) on the card in the image
/// `opts.card`: locked while it runs, powered on with its keys from the issuer key set `ks` and
/// the tear to inject, written back whatever the outcome. Returns the result and whether the
/// card tore.
fn on_card<T>(
    opts: &TxOpts,
    ks: &KeySet,
    tx: impl FnOnce(&mut EmulatedReader<'_, OsRng>) -> T,
) -> Result<(T, bool)> {
    let _lock = lock_image(&opts.card)?;
    let nvm = read_image(&opts.card)?;
    let keys = SoftwareHsm::new(ks)?.card_keys_of(&nvm.main)?;
    let mut card = Card::power_on(nvm, keys);
    card.tear_after_writes(opts.tear_after_writes);
    let result = tx(&mut EmulatedReader {
        card: &mut card,
        rng: OsRng,
    });
    write_image(&opts.card, card.nvm())?;
    Ok((result, card.is_torn()))
}

/// A failed transaction: a torn card is reported (`tapgate card show` settles it), anything
/// else is the card's refusal.
fn torn_or_refused(e: txn::TxError, torn: bool, what: &str) -> Result<()> {
    if torn {
        println!("card torn during the {what} ({e}); `tapgate card show` settles it");
        Ok(())
    } else {
        Err(anyhow::Error::new(e).context(format!("{what} refused by the card")))
    }
}

/// A 32-byte trip record for the CLI walk-through: device id, amount (the validator writes the
/// fare engine's record format instead).
fn trip_record(device: u32, amount_minor: i32) -> Vec<u8> {
    let mut r = vec![0u8; purse::txn::RECORD_SIZE];
    r[0] = 1; // record format: walk-through
    r[1..5].copy_from_slice(&device.to_le_bytes());
    r[5..9].copy_from_slice(&amount_minor.to_le_bytes());
    r
}
