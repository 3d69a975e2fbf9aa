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
pub mod softhsm;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use purse::crypto::AesKey;
use purse::keys::{KeyKind, Role};
use purse::receipt::CommitReceipt;
use purse::sam::{Authenticator, CeilingGrant, ExternalCardKey, Hsm, PendingAuth, SamError};
use rand_core::RngCore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use zeroize::{Zeroize, Zeroizing};

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

/// Where the user PIN comes from. The PIN itself never appears in a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (one line; a trailing newline is ignored).
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl PinSource {
    /// Reads the PIN.
    pub fn read(&self) -> Result<Zeroizing<String>, Pkcs11Error> {
        let mut pin =
            match self {
                PinSource::File(p) => Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                    Pkcs11Error::Pin(format!("reading the PIN file {}: {e}", p.display()))
                })?),
                PinSource::Env(name) => Zeroizing::new(std::env::var(name).map_err(|_| {
                    Pkcs11Error::Pin(format!("the PIN variable ${name} is not set"))
                })?),
            };
        while pin.ends_with('\n') || pin.ends_with('\r') {
            pin.pop();
        }
        if pin.is_empty() {
            return Err(Pkcs11Error::Pin(format!("the PIN from {self} is empty")));
        }
        Ok(pin)
    }
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "file {}", p.display()),
            PinSource::Env(n) => write!(f, "${n}"),
        }
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
    fn call(what: &'static str) -> impl FnOnce(CkError) -> Pkcs11Error {
        move |source| Pkcs11Error::Call { what, source }
    }
}

impl From<Pkcs11Error> for SamError {
    fn from(e: Pkcs11Error) -> Self {
        SamError::Hsm(e.to_string())
    }
}

fn sam_err(what: &'static str) -> impl FnOnce(CkError) -> SamError {
    move |e| SamError::Hsm(format!("{what}: {e}"))
}

/// One initialised context per module and process: PKCS#11 allows a single `C_Initialize`
/// per application, and every [`Pkcs11Hsm`] of the process shares it (it is finalised at exit).
/// Public for tools that manage tokens in the same process (the test kit's SoftHSM2 tokens),
/// which must use this context rather than initialise the module a second time.
pub fn context(module: &Path) -> Result<Pkcs11, Pkcs11Error> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .expect("pkcs11 context registry");
    if let Some(c) = map.get(module) {
        return Ok(c.clone());
    }
    if !module.exists() {
        return Err(Pkcs11Error::Module {
            path: module.into(),
            msg: "no such file (is the module installed? SoftHSM2: apt-get install softhsm2)"
                .into(),
        });
    }
    let ctx = Pkcs11::new(module).map_err(|e| Pkcs11Error::Module {
        path: module.into(),
        msg: format!("cannot load it: {e}"),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Pkcs11Error::Module {
                path: module.into(),
                msg: format!("C_Initialize failed: {e}"),
            })
        }
    }
    map.insert(module.into(), ctx.clone());
    Ok(ctx)
}

/// A logged-in read/write session on the configured token.
pub struct TokenSession {
    /// The session.
    pub session: Session,
    /// The token's label.
    pub token: String,
    /// The slot.
    pub slot: Slot,
    ctx: Pkcs11,
}

impl std::fmt::Debug for TokenSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSession")
            .field("token", &self.token)
            .field("slot", &self.slot.id())
            .finish_non_exhaustive()
    }
}

