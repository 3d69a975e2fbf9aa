//! The CLI contract: command names, flags, output lines and exit codes that integrators script
//! against, run on the real binary.

use std::path::Path;
use std::process::{Command, Output};

fn tapgate(args: &[&str], passphrase: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tapgate"));
    cmd.args(args).env_remove("TAPGATE_KEY_PASSPHRASE");
    if let Some(p) = passphrase {
        cmd.env("TAPGATE_KEY_PASSPHRASE", p);
    }
    cmd.output().expect("run tapgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// AN10922 §2.2.1 worked example through the CLI: one line, 32 uppercase hex digits.
#[test]
fn keys_diversify_prints_the_an10922_example() {
    let o = tapgate(
        &[
            "keys",
            "diversify",
            "--master",
            "00112233445566778899AABBCCDDEEFF",
            "--uid",
            "04782E21801D80",
            "--aid",
            "3042F5",
            "--system-id",
            "4E585020416275",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "A8DD63A3B89D54B37CA802473FDA9175\n");
}

#[test]
fn keys_diversify_bad_input_exits_2_with_a_clear_error() {
    for (args, needle) in [
        (
            vec!["--master", "0011", "--uid", "04782E21801D80"],
            "--master: 2 bytes given, expected 16",
        ),
        (
            vec![
                "--master",
                "zz112233445566778899AABBCCDDEEFF",
                "--uid",
                "04782E21801D80",
            ],
            "not valid hex",
        ),
        (
            vec![
                "--master",
                "00112233445566778899AABBCCDDEEFF",
                "--uid",
                "0478",
            ],
            "--uid: 2 bytes given",
        ),
        (
            vec![
                "--master",
                "00112233445566778899AABBCCDDEEFF",
                "--uid",
                "04782E21801D80",
                "--aid",
                "30",
            ],
            "--aid",
        ),
    ] {
        let mut a = vec!["keys", "diversify"];
        a.extend(args);
        let o = tapgate(&a, None);
        assert_eq!(o.status.code(), Some(2), "{a:?}");
        assert!(stderr(&o).contains(needle), "{a:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty());
    }
}

/// AN12196 session-key example through the CLI: exactly the two named lines.
#[test]
fn keys_session_prints_the_an12196_session_keys() {
    let o = tapgate(
        &[
            "keys",
            "session",
            "--key",
            "00000000000000000000000000000000",
            "--rnd-a",
            "13C5DB8A5930439FC3DEF9A4C675360F",
            "--rnd-b",
            "B9E2FC789B64BF237CCCAA20EC7E6E48",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "SesAuthENC=1309C877509E5A215007FF0ED19CA564\nSesAuthMAC=4C6626F5E72EA694202139295C7A7FC7\n"
    );
    let o = tapgate(
        &[
            "keys", "session", "--key", "00", "--rnd-a", "00", "--rnd-b", "00",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
}

fn read_balance(dir: &Path) -> i64 {
    let o = tapgate(
        &["card", "show", dir.join("card.json").to_str().unwrap()],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o)
        .lines()
        .find(|l| l.starts_with("balance_minor"))
        .expect("balance line")
        .to_string();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The README walk-through: a key set, a card, a debit, a load, a torn debit settled at
/// power-on, a refused overdraft — and the card image never holds a key.
#[test]
fn card_walkthrough_conserves_value_and_keeps_keys_out_of_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = d.join("keys");
    let card = d.join("card.json");
    let (k, c) = (keys.to_str().unwrap(), card.to_str().unwrap());
    let pass = Some("walkthrough-pass");

    let o = tapgate(&["keys", "init", "--out", k], None);
    assert_eq!(
        o.status.code(),
        Some(2),
        "no passphrase must be an input error"
    );
    let o = tapgate(&["keys", "init", "--out", k], pass);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = tapgate(&["keys", "init", "--out", k], pass);
    assert_eq!(
        o.status.code(),
        Some(2),
        "refuses to overwrite without --force"
    );

    let o = tapgate(
        &[
            "card",
            "issue",
            "--keys",
            k,
            "--uid",
            "04782E21801D80",
            "--balance",
            "1000",
            "--out",
            c,
        ],
        pass,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = tapgate(
        &["card", "debit", "--keys", k, "--card", c, "--amount", "120"],
        pass,
    );
    assert!(
        stdout(&o).starts_with("debit accepted: amount_minor=120 balance_minor=880 tmc=1 tmv="),
        "{}",
        stdout(&o)
    );
    let o = tapgate(
        &["card", "load", "--keys", k, "--card", c, "--amount", "5000"],
        pass,
    );
    assert!(
        stdout(&o).starts_with("load completed: amount_minor=5000 balance_minor=5880 tmc=2"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).trim_end().ends_with("tmac=verified"));
    // Torn after the commit flag: settled to the new state at power-on.
    let o = tapgate(
        &[
            "card",
            "debit",
            "--keys",
            k,
            "--card",
            c,
            "--amount",
            "80",
            "--tear-after-writes",
            "2",
        ],
        pass,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("card torn"));
    assert_eq!(read_balance(d), 5800);
    // Torn before the commit flag: the old state.
    let o = tapgate(
        &[
            "card",
            "debit",
            "--keys",
            k,
            "--card",
            c,
            "--amount",
            "80",
            "--tear-after-writes",
            "1",
        ],
        pass,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_balance(d), 5800);
    // Overdraft refused, nothing changes.
    let o = tapgate(
        &[
            "card", "debit", "--keys", k, "--card", c, "--amount", "999999",
        ],
        pass,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("BOUNDARY_ERROR"), "{}", stderr(&o));
    assert_eq!(read_balance(d), 5800);
    // Wrong passphrase: a clear error.
    let o = tapgate(
        &["card", "debit", "--keys", k, "--card", c, "--amount", "1"],
        Some("wrong"),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("wrong passphrase"), "{}", stderr(&o));
    // A malformed card image: input error.
    std::fs::write(d.join("bad.json"), "{\"main\": 3}").unwrap();
    let o = tapgate(
        &["card", "show", d.join("bad.json").to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(2));

    // `card show` and the image never print or store key material: check every 16-byte key
    // the issuer holds is absent from the card image and from all output.
    let image: String = std::fs::read_to_string(&card)
        .unwrap()
        .split_whitespace()
        .collect();
    let sealed = std::fs::read(keys.join("issuer.keys")).unwrap();
    let ks = purse::keys::KeySet::unseal(&sealed, b"walkthrough-pass").unwrap();
    let uid = [0x04, 0x78, 0x2E, 0x21, 0x80, 0x1D, 0x80];
    let show = stdout(&tapgate(&["card", "show", c], None));
    for kind in [
        purse::keys::KeyKind::App,
        purse::keys::KeyKind::Debit,
        purse::keys::KeyKind::Credit,
        purse::keys::KeyKind::Tmac,
    ] {
        let key = ks.card_key(kind, 1, &uid).unwrap();
        let hexkey = hex::encode_upper(key.expose_secret());
        assert!(!image.to_uppercase().contains(&hexkey));
        assert!(!show.contains(&hexkey));
        let bytes: Vec<String> = key.expose_secret().iter().map(|b| b.to_string()).collect();
        assert!(!image.contains(&bytes.join(",")), "key bytes in image");
    }
}

/// A merchant fee above the whole sale (10000 bps) is refused before any ledger is opened.
#[test]
fn settlement_refuses_a_merchant_fee_above_10000_bps() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("out"));
    let o = tapgate(
        &[
            "charging",
            "settlement",
            "--data",
            data.to_str().unwrap(),
            "--day",
            "2026-12-06",
            "--out",
            out.to_str().unwrap(),
            "--merchant-fee-bps",
            "10001",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("10001 is not in 0..=10000"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "no settlement file is written");
}

/// `tapgate pay` takes the payment PIN only from a file or an environment variable: a PIN on
/// the command line would show in the process list.
#[test]
fn pay_takes_no_pin_on_the_command_line() {
    let o = tapgate(
        &[
            "pay",
            "--server",
            "http://127.0.0.1:9",
            "--payment",
            "pay_x",
            "--token",
            "t",
            "--pin",
            "2468",
            "--card",
            "c.json",
            "--keys",
            "k",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unexpected argument '--pin'"),
        "{}",
        stderr(&o)
    );
    // Both sources at once: a usage error too.
    let o = tapgate(
        &[
            "pay",
            "--server",
            "http://127.0.0.1:9",
            "--payment",
            "pay_x",
            "--token",
            "t",
            "--pin-file",
            "pin.txt",
            "--pin-env",
            "MY_PIN",
            "--card",
            "c.json",
            "--keys",
            "k",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// `charging token --append-to` and `charging page-login --append-to` add their entries to the
/// config file (what was there kept), which then reads as configuration.
#[test]
fn charging_token_and_page_login_append_their_entries_to_the_config() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("charging.toml");
    std::fs::write(&cfg_path, "data_dir = \"/tmp/x\"\n").unwrap();
    let path = cfg_path.to_str().unwrap();
    let args = ["charging", "token", "--name", "gw-1", "--role", "gateway"];
    let o = tapgate(&[&args[..], &["--append-to", path]].concat(), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let token = stdout(&o);
    let token = token.trim().strip_prefix("token=").expect("token line");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args([
            "charging",
            "page-login",
            "--name",
            "rider-7",
            "--append-to",
            path,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a passphrase\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty(), "appended, not printed");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg = charging::server::ServerConfig::from_toml(&text).expect("still configuration");
    assert_eq!(cfg.data_dir, Path::new("/tmp/x"));
    assert_eq!(cfg.tokens.len(), 1);
    assert_eq!(cfg.tokens[0].name, "gw-1");
    assert_eq!(cfg.tokens[0].sha256, charging::api::Auth::hash_token(token));
    assert_eq!(cfg.pages.cardholders[0].name, "rider-7");
    assert!(charging::pages::verify_password(
        &cfg.pages.cardholders[0].password_argon2,
        "a passphrase"
    ));
}
