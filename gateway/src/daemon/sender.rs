//! Acknowledgements and confirmations leave from their own tasks: the MQTT request queue
//! drains only while the event loop polls, and the event loop waits while the ingest queue is
//! full, so ingestion must never wait on that request queue itself (it did, and a broker
//! pushing more unacknowledged messages than the two queues hold — Mosquitto does on a
//! backlog — stopped the gateway for good).
//!
//! - Acks: one task per connection (a stuck connection holds up only its own), unbounded but
//!   bounded in fact by what the broker has in flight to that connection; never dropped (a
//!   dropped ack would hold the broker's in-flight slot until a reconnect).
//! - Confirmations: one bounded queue of each durable batch's sequence numbers; when it is
//!   full a batch's confirmations are dropped and counted — safe, the validator sends the tap
//!   again and gets it confirmed as a duplicate. The task takes everything queued at once and
//!   merges it, one confirmation per device (≤ CONFIRM_MAX_SEQS numbers each), and keeps at
//!   most [`CONFIRM_WINDOW`] of its publishes unacknowledged by the broker: a broker that
//!   acknowledges slowly gets fewer, fuller confirmations instead of a backlog of small ones.
//!   (NATS stores each QoS 1 publish in JetStream before it reads the connection's next
//!   packet, ≈ 300 a second on one connection of a loaded three-node cluster; one
//!   confirmation per device per batch, thousands queued, held the taps to that rate.)

use super::{GatewayStats, CONFIRM_MAX_SEQS};
use purse::keys::KeySet;
use rumqttc::{AsyncClient, QoS};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// A durable batch's sequence numbers for one device, waiting to be confirmed: operator,
/// device, the KM_DEVICE version its taps verified under (0: the current one), the numbers.
type Confirmation = (String, u32, u8, Vec<u64>);

/// Most confirmations published and not yet acknowledged by the broker; beyond it the
/// confirmation task waits (and merges what queues meanwhile).
pub(super) const CONFIRM_WINDOW: usize = 64;

/// How long the confirmation task waits for room in its window before it assumes the
/// acknowledgements were lost (a reconnect to a new session drops them) and starts it afresh.
const WINDOW_STALL: Duration = Duration::from_secs(2);

/// Publishes of the main connection not yet acknowledged by the broker, as the confirmation
/// task counts them: it adds its own, the connection's event loop takes one off for each
/// PUBACK and clears them on every CONNACK (a PUBACK of another publish, a blocklist's, only
/// makes the count low for a while).
#[derive(Default)]
pub(super) struct Window {
    outstanding: AtomicUsize,
    changed: Notify,
}

impl Window {
    /// A publish went out.
    fn sent(&self) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
    }

    /// The broker acknowledged a publish.
    pub(super) fn acked(&self) {
        let _ = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.changed.notify_one();
    }

    /// A new connection: what was outstanding is resent by the client or gone with the session.
    pub(super) fn reset(&self) {
        self.outstanding.store(0, Ordering::Release);
        self.changed.notify_one();
    }

    /// Waits until fewer than `limit` are outstanding, or `stall` passed without room (then
    /// the count starts afresh: acknowledgements that never come must not stop confirmations).
    async fn room(&self, limit: usize, stall: Duration) {
        while self.outstanding.load(Ordering::Acquire) >= limit {
            // One waiter (the confirmation task): a notification sent before it waits is kept.
            if tokio::time::timeout(stall, self.changed.notified())
                .await
                .is_err()
            {
                tracing::warn!(
                    limit,
                    "no PUBACK for the confirmations in flight; counting them afresh"
                );
                self.reset();
            }
        }
    }
}

/// The queued batches' numbers merged per operator, device and key version, each list sorted
/// and without repeats (a tap delivered twice is confirmed once).
fn merge(queued: Vec<Confirmation>) -> BTreeMap<(String, u32, u8), Vec<u64>> {
    let mut merged: BTreeMap<(String, u32, u8), Vec<u64>> = BTreeMap::new();
    for (op, device, version, seqs) in queued {
        merged
            .entry((op, device, version))
            .or_default()
            .extend(seqs);
    }
    for seqs in merged.values_mut() {
        seqs.sort_unstable();
        seqs.dedup();
    }
    merged
}

/// The sender tasks and the queues into them.
pub(super) struct Senders {
    acks: Vec<mpsc::UnboundedSender<rumqttc::Publish>>,
    confirmations: mpsc::Sender<Confirmation>,
    tasks: Vec<JoinHandle<()>>,
}