impl TokenSession {
    /// Loads the module, finds the token, opens a session and logs the user in.
    pub fn open(cfg: &Pkcs11Config) -> Result<TokenSession, Pkcs11Error> {
        let ctx = context(&cfg.module)?;
        let slots = ctx
            .get_slots_with_token()
            .map_err(Pkcs11Error::call("listing slots"))?;
        let mut present = Vec::new();
        let mut found = None;
        for s in slots {
            let Ok(info) = ctx.get_token_info(s) else {
                continue;
            };
            if !info.token_initialized() {
                continue;
            }
            let label = info.label().trim_end().to_string();
            let hit = match (cfg.slot, &cfg.token_label) {
                (Some(id), _) => s.id() == id,
                (None, Some(l)) => &label == l,
                (None, None) => return Err(Pkcs11Error::NoTokenChosen),
            };
            if hit && found.is_none() {
                found = Some((s, label.clone()));
            }
            present.push(format!("{label:?} (slot {})", s.id()));
        }
        let Some((slot, token)) = found else {
            return Err(Pkcs11Error::NoToken {
                wanted: match (cfg.slot, &cfg.token_label) {
                    (Some(id), _) => format!("in slot {id}"),
                    (None, Some(l)) => format!("labelled {l:?}"),
                    (None, None) => return Err(Pkcs11Error::NoTokenChosen),
                },
                module: cfg.module.clone(),
                present: if present.is_empty() {
                    "none".into()
                } else {
                    present.join(", ")
                },
            });
        };
        let pin = cfg.pin.read()?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(Pkcs11Error::call("opening a session"))?;
        let auth = AuthPin::from(pin.as_str());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(
                RvError::PinIncorrect | RvError::PinLocked | RvError::PinLenRange,
                _,
            )) => return Err(Pkcs11Error::WrongPin { token }),
            Err(e) => return Err(Pkcs11Error::call("logging in")(e)),
        }
        Ok(TokenSession {
            session,
            token,
            slot,
            ctx,
        })
    }

    /// Handles of objects of `class` labelled `label`.
    pub fn find(&self, class: ObjectClass, label: &str) -> Result<Vec<ObjectHandle>, Pkcs11Error> {
        self.session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(Pkcs11Error::call("finding objects"))
    }

    /// Whether the token offers `mech`. (Asked one mechanism at a time: the whole list would
    /// include vendor mechanisms `cryptoki` logs as errors.)
    pub fn has_mechanism(&self, mech: MechanismType) -> Result<bool, Pkcs11Error> {
        match self.ctx.get_mechanism_info(self.slot, mech) {
            Ok(_) => Ok(true),
            Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => Ok(false),
            Err(e) => Err(Pkcs11Error::call("asking for a mechanism")(e)),
        }
    }
}

/// What an open token gives: the logged-in session and the handles of tapgate's objects.
/// Rebuilt whole when the session is lost (see [`Shared::state`]).
struct State {
    session: Session,
    /// The token's label.
    token: String,
    /// Incremented at every reopening: handles from an older session are stale.
    generation: u64,
    /// A PKCS#11 call failed: the next operation reopens the session first.
    broken: bool,
    /// Reopening was refused for a reason retrying cannot fix (a wrong PIN).
    gave_up: Option<String>,
    masters: HashMap<(KeyKind, u8), Master>,
    aid: [u8; 3],
    system_id: Vec<u8>,
    verifying_key: [u8; 32],
    signing_key: ObjectHandle,
    /// Device keys derived once per device (session objects, never extractable).
    device_keys: HashMap<u32, ObjectHandle>,
}

/// The token state shared by the HSM and the card-key handles it hands out.
struct Shared {
    cfg: Pkcs11Config,
    state: Mutex<State>,
}

