//! The action list: value bought online and picked up at the card's next tap at any validator.
//!
//! The back office signs, with the same Ed25519 key as the blocklist and the fare tables, a
//! versioned list of orders — card UID, amount, order id, expiry — as a snapshot and numbered
//! deltas, relayed to validators the way the blocklist is. A validator applies updates strictly
//! in version order ([`ActionList::apply`]); nothing of a message is returned before its
//! signature verified ([`ActionUpdate::verify`]).
//!
//! A validator's SAM holds no credit master. Each order carries the card's own diversified
//! credit key, wrapped (AES, one block) under a key only a holder of KM_DEBIT of that version
//! can derive ([`derive_wrap_key`]: AN10922 over the card UID with the diversifier `ACT`, the
//! sibling of the device keys' `DEV`). So the SAM can open a credit session with a *listed*
//! card and no other; the SAM itself credits only the order's amount, once per order, under the
//! ceiling the back office granted it ([`crate::sam::SoftwareSam::pickup`]).
//!
//! Wire format (big-endian), signature over every preceding byte:
//!
//! | field | bytes |
//! |---|---|
//! | magic `TGAL` | 4 |
//! | format version (1) | 1 |
//! | kind: 1 snapshot, 2 delta | 1 |
//! | operator id length + bytes | 1 + n |
//! | from version (0 for a snapshot) | 8 |
//! | to version | 8 |
//! | entry count | 4 |
//! | entries, [`ENTRY_LEN`] each: action (1 add, 0 remove) ‖ order id (8) ‖ UID (7) ‖ amount minor (i32, > 0) ‖ expiry, unix s (8) ‖ card key version (1) ‖ wrapped credit key (16); a removal carries zeros after the order id; a snapshot holds additions only | 45 each |
//! | Ed25519 signature | 64 |

use crate::blocklist::{ListHead, ListKind};
use crate::crypto::{self, AesKey};
use crate::receipt::TxKind;
use crate::rotation::SignedMessage;
use crate::tap::TapRecord;
use std::collections::{BTreeMap, BTreeSet};
use zeroize::Zeroize;

const MAGIC: &[u8; 4] = b"TGAL";
const FORMAT: u8 = 1;
/// Bytes of one entry on the wire.
pub const ENTRY_LEN: usize = 45;
/// Most entries one message may carry.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Most orders a validator holds (a bigger list is refused as a whole, nothing applied).
pub const MAX_HELD: usize = 1_000_000;

/// One order to pick up: what the back office signs.
#[derive(Clone, PartialEq, Eq)]
pub struct Order {
    /// The back office's order id (unique, never reused).
    pub order_id: u64,
    /// The card it is for.
    pub uid: [u8; 7],
    /// The value to credit, minor units (> 0).
    pub amount_minor: i32,
    /// Not applied at or after this time (unix seconds).
    pub expires_s: u64,
    /// The card key version the wrapped key is of.
    pub key_version: u8,
    /// The card's credit key, wrapped under [`derive_wrap_key`] (see [`wrap_card_key`]).
    pub wrapped_key: [u8; 16],
}

impl std::fmt::Debug for Order {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Order")
            .field("order_id", &self.order_id)
            .field("uid", &crate::tap::masked_uid(&self.uid))
            .field("amount_minor", &self.amount_minor)
            .field("expires_s", &self.expires_s)
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl Order {
    /// Whether the order may still be applied at `now_s`.
    pub fn live_at(&self, now_s: u64) -> bool {
        now_s < self.expires_s
    }
}

/// One change of the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// An order to pick up.
    Add(Order),
    /// An order withdrawn (completed, refunded, expired, or the card blocked).
    Remove {
        /// the order id
        order_id: u64,
    },
}

impl Entry {
    /// The order id the entry is about.
    pub fn order_id(&self) -> u64 {
        match self {
            Entry::Add(o) => o.order_id,
            Entry::Remove { order_id } => *order_id,
        }
    }
}

