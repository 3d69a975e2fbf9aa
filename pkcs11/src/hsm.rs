//! [`Pkcs11Hsm`]: `purse`'s `Authenticator` and `Hsm` over the token — the card key of an EV2
//! authentication held as a token object (`TokenCardKey`), transaction MACs, device MACs,
//! ceiling grants, provisioning device keys, Ed25519 signatures.

use crate::derive::{cmac_in_token, diversify_in_token};
use crate::session::{load_state, run, Shared};
use crate::{sam_err, Pkcs11Config, Pkcs11Error};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use purse::crypto::AesKey;
use purse::keys::KeyKind;
use purse::receipt::TxClaim;
use purse::rekey::KeyChange;
use purse::sam::{Authenticator, CardKey, ExternalCardKey, Hsm, SamError};
use std::sync::{Arc, Mutex};
use zeroize::{Zeroize, Zeroizing};

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

impl Authenticator for Pkcs11Hsm {
    fn holds_version(&self, kind: KeyKind, version: u8) -> bool {
        purse::sam::hsm_may_authenticate(kind).is_ok()
            && self
                .shared
                .state()
                .map(|st| st.masters.contains_key(&(kind, version)))
                .unwrap_or(false)
    }

    fn auth_key(&self, kind: KeyKind, version: u8, uid: &[u8; 7]) -> Result<CardKey, SamError> {
        purse::sam::hsm_may_authenticate(kind)?;
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
        Ok(CardKey::External(Box::new(key)))
    }
}

impl Hsm for Pkcs11Hsm {
    fn transaction_mac(&self, claim: &TxClaim) -> Result<[u8; 8], SamError> {
        let mut st = self.shared.state()?;
        run(&mut st, |st| st.transaction_mac(claim))
    }

    /// In the token (ceiling grants and device-MAC checks use it; the key stays inside).
    fn device_mac_for(&self, device_id: u32, body: &[u8]) -> Result<[u8; 8], SamError> {
        let mut st = self.shared.state()?;
        let r = st.device_mac(device_id, body);
        if matches!(r, Err(SamError::Hsm(_))) {
            st.broken = true;
        }
        r
    }

    fn wrap_order_key(&self, uid: &[u8; 7], version: u8) -> Result<[u8; 16], SamError> {
        let mut st = self.shared.state()?;
        run(&mut st, |st| st.wrap_order_key_clear(uid, version))
    }

    fn card_key_version(&self) -> Option<u8> {
        let st = self.shared.state().ok()?;
        let v = *st.versions(KeyKind::Debit).first()?;
        purse::keys::CARD_MASTERS
            .iter()
            .all(|&k| st.versions(k).first() == Some(&v))
            .then_some(v)
    }

    fn tmac_versions(&self) -> Vec<u8> {
        self.shared
            .state()
            .map(|st| st.versions(KeyKind::Tmac))
            .unwrap_or_default()
    }

    fn change_key_data(&self, change: &KeyChange) -> Result<Zeroizing<Vec<u8>>, SamError> {
        let mut st = self.shared.state()?;
        run(&mut st, |st| st.change_key_data_clear(change))
    }

    /// Provisioning a validator SAM needs its device key in clear (see docs/hsm.md).
    fn device_key(&self, device_id: u32) -> Result<AesKey, SamError> {
        let mut st = self.shared.state()?;
        run(&mut st, |st| st.device_key_clear(device_id))
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
