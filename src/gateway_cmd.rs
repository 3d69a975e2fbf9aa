//! `tapgate gateway`: tap ingestion from MQTT, confirmations, forwarding to clearing.

use crate::cli_util::input_err;
use crate::keys_cmd::load_keyset;
use anyhow::{Context, Result};
use clap::Args;
use gateway::daemon::{
    run, run_linked, start_embedded_broker_linked, BrokerUsers, GatewayConfig, GatewayStats,
    TapLink,
};
use gateway::store::Store;
use purse::keys::Role;
use std::path::PathBuf;
use std::sync::Arc;

/// `tapgate gateway`.
#[derive(Args)]
pub struct GatewayArgs {
    /// The issuer key directory, or a key set provisioned with `tapgate keys provision --role gateway`.
    #[arg(long)]
    keys: PathBuf,
    /// Read the key-set passphrase from this file (default: $TAPGATE_KEY_PASSPHRASE).
    #[arg(long = "passphrase-file")]
    passphrase_file: Option<PathBuf>,
    /// Data directory.
    #[arg(long, default_value = "data/gateway")]
    data: PathBuf,
    /// The store's map size, bytes: the most it may ever hold (a batch beyond it is refused and
    /// raises the store_full alarm).
    #[arg(long = "store-map-size-bytes", default_value_t = gateway::store::DEFAULT_MAP_SIZE_BYTES)]
    store_map_size_bytes: usize,
    /// An external broker, mqtt://host:port or mqtts://host:port (TLS, with
    /// --broker-ca-file; Mosquitto is the reference). Without it the gateway starts an embedded
    /// broker on --embedded-listen. A cluster's nodes: several URLs separated by commas, all of
    /// one scheme, tried in turn when a connection fails.
    #[arg(long)]
    broker: Option<String>,
    /// PEM CA file the broker's certificate must chain to, for mqtts:// --broker URLs.
    #[arg(long = "broker-ca-file", requires = "broker")]
    broker_ca_file: Option<PathBuf>,
    /// Take the taps from a NATS cluster's JetStream (nats://host:port,… — its client URLs) as
    /// one durable consumer shared by every gateway of the operator, instead of an MQTT
    /// subscription; --broker names the cluster's MQTT listeners (heartbeats, confirmations,
    /// blocklists). The NATS user is --mqtt-user. docs/nats.md.
    #[arg(long, requires = "broker")]
    nats: Option<String>,
    /// Replicas of the tap stream when this gateway creates it (at most the cluster's size).
    #[arg(long = "nats-replicas", default_value_t = 3)]
    nats_replicas: usize,
    /// PEM CA file: connect to NATS over TLS, verifying the servers against it.
    #[arg(long = "nats-ca-file")]
    nats_ca_file: Option<PathBuf>,
    /// Where the embedded broker listens.
    #[arg(long = "embedded-listen", default_value = "127.0.0.1:18830")]
    embedded_listen: std::net::SocketAddr,
    /// A TLS listener of the embedded broker for validators (mqtts://), with
    /// --embedded-tls-cert and --embedded-tls-key (PEM).
    #[arg(long = "embedded-tls-listen", requires_all = ["embedded_tls_cert", "embedded_tls_key"])]
    embedded_tls_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain of the embedded broker's TLS listener.
    #[arg(long = "embedded-tls-cert")]
    embedded_tls_cert: Option<PathBuf>,
    /// PEM private key of the embedded broker's TLS listener.
    #[arg(long = "embedded-tls-key")]
    embedded_tls_key: Option<PathBuf>,
    /// The embedded broker's devices: a file of `username password [operator]` lines
    /// (validators use their device id as username; with an operator, the device may use only
    /// that operator's topics). Required for the embedded broker: every client authenticates,
    /// and each device publishes only its own taps and status and reads only its own
    /// confirmations and the downlink (docs/mqtt.md).
    #[arg(long = "mqtt-users")]
    mqtt_users: Option<PathBuf>,
    /// The gateway's MQTT username.
    #[arg(long = "mqtt-user", default_value = "gateway")]
    mqtt_user: String,
    /// The gateway's MQTT password (default: $TAPGATE_MQTT_PASSWORD).
    #[arg(
        long = "mqtt-password",
        env = "TAPGATE_MQTT_PASSWORD",
        hide_env_values = true
    )]
    mqtt_password: String,
    /// The charging server to forward taps to (its /v1/clearing/batches).
    #[arg(long)]
    charging: Option<String>,
    /// The gateway's API token at the charging server (default: $TAPGATE_GATEWAY_TOKEN).
    #[arg(
        long = "charging-token",
        env = "TAPGATE_GATEWAY_TOKEN",
        hide_env_values = true
    )]
    charging_token: Option<String>,
    /// The operator the taps are booked to.
    #[arg(long, default_value = "default")]
    operator: String,
    /// This gateway's id (batch ids, MQTT client id).
    #[arg(long = "gateway-id", default_value = "gw1")]
    gateway_id: String,
    /// Share the tap subscription with the other gateways of this group ($share/GROUP/…): the
    /// broker splits the taps among them.
    #[arg(long = "share-group")]
    share_group: Option<String>,
    /// MQTT connections taking taps from an external broker, as one shared subscription
    /// (default 1). With the embedded broker the taps come over an in-process link instead.
    #[arg(long = "ingest-connections")]
    ingest_connections: Option<usize>,
    /// Do not relay the charging server's blocklists: for a gateway that only collects an
    /// operator's revenue (a hotel's pay-TV boxes on a metro's cards), whose validators take the
    /// card scheme's list from the scheme's topics (`card_scheme` in `tapgate validator`'s
    /// config).
    #[arg(long = "no-blocklist-relay")]
    no_blocklist_relay: bool,
    /// The HTTP API's configuration (TOML: http_listen, currency, currency_exponent, [tls],
    /// [[tokens]]); without it the API is not started.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// `--broker URL,…` (mqtt:// or mqtts://, one scheme for all) → the first broker, the others