/// An action-list message (snapshot or delta), before signing or after verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionUpdate {
    /// Snapshot or delta.
    pub kind: ListKind,
    /// The operator whose validators apply it.
    pub operator: String,
    /// The version this delta applies to (0 for a snapshot).
    pub from_version: u64,
    /// The version after applying it.
    pub to_version: u64,
    /// The changes, in order.
    pub entries: Vec<Entry>,
}

/// Why an action-list message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionListError {
    /// Not a tapgate action-list message, or inconsistent.
    #[error("malformed action list: {0}")]
    Malformed(&'static str),
    /// The signature does not verify under the back office's public key.
    #[error("action list signature does not verify (forged or altered)")]
    BadSignature,
    /// Another operator's list.
    #[error("action list of operator {got:?}, this device serves {want:?}")]
    WrongOperator {
        /// expected
        want: String,
        /// got
        got: String,
    },
    /// A delta that does not follow the version held.
    #[error("action list delta {from}→{to} does not apply to version {held}")]
    OutOfOrder {
        /// held version
        held: u64,
        /// delta's from version
        from: u64,
        /// delta's to version
        to: u64,
    },
    /// Older than (or equal to) what is held.
    #[error("stale action list version {got} (holding {held})")]
    Stale {
        /// held version
        held: u64,
        /// offered version
        got: u64,
    },
    /// Applying it would hold more than [`MAX_HELD`] orders.
    #[error("the action list would hold more than {MAX_HELD} orders")]
    Full,
}

impl ActionUpdate {
    /// The bytes that are signed.
    pub fn body(&self) -> Vec<u8> {
        let head = ListHead {
            kind: self.kind,
            operator: &self.operator,
            from_version: self.from_version,
            to_version: self.to_version,
        };
        let mut b = head.body(MAGIC, FORMAT, self.entries.len(), ENTRY_LEN);
        for e in &self.entries {
            let mut w = [0u8; ENTRY_LEN];
            w[1..9].copy_from_slice(&e.order_id().to_be_bytes());
            if let Entry::Add(o) = e {
                w[0] = 1;
                w[9..16].copy_from_slice(&o.uid);
                w[16..20].copy_from_slice(&o.amount_minor.to_be_bytes());
                w[20..28].copy_from_slice(&o.expires_s.to_be_bytes());
                w[28] = o.key_version;
                w[29..45].copy_from_slice(&o.wrapped_key);
            }
            b.extend_from_slice(&w);
        }
        b
    }

    /// Encodes and signs with `sign` (the HSM's Ed25519 signature over the body).
    pub fn sign_with(&self, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Vec<u8> {
        crate::crypto::ed25519_signed(self.body(), sign)
    }

    fn decode_body(body: &[u8]) -> Result<ActionUpdate, ActionListError> {
        let bad = ActionListError::Malformed;
        if body[4] != FORMAT {
            return Err(bad("unknown format version"));
        }
        let (head, raw) = ListHead::decode(body, ENTRY_LEN, MAX_ENTRIES).map_err(bad)?;
        let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8"));
        let mut entries = Vec::with_capacity(raw.len());
        let mut seen = BTreeSet::new();
        for w in raw {
            let order_id = be64(&w[1..9]);
            if !seen.insert(order_id) {
                return Err(bad("an order id twice in one message"));
            }
            let e = match w[0] {
                0 => {
                    if w[9..].iter().any(|&b| b != 0) {
                        return Err(bad("a removal with order fields"));
                    }
                    Entry::Remove { order_id }
                }
                1 => {
                    let amount_minor = i32::from_be_bytes(w[16..20].try_into().expect("4"));
                    if amount_minor <= 0 {
                        return Err(bad("an order's amount must be positive"));
                    }
                    Entry::Add(Order {
                        order_id,
                        uid: w[9..16].try_into().expect("7"),
                        amount_minor,
                        expires_s: be64(&w[20..28]),
                        key_version: w[28],
                        wrapped_key: w[29..45].try_into().expect("16"),
                    })
                }
                _ => return Err(bad("entry action is not 0 or 1")),
            };
            entries.push(e);
        }
        let (kind, operator, from_version, to_version) = head.parts();
        match kind {
            ListKind::Snapshot
                if from_version != 0 || entries.iter().any(|e| !matches!(e, Entry::Add(_))) =>
            {
                return Err(bad("a snapshot holds additions only, from version 0"));
            }
            ListKind::Delta if to_version <= from_version => {
                return Err(bad("a delta must move the version forward"));
            }
            _ => {}
        }
        Ok(ActionUpdate {
            kind,
            operator,
            from_version,
            to_version,
            entries,
        })
    }
}

impl SignedMessage for ActionUpdate {
    type Error = ActionListError;

