//! The validator's durable journal (LMDB via heed, fsync on every commit).
//!
//! - `outbox`: signed tap records by device sequence number, kept until the gateway confirms
//!   them (not when the broker acknowledges the publish). Bounded by `outbox_capacity_taps`:
//!   when full the gate refuses to take value (it cannot journal) and raises the alarm.
//! - `pending`: by card UID, the debit a tap is about to apply, written *before* the card is
//!   touched; cleared in the same transaction that journals the committed tap. A pending entry
//!   that survives a tear or a crash is settled from the card's counter at its next tap.
//! - `pickups`: by card UID, the action-list credit a pick-up is about to apply (a
//!   [`PendingTap`] of kind Credit whose stop and route codes carry the order id, and the
//!   order's expiry), written before the card is touched, cleared with the credit's tap.
//! - `applied`: by order id, the action-list orders applied (or found on the card) here, with
//!   their expiry: never applied again; pruned once expired (an expired order is never
//!   applied anyway).
//! - `meta`: the next sequence number, and the signed blocklist and fare-table messages applied
//!   (replayed at start).

use heed::types::{Bytes, Str, U64};
use heed::{byteorder::BE, Database, Env, WithoutTls};
use purse::confirm::Confirmed;
use purse::receipt::TxKind;
use purse::tap::TAP_LEN;
use purse::txn::PendingChange;
use std::path::Path;

mod blob_files;

/// Which blobs under a prefix a write keeps (the others are dropped in its transaction).
type KeepBlob<'a> = &'a dyn Fn(&str) -> bool;

/// Journal errors.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    /// A blob's entry names a file that cannot be read (missing or unreadable).
    #[error("journal blob {key}: its file {path}: {source}")]
    BlobFile {
        key: String,
        path: String,
        source: std::io::Error,
    },
    #[error("journal storage: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("opening the journal: {0}")]
    Open(#[from] tapgate_lmdb::OpenError),
    #[error(
        "the outbox holds {0} taps, its configured capacity: the gateway has not confirmed them"
    )]
    OutboxFull(u64),
    #[error("journal entry is corrupt: {0}")]
    Corrupt(&'static str),
}

/// What a tap is about to do to a card, journalled before the card is touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingTap {
    pub change: PendingChange,
    /// Device time, unix ms, of the attempt.
    pub time_ms: u64,
    pub stop_code: u32,
    pub route_code: u32,
    pub fare_table_version: u32,
    pub blocklist_version: u64,
    /// The trip record the debit writes to the card: finding it among the card's records is
    /// what tells this debit from another validator's transaction at the same counter.
    pub record: [u8; 32],
}

/// Bytes of a journalled pending debit.
pub const PENDING_LEN: usize = 7 + 4 + 4 + 1 + 4 + 1 + 8 + 4 + 4 + 4 + 8 + 32;

impl PendingTap {
    /// The journal's byte layout of a pending debit (what [`PendingTap::decode`] reads back).
    pub fn encode(&self) -> [u8; PENDING_LEN] {
        let mut b = [0u8; PENDING_LEN];
        let c = &self.change;
        b[0..7].copy_from_slice(&c.uid);
        b[7..11].copy_from_slice(&c.tmc_before.to_be_bytes());
        b[11..15].copy_from_slice(&c.balance_before_minor.to_be_bytes());
        b[15] = c.kind as u8;
        b[16..20].copy_from_slice(&c.amount_minor.to_be_bytes());
        b[20] = c.key_version;
        b[21..29].copy_from_slice(&self.time_ms.to_be_bytes());
        b[29..33].copy_from_slice(&self.stop_code.to_be_bytes());
        b[33..37].copy_from_slice(&self.route_code.to_be_bytes());
        b[37..41].copy_from_slice(&self.fare_table_version.to_be_bytes());
        b[41..49].copy_from_slice(&self.blocklist_version.to_be_bytes());
        b[49..81].copy_from_slice(&self.record);
        b
    }

