//! `tapgate fare …` on the real binary: the commands, output lines and exit codes planners and
//! integrators script against.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tapgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", "fare-cli-test")
        .output()
        .expect("run tapgate")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sample(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fare-rules/samples")
        .join(p)
        .display()
        .to_string()
}

fn feed(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fare-rules/tests/gtfs-feeds")
        .join(p)
        .display()
        .to_string()
}

fn last_json(o: &Output) -> serde_json::Value {
    let s = out(o);
    let line = s.lines().last().expect("a last line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn quote_prints_one_json_object_on_the_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("journey.json");
    std::fs::write(
        &j,
        r#"{"rider_category_id": "adult", "fare_media_id": "citycard", "legs": [
            {"route_id": "line1", "from_stop_id": "union", "to_stop_id": "king",
             "departure": "2025-03-04T08:05:00", "arrival": "2025-03-04T08:30:00"}]}"#,
    )
    .unwrap();
    let o = tapgate(&[
        "fare",
        "quote",
        "--gtfs",
        &feed("riders"),
        "--journey",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let v = last_json(&o);
    assert_eq!(v["total_minor"], 330);
    assert_eq!(v["currency"], "CAD");
    assert_eq!(v["legs"].as_array().unwrap().len(), 1);
    assert_eq!(v["legs"][0]["fare_product_id"], "single");
    // `fare explain --journey` prints amounts as `fare test` and `fare explain --case` do, in
    // minor units, and the total in the currency too.
    let o = tapgate(&[
        "fare",
        "explain",
        &feed("riders"),
        "--journey",
        j.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("fare 330; adds 330"), "{}", out(&o));
    assert!(
        out(&o).lines().last().unwrap() == "total 330 (3.30 CAD)",
        "{}",
        out(&o)
    );

    // A journey no rule prices: the error names the leg and why; exit 1.
    std::fs::write(
        &j,
        r#"{"legs": [{"route_id": "red", "from_stop_id": "capitol", "to_stop_id": "gallery",
             "departure": "2026-01-06T08:00:00", "arrival": "2026-01-06T08:20:00"}]}"#,
    )
    .unwrap();
    let o = tapgate(&[
        "fare",
        "quote",
        "--gtfs",
        &feed("timeframes"),
        "--journey",
        j.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("leg 1 (route red, capitol → gallery"),
        "{}",
        err(&o)
    );

    // Malformed JSON: an input error, exit 2.
    std::fs::write(&j, "{\"legs\": [").unwrap();
    let o = tapgate(&[
        "fare",
        "quote",
        "--gtfs",
        &feed("riders"),
        "--journey",
        j.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
}

#[test]
fn check_and_test_pass_on_the_samples_and_fail_clearly_otherwise() {
    let o = tapgate(&["fare", "check", &sample("metro-city/rules.toml")]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    assert!(out(&o).contains("0 error(s)"), "{}", out(&o));

    let o = tapgate(&[
        "fare",
        "test",
        &sample("metro-city/rules.toml"),
        &sample("metro-city/cases.toml"),
    ]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o)
            .lines()
            .last()
            .unwrap()
            .starts_with("fare test: 19 passed, 0 failed"),
        "{}",
        out(&o)
    );

    // The 2027 rules fail the golden cases (moved into 2027): expected and actual are printed.
    let dir = tempfile::tempdir().unwrap();
    let cases27 = dir.path().join("cases-2027.toml");
    let moved = std::fs::read_to_string(sample("metro-city/cases.toml"))
        .unwrap()
        .replace("2026-12-01", "2027-01-05")
        .replace("2026-12-02", "2027-01-06");
    std::fs::write(&cases27, moved).unwrap();
    let o = tapgate(&[
        "fare",
        "test",
        &sample("metro-city/rules-2027.toml"),
        cases27.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let s = out(&o);
    assert!(s.contains("FAIL metro ride of 12 km"), "{s}");
    assert!(s.contains("expected fares: [1400, 100]"), "{s}");
    assert!(s.contains("actual fares:   [1550, 100]"), "{s}");

    // A bad rules file: file, line and field, and a suggestion.
    let bad = dir.path().join("bad.toml");
    let src = std::fs::read_to_string(sample("metro-city/rules.toml"))
        .unwrap()
        .replace("within = \"30m\"", "within = \"30\"");
    std::fs::write(&bad, src).unwrap();
    let o = tapgate(&["fare", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("line "), "{}", err(&o));
    assert!(
        err(&o).contains("\"30\" needs a unit, e.g. \"30m\""),
        "{}",
        err(&o)
    );
}

#[test]
fn compile_signs_a_table_that_tests_and_inspects_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let o = tapgate(&["keys", "init", "--out", keys.to_str().unwrap()]);
    assert!(o.status.success(), "{}", err(&o));
    let table: PathBuf = dir.path().join("metro.tgft");
    let o = tapgate(&[
        "fare",
        "compile",
        &sample("metro-city/rules.toml"),
        "--keys",
        keys.to_str().unwrap(),
        "--out",
        table.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("version 1"), "{}", out(&o));
    let pubkey = std::fs::read_to_string(keys.join("signing.pub")).unwrap();
    let o = tapgate(&[
        "fare",
        "inspect",
        table.to_str().unwrap(),
        "--pubkey",
        pubkey.trim(),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("signature: verified"), "{}", out(&o));
    let o = tapgate(&[
        "fare",
        "test",
        table.to_str().unwrap(),
        &sample("metro-city/cases.toml"),
    ]);
    assert!(o.status.success(), "{}", out(&o));

    // A flipped byte: refused under the key.
    let mut b = std::fs::read(&table).unwrap();
    let n = b.len() / 2;
    b[n] ^= 0x40;
    std::fs::write(&table, b).unwrap();
    let o = tapgate(&[
        "fare",
        "inspect",
        table.to_str().unwrap(),
        "--pubkey",
        pubkey.trim(),
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn simulate_reports_revenue_and_rider_category_impact() {
    let o = tapgate(&[
        "fare",
        "simulate",
        "--rules",
        &sample("metro-city/rules-2027.toml"),
        "--baseline",
        &sample("metro-city/rules.toml"),
        "--taps",
        &sample("metro-city/taps.csv"),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let v = last_json(&o);
    assert_eq!(v["taps"], 10);
    assert_eq!(v["cards"], 4);
    assert_eq!(v["total"]["baseline_minor"], 4800);
    assert_eq!(v["total"]["new_minor"], 4950);
    assert_eq!(v["by_rider_category"]["youth"]["change_minor"], 100);
    assert_eq!(v["by_rider_category"]["child"]["change_minor"], 0);
    assert_eq!(v["by_rider_category"]["adult"]["change_minor"], 50);
}

#[test]
fn explain_shows_rules_transfers_and_caps() {
    let o = tapgate(&[
        "fare",
        "explain",
        &sample("metro-city/rules.toml"),
        &sample("metro-city/cases.toml"),
        "--case",
        "adult daily cap: 8000 a service day",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let s = out(&o);
    assert!(
        s.contains("daily cap daily of 8000 reduced 1400 to 800"),
        "{s}"
    );
    let o = tapgate(&[
        "fare",
        "explain",
        &sample("metro-city/rules.toml"),
        &sample("metro-city/cases.toml"),
        "--case",
        "metro then bus within 30 minutes: the journey's 21 km priced once at the higher base",
    ]);
    assert!(
        out(&o).contains("journey distance priced once"),
        "{}",
        out(&o)
    );
}
