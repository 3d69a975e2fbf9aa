//! The validators' side of MQTT, played in process: one authenticated client per device, its
//! confirmations (and, when asked, the latency from publish to confirmation), the signed
//! blocklists it verified and applied, and an outbox of signed taps kept until the gateway
//! confirms them (store-and-forward), resent when unconfirmed.
//!
//! `tapgate demo` and `bench system` both drive their validators through a [`Fleet`].

use crate::SimError;
use purse::blocklist::Blocklist;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

/// One validator as the broker knows it.
#[derive(Clone, Debug)]
pub struct Device {
    /// Device id (its MQTT username and the number in its topics).
    pub id: u32,
    /// Its MQTT password.
    pub password: String,
    /// The operator whose topics it publishes on.
    pub operator: String,
}

/// How the fleet connects.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// The card scheme whose signed blocklists the validators hold (its topics).
    pub card_scheme: String,
    /// The back office's Ed25519 public key, that signs the blocklists.
    pub verifying_key: [u8; 32],
    /// A persistent MQTT session (`clean_session = false`), as the validator daemon keeps.
    pub persistent_session: bool,
    /// Each client's request queue (messages).
    pub queue_capacity: usize,
    /// Outgoing QoS 1 messages in flight per client (rumqttc's default when `None`).
    pub inflight: Option<u16>,
    /// Largest MQTT packet in and out (rumqttc's default when `None`).
    pub max_packet_bytes: Option<usize>,
    /// TCP_NODELAY, as the validator daemon sets it.
    pub tcp_nodelay: bool,
}

/// What the clients' event loops record.
struct Seen {
    confirmed: Vec<BTreeSet<u64>>,
    /// When each tap was published, for taps whose latency is measured ([`Fleet::note_sent`]).
    sent_at: Vec<HashMap<u64, Instant>>,
    latencies_us: Vec<u64>,
    blocklists: Vec<Blocklist>,
}

/// The validators' MQTT clients.
pub struct Fleet {
    handle: Handle,
    devices: Vec<Device>,
    clients: Vec<AsyncClient>,
    outbox: Vec<BTreeMap<u64, Vec<u8>>>,
    seen: Arc<Mutex<Seen>>,
    confirmed_total: Arc<AtomicU64>,
}

/// How long a client may take to subscribe.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

impl Fleet {
    /// Connects every device and waits until each one has subscribed to its confirmations and
    /// to the blocklists (it subscribes again on every reconnection).
    pub fn connect(
        handle: Handle,
        opts: &FleetOptions,
        devices: Vec<Device>,
    ) -> Result<Fleet, SimError> {
        let n = devices.len();
        let seen = Arc::new(Mutex::new(Seen {
            confirmed: vec![BTreeSet::new(); n],
            sent_at: vec![HashMap::new(); n],
            latencies_us: Vec::new(),
            blocklists: vec![Blocklist::new(&opts.card_scheme); n],
        }));
        let confirmed_total = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::with_capacity(n);
        let mut subscribed = Vec::with_capacity(n);
        for (vi, d) in devices.iter().enumerate() {
            let (client, ready) = Self::start_client(&handle, opts, vi, d, &seen, &confirmed_total);
            clients.push(client);
            subscribed.push(ready);
        }
        handle.block_on(async {
            for ready in subscribed {
                tokio::time::timeout(SUBSCRIBE_TIMEOUT, ready.notified())
                    .await
                    .map_err(|_| {
                        SimError::Timeout("a validator did not subscribe in 10 s".into())
                    })?;
            }
            Ok::<(), SimError>(())
        })?;
        Ok(Fleet {
            handle,
            outbox: vec![BTreeMap::new(); n],
            devices,
            clients,
            seen,
            confirmed_total,
        })
    }

