//! The gateway's embedded broker (its ACL front in front of rumqttd) and the gateway daemon
//! itself, for tests.

use gateway::daemon::{GatewayConfig, GatewayStats};
use gateway::store::Store;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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

/// The gateway daemon (`gateway::daemon::run`) with `cfg`, `store` and its role's `keys` on
/// the current runtime until the test ends: its statistics, at once.
pub fn spawn_gateway(
    cfg: GatewayConfig,
    store: &Store,
    keys: &purse::keys::KeySet,
) -> Arc<GatewayStats> {
    let stats = Arc::new(GatewayStats::default());
    tokio::spawn(gateway::daemon::run(
        cfg,
        store.clone(),
        keys.clone(),
        stats.clone(),
        std::future::pending(),
    ));
    stats
}

/// [`spawn_gateway`], returned once it has subscribed to the taps (10 s at most).
pub async fn subscribed_gateway(
    cfg: GatewayConfig,
    store: &Store,
    keys: &purse::keys::KeySet,
) -> Arc<GatewayStats> {
    let stats = spawn_gateway(cfg, store, keys);
    crate::wait::wait_until_async(
        "the gateway's subscription",
        Duration::from_secs(10),
        || stats.subscribed.load(Ordering::Acquire),
    )
    .await;
    stats
}

/// `metro`'s tap of `device` with sequence number `seq` as it arrives at the gateway: on the
/// device's tap topic, signed with its key from `keys` ([`crate::fixtures::signed_tap`]).
pub fn tap_message(keys: &purse::keys::KeySet, device: u32, seq: u64) -> gateway::store::Message {
    gateway::store::Message {
        topic: format!("tapgate/v1/metro/taps/{device}"),
        payload: crate::fixtures::signed_tap(keys, "metro", device, seq),
    }
}
