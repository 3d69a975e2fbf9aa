//! A compact, exact set of 7-byte card UIDs (issue 22): 10 000 000 random UIDs in ≈ 45 MB
//! where a `BTreeSet<[u8; 7]>` needs 400+ MB.
//!
//! Each UID is read as a 56-bit big-endian number. The sorted numbers are cut into blocks of
//! [`BLOCK`] values (a block grows to at most `2 × BLOCK` before it is split again); a block
//! keeps its first value whole and the gaps to the following values bit-packed at the width
//! of the block's largest gap (≈ 35 bits for 10 M random UIDs over 2⁵⁶, fewer for real UIDs
//! that share a manufacturer byte). A lookup binary-searches the block heads, then adds up at
//! most one block's gaps. A change rewrites only the blocks it touches, so applying a delta
//! never needs a second copy of the whole set.

use std::sync::Arc;

/// Values per block when a block is (re)built.
pub const BLOCK: usize = 128;

/// One block: its first value, how many values it holds, and the packed gaps after the first.
/// The gaps are shared (`Arc`): a snapshot that holds a run of values the list in force already
/// holds in one block reuses that block instead of packing it again ([`UidSet::pack_part`]).
#[derive(Clone)]
struct Block {
    head: u64,
    len: u16,
    width: u8,
    gaps: Arc<[u64]>,
}

impl Block {
    /// Packs `vals` (sorted, distinct, non-empty, fewer than 2¹⁶).
    fn pack(vals: &[u64]) -> Block {
        let max_gap = vals.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let width = (64 - max_gap.leading_zeros()) as usize;
        let bits = width * (vals.len() - 1);
        // One spare word so that a read never needs a bounds branch for the second word.
        let mut gaps = vec![0u64; bits.div_ceil(64) + 1];
        for (k, w) in vals.windows(2).enumerate() {
            let (gap, p) = (w[1] - w[0], k * width);
            let (i, off) = (p / 64, p % 64);
            gaps[i] |= gap << off;
            if off + width > 64 {
                gaps[i + 1] |= gap >> (64 - off);
            }
        }
        Block {
            head: vals[0],
            len: vals.len() as u16,
            width: width as u8,
            gaps: Arc::from(gaps),
        }
    }

    /// The `k`-th gap (k < len − 1).
    #[inline]
    fn gap(&self, k: usize) -> u64 {
        let width = self.width as usize;
        let p = k * width;
        let (i, off) = (p / 64, p % 64);
        let mut v = self.gaps[i] >> off;
        if off + width > 64 {
            v |= self.gaps[i + 1] << (64 - off);
        }
        v & ((1u64 << width) - 1)
    }

    /// The block's values in order.
    fn values(&self) -> impl Iterator<Item = u64> + '_ {
        let mut v = self.head;
        std::iter::once(self.head).chain((0..self.len as usize - 1).map(move |k| {
            v += self.gap(k);
            v
        }))
    }

    fn contains(&self, x: u64) -> bool {
        if x == self.head {
            return true;
        }
        let mut v = self.head;
        for k in 0..self.len as usize - 1 {
            v += self.gap(k);
            if v >= x {
                return v == x;
            }
        }
        false
    }
}

/// A UID as its 56-bit number.
pub fn key(uid: &[u8; 7]) -> u64 {
    let mut b = [0u8; 8];
    b[1..].copy_from_slice(uid);
    u64::from_be_bytes(b)
}

/// A 56-bit number back as a UID.
pub fn uid(key: u64) -> [u8; 7] {
    key.to_be_bytes()[1..].try_into().expect("7")
}

/// The compact set. Equality is of contents, whatever the block boundaries.
#[derive(Clone, Default)]
pub struct UidSet {
    blocks: Vec<Block>,
    len: usize,
}

impl PartialEq for UidSet {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for UidSet {}

impl std::fmt::Debug for UidSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UidSet")
            .field("len", &self.len)
            .field("blocks", &self.blocks.len())
            .field("heap_bytes", &self.heap_bytes())
            .finish()
    }
}

