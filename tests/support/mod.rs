//! What the end-to-end tests share: loopback ports no other test of the binary gets, a guard
//! that kills a child process, and waiting for a listener.

#![allow(dead_code)] // each test binary uses its own part

use std::net::TcpListener;
use std::process::Child;
use std::time::{Duration, Instant};

/// A port no other test of this binary got (tests run in parallel: a port just released can be
/// handed out again, and a validator would then find another test's broker).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let p = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&p) {
            given.push(p);
            return p;
        }
    }
}

/// Kills (and reaps) the child when dropped.
pub struct Kill(pub Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts connections on `port` (20 s at most).
pub fn wait_for_port(port: u16, what: &str) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tapgate keys init --out keys`, then `tapgate fare compile` of the sample `sample` (a path
/// under fare-rules/samples) signed with those keys into `out`, in `dir`.
pub fn keys_and_fare_table(dir: &std::path::Path, passphrase: &str, sample: &str, out: &str) {
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .current_dir(dir)
            .args(args)
            .env("TAPGATE_KEY_PASSPHRASE", passphrase)
            .output()
            .expect("run tapgate");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["keys", "init", "--out", "keys"]);
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fare-rules/samples")
        .join(sample);
    run(&[
        "fare",
        "compile",
        rules.to_str().unwrap(),
        "--keys",
        "keys",
        "--out",
        out,
    ]);
}
