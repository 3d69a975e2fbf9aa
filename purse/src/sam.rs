//! The terminal side of the card protocol: the [`Sam`] a validator or franchise terminal holds,
//! the [`Hsm`] the back office holds, and software implementations of both.
//!
//! Both run the PCD side of AuthenticateEV2First through [`Authenticator`] (the card key is
//! diversified inside them and never leaves), hand back a secure-messaging [`Channel`], and
//! build value commands (`wrap_value`) so a role check — "a validator SAM has no credit key",
//! "a franchise SAM loads only under its ceiling" — sits where the key is.
//!
//! What each software implementation holds is exactly its [`Role`]'s cut of the key set
//! ([`KeySet::for_role`]): a validator SAM has KM_DEBIT and its own device key; a franchise SAM
//! adds KM_CREDIT behind a ceiling; only the HSM holds KM_TMAC, KM_APP and KM_DEVICE.

use crate::apdu::ins;
use crate::crypto::{self, AesKey};
use crate::keys::{KeyError, KeyKind, KeySet, Role};
use crate::receipt::{CommitReceipt, TxClaim};
use crate::rekey::KeyChange;
use crate::sm::{Channel, CommMode, SmError};
use rand_core::RngCore;
use zeroize::{Zeroize, Zeroizing};

/// Errors from SAMs and HSMs.
#[derive(Debug, thiserror::Error)]
pub enum SamError {
    /// The SAM does not hold the key this needs (e.g. a validator asked for a credit key).
    #[error("this {role:?} does not hold a {kind} key version {version}")]
    KeyNotHeld {
        /// the SAM's role
        role: Role,
        /// key kind name
        kind: &'static str,
        /// key version
        version: u8,
    },
    /// The card's authentication answer is malformed or proves a different key.
    #[error("card authentication failed: {0}")]
    CardAuthentication(&'static str),
    /// A franchise load would exceed the SAM's remaining credit ceiling.
    #[error("credit ceiling exceeded: {requested_minor} requested, {remaining_minor} remaining")]
    CeilingExceeded {
        /// amount asked for
        requested_minor: i32,
        /// ceiling left
        remaining_minor: i64,
    },
    /// The card's transaction MAC does not verify: the transaction did not come from the card.
    #[error("transaction MAC does not verify for card {uid} counter {tmc}")]
    TmacMismatch {
        /// card UID hex
        uid: String,
        /// counter
        tmc: u32,
    },
    /// The operation is not something this role does.
    #[error("{0} is not allowed for this role")]
    NotAllowed(&'static str),
    /// Secure messaging failed.
    #[error(transparent)]
    Sm(#[from] SmError),
    /// A key lookup failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The HSM itself failed (token removed, session lost, a mechanism refused): no verdict
    /// on the card or the claim; retry later.
    #[error("HSM failure: {0}")]
    Hsm(String),
}

/// The terminal's half-finished authentication (RndA, RndB and the card key), zeroized on drop.
pub struct PendingAuth {
    key: PendingKey,
    rnd_a: [u8; 16],
    rnd_b: [u8; 16],
}

/// Where the card key of a half-finished authentication is.
enum PendingKey {
    /// In this process (the software SAM and HSM). The expanded key (≈ 700 bytes, zeroized on
    /// drop by `aes`) is boxed once, so that handing the pending authentication from part 1
    /// to part 2 moves a pointer, not the key schedule.
    Clear {
        key: AesKey,
        cipher: Box<aes::Aes128>,
    },
    /// Inside a hardware token; only a handle is here.
    External(Box<dyn ExternalCardKey>),
}

/// A diversified card key that stays inside a hardware token (an HSM over PKCS#11): the
/// operations the PCD side of AuthenticateEV2First needs, run by the token. The protocol
/// itself (RndA, RndB', the session vectors) stays here in `purse`.
pub trait ExternalCardKey: Send + Sync {
    /// AES-128-CBC with a zero IV, in place (whole blocks).
    fn cbc_encrypt(&mut self, data: &mut [u8]) -> Result<(), SamError>;
    /// AES-128-CBC decryption with a zero IV, in place (whole blocks).
    fn cbc_decrypt(&mut self, data: &mut [u8]) -> Result<(), SamError>;
    /// The full 16-byte AES-CMAC of `msg` (the EV2 session keys are CMACs of SV1 and SV2:
    /// they leave the token because every APDU's secure messaging runs in [`Channel`]).
    fn cmac(&mut self, msg: &[u8]) -> Result<[u8; 16], SamError>;
}

impl Drop for PendingAuth {
    fn drop(&mut self) {
        self.rnd_a.zeroize();
        self.rnd_b.zeroize();
    }
}

impl std::fmt::Debug for PendingAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingAuth(<secret>)")
    }
}

/// A diversified card key an [`Authenticator`] authenticates with: in this process, or
/// inside a hardware token.
pub enum CardKey {
    /// In this process (the software SAM and HSM).
    Clear(AesKey),
    /// Inside a hardware token (see [`ExternalCardKey`]).
    External(Box<dyn ExternalCardKey>),
}

impl std::fmt::Debug for CardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CardKey::Clear(_) => f.write_str("CardKey::Clear(<secret>)"),
            CardKey::External(_) => f.write_str("CardKey::External(<token object>)"),
        }
    }
}

