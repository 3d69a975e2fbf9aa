//! The action-list relay: the back office's signed orders to pick up at the next tap
//! (`purse::actionlist`), relayed to the operator's validators the way the blocklist is —
//! deltas at QoS 1 on `tapgate/v1/<operator>/actions/delta`, the whole list retained on
//! `…/actions/snapshot` (refreshed at most every 10 s after a change). The gateway cannot forge
//! or alter a list (it has no signing key); one validators would refuse (another operator's,
//! or not signed by the back office this gateway knows) is logged once per version and not
//! relayed. The version last relayed survives a restart in the store. Each validator's
//! action-list ceiling grant is fetched from the back office and published retained on its own
//! `…/devices/<id>/ceiling` topic.

use super::GatewayConfig;
use crate::store::Store;
use purse::actionlist::ActionUpdate;
use rumqttc::{AsyncClient, QoS};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

const POLL_INTERVAL: Duration = Duration::from_millis(200);
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);
/// How often each known validator's action-list ceiling grant is asked for.
const GRANT_INTERVAL: Duration = Duration::from_secs(30);
/// How often a validator heard from for the first time is looked for (it gets its first grant
/// without waiting for the next round).
const NEW_DEVICE_INTERVAL: Duration = Duration::from_secs(2);

/// Starts the relay (it ends at once without a charging server or with relaying off).
pub(super) fn spawn(
    client: AsyncClient,
    cfg: GatewayConfig,
    store: Store,
    verifying_key: [u8; 32],
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some((base, token)) = cfg.charging.clone() else {
            return;
        };
        if !cfg.relay_blocklists {
            return;
        }
        let held = {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.actions_version().unwrap_or(0))
                .await
                .unwrap_or(0)
        };
        let mut relay = ActionRelay {
            client,
            operator: cfg.operator,
            store,
            verifying_key,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
            base,
            token,
            held,
            last_snapshot: Instant::now() - Duration::from_secs(60),
            snapshot_due: true,
            refused_version: None,
            granted: std::collections::HashMap::new(),
        };
        let mut last_grants = Instant::now() - GRANT_INTERVAL;
        let mut last_new = Instant::now();
        loop {
            relay.relay_delta().await;
            if relay.snapshot_due && relay.last_snapshot.elapsed() >= SNAPSHOT_INTERVAL {
                relay.relay_snapshot().await;
            }
            if last_grants.elapsed() >= GRANT_INTERVAL {
                last_grants = Instant::now();
                relay.relay_grants(false).await;
            } else if last_new.elapsed() >= NEW_DEVICE_INTERVAL {
                last_new = Instant::now();
                relay.relay_grants(true).await;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
}

struct ActionRelay {
    client: AsyncClient,
    operator: String,
    store: Store,
    verifying_key: [u8; 32],
    agent: ureq::Agent,
    base: String,
    token: String,
    /// The version last relayed.
    held: u64,
    last_snapshot: Instant,
    snapshot_due: bool,
    refused_version: Option<u64>,
    /// Per validator, the ceiling grant number last published.
    granted: std::collections::HashMap<u32, u32>,
}

impl ActionRelay {
    /// GET `path`: `None` on 204, else the version header and the body.
    async fn get(&self, path: String) -> Result<Option<(u64, Vec<u8>)>, String> {
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
            let v: u64 = r
                .header("x-tapgate-actions-version")
                .and_then(|v| v.parse().ok())
                .ok_or("no version header")?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes)
                .map_err(|e| e.to_string())?;
            Ok(Some((v, bytes)))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Whether validators would take `bytes` as version `v` of this operator's list; a refusal
    /// is logged once per version.
    fn acceptable(&mut self, v: u64, bytes: &[u8]) -> bool {
        let why = match ActionUpdate::verify(bytes, &self.verifying_key) {
            Ok(u) if u.operator == self.operator && u.to_version == v => return true,
            Ok(u) if u.operator != self.operator => format!(
                "it is operator {:?}'s list; this gateway serves {:?}",
                u.operator, self.operator
            ),
            Ok(u) => format!("the header says version {v}, the list {}", u.to_version),
            Err(e) => e.to_string(),
        };
        if self.refused_version != Some(v) {
            self.refused_version = Some(v);
            tracing::error!(
                version = v,
                "action list from the charging server not relayed: validators would refuse it: {why}"
            );
        }
        false
    }

    async fn relay_delta(&mut self) {
        let (v, delta) = match self
            .get(format!("/v1/actions/signed/delta?after={}", self.held))
            .await
        {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => return tracing::warn!(%e, "fetching action-list changes failed"),
        };
        if !self.acceptable(v, &delta) {
            return;
        }
        let topic = format!("tapgate/v1/{}/actions/delta", self.operator);
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, false, delta)
            .await
            .is_ok()
        {
            self.held = v;
            let s = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || s.set_actions_version(v)).await;
            self.snapshot_due = true;
        }
    }

    /// Each validator this gateway has heard from gets its action-list ceiling grant from the
    /// back office (`POST /v1/validators/<id>/ceiling`), published retained on its own
    /// `…/devices/<id>/ceiling` when the number is new. The grant is cumulative and MAC'd with
    /// the device's key: a validator that missed one catches up from the next, and the
    /// gateway can neither forge nor enlarge one.
    async fn relay_grants(&mut self, only_new: bool) {
        let store = self.store.clone();
        let devices = match tokio::task::spawn_blocking(move || store.devices()).await {
            Ok(Ok(d)) => d,
            _ => return,
        };
        for (device, _) in devices {
            if only_new && self.granted.contains_key(&device) {
                continue;
            }
            let (a, b, t) = (self.agent.clone(), self.base.clone(), self.token.clone());
            let asked = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
                let v: serde_json::Value = a
                    .post(&format!("{b}/v1/validators/{device}/ceiling"))
                    .set("Authorization", &format!("Bearer {t}"))
                    .send_json(serde_json::json!({}))
                    .map_err(|e| e.to_string())?
                    .into_json()
                    .map_err(|e| e.to_string())?;
                let hex = v.get("grant").and_then(|g| g.as_str()).ok_or("no grant")?;
                hex::decode(hex).map_err(|e| e.to_string())
            })
            .await;
            let bytes = match asked {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::warn!(device, %e, "asking for a validator's ceiling grant failed");
                    continue;
                }
                Err(_) => continue,
            };
            let Some(g) = purse::sam::ActionGrant::decode(&bytes) else {
                continue;
            };
            if g.device_id != device || self.granted.get(&device) == Some(&g.seq) {
                continue;
            }
            let topic = format!("tapgate/v1/{}/devices/{device}/ceiling", self.operator);
            if self
                .client
                .publish(topic, QoS::AtLeastOnce, true, bytes)
                .await
                .is_ok()
            {
                self.granted.insert(device, g.seq);
            }
        }
    }

    async fn relay_snapshot(&mut self) {
        self.last_snapshot = Instant::now();
        let Ok(Some((v, bytes))) = self.get("/v1/actions/signed/snapshot".into()).await else {
            return;
        };
        if !self.acceptable(v, &bytes) {
            return;
        }
        let topic = format!("tapgate/v1/{}/actions/snapshot", self.operator);
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
