//! The charging daemon: configuration, wiring, and the HTTP(S) listener.

use crate::api::{self, AppState, Auth, TokenEntry};
use crate::funding::{FundingSource, PointsProgram, SandboxProcessor};
use crate::ledger::Ledger;
use crate::load::{LoadConfig, LoadService};
use purse::sam::Hsm;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A `[[points]]` program.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointsConfig {
    /// Program name (the funding source name).
    pub name: String,
    /// One point is worth `minor_per_point_num / minor_per_point_den` minor units.
    pub minor_per_point_num: i64,
    /// See `minor_per_point_num`.
    pub minor_per_point_den: i64,
    /// Partner token names (role `partner`) that may credit points (`POST /v1/partner/points`);
    /// none by default.
    #[serde(default)]
    pub partners: Vec<String>,
}

/// The `[tls]` table: PEM certificate chain and key.
pub type TlsConfig = tapgate_http::serve::TlsFiles;

/// The charging server's configuration file (TOML).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Data directory (ledger, sandbox processor).
    pub data_dir: PathBuf,
    /// LMDB map size for the ledger.
    #[serde(default = "default_map_size")]
    pub ledger_map_size_bytes: usize,
    /// TLS; plain HTTP when absent (loopback and tests only).
    pub tls: Option<TlsConfig>,
    /// `[limits]`: the load service's limits and the server's rate limit
    /// ([`LoadConfig`]; its `currency` is the top-level one).
    #[serde(default)]
    pub limits: LoadConfig,
    /// API tokens.
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
    /// Points and mileage programs.
    #[serde(default)]
    pub points: Vec<PointsConfig>,
    /// Partner shops that sell vouchers (signed requests).
    #[serde(default)]
    pub partners: Vec<crate::partner::PartnerConfig>,
    /// Franchise terminals that load offline under a ceiling.
    #[serde(default)]
    pub franchises: Vec<crate::franchise::FranchiseConfig>,
    /// The operator id this back office signs blocklists for.
    #[serde(default = "default_operator")]
    pub operator: String,
    /// Which operators' revenue each gateway token (by its name) may book taps to, e.g.
    /// `[gateway_operators] hotel-gw = ["grand-hotel"]`. A gateway not listed books only to
    /// `operator`: a token cannot put fares on another operator's account.
    #[serde(default)]
    pub gateway_operators: std::collections::HashMap<String, Vec<String>>,
    /// Where the issuer keys live: the software HSM (default) or a PKCS#11 token.
    #[serde(default)]
    pub hsm: HsmConfig,
    /// Serve `/metrics` without a token (default: an operator or metrics token is needed).
    #[serde(default)]
    pub metrics_public: bool,
    /// The card scheme's currency (ISO 4217, default `KRW`): what the cards' minor units count.
    /// Merchants' payments and refunds in another currency are refused.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Where the ledger lives: LMDB in `data_dir` (default) or PostgreSQL (`[ledger]`).
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// The `[pages]` table: the cardholder pages served beside the API (docs/pages.md).
    #[serde(default)]
    pub pages: crate::pages::PagesConfig,
}

/// Which backend holds the ledger.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LedgerKind {
    /// LMDB in `data_dir/ledger` (the embedded default: the demo, a single box).
    #[default]
    Lmdb,
    /// PostgreSQL at `url` (docs/postgres.md); `tapgate charging migrate` prepares its schema.
    Postgres,
}

/// The `[ledger]` table. The database password is never in the configuration: only the file
/// or environment variable it is read from (and it is never logged).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// `lmdb` (default) or `postgres`.
    #[serde(default)]
    pub kind: LedgerKind,
    /// `postgres://user@host:port/db` (kind `postgres`).
    pub url: Option<String>,
    /// A file holding the database password (its first line; the file the owner's alone:
    /// docs/operations.md, "Secrets").
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the database password.
    pub password_env: Option<String>,
    /// Most connections to the database (default 16).
    pub max_connections: Option<usize>,
    /// The CA certificates (PEM) that sign the database server's certificate: connections are
    /// then TLS, the certificate checked against them and the URL's host. Without it, plain
    /// TCP (loopback or a private network only).
    pub ca_file: Option<PathBuf>,
}

