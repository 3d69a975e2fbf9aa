//! The gateway's embedded broker (its ACL front in front of rumqttd) for tests.

use std::collections::HashMap;

/// Starts the embedded broker on a free loopback port with `users` (name → password; a
/// device's operator may follow its password, as in the users file) and returns the port once
/// it accepts connections.
pub fn embedded(users: &[(&str, &str)]) -> u16 {
    let port = crate::net::free_port();
    let users: HashMap<String, String> = users
        .iter()
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect();
    gateway::daemon::start_embedded_broker(
        format!("127.0.0.1:{port}").parse().expect("address"),
        users,
    );
    crate::net::wait_for_port(port, "the embedded broker");
    port
}
