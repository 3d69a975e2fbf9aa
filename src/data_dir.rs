//! Start-up checks of the directories a daemon writes to: a directory that cannot be created is
//! named by the setting that chose it and the user the daemon runs as, with the OS error once.

use crate::cli_util::input_err;
use anyhow::Result;
use std::path::Path;

/// Creates `dir` (and its parents) if needed; `setting` names where it was chosen (e.g.
/// `data_dir in charging.toml / --data`).
pub fn ensure_dir(dir: &Path, setting: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        input_err(format!(
            "{setting}: cannot create the directory {} as user {}: {e}",
            dir.display(),
            user()
        ))
    })
}

/// The user this process runs as: `$USER`, else `$LOGNAME`, else the numeric uid.
fn user() -> String {
    use std::os::unix::fs::MetadataExt;
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            // /proc/self belongs to the process's user.
            std::fs::metadata("/proc/self")
                .ok()
                .map(|m| format!("uid {}", m.uid()))
        })
        .unwrap_or_else(|| "(unknown)".into())
}
