//! The one rule by which tapgate reads a secret — a database or MQTT password, an HSM or
//! payment PIN, a key-set passphrase — from a file or an environment variable. A configuration
//! or a command line names only where the secret is, never the secret itself. The rule, for
//! operators, is docs/operations.md, "Secrets":
//!
//! - **A file**: the secret is its first line, without the line end (`\n` or `\r\n`), so
//!   `printf 'pw\n'`, an editor's final newline and a Windows line end all give `pw`; nothing
//!   after the first line is part of it, and nothing else is trimmed (spaces are the secret's).
//!   The file must be its owner's alone: any permission for group or others (more than
//!   `-rw-------`) is refused before anything is read, with the fix (`chmod 600 FILE`). A
//!   missing or unreadable file, an empty first line and (for text secrets) a first line that
//!   is not UTF-8 are refused.
//! - **An environment variable**: the secret is its value, exactly; unset or empty is refused.
//!
//! Every message names the file or the variable, never the secret. What is read comes back in
//! [`Zeroizing`], wiped from memory when dropped.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, Zeroizing};

/// Why a secret could not be read. The messages name the file or variable, never the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be opened or read (missing, no permission, a directory…).
    #[error("the secret file {}: {source}", .path.display())]
    Read {
        /// the file
        path: PathBuf,
        /// what the system said
        source: std::io::Error,
    },
    /// The file grants group or others some access.
    #[error(
        "the secret file {} is open to other users (mode {mode:04o}): make it the owner's alone with `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    OpenToOthers {
        /// the file
        path: PathBuf,
        /// its permission bits
        mode: u32,
    },
    /// The file's first line is empty (an empty file, or one starting with a line break).
    #[error("the secret file {} is empty (its first line holds nothing)", .path.display())]
    EmptyFile {
        /// the file
        path: PathBuf,
    },
    /// The file's first line is not UTF-8 text.
    #[error("the secret file {}: its first line is not UTF-8 text", .path.display())]
    FileNotText {
        /// the file
        path: PathBuf,
    },
    /// The variable is not set.
    #[error("the environment variable ${var} is not set")]
    Unset {
        /// the variable's name
        var: String,
    },
    /// The variable is set to nothing.
    #[error("the environment variable ${var} is empty")]
    EmptyVar {
        /// the variable's name
        var: String,
    },
    /// The variable's value is not UTF-8 text.
    #[error("the environment variable ${var} is not UTF-8 text")]
    VarNotText {
        /// the variable's name
        var: String,
    },
}

/// Where a secret is: a file or an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file holding the secret on its first line.
    File(PathBuf),
    /// An environment variable holding the secret.
    Env(String),
}

/// Both a file and an environment variable were named where at most one may be (the caller
/// says which settings in its own words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BothNamed;

impl Source {
    /// The source a pair of settings names (`password_file` / `password_env`, `--pin-file` /
    /// `--pin-env`): `None` when neither is given, [`BothNamed`] when both are.
    pub fn one_of(file: Option<PathBuf>, env: Option<String>) -> Result<Option<Self>, BothNamed> {
        match (file, env) {
            (Some(_), Some(_)) => Err(BothNamed),
            (Some(f), None) => Ok(Some(Source::File(f))),
            (None, Some(v)) => Ok(Some(Source::Env(v))),
            (None, None) => Ok(None),
        }
    }

    /// Reads the secret, by the rule of the crate documentation.
    pub fn read(&self) -> Result<Zeroizing<String>, SecretError> {
        match self {
            Source::File(path) => read_file(path),
            Source::Env(var) => read_env(var),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(v) => write!(f, "${v}"),
        }
    }
}

/// The secret on the first line of `path`, as text.
pub fn read_file(path: &Path) -> Result<Zeroizing<String>, SecretError> {
    let mut bytes = read_file_bytes(path)?;
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Ok(Zeroizing::new(text)),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(SecretError::FileNotText {
                path: path.to_path_buf(),
            })
        }
    }
}

