//! The key hierarchy: issuer masters with versions, per-card diversified keys, per-device keys,
//! and the key-set file that carries them, encrypted at rest.
//!
//! | kind | held by | card key slot |
//! |---|---|---|
//! | `App` (KM_APP) | HSM only | 0, application master |
//! | `Debit` (KM_DEBIT) | validator SAMs, franchise SAMs, HSM | 1 |
//! | `Credit` (KM_CREDIT) | HSM, franchise SAMs | 2 |
//! | `Tmac` (KM_TMAC) | HSM only | 3 (the card's TMAC key) |
//! | `DeviceMaster` (KM_DEVICE) | HSM, gateway | — (derives device keys) |
//! | `Device` | one validator's SAM | — (signs that device's taps) |
//!
//! Card keys are `AN10922(master, UID ‖ AID ‖ system id)`; device keys are
//! `AN10922(KM_DEVICE, device id (4 bytes BE) ‖ "DEV")`.
//!
//! The sealed file: `"TGKS" ‖ 01 ‖ m_kib u32 ‖ t u32 ‖ p u8 ‖ salt[16] ‖ nonce[24] ‖ ciphertext`,
//! XChaCha20-Poly1305 under a key stretched from a passphrase with Argon2id; the header is the
//! associated data, so every byte of the file is authenticated.

use crate::crypto::{diversify_an10922, AesKey, CryptoError};
use crate::rotation::{DeviceKeyRing, TrustedKeys};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use rand_core::{CryptoRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

/// The application identifier of the tapgate purse application.
pub const DEFAULT_AID: [u8; 3] = [0x54, 0x47, 0x01];
/// The default system identifier used in diversification.
pub const DEFAULT_SYSTEM_ID: &[u8] = b"tapgate";
/// The masters diversified into card keys, indexed by card key number; they rotate together
/// ([`KeySet::rotate_card_keys`]).
pub const CARD_MASTERS: [KeyKind; 4] =
    [KeyKind::App, KeyKind::Debit, KeyKind::Credit, KeyKind::Tmac];

wire_code! {
    /// The kind of a key in a key set.
    #[derive(PartialOrd, Ord)]
    pub enum KeyKind {
        /// KM_APP: the application master (card key 0), issuer only.
        App = 1,
        /// KM_DEBIT: debit, read, limited credit (card key 1).
        Debit = 2,
        /// KM_CREDIT: credit / loads (card key 2).
        Credit = 3,
        /// KM_TMAC: the card's transaction-MAC key (card key 3), HSM only.
        Tmac = 4,
        /// KM_DEVICE: derives per-device tap-signing keys.
        DeviceMaster = 5,
        /// One device's tap-signing key.
        Device = 6,
    }
}

impl KeyKind {
    /// The card key number this master diversifies into, if any.
    pub fn card_key_no(self) -> Option<u8> {
        match self {
            KeyKind::App => Some(0),
            KeyKind::Debit => Some(1),
            KeyKind::Credit => Some(2),
            KeyKind::Tmac => Some(3),
            _ => None,
        }
    }

    /// A short lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::App => "app",
            KeyKind::Debit => "debit",
            KeyKind::Credit => "credit",
            KeyKind::Tmac => "tmac",
            KeyKind::DeviceMaster => "device-master",
            KeyKind::Device => "device",
        }
    }
}

/// One key in a key set.
#[derive(Clone, Debug)]
pub struct KeyEntry {
    /// What the key is for.
    pub kind: KeyKind,
    /// The key version (masters rotate; cards carry the version they hold).
    pub version: u8,
    /// The device id for `KeyKind::Device`, 0 otherwise.
    pub id: u32,
    /// The key itself.
    pub key: AesKey,
}

/// The role a key set is cut for: each role holds only what it may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The issuer back office: everything.
    Hsm,
    /// A validator SAM: debit masters and its own device key.
    ValidatorSam,
    /// A franchise terminal SAM: debit and credit masters and its own device key.
    FranchiseSam,
    /// The gateway: the device master only (to verify device MACs).
    Gateway,
}

