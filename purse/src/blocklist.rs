//! Signed, versioned blocklists: a full snapshot and deltas, signed by the back office with its
//! Ed25519 key; validators hold only the public key, apply updates strictly in version order,
//! and refuse anything forged or stale.
//!
//! Wire format (big-endian), signature over every preceding byte:
//!
//! | field | bytes |
//! |---|---|
//! | magic `TGBL` | 4 |
//! | format version (1) | 1 |
//! | kind: 1 snapshot, 2 delta | 1 |
//! | operator id length + bytes | 1 + n |
//! | from version (0 for a snapshot) | 8 |
//! | to version | 8 |
//! | entry count | 4 |
//! | entries: UID (7) ‖ action (1: block, 0: unblock; snapshots hold blocks only) | 8 each |
//! | Ed25519 signature | 64 |
//!
//! A snapshot may also arrive in sorted, individually signed chunks (format 2, [`chunked`]):
//! the only way for a list beyond [`MAX_ENTRIES`] cards, and the way a validator applies a
//! 10,000,000-card list within its memory budget. Deltas are always format 1.

pub mod chunked;
pub mod compact;
use crate::rotation::SignedMessage;
use chunked::{Assembly, ChunkProgress, SnapshotChunk};
use compact::UidSet;

const MAGIC: &[u8; 4] = b"TGBL";
const FORMAT: u8 = 1;
/// Most entries one message may carry (a 1 000 000-card list fits).
pub const MAX_ENTRIES: usize = 2_000_000;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListKind {
    /// The whole list at `to_version`.
    Snapshot,
    /// The changes from `from_version` to `to_version`.
    Delta,
}

/// The head both signed lists share, the blocklist (`TGBL`) and the action list (`TGAL`):
/// after the magic (4 bytes) and the format (1), the kind (1: snapshot, 2: delta), the
/// operator (a length byte, at most 255 bytes of UTF-8), the versions the message moves
/// between (8 + 8, big-endian) and the entry count (4), then that many fixed-length entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListHead<'a> {
    pub(crate) kind: ListKind,
    pub(crate) operator: &'a str,
    pub(crate) from_version: u64,
    pub(crate) to_version: u64,
}

impl<'a> ListHead<'a> {
    /// A body's bytes up to its entries, for `entries` entries of `entry_len` bytes (the
    /// capacity reserved for them); an operator name is cut at 255 bytes.
    pub(crate) fn body(
        &self,
        magic: &[u8; 4],
        format: u8,
        entries: usize,
        entry_len: usize,
    ) -> Vec<u8> {
        let op = self.operator.as_bytes();
        let op = &op[..op.len().min(255)];
        let mut b = Vec::with_capacity(27 + op.len() + entry_len * entries);
        b.extend_from_slice(magic);
        b.push(format);
        b.push(match self.kind {
            ListKind::Snapshot => 1,
            ListKind::Delta => 2,
        });
        b.push(op.len() as u8);
        b.extend_from_slice(op);
        b.extend_from_slice(&self.from_version.to_be_bytes());
        b.extend_from_slice(&self.to_version.to_be_bytes());
        b.extend_from_slice(&(entries as u32).to_be_bytes());
        b
    }

    /// Its kind, operator (owned), and the versions it moves from and to.
    pub(crate) fn parts(&self) -> (ListKind, String, u64, u64) {
        (
            self.kind,
            self.operator.to_string(),
            self.from_version,
            self.to_version,
        )
    }