impl Shared {
    /// The state, reopened first if an earlier call failed (a token restarted, a session lost,
    /// a logout): the failed operation itself answered `SamError::Hsm` — no verdict — and the
    /// next one works again once the token is back.
    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, SamError> {
        // A panic while holding the state cannot leave a PKCS#11 operation half-done in a way
        // the next call depends on (each call here is a complete single-part operation).
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.gave_up {
            return Err(SamError::Hsm(why.clone()));
        }
        if st.broken {
            match load_state(&self.cfg) {
                Ok(mut fresh) => {
                    fresh.generation = st.generation + 1;
                    *st = fresh;
                }
                // A refused PIN is not retried: every attempt would count towards the token's
                // lockout (a Luna locks the partition after a few).
                Err(e @ Pkcs11Error::WrongPin { .. }) => {
                    let why =
                        format!("{e}; not retried: restart the server with the right PIN source");
                    st.gave_up = Some(why.clone());
                    return Err(SamError::Hsm(why));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(st)
    }
}

/// Runs `f` on the state and marks the state broken when a PKCS#11 call in it failed.
fn run<T>(st: &mut State, f: impl FnOnce(&State) -> Result<T, SamError>) -> Result<T, SamError> {
    let r = f(st);
    if matches!(r, Err(SamError::Hsm(_))) {
        st.broken = true;
    }
    r
}

/// A master in the token and its CMAC subkeys (computed from `L = E(KM, 0)` at open).
struct Master {
    handle: ObjectHandle,
    k1: [u8; 16],
    k2: [u8; 16],
}

impl Drop for Master {
    fn drop(&mut self) {
        self.k1.zeroize();
        self.k2.zeroize();
    }
}

/// The issuer's HSM over PKCS#11 (see the crate documentation).
pub struct Pkcs11Hsm {
    shared: Arc<Shared>,
    token: String,
}

impl std::fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// Template of a derived secret that stays in the token: a session object, sensitive, never
/// extractable, usable for what `usage` lists.
fn secret_template(usage: &[Attribute]) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(16.into()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
    ];
    t.extend_from_slice(usage);
    t
}

/// Template of a derived block the server reads back (a CMAC subkey seed, a first CBC block,
/// a provisioned device key): a session object destroyed right after reading it.
fn readable_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(16.into()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

/// `E(base, iv ⊕ block)` as a token object: `CKM_AES_CBC_ENCRYPT_DATA` over one block.
fn derive_block(
    s: &Session,
    base: ObjectHandle,
    iv: [u8; 16],
    block: &[u8; 16],
    template: &[Attribute],
) -> Result<ObjectHandle, CkError> {
    let mech = Mechanism::AesCbcEncryptData(AesCbcDeriveParams::new(iv, block));
    s.derive_key(&mech, base, template)
}

/// `E(base, iv ⊕ block)` read back into server memory (and the object destroyed).
fn derive_block_clear(
    s: &Session,
    base: ObjectHandle,
    iv: [u8; 16],
    block: &[u8; 16],
) -> Result<Zeroizing<[u8; 16]>, CkError> {
    let h = derive_block(s, base, iv, block, &readable_template())?;
    let value = s.get_attributes(h, &[AttributeType::Value]);
    let destroyed = s.destroy_object(h);
    let mut out = Zeroizing::new([0u8; 16]);
    let mut got = false;
    for a in value? {
        if let Attribute::Value(mut v) = a {
            if v.len() == 16 && !got {
                out.copy_from_slice(&v);
                got = true;
            }
            v.zeroize();
        }
    }
    destroyed?;
    // A module that keeps derived values sensitive answers without the value (cryptoki leaves
    // it out rather than failing): never go on with zeros — every key derived from them would
    // be wrong and genuine transaction MACs would look forged.
    if !got {
        return Err(CkError::Pkcs11(
            RvError::AttributeSensitive,
            cryptoki::context::Function::GetAttributeValue,
        ));
    }
    Ok(out)
}

/// The CMAC subkeys K1, K2 from `L = E(K, 0)` (RFC 4493 §2.3).
fn subkeys(l: &[u8; 16]) -> ([u8; 16], [u8; 16]) {
    fn dbl(x: &[u8; 16]) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut carry = 0u8;
        for i in (0..16).rev() {
            out[i] = (x[i] << 1) | carry;
            carry = x[i] >> 7;
        }
        if x[0] & 0x80 != 0 {
            out[15] ^= 0x87;
        }
        out
    }
    let k1 = dbl(l);
    let k2 = dbl(&k1);
    (k1, k2)
}

/// AN10922 inside the token: the diversified key `E(KM, E(KM, M₁) ⊕ (M₂ ⊕ Kₓ))` as a
/// sensitive session object, where `M = 01 ‖ uid ‖ aid ‖ system id` padded to 32 bytes and
/// `Kₓ` is K1 for a 32-byte input, K2 otherwise. `E(KM, M₁)` is read back (PKCS#11 cannot
/// chain it to the second block inside the token); the key itself is never out of the token.
fn diversify_in_token(
    s: &Session,
    master: &Master,
    parts: [&[u8]; 3],
    usage: &[Attribute],
) -> Result<ObjectHandle, SamError> {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    if len > purse::crypto::AN10922_MAX_INPUT {
        return Err(SamError::Key(purse::keys::KeyError::Crypto(
            purse::crypto::CryptoError::DiversificationInputTooLong { got: len },
        )));
    }
    let mut m = Zeroizing::new([0u8; 32]);
    m[0] = 0x01;
    let mut at = 1;
    for p in parts {
        m[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    let sub = if len == 32 {
        &master.k1
    } else {
        m[len] = 0x80;
        &master.k2
    };
    let mut first = [0u8; 16];
    first.copy_from_slice(&m[..16]);
    let mut second = Zeroizing::new([0u8; 16]);
    for i in 0..16 {
        second[i] = m[16 + i] ^ sub[i];
    }
    let c1 = derive_block_clear(s, master.handle, [0; 16], &first)
        .map_err(sam_err("diversifying (first block)"))?;
    derive_block(s, master.handle, *c1, &second, &secret_template(usage))
        .map_err(sam_err("diversifying"))
}

fn cmac_in_token(s: &Session, key: ObjectHandle, msg: &[u8]) -> Result<[u8; 16], SamError> {
    let mut v = s
        .sign(&Mechanism::AesCMac, key, msg)
        .map_err(sam_err("CMAC"))?;
    let out: Result<[u8; 16], _> = v.as_slice().try_into();
    v.zeroize();
    out.map_err(|_| {
        SamError::Hsm("CMAC: the token answered with a MAC that is not 16 bytes".into())
    })
}

/// A diversified card key inside the token, for the two halves of an EV2 authentication.
/// Dropping it destroys the session object.
struct TokenCardKey {
    shared: Arc<Shared>,
    handle: ObjectHandle,
    generation: u64,
}

impl TokenCardKey {
    fn with<T>(&self, f: impl FnOnce(&Session) -> Result<T, SamError>) -> Result<T, SamError> {
        let mut st = self.shared.state()?;
        if st.generation != self.generation {
            return Err(SamError::Hsm(
                "the token session was reopened during the authentication".into(),
            ));
        }
        run(&mut st, |st| f(&st.session))
    }

    fn crypt(&mut self, data: &mut [u8], encrypt: bool) -> Result<(), SamError> {
        let handle = self.handle;
        self.with(|s| {
            let mech = Mechanism::AesCbc([0; 16]);
            let mut out = if encrypt {
                s.encrypt(&mech, handle, data)
                    .map_err(sam_err("AES-CBC encryption"))?
            } else {
                s.decrypt(&mech, handle, data)
                    .map_err(sam_err("AES-CBC decryption"))?
            };
            let ok = out.len() == data.len();
            if ok {
                data.copy_from_slice(&out);
            }
            out.zeroize();
            if ok {
                Ok(())
            } else {
                Err(SamError::Hsm(
                    "AES-CBC: the token changed the data length".into(),
                ))
            }
        })
    }
}

impl ExternalCardKey for TokenCardKey {
    fn cbc_encrypt(&mut self, data: &mut [u8]) -> Result<(), SamError> {
        self.crypt(data, true)
    }
    fn cbc_decrypt(&mut self, data: &mut [u8]) -> Result<(), SamError> {
        self.crypt(data, false)
    }
    fn cmac(&mut self, msg: &[u8]) -> Result<[u8; 16], SamError> {
        let handle = self.handle;
        self.with(|s| cmac_in_token(s, handle, msg))
    }
}

impl Drop for TokenCardKey {
    fn drop(&mut self) {
        // A session object also disappears when the session closes; destroying it now keeps
        // the token's session-object count bounded by the sessions in flight. An object of an
        // older session is gone with it.
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.generation == self.generation {
            let _ = st.session.destroy_object(self.handle);
        }
    }
}

fn tm_session_vector(tmc: u32, uid: &[u8; 7]) -> [u8; 16] {
    let mut sv = [0u8; 16];
    sv[0..5].copy_from_slice(&[0x5A, 0x00, 0x01, 0x00, 0x80]);
    sv[5..9].copy_from_slice(&tmc.to_le_bytes());
    sv[9..16].copy_from_slice(uid);
    sv
}

/// Opens the session and finds tapgate's objects (see [`Pkcs11Hsm::open`]).
fn load_state(cfg: &Pkcs11Config) -> Result<State, Pkcs11Error> {
    let ts = TokenSession::open(cfg)?;
    for (mech, name, purpose) in [
        (
            MechanismType::AES_CBC_ENCRYPT_DATA,
            "CKM_AES_CBC_ENCRYPT_DATA",
            "diversifying card keys",
        ),
        (
            MechanismType::AES_CMAC,
            "CKM_AES_CMAC",
            "session keys and MACs",
        ),
        (MechanismType::AES_CBC, "CKM_AES_CBC", "card authentication"),
        (
            MechanismType::EDDSA,
            "CKM_EDDSA",
            "signing blocklists and fare tables",
        ),
    ] {
        if !ts.has_mechanism(mech)? {
            return Err(Pkcs11Error::Mechanism {
                token: ts.token.clone(),
                mechanism: name,
                purpose,
            });
        }
    }
    let prefix = &cfg.prefix;
    let missing = |label: String| Pkcs11Error::MissingKey {
        token: ts.token.clone(),
        label,
    };
    // Parameters: aid(3) ‖ len ‖ system id ‖ verifying key(32).
    let plabel = params_label(prefix);
    let ph = *ts
        .find(ObjectClass::DATA, &plabel)?
        .first()
        .ok_or_else(|| missing(plabel.clone()))?;
    let mut params = Vec::new();
    for a in ts
        .session
        .get_attributes(ph, &[AttributeType::Value])
        .map_err(Pkcs11Error::call("reading the parameters"))?
    {
        if let Attribute::Value(v) = a {
            params = v;
        }
    }
    let (aid, system_id, verifying_key) =
        import::decode_params(&params).ok_or_else(|| Pkcs11Error::Malformed {
            label: plabel.clone(),
            msg: "not a tapgate parameters object".into(),
        })?;
    let slabel = signing_label(prefix);
    let signing_key = *ts
        .find(ObjectClass::PRIVATE_KEY, &slabel)?
        .first()
        .ok_or_else(|| missing(slabel.clone()))?;

    // Masters: every AES secret key whose label parses as `<prefix>/KM_*/v*`.
    let handles = ts
        .session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
        ])
        .map_err(Pkcs11Error::call("finding the masters"))?;
    let mut masters = HashMap::new();
    for h in handles {
        let attrs = ts
            .session
            .get_attributes(h, &[AttributeType::Label, AttributeType::Token])
            .map_err(Pkcs11Error::call("reading a label"))?;
        let mut label = None;
        let mut on_token = false;
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8(l).ok(),
                Attribute::Token(t) => on_token = t,
                _ => {}
            }
        }
        let Some((kind, version)) = label.as_deref().and_then(|l| parse_master_label(prefix, l))
        else {
            continue;
        };
        if !on_token {
            continue;
        }
        let l = derive_block_clear(&ts.session, h, [0; 16], &[0; 16]).map_err(|e| {
            Pkcs11Error::Call {
                what: "deriving a master's CMAC subkeys (does the key allow CKA_DERIVE?)",
                source: e,
            }
        })?;
        let (k1, k2) = subkeys(&l);
        masters.insert((kind, version), Master { handle: h, k1, k2 });
    }
    for kind in HSM_KINDS {
        if !masters.keys().any(|(k, _)| *k == kind) {
            return Err(missing(master_label(prefix, kind, 1)));
        }
    }
    Ok(State {
        token: ts.token,
        session: ts.session,
        generation: 0,
        broken: false,
        gave_up: None,
        masters,
        aid,
        system_id,
        verifying_key,
        signing_key,
        device_keys: HashMap::new(),
    })
}

