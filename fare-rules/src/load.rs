//! Rules from a path, whatever its kind: a GTFS feed (directory or zip), a signed table
//! (`.tgft`, read without checking its signature) or the planners' TOML source.

use crate::check::Authored;
use crate::gtfs::{self, GtfsError};
use crate::signed::{self, SignedError};
use crate::source::{self, SourceError};
use crate::table::Table;
use std::path::{Path, PathBuf};

/// Why rules could not be loaded from a path.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The GTFS feed did not load or compile.
    #[error("GTFS feed {}: {err}", path.display())]
    Gtfs { path: PathBuf, err: Box<GtfsError> },
    /// The file could not be read.
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// The file starts like a signed table but does not decode as one.
    #[error("fare table {}", path.display())]
    Table {
        path: PathBuf,
        #[source]
        err: SignedError,
    },
    /// A signed table where rules were wanted (an upload to sign and publish).
    #[error("{}: a signed table; give its rules (TOML source or a GTFS feed) to publish", path.display())]
    Signed { path: PathBuf },
    /// Neither a feed nor a table, and not text either.
    #[error("{}: not UTF-8 text", path.display())]
    NotText {
        path: PathBuf,
        #[source]
        err: std::string::FromUtf8Error,
    },
    /// The TOML source did not compile.
    #[error("{0}")]
    Source(Box<SourceError>),
}

/// Whether `bytes` are a zip archive (a zipped GTFS feed).
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// Rules uploaded as bytes named `name` (the file's name, for errors): a zipped GTFS feed
/// (by its magic), else TOML source, compiled as [`load_any`] compiles a file; with what
/// `fare check` holds them to. A signed table is not an upload: publishing signs the rules.
pub fn load_bytes(name: &str, bytes: &[u8]) -> Result<(Table, Authored), LoadError> {
    let path = PathBuf::from(name);
    if is_zip(bytes) {
        let table = gtfs::load_zip_bytes(bytes, name)
            .and_then(|feed| gtfs::compile(&feed))
            .map_err(|err| LoadError::Gtfs {
                path,
                err: Box::new(err),
            })?;
        return Ok((table, Authored::Gtfs));
    }
    if bytes.starts_with(signed::MAGIC) {
        return Err(LoadError::Signed { path });
    }
    let text = String::from_utf8(bytes.to_vec()).map_err(|err| LoadError::NotText { path, err })?;
    let table = source::compile(name, &text).map_err(|e| LoadError::Source(Box::new(e)))?;
    Ok((table, Authored::Source))
}

/// Compiles or loads rules from `path`, by kind: a GTFS feed ([`gtfs::is_feed`]), a signed
/// table (starts with [`signed::MAGIC`]; its signature is not checked here), else TOML source.
pub fn load_any(path: &Path) -> Result<Table, LoadError> {
    if gtfs::is_feed(path) {
        return gtfs::load_path(path).map_err(|err| LoadError::Gtfs {
            path: path.to_path_buf(),
            err: Box::new(err),
        });
    }
    let bytes = std::fs::read(path).map_err(|err| LoadError::Read {
        path: path.to_path_buf(),
        err,
    })?;
    if bytes.starts_with(signed::MAGIC) {
        let e = signed::decode_unverified(&bytes).map_err(|err| LoadError::Table {
            path: path.to_path_buf(),
            err,
        })?;
        return Ok(e.table().clone());
    }
    let text = String::from_utf8(bytes).map_err(|err| LoadError::NotText {
        path: path.to_path_buf(),
        err,
    })?;
    source::compile(&path.display().to_string(), &text).map_err(|e| LoadError::Source(Box::new(e)))
}
