//! The embedded MQTT broker: an ACL-enforcing front that owns the public listeners (TCP and
//! TLS), in front of rumqttd on an internal loopback port.
//!
//! rumqttd authenticates only at CONNECT and has no per-topic rules, so with one device's
//! password a client could read every device's taps, publish another device's confirmations or
//! a retained downlink message, and take the gateway's client id. The front closes that:
//!
//! - it reads each client's CONNECT itself and checks the username and password (constant
//!   time); a device's client id is replaced by one derived from its username (as Mosquitto's
//!   `use_username_as_clientid`), so no device can take another's or the gateway's session;
//! - it parses every client → broker packet (MQTT 3.1.1 framing, `rumqttc::mqttbytes::v4`)
//!   and checks each PUBLISH topic, the will, and each SUBSCRIBE filter against
//!   [`crate::mqtt_acl::Role`] (the shipped Mosquitto ACL's promises, plus each device bound to
//!   its operator); on a violation it closes the connection (MQTT 3.1.1 §3.3.5 allows that for an
//!   unauthorised publish) before the packet reaches the broker, counts it ([`BrokerStats`]) and
//!   logs the device once;
//! - allowed packets go to rumqttd unchanged, and rumqttd accepts only the front's per-process
//!   random credential, so nothing reaches it around the front. The broker → client direction
//!   is a plain byte copy.
//!
//! The gateway's in-process link ([`start_embedded_broker_linked`]) talks to rumqttd directly.

use crate::mqtt_acl::{is_topic_safe, Role};
use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Login, Packet, Subscribe};
use rumqttc::mqttbytes::Protocol;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest MQTT packet the front passes (rumqttd's payload limit, 16 MiB, plus headers).
const MAX_PACKET_BYTES: usize = (16 << 20) + 4096;
/// Most client connections at once with up to about 9,000 users (rumqttd's own limit is a
/// little higher, for the link); see [`connection_limit`].
const MIN_CONNECTIONS: usize = 10_000;

/// Most client connections at once for `users` users: one for each user and a tenth more (a
/// device reconnecting before its old connection closed, a gateway's several connections, a
/// connection still in its CONNECT), at least [`MIN_CONNECTIONS`]. Each takes three file
/// descriptors of this process (the client's socket, the front's to rumqttd and rumqttd's end).
fn connection_limit(users: usize) -> usize {
    MIN_CONNECTIONS.max(users + users / 10 + 100)
}
/// Time a new connection has to finish TLS and send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The username under which the front logs in to rumqttd (with a random per-process password).
const INTERNAL_USER: &str = "tapgate-front";

/// Counters of what the front refused (Prometheus: `tapgate_gateway_mqtt_*`).
#[derive(Default, Debug)]
pub struct BrokerStats {
    /// Connections refused at CONNECT: unknown user, wrong password, no login, a will topic the
    /// client may not publish, not MQTT 3.1.1.
    pub connections_refused: AtomicU64,
    /// Connections closed for a PUBLISH outside the client's topics.
    pub publishes_refused: AtomicU64,
    /// Connections closed for a SUBSCRIBE filter that can match a topic the client may not read.
    pub subscriptions_refused: AtomicU64,
    /// Connections closed for a malformed packet or a second CONNECT.
    pub protocol_errors: AtomicU64,
}

impl BrokerStats {
    /// The counters in Prometheus text format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (name, c) in [
            (
                "tapgate_gateway_mqtt_connections_refused_total",
                &self.connections_refused,
            ),
            (
                "tapgate_gateway_mqtt_publishes_refused_total",
                &self.publishes_refused,
            ),
            (
                "tapgate_gateway_mqtt_subscriptions_refused_total",
                &self.subscriptions_refused,
            ),
            (
                "tapgate_gateway_mqtt_protocol_errors_total",
                &self.protocol_errors,
            ),
        ] {
            let v = c.load(Ordering::Relaxed);
            out.push_str(&format!("# TYPE {name} counter\n{name} {v}\n"));
        }
        out
    }
}

#[derive(Clone)]
struct BrokerUser {
    password: String,
    role: Role,
}

