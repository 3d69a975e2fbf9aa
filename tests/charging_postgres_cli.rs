//! `tapgate charging` with `[ledger] kind = "postgres"` from the command line: `migrate` applies
//! the schema once (running it again changes nothing), an unknown ledger kind or a half-given
//! `[ledger]` table is a config error (exit 2), the server refuses a database it has not
//! migrated, and the password never shows.

use std::process::Command;
use tapgate_testkit::postgres::TestDb;

fn tapgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tapgate"))
}

fn config(dir: &std::path::Path, ledger: &str) -> std::path::PathBuf {
    let path = dir.join("charging.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n[ledger]\n{ledger}\n",
            dir.join("data")
        ),
    )
    .unwrap();
    path
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn migrate_applies_the_schema_once_and_the_server_checks_it() {
    let db = TestDb::start();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pg-password");
    tapgate_secrets::write_file(&pw, db.password()).unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "kind = \"postgres\"\nurl = {:?}\npassword_file = {:?}",
            db.url, pw
        ),
    );
    // Before migrate, the server refuses the empty database and says what to do.
    let keys = dir.path().join("keys");
    let (code, _, err) = run(tapgate()
        .args(["keys", "init", "--out"])
        .arg(&keys)
        .env("TAPGATE_KEY_PASSPHRASE", "correct horse battery"));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(tapgate()
        .args(["charging", "--config"])
        .arg(&cfg)
        .arg("--keys")
        .arg(&keys)
        .env("TAPGATE_KEY_PASSPHRASE", "correct horse battery"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("schema version 0") && err.contains("tapgate charging migrate"),
        "{err}"
    );
    assert!(!err.contains(db.password()), "{err}");

    let (code, out, err) = run(tapgate()
        .args(["charging", "migrate", "--config"])
        .arg(&cfg));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied migration 0001_ledger"), "{out}");
    assert!(
        out.contains("applied migration 0002_finance_views"),
        "{out}"
    );
    assert!(
        out.contains("applied migration 0003_card_counters"),
        "{out}"
    );
    let (code, out, err) = run(tapgate()
        .args(["charging", "migrate", "--config"])
        .arg(&cfg));
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("applied"), "nothing twice: {out}");
    assert!(out.contains("up to date"), "{out}");
    assert!(!out.contains(db.password()) && !err.contains(db.password()));
    let tables = db
        .cluster
        .psql(db.name(), "SELECT count(*) FROM schema_version")
        .unwrap();
    assert_eq!(
        tables.trim(),
        charging::ledger::postgres::MIGRATIONS.len().to_string(),
        "one row per migration"
    );
    // Reconciliation and settlement read the configured ledger.
    let (code, out, err) = run(tapgate()
        .args(["charging", "reconcile", "--json", "--config"])
        .arg(&cfg));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"cards\":0"), "{out}");
    let files = dir.path().join("settlement");
    let (code, out, err) = run(tapgate()
        .args(["charging", "settlement", "--day", "2026-12-01", "--out"])
        .arg(&files)
        .arg("--config")
        .arg(&cfg));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote"), "{out}");
}

#[test]
fn a_ledger_table_that_cannot_work_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    for (ledger, says) in [
        ("kind = \"mysql\"", "unknown variant `mysql`"),
        ("kind = \"postgres\"", "needs url"),
        ("kind = \"postgres\"\nurl = \"mysql://x@h/db\"", "not a postgres:// URL"),
        (
            "kind = \"postgres\"\nurl = \"postgres://x@127.0.0.1:1/db\"\npassword_env = \"TAPGATE_TEST_NO_SUCH_VAR\"",
            "TAPGATE_TEST_NO_SUCH_VAR is not set",
        ),
        ("kind = \"lmdb\"\nurl = \"postgres://x@h/db\"", "for kind = \"postgres\""),
    ] {
        let cfg = config(dir.path(), ledger);
        let (code, _, err) = run(tapgate().args(["charging", "migrate", "--config"]).arg(&cfg));
        if ledger.starts_with("kind = \"lmdb\"") {
            // migrate has nothing to do for LMDB; the server refuses the stray url.
            assert_eq!(code, 0, "{err}");
            let (code, _, err) = run(tapgate().args(["charging", "--config"]).arg(&cfg));
            assert_ne!(code, 0, "{err}");
            assert!(err.contains(says), "{ledger}: {err}");
            continue;
        }
        assert_eq!(code, 2, "{ledger}: {err}");
        assert!(err.contains(says), "{ledger}: {err}");
    }
}
