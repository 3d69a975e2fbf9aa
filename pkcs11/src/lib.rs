//! tapgate's HSM over PKCS#11: [`Pkcs11Hsm`] implements [`purse::sam::Authenticator`] and
//! [`purse::sam::Hsm`] with the issuer masters inside a token (SoftHSM2 in tests; Luna,
//! CloudHSM, YubiHSM in the field — any module that offers the mechanisms below).
//!
//! The masters are AES-128 secret-key objects, `CKA_SENSITIVE` and not `CKA_EXTRACTABLE`,
//! labelled `<prefix>/KM_<KIND>/v<version>` (prefix `tapgate` by default), with only
//! `CKA_DERIVE` (no `C_Encrypt`/`C_Sign` with them — but a derivation into a readable template is
//! an encryption the caller reads back, so a logged-in session can compute card keys; docs/hsm.md
//! says what the token does and does not protect). Every card key is an
//! AN10922 diversification derived *inside* the token with `CKM_AES_CBC_ENCRYPT_DATA` into a
//! sensitive, non-extractable session object; the EV2 authentication (`CKM_AES_CBC`), the EV2
//! session keys (`CKM_AES_CMAC`), the transaction-MAC session key (derived again) and the
//! transaction MAC (`CKM_AES_CMAC`), device-key MACs and ceiling grants run in the token;
//! the Ed25519 signing key is a `CKK_EC_EDWARDS` private key used with `CKM_EDDSA`.
//!
//! What crosses into server memory, and why, is listed in `docs/hsm.md`: the EV2 session keys
//! (secure messaging runs in `purse::sm::Channel`), a device key asked for by
//! [`Hsm::device_key`] (provisioning), and two AES blocks per diversification that PKCS#11
//! cannot keep inside (the CMAC subkey seed `L = E(KM, 0)` of each master, once at open, and
//! the first CBC block of each diversification input). None of them is a master or a card key.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod import;

mod derive;
mod hsm;
mod session;

pub use hsm::Pkcs11Hsm;
pub use session::{context, TokenSession};

use cryptoki::error::Error as CkError;
use purse::keys::KeyKind;
use purse::sam::SamError;
use std::path::PathBuf;

/// The default label prefix of tapgate's objects in a token.
pub const DEFAULT_PREFIX: &str = "tapgate";

/// The masters the HSM role holds (`purse::keys::Role::Hsm`), in label order.
pub const HSM_KINDS: [KeyKind; 5] = [
    KeyKind::App,
    KeyKind::Debit,
    KeyKind::Credit,
    KeyKind::Tmac,
    KeyKind::DeviceMaster,
];

/// The label part of a master kind: `KM_APP`, `KM_DEBIT`, `KM_CREDIT`, `KM_TMAC`, `KM_DEVICE`.
pub fn kind_label(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::App => "KM_APP",
        KeyKind::Debit => "KM_DEBIT",
        KeyKind::Credit => "KM_CREDIT",
        KeyKind::Tmac => "KM_TMAC",
        KeyKind::DeviceMaster => "KM_DEVICE",
        KeyKind::Device => "DEVICE",
    }
}

/// The label of a master: `<prefix>/KM_CREDIT/v1`.
pub fn master_label(prefix: &str, kind: KeyKind, version: u8) -> String {
    format!("{prefix}/{}/v{version}", kind_label(kind))
}

/// The label of the Ed25519 signing key pair: `<prefix>/SIGN`.
pub fn signing_label(prefix: &str) -> String {
    format!("{prefix}/SIGN")
}

/// The label of the data object with the diversification parameters and the verifying key.
pub fn params_label(prefix: &str) -> String {
    format!("{prefix}/params")
}

pub(crate) fn parse_master_label(prefix: &str, label: &str) -> Option<(KeyKind, u8)> {
    let rest = label.strip_prefix(prefix)?.strip_prefix('/')?;
    let (kind, v) = rest.split_once("/v")?;
    let kind = HSM_KINDS.into_iter().find(|k| kind_label(*k) == kind)?;
    Some((kind, v.parse().ok()?))
}

