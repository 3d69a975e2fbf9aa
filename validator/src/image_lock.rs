//! One card image, one holder at a time. An emulated card's image file stands for the chip: a
//! real card cannot be in a validator's field and on a PC's reader at once, so every process that
//! opens an image (the validator's crowd, `tapgate charge --card`, `tapgate card load|debit|serve`)
//! takes this lock for the whole transaction and reads the image again under it. Without it, a
//! validator that kept the card in memory rewrote a load away and reused its counter (a clone in
//! clearing).
//!
//! The lock is an advisory `flock` on a sidecar file `<image>.lock` (the image itself is replaced
//! by a rename on every write, so a lock on it would be on the old file).

use fs4::FileExt;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a card image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum ImageLockError {
    #[error("card image {}: cannot open its lock file {}: {source}", image.display(), lock.display())]
    Io {
        image: PathBuf,
        lock: PathBuf,
        source: std::io::Error,
    },
    #[error("card image {} is in use by another process (a validator's crowd, `tapgate card serve` or `tapgate charge`) and was not released within {} s", image.display(), waited.as_secs())]
    Busy { image: PathBuf, waited: Duration },
}

/// An exclusive lock on one card image, released when dropped.
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

/// The sidecar lock file of an image: `<image>.lock`.
pub fn lock_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

impl ImageLock {
    /// Takes the lock on `image`, waiting up to `wait` for another holder to let go.
    pub fn acquire(image: &Path, wait: Duration) -> Result<Self, ImageLockError> {
        let lock = lock_path(image);
        let io = |source| ImageLockError::Io {
            image: image.to_path_buf(),
            lock: lock.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(io)?;
        let start = Instant::now();
        loop {
            match FileExt::try_lock(&file) {
                Ok(()) => return Ok(Self { _file: file }),
                Err(fs4::TryLockError::WouldBlock) => {}
                Err(fs4::TryLockError::Error(e)) => return Err(io(e)),
            }
            if start.elapsed() >= wait {
                return Err(ImageLockError::Busy {
                    image: image.to_path_buf(),
                    waited: wait,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_image_is_busy_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("04c00d00000001.json");
        let held = ImageLock::acquire(&image, Duration::ZERO).unwrap();
        let err = ImageLock::acquire(&image, Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, ImageLockError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("in use by another process"));
        drop(held);
        ImageLock::acquire(&image, Duration::ZERO).unwrap();
        assert!(lock_path(&image).ends_with("04c00d00000001.json.lock"));
    }
}