/// (tried in turn), and the CA for TLS from `--broker-ca-file` (required with mqtts://, refused
/// without it).
#[allow(clippy::type_complexity)]
fn parse_brokers(
    urls: &str,
    ca_file: &Option<PathBuf>,
) -> Result<((String, u16), Vec<(String, u16)>, Option<Vec<u8>>)> {
    let mut all = Vec::new();
    let mut tls = None;
    for url in urls.split(',').map(str::trim) {
        let (host, port, t) = validator::config::parse_broker(url)
            .map_err(|e| input_err(format!("--broker: {e}")))?;
        if *tls.get_or_insert(t) != t {
            return Err(input_err(format!(
                "--broker {urls:?}: every broker must use one scheme (mqtt:// or mqtts://)"
            )));
        }
        all.push((host, port));
    }
    let ca = match (tls == Some(true), ca_file) {
        (true, Some(f)) => {
            Some(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?)
        }
        (true, None) => {
            return Err(input_err(
                "--broker mqtts://… needs --broker-ca-file (the CA its certificate chains to)",
            ))
        }
        (false, Some(_)) => {
            return Err(input_err(
                "--broker-ca-file is for mqtts:// brokers; --broker names mqtt:// ones",
            ))
        }
        (false, None) => None,
    };
    let first = all.remove(0);
    Ok((first, all, ca))
}

/// `--nats URL,…`: the cluster's client URLs, checked.
fn nats_ingest(
    urls: &Option<String>,
    replicas: usize,
    ca_file: &Option<PathBuf>,
) -> Result<Option<gateway::daemon::NatsIngest>> {
    let Some(urls) = urls else {
        return Ok(None);
    };
    let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).collect();
    for u in &urls {
        let rest = u
            .strip_prefix("nats://")
            .or_else(|| u.strip_prefix("tls://"))
            .ok_or_else(|| input_err(format!("--nats {u:?} must look like nats://host:port")))?;
        if rest
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(input_err(format!(
                "--nats {u:?} needs a port, e.g. nats://127.0.0.1:4222"
            )));
        }
    }
    if !(1..=5).contains(&replicas) {
        return Err(input_err("--nats-replicas must be 1 to 5"));
    }
    if let Some(f) = ca_file {
        std::fs::metadata(f).with_context(|| format!("reading {}", f.display()))?;
    }
    Ok(Some(gateway::daemon::NatsIngest {
        urls,
        replicas,
        ca_file: ca_file.clone(),
    }))
}