/// PCD part 1: from E(K, RndB) build E(K, RndA ‖ RndB') (32 bytes, the AF frame's data).
pub fn pcd_auth_part1(
    key: CardKey,
    ek_rnd_b: &[u8],
    rng: &mut dyn RngCore,
) -> Result<(PendingAuth, [u8; 32]), SamError> {
    let mut key = match key {
        CardKey::Clear(key) => {
            let cipher = Box::new(key.cipher());
            PendingKey::Clear { key, cipher }
        }
        CardKey::External(key) => PendingKey::External(key),
    };
    let mut rnd_b: [u8; 16] = ek_rnd_b
        .try_into()
        .map_err(|_| SamError::CardAuthentication("E(RndB) is not 16 bytes"))?;
    key.decrypt(&mut rnd_b)?;
    let mut rnd_a = [0u8; 16];
    rng.fill_bytes(&mut rnd_a);
    let mut frame = [0u8; 32];
    frame[..16].copy_from_slice(&rnd_a);
    frame[16..].copy_from_slice(&crypto::rotate_left_1(&rnd_b));
    key.encrypt(&mut frame)?;
    Ok((PendingAuth { key, rnd_a, rnd_b }, frame))
}

/// One way of AES-128-CBC with an expanded key ([`crypto::cbc_encrypt_with`],
/// [`crypto::cbc_decrypt_with`]).
type ClearCbc = fn(&aes::Aes128, &[u8; 16], &mut [u8]) -> Result<(), crypto::CryptoError>;

impl PendingKey {
    fn encrypt(&mut self, data: &mut [u8]) -> Result<(), SamError> {
        self.cbc(data, crypto::cbc_encrypt_with, |k, d| k.cbc_encrypt(d))
    }

    fn decrypt(&mut self, data: &mut [u8]) -> Result<(), SamError> {
        self.cbc(data, crypto::cbc_decrypt_with, |k, d| k.cbc_decrypt(d))
    }

    /// AES-128-CBC with a zero IV in place (whole blocks), one way: `clear` with the key
    /// schedule held here, `external` inside the token.
    fn cbc(
        &mut self,
        data: &mut [u8],
        clear: ClearCbc,
        external: fn(&mut dyn ExternalCardKey, &mut [u8]) -> Result<(), SamError>,
    ) -> Result<(), SamError> {
        match self {
            PendingKey::Clear { cipher, .. } => {
                clear(cipher, &[0; 16], data).expect("whole blocks");
                Ok(())
            }
            PendingKey::External(k) => external(k.as_mut(), data),
        }
    }

    fn session_keys(
        &mut self,
        rnd_a: &[u8; 16],
        rnd_b: &[u8; 16],
    ) -> Result<crypto::SessionKeys, SamError> {
        match self {
            PendingKey::Clear { key, .. } => Ok(crypto::ev2_session_keys(key, rnd_a, rnd_b)),
            PendingKey::External(k) => {
                let mut sv1 = crypto::session_vector([0xA5, 0x5A], rnd_a, rnd_b);
                let mut sv2 = crypto::session_vector([0x5A, 0xA5], rnd_a, rnd_b);
                let enc = k.cmac(&sv1);
                let mac = k.cmac(&sv2);
                sv1.zeroize();
                sv2.zeroize();
                let (mut enc, mut mac) = (enc?, mac?);
                let keys = crypto::SessionKeys {
                    enc: AesKey::from_bytes(enc),
                    mac: AesKey::from_bytes(mac),
                };
                enc.zeroize();
                mac.zeroize();
                Ok(keys)
            }
        }
    }
}

/// PCD part 2: check the card's E(K, TI ‖ RndA' ‖ PDcap2 ‖ PCDcap2) and derive the session.
pub fn pcd_auth_part2(mut pending: PendingAuth, card_resp: &[u8]) -> Result<Channel, SamError> {
    let mut buf: [u8; 32] = card_resp
        .try_into()
        .map_err(|_| SamError::CardAuthentication("answer is not 32 bytes"))?;
    pending.key.decrypt(&mut buf)?;
    let expect = crypto::rotate_left_1(&pending.rnd_a);
    if !crypto::mac_eq(&buf[4..20], &expect) {
        buf.zeroize();
        return Err(SamError::CardAuthentication(
            "card did not prove the key (RndA' mismatch)",
        ));
    }
    let ti: [u8; 4] = buf[..4].try_into().expect("4");
    buf.zeroize();
    let keys = pending.key.session_keys(&pending.rnd_a, &pending.rnd_b)?;
    Ok(Channel::new(keys, ti))
}

