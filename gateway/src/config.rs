//! The gateway's HTTP API configuration file (`tapgate gateway --config`): the listener, the
//! currency of the reports, tokens, and the store's quarantine and fill bounds.
//!
//! ```toml
//! http_listen = "127.0.0.1:8444"
//! fare_tables = ["metro.tgft"]         # the TIDES export writes their GTFS stop and route ids
//! currency = "USD"                     # default: the fare tables' currency, else USD
//! currency_exponent = 2                # default: the fare tables', else 2
//! quarantine_max_per_device = 1000     # optional bounds; the defaults are StoreLimits's
//! [[tokens]]
//! name = "ops"
//! role = "operator"
//! sha256 = "…"
//! [[pages.operators]]                # who may sign in to the console (docs/pages.md)
//! name = "duty-officer"
//! password_argon2 = "$argon2id$v=19$m=19456,t=2,p=1$…"
//! ```

use crate::store::StoreLimits;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is not acceptable (the message names it).
    #[error("{0}")]
    Invalid(String),
}

/// The gateway's HTTP API configuration file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The API's listen address (default 127.0.0.1:8444).
    #[serde(default = "default_http_listen")]
    pub http_listen: std::net::SocketAddr,
    /// ISO 4217 currency of the amounts reported (default: the `fare_tables`' currency, else
    /// USD).
    pub currency: Option<String>,
    /// Its minor-unit exponent (default: the `fare_tables`', else 2).
    pub currency_exponent: Option<u32>,
    /// Fare tables (signed `.tgft`, TOML source or GTFS feed) whose stop and route ids the
    /// TIDES export writes for tap records' codes (a code none names is written as its number).
    #[serde(default)]
    pub fare_tables: Vec<std::path::PathBuf>,
    /// HTTPS; plain HTTP when absent.
    pub tls: Option<tapgate_http::serve::TlsFiles>,
    /// Bearer tokens (operators, metrics).
    #[serde(default)]
    pub tokens: Vec<tapgate_http::auth::TokenEntry>,
    /// Serve `/metrics` without a token (default: an operator or metrics token is needed).
    #[serde(default)]
    pub metrics_public: bool,
    /// Quarantine entries kept per device (oldest dropped beyond it; the device flagged).
    pub quarantine_max_per_device: Option<u64>,
    /// Quarantine bytes kept per device (likewise).
    pub quarantine_max_bytes_per_device: Option<u64>,
    /// Refused records examined per message before the rest of it is left unexamined.
    pub quarantine_max_bad_records_per_message: Option<u64>,
    /// A flagged device gets at most one quarantine entry per this many milliseconds.
    pub quarantine_flagged_interval_ms: Option<u64>,
    /// No quarantine writes once the store's map is this full (percent).
    pub quarantine_stop_at_fill_percent: Option<u64>,
    /// Batches refused (unacknowledged, unconfirmed) once the map is this full (percent).
    pub ingest_refuse_at_fill_percent: Option<u64>,
    /// A forwarded tap is kept this many milliseconds after clearing answered (a late resend
    /// is then still a duplicate), then trimmed (default 7 days).
    pub forwarded_retention_ms: Option<u64>,
    /// A `card-day:` aggregate is kept this many whole days after its day ends, then trimmed
    /// (default 7; 1 to 3,660: the open day is never trimmed).
    pub card_day_retention_days: Option<u64>,
    /// The operator console's sign-in (`[[pages.operators]]`) and limits, as the charging
    /// server's `[pages]`; the gateway has no cardholder pages.
    #[serde(default)]
    pub pages: tapgate_http::pages::PagesConfig,
}

impl ApiConfig {
    /// The console's logins: operators only (Argon2id, unique, not another role's token).
    pub fn check_pages(&self) -> Result<(), ConfigError> {
        if !self.pages.cardholders.is_empty() {
            return Err(ConfigError::Invalid(
                "[[pages.cardholders]]: the gateway serves only the operator console (cardholders sign in to the charging server)".into(),
            ));
        }
        self.pages.check(&self.tokens).map_err(ConfigError::Invalid)
    }

