//! A blocklist snapshot in sorted, individually signed chunks (issue 22): a 10,000,000-card
//! list is 70 MB of UIDs, more than a validator's 64 MiB budget if it arrived, was decoded and
//! sorted whole. Cut into chunks of at most [`MAX_CHUNK_ENTRIES`] ascending UIDs, each chunk
//! is verified on its own and packed at once into the compact set's blocks
//! ([`UidSet::pack_part`], sharing the blocks of the list in force that did not change); the
//! list in force is replaced only when the last chunk of the snapshot is in, in one step.
//!
//! Wire format (big-endian, format version 2), signature over every preceding byte:
//!
//! | field | bytes |
//! |---|---|
//! | magic `TGBL` | 4 |
//! | format version (2) | 1 |
//! | kind: 3 snapshot chunk | 1 |
//! | operator id length + bytes | 1 + n |
//! | snapshot version | 8 |
//! | chunk index (0-based) | 4 |
//! | chunk count | 4 |
//! | cards in the whole snapshot | 8 |
//! | entry count | 4 |
//! | entries: UID (7), strictly ascending within the chunk and across chunks in index order | 7 each |
//! | Ed25519 signature | 64 |
//!
//! Every chunk names its snapshot (version, count, total), so chunks of two snapshots never
//! mix: an assembly holds one version; a chunk of a newer one starts over, an older one is
//! ignored.

use super::compact::{self, Part, UidSet};
use super::{ListError, MAGIC};
use crate::rotation::SignedMessage;
use std::collections::BTreeMap;

/// The format version of a chunk.
pub const CHUNK_FORMAT: u8 = 2;
const KIND_CHUNK: u8 = 3;
/// UIDs a chunk carries when the charging server cuts a snapshot (458,752 bytes of UIDs).
pub const CHUNK_ENTRIES: usize = 65_536;
/// Most UIDs one chunk may carry.
pub const MAX_CHUNK_ENTRIES: usize = 262_144;
/// Most chunks one snapshot may have (with [`CHUNK_ENTRIES`]: 268 M cards).
pub const MAX_CHUNKS: u32 = 4_096;

/// Whether `bytes` is a snapshot chunk (format 2) rather than a single message (format 1).
pub fn is_chunk(bytes: &[u8]) -> bool {
    bytes.len() > 6 && &bytes[..4] == MAGIC && bytes[4] == CHUNK_FORMAT
}

/// One chunk of a snapshot, before signing or after verifying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The operator whose list this is.
    pub operator: String,
    /// The snapshot's version.
    pub version: u64,
    /// This chunk's place (0-based).
    pub index: u32,
    /// Chunks in the snapshot.
    pub count: u32,
    /// Cards in the whole snapshot.
    pub total: u64,
    /// The chunk's UIDs as 56-bit keys ([`compact::key`]), strictly ascending.
    pub keys: Vec<u64>,
}

/// Cuts a snapshot (UIDs sorted and distinct) into chunks of `per_chunk` UIDs (at least one
/// chunk, empty for an empty list).
pub fn cut(operator: &str, version: u64, uids: &[[u8; 7]], per_chunk: usize) -> Vec<SnapshotChunk> {
    cut_iter(operator, version, uids, per_chunk).collect()
}

/// [`cut`], one chunk at a time (a signer holds one chunk's keys, not the whole list's).
pub fn cut_iter<'a>(
    operator: &'a str,
    version: u64,
    uids: &'a [[u8; 7]],
    per_chunk: usize,
) -> impl ExactSizeIterator<Item = SnapshotChunk> + 'a {
    let per = per_chunk.clamp(1, MAX_CHUNK_ENTRIES);
    let count = uids.len().div_ceil(per).max(1) as u32;
    (0..count).map(move |i| {
        let lo = (i as usize * per).min(uids.len());
        let hi = (lo + per).min(uids.len());
        SnapshotChunk {
            operator: operator.to_string(),
            version,
            index: i,
            count,
            total: uids.len() as u64,
            keys: uids[lo..hi].iter().map(compact::key).collect(),
        }
    })
}