/// The reader id (TMRI) a terminal SAM commits in its transactions (CommitReaderID):
/// `"TGRID"` ‖ 7 zero bytes ‖ device id (u32 BE). The card binds it into the transaction MAC,
/// so a franchise report proves which franchise's SAM made the load.
pub fn reader_id_of_device(device_id: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..5].copy_from_slice(b"TGRID");
    r[12..].copy_from_slice(&device_id.to_be_bytes());
    r
}

/// Whether a back-office HSM may open an EV2 session with a card key of `kind`: never with
/// the transaction-MAC key, which it holds only to check the card's transaction MACs (a
/// session under K_TM would let whoever drives the HSM compute them). The one copy of the
/// refusal: [`SoftwareHsm`] and `tapgate-pkcs11`'s token HSM both call it from
/// [`Authenticator::holds_version`] and [`Authenticator::auth_key`].
pub fn hsm_may_authenticate(kind: KeyKind) -> Result<(), SamError> {
    if kind == KeyKind::Tmac {
        return Err(SamError::NotAllowed("authenticating with the TMAC key"));
    }
    Ok(())
}

/// Runs the terminal side of the EV2 authentication with a diversified card key it holds.
pub trait Authenticator {
    /// The card key of `kind`/`version` for card `uid`, if this may authenticate with it.
    fn auth_key(&self, kind: KeyKind, version: u8, uid: &[u8; 7]) -> Result<CardKey, SamError>;

    /// Part 1 with the card key of `kind`/`version` for card `uid` ([`Self::auth_key`]).
    fn auth_part1(
        &mut self,
        kind: KeyKind,
        version: u8,
        uid: &[u8; 7],
        ek_rnd_b: &[u8],
        rng: &mut dyn RngCore,
    ) -> Result<(PendingAuth, [u8; 32]), SamError> {
        pcd_auth_part1(self.auth_key(kind, version, uid)?, ek_rnd_b, rng)
    }

    /// Whether this holds the master of `kind` at `version` (cards carry the version they hold).
    fn holds_version(&self, kind: KeyKind, version: u8) -> bool;

    /// Whether the operator retired `version` of `kind` for this holder (`tapgate keys retire`):
    /// a card still on it is refused with its own reason and migrated at its next online load.
    fn retired_version(&self, kind: KeyKind, version: u8) -> bool {
        let _ = (kind, version);
        false
    }

    /// The reader id this SAM commits in every value transaction (CommitReaderID), if any: a
    /// franchise SAM commits its own ([`reader_id_of_device`]); validators and the HSM none.
    fn reader_id(&self) -> Option<[u8; 16]> {
        None
    }

    /// Part 2: verify the card and open the secure channel.
    fn auth_part2(&mut self, pending: PendingAuth, card_resp: &[u8]) -> Result<Channel, SamError> {
        pcd_auth_part2(pending, card_resp)
    }

    /// Whether this may build the value command `code` for `amount_minor` (and counts it, for
    /// a franchise SAM's ceiling). Implementations refuse what their role may not do; by
    /// default everything is allowed (the back office's HSM).
    fn authorize_value(&mut self, code: u8, amount_minor: i32) -> Result<(), SamError> {
        let _ = (code, amount_minor);
        Ok(())
    }

    /// Builds a Debit / Credit / LimitedCredit command body (FULL mode) in the session, if
    /// [`Self::authorize_value`] allows it.
    fn wrap_value(
        &mut self,
        channel: &mut Channel,
        code: u8,
        amount_minor: i32,
    ) -> Result<Vec<u8>, SamError> {
        self.authorize_value(code, amount_minor)?;
        let mut data = [0u8; 4];
        data.copy_from_slice(&amount_minor.to_le_bytes());
        Ok(channel.wrap_command(code, &[crate::card::FILE_VALUE], &data, CommMode::Full)?)
    }
}

/// A terminal SAM (validator or franchise terminal).
pub trait Sam: Authenticator {
    /// The device this SAM belongs to.
    fn device_id(&self) -> u32;
    /// The device MAC over a tap record body (AES-CMAC truncated, device key).
    fn device_mac(&self, body: &[u8]) -> [u8; 8];
    /// The device key (to hand to the tap-record signer). Never log it.
    fn device_key(&self) -> &AesKey;
}

