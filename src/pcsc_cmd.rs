//! `--reader pcsc[:NAME]` for the CLI: the reader choice, and the PC/SC side when tapgate is
//! built with the `pcsc` feature (it links libpcsclite; docs/readers.md).

use crate::cli_util::input_err;
use anyhow::Result;

/// Which reader a command uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReaderChoice {
    /// The emulated crowd (validator) or an emulated card image (charge).
    Emulated,
    /// A PC/SC reader whose name contains this (case-insensitive; `None`: any reader).
    Pcsc(Option<String>),
}

/// Parses `crowd`, `pcsc` or `pcsc:NAME`.
pub fn parse_reader(flag: &str, s: &str) -> Result<ReaderChoice> {
    match s.split_once(':') {
        None if s == "pcsc" => Ok(ReaderChoice::Pcsc(None)),
        None if s == "crowd" || s == "emulated" => Ok(ReaderChoice::Emulated),
        Some(("pcsc", name)) => Ok(ReaderChoice::Pcsc(
            Some(name.trim().to_string()).filter(|n| !n.is_empty()),
        )),
        _ => Err(input_err(format!(
            "{flag} {s:?}: expected crowd, pcsc or pcsc:NAME (NAME: part of the reader's name)"
        ))),
    }
}

/// The error of a build without PC/SC.
#[cfg_attr(feature = "pcsc", allow(dead_code))]
pub fn not_built() -> anyhow::Error {
    input_err(
        "this tapgate was built without PC/SC support: build it with `--features tapgate/pcsc` \
         (needs libpcsclite-dev; see docs/readers.md)",
    )
}

/// Waits up to `wait` for a card on a reader matching `filter` and runs `f` with it; the card
/// is released (reset) afterwards.
#[cfg(feature = "pcsc")]
pub fn with_card<T>(
    filter: Option<String>,
    wait: std::time::Duration,
    f: impl FnOnce(&mut validator::pcsc_reader::PcscCard) -> Result<T>,
) -> Result<T> {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let which = filter.as_deref().map_or_else(
        || "a PC/SC reader".to_string(),
        |n| format!("the reader {n:?}"),
    );
    let mut reader =
        validator::pcsc_reader::PcscReader::new(filter, Arc::new(AtomicBool::new(false)));
    eprintln!("present the card to {which}");
    let Some(card) = reader.wait_for_card(Some(std::time::Instant::now() + wait)) else {
        let seen = reader.readers();
        anyhow::bail!(
            "no card on {which} within {} s (matching readers seen: {})",
            wait.as_secs(),
            if seen.is_empty() {
                "none; is pcscd running and the reader plugged in?".to_string()
            } else {
                seen.join(", ")
            }
        );
    };
    eprintln!(
        "card {} on {}",
        hex::encode_upper(card.uid()),
        card.reader()
    );
    f(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_choices() {
        assert_eq!(
            parse_reader("--reader", "pcsc").unwrap(),
            ReaderChoice::Pcsc(None)
        );
        assert_eq!(
            parse_reader("--reader", "pcsc:Virtual PCD").unwrap(),
            ReaderChoice::Pcsc(Some("Virtual PCD".into()))
        );
        assert_eq!(
            parse_reader("--reader", "pcsc:").unwrap(),
            ReaderChoice::Pcsc(None)
        );
        assert_eq!(
            parse_reader("--reader", "crowd").unwrap(),
            ReaderChoice::Emulated
        );
        let e = parse_reader("--reader", "usb").unwrap_err().to_string();
        assert!(e.contains("pcsc:NAME"), "{e}");
    }
}
