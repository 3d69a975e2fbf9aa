//! `tapgate demo --json`: the summary's contract fields, and conservation under heavy tearing,
//! with loads over HTTP through the real charging server, and taps over MQTT through the embedded
//! broker and the gateway (restarted mid-day) to clearing; the hotel's pay-TV box through the
//! hotel's own gateway; the rail ticket office's online payments and refunds.

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
    assert_eq!(v["value_conserved"], true, "{v}");
    assert_eq!(v["taps_lost"], 0);
    assert_eq!(v["taps_duplicated"], 0);
    assert_eq!(v["loads_paid_twice"], 0);
    assert_eq!(v["reconcile_differences"], 0);
    assert_eq!(v["clearing_anomalies"], 0);
    assert!(v["taps_accepted"].as_u64().unwrap() > 1000);
    assert!(v["taps_torn"].as_u64().unwrap() > 0, "tears were injected");
    assert!(v["debits_settled_committed"].as_u64().unwrap() > 0);
    assert!(v["debits_settled_not_committed"].as_u64().unwrap() > 0);
    assert!(
        v["loads_torn"].as_u64().unwrap() > 0,
        "loads were torn too: {v}"
    );
    assert!(v["taps_cleared"].as_u64().unwrap() >= v["taps_accepted"].as_u64().unwrap());
    assert_eq!(v["gateway_restarts"], 1);
    assert_eq!(v["lost_card_blocked"], true);
    assert!(
        v["block_propagation_ms_p99"].as_u64().unwrap() > 0,
        "measured: {v}"
    );
    // The hotel's pay-TV box sold through its own gateway; each operator's revenue as the
    // ledger booked it equals what its validators collected.
    assert!(v["tv_sales_accepted"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["revenue_agrees"], true, "{v}");
    let by_op = &v["revenue_minor_by_operator"];
    assert!(by_op["hotel"].as_i64().unwrap() > 0, "{v}");
    assert!(by_op["metro"].as_i64().unwrap() > 0, "{v}");
    // Revenue by currency, never one sum of KRW and USD.
    assert_eq!(v["currency_by_operator"]["metro"]["currency"], "KRW", "{v}");
    assert_eq!(v["currency_by_operator"]["hotel"]["currency"], "USD", "{v}");
    assert_eq!(v["revenue_minor_by_currency"]["KRW"], by_op["metro"], "{v}");
    assert_eq!(v["revenue_minor_by_currency"]["USD"], by_op["hotel"], "{v}");
    assert!(
        v.get("revenue_minor").is_none(),
        "no cross-currency sum: {v}"
    );
    // The counts agree: what went to clearing is the accepted taps, the reported refusals and
    // the free check-in taps; the devices are the metro's validators and the hotel's box.
    assert_eq!(
        v["taps_cleared"].as_u64().unwrap(),
        v["taps_accepted"].as_u64().unwrap()
            + v["refusals_reported"].as_u64().unwrap()
            + v["check_in_taps"].as_u64().unwrap(),
        "{v}"
    );
    assert!(v["refusals_reported"].as_u64().unwrap() <= v["taps_refused"].as_u64().unwrap());
    assert_eq!(v["devices"], 5, "{v}");
    for source in ["card", "mileage", "voucher"] {
        assert!(
            v["loads_by_source"][source].as_u64().unwrap_or(0) > 0,
            "{source}: {v}"
        );
    }
    // The rail ticket office: tickets paid from the cards through the relay, torn payments
    // settled once at the card's next contact, refunds (whole and partial) collected by the
    // cards that paid; the merchant's account is what it was paid less what it refunded.
    let shop = &v["payments_by_merchant"]["rail-tickets"];
    let n = |f: &str| shop[f].as_u64().unwrap_or_else(|| panic!("{f}: {v}"));
    let minor = |f: &str| shop[f].as_i64().unwrap_or_else(|| panic!("{f}: {v}"));
    assert_eq!(shop["currency"], "KRW", "{v}");
    assert!(n("payments_completed") > 20, "{v}");
    assert_eq!(v["payments_completed"], shop["payments_completed"], "{v}");
    assert!(n("payments_torn") > 0, "payments were torn: {v}");
    assert_eq!(
        n("payments_torn"),
        n("payments_torn_paid_before")
            + n("payments_torn_paid_on_retry")
            + n("payments_torn_refused_on_retry"),
        "every torn payment settled once: {v}"
    );
    assert!(n("payments_torn_paid_before") > 0, "{v}");
    assert!(n("payments_torn_paid_on_retry") > 0, "{v}");
    assert_eq!(v["payments_paid_twice"], 0, "{v}");
    assert!(n("refunds_whole") > 0 && n("refunds_partial") > 0, "{v}");
    assert_eq!(n("refunds"), n("refunds_whole") + n("refunds_partial"));
    assert_eq!(n("refunds_collected"), n("refunds"), "all collected: {v}");
    assert_eq!(minor("refunds_collected_minor"), minor("refunded_minor"));
    assert!(n("refund_collections_torn") > 0, "{v}");
    assert_eq!(v["refunds_pending_minor"], 0, "{v}");
    assert_eq!(v["refunds_credited_twice"], 0, "{v}");
    assert_eq!(
        minor("booked_minor"),
        minor("paid_minor") - minor("refunded_minor"),
        "{v}"
    );
    assert!(minor("refunded_minor") > 0 && minor("refunded_minor") < minor("paid_minor"));
    assert_eq!(v["payments_agree"], true, "{v}");
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
