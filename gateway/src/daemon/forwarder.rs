//! The forwarder: the outbox to clearing over HTTP, with backoff; batch ids are idempotent
//! (`forward_once`), so a lost answer resends the same batch. Each batch clearing took trims the
//! forwarded taps whose retention ended; every [`TRIM_INTERVAL`] the forwarder trims them too,
//! so that a gateway with no new taps (or clearing unreachable) still lets them go. A gateway
//! with no charging server configured forwards nothing but still keeps its store every
//! [`TRIM_INTERVAL`] (`Store::trim_expired`: the aggregates' deltas folded, the card-days
//! past their retention trimmed).

use super::{GatewayConfig, GatewayStats};
use crate::forward::forward_once_with_rings;
use crate::store::Store;
use purse::keys::KeySet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Time between two trims of expired forwarded taps when no batch trimmed them.
const TRIM_INTERVAL: Duration = Duration::from_secs(60);

/// Starts the forwarder (with no charging server configured, only the store's housekeeping).
pub(super) fn spawn(
    cfg: GatewayConfig,
    store: Store,
    keys: KeySet,
    stats: Arc<GatewayStats>,
) -> JoinHandle<()> {
    spawn_trimming_every(cfg, store, keys, stats, TRIM_INTERVAL)
}

/// [`spawn`], trimming every `interval` when no batch trimmed (tests use a short one).
fn spawn_trimming_every(
    cfg: GatewayConfig,
    store: Store,
    keys: KeySet,
    stats: Arc<GatewayStats>,
    interval: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some((base, token)) = cfg.charging.clone() else {
            return housekeeping(&store, interval).await;
        };
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        let mut backoff_ms = 50u64;
        let mut last_trim = Instant::now();
        loop {
            if last_trim.elapsed() >= interval {
                last_trim = Instant::now();
                trim_expired(&store).await;
            }
            let (s, k, c, st) = (store.clone(), keys.clone(), cfg.clone(), stats.clone());
            let sink = clearing_sink(agent.clone(), base.clone(), token.clone());
            // Counted on the blocking thread, as soon as the batch is done: the task may be
            // aborted (shutdown) while it awaits, and the count must not lag the store.
            let result = tokio::task::spawn_blocking(move || {
                let mut sink = sink;
                let n = forward_once_with_rings(
                    &s,
                    &c.gateway_id,
                    &c.operator,
                    |d| k.device_key_ring(d).unwrap_or_default(),
                    c.forward_batch_max_taps,
                    &mut sink,
                )?;
                st.forwarded.fetch_add(n as u64, Ordering::Relaxed);
                Ok::<_, crate::forward::ForwardError>(n)
            })
            .await;
            match result {
                Ok(Ok(0)) => {
                    backoff_ms = 50;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Ok(_)) => {
                    backoff_ms = 50;
                    last_trim = Instant::now();
                }
                Ok(Err(e)) => {
                    stats.forward_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%e, backoff_ms, "forwarding to clearing failed; retrying the same batch");
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(5_000);
                }
                Err(e) => tracing::error!(%e, "forwarder task failed"),
            }
        }
    })
}

/// The store's housekeeping alone, every `interval`, for ever (a gateway with no charging
/// server: nothing is forwarded, but the aggregates' deltas must still be folded and the
/// card-days past their retention trimmed, or both grow for good).
async fn housekeeping(store: &Store, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        trim_expired(store).await;
    }
}

/// Trims the forwarded taps whose retention ended (on the blocking pool).
async fn trim_expired(store: &Store) {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.trim_expired()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::debug!(trimmed = n, "forwarded taps past their retention trimmed"),
        Ok(Err(e)) => tracing::warn!(%e, "trimming forwarded taps failed"),
        Err(e) => tracing::error!(%e, "trim task failed"),
    }
}

/// Posts a clearing batch to `base` with the gateway's `token` (blocking).
fn clearing_sink(
    agent: ureq::Agent,
    base: String,
    token: String,
) -> impl FnMut(&serde_json::Value) -> Result<(), String> + Send + 'static {
    move |batch: &serde_json::Value| {
        agent
            .post(&format!("{base}/v1/clearing/batches"))
            .set("Authorization", &format!("Bearer {token}"))
            .send_json(batch.clone())
            .map(|_| ())
            .map_err(|e| match e {
                // The server's reason (a refused operator, a malformed batch) in the log, not
                // just the status code.
                ureq::Error::Status(code, r) => {
                    format!(
                        "clearing answered {code}: {}",
                        r.into_string().unwrap_or_default()
                    )
                }
                other => other.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Message;
    use tapgate_testkit::fixtures::{gateway_keys, signed_tap};

    /// With no charging server, the store is still kept: the deltas of the taps ingested are
    /// folded by the housekeeping (before, the forwarder ended at once and nothing ever folded).
    #[tokio::test]
    async fn without_a_charging_server_the_store_is_still_kept() {
        let keys = gateway_keys();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        let msgs: Vec<Message> = (1..=3)
            .map(|seq| Message {
                topic: "tapgate/v1/metro/taps/1001".into(),
                payload: signed_tap(&keys, "metro", 1001, seq),
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let out = store
            .ingest(&msgs, |d| keys.device_key(d).ok(), now)
            .unwrap();
        assert_eq!(out.stored, 3);
        let writes = store.write_transactions();
        let cfg = GatewayConfig {
            charging: None,
            ..GatewayConfig::default()
        };
        let stats = Arc::new(GatewayStats::default());
        let task = spawn_trimming_every(
            cfg,
            store.clone(),
            keys.clone(),
            stats,
            Duration::from_millis(10),
        );
        // The first round's two write transactions (the card-days' first mark, the fold),
        // within the deadline; a fold of ours then waits for its commit and finds nothing.
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.write_transactions() < writes + 2 {
            assert!(Instant::now() < deadline, "no housekeeping within 20 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        let _ = task.await;
        assert_eq!(
            store.fold_aggregates().unwrap(),
            0,
            "the deltas were folded"
        );
        let device = store.aggregates("device:", 10).unwrap();
        assert_eq!(device[0].1.taps, 3);
    }
}