impl LedgerConfig {
    /// Refuses a table that cannot work (before anything starts): a `url` or password for
    /// LMDB, a PostgreSQL ledger without a usable `url` or with a password source that is
    /// missing.
    pub fn check(&self) -> Result<(), ServerError> {
        match self.kind {
            LedgerKind::Lmdb => {
                if self.url.is_some()
                    || self.password_file.is_some()
                    || self.password_env.is_some()
                    || self.ca_file.is_some()
                {
                    return Err(ServerError::Config(
                        "[ledger] url and password are for kind = \"postgres\" (the default kind is lmdb)"
                            .into(),
                    ));
                }
                Ok(())
            }
            LedgerKind::Postgres => self.postgres().map(|_| ()),
        }
    }

    /// The PostgreSQL connection this table names, its password read from the file or the
    /// environment (kind `postgres` only).
    pub fn postgres(&self) -> Result<crate::ledger::PgConfig, ServerError> {
        let url = self.url.as_deref().ok_or_else(|| {
            ServerError::Config(
                "[ledger] kind = \"postgres\" needs url = \"postgres://user@host:port/db\"".into(),
            )
        })?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ServerError::Config(format!(
                "[ledger] url {:?} is not a postgres:// URL",
                crate::ledger::postgres::redact_url(url)
            )));
        }
        let source =
            tapgate_secrets::Source::one_of(self.password_file.clone(), self.password_env.clone())
                .map_err(|_| {
                    ServerError::Config(
                        "[ledger] names both password_file and password_env: give one".into(),
                    )
                })?;
        let password = match source {
            Some(source) => Some(source.read().map_err(|e| {
                let key = match source {
                    tapgate_secrets::Source::File(_) => "password_file",
                    tapgate_secrets::Source::Env(_) => "password_env",
                };
                ServerError::Config(format!("[ledger] {key}: {e}"))
            })?),
            None => None,
        };
        let mut c = crate::ledger::PgConfig::new(url, None);
        c.password = password;
        if let Some(ca) = &self.ca_file {
            if !ca.is_file() {
                return Err(ServerError::Config(format!(
                    "[ledger] ca_file {}: no such file",
                    ca.display()
                )));
            }
            c.ca_file = Some(ca.clone());
        }
        if let Some(n) = self.max_connections {
            if n == 0 {
                return Err(ServerError::Config(
                    "[ledger] max_connections must be at least 1".into(),
                ));
            }
            c.max_connections = n;
        }
        Ok(c)
    }
}

/// Opens the ledger `cfg` names: LMDB in its data directory, or PostgreSQL (whose schema must
/// be the one this build knows: `tapgate charging migrate` applies it).
pub fn open_ledger(cfg: &ServerConfig) -> Result<Ledger, ServerError> {
    cfg.ledger.check()?;
    match cfg.ledger.kind {
        LedgerKind::Lmdb => Ok(Ledger::open(
            &cfg.data_dir.join("ledger"),
            cfg.ledger_map_size_bytes,
        )?),
        LedgerKind::Postgres => Ok(Ledger::open_postgres(cfg.ledger.postgres()?)?),
    }
}

fn default_currency() -> String {
    crate::load::DEFAULT_CURRENCY.into()
}

/// Which HSM the server uses.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HsmKind {
    /// The sealed key set in process memory (`--keys`).
    #[default]
    Software,
    /// A PKCS#11 token holding the keys imported with `tapgate keys import-hsm`.
    Pkcs11,
}

/// The `[hsm]` table (docs/hsm.md). The PIN itself is never in the configuration: only the
/// file or environment variable it is read from.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// `software` (default) or `pkcs11`.
    #[serde(default)]
    pub kind: HsmKind,
    /// The PKCS#11 module path.
    pub module: Option<PathBuf>,
    /// The token's label.
    pub token_label: Option<String>,
    /// The token's slot id (instead of the label).
    pub slot: Option<u64>,
    /// A file holding the user PIN (its first line; the file the owner's alone:
    /// docs/operations.md, "Secrets").
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// Label prefix of tapgate's objects (default `tapgate`).
    pub prefix: Option<String>,
}

fn default_operator() -> String {
    "default".into()
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8443".parse().expect("literal")
}
fn default_map_size() -> usize {
    crate::ledger::DEFAULT_MAP_SIZE_BYTES
}

/// Daemon errors.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration problem.
    #[error("config: {0}")]
    Config(String),
    /// I/O on the listener or TLS files.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Ledger.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// Funding.
    #[error(transparent)]
    Funding(#[from] crate::funding::FundingError),
}

