//! The gateway's operator console: pages on the API's listener, beside `/v1/…` (docs/pages.md).
//!
//! Operators sign in with a password (`[[pages.operators]]`, Argon2id) on the same sign-in
//! form, sessions, CSRF tokens and limits as the charging server's pages
//! ([`tapgate_http::pages`]). The pages read what the JSON API reads, through the same
//! functions: the devices ([`crate::api::devices_view`]: heartbeats, taps and gaps, the
//! quarantine's account) with the quarantined messages, the latest blocklist's propagation
//! (updating live: a small script polls `/console/propagation.json`; the page itself is
//! rendered on the server), and taps per hour as SVG bars (the `hour:` aggregates).

use crate::api::ApiState;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;
use tapgate_http::pages::chart::{chart, CHART_WIDTH};
use tapgate_http::pages::{blocking, HasSite, PageError, PageRole, PagesConfig, Site};

/// The console's templates (beside the shared `login.html`, `message.html`,
/// `console_chart.html`).
const TEMPLATES: [(&str, &str); 4] = [
    ("base.html", include_str!("templates/base.html")),
    ("devices.html", include_str!("templates/devices.html")),
    (
        "propagation.html",
        include_str!("templates/propagation.html"),
    ),
    ("traffic.html", include_str!("templates/traffic.html")),
];

/// Hours the taps-per-hour page shows (the latest with taps).
pub const HOURS_SHOWN: usize = 24;
/// Quarantined messages the devices page lists (the newest).
const QUARANTINE_SHOWN: usize = 100;
/// A validator clock further off than this is marked.
const SKEW_MARK_MS: i64 = crate::propagation::CLOCK_SKEW_WARN_MS;

#[derive(Clone)]
struct Console {
    api: ApiState,
    site: Arc<Site>,
}

