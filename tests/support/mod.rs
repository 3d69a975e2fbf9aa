//! What the end-to-end tests share: the test kit's ports, process guard and listener wait
//! (`tapgate-testkit`), and the key set and fare table every CLI test starts from.

#![allow(dead_code)] // each test binary uses its own part

#[allow(unused_imports)] // each test binary uses its own part
pub use tapgate_testkit::{free_port, wait_for_port, Kill};

/// `tapgate keys init --out keys`, then `tapgate fare compile` of the sample `sample` (a path
/// under fare-rules/samples) signed with those keys into `out`, in `dir`.
pub fn keys_and_fare_table(dir: &std::path::Path, passphrase: &str, sample: &str, out: &str) {
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .current_dir(dir)
            .args(args)
            .env("TAPGATE_KEY_PASSPHRASE", passphrase)
            .output()
            .expect("run tapgate");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["keys", "init", "--out", "keys"]);
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fare-rules/samples")
        .join(sample);
    run(&[
        "fare",
        "compile",
        rules.to_str().unwrap(),
        "--keys",
        "keys",
        "--out",
        out,
    ]);
}

/// The metro sample's rules (fare-rules/samples/metro-city/rules.toml) at `version`, with
/// `extra` appended, written as `name` in `dir`: its path.
pub fn metro_rules(
    dir: &std::path::Path,
    name: &str,
    version: u32,
    extra: &str,
) -> std::path::PathBuf {
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fare-rules/samples/metro-city/rules.toml"),
    )
    .expect("the metro sample")
    .replacen("version = 1\n", &format!("version = {version}\n"), 1);
    let path = dir.join(name);
    std::fs::write(&path, format!("{rules}\n{extra}")).expect("writing the rules");
    path
}

/// A second night-bus fare for the metro sample's night-bus legs at another price: the error
/// `tapgate fare check` finds (a contradiction).
pub const NIGHTBUS_CONTRADICTION: &str =
    "[[fares]]\nid = \"nightbus-dear\"\ngroup = \"nightbus\"\nnetwork = \"nightbus\"\nprice = 3000\n";

/// `tapgate keys init --out keys` in `dir` with `passphrase`, and the issuer key set it sealed
/// there (`keys/issuer.keys`).
pub fn keys_init(dir: &std::path::Path, passphrase: &str) -> purse::keys::KeySet {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["keys", "init", "--out"])
        .arg(dir.join("keys"))
        .env("TAPGATE_KEY_PASSPHRASE", passphrase)
        .output()
        .expect("run tapgate keys init");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    purse::keys::KeySet::unseal(
        &std::fs::read(dir.join("keys/issuer.keys")).expect("keys/issuer.keys"),
        passphrase.as_bytes(),
    )
    .expect("unsealing the issuer keys")
}

/// The `[[tokens]]` tables of a charging configuration: (name, role, bearer secret) each.
pub fn tokens_toml(tokens: &[(&str, &str, &str)]) -> String {
    tokens
        .iter()
        .map(|(name, role, secret)| {
            format!(
                "\n[[tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
                charging::api::Auth::hash_token(secret)
            )
        })
        .collect()
}

/// A `tapgate charging` process, killed when dropped.
pub struct Charging {
    /// The base URL it announced.
    pub base: String,
    /// The process.
    pub process: Kill,
}

/// `tapgate charging --config <config> --keys <keys>` unsealing with `passphrase` (its
/// standard error inherited).
pub fn start_charging(
    config: &std::path::Path,
    keys: &std::path::Path,
    passphrase: &str,
) -> Charging {
    let (process, base) = tapgate_testkit::spawn_charging(
        std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .arg("charging")
            .arg("--config")
            .arg(config)
            .arg("--keys")
            .arg(keys)
            .env("TAPGATE_KEY_PASSPHRASE", passphrase)
            .stderr(std::process::Stdio::inherit()),
    );
    Charging { base, process }
}

/// `tapgate charging reconcile --json --data <data>` (another process, beside a running
/// server): its JSON report. The command must succeed.
pub fn reconcile(data: &std::path::Path) -> serde_json::Value {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["charging", "reconcile", "--json", "--data"])
        .arg(data)
        .output()
        .expect("run tapgate charging reconcile");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON report ({e}) in {stdout}"))
}

/// The balance on the emulated card `uid`'s image under `dir/cards` (none: never presented).
pub fn card_balance(dir: &std::path::Path, uid: &[u8; 7]) -> Option<i64> {
    let p = dir.join("cards").join(format!("{}.json", hex::encode(uid)));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["main"]["balance_minor"].as_i64()
}

