//! The forwarder: the outbox to clearing over HTTP, with backoff; batch ids are idempotent
//! (`forward_once`), so a lost answer resends the same batch. Each batch clearing took trims the
//! forwarded taps whose retention ended; every [`TRIM_INTERVAL`] the forwarder trims them too,
//! so that a gateway with no new taps (or clearing unreachable) still lets them go.

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

/// Starts the forwarder (it ends at once when no charging server is configured).
pub(super) fn spawn(
    cfg: GatewayConfig,
    store: Store,
    keys: KeySet,
    stats: Arc<GatewayStats>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some((base, token)) = cfg.charging.clone() else {
            return;
        };
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        let mut backoff_ms = 50u64;
        let mut last_trim = Instant::now();
        loop {
            if last_trim.elapsed() >= TRIM_INTERVAL {
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
