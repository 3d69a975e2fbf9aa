//! The token session: one PKCS#11 context per module, a logged-in session ([`TokenSession`]),
//! the handles of tapgate's objects found at open (`State`, `load_state`) and the reopening of
//! a lost session (`Shared::state`).

use crate::derive::derive_block_clear;
use crate::{
    import, master_label, params_label, parse_master_label, signing_label, Pkcs11Config,
    Pkcs11Error, HSM_KINDS,
};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use purse::keys::KeyKind;
use purse::sam::SamError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use zeroize::Zeroize;

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
pub(crate) struct State {
    pub(crate) session: Session,
    /// The token's label.
    pub(crate) token: String,
    /// Incremented at every reopening: handles from an older session are stale.
    pub(crate) generation: u64,
    /// A PKCS#11 call failed: the next operation reopens the session first.
    pub(crate) broken: bool,
    /// Reopening was refused for a reason retrying cannot fix (a wrong PIN).
    pub(crate) gave_up: Option<String>,
    pub(crate) masters: HashMap<(KeyKind, u8), Master>,
    pub(crate) aid: [u8; 3],
    pub(crate) system_id: Vec<u8>,
    pub(crate) verifying_key: [u8; 32],
    pub(crate) signing_key: ObjectHandle,
    /// Device keys derived once per device (session objects, never extractable).
    pub(crate) device_keys: HashMap<u32, ObjectHandle>,
}

/// The token state shared by the HSM and the card-key handles it hands out.
pub(crate) struct Shared {
    pub(crate) cfg: Pkcs11Config,
    pub(crate) state: Mutex<State>,
}

impl Shared {
    /// The state, reopened first if an earlier call failed (a token restarted, a session lost,
    /// a logout): the failed operation itself answered `SamError::Hsm` — no verdict — and the
    /// next one works again once the token is back.
    pub(crate) fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, SamError> {
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
pub(crate) fn run<T>(
    st: &mut State,
    f: impl FnOnce(&State) -> Result<T, SamError>,
) -> Result<T, SamError> {
    let r = f(st);
    if matches!(r, Err(SamError::Hsm(_))) {
        st.broken = true;
    }
    r
}

/// A master in the token and its CMAC subkeys (computed from `L = E(KM, 0)` at open).
pub(crate) struct Master {
    pub(crate) handle: ObjectHandle,
    pub(crate) k1: [u8; 16],
    pub(crate) k2: [u8; 16],
}

impl Drop for Master {
    fn drop(&mut self) {
        self.k1.zeroize();
        self.k2.zeroize();
    }
}

/// Opens the session and finds tapgate's objects (see [`crate::Pkcs11Hsm::open`]).
pub(crate) fn load_state(cfg: &Pkcs11Config) -> Result<State, Pkcs11Error> {
    let ts = TokenSession::open(cfg)?;
    check_mechanisms(&ts)?;
    let prefix = &cfg.prefix;
    let (aid, system_id, verifying_key) = read_params(&ts, prefix)?;
    let slabel = signing_label(prefix);
    let signing_key = *ts
        .find(ObjectClass::PRIVATE_KEY, &slabel)?
        .first()
        .ok_or_else(|| missing(&ts, slabel.clone()))?;
    let masters = find_masters(&ts, prefix)?;
    for kind in HSM_KINDS {
        if !masters.keys().any(|(k, _)| *k == kind) {
            return Err(missing(&ts, master_label(prefix, kind, 1)));
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

/// A label tapgate needs that the token does not hold.
fn missing(ts: &TokenSession, label: String) -> Pkcs11Error {
    Pkcs11Error::MissingKey {
        token: ts.token.clone(),
        label,
    }
}

/// Refuses a token without a mechanism tapgate needs, naming it and what it is for.
fn check_mechanisms(ts: &TokenSession) -> Result<(), Pkcs11Error> {
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
    Ok(())
}

/// The parameters object: aid(3) ‖ len ‖ system id ‖ verifying key(32).
#[allow(clippy::type_complexity)]
fn read_params(
    ts: &TokenSession,
    prefix: &str,
) -> Result<([u8; 3], Vec<u8>, [u8; 32]), Pkcs11Error> {
    let plabel = params_label(prefix);
    let ph = *ts
        .find(ObjectClass::DATA, &plabel)?
        .first()
        .ok_or_else(|| missing(ts, plabel.clone()))?;
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
    import::decode_params(&params).ok_or_else(|| Pkcs11Error::Malformed {
        label: plabel,
        msg: "not a tapgate parameters object".into(),
    })
}

/// The masters: every AES secret key on the token whose label parses as `<prefix>/KM_*/v*`,
/// with its CMAC subkeys (from `L = E(KM, 0)`, read back once here).
fn find_masters(
    ts: &TokenSession,
    prefix: &str,
) -> Result<HashMap<(KeyKind, u8), Master>, Pkcs11Error> {
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
        let (k1, k2) = purse::crypto::cmac_subkeys(&l);
        masters.insert((kind, version), Master { handle: h, k1, k2 });
    }
    Ok(masters)
}
