//! A crowd card loaded with `tapgate charge --card` while its validator keeps debiting it: the
//! image is one card in one place at a time (`validator::image_lock`), so the load stays on the
//! card and no counter is used twice.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use support::keys_and_fare_table;
use validator::journal::Journal;

const PASS: &str = "image-lock";
const START_MINOR: i64 = 400_000;
const OPS: &str = "tg_ops_lock";
const RIDER: &str = "tg_rider_lock";

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tapgate"));
    c.current_dir(dir)
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASS);
    c
}

fn tapgate(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("run tapgate")
}

fn said(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// The (amount, tmc) of every debit the validator journalled.
fn journalled(dir: &Path) -> Vec<(i64, u32)> {
    let j = Journal::open(&dir.join("journal"), 1_000_000, 1 << 30).unwrap();
    // Unverified read of the fields (outcome, kind, tmc, amount), as tests/validator_e2e.rs.
    j.outbox_after(0, 1_000_000)
        .unwrap()
        .into_iter()
        .filter(|(_, w)| w[1] == 0 && w[2] == 1)
        .map(|(_, w)| {
            (
                i64::from(i32::from_be_bytes(w[15..19].try_into().unwrap())),
                u32::from_be_bytes(w[11..15].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn a_load_during_taps_stays_on_the_card() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "hotel/rules.toml", "hotel.tgft");
    std::fs::write(
        dir.join("validator.toml"),
        format!(
            "device_id = 2001\noperator = \"grand-hotel\"\nkind = \"charge\"\nutc_offset_minutes = 540\njournal = \"journal\"\nkeys = \"keys\"\nfare_table = \"hotel.tgft\"\ndrain_timeout_s = 1\n[sale]\ncharge = \"movie\"\nitems = 1\n\n[crowd]\ncards = 1\nbalance_minor = {START_MINOR}\ndir = \"cards\"\nrate_per_s = 40\ntear_per_mille = 0\n"
        ),
    )
    .unwrap();
    let keys = purse::keys::KeySet::unseal(
        &std::fs::read(dir.join("keys/issuer.keys")).unwrap(),
        PASS.as_bytes(),
    )
    .unwrap();
    let server = tapgate_testkit::charging::start(&keys, |cfg| {
        let toml = format!(
            "data_dir = \"x\"\n[limits]\nloads_per_minute_per_client = 0\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n[[tokens]]\nname = \"rider\"\nrole = \"cardholder\"\nsha256 = \"{}\"\n",
            charging::api::Auth::hash_token(OPS),
            charging::api::Auth::hash_token(RIDER)
        );
        let t = charging::server::ServerConfig::from_toml(&toml).unwrap();
        cfg.tokens = t.tokens;
        cfg.limits = t.limits;
    });
    let uid = validator::reader::crowd_uid(0);
    let (code, body) = tapgate_testkit::charging::post(
        &format!("{}/v1/cards", server.base),
        OPS,
        serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": START_MINOR}),
    );
    assert_eq!(code, 201, "{body}");

    // A pay-TV box sells films to the one card of its crowd forty times a second for five
    // seconds…
    let validator = command(
        dir,
        &[
            "validator",
            "--config",
            "validator.toml",
            "--crowd-taps",
            "200",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let image = format!("cards/{}.json", hex::encode(uid));
    tapgate_testkit::wait_until(
        "the card's first tap",
        std::time::Duration::from_secs(20),
        || dir.join(&image).exists(),
    );
    // …while its holder loads it from a PC.
    let o = tapgate(
        dir,
        &[
            "charge",
            "--server",
            &server.base,
            "--token",
            RIDER,
            "--amount",
            "2000",
            "--funding",
            "card:tok_visa",
            "--card",
            &image,
            "--keys",
            "keys",
        ],
    );
    assert!(o.status.success(), "{}", said(&o));
    let line = said(&o);
    let load_tmc: u32 = line
        .split("tmc=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no tmc in {line}"));
    let v = validator.wait_with_output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    let debits = journalled(dir);
    assert!(debits.len() > 20, "the validator kept tapping: {debits:?}");
    assert!(
        debits.iter().any(|(_, tmc)| *tmc > load_tmc),
        "taps went on after the load (tmc {load_tmc}): {debits:?}"
    );
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(&image)).unwrap()).unwrap();
    let debited: i64 = debits.iter().map(|(a, _)| a).sum();
    assert_eq!(
        card["main"]["balance_minor"].as_i64().unwrap(),
        START_MINOR - debited + 2_000,
        "the load is still on the card"
    );
    let mut counters: Vec<u32> = debits.iter().map(|(_, t)| *t).collect();
    counters.push(load_tmc);
    let n = counters.len();
    counters.sort_unstable();
    counters.dedup();
    assert_eq!(counters.len(), n, "no counter used twice");
    assert_eq!(
        card["main"]["tmc"].as_u64().unwrap(),
        n as u64,
        "one counter step per value change"
    );
}

/// `tapgate card issue` writes an image only under its lock: while another process (here: this
/// test) holds the image, issue waits, and writes once the holder lets go.
#[test]
fn card_issue_waits_for_the_image_lock() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    support::keys_init(dir, PASS);
    let image = dir.join("card.json");
    let held = validator::image_lock::ImageLock::acquire(&image, std::time::Duration::ZERO)
        .expect("lock the image");
    let mut issue = command(
        dir,
        &[
            "card",
            "issue",
            "--keys",
            "keys",
            "--uid",
            "04782E21801D81",
            "--balance",
            "1000",
            "--out",
            "card.json",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        !image.exists(),
        "card issue wrote the image while another process held it"
    );
    assert!(issue.try_wait().unwrap().is_none(), "card issue is waiting");
    drop(held);
    let o = issue.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", said(&o));
    assert!(image.exists());
}

/// `tapgate charge --card` checks the image as every reader of images does (`validate`): an
/// image whose balance is outside its limits is refused as bad input (exit 2) before anything
/// goes to the server, and the image is left as it was.
#[test]
fn charge_refuses_an_image_that_does_not_validate() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    support::keys_init(dir, PASS);
    let o = tapgate(
        dir,
        &[
            "card",
            "issue",
            "--keys",
            "keys",
            "--uid",
            "04782E21801D82",
            "--balance",
            "1000",
            "--out",
            "card.json",
        ],
    );
    assert!(o.status.success(), "{}", said(&o));
    let image = dir.join("card.json");
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&image).unwrap()).unwrap();
    let upper = card["main"]["upper_limit_minor"].as_i64().unwrap();
    card["main"]["balance_minor"] = serde_json::json!(upper + 1);
    let bad = serde_json::to_string_pretty(&card).unwrap();
    std::fs::write(&image, &bad).unwrap();
    let o = tapgate(
        dir,
        &[
            "charge",
            "--server",
            "http://127.0.0.1:9",
            "--token",
            RIDER,
            "--amount",
            "500",
            "--funding",
            "mall:order-1",
            "--card",
            "card.json",
            "--keys",
            "keys",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", said(&o));
    assert!(
        said(&o).contains("balance outside its limits"),
        "{}",
        said(&o)
    );
    assert_eq!(std::fs::read_to_string(&image).unwrap(), bad);
}

/// `tapgate card issue` does not overwrite a card: an image already at `--out` holds a card with
/// value and a counter, so issuing over it is refused (exit 2, the image unchanged) unless
/// `--force` says the old card is to go.
#[test]
fn card_issue_refuses_to_overwrite_a_card_without_force() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    support::keys_init(dir, PASS);
    let issue = |balance: &str, force: bool| {
        let mut args = vec![
            "card",
            "issue",
            "--keys",
            "keys",
            "--uid",
            "04782E21801D81",
            "--balance",
            balance,
            "--out",
            "card.json",
        ];
        if force {
            args.push("--force");
        }
        tapgate(dir, &args)
    };
    let first = issue("1000", false);
    assert!(first.status.success(), "{}", said(&first));
    let image = std::fs::read(dir.join("card.json")).unwrap();

    let again = issue("9000", false);
    assert_eq!(again.status.code(), Some(2), "{}", said(&again));
    assert!(said(&again).contains("--force"), "{}", said(&again));
    assert_eq!(std::fs::read(dir.join("card.json")).unwrap(), image);

    let forced = issue("9000", true);
    assert!(forced.status.success(), "{}", said(&forced));
    assert!(
        said(&forced).contains("balance_minor=9000"),
        "{}",
        said(&forced)
    );
}