impl UidSet {
    /// The set of `keys` (any order, duplicates allowed; values must be below 2⁵⁶).
    pub fn from_keys(mut keys: Vec<u64>) -> UidSet {
        keys.sort_unstable();
        keys.dedup();
        let blocks: Vec<Block> = keys.chunks(BLOCK).map(Block::pack).collect();
        UidSet {
            len: keys.len(),
            blocks,
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `x` is in the set.
    pub fn contains(&self, x: u64) -> bool {
        match self.blocks.partition_point(|b| b.head <= x) {
            0 => false,
            i => self.blocks[i - 1].contains(x),
        }
    }

    /// All values in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.iter().flat_map(Block::values)
    }

    /// Bytes of heap this set holds, from its allocations' sizes (the allocator's own
    /// bookkeeping per allocation is not included; a block shared with another set is counted
    /// in both).
    pub fn heap_bytes(&self) -> usize {
        blocks_heap_bytes(&self.blocks)
    }

    /// The blocks of `keys` (sorted, distinct, below 2⁵⁶): one part of a set that arrives in
    /// pieces (a chunked snapshot). Where `keys` holds, in a row, exactly the values of one of
    /// `current`'s blocks, that block is shared rather than packed again, so a snapshot that
    /// differs little from the list in force costs little more memory than that list.
    pub fn pack_part(keys: &[u64], current: &UidSet) -> Part {
        let cur = &current.blocks;
        let mut blocks: Vec<Block> = Vec::with_capacity(keys.len() / BLOCK + 2);
        let mut c = match keys.first() {
            Some(k) => cur.partition_point(|b| b.head < *k),
            None => cur.len(),
        };
        let (mut run, mut p) = (0usize, 0usize);
        while p < keys.len() && c < cur.len() {
            let k = keys[p];
            while c < cur.len() && cur[c].head < k {
                c += 1;
            }
            let Some(b) = cur.get(c) else { break };
            let n = b.len as usize;
            if b.head == k && p + n <= keys.len() && b.values().eq(keys[p..p + n].iter().copied()) {
                blocks.extend(keys[run..p].chunks(BLOCK).map(Block::pack));
                blocks.push(b.clone());
                p += n;
                run = p;
                c += 1;
            } else {
                p += 1;
            }
        }
        blocks.extend(keys[run..].chunks(BLOCK).map(Block::pack));
        blocks.shrink_to_fit();
        Part {
            blocks,
            len: keys.len(),
            first: keys.first().copied(),
        }
    }

    /// The set made of `parts` in order; `None` unless each part's values all lie above the
    /// previous part's.
    pub fn from_parts(parts: impl IntoIterator<Item = Part>) -> Option<UidSet> {
        // One allocation of the exact size: no growth by doubling (and copying) at the moment
        // the list in force and the new one are both held.
        let parts: Vec<Part> = parts.into_iter().collect();
        let mut set = UidSet::with_block_capacity(parts.iter().map(|p| p.blocks.len()).sum());
        for p in parts {
            if !set.append_part(p) {
                return None;
            }
        }
        Some(set)
    }

    /// An empty set with room for `blocks` blocks, to be built part by part
    /// ([`UidSet::append_part`]). Room not filled is address space only: no page of it is
    /// resident until a block is written there.
    pub fn with_block_capacity(blocks: usize) -> UidSet {
        UidSet {
            blocks: Vec::with_capacity(blocks),
            len: 0,
        }
    }

    /// Appends `part` after the set's values (its blocks moved, not packed again): `false`,
    /// the set unchanged, unless every value of `part` lies above the set's last. Beyond the
    /// room reserved, the block array grows by an eighth at a time, not by doubling.
    pub fn append_part(&mut self, part: Part) -> bool {
        if let (Some(l), Some(f)) = (self.last(), part.first) {
            if f <= l {
                return false;
            }
        }
        let (cap, len) = (self.blocks.capacity(), self.blocks.len());
        if cap - len < part.blocks.len() {
            self.blocks
                .reserve_exact(part.blocks.len().max(cap / 8).max(BLOCK));
        }
        self.len += part.len;
        self.blocks.extend(part.blocks);
        true
    }

    /// The largest value held.
    fn last(&self) -> Option<u64> {
        self.blocks.last().and_then(|b| b.values().last())
    }

    /// Applies `changes` (value, present?) in order — a later change of the same value wins.
    /// Only the blocks whose range a change falls in are decoded and packed again.
    pub fn apply(&mut self, changes: &[(u64, bool)]) {
        if changes.is_empty() {
            return;
        }
        let mut ch: Vec<(u64, bool)> = changes.to_vec();
        // Stable, then keep the last change of each value.
        ch.sort_by_key(|c| c.0);
        let mut last: Vec<(u64, bool)> = Vec::with_capacity(ch.len());
        for c in ch {
            match last.last_mut() {
                Some(l) if l.0 == c.0 => *l = c,
                _ => last.push(c),
            }
        }
        let old = std::mem::take(&mut self.blocks);
        let mut out: Vec<Block> = Vec::with_capacity(old.len() + last.len() / BLOCK + 1);
        let mut rest = &last[..];
        let n = old.len();
        let mut vals: Vec<u64> = Vec::with_capacity(2 * BLOCK);
        let mut it = old.into_iter().peekable();
        if n == 0 {
            merge_into(&mut vals, &[], rest);
            push_blocks(&mut out, &vals);
            rest = &[];
        }
        while let Some(b) = it.next() {
            // Block i takes the changes below the next block's head (block 0 also those below
            // its own head).
            let upper = it.peek().map(|nb| nb.head);
            let take = match upper {
                Some(u) => rest.partition_point(|c| c.0 < u),
                None => rest.len(),
            };
            let (mine, later) = rest.split_at(take);
            rest = later;
            if mine.is_empty() {
                out.push(b);
                continue;
            }
            let cur: Vec<u64> = b.values().collect();
            merge_into(&mut vals, &cur, mine);
            push_blocks(&mut out, &vals);
        }
        out.shrink_to_fit();
        self.len = out.iter().map(|b| b.len as usize).sum();
        self.blocks = out;
    }
}

/// Some consecutive values of a set, packed (see [`UidSet::pack_part`]).
#[derive(Clone, Default)]
pub struct Part {
    blocks: Vec<Block>,
    len: usize,
    first: Option<u64>,
}

impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Part")
            .field("len", &self.len)
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl Part {
    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the part holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of heap the part holds (shared blocks included, as in [`UidSet::heap_bytes`]).
    pub fn heap_bytes(&self) -> usize {
        blocks_heap_bytes(&self.blocks)
    }
}

/// Bytes of heap `blocks` holds: the vector's allocation and each block's words (a block shared
/// with another set is counted here too).
fn blocks_heap_bytes(blocks: &Vec<Block>) -> usize {
    // An `Arc<[u64]>` allocation holds its two counts before the words.
    blocks.capacity() * std::mem::size_of::<Block>()
        + blocks.iter().map(|b| b.gaps.len() * 8 + 16).sum::<usize>()
}

/// `vals` := `cur` (sorted) with `changes` (sorted by value, one per value) applied.
fn merge_into(vals: &mut Vec<u64>, cur: &[u64], changes: &[(u64, bool)]) {
    vals.clear();
    let (mut i, mut j) = (0, 0);
    while i < cur.len() || j < changes.len() {
        if j == changes.len() || (i < cur.len() && cur[i] < changes[j].0) {
            vals.push(cur[i]);
            i += 1;
        } else {
            if i < cur.len() && cur[i] == changes[j].0 {
                i += 1;
            }
            if changes[j].1 {
                vals.push(changes[j].0);
            }
            j += 1;
        }
    }
}

/// Packs `vals` after the blocks in `out`: into one block if it holds at most `2 × BLOCK`,
/// else into blocks of `BLOCK`. A small result joins the block before it when both fit.
fn push_blocks(out: &mut Vec<Block>, vals: &[u64]) {
    if vals.is_empty() {
        return;
    }
    if vals.len() < BLOCK / 4 {
        if let Some(prev) = out.last() {
            if prev.len as usize + vals.len() <= 2 * BLOCK {
                let mut joined: Vec<u64> = prev.values().collect();
                joined.extend_from_slice(vals);
                *out.last_mut().expect("checked") = Block::pack(&joined);
                return;
            }
        }
    }
    if vals.len() <= 2 * BLOCK {
        out.push(Block::pack(vals));
    } else {
        out.extend(vals.chunks(BLOCK).map(Block::pack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn check(set: &UidSet, model: &BTreeSet<u64>) {
        assert_eq!(set.len(), model.len());
        assert!(set.iter().eq(model.iter().copied()));
        for b in &set.blocks {
            assert!(b.len as usize >= 1 && b.len as usize <= 2 * BLOCK);
        }
    }

    /// Values drawn from a small range (many collisions) or the whole 56 bits.
    fn value() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..2_000,
            0u64..(1 << 56),
            Just((1u64 << 56) - 1),
            Just(0u64)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_a_btreeset(
            initial in proptest::collection::vec(value(), 0..1_500),
            rounds in proptest::collection::vec(
                proptest::collection::vec((value(), any::<bool>()), 0..600), 1..6),
            probes in proptest::collection::vec(value(), 0..300),
        ) {
            let mut model: BTreeSet<u64> = initial.iter().copied().collect();
            let mut set = UidSet::from_keys(initial.clone());
            check(&set, &model);
            for r in &rounds {
                for (v, add) in r {
                    if *add { model.insert(*v); } else { model.remove(v); }
                }
                set.apply(r);
                check(&set, &model);
                for v in probes.iter().chain(r.iter().map(|c| &c.0)).chain(initial.iter()) {
                    prop_assert_eq!(set.contains(*v), model.contains(v));
                    prop_assert_eq!(set.contains(v.wrapping_add(1) & ((1 << 56) - 1)),
                        model.contains(&(v.wrapping_add(1) & ((1 << 56) - 1))));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// A set built from parts equals the model whatever the list in force, and shares
        /// every block of the list in force that the new values hold whole.
        #[test]
        fn parts_make_the_set_and_share_unchanged_blocks(
            current in proptest::collection::vec(value(), 0..3_000),
            changes in proptest::collection::vec((value(), any::<bool>()), 0..40),
            cuts in proptest::collection::vec(0usize..4_000, 0..6),
        ) {
            let cur = UidSet::from_keys(current.clone());
            let mut model: BTreeSet<u64> = current.iter().copied().collect();
            for (v, add) in &changes {
                if *add { model.insert(*v); } else { model.remove(v); }
            }
            let keys: Vec<u64> = model.iter().copied().collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(keys.len())).collect();
            cuts.push(0);
            cuts.push(keys.len());
            cuts.sort_unstable();
            let parts: Vec<Part> = cuts
                .windows(2)
                .map(|w| UidSet::pack_part(&keys[w[0]..w[1]], &cur))
                .collect();
            let set = UidSet::from_parts(parts).expect("parts in order");
            check(&set, &model);
            for v in current.iter().chain(changes.iter().map(|c| &c.0)) {
                prop_assert_eq!(set.contains(*v), model.contains(v));
            }
            // Every block of the list in force that no change touched and no cut split is
            // shared, not copied.
            for b in &cur.blocks {
                let vals: Vec<u64> = b.values().collect();
                let untouched = changes.iter().all(|(v, _)| {
                    *v < vals[0] || *v > vals[vals.len() - 1]
                });
                let lo = keys.partition_point(|k| *k < vals[0]);
                let uncut = cuts.iter().all(|c| *c <= lo || *c >= lo + vals.len());
                if untouched && uncut {
                    prop_assert!(set.blocks.iter().any(|n| Arc::ptr_eq(&n.gaps, &b.gaps)));
                }
            }
        }
    }

    #[test]
    fn parts_out_of_order_make_no_set() {
        let cur = UidSet::default();
        let a = UidSet::pack_part(&[1, 2, 3], &cur);
        let b = UidSet::pack_part(&[3, 4], &cur);
        assert!(UidSet::from_parts([a.clone(), b.clone()]).is_none());
        assert!(UidSet::from_parts([b, a]).is_none());
        let e = UidSet::pack_part(&[], &cur);
        let s = UidSet::from_parts([e.clone(), UidSet::pack_part(&[7], &cur), e]).unwrap();
        assert!(s.iter().eq([7u64]));
    }

    #[test]
    fn removing_everything_then_adding_again() {
        let all: Vec<u64> = (0..1_000u64).map(|i| i * 7_919).collect();
        let mut set = UidSet::from_keys(all.clone());
        let removes: Vec<(u64, bool)> = all.iter().map(|v| (*v, false)).collect();
        set.apply(&removes);
        assert!(set.is_empty() && set.blocks.is_empty() && !set.contains(0));
        set.apply(&[(5, true), (5, false), (9, true)]);
        assert!(set.iter().eq([9u64]));
    }

    #[test]
    fn uid_keys_roundtrip_and_keep_order() {
        let a = [0u8, 0, 0, 0, 0, 0, 1];
        let b = [0xFFu8; 7];
        assert_eq!(uid(key(&a)), a);
        assert_eq!(uid(key(&b)), b);
        assert!(key(&a) < key(&b) && key(&b) == (1 << 56) - 1);
    }
}
