//! Big-endian key codecs shared by the stores: LMDB compares keys as bytes, so big-endian
//! integers sort numerically, a prefix selects one card's or one device's keys, and keys that
//! only grow append at the end of the B-tree.

use heed::byteorder::BE;

/// A `u64` key (or value), big-endian.
pub type U64Be = heed::types::U64<BE>;
/// An `i64` value, big-endian.
pub type I64Be = heed::types::I64<BE>;

/// A card UID (7 bytes).
pub type Uid = [u8; 7];

/// UID ‖ counter (u32 BE): one card's records in counter order.
pub fn uid_counter(uid: &Uid, counter: u32) -> [u8; 11] {
    let mut k = [0u8; 11];
    k[..7].copy_from_slice(uid);
    k[7..].copy_from_slice(&counter.to_be_bytes());
    k
}

/// UID ‖ counter (u32 BE) ‖ attempt (u16 BE): several records per (card, counter), in order.
pub fn uid_counter_attempt(uid: &Uid, counter: u32, attempt: u16) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[..11].copy_from_slice(&uid_counter(uid, counter));
    k[11..].copy_from_slice(&attempt.to_be_bytes());
    k
}

/// `u32` ‖ `u64`, big-endian (e.g. device ‖ sequence number).
pub fn u32_u64(a: u32, b: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&a.to_be_bytes());
    k[4..].copy_from_slice(&b.to_be_bytes());
    k
}

/// `u64` ‖ `u64`, big-endian (e.g. device ‖ sequence number).
pub fn u64_u64(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

/// The two halves of a [`u64_u64`] key; `None` for a key of another length.
pub fn split_u64_u64(k: &[u8]) -> Option<(u64, u64)> {
    let k: &[u8; 16] = k.try_into().ok()?;
    let (a, b) = k.split_at(8);
    Some((
        u64::from_be_bytes(a.try_into().ok()?),
        u64::from_be_bytes(b.try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_as_their_numbers() {
        assert!(u32_u64(1, u64::MAX) < u32_u64(2, 0));
        assert!(u64_u64(1, 255) < u64_u64(1, 256));
        let uid = [4, 1, 2, 3, 4, 5, 6];
        assert!(uid_counter_attempt(&uid, 1, u16::MAX) < uid_counter_attempt(&uid, 2, 0));
        assert!(uid_counter_attempt(&uid, 7, 3).starts_with(&uid_counter(&uid, 7)));
    }

    #[test]
    fn a_pair_key_splits_back() {
        assert_eq!(split_u64_u64(&u64_u64(7, u64::MAX)), Some((7, u64::MAX)));
        assert_eq!(split_u64_u64(&[0; 15]), None);
    }
}