impl Pkcs11Hsm {
    /// Opens the token named by `cfg` and finds tapgate's objects under `cfg.prefix`.
    ///
    /// Fails with a clear error for a missing module, an unknown token, a wrong PIN, missing
    /// key labels (every HSM master needs at least one version, plus the signing key and the
    /// parameters object) and missing mechanisms. After a failed PKCS#11 call (token restarted,
    /// session lost) the next operation reopens the session with the same configuration.
    pub fn open(cfg: &Pkcs11Config) -> Result<Pkcs11Hsm, Pkcs11Error> {
        let state = load_state(cfg)?;
        let token = state.token.clone();
        Ok(Pkcs11Hsm {
            token,
            shared: Arc::new(Shared {
                cfg: cfg.clone(),
                state: Mutex::new(state),
            }),
        })
    }

    /// The token's label.
    pub fn token_label(&self) -> &str {
        &self.token
    }
}

impl State {
    fn master(&self, kind: KeyKind, version: u8) -> Result<&Master, SamError> {
        self.masters
            .get(&(kind, version))
            .ok_or(SamError::KeyNotHeld {
                role: Role::Hsm,
                kind: kind.name(),
                version,
            })
    }

    fn device_master(&self) -> Result<&Master, SamError> {
        let v = self
            .masters
            .keys()
            .filter(|(k, _)| *k == KeyKind::DeviceMaster)
            .map(|(_, v)| *v)
            .max()
            .ok_or(SamError::KeyNotHeld {
                role: Role::Hsm,
                kind: KeyKind::DeviceMaster.name(),
                version: 1,
            })?;
        self.master(KeyKind::DeviceMaster, v)
    }

