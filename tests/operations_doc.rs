//! docs/operations.md, "Standing it up by hand", run as written: its `sh` blocks, in order, in
//! one bash (`set -euo pipefail`), with this build's binary, free ports and a temporary
//! directory. Whatever the page says must work, or this fails.

mod support;

use std::process::Command;
use support::free_port;

/// The `sh` blocks of the section that starts with `heading`, up to the next `## `.
fn shell_blocks(doc: &str, heading: &str) -> Vec<String> {
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("{heading:?} not in the page"));
    let section = &doc[start + heading.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(i) = rest.find("```sh\n") {
        let body = &rest[i + 6..];
        let end = body.find("\n```").expect("a closed block");
        blocks.push(body[..end].to_string());
        rest = &body[end + 4..];
    }
    blocks
}

#[test]
fn the_operations_page_stands_the_system_up() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("the page needs curl (./test.sh installs it)");
    }
    let repo = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{repo}/docs/operations.md")).unwrap();
    let blocks = shell_blocks(&doc, "## Standing it up by hand");
    assert!(blocks.len() >= 8, "{blocks:?}");
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("ops");
    // The binary is this build's: the page's `cargo build` is not run again. Daemons the page
    // starts are stopped whatever happens.
    let script = format!(
        "set -euo pipefail\ncargo() {{ echo \"(cargo $* skipped: T is this test's binary)\"; }}\ntrap 'kill $(cat \"$W\"/*.pid 2>/dev/null) 2>/dev/null || true' EXIT\n{}\n",
        blocks.join("\n")
    );
    std::fs::write(d.path().join("page.sh"), &script).unwrap();
    let o = Command::new("bash")
        .arg(d.path().join("page.sh"))
        .current_dir(repo)
        .env("REPO", repo)
        .env("T", env!("CARGO_BIN_EXE_tapgate"))
        .env("W", &work)
        .env("CHARGING_PORT", free_port().to_string())
        .env("GATEWAY_API_PORT", free_port().to_string())
        .env("MQTT_PORT", free_port().to_string())
        .env_remove("TAPGATE_LOG")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let logs = ["charging.log", "gateway.log"]
        .iter()
        .map(|f| {
            format!(
                "--- {f}\n{}",
                std::fs::read_to_string(work.join(f)).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let all = format!("{out}\n--- stderr\n{err}\n{logs}");
    assert!(o.status.success(), "the page's commands failed:\n{all}");
    // What the page says each step shows.
    assert!(err.contains("connected to the MQTT broker"), "{all}");
    assert!(out.contains("outbox: 0 taps not yet confirmed"), "{all}");
    // The validator's summary: fares in the table's currency, times in ms.
    assert!(
        out.lines()
            .any(|l| l.starts_with("validator 1001: 20 taps:") && l.contains(" KRW)")),
        "{all}"
    );
    assert!(out.contains("tap time median "), "{all}");
    assert!(out.contains("load completed: amount_minor=2000"), "{all}");
    assert!(out.contains("\"action\":\"block\""), "{all}");
    // The TIDES export: the header, then rows with the GTFS stop and route ids in KRW.
    assert!(out.contains("token_id,balance,route_id"), "{all}");
    assert!(
        out.lines()
            .any(|l| l.contains(",1400,KRW,Enter,1001,Central,") && l.ends_with(",M1")),
        "{all}"
    );
    // Cards that tapped before their registration were learned, not booked below zero.
    assert!(out.contains("{\"anomalies\":[],\"last_seq\":0}"), "{all}");
    assert!(
        out.lines().any(|l| l
            .strip_prefix("tapgate_charging_clearing_cards_learned_total ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0)),
        "some cards tapped before step 10 registered them: {all}"
    );
    // The charging server's /metrics counts clearing.
    assert!(
        out.lines().any(|l| l
            .strip_prefix("tapgate_charging_clearing_taps_booked_total ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0)),
        "{all}"
    );
    assert!(
        out.contains("tapgate_charging_clearing_anomalies_total{kind=\"clone\"} 0"),
        "{all}"
    );
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("reconciled 20 cards") && last.ends_with("20 balanced, 0 differences"),
        "{all}"
    );
}