impl ServerConfig {
    /// Parses TOML, with errors that name the line and field.
    pub fn from_toml(text: &str) -> Result<ServerConfig, ServerError> {
        toml::from_str(text).map_err(|e| ServerError::Config(e.to_string()))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Builds the application state from the configuration and an HSM.
pub fn build(cfg: &ServerConfig, hsm: Box<dyn Hsm + Send>) -> Result<AppState, ServerError> {
    cfg.pages.check(&cfg.tokens).map_err(ServerError::Config)?;
    if !crate::load::valid_currency(&cfg.currency) {
        return Err(ServerError::Config(format!(
            "currency {:?} must be an ISO 4217 code (three capital letters, e.g. KRW)",
            cfg.currency
        )));
    }
    let ledger = open_ledger(cfg)?;
    let mut sources: Vec<Arc<dyn FundingSource>> = vec![Arc::new(SandboxProcessor::open(
        &cfg.data_dir.join("sandbox-processor"),
    )?)];
    for p in &cfg.points {
        if p.minor_per_point_num <= 0 || p.minor_per_point_den <= 0 {
            return Err(ServerError::Config(format!(
                "points program {:?}: the conversion rule must be positive",
                p.name
            )));
        }
        if !crate::funding::valid_instrument_id(&p.name) {
            return Err(ServerError::Config(format!(
                "points program {:?}: the name must be letters, digits, '-', '_' or '.'",
                p.name
            )));
        }
        sources.push(Arc::new(
            PointsProgram::new(
                &p.name,
                ledger.clone(),
                p.minor_per_point_num,
                p.minor_per_point_den,
            )
            .with_partners(p.partners.clone()),
        ));
    }
    let clock: Arc<dyn Fn() -> u64 + Send + Sync> = Arc::new(now_ms);
    sources.push(Arc::new(crate::partner::VoucherSource::new(
        ledger.clone(),
        clock.clone(),
    )));
    let l = &cfg.limits;
    for name in l.sources.keys() {
        if !sources.iter().any(|s| s.name() == name) {
            let known: Vec<&str> = sources.iter().map(|s| s.name()).collect();
            return Err(ServerError::Config(format!(
                "[limits.sources.{name}]: no funding source is called {name:?}; known: {}",
                known.join(", ")
            )));
        }
    }
    let loads = LoadService::new(
        ledger,
        hsm,
        sources,
        LoadConfig {
            currency: cfg.currency.clone(),
            ..l.clone()
        },
    );
    Ok(AppState {
        loads: Arc::new(loads),
        auth: Auth::new(&cfg.tokens).map_err(ServerError::Config)?,
        partners: crate::partner::Partners::new(&cfg.partners).map_err(ServerError::Config)?,
        franchises: Arc::new(
            cfg.franchises
                .iter()
                .map(|f| (f.name.clone(), f.clone()))
                .collect(),
        ),
        clock,
        metrics: prometheus::Registry::new(),
        clearing: Default::default(),
        operator: cfg.operator.clone(),
        gateway_operators: Arc::new(cfg.gateway_operators.clone()),
        metrics_public: cfg.metrics_public,
        relay_inline: relay_inline(cfg),
        blocklist_snapshot: Default::default(),
        rate: Arc::new(crate::api::RateLimiter::new(
            cfg.limits.loads_per_minute_per_client,
        )),
    })
}

/// Whether relay requests may run on the HTTP worker ([`AppState::relay_inline`]): only with
/// the LMDB ledger and the software HSM, whose calls never wait on a network.
fn relay_inline(cfg: &ServerConfig) -> bool {
    cfg.ledger.kind == LedgerKind::Lmdb && cfg.hsm.kind == HsmKind::Software
}

/// Binds `cfg.listen` and serves until `shutdown` resolves. Prints
/// `charging listening on <scheme>://<addr>` once bound.
pub async fn serve(
    cfg: &ServerConfig,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let listener = std::net::TcpListener::bind(cfg.listen)
        .map_err(|e| ServerError::Config(format!("cannot listen on {}: {e}", cfg.listen)))?;
    serve_on(listener, cfg, state, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0 and read the address first).
pub async fn serve_on(
    listener: std::net::TcpListener,
    cfg: &ServerConfig,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let pages = crate::pages::router(state.clone(), &cfg.pages, cfg.tls.is_some(), &cfg.currency)
        .map_err(ServerError::Config)?;
    let app = api::router(state.clone()).merge(pages);
    // Expire idle relay sessions and sweep counter gaps that never filled, in the background.
    let loads = state.loads.clone();
    let clock = state.clock.clone();
    let gap_timeout_ms = cfg.limits.counter_gap_timeout_ms;
    // Merchants' notifications are started from the same tick, a few at a time in their own
    // threads (an unreachable merchant holds one for at most the timeout).
    // No redirects, and only public addresses unless the operator allows private ones.
    let notifier = crate::notify::Notifier::new(crate::notify::agent(
        Duration::from_secs(10),
        cfg.limits.payments.notify_private_hosts,
    ));
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            loads.expire_sessions(clock());
            let now = clock();
            let ledger = loads.ledger().clone();
            let swept = tokio::task::spawn_blocking(move || {
                ledger.transact(move |t| t.sweep_gaps(now, gap_timeout_ms))
            })
            .await;
            match swept {
                Ok(Ok(s)) if !s.anomalies.is_empty() => tracing::warn!(
                    anomalies = s.anomalies.len(),
                    blocked = s.cards_blocked,
                    "counter gaps that never filled"
                ),
                Ok(Err(e)) => tracing::error!(%e, "gap sweep failed; retried at the next tick"),
                _ => {}
            }
            // Refunds not collected in time go back to their merchants.
            let (l, now) = (loads.clone(), clock());
            match tokio::task::spawn_blocking(move || l.expire_refunds(now, 256)).await {
                Ok(Ok(e)) if !e.is_empty() => {
                    tracing::info!(expired = e.len(), "uncollected refunds expired")
                }
                Ok(Err(e)) => tracing::error!(%e, "refund expiry failed; retried at the next tick"),
                _ => {}
            }
            // Action-list orders not picked up in time go back to their funding.
            let (l, now) = (loads.clone(), clock());
            let expired =
                tokio::task::spawn_blocking(move || l.expire_orders(l.order_limits(), now, 256));
            match expired.await {
                Ok(Ok(e)) if !e.is_empty() => {
                    tracing::info!(refunded = e.len(), "orders not picked up refunded")
                }
                Ok(Err(e)) => tracing::error!(%e, "order expiry failed; retried at the next tick"),
                _ => {}
            }
            // Started, not awaited: a slow merchant holds one of the notifier's slots, never
            // the tick.
            if let Err(e) = notifier.start_due(&loads, clock()) {
                tracing::error!(%e, "merchant notifications failed; retried at the next tick");
            }
        }
    });
    let result =
        tapgate_http::serve::serve_router("charging", listener, cfg.tls.as_ref(), app, shutdown)
            .await;
    reaper.abort();
    result.map_err(|e| match e {
        tapgate_http::serve::ServeError::Io(e) => ServerError::Io(e),
        other => ServerError::Config(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relay requests stay on the HTTP worker only when nothing they call can wait on a
    /// network: the LMDB ledger with the software HSM. A PKCS#11 token (perhaps a network HSM)
    /// or a PostgreSQL ledger sends them to a blocking thread.
    #[test]
    fn relay_requests_run_inline_only_with_lmdb_and_the_software_hsm() {
        let cfg = |extra: &str| {
            ServerConfig::from_toml(&format!("data_dir = \"/nonexistent\"\n{extra}")).unwrap()
        };
        assert!(relay_inline(&cfg("")));
        assert!(!relay_inline(&cfg(
            "[hsm]\nkind = \"pkcs11\"\nmodule = \"/x.so\"\n"
        )));
        assert!(!relay_inline(&cfg(
            "[ledger]\nkind = \"postgres\"\nurl = \"postgres://u@127.0.0.1:1/db\"\n"
        )));
    }

    /// The ledger password is read by the one rule for secrets (docs/operations.md,
    /// "Secrets"): the file's first line, the file the owner's alone; the key is named.
    #[test]
    fn the_ledger_password_file_is_read_by_the_rule_for_secrets() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ledger.pw");
        std::fs::write(&f, "db-secret\nsecond line\n").unwrap();
        let ledger = LedgerConfig {
            kind: LedgerKind::Postgres,
            url: Some("postgres://u@127.0.0.1:1/db".into()),
            password_file: Some(f.clone()),
            ..LedgerConfig::default()
        };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ledger.postgres().unwrap_err().to_string();
        assert!(e.contains("[ledger] password_file"), "{e}");
        assert!(e.contains(&format!("chmod 600 {}", f.display())), "{e}");
        assert!(!e.contains("db-secret"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pg = ledger.postgres().unwrap();
        assert_eq!(
            pg.password.as_deref().map(|p| p.as_str()),
            Some("db-secret")
        );
        let both = LedgerConfig {
            password_env: Some("TAPGATE_TEST_LEDGER_PW".into()),
            ..ledger
        };
        assert!(both
            .postgres()
            .unwrap_err()
            .to_string()
            .contains("give one"));
    }
}
