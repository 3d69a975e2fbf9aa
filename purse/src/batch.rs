//! The clearing batch: the JSON a gateway posts to the back office's clearing
//! (`POST /v1/clearing/batches`), one entry per accepted tap. Both sides use these types, so
//! the wire format is written once.
//!
//! ```json
//! {"batch_id": "gw-metro-17-42",
//!  "taps": [{"device_id": 1001, "device_seq": 17, "card_uid": "04A1B2C3D4E5F6", "tmc": 8,
//!            "kind": "debit", "amount_minor": 150, "balance_after_minor": 850,
//!            "tmv": "0011223344556677", "key_version": 1, "operator": "metro",
//!            "device_time_ms": 1700000000000, "stop_id": 12, "route_id": 3,
//!            "fare_flags": 1}]}
//! ```
//!
//! A tap's kind travels as a word ([`kind_name`], [`kind_from_name`]) and is checked by
//! clearing per tap, so one malformed tap does not refuse the whole batch. Nothing here is
//! trusted: clearing verifies every tap's transaction MAC in its HSM.

use crate::receipt::TxKind;
use crate::tap::{TapError, TapFlags, TapRecord};
use serde::{Deserialize, Serialize};

/// One tap as the gateway forwards it (device-verified and de-duplicated by the gateway).
/// `stop_id`, `route_id` and `fare_flags` are optional: absent from a gateway older than them
/// and for a wire-format-v2 record (no flags), so old batches still parse.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClearingTap {
    /// Validator device id.
    pub device_id: u32,
    /// The device's sequence number for this tap.
    pub device_seq: u64,
    /// Card UID, 14 hex digits.
    pub card_uid: String,
    /// The counter the transaction consumed.
    pub tmc: u32,
    /// `debit`, `record_only` (a free tap: transfer or capped), `limited_credit` (an undo), or
    /// `pickup:<order id>` (an action-list order credited at the tap, [`pickup_order`]).
    pub kind: String,
    /// Amount, minor units.
    pub amount_minor: i32,
    /// The card's balance after.
    pub balance_after_minor: i32,
    /// The card's transaction MAC, 16 hex digits.
    pub tmv: String,
    /// The card key version.
    pub key_version: u8,
    /// The operator whose revenue this is (default `default`).
    #[serde(default)]
    pub operator: Option<String>,
    /// When the validator saw it (unix ms, device clock).
    #[serde(default)]
    pub device_time_ms: u64,
    /// The stop where the validator stands (its record's stop id; absent for a pick-up, whose
    /// record carries the order id there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_id: Option<u32>,
    /// The route (its record's route id; absent for a pick-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_id: Option<u32>,
    /// The fare engine's flags byte ([`TapFlags`]: bit 0 transfer, bit 1 capped, bit 2
    /// penalty); absent for a wire-format-v2 record, which carries none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fare_flags: Option<u8>,
}

impl ClearingTap {
    /// The clearing entry of a verified tap record of `operator`'s: accepted taps only (a
    /// refusal moved no value; a validator's only credit is an action-list pick-up, which
    /// travels with its order id as `pickup:<order id>`).
    pub fn from_tap(t: &TapRecord, operator: &str) -> Option<ClearingTap> {
        if t.refusal().is_some() {
            return None;
        }
        let meta = t.meta();
        let (kind, place) = match crate::actionlist::order_of_tap(t) {
            Some(order_id) => (format!("{PICKUP}{order_id}"), None),
            None => (
                kind_name(t.kind())?.to_string(),
                Some((meta.stop_id, meta.route_id)),
            ),
        };
        Some(ClearingTap {
            device_id: meta.device_id,
            device_seq: meta.device_seq,
            card_uid: hex::encode_upper(t.uid()),
            tmc: t.tmc(),
            kind,
            amount_minor: t.amount_minor(),
            balance_after_minor: t.balance_after_minor(),
            tmv: hex::encode_upper(t.tmv()),
            key_version: t.key_version(),
            operator: Some(operator.to_string()),
            device_time_ms: meta.device_time_ms,
            stop_id: place.map(|p| p.0),
            route_id: place.map(|p| p.1),
            fare_flags: t.flags().map(TapFlags::bits),
        })
    }

    /// The fare flags sent, checked: `Ok(None)` when absent, an error naming the bits when a
    /// bit this code does not define is set (a gateway may send any byte).
    pub fn flags(&self) -> Result<Option<TapFlags>, TapError> {
        self.fare_flags.map(TapFlags::from_bits).transpose()
    }
}

/// A batch from a gateway: its idempotent id (`<gateway>-<first>-<last>`, the outbox range)
/// and its taps.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClearingBatch {
    /// The gateway's idempotent batch id.
    pub batch_id: String,
    /// The taps.
    pub taps: Vec<ClearingTap>,
}

/// The word a tap's kind travels as; `None` for a credit (a load is never cleared as a tap).
pub fn kind_name(kind: TxKind) -> Option<&'static str> {
    match kind {
        TxKind::Debit => Some("debit"),
        TxKind::LimitedCredit => Some("limited_credit"),
        TxKind::RecordOnly => Some("record_only"),
        TxKind::Credit => None,
    }
}

