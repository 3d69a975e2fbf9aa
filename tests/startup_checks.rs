//! Configuration mistakes an integrator makes on the first day, caught at start with the setting
//! to fix (exit 2), and what the validator and the gateway log about a refused MQTT login.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use support::{embedded_gateway_args, free_port, keys_and_fare_table, wait_for_port, Kill};

const PASS: &str = "startup-checks";

fn tapgate(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .current_dir(dir)
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env_remove("TAPGATE_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run tapgate")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn validator_toml(stop: &str, keys: &str, journal: &str, extra: &str) -> String {
    format!(
        "device_id = 1001\noperator = \"metro\"\nstop = \"{stop}\"\nroute = \"M1\"\nkind = \"in\"\njournal = \"{journal}\"\nkeys = \"{keys}\"\nfare_table = \"metro.tgft\"\ndrain_timeout_s = 2\n{extra}\n[crowd]\ncards = 3\ndir = \"cards\"\n"
    )
}

/// Writes `toml` to v.toml in `dir` and runs `tapgate validator --config v.toml --crowd-taps
/// <taps>` there with `env`.
fn validator(dir: &Path, toml: &str, taps: &str, env: &[(&str, &str)]) -> Output {
    std::fs::write(dir.join("v.toml"), toml).unwrap();
    tapgate(
        dir,
        &["validator", "--config", "v.toml", "--crowd-taps", taps],
        env,
    )
}

/// The command stopped at start (exit 2) saying `says`.
fn refused_at_start(o: &Output, says: &str) {
    assert_eq!(o.status.code(), Some(2), "{}", stderr(o));
    assert!(stderr(o).contains(says), "{says}: {}", stderr(o));
}

#[test]
fn config_mistakes_name_the_setting_to_fix() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");
    std::fs::write(dir.join("a-file"), "not a directory").unwrap();
    std::fs::write(dir.join("mqtt-users"), "1001 v-secret metro\n").unwrap();
    // The validator at `stop` with `keys` and `journal` (two crowd taps); the gateway with
    // `args` after `tapgate gateway`.
    let start_validator =
        |stop, keys, journal| validator(dir, &validator_toml(stop, keys, journal, ""), "2", &[]);
    let start_gateway = |args: &[&str]| {
        let args: Vec<&str> = ["gateway"].iter().chain(args).copied().collect();
        tapgate(dir, &args, &[("TAPGATE_MQTT_PASSWORD", "gw-secret")])
    };

    // A stop the route does not serve: every tap would be refused as a fare error.
    let o = start_validator("Depot", "keys", "journal");
    refused_at_start(&o, "stop \"Depot\" is not on route \"M1\"");
    assert!(
        stderr(&o).contains("Central, Market"),
        "the route's stops: {}",
        stderr(&o)
    );

    // No key set where the config points.
    let o = start_validator("Central", "no-keys", "journal");
    refused_at_start(&o, "run `tapgate keys init --out no-keys`");
    let o = start_gateway(&["--keys", "no-keys", "--data", "gw"]);
    refused_at_start(&o, "tapgate keys init");

    // Fare tables in two currencies for the gateway's reports, and no currency set.
    std::fs::write(
        dir.join("mixed.toml"),
        format!(
            "fare_tables = [\"metro.tgft\", {:?}]\n",
            format!(
                "{}/fare-rules/samples/hotel/rules.toml",
                env!("CARGO_MANIFEST_DIR")
            )
        ),
    )
    .unwrap();
    let o = start_gateway(&[
        "--keys",
        "keys",
        "--data",
        "gw-ok",
        "--mqtt-users",
        "mqtt-users",
        "--embedded-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--config",
        "mixed.toml",
    ]);
    refused_at_start(&o, "fare_tables are in KRW and USD: set currency");

    // Directories that cannot be created: the setting, the user, the OS error once.
    let once = |o: &Output, setting: &str| {
        refused_at_start(o, setting);
        let e = stderr(o);
        assert!(
            e.contains("cannot create the directory") && e.contains("as user"),
            "{e}"
        );
        assert_eq!(
            e.matches("Not a directory").count(),
            1,
            "the OS error once: {e}"
        );
    };
    let o = start_validator("Central", "keys", "a-file/journal");
    once(&o, "journal in v.toml / --journal");
    let o = start_gateway(&[
        "--keys",
        "keys",
        "--data",
        "a-file/gw",
        "--mqtt-users",
        "mqtt-users",
    ]);
    once(&o, "--data");
    std::fs::write(
        dir.join("charging.toml"),
        "listen = \"127.0.0.1:0\"\ndata_dir = \"a-file/charging\"\noperator = \"metro\"\n",
    )
    .unwrap();
    let o = tapgate(
        dir,
        &["charging", "--config", "charging.toml", "--keys", "keys"],
        &[],
    );
    once(&o, "data_dir in charging.toml / --data");
}

#[test]
fn a_refused_login_is_logged_once_by_each_side() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");
    std::fs::write(dir.join("mqtt-users"), "1001 v-secret metro\n").unwrap();
    let port = free_port();
    let gateway = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .current_dir(dir)
        .args(embedded_gateway_args("mqtt-users", port))
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("TAPGATE_MQTT_PASSWORD", "gw-secret")
        .env_remove("TAPGATE_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut gateway = Kill(gateway);
    wait_for_port(port, "the embedded broker");
    let mqtt =
        format!("[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\npassword_env = \"V1001_PASSWORD\"");
    let v_toml = validator_toml("Central", "keys", "journal", &mqtt);

    // A wrong password: the validator keeps retrying (every 0.5 s) until its drain gives up.
    let o = validator(dir, &v_toml, "3", &[("V1001_PASSWORD", "wrong")]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert_eq!(
        e.matches("authentication refused: check [mqtt] password_env")
            .count(),
        1,
        "said once, not at every retry: {e}"
    );
    assert!(
        e.contains("taps are not confirmed") && e.contains("never delete it"),
        "{e}"
    );

    // The right one: it says it connected, everything is confirmed, it leaves cleanly.
    let o = validator(dir, &v_toml, "1", &[("V1001_PASSWORD", "v-secret")]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("connected to the MQTT broker"), "{e}");
    assert!(!e.contains("not confirmed"), "{e}");

    // The gateway: one line for the refused login, no ERROR for a client that left cleanly.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = gateway.0.kill();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut gateway.0.stderr.take().unwrap(), &mut log).unwrap();
    assert_eq!(
        log.matches("MQTT login refused").count(),
        1,
        "once per user per minute: {log}"
    );
    assert!(!log.contains("ERROR"), "{log}");
}

/// A table that cannot price any tap at this gate (here a GTFS feed whose routes list no stops,
/// so the start-up check cannot tell): the validator says so at exit.
#[test]
fn a_gate_the_table_cannot_price_is_said_at_exit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");
    let feed = format!(
        "{}/fare-rules/tests/gtfs-feeds/timeframes",
        env!("CARGO_MANIFEST_DIR")
    );
    let o = tapgate(
        dir,
        &[
            "fare", "compile", &feed, "--keys", "keys", "--out", "tf.tgft",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = validator(
        dir,
        &validator_toml("capitol", "keys", "journal", "")
            .replace(
                "route = \"M1\"\nkind = \"in\"",
                "route = \"red\"\nkind = \"entry\"",
            )
            .replace("metro.tgft", "tf.tgft"),
        "3",
        &[],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("warning: all 3 priced taps were refused as fare_error")
            && e.contains("check stop, route and kind in v.toml"),
        "{e}"
    );
}