    /// The device key of `device_id` as a token object (derived once, then reused).
    fn device_key_handle(&mut self, device_id: u32) -> Result<ObjectHandle, SamError> {
        if let Some(h) = self.device_keys.get(&device_id) {
            return Ok(*h);
        }
        let h = diversify_in_token(
            &self.session,
            self.device_master()?,
            [&device_id.to_be_bytes(), b"DEV", &[]],
            &[Attribute::Sign(true)],
        )?;
        self.device_keys.insert(device_id, h);
        Ok(h)
    }

    /// The 8-byte device MAC, in the token.
    fn device_mac(&mut self, device_id: u32, body: &[u8]) -> Result<[u8; 8], SamError> {
        let h = self.device_key_handle(device_id)?;
        let mut full = cmac_in_token(&self.session, h, body)?;
        let mac = purse::crypto::truncate_mac(&full);
        full.zeroize();
        Ok(mac)
    }

    /// The transaction MAC a card computes for `receipt`, computed in the token:
    /// K_TM diversified, SesTMMACKey = CMAC(K_TM, SV) derived as `E(K_TM, SV ⊕ K1)` (K1 from
    /// `E(K_TM, 0)`), then CMAC over the transaction with it. Neither key leaves the token.
    fn transaction_mac(&self, receipt: &CommitReceipt) -> Result<[u8; 8], SamError> {
        let master = self.master(KeyKind::Tmac, receipt.key_version)?;
        let s = &self.session;
        let k_tm = diversify_in_token(
            s,
            master,
            [&receipt.uid, &self.aid, &self.system_id],
            &[Attribute::Derive(true)],
        )?;
        let result = (|| {
            let l =
                derive_block_clear(s, k_tm, [0; 16], &[0; 16]).map_err(sam_err("TM subkeys"))?;
            let (mut k1, mut k2) = subkeys(&l);
            let mut sv = tm_session_vector(receipt.tmc, &receipt.uid);
            for i in 0..16 {
                sv[i] ^= k1[i];
            }
            k1.zeroize();
            k2.zeroize();
            let ses = derive_block(
                s,
                k_tm,
                [0; 16],
                &sv,
                &secret_template(&[Attribute::Sign(true)]),
            )
            .map_err(sam_err("TM session key"));
            sv.zeroize();
            let ses = ses?;
            let input = receipt.tm_input();
            let full = cmac_in_token(s, ses, &input);
            let _ = s.destroy_object(ses);
            let mut full = full?;
            let mac = purse::crypto::truncate_mac(&full);
            full.zeroize();
            Ok(mac)
        })();
        let _ = s.destroy_object(k_tm);
        result
    }
}