/// Key-set errors.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file does not start with the key-set magic.
    #[error("not a tapgate key set (bad magic)")]
    BadMagic,
    /// The file format version is unknown.
    #[error("key set format version {0} is not supported")]
    UnsupportedVersion(u8),
    /// The file is truncated or its contents are malformed.
    #[error("key set is malformed: {0}")]
    Malformed(&'static str),
    /// Wrong passphrase or a tampered file.
    #[error("key set cannot be opened: wrong passphrase or the file was altered")]
    Unseal,
    /// The requested key is not in this key set.
    #[error("key set holds no {kind} key version {version}")]
    Missing {
        /// kind name
        kind: &'static str,
        /// version
        version: u8,
    },
    /// A rotation or retirement the key set cannot take.
    #[error("key rotation: {0}")]
    Rotation(&'static str),
    /// Argon2 parameters are out of range.
    #[error("key-derivation parameters invalid: {0}")]
    Kdf(String),
    /// A diversification failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Argon2id cost parameters for sealing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Parallelism.
    pub p: u8,
}

impl KdfParams {
    /// OWASP's recommended Argon2id minimum (19 MiB, 2 passes, 1 lane).
    pub const DEFAULT: KdfParams = KdfParams {
        m_kib: 19 * 1024,
        t: 2,
        p: 1,
    };
    /// Cheap parameters for tests only.
    pub const INSECURE_FOR_TESTS: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };
}

/// A set of keys for one role, plus the Ed25519 public key that verifies signed lists and
/// tables, and (for the back office only) the Ed25519 signing seed.
#[derive(Clone)]
pub struct KeySet {
    /// Application identifier used in diversification.
    pub aid: [u8; 3],
    /// System identifier used in diversification.
    pub system_id: Vec<u8>,
    /// The keys.
    pub entries: Vec<KeyEntry>,
    /// The Ed25519 signing seed (back office only).
    pub signing_seed: Option<Zeroizing<[u8; 32]>>,
    /// The Ed25519 public key devices verify with.
    pub verifying_key: [u8; 32],
    /// Card-key versions the operator retired ([`KeySet::retire`]): terminals' SAMs no longer
    /// hold them; the HSM keeps them to migrate cards still on them and to verify their
    /// transaction MACs.
    pub retired: Vec<u8>,
    /// The version of the Ed25519 signing key (`signing_seed`, `verifying_key`): 1 until
    /// [`KeySet::rotate_signing`].
    pub signing_version: u8,
    /// The public keys of earlier signing-key versions (their seeds are destroyed at rotation):
    /// accepted until retired ([`KeySet::trusted_signing_keys`]).
    pub old_signing: Vec<OldSigningKey>,
    /// KM_DEVICE versions the operator retired ([`KeySet::retire_device_master`]): a tap
    /// MAC'd under one is quarantined at the gateway.
    pub retired_device: Vec<u8>,
}

/// An earlier version of the back office's Ed25519 signing key: its public key only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OldSigningKey {
    /// The version.
    pub version: u8,
    /// The Ed25519 public key.
    pub public: [u8; 32],
    /// Retired by the operator: lists signed by it are refused.
    pub retired: bool,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("aid", &hex::encode_upper(self.aid))
            .field("entries", &self.entries)
            .field("retired", &self.retired)
            .field("signing_version", &self.signing_version)
            .field("retired_device", &self.retired_device)
            .field(
                "signing_seed",
                &self.signing_seed.as_ref().map(|_| "<secret>"),
            )
            .finish_non_exhaustive()
    }
}

const MAGIC: &[u8; 4] = b"TGKS";
/// The most Argon2 memory a key-set file may ask for (256 MiB): a hostile file cannot make
/// opening it exhaust the machine.
pub const MAX_KDF_MEMORY_KIB: u32 = 256 * 1024;
/// The most Argon2 passes a key-set file may ask for.
pub const MAX_KDF_PASSES: u32 = 16;
const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 4 + 4 + 1 + 16 + 24;

/// Adds `version` to a list of retired versions unless it is there already (then sorted).
fn add_retired(retired: &mut Vec<u8>, version: u8) {
    if !retired.contains(&version) {
        retired.push(version);
        retired.sort_unstable();
    }
}

fn random_key(rng: &mut (impl RngCore + CryptoRng)) -> AesKey {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    let k = AesKey::from_bytes(b);
    b.zeroize();
    k
}

/// The device key for `device_id` under KM_DEVICE.
pub fn derive_device_key(km_device: &AesKey, device_id: u32) -> Result<AesKey, CryptoError> {
    diversify_an10922(km_device, &device_id.to_be_bytes(), b"DEV", &[])
}

impl KeySet {
    /// A new issuer key set: every master at version 1 and a fresh Ed25519 signing key.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> KeySet {
        let mut entries = Vec::new();
        for kind in [
            KeyKind::App,
            KeyKind::Debit,
            KeyKind::Credit,
            KeyKind::Tmac,
            KeyKind::DeviceMaster,
        ] {
            entries.push(KeyEntry {
                kind,
                version: 1,
                id: 0,
                key: random_key(rng),
            });
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        let verifying_key = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        KeySet {
            aid: DEFAULT_AID,
            system_id: DEFAULT_SYSTEM_ID.to_vec(),
            entries,
            signing_seed: Some(seed),
            verifying_key,
            retired: Vec::new(),
            signing_version: 1,
            old_signing: Vec::new(),
            retired_device: Vec::new(),
        }
    }

