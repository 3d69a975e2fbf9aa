//! Derivations in the token: the templates of derived objects, one AES block derived with
//! `CKM_AES_CBC_ENCRYPT_DATA` (kept in the token or read back), AN10922 card and device keys
//! (the padding and the CMAC subkeys are `purse::crypto`'s one copy), CMAC in the token, and the
//! transaction MAC with its session key derived in the token.

use crate::sam_err;
use crate::session::{Master, State};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use purse::crypto::AesKey;
use purse::keys::{KeyKind, Role};
use purse::receipt::TxClaim;
use purse::rekey::KeyChange;
use purse::sam::SamError;
use zeroize::{Zeroize, Zeroizing};

/// Template of a derived secret that stays in the token: a session object, sensitive, never
/// extractable, usable for what `usage` lists.
pub(crate) fn secret_template(usage: &[Attribute]) -> Vec<Attribute> {
    let mut t = block_template(false);
    t.extend_from_slice(usage);
    t
}

/// Template of a derived block the server reads back (a CMAC subkey seed, a first CBC block,
/// a provisioned device key): a session object destroyed right after reading it.
fn readable_template() -> Vec<Attribute> {
    block_template(true)
}

/// What every derived block is: a private 16-byte AES session object, sensitive and never
/// extractable unless the server is to read it back (`readable`).
fn block_template(readable: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(16.into()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(!readable),
        Attribute::Extractable(readable),
    ]
}