impl HasSite for Console {
    fn site(&self) -> &Site {
        &self.site
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The console's routes, to merge into the API's router (none when `[pages] enabled = false`).
/// `tls`: the listener serves HTTPS (cookies are then Secure).
pub fn router(api: ApiState, cfg: &PagesConfig, tls: bool) -> Result<Router, String> {
    if !cfg.enabled {
        return Ok(Router::new());
    }
    if !cfg.cardholders.is_empty() {
        return Err("[[pages.cardholders]]: the gateway serves only the operator console".into());
    }
    // Its own cookie names: the charging server's pages may be on the same host.
    let site = Site::new(cfg, &TEMPLATES, tls, Arc::new(now_ms), |_| "/console")?
        .with_cookie_names("tg_gw_session", "tg_gw_signin");
    let console = Console {
        api,
        site: Arc::new(site),
    };
    Ok(Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(devices))
        .route("/console/propagation", get(propagation))
        .route("/console/propagation.json", get(propagation_json))
        .route("/console/traffic", get(traffic))
        .merge(tapgate_http::pages::sign_in_routes())
        .layer(axum::middleware::map_response(
            tapgate_http::pages::security_headers,
        ))
        .with_state(console))
}

/// A time as the pages show it: `YYYY-MM-DD HH:MM:SS` UTC.
pub fn when(ms: u64) -> String {
    tapgate_http::show::utc(
        ms,
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"),
    )
}

/// A duration in words: `850 ms`, `12.4 s`, `3 min 5 s`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{}.{} s", ms / 1000, (ms % 1000) / 100),
        _ => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// A clock skew in words (positive: the validator is ahead).
fn skew(ms: i64) -> String {
    let words = duration(ms.unsigned_abs());
    match ms {
        0 => "0 ms".into(),
        m if m > 0 => format!("{words} ahead"),
        _ => format!("{words} behind"),
    }
}

/// Gap ranges as `3–7, 12`.
fn ranges(gaps: &[(u64, u64)]) -> String {
    gaps.iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}–{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn operator(c: &Console, headers: &HeaderMap) -> Result<tapgate_http::pages::Session, PageError> {
    c.site.signed_in_as(headers, PageRole::Operator)
}

fn store_err(e: crate::store::StoreError) -> PageError {
    PageError::Internal(e.to_string())
}

/// One row of the devices page from a `devices_view` entry.
fn device_row(d: &serde_json::Value) -> minijinja::Value {
    let u = |k: &str| d[k].as_u64();
    let id = u("device_id").unwrap_or(0);
    let dash = || "—".to_string();
    let heard = u("last_heartbeat_ms");
    let state = match (heard, d["online"].as_bool() == Some(true)) {
        (None, _) => "no heartbeat",
        (Some(_), true) => "online",
        (Some(_), false) => "offline",
    };
    let gaps: Vec<(u64, u64)> = serde_json::from_value(d["gaps"].clone()).unwrap_or_default();
    let q = &d["quarantine"];
    let quarantine = match q["messages"].as_u64() {
        Some(m) if m > 0 => format!(
            "{m} bad message{}, {} kept",
            if m == 1 { "" } else { "s" },
            q["entries"].as_u64().unwrap_or(0)
        ),
        _ => "—".into(),
    };
    let skew_ms = d["clock_skew_ms"].as_i64();
    minijinja::context! {
        id => if id == u64::MAX { "(no device in topic)".to_string() } else { id.to_string() },
        state => state,
        last_heartbeat => heard.map_or_else(dash, when),
        blocklist_version => u("blocklist_version").map_or_else(dash, |v| v.to_string()),
        fare_table_version => u("fare_table_version").map_or_else(dash, |v| v.to_string()),
        outbox_depth => u("outbox_depth").map_or_else(dash, |v| v.to_string()),
        clock_skew => skew_ms.map_or_else(dash, skew),
        skew_off => skew_ms.is_some_and(|s| s.abs() > SKEW_MARK_MS),
        taps => u("taps").unwrap_or(0),
        last_tap => match (u("taps"), u("last_seen_ms")) {
            (Some(t), Some(ms)) if t > 0 => when(ms),
            _ => dash(),
        },
        gap_count => gaps.iter().map(|(a, b)| b - a + 1).sum::<u64>(),
        gaps => ranges(&gaps),
        flagged => d["flagged"].as_bool() == Some(true),
        quarantine => quarantine,
    }
}

async fn devices(State(c): State<Console>, headers: HeaderMap) -> Response {
    let result = async {
        let s = operator(&c, &headers)?;
        let api = c.api.clone();
        let (list, quarantined, outbox) = blocking(move || {
            let list = crate::api::devices_view(&api).map_err(store_err)?;
            let mut q = api.store.quarantined(100_000).map_err(store_err)?;
            q.reverse();
            q.truncate(QUARANTINE_SHOWN);
            let outbox = api.store.outbox_len().map_err(store_err)?;
            Ok((list, q, outbox))
        })
        .await?;
        let rows: Vec<minijinja::Value> = list.iter().map(device_row).collect();
        let gaps: Vec<minijinja::Value> = list
            .iter()
            .filter_map(|d| {
                let g: Vec<(u64, u64)> = serde_json::from_value(d["gaps"].clone()).ok()?;
                (!g.is_empty()).then(|| {
                    minijinja::context! { id => d["device_id"].as_u64(), ranges => ranges(&g) }
                })
            })
            .collect();
        let online = list
            .iter()
            .filter(|d| d["online"].as_bool() == Some(true))
            .count();
        let quarantined: Vec<minijinja::Value> = quarantined
            .iter()
            .map(|q| {
                minijinja::context! {
                    when => when(q.received_ms), topic => q.topic, reason => q.reason,
                    records => q.records, bytes => q.payload_bytes,
                }
            })
            .collect();
        let latest = c.api.stats.propagation.lock().ok().and_then(|p| p.latest());
        Ok::<_, PageError>(c.site.render(
            "devices.html",
            minijinja::context! {
                operator => s.holder, csrf => s.csrf, serving => c.api.operator,
                devices => rows, online => online, gaps => gaps, quarantined => quarantined,
                gateway_outbox => outbox, latest_blocklist => latest,
            },
        ))
    }
    .await;
    result.unwrap_or_else(|e| c.site.error(e))
}

/// The latest published blocklist's propagation as the page and its script show it.
fn propagation_now(c: &Console) -> Option<serde_json::Value> {
    let p = c.api.stats.propagation.lock().ok()?;
    let r = p.report(p.latest()?)?;
    let mut shown = serde_json::Map::new();
    for v in p.statuses() {
        let id = v.device_id;
        shown.insert(
            format!("v{id}-state"),
            (if v.online { "online" } else { "offline" }).into(),
        );
        shown.insert(
            format!("v{id}-version"),
            v.blocklist_version.to_string().into(),
        );
        shown.insert(
            format!("v{id}-holds"),
            (if v.blocklist_version >= r.version {
                "yes"
            } else {
                "no"
            })
            .into(),
        );
    }
    drop(p);
    let reached = |ms: Option<u64>| match ms {
        Some(ms) => format!("reached after {}", duration(ms)),
        None => "not yet".to_string(),
    };
    let percent = match (r.holding * 100).checked_div(r.online_validators) {
        Some(p) => format!("{p}%"),
        None => "no validator online".to_string(),
    };
    for (k, v) in [
        ("version", r.version.to_string()),
        (
            "holding",
            format!("{} of {}", r.holding, r.online_validators),
        ),
        ("percent", percent),
        ("published", when(r.published_at_ms)),
        ("to_50", reached(r.ms_to_50)),
        ("to_99", reached(r.ms_to_99)),
        ("to_100", reached(r.ms_to_100)),
        ("as_of", when(now_ms())),
    ] {
        shown.insert(k.into(), v.into());
    }
    Some(serde_json::json!({
        "version": r.version,
        "published_at_ms": r.published_at_ms,
        "online_validators": r.online_validators,
        "holding": r.holding,
        "ms_to_50": r.ms_to_50,
        "ms_to_99": r.ms_to_99,
        "ms_to_100": r.ms_to_100,
        "max": r.online_validators.max(1),
        "shown": shown,
    }))
}

async fn propagation(State(c): State<Console>, headers: HeaderMap) -> Response {
    let result = (|| {
        let s = operator(&c, &headers)?;
        let p = propagation_now(&c);
        let latest = p.as_ref().and_then(|p| p["version"].as_u64());
        let validators: Vec<minijinja::Value> = c
            .api
            .stats
            .validator_statuses()
            .into_iter()
            .map(|v| {
                minijinja::context! {
                    id => v.device_id,
                    state => if v.online { "online" } else { "offline" },
                    version => v.blocklist_version,
                    holds => latest.is_some_and(|l| v.blocklist_version >= l),
                }
            })
            .collect();
        Ok::<_, PageError>(c.site.render(
            "propagation.html",
            minijinja::context! {
                operator => s.holder, csrf => s.csrf, p => p, validators => validators,
            },
        ))
    })();
    result.unwrap_or_else(|e| c.site.error(e))
}

/// `GET /console/propagation.json` (an operator's session): what the propagation page shows,
/// for its script to poll.
async fn propagation_json(State(c): State<Console>, headers: HeaderMap) -> Response {
    match operator(&c, &headers) {
        Ok(_) => match propagation_now(&c) {
            Some(v) => Json(v).into_response(),
            None => (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({"error": "no_version"})),
            )
                .into_response(),
        },
        Err(PageError::Forbidden(_)) => StatusCode::FORBIDDEN.into_response(),
        Err(_) => (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "unauthenticated"})),
        )
            .into_response(),
    }
}