impl SnapshotChunk {
    /// The bytes that are signed.
    pub fn body(&self) -> Vec<u8> {
        let op = &self.operator.as_bytes()[..self.operator.len().min(255)];
        let mut b = Vec::with_capacity(43 + op.len() + 7 * self.keys.len());
        b.extend_from_slice(MAGIC);
        b.push(CHUNK_FORMAT);
        b.push(KIND_CHUNK);
        b.push(op.len() as u8);
        b.extend_from_slice(op);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.index.to_be_bytes());
        b.extend_from_slice(&self.count.to_be_bytes());
        b.extend_from_slice(&self.total.to_be_bytes());
        b.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
        for k in &self.keys {
            b.extend_from_slice(&compact::uid(*k));
        }
        b
    }

    /// Encodes and signs with `sign` (the HSM's Ed25519 signature over the body).
    pub fn sign_with(&self, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Vec<u8> {
        crate::crypto::ed25519_signed(self.body(), sign)
    }
}

impl SignedMessage for SnapshotChunk {
    type Error = ListError;

    /// Checks the header, verifies the signature under `public_key`, then decodes the body
    /// strictly.
    fn verify(bytes: &[u8], public_key: &[u8; 32]) -> Result<SnapshotChunk, ListError> {
        if bytes.len() < 7 + 8 + 4 + 4 + 8 + 4 + 64 || &bytes[..4] != MAGIC {
            return Err(ListError::Malformed("not a tapgate blocklist message"));
        }
        if bytes[4] != CHUNK_FORMAT || bytes[5] != KIND_CHUNK {
            return Err(ListError::Malformed("not a blocklist snapshot chunk"));
        }
        let body = crate::crypto::ed25519_body(bytes, public_key).ok_or(ListError::BadSignature)?;
        let op_len = body[6] as usize;
        let rest = body
            .get(7 + op_len..)
            .filter(|r| r.len() >= 28)
            .ok_or(ListError::Malformed("truncated"))?;
        let operator = std::str::from_utf8(&body[7..7 + op_len])
            .map_err(|_| ListError::Malformed("operator is not UTF-8"))?
            .to_string();
        let be = |r: &[u8]| r.iter().fold(0u64, |a, b| a << 8 | u64::from(*b));
        let (version, index, count) = (be(&rest[..8]), be(&rest[8..12]), be(&rest[12..16]));
        let (total, n) = (be(&rest[16..24]), be(&rest[24..28]) as usize);
        let entries = &rest[28..];
        if n > MAX_CHUNK_ENTRIES || entries.len() != n * 7 {
            return Err(ListError::Malformed(
                "chunk entry count too large or not the length",
            ));
        }
        if version == 0 || count == 0 || count > u64::from(MAX_CHUNKS) || index >= count {
            return Err(ListError::Malformed(
                "chunk version, index or count out of range",
            ));
        }
        if total > count * MAX_CHUNK_ENTRIES as u64 {
            return Err(ListError::Malformed("more cards than the chunks can hold"));
        }
        let keys: Vec<u64> = entries
            .chunks_exact(7)
            .map(|e| compact::key(e.try_into().expect("7")))
            .collect();
        if keys.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ListError::Malformed(
                "chunk UIDs are not strictly ascending",
            ));
        }
        Ok(SnapshotChunk {
            operator,
            version,
            index: index as u32,
            count: count as u32,
            total,
            keys,
        })
    }

    fn is_bad_signature(e: &ListError) -> bool {
        matches!(e, ListError::BadSignature)
    }
}

/// A chunked snapshot being received: the chunks in so far, each already packed. Chunks that
/// come in index order (as the gateway publishes them) are joined at once into the new set's
/// one block array, reserved for the whole snapshot: at the last chunk there is no second
/// array to copy the parts into while the list in force is still held.
#[derive(Clone, Debug)]
pub struct Assembly {
    version: u64,
    count: u32,
    total: u64,
    /// Chunks `0..next`, joined.
    joined: UidSet,
    next: u32,
    /// Chunks that came before one below them: held until the gap is filled.
    waiting: BTreeMap<u32, Part>,
    /// A chunk's cards did not all lie above the chunks before it: the snapshot never
    /// completes.
    disordered: bool,
}

/// What a chunk did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkProgress {
    /// Kept; the snapshot is not complete yet (`received` of `count` chunks).
    Pending {
        /// The snapshot's version.
        version: u64,
        /// Distinct chunks received.
        received: u32,
        /// Chunks in the snapshot.
        count: u32,
        /// Whether this chunk started the snapshot's assembly (the first of its version;
        /// any other assembly was dropped).
        started: bool,
    },
    /// The chunk was already in (a retained message delivered again): nothing changed.
    Duplicate {
        /// The snapshot's version.
        version: u64,
    },
    /// The chunk belongs to an older snapshot than the one being assembled: ignored.
    Superseded {
        /// The version being assembled.
        assembling: u64,
        /// The chunk's version.
        got: u64,
    },
    /// The last chunk: the snapshot is the list now.
    Complete {
        /// The version now in force.
        version: u64,
    },
}