impl Senders {
    /// An ack task per client in `clients`, and the confirmation task on the first client with
    /// a queue of `queue_max_messages` batches (at least 1 000), MAC'ing with `keys`, its
    /// publishes counted in `window` (whose acknowledgements the first client's event loop
    /// reports).
    pub(super) fn spawn(
        clients: &[AsyncClient],
        queue_max_messages: usize,
        keys: KeySet,
        window: Arc<Window>,
    ) -> Senders {
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
        let (confirmations, confirm_rx) =
            mpsc::channel::<Confirmation>(queue_max_messages.max(1_000));
        tasks.push(tokio::spawn(confirm_task(
            clients[0].clone(),
            keys,
            confirm_rx,
            window,
        )));
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

    /// Queues the confirmations of a durable batch, each to be MAC'd with its device's key
    /// under the KM_DEVICE version its taps verified under (`versions`), so a device not yet
    /// re-provisioned after a rotation can verify them.
    pub(super) fn confirm(
        &self,
        stats: &GatewayStats,
        confirmations: BTreeMap<(String, u32), Vec<u64>>,
        versions: &BTreeMap<u32, u8>,
    ) {
        for ((op, device), seqs) in confirmations {
            let version = versions.get(&device).copied().unwrap_or(0);
            if self
                .confirmations
                .try_send((op, device, version, seqs))
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

    /// Stops the sender tasks.
    pub(super) fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The confirmation task: takes everything queued, merges it per device ([`merge`]) and
/// publishes it, at most [`CONFIRM_WINDOW`] publishes unacknowledged.
async fn confirm_task(
    client: AsyncClient,
    keys: KeySet,
    mut rx: mpsc::Receiver<Confirmation>,
    window: Arc<Window>,
) {
    while let Some(first) = rx.recv().await {
        let mut queued = vec![first];
        while let Ok(more) = rx.try_recv() {
            queued.push(more);
        }
        for ((op, device, version), seqs) in merge(queued) {
            let key = match version {
                0 => keys.device_key(device),
                v => keys.device_key_at(device, v),
            };
            // No key: nothing to confirm with (the taps could not have verified either).
            let Ok(device_key) = key else {
                continue;
            };
            let topic = format!("tapgate/v1/{op}/devices/{device}/confirm");
            // A draining outbox can put hundreds of thousands of a device's taps in one
            // batch: confirmations go in messages of at most CONFIRM_MAX_SEQS (≈ 40 kB).
            for chunk in seqs.chunks(CONFIRM_MAX_SEQS) {
                let Ok(body) = purse::confirm::encode_with_key(&op, device, chunk, &device_key)
                else {
                    continue;
                };
                window.room(CONFIRM_WINDOW, WINDOW_STALL).await;
                match client
                    .publish(topic.as_str(), QoS::AtLeastOnce, false, body)
                    .await
                {
                    Ok(()) => window.sent(),
                    Err(e) => {
                        tracing::warn!(%e, device, "confirmation not sent; the validator will resend")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_batches_are_merged_per_device_and_key_version() {
        let merged = merge(vec![
            ("metro".into(), 1001, 0, vec![3, 4]),
            ("metro".into(), 1002, 0, vec![7]),
            ("metro".into(), 1001, 0, vec![1, 4, 5]),
            ("metro".into(), 1001, 2, vec![9]),
        ]);
        assert_eq!(merged.len(), 3);
        assert_eq!(merged[&("metro".into(), 1001, 0)], vec![1, 3, 4, 5]);
        assert_eq!(merged[&("metro".into(), 1002, 0)], vec![7]);
        assert_eq!(merged[&("metro".into(), 1001, 2)], vec![9]);
    }

    #[tokio::test]
    async fn the_window_waits_for_an_ack_when_full() {
        let window = Arc::new(Window::default());
        window.sent();
        window.sent();
        // Below the limit: no wait.
        window.room(3, Duration::from_secs(3600)).await;
        window.sent();
        let acker = {
            let w = window.clone();
            tokio::spawn(async move { w.acked() })
        };
        // Full until the ack: returns once it came (a day's stall is never reached).
        window.room(3, Duration::from_secs(86_400)).await;
        acker.await.unwrap();
        assert_eq!(window.outstanding.load(Ordering::Acquire), 2);
    }

    #[tokio::test]
    async fn a_window_whose_acks_never_come_starts_afresh() {
        let window = Window::default();
        for _ in 0..3 {
            window.sent();
        }
        window.room(3, Duration::from_millis(1)).await;
        assert_eq!(window.outstanding.load(Ordering::Acquire), 0);
    }

    #[test]
    fn acks_beyond_the_count_and_connacks_leave_it_at_zero() {
        let window = Window::default();
        window.acked();
        assert_eq!(window.outstanding.load(Ordering::Acquire), 0);
        window.sent();
        window.reset();
        assert_eq!(window.outstanding.load(Ordering::Acquire), 0);
    }
}
