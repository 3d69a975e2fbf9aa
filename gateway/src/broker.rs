//! The embedded MQTT broker: an ACL-enforcing front that owns the public listeners (TCP and
//! TLS), in front of rumqttd's router, which it reaches in process.
//!
//! rumqttd authenticates only at CONNECT and has no per-topic rules, so with one device's
//! password a client could read every device's taps, publish another device's confirmations or
//! a retained downlink message, and take the gateway's client id. The front closes that:
//!
//! - it reads each client's CONNECT itself and checks the username and password (constant
//!   time); a device's client id is replaced by one derived from its username (as Mosquitto's
//!   `use_username_as_clientid`), so no device can take another's or the gateway's session;
//! - it parses every client → broker packet (MQTT 3.1.1 framing, rumqttd's own v4 codec)
//!   and checks each PUBLISH topic, the will, and each SUBSCRIBE filter against
//!   [`crate::mqtt_acl::Role`] (the shipped Mosquitto ACL's promises, plus each device bound to
//!   its operator); on a violation it closes the connection (MQTT 3.1.1 §3.3.5 allows that for an
//!   unauthorised publish) before the packet reaches the broker, counts it ([`BrokerStats`]) and
//!   logs the device once;
//! - each admitted client gets an in-process link to the router (rumqttd's
//!   `local::LinkBuilder`, what rumqttd's own TCP server builds per connection), and only the
//!   packets the front allowed go into it; the router's answers come back over the same link
//!   and the front encodes them for the client. rumqttd has no listener at all, so nothing
//!   reaches it around the front, and a connected client costs one file descriptor (its
//!   socket) and no loopback port.
//!
//! The gateway's in-process link ([`start_embedded_broker_linked`]) talks to the router
//! directly.

use crate::mqtt_acl::{is_topic_safe, Role};
use bytes::BytesMut;
use futures_util::FutureExt;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, LastWill};
use rumqttc::mqttbytes::{Protocol, QoS};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet, Protocol as _, Publish};
use rumqttd::Notification;
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
/// connection still in its CONNECT), at least [`MIN_CONNECTIONS`]. Each takes one file
/// descriptor of this process (the client's socket).
fn connection_limit(users: usize) -> usize {
    MIN_CONNECTIONS.max(users + users / 10 + 100)
}
/// Time a new connection has to finish TLS and send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub(crate) _tx: LinkTx,
    pub(crate) rx: LinkRx,
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

/// Starts the embedded MQTT broker on `listen`, in its own threads: the ACL front there,
/// rumqttd's router behind it. Every client must authenticate as one of `users`.
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

/// A new connection's link and its CONNACK, or why the router gave none.
type Linked = Result<(LinkTx, LinkRx, Notification), String>;
/// Registers a connection with the router: (client id, clean session) → [`Linked`].
type Connector = Arc<dyn Fn(&str, bool) -> Linked + Send + Sync>;

/// The way into rumqttd's router (its own thread), without a socket: each client the front
/// admits gets an in-process link of its own (rumqttd's `local::LinkBuilder`, what rumqttd's
/// TCP server builds for each connection it accepts), so a validator is one descriptor here —
/// its socket — and no loopback port.
///
/// rumqttd does not export the type of its router's queue; closures over the sender hold it.
#[derive(Clone)]
struct RouterHandle {
    /// Registers a connection (client id, clean session) and waits for its CONNACK: blocking.
    connect: Connector,
    /// Whether the router's queue is full (handing it a packet would block this thread).
    full: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl RouterHandle {
    fn start(max_connections: usize) -> Self {
        let tx = rumqttd::Router::new(0, router_config(max_connections)).spawn();
        let queue = tx.clone();
        RouterHandle {
            connect: Arc::new(move |client_id: &str, clean: bool| {
                rumqttd::local::LinkBuilder::new(client_id, tx.clone())
                    .clean_session(clean)
                    // A publish to a topic nobody subscribed to yet is kept, not refused.
                    .dynamic_filters(true)
                    .build()
                    .map_err(|e| e.to_string())
            }),
            full: Arc::new(move || queue.is_full()),
        }
    }
}

/// Registers the gateway's link with the router (the listeners are not open yet) and waits
/// until its subscription to `operator`'s taps is in place.
fn open_link(router: &RouterHandle, operator: &str) -> Result<(LinkTx, LinkRx), String> {
    let id = format!(
        "tapgate-gateway-link-{}",
        hex::encode(rand::random::<[u8; 16]>())
    );
    let (mut tx, mut rx, _connack) = (router.connect)(&id, true)?;
    tx.subscribe(format!("tapgate/v1/{operator}/taps/+"))
        .map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_deadline(deadline) {
            Ok(Some(Notification::DeviceAck(_))) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("subscribing the gateway's link: {e}")),
        }
    }
    Ok((tx, rx))
}