/// An [`Hsm`] method making a device grant (`$grant`: [`CeilingGrant`], [`ActionGrant`]) of
/// `device_id`, `seq` and the amount field `$amount`, MAC'd over `$grant::mac_input` with the
/// device's key ([`Hsm::device_mac_for`]).
macro_rules! device_grant {
    ($(#[$doc:meta])* $name:ident -> $grant:ident { $amount:ident }) => {
        $(#[$doc])*
        fn $name(&self, device_id: u32, seq: u32, $amount: i64) -> Result<$grant, SamError> {
            let input = $grant::mac_input(device_id, seq, $amount);
            Ok($grant {
                device_id,
                seq,
                $amount,
                mac: self.device_mac_for(device_id, &input)?,
            })
        }
    };
}

/// The back office's key holder.
pub trait Hsm: Authenticator {
    /// The transaction MAC the card must have produced for `claim` (8 bytes over
    /// [`TxClaim::tm_input`] with the card's session TM key), computed where the TMAC key lives.
    fn transaction_mac(&self, claim: &TxClaim) -> Result<[u8; 8], SamError>;
    /// Verifies the card's transaction MAC on a committed change. Only the HSM can do this: the
    /// proof is built here, after a constant-time comparison, and nowhere else.
    fn verify_tmac(&self, receipt: &CommitReceipt) -> Result<TmacVerified, SamError> {
        self.verify_claim(&receipt.to_claim())
    }
    /// Verifies a claimed value change (a reported franchise load, a cleared tap, a torn load
    /// settled from the card's counter): only a change the card really made has a transaction
    /// MAC that verifies. The [`TmacVerified`] it returns is the only way to one.
    fn verify_claim(&self, claim: &TxClaim) -> Result<TmacVerified, SamError> {
        if claim.amount_minor < 0 {
            return Err(SamError::NotAllowed("a negative amount"));
        }
        let want = self.transaction_mac(claim)?;
        let mut verified = crypto::mac_eq(&want, &claim.tmv);
        // A card torn between two ChangeKeys of a rotation authenticates with one version
        // while its TMAC key may hold the other: the other versions held are tried too.
        for v in self.tmac_versions() {
            if verified {
                break;
            }
            if v != claim.key_version {
                let mut other = claim.clone();
                other.key_version = v;
                verified = crypto::mac_eq(&self.transaction_mac(&other)?, &claim.tmv);
            }
        }
        if !verified {
            return Err(SamError::TmacMismatch {
                uid: hex::encode_upper(claim.uid),
                tmc: claim.tmc,
            });
        }
        Ok(TmacVerified {
            receipt: claim.clone().into_verified(),
            _proof: HsmChecked,
        })
    }
    /// The card-key version cards are moved to at their next online load (the newest version
    /// held of every card master, [`KeySet::card_version`]); `None`: no rotation here.
    fn card_key_version(&self) -> Option<u8> {
        None
    }
    /// The versions of KM_TMAC this HSM holds (newest first), which [`Hsm::verify_claim`] tries
    /// after the claim's own. None by default.
    fn tmac_versions(&self) -> Vec<u8> {
        Vec::new()
    }
    /// ChangeKey's plaintext ([`crate::rekey::change_key_data`]) for `change` (a card key of
    /// one card, from one version to another): computed where the masters are
    /// ([`KeyChange::plaintext`]), for [`crate::rekey::Rekey`] to encrypt under the session. An
    /// HSM that cannot do it says so.
    fn change_key_data(&self, change: &KeyChange) -> Result<Zeroizing<Vec<u8>>, SamError> {
        let _ = change;
        Err(SamError::NotAllowed("ChangeKey on this HSM"))
    }
    /// The device MAC over `body` with `device_id`'s key (AES-CMAC, EV2-truncated): what
    /// [`Hsm::ceiling_grant`] and [`Hsm::verify_device_mac`] compute. By default with the device
    /// key in memory; an HSM that can compute it where the key lives does so.
    fn device_mac_for(&self, device_id: u32, body: &[u8]) -> Result<[u8; 8], SamError> {
        Ok(crypto::mac8(&self.device_key(device_id)?, body))
    }
    device_grant! {
        /// A ceiling grant for a franchise SAM (authenticated with that device's key).
        ceiling_grant -> CeilingGrant { amount_minor }
    }
    device_grant! {
        /// A validator's action-list ceiling for `device_id`: the total the back office has
        /// granted it so far, numbered (authenticated with that device's key).
        action_grant -> ActionGrant { total_minor }
    }
    /// Verifies a device MAC (constant-time) for `device_id`.
    fn verify_device_mac(&self, device_id: u32, body: &[u8], mac: &[u8]) -> Result<bool, SamError> {
        Ok(crypto::mac_eq(&self.device_mac_for(device_id, body)?, mac))
    }
    /// The device key for `device_id` (provisioning a validator SAM).
    fn device_key(&self, device_id: u32) -> Result<AesKey, SamError>;
    /// The card's credit key (version `version`) wrapped for an action-list order
    /// ([`crate::actionlist::wrap_card_key`] under [`crate::actionlist::derive_wrap_key`]): what
    /// lets a validator's SAM credit this card, and no other, without the credit master. An HSM
    /// that cannot do it in its token says so.
    fn wrap_order_key(&self, uid: &[u8; 7], version: u8) -> Result<[u8; 16], SamError> {
        let _ = (uid, version);
        Err(SamError::NotAllowed(
            "wrapping a card's credit key for the action list on this HSM",
        ))
    }
    /// Ed25519 signature over `msg` (blocklists, fare tables).
    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], SamError>;
    /// The public key devices verify signatures with.
    fn verifying_key(&self) -> [u8; 32];
}

/// An online replenishment of a franchise SAM's credit ceiling, MAC'd by the back office with
/// the SAM's device key. The SAM accepts each sequence number once, in increasing order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CeilingGrant {
    /// The franchise terminal's device id.
    pub device_id: u32,
    /// Grant sequence number (strictly increasing per device).
    pub seq: u32,
    /// Amount added to the ceiling, minor units.
    pub amount_minor: i64,
    /// `MACt(device key, "CEIL" ‖ device_id BE ‖ seq BE ‖ amount BE)`.
    pub mac: [u8; 8],
}

