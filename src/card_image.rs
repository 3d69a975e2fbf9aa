//! Card image files (`tapgate card issue` writes them; `show`, `debit`, `load`, `serve` and
//! `tapgate charge` read them): the card's NVM as pretty JSON, written atomically and durably
//! (`validator::card_image::write_atomic`). Whoever
//! changes a card holds its [`lock_image`] from the read to the write (a validator's crowd may
//! present the same image meanwhile: `validator::image_lock`).

use crate::cli_util::input_err;
use anyhow::{Context, Result};
use purse::card::Nvm;
use std::path::Path;

/// Reads and validates a card image.
pub(crate) fn read_image(path: &Path) -> Result<Nvm> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading card {}", path.display()))?;
    let nvm: Nvm = serde_json::from_str(&text)
        .map_err(|e| input_err(format!("card image {}: {e}", path.display())))?;
    nvm.validate()
        .map_err(|e| input_err(format!("card image {}: {e}", path.display())))?;
    Ok(nvm)
}

/// Takes the card image's lock (waits for a tap or a load by another process to end).
pub(crate) fn lock_image(path: &Path) -> Result<validator::image_lock::ImageLock> {
    Ok(validator::image_lock::ImageLock::acquire(
        path,
        validator::reader::IMAGE_WAIT,
    )?)
}

/// Writes a card image atomically and durably (the caller holds its [`lock_image`]).
pub(crate) fn write_image(path: &Path, nvm: &Nvm) -> Result<()> {
    let mut s = serde_json::to_string_pretty(nvm)?;
    s.push('\n');
    validator::card_image::write_atomic(path, s.as_bytes())?;
    Ok(())
}