fn router_config(max_connections: usize) -> rumqttd::RouterConfig {
    rumqttd::RouterConfig {
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

/// Binds the public listeners (so a client may connect as soon as this returns), starts
/// rumqttd's router, the gateway's link if asked, and the front's thread.
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
    let max_connections = connection_limit(users.len());
    let router = RouterHandle::start(max_connections);
    let stats = Arc::new(BrokerStats::default());
    let link = match link_operator {
        None => None,
        Some(op) => {
            let (tx, rx) = open_link(&router, op)
                .map_err(|e| format!("the embedded broker refused the gateway's link: {e}"))?;
            Some(TapLink {
                _tx: tx,
                rx,
                operator: op.to_string(),
                stats: stats.clone(),
            })
        }
    };
    let front = Arc::new(Front {
        users,
        router,
        opening: tokio::sync::Semaphore::new(LINKS_OPENING),
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

/// Connections registering with the router at once (each waits for the router's answer on a
/// blocking thread; the router takes them one at a time anyway).
const LINKS_OPENING: usize = 64;

struct Front {
    users: BrokerUsers,
    router: RouterHandle,
    /// Bounds the blocking threads waiting for the router's CONNACK ([`LINKS_OPENING`]).
    opening: tokio::sync::Semaphore,
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

/// A client the front let in: who it is and what its session with the router needs.
struct Admitted {
    role: Role,
    username: String,
    /// Its client id at the router (of its role's namespace).
    client_id: String,
    clean_session: bool,
    /// How long the connection may stay silent (1.5 × its keep-alive, as rumqttd's).
    idle: Duration,
    /// Its will, published by the front if the connection ends without a DISCONNECT.
    will: Option<Packet>,
}

/// How a connection ended, which says what the router still has to be told.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT (forwarded): no will.
    Disconnected,
    /// The router dropped the link (another connection took the client id): nothing to tell.
    Dropped,
    /// The client's socket closed or failed, or it was silent past its keep-alive: the will.
    Closed,
    /// The front refused a packet (not forwarded): the connection is closed, the will published.
    Refused(Refusal),
}

impl Front {
    async fn run(
        self: Arc<Self>,
        listeners: Vec<(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    ) {
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

    /// One client connection: CONNECT checked here, a link to the router opened for it, then
    /// packets relayed both ways while allowed.
    async fn serve<S>(&self, client: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut crd, mut cwr) = tokio::io::split(client);
        let mut buf = BytesMut::with_capacity(4 * 1024);
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
        let admitted = match self.admit(connect) {
            Ok(a) => a,
            Err(code) => {
                self.stats
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                self.login_refused(user.as_deref(), code);
                return refuse(&mut cwr, code).await;
            }
        };
        let Some((mut tx, mut rx, connack)) = self.open(&admitted).await else {
            self.stats
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            return refuse(&mut cwr, ConnectReturnCode::ServiceUnavailable).await;
        };
        let mut out = BytesMut::new();
        let end = match encode(connack, &mut out) {
            Ok(_) if cwr.write_all(&out).await.is_ok() => {
                out.clear();
                tokio::select! {
                    end = relay_down(&mut rx, &mut cwr, out) => end,
                    end = relay_up(&mut crd, &mut tx, buf, &admitted, &self.router) => end,
                }
            }
            _ => End::Closed,
        };
        match end {
            End::Disconnected | End::Dropped => {}
            End::Closed => self.close(&mut tx, admitted.will).await,
            End::Refused(r) => {
                self.refused(&admitted.username, r);
                self.close(&mut tx, admitted.will).await;
            }
        }
    }

    /// Registers an admitted client with the router: its link and CONNACK (`None`: the router
    /// refused it, e.g. at its connection limit).
    async fn open(&self, a: &Admitted) -> Option<(LinkTx, LinkRx, Notification)> {
        let _turn = self.opening.acquire().await.ok()?;
        let (connect, id, clean) = (
            self.router.connect.clone(),
            a.client_id.clone(),
            a.clean_session,
        );
        match tokio::task::spawn_blocking(move || connect(&id, clean)).await {
            Ok(Ok(link)) => Some(link),
            Ok(Err(e)) => {
                tracing::warn!(user = %a.username, %e, "MQTT connection refused by the broker's router");
                None
            }
            Err(_) => None,
        }
    }

    /// Ends a connection the client did not end with DISCONNECT: its will (MQTT 3.1.1
    /// §3.1.2.5), then the session's end, as rumqttd does when a socket closes.
    async fn close(&self, tx: &mut LinkTx, will: Option<Packet>) {
        let disconnect = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        let _ = forward(
            tx,
            &self.router,
            will.into_iter().chain([disconnect]).collect(),
        )
        .await;
    }

    /// Checks a CONNECT: the login, the will's topic, a keep-alive; gives the client an id of
    /// its role's namespace (a device's is derived from its username alone).
    fn admit(&self, mut connect: Connect) -> Result<Admitted, ConnectReturnCode> {
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
        let will = match &connect.last_will {
            Some(w) if !role.may_publish(&w.topic) => {
                self.refused(
                    &login.username,
                    Refusal::Publish(format!("will {}", w.topic)),
                );
                return Err(ConnectReturnCode::NotAuthorized);
            }
            // Not retained, as a device's status is not ([`unretain`]).
            Some(w) => Some(will_publish(w, role == Role::Gateway)?),
            None => None,
        };
        // As rumqttd: a connection without a keep-alive would hold its slot forever.
        if connect.keep_alive == 0 {
            return Err(ConnectReturnCode::ServiceUnavailable);
        }
        // rumqttd refuses ids with `+ $ # /`; a device's id (topic-safe) never has one.
        let client_id = match &role {
            Role::Device { id, .. } => format!("d.{id}"),
            Role::Gateway if connect.client_id.is_empty() => {
                format!("g~{}", hex::encode(rand::random::<[u8; 12]>()))
            }
            Role::Gateway if connect.client_id.contains(['+', '$', '#', '/']) => {
                return Err(ConnectReturnCode::BadClientId)
            }
            Role::Gateway => format!("g.{}", connect.client_id),
        };
        let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
        Ok(Admitted {
            role,
            username: login.username,
            client_id,
            clean_session: connect.clean_session,
            idle: keep_alive + keep_alive / 2,
            will,
        })
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
            ConnectReturnCode::ServiceUnavailable => "no keep-alive (the broker needs one)",
            ConnectReturnCode::BadClientId => "its client id has `+ $ # /`",
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
                return match rumqttc::mqttbytes::v4::Packet::read(buf, MAX_PACKET_BYTES) {
                    Ok(rumqttc::mqttbytes::v4::Packet::Connect(c)) => Some(c),
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

/// Answers a refused CONNECT with its CONNACK code.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, code: ConnectReturnCode) {
    let mut out = BytesMut::new();
    if ConnAck::new(code, false).write(&mut out).is_ok() {
        let _ = wr.write_all(&out).await;
        let _ = wr.flush().await;
    }
}

/// A will as the PUBLISH the front hands the router if the connection ends without a
/// DISCONNECT; retained only for the gateway. QoS 2 is sent as QoS 1 (the router would hold a
/// QoS 2 publish for a PUBREL that never comes).
fn will_publish(w: &LastWill, may_retain: bool) -> Result<Packet, ConnectReturnCode> {
    let qos = match w.qos {
        QoS::AtMostOnce => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    };
    let mut p = rumqttc::mqttbytes::v4::Publish::new(w.topic.clone(), qos, w.message.clone());
    p.retain = w.retain && may_retain;
    p.pkid = u16::from(qos != QoS::AtMostOnce);
    // rumqttd's `Publish` sets its QoS only when it reads one: encode, then read it back.
    let mut frame = BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Publish(p)
        .write(&mut frame, MAX_PACKET_BYTES)
        .map_err(|_| ConnectReturnCode::BadClientId)?;
    match next_packet(&mut frame) {
        Ok(Some(p @ Packet::Publish(..))) => Ok(p),
        _ => Err(ConnectReturnCode::BadClientId),
    }
}

/// Reads the next complete packet off `buf` (`None`: not complete yet).
fn next_packet(buf: &mut BytesMut) -> Result<Option<Packet>, Refusal> {
    match V4.read_mut(buf, MAX_PACKET_BYTES) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttd::protocol::Error::InsufficientBytes(_)) => Ok(None),
        Err(_) => Err(Refusal::Protocol("malformed packet")),
    }
}

/// Encodes what the router sends a connection; `Ok(false)` for a notification that is no
/// packet (the router unscheduled the connection until it is woken).
fn encode(n: Notification, out: &mut BytesMut) -> Result<bool, rumqttd::protocol::Error> {
    let Some(p) = Option::<Packet>::from(n) else {
        return Ok(false);
    };
    // MQTT 3.1.1 has no properties; rumqttd's v4 encoder takes none.
    let p = match p {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        p @ (Packet::ConnAck(..) | Packet::PingResp(_)) => p,
        // Client → broker packets: the router never sends them.
        _ => return Ok(true),
    };
    V4.write(p, out)?;
    Ok(true)
}

/// Hands `packets` to the router in order, with one wake-up; `false` if the router has
/// dropped the link. rumqttd's link sends that wake-up
/// with a blocking send on the router's bounded queue: when the queue is full this worker
/// thread is handed over to the runtime's blocking pool meanwhile, so the other connections
/// on it keep moving.
async fn forward(tx: &mut LinkTx, router: &RouterHandle, mut packets: Vec<Packet>) -> bool {
    let Some(last) = packets.pop() else {
        return true;
    };
    tx.buffer().extend(packets);
    // `LinkTx::send` has no await point: it completes in its first poll.
    let sent = if (router.full)() {
        tokio::task::block_in_place(|| tx.send(last).now_or_never())
    } else {
        tx.send(last).now_or_never()
    };
    sent.is_none_or(|r| r.is_ok())
}

/// Broker → client: writes what the router sends the connection, in batches, until the
/// router drops the link or the client's socket fails.
async fn relay_down<W: AsyncWrite + Unpin>(rx: &mut LinkRx, wr: &mut W, mut out: BytesMut) -> End {
    loop {
        let mut next = match rx.next().await {
            Ok(n) => n,
            Err(_) => return End::Dropped,
        };
        let mut unscheduled = false;
        // What the router has ready now, up to 64 kB a write.
        while let Some(n) = next.take() {
            match encode(n, &mut out) {
                Ok(packet) => unscheduled |= !packet,
                Err(_) => return End::Closed,
            }
            if out.len() < 64 * 1024 {
                next = match rx.next().now_or_never() {
                    Some(Ok(n)) => n,
                    Some(Err(_)) => return End::Dropped,
                    None => None,
                };
            }
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                return End::Closed;
            }
            out.clear();
        }
        if unscheduled && rx.wake().await.is_err() {
            return End::Dropped;
        }
    }
}

/// Client → broker: forwards each complete packet the client's role allows, in order, and
/// stops at the first one it does not (that packet not forwarded), at a DISCONNECT (forwarded),
/// at the end of the client's stream or of the router's link, or after the client was silent
/// past its keep-alive.
async fn relay_up<R: AsyncRead + Unpin>(
    rd: &mut R,
    tx: &mut LinkTx,
    mut buf: BytesMut,
    client: &Admitted,
    router: &RouterHandle,
) -> End {
    loop {
        let mut allowed = Vec::new();
        let mut end = None;
        while end.is_none() {
            match next_packet(&mut buf).and_then(|p| p.map(|p| judge(p, &client.role)).transpose())
            {
                Ok(Some(p)) => {
                    if matches!(p, Packet::Disconnect(..)) {
                        end = Some(End::Disconnected);
                    }
                    allowed.push(p);
                }
                Ok(None) => break,
                Err(r) => end = Some(End::Refused(r)),
            }
        }
        if !forward(tx, router, allowed).await {
            return End::Dropped;
        }
        if let Some(end) = end {
            return end;
        }
        buf.reserve(16 * 1024);
        match tokio::time::timeout(client.idle, rd.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return End::Closed,
        }
    }
}

/// `packet` as the router may get it if `role` may send it: a device's PUBLISH unretained
/// ([`unretain`]).
fn judge(packet: Packet, role: &Role) -> Result<Packet, Refusal> {
    match packet {
        Packet::Connect(..) => Err(Refusal::Protocol("a second CONNECT")),
        Packet::Publish(mut p, props) => {
            let topic = std::str::from_utf8(&p.topic)
                .map_err(|_| Refusal::Protocol("malformed PUBLISH"))?;
            if !role.may_publish(topic) {
                return Err(Refusal::Publish(topic.to_string()));
            }
            unretain(&mut p, role);
            Ok(Packet::Publish(p, props))
        }
        Packet::Subscribe(s, props) => {
            match s.filters.iter().find(|f| !role.may_subscribe(&f.path)) {
                None => Ok(Packet::Subscribe(s, props)),
                Some(f) => Err(Refusal::Subscribe(f.path.clone())),
            }
        }
        p => Ok(p),
    }
}

/// Clears the RETAIN flag of a device's PUBLISH (its taps and its status; the will is cleared
/// at CONNECT). rumqttd 0.20 scans every retained message at every subscription
/// (`DataLog::read_retained_messages`, a topic match each): with each validator's status
/// retained, a fleet of N validators (eight subscriptions each) cost N² matches in the single
/// router thread while it connected or reconnected, and each later subscription O(N), which
/// held the blocklist's fan-out behind it (docs/benchmarks.md, "Gateway: connected
/// validators"). A retained status buys nothing here: the embedded broker lives and dies with
/// the gateway, whose heartbeat subscription is in place before any validator connects.
fn unretain(p: &mut Publish, role: &Role) {
    if matches!(role, Role::Device { .. }) {
        p.retain = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt_acl::metro_1001;
    use rumqttc::mqttbytes::v4::{Packet as Frame, Publish as PublishFrame, Subscribe};

    /// A packet as a client encodes it (rumqttc).
    fn frame(p: Frame) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, MAX_PACKET_BYTES).unwrap();
        b
    }

    /// `frame` read by the front and judged for `role`.
    fn judged(mut frame: BytesMut, role: &Role) -> Result<Option<Packet>, Refusal> {
        let p = next_packet(&mut frame)?;
        assert!(p.is_none() || frame.is_empty(), "one packet, read whole");
        p.map(|p| judge(p, role)).transpose()
    }

    fn publish(topic: &str, len: usize, retain: bool) -> BytesMut {
        let mut p = PublishFrame::new(topic, QoS::AtLeastOnce, vec![7u8; len]);
        p.pkid = 1;
        p.retain = retain;
        frame(Frame::Publish(p))
    }

    #[test]
    fn the_front_reads_publish_topics_of_every_length_encoding() {
        for payload_len in [0usize, 100, 200, 20_000, 3_000_000] {
            let b = publish("tapgate/v1/metro/taps/1001", payload_len, false);
            match judged(b.clone(), &metro_1001()) {
                Ok(Some(Packet::Publish(p, None))) => {
                    assert_eq!(&p.topic[..], b"tapgate/v1/metro/taps/1001");
                    assert_eq!(p.payload.len(), payload_len);
                }
                other => panic!("{payload_len}: {other:?}"),
            }
            let mut part = BytesMut::from(&b[..b.len() - 1]);
            assert!(matches!(next_packet(&mut part), Ok(None)));
            assert_eq!(
                part.len(),
                b.len() - 1,
                "an incomplete packet is left whole"
            );
        }
    }

    #[test]
    fn the_front_refuses_what_the_role_may_not_send() {
        let other = publish("tapgate/v1/metro/devices/1002/confirm", 2, false);
        assert!(matches!(
            judged(other.clone(), &metro_1001()),
            Err(Refusal::Publish(_))
        ));
        assert!(matches!(
            judged(other, &Role::Gateway),
            Ok(Some(Packet::Publish(..)))
        ));
        let mut s = Subscribe::new("tapgate/v1/metro/devices/1001/confirm", QoS::AtLeastOnce);
        s.pkid = 1;
        let ok = frame(Frame::Subscribe(s.clone()));
        assert!(matches!(
            judged(ok, &metro_1001()),
            Ok(Some(Packet::Subscribe(..)))
        ));
        s.add("tapgate/v1/+/taps/+".into(), QoS::AtLeastOnce);
        let bad = frame(Frame::Subscribe(s));
        assert!(matches!(
            judged(bad, &metro_1001()),
            Err(Refusal::Subscribe(_))
        ));
        let again = frame(Frame::Connect(Connect::new("x")));
        assert!(matches!(
            judged(again, &Role::Gateway),
            Err(Refusal::Protocol(_))
        ));
        for malformed in [
            &[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f][..],
            &[0x00, 0x00],
            &[0xf0, 0x00],
            &[0xf0, 0x02, 0x00, 0x00],
        ] {
            assert!(
                matches!(
                    judged(BytesMut::from(malformed), &Role::Gateway),
                    Err(Refusal::Protocol(_))
                ),
                "{malformed:?}"
            );
        }
    }

    #[test]
    fn a_device_s_publishes_reach_the_broker_unretained() {
        let status = "tapgate/v1/metro/devices/1001/status";
        let retained = |role: &Role| match judged(publish(status, 15, true), role) {
            Ok(Some(Packet::Publish(p, _))) => p.retain,
            other => panic!("{other:?}"),
        };
        assert!(
            !retained(&metro_1001()),
            "a device's status is not retained"
        );
        assert!(
            retained(&Role::Gateway),
            "the gateway's retained downlink stays retained"
        );
    }

    #[test]
    fn a_will_is_a_publish_of_its_topic_retained_only_for_the_gateway() {
        for (qos, retain, gateway) in [
            (QoS::AtMostOnce, false, false),
            (QoS::AtLeastOnce, true, false),
            (QoS::ExactlyOnce, true, true),
        ] {
            let w = LastWill::new("tapgate/v1/metro/devices/1001/status", "off", qos, retain);
            let Ok(Packet::Publish(p, None)) = will_publish(&w, gateway) else {
                panic!("{qos:?}");
            };
            assert_eq!(&p.topic[..], b"tapgate/v1/metro/devices/1001/status");
            assert_eq!(&p.payload[..], b"off");
            assert_eq!(p.retain, retain && gateway);
            // Re-encoded, it says its QoS: 2 is sent as 1.
            let mut out = BytesMut::new();
            V4.write(Packet::Publish(p, None), &mut out).unwrap();
            let expected = match qos {
                QoS::AtMostOnce => 0,
                _ => 1,
            };
            assert_eq!((out[0] >> 1) & 3, expected, "{qos:?}");
        }
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