    /// Verifies the signature under `public_key`, then decodes strictly. Nothing is read from
    /// a message whose signature does not verify.
    fn verify(bytes: &[u8], public_key: &[u8; 32]) -> Result<ActionUpdate, ActionListError> {
        if bytes.len() < 4 + 1 + 1 + 1 + 8 + 8 + 4 + 64 || &bytes[..4] != MAGIC {
            return Err(ActionListError::Malformed("not a tapgate action list"));
        }
        let body =
            crate::crypto::ed25519_body(bytes, public_key).ok_or(ActionListError::BadSignature)?;
        Self::decode_body(body)
    }

    fn is_bad_signature(e: &ActionListError) -> bool {
        matches!(e, ActionListError::BadSignature)
    }
}

/// An order read from a list whose signature verified: the only kind of order a SAM credits
/// ([`crate::sam::SoftwareSam::pickup`]). Another crate cannot build one:
///
/// ```compile_fail
/// # fn forge(order: purse::actionlist::Order) {
/// let forged = purse::actionlist::ListedOrder { order };
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedOrder {
    order: Order,
    _signed: Signed,
}

/// Zero-sized witness that the order came from a verified list; private to this module.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Signed;

impl ListedOrder {
    /// The order.
    pub fn order(&self) -> &Order {
        &self.order
    }
}

/// A validator's action list: applies verified updates in version order and answers which
/// live orders a card has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActionList {
    operator: String,
    version: u64,
    orders: BTreeMap<u64, ListedOrder>,
    by_card: BTreeSet<([u8; 7], u64)>,
}

impl ActionList {
    /// An empty list (version 0) for `operator`.
    pub fn new(operator: &str) -> Self {
        ActionList {
            operator: operator.to_string(),
            ..Default::default()
        }
    }

    /// The version held.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Orders held.
    pub fn len(&self) -> usize {
        self.orders.len()
    }

    /// Whether no order is held.
    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    /// An order by id.
    pub fn get(&self, order_id: u64) -> Option<&ListedOrder> {
        self.orders.get(&order_id)
    }

    /// The card's orders still live at `now_s`, oldest order id first.
    pub fn for_card(&self, uid: &[u8; 7], now_s: u64) -> Vec<&ListedOrder> {
        self.by_card
            .range((*uid, 0)..=(*uid, u64::MAX))
            .filter_map(|(_, id)| self.orders.get(id))
            .filter(|o| o.order.live_at(now_s))
            .collect()
    }

    /// Verifies and applies a signed update (see [`crate::blocklist::Blocklist::apply`]: a
    /// snapshot replaces the list if newer, a delta must start at the version held). Nothing
    /// changes on any error.
    pub fn apply(&mut self, bytes: &[u8], public_key: &[u8; 32]) -> Result<u64, ActionListError> {
        self.apply_verified(ActionUpdate::verify(bytes, public_key)?)
    }

