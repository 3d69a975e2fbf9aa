//! Loopback ports and listeners.

use std::net::TcpListener;
use std::time::Duration;

/// How long a daemon, broker or server may take to start listening.
pub const START_LIMIT: Duration = Duration::from_secs(20);

/// A loopback port nothing listens on now and no other caller in this process got.
///
/// Tests run in parallel: a port just released by one `bind(…:0)` can be handed out again to
/// the next, and a validator would then find another test's broker. Every port given is
/// remembered for the life of the process and never given twice.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let p = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("binding a loopback port")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&p) {
            given.push(p);
            return p;
        }
    }
}

fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Waits until something accepts connections on loopback `port` ([`START_LIMIT`] at most;
/// then panics naming `what`).
pub fn wait_for_port(port: u16, what: &str) {
    crate::wait::wait_until(&format!("{what} listening on {port}"), START_LIMIT, || {
        accepts(port)
    });
}

/// [`wait_for_port`] for async tests (the runtime's workers stay free).
pub async fn wait_for_port_async(port: u16, what: &str) {
    crate::wait::wait_until_async(&format!("{what} listening on {port}"), START_LIMIT, || {
        accepts(port)
    })
    .await;
}