/// `E(base, iv ⊕ block)` as a token object: `CKM_AES_CBC_ENCRYPT_DATA` over one block.
pub(crate) fn derive_block(
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
pub(crate) fn derive_block_clear(
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

/// AN10922's input for `parts` under `master`, as the two CBC blocks: the first in clear (it
/// crosses to the token as derivation data), the second already XORed with the subkey.
fn an10922_blocks(
    master: &Master,
    parts: [&[u8]; 3],
) -> Result<([u8; 16], Zeroizing<[u8; 16]>), SamError> {
    let m = Zeroizing::new(
        purse::crypto::an10922_input(parts, &master.k1, &master.k2)
            .map_err(|e| SamError::Key(purse::keys::KeyError::Crypto(e)))?,
    );
    let mut first = [0u8; 16];
    first.copy_from_slice(&m[..16]);
    let mut second = Zeroizing::new([0u8; 16]);
    second.copy_from_slice(&m[16..]);
    Ok((first, second))
}

/// AN10922 inside the token: the diversified key `E(KM, E(KM, M₁) ⊕ (M₂ ⊕ Kₓ))` as a
/// sensitive session object, where `M = 01 ‖ uid ‖ aid ‖ system id` padded to 32 bytes and
/// `Kₓ` is K1 for a 32-byte input, K2 otherwise. `E(KM, M₁)` is read back (PKCS#11 cannot
/// chain it to the second block inside the token); the key itself is never out of the token.
pub(crate) fn diversify_in_token(
    s: &Session,
    master: &Master,
    parts: [&[u8]; 3],
    usage: &[Attribute],
) -> Result<ObjectHandle, SamError> {
    let (first, second) = an10922_blocks(master, parts)?;
    let c1 = derive_block_clear(s, master.handle, [0; 16], &first)
        .map_err(sam_err("diversifying (first block)"))?;
    derive_block(s, master.handle, *c1, &second, &secret_template(usage))
        .map_err(sam_err("diversifying"))
}

/// The full 16-byte AES-CMAC of `msg` under `key`, in the token.
pub(crate) fn cmac_in_token(
    s: &Session,
    key: ObjectHandle,
    msg: &[u8],
) -> Result<[u8; 16], SamError> {
    let mut v = s
        .sign(&Mechanism::AesCMac, key, msg)
        .map_err(sam_err("CMAC"))?;
    let out: Result<[u8; 16], _> = v.as_slice().try_into();
    v.zeroize();
    out.map_err(|_| {
        SamError::Hsm("CMAC: the token answered with a MAC that is not 16 bytes".into())
    })
}

impl State {
    pub(crate) fn master(&self, kind: KeyKind, version: u8) -> Result<&Master, SamError> {
        self.masters
            .get(&(kind, version))
            .ok_or(SamError::KeyNotHeld {
                role: Role::Hsm,
                kind: kind.name(),
                version,
            })
    }

    pub(crate) fn device_master(&self) -> Result<&Master, SamError> {
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
    pub(crate) fn device_key_handle(&mut self, device_id: u32) -> Result<ObjectHandle, SamError> {
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
    pub(crate) fn device_mac(&mut self, device_id: u32, body: &[u8]) -> Result<[u8; 8], SamError> {
        let h = self.device_key_handle(device_id)?;
        let mut full = cmac_in_token(&self.session, h, body)?;
        let mac = purse::crypto::truncate_mac(&full);
        full.zeroize();
        Ok(mac)
    }

    /// The transaction MAC a card computes for `claim`, computed in the token:
    /// K_TM diversified, SesTMMACKey = CMAC(K_TM, SV) derived as `E(K_TM, SV ⊕ K1)` (K1 from
    /// `E(K_TM, 0)`), then CMAC over the transaction with it. Neither key leaves the token.
    pub(crate) fn transaction_mac(&self, claim: &TxClaim) -> Result<[u8; 8], SamError> {
        let master = self.master(KeyKind::Tmac, claim.key_version)?;
        let s = &self.session;
        let k_tm = diversify_in_token(
            s,
            master,
            [&claim.uid, &self.aid, &self.system_id],
            &[Attribute::Derive(true)],
        )?;
        let result = (|| {
            let l =
                derive_block_clear(s, k_tm, [0; 16], &[0; 16]).map_err(sam_err("TM subkeys"))?;
            let (mut k1, mut k2) = purse::crypto::cmac_subkeys(&l);
            let mut sv = purse::crypto::tm_session_vector(claim.tmc, &claim.uid);
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
            let input = claim.tm_input();
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

    /// An action-list order's wrapped key (`purse::actionlist`): the card's credit key
    /// (AN10922 over `01 ‖ uid ‖ aid ‖ system id` under KM_CREDIT) and the wrap key (AN10922
    /// over `01 ‖ uid ‖ "ACT"` under KM_DEBIT), both of `version`, derived in the token into
    /// readable session objects and read; the wrapping itself and the zeroizing of both keys
    /// happen here (see docs/hsm.md: both cross into server memory for the time of one wrap).
    pub(crate) fn wrap_order_key_clear(
        &self,
        uid: &[u8; 7],
        version: u8,
    ) -> Result<[u8; 16], SamError> {
        let card = self.an10922_clear(
            self.master(KeyKind::Credit, version)?,
            [uid, &self.aid, &self.system_id],
            "the order's card credit key",
        )?;
        let wrap = self.an10922_clear(
            self.master(KeyKind::Debit, version)?,
            [uid, b"ACT", &[]],
            "the order's wrap key",
        )?;
        Ok(purse::actionlist::wrap_card_key(&wrap, &card))
    }

    /// AN10922 under `master` derived in the token into readable session objects and read
    /// back (each destroyed once read).
    fn an10922_clear(
        &self,
        master: &Master,
        parts: [&[u8]; 3],
        what: &'static str,
    ) -> Result<AesKey, SamError> {
        let s = &self.session;
        let (first, second) = an10922_blocks(master, parts)?;
        let c1 = derive_block_clear(s, master.handle, [0; 16], &first).map_err(sam_err(what))?;
        let key = derive_block_clear(s, master.handle, *c1, &second).map_err(sam_err(what))?;
        Ok(AesKey::from_bytes(*key))
    }

    /// ChangeKey's plaintext for `change` (`purse::rekey::KeyChange`): both card keys derived
    /// in the token and read back for the time of one ChangeKey (see docs/hsm.md), the
    /// cryptogram's plaintext built here and encrypted under the session by the caller.
    pub(crate) fn change_key_data_clear(
        &self,
        change: &KeyChange,
    ) -> Result<Zeroizing<Vec<u8>>, SamError> {
        let parts: [&[u8]; 3] = [&change.uid, &self.aid, &self.system_id];
        let what = "a card key for ChangeKey";
        change.plaintext(|v| self.an10922_clear(self.master(change.kind, v)?, parts, what))
    }

    /// The versions held of `kind`, newest first.
    pub(crate) fn versions(&self, kind: KeyKind) -> Vec<u8> {
        let mut v: Vec<u8> = self
            .masters
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, v)| *v)
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }

    /// The device key of `device_id` in clear, for provisioning a validator SAM: AN10922 over
    /// `01 ‖ id ‖ "DEV"` derived in the token into readable session objects, read, destroyed
    /// (see docs/hsm.md).
    pub(crate) fn device_key_clear(&self, device_id: u32) -> Result<AesKey, SamError> {
        let master = self.device_master()?;
        let s = &self.session;
        let (first, second) = an10922_blocks(master, [&device_id.to_be_bytes(), b"DEV", &[]])?;
        let c1 = derive_block_clear(s, master.handle, [0; 16], &first)
            .map_err(sam_err("device key (first block)"))?;
        let key =
            derive_block_clear(s, master.handle, *c1, &second).map_err(sam_err("device key"))?;
        Ok(AesKey::from_bytes(*key))
    }
}