    /// Decodes a verified body's head (its magic and format are the caller's to check) and
    /// returns its entries, `entry_len` bytes each: at most `max_entries`, and exactly as many
    /// as the body holds. The error is the reason, for the caller's `Malformed`.
    pub(crate) fn decode(
        body: &'a [u8],
        entry_len: usize,
        max_entries: usize,
    ) -> Result<(ListHead<'a>, std::slice::ChunksExact<'a, u8>), &'static str> {
        debug_assert!(entry_len > 0, "a list's entries have a length");
        let kind = match body.get(5) {
            Some(1) => ListKind::Snapshot,
            Some(2) => ListKind::Delta,
            _ => return Err("unknown kind"),
        };
        let mut pos: usize = 7;
        let mut take = |n: usize| -> Result<&'a [u8], &'static str> {
            let end = pos
                .checked_add(n)
                .filter(|e| *e <= body.len())
                .ok_or("truncated")?;
            let s = &body[pos..end];
            pos = end;
            Ok(s)
        };
        let op_len = usize::from(*body.get(6).ok_or("truncated")?);
        let operator = std::str::from_utf8(take(op_len)?).map_err(|_| "operator is not UTF-8")?;
        let from_version = u64::from_be_bytes(take(8)?.try_into().expect("8"));
        let to_version = u64::from_be_bytes(take(8)?.try_into().expect("8"));
        let count = u32::from_be_bytes(take(4)?.try_into().expect("4")) as usize;
        if count > max_entries {
            return Err("too many entries");
        }
        let entries = &body[pos..];
        if count.checked_mul(entry_len) != Some(entries.len()) {
            return Err("entry count does not match the length");
        }
        let head = ListHead {
            kind,
            operator,
            from_version,
            to_version,
        };
        Ok((head, entries.chunks_exact(entry_len)))
    }
}

/// A blocklist message (snapshot or delta), before or after signing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListUpdate {
    /// Snapshot or delta.
    pub kind: ListKind,
    /// The operator whose list this is.
    pub operator: String,
    /// The version this delta applies to (0 for a snapshot).
    pub from_version: u64,
    /// The version after applying it.
    pub to_version: u64,
    /// (card UID, blocked?) in order.
    pub entries: Vec<([u8; 7], bool)>,
}

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// Not a tapgate blocklist message, or truncated.
    #[error("malformed blocklist message: {0}")]
    Malformed(&'static str),
    /// The signature does not verify under the back office's public key.
    #[error("blocklist signature does not verify (forged or altered)")]
    BadSignature,
    /// Another operator's list.
    #[error("blocklist of operator {got:?}, this device serves {want:?}")]
    WrongOperator {
        /// expected
        want: String,
        /// got
        got: String,
    },
    /// A delta that does not follow the version held (a gap: fetch the snapshot).
    #[error("delta {from}→{to} does not apply to version {held}")]
    OutOfOrder {
        /// held version
        held: u64,
        /// delta's from version
        from: u64,
        /// delta's to version
        to: u64,
    },
    /// An update older than (or equal to) what is held.
    #[error("stale blocklist version {got} (holding {held})")]
    Stale {
        /// held version
        held: u64,
        /// offered version
        got: u64,
    },
}

impl ListUpdate {
    fn head(&self) -> ListHead<'_> {
        ListHead {
            kind: self.kind,
            operator: &self.operator,
            from_version: self.from_version,
            to_version: self.to_version,
        }
    }

    /// The bytes that are signed.
    pub fn body(&self) -> Vec<u8> {
        let mut b = self.head().body(MAGIC, FORMAT, self.entries.len(), 8);
        for (uid, blocked) in &self.entries {
            b.extend_from_slice(uid);
            b.push(u8::from(*blocked));
        }
        b
    }

    /// Encodes and signs with `sign` (the HSM's Ed25519 signature over the body).
    pub fn sign_with(&self, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Vec<u8> {
        crate::crypto::ed25519_signed(self.body(), sign)
    }
}

impl SignedMessage for ListUpdate {
    type Error = ListError;

