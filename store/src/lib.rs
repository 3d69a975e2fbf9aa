//! # tapgate-lmdb — the one place tapgate opens LMDB
//!
//! Every store of the system (the validator's journal, the gateway's store, the charging
//! server's ledger and its sandbox processor) opens its environment here: [`open`] takes the
//! directory, the names of the databases ([`Databases`]: their count is the environment's
//! `max_dbs`, nobody counts them by hand) and an [`EnvConfig`] (the configured map size, whether
//! commits are fsynced), creates what is missing in one write transaction, and hands back the
//! environment and one handle per name, in the order given, for the caller to type with
//! [`heed::Database::remap_types`].
//!
//! The one `unsafe` of the storage layer is here, with its safety argument ([`open`]). The
//! [`key`] module holds the big-endian key codecs the stores share: big-endian so that LMDB's
//! byte order is numeric order and keys that only grow append at the end of the B-tree.
//!
//! This crate knows nothing of cards, taps or money.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod key;

use heed::types::Bytes;
use heed::{Database, Env, EnvOpenOptions, WithoutTls};
use std::path::Path;

pub use heed;

/// An environment as every tapgate store holds it: read transactions are not tied to a thread
/// (the group committer and tokio's blocking pool move them).
pub type LmdbEnv = Env<WithoutTls>;

/// An untyped database handle; type it with [`heed::Database::remap_types`].
pub type RawDatabase = Database<Bytes, Bytes>;

/// Whether a commit waits for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is fsynced: a committed transaction survives a power cut. Every store that
    /// holds money, taps or their proofs uses this.
    Fsync,
    /// Committed pages reach the file (they survive the process being killed) but are not
    /// fsynced. Only for a store that stands in for another machine's (the sandbox card
    /// processor), whose durability is not ours.
    NoSync,
}

/// How an environment is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvConfig {
    /// The map size: the most the environment may ever hold, bytes (address space, not disk:
    /// the file grows as pages are written). A commit beyond it fails with `MDB_MAP_FULL`.
    pub map_size_bytes: usize,
    /// Whether commits are fsynced.
    pub durability: Durability,
}

impl EnvConfig {
    /// A durable environment (every commit fsynced) of `map_size_bytes`.
    pub fn durable(map_size_bytes: usize) -> Self {
        Self {
            map_size_bytes,
            durability: Durability::Fsync,
        }
    }
}

/// The names of an environment's databases, in the order their handles are returned.
pub type Databases<const N: usize> = [&'static str; N];

/// Why an environment could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory could not be created.
    #[error("creating {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The map size is not a positive multiple of the OS page size LMDB can use.
    #[error("map size {0} bytes: it must be at least 1 MiB")]
    MapSize(usize),
    /// LMDB refused to open the environment or create a database.
    #[error(transparent)]
    Lmdb(#[from] heed::Error),
}

/// The smallest map size [`open`] accepts (a smaller one is a configuration mistake).
pub const MIN_MAP_SIZE_BYTES: usize = 1 << 20;

/// Opens (or creates) the environment in `dir` with exactly the databases `names` (created
/// when missing, in one write transaction) and returns it with one handle per name, in order.
///
/// Destructure the handles with a pattern of the same length, so the count is checked by the
/// compiler: `let (env, [taps, meta]) = open(dir, ["taps", "meta"], &cfg)?;`.
pub fn open<const N: usize>(
    dir: &Path,
    names: Databases<N>,
    cfg: &EnvConfig,
) -> Result<(LmdbEnv, [RawDatabase; N]), OpenError> {
    if cfg.map_size_bytes < MIN_MAP_SIZE_BYTES {
        return Err(OpenError::MapSize(cfg.map_size_bytes));
    }
    std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.map_size(cfg.map_size_bytes).max_dbs(N as u32);
    // SAFETY: LMDB requires that an environment is opened at most once per process and that
    // its files are modified by LMDB only. Every tapgate store owns its directory exclusively
    // (the journal, the gateway's data directory, the ledger, the sandbox processor each have
    // their own, given by their config), and each daemon opens each of its stores once, at
    // start-up, and shares the handle (`Env` is a cheap clone of one opened environment); heed
    // itself refuses a second open of the same path in one process. heed also marks `flags`
    // unsafe (some flags break LMDB's guarantees): the only one set here, NO_SYNC, drops the
    // fsync after a commit and nothing else — the file stays consistent, a power cut may lose
    // the last commits, which is what `Durability::NoSync` asks for.
    #[allow(unsafe_code)]
    let env = unsafe {
        if cfg.durability == Durability::NoSync {
            options.flags(heed::EnvFlags::NO_SYNC);
        }
        options.open(dir)?
    };
    let mut t = env.write_txn()?;
    let mut handles = Vec::with_capacity(N);
    for name in names {
        handles.push(env.create_database::<Bytes, Bytes>(&mut t, Some(name))?);
    }
    t.commit()?;
    let handles: [RawDatabase; N] = match handles.try_into() {
        Ok(h) => h,
        Err(_) => unreachable!("one handle per name"),
    };
    Ok((env, handles))
}

#[cfg(test)]
mod tests {
    use super::*;
    use heed::byteorder::BE;
    use heed::types::{Str, U64};

    #[test]
    fn opens_the_named_databases_and_reopens_them_with_their_contents() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EnvConfig::durable(MIN_MAP_SIZE_BYTES);
        {
            let (env, [a, b]) = open(dir.path(), ["a", "b"], &cfg).unwrap();
            let a: Database<Str, U64<BE>> = a.remap_types();
            let mut t = env.write_txn().unwrap();
            a.put(&mut t, "x", &7).unwrap();
            b.put(&mut t, b"k", b"v").unwrap();
            t.commit().unwrap();
            env.prepare_for_closing().wait();
        }
        let (env, [a, b]) = open(dir.path(), ["a", "b"], &cfg).unwrap();
        let a: Database<Str, U64<BE>> = a.remap_types();
        let r = env.read_txn().unwrap();
        assert_eq!(a.get(&r, "x").unwrap(), Some(7));
        assert_eq!(b.get(&r, b"k").unwrap(), Some(&b"v"[..]));
    }

    #[test]
    fn a_map_size_below_one_mebibyte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            open(dir.path(), ["a"], &EnvConfig::durable(4096)),
            Err(OpenError::MapSize(4096))
        ));
    }

    #[test]
    fn a_database_beyond_the_names_cannot_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let (env, _) = open(dir.path(), ["a"], &EnvConfig::durable(MIN_MAP_SIZE_BYTES)).unwrap();
        let mut t = env.write_txn().unwrap();
        assert!(env
            .create_database::<Bytes, Bytes>(&mut t, Some("unlisted"))
            .is_err());
    }
}