    /// Reads back a pending debit the journal wrote; anything else (a corrupt or foreign entry)
    /// is a typed [`JournalError::Corrupt`], never a panic. Fuzzed (`fuzz/`, `journal_record`).
    pub fn decode(b: &[u8]) -> Result<Self, JournalError> {
        if b.len() != PENDING_LEN {
            return Err(JournalError::Corrupt("pending entry length"));
        }
        let be32 = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        let be64 = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(x)
        };
        let kind = match b[15] {
            0 => TxKind::RecordOnly,
            1 => TxKind::Debit,
            2 => TxKind::Credit,
            3 => TxKind::LimitedCredit,
            _ => return Err(JournalError::Corrupt("pending entry kind")),
        };
        let mut uid = [0u8; 7];
        uid.copy_from_slice(&b[0..7]);
        Ok(PendingTap {
            change: PendingChange {
                uid,
                tmc_before: u32::from_be_bytes(be32(7)),
                balance_before_minor: i32::from_be_bytes(be32(11)),
                kind,
                amount_minor: i32::from_be_bytes(be32(16)),
                key_version: b[20],
            },
            time_ms: be64(21),
            stop_code: u32::from_be_bytes(be32(29)),
            route_code: u32::from_be_bytes(be32(33)),
            fare_table_version: u32::from_be_bytes(be32(37)),
            blocklist_version: be64(41),
            record: {
                let mut r = [0u8; 32];
                r.copy_from_slice(&b[49..81]);
                r
            },
        })
    }
}

/// The journal.
pub struct Journal {
    env: Env<WithoutTls>,
    outbox: Database<U64<BE>, Bytes>,
    pending: Database<Bytes, Bytes>,
    /// Debits the card committed but this validator can no longer prove (the card transacted
    /// elsewhere since): kept for the back office, never dropped.
    unresolved: Database<Bytes, Bytes>,
    meta: Database<Str, Bytes>,
    pickups: Database<Bytes, Bytes>,
    applied: Database<U64<BE>, U64<BE>>,
    capacity_taps: u64,
    /// Blobs larger than 64 KiB, kept as files ([`blob_files`]).
    files: blob_files::BlobFiles,
    /// Tests only: a fault injected into blob writes ([`Journal::inject_blob_fault`]).
    #[cfg(test)]
    blob_fault: std::sync::Mutex<Option<BlobFault>>,
}

/// Tests only: called with a blob's key before it is written; an error returned is that
/// write's failure (as a full disk or an I/O error would fail it), nothing written.
#[cfg(test)]
pub(crate) type BlobFault = Box<dyn FnMut(&str) -> Option<std::io::Error> + Send>;

/// An action-list credit about to be applied to a card, journalled before the card is touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingPickup {
    /// The credit, as a pending tap (kind Credit; stop and route codes carry the order id,
    /// `purse::actionlist::order_tap_codes`; `record` is the pick-up record it writes).
    pub tap: PendingTap,
    /// The order.
    pub order_id: u64,
    /// The order's expiry (unix seconds).
    pub expires_s: u64,
}