    /// The key of `kind` at `version`.
    pub fn get(&self, kind: KeyKind, version: u8) -> Result<&AesKey, KeyError> {
        self.entries
            .iter()
            .find(|e| e.kind == kind && e.version == version && e.id == 0)
            .map(|e| &e.key)
            .ok_or(KeyError::Missing {
                kind: kind.name(),
                version,
            })
    }

    /// The newest version held of a kind.
    pub fn latest_version(&self, kind: KeyKind) -> Option<u8> {
        self.entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.version)
            .max()
    }

    /// The versions held of a kind, newest first.
    pub fn versions(&self, kind: KeyKind) -> Vec<u8> {
        let mut v: Vec<u8> = self
            .entries
            .iter()
            .filter(|e| e.kind == kind && e.id == 0)
            .map(|e| e.version)
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.dedup();
        v
    }

    /// Whether the operator retired card-key version `version`.
    pub fn is_retired(&self, version: u8) -> bool {
        self.retired.contains(&version)
    }

    /// The card-key version cards are moved to: the newest version held of every card master
    /// (App, Debit, Credit, TMAC), or `None` when they disagree or one is missing.
    pub fn card_version(&self) -> Option<u8> {
        let v = self.latest_version(KeyKind::Debit)?;
        CARD_MASTERS
            .iter()
            .all(|&k| self.latest_version(k) == Some(v))
            .then_some(v)
    }

    /// A new issuer card-key version: fresh App, Debit, Credit and TMAC masters one above the
    /// newest held, beside the old ones (cards move to it at their next online load).
    pub fn rotate_card_keys(
        &mut self,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<u8, KeyError> {
        self.add_masters(&CARD_MASTERS, rng)
    }

    /// Fresh masters of `kinds`, all under the version one above the newest held of any of
    /// them, beside the old ones: that version.
    fn add_masters(
        &mut self,
        kinds: &[KeyKind],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<u8, KeyError> {
        let newest = kinds
            .iter()
            .filter_map(|&k| self.latest_version(k))
            .max()
            .unwrap_or(0);
        let v = newest
            .checked_add(1)
            .ok_or(KeyError::Rotation("every key version up to 255 is used"))?;
        for &kind in kinds {
            self.entries.push(KeyEntry {
                kind,
                version: v,
                id: 0,
                key: random_key(rng),
            });
        }
        Ok(v)
    }

    /// Retires card-key version `version`: refused unless it is held and older than the
    /// current [`KeySet::card_version`] (the version cards are moved to is never retired).
    pub fn retire(&mut self, version: u8) -> Result<(), KeyError> {
        let current = self.card_version().ok_or(KeyError::Rotation(
            "the card masters' newest versions disagree",
        ))?;
        self.retirable(
            KeyKind::Debit,
            version,
            current,
            "only a version older than the current one can be retired",
        )?;
        add_retired(&mut self.retired, version);
        Ok(())
    }

    /// Whether master version `version` of `kind` may be retired: refused with `too_new` unless
    /// it is older than `newest` (the version in use is never retired), and unless it is held.
    fn retirable(
        &self,
        kind: KeyKind,
        version: u8,
        newest: u8,
        too_new: &'static str,
    ) -> Result<(), KeyError> {
        if version >= newest {
            return Err(KeyError::Rotation(too_new));
        }
        self.get(kind, version).map(|_| ())
    }

    /// A new signing-key version: a fresh Ed25519 seed replaces the old one (destroyed); the
    /// old public key stays accepted until [`KeySet::retire_signing`]. Back office only.
    pub fn rotate_signing(&mut self, rng: &mut (impl RngCore + CryptoRng)) -> Result<u8, KeyError> {
        if self.signing_seed.is_none() {
            return Err(KeyError::Rotation(
                "only the issuer key set holds the signing key",
            ));
        }
        let v = self
            .signing_version
            .checked_add(1)
            .ok_or(KeyError::Rotation(
                "every signing-key version up to 255 is used",
            ))?;
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        self.old_signing.push(OldSigningKey {
            version: self.signing_version,
            public: self.verifying_key,
            retired: false,
        });
        self.verifying_key = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        self.signing_seed = Some(seed);
        self.signing_version = v;
        Ok(v)
    }

    /// Retires signing-key version `version` (an earlier one): lists signed by it are refused
    /// by devices provisioned afterwards, with their own reason.
    pub fn retire_signing(&mut self, version: u8) -> Result<(), KeyError> {
        let old = self
            .old_signing
            .iter_mut()
            .find(|k| k.version == version)
            .ok_or(KeyError::Rotation(
                "only an earlier signing-key version held can be retired",
            ))?;
        old.retired = true;
        Ok(())
    }

    /// The public keys signed lists are accepted under: the current version and every earlier
    /// one not retired; retired ones only to name the refusal.
    pub fn trusted_signing_keys(&self) -> TrustedKeys {
        let (retired, accepted): (Vec<&OldSigningKey>, Vec<&OldSigningKey>) =
            self.old_signing.iter().partition(|k| k.retired);
        let mut acc = vec![(self.signing_version, self.verifying_key)];
        acc.extend(accepted.iter().map(|k| (k.version, k.public)));
        let ret = retired.iter().map(|k| (k.version, k.public)).collect();
        TrustedKeys::new(acc, ret).unwrap_or_else(|_| TrustedKeys::single(self.verifying_key))
    }

    /// A new KM_DEVICE version beside the old ones: validators provisioned afterwards MAC with
    /// device keys under it; the gateway accepts it and the previous version until retired.
    pub fn rotate_device_master(
        &mut self,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<u8, KeyError> {
        self.add_masters(&[KeyKind::DeviceMaster], rng)
    }

    /// Retires KM_DEVICE version `version` (held, older than the newest): the gateway
    /// quarantines a tap MAC'd under it with its own reason.
    pub fn retire_device_master(&mut self, version: u8) -> Result<(), KeyError> {
        let newest = self
            .latest_version(KeyKind::DeviceMaster)
            .ok_or(KeyError::Rotation("no device master held"))?;
        self.retirable(
            KeyKind::DeviceMaster,
            version,
            newest,
            "only a device-master version older than the current one can be retired",
        )?;
        add_retired(&mut self.retired_device, version);
        Ok(())
    }

    /// The device-MAC keys the gateway verifies `device_id`'s taps under: the device keys of
    /// the two newest KM_DEVICE versions not retired, newest first; the other versions held
    /// only to name a refusal.
    pub fn device_key_ring(&self, device_id: u32) -> Result<DeviceKeyRing, KeyError> {
        let mut ring = DeviceKeyRing::default();
        for v in self.versions(KeyKind::DeviceMaster) {
            let key = derive_device_key(self.get(KeyKind::DeviceMaster, v)?, device_id)?;
            if ring.accepted.len() < 2 && !self.retired_device.contains(&v) {
                ring.accepted.push((v, key));
            } else {
                ring.retired.push((v, key));
            }
        }
        if ring.accepted.is_empty() {
            return Err(KeyError::Missing {
                kind: KeyKind::DeviceMaster.name(),
                version: 1,
            });
        }
        Ok(ring)
    }

    /// `device_id`'s key under KM_DEVICE version `version` (the gateway MACs a confirmation
    /// with the version the device's taps verified under).
    pub fn device_key_at(&self, device_id: u32, version: u8) -> Result<AesKey, KeyError> {
        Ok(derive_device_key(
            self.get(KeyKind::DeviceMaster, version)?,
            device_id,
        )?)
    }

    /// The device key held for `device_id` (validator/franchise role), or derived from the
    /// device master (HSM/gateway role).
    pub fn device_key(&self, device_id: u32) -> Result<AesKey, KeyError> {
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| e.kind == KeyKind::Device && e.id == device_id)
        {
            return Ok(e.key.clone());
        }
        let version = self
            .latest_version(KeyKind::DeviceMaster)
            .ok_or(KeyError::Missing {
                kind: KeyKind::DeviceMaster.name(),
                version: 1,
            })?;
        Ok(derive_device_key(
            self.get(KeyKind::DeviceMaster, version)?,
            device_id,
        )?)
    }

    /// The card key of `kind` (version `version`) for the card `uid`.
    pub fn card_key(&self, kind: KeyKind, version: u8, uid: &[u8; 7]) -> Result<AesKey, KeyError> {
        Ok(diversify_an10922(
            self.get(kind, version)?,
            uid,
            &self.aid,
            &self.system_id,
        )?)
    }

    /// A rotated key set: adds a new version of `kind`, keeping the old ones for cards that
    /// still hold them.
    pub fn rotate(&mut self, kind: KeyKind, rng: &mut (impl RngCore + CryptoRng)) -> u8 {
        let v = self.latest_version(kind).unwrap_or(0).wrapping_add(1);
        self.entries.push(KeyEntry {
            kind,
            version: v,
            id: 0,
            key: random_key(rng),
        });
        v
    }

    /// Cuts the subset of keys `role` may hold. `device_id` names the device for SAM roles,
    /// whose device key is derived here so the SAM never holds KM_DEVICE.
    pub fn for_role(&self, role: Role, device_id: u32) -> Result<KeySet, KeyError> {
        let allowed: &[KeyKind] = match role {
            Role::Hsm => &[
                KeyKind::App,
                KeyKind::Debit,
                KeyKind::Credit,
                KeyKind::Tmac,
                KeyKind::DeviceMaster,
            ],
            Role::ValidatorSam => &[KeyKind::Debit],
            Role::FranchiseSam => &[KeyKind::Debit, KeyKind::Credit],
            Role::Gateway => &[KeyKind::DeviceMaster],
        };
        let terminal = matches!(role, Role::ValidatorSam | Role::FranchiseSam);
        // A terminal's SAM holds the current and the previous version, never a retired one.
        let held = |e: &KeyEntry| {
            !terminal
                || (!self.is_retired(e.version)
                    && self
                        .versions(e.kind)
                        .iter()
                        .take(2)
                        .any(|&v| v == e.version))
        };
        let mut entries: Vec<KeyEntry> = self
            .entries
            .iter()
            .filter(|e| allowed.contains(&e.kind) && held(e))
            .cloned()
            .collect();
        if terminal {
            entries.push(KeyEntry {
                kind: KeyKind::Device,
                version: 1,
                id: device_id,
                key: self.device_key(device_id)?,
            });
        }
        Ok(KeySet {
            aid: self.aid,
            system_id: self.system_id.clone(),
            entries,
            signing_seed: if role == Role::Hsm {
                self.signing_seed.clone()
            } else {
                None
            },
            verifying_key: self.verifying_key,
            retired: self.retired.clone(),
            signing_version: self.signing_version,
            old_signing: self.old_signing.clone(),
            retired_device: self.retired_device.clone(),
        })
    }

    fn encode_plain(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(64 + 22 * self.entries.len()));
        // Plaintext layout 1; 2 appends the retired versions (written only when there are some,
        // so a key set without retirements stays readable by older builds); 3 also the signing
        // key's version and earlier public keys, and the retired device-master versions.
        let layout = if self.signing_version != 1
            || !self.old_signing.is_empty()
            || !self.retired_device.is_empty()
        {
            3
        } else if self.retired.is_empty() {
            1
        } else {
            2
        };
        out.push(layout);
        out.extend_from_slice(&self.aid);
        out.push(self.system_id.len() as u8);
        out.extend_from_slice(&self.system_id);
        out.push(self.entries.len() as u8);
        for e in &self.entries {
            out.push(e.kind as u8);
            out.push(e.version);
            out.extend_from_slice(&e.id.to_be_bytes());
            out.extend_from_slice(e.key.expose_secret());
        }
        match &self.signing_seed {
            Some(seed) => {
                out.push(1);
                out.extend_from_slice(seed.as_ref());
            }
            None => out.push(0),
        }
        out.extend_from_slice(&self.verifying_key);
        if layout >= 2 {
            out.push(self.retired.len() as u8);
            out.extend_from_slice(&self.retired);
        }
        if layout == 3 {
            out.push(self.signing_version);
            out.push(self.old_signing.len() as u8);
            for k in &self.old_signing {
                out.push(k.version);
                out.extend_from_slice(&k.public);
                out.push(u8::from(k.retired));
            }
            out.push(self.retired_device.len() as u8);
            out.extend_from_slice(&self.retired_device);
        }
        out
    }

    fn decode_plain(b: &[u8]) -> Result<KeySet, KeyError> {
        let mut r = Cursor { b, pos: 0 };
        let layout = r.u8()?;
        if !(1..=3).contains(&layout) {
            return Err(KeyError::Malformed("unknown plaintext layout"));
        }
        let aid: [u8; 3] = r.take(3)?.try_into().expect("3 bytes");
        let sys_len = r.u8()? as usize;
        let system_id = r.take(sys_len)?.to_vec();
        let n = r.u8()? as usize;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let kind =
                KeyKind::from_code(r.u8()?).ok_or(KeyError::Malformed("unknown key kind"))?;
            let version = r.u8()?;
            let id = u32::from_be_bytes(r.take(4)?.try_into().expect("4 bytes"));
            let key = AesKey::from_slice(r.take(16)?)?;
            entries.push(KeyEntry {
                kind,
                version,
                id,
                key,
            });
        }
        let signing_seed = match r.u8()? {
            0 => None,
            1 => {
                let mut s = Zeroizing::new([0u8; 32]);
                s.copy_from_slice(r.take(32)?);
                Some(s)
            }
            _ => return Err(KeyError::Malformed("bad signing-key flag")),
        };
        let verifying_key: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
        let retired = if layout >= 2 {
            let n = r.u8()? as usize;
            r.take(n)?.to_vec()
        } else {
            Vec::new()
        };
        let (signing_version, old_signing, retired_device) = if layout == 3 {
            decode_rotations(&mut r)?
        } else {
            (1, Vec::new(), Vec::new())
        };
        if r.pos != b.len() {
            return Err(KeyError::Malformed("trailing bytes"));
        }
        Ok(KeySet {
            aid,
            system_id,
            entries,
            signing_seed,
            verifying_key,
            retired,
            signing_version,
            old_signing,
            retired_device,
        })
    }

    fn kek(
        passphrase: &[u8],
        salt: &[u8; 16],
        params: KdfParams,
    ) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let p = argon2::Params::new(params.m_kib, params.t, params.p as u32, Some(32))
            .map_err(|e| KeyError::Kdf(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
        let mut out = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase, salt, out.as_mut())
            .map_err(|e| KeyError::Kdf(e.to_string()))?;
        Ok(out)
    }

    /// Seals the key set under `passphrase` (Argon2id + XChaCha20-Poly1305).
    pub fn seal(
        &self,
        passphrase: &[u8],
        params: KdfParams,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Vec<u8>, KeyError> {
        let mut salt = [0u8; 16];
        rng.fill_bytes(&mut salt);
        let mut nonce = [0u8; 24];
        rng.fill_bytes(&mut nonce);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.push(FORMAT_VERSION);
        header.extend_from_slice(&params.m_kib.to_be_bytes());
        header.extend_from_slice(&params.t.to_be_bytes());
        header.push(params.p);
        header.extend_from_slice(&salt);
        header.extend_from_slice(&nonce);
        let kek = Self::kek(passphrase, &salt, params)?;
        let cipher = XChaCha20Poly1305::new(kek.as_ref().into());
        let plain = self.encode_plain();
        let ct = cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: &plain,
                    aad: &header,
                },
            )
            .map_err(|_| KeyError::Unseal)?;
        let mut out = header;
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens a sealed key set. A wrong passphrase or any altered byte is [`KeyError::Unseal`].
    pub fn unseal(file: &[u8], passphrase: &[u8]) -> Result<KeySet, KeyError> {
        if file.len() < 4 || &file[..4] != MAGIC {
            return Err(KeyError::BadMagic);
        }
        if file.len() < HEADER_LEN + 16 {
            return Err(KeyError::Malformed("file shorter than its header"));
        }
        if file[4] != FORMAT_VERSION {
            return Err(KeyError::UnsupportedVersion(file[4]));
        }
        let params = KdfParams {
            m_kib: u32::from_be_bytes(file[5..9].try_into().expect("4")),
            t: u32::from_be_bytes(file[9..13].try_into().expect("4")),
            p: file[13],
        };
        if params.m_kib > MAX_KDF_MEMORY_KIB || params.t > MAX_KDF_PASSES || params.p == 0 {
            return Err(KeyError::Kdf(
                "cost parameters exceed the allowed maximum".into(),
            ));
        }
        let salt: [u8; 16] = file[14..30].try_into().expect("16");
        let nonce: [u8; 24] = file[30..54].try_into().expect("24");
        let kek = Self::kek(passphrase, &salt, params)?;
        let cipher = XChaCha20Poly1305::new(kek.as_ref().into());
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    (&nonce).into(),
                    Payload {
                        msg: &file[HEADER_LEN..],
                        aad: &file[..HEADER_LEN],
                    },
                )
                .map_err(|_| KeyError::Unseal)?,
        );
        Self::decode_plain(&plain)
    }
}

