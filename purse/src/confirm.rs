//! Confirmations: the gateway's word to a validator that it durably stored some of the
//! validator's taps, so the validator may delete them from its outbox.
//!
//! A confirmation is JSON on `tapgate/v1/<operator>/devices/<device>/confirm`:
//! `{"seqs": [17, 18, 19], "mac": "<16 hex digits>"}`. The MAC is the device MAC (AES-CMAC,
//! EV2-truncated to 8 bytes) under the device's own key — the gateway derives it from
//! KM_DEVICE, the validator's SAM holds it — over [`mac_input`]: a domain tag, the operator,
//! the device id and the exact sequence numbers in the order sent. So:
//!
//! - only the gateway (or the HSM) can make one: another device's password gets a publisher on
//!   the broker, not the key; another device's key makes another device's MAC;
//! - it is bound to the sequence numbers: the same MAC with one sequence number added, removed
//!   or changed does not verify, so a confirmation cannot be stretched to other taps;
//! - it is bound to the device and the operator: one device's confirmation does not verify at
//!   another, nor under another operator's topics.
//!
//! Replaying an old genuine confirmation is harmless: it names only taps the gateway had
//! durably stored when it made it, and a device's sequence numbers never repeat (the journal
//! keeps counting across restarts; the gateway's de-duplication by (device, sequence) relies
//! on the same), so a replay can delete only taps that are already stored (and usually already
//! deleted) — never a tap the gateway has not seen.
//!
//! [`Confirmation::decode`] reads the wire format strictly and bounded; only
//! [`Confirmation::verify`] makes a [`Confirmed`], the proof the validator's journal takes to
//! delete anything.

use crate::crypto::{self, AesKey};

/// Most sequence numbers in one confirmation (≈ 40 kB of JSON); a larger set goes as several.
pub const CONFIRM_MAX_SEQS: usize = 4_096;
/// Most bytes of a confirmation message the decoder reads.
pub const CONFIRM_MAX_BYTES: usize = 128 << 10;
/// The domain tag at the start of every confirmation's MAC input (distinct from a tap
/// record's MAC input, which starts with its format version byte, and a ceiling grant's,
/// which starts with `CEIL`).
pub const CONFIRM_DOMAIN: &[u8] = b"tapgate/confirm/v1\0";

/// Why a confirmation is refused. None of these deletes anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    /// Larger than [`CONFIRM_MAX_BYTES`].
    #[error("confirmation of {0} bytes is larger than {CONFIRM_MAX_BYTES}")]
    TooLarge(usize),
    /// Not the JSON object `{"seqs": [...], "mac": "..."}`.
    #[error("malformed confirmation: {0}")]
    Malformed(String),
    /// No sequence number, or more than [`CONFIRM_MAX_SEQS`].
    #[error("confirmation names {0} taps (1 to {CONFIRM_MAX_SEQS})")]
    SeqCount(usize),
    /// The MAC does not verify under this device's key for this operator and these sequence
    /// numbers (forged, altered, another device's, or replayed to another device).
    #[error("confirmation MAC does not verify (forged, altered or another device's)")]
    BadMac,
}

/// What the MAC covers: [`CONFIRM_DOMAIN`] ‖ operator length (u64, big-endian) ‖ operator
/// (UTF-8) ‖ device id (u32, big-endian) ‖ count (u32, big-endian) ‖ each sequence number
/// (u64, big-endian), in the order sent. Length prefixes make it injective.
pub fn mac_input(operator: &str, device_id: u32, seqs: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(CONFIRM_DOMAIN.len() + 16 + operator.len() + 8 * seqs.len());
    v.extend_from_slice(CONFIRM_DOMAIN);
    v.extend_from_slice(&(operator.len() as u64).to_be_bytes());
    v.extend_from_slice(operator.as_bytes());
    v.extend_from_slice(&device_id.to_be_bytes());
    v.extend_from_slice(&(seqs.len() as u32).to_be_bytes());
    for s in seqs {
        v.extend_from_slice(&s.to_be_bytes());
    }
    v
}