    /// The store's bounds: the defaults, with what the config sets.
    pub fn store_limits(&self) -> Result<StoreLimits, ConfigError> {
        let d = StoreLimits::default();
        // Each bound as set, else the default (a bound added to StoreLimits must be named here).
        macro_rules! set_or_default {
            ($($field:ident),*) => {
                StoreLimits { $($field: self.$field.unwrap_or(d.$field)),* }
            };
        }
        let l = set_or_default!(
            quarantine_max_per_device,
            quarantine_max_bytes_per_device,
            quarantine_max_bad_records_per_message,
            quarantine_flagged_interval_ms,
            quarantine_stop_at_fill_percent,
            ingest_refuse_at_fill_percent,
            forwarded_retention_ms,
            card_day_retention_days
        );
        if l.quarantine_max_per_device == 0 || l.quarantine_max_bad_records_per_message == 0 {
            return Err(ConfigError::Invalid(
                "quarantine_max_per_device and quarantine_max_bad_records_per_message must be at least 1".into(),
            ));
        }
        if l.quarantine_stop_at_fill_percent >= l.ingest_refuse_at_fill_percent
            || l.ingest_refuse_at_fill_percent > 99
        {
            return Err(ConfigError::Invalid(format!(
                "quarantine_stop_at_fill_percent ({}) must be below ingest_refuse_at_fill_percent ({}), which must be at most 99",
                l.quarantine_stop_at_fill_percent, l.ingest_refuse_at_fill_percent
            )));
        }
        if !(1..=MAX_CARD_DAY_RETENTION_DAYS).contains(&l.card_day_retention_days) {
            return Err(ConfigError::Invalid(format!(
                "card_day_retention_days ({}) must be a number of days from 1 to {MAX_CARD_DAY_RETENTION_DAYS} (the open day is always kept; the default is {})",
                l.card_day_retention_days, d.card_day_retention_days
            )));
        }
        Ok(l)
    }
}

/// The longest `card_day_retention_days` taken (ten years): more is a mistake, such as a
/// number of milliseconds copied from `forwarded_retention_ms`.
pub const MAX_CARD_DAY_RETENTION_DAYS: u64 = 3_660;

fn default_http_listen() -> std::net::SocketAddr {
    "127.0.0.1:8444".parse().expect("literal")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(set: serde_json::Value) -> Result<StoreLimits, ConfigError> {
        let c: ApiConfig = serde_json::from_value(set).expect("an API config");
        c.store_limits()
    }

    #[test]
    fn store_limits_take_what_is_set_and_the_defaults_for_the_rest() {
        assert_eq!(
            limits(serde_json::json!({})).unwrap(),
            StoreLimits::default()
        );
        let l = limits(serde_json::json!({
            "quarantine_max_bytes_per_device": 4096,
            "quarantine_flagged_interval_ms": 5,
            "ingest_refuse_at_fill_percent": 95,
        }))
        .unwrap();
        assert_eq!(
            l,
            StoreLimits {
                quarantine_max_bytes_per_device: 4096,
                quarantine_flagged_interval_ms: 5,
                ingest_refuse_at_fill_percent: 95,
                ..StoreLimits::default()
            }
        );
        let all = limits(serde_json::json!({
            "quarantine_max_per_device": 1,
            "quarantine_max_bytes_per_device": 2,
            "quarantine_max_bad_records_per_message": 3,
            "quarantine_flagged_interval_ms": 4,
            "quarantine_stop_at_fill_percent": 5,
            "ingest_refuse_at_fill_percent": 6,
            "forwarded_retention_ms": 7,
            "card_day_retention_days": 8,
        }))
        .unwrap();
        assert_eq!(
            all,
            StoreLimits {
                quarantine_max_per_device: 1,
                quarantine_max_bytes_per_device: 2,
                quarantine_max_bad_records_per_message: 3,
                quarantine_flagged_interval_ms: 4,
                quarantine_stop_at_fill_percent: 5,
                ingest_refuse_at_fill_percent: 6,
                forwarded_retention_ms: 7,
                card_day_retention_days: 8,
            }
        );
        assert!(limits(serde_json::json!({"quarantine_max_per_device": 0})).is_err());
        assert!(limits(serde_json::json!({"quarantine_stop_at_fill_percent": 90})).is_err());
    }

    #[test]
    fn card_day_retention_is_one_day_to_ten_years() {
        assert_eq!(StoreLimits::default().card_day_retention_days, 7);
        for ok in [1, 7, 35, MAX_CARD_DAY_RETENTION_DAYS] {
            let l = limits(serde_json::json!({ "card_day_retention_days": ok })).unwrap();
            assert_eq!(l.card_day_retention_days, ok);
        }
        for bad in [0, MAX_CARD_DAY_RETENTION_DAYS + 1, 604_800_000] {
            let e = limits(serde_json::json!({ "card_day_retention_days": bad }))
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("card_day_retention_days") && e.contains(&bad.to_string()),
                "{e}"
            );
        }
    }
}