    /// Checks the magic and the format, verifies the signature under `public_key`, then decodes
    /// the body strictly.
    fn verify(bytes: &[u8], public_key: &[u8; 32]) -> Result<ListUpdate, ListError> {
        if bytes.len() < 4 + 1 + 1 + 1 + 8 + 8 + 4 + 64 || &bytes[..4] != MAGIC {
            return Err(ListError::Malformed("not a tapgate blocklist message"));
        }
        if bytes[4] != FORMAT {
            return Err(ListError::Malformed("unknown format version"));
        }
        let body = crate::crypto::ed25519_body(bytes, public_key).ok_or(ListError::BadSignature)?;
        let (head, raw) = ListHead::decode(body, 8, MAX_ENTRIES).map_err(ListError::Malformed)?;
        let mut entries = Vec::with_capacity(raw.len());
        for e in raw {
            let blocked = match e[7] {
                0 => false,
                1 => true,
                _ => return Err(ListError::Malformed("entry action is not 0 or 1")),
            };
            entries.push((e[..7].try_into().expect("7"), blocked));
        }
        let (kind, operator, from_version, to_version) = head.parts();
        if kind == ListKind::Snapshot && (from_version != 0 || entries.iter().any(|e| !e.1)) {
            return Err(ListError::Malformed(
                "a snapshot holds blocks only, from version 0",
            ));
        }
        if kind == ListKind::Delta && to_version <= from_version {
            return Err(ListError::Malformed(
                "a delta must move the version forward",
            ));
        }
        Ok(ListUpdate {
            kind,
            operator,
            from_version,
            to_version,
            entries,
        })
    }

    fn is_bad_signature(e: &ListError) -> bool {
        matches!(e, ListError::BadSignature)
    }
}

/// A validator's blocklist: applies verified updates in order. The cards are held in a
/// [`UidSet`] (≈ 4.5 bytes a card: 10 M cards in ≈ 45 MB, issue 22). A chunked snapshot being
/// received is held beside the list in force (not part of its equality) until its last chunk.
#[derive(Clone, Debug, Default)]
pub struct Blocklist {
    operator: String,
    version: u64,
    blocked: UidSet,
    /// The version of the snapshot the list was last replaced by (deltas since move `version`).
    snapshot: u64,
    incoming: Option<Assembly>,
}

impl PartialEq for Blocklist {
    fn eq(&self, other: &Self) -> bool {
        self.operator == other.operator
            && self.version == other.version
            && self.blocked == other.blocked
    }
}

impl Eq for Blocklist {}

impl Blocklist {
    /// An empty list (version 0) for `operator`.
    pub fn new(operator: &str) -> Self {
        Blocklist {
            operator: operator.to_string(),
            version: 0,
            blocked: UidSet::default(),
            snapshot: 0,
            incoming: None,
        }
    }

    /// The version of the snapshot the list in force was built from (0: none yet).
    pub fn snapshot_version(&self) -> u64 {
        self.snapshot
    }

    /// The chunked snapshot being received, if any.
    pub fn incoming(&self) -> Option<&Assembly> {
        self.incoming.as_ref()
    }

    /// Takes a verified chunk of a snapshot ([`SnapshotChunk::verify`]). Chunks of one snapshot
    /// may come in any order and more than once; each is packed as it comes. The list in force
    /// changes only with the last chunk, at once; until then (a chunk missing) it stays as it
    /// is. A chunk of a newer snapshot drops the one being assembled; one of an older snapshot
    /// is ignored. On any error the list in force is unchanged (a snapshot whose chunks do not
    /// fit together is dropped).
    pub fn apply_chunk(&mut self, c: &SnapshotChunk) -> Result<ChunkProgress, ListError> {
        self.own_operator(&c.operator)?;
        self.drop_incoming_up_to(self.version);
        self.newer(c.version)?;
        let started = match &self.incoming {
            Some(a) if a.version() > c.version => {
                return Ok(ChunkProgress::Superseded {
                    assembling: a.version(),
                    got: c.version,
                })
            }
            Some(a) => a.version() < c.version,
            None => true,
        };
        if started {
            self.incoming = Some(Assembly::for_chunk(c));
        }
        let a = self.incoming.as_mut().expect("set above");
        if !a.add(c, &self.blocked)? {
            return Ok(ChunkProgress::Duplicate { version: c.version });
        }
        if !a.is_complete() {
            return Ok(ChunkProgress::Pending {
                version: c.version,
                received: a.received(),
                count: c.count,
                started,
            });
        }
        let (version, set) = self.incoming.take().expect("set above").finish()?;
        self.blocked = set;
        self.version = version;
        self.snapshot = version;
        Ok(ChunkProgress::Complete { version })
    }