/// Encodes a confirmation of `seqs` (1 to [`CONFIRM_MAX_SEQS`]) for `device_id` under
/// `operator`, MAC'd with `device_mac` (the device key's MAC: in software, or in an HSM that
/// keeps the key inside).
pub fn encode(
    operator: &str,
    device_id: u32,
    seqs: &[u64],
    device_mac: impl FnOnce(&[u8]) -> [u8; 8],
) -> Result<String, ConfirmError> {
    if seqs.is_empty() || seqs.len() > CONFIRM_MAX_SEQS {
        return Err(ConfirmError::SeqCount(seqs.len()));
    }
    let mac = device_mac(&mac_input(operator, device_id, seqs));
    let mut out = String::with_capacity(32 + seqs.len() * 8);
    out.push_str("{\"seqs\":[");
    for (i, s) in seqs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&s.to_string());
    }
    out.push_str("],\"mac\":\"");
    out.push_str(&hex::encode(mac));
    out.push_str("\"}");
    Ok(out)
}

/// [`encode`] with the device key in hand.
pub fn encode_with_key(
    operator: &str,
    device_id: u32,
    seqs: &[u64],
    device_key: &AesKey,
) -> Result<String, ConfirmError> {
    encode(operator, device_id, seqs, |m| crypto::mac8(device_key, m))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    seqs: Vec<u64>,
    mac: String,
}

/// A decoded confirmation, not yet verified: it deletes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmation {
    seqs: Vec<u64>,
    mac: [u8; 8],
}

impl Confirmation {
    /// Decodes strictly: bounded size, exactly the fields `seqs` and `mac`, 1 to
    /// [`CONFIRM_MAX_SEQS`] sequence numbers, a MAC of 16 hex digits.
    pub fn decode(payload: &[u8]) -> Result<Confirmation, ConfirmError> {
        if payload.len() > CONFIRM_MAX_BYTES {
            return Err(ConfirmError::TooLarge(payload.len()));
        }
        let w: Wire =
            serde_json::from_slice(payload).map_err(|e| ConfirmError::Malformed(e.to_string()))?;
        if w.seqs.is_empty() || w.seqs.len() > CONFIRM_MAX_SEQS {
            return Err(ConfirmError::SeqCount(w.seqs.len()));
        }
        let mut mac = [0u8; 8];
        if w.mac.len() != 16 || hex::decode_to_slice(&w.mac, &mut mac).is_err() {
            return Err(ConfirmError::Malformed("mac is not 16 hex digits".into()));
        }
        Ok(Confirmation { seqs: w.seqs, mac })
    }

    /// The sequence numbers it claims (unverified: for logs only).
    pub fn claimed_seqs(&self) -> &[u64] {
        &self.seqs
    }

    /// Verifies the MAC (constant-time) for `device_id` under `operator` with `device_mac`
    /// (the device key's MAC: a SAM's `device_mac`, which keeps the key inside).
    pub fn verify(
        self,
        operator: &str,
        device_id: u32,
        device_mac: impl FnOnce(&[u8]) -> [u8; 8],
    ) -> Result<Confirmed, ConfirmError> {
        let want = device_mac(&mac_input(operator, device_id, &self.seqs));
        if !crypto::mac_eq(&want, &self.mac) {
            return Err(ConfirmError::BadMac);
        }
        Ok(Confirmed {
            device_id,
            seqs: self.seqs,
        })
    }

    /// [`verify`](Self::verify) with the device key in hand.
    pub fn verify_with_key(
        self,
        operator: &str,
        device_id: u32,
        device_key: &AesKey,
    ) -> Result<Confirmed, ConfirmError> {
        self.verify(operator, device_id, |m| crypto::mac8(device_key, m))
    }
}

/// Proof that a confirmation's MAC verified under the device's key: the only thing a
/// validator's journal deletes taps on. Built only by [`Confirmation::verify`]:
///
/// ```compile_fail
/// let c = purse::confirm::Confirmed { device_id: 1, seqs: vec![1] };
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmed {
    device_id: u32,
    seqs: Vec<u64>,
}

