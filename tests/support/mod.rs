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