/// The embedded broker's users and their roles. `Debug` never shows a password.
#[derive(Clone, Default)]
pub struct BrokerUsers {
    users: HashMap<String, BrokerUser>,
}

impl std::fmt::Debug for BrokerUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (u, e) in &self.users {
            m.entry(u, &e.role);
        }
        m.finish()
    }
}

impl BrokerUsers {
    /// No users: every connection is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a user with the gateway role: every topic, any client id.
    pub fn add_gateway(&mut self, username: &str, password: &str) {
        self.users.insert(
            username.to_string(),
            BrokerUser {
                password: password.to_string(),
                role: Role::Gateway,
            },
        );
    }

    /// Adds (or replaces) a device: its username is its id; `operator` binds it to that
    /// operator's topics (`None`: any operator). Both must be topic-safe names.
    pub fn add_device(
        &mut self,
        id: &str,
        password: &str,
        operator: Option<&str>,
    ) -> Result<(), String> {
        if !is_topic_safe(id) {
            return Err(format!(
                "device {id:?}: a device's username must be a topic-safe name (letters, digits, _ - .)"
            ));
        }
        if let Some(op) = operator.filter(|op| !is_topic_safe(op)) {
            return Err(format!(
                "device {id}: operator {op:?} is not a topic-safe name"
            ));
        }
        self.users.insert(
            id.to_string(),
            BrokerUser {
                password: password.to_string(),
                role: Role::Device {
                    id: id.to_string(),
                    operator: operator.map(str::to_string),
                },
            },
        );
        Ok(())
    }

    /// Parses a users file (`tapgate gateway --mqtt-users`): one device a line,
    /// `username password [operator]`; blank lines and `#` comments are skipped. A device
    /// without an operator may use any operator's topics (as the Mosquitto ACL's `%u` patterns).
    pub fn parse_devices(text: &str) -> Result<Self, String> {
        let mut users = BrokerUsers::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (u, p, op) = match fields.as_slice() {
                [u, p] => (*u, *p, None),
                [u, p, op] => (*u, *p, Some(*op)),
                _ => {
                    return Err(format!(
                        "line {}: expected `username password [operator]`",
                        i + 1
                    ))
                }
            };
            if users.users.contains_key(u) {
                return Err(format!("line {}: user {u} is listed twice", i + 1));
            }
            users
                .add_device(u, p, op)
                .map_err(|e| format!("line {}: {e}", i + 1))?;
        }
        Ok(users)
    }

    /// Whether `username` is a user.
    pub fn contains(&self, username: &str) -> bool {
        self.users.contains_key(username)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The role of `username` if `password` is its password (compared in constant time).
    fn authenticate(&self, username: &str, password: &str) -> Option<&Role> {
        let u = self.users.get(username)?;
        bool::from(u.password.as_bytes().ct_eq(password.as_bytes())).then_some(&u.role)
    }
}

/// `username → password`, as the shipped Mosquitto ACL reads it: the user named `gateway` has
/// the gateway role; every other user is a device not bound to an operator.
impl From<HashMap<String, String>> for BrokerUsers {
    fn from(map: HashMap<String, String>) -> Self {
        let mut users = BrokerUsers::new();
        for (u, p) in map {
            if u == "gateway" || users.add_device(&u, &p, None).is_err() {
                // A name unusable as a device id gets no rights as a device: only the
                // `gateway` user is privileged; anything else is left out.
                if u == "gateway" {
                    users.add_gateway(&u, &p);
                } else {
                    tracing::warn!(user = %u, "MQTT user left out: not a topic-safe device id");
                }
            }
        }
        users
    }
}

/// The gateway's in-process link to the embedded broker: taps reach ingestion without TCP or
/// MQTT framing (see [`start_embedded_broker_linked`]).
pub struct TapLink {
    /// Kept so the link stays registered with the router.
    pub(crate) _tx: rumqttd::local::LinkTx,
    pub(crate) rx: rumqttd::local::LinkRx,
    /// The operator whose taps it is subscribed to.
    pub(crate) operator: String,
    stats: Arc<BrokerStats>,
}

impl TapLink {
    /// What the broker's front refused so far.
    pub fn broker_stats(&self) -> Arc<BrokerStats> {
        self.stats.clone()
    }
}