impl CeilingGrant {
    /// The bytes the grant MAC covers.
    pub fn mac_input(device_id: u32, seq: u32, amount_minor: i64) -> [u8; 20] {
        grant_mac_input(b"CEIL", device_id, seq, amount_minor)
    }
}

/// What a device grant's MAC covers: `tag ‖ device_id BE ‖ seq BE ‖ amount BE` (the tag keeps
/// a franchise's `CEIL` grant, a validator's `ACTC` grant, a tap record and a confirmation
/// apart under the same device key).
fn grant_mac_input(tag: &[u8; 4], device_id: u32, seq: u32, amount_minor: i64) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[..4].copy_from_slice(tag);
    m[4..8].copy_from_slice(&device_id.to_be_bytes());
    m[8..12].copy_from_slice(&seq.to_be_bytes());
    m[12..20].copy_from_slice(&amount_minor.to_be_bytes());
    m
}

/// A validator's action-list credit ceiling: the *total* the back office has granted the
/// device so far (not an increment), numbered and MAC'd with the device's key. Cumulative, so a
/// validator that missed grants catches up from the latest one (the gateway keeps it retained
/// on the device's topic); the SAM takes only a newer number and never a smaller total. The
/// back office grants so that the total minus the device's pick-ups cleared stays within its
/// exposure limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionGrant {
    /// The validator's device id.
    pub device_id: u32,
    /// Grant number (strictly increasing per device).
    pub seq: u32,
    /// Total granted so far, minor units.
    pub total_minor: i64,
    /// `MACt(device key, "ACTC" ‖ device_id BE ‖ seq BE ‖ total BE)`.
    pub mac: [u8; 8],
}

/// Bytes of an encoded [`ActionGrant`].
pub const ACTION_GRANT_LEN: usize = 28;

impl ActionGrant {
    /// The bytes the grant MAC covers (`ACTC` keeps it apart from a franchise's `CEIL` grant,
    /// a tap record and a confirmation under the same device key).
    pub fn mac_input(device_id: u32, seq: u32, total_minor: i64) -> [u8; 20] {
        grant_mac_input(b"ACTC", device_id, seq, total_minor)
    }

    /// The wire form: the MAC input's fields after `ACTC`, then the MAC (28 bytes).
    pub fn encode(&self) -> [u8; ACTION_GRANT_LEN] {
        let mut b = [0u8; ACTION_GRANT_LEN];
        b[..20].copy_from_slice(&Self::mac_input(self.device_id, self.seq, self.total_minor));
        b[20..].copy_from_slice(&self.mac);
        b[..4].copy_from_slice(b"ACTC");
        b
    }

    /// Reads the wire form (the MAC is checked by the SAM that applies it).
    pub fn decode(b: &[u8]) -> Option<ActionGrant> {
        if b.len() != ACTION_GRANT_LEN || &b[..4] != b"ACTC" {
            return None;
        }
        Some(ActionGrant {
            device_id: u32::from_be_bytes(b[4..8].try_into().ok()?),
            seq: u32::from_be_bytes(b[8..12].try_into().ok()?),
            total_minor: i64::from_be_bytes(b[12..20].try_into().ok()?),
            mac: b[20..28].try_into().ok()?,
        })
    }
}

/// Proof that the HSM verified a card's transaction MAC: what the back office's ledger takes to
/// post a cleared tap, a franchise load or a completed load. Built only by
/// [`Hsm::verify_claim`] (and [`Hsm::verify_tmac`]), so another crate cannot:
///
/// ```compile_fail
/// # fn forge(receipt: purse::receipt::CommitReceipt) {
/// let forged = purse::sam::TmacVerified { receipt };
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TmacVerified {
    receipt: CommitReceipt,
    _proof: HsmChecked,
}

impl TmacVerified {
    /// The verified change.
    pub fn receipt(&self) -> &CommitReceipt {
        &self.receipt
    }

    /// For tests of code downstream of the HSM (other crates' tests and benches): only with
    /// the `test-support` feature, never in production builds.
    #[cfg(any(test, feature = "test-support"))]
    pub fn for_tests(receipt: CommitReceipt) -> Self {
        TmacVerified {
            receipt,
            _proof: HsmChecked,
        }
    }
}

/// Zero-sized witness that the HSM checked a transaction MAC; private to this module.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HsmChecked;