impl Assembly {
    /// An empty assembly of `c`'s snapshot, with room for its blocks as packed anew (a
    /// chunk's blocks hold [`compact::BLOCK`] cards but its last; blocks shared with the list
    /// in force may hold fewer, and the array then grows).
    pub(super) fn for_chunk(c: &SnapshotChunk) -> Assembly {
        let blocks = c.total.div_ceil(compact::BLOCK as u64) + u64::from(c.count);
        Assembly {
            version: c.version,
            count: c.count,
            total: c.total,
            joined: UidSet::with_block_capacity(blocks as usize),
            next: 0,
            waiting: BTreeMap::new(),
            disordered: false,
        }
    }

    /// The version being assembled.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The chunks not received yet.
    pub fn missing(&self) -> Vec<u32> {
        (self.next..self.count)
            .filter(|i| !self.waiting.contains_key(i))
            .collect()
    }

    /// Heap bytes the packed chunks hold (the joined array's room included).
    pub fn heap_bytes(&self) -> usize {
        self.joined.heap_bytes() + self.waiting.values().map(Part::heap_bytes).sum::<usize>()
    }

    /// Takes `c` (of this assembly's version), packed against `current`: `Ok(true)` when it
    /// was new, `Ok(false)` for a duplicate.
    pub(super) fn add(&mut self, c: &SnapshotChunk, current: &UidSet) -> Result<bool, ListError> {
        if c.count != self.count || c.total != self.total {
            return Err(ListError::Malformed(
                "chunk does not match its snapshot's other chunks (count or total)",
            ));
        }
        if c.index < self.next || self.waiting.contains_key(&c.index) {
            return Ok(false);
        }
        let part = UidSet::pack_part(&c.keys, current);
        if c.index != self.next {
            self.waiting.insert(c.index, part);
            return Ok(true);
        }
        self.join(part);
        while let Some(p) = self.waiting.remove(&self.next) {
            self.join(p);
        }
        Ok(true)
    }

    /// Joins the next chunk's part.
    fn join(&mut self, part: Part) {
        if !self.joined.append_part(part) {
            self.disordered = true;
        }
        self.next += 1;
    }

    /// Chunks in the snapshot.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Chunks received.
    pub fn received(&self) -> u32 {
        self.next + self.waiting.len() as u32
    }

    /// Whether every chunk is in.
    pub fn is_complete(&self) -> bool {
        self.received() == self.count
    }

    /// The whole set, once every chunk is in: the parts in index order, each above the one
    /// before, as many cards as the chunks say.
    pub(super) fn finish(self) -> Result<(u64, UidSet), ListError> {
        if self.disordered || self.next != self.count {
            return Err(ListError::Malformed(
                "snapshot chunks overlap or are not in ascending order",
            ));
        }
        if self.joined.len() as u64 != self.total {
            return Err(ListError::Malformed(
                "snapshot chunks do not hold the cards they announce",
            ));
        }
        Ok((self.version, self.joined))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Blocklist, ListKind, ListUpdate};
    use super::*;
    use crate::test_signing::{public, signer};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The back office's key (seed byte), the blocklist tests' own; 4 is a forger's.
    const BACK_OFFICE: u8 = super::super::tests::BACK_OFFICE;

    fn pk() -> [u8; 32] {
        public(BACK_OFFICE)
    }

    fn signed(c: &SnapshotChunk) -> Vec<u8> {
        c.sign_with(signer(BACK_OFFICE))
    }

    fn uids(set: &BTreeSet<u64>) -> Vec<[u8; 7]> {
        set.iter().map(|k| compact::uid(*k)).collect()
    }

    /// Verifies and applies `bytes` as a validator does.
    fn offer(bl: &mut Blocklist, bytes: &[u8]) -> Result<ChunkProgress, ListError> {
        bl.apply_chunk(&SnapshotChunk::verify(bytes, &pk())?)
    }

    /// A list at version 1 holding `set`, from a format-1 snapshot.
    fn holding(set: &BTreeSet<u64>) -> Blocklist {
        let mut bl = Blocklist::new("metro");
        bl.apply_verified(&ListUpdate {
            kind: ListKind::Snapshot,
            operator: "metro".into(),
            from_version: 0,
            to_version: 1,
            entries: uids(set).into_iter().map(|u| (u, true)).collect(),
        })
        .unwrap();
        bl
    }

