//! The tap record: what a validator journals, signs with its device key and publishes, and what
//! the gateway verifies. Wire format v3 is fixed-length (80 bytes) and big-endian (see
//! docs/protocol.md):
//!
//! | offset | len | field |
//! |---|---|---|
//! | 0 | 1 | format version (3) |
//! | 1 | 1 | outcome: 0 accepted, else a [`RefusalReason`] code |
//! | 2 | 1 | transaction kind ([`TxKind`]) |
//! | 3 | 1 | card key version |
//! | 4 | 7 | card UID |
//! | 11 | 4 | transaction counter (TMC) the change consumed |
//! | 15 | 4 | amount, minor units (i32) |
//! | 19 | 4 | balance after, minor units (i32) |
//! | 23 | 8 | card transaction MAC (TMV) |
//! | 31 | 4 | device id |
//! | 35 | 8 | device sequence number |
//! | 43 | 8 | device time, unix ms |
//! | 51 | 4 | stop / area id |
//! | 55 | 4 | route id |
//! | 59 | 4 | fare-table version |
//! | 63 | 8 | blocklist version |
//! | 71 | 1 | fare flags ([`TapFlags`]): bit 0 transfer, bit 1 capped, bit 2 penalty; bits 3–7 zero |
//! | 72 | 8 | device MAC: AES-CMAC (EV2-truncated) under the device key over [`mac_input`]: bytes 0..72 ‖ operator length (u64) ‖ operator |
//!
//! Format v2 (79 bytes) is v3 without the flags byte (its MAC at 71, over bytes 0..71): still
//! decoded, for taps journalled before an upgrade, with [`TapRecord::flags`] `None` (not known).
//! Validators write v3 only. The flags are under the device MAC like every other field; a flag
//! bit this code does not know is refused ([`TapError::UnknownFlags`]), never ignored, and a
//! refusal with a flag set is inconsistent.
//!
//! The operator the device serves is not on the wire but under the MAC (since format v2; v1 MAC'd the
//! body alone): a record verifies only for the operator its device signed it for, so a metro
//! device's tap published on a hotel's topics, or forwarded by the hotel's gateway, does not
//! verify as the hotel's ([`decode_verified`](TapRecord::decode_verified) takes the operator).
//!
//! An accepted tap can only be built from a [`CommitReceipt`] (a verified card commit) or a
//! [`SettledClaim`] (a torn debit the card's counter, read under MAC, settled); a decoded tap
//! is a [`TapRecord`] only after its device MAC verified. Nothing else constructs one.

use crate::crypto::{self, AesKey};
use crate::receipt::{CommitReceipt, TxClaim, TxKind};
use crate::txn::SettledClaim;

/// The current wire format version (3: the fare flags byte; 2 had none).
pub const TAP_VERSION: u8 = 3;
/// The length of a v3 tap record on the wire (what validators write).
pub const TAP_LEN: usize = 80;
/// The length of a v2 tap record (still decoded: v3 without the flags byte).
pub const TAP_V2_LEN: usize = 79;
const BODY_LEN: usize = TAP_LEN - 8;

/// The wire length of a tap record of format `version` (`None`: a version this code refuses).
/// Records are self-delimiting by their first byte: a message may hold v2 and v3 records.
pub fn record_len(version: u8) -> Option<usize> {
    match version {
        2 => Some(TAP_V2_LEN),
        3 => Some(TAP_LEN),
        _ => None,
    }
}

/// Splits a payload of concatenated tap records (each v2 or v3, told apart by its version
/// byte) into records. An unknown version or a last record cut short is an error: a caller
/// cannot tell where the records after it begin.
pub fn split_records(payload: &[u8]) -> Result<Vec<&[u8]>, TapError> {
    let mut out = Vec::with_capacity(payload.len() / TAP_LEN + 1);
    let mut rest = payload;
    while let Some(&v) = rest.first() {
        let n = record_len(v).ok_or(TapError::UnknownVersion(v))?;
        if rest.len() < n {
            return Err(TapError::Length {
                expected: n,
                got: rest.len(),
            });
        }
        let (rec, tail) = rest.split_at(n);
        out.push(rec);
        rest = tail;
    }
    Ok(out)
}

/// The fare engine's flags for an accepted tap (format v3's byte 71). The bits are the trip
/// record's (`fare_rules::record::flags`) first three.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TapFlags(u8);

