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

/// The fields of a Linux `/proc/<pid>/stat` (or `/proc/self/stat`, `/proc/thread-self/stat`)
/// line a CPU count needs, in clock ticks (CLK_TCK is 100 on Linux): the tests' PostgreSQL
/// cluster and the benches read processes' CPU through it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcStat {
    /// The parent's process id.
    pub ppid: u32,
    /// User time, ticks.
    pub utime: f64,
    /// System time, ticks.
    pub stime: f64,
    /// Waited-for children's user time, ticks.
    pub cutime: f64,
    /// Waited-for children's system time, ticks.
    pub cstime: f64,
}

impl ProcStat {
    /// The stat file at `path`; `None` when it cannot be read or parsed (not Linux, gone).
    pub fn read(path: &str) -> Option<ProcStat> {
        Self::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// One stat line. After the command (which may hold spaces and parentheses, hence the
    /// last `)`), counting from 0: state is field 0, ppid 1, utime 11, stime 12, cutime 13,
    /// cstime 14.
    pub fn parse(text: &str) -> Option<ProcStat> {
        let f: Vec<&str> = text.rsplit(')').next()?.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        Some(ProcStat {
            ppid: f.get(1)?.parse().ok()?,
            utime: n(11)?,
            stime: n(12)?,
            cutime: n(13)?,
            cstime: n(14)?,
        })
    }

    /// User and system CPU time, seconds.
    pub fn user_sys_s(&self) -> (f64, f64) {
        (self.utime / 100.0, self.stime / 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::ProcStat;

    #[test]
    fn a_stat_line_with_a_command_holding_spaces_and_parentheses_parses() {
        let line = "4242 (post gres) (x)) S 17 4242 4242 0 -1 4194560 1 0 0 0 250 30 7 3 20 0 1 0";
        let s = ProcStat::parse(line).unwrap();
        assert_eq!(
            (s.ppid, s.utime, s.stime, s.cutime, s.cstime),
            (17, 250.0, 30.0, 7.0, 3.0)
        );
        assert_eq!(s.user_sys_s(), (2.5, 0.3));
        assert_eq!(ProcStat::parse("4242 (short) S 17"), None);
    }

    #[test]
    fn this_process_has_a_stat_file() {
        assert!(ProcStat::read("/proc/self/stat").is_some());
    }
}
