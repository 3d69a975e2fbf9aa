//! The validator's configuration file (TOML) and what it decides at start-up: the gate's
//! placement and sale, the MQTT and daemon settings, the emulated crowd, and which fare table
//! the gate starts with.
//!
//! ```toml
//! device_id = 1001
//! operator = "metro"
//! stop = "Central"                 # the stop and route ids in the fare table
//! route = "M1"
//! kind = "in"                      # in, out, entry, or charge (a pay-TV box: see [sale])
//! utc_offset_minutes = 540
//! journal = "data/validator-1001"
//! outbox_capacity_taps = 1000000
//! keys = "keys"                    # issuer key dir, or `tapgate keys provision --role validator`
//! fare_table = "metro.tgft"        # optional; later tables arrive over MQTT
//! heartbeat_s = 30
//! [mqtt]                           # optional: without it the validator works offline
//! broker = "mqtt://127.0.0.1:18830"
//! # fallback_brokers = ["mqtt://10.0.0.2:1883", "mqtt://10.0.0.3:1883"]  # a cluster's other nodes
//! password_env = "TAPGATE_MQTT_PASSWORD"
//! [metrics]
//! listen = "127.0.0.1:9101"
//! [crowd]                          # the emulated reader (tests, demo, load)
//! cards = 50
//! taps = 200
//! # reader = "pcsc"                # or a PC/SC reader (build with the `pcsc` feature)
//! # reader_name = "ACS ACR1252"    # part of the reader's name (default: any reader)
//! # [sale]                         # kind = "charge": what every presentation buys
//! # charge = "movie"               # a charge id of the fare table
//! # items = 1
//! # minutes = 0
//! ```
//!
//! Nothing here reads the key set or opens the journal: the daemon's caller does, and hands
//! the results in.

use crate::daemon::{self, Downlink, MqttSettings, Settings};
use crate::gate::{Gate, Placement, Sale, Step};
use crate::journal::Journal;
use crate::reader::CrowdConfig;
use fare_rules::record::TapKind;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file `signing_pub` defaults to, beside the keys.
pub const SIGNING_PUB_FILE: &str = "signing.pub";
/// The environment variable holding the MQTT password unless `password_env` names another.
pub const DEFAULT_PASSWORD_ENV: &str = "TAPGATE_MQTT_PASSWORD";
/// The journal's LMDB map size.
pub const JOURNAL_MAP_BYTES: usize = 1 << 30;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML for this schema.
    #[error("{0}")]
    Parse(String),
    /// A value is not acceptable (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// A file the configuration names cannot be read.
    #[error("reading {path}{hint}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What to do instead, if anything (` (or set signing_pub in the config)`).
        hint: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// No fare table: none configured and none in the journal.
    #[error("no fare table: set fare_table in the config (later ones arrive over MQTT)")]
    NoFareTable,
    /// The configured fare table does not verify and the journal holds none.
    #[error("{path}: {why}")]
    FareTable {
        /// The table's file.
        path: PathBuf,
        /// Why it was refused.
        why: String,
    },
    /// The journal could not be read back.
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
}

/// The validator's configuration file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Device id (its MQTT username, its SAM's device key).
    pub device_id: u32,
    /// The operator whose topics it publishes on and whose revenue its taps are.
    pub operator: String,
    /// The card scheme whose signed blocklist this validator holds (default: `operator`).
    #[serde(default)]
    pub card_scheme: Option<String>,
    /// Its stop id in the fare table.
    #[serde(default)]
    pub stop: String,
    /// Its route id in the fare table.
    #[serde(default)]
    pub route: String,
    /// `in`, `out`, `entry` or `charge`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Local time's offset from UTC.
    #[serde(default)]
    pub utc_offset_minutes: i32,
    /// The journal's directory.
    pub journal: PathBuf,
    /// The outbox's bound.
    #[serde(default = "default_capacity")]
    pub outbox_capacity_taps: u64,
    /// The key set (a directory or a file).
    pub keys: PathBuf,
    /// The back office's Ed25519 public key (hex); default: `signing.pub` beside the keys.
    pub signing_pub: Option<String>,
    /// A signed fare table to start with (later ones arrive over MQTT).
    pub fare_table: Option<PathBuf>,
    /// Seconds between heartbeats.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_s: u64,
    /// At shutdown, seconds to wait for the gateway to confirm what is journalled.
    #[serde(default = "default_drain")]
    pub drain_timeout_s: u64,
    /// The broker; without it the validator works offline.
    pub mqtt: Option<MqttConfig>,
    /// The metrics listener.
    pub metrics: Option<MetricsConfig>,
    /// The emulated crowd.
    pub crowd: Option<CrowdSection>,
    /// `crowd` (default) or `pcsc`.
    pub reader: Option<String>,
    /// With `reader = "pcsc"`: part of the reader's name (case-insensitive).
    pub reader_name: Option<String>,
    /// With `kind = "charge"`: what every presentation buys.
    pub sale: Option<SaleSection>,
}