/// Where the user PIN comes from: a file (its first line) or an environment variable, read
/// by tapgate's one rule for secrets ([`tapgate_secrets`]: a file open to other users, an unset
/// variable and an empty PIN are refused). The PIN itself never appears in a configuration.
pub use tapgate_secrets::Source as PinSource;

impl From<tapgate_secrets::SecretError> for Pkcs11Error {
    fn from(e: tapgate_secrets::SecretError) -> Self {
        Pkcs11Error::Pin(e.to_string())
    }
}

/// Which token, and how to log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (`/usr/lib/softhsm/libsofthsm2.so`, a Luna `libCryptoki2_64.so`, …).
    pub module: PathBuf,
    /// The token's label (ignored when `slot` is set).
    pub token_label: Option<String>,
    /// The slot id, when the token is chosen by slot.
    pub slot: Option<u64>,
    /// The user PIN's source.
    pub pin: PinSource,
    /// The label prefix of tapgate's objects ([`DEFAULT_PREFIX`] unless several key sets
    /// share a token).
    pub prefix: String,
}

/// Errors of the PKCS#11 HSM. Messages name the module, token and labels, never a PIN or key.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    /// The module could not be loaded or initialised.
    #[error("PKCS#11 module {path}: {msg}")]
    Module {
        /// module path
        path: PathBuf,
        /// what went wrong
        msg: String,
    },
    /// No token with that label or slot.
    #[error("no PKCS#11 token {wanted} in module {module} (tokens present: {present})")]
    NoToken {
        /// what was asked for
        wanted: String,
        /// module path
        module: PathBuf,
        /// labels of the tokens present
        present: String,
    },
    /// Neither a token label nor a slot was configured.
    #[error("configure the token: a token label or a slot")]
    NoTokenChosen,
    /// The PIN could not be read.
    #[error("PIN: {0}")]
    Pin(String),
    /// The token refused the PIN.
    #[error("the token {token:?} refused the PIN (wrong PIN, or the PIN is locked)")]
    WrongPin {
        /// token label
        token: String,
    },
    /// A key tapgate needs is not in the token.
    #[error("the token {token:?} holds no object labelled {label:?}: import the key set with `tapgate keys import-hsm`")]
    MissingKey {
        /// token label
        token: String,
        /// the label looked for
        label: String,
    },
    /// The token lacks a mechanism tapgate needs.
    #[error("the token {token:?} does not offer {mechanism} (needed for {purpose})")]
    Mechanism {
        /// token label
        token: String,
        /// mechanism name
        mechanism: &'static str,
        /// what for
        purpose: &'static str,
    },
    /// An object with that label exists already (import without `--replace`).
    #[error("the token already holds {label:?} (use --replace to overwrite it)")]
    Exists {
        /// the label
        label: String,
    },
    /// Something in the token is not what tapgate wrote there.
    #[error("token object {label:?}: {msg}")]
    Malformed {
        /// label
        label: String,
        /// what is wrong
        msg: String,
    },
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {what}: {source}")]
    Call {
        /// what tapgate was doing
        what: &'static str,
        /// the module's answer
        source: CkError,
    },
}

impl Pkcs11Error {
    pub(crate) fn call(what: &'static str) -> impl FnOnce(CkError) -> Pkcs11Error {
        move |source| Pkcs11Error::Call { what, source }
    }
}

impl From<Pkcs11Error> for SamError {
    fn from(e: Pkcs11Error) -> Self {
        SamError::Hsm(e.to_string())
    }
}

/// Maps a failed PKCS#11 call to the HSM's "no verdict" error, naming what was being done.
pub(crate) fn sam_err(what: &'static str) -> impl FnOnce(CkError) -> SamError {
    move |e| SamError::Hsm(format!("{what}: {e}"))
}