/// A software SAM: a validator's or a franchise terminal's key store.
pub struct SoftwareSam {
    role: Role,
    keys: KeySet,
    device_id: u32,
    device_key: AesKey,
    /// The device key's CMAC state, expanded once (tap signing is on the hot path).
    device_mac: cmac::Cmac<aes::Aes128>,
    /// Remaining credit ceiling (minor units): a franchise SAM's loads, a validator SAM's
    /// action-list pick-ups.
    ceiling_minor: i64,
    /// The last ceiling grant applied.
    last_grant_seq: u32,
    /// Action-list orders this SAM authorised a credit for, with their expiry (each once).
    picked_up: std::collections::BTreeMap<u64, u64>,
    /// A validator SAM's action-list grant applied last (its number and total).
    action_grant: (u32, i64),
}

impl std::fmt::Debug for SoftwareSam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareSam")
            .field("role", &self.role)
            .field("device_id", &self.device_id)
            .field("ceiling_minor", &self.ceiling_minor)
            .finish_non_exhaustive()
    }
}

impl SoftwareSam {
    /// A validator SAM from its key set (cut with [`Role::ValidatorSam`]). Any credit, TMAC,
    /// app or device-master key present in `keys` is dropped, not held.
    pub fn validator(keys: &KeySet, device_id: u32) -> Result<Self, SamError> {
        Self::with_role(keys, Role::ValidatorSam, device_id, 0)
    }

    /// A franchise SAM with a credit ceiling.
    pub fn franchise(keys: &KeySet, device_id: u32, ceiling_minor: i64) -> Result<Self, SamError> {
        Self::with_role(keys, Role::FranchiseSam, device_id, ceiling_minor)
    }

    /// A SAM of `role` holding what `keys` cuts for that role and `device_id`, with a credit
    /// ceiling of `ceiling_minor`, no grant applied and no order picked up yet.
    fn with_role(
        keys: &KeySet,
        role: Role,
        device_id: u32,
        ceiling_minor: i64,
    ) -> Result<Self, SamError> {
        let keys = keys.for_role(role, device_id)?;
        let device_key = keys.device_key(device_id)?;
        Ok(SoftwareSam {
            role,
            keys,
            device_id,
            device_mac: crypto::cmac_state(&device_key),
            device_key,
            ceiling_minor,
            last_grant_seq: 0,
            picked_up: std::collections::BTreeMap::new(),
            action_grant: (0, 0),
        })
    }

    /// Opens an action-list pick-up of `order` at `now_s` (unix seconds): an [`Authenticator`]
    /// that authenticates only with that card's credit key (unwrapped from the order with a
    /// key derived from KM_DEBIT, [`crate::actionlist::derive_wrap_key`]) and authorises only
    /// one Credit of the order's amount, within this SAM's remaining ceiling, once per order
    /// (an order authorised here before is refused, whatever became of it). A validator SAM
    /// holds no credit master: a card not on a list it verified cannot be credited at all.
    pub fn pickup<'a>(
        &'a mut self,
        order: &'a crate::actionlist::ListedOrder,
        now_s: u64,
    ) -> Result<PickupSam<'a>, SamError> {
        if self.role != Role::ValidatorSam {
            return Err(SamError::NotAllowed("an action-list pick-up on this SAM"));
        }
        if !order.order().live_at(now_s) {
            return Err(SamError::NotAllowed("an expired order"));
        }
        // Orders past their expiry can never be authorised again: forget them (bounded).
        self.picked_up.retain(|_, expires_s| *expires_s > now_s);
        if self.picked_up.contains_key(&order.order().order_id) {
            return Err(SamError::NotAllowed("an order this SAM already credited"));
        }
        Ok(PickupSam { sam: self, order })
    }

    /// Applies a validator's action-list ceiling grant ([`ActionGrant`]): refused unless its
    /// MAC verifies under this SAM's device key, its number is newer than the last one applied
    /// and its total is not smaller; the remaining ceiling grows by what the total added.
    pub fn apply_action_grant(&mut self, grant: &ActionGrant) -> Result<(), SamError> {
        if self.role != Role::ValidatorSam {
            return Err(SamError::NotAllowed("an action-list grant on this SAM"));
        }
        let input = ActionGrant::mac_input(grant.device_id, grant.seq, grant.total_minor);
        if !self.grant_verifies(grant.device_id, &input, &grant.mac) {
            return Err(SamError::NotAllowed("an action grant that does not verify"));
        }
        let (seq, total) = self.action_grant;
        if grant.seq <= seq {
            return Err(SamError::NotAllowed("a replayed action grant"));
        }
        if grant.total_minor < total {
            return Err(SamError::NotAllowed(
                "an action grant below the total granted",
            ));
        }
        self.ceiling_minor += grant.total_minor - total;
        self.action_grant = (grant.seq, grant.total_minor);
        Ok(())
    }

    /// A software validator SAM brought back after a restart: the last grant it applied and
    /// what it had spent of the grants (its host journals both; a hardware SAM keeps them
    /// itself). The remaining ceiling is the grant's total less `spent_minor`.
    pub fn restore_action_ceiling(
        &mut self,
        grant: &ActionGrant,
        spent_minor: i64,
    ) -> Result<(), SamError> {
        if self.action_grant != (0, 0) || spent_minor < 0 {
            return Err(SamError::NotAllowed("restoring a SAM in use"));
        }
        self.apply_action_grant(grant)?;
        self.ceiling_minor -= spent_minor;
        Ok(())
    }

    /// The last action-list grant applied: its number and total (0, 0 before the first).
    pub fn action_grant(&self) -> (u32, i64) {
        self.action_grant
    }

    /// The remaining credit ceiling (franchise SAMs).
    pub fn ceiling_minor(&self) -> i64 {
        self.ceiling_minor
    }

    /// Applies a ceiling grant from the back office: refused unless its MAC verifies under
    /// this SAM's device key and its sequence number is newer than the last one applied.
    pub fn apply_ceiling_grant(&mut self, grant: &CeilingGrant) -> Result<(), SamError> {
        if self.role != Role::FranchiseSam {
            return Err(SamError::NotAllowed("replenishing a ceiling"));
        }
        let input = CeilingGrant::mac_input(grant.device_id, grant.seq, grant.amount_minor);
        if !self.grant_verifies(grant.device_id, &input, &grant.mac) {
            return Err(SamError::NotAllowed("a ceiling grant that does not verify"));
        }
        if grant.seq <= self.last_grant_seq {
            return Err(SamError::NotAllowed("a replayed ceiling grant"));
        }
        if grant.amount_minor <= 0 {
            return Err(SamError::NotAllowed("a non-positive ceiling grant"));
        }
        self.last_grant_seq = grant.seq;
        self.ceiling_minor += grant.amount_minor;
        Ok(())
    }

    /// The last ceiling grant sequence number applied.
    pub fn last_grant_seq(&self) -> u32 {
        self.last_grant_seq
    }

    /// Whether a grant is for this SAM's device and its MAC over `input` verifies under the
    /// device key (constant-time).
    fn grant_verifies(&self, device_id: u32, input: &[u8; 20], mac: &[u8; 8]) -> bool {
        device_id == self.device_id && crypto::mac_eq(&crypto::mac8(&self.device_key, input), mac)
    }
}