impl PendingPickup {
    fn encode(&self) -> Vec<u8> {
        let mut b = self.tap.encode().to_vec();
        b.extend_from_slice(&self.order_id.to_be_bytes());
        b.extend_from_slice(&self.expires_s.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self, JournalError> {
        if b.len() != PENDING_LEN + 16 {
            return Err(JournalError::Corrupt("pending pick-up length"));
        }
        let be64 = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8"));
        Ok(PendingPickup {
            tap: PendingTap::decode(&b[..PENDING_LEN])?,
            order_id: be64(PENDING_LEN),
            expires_s: be64(PENDING_LEN + 8),
        })
    }
}

const NEXT_SEQ: &str = "next_seq";
const CEILING_SPENT: &str = "ceiling_spent";

impl Journal {
    /// Opens (or creates) the journal in `dir`.
    pub fn open(
        dir: &Path,
        outbox_capacity_taps: u64,
        map_size_bytes: usize,
    ) -> Result<Self, JournalError> {
        let (env, [outbox, pending, unresolved, meta, pickups, applied]) = tapgate_lmdb::open(
            dir,
            [
                "outbox",
                "pending",
                "unresolved",
                "meta",
                "pickups",
                "applied",
            ],
            &tapgate_lmdb::EnvConfig::durable(map_size_bytes),
        )?;
        Ok(Self {
            env,
            outbox: outbox.remap_types(),
            pending: pending.remap_types(),
            unresolved: unresolved.remap_types(),
            meta: meta.remap_types(),
            pickups: pickups.remap_types(),
            applied: applied.remap_types(),
            capacity_taps: outbox_capacity_taps,
            files: blob_files::BlobFiles::open(dir)?,
            #[cfg(test)]
            blob_fault: std::sync::Mutex::new(None),
        })
        .and_then(Journal::without_unnamed_files)
    }

    /// The journal, its blob files that no entry names removed.
    fn without_unnamed_files(self) -> Result<Self, JournalError> {
        let r = self.env.read_txn()?;
        let mut named = std::collections::HashSet::new();
        for e in self.meta.iter(&r)? {
            if let Some(f) = blob_files::file_of(e?.1) {
                named.insert(f.to_string());
            }
        }
        drop(r);
        self.files.remove_unnamed(&named)?;
        Ok(self)
    }

    /// Taps waiting for the gateway's confirmation.
    pub fn outbox_len(&self) -> Result<u64, JournalError> {
        let r = self.env.read_txn()?;
        Ok(self.outbox.len(&r)?)
    }

    /// Whether the outbox has reached its configured bound.
    pub fn outbox_full(&self) -> Result<bool, JournalError> {
        Ok(self.outbox_len()? >= self.capacity_taps)
    }

    /// The configured bound.
    pub fn capacity_taps(&self) -> u64 {
        self.capacity_taps
    }

    /// The pending change journalled for a card, if any.
    pub fn pending(&self, uid: &[u8; 7]) -> Result<Option<PendingTap>, JournalError> {
        self.card_entry(self.pending, uid, PendingTap::decode)
    }

    /// `uid`'s entry in the per-card table `db`, decoded by `decode`, if any.
    fn card_entry<T>(
        &self,
        db: Database<Bytes, Bytes>,
        uid: &[u8; 7],
        decode: fn(&[u8]) -> Result<T, JournalError>,
    ) -> Result<Option<T>, JournalError> {
        let r = self.env.read_txn()?;
        db.get(&r, uid)?.map(decode).transpose()
    }

    /// Every pending change (reported at start: cards torn before a crash).
    pub fn pendings(&self) -> Result<Vec<PendingTap>, JournalError> {
        self.all_of(self.pending)
    }

    fn all_of(&self, db: Database<Bytes, Bytes>) -> Result<Vec<PendingTap>, JournalError> {
        let r = self.env.read_txn()?;
        let mut v = Vec::new();
        for e in db.iter(&r)? {
            v.push(PendingTap::decode(e?.1)?);
        }
        Ok(v)
    }

    /// Journals what the tap is about to apply, durably, before the card is touched.
    pub fn put_pending(&self, p: &PendingTap) -> Result<(), JournalError> {
        let mut w = self.env.write_txn()?;
        self.pending.put(&mut w, &p.change.uid, &p.encode())?;
        w.commit()?;
        Ok(())
    }

    /// Moves a card's pending change to the unresolved table (the card committed it, but has
    /// transacted elsewhere since, so this validator cannot prove it with the card's MAC).
    pub fn resolve_unprovable(&self, p: &PendingTap) -> Result<(), JournalError> {
        let mut w = self.env.write_txn()?;
        let key = tapgate_lmdb::key::uid_counter(&p.change.uid, p.change.tmc_before);
        self.unresolved.put(&mut w, &key, &p.encode())?;
        self.pending.delete(&mut w, &p.change.uid)?;
        w.commit()?;
        Ok(())
    }

    /// Debits committed by cards that this validator could not prove (for the back office).
    pub fn unresolved(&self) -> Result<Vec<PendingTap>, JournalError> {
        self.all_of(self.unresolved)
    }

    /// Replaces every blob under `prefix` with one blob, in one transaction (a blocklist
    /// snapshot replaces the deltas).
    pub fn replace_blobs(&self, prefix: &str, key: &str, bytes: &[u8]) -> Result<(), JournalError> {
        self.put_blob_retaining(key, bytes, prefix, |_| false)
    }

    /// Stores blob `key` and, in the same transaction, drops every blob under `prefix` that
    /// `keep` does not keep (a blocklist chunk: the chunks of other snapshots; the last chunk:
    /// everything but its snapshot's chunks).
    pub fn put_blob_retaining(
        &self,
        key: &str,
        bytes: &[u8],
        prefix: &str,
        keep: impl Fn(&str) -> bool,
    ) -> Result<(), JournalError> {
        self.put_blob_dropping(key, bytes, Some((prefix, &keep)))
    }

    /// Stores blob `key` (a large one as a file, written before the transaction) and drops
    /// the blobs under the prefix that the filter does not keep; the files of blobs dropped or
    /// replaced are removed once the transaction has committed.
    fn put_blob_dropping(
        &self,
        key: &str,
        bytes: &[u8],
        drop_under: Option<(&str, KeepBlob<'_>)>,
    ) -> Result<(), JournalError> {
        #[cfg(test)]
        self.injected_fault(key)?;
        let value = self.files.store(key, bytes)?;
        let mut gone: Vec<String> = Vec::new();
        let r = (|| {
            let mut w = self.env.write_txn()?;
            if let Some(v) = self.meta.get(&w, key)? {
                gone.extend(blob_files::file_of(v).map(str::to_string));
            }
            let mut drop: Vec<String> = Vec::new();
            if let Some((prefix, keep)) = drop_under {
                for e in self.meta.prefix_iter(&w, prefix)? {
                    let (k, v) = e?;
                    if k != key && !keep(k) {
                        drop.push(k.to_string());
                        gone.extend(blob_files::file_of(v).map(str::to_string));
                    }
                }
            }
            for k in drop {
                self.meta.delete(&mut w, &k)?;
            }
            self.meta.put(&mut w, key, &value)?;
            w.commit()
        })();
        if let Err(e) = r {
            // The new file is named by nothing committed.
            if let Some(f) = blob_files::file_of(&value) {
                self.files.remove(f);
            }
            return Err(e.into());
        }
        // Never the file just named, whatever the old entries named.
        let new = blob_files::file_of(&value);
        for f in gone.iter().filter(|f| Some(f.as_str()) != new) {
            self.files.remove(f);
        }
        Ok(())
    }

    /// Tests only: every blob write from now on first asks `fault` (see [`BlobFault`]).
    #[cfg(test)]
    pub(crate) fn inject_blob_fault(&self, fault: BlobFault) {
        *self.blob_fault.lock().expect("fault lock") = Some(fault);
    }

    /// Tests only: the injected fault's answer for a write of `key`.
    #[cfg(test)]
    fn injected_fault(&self, key: &str) -> Result<(), JournalError> {
        let mut f = self.blob_fault.lock().expect("fault lock");
        match f.as_mut().and_then(|f| f(key)) {
            Some(source) => Err(JournalError::Dir {
                path: format!("(injected fault writing {key})"),
                source,
            }),
            None => Ok(()),
        }
    }

    /// The bytes of a stored value: read from its file when it names one.
    fn blob_bytes<'a>(
        &self,
        key: &str,
        value: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, JournalError> {
        match blob_files::file_of(value) {
            Some(f) => Ok(self.files.read(key, f)?.into()),
            None => Ok(value.into()),
        }
    }

    /// Calls `f` with each blob under `prefix`, in key order, one at a time (a 10,000,000-card
    /// blocklist is 70 MB of chunks: never all copied out at once): its bytes, or the
    /// [`JournalError::BlobFile`] of a blob whose file cannot be read (the caller decides
    /// whether to skip it). Only a storage error stops the walk.
    pub fn for_each_blob(
        &self,
        prefix: &str,
        mut f: impl FnMut(&str, Result<&[u8], JournalError>),
    ) -> Result<(), JournalError> {
        let r = self.env.read_txn()?;
        for e in self.meta.prefix_iter(&r, prefix)? {
            let (k, b) = e?;
            match self.blob_bytes(k, b) {
                Ok(bytes) => f(k, Ok(&bytes)),
                Err(e) => f(k, Err(e)),
            }
        }
        Ok(())
    }

    /// Drops a card's pending change (the card showed it never happened).
    pub fn clear_pending(&self, uid: &[u8; 7]) -> Result<(), JournalError> {
        let mut w = self.env.write_txn()?;
        self.pending.delete(&mut w, uid)?;
        w.commit()?;
        Ok(())
    }

    /// In one transaction: takes the next sequence number, appends the tap `make(seq)` builds
    /// to the outbox, and clears `clear`'s pending change. Refuses when the outbox is full.
    pub fn append_tap(
        &self,
        clear: Option<&[u8; 7]>,
        make: impl FnOnce(u64) -> [u8; TAP_LEN],
    ) -> Result<u64, JournalError> {
        let mut w = self.env.write_txn()?;
        let seq = self.append_in(&mut w, make)?;
        if let Some(uid) = clear {
            self.pending.delete(&mut w, uid)?;
        }
        w.commit()?;
        Ok(seq)
    }

    /// Takes the next sequence number and appends the tap `make(seq)` builds, in `w`.
    fn append_in(
        &self,
        w: &mut heed::RwTxn<'_>,
        make: impl FnOnce(u64) -> [u8; TAP_LEN],
    ) -> Result<u64, JournalError> {
        let n = self.outbox.len(w)?;
        if n >= self.capacity_taps {
            return Err(JournalError::OutboxFull(n));
        }
        let seq = match self.meta.get(w, NEXT_SEQ)? {
            Some(b) if b.len() == 8 => {
                let mut x = [0u8; 8];
                x.copy_from_slice(b);
                u64::from_be_bytes(x)
            }
            Some(_) => return Err(JournalError::Corrupt("next sequence number")),
            None => 1,
        };
        let wire = make(seq);
        self.outbox.put(w, &seq, &wire)?;
        self.meta.put(w, NEXT_SEQ, &(seq + 1).to_be_bytes())?;
        Ok(seq)
    }

    /// The pick-up journalled for a card and not yet settled, if any.
    pub fn pending_pickup(&self, uid: &[u8; 7]) -> Result<Option<PendingPickup>, JournalError> {
        self.card_entry(self.pickups, uid, PendingPickup::decode)
    }

    /// Journals a pick-up about to be applied, durably, before the card is touched — and,
    /// in the same transaction, its amount as spent of the SAM's action ceiling (counted
    /// before the SAM counts it, so a restart never gives back ceiling that was used).
    pub fn put_pending_pickup(&self, p: &PendingPickup) -> Result<(), JournalError> {
        let mut w = self.env.write_txn()?;
        self.pickups.put(&mut w, &p.tap.change.uid, &p.encode())?;
        let spent = self.spent_in(&w)? + i64::from(p.tap.change.amount_minor);
        self.meta.put(&mut w, CEILING_SPENT, &spent.to_be_bytes())?;
        w.commit()?;
        Ok(())
    }

    fn spent_in(&self, t: &heed::RoTxn<'_, WithoutTls>) -> Result<i64, JournalError> {
        match self.meta.get(t, CEILING_SPENT)? {
            None => Ok(0),
            Some(b) => Ok(i64::from_be_bytes(
                b.try_into()
                    .map_err(|_| JournalError::Corrupt("ceiling spent"))?,
            )),
        }
    }

    /// What pick-ups have taken of the SAM's action ceiling, ever (minor units).
    pub fn ceiling_spent(&self) -> Result<i64, JournalError> {
        let r = self.env.read_txn()?;
        self.spent_in(&r)
    }

    /// Drops a card's pending pick-up (the card showed it never happened: the order is not
    /// applied here).
    pub fn clear_pending_pickup(&self, uid: &[u8; 7]) -> Result<(), JournalError> {
        let mut w = self.env.write_txn()?;
        self.pickups.delete(&mut w, uid)?;
        w.commit()?;
        Ok(())
    }

    /// Whether an order was applied (or found on the card) here.
    pub fn order_applied(&self, order_id: u64) -> Result<bool, JournalError> {
        let r = self.env.read_txn()?;
        Ok(self.applied.get(&r, &order_id)?.is_some())
    }

    /// Records an order as applied without a tap of this validator (found on the card, or
    /// committed but no longer provable here), clearing `clear`'s pending pick-up; a pick-up
    /// the card committed but this validator cannot prove is kept with the unresolved debits.
    pub fn mark_applied(
        &self,
        order_id: u64,
        expires_s: u64,
        clear: Option<&PendingPickup>,
    ) -> Result<(), JournalError> {
        let mut w = self.env.write_txn()?;
        self.applied.put(&mut w, &order_id, &expires_s)?;
        if let Some(p) = clear {
            let c = &p.tap.change;
            let key = tapgate_lmdb::key::uid_counter(&c.uid, c.tmc_before);
            self.unresolved.put(&mut w, &key, &p.tap.encode())?;
            self.pickups.delete(&mut w, &c.uid)?;
        }
        w.commit()?;
        Ok(())
    }

    /// In one transaction: the pick-up's credit journalled as a tap (as [`Self::append_tap`]),
    /// the order recorded as applied, and the card's pending pick-up cleared.
    pub fn append_pickup(
        &self,
        uid: &[u8; 7],
        order_id: u64,
        expires_s: u64,
        make: impl FnOnce(u64) -> [u8; TAP_LEN],
    ) -> Result<u64, JournalError> {
        let mut w = self.env.write_txn()?;
        let seq = self.append_in(&mut w, make)?;
        self.applied.put(&mut w, &order_id, &expires_s)?;
        self.pickups.delete(&mut w, uid)?;
        w.commit()?;
        Ok(seq)
    }

    /// Forgets applied orders expired at `now_s` (they are never applied anyway); returns how
    /// many.
    pub fn prune_applied(&self, now_s: u64) -> Result<usize, JournalError> {
        let mut w = self.env.write_txn()?;
        let expired: Vec<u64> = self
            .applied
            .iter(&w)?
            .filter_map(|e| e.ok())
            .filter(|(_, exp)| *exp <= now_s)
            .map(|(id, _)| id)
            .collect();
        for id in &expired {
            self.applied.delete(&mut w, id)?;
        }
        w.commit()?;
        Ok(expired.len())
    }

    /// Up to `max` journalled taps with a sequence number above `after`, in order.
    pub fn outbox_after(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        let r = self.env.read_txn()?;
        let mut v = Vec::new();
        let range = (std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded);
        for e in self.outbox.range(&r, &range)?.take(max) {
            let (k, b) = e?;
            v.push((k, b.to_vec()));
        }
        Ok(v)
    }

    /// Deletes taps the gateway confirmed; returns how many were still here. Only a
    /// confirmation whose MAC verified under this device's key ([`Confirmed`], built by
    /// `purse::confirm::Confirmation::verify`) deletes anything.
    pub fn confirm(&self, confirmed: &Confirmed) -> Result<usize, JournalError> {
        let mut w = self.env.write_txn()?;
        let mut n = 0;
        for s in confirmed.seqs() {
            if self.outbox.delete(&mut w, s)? {
                n += 1;
            }
        }
        w.commit()?;
        Ok(n)
    }

    /// Stores a named blob (signed blocklist messages, fare tables) durably.
    pub fn put_blob(&self, key: &str, bytes: &[u8]) -> Result<(), JournalError> {
        self.put_blob_dropping(key, bytes, None)
    }

    /// Reads a named blob.
    pub fn blob(&self, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let r = self.env.read_txn()?;
        match self.meta.get(&r, key)? {
            Some(v) => Ok(Some(self.blob_bytes(key, v)?.into_owned())),
            None => Ok(None),
        }
    }

    /// Blobs whose key starts with `prefix`, in key order.
    pub fn blobs(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let r = self.env.read_txn()?;
        let mut v = Vec::new();
        for e in self.meta.prefix_iter(&r, prefix)? {
            let (k, b) = e?;
            v.push((k.to_string(), self.blob_bytes(k, b)?.into_owned()));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> PendingTap {
        PendingTap {
            change: PendingChange {
                uid: [4, 1, 2, 3, 4, 5, 6],
                tmc_before: 7,
                balance_before_minor: 1000,
                kind: TxKind::Debit,
                amount_minor: 140,
                key_version: 1,
            },
            time_ms: 1_764_576_000_000,
            stop_code: 0x123456,
            route_code: 0x654321,
            fare_table_version: 3,
            blocklist_version: 9,
            record: [7; 32],
        }
    }

    #[test]
    fn pending_round_trips_and_clears_with_the_tap() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
        let p = pending();
        j.put_pending(&p).unwrap();
        assert_eq!(j.pending(&p.change.uid).unwrap(), Some(p.clone()));
        let seq = j
            .append_tap(Some(&p.change.uid), |s| [s as u8; TAP_LEN])
            .unwrap();
        assert_eq!(seq, 1);
        assert_eq!(j.pending(&p.change.uid).unwrap(), None);
        assert_eq!(j.outbox_len().unwrap(), 1);
    }

    #[test]
    fn outbox_is_bounded_survives_reopen_and_clears_on_confirmation() {
        let d = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(d.path(), 3, 1 << 24).unwrap();
            for _ in 0..3 {
                j.append_tap(None, |s| [s as u8; TAP_LEN]).unwrap();
            }
            assert!(matches!(
                j.append_tap(None, |s| [s as u8; TAP_LEN]),
                Err(JournalError::OutboxFull(3))
            ));
            assert!(j.outbox_full().unwrap());
        }
        let j = Journal::open(d.path(), 3, 1 << 24).unwrap();
        assert_eq!(j.outbox_len().unwrap(), 3);
        let after: Vec<u64> = j
            .outbox_after(1, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(after, [2, 3]);
        let key = purse::crypto::AesKey::from_bytes([7; 16]);
        let c = purse::confirm::encode_with_key("metro", 1001, &[1, 2, 99], &key).unwrap();
        let c = purse::confirm::Confirmation::decode(c.as_bytes())
            .unwrap()
            .verify_with_key("metro", 1001, &key)
            .unwrap();
        assert_eq!(j.confirm(&c).unwrap(), 2);
        // Sequence numbers keep counting after a reopen and confirmations.
        assert_eq!(j.append_tap(None, |s| [s as u8; TAP_LEN]).unwrap(), 4);
    }
    /// Blobs over 64 KiB live as files named from LMDB: read back whole, replaced and dropped
    /// with their files, and a file no entry names is removed at the next open (issue 22).
    #[test]
    fn large_blobs_are_files_that_go_with_their_entries() {
        let d = tempfile::tempdir().unwrap();
        let files = |d: &Path| std::fs::read_dir(d.join("blobs")).unwrap().count();
        let big = |b: u8| vec![b; blob_files::FILE_ABOVE + 1];
        {
            let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
            j.put_blob_retaining("bl/a/1", &big(1), "bl/", |_| true)
                .unwrap();
            j.put_blob_retaining("bl/a/2", &big(2), "bl/", |_| true)
                .unwrap();
            j.put_blob("bl/small", b"tiny").unwrap();
            assert_eq!(files(d.path()), 2);
            assert_eq!(j.blob("bl/a/2").unwrap(), Some(big(2)));
            let mut seen = Vec::new();
            j.for_each_blob("bl/", |k, b| {
                seen.push((k.to_string(), b.unwrap().to_vec()))
            })
            .unwrap();
            assert_eq!(
                seen,
                vec![
                    ("bl/a/1".to_string(), big(1)),
                    ("bl/a/2".to_string(), big(2)),
                    ("bl/small".to_string(), b"tiny".to_vec()),
                ]
            );
            // Replaced under the same key: one file still.
            j.put_blob("bl/a/2", &big(3)).unwrap();
            assert_eq!(
                (files(d.path()), j.blob("bl/a/2").unwrap()),
                (2, Some(big(3)))
            );
            // Everything under a/ but the new one dropped, files with it.
            j.put_blob_retaining("bl/b/1", &big(4), "bl/", |k| k.starts_with("bl/b/"))
                .unwrap();
            assert_eq!(files(d.path()), 1);
            assert_eq!(
                j.blobs("bl/").unwrap(),
                vec![("bl/b/1".to_string(), big(4))]
            );
        }
        // A file left by a crash before its commit: gone at the next open; the others stay.
        std::fs::write(d.path().join("blobs").join("626c2f.7"), b"orphan").unwrap();
        let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
        assert_eq!(files(d.path()), 1);
        assert_eq!(j.blob("bl/b/1").unwrap(), Some(big(4)));
    }

    /// A counter that repeats a name the journal names (the clock stepped back since the
    /// last run) neither overwrites that file nor unlinks the new one (issue 22).
    #[test]
    fn a_repeated_counter_keeps_every_named_file() {
        let d = tempfile::tempdir().unwrap();
        let big = |b: u8| vec![b; blob_files::FILE_ABOVE + 1];
        let at = |n: u64| blob_files::BlobFiles::counting_from(d.path().join("blobs"), n);
        let mut j = Journal::open(d.path(), 10, 1 << 24).unwrap();
        j.files = at(5);
        j.put_blob("k", &big(1)).unwrap();
        j.put_blob("other", &big(2)).unwrap();
        // Restarted with the counter behind: the next names are taken already.
        j.files = at(5);
        j.put_blob("k", &big(3)).unwrap();
        j.put_blob("other", &big(4)).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(d.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // "k" (6b) took 6 (5 is its live file), "other" (6f74686572) 7: one file each.
        assert_eq!(names, ["6b.6", "6f74686572.7"]);
        assert_eq!(j.blob("k").unwrap(), Some(big(3)));
        assert_eq!(j.blob("other").unwrap(), Some(big(4)));
        drop(j);
        let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
        assert_eq!(j.blob("k").unwrap(), Some(big(3)));
        assert_eq!(j.blob("other").unwrap(), Some(big(4)));
    }

    /// A blob whose file is missing is an error naming its key, from `blob` and, blob by blob,
    /// from `for_each_blob`, which still gives the others.
    #[test]
    fn a_missing_blob_file_is_reported_with_its_key() {
        let d = tempfile::tempdir().unwrap();
        let big = vec![1; blob_files::FILE_ABOVE + 1];
        let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
        j.put_blob("bl/1", &big).unwrap();
        j.put_blob("bl/2", b"small").unwrap();
        for e in std::fs::read_dir(d.path().join("blobs")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        assert!(matches!(j.blob("bl/1"), Err(JournalError::BlobFile { key, .. }) if key == "bl/1"));
        let mut seen = Vec::new();
        j.for_each_blob("bl/", |k, b| {
            seen.push((k.to_string(), b.ok().map(<[u8]>::to_vec)))
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                ("bl/1".into(), None),
                ("bl/2".into(), Some(b"small".to_vec()))
            ]
        );
    }
}