/// Starts the embedded broker like [`start_embedded_broker_tls`] and returns, besides its
/// thread, an in-process link for [`crate::daemon::run_linked`].
///
/// The link is subscribed to `operator`'s taps (QoS 0) before the broker opens its listeners,
/// so no tap published after start-up can miss it. Its client id is random and clients reach
/// rumqttd only through the front, which gives them ids of their own namespace: no network
/// client can take it.
///
/// Why a QoS 0 link loses nothing a QoS 1 session would keep: the embedded broker keeps its
/// state in this process's memory, so whatever it holds dies with the gateway either way; what
/// makes delivery end to end is the validator's outbox, which keeps every tap until the
/// gateway's confirmation (sent only after the tap is durable) and sends unconfirmed taps
/// again (after a reconnect, and after 30 s without any confirmation). The link also lifts
/// rumqttd's cap of 100 unacknowledged messages per connection, which bounded a TCP
/// subscriber to 100 taps per group commit.
pub fn start_embedded_broker_linked(
    listen: SocketAddr,
    users: impl Into<BrokerUsers>,
    tls: Option<(SocketAddr, String, String)>,
    operator: &str,
) -> Result<(std::thread::JoinHandle<()>, TapLink), String> {
    let (thread, link) = spawn_broker(listen, users.into(), tls, Some(operator))?;
    let link = link.ok_or("the embedded broker gave no link")?;
    Ok((thread, link))
}

/// Starts the embedded MQTT broker on `listen`, in its own threads: the ACL front there, rumqttd
/// behind it on a loopback port. Every client must authenticate as one of `users`.
pub fn start_embedded_broker(
    listen: SocketAddr,
    users: impl Into<BrokerUsers>,
) -> std::thread::JoinHandle<()> {
    start_embedded_broker_tls(listen, users, None)
}

/// [`start_embedded_broker`] plus, with `tls` = (listen address, PEM certificate chain path,
/// PEM private key path), a TLS listener for validators (`mqtts://`; they authenticate with
/// username and password, no client certificates). Both listeners enforce the same rules.
pub fn start_embedded_broker_tls(
    listen: SocketAddr,
    users: impl Into<BrokerUsers>,
    tls: Option<(SocketAddr, String, String)>,
) -> std::thread::JoinHandle<()> {
    match spawn_broker(listen, users.into(), tls, None) {
        Ok((thread, _)) => thread,
        Err(e) => {
            tracing::error!(%e, "embedded MQTT broker did not start");
            std::thread::spawn(|| ())
        }
    }
}

/// Registers the gateway's link with the router (already running; the listeners are not open
/// yet) and waits until its subscription to `operator`'s taps is in place.
fn open_link(
    broker: &rumqttd::Broker,
    operator: &str,
) -> Result<(rumqttd::local::LinkTx, rumqttd::local::LinkRx), String> {
    let id = format!(
        "tapgate-gateway-link-{}",
        hex::encode(rand::random::<[u8; 16]>())
    );
    let (mut tx, mut rx) = broker.link(&id).map_err(|e| e.to_string())?;
    tx.subscribe(format!("tapgate/v1/{operator}/taps/+"))
        .map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_deadline(deadline) {
            Ok(Some(rumqttd::Notification::DeviceAck(_))) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("subscribing the gateway's link: {e}")),
        }
    }
    Ok((tx, rx))
}

fn rumqttd_config(internal: SocketAddr, secret: &str, max_connections: usize) -> rumqttd::Config {
    let server = rumqttd::ServerSettings {
        name: "tapgate-internal".into(),
        listen: internal,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 16 << 20,
            max_inflight_count: 5_000,
            // Only the front knows this credential.
            auth: Some(HashMap::from([(
                INTERNAL_USER.to_string(),
                secret.to_string(),
            )])),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: max_connections + 10,
            max_outgoing_packet_count: 10_000,
            // rumqttd keeps, per subscription filter, a log of what matched it (read or not),
            // dropping its oldest segment only when full: these sizes bound its memory. The
            // taps get room for a large backlog (≈ 1.5 million live taps); each validator's
            // confirmations, of which there are thousands of filters, get 2 × 64 kB (a wrapped
            // confirmation is resent by the validator's outbox and confirmed as a duplicate).
            max_segment_size: 16 << 20,
            max_segment_count: 4,
            custom_segment: Some(HashMap::from([
                (
                    "tapgate/v1/+/taps/+".to_string(),
                    rumqttd::SegmentConfig {
                        max_segment_size: 64 << 20,
                        max_segment_count: 4,
                    },
                ),
                (
                    "tapgate/v1/+/devices/+/confirm".to_string(),
                    rumqttd::SegmentConfig {
                        max_segment_size: 64 << 10,
                        max_segment_count: 2,
                    },
                ),
            ])),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("tapgate-internal".to_string(), server)])),
        ..Default::default()
    }
}

