//! SoftHSM2 tokens for tests and benchmarks, each in a temporary directory: the system token
//! directory is never touched (`SOFTHSM2_CONF` points at a `softhsm2.conf` whose
//! `directories.tokendir` is inside the temporary directory).
//!
//! These are real SoftHSM2 tokens driven over PKCS#11, not mocks. When SoftHSM2 is missing,
//! [`module_path`] fails with a message that says how to install it (`./test.sh` does).

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use tapgate_pkcs11::{context, PinSource, Pkcs11Config, DEFAULT_PREFIX};

/// Environment variable naming the PKCS#11 module to test with (default: SoftHSM2's).
pub const MODULE_ENV: &str = "TAPGATE_PKCS11_MODULE";

const CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
];

/// The SoftHSM2 module: `$TAPGATE_PKCS11_MODULE`, else the usual install locations.
pub fn module_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(MODULE_ENV) {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok(p);
        }
        return Err(format!(
            "${MODULE_ENV} names {}, which does not exist",
            p.display()
        ));
    }
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            format!(
                "SoftHSM2 is not installed: no libsofthsm2.so in {} — run ./test.sh (it installs \
                 softhsm2 with apt-get), or `apt-get install softhsm2`, or set ${MODULE_ENV}",
                CANDIDATES.join(", ")
            )
        })
}

/// A SoftHSM2 configuration and token directory in a temporary directory.
#[derive(Debug)]
pub struct SoftHsmDir {
    dir: tempfile::TempDir,
}

impl SoftHsmDir {
    /// Creates `softhsm2.conf` and `tokens/` in a new temporary directory.
    pub fn new() -> std::io::Result<SoftHsmDir> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("tokens"))?;
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                dir.path().join("tokens").display()
            ),
        )?;
        Ok(SoftHsmDir { dir })
    }

    /// The `softhsm2.conf` to put in `SOFTHSM2_CONF`.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Initialises a token with `softhsm2-util --init-token --free` (for a process that runs
    /// later with `SOFTHSM2_CONF` = [`Self::conf`]).
    pub fn init_token_with_util(&self, label: &str, so_pin: &str, pin: &str) -> Result<(), String> {
        let out = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", self.conf())
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                so_pin,
                "--pin",
                pin,
            ])
            .output()
            .map_err(|e| {
                format!(
                    "running softhsm2-util: {e} (SoftHSM2 is not installed? ./test.sh installs it)"
                )
            })?;
        if !out.status.success() {
            return Err(format!(
                "softhsm2-util --init-token: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }
}

/// The process's SoftHSM2 directory. SoftHSM2 reads `SOFTHSM2_CONF` once, at the first
/// `C_Initialize` of the process, so every in-process token lives in this one directory.
fn process_dir() -> &'static SoftHsmDir {
    static DIR: OnceLock<SoftHsmDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = SoftHsmDir::new().expect("creating a temporary SoftHSM2 directory");
        // SoftHSM2 has no other way to be pointed at a configuration than this variable, read
        // at C_Initialize. Set once, before this process loads the module; Rust's own
        // environment accesses are serialised by std, and only test and bench processes call
        // this (a daemon is configured by its operator's environment, never here).
        std::env::set_var("SOFTHSM2_CONF", d.conf());
        d
    })
}

/// A fresh token in this process's temporary SoftHSM2 directory, its user PIN in a file.
#[derive(Debug)]
pub struct TestToken {
    /// The configuration that opens it (PIN from a file).
    pub config: Pkcs11Config,
    /// The SO PIN.
    pub so_pin: String,
    /// The user PIN.
    pub pin: String,
    _pin_dir: tempfile::TempDir,
}

/// Creates a new token labelled `<hint>-<n>` with `C_InitToken` in this process.
pub fn new_token(hint: &str) -> Result<TestToken, String> {
    static N: AtomicU32 = AtomicU32::new(0);
    // One token at a time: two threads must not both take the one free slot.
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = CREATING.lock().unwrap_or_else(|p| p.into_inner());
    let module = module_path()?;
    process_dir();
    let ctx = context(&module).map_err(|e| e.to_string())?;
    let label: String = format!("{hint}-{}", N.fetch_add(1, Ordering::Relaxed))
        .chars()
        .take(32)
        .collect();
    let so_pin = "so-pin-1234".to_string();
    let pin = "user-pin-5678".to_string();
    let slots = ctx.get_all_slots().map_err(|e| e.to_string())?;
    let free = slots
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| !i.token_initialized())
                .unwrap_or(false)
        })
        .ok_or("SoftHSM2 offers no free slot")?;
    ctx.init_token(free, &AuthPin::from(so_pin.as_str()), &label)
        .map_err(|e| format!("C_InitToken: {e}"))?;
    {
        let s = ctx.open_rw_session(free).map_err(|e| e.to_string())?;
        s.login(UserType::So, Some(&AuthPin::from(so_pin.as_str())))
            .map_err(|e| format!("SO login: {e}"))?;
        s.init_pin(&AuthPin::from(pin.as_str()))
            .map_err(|e| format!("C_InitPIN: {e}"))?;
        s.logout().map_err(|e| e.to_string())?;
    }
    let pin_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pin_file = pin_dir.path().join("pin");
    tapgate_secrets::write_file(&pin_file, &pin).map_err(|e| e.to_string())?;
    Ok(TestToken {
        config: Pkcs11Config {
            module,
            token_label: Some(label),
            slot: None,
            pin: PinSource::File(pin_file),
            prefix: DEFAULT_PREFIX.into(),
        },
        so_pin,
        pin,
        _pin_dir: pin_dir,
    })
}

/// A new token holding the HSM role's keys of `keys`, and the HSM opened on it.
pub fn hsm_for(
    keys: &purse::keys::KeySet,
) -> Result<(TestToken, tapgate_pkcs11::Pkcs11Hsm), String> {
    let t = new_token("tapgate-test")?;
    {
        let ts = tapgate_pkcs11::TokenSession::open(&t.config).map_err(|e| e.to_string())?;
        tapgate_pkcs11::import::import_keyset(&ts, keys, &t.config.prefix, false)
            .map_err(|e| e.to_string())?;
    }
    let hsm = tapgate_pkcs11::Pkcs11Hsm::open(&t.config).map_err(|e| e.to_string())?;
    Ok((t, hsm))
}