/// `[sale]`: what every presentation at a charge gate buys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaleSection {
    /// A charge id of the fare table.
    pub charge: String,
    /// Items bought.
    #[serde(default)]
    pub items: u32,
    /// Minutes bought.
    #[serde(default)]
    pub minutes: u32,
}

/// `[mqtt]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub broker: String,
    /// The other nodes of a broker cluster (same scheme as `broker`): when the connection
    /// fails, the next one is tried, in turn (the session lives in the cluster).
    #[serde(default)]
    pub fallback_brokers: Vec<String>,
    /// Default: the device id.
    pub username: Option<String>,
    /// The environment variable holding the password (default TAPGATE_MQTT_PASSWORD).
    pub password_env: Option<String>,
    /// A file holding the password on its first line, the owner's alone (docs/operations.md,
    /// "Secrets"); wins over `password_env`.
    pub password_file: Option<PathBuf>,
    /// PEM CA file: connect over TLS.
    pub ca_file: Option<PathBuf>,
    /// Seconds to wait for a broker to accept a connection (TCP, TLS and its CONNACK) before
    /// trying the next broker (default 30, 1 to 300). A broker taking a whole fleet back after
    /// a restart answers its last CONNECTs late; a validator that gave up too early connects
    /// again, and its abandoned CONNECT then takes over the new session (docs/validator.md).
    pub connect_timeout_s: Option<u64>,
}

impl MqttConfig {
    /// The password, by tapgate's one rule for secrets (docs/operations.md, "Secrets"): from
    /// `password_file` when it is set (it wins over `password_env`), else from the variable
    /// `password_env` names; none when neither is set and [`DEFAULT_PASSWORD_ENV`] is unset.
    /// rumqttc keeps its own copy of the password for the connection, in clear.
    fn password(&self) -> Result<Option<String>, ConfigError> {
        let (source, key) = match (&self.password_file, &self.password_env) {
            (Some(f), _) => (tapgate_secrets::Source::File(f.clone()), "password_file"),
            (None, Some(v)) => (tapgate_secrets::Source::Env(v.clone()), "password_env"),
            (None, None) if std::env::var_os(DEFAULT_PASSWORD_ENV).is_none() => return Ok(None),
            (None, None) => (
                tapgate_secrets::Source::Env(DEFAULT_PASSWORD_ENV.into()),
                "password_env",
            ),
        };
        let password = source
            .read()
            .map_err(|e| ConfigError::Invalid(format!("[mqtt] {key}: {e}")))?;
        Ok(Some(password.as_str().to_owned()))
    }
}

/// The default of `[mqtt] connect_timeout_s`.
pub const DEFAULT_CONNECT_TIMEOUT_S: u64 = 30;

/// `[metrics]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address.
    pub listen: std::net::SocketAddr,
    /// TLS certificate (PEM), with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// TLS key (PEM), with `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// `[crowd]`: the emulated reader.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrowdSection {
    /// The issuer key set the emulated cards are personalised under (default: `keys`).
    pub issuer_keys: Option<PathBuf>,
    /// Cards in the crowd.
    #[serde(default = "default_cards")]
    pub cards: u32,
    /// Each card's balance when issued.
    #[serde(default = "default_balance")]
    pub balance_minor: i32,
    /// Taps in all (default: until shut down).
    pub taps: Option<u64>,
    /// Mean presentations per second (0: as fast as the gate takes them).
    #[serde(default)]
    pub rate_per_s: f64,
    /// Which cards come, in which order.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where the card images live between presentations.
    pub dir: Option<PathBuf>,
    /// Per mille of presentations torn during the commit.
    #[serde(default)]
    pub tear_per_mille: u32,
}