impl TapFlags {
    /// Bit 0: the tap continued a journey under a transfer rule.
    pub const TRANSFER: u8 = 1;
    /// Bit 1: a fare cap reduced the fare.
    pub const CAPPED: u8 = 2;
    /// Bit 2: a missing tap-out penalty was charged.
    pub const PENALTY: u8 = 4;
    const KNOWN: u8 = Self::TRANSFER | Self::CAPPED | Self::PENALTY;
    /// No flag set (a plain fare, a free tap, a pick-up, a refusal).
    pub const NONE: TapFlags = TapFlags(0);

    /// The flags from the fare engine's answer.
    pub fn new(transfer: bool, capped: bool, penalty: bool) -> TapFlags {
        TapFlags(
            (u8::from(transfer) * Self::TRANSFER)
                | (u8::from(capped) * Self::CAPPED)
                | (u8::from(penalty) * Self::PENALTY),
        )
    }

    /// The flags of a wire byte; a bit this code does not define is refused.
    pub fn from_bits(bits: u8) -> Result<TapFlags, TapError> {
        if bits & !Self::KNOWN != 0 {
            return Err(TapError::UnknownFlags(bits));
        }
        Ok(TapFlags(bits))
    }

    /// The wire byte.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// The tap continued a journey under a transfer rule.
    pub fn transfer(self) -> bool {
        self.0 & Self::TRANSFER != 0
    }

    /// A fare cap reduced the fare.
    pub fn capped(self) -> bool {
        self.0 & Self::CAPPED != 0
    }

    /// A missing tap-out penalty was charged.
    pub fn penalty(self) -> bool {
        self.0 & Self::PENALTY != 0
    }
}

wire_code! {
    /// Why a validator refused a card. Stable codes: they are on the wire and in reports.
    pub enum RefusalReason {
        /// 1: the card is on the blocklist.
        Blocklisted = 1,
        /// 2: not enough value for the fare.
        InsufficientValue = 2,
        /// 3: the product (pass, ticket) has expired.
        ExpiredProduct = 3,
        /// 4: an earlier torn transaction on this card could not be settled.
        TornUnresolved = 4,
        /// 5: the card's key version is not held by this validator's SAM.
        UnknownKeyVersion = 5,
        /// 6: the card refused a command or failed authentication.
        CardError = 6,
        /// 7: no fare rule prices this journey.
        FareError = 7,
        /// 8: anything else.
        Other = 8,
        /// 9: the card is still on a key version the operator retired (`tapgate keys retire`):
        /// it is migrated at its next online load.
        KeyVersionRetired = 9,
    }
}

impl RefusalReason {
    /// A short snake_case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            RefusalReason::Blocklisted => "blocklisted",
            RefusalReason::InsufficientValue => "insufficient_value",
            RefusalReason::ExpiredProduct => "expired_product",
            RefusalReason::TornUnresolved => "torn_unresolved",
            RefusalReason::UnknownKeyVersion => "unknown_key_version",
            RefusalReason::CardError => "card_error",
            RefusalReason::FareError => "fare_error",
            RefusalReason::Other => "other",
            RefusalReason::KeyVersionRetired => "key_version_retired",
        }
    }
}

/// A card UID as logs show it: `…` and its last 4 hex digits (`…A1B2`), never the whole UID.
/// Every log line that names a card names it through [`masked_uid`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskedUid(Option<[u8; 2]>);

/// The UID `uid` masked to its last 4 hex digits (a UID shorter than 2 bytes shows as `…`).
pub fn masked_uid(uid: &[u8]) -> MaskedUid {
    MaskedUid(match uid {
        [.., a, b] => Some([*a, *b]),
        _ => None,
    })
}

impl std::fmt::Display for MaskedUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some([a, b]) => write!(f, "\u{2026}{a:02X}{b:02X}"),
            None => f.write_str("\u{2026}"),
        }
    }
}

/// Where and when, from the validator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapMeta {
    /// Device id.
    pub device_id: u32,
    /// The device's sequence number for this tap (strictly increasing per device).
    pub device_seq: u64,
    /// Device time, unix ms (a parameter: this crate reads no clock).
    pub device_time_ms: u64,
    /// Stop or area id.
    pub stop_id: u32,
    /// Route id.
    pub route_id: u32,
    /// Fare-table version in force.
    pub fare_table_version: u32,
    /// Blocklist version held.
    pub blocklist_version: u64,
}