fn tls_acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("TLS certificate {cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("TLS key {key}: {e}"))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate {cert}: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let l =
        std::net::TcpListener::bind(addr).map_err(|e| format!("MQTT listener on {addr}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(l)
}

/// Binds the public listeners (so a client may connect as soon as this returns), starts rumqttd
/// on a free loopback port with a random credential, and the front's thread.
fn spawn_broker(
    listen: SocketAddr,
    users: BrokerUsers,
    tls: Option<(SocketAddr, String, String)>,
    link_operator: Option<&str>,
) -> Result<(std::thread::JoinHandle<()>, Option<TapLink>), String> {
    let mut listeners = vec![(bind(listen)?, None)];
    if let Some((addr, cert, key)) = &tls {
        tapgate_http::serve::install_crypto_provider();
        listeners.push((bind(*addr)?, Some(tls_acceptor(cert, key)?)));
    }
    let internal = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("choosing the broker's internal port: {e}"))?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let max_connections = connection_limit(users.len());
    let config = rumqttd_config(internal, &secret, max_connections);
    let stats = Arc::new(BrokerStats::default());
    let (hand_over, handed) = std::sync::mpsc::channel();
    let link_operator = link_operator.map(str::to_string);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let link = link_operator.map(|op| open_link(&broker, &op).map(|l| (l, op)));
            let failed = matches!(link, Some(Err(_)));
            let _ = hand_over.send(link);
            if failed {
                return;
            }
            if let Err(e) = broker.start() {
                tracing::error!(%e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| format!("spawning the broker thread: {e}"))?;
    let link = match handed
        .recv()
        .map_err(|_| "the embedded broker stopped before it started".to_string())?
    {
        None => None,
        Some(Err(e)) => {
            return Err(format!(
                "the embedded broker refused the gateway's link: {e}"
            ))
        }
        Some(Ok(((tx, rx), operator))) => Some(TapLink {
            _tx: tx,
            rx,
            operator,
            stats: stats.clone(),
        }),
    };
    let front = Arc::new(Front {
        users,
        internal,
        secret,
        stats,
        logged: Mutex::new(HashSet::new()),
        logins_logged: Mutex::new(HashMap::new()),
        slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        max_connections,
    });
    let thread = std::thread::Builder::new()
        .name("mqtt-front".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("mqtt-front")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(%e, "the MQTT front's runtime did not start"),
            };
            rt.block_on(front.run(listeners));
        })
        .map_err(|e| format!("spawning the MQTT front's thread: {e}"))?;
    Ok((thread, link))
}

struct Front {
    users: BrokerUsers,
    /// rumqttd's loopback listener.
    internal: SocketAddr,
    /// The credential rumqttd accepts (the only one).
    secret: String,
    stats: Arc<BrokerStats>,
    /// Users already logged for a violation (each is logged once; every one is counted).
    logged: Mutex<HashSet<String>>,
    /// When each refused login was last logged (once per user per minute: a device with a
    /// wrong password retries every half second).
    logins_logged: Mutex<HashMap<String, std::time::Instant>>,
    slots: Arc<tokio::sync::Semaphore>,
    /// The slots' number ([`connection_limit`]).
    max_connections: usize,
}

/// How often one user's refused login is logged again.
const LOGIN_LOG_EVERY: Duration = Duration::from_secs(60);

/// Why the front closed a connection.
#[derive(Debug)]
enum Refusal {
    Publish(String),
    Subscribe(String),
    Protocol(&'static str),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Publish(t) => write!(f, "publish to {t:?}"),
            Refusal::Subscribe(t) => write!(f, "subscription to {t:?}"),
            Refusal::Protocol(what) => f.write_str(what),
        }
    }
}