fn default_kind() -> String {
    "entry".into()
}
fn default_capacity() -> u64 {
    1_000_000
}
fn default_heartbeat() -> u64 {
    30
}
fn default_drain() -> u64 {
    10
}
fn default_cards() -> u32 {
    50
}
fn default_balance() -> i32 {
    50_000
}
fn default_seed() -> u64 {
    1
}

impl Config {
    /// Parses the file's text and checks the names that become MQTT topics.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.check_names()?;
        Ok(cfg)
    }

    fn check_names(&self) -> Result<(), ConfigError> {
        for (what, v) in [
            ("operator", Some(&self.operator)),
            ("card_scheme", self.card_scheme.as_ref()),
        ] {
            if let Some(v) = v {
                if v.is_empty() || v.contains(['/', '+', '#']) {
                    return Err(ConfigError::Invalid(format!(
                        "{what} {v:?} must be a non-empty name without '/', '+' or '#' (it is part of MQTT topics)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Sets the broker (a flag's override), keeping the rest of `[mqtt]`.
    pub fn set_broker(&mut self, broker: String) {
        match &mut self.mqtt {
            Some(m) => m.broker = broker,
            None => {
                self.mqtt = Some(MqttConfig {
                    broker,
                    fallback_brokers: Vec::new(),
                    username: None,
                    password_env: None,
                    password_file: None,
                    ca_file: None,
                    connect_timeout_s: None,
                })
            }
        }
    }

    /// The card scheme whose blocklist the gate holds.
    pub fn card_scheme(&self) -> &str {
        self.card_scheme.as_deref().unwrap_or(&self.operator)
    }

    /// Where the gate stands and what it does: its kind, and at a charge gate its sale.
    pub fn placement(&self) -> Result<Placement, ConfigError> {
        let kind = match self.kind.as_str() {
            "in" => TapKind::In,
            "out" => TapKind::Out,
            "entry" => TapKind::Entry,
            "charge" => TapKind::Charge,
            k => {
                return Err(ConfigError::Invalid(format!(
                    "kind {k:?} must be in, out, entry or charge"
                )))
            }
        };
        let sale = match (&self.sale, kind) {
            (Some(s), TapKind::Charge) => {
                if s.items == 0 && s.minutes == 0 {
                    return Err(ConfigError::Invalid(
                        "[sale] sells nothing: set items or minutes".into(),
                    ));
                }
                Some(Sale {
                    charge: s.charge.clone(),
                    items: s.items,
                    minutes: s.minutes,
                })
            }
            (None, TapKind::Charge) => {
                return Err(ConfigError::Invalid(
                    "kind \"charge\" needs a [sale] (charge, items or minutes)".into(),
                ))
            }
            (Some(_), _) => {
                return Err(ConfigError::Invalid(
                    "[sale] is for kind = \"charge\" only".into(),
                ))
            }
            (None, _) => None,
        };
        Ok(Placement {
            device_id: self.device_id,
            operator: self.operator.clone(),
            stop: self.stop.clone(),
            route: self.route.clone(),
            kind,
            utc_offset_s: self.utc_offset_minutes * 60,
            sale,
        })
    }

    /// The back office's public keys: `signing_pub`, or the `signing.pub` file beside the keys;
    /// one key in hex (version 1), or one `v<N> <hex>` line per version (` retired` after a
    /// retired one) as `tapgate keys provision` writes it during a rotation.
    pub fn signing_pub(&self) -> Result<purse::rotation::TrustedKeys, ConfigError> {
        let hex_text = match &self.signing_pub {
            Some(h) => h.clone(),
            None => {
                let path = if self.keys.is_dir() {
                    self.keys.join(SIGNING_PUB_FILE)
                } else {
                    self.keys.with_file_name(SIGNING_PUB_FILE)
                };
                std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path,
                    hint: " (or set signing_pub in the config)",
                    source,
                })?
            }
        };
        purse::rotation::TrustedKeys::parse(&hex_text).map_err(|e| {
            ConfigError::Invalid(format!(
                "signing_pub must be 64 hex digits, or `v<N> <64 hex digits>` lines: {e}"
            ))
        })
    }

    /// The MQTT settings (none: the validator works offline): broker, username (default: the
    /// device id), password from its file or environment variable, CA for `mqtts://`.
    pub fn mqtt_settings(&self) -> Result<Option<MqttSettings>, ConfigError> {
        let Some(m) = &self.mqtt else {
            return Ok(None);
        };
        let (host, port, tls) = parse_broker(&m.broker)?;
        let mut fallback = Vec::with_capacity(m.fallback_brokers.len());
        for url in &m.fallback_brokers {
            let (h, p, t) = parse_broker(url)?;
            if t != tls {
                return Err(ConfigError::Invalid(format!(
                    "fallback broker {url:?}: every broker must use the scheme of broker ({:?})",
                    m.broker
                )));
            }
            fallback.push((h, p));
        }
        let password = m.password()?;
        let tls_ca_pem = match (&m.ca_file, tls) {
            (Some(f), _) => Some(std::fs::read(f).map_err(|source| ConfigError::Read {
                path: f.clone(),
                hint: "",
                source,
            })?),
            (None, true) => {
                return Err(ConfigError::Invalid(
                    "mqtts:// needs ca_file in [mqtt]".into(),
                ))
            }
            (None, false) => None,
        };
        let connect_timeout_s = m.connect_timeout_s.unwrap_or(DEFAULT_CONNECT_TIMEOUT_S);
        if !(1..=300).contains(&connect_timeout_s) {
            return Err(ConfigError::Invalid(format!(
                "[mqtt] connect_timeout_s = {connect_timeout_s}: must be 1 to 300 seconds"
            )));
        }
        Ok(Some(MqttSettings {
            host,
            port,
            fallback,
            connect_timeout: std::time::Duration::from_secs(connect_timeout_s),
            username: Some(
                m.username
                    .clone()
                    .unwrap_or_else(|| self.device_id.to_string()),
            ),
            password,
            tls_ca_pem,
        }))
    }

    /// The daemon's settings.
    pub fn settings(
        &self,
        signing_pub: purse::rotation::TrustedKeys,
        crash_at: Option<(u64, Step)>,
    ) -> Result<Settings, ConfigError> {
        Ok(Settings {
            operator: self.operator.clone(),
            card_scheme: self.card_scheme().to_string(),
            device_id: self.device_id,
            heartbeat: Duration::from_secs(self.heartbeat_s.max(1)),
            signing_pub,
            mqtt: self.mqtt_settings()?,
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
            crash_at,
        })
    }

    /// The emulated crowd of `[crowd]`, if there is one.
    pub fn crowd(&self) -> Option<CrowdConfig> {
        self.crowd.as_ref().map(|c| CrowdConfig {
            cards: c.cards,
            balance_minor: c.balance_minor,
            taps: c.taps,
            rate_per_s: c.rate_per_s,
            seed: c.seed,
            dir: c.dir.clone(),
            tear_per_mille: c.tear_per_mille,
        })
    }
}

/// `mqtt://host:port` or `mqtts://host:port` → host, port, TLS.
pub fn parse_broker(url: &str) -> Result<(String, u16, bool), ConfigError> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else {
        return Err(ConfigError::Invalid(format!(
            "broker {url:?} must look like mqtt://host:port or mqtts://host:port"
        )));
    };
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
        ConfigError::Invalid(format!(
            "broker {url:?} needs a port, e.g. mqtt://127.0.0.1:1883"
        ))
    })?;
    let port = port
        .parse()
        .map_err(|_| ConfigError::Invalid(format!("broker {url:?}: {port:?} is not a port")))?;
    Ok((host.to_string(), port, tls))
}

/// The fare table the gate starts with: what the journal holds first (a newer table may have
/// arrived over MQTT), then the configured table (`configured`: its file and bytes) only if it
/// is newer still. A configured table that does not verify is an error only when the journal
/// gave none; no table at all is an error.
pub fn choose_fare_table(
    gate: &mut Gate,
    journal: &Journal,
    signing_pub: &(impl purse::rotation::SignerKeys + ?Sized),
    configured: Option<(&Path, &[u8])>,
) -> Result<(), ConfigError> {
    daemon::restore(gate, journal, signing_pub)?;
    if let Some((path, bytes)) = configured {
        if let Err(why) =
            daemon::apply_downlink(gate, journal, signing_pub, Downlink::FareTable, bytes)
        {
            if gate.engine.is_none() {
                return Err(ConfigError::FareTable {
                    path: path.to_path_buf(),
                    why,
                });
            }
        }
    }
    let Some(engine) = &gate.engine else {
        return Err(ConfigError::NoFareTable);
    };
    gate.placement.check(engine).map_err(ConfigError::Invalid)
}
