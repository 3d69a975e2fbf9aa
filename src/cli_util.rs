//! Helpers shared by subcommands: input errors (exit 2), hex parsing, passphrases, files.

use anyhow::Result;
use std::path::Path;

/// An error in what the user gave us (bad hex, wrong length, missing passphrase): exit code 2.
#[derive(Debug)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for InputError {}

/// Returns an [`InputError`] as an `anyhow::Error`.
pub fn input_err(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError(msg.into()))
}

/// Parses hex (spaces and colons allowed) for the flag `flag`, checking the byte length.
pub fn hex_arg(flag: &str, value: &str, lens: &[usize]) -> Result<Vec<u8>> {
    let cleaned: String = value.chars().filter(|c| !matches!(c, ' ' | ':')).collect();
    let bytes = hex::decode(&cleaned).map_err(|e| {
        input_err(format!(
            "{flag}: {value:?} is not valid hex ({e}); expected e.g. {}",
            "00".repeat(lens.first().copied().unwrap_or(1))
        ))
    })?;
    if !lens.is_empty() && !lens.contains(&bytes.len()) {
        let want: Vec<String> = lens.iter().map(|l| l.to_string()).collect();
        return Err(input_err(format!(
            "{flag}: {} bytes given, expected {} bytes ({} hex digits)",
            bytes.len(),
            want.join(" or "),
            lens.iter()
                .map(|l| (l * 2).to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    Ok(bytes)
}

/// Parses a 16-byte array flag.
pub fn hex16(flag: &str, value: &str) -> Result<[u8; 16]> {
    Ok(hex_arg(flag, value, &[16])?.try_into().expect("checked"))
}

/// Parses a 7-byte UID flag.
pub fn uid7(flag: &str, value: &str) -> Result<[u8; 7]> {
    Ok(hex_arg(flag, value, &[7])?.try_into().expect("checked"))
}

/// The environment variable that holds the key-set passphrase by default.
pub const PASSPHRASE_ENV: &str = "TAPGATE_KEY_PASSPHRASE";

/// Reads the key-set passphrase from `--passphrase-file` or the environment, by tapgate's one
/// rule for secrets (docs/operations.md, "Secrets"; the file's first line may be any bytes).
pub fn passphrase(file: Option<&Path>) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let refused = |e: tapgate_secrets::SecretError| input_err(format!("key-set passphrase: {e}"));
    if let Some(f) = file {
        return tapgate_secrets::read_file_bytes(f).map_err(refused);
    }
    if std::env::var_os(PASSPHRASE_ENV).is_none() {
        return Err(input_err(format!(
            "no key-set passphrase: set {PASSPHRASE_ENV} or pass --passphrase-file FILE"
        )));
    }
    let mut text = tapgate_secrets::read_env(PASSPHRASE_ENV).map_err(refused)?;
    Ok(zeroize::Zeroizing::new(
        std::mem::take(&mut *text).into_bytes(),
    ))
}

/// Writes a file atomically and durably (temp file, fsync, rename, fsync of the directory): the
/// one implementation, in the validator crate, which writes card images the same way.
pub use validator::card_image::write_atomic;

/// Resolves at Ctrl-C or (on Unix) SIGTERM: the daemons' graceful-shutdown trigger.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