    fn apply_verified(&mut self, u: ActionUpdate) -> Result<u64, ActionListError> {
        if u.operator != self.operator {
            return Err(ActionListError::WrongOperator {
                want: self.operator.clone(),
                got: u.operator,
            });
        }
        if u.to_version <= self.version {
            return Err(ActionListError::Stale {
                held: self.version,
                got: u.to_version,
            });
        }
        let mut next = match u.kind {
            ListKind::Snapshot => ActionList::new(&self.operator),
            ListKind::Delta if u.from_version != self.version => {
                return Err(ActionListError::OutOfOrder {
                    held: self.version,
                    from: u.from_version,
                    to: u.to_version,
                })
            }
            ListKind::Delta => self.clone(),
        };
        for e in u.entries {
            if let Some(old) = next.orders.remove(&e.order_id()) {
                next.by_card.remove(&(old.order.uid, old.order.order_id));
            }
            if let Entry::Add(order) = e {
                next.by_card.insert((order.uid, order.order_id));
                next.orders.insert(
                    order.order_id,
                    ListedOrder {
                        order,
                        _signed: Signed,
                    },
                );
            }
        }
        if next.orders.len() > MAX_HELD {
            return Err(ActionListError::Full);
        }
        next.version = u.to_version;
        *self = next;
        Ok(self.version)
    }
}

/// The key an order's credit key is wrapped under: AN10922 diversification of KM_DEBIT (of the
/// card's key version) over the card UID with the diversifier `ACT` — a sibling of the device
/// keys (`DEV` under KM_DEVICE), distinct from every card key (those use the AID and the
/// system identifier).
pub fn derive_wrap_key(km_debit: &AesKey, uid: &[u8; 7]) -> Result<AesKey, crypto::CryptoError> {
    crypto::diversify_an10922(km_debit, uid, b"ACT", &[])
}

/// Wraps a card's credit key for an order (AES, one block).
pub fn wrap_card_key(wrap_key: &AesKey, card_key: &AesKey) -> [u8; 16] {
    let mut b = *card_key.expose_secret();
    crypto::cbc_encrypt(wrap_key, &[0; 16], &mut b).expect("one block");
    b
}

/// Unwraps what [`wrap_card_key`] wrapped.
pub fn unwrap_card_key(wrap_key: &AesKey, wrapped: &[u8; 16]) -> AesKey {
    let mut b = *wrapped;
    crypto::cbc_decrypt(wrap_key, &[0; 16], &mut b).expect("one block");
    let k = AesKey::from_bytes(b);
    b.zeroize();
    k
}

/// First byte of a pick-up record on the card: not a fare record format, so the fare engine
/// skips it.
pub const PICKUP_RECORD_FORMAT: u8 = 0xA1;

/// The 32-byte record a pick-up writes to the card's cyclic record file:
/// `A1 ‖ order id (8) ‖ amount (i32) ‖ time, unix s (u32) ‖ device id (u32) ‖ zeros`. A
/// validator that also holds the order finds it on the card and does not apply it again.
pub fn pickup_record(order_id: u64, amount_minor: i32, time_s: u32, device_id: u32) -> [u8; 32] {
    let mut r = [0u8; 32];
    r[0] = PICKUP_RECORD_FORMAT;
    r[1..9].copy_from_slice(&order_id.to_be_bytes());
    r[9..13].copy_from_slice(&amount_minor.to_be_bytes());
    r[13..17].copy_from_slice(&time_s.to_be_bytes());
    r[17..21].copy_from_slice(&device_id.to_be_bytes());
    r
}

/// The order a card record shows picked up, if it is a pick-up record.
pub fn order_on_record(record: &[u8]) -> Option<u64> {
    (record.len() == 32 && record[0] == PICKUP_RECORD_FORMAT)
        .then(|| u64::from_be_bytes(record[1..9].try_into().expect("8")))
}

/// The stop and route fields of a pick-up's tap record: its order id, high and low 32 bits (a
/// credit tap has no stop or route).
pub fn order_tap_codes(order_id: u64) -> (u32, u32) {
    ((order_id >> 32) as u32, order_id as u32)
}