    /// Starts one device's client and its event loop.
    fn start_client(
        handle: &Handle,
        opts: &FleetOptions,
        vi: usize,
        d: &Device,
        seen: &Arc<Mutex<Seen>>,
        confirmed_total: &Arc<AtomicU64>,
    ) -> (AsyncClient, Arc<tokio::sync::Notify>) {
        let id = d.id.to_string();
        let mut o = MqttOptions::new(format!("validator-{id}"), opts.host.clone(), opts.port);
        o.set_credentials(id.clone(), d.password.clone())
            .set_clean_session(!opts.persistent_session)
            .set_keep_alive(Duration::from_secs(30));
        if let Some(inflight) = opts.inflight {
            o.set_inflight(inflight);
        }
        if let Some(max) = opts.max_packet_bytes {
            o.set_max_packet_size(max, max);
        }
        let (client, mut events) = AsyncClient::new(o, opts.queue_capacity);
        if opts.tcp_nodelay {
            let mut net = events.network_options();
            net.set_tcp_nodelay(true);
            events.set_network_options(net);
        }
        let topics = [
            format!("tapgate/v1/{}/devices/{id}/confirm", d.operator),
            format!("tapgate/v1/{}/blocklist/#", opts.card_scheme),
        ];
        let ready = Arc::new(tokio::sync::Notify::new());
        let (sub, ready2, seen, total) = (
            client.clone(),
            ready.clone(),
            seen.clone(),
            confirmed_total.clone(),
        );
        let verifying_key = opts.verifying_key;
        handle.spawn(async move {
            let mut subacks = 0;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for t in &topics {
                            let _ = sub.subscribe(t.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks == topics.len() {
                            ready2.notify_one();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic.contains("/blocklist/") => {
                        // Forged, stale or out-of-order lists are refused and change nothing.
                        let _ = seen.lock().expect("fleet lock").blocklists[vi]
                            .apply(&p.payload, &verifying_key);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        record_confirmation(&seen, &total, vi, &p.payload);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        (client, ready)
    }

    /// The number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the fleet has no device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The topic device `vi` publishes its taps on.
    pub fn tap_topic(&self, vi: usize) -> String {
        let d = &self.devices[vi];
        format!("tapgate/v1/{}/taps/{}", d.operator, d.id)
    }

    /// Device `vi`'s client (to publish from tasks of one's own).
    pub fn client(&self, vi: usize) -> &AsyncClient {
        &self.clients[vi]
    }

    /// Publishes a signed tap and keeps it in device `vi`'s outbox until it is confirmed.
    pub fn publish(&mut self, vi: usize, seq: u64, wire: Vec<u8>) -> Result<(), SimError> {
        self.send(vi, wire.clone())?;
        self.outbox[vi].insert(seq, wire);
        Ok(())
    }

    /// Sends tap `wire` on device `vi`'s tap topic (QoS 1, not retained).
    fn send(&self, vi: usize, wire: Vec<u8>) -> Result<(), SimError> {
        self.handle.block_on(self.clients[vi].publish(
            self.tap_topic(vi),
            QoS::AtLeastOnce,
            false,
            wire,
        ))?;
        Ok(())
    }

    /// Notes that device `vi` publishes tap `seq` now: its confirmation's latency is measured.
    pub fn note_sent(&self, vi: usize, seq: u64) {
        self.seen.lock().expect("fleet lock").sent_at[vi].insert(seq, Instant::now());
    }

    /// Drops confirmed taps from the outboxes; returns how many remain.
    pub fn prune(&mut self) -> usize {
        let seen = self.seen.lock().expect("fleet lock");
        let mut left = 0;
        for (vi, ob) in self.outbox.iter_mut().enumerate() {
            ob.retain(|seq, _| !seen.confirmed[vi].contains(seq));
            left += ob.len();
        }
        left
    }

    /// Publishes again every tap not confirmed yet.
    pub fn resend_unconfirmed(&self) -> Result<(), SimError> {
        for (vi, ob) in self.outbox.iter().enumerate() {
            for wire in ob.values() {
                self.send(vi, wire.clone())?;
            }
        }
        Ok(())
    }

    /// Taps confirmed so far, over all devices (each counted once).
    pub fn confirmed_total(&self) -> u64 {
        self.confirmed_total.load(Ordering::Relaxed)
    }

    /// Publish-to-confirmation latencies (µs) of the taps noted with [`Fleet::note_sent`].
    pub fn latencies_us(&self) -> Vec<u64> {
        self.seen.lock().expect("fleet lock").latencies_us.clone()
    }

    /// Gives `list` device `vi`'s blocklist when that one is at another version.
    pub fn refresh_blocklist(&self, vi: usize, list: &mut Blocklist) {
        let seen = self.seen.lock().expect("fleet lock");
        if seen.blocklists[vi].version() != list.version() {
            *list = seen.blocklists[vi].clone();
        }
    }

    /// Waits until every device's blocklist blocks `uid`; returns, sorted, the milliseconds from
    /// `since` at which each one held it.
    pub fn wait_blocked(
        &self,
        uid: &[u8; 7],
        since: Instant,
        timeout: Duration,
    ) -> Result<Vec<u64>, SimError> {
        let mut held: Vec<Option<u64>> = vec![None; self.len()];
        while held.iter().any(Option::is_none) {
            if since.elapsed() >= timeout {
                return Err(SimError::Timeout(format!(
                    "the block reached {} of {} validators in {} s",
                    held.iter().flatten().count(),
                    self.len(),
                    timeout.as_secs()
                )));
            }
            {
                let seen = self.seen.lock().expect("fleet lock");
                for (vi, h) in held.iter_mut().enumerate() {
                    if h.is_none() && seen.blocklists[vi].is_blocked(uid) {
                        *h = Some(since.elapsed().as_millis() as u64);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut held: Vec<u64> = held.into_iter().flatten().collect();
        held.sort_unstable();
        Ok(held)
    }

    /// Disconnects every client.
    pub fn disconnect(&self) {
        for c in &self.clients {
            let _ = self.handle.block_on(c.disconnect());
        }
    }
}

/// Books a confirmation (`{"seqs": [..]}`) for device `vi`: each sequence number once, with its
/// latency when its publish was noted.
fn record_confirmation(seen: &Mutex<Seen>, total: &AtomicU64, vi: usize, payload: &[u8]) {
    let now = Instant::now();
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return;
    };
    let mut seen = seen.lock().expect("fleet lock");
    for s in body["seqs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let Some(s) = s.as_u64() else {
            continue;
        };
        if !seen.confirmed[vi].insert(s) {
            continue;
        }
        total.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = seen.sent_at[vi].remove(&s) {
            seen.latencies_us.push((now - at).as_micros() as u64);
        }
    }
}
