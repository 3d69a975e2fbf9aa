//! `[mqtt] password_file` / `password_env`: read by tapgate's one rule for secrets
//! (docs/operations.md, "Secrets"); the file wins over the variable.

use std::os::unix::fs::PermissionsExt;
use validator::config::Config;

fn config(mqtt: &str) -> Config {
    Config::from_toml(&format!(
        "device_id = 1001\noperator = \"metro\"\nstop = \"Central\"\njournal = \"j\"\nkeys = \"keys\"\n[mqtt]\nbroker = \"mqtt://n1:1883\"\n{mqtt}"
    ))
    .unwrap()
}

fn password(mqtt: &str) -> Result<Option<String>, String> {
    config(mqtt)
        .mqtt_settings()
        .map(|m| m.unwrap().password)
        .map_err(|e| e.to_string())
}

/// A password file holding `text`, with permissions `mode`.
fn password_file(text: &str, mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mqtt.pw");
    std::fs::write(&f, text).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    (dir, f)
}

#[test]
fn the_file_gives_its_first_line_and_wins_over_the_variable() {
    let (_dir, f) = password_file(" dev secret \r\nsecond line\n", 0o600);
    std::env::set_var("TAPGATE_TEST_MQTT_PW_SET", "from-the-variable");
    let both = format!("password_file = {f:?}\npassword_env = \"TAPGATE_TEST_MQTT_PW_SET\"\n");
    assert_eq!(password(&both).unwrap().as_deref(), Some(" dev secret "));
    assert_eq!(
        password("password_env = \"TAPGATE_TEST_MQTT_PW_SET\"\n")
            .unwrap()
            .as_deref(),
        Some("from-the-variable")
    );
}

#[test]
fn a_file_open_to_other_users_is_refused_with_the_fix() {
    let (_dir, f) = password_file("dev-secret\n", 0o644);
    let e = password(&format!("password_file = {f:?}\n")).unwrap_err();
    assert!(e.contains("[mqtt] password_file"), "{e}");
    assert!(e.contains(&format!("chmod 600 {}", f.display())), "{e}");
    assert!(!e.contains("dev-secret"), "{e}");
}

#[test]
fn a_named_variable_that_is_unset_or_empty_is_refused() {
    std::env::remove_var("TAPGATE_TEST_MQTT_PW_UNSET");
    let e = password("password_env = \"TAPGATE_TEST_MQTT_PW_UNSET\"\n").unwrap_err();
    assert!(
        e.contains("[mqtt] password_env") && e.contains("$TAPGATE_TEST_MQTT_PW_UNSET is not set"),
        "{e}"
    );
    std::env::set_var("TAPGATE_TEST_MQTT_PW_EMPTY", "");
    let e = password("password_env = \"TAPGATE_TEST_MQTT_PW_EMPTY\"\n").unwrap_err();
    assert!(e.contains("$TAPGATE_TEST_MQTT_PW_EMPTY is empty"), "{e}");
}
