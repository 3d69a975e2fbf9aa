//! `tapgate card issue --rider-category` writes the holder's rider category into the card's
//! profile file; `tapgate card show` prints it, and a debit keeps it.

use std::process::{Command, Output};

fn tapgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", "category-pass")
        .output()
        .expect("run tapgate")
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn category_line(show: &str) -> &str {
    show.lines()
        .find(|l| l.starts_with("rider_category"))
        .expect("a rider_category line")
}

#[test]
fn card_issue_writes_the_rider_category_and_card_show_prints_it() {
    let d = tempfile::tempdir().unwrap();
    let keys = d.path().join("keys");
    let (child, plain) = (d.path().join("child.json"), d.path().join("plain.json"));
    let k = keys.to_str().unwrap();
    ok(tapgate(&["keys", "init", "--out", k]));
    let issued = ok(tapgate(&[
        "card",
        "issue",
        "--keys",
        k,
        "--uid",
        "04A1B2C3D4E5F6",
        "--balance",
        "2000",
        "--rider-category",
        "child",
        "--out",
        child.to_str().unwrap(),
    ]));
    assert!(issued.contains(" rider_category=child "), "{issued}");
    let show = ok(tapgate(&["card", "show", child.to_str().unwrap()]));
    assert_eq!(category_line(&show), "rider_category  child");
    // The category survives a transaction (the validator side reads it under MAC: purse and
    // validator tests).
    ok(tapgate(&[
        "card",
        "debit",
        "--keys",
        k,
        "--card",
        child.to_str().unwrap(),
        "--amount",
        "100",
    ]));
    let show = ok(tapgate(&["card", "show", child.to_str().unwrap()]));
    assert_eq!(category_line(&show), "rider_category  child");
    assert!(show.contains("balance_minor   1900"), "{show}");

    // Without the flag: none, the table's default.
    let issued = ok(tapgate(&[
        "card",
        "issue",
        "--keys",
        k,
        "--uid",
        "04A1B2C3D4E5F7",
        "--balance",
        "2000",
        "--out",
        plain.to_str().unwrap(),
    ]));
    assert!(!issued.contains("rider_category"), "{issued}");
    let show = ok(tapgate(&["card", "show", plain.to_str().unwrap()]));
    assert_eq!(
        category_line(&show),
        "rider_category  none (the fare table's default)"
    );

    // An id the profile file cannot hold is an input error (exit 2), and no card is written.
    let bad = d.path().join("bad.json");
    for id in ["young adult", &"x".repeat(31)] {
        let o = tapgate(&[
            "card",
            "issue",
            "--keys",
            k,
            "--uid",
            "04A1B2C3D4E5F8",
            "--balance",
            "0",
            "--rider-category",
            id,
            "--out",
            bad.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{id:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("--rider-category"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!bad.exists());
    }
}