/// The embedded broker (no --broker): its devices from --mqtt-users plus the gateway's own
/// user, its TLS listener when asked; the address the gateway's MQTT connections use and the
/// in-process link the taps come over.
fn start_embedded(a: &GatewayArgs) -> Result<((String, u16), TapLink)> {
    let path = a.mqtt_users.as_ref().ok_or_else(|| {
        input_err("the embedded broker needs --mqtt-users FILE (`username password` lines)")
    })?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut users = BrokerUsers::parse_devices(&text)
        .map_err(|e| input_err(format!("{} {e}", path.display())))?;
    if users.contains(&a.mqtt_user) {
        return Err(input_err(format!(
            "{}: {:?} is the gateway's own MQTT user (--mqtt-user), not a device",
            path.display(),
            a.mqtt_user
        )));
    }
    users.add_gateway(&a.mqtt_user, &a.mqtt_password);
    let tls = match (
        a.embedded_tls_listen,
        &a.embedded_tls_cert,
        &a.embedded_tls_key,
    ) {
        (Some(l), Some(c), Some(k)) => {
            for f in [c, k] {
                std::fs::metadata(f).with_context(|| format!("reading {}", f.display()))?;
            }
            Some((l, c.display().to_string(), k.display().to_string()))
        }
        _ => None,
    };
    if let Some((l, _, _)) = &tls {
        println!("embedded MQTT broker TLS listener on {l}");
    }
    let (_, l) = start_embedded_broker_linked(a.embedded_listen, users, tls, &a.operator)
        .map_err(|e| anyhow::anyhow!("starting the embedded MQTT broker: {e}"))?;
    println!("embedded MQTT broker on {}", a.embedded_listen);
    Ok((
        (a.embedded_listen.ip().to_string(), a.embedded_listen.port()),
        l,
    ))
}

/// Runs `tapgate gateway`.
pub fn run_cmd(a: GatewayArgs) -> Result<()> {
    let keys = load_keyset(&a.keys, a.passphrase_file.as_deref())?.for_role(Role::Gateway, 0)?;
    // Every configuration error before anything starts.
    let api = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let c: gateway::config::ApiConfig = toml::from_str(&text)
                .map_err(|e| input_err(format!("config {}: {e}", path.display())))?;
            c.check_pages()
                .map_err(|e| input_err(format!("config {}: {e}", path.display())))?;
            let tables = fare_tables(&c.fare_tables)?;
            let currency = report_currency(&c, &tables)?;
            Some((c, tables, currency))
        }
        None => None,
    };
    let charging = match (&a.charging, &a.charging_token) {
        (Some(url), Some(token)) => Some((url.trim_end_matches('/').to_string(), token.clone())),
        (Some(_), None) => {
            return Err(input_err(
                "--charging needs --charging-token or $TAPGATE_GATEWAY_TOKEN",
            ))
        }
        (None, _) => None,
    };
    crate::data_dir::ensure_dir(&a.data, "--data")?;
    let mut link: Option<TapLink> = None;
    let mut fallback_brokers = Vec::new();
    let mut broker_tls_ca_pem = None;
    let broker = match &a.broker {
        Some(urls) => {
            let (first, others, ca) = parse_brokers(urls, &a.broker_ca_file)?;
            fallback_brokers = others;
            broker_tls_ca_pem = ca;
            first
        }
        None => {
            let (b, l) = start_embedded(&a)?;
            link = Some(l);
            b
        }
    };
    let store = Store::open(&a.data, a.store_map_size_bytes)
        .with_context(|| format!("opening {}", a.data.display()))?;
    let cfg = GatewayConfig {
        gateway_id: a.gateway_id,
        broker,
        broker_tls_ca_pem,
        mqtt_credentials: Some((a.mqtt_user, a.mqtt_password)),
        charging,
        operator: a.operator,
        share_group: a.share_group,
        ingest_connections: a.ingest_connections.unwrap_or(1),
        relay_blocklists: !a.no_blocklist_relay,
        fallback_brokers,
        nats: nats_ingest(&a.nats, a.nats_replicas, &a.nats_ca_file)?,
        ..GatewayConfig::default()
    };
    match &cfg.nats {
        Some(n) => println!(
            "gateway {} ingesting from NATS JetStream {} (MQTT mqtt://{}:{})",
            cfg.gateway_id,
            n.urls.join(","),
            cfg.broker.0,
            cfg.broker.1
        ),
        None => println!(
            "gateway {} ingesting from mqtt://{}:{}",
            cfg.gateway_id, cfg.broker.0, cfg.broker.1
        ),
    }
    let store = match &api {
        Some((c, _, _)) => {
            store.with_limits(c.store_limits().map_err(|e| input_err(e.to_string()))?)
        }
        None => store,
    };
    let stats = Arc::new(GatewayStats::default());
    if let Some(l) = &link {
        let _ = stats.broker.set(l.broker_stats());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some((c, tables, currency)) = api {
        let listener = std::net::TcpListener::bind(c.http_listen)
            .with_context(|| format!("listening on {}", c.http_listen))?;
        let state = gateway::api::ApiState {
            store: store.clone(),
            keys: keys.clone(),
            stats: stats.clone(),
            auth: tapgate_http::auth::Auth::new(&c.tokens).map_err(input_err)?,
            currency,
            places: Arc::new(places(&tables)),
            metrics_public: c.metrics_public,
            operator: cfg.operator.clone(),
        };
        let console = gateway::console::router(state.clone(), &c.pages, c.tls.is_some())
            .map_err(input_err)?;
        if c.pages.enabled && !c.pages.operators.is_empty() {
            let scheme = if c.tls.is_some() { "https" } else { "http" };
            println!(
                "gateway console on {scheme}://{}/console",
                listener.local_addr()?
            );
        }
        rt.spawn(async move {
            if let Err(e) = tapgate_http::serve::serve_router(
                "gateway-api",
                listener,
                c.tls.as_ref(),
                gateway::api::router(state).merge(console),
                std::future::pending(),
            )
            .await
            {
                eprintln!("error: gateway API stopped: {e}");
            }
        });
    }
    rt.block_on(async move {
        let shutdown = crate::cli_util::shutdown_signal();
        match link {
            Some(link) => run_linked(cfg, link, store, keys, stats, shutdown)
                .await
                .map_err(|e| anyhow::anyhow!("gateway stopped: {e}")),
            None => {
                run(cfg, store, keys, stats, shutdown).await;
                Ok(())
            }
        }
    })
}

