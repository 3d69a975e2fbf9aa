//! The operators' side of the day: the embedded MQTT broker (a password per device) and two
//! gateways on it, the metro's (relaying the back office's blocklists) and the hotel's (the
//! hotel's topics, its revenue booked to "hotel"), both forwarding to clearing.

use crate::back_office::{GATEWAY, HOTEL_GATEWAY};
use crate::gates::FIRST_DEVICE;
use crate::SimError;
use gateway::daemon::{GatewayConfig, GatewayStats};
use gateway::store::Store;
use purse::keys::{KeySet, Role};
use rand::rngs::StdRng;
use rand::Rng;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// A gateway's map size.
const GATEWAY_MAP_BYTES: usize = 1 << 30;
/// How long the broker and the gateways may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One gateway: its configuration, store and counters, and its task while it runs.
pub struct GatewayRun {
    cfg: GatewayConfig,
    /// Its LMDB store.
    pub store: Store,
    keys: KeySet,
    /// Its live counters (they survive restarts).
    pub stats: Arc<GatewayStats>,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl GatewayRun {
    fn new(cfg: GatewayConfig, store: Store, keys: KeySet) -> GatewayRun {
        GatewayRun {
            cfg,
            store,
            keys,
            stats: Arc::new(GatewayStats::default()),
            running: None,
        }
    }

    /// Starts the gateway's daemon on `rt`.
    pub fn start(&mut self, rt: &Runtime) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(gateway::daemon::run(
            self.cfg.clone(),
            self.store.clone(),
            self.keys.clone(),
            self.stats.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        self.running = Some((stop, task));
    }

    /// Stops it (as a kill would: its persistent MQTT session and store keep what it had).
    pub fn stop(&mut self, rt: &Runtime) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            let _ = rt.block_on(task);
        }
    }

    fn subscribed(&self) -> bool {
        self.stats.subscribed.load(Ordering::Acquire)
    }
}

/// The broker and the two gateways.
pub struct Operators {
    /// The broker's port on 127.0.0.1.
    pub mqtt_port: u16,
    /// Each device's MQTT password, by device index.
    pub device_passwords: Vec<String>,
    /// The metro's gateway.
    pub metro: GatewayRun,
    /// The hotel's gateway.
    pub hotel: GatewayRun,
    /// How many times the metro's gateway was killed and restarted.
    pub restarts: u64,
}

impl Operators {
    /// Starts the broker with a password for the gateways and for each of `devices` (each bound
    /// to its operator's topics: device index `tv` is the hotel's box, the others the metro's),
    /// then both gateways (stores under `dir`), forwarding to the charging server at `base`;
    /// returns when both have subscribed.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        rt: &Runtime,
        keys: &KeySet,
        devices: usize,
        tv: usize,
        base: &str,
        dir: &Path,
        rng: &mut StdRng,
    ) -> Result<Operators, SimError> {
        let mqtt_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut users = gateway::broker::BrokerUsers::new();
        let secret = |rng: &mut StdRng| hex::encode(rng.gen::<[u8; 12]>());
        let gateway_password = secret(rng);
        users.add_gateway("gateway", &gateway_password);
        let device_passwords: Vec<String> = (0..devices).map(|_| secret(rng)).collect();
        for (i, p) in device_passwords.iter().enumerate() {
            let operator = if i == tv { "hotel" } else { "metro" };
            users
                .add_device(&(FIRST_DEVICE as usize + i).to_string(), p, Some(operator))
                .map_err(SimError::Setup)?;
        }
        let listen = format!("127.0.0.1:{mqtt_port}")
            .parse()
            .map_err(|e| SimError::Setup(format!("{e}")))?;
        gateway::daemon::start_embedded_broker(listen, users);
        wait_until(START_TIMEOUT, "the embedded broker did not start", || {
            std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_ok()
        })?;
        let metro_cfg = GatewayConfig {
            broker: ("127.0.0.1".into(), mqtt_port),
            mqtt_credentials: Some(("gateway".into(), gateway_password)),
            charging: Some((base.to_string(), GATEWAY.into())),
            operator: "metro".into(),
            ..Default::default()
        };
        let hotel_cfg = GatewayConfig {
            gateway_id: "gw-hotel".into(),
            operator: "hotel".into(),
            charging: Some((base.to_string(), HOTEL_GATEWAY.into())),
            // The box holds the card scheme's list, from the metro's topics.
            relay_blocklists: false,
            ..metro_cfg.clone()
        };
        let gw_keys = keys.for_role(Role::Gateway, 0)?;
        let mut ops = Operators {
            mqtt_port,
            device_passwords,
            metro: GatewayRun::new(
                metro_cfg,
                Store::open(&dir.join("gateway"), GATEWAY_MAP_BYTES)?,
                gw_keys.clone(),
            ),
            hotel: GatewayRun::new(
                hotel_cfg,
                Store::open(&dir.join("gateway-hotel"), GATEWAY_MAP_BYTES)?,
                gw_keys,
            ),
            restarts: 0,
        };
        ops.metro.start(rt);
        ops.hotel.start(rt);
        wait_until(START_TIMEOUT, "the gateway did not subscribe", || {
            ops.metro.subscribed() && ops.hotel.subscribed()
        })?;
        Ok(ops)
    }

    /// Kills the metro's gateway and starts it again.
    pub fn restart_metro(&mut self, rt: &Runtime) {
        self.metro.stop(rt);
        self.metro.start(rt);
        self.restarts += 1;
    }

    /// Taps both gateways still hold for clearing.
    pub fn outbox_len(&self) -> Result<u64, SimError> {
        Ok(self.metro.store.outbox_len()? + self.hotel.store.outbox_len()?)
    }

    /// Taps both gateways' stores hold as forwarded: what clearing took, counted from the
    /// durable record (the live counter can lag it by a batch a stop cut short).
    pub fn forwarded(&self) -> Result<u64, SimError> {
        Ok(self.metro.store.forwarded_len()? + self.hotel.store.forwarded_len()?)
    }

    /// A counter summed over both gateways.
    pub fn both(&self, counter: fn(&GatewayStats) -> &AtomicU64) -> u64 {
        [&self.metro.stats, &self.hotel.stats]
            .iter()
            .map(|s| counter(s).load(Ordering::Relaxed))
            .sum()
    }

    /// Stops both gateways.
    pub fn stop(&mut self, rt: &Runtime) {
        self.metro.stop(rt);
        self.hotel.stop(rt);
    }
}

/// Polls `done` every few milliseconds until it holds, or fails with `what` after `timeout`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), SimError> {
    let since = Instant::now();
    while !done() {
        if since.elapsed() >= timeout {
            return Err(SimError::Timeout(what.to_string()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