impl Authenticator for SoftwareSam {
    fn holds_version(&self, kind: KeyKind, version: u8) -> bool {
        self.keys.get(kind, version).is_ok()
    }

    /// Retired by the operator, or older than any version this SAM holds (rotated out).
    fn retired_version(&self, kind: KeyKind, version: u8) -> bool {
        self.keys.is_retired(version)
            || self
                .keys
                .versions(kind)
                .last()
                .is_some_and(|&oldest| version < oldest)
    }

    fn reader_id(&self) -> Option<[u8; 16]> {
        (self.role == Role::FranchiseSam).then(|| reader_id_of_device(self.device_id))
    }

    fn auth_key(&self, kind: KeyKind, version: u8, uid: &[u8; 7]) -> Result<CardKey, SamError> {
        let key = self
            .keys
            .card_key(kind, version, uid)
            .map_err(|_| SamError::KeyNotHeld {
                role: self.role,
                kind: kind.name(),
                version,
            })?;
        Ok(CardKey::Clear(key))
    }

    fn authorize_value(&mut self, code: u8, amount_minor: i32) -> Result<(), SamError> {
        match (self.role, code) {
            (_, ins::DEBIT) | (_, ins::LIMITED_CREDIT) => {}
            (Role::FranchiseSam, ins::CREDIT) => {
                if i64::from(amount_minor) > self.ceiling_minor {
                    return Err(SamError::CeilingExceeded {
                        requested_minor: amount_minor,
                        remaining_minor: self.ceiling_minor,
                    });
                }
                self.ceiling_minor -= i64::from(amount_minor);
            }
            _ => return Err(SamError::NotAllowed("a credit")),
        }
        Ok(())
    }
}

impl Sam for SoftwareSam {
    fn device_id(&self) -> u32 {
        self.device_id
    }
    fn device_mac(&self, body: &[u8]) -> [u8; 8] {
        use cmac::Mac;
        let mut m = self.device_mac.clone();
        m.update(body);
        crypto::truncate_mac(&m.finalize().into_bytes().into())
    }
    fn device_key(&self) -> &AesKey {
        &self.device_key
    }
}

/// A validator SAM during one action-list pick-up ([`SoftwareSam::pickup`]).
pub struct PickupSam<'a> {
    sam: &'a mut SoftwareSam,
    order: &'a crate::actionlist::ListedOrder,
}

impl std::fmt::Debug for PickupSam<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickupSam")
            .field("device_id", &self.sam.device_id)
            .field("order", self.order.order())
            .finish()
    }
}

