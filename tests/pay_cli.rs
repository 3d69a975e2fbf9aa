//! `tapgate pay`: the cardholder's client pays a merchant's online payment from an emulated card
//! image through the charging daemon; the same key never pays twice, another key is refused
//! once the payment is paid, and the merchant reads the outcome.

mod support;

use std::process::{Command, Output};
use tapgate_testkit::http;

const PASS: &str = "pay-cli-pass";
const CARDHOLDER: &str = "tg_cardholder_pay_cli";
const OPERATOR: &str = "tg_operator_pay_cli";
const MERCHANT: &str = "tg_merchant_pay_cli";

/// The standard output of a command that must have succeeded (its output in the message if not).
fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn tapgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("TAPGATE_TOKEN", CARDHOLDER)
        .output()
        .unwrap()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds (the civil date from the day count, as in
/// H. Hinnant's `civil_from_days`).
fn rfc3339_utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[test]
fn tapgate_pay_pays_a_merchants_payment_from_a_card() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = d.join("keys");
    assert!(tapgate(&["keys", "init", "--out", keys.to_str().unwrap()])
        .status
        .success());
    std::fs::write(
        d.join("charging.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nledger_map_size_bytes = 67108864\n{}",
            d.join("data").to_str().unwrap(),
            support::tokens_toml(&[
                ("alice", "cardholder", CARDHOLDER),
                ("ops", "operator", OPERATOR),
                ("rail-shop", "merchant", MERCHANT),
            ])
        ),
    )
    .unwrap();
    let server = support::start_charging(&d.join("charging.toml"), &keys, PASS);
    let base = server.base.clone();
    let card = d.join("card.json");
    let uid = "04B1B2B3B4B5B6";
    assert!(tapgate(&[
        "card",
        "issue",
        "--keys",
        keys.to_str().unwrap(),
        "--uid",
        uid,
        "--balance",
        "2000",
        "--out",
        card.to_str().unwrap(),
    ])
    .status
    .success());
    let (code, body) = http::post(
        &format!("{base}/v1/cards"),
        OPERATOR,
        serde_json::json!({"card_uid": uid, "personalised_minor": 2000, "owner": "alice"}),
    );
    assert_eq!(code, 201, "{body}");
    let expires = rfc3339_utc(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3_600,
    );
    let (code, payment) = http::post(
        &format!("{base}/v1/merchant/payments"),
        MERCHANT,
        serde_json::json!({
            "amount_minor": 700, "currency": "KRW", "order_id": "T-1001",
            "description": "Lyon → Paris, 2nd class", "expires": expires,
        }),
    );
    assert_eq!(code, 201, "{payment}");
    let id = payment["id"].as_str().unwrap().to_string();

    let pay = |key: &str| {
        tapgate(&[
            "pay",
            "--server",
            &base,
            "--payment",
            &id,
            "--card",
            card.to_str().unwrap(),
            "--keys",
            keys.to_str().unwrap(),
            "--idempotency-key",
            key,
        ])
    };
    let stdout = succeeded(&pay("p1"));
    assert!(
        stdout.contains("paying 700 KRW to rail-shop: Lyon → Paris, 2nd class"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "payment completed: payment={id} amount_minor=700 balance_minor=1300 tmc=1"
        )),
        "{stdout}"
    );
    // The same key: the same answer, nothing paid twice; another key: refused, it is paid.
    let out = pay("p1");
    assert!(String::from_utf8_lossy(&out.stdout).contains("balance_minor=1300"));
    let out = pay("p2");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("it is paid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tapgate(&["card", "show", card.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("balance_minor   1300"));
    let (code, p) = http::get(&format!("{base}/v1/merchant/payments/{id}"), MERCHANT);
    assert_eq!((code, p["state"].as_str()), (200, Some("completed")), "{p}");
    // The merchant refunds part of it; `tapgate pay --refund` collects it onto the card.
    let (code, refund) = http::post_with_key(
        &format!("{base}/v1/merchant/payments/{id}/refunds"),
        MERCHANT,
        "refund-1",
        serde_json::json!({"amount_minor": 300}),
    );
    assert_eq!(code, 201, "{refund}");
    let refund = refund["id"].as_str().unwrap().to_string();
    let stdout = succeeded(&tapgate(&[
        "pay",
        "--server",
        &base,
        "--refund",
        &refund,
        "--card",
        card.to_str().unwrap(),
        "--keys",
        keys.to_str().unwrap(),
    ]));
    assert!(
        stdout.contains(&format!(
            "refund completed: refund={refund} amount_minor=300 balance_minor=1600 tmc=2"
        )),
        "{stdout}"
    );
    // A PIN above 500: read from a file (never from the command line), or from the variable
    // --pin-env names; without it the payment is refused before the card is touched.
    let (code, body) = http::post(
        &format!("{base}/v1/cards/{uid}/payment-pin"),
        CARDHOLDER,
        serde_json::json!({"pin": "2468", "above_minor": 500}),
    );
    assert_eq!(code, 204, "{body}");
    let make = |order: &str| {
        let (code, p) = http::post(
            &format!("{base}/v1/merchant/payments"),
            MERCHANT,
            serde_json::json!({"amount_minor": 600, "currency": "KRW", "order_id": order,
                               "expires": expires}),
        );
        assert_eq!(code, 201, "{p}");
        p["id"].as_str().unwrap().to_string()
    };
    let (guarded, by_env) = (make("T-1002"), make("T-1003"));
    let pay_pin = |id: &str, extra: &[&str], env: Option<(&str, &str)>| {
        let mut args = vec![
            "pay",
            "--server",
            &base,
            "--payment",
            id,
            "--card",
            card.to_str().unwrap(),
            "--keys",
            keys.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tapgate"));
        cmd.args(&args)
            .env("TAPGATE_KEY_PASSPHRASE", PASS)
            .env("TAPGATE_TOKEN", CARDHOLDER)
            .env_remove("TAPGATE_PAYMENT_PIN");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = pay_pin(&guarded, &[], None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pin_required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pin_file = d.join("pin.txt");
    tapgate_secrets::write_file(&pin_file, "2468").unwrap();
    let stdout = succeeded(&pay_pin(
        &guarded,
        &["--pin-file", pin_file.to_str().unwrap()],
        None,
    ));
    assert!(stdout.contains("balance_minor=1000"), "{stdout}");
    let stdout = succeeded(&pay_pin(
        &by_env,
        &["--pin-env", "MY_CARD_PIN"],
        Some(("MY_CARD_PIN", "2468")),
    ));
    assert!(stdout.contains("balance_minor=400"), "{stdout}");
    // Not a payment id: a usage error before anything is sent.
    let out = tapgate(&[
        "pay",
        "--server",
        &base,
        "--payment",
        "nonsense",
        "--card",
        "x",
        "--keys",
        "y",
    ]);
    assert_eq!(out.status.code(), Some(2));
}