/// The fare tables the API config names (`fare_tables`).
fn fare_tables(paths: &[PathBuf]) -> Result<Vec<fare_rules::table::Table>> {
    paths
        .iter()
        .map(|path| {
            fare_rules::load_any(path)
                .map_err(|e| input_err(format!("fare_tables: {}: {e}", path.display())))
        })
        .collect()
}

/// The currency of the reports: the config's, else the fare tables' (they must agree), else
/// USD with 2 decimals.
fn report_currency(
    c: &gateway::config::ApiConfig,
    tables: &[fare_rules::table::Table],
) -> Result<(String, u32)> {
    let mut of_tables = tables
        .iter()
        .map(|t| (t.meta.currency.clone(), u32::from(t.meta.currency_exponent)));
    let first = of_tables.next();
    if c.currency.is_none() {
        if let Some(other) = of_tables.find(|x| Some(x) != first.as_ref()) {
            return Err(input_err(format!(
                "fare_tables are in {} and {}: set currency and currency_exponent for the reports",
                first.map(|f| f.0).unwrap_or_default(),
                other.0
            )));
        }
    }
    // Not set: the tables' currency, and the exponent of a table in that currency.
    let cur = c
        .currency
        .clone()
        .or(first.map(|f| f.0))
        .unwrap_or_else(|| "USD".into());
    let exp = c
        .currency_exponent
        .or_else(|| {
            tables
                .iter()
                .find(|t| t.meta.currency == cur)
                .map(|t| u32::from(t.meta.currency_exponent))
        })
        .unwrap_or(2);
    Ok((cur, exp))
}

/// The stop and route ids of the fare tables, by the codes tap records carry.
fn places(tables: &[fare_rules::table::Table]) -> gateway::report::Places {
    let mut p = gateway::report::Places::default();
    for t in tables {
        for s in &t.stops {
            p.stops.insert(s.code, s.id.clone());
        }
        for r in &t.routes {
            p.routes.insert(r.code, r.id.clone());
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::parse_brokers;

    #[test]
    fn brokers_parse_with_one_scheme_and_tls_needs_its_ca() {
        let ((h, p), rest, ca) =
            parse_brokers("mqtt://127.0.0.1:1884, mqtt://10.0.0.2:1885", &None).unwrap();
        assert_eq!(
            (h.as_str(), p, rest.len(), ca),
            ("127.0.0.1", 1884, 1, None)
        );
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        let (_, _, ca) =
            parse_brokers("mqtts://broker.internal:8883", &Some(ca_file.clone())).unwrap();
        assert_eq!(ca.as_deref(), Some(&b"-----BEGIN CERTIFICATE-----\n"[..]));
        for (urls, ca, says) in [
            ("mqtts://b:8883", None, "needs --broker-ca-file"),
            ("mqtt://b:1883", Some(ca_file.clone()), "is for mqtts://"),
            (
                "mqtt://a:1883,mqtts://b:8883",
                Some(ca_file.clone()),
                "one scheme",
            ),
            ("tcp://b:1883", None, "must look like"),
            ("mqtt://b", None, "needs a port"),
            (
                "mqtts://b:8883",
                Some(dir.path().join("absent.pem")),
                "absent.pem",
            ),
        ] {
            let e = format!("{:#}", parse_brokers(urls, &ca).unwrap_err());
            assert!(e.contains(says), "{urls}: {e}");
        }
    }
}
