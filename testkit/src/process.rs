//! Child processes a test starts (daemons, brokers) that must not outlive it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Kills (and reaps) the child when dropped, so a failing test leaves no daemon behind.
#[derive(Debug)]
pub struct Kill(pub Child);

impl Kill {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first line `tapgate charging` prints once it listens: this prefix, then its base URL.
pub const CHARGING_LISTENING: &str = "charging listening on ";

/// Spawns `cmd` with its standard output piped, reads its first line, which must be
/// `announce` followed by a value (a daemon's address), and returns the guarded child and
/// that value. Panics, naming the line, if it is anything else.
pub fn spawn_announcing(cmd: &mut Command, announce: &str) -> (Kill, String) {
    let mut child = Kill(
        cmd.stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("reading the first line");
    let value = line
        .trim()
        .strip_prefix(announce)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, value)
}

/// `tapgate charging` as configured in `cmd` (its standard error as the caller set it):
/// the guarded child and its base URL, read from its first line.
pub fn spawn_charging(cmd: &mut Command) -> (Kill, String) {
    spawn_announcing(cmd, CHARGING_LISTENING)
}
