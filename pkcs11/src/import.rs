//! `tapgate keys import-hsm`: the HSM role's keys of a key set into a token, as sensitive,
//! non-extractable objects that can only derive (masters) or sign (the Ed25519 key).

use crate::{master_label, params_label, signing_label, Pkcs11Error, TokenSession, HSM_KINDS};
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use purse::keys::{KeyEntry, KeySet, Role};
use zeroize::Zeroizing;

/// DER of the Ed25519 curve OID 1.3.101.112 (`CKA_EC_PARAMS` of an Edwards key).
const ED25519_OID: [u8; 5] = [0x06, 0x03, 0x2B, 0x65, 0x70];

/// One object written to the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    /// Its label.
    pub label: String,
    /// What identifies it without revealing it: `kcv <6 hex>` (first 3 bytes of
    /// AES-ECB(K, 0¹⁶)) for an AES key, `ed25519 public <hex>` for the signing key,
    /// `parameters` for the parameters object.
    pub check: String,
}

/// The key check value of an AES key: the first 3 bytes of AES-ECB(K, 0¹⁶), in hex.
pub fn kcv(key: &purse::crypto::AesKey) -> String {
    let mut block = [0u8; 16];
    purse::crypto::cbc_encrypt(key, &[0; 16], &mut block).expect("one block");
    hex::encode_upper(&block[..3])
}

/// The parameters object's value: `aid(3) ‖ len ‖ system id ‖ verifying key(32)`.
pub fn encode_params(keys: &KeySet) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + keys.system_id.len() + 32);
    v.extend_from_slice(&keys.aid);
    v.push(keys.system_id.len() as u8);
    v.extend_from_slice(&keys.system_id);
    v.extend_from_slice(&keys.verifying_key);
    v
}

/// Decodes [`encode_params`].
pub fn decode_params(v: &[u8]) -> Option<([u8; 3], Vec<u8>, [u8; 32])> {
    let aid: [u8; 3] = v.get(..3)?.try_into().ok()?;
    let n = *v.get(3)? as usize;
    let sys = v.get(4..4 + n)?.to_vec();
    let vk: [u8; 32] = v.get(4 + n..)?.try_into().ok()?;
    Some((aid, sys, vk))
}

/// Imports the HSM role's cut of `keys` (every version of KM_APP, KM_DEBIT, KM_CREDIT,
/// KM_TMAC, KM_DEVICE; the Ed25519 signing key; the parameters) under `prefix`.
///
/// Refuses, before writing anything, when a label exists already, unless `replace` (then the
/// old objects with those labels, and every other master under `prefix`, are destroyed first). Each AES key's check value is compared
/// with the one the token computes, when the token offers `CKA_CHECK_VALUE`.
pub fn import_keyset(
    ts: &TokenSession,
    keys: &KeySet,
    prefix: &str,
    replace: bool,
) -> Result<Vec<Imported>, Pkcs11Error> {
    let keys = keys
        .for_role(Role::Hsm, 0)
        .map_err(|e| Pkcs11Error::Malformed {
            label: prefix.into(),
            msg: e.to_string(),
        })?;
    let mut entries: Vec<_> = keys
        .entries
        .iter()
        .filter(|e| HSM_KINDS.contains(&e.kind) && e.id == 0)
        .collect();
    entries.sort_by_key(|e| (e.kind, e.version));
    let seed = keys.signing_seed.as_ref().ok_or(Pkcs11Error::Malformed {
        label: signing_label(prefix),
        msg: "the key set has no signing key (is it the issuer's key set?)".into(),
    })?;

    let mut labels: Vec<String> = entries
        .iter()
        .map(|e| master_label(prefix, e.kind, e.version))
        .collect();
    labels.push(signing_label(prefix));
    labels.push(params_label(prefix));
    let existing = existing_objects(ts, prefix, &labels, replace)?;
    // Every new object is created (and checked) before any old one goes: a failure half-way
    // destroys what was created and leaves the token as it was.
    let mut created: Vec<ObjectHandle> = Vec::new();
    let result = (|| -> Result<Vec<Imported>, Pkcs11Error> {
        let mut out = Vec::new();
        for e in entries {
            out.push(create_master(ts, prefix, e, &mut created)?);
        }
        out.push(create_signing_key(
            ts,
            prefix,
            seed,
            &keys.verifying_key,
            &mut created,
        )?);
        out.push(create_params(ts, prefix, &keys, &mut created)?);
        Ok(out)
    })();
    match result {
        Ok(out) => {
            for (_, h) in existing {
                ts.session
                    .destroy_object(h)
                    .map_err(Pkcs11Error::call("destroying an object being replaced"))?;
            }
            Ok(out)
        }
        Err(e) => {
            for h in created {
                let _ = ts.session.destroy_object(h);
            }
            Err(e)
        }
    }
}

