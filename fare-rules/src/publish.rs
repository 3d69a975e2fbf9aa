//! From rules to the signed table validators take, written once for `tapgate fare check`,
//! `fare compile`, `fare publish` and the operator console: [`review`] (the `fare check`
//! findings and the summary line), [`sign_checked`] (refused on an error unless forced, signed,
//! then verified with the public key as a validator will).

use crate::check::{check_as, Authored, Finding, Level};
use crate::engine::Engine;
use crate::gtfs;
use crate::signed::{self, SignedError};
use std::path::Path;

/// What `fare check` holds rules at `path` to: a feed's reference, or the TOML source's.
pub fn authored(path: &Path) -> Authored {
    if gtfs::is_feed(path) {
        Authored::Gtfs
    } else {
        Authored::Source
    }
}

/// The `fare check` of a table: its findings (errors first) and the summary line.
#[derive(Clone, Debug)]
pub struct Review {
    /// Every finding, errors first.
    pub findings: Vec<Finding>,
    /// How many are errors (the table must not be distributed).
    pub errors: usize,
    /// `fare check: NAME version V: R rules, S stops, T routes; E error(s), W warning(s)`.
    pub summary: String,
}

/// Checks `engine` by the rules of the format it was `authored` in.
pub fn review(engine: &Engine, authored: Authored) -> Review {
    let findings = check_as(engine, authored);
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    let t = engine.table();
    let summary = format!(
        "fare check: {} version {}: {} rules, {} stops, {} routes; {errors} error(s), {} warning(s)",
        t.meta.name,
        t.meta.version,
        t.leg_rules.len(),
        t.stops.len(),
        t.routes.len(),
        findings.len() - errors
    );
    Review {
        findings,
        errors,
        summary,
    }
}

/// Why a table was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// `fare check` found errors (and the signing was not forced).
    #[error("{} error(s) in the rules: fix them (see `tapgate fare check`)", .0.len())]
    Findings(Vec<Finding>),
    /// The signer failed.
    #[error("signing the fare table: {0}")]
    Signer(String),
    /// The table could not be encoded, or what was signed does not verify under `public_key`.
    #[error("the signed fare table: {0}")]
    Table(#[from] SignedError),
}

/// The signed table (`.tgft`) of `engine`: refused with the errors `fare check` finds unless
/// `force`; signed with `sign` (the back office's Ed25519 key); then verified under
/// `public_key`, as a validator will, before it is returned.
pub fn sign_checked<E: std::fmt::Display>(
    engine: &Engine,
    authored: Authored,
    force: bool,
    sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
    public_key: &[u8; 32],
) -> Result<Vec<u8>, SignError> {
    if !force {
        let errors: Vec<Finding> = check_as(engine, authored)
            .into_iter()
            .filter(|f| f.level == Level::Error)
            .collect();
        if !errors.is_empty() {
            return Err(SignError::Findings(errors));
        }
    }
    let mut failed = None;
    let bytes = signed::encode(engine.table(), |m| match sign(m) {
        Ok(s) => s,
        Err(e) => {
            failed = Some(e.to_string());
            [0; 64]
        }
    })?;
    if let Some(e) = failed {
        return Err(SignError::Signer(e));
    }
    signed::verify(&bytes, public_key)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    const METRO: &str = include_str!("../samples/metro-city/rules.toml");
    /// A second night-bus fare for the same legs at another price: `fare check`'s error.
    const CONTRADICTION: &str =
        "[[fares]]\nid = \"dear\"\ngroup = \"nightbus\"\nnetwork = \"nightbus\"\nprice = 3000\n";

    fn engine(src: &str) -> Engine {
        Engine::new(crate::source::compile("rules.toml", src).unwrap()).unwrap()
    }

    #[test]
    fn a_table_is_signed_and_verified_and_one_with_an_error_is_not() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = key.verifying_key().to_bytes();
        let with = |k: &SigningKey, e: &Engine, force| {
            sign_checked(
                e,
                Authored::Source,
                force,
                |m| Ok::<_, String>(k.sign(m).to_bytes()),
                &public,
            )
        };
        let good = engine(METRO);
        let r = review(&good, Authored::Source);
        assert_eq!(r.errors, 0, "{:?}", r.findings);
        assert!(
            r.summary.starts_with("fare check: Metro City"),
            "{}",
            r.summary
        );
        let bytes = with(&key, &good, false).unwrap();
        assert_eq!(signed::peek(&bytes).unwrap().version, 1);
        // Signed with another key than the public one given, or not at all: refused.
        assert!(matches!(
            with(&SigningKey::from_bytes(&[8; 32]), &good, false),
            Err(SignError::Table(SignedError::Signature))
        ));
        assert!(matches!(
            sign_checked(&good, Authored::Source, false, |_| Err("no key"), &public),
            Err(SignError::Signer(_))
        ));
        // A contradiction: the finding, and nothing signed unless forced.
        let bad = engine(&format!("{METRO}\n{CONTRADICTION}"));
        let r = review(&bad, Authored::Source);
        assert_eq!(r.errors, 1, "{:?}", r.findings);
        assert!(r.summary.contains("; 1 error(s)"), "{}", r.summary);
        match with(&key, &bad, false) {
            Err(SignError::Findings(f)) => assert!(f[0].message.contains("contradicts"), "{f:?}"),
            other => panic!("{other:?}"),
        }
        assert!(with(&key, &bad, true).is_ok());
    }
}