impl Front {
    async fn run(
        self: Arc<Self>,
        listeners: Vec<(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    ) {
        // rumqttd binds its port on its own thread: accept nobody before it listens.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.internal).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                return tracing::error!(internal = %self.internal, "the embedded broker's rumqttd did not start");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut tasks = Vec::new();
        for (l, tls) in listeners {
            let l = match tokio::net::TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => return tracing::error!(%e, "MQTT listener"),
            };
            tasks.push(tokio::spawn(self.clone().accept_loop(l, tls)));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, most likely: let connections close.
                    tracing::warn!(%e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, max = self.max_connections, "MQTT connection refused: the most connections the broker takes are open");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (front, tls) = (self.clone(), tls.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tls {
                    None => front.serve(stream).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => front.serve(s).await,
                            Ok(Err(e)) => tracing::debug!(%peer, %e, "MQTT TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "MQTT TLS handshake timed out"),
                        }
                    }
                }
            });
        }
    }

    /// One client connection: CONNECT checked here, then packets relayed while allowed.
    async fn serve<S>(&self, client: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut crd, mut cwr) = tokio::io::split(client);
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let connect =
            match tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut crd, &mut buf)).await {
                Ok(Some(c)) => c,
                _ => {
                    self.stats
                        .connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
        let user = connect.login.as_ref().map(|l| l.username.clone());
        let (role, username, internal_connect) = match self.admit(connect) {
            Ok(a) => a,
            Err(code) => {
                self.stats
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                self.login_refused(user.as_deref(), code);
                let mut out = BytesMut::new();
                if ConnAck::new(code, false).write(&mut out).is_ok() {
                    let _ = cwr.write_all(&out).await;
                    let _ = cwr.flush().await;
                }
                return;
            }
        };
        let Ok(broker) = tokio::net::TcpStream::connect(self.internal).await else {
            tracing::error!(internal = %self.internal, "the embedded broker's rumqttd is unreachable");
            return;
        };
        let _ = broker.set_nodelay(true);
        let (mut brd, mut bwr) = broker.into_split();
        if bwr.write_all(&internal_connect).await.is_err() {
            return;
        }
        // Wait for rumqttd's CONNACK even if the client has gone: rumqttd 0.20 leaves a stale
        // will handler behind when it cannot write the CONNACK, and the next connection with
        // that client id then panics its connection task with the handlers' mutex held, after
        // which every connection panics (the same happened for a client id it refuses).
        let mut connack = [0u8; 4];
        match tokio::time::timeout(CONNECT_TIMEOUT, brd.read_exact(&mut connack)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        if cwr.write_all(&connack).await.is_err() || connack[3] != 0 {
            return;
        }
        let down = tokio::io::copy(&mut brd, &mut cwr);
        let up = relay_up(&mut crd, &mut bwr, buf, &role);
        let refusal = tokio::select! {
            _ = down => None,
            r = up => r.err().flatten(),
        };
        if let Some(r) = refusal {
            self.refused(&username, r);
        }
    }

    /// Checks a CONNECT and rewrites it for rumqttd: the internal credential and a client id of
    /// the client's role's namespace (a device's is derived from its username alone).
    fn admit(&self, mut connect: Connect) -> Result<(Role, String, BytesMut), ConnectReturnCode> {
        if connect.protocol != Protocol::V4 {
            return Err(ConnectReturnCode::RefusedProtocolVersion);
        }
        let login = connect
            .login
            .take()
            .ok_or(ConnectReturnCode::NotAuthorized)?;
        let role = self
            .users
            .authenticate(&login.username, &login.password)
            .ok_or(ConnectReturnCode::BadUserNamePassword)?
            .clone();
        if let Some(w) = &mut connect.last_will {
            if !role.may_publish(&w.topic) {
                self.refused(
                    &login.username,
                    Refusal::Publish(format!("will {}", w.topic)),
                );
                return Err(ConnectReturnCode::NotAuthorized);
            }
            // Not retained, as a device's status is not ([`unretain`]).
            w.retain &= role == Role::Gateway;
        }
        // rumqttd refuses ids with `+ $ # /`; a device's id (topic-safe) never has one.
        connect.client_id = match &role {
            Role::Device { id, .. } => format!("d.{id}"),
            Role::Gateway if connect.client_id.is_empty() => {
                format!("g~{}", hex::encode(rand::random::<[u8; 12]>()))
            }
            Role::Gateway if connect.client_id.contains(['+', '$', '#', '/']) => {
                return Err(ConnectReturnCode::BadClientId)
            }
            Role::Gateway => format!("g.{}", connect.client_id),
        };
        connect.login = Some(Login::new(INTERNAL_USER, self.secret.clone()));
        let mut out = BytesMut::new();
        Packet::Connect(connect)
            .write(&mut out, MAX_PACKET_BYTES)
            .map_err(|_| ConnectReturnCode::BadClientId)?;
        Ok((role, login.username, out))
    }

    /// Logs a refused CONNECT, once per user per minute (every one is counted).
    fn login_refused(&self, user: Option<&str>, code: ConnectReturnCode) {
        let key = user.unwrap_or("").to_string();
        let now = std::time::Instant::now();
        let due = self
            .logins_logged
            .lock()
            .map(|mut l| {
                if l.len() >= 10_000 {
                    l.retain(|_, t| now.duration_since(*t) < LOGIN_LOG_EVERY);
                }
                match l.get(&key) {
                    Some(t) if now.duration_since(*t) < LOGIN_LOG_EVERY => false,
                    // Bounded: past 10,000 users refused within a minute, only counted.
                    None if l.len() >= 10_000 => false,
                    _ => {
                        l.insert(key.clone(), now);
                        true
                    }
                }
            })
            .unwrap_or(false);
        if !due {
            return;
        }
        let why = match code {
            ConnectReturnCode::BadUserNamePassword => {
                "unknown user or wrong password (--mqtt-users lists `username password [operator]`)"
            }
            ConnectReturnCode::NotAuthorized if user.is_none() => "no username and password",
            ConnectReturnCode::NotAuthorized => "its will topic is outside its topics",
            ConnectReturnCode::RefusedProtocolVersion => "not MQTT 3.1.1",
            _ => "refused",
        };
        tracing::warn!(
            user = user.unwrap_or("(none)"),
            "MQTT login refused: {why} (logged once per user per minute; counted in tapgate_gateway_mqtt_connections_refused_total)"
        );
    }

    fn refused(&self, user: &str, r: Refusal) {
        let counter = match &r {
            Refusal::Publish(_) => &self.stats.publishes_refused,
            Refusal::Subscribe(_) => &self.stats.subscriptions_refused,
            Refusal::Protocol(_) => &self.stats.protocol_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let first = self
            .logged
            .lock()
            .map(|mut l| l.len() < 100_000 && l.insert(user.to_string()))
            .unwrap_or(false);
        if first {
            tracing::warn!(
                user,
                refusal = %r,
                "MQTT client outside its topics: connection closed (logged once per user; counted in tapgate_gateway_mqtt_*_refused_total)"
            );
        }
    }
}

/// Reads the first packet; `None` unless it is a well-formed CONNECT.
async fn read_connect<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> Option<Connect> {
    loop {
        match rumqttc::mqttbytes::check(buf.iter(), MAX_PACKET_BYTES) {
            Ok(_) => {
                return match Packet::read(buf, MAX_PACKET_BYTES) {
                    Ok(Packet::Connect(c)) => Some(c),
                    _ => None,
                }
            }
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return None,
        }
        if rd.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// Client → broker: forwards each complete packet the role allows, in order, and stops at the
/// first one it does not (`Err(Some(_))`, that packet not forwarded) or at the end of either
/// stream (`Ok` or `Err(None)`).
async fn relay_up<R, W>(
    rd: &mut R,
    wr: &mut W,
    mut buf: BytesMut,
    role: &Role,
) -> Result<(), Option<Refusal>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut allowed = 0;
        let mut refusal = None;
        while allowed < buf.len() {
            match judge(&buf[allowed..], role) {
                Ok(Some(len)) => {
                    unretain(&mut buf[allowed..allowed + len], role);
                    allowed += len
                }
                Ok(None) => break,
                Err(r) => {
                    refusal = Some(r);
                    break;
                }
            }
        }
        if allowed > 0 {
            wr.write_all(&buf[..allowed]).await.map_err(|_| None)?;
            buf.advance(allowed);
        }
        if refusal.is_some() {
            return Err(refusal);
        }
        buf.reserve(16 * 1024);
        if rd.read_buf(&mut buf).await.map_err(|_| None)? == 0 {
            return Ok(());
        }
    }
}

/// Clears the RETAIN flag of a device's PUBLISH frame (its taps and its status; the will is
/// cleared at CONNECT). rumqttd 0.20 scans every retained message at every subscription
/// (`DataLog::read_retained_messages`, a topic match each): with each validator's status
/// retained, a fleet of N validators (eight subscriptions each) cost N² matches in the single
/// router thread while it connected or reconnected, and each later subscription O(N), which
/// held the blocklist's fan-out behind it (docs/benchmarks.md, "Gateway: connected
/// validators"). A retained status buys nothing here: the embedded broker lives and dies with
/// the gateway, whose heartbeat subscription is in place before any validator connects.
fn unretain(frame: &mut [u8], role: &Role) {
    if matches!(role, Role::Device { .. }) && frame.first().is_some_and(|b| b >> 4 == 3) {
        frame[0] &= !1;
    }
}

/// The length of the complete packet at the start of `bytes` if `role` may send it, `None` if
/// it is not complete yet.
fn judge(bytes: &[u8], role: &Role) -> Result<Option<usize>, Refusal> {
    let header = match rumqttc::mqttbytes::check(bytes.iter(), MAX_PACKET_BYTES) {
        Ok(h) => h,
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(_) => return Err(Refusal::Protocol("malformed packet")),
    };
    let len = header.frame_length();
    let frame = &bytes[..len];
    match frame[0] >> 4 {
        1 => Err(Refusal::Protocol("a second CONNECT")),
        3 => {
            let topic = publish_topic(frame).ok_or(Refusal::Protocol("malformed PUBLISH"))?;
            if role.may_publish(topic) {
                Ok(Some(len))
            } else {
                Err(Refusal::Publish(topic.to_string()))
            }
        }
        8 => {
            let s = Subscribe::read(header, Bytes::copy_from_slice(frame))
                .map_err(|_| Refusal::Protocol("malformed SUBSCRIBE"))?;
            match s.filters.iter().find(|f| !role.may_subscribe(&f.path)) {
                None => Ok(Some(len)),
                Some(f) => Err(Refusal::Subscribe(f.path.clone())),
            }
        }
        0 | 15 => Err(Refusal::Protocol("reserved packet type")),
        _ => Ok(Some(len)),
    }
}

/// The topic name of a complete PUBLISH frame.
fn publish_topic(frame: &[u8]) -> Option<&str> {
    // Fixed header: one byte, then the remaining length in 1 to 4 bytes (7 bits each).
    let varint = frame.get(1..5)?.iter().position(|b| b & 0x80 == 0)? + 1;
    let at = 1 + varint;
    let n = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]) as usize;
    std::str::from_utf8(frame.get(at + 2..at + 2 + n)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::Publish;
    use rumqttc::mqttbytes::QoS;

    fn device() -> Role {
        Role::Device {
            id: "1001".into(),
            operator: Some("metro".into()),
        }
    }

    fn frame(p: Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, MAX_PACKET_BYTES).unwrap();
        b
    }

    #[test]
    fn the_front_reads_publish_topics_of_every_length_encoding() {
        for payload_len in [0usize, 100, 200, 20_000, 3_000_000] {
            let p = Publish::new(
                "tapgate/v1/metro/taps/1001",
                QoS::AtLeastOnce,
                vec![7u8; payload_len],
            );
            let mut p = p;
            p.pkid = 1;
            let b = frame(Packet::Publish(p));
            assert_eq!(publish_topic(&b), Some("tapgate/v1/metro/taps/1001"));
            assert_eq!(judge(&b, &device()).unwrap(), Some(b.len()));
            assert_eq!(judge(&b[..b.len() - 1], &device()).unwrap(), None);
        }
    }

    #[test]
    fn the_front_refuses_what_the_role_may_not_send() {
        let mut forged = Publish::new(
            "tapgate/v1/metro/devices/1002/confirm",
            QoS::AtLeastOnce,
            b"{}".to_vec(),
        );
        forged.pkid = 1;
        let other = frame(Packet::Publish(forged));
        assert!(matches!(judge(&other, &device()), Err(Refusal::Publish(_))));
        assert_eq!(judge(&other, &Role::Gateway).unwrap(), Some(other.len()));
        let mut s = Subscribe::new("tapgate/v1/metro/devices/1001/confirm", QoS::AtLeastOnce);
        s.pkid = 1;
        let ok = frame(Packet::Subscribe(s.clone()));
        assert_eq!(judge(&ok, &device()).unwrap(), Some(ok.len()));
        s.add("tapgate/v1/+/taps/+".into(), QoS::AtLeastOnce);
        let bad = frame(Packet::Subscribe(s));
        assert!(matches!(judge(&bad, &device()), Err(Refusal::Subscribe(_))));
        let again = frame(Packet::Connect(Connect::new("x")));
        assert!(matches!(
            judge(&again, &Role::Gateway),
            Err(Refusal::Protocol(_))
        ));
        assert!(matches!(
            judge(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f], &device()),
            Err(Refusal::Protocol(_))
        ));
    }

    #[test]
    fn a_device_s_publishes_reach_the_broker_unretained() {
        let status = |retain: bool| {
            let mut p = Publish::new(
                "tapgate/v1/metro/devices/1001/status",
                QoS::AtLeastOnce,
                br#"{"online":true}"#.to_vec(),
            );
            p.pkid = 1;
            p.retain = retain;
            frame(Packet::Publish(p))
        };
        let mut b = status(true);
        assert_eq!(judge(&b, &device()).unwrap(), Some(b.len()));
        unretain(&mut b, &device());
        assert_eq!(b, status(false), "only the RETAIN flag changes");
        let mut g = status(true);
        unretain(&mut g, &Role::Gateway);
        assert_eq!(
            g,
            status(true),
            "the gateway's retained downlink stays retained"
        );
        let mut s = frame(Packet::Subscribe(Subscribe::new(
            "tapgate/v1/metro/devices/1001/confirm",
            QoS::AtLeastOnce,
        )));
        let before = s.clone();
        unretain(&mut s, &device());
        assert_eq!(s, before, "other packets pass unchanged");
    }

    #[test]
    fn the_connection_limit_grows_with_the_users() {
        assert_eq!(connection_limit(0), MIN_CONNECTIONS);
        assert_eq!(connection_limit(8_000), MIN_CONNECTIONS);
        // A fleet of 10,000 validators and its gateways: every one of them, and room to spare.
        assert_eq!(connection_limit(10_010), 11_111);
        assert_eq!(connection_limit(50_000), 55_100);
    }

    #[test]
    fn the_users_file_binds_devices_to_operators() {
        let u = BrokerUsers::parse_devices("# devices\n1001 pw1 metro\n\n1002 pw2\n").unwrap();
        assert_eq!(
            u.authenticate("1001", "pw1"),
            Some(&Role::Device {
                id: "1001".into(),
                operator: Some("metro".into())
            })
        );
        assert_eq!(u.authenticate("1001", "pw2"), None);
        assert_eq!(
            u.authenticate("1002", "pw2").cloned(),
            Some(Role::Device {
                id: "1002".into(),
                operator: None
            })
        );
        for bad in [
            "1001",
            "1001 pw metro extra",
            "+ pw",
            "1001 pw me/tro",
            "1 a\n1 b",
        ] {
            assert!(BrokerUsers::parse_devices(bad).is_err(), "{bad}");
        }
        let from_map = BrokerUsers::from(HashMap::from([
            ("gateway".to_string(), "g".to_string()),
            ("1001".to_string(), "d".to_string()),
        ]));
        assert_eq!(from_map.authenticate("gateway", "g"), Some(&Role::Gateway));
        assert!(matches!(
            from_map.authenticate("1001", "d"),
            Some(Role::Device { .. })
        ));
    }
}
