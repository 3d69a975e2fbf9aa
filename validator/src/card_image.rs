//! Card image files and the one way they (and the CLI's other output files) are written:
//! [`write_atomic`] — a temporary file in the same directory, flushed to the disk, renamed over
//! the old file, and the directory flushed too, so a crash or a full disk leaves either the old
//! file or the new one, and a write that did not reach the disk is an error, never silence.
//! An emulated card's image stands for its chip: a write that failed and went unnoticed would let
//! the card use a counter value again (a clone in clearing). Whoever writes an image holds its
//! [`crate::image_lock::ImageLock`].

use std::io::Write;
use std::path::{Path, PathBuf};

/// A file that could not be written (the old file, if any, is unchanged).
#[derive(Debug, thiserror::Error)]
#[error("{step} {}: {io}", path.display())]
pub struct WriteError {
    /// What failed: "writing", "syncing", "renaming into", "syncing the directory of".
    pub step: &'static str,
    /// The file the step was on.
    pub path: PathBuf,
    /// The operating system's error. Part of the message (not a `source`), so it is printed once.
    pub io: std::io::Error,
}

/// Writes `bytes` to `path` atomically and durably: write `.<name>.tmp` beside it, fsync it,
/// rename it over `path`, fsync the directory. On an error the temporary file is removed and
/// `path` is as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tapgate")
    ));
    let fail = |step, path: &Path| {
        let path = path.to_path_buf();
        move |io| WriteError { step, path, io }
    };
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            Ok(f)
        })
        .map_err(fail("writing", &tmp))
        .and_then(|f| f.sync_all().map_err(fail("syncing", &tmp)))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(fail("renaming into", path)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir).map_err(fail("syncing the directory of", path))
}

/// Flushes a directory's entries (the rename) to the disk.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Directories cannot be opened as files here; the rename is as durable as the platform makes it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("card.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["card.json"]);
    }

    /// A write that cannot be made is an error naming the file; the old file is unchanged.
    #[test]
    fn a_failed_write_is_an_error_and_the_old_file_stays() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("card.json");
        write_atomic(&p, b"old").unwrap();
        // The temporary file's place is taken by a directory: the write fails (even as root).
        std::fs::create_dir(d.path().join(".card.json.tmp")).unwrap();
        let e = write_atomic(&p, b"new").unwrap_err();
        assert_eq!(e.step, "writing");
        assert!(e.to_string().contains(".card.json.tmp"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");

        let gone = d.path().join("no-such-dir").join("card.json");
        let e = write_atomic(&gone, b"new").unwrap_err();
        assert!(e.to_string().starts_with("writing "), "{e}");
        assert!(!gone.exists());
    }
}
