//! The action-list relay: the back office's signed orders to pick up at the next tap
//! (`purse::actionlist`), relayed to the operator's validators the way the blocklist is —
//! deltas at QoS 1 on `tapgate/v1/<operator>/actions/delta`, the whole list retained on
//! `…/actions/snapshot` (refreshed at most every 10 s after a change). The gateway cannot forge
//! or alter a list (it has no signing key); one validators would refuse (another operator's,
//! or not signed by the back office this gateway knows) is logged once per version and not
//! relayed. The version last relayed survives a restart in the store. Each validator's
//! action-list ceiling grant is fetched from the back office and published retained on its own
//! `…/devices/<id>/ceiling` topic.

use super::signed_list::{SignedList, SignedListRelay, Wanted};
use super::GatewayConfig;
use crate::store::Store;
use purse::actionlist::ActionUpdate;
use purse::rotation::SignedMessage;
use rumqttc::{AsyncClient, QoS};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

const POLL_INTERVAL: Duration = Duration::from_millis(200);
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
    verifying_key: purse::rotation::TrustedKeys,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let list = ActionList;
        let s = store.clone();
        let Some(list) = SignedListRelay::for_config(client, cfg, store, verifying_key, list)
        else {
            return;
        };
        let mut relay = ActionRelay {
            list,
            granted: std::collections::HashMap::new(),
        };
        relay.list.held = tokio::task::spawn_blocking(move || s.actions_version().unwrap_or(0))
            .await
            .unwrap_or(0);
        let mut last_grants = Instant::now() - GRANT_INTERVAL;
        let mut last_new = Instant::now();
        loop {
            relay.list.round().await;
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

/// The action list; the version last relayed is kept by the relay (and in the store).
struct ActionList;

impl SignedList for ActionList {
    const PATH: &'static str = "actions";
    const NAME: &'static str = "action list";
    const ADJECTIVE: &'static str = "action-list";
    const REPORT_SNAPSHOT_REFUSAL: bool = true;

    /// This operator's list, signed by the back office, at the version the header says.
    fn check(&self, bytes: &[u8], want: &Wanted) -> Result<(), String> {
        let (key, operator) = (want.key, want.operator);
        let v = want.version;
        match ActionUpdate::verify_trusted(bytes, key).map(|(u, _)| u) {
            Ok(u) if u.operator == operator && Some(u.to_version) == v => Ok(()),
            Ok(u) if u.operator != operator => Err(format!(
                "it is operator {:?}'s list; this gateway serves {:?}",
                u.operator, operator
            )),
            Ok(u) => Err(match v {
                Some(v) => format!("the header says version {v}, the list {}", u.to_version),
                None => "no version header".into(),
            }),
            Err(e) => Err(e.to_string()),
        }
    }

    fn persist(store: &Store, v: u64) {
        let _ = store.set_actions_version(v);
    }
}

struct ActionRelay {
    list: SignedListRelay<ActionList>,
    /// Per validator, the ceiling grant number last published.
    granted: std::collections::HashMap<u32, u32>,
}

impl ActionRelay {
    /// Each validator this gateway has heard from gets its action-list ceiling grant from the
    /// back office (`POST /v1/validators/<id>/ceiling`), published retained on its own
    /// `…/devices/<id>/ceiling` when the number is new. The grant is cumulative and MAC'd with
    /// the device's key: a validator that missed one catches up from the next, and the
    /// gateway can neither forge nor enlarge one.
    async fn relay_grants(&mut self, only_new: bool) {
        let store = self.list.store.clone();
        let devices = match tokio::task::spawn_blocking(move || store.devices()).await {
            Ok(Ok(d)) => d,
            _ => return,
        };
        for (device, _) in devices {
            if only_new && self.granted.contains_key(&device) {
                continue;
            }
            let r = &self.list;
            let (a, b, t) = (r.agent.clone(), r.base.clone(), r.token.clone());
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
            let topic = format!("tapgate/v1/{}/devices/{device}/ceiling", self.list.operator);
            if self
                .list
                .client
                .publish(topic, QoS::AtLeastOnce, true, bytes)
                .await
                .is_ok()
            {
                self.granted.insert(device, g.seq);
            }
        }
    }
}