/// The objects an import would replace: those with the new labels, and with `replace` every
/// other master under `prefix` (replacing a key set replaces all of it: masters of versions
/// the new set lacks would otherwise be found at the next open). Without `replace`, an
/// existing label is [`Pkcs11Error::Exists`].
fn existing_objects(
    ts: &TokenSession,
    prefix: &str,
    labels: &[String],
    replace: bool,
) -> Result<Vec<(String, ObjectHandle)>, Pkcs11Error> {
    let mut existing = Vec::new();
    for label in labels {
        for class in [
            ObjectClass::SECRET_KEY,
            ObjectClass::PRIVATE_KEY,
            ObjectClass::PUBLIC_KEY,
            ObjectClass::DATA,
        ] {
            existing.extend(
                ts.find(class, label)?
                    .into_iter()
                    .map(|h| (label.clone(), h)),
            );
        }
    }
    if let Some((label, _)) = existing.first() {
        if !replace {
            return Err(Pkcs11Error::Exists {
                label: label.clone(),
            });
        }
    }
    if !replace {
        return Ok(existing);
    }
    let all = ts
        .session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .map_err(Pkcs11Error::call("finding old masters"))?;
    for h in all {
        let label = ts
            .session
            .get_attributes(h, &[cryptoki::object::AttributeType::Label])
            .map_err(Pkcs11Error::call("reading a label"))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Label(l) => String::from_utf8(l).ok(),
                _ => None,
            });
        if let Some(l) = label {
            if crate::parse_master_label(prefix, &l).is_some()
                && !existing.iter().any(|(_, e)| *e == h)
            {
                existing.push((l, h));
            }
        }
    }
    Ok(existing)
}

/// A master as a derive-only token object, its check value compared with the token's.
fn create_master(
    ts: &TokenSession,
    prefix: &str,
    e: &KeyEntry,
    created: &mut Vec<ObjectHandle>,
) -> Result<Imported, Pkcs11Error> {
    let label = master_label(prefix, e.kind, e.version);
    let value = Zeroizing::new(e.key.expose_secret().to_vec());
    let mut template = stored_secret(ObjectClass::SECRET_KEY, KeyType::AES);
    template.extend([
        Attribute::Derive(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Label(label.clone().into_bytes()),
        Attribute::Value(value.to_vec()),
    ]);
    let h = create_zeroizing(&ts.session, template)
        .map_err(Pkcs11Error::call("creating a master key object"))?;
    created.push(h);
    let mine = kcv(&e.key);
    if let Ok(attrs) = ts
        .session
        .get_attributes(h, &[cryptoki::object::AttributeType::CheckValue])
    {
        for a in attrs {
            if let Attribute::CheckValue(v) = a {
                if v.len() >= 3 && hex::encode_upper(&v[..3]) != mine {
                    return Err(Pkcs11Error::Malformed {
                        label,
                        msg: "the token's key check value differs from the key set's".into(),
                    });
                }
            }
        }
    }
    Ok(Imported {
        label,
        check: format!("kcv {mine}"),
    })
}

/// The Ed25519 signing key pair (the private key sensitive, sign-only).
fn create_signing_key(
    ts: &TokenSession,
    prefix: &str,
    seed: &[u8; 32],
    verifying_key: &[u8; 32],
    created: &mut Vec<ObjectHandle>,
) -> Result<Imported, Pkcs11Error> {
    let label = signing_label(prefix);
    let mut template = stored_secret(ObjectClass::PRIVATE_KEY, KeyType::EC_EDWARDS);
    template.extend([
        Attribute::Sign(true),
        Attribute::Derive(false),
        Attribute::EcParams(ED25519_OID.to_vec()),
        Attribute::Label(label.clone().into_bytes()),
        Attribute::Value(seed.to_vec()),
    ]);
    let h = create_zeroizing(&ts.session, template)
        .map_err(Pkcs11Error::call("creating the Ed25519 private key"))?;
    created.push(h);
    let mut point = vec![0x04, 0x20];
    point.extend_from_slice(verifying_key);
    let h = ts
        .session
        .create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC_EDWARDS),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(ED25519_OID.to_vec()),
            Attribute::EcPoint(point),
            Attribute::Label(label.clone().into_bytes()),
        ])
        .map_err(Pkcs11Error::call("creating the Ed25519 public key"))?;
    created.push(h);
    Ok(Imported {
        label,
        check: format!("ed25519 public {}", hex::encode_upper(verifying_key)),
    })
}

/// The parameters data object (AID, system id, verifying key).
fn create_params(
    ts: &TokenSession,
    prefix: &str,
    keys: &KeySet,
    created: &mut Vec<ObjectHandle>,
) -> Result<Imported, Pkcs11Error> {
    let label = params_label(prefix);
    let h = ts
        .session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(false),
            Attribute::Application(b"tapgate".to_vec()),
            Attribute::Label(label.clone().into_bytes()),
            Attribute::Value(encode_params(keys)),
        ])
        .map_err(Pkcs11Error::call("creating the parameters object"))?;
    created.push(h);
    Ok(Imported {
        label,
        check: "parameters".into(),
    })
}

/// How tapgate keeps a secret in the token: a token object (it persists), private, sensitive,
/// never extractable, never modified; the caller adds what it may be used for, its label and
/// its value.
fn stored_secret(class: ObjectClass, key_type: KeyType) -> Vec<Attribute> {
    vec![
        Attribute::Class(class),
        Attribute::KeyType(key_type),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
    ]
}

/// `C_CreateObject` with a template holding key bytes, which are zeroized afterwards whatever
/// the outcome (cryptoki copies them into plain vectors).
fn create_zeroizing(
    session: &cryptoki::session::Session,
    mut template: Vec<Attribute>,
) -> Result<cryptoki::object::ObjectHandle, cryptoki::error::Error> {
    let r = session.create_object(&template);
    for a in template.iter_mut() {
        if let Attribute::Value(v) = a {
            zeroize::Zeroize::zeroize(v);
        }
    }
    r
}