/// The kind a word names ([`kind_name`]'s inverse, and `pickup:<order id>` a credit);
/// `None` for anything else.
pub fn kind_from_name(name: &str) -> Option<TxKind> {
    match name {
        "debit" => Some(TxKind::Debit),
        "record_only" => Some(TxKind::RecordOnly),
        "limited_credit" => Some(TxKind::LimitedCredit),
        _ => pickup_order(name).map(|_| TxKind::Credit),
    }
}

/// The prefix of a pick-up's kind word.
const PICKUP: &str = "pickup:";

/// The order a `pickup:<order id>` kind word names (decimal digits only, no sign or spaces).
pub fn pickup_order(kind: &str) -> Option<u64> {
    let digits = kind.strip_prefix(PICKUP)?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipt::CommitReceipt;
    use crate::tap::{RefusalReason, TapMeta};

    #[test]
    fn an_accepted_tap_round_trips_through_the_batch_json() {
        let r = CommitReceipt::for_tests([4, 1, 2, 3, 4, 5, 6], 8, [9; 8], TxKind::Debit, 150, 850);
        let meta = TapMeta {
            device_id: 1001,
            device_seq: 17,
            device_time_ms: 1_700_000_000_000,
            ..TapMeta::default()
        };
        let tap = ClearingTap::from_tap(&TapRecord::accepted(&r, meta), "metro").unwrap();
        assert_eq!(tap.kind, "debit");
        assert_eq!(tap.card_uid, "04010203040506");
        assert_eq!(tap.operator.as_deref(), Some("metro"));
        let batch = ClearingBatch {
            batch_id: "gw-17-17".into(),
            taps: vec![tap],
        };
        let json = serde_json::to_string(&batch).unwrap();
        assert_eq!(serde_json::from_str::<ClearingBatch>(&json).unwrap(), batch);
        let refused = TapRecord::refused(RefusalReason::Blocklisted, [4; 7], 1, 8, 850, meta);
        assert_eq!(ClearingTap::from_tap(&refused, "metro"), None);
    }

    #[test]
    fn stop_route_and_flags_travel_and_an_old_batch_without_them_still_parses() {
        let r = CommitReceipt::for_tests([4; 7], 8, [9; 8], TxKind::RecordOnly, 0, 850);
        let meta = TapMeta {
            stop_id: 12,
            route_id: 3,
            ..TapMeta::default()
        };
        let rec = TapRecord::accepted(&r, meta).with_flags(TapFlags::new(true, false, false));
        let tap = ClearingTap::from_tap(&rec, "metro").unwrap();
        assert_eq!((tap.stop_id, tap.route_id), (Some(12), Some(3)));
        assert_eq!(tap.fare_flags, Some(TapFlags::TRANSFER));
        assert!(tap.flags().unwrap().unwrap().transfer());
        // Flags not known (a v2 record) are left out of the JSON, as an older gateway does.
        let v2 = ClearingTap {
            fare_flags: None,
            ..tap.clone()
        };
        assert!(!serde_json::to_string(&v2).unwrap().contains("fare_flags"));
        assert!(serde_json::to_string(&tap)
            .unwrap()
            .contains(r#""fare_flags":1"#));
        let old = r#"{"batch_id":"gw-1-1","taps":[{"device_id":1,"device_seq":1,
            "card_uid":"04040404040404","tmc":8,"kind":"debit","amount_minor":150,
            "balance_after_minor":850,"tmv":"0011223344556677","key_version":1}]}"#;
        let b: ClearingBatch = serde_json::from_str(old).unwrap();
        assert_eq!(b.taps[0].stop_id, None);
        assert_eq!(b.taps[0].flags().unwrap(), None);
        // A bit this code does not define is refused; a stop beyond u32 does not parse.
        let bad = ClearingTap {
            fare_flags: Some(0x08),
            ..tap.clone()
        };
        assert!(matches!(bad.flags(), Err(TapError::UnknownFlags(0x08))));
        let huge = old.replace(
            r#""key_version":1"#,
            r#""key_version":1,"stop_id":4294967296"#,
        );
        assert!(serde_json::from_str::<ClearingBatch>(&huge).is_err());
    }

    #[test]
    fn kind_names_round_trip_and_a_credit_has_none() {
        for k in [TxKind::Debit, TxKind::LimitedCredit, TxKind::RecordOnly] {
            assert_eq!(kind_from_name(kind_name(k).unwrap()), Some(k));
        }
        assert_eq!(kind_name(TxKind::Credit), None);
        assert_eq!(kind_from_name("credit"), None);
    }

    #[test]
    fn a_pickup_travels_with_its_order_id_and_nothing_else_parses_as_one() {
        let r = CommitReceipt::for_tests([4; 7], 9, [1; 8], TxKind::Credit, 500, 1500);
        let (hi, lo) = crate::actionlist::order_tap_codes(12_345_678_901);
        let meta = TapMeta {
            device_id: 1001,
            stop_id: hi,
            route_id: lo,
            ..TapMeta::default()
        };
        let tap = ClearingTap::from_tap(&TapRecord::accepted(&r, meta), "metro").unwrap();
        assert_eq!(tap.kind, "pickup:12345678901");
        assert_eq!(kind_from_name(&tap.kind), Some(TxKind::Credit));
        assert_eq!(pickup_order(&tap.kind), Some(12_345_678_901));
        for bad in [
            "pickup:",
            "pickup:+1",
            "pickup: 1",
            "pickup:1x",
            "pickup:99999999999999999999999",
            "Pickup:1",
        ] {
            assert_eq!(kind_from_name(bad), None, "{bad}");
        }
    }
}