/// Layout 3's tail: the signing key's version, the earlier public keys, the retired
/// device-master versions.
fn decode_rotations(r: &mut Cursor<'_>) -> Result<(u8, Vec<OldSigningKey>, Vec<u8>), KeyError> {
    let signing_version = r.u8()?;
    let n = r.u8()? as usize;
    let mut old = Vec::with_capacity(n);
    for _ in 0..n {
        let version = r.u8()?;
        let public: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
        let retired = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(KeyError::Malformed("bad retired flag")),
        };
        old.push(OldSigningKey {
            version,
            public,
            retired,
        });
    }
    let n = r.u8()? as usize;
    Ok((signing_version, old, r.take(n)?.to_vec()))
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], KeyError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(KeyError::Malformed("truncated"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, KeyError> {
        Ok(self.take(1)?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn sealed_keyset_roundtrips_and_hides_keys() {
        let ks = KeySet::generate(&mut rng());
        let mut seal_rng = rand::rngs::StdRng::seed_from_u64(8);
        let sealed = ks
            .seal(
                b"correct horse",
                KdfParams::INSECURE_FOR_TESTS,
                &mut seal_rng,
            )
            .unwrap();
        let debit = ks.get(KeyKind::Debit, 1).unwrap().expose_secret();
        assert!(!sealed.windows(16).any(|w| w == debit), "key in clear");
        let back = KeySet::unseal(&sealed, b"correct horse").unwrap();
        assert_eq!(
            back.get(KeyKind::Tmac, 1).unwrap(),
            ks.get(KeyKind::Tmac, 1).unwrap()
        );
        assert_eq!(back.verifying_key, ks.verifying_key);
        assert!(back.signing_seed.is_some());
    }

    #[test]
    fn wrong_passphrase_or_altered_byte_is_refused() {
        let ks = KeySet::generate(&mut rng());
        let sealed = ks
            .seal(b"pw", KdfParams::INSECURE_FOR_TESTS, &mut rng())
            .unwrap();
        assert!(matches!(
            KeySet::unseal(&sealed, b"nope"),
            Err(KeyError::Unseal)
        ));
        for i in [5, 20, 40, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(KeySet::unseal(&bad, b"pw").is_err(), "byte {i}");
        }
        // Four bytes that are not the key-set file magic.
        const WRONG_MAGIC: &[u8] = b"TGXX";
        assert!(matches!(
            KeySet::unseal(WRONG_MAGIC, b"pw"),
            Err(KeyError::BadMagic)
        ));
        assert!(KeySet::unseal(&sealed[..30], b"pw").is_err());
    }

    #[test]
    fn roles_hold_only_their_masters() {
        let ks = KeySet::generate(&mut rng());
        let v = ks.for_role(Role::ValidatorSam, 42).unwrap();
        assert!(v.get(KeyKind::Debit, 1).is_ok());
        assert!(v.get(KeyKind::Credit, 1).is_err());
        assert!(v.get(KeyKind::Tmac, 1).is_err());
        assert!(v.get(KeyKind::DeviceMaster, 1).is_err());
        assert!(v.signing_seed.is_none());
        // The validator's own device key equals what the gateway derives.
        let g = ks.for_role(Role::Gateway, 0).unwrap();
        assert_eq!(v.device_key(42).unwrap(), g.device_key(42).unwrap());
        assert_ne!(v.device_key(42).unwrap(), g.device_key(43).unwrap());
        // ...but it cannot derive another device's key.
        assert!(v.device_key(43).is_err());
        let f = ks.for_role(Role::FranchiseSam, 7).unwrap();
        assert!(f.get(KeyKind::Credit, 1).is_ok());
        assert!(f.get(KeyKind::Tmac, 1).is_err());
    }

    #[test]
    fn rotation_keeps_old_versions() {
        let mut ks = KeySet::generate(&mut rng());
        let v2 = ks.rotate(KeyKind::Debit, &mut rng());
        assert_eq!(v2, 2);
        assert!(ks.get(KeyKind::Debit, 1).is_ok());
        assert_ne!(
            ks.get(KeyKind::Debit, 1).unwrap(),
            ks.get(KeyKind::Debit, 2).unwrap()
        );
        assert_eq!(ks.latest_version(KeyKind::Debit), Some(2));
    }

    #[test]
    fn terminals_hold_current_and_previous_until_retired() {
        let mut ks = KeySet::generate(&mut rng());
        assert_eq!(ks.rotate_card_keys(&mut rng()).unwrap(), 2);
        assert_eq!(ks.card_version(), Some(2));
        let v = ks.for_role(Role::ValidatorSam, 9).unwrap();
        assert_eq!(v.versions(KeyKind::Debit), vec![2, 1]);
        assert!(v.get(KeyKind::App, 2).is_err());
        // A third version pushes the first out of the SAMs, not out of the HSM.
        assert_eq!(ks.rotate_card_keys(&mut rng()).unwrap(), 3);
        let v = ks.for_role(Role::ValidatorSam, 9).unwrap();
        assert_eq!(v.versions(KeyKind::Debit), vec![3, 2]);
        let f = ks.for_role(Role::FranchiseSam, 9).unwrap();
        assert_eq!(f.versions(KeyKind::Credit), vec![3, 2]);
        let h = ks.for_role(Role::Hsm, 0).unwrap();
        assert_eq!(h.versions(KeyKind::Tmac), vec![3, 2, 1]);
        // Retiring: never the current version, never one not held.
        assert!(ks.retire(3).is_err());
        assert!(ks.retire(9).is_err());
        ks.retire(2).unwrap();
        let v = ks.for_role(Role::ValidatorSam, 9).unwrap();
        assert_eq!(v.versions(KeyKind::Debit), vec![3]);
        assert!(v.is_retired(2));
        let h = ks.for_role(Role::Hsm, 0).unwrap();
        assert_eq!(h.versions(KeyKind::App), vec![3, 2, 1]);
        // The retirement survives sealing.
        let sealed = ks
            .seal(b"pw", KdfParams::INSECURE_FOR_TESTS, &mut rng())
            .unwrap();
        let back = KeySet::unseal(&sealed, b"pw").unwrap();
        assert_eq!(back.retired, vec![2]);
        assert_eq!(back.card_version(), Some(3));
    }

    #[test]
    fn signing_key_rotates_beside_the_old_one_until_retired() {
        let mut ks = KeySet::generate(&mut rng());
        let v1 = ks.verifying_key;
        assert_eq!(ks.trusted_signing_keys(), TrustedKeys::single(v1));
        assert_eq!(ks.rotate_signing(&mut rng()).unwrap(), 2);
        let v2 = ks.verifying_key;
        assert_ne!(v1, v2);
        // The seed signs as the new public key says.
        let sk = ed25519_dalek::SigningKey::from_bytes(ks.signing_seed.as_ref().unwrap());
        assert_eq!(sk.verifying_key().to_bytes(), v2);
        let t = ks.trusted_signing_keys();
        assert_eq!(t.accepted_versions(), vec![2, 1]);
        // A validator's cut carries both public keys, never a seed.
        let v = ks.for_role(Role::ValidatorSam, 4).unwrap();
        assert!(v.signing_seed.is_none());
        assert_eq!(v.trusted_signing_keys(), t);
        assert!(v.clone().rotate_signing(&mut rng()).is_err());
        // Retiring: never the current version, never one not held.
        assert!(ks.retire_signing(2).is_err());
        assert!(ks.retire_signing(7).is_err());
        ks.retire_signing(1).unwrap();
        let t = ks.trusted_signing_keys();
        assert_eq!(t.accepted_versions(), vec![2]);
        assert_eq!(
            t.render().lines().nth(1),
            Some(&format!("v1 {} retired", hex::encode(v1))[..])
        );
        let sealed = ks
            .seal(b"pw", KdfParams::INSECURE_FOR_TESTS, &mut rng())
            .unwrap();
        let back = KeySet::unseal(&sealed, b"pw").unwrap();
        assert_eq!(back.trusted_signing_keys(), t);
        assert_eq!(back.signing_version, 2);
    }

    #[test]
    fn device_master_rotates_and_the_gateway_ring_follows() {
        let mut ks = KeySet::generate(&mut rng());
        let old = ks.device_key(5).unwrap();
        assert_eq!(ks.rotate_device_master(&mut rng()).unwrap(), 2);
        // A validator provisioned now MACs with the new version's key.
        let v = ks.for_role(Role::ValidatorSam, 5).unwrap();
        let new = v.device_key(5).unwrap();
        assert_ne!(new.expose_secret(), old.expose_secret());
        assert_eq!(
            new.expose_secret(),
            ks.device_key_at(5, 2).unwrap().expose_secret()
        );
        let g = ks.for_role(Role::Gateway, 0).unwrap();
        let ring = g.device_key_ring(5).unwrap();
        let versions: Vec<u8> = ring.accepted.iter().map(|k| k.0).collect();
        assert_eq!(versions, vec![2, 1]);
        assert_eq!(ring.accepted[1].1.expose_secret(), old.expose_secret());
        assert!(ring.retired.is_empty());
        assert!(ks.retire_device_master(2).is_err());
        assert!(ks.retire_device_master(9).is_err());
        ks.retire_device_master(1).unwrap();
        let sealed = ks
            .for_role(Role::Gateway, 0)
            .unwrap()
            .seal(b"pw", KdfParams::INSECURE_FOR_TESTS, &mut rng())
            .unwrap();
        let g = KeySet::unseal(&sealed, b"pw").unwrap();
        assert_eq!(g.retired_device, vec![1]);
        let ring = g.device_key_ring(5).unwrap();
        assert_eq!(ring.accepted.len(), 1);
        assert_eq!(ring.accepted[0].0, 2);
        assert_eq!(ring.retired[0].0, 1);
        assert_eq!(ring.retired[0].1.expose_secret(), old.expose_secret());
    }
}