    #[test]
    fn a_chunk_roundtrips_and_is_told_from_a_single_message() {
        let c = &cut("metro", 9, &[[1; 7], [2; 7], [3; 7]], 2)[1];
        let b = signed(c);
        assert!(is_chunk(&b));
        assert_eq!(b.len(), 7 + 5 + 8 + 4 + 4 + 8 + 4 + 7 + 64);
        assert_eq!(SnapshotChunk::verify(&b, &pk()).unwrap(), *c);
        assert_eq!((c.index, c.count, c.total), (1, 2, 3));
        let single = ListUpdate {
            kind: ListKind::Snapshot,
            operator: "metro".into(),
            from_version: 0,
            to_version: 1,
            entries: vec![],
        };
        assert!(!is_chunk(&single.sign_with(signer(BACK_OFFICE))));
        // A single message is not a chunk, nor the other way round.
        assert!(matches!(
            SnapshotChunk::verify(&single.sign_with(signer(BACK_OFFICE)), &pk()),
            Err(ListError::Malformed(_))
        ));
        assert!(matches!(
            ListUpdate::verify(&b, &pk()),
            Err(ListError::Malformed(_))
        ));
    }

    #[test]
    fn forged_altered_or_disordered_chunks_are_refused() {
        let c = cut("metro", 4, &[[1; 7], [2; 7]], 10).remove(0);
        let forged = c.sign_with(signer(4));
        assert_eq!(
            SnapshotChunk::verify(&forged, &pk()),
            Err(ListError::BadSignature)
        );
        let mut altered = signed(&c);
        let n = altered.len();
        altered[n - 65] ^= 1;
        assert_eq!(
            SnapshotChunk::verify(&altered, &pk()),
            Err(ListError::BadSignature)
        );
        let mut down = c.clone();
        down.keys.reverse();
        assert!(matches!(
            SnapshotChunk::verify(&signed(&down), &pk()),
            Err(ListError::Malformed(_))
        ));
        let mut beyond = c.clone();
        beyond.index = 1;
        assert!(matches!(
            SnapshotChunk::verify(&signed(&beyond), &pk()),
            Err(ListError::Malformed(_))
        ));
        let mut truncated = signed(&c);
        truncated.drain(40..47);
        assert!(SnapshotChunk::verify(&truncated, &pk()).is_err());
        let mut foreign = c;
        foreign.operator = "bus".into();
        let mut bl = Blocklist::new("metro");
        assert!(matches!(
            offer(&mut bl, &signed(&foreign)),
            Err(ListError::WrongOperator { .. })
        ));
        assert!(bl.incoming().is_none() && bl.version() == 0);
    }

    #[test]
    fn a_missing_chunk_leaves_the_list_in_force() {
        let old: BTreeSet<u64> = (0..1_000u64).map(|i| i * 3).collect();
        let new: BTreeSet<u64> = (0..1_000u64).map(|i| i * 5 + 1).collect();
        let mut bl = holding(&old);
        let before = bl.clone();
        let chunks = cut("metro", 2, &uids(&new), 100);
        for c in chunks.iter().filter(|c| c.index != 7) {
            let p = offer(&mut bl, &signed(c)).unwrap();
            assert!(
                matches!(p, ChunkProgress::Pending { version: 2, .. }),
                "{p:?}"
            );
        }
        assert_eq!(bl, before);
        assert!(bl.is_blocked(&compact::uid(3)) && !bl.is_blocked(&compact::uid(11)));
        assert_eq!(bl.incoming().unwrap().missing(), vec![7]);
        assert_eq!(
            offer(&mut bl, &signed(&chunks[7])),
            Ok(ChunkProgress::Complete { version: 2 })
        );
        assert!(bl.is_blocked(&compact::uid(11)) && !bl.is_blocked(&compact::uid(3)));
        assert_eq!(bl.len(), 1_000);
        // The same snapshot again (retained): already held.
        assert!(matches!(
            offer(&mut bl, &signed(&chunks[0])),
            Err(ListError::Stale { held: 2, got: 2 })
        ));
    }