impl Confirmed {
    /// The device the confirmation was verified for.
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The sequence numbers the gateway confirmed.
    pub fn seqs(&self) -> &[u64] {
        &self.seqs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> AesKey {
        AesKey::from_bytes([b; 16])
    }

    fn genuine(seqs: &[u64]) -> String {
        encode_with_key("metro", 1001, seqs, &key(7)).unwrap()
    }

    fn check(payload: &[u8]) -> Result<Confirmed, ConfirmError> {
        Confirmation::decode(payload)?.verify_with_key("metro", 1001, &key(7))
    }

    #[test]
    fn a_genuine_confirmation_verifies_and_names_exactly_its_seqs() {
        let c = check(genuine(&[3, 4, 9]).as_bytes()).unwrap();
        assert_eq!(c.seqs(), &[3, 4, 9]);
        assert_eq!(c.device_id(), 1001);
        let v: serde_json::Value = serde_json::from_str(&genuine(&[3])).unwrap();
        assert_eq!(v["seqs"], serde_json::json!([3]));
        assert_eq!(v["mac"].as_str().unwrap().len(), 16);
    }

    #[test]
    fn forged_altered_and_misdirected_confirmations_are_refused() {
        // No MAC (the old format) and a wrong MAC.
        assert!(matches!(
            check(br#"{"seqs":[1,2]}"#),
            Err(ConfirmError::Malformed(_))
        ));
        assert_eq!(
            check(br#"{"seqs":[1,2],"mac":"0000000000000000"}"#),
            Err(ConfirmError::BadMac)
        );
        // Another device's key, another device id, another operator.
        let other_key = encode_with_key("metro", 1001, &[1, 2], &key(8)).unwrap();
        assert_eq!(check(other_key.as_bytes()), Err(ConfirmError::BadMac));
        let other_dev = encode_with_key("metro", 1002, &[1, 2], &key(7)).unwrap();
        assert_eq!(check(other_dev.as_bytes()), Err(ConfirmError::BadMac));
        let other_op = encode_with_key("grand-hotel", 1001, &[1, 2], &key(7)).unwrap();
        assert_eq!(check(other_op.as_bytes()), Err(ConfirmError::BadMac));
        // A genuine MAC with the seqs altered: added, removed, changed, reordered.
        let g: serde_json::Value = serde_json::from_str(&genuine(&[1, 2])).unwrap();
        let mac = g["mac"].as_str().unwrap();
        for seqs in ["[1,2,3]", "[1]", "[1,5]", "[2,1]"] {
            let forged = format!(r#"{{"seqs":{seqs},"mac":"{mac}"}}"#);
            assert_eq!(
                check(forged.as_bytes()),
                Err(ConfirmError::BadMac),
                "{seqs}"
            );
        }
    }

    #[test]
    fn malformed_and_oversized_confirmations_are_typed_errors() {
        assert!(matches!(
            check(b"").unwrap_err(),
            ConfirmError::Malformed(_)
        ));
        assert_eq!(
            check(br#"{"seqs":[],"mac":"0000000000000000"}"#),
            Err(ConfirmError::SeqCount(0))
        );
        assert!(matches!(
            check(br#"{"seqs":[1],"mac":"00"}"#),
            Err(ConfirmError::Malformed(_))
        ));
        assert!(matches!(
            check(br#"{"seqs":[1],"mac":"000000000000000g"}"#),
            Err(ConfirmError::Malformed(_))
        ));
        assert!(matches!(
            check(br#"{"seqs":[1],"mac":"0000000000000000","x":1}"#),
            Err(ConfirmError::Malformed(_))
        ));
        assert_eq!(
            check(&vec![b' '; CONFIRM_MAX_BYTES + 1]),
            Err(ConfirmError::TooLarge(CONFIRM_MAX_BYTES + 1))
        );
        let many: Vec<u64> = (0..=CONFIRM_MAX_SEQS as u64).collect();
        assert_eq!(
            encode_with_key("metro", 1, &many, &key(7)),
            Err(ConfirmError::SeqCount(CONFIRM_MAX_SEQS + 1))
        );
        let most = genuine(&many[..CONFIRM_MAX_SEQS]);
        assert!(most.len() <= CONFIRM_MAX_BYTES);
        assert_eq!(
            check(most.as_bytes()).unwrap().seqs().len(),
            CONFIRM_MAX_SEQS
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_or_verify(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            prop_assert!(check(&bytes).is_err());
        }

        #[test]
        fn any_seqs_roundtrip(seqs in prop::collection::vec(any::<u64>(), 1..50)) {
            let c = check(genuine(&seqs).as_bytes()).unwrap();
            prop_assert_eq!(c.seqs(), &seqs[..]);
        }
    }
}
