//! `tapgate demo --json`: the summary's contract fields, and conservation under heavy tearing.

use std::process::Command;

#[test]
fn demo_json_summary_holds_conservation_under_tears() {
    let out = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args([
            "demo",
            "--json",
            "--taps",
            "3000",
            "--cards",
            "60",
            "--validators",
            "4",
            "--seed",
            "11",
            "--tear-per-mille",
            "150",
        ])
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a last line");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON on the last line");
    assert_eq!(v["value_conserved"], true);
    assert_eq!(v["taps_lost"], 0);
    assert_eq!(v["taps_duplicated"], 0);
    assert_eq!(v["loads_paid_twice"], 0);
    assert_eq!(v["transaction_macs_refused"], 0);
    assert!(v["taps_accepted"].as_u64().unwrap() > 1000);
    assert!(v["taps_torn"].as_u64().unwrap() > 0, "tears were injected");
    assert!(v["tears_settled_committed"].as_u64().unwrap() > 0);
    assert!(v["tears_settled_not_committed"].as_u64().unwrap() > 0);
    for field in [
        "taps_refused",
        "loads_completed",
        "loads_voided",
        "tap_latency_us_p50",
        "tap_latency_us_p99",
    ] {
        assert!(v.get(field).is_some(), "missing {field}");
    }
}
