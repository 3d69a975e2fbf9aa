//! Large journal blobs kept as files beside the LMDB environment (issue 22).
//!
//! A blob of more than [`FILE_ABOVE`] bytes (a 458 KB blocklist chunk, a single-message
//! snapshot) is written to `<journal>/blobs/<key as hex>.<n>`, made durable (created new,
//! written, fsynced, the directory fsynced) before the LMDB transaction that names it
//! commits; LMDB holds only [`MARK`] and the file's name. Kept inside LMDB, such a blob was an
//! overflow run that LMDB reads the first page of to free it, which maps the file around that
//! page into the process (the kernel maps a cached run of the file, up to 64 KiB and more, not
//! one page): a new 10,000,000-card snapshot dropping the 153 chunks of the one before made
//! the validator 9 MiB larger at the switch, never given back. A file is unlinked instead,
//! after the commit that drops its name, and read back with `read`, never mapped.
//!
//! A file name is never reused: `n` counts up from the time of opening, and the file is
//! created with `create_new`, a name already on disk taking the next `n` (a clock stepped back
//! since an earlier run, issue 22, cannot make a new blob overwrite a file the journal names).
//! So a blob replaced under the same key keeps its old file until the replacing transaction
//! has committed. Files no committed entry names (a crash between the write and the commit,
//! or between the commit and the unlink) are removed when the journal opens.

use super::JournalError;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Blobs larger than this are kept as files.
pub(super) const FILE_ABOVE: usize = 64 * 1024;
/// What LMDB holds for a blob kept as a file, followed by the file's name. No signed message
/// starts with 0xFF.
pub(super) const MARK: &[u8] = b"\xfftapgate-blob-file:";

/// The journal's blob files.
pub(super) struct BlobFiles {
    dir: PathBuf,
    next: AtomicU64,
}

fn io(path: &Path, source: std::io::Error) -> JournalError {
    JournalError::Dir {
        path: path.display().to_string(),
        source,
    }
}

/// The file a stored value names, if it names one.
pub(super) fn file_of(value: &[u8]) -> Option<&str> {
    value
        .strip_prefix(MARK)
        .and_then(|n| std::str::from_utf8(n).ok())
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'))
}

impl BlobFiles {
    /// The blob files of the journal in `env_dir` (its `blobs` directory, created if need be).
    pub(super) fn open(env_dir: &Path) -> Result<BlobFiles, JournalError> {
        let dir = env_dir.join("blobs");
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(BlobFiles::counting_from(dir, now))
    }

    /// Blob files in `dir` whose next name is numbered `n` (tests force a name already taken).
    pub(super) fn counting_from(dir: PathBuf, n: u64) -> BlobFiles {
        BlobFiles {
            dir,
            next: AtomicU64::new(n),
        }
    }

    /// What to store in LMDB for `bytes` under `key`: `bytes` themselves when small; otherwise
    /// the mark naming a new file that now durably holds them.
    pub(super) fn store<'a>(
        &self,
        key: &str,
        bytes: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, JournalError> {
        if bytes.len() <= FILE_ABOVE {
            return Ok(bytes.into());
        }
        let (name, path, mut f) = self.create_new(key)?;
        let written = std::io::Write::write_all(&mut f, bytes)
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all());
        if let Err(e) = written {
            // Named by nothing: removed now (or at the next open).
            self.remove(&name);
            return Err(io(&path, e));
        }
        let mut value = MARK.to_vec();
        value.extend_from_slice(name.as_bytes());
        Ok(value.into())
    }

    /// A new file for a blob under `key`, under a name no file has: one already on disk (left
    /// by a run whose clock was ahead of this one's) takes the next number.
    fn create_new(&self, key: &str) -> Result<(String, PathBuf, std::fs::File), JournalError> {
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let name = format!("{}.{n}", hex::encode(key.as_bytes()));
            let path = self.dir.join(&name);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path);
            match f {
                Ok(f) => return Ok((name, path, f)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&path, e)),
            }
        }
    }

    /// The bytes of the blob file `name`, stored under `key`.
    pub(super) fn read(&self, key: &str, name: &str) -> Result<Vec<u8>, JournalError> {
        let path = self.dir.join(name);
        std::fs::read(&path).map_err(|source| JournalError::BlobFile {
            key: key.to_string(),
            path: path.display().to_string(),
            source,
        })
    }

    /// Removes the file `name` (one already gone is no error: it is what was wanted).
    pub(super) fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    /// Removes every file not in `named` (left by a crash before or after a commit).
    pub(super) fn remove_unnamed(&self, named: &HashSet<String>) -> Result<(), JournalError> {
        for e in std::fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let e = e.map_err(|e| io(&self.dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !named.contains(&name) {
                self.remove(&name);
            }
        }
        Ok(())
    }
}