/// Decoding and verification failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TapError {
    /// Not the length of its format version.
    #[error("tap record is {got} bytes, expected {expected}")]
    Length {
        /// expected length
        expected: usize,
        /// actual length
        got: usize,
    },
    /// A format version this code does not know.
    #[error("tap record format version {0} is not supported")]
    UnknownVersion(u8),
    /// Unknown outcome code.
    #[error("unknown outcome code {0}")]
    UnknownOutcome(u8),
    /// Unknown transaction kind.
    #[error("unknown transaction kind {0}")]
    UnknownKind(u8),
    /// A fare flags byte with a bit this code does not define (only bits 0–2 are).
    #[error("tap record fare flags {0:#04x} set a bit this version does not define (known: 0x07 transfer, capped, penalty)")]
    UnknownFlags(u8),
    /// Fields that cannot go together (negative amount, a refusal with a TMV, …).
    #[error("inconsistent tap record: {0}")]
    Inconsistent(&'static str),
    /// The device MAC does not verify under the device's key.
    #[error("device MAC does not verify (forged or altered tap, or the wrong device key)")]
    BadMac,
    /// No key is known for the device.
    #[error("no key for device {0}")]
    UnknownDevice(u32),
}

/// Zero-sized witness: the record was built from a verified commit or its MAC was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Checked;

/// A tap record: built from a verified commit ([`TapRecord::accepted`]), a torn debit the
/// card's counter settled ([`TapRecord::settled`]), a refusal that moved no value
/// ([`TapRecord::refused`]), or decoded with its device MAC checked
/// ([`TapRecord::decode_verified`]). Its fields are read through getters; another crate cannot
/// write one:
///
/// ```compile_fail
/// use purse::tap::{TapMeta, TapRecord};
/// use purse::receipt::TxKind;
/// let forged = TapRecord {
///     refusal: None, kind: TxKind::Debit, key_version: 1, uid: [4; 7], tmc: 1,
///     amount_minor: 100, balance_after_minor: 0, tmv: [0; 8], meta: TapMeta::default(),
///     flags: None,
/// };
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapRecord {
    refusal: Option<RefusalReason>,
    kind: TxKind,
    key_version: u8,
    uid: [u8; 7],
    tmc: u32,
    amount_minor: i32,
    balance_after_minor: i32,
    tmv: [u8; 8],
    meta: TapMeta,
    flags: Option<TapFlags>,
    _checked: Checked,
}

impl TapRecord {
    /// `None` when accepted, else why refused.
    pub fn refusal(&self) -> Option<RefusalReason> {
        self.refusal
    }

    /// Transaction kind (RecordOnly for refusals).
    pub fn kind(&self) -> TxKind {
        self.kind
    }

    /// Card key version.
    pub fn key_version(&self) -> u8 {
        self.key_version
    }

    /// Card UID.
    pub fn uid(&self) -> [u8; 7] {
        self.uid
    }

    /// The counter the change consumed (refusals: the counter the card showed, or 0).
    pub fn tmc(&self) -> u32 {
        self.tmc
    }

    /// Amount, minor units.
    pub fn amount_minor(&self) -> i32 {
        self.amount_minor
    }

    /// Balance after, minor units (refusals: the balance the card showed, or 0).
    pub fn balance_after_minor(&self) -> i32 {
        self.balance_after_minor
    }

    /// Card transaction MAC (zero for refusals).
    pub fn tmv(&self) -> [u8; 8] {
        self.tmv
    }

    /// Where and when.
    pub fn meta(&self) -> &TapMeta {
        &self.meta
    }

    /// The fare engine's flags: `None` for a record decoded from format v2, which carries none
    /// (not known: neither set nor clear).
    pub fn flags(&self) -> Option<TapFlags> {
        self.flags
    }

    /// This accepted tap with the fare engine's `flags` (what [`sign`](Self::sign) writes). A
    /// refusal charged no fare and keeps no flags: it is returned unchanged.
    pub fn with_flags(mut self, flags: TapFlags) -> TapRecord {
        if self.refusal.is_none() {
            self.flags = Some(flags);
        }
        self
    }