async fn traffic(State(c): State<Console>, headers: HeaderMap) -> Response {
    let result = async {
        let s = operator(&c, &headers)?;
        let api = c.api.clone();
        let hours =
            blocking(move || api.store.aggregates("hour:", 1_000_000).map_err(store_err)).await?;
        let latest: Vec<_> = hours
            .iter()
            .skip(hours.len().saturating_sub(HOURS_SHOWN))
            .collect();
        let label = |k: &str| {
            let h = k.trim_start_matches("hour:");
            format!("{} {}:00", &h[..h.len().min(10)], &h[h.len().min(11)..])
        };
        let taps = chart(
            latest
                .iter()
                .map(|(k, a)| (label(k), a.taps as i64, a.taps.to_string()))
                .collect(),
        );
        let refused = chart(
            latest
                .iter()
                .filter(|(_, a)| a.refused > 0)
                .map(|(k, a)| (label(k), a.refused as i64, a.refused.to_string()))
                .collect(),
        );
        Ok::<_, PageError>(c.site.render(
            "traffic.html",
            minijinja::context! {
                operator => s.holder, csrf => s.csrf, serving => c.api.operator,
                taps => taps, refused => refused, width => CHART_WIDTH, hours => HOURS_SHOWN,
            },
        ))
    }
    .await;
    result.unwrap_or_else(|e| c.site.error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_renders() {
        let env = tapgate_http::pages::environment(&TEMPLATES);
        let row = device_row(&serde_json::json!({
            "device_id": 1001, "taps": 3, "highest_seq": 5, "gaps": [[2, 3]], "last_seen_ms": 1000,
            "clock_skew_ms": -400_000, "flagged": false, "quarantine": null, "online": true,
            "last_heartbeat_ms": 2000, "blocklist_version": 4, "fare_table_version": 1,
            "outbox_depth": 0,
        }));
        let html = env
            .get_template("devices.html")
            .unwrap()
            .render(minijinja::context! {
                operator => "ops", csrf => "c", serving => "metro", devices => vec![row],
                online => 1, gaps => Vec::<minijinja::Value>::new(),
                quarantined => Vec::<minijinja::Value>::new(), gateway_outbox => 0,
                latest_blocklist => Some(4),
            })
            .unwrap();
        assert!(html.contains("device-1001") && html.contains("6 min 40 s behind"));
        let html = env
            .get_template("propagation.html")
            .unwrap()
            .render(minijinja::context! {
                operator => "ops", csrf => "c", p => None::<serde_json::Value>,
                validators => Vec::<minijinja::Value>::new(),
            })
            .unwrap();
        assert!(html.contains("not published a blocklist"));
        let c = chart(vec![("2026-12-06 16:00".into(), 3, "3".into())]);
        let html = env
            .get_template("traffic.html")
            .unwrap()
            .render(minijinja::context! {
                operator => "ops", csrf => "c", serving => "metro", taps => &c, refused => chart(Vec::new()),
                width => CHART_WIDTH, hours => HOURS_SHOWN,
            })
            .unwrap();
        assert!(html.contains("<svg") && html.contains("metro"));
    }

    #[test]
    fn times_durations_and_gaps_in_words() {
        assert_eq!(when(0), "1970-01-01 00:00:00");
        assert_eq!(crate::store::hour_of(3_600_000 * 25 + 5), "1970-01-02T01");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_400), "12.4 s");
        assert_eq!(duration(185_000), "3 min 5 s");
        assert_eq!(skew(2_000), "2.0 s ahead");
        assert_eq!(ranges(&[(3, 7), (12, 12)]), "3–7, 12");
    }
}