    /// The version held (reported in heartbeats).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether `uid` is blocked.
    pub fn is_blocked(&self, uid: &[u8; 7]) -> bool {
        self.blocked.contains(compact::key(uid))
    }

    /// Heap bytes the list of cards holds (see [`UidSet::heap_bytes`]).
    pub fn heap_bytes(&self) -> usize {
        self.blocked.heap_bytes()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.blocked.len()
    }

    /// Whether no card is blocked.
    pub fn is_empty(&self) -> bool {
        self.blocked.is_empty()
    }

    /// Verifies and applies a signed update. A snapshot replaces the list if newer; a delta
    /// must start exactly at the version held. Nothing changes on any error.
    pub fn apply(&mut self, bytes: &[u8], public_key: &[u8; 32]) -> Result<u64, ListError> {
        self.apply_verified(&ListUpdate::verify(bytes, public_key)?)
    }

    /// Applies an update that [`ListUpdate::verify`] returned (for a caller that also needs to
    /// know what it was, without verifying the signature twice).
    pub fn apply_verified(&mut self, u: &ListUpdate) -> Result<u64, ListError> {
        self.own_operator(&u.operator)?;
        self.newer(u.to_version)?;
        match u.kind {
            ListKind::Snapshot => {
                self.blocked =
                    UidSet::from_keys(u.entries.iter().map(|e| compact::key(&e.0)).collect());
                self.drop_incoming_up_to(u.to_version);
            }
            ListKind::Delta => {
                if u.from_version != self.version {
                    return Err(ListError::OutOfOrder {
                        held: self.version,
                        from: u.from_version,
                        to: u.to_version,
                    });
                }
                let changes: Vec<(u64, bool)> = u
                    .entries
                    .iter()
                    .map(|(uid, blocked)| (compact::key(uid), *blocked))
                    .collect();
                self.blocked.apply(&changes);
            }
        }
        self.version = u.to_version;
        Ok(self.version)
    }

    /// Refused unless a message is for this list's operator.
    fn own_operator(&self, got: &str) -> Result<(), ListError> {
        if got == self.operator {
            return Ok(());
        }
        Err(ListError::WrongOperator {
            want: self.operator.clone(),
            got: got.to_string(),
        })
    }

    /// Refused as stale unless version `got` is newer than the one held.
    fn newer(&self, got: u64) -> Result<(), ListError> {
        if got > self.version {
            return Ok(());
        }
        Err(ListError::Stale {
            held: self.version,
            got,
        })
    }

