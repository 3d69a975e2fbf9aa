//! The blocklist relay: signed deltas and snapshots from the back office, relayed to the
//! operator's validators (the gateway cannot forge them: it has no signing key). Deltas at
//! QoS 1; the snapshot retained, refreshed at most every 10 s, for validators that are behind
//! or new. A list every validator would refuse (another operator's, or not signed by the back
//! office this gateway knows) is a configuration error: it is logged once per version, counted
//! ([`GatewayStats::blocklists_refused`]) and not relayed.

use super::{now_ms, GatewayConfig, GatewayStats};
use crate::store::Store;
use purse::blocklist::ListUpdate;
use rumqttc::{AsyncClient, QoS};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How often the charging server is asked for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Least time between two retained snapshots.
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);

/// A fetch from the charging server, run on the blocking pool: the outer error is the
/// blocking task's, the inner one the request's.
type Fetched<T> = Result<Result<Option<T>, String>, tokio::task::JoinError>;

/// Starts the relay (it ends at once when no charging server is configured or relaying is
/// off). The version last relayed is read back from the store first.
pub(super) fn spawn(
    client: AsyncClient,
    cfg: GatewayConfig,
    store: Store,
    verifying_key: [u8; 32],
    stats: Arc<GatewayStats>,
) -> JoinHandle<()> {
    if let Ok(v) = store.blocklist_version() {
        stats.blocklist_version.store(v, Ordering::Relaxed);
    }
    tokio::spawn(async move {
        let Some((base, token)) = cfg.charging.clone() else {
            return;
        };
        if !cfg.relay_blocklists {
            return;
        }
        let mut relay = Relay {
            client,
            operator: cfg.operator,
            store,
            verifying_key,
            stats,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
            base,
            token,
            last_snapshot: Instant::now() - Duration::from_secs(60),
            snapshot_due: true,
            refused_version: None,
        };
        loop {
            relay.relay_delta().await;
            if relay.snapshot_due && relay.last_snapshot.elapsed() >= SNAPSHOT_INTERVAL {
                relay.relay_snapshot().await;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
}

struct Relay {
    client: AsyncClient,
    operator: String,
    store: Store,
    verifying_key: [u8; 32],
    stats: Arc<GatewayStats>,
    agent: ureq::Agent,
    base: String,
    token: String,
    last_snapshot: Instant,
    snapshot_due: bool,
    /// The last version refused (logged once per version).
    refused_version: Option<u64>,
}

impl Relay {
    /// GET `path` from the charging server on the blocking pool: `None` on 204, else the
    /// body and what `header` names.
    async fn get(&self, path: String, header: &'static str) -> Fetched<(Option<String>, Vec<u8>)> {
        let (a, b, t) = (self.agent.clone(), self.base.clone(), self.token.clone());
        tokio::task::spawn_blocking(move || {
            let r = a
                .get(&format!("{b}{path}"))
                .set("Authorization", &format!("Bearer {t}"))
                .call()
                .map_err(|e| e.to_string())?;
            if r.status() == 204 {
                return Ok(None);
            }
            let h = r.header(header).map(str::to_string);
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes)
                .map_err(|e| e.to_string())?;
            Ok(Some((h, bytes)))
        })
        .await
    }

    /// The changes after the version held, with their version.
    async fn fetch_delta(&self) -> Fetched<(u64, Vec<u8>)> {
        let held = self.stats.blocklist_version.load(Ordering::Relaxed);
        let path = format!("/v1/blocklist/signed/delta?after={held}");
        self.get(path, "x-tapgate-blocklist-version")
            .await
            .map(|r| {
                r.and_then(|o| {
                    o.map(|(h, bytes)| {
                        let v: u64 = h.and_then(|v| v.parse().ok()).ok_or("no version header")?;
                        Ok((v, bytes))
                    })
                    .transpose()
                })
            })
    }

    /// Whether validators would take `delta`; a refusal is logged (once per version) and
    /// counted.
    fn acceptable(&mut self, v: u64, delta: &[u8]) -> bool {
        let why = match ListUpdate::verify(delta, &self.verifying_key) {
            Ok(u) if u.operator == self.operator => return true,
            Ok(u) => format!(
                "it is operator {:?}'s list; this gateway serves {:?} (set operator in the charging server's config)",
                u.operator, self.operator
            ),
            Err(e) => e.to_string(),
        };
        if self.refused_version != Some(v) {
            self.refused_version = Some(v);
            self.stats
                .blocklists_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                version = v,
                "blocklist from the charging server not relayed: validators would refuse it: {why}"
            );
        }
        false
    }

    /// One round: the next changes, if any and acceptable, published at QoS 1; the version is
    /// recorded (stats, propagation, store) once the broker took them.
    async fn relay_delta(&mut self) {
        let (v, delta) = match self.fetch_delta().await {
            Ok(Ok(Some((v, delta)))) => (v, delta),
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return tracing::warn!(%e, "fetching blocklist changes failed"),
            Err(e) => return tracing::error!(%e, "blocklist task failed"),
        };
        if !self.acceptable(v, &delta) {
            return;
        }
        let topic = format!("tapgate/v1/{}/blocklist/delta", self.operator);
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, false, delta)
            .await
            .is_ok()
        {
            self.stats.blocklist_version.store(v, Ordering::Relaxed);
            if let Ok(mut pr) = self.stats.propagation.lock() {
                pr.published(v, now_ms());
            }
            let s = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || s.set_blocklist_version(v)).await;
            self.snapshot_due = true;
        }
    }

    /// The whole list as a retained snapshot (when it verifies and is this operator's).
    async fn relay_snapshot(&mut self) {
        self.last_snapshot = Instant::now();
        let snap = self
            .get(
                "/v1/blocklist/signed/snapshot".into(),
                "x-tapgate-blocklist-version",
            )
            .await;
        let Ok(Ok(Some((_, bytes)))) = snap else {
            return;
        };
        if !ListUpdate::verify(&bytes, &self.verifying_key)
            .is_ok_and(|u| u.operator == self.operator)
        {
            return;
        }
        let topic = format!("tapgate/v1/{}/blocklist/snapshot", self.operator);
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, true, bytes)
            .await
            .is_ok()
        {
            self.snapshot_due = false;
        }
    }
}