/// Waits (`limit` at most) until, for every card of `uids` with an image under `dir/cards`, the
/// charging server at `base` (read with the operator's `token`) holds a shadow purse equal to
/// the card's own balance; then panics naming the cards that disagree (uid, card, ledger).
pub fn wait_cards_conserved(
    dir: &std::path::Path,
    base: &str,
    token: &str,
    uids: &[[u8; 7]],
    limit: std::time::Duration,
) {
    use charging::reconcile::{card_conserved, CardTruth, ShadowView};
    let t0 = std::time::Instant::now();
    loop {
        let mut wrong = Vec::new();
        for uid in uids {
            let Some(card) = card_balance(dir, uid) else {
                continue;
            };
            let url = format!("{base}/v1/cards/{}", hex::encode_upper(uid));
            let (code, v) = tapgate_testkit::http::call("GET", &url, Some(token), None, None);
            assert_eq!(code, 200, "{v}");
            let truth = CardTruth {
                uid: *uid,
                balance_minor: i32::try_from(card).unwrap(),
                tmc: 0, // this check is the balance's; the counters are the demo's and bench's
            };
            let view = ShadowView {
                balance_minor: v["shadow_balance_minor"].as_i64().unwrap(),
                booked_through_tmc: 0,
            };
            if !card_conserved(&truth, &view).0 {
                wrong.push((hex::encode_upper(uid), card, view.balance_minor));
            }
        }
        if wrong.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "cards whose ledger disagrees (uid, card, ledger): {wrong:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// The charging server at `base` (read with `token`) holds `card`'s shadow purse equal to the
/// card's own balance, with no load left pending.
pub fn assert_shadow_equals_card(base: &str, token: &str, card: &purse::card::Card) {
    let uid = hex::encode_upper(card.state().uid);
    let (code, got) = tapgate_testkit::http::call(
        "GET",
        &format!("{base}/v1/cards/{uid}"),
        Some(token),
        None,
        None,
    );
    assert_eq!(code, 200, "card {uid}: {got}");
    assert_eq!(
        got["shadow_balance_minor"],
        card.state().balance_minor,
        "card {uid}: {got}"
    );
    assert_eq!(got["pending_loads"], 0, "card {uid}: {got}");
}

/// The first lines of a metro validator's configuration: device `device` at `stop` on the
/// metro sample's route M1 as a `kind` validator (Korean time), its journal in `journal`, the
/// key set in `keys` and the fare table `metro.tgft`. Callers add their settings and sections.
pub fn metro_validator_toml(device: u32, stop: &str, kind: &str, journal: &str) -> String {
    format!(
        "device_id = {device}\noperator = \"metro\"\nstop = \"{stop}\"\nroute = \"M1\"\nkind = \"{kind}\"\nutc_offset_minutes = 540\njournal = \"{journal}\"\nkeys = \"keys\"\nfare_table = \"metro.tgft\"\n"
    )
}

/// A validator's `[mqtt]` section: the broker `broker` (`mqtt://host:port`), its password in
/// the environment variable `password_env`.
pub fn mqtt_toml(broker: &str, password_env: &str) -> String {
    format!("[mqtt]\nbroker = \"{broker}\"\npassword_env = \"{password_env}\"\n")
}

/// The first arguments of `tapgate gateway` in the tests: operator metro, the key set in
/// `keys`, its data in `gw`.
pub const METRO_GATEWAY: [&str; 7] = [
    "gateway",
    "--keys",
    "keys",
    "--data",
    "gw",
    "--operator",
    "metro",
];

/// [`METRO_GATEWAY`] with its embedded broker on loopback `port` for the devices listed in the
/// file `users`; a caller adds its own after them.
pub fn embedded_gateway_args(users: &str, port: u16) -> Vec<String> {
    let listen = format!("127.0.0.1:{port}");
    METRO_GATEWAY
        .into_iter()
        .chain(["--mqtt-users", users, "--embedded-listen", &listen])
        .map(str::to_string)
        .collect()
}

/// The gate tests' rig and a gate placed on the metro's route M1: the validator's own test
/// support (`validator/tests/support`), one file for both.
#[path = "../../validator/tests/support/mod.rs"]
pub mod gate;

/// The metro gateway in this process: the broker on loopback `mqtt_port` as user `gateway`,
/// the charging server at `charging_base` on the token `tg_gw`, its store under `dir/gateway`,
/// the gateway key of `keys`. Its counters.
pub fn spawn_metro_gateway(
    mqtt_port: u16,
    charging_base: &str,
    dir: &std::path::Path,
    keys: &purse::keys::KeySet,
) -> std::sync::Arc<gateway::daemon::GatewayStats> {
    tapgate_testkit::broker::spawn_gateway(
        gateway::daemon::GatewayConfig {
            broker: ("127.0.0.1".into(), mqtt_port),
            mqtt_credentials: Some(("gateway".into(), "gw-secret".into())),
            charging: Some((charging_base.into(), "tg_gw".into())),
            operator: "metro".into(),
            ..gateway::daemon::GatewayConfig::default()
        },
        &gateway::store::Store::open(&dir.join("gateway"), 64 << 20).unwrap(),
        &keys.for_role(purse::keys::Role::Gateway, 0).unwrap(),
    )
}