impl Authenticator for Pkcs11Hsm {
    fn holds_version(&self, kind: KeyKind, version: u8) -> bool {
        kind != KeyKind::Tmac
            && self
                .shared
                .state()
                .map(|st| st.masters.contains_key(&(kind, version)))
                .unwrap_or(false)
    }

    fn auth_part1(
        &mut self,
        kind: KeyKind,
        version: u8,
        uid: &[u8; 7],
        ek_rnd_b: &[u8],
        rng: &mut dyn RngCore,
    ) -> Result<(PendingAuth, [u8; 32]), SamError> {
        if kind == KeyKind::Tmac {
            return Err(SamError::NotAllowed("authenticating with the TMAC key"));
        }
        let (handle, generation) = {
            let mut st = self.shared.state()?;
            let generation = st.generation;
            let h = run(&mut st, |st| {
                diversify_in_token(
                    &st.session,
                    st.master(kind, version)?,
                    [uid, &st.aid, &st.system_id],
                    &[
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Sign(true),
                    ],
                )
            })?;
            (h, generation)
        };
        let key = TokenCardKey {
            shared: self.shared.clone(),
            handle,
            generation,
        };
        purse::sam::pcd_auth_part1_external(Box::new(key), ek_rnd_b, rng)
    }
}

impl Hsm for Pkcs11Hsm {
    fn transaction_mac(&self, receipt: &CommitReceipt) -> Result<[u8; 8], SamError> {
        let mut st = self.shared.state()?;
        run(&mut st, |st| st.transaction_mac(receipt))
    }