    /// Drops the chunked snapshot being received unless it is newer than `version`.
    fn drop_incoming_up_to(&mut self, version: u64) {
        if self
            .incoming
            .as_ref()
            .is_some_and(|a| a.version() <= version)
        {
            self.incoming = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_signing::{public, signer};

    /// The back office's key (seed byte); 4 is a forger's.
    pub(super) const BACK_OFFICE: u8 = 3;

    fn signed(u: &ListUpdate) -> Vec<u8> {
        u.sign_with(signer(BACK_OFFICE))
    }

    fn delta(from: u64, to: u64, entries: Vec<([u8; 7], bool)>) -> ListUpdate {
        ListUpdate {
            kind: ListKind::Delta,
            operator: "metro".into(),
            from_version: from,
            to_version: to,
            entries,
        }
    }

    /// A forger's trick the lax check lets through: the identity point as the "public key" and
    /// the signature (R = identity, s = 0) satisfy `[s]B = R + [k]A` for any body, so
    /// `VerifyingKey::verify` accepts it. A validator configured (or tricked into) such a key
    /// must not accept a list anyone can "sign": `verify_strict` refuses the weak key.
    #[test]
    fn a_weak_key_and_its_trivial_signature_are_refused() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let forged = delta(0, 1, vec![([9; 7], true)]).sign_with(|_| {
            let mut sig = [0u8; 64];
            sig[..32].copy_from_slice(&identity);
            sig
        });
        let lax = ed25519_dalek::VerifyingKey::from_bytes(&identity).unwrap();
        let (body, sig) = forged.split_at(forged.len() - 64);
        let sig = ed25519_dalek::Signature::from_bytes(sig.try_into().unwrap());
        use ed25519_dalek::Verifier;
        assert!(lax.verify(body, &sig).is_ok(), "the lax check accepts it");
        assert_eq!(
            ListUpdate::verify(&forged, &identity),
            Err(ListError::BadSignature)
        );
    }

    #[test]
    fn snapshot_then_deltas_in_order() {
        let pk = public(BACK_OFFICE);
        let mut bl = Blocklist::new("metro");
        let snap = ListUpdate {
            kind: ListKind::Snapshot,
            operator: "metro".into(),
            from_version: 0,
            to_version: 5,
            entries: vec![([1; 7], true), ([2; 7], true)],
        };
        assert_eq!(bl.apply(&signed(&snap), &pk), Ok(5));
        assert!(bl.is_blocked(&[1; 7]));
        assert_eq!(
            bl.apply(
                &signed(&delta(5, 6, vec![([1; 7], false), ([3; 7], true)])),
                &pk
            ),
            Ok(6)
        );
        assert!(!bl.is_blocked(&[1; 7]) && bl.is_blocked(&[3; 7]));
        // Out of order, stale, replayed: refused, nothing changes.
        let before = bl.clone();
        assert!(matches!(
            bl.apply(&signed(&delta(7, 8, vec![])), &pk),
            Err(ListError::OutOfOrder { .. })
        ));
        assert!(matches!(
            bl.apply(&signed(&delta(5, 6, vec![])), &pk),
            Err(ListError::Stale { .. })
        ));
        assert!(matches!(
            bl.apply(&signed(&snap), &pk),
            Err(ListError::Stale { .. })
        ));
        assert_eq!(bl, before);
    }

    #[test]
    fn forged_altered_or_foreign_lists_are_refused() {
        let pk = public(BACK_OFFICE);
        let mut bl = Blocklist::new("metro");
        let d = delta(0, 1, vec![([9; 7], false)]);
        assert_eq!(
            bl.apply(&d.sign_with(signer(4)), &pk),
            Err(ListError::BadSignature)
        );
        let mut altered = signed(&delta(0, 1, vec![([9; 7], true)]));
        let n = altered.len();
        altered[n - 65] = 0; // unblock instead of block
        assert_eq!(bl.apply(&altered, &pk), Err(ListError::BadSignature));
        let mut foreign = d.clone();
        foreign.operator = "bus".into();
        assert!(matches!(
            bl.apply(&signed(&foreign), &pk),
            Err(ListError::WrongOperator { .. })
        ));
        assert!(bl.apply(&[0u8; 10], &pk).is_err());
        assert_eq!(bl.version(), 0);
    }

    #[test]
    fn a_million_entry_snapshot_roundtrips() {
        let pk = public(BACK_OFFICE);
        let entries: Vec<([u8; 7], bool)> = (0..1_000_000u32)
            .map(|i| {
                let mut u = [4u8; 7];
                u[3..7].copy_from_slice(&i.to_be_bytes());
                (u, true)
            })
            .collect();
        let snap = ListUpdate {
            kind: ListKind::Snapshot,
            operator: "metro".into(),
            from_version: 0,
            to_version: 1,
            entries,
        };
        let bytes = signed(&snap);
        assert_eq!(bytes.len(), 4 + 1 + 1 + 1 + 5 + 8 + 8 + 4 + 8_000_000 + 64);
        let mut bl = Blocklist::new("metro");
        bl.apply(&bytes, &pk).unwrap();
        assert_eq!(bl.len(), 1_000_000);
        assert!(bl.is_blocked(&[4, 4, 4, 0, 0, 0x03, 0xE7]));
    }
}
