//! Acknowledgements and confirmations leave from their own tasks: the MQTT request queue
//! drains only while the event loop polls, and the event loop waits while the ingest queue is
//! full, so ingestion must never wait on that request queue itself (it did, and a broker
//! pushing more unacknowledged messages than the two queues hold — Mosquitto does on a
//! backlog — stopped the gateway for good).
//!
//! - Acks: one task per connection (a stuck connection holds up only its own), unbounded but
//!   bounded in fact by what the broker has in flight to that connection; never dropped (a
//!   dropped ack would hold the broker's in-flight slot until a reconnect).
//! - Confirmations: one bounded queue; when it is full a confirmation is dropped and counted —
//!   safe, the validator sends the tap again and gets it confirmed as a duplicate.

use super::{GatewayStats, CONFIRM_MAX_SEQS};
use purse::keys::KeySet;
use rumqttc::{AsyncClient, QoS};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A confirmation waiting to be published: device, topic, body.
type Confirmation = (u32, String, String);

/// The sender tasks and the queues into them.
pub(super) struct Senders {
    acks: Vec<mpsc::UnboundedSender<rumqttc::Publish>>,
    confirmations: mpsc::Sender<Confirmation>,
    tasks: Vec<JoinHandle<()>>,
}

impl Senders {
    /// An ack task per client in `clients`, and the confirmation task on the first client with
    /// a queue of `queue_max_messages` (at least 1 000).
    pub(super) fn spawn(clients: &[AsyncClient], queue_max_messages: usize) -> Senders {
        let mut acks = Vec::with_capacity(clients.len());
        let mut tasks = Vec::with_capacity(clients.len() + 1);
        for c in clients {
            let (atx, mut arx) = mpsc::unbounded_channel::<rumqttc::Publish>();
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(p) = arx.recv().await {
                    if let Err(e) = c.ack(&p).await {
                        tracing::warn!(%e, "ack failed; the broker will redeliver (a duplicate)");
                    }
                }
            }));
            acks.push(atx);
        }
        let (confirmations, mut confirm_rx) =
            mpsc::channel::<Confirmation>(queue_max_messages.max(1_000));
        let confirm_client = clients[0].clone();
        tasks.push(tokio::spawn(async move {
            while let Some((device, topic, body)) = confirm_rx.recv().await {
                if let Err(e) = confirm_client
                    .publish(topic, QoS::AtLeastOnce, false, body)
                    .await
                {
                    tracing::warn!(%e, device, "confirmation not sent; the validator will resend");
                }
            }
        }));
        Senders {
            acks,
            confirmations,
            tasks,
        }
    }

    /// Acknowledges `p` on connection `conn` (once its message is durable).
    pub(super) fn ack(&self, conn: usize, p: rumqttc::Publish) {
        let _ = self.acks[conn].send(p);
    }

    /// Queues the confirmations of a durable batch, each MAC'd with its device's key — under
    /// the KM_DEVICE version its taps verified under (`versions`), so a device not yet
    /// re-provisioned after a rotation can verify them (no key: nothing to confirm with; the
    /// tap could not have verified either).
    pub(super) fn confirm(
        &self,
        keys: &KeySet,
        stats: &GatewayStats,
        confirmations: BTreeMap<(String, u32), Vec<u64>>,
        versions: &BTreeMap<u32, u8>,
    ) {
        for ((op, device), seqs) in confirmations {
            let topic = format!("tapgate/v1/{op}/devices/{device}/confirm");
            let key = match versions.get(&device) {
                Some(&v) if v != 0 => keys.device_key_at(device, v),
                _ => keys.device_key(device),
            };
            let Ok(device_key) = key else {
                continue;
            };
            // A draining outbox can put hundreds of thousands of a device's taps in one
            // batch: confirmations go in messages of at most CONFIRM_MAX_SEQS (≈ 40 kB).
            for chunk in seqs.chunks(CONFIRM_MAX_SEQS) {
                let Ok(body) = purse::confirm::encode_with_key(&op, device, chunk, &device_key)
                else {
                    continue;
                };
                if self
                    .confirmations
                    .try_send((device, topic.clone(), body))
                    .is_err()
                {
                    let n = stats.confirmations_dropped.fetch_add(1, Ordering::Relaxed);
                    if n.is_power_of_two() || n == 0 {
                        tracing::warn!(
                            device,
                            dropped = n + 1,
                            "confirmation queue full; confirmation dropped (the validator will resend)"
                        );
                    }
                }
            }
        }
    }

    /// Stops the sender tasks.
    pub(super) fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