    fn ceiling_grant(
        &self,
        device_id: u32,
        seq: u32,
        amount_minor: i64,
    ) -> Result<CeilingGrant, SamError> {
        let mut st = self.shared.state()?;
        let r = st.device_mac(
            device_id,
            &CeilingGrant::mac_input(device_id, seq, amount_minor),
        );
        if matches!(r, Err(SamError::Hsm(_))) {
            st.broken = true;
        }
        Ok(CeilingGrant {
            device_id,
            seq,
            amount_minor,
            mac: r?,
        })
    }

    fn verify_device_mac(&self, device_id: u32, body: &[u8], mac: &[u8]) -> Result<bool, SamError> {
        let mut st = self.shared.state()?;
        let r = st.device_mac(device_id, body);
        if matches!(r, Err(SamError::Hsm(_))) {
            st.broken = true;
        }
        Ok(purse::crypto::mac_eq(&r?, mac))
    }

    /// Provisioning a validator SAM needs its device key in clear: derived in the token into
    /// a readable session object, read, destroyed (see docs/hsm.md).
    fn device_key(&self, device_id: u32) -> Result<AesKey, SamError> {
        let mut st = self.shared.state()?;
        run(&mut st, |st| {
            let master = st.device_master()?;
            let s = &st.session;
            // AN10922 over 01 ‖ id ‖ "DEV" (8 bytes): padded to 32, K2 into the second block.
            let mut m = [0u8; 32];
            m[0] = 0x01;
            m[1..5].copy_from_slice(&device_id.to_be_bytes());
            m[5..8].copy_from_slice(b"DEV");
            m[8] = 0x80;
            let first: [u8; 16] = m[..16].try_into().expect("16");
            let mut second = Zeroizing::new([0u8; 16]);
            for i in 0..16 {
                second[i] = m[16 + i] ^ master.k2[i];
            }
            let c1 = derive_block_clear(s, master.handle, [0; 16], &first)
                .map_err(sam_err("device key (first block)"))?;
            let key = derive_block_clear(s, master.handle, *c1, &second)
                .map_err(sam_err("device key"))?;
            Ok(AesKey::from_bytes(*key))
        })
    }

    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], SamError> {
        let mut st = self.shared.state()?;
        let sig = run(&mut st, |st| {
            st.session
                .sign(
                    &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Ed25519)),
                    st.signing_key,
                    msg,
                )
                .map_err(sam_err("Ed25519 signature"))
        })?;
        sig.as_slice()
            .try_into()
            .map_err(|_| SamError::Hsm("Ed25519: the token's signature is not 64 bytes".into()))
    }

    fn verifying_key(&self) -> [u8; 32] {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .verifying_key
    }
}
