//! `tapgate keys import-hsm` and `tapgate charging` with `[hsm] kind = "pkcs11"`, on a real
//! SoftHSM2 token in a temporary directory (`SOFTHSM2_CONF` points there; the system token
//! directory is never touched). SoftHSM2 must be installed: `.ci/run` installs it.

use charging::client::{Client, LoadAsk};
use purse::card::{Card, Personalisation};
use purse::keys::{KeyKind, KeySet};
use purse::sam::SoftwareHsm;
use purse::txn::EmulatedReader;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use tapgate_testkit::softhsm::{self, SoftHsmDir};
use tapgate_testkit::{http, spawn_charging};

const PASS: &str = "hsm-cli-pass";
const PIN: &str = "cli-user-pin";
const CARDHOLDER: &str = "tg_cardholder_token_for_hsm_tests";
const OPERATOR: &str = "tg_operator_token_for_hsm_tests";

struct Rig {
    dir: tempfile::TempDir,
    hsm: SoftHsmDir,
    module: String,
    keys: KeySet,
}

fn rig(token: &str) -> Rig {
    let module = softhsm::module_path().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let o = tapgate(
        None,
        &[
            "keys",
            "init",
            "--out",
            dir.path().join("keys").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let hsm = SoftHsmDir::new().unwrap();
    hsm.init_token_with_util(token, "cli-so-pin", PIN).unwrap();
    tapgate_secrets::write_file(&dir.path().join("pin"), PIN).unwrap();
    tapgate_secrets::write_file(&dir.path().join("bad-pin"), "not-the-pin").unwrap();
    let keys = KeySet::unseal(
        &std::fs::read(dir.path().join("keys/issuer.keys")).unwrap(),
        PASS.as_bytes(),
    )
    .unwrap();
    Rig {
        dir,
        hsm,
        module: module.to_str().unwrap().to_string(),
        keys,
    }
}

fn tapgate(conf: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tapgate"));
    cmd.args(args).env("TAPGATE_KEY_PASSPHRASE", PASS);
    if let Some(c) = conf {
        cmd.env("SOFTHSM2_CONF", c);
    }
    cmd.output().expect("run tapgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn import(r: &Rig, token: &str, pin_file: &str, extra: &[&str]) -> Output {
    let keys = r.dir.path().join("keys");
    let pin = r.dir.path().join(pin_file);
    let mut args = vec![
        "keys",
        "import-hsm",
        "--keys",
        keys.to_str().unwrap(),
        "--module",
        &r.module,
        "--token-label",
        token,
        "--pin-file",
        pin.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    tapgate(Some(&r.hsm.conf()), &args)
}

#[test]
fn import_hsm_prints_labels_and_check_values_and_refuses_to_overwrite() {
    let r = rig("import-cli");
    let o = import(&r, "import-cli", "pin", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let kcv = |k: KeyKind| tapgate_pkcs11::import::kcv(r.keys.get(k, 1).unwrap());
    let want = format!(
        "imported tapgate/KM_APP/v1 kcv {}\nimported tapgate/KM_DEBIT/v1 kcv {}\nimported tapgate/KM_CREDIT/v1 kcv {}\nimported tapgate/KM_TMAC/v1 kcv {}\nimported tapgate/KM_DEVICE/v1 kcv {}\nimported tapgate/SIGN ed25519 public {}\nimported tapgate/params parameters\n7 objects in token \"import-cli\"\n",
        kcv(KeyKind::App),
        kcv(KeyKind::Debit),
        kcv(KeyKind::Credit),
        kcv(KeyKind::Tmac),
        kcv(KeyKind::DeviceMaster),
        hex::encode_upper(r.keys.verifying_key),
    );
    assert_eq!(out, want);
    // Never a key on the terminal.
    for e in &r.keys.entries {
        let k = hex::encode_upper(e.key.expose_secret());
        assert!(!out.contains(&k) && !stderr(&o).contains(&k));
    }

    // A second import refuses (exit 2) and names the label and --replace.
    let o = import(&r, "import-cli", "pin", &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("tapgate/KM_APP/v1") && stderr(&o).contains("--replace"),
        "{}",
        stderr(&o)
    );
    let o = import(&r, "import-cli", "pin", &["--replace"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Operator mistakes: wrong PIN, unknown token, missing module.
    let o = import(&r, "import-cli", "bad-pin", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("refused the PIN"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("not-the-pin"));
    // A PIN file other users may read: refused before the token is asked, the fix named.
    let open = r.dir.path().join("open-pin");
    std::fs::write(&open, format!("{PIN}\n")).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    std::fs::set_permissions(&open, mode).unwrap();
    let o = import(&r, "import-cli", "open-pin", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains(&format!("chmod 600 {}", open.display())),
        "{}",
        stderr(&o)
    );
    let o = import(&r, "no-such-token", "pin", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no-such-token") && stderr(&o).contains("import-cli"),
        "{}",
        stderr(&o)
    );
    let mut bad = Rig { ..r };
    bad.module = "/nonexistent/module.so".into();
    let o = import(&bad, "import-cli", "pin", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/module.so"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_charging_daemon_loads_a_card_with_the_keys_in_the_token() {
    let r = rig("charging-cli");
    let o = import(&r, "charging-cli", "pin", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = r.dir.path();
    let sha = charging::api::Auth::hash_token;
    let cfg = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nledger_map_size_bytes = 67108864\n\n[hsm]\nkind = \"pkcs11\"\nmodule = {:?}\ntoken_label = \"charging-cli\"\npin_env = \"TAPGATE_TEST_HSM_PIN\"\n\n[[tokens]]\nname = \"alice\"\nrole = \"cardholder\"\nsha256 = \"{}\"\n\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
        d.join("data").to_str().unwrap(),
        r.module,
        sha(CARDHOLDER),
        sha(OPERATOR)
    );
    std::fs::write(d.join("charging.toml"), &cfg).unwrap();

    // A config that names no PIN source is refused before anything starts.
    std::fs::write(
        d.join("nopin.toml"),
        cfg.replace("pin_env = \"TAPGATE_TEST_HSM_PIN\"\n", ""),
    )
    .unwrap();
    let o = tapgate(
        Some(&r.hsm.conf()),
        &[
            "charging",
            "--config",
            d.join("nopin.toml").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("pin_file, pin_env"), "{}", stderr(&o));

    // No --keys, no passphrase: the keys are in the token.
    let (_server, base) = spawn_charging(
        Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args([
                "charging",
                "--config",
                d.join("charging.toml").to_str().unwrap(),
            ])
            .env_remove("TAPGATE_KEY_PASSPHRASE")
            .env("SOFTHSM2_CONF", r.hsm.conf())
            .env("TAPGATE_TEST_HSM_PIN", PIN)
            .stderr(Stdio::inherit()),
    );

    let uid = [0x04, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56];
    let uid_hex = hex::encode_upper(uid);
    let soft = SoftwareHsm::new(&r.keys).unwrap();
    let mut card = Card::personalise(
        &Personalisation::transit(uid, 1_000),
        soft.card_keys(&uid, 1).unwrap(),
    );
    let (code, body) = http::post(
        &format!("{base}/v1/cards"),
        OPERATOR,
        serde_json::json!({"card_uid": uid_hex, "personalised_minor": 1_000}),
    );
    assert_eq!(code, 201, "{body}");
    // The cardholder pays with a card token registered to its account.
    let (code, body) = http::post(
        &format!("{base}/v1/instruments"),
        CARDHOLDER,
        serde_json::json!({"source": "card", "instrument": "tok_visa"}),
    );
    assert_eq!(code, 201, "{body}");
    let relayed = Client::new(&base, CARDHOLDER)
        .load(
            &mut EmulatedReader {
                card: &mut card,
                rng: rand::rngs::OsRng,
            },
            &LoadAsk {
                amount_minor: 2_000,
                source: "card",
                instrument: "tok_visa",
                idempotency_key: "hsm-1",
                vanish: None,
            },
        )
        .expect("relayed");
    let (_, balance_minor, _) = relayed
        .completed()
        .unwrap_or_else(|| panic!("{:?}", relayed.ending));
    assert_eq!(balance_minor, 3_000);
    assert_eq!(card.state().balance_minor, 3_000);
}
