//! Zipped feeds: the fare-relevant files read from a `.zip`, each found at the archive's root or
//! in one folder (as many agencies publish), with a bound on what decompression may produce
//! (a zip bomb is refused with an error, never expanded into memory).

use std::io::Read;
use std::path::Path;

use super::csv::CsvFile;
use super::{load, Feed, GtfsError, Result};

/// The most bytes the files read from one zipped feed may decompress to, all together.
pub const MAX_UNZIPPED_BYTES: u64 = 256 * 1024 * 1024;

/// Reads the fare-relevant files of a zipped GTFS feed, decompressing at most
/// [`MAX_UNZIPPED_BYTES`].
pub fn load_zip(path: &Path) -> Result<Feed> {
    load_zip_bounded(path, MAX_UNZIPPED_BYTES)
}

/// [`load_zip`] with another bound on the decompressed bytes.
pub fn load_zip_bounded(path: &Path, max_unzipped_bytes: u64) -> Result<Feed> {
    let io = |message: String| GtfsError::Io {
        file: "feed zip",
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| io(format!("{}: {e}", path.display())))?;
    load_zip_from(file, &path.display().to_string(), max_unzipped_bytes)
}

/// A zipped feed's bytes (an upload), read as [`load_zip`] reads a file; `label` names it in
/// errors.
pub fn load_zip_bytes(bytes: &[u8], label: &str) -> Result<Feed> {
    load_zip_from(std::io::Cursor::new(bytes), label, MAX_UNZIPPED_BYTES)
}

fn load_zip_from<R: Read + std::io::Seek>(
    reader: R,
    label: &str,
    max_unzipped_bytes: u64,
) -> Result<Feed> {
    let io = |message: String| GtfsError::Io {
        file: "feed zip",
        message,
    };
    let archive = zip::ZipArchive::new(reader).map_err(|e| io(format!("{label}: {e}")))?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let archive = std::cell::RefCell::new(archive);
    let budget = std::cell::Cell::new(max_unzipped_bytes);
    load::load_with(|file| {
        // At the root, or in a single folder.
        let Some(name) = names.iter().find(|n| {
            *n == file
                || n.rsplit_once('/')
                    .is_some_and(|(d, f)| f == file && !d.contains('/'))
        }) else {
            return Ok(None);
        };
        let mut archive = archive.borrow_mut();
        let entry = archive.by_name(name).map_err(|e| GtfsError::Io {
            file,
            message: e.to_string(),
        })?;
        let left = budget.get();
        let mut bytes = Vec::new();
        entry
            .take(left.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| GtfsError::Io {
                file,
                message: e.to_string(),
            })?;
        let used = bytes.len() as u64;
        if used > left {
            return Err(GtfsError::Io {
                file,
                message: format!(
                    "the zipped feed decompresses to more than {max_unzipped_bytes} bytes of fare files; refused (a zip bomb, or a feed too large for a fare table)"
                ),
            });
        }
        budget.set(left - used);
        CsvFile::parse(file, &bytes).map(Some)
    })
}