impl Authenticator for PickupSam<'_> {
    fn holds_version(&self, kind: KeyKind, version: u8) -> bool {
        kind == KeyKind::Credit
            && version == self.order.order().key_version
            && self.sam.keys.get(KeyKind::Debit, version).is_ok()
    }

    fn auth_key(&self, kind: KeyKind, version: u8, uid: &[u8; 7]) -> Result<CardKey, SamError> {
        let o = self.order.order();
        if kind != KeyKind::Credit || version != o.key_version || *uid != o.uid {
            return Err(SamError::KeyNotHeld {
                role: self.sam.role,
                kind: kind.name(),
                version,
            });
        }
        let km = self.sam.keys.get(KeyKind::Debit, version)?;
        let wrap = crate::actionlist::derive_wrap_key(km, uid)
            .map_err(|_| SamError::NotAllowed("deriving the order wrap key"))?;
        Ok(CardKey::Clear(crate::actionlist::unwrap_card_key(
            &wrap,
            &o.wrapped_key,
        )))
    }

    fn authorize_value(&mut self, code: u8, amount_minor: i32) -> Result<(), SamError> {
        let o = self.order.order();
        if code != ins::CREDIT || amount_minor != o.amount_minor {
            return Err(SamError::NotAllowed("anything but the order's credit"));
        }
        if self.sam.picked_up.contains_key(&o.order_id) {
            return Err(SamError::NotAllowed("an order this SAM already credited"));
        }
        if i64::from(amount_minor) > self.sam.ceiling_minor {
            return Err(SamError::CeilingExceeded {
                requested_minor: amount_minor,
                remaining_minor: self.sam.ceiling_minor,
            });
        }
        self.sam.ceiling_minor -= i64::from(amount_minor);
        self.sam.picked_up.insert(o.order_id, o.expires_s);
        Ok(())
    }
}

/// A software HSM: the issuer's full key set, sealed at rest by its owner.
pub struct SoftwareHsm {
    keys: KeySet,
}

impl std::fmt::Debug for SoftwareHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftwareHsm(<secret>)")
    }
}

impl SoftwareHsm {
    /// An HSM over the issuer key set (cut with [`Role::Hsm`]).
    pub fn new(keys: &KeySet) -> Result<Self, SamError> {
        Ok(SoftwareHsm {
            keys: keys.for_role(Role::Hsm, 0)?,
        })
    }

    /// The diversified card keys (for personalising an emulated card).
    pub fn card_keys(&self, uid: &[u8; 7], version: u8) -> Result<crate::card::CardKeys, SamError> {
        Ok(crate::card::CardKeys::derive(&self.keys, uid, version)?)
    }

    /// The card keys an emulated card holds in `state`, each at the version it reports (a card
    /// torn mid-rotation holds some keys at the old version, some at the new).
    pub fn card_keys_of(
        &self,
        state: &crate::card::CardState,
    ) -> Result<crate::card::CardKeys, SamError> {
        Ok(crate::card::CardKeys::derive_each(
            &self.keys,
            &state.uid,
            state.key_versions(),
        )?)
    }
}

impl Authenticator for SoftwareHsm {
    fn holds_version(&self, kind: KeyKind, version: u8) -> bool {
        hsm_may_authenticate(kind).is_ok() && self.keys.get(kind, version).is_ok()
    }

    fn auth_key(&self, kind: KeyKind, version: u8, uid: &[u8; 7]) -> Result<CardKey, SamError> {
        hsm_may_authenticate(kind)?;
        Ok(CardKey::Clear(self.keys.card_key(kind, version, uid)?))
    }
}

impl Hsm for SoftwareHsm {
    fn transaction_mac(&self, claim: &TxClaim) -> Result<[u8; 8], SamError> {
        let k_tm = self
            .keys
            .card_key(KeyKind::Tmac, claim.key_version, &claim.uid)?;
        let ses = crypto::tm_session_mac_key(&k_tm, claim.tmc, &claim.uid);
        Ok(crypto::mac8(&ses, &claim.tm_input()))
    }

    fn device_key(&self, device_id: u32) -> Result<AesKey, SamError> {
        Ok(self.keys.device_key(device_id)?)
    }

    fn tmac_versions(&self) -> Vec<u8> {
        self.keys.versions(KeyKind::Tmac)
    }

    fn card_key_version(&self) -> Option<u8> {
        self.keys.card_version()
    }

    fn change_key_data(&self, change: &KeyChange) -> Result<Zeroizing<Vec<u8>>, SamError> {
        change.plaintext(|v| Ok(self.keys.card_key(change.kind, v, &change.uid)?))
    }

    fn wrap_order_key(&self, uid: &[u8; 7], version: u8) -> Result<[u8; 16], SamError> {
        let card_key = self.keys.card_key(KeyKind::Credit, version, uid)?;
        let wrap_key =
            crate::actionlist::derive_wrap_key(self.keys.get(KeyKind::Debit, version)?, uid)
                .map_err(|_| SamError::NotAllowed("deriving the order wrap key"))?;
        Ok(crate::actionlist::wrap_card_key(&wrap_key, &card_key))
    }

    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], SamError> {
        use ed25519_dalek::Signer;
        let seed = self
            .keys
            .signing_seed
            .as_ref()
            .ok_or(SamError::NotAllowed("signing without the signing key"))?;
        let sk = ed25519_dalek::SigningKey::from_bytes(seed);
        Ok(sk.sign(msg).to_bytes())
    }

    fn verifying_key(&self) -> [u8; 32] {
        self.keys.verifying_key
    }
}