    /// An accepted tap, from the card's verified commit.
    pub fn accepted(receipt: &CommitReceipt, meta: TapMeta) -> TapRecord {
        Self::from_claim(&receipt.to_claim(), meta)
    }

    /// An accepted tap whose commit answer the validator never saw (the card was pulled): the
    /// card's counter and balance, read under MAC at its next tap, settled it
    /// ([`crate::txn::settle`]). Its transaction MAC is the card's own, checked in clearing.
    pub fn settled(settled: &SettledClaim, meta: TapMeta) -> TapRecord {
        Self::from_claim(settled.claim(), meta)
    }

    fn from_claim(c: &TxClaim, meta: TapMeta) -> TapRecord {
        TapRecord {
            refusal: None,
            kind: c.kind,
            key_version: c.key_version,
            uid: c.uid,
            tmc: c.tmc,
            amount_minor: c.amount_minor,
            balance_after_minor: c.balance_after_minor,
            tmv: c.tmv,
            meta,
            flags: Some(TapFlags::NONE),
            _checked: Checked,
        }
    }

    /// A refusal: no value moved. `tmc` and `balance_minor` are what the card showed, if it
    /// was read (0 otherwise).
    pub fn refused(
        reason: RefusalReason,
        uid: [u8; 7],
        key_version: u8,
        tmc: u32,
        balance_minor: i32,
        meta: TapMeta,
    ) -> TapRecord {
        TapRecord {
            refusal: Some(reason),
            kind: TxKind::RecordOnly,
            key_version,
            uid,
            tmc,
            amount_minor: 0,
            balance_after_minor: balance_minor,
            tmv: [0; 8],
            meta,
            flags: Some(TapFlags::NONE),
            _checked: Checked,
        }
    }

    fn body(&self) -> [u8; BODY_LEN] {
        let mut b = [0u8; BODY_LEN];
        b[0] = TAP_VERSION;
        b[1] = self.refusal.map(RefusalReason::code).unwrap_or(0);
        b[2] = self.kind as u8;
        b[3] = self.key_version;
        b[4..11].copy_from_slice(&self.uid);
        b[11..15].copy_from_slice(&self.tmc.to_be_bytes());
        b[15..19].copy_from_slice(&self.amount_minor.to_be_bytes());
        b[19..23].copy_from_slice(&self.balance_after_minor.to_be_bytes());
        b[23..31].copy_from_slice(&self.tmv);
        b[31..35].copy_from_slice(&self.meta.device_id.to_be_bytes());
        b[35..43].copy_from_slice(&self.meta.device_seq.to_be_bytes());
        b[43..51].copy_from_slice(&self.meta.device_time_ms.to_be_bytes());
        b[51..55].copy_from_slice(&self.meta.stop_id.to_be_bytes());
        b[55..59].copy_from_slice(&self.meta.route_id.to_be_bytes());
        b[59..63].copy_from_slice(&self.meta.fare_table_version.to_be_bytes());
        b[63..71].copy_from_slice(&self.meta.blocklist_version.to_be_bytes());
        b[71] = self.flags.unwrap_or_default().bits();
        b
    }

    /// Encodes (format v3) and signs with the device key, for `operator` (the operator whose
    /// topics the device publishes on and whose revenue the tap is). tapgate signs only records
    /// it built; a record decoded from v2 (flags not known) would be written with no flag set.
    pub fn sign(&self, operator: &str, device_key: &AesKey) -> [u8; TAP_LEN] {
        self.sign_with(operator, |input| crypto::mac8(device_key, input))
    }

    /// Encodes and signs with a MAC function (a SAM's `device_mac`, which keeps the key inside)
    /// applied to [`mac_input`] of the body and `operator`.
    pub fn sign_with(
        &self,
        operator: &str,
        device_mac: impl FnOnce(&[u8]) -> [u8; 8],
    ) -> [u8; TAP_LEN] {
        let body = self.body();
        let mut out = [0u8; TAP_LEN];
        out[..BODY_LEN].copy_from_slice(&body);
        out[BODY_LEN..].copy_from_slice(&with_mac_input(&body, operator, device_mac));
        out
    }

    /// The device id of an encoded record (v2 or v3), read before verification to pick the key.
    pub fn peek_device_id(bytes: &[u8]) -> Result<u32, TapError> {
        check_frame(bytes)?;
        Ok(u32::from_be_bytes(bytes[31..35].try_into().expect("4")))
    }