/// The secret on the first line of `path`, as bytes (a key-set passphrase need not be text).
pub fn read_file_bytes(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let failed = |source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(failed)?;
    let meta = file.metadata().map_err(failed)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretError::OpenToOthers {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    // Room for the whole file up front, so that no reallocation leaves a copy behind.
    let room = usize::try_from(meta.len()).unwrap_or(0).min(1 << 16) + 1;
    let mut bytes = Zeroizing::new(Vec::with_capacity(room));
    file.read_to_end(&mut bytes).map_err(failed)?;
    let end = bytes
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(bytes.len());
    bytes.truncate(end);
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(SecretError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// The secret in the environment variable `var`, exactly as set.
pub fn read_env(var: &str) -> Result<Zeroizing<String>, SecretError> {
    let value = std::env::var_os(var).ok_or_else(|| SecretError::Unset { var: var.into() })?;
    let value = Zeroizing::new(
        value
            .into_string()
            .map_err(|_| SecretError::VarNotText { var: var.into() })?,
    );
    if value.is_empty() {
        return Err(SecretError::EmptyVar { var: var.into() });
    }
    Ok(value)
}

/// Writes `secret` and a newline to `path`, readable and writable by its owner only (mode
/// 0600, also when the file existed with another mode): a secret file this rule accepts.
pub fn write_file(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    let mut file = open.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file_with(bytes: &[u8], mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    fn read(bytes: &[u8]) -> Result<String, SecretError> {
        let (_dir, path) = file_with(bytes, 0o600);
        read_file(&path).map(|s| s.to_string())
    }

    #[test]
    fn a_file_gives_its_first_line_without_the_line_end() {
        for (text, secret) in [
            (&b"pw"[..], "pw"),
            (b"pw\n", "pw"),
            (b"pw\r\n", "pw"),
            (b"pw\r", "pw"),
            (b"pw\n\n", "pw"),
            (b"pw\nsecond line\n", "pw"),
            (b" p w \n", " p w "),
            (b"p\rw\n", "p\rw"),
        ] {
            assert_eq!(read(text).unwrap(), secret, "{text:?}");
        }
        let (_dir, path) = file_with(b"pw\n", 0o400);
        assert_eq!(*read_file(&path).unwrap(), "pw");
        assert_eq!(*Source::File(path).read().unwrap(), "pw");
    }

    #[test]
    fn a_file_open_to_other_users_is_refused_with_the_fix() {
        for mode in [0o644, 0o640, 0o604, 0o620, 0o660, 0o601] {
            let (_dir, path) = file_with(b"pw\n", mode);
            let e = read_file(&path).unwrap_err();
            assert!(matches!(e, SecretError::OpenToOthers { mode: m, .. } if m == mode));
            let e = e.to_string();
            let p = path.display().to_string();
            assert!(e.contains(&format!("chmod 600 {p}")), "{e}");
            assert!(e.contains(&format!("{mode:04o}")), "{e}");
            assert!(!e.contains("pw\n"), "{e}");
            assert!(matches!(
                read_file_bytes(&path),
                Err(SecretError::OpenToOthers { .. })
            ));
        }
    }

    #[test]
    fn an_empty_first_line_is_refused() {
        for text in [&b""[..], b"\n", b"\r\n", b"\nsecret\n"] {
            let e = read(text).unwrap_err();
            assert!(matches!(e, SecretError::EmptyFile { .. }), "{text:?}: {e}");
            assert!(e.to_string().contains("is empty"), "{e}");
        }
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-file");
        let e = read_file(&path).unwrap_err();
        assert!(matches!(e, SecretError::Read { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn text_must_be_utf8_but_bytes_need_not() {
        let (_dir, path) = file_with(b"\xffpw\n", 0o600);
        let e = read_file(&path).unwrap_err();
        assert!(matches!(e, SecretError::FileNotText { .. }), "{e}");
        assert_eq!(&*read_file_bytes(&path).unwrap(), b"\xffpw");
    }

    #[test]
    fn a_variable_gives_its_value_exactly() {
        std::env::set_var("TAPGATE_SECRETS_TEST_SET", " pw\n");
        assert_eq!(*read_env("TAPGATE_SECRETS_TEST_SET").unwrap(), " pw\n");
        let source = Source::Env("TAPGATE_SECRETS_TEST_SET".into());
        assert_eq!(*source.read().unwrap(), " pw\n");
        assert_eq!(source.to_string(), "$TAPGATE_SECRETS_TEST_SET");
    }

    #[test]
    fn an_unset_or_empty_variable_is_refused_by_name() {
        std::env::remove_var("TAPGATE_SECRETS_TEST_UNSET");
        let e = read_env("TAPGATE_SECRETS_TEST_UNSET").unwrap_err();
        assert!(matches!(e, SecretError::Unset { .. }));
        assert_eq!(
            e.to_string(),
            "the environment variable $TAPGATE_SECRETS_TEST_UNSET is not set"
        );
        std::env::set_var("TAPGATE_SECRETS_TEST_EMPTY", "");
        let e = read_env("TAPGATE_SECRETS_TEST_EMPTY").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the environment variable $TAPGATE_SECRETS_TEST_EMPTY is empty"
        );
    }

    #[test]
    fn one_of_takes_at_most_one_source() {
        let f = || Some(PathBuf::from("/f"));
        let v = || Some("V".to_string());
        assert_eq!(Source::one_of(None, None), Ok(None));
        assert_eq!(
            Source::one_of(f(), None),
            Ok(Some(Source::File("/f".into())))
        );
        assert_eq!(Source::one_of(None, v()), Ok(Some(Source::Env("V".into()))));
        assert_eq!(Source::one_of(f(), v()), Err(BothNamed));
        assert_eq!(Source::File("/f".into()).to_string(), "file /f");
    }

    #[test]
    fn write_file_makes_a_file_the_rule_accepts() {
        let (_dir, path) = file_with(b"old\n", 0o644);
        write_file(&path, "new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(*read_file(&path).unwrap(), "new");
        let fresh = path.with_file_name("fresh");
        write_file(&fresh, "pw").unwrap();
        assert_eq!(*read_file(&fresh).unwrap(), "pw");
    }
}