    #[test]
    fn chunks_of_another_version_never_mix() {
        let a: BTreeSet<u64> = (0..300u64).collect();
        let b: BTreeSet<u64> = (1_000..1_300u64).collect();
        let mut bl = Blocklist::new("metro");
        let v5 = cut("metro", 5, &uids(&a), 100);
        let v7 = cut("metro", 7, &uids(&b), 100);
        offer(&mut bl, &signed(&v5[0])).unwrap();
        // A newer snapshot starts over; the older one's chunks are then ignored.
        assert!(matches!(
            offer(&mut bl, &signed(&v7[1])).unwrap(),
            ChunkProgress::Pending {
                started: true,
                received: 1,
                ..
            }
        ));
        assert_eq!(
            offer(&mut bl, &signed(&v5[1])),
            Ok(ChunkProgress::Superseded {
                assembling: 7,
                got: 5
            })
        );
        offer(&mut bl, &signed(&v5[2])).unwrap();
        assert_eq!(bl.version(), 0);
        assert_eq!(
            offer(&mut bl, &signed(&v7[1])),
            Ok(ChunkProgress::Duplicate { version: 7 })
        );
        offer(&mut bl, &signed(&v7[2])).unwrap();
        assert_eq!(
            offer(&mut bl, &signed(&v7[0])),
            Ok(ChunkProgress::Complete { version: 7 })
        );
        assert!(bl.is_blocked(&compact::uid(1_000)) && !bl.is_blocked(&compact::uid(0)));
        // A chunk that disagrees with its snapshot's others (count) is refused.
        let mut odd = cut("metro", 8, &uids(&a), 100);
        offer(&mut bl, &signed(&odd[0])).unwrap();
        odd[1].count = 4;
        assert!(matches!(
            offer(&mut bl, &signed(&odd[1])),
            Err(ListError::Malformed(_))
        ));
        assert_eq!(bl.version(), 7);
    }

    #[test]
    fn chunks_that_overlap_or_miscount_never_replace_the_list() {
        let set: BTreeSet<u64> = (0..200u64).collect();
        let mut bl = holding(&set);
        let before = bl.clone();
        // Signed, each chunk in order, but chunk 1 starts below chunk 0's end.
        let mut c = cut("metro", 3, &uids(&set), 100);
        c[1].keys[0] = 50;
        for ch in &c[..1] {
            offer(&mut bl, &signed(ch)).unwrap();
        }
        assert!(matches!(
            offer(&mut bl, &signed(&c[1])),
            Err(ListError::Malformed(_))
        ));
        assert_eq!(bl, before);
        assert!(bl.incoming().is_none());
        // A total the chunks do not hold.
        let mut c = cut("metro", 3, &uids(&set), 100);
        for ch in c.iter_mut() {
            ch.total = 201;
        }
        offer(&mut bl, &signed(&c[0])).unwrap();
        assert!(matches!(
            offer(&mut bl, &signed(&c[1])),
            Err(ListError::Malformed(_))
        ));
        assert_eq!(bl, before);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// Chunks in any order, some twice, rebuild exactly the snapshot's set whatever the
        /// list in force; the list in force holds until the last distinct chunk.
        #[test]
        fn reassembly_in_any_order_equals_the_snapshot(
            old in proptest::collection::btree_set(0u64..(1 << 56), 0..1_500),
            changes in proptest::collection::vec((0u64..(1 << 56), any::<bool>()), 0..200),
            keep_old in any::<bool>(),
            per in 1usize..400,
            order in any::<u64>(),
            dups in proptest::collection::vec(0usize..1_000, 0..5),
        ) {
            let mut new = if keep_old { old.clone() } else { BTreeSet::new() };
            for (v, add) in &changes {
                if *add { new.insert(*v); } else { new.remove(v); }
            }
            let mut bl = holding(&old);
            let before = bl.clone();
            let chunks = cut("metro", 9, &uids(&new), per);
            let mut msgs: Vec<Vec<u8>> = chunks.iter().map(signed).collect();
            let n = msgs.len();
            for d in &dups {
                msgs.push(msgs[d % n].clone());
            }
            // A seeded shuffle.
            let mut s = order | 1;
            for i in (1..msgs.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                msgs.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut seen = BTreeSet::new();
            for m in &msgs {
                let c = SnapshotChunk::verify(m, &pk()).unwrap();
                let complete = seen.len() == n;
                seen.insert(c.index);
                let p = bl.apply_chunk(&c);
                if complete {
                    prop_assert!(matches!(p, Err(ListError::Stale { .. })), "{:?}", p);
                } else if seen.len() == n {
                    prop_assert_eq!(p, Ok(ChunkProgress::Complete { version: 9 }));
                } else {
                    prop_assert_eq!(&bl, &before);
                }
            }
            prop_assert_eq!(bl.version(), 9);
            prop_assert_eq!(bl.len(), new.len());
            for v in old.iter().chain(changes.iter().map(|c| &c.0)) {
                prop_assert_eq!(bl.is_blocked(&compact::uid(*v)), new.contains(v));
            }
        }
    }
}