    /// Decodes strictly (format v3, or v2 with flags `None`) and verifies the device MAC, for
    /// `operator`, with the key `key_for(device_id)` returns. A record its device signed for
    /// another operator is [`TapError::BadMac`].
    pub fn decode_verified(
        bytes: &[u8],
        operator: &str,
        key_for: impl FnOnce(u32) -> Option<AesKey>,
    ) -> Result<TapRecord, TapError> {
        let body_len = check_frame(bytes)?;
        let be32 = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().expect("4"));
        let be64 = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().expect("8"));
        let refusal = match bytes[1] {
            0 => None,
            c => Some(RefusalReason::from_code(c).ok_or(TapError::UnknownOutcome(c))?),
        };
        let kind = TxKind::from_code(bytes[2]).ok_or(TapError::UnknownKind(bytes[2]))?;
        let amount_minor = be32(15) as i32;
        let tmv: [u8; 8] = bytes[23..31].try_into().expect("8");
        if amount_minor < 0 {
            return Err(TapError::Inconsistent("negative amount"));
        }
        if kind == TxKind::RecordOnly && amount_minor != 0 {
            return Err(TapError::Inconsistent("a record-only tap with an amount"));
        }
        if refusal.is_some() && (kind != TxKind::RecordOnly || tmv != [0; 8]) {
            return Err(TapError::Inconsistent("a refusal that moved value"));
        }
        let flags = match body_len {
            BODY_LEN => Some(TapFlags::from_bits(bytes[71])?),
            _ => None,
        };
        if refusal.is_some() && flags.is_some_and(|f| f != TapFlags::NONE) {
            return Err(TapError::Inconsistent("a refusal with fare flags"));
        }
        let meta = TapMeta {
            device_id: be32(31),
            device_seq: be64(35),
            device_time_ms: be64(43),
            stop_id: be32(51),
            route_id: be32(55),
            fare_table_version: be32(59),
            blocklist_version: be64(63),
        };
        let key = key_for(meta.device_id).ok_or(TapError::UnknownDevice(meta.device_id))?;
        let want = with_mac_input(&bytes[..body_len], operator, |input| {
            crypto::mac8(&key, input)
        });
        if !crypto::mac_eq(&want, &bytes[body_len..]) {
            return Err(TapError::BadMac);
        }
        Ok(TapRecord {
            refusal,
            kind,
            key_version: bytes[3],
            uid: bytes[4..11].try_into().expect("7"),
            tmc: be32(11),
            amount_minor,
            balance_after_minor: be32(19) as i32,
            tmv,
            meta,
            flags,
            _checked: Checked,
        })
    }
}

/// What the device MAC covers: the record's body (v3: its first 72 bytes, flags included; v2:
/// 71) ‖ the operator's length in bytes (u64, big-endian) ‖ the operator's name (UTF-8). The
/// body's length fixed by its version byte and the length prefix make it injective; the body's
/// first byte (the format version, 2 or 3) keeps it apart from the
/// other messages MAC'd with a device key (confirmations start with `tapgate/confirm`,
/// ceiling grants with `CEIL`).
pub fn mac_input(body: &[u8], operator: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 8 + operator.len());
    v.extend_from_slice(body);
    v.extend_from_slice(&(operator.len() as u64).to_be_bytes());
    v.extend_from_slice(operator.as_bytes());
    v
}

/// Calls `mac` on [`mac_input`], on the stack for the usual short operator names.
fn with_mac_input(body: &[u8], operator: &str, mac: impl FnOnce(&[u8]) -> [u8; 8]) -> [u8; 8] {
    const STACK: usize = BODY_LEN + 8 + 64;
    let (b, n) = (body.len(), body.len() + 8 + operator.len());
    if n <= STACK {
        let mut buf = [0u8; STACK];
        buf[..b].copy_from_slice(body);
        buf[b..b + 8].copy_from_slice(&(operator.len() as u64).to_be_bytes());
        buf[b + 8..n].copy_from_slice(operator.as_bytes());
        mac(&buf[..n])
    } else {
        mac(&mac_input(body, operator))
    }
}

