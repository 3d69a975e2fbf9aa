//! The reader choice of `tapgate charge` and `tapgate validator`: bad choices are clear input
//! errors (exit 2), and a build without the `pcsc` feature says how to get PC/SC.

use std::process::{Command, Output};

fn tapgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(args)
        .env("TAPGATE_TOKEN", "tg_unused")
        .env("TAPGATE_KEY_PASSPHRASE", "unused")
        .output()
        .unwrap()
}

fn charge(extra: &[&str]) -> Output {
    let mut args = vec![
        "charge",
        "--server",
        "http://127.0.0.1:9",
        "--amount",
        "100",
        "--funding",
        "card:tok_visa",
    ];
    args.extend_from_slice(extra);
    tapgate(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn charge_reader_choices_are_checked() {
    let o = charge(&["--reader", "usb"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("pcsc:NAME"), "{}", stderr(&o));

    let o = charge(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("which card?"), "{}", stderr(&o));

    let o = charge(&["--card", "card.json"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--card needs --keys: {}",
        stderr(&o)
    );

    let o = charge(&["--reader", "pcsc", "--card", "card.json", "--keys", "k"]);
    assert_eq!(o.status.code(), Some(2), "one card source: {}", stderr(&o));
}

#[test]
fn validator_reader_in_the_config_is_checked() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("v.toml");
    std::fs::write(
        &cfg,
        "device_id = 1\noperator = \"o\"\nstop = \"s\"\nroute = \"r\"\njournal = \"j\"\nkeys = \"k\"\nreader = \"usb\"\n",
    )
    .unwrap();
    let o = tapgate(&["validator", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("must be \"crowd\" or \"pcsc\""),
        "{}",
        stderr(&o)
    );
    // The flag wins over the config, and is checked the same way.
    let o = tapgate(&[
        "validator",
        "--config",
        cfg.to_str().unwrap(),
        "--reader",
        "serial",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("pcsc:NAME"), "{}", stderr(&o));
}

#[cfg(not(feature = "pcsc"))]
#[test]
fn without_the_feature_pcsc_is_refused_with_the_way_to_get_it() {
    let o = charge(&["--reader", "pcsc:ACR"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("built without PC/SC support")
            && stderr(&o).contains("--features tapgate/pcsc"),
        "{}",
        stderr(&o)
    );
}