/// The order a verified tap record picked up: a credit from a validator carries it in its stop
/// and route fields ([`order_tap_codes`]).
pub fn order_of_tap(tap: &TapRecord) -> Option<u64> {
    (tap.kind() == TxKind::Credit && tap.refusal().is_none())
        .then(|| (u64::from(tap.meta().stop_id) << 32) | u64::from(tap.meta().route_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_signing::{public, signer};
    use proptest::prelude::*;

    /// The back office's key (seed byte); 6 is a forger's.
    const BACK_OFFICE: u8 = 5;

    fn signed(u: &ActionUpdate) -> Vec<u8> {
        u.sign_with(signer(BACK_OFFICE))
    }

    fn order(id: u64, uid: [u8; 7], amount: i32, expires_s: u64) -> Order {
        Order {
            order_id: id,
            uid,
            amount_minor: amount,
            expires_s,
            key_version: 1,
            wrapped_key: [id as u8; 16],
        }
    }

    fn update(kind: ListKind, from: u64, to: u64, entries: Vec<Entry>) -> ActionUpdate {
        ActionUpdate {
            kind,
            operator: "metro".into(),
            from_version: from,
            to_version: to,
            entries,
        }
    }

    #[test]
    fn snapshot_then_deltas_in_order_and_live_orders_per_card() {
        let pk = public(BACK_OFFICE);
        let mut l = ActionList::new("metro");
        let snap = update(
            ListKind::Snapshot,
            0,
            3,
            vec![
                Entry::Add(order(7, [1; 7], 500, 1_000)),
                Entry::Add(order(9, [1; 7], 200, 2_000)),
                Entry::Add(order(8, [2; 7], 100, 1_000)),
            ],
        );
        assert_eq!(l.apply(&signed(&snap), &pk), Ok(3));
        let ids = |l: &ActionList, uid, now| -> Vec<u64> {
            l.for_card(&uid, now)
                .iter()
                .map(|o| o.order().order_id)
                .collect()
        };
        assert_eq!(ids(&l, [1; 7], 10), [7, 9]);
        assert_eq!(ids(&l, [1; 7], 1_000), [9], "expired at its expiry");
        let d = update(
            ListKind::Delta,
            3,
            4,
            vec![
                Entry::Remove { order_id: 7 },
                Entry::Add(order(10, [3; 7], 50, 5_000)),
            ],
        );
        assert_eq!(l.apply(&signed(&d), &pk), Ok(4));
        assert_eq!(ids(&l, [1; 7], 10), [9]);
        assert_eq!(ids(&l, [3; 7], 10), [10]);
        let before = l.clone();
        assert!(matches!(
            l.apply(&signed(&update(ListKind::Delta, 5, 6, vec![])), &pk),
            Err(ActionListError::OutOfOrder { .. })
        ));
        assert!(matches!(
            l.apply(&signed(&d), &pk),
            Err(ActionListError::Stale { .. })
        ));
        assert!(matches!(
            l.apply(&signed(&snap), &pk),
            Err(ActionListError::Stale { .. })
        ));
        let mut foreign = update(ListKind::Delta, 4, 5, vec![]);
        foreign.operator = "bus".into();
        assert!(matches!(
            l.apply(&signed(&foreign), &pk),
            Err(ActionListError::WrongOperator { .. })
        ));
        let forged = update(
            ListKind::Delta,
            4,
            5,
            vec![Entry::Add(order(11, [4; 7], 99_999, u64::MAX))],
        )
        .sign_with(signer(6));
        assert_eq!(l.apply(&forged, &pk), Err(ActionListError::BadSignature));
        assert_eq!(l, before);
    }

    #[test]
    fn inconsistent_messages_are_refused_even_when_signed() {
        let pk = public(BACK_OFFICE);
        let bad = [
            // a snapshot with a removal
            update(
                ListKind::Snapshot,
                0,
                1,
                vec![Entry::Remove { order_id: 1 }],
            ),
            // a delta that does not move forward
            update(ListKind::Delta, 2, 2, vec![]),
            // a non-positive amount
            update(
                ListKind::Delta,
                0,
                1,
                vec![Entry::Add(order(1, [1; 7], 0, 9))],
            ),
            // one order twice
            update(
                ListKind::Delta,
                0,
                1,
                vec![
                    Entry::Add(order(1, [1; 7], 5, 9)),
                    Entry::Remove { order_id: 1 },
                ],
            ),
        ];
        for u in bad {
            assert!(
                matches!(
                    ActionUpdate::verify(&signed(&u), &pk),
                    Err(ActionListError::Malformed(_))
                ),
                "{u:?}"
            );
        }
        assert!(ActionUpdate::verify(&[0u8; 10], &pk).is_err());
    }

    #[test]
    fn wrapped_keys_unwrap_and_pickup_records_and_tap_codes_roundtrip() {
        let km = AesKey::from_bytes([9; 16]);
        let wk = derive_wrap_key(&km, &[1; 7]).unwrap();
        let card = AesKey::from_bytes([0x42; 16]);
        let w = wrap_card_key(&wk, &card);
        assert_ne!(&w, card.expose_secret());
        assert_eq!(
            unwrap_card_key(&wk, &w).expose_secret(),
            card.expose_secret()
        );
        let other = derive_wrap_key(&km, &[2; 7]).unwrap();
        assert_ne!(
            unwrap_card_key(&other, &w).expose_secret(),
            card.expose_secret()
        );
        let r = pickup_record(0x0102_0304_0506_0708, 500, 77, 1001);
        assert_eq!(order_on_record(&r), Some(0x0102_0304_0506_0708));
        assert_eq!(order_on_record(&[1u8; 32]), None);
        let (hi, lo) = order_tap_codes(0x0102_0304_0506_0708);
        assert_eq!((hi, lo), (0x0102_0304, 0x0506_0708));
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            (
                any::<u64>(),
                any::<[u8; 7]>(),
                1..=i32::MAX,
                any::<u64>(),
                any::<u8>(),
                any::<[u8; 16]>()
            )
                .prop_map(
                    |(order_id, uid, amount_minor, expires_s, key_version, wrapped_key)| {
                        Entry::Add(Order {
                            order_id,
                            uid,
                            amount_minor,
                            expires_s,
                            key_version,
                            wrapped_key,
                        })
                    }
                ),
            any::<u64>().prop_map(|order_id| Entry::Remove { order_id }),
        ]
    }

    fn arb_update() -> impl Strategy<Value = ActionUpdate> {
        (
            any::<bool>(),
            "[a-z]{1,12}",
            0..1_000u64,
            1..1_000u64,
            proptest::collection::vec(arb_entry(), 0..8),
        )
            .prop_map(|(snapshot, operator, from, step, entries)| {
                let mut seen = BTreeSet::new();
                let mut entries: Vec<Entry> = entries
                    .into_iter()
                    .filter(|e| seen.insert(e.order_id()))
                    .collect();
                if snapshot {
                    entries.retain(|e| matches!(e, Entry::Add(_)));
                    ActionUpdate {
                        kind: ListKind::Snapshot,
                        operator,
                        from_version: 0,
                        to_version: step,
                        entries,
                    }
                } else {
                    ActionUpdate {
                        kind: ListKind::Delta,
                        operator,
                        from_version: from,
                        to_version: from + step,
                        entries,
                    }
                }
            })
    }

    proptest! {
        #[test]
        fn signed_updates_roundtrip(u in arb_update()) {
            let pk = public(BACK_OFFICE);
            prop_assert_eq!(ActionUpdate::verify(&signed(&u), &pk), Ok(u));
        }

        #[test]
        fn any_bit_flip_is_refused(u in arb_update(), at in any::<proptest::sample::Index>(), bit in 0..8u8) {
            let pk = public(BACK_OFFICE);
            let mut bytes = signed(&u);
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(ActionUpdate::verify(&bytes, &pk).is_err());
            let mut l = ActionList::new(&u.operator);
            prop_assert!(l.apply(&bytes, &pk).is_err());
            prop_assert_eq!(l.version(), 0);
        }

        #[test]
        fn any_truncation_or_extension_is_refused(u in arb_update(), cut in 1..200usize, extra in any::<u8>()) {
            let pk = public(BACK_OFFICE);
            let bytes = signed(&u);
            let cut = cut.min(bytes.len());
            prop_assert!(ActionUpdate::verify(&bytes[..bytes.len() - cut], &pk).is_err());
            let mut longer = bytes.clone();
            longer.push(extra);
            prop_assert!(ActionUpdate::verify(&longer, &pk).is_err());
        }
    }
}