/// The body length (the bytes before the device MAC) of a record of a known version and its
/// exact length.
fn check_frame(bytes: &[u8]) -> Result<usize, TapError> {
    let expected = match bytes.first() {
        Some(&v) => record_len(v).ok_or(TapError::UnknownVersion(v))?,
        None => TAP_LEN,
    };
    if bytes.len() != expected {
        return Err(TapError::Length {
            expected,
            got: bytes.len(),
        });
    }
    Ok(expected - 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_masked_uid_shows_only_its_last_four_hex_digits() {
        let uid = [0x04, 0xC0, 0x0D, 0x12, 0x34, 0xA1, 0xB2];
        assert_eq!(masked_uid(&uid).to_string(), "\u{2026}A1B2");
        assert!(!masked_uid(&uid).to_string().contains("04C00D"));
        assert_eq!(masked_uid(&[0xAB]).to_string(), "\u{2026}");
    }
    use proptest::prelude::*;

    const OP: &str = "metro";

    fn key() -> AesKey {
        AesKey::from_bytes([0x42; 16])
    }

    fn meta() -> TapMeta {
        TapMeta {
            device_id: 1001,
            device_seq: 77,
            device_time_ms: 1_790_000_000_000,
            stop_id: 12,
            route_id: 3,
            fare_table_version: 5,
            blocklist_version: 9,
        }
    }

    fn sample() -> TapRecord {
        let r = CommitReceipt::for_tests([4, 1, 2, 3, 4, 5, 6], 8, [9; 8], TxKind::Debit, 150, 850);
        TapRecord::accepted(&r, meta())
    }

    #[test]
    fn roundtrip_and_every_bit_flip_is_refused() {
        let t = sample();
        let bytes = t.sign(OP, &key());
        assert_eq!(bytes.len(), TAP_LEN);
        assert_eq!(TapRecord::peek_device_id(&bytes), Ok(1001));
        assert_eq!(
            TapRecord::decode_verified(&bytes, OP, |_| Some(key())),
            Ok(t)
        );
        for i in 0..TAP_LEN * 8 {
            let mut b = bytes;
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                TapRecord::decode_verified(&b, OP, |_| Some(key())).is_err(),
                "bit {i} flipped was accepted"
            );
        }
    }

    #[test]
    fn wrong_key_length_version_and_device_are_typed_errors() {
        let bytes = sample().sign(OP, &key());
        assert_eq!(
            TapRecord::decode_verified(&bytes, OP, |_| Some(AesKey::from_bytes([1; 16]))),
            Err(TapError::BadMac)
        );
        assert_eq!(
            TapRecord::decode_verified(&bytes, OP, |_| None),
            Err(TapError::UnknownDevice(1001))
        );
        assert_eq!(
            TapRecord::decode_verified(&bytes[..79], OP, |_| Some(key())),
            Err(TapError::Length {
                expected: 80,
                got: 79
            })
        );
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(matches!(
            TapRecord::decode_verified(&longer, OP, |_| Some(key())),
            Err(TapError::Length { .. })
        ));
        let mut v4 = bytes;
        v4[0] = 4;
        assert_eq!(
            TapRecord::decode_verified(&v4, OP, |_| Some(key())),
            Err(TapError::UnknownVersion(4))
        );
        // A v3 record's first byte turned to 2: read as v2, it is one byte too long.
        let mut as_v2 = bytes;
        as_v2[0] = 2;
        assert_eq!(
            TapRecord::decode_verified(&as_v2, OP, |_| Some(key())),
            Err(TapError::Length {
                expected: 79,
                got: 80
            })
        );
        // Format v1 MAC'd the body without the operator: refused, never read as v2.
        let mut v1 = bytes;
        v1[0] = 1;
        assert_eq!(
            TapRecord::decode_verified(&v1, OP, |_| Some(key())),
            Err(TapError::UnknownVersion(1))
        );
        assert!(TapRecord::decode_verified(&[], OP, |_| Some(key())).is_err());
    }

    #[test]
    fn a_tap_signed_for_one_operator_does_not_verify_for_another() {
        let bytes = sample().sign("metro", &key());
        assert!(TapRecord::decode_verified(&bytes, "metro", |_| Some(key())).is_ok());
        for other in ["grand-hotel", "metr", "metro2", ""] {
            assert_eq!(
                TapRecord::decode_verified(&bytes, other, |_| Some(key())),
                Err(TapError::BadMac),
                "{other}"
            );
        }
        // Long operator names take the heap path and still agree with mac_input.
        let long = "o".repeat(300);
        let b = sample().sign(&long, &key());
        assert!(TapRecord::decode_verified(&b, &long, |_| Some(key())).is_ok());
        assert_eq!(
            b[BODY_LEN..],
            crypto::mac8(&key(), &mac_input(&b[..BODY_LEN], &long))
        );
    }

    /// `t` as format v2 bytes (what a validator wrote before v3: no flags byte), signed.
    fn sign_v2(t: &TapRecord, op: &str) -> Vec<u8> {
        let mut b = t.body()[..TAP_V2_LEN - 8].to_vec();
        b[0] = 2;
        let mac = crypto::mac8(&key(), &mac_input(&b, op));
        b.extend_from_slice(&mac);
        b
    }

    /// `t` as v3 bytes with flags byte `bits`, signed by the device (so only the decoder's
    /// checks stand between it and acceptance).
    fn sign_with_flag_byte(t: &TapRecord, bits: u8) -> [u8; TAP_LEN] {
        let mut b = t.sign(OP, &key());
        b[71] = bits;
        let mac = crypto::mac8(&key(), &mac_input(&b[..BODY_LEN], OP));
        b[BODY_LEN..].copy_from_slice(&mac);
        b
    }

    #[test]
    fn flags_roundtrip_under_the_device_mac() {
        for (transfer, capped, penalty) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (false, false, true),
            (true, true, true),
        ] {
            let f = TapFlags::new(transfer, capped, penalty);
            assert_eq!(
                (f.transfer(), f.capped(), f.penalty()),
                (transfer, capped, penalty)
            );
            let t = sample().with_flags(f);
            let bytes = t.sign(OP, &key());
            assert_eq!((bytes.len(), bytes[0], bytes[71]), (TAP_LEN, 3, f.bits()));
            let back = TapRecord::decode_verified(&bytes, OP, |_| Some(key())).unwrap();
            assert_eq!(back.flags(), Some(f));
            assert_eq!(back, t);
        }
        // Setting the capped bit on an uncapped tap, without the device key: the MAC refuses it.
        let mut b = sample().sign(OP, &key());
        b[71] |= TapFlags::CAPPED;
        assert_eq!(
            TapRecord::decode_verified(&b, OP, |_| Some(key())),
            Err(TapError::BadMac)
        );
    }

    #[test]
    fn undefined_flag_bits_are_refused_even_under_a_good_mac() {
        for bit in 3..8 {
            let b = sign_with_flag_byte(&sample(), 1 << bit | TapFlags::CAPPED);
            let e = TapRecord::decode_verified(&b, OP, |_| Some(key())).unwrap_err();
            assert_eq!(e, TapError::UnknownFlags(1 << bit | 2));
            assert!(e.to_string().contains("does not define"), "{e}");
        }
        assert_eq!(TapFlags::from_bits(0x08), Err(TapError::UnknownFlags(0x08)));
        assert_eq!(TapFlags::from_bits(7).map(TapFlags::bits), Ok(7));
        // A refusal charged no fare: flags on one are inconsistent, and with_flags keeps none.
        let r = TapRecord::refused(RefusalReason::Blocklisted, [4; 7], 1, 3, 20, meta());
        let b = sign_with_flag_byte(&r, TapFlags::TRANSFER);
        assert_eq!(
            TapRecord::decode_verified(&b, OP, |_| Some(key())),
            Err(TapError::Inconsistent("a refusal with fare flags"))
        );
        let kept = r.clone().with_flags(TapFlags::new(true, true, true));
        assert_eq!(kept.flags(), Some(TapFlags::NONE));
    }

    #[test]
    fn format_v2_still_decodes_with_flags_unknown() {
        let t = sample().with_flags(TapFlags::new(false, true, false));
        let v2 = sign_v2(&t, OP);
        assert_eq!(v2.len(), TAP_V2_LEN);
        assert_eq!(TapRecord::peek_device_id(&v2), Ok(1001));
        let back = TapRecord::decode_verified(&v2, OP, |_| Some(key())).unwrap();
        assert_eq!(back.flags(), None);
        assert_eq!(
            (back.amount_minor(), back.tmc(), back.meta()),
            (150, 8, &meta())
        );
        // Still under the device MAC and the operator.
        assert_eq!(
            TapRecord::decode_verified(&v2, "grand-hotel", |_| Some(key())),
            Err(TapError::BadMac)
        );
        let mut flipped = v2.clone();
        flipped[51] ^= 1;
        assert_eq!(
            TapRecord::decode_verified(&flipped, OP, |_| Some(key())),
            Err(TapError::BadMac)
        );
        // A v2 record given a flags byte (and so v3's length) is not v2.
        let mut longer = v2.clone();
        longer.insert(71, TapFlags::CAPPED);
        assert!(matches!(
            TapRecord::decode_verified(&longer, OP, |_| Some(key())),
            Err(TapError::Length {
                expected: 79,
                got: 80
            })
        ));
    }

    #[test]
    fn payloads_split_by_each_records_version() {
        let v3 = sample().sign(OP, &key());
        let v2 = sign_v2(&sample(), OP);
        let payload = [&v2[..], &v3[..], &v2[..]].concat();
        let recs = split_records(&payload).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [79, 80, 79]
        );
        for r in recs {
            assert!(TapRecord::decode_verified(r, OP, |_| Some(key())).is_ok());
        }
        assert_eq!(split_records(&[]), Ok(vec![]));
        assert_eq!(
            split_records(&payload[..payload.len() - 1]),
            Err(TapError::Length {
                expected: 79,
                got: 78
            })
        );
        let mut bad = payload.clone();
        bad[79] = 9;
        assert_eq!(split_records(&bad), Err(TapError::UnknownVersion(9)));
    }

    #[test]
    fn refusals_roundtrip_and_cannot_carry_value() {
        let t = TapRecord::refused(RefusalReason::Blocklisted, [4; 7], 1, 3, 20, meta());
        let bytes = t.sign(OP, &key());
        let back = TapRecord::decode_verified(&bytes, OP, |_| Some(key())).unwrap();
        assert_eq!(back.refusal, Some(RefusalReason::Blocklisted));
        // A refusal claiming a debit, re-signed by the device: still refused as inconsistent.
        let mut body = bytes;
        body[2] = TxKind::Debit as u8;
        body[15..19].copy_from_slice(&5i32.to_be_bytes());
        let mac = crypto::mac8(&key(), &mac_input(&body[..BODY_LEN], OP));
        body[BODY_LEN..].copy_from_slice(&mac);
        assert_eq!(
            TapRecord::decode_verified(&body, OP, |_| Some(key())),
            Err(TapError::Inconsistent("a refusal that moved value"))
        );
        for c in 1..=9u8 {
            assert_eq!(RefusalReason::from_code(c).unwrap().code(), c);
        }
        assert!(RefusalReason::from_code(0).is_none());
        assert!(RefusalReason::from_code(10).is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
            let _ = TapRecord::peek_device_id(&bytes);
            let _ = TapRecord::decode_verified(&bytes, OP, |_| Some(key()));
            let _ = split_records(&bytes);
        }

        #[test]
        fn any_field_values_roundtrip(
            uid in any::<[u8; 7]>(), tmc in any::<u32>(), amount in 1i32..i32::MAX,
            balance in any::<i32>(), tmv in any::<[u8; 8]>(), dev in any::<u32>(),
            seq in any::<u64>(), time in any::<u64>(), stop in any::<u32>(), route in any::<u32>(),
            fv in any::<u32>(), bv in any::<u64>(), flags in 0u8..8,
        ) {
            let r = CommitReceipt::for_tests(uid, tmc, tmv, TxKind::Debit, amount, balance);
            let m = TapMeta { device_id: dev, device_seq: seq, device_time_ms: time, stop_id: stop, route_id: route, fare_table_version: fv, blocklist_version: bv };
            let t = TapRecord::accepted(&r, m).with_flags(TapFlags::from_bits(flags).unwrap());
            let back = TapRecord::decode_verified(&t.sign(OP, &key()), OP, |d| (d == dev).then(key));
            prop_assert_eq!(back, Ok(t.clone()));
            let back2 = TapRecord::decode_verified(&sign_v2(&t, OP), OP, |d| (d == dev).then(key));
            prop_assert_eq!(back2.map(|b| b.flags()), Ok(None));
        }
    }
}
