//! Reporting block propagation to the back office: every second, the figures of the blocklist
//! versions this gateway published (how many of its online validators hold each, and how long
//! until 50, 99 and 100 % did: [`crate::propagation`]) that changed since they were last sent go
//! to the charging server, `POST /v1/blocklist/propagation` with the gateway's token. The
//! charging server keeps them per gateway and shows a card's block reaching the validators on
//! the cardholder's page and its console. Figures not taken (the server unreachable, a 5xx, or
//! 401, 408, 429) are sent again, the wait doubling from 1 s up to 60 s while it lasts; figures
//! the server refuses for good (any other 4xx: sending them again would be refused again) are
//! logged once with the server's reason, counted (`tapgate_gateway_propagation_reports_dropped_total`)
//! and dropped: only a later change of them is sent.

use super::{GatewayConfig, GatewayStats};
use crate::propagation::Report;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Time between two rounds.
const INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait before figures not taken (the server unreachable or failing) are sent again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The newest versions measured every round; an older one only until all its validators held
/// it (or it is forgotten).
const NEWEST: usize = 8;

/// Starts the reporter (it ends at once without a charging server or with relaying off: a
/// gateway that relays no blocklist has nothing to report).
pub(super) fn spawn(cfg: &GatewayConfig, stats: Arc<GatewayStats>) -> JoinHandle<()> {
    let target = cfg.charging.clone().filter(|_| cfg.relay_blocklists);
    tokio::spawn(async move {
        let Some((base, token)) = target else {
            return;
        };
        let mut reporter = Reporter::new(base, token, stats);
        loop {
            let wait = reporter.round().await;
            tokio::time::sleep(wait).await;
        }
    })
}

/// What became of one POST of figures.
#[derive(Debug, PartialEq, Eq)]
enum Posted {
    /// The server took them.
    Taken,
    /// The server refused them for good (a 4xx other than 401, 408 and 429): sending the same
    /// figures again would be refused again. The status and the server's reason.
    Refused(u16, String),
    /// Not taken this time (the network, a 5xx, 401, 408, 429): sent again after a backoff.
    Failed(String),
}

/// The reporter's state between rounds.
struct Reporter {
    agent: ureq::Agent,
    url: String,
    token: String,
    stats: Arc<GatewayStats>,
    /// The figures last taken (or refused for good) per version.
    sent: BTreeMap<u64, Report>,
    /// The wait before the next round: [`INTERVAL`], doubled while posts fail.
    wait: Duration,
    /// Whether the failure was logged (once per spell of failures, not every round).
    failing: bool,
}

impl Reporter {
    fn new(base: String, token: String, stats: Arc<GatewayStats>) -> Reporter {
        Reporter {
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
            url: format!("{base}/v1/blocklist/propagation"),
            token,
            stats,
            sent: BTreeMap::new(),
            wait: INTERVAL,
            failing: false,
        }
    }

    /// One round: the changed figures posted, if any; returns the wait before the next.
    async fn round(&mut self) -> Duration {
        let changed = changed_figures(&self.stats, &mut self.sent);
        if changed.is_empty() {
            return self.wait;
        }
        let (a, url, t) = (self.agent.clone(), self.url.clone(), self.token.clone());
        let body = serde_json::json!({ "figures": changed });
        let posted = tokio::task::spawn_blocking(move || post(&a, &url, &t, body)).await;
        match posted {
            Ok(Posted::Taken) => {
                (self.failing, self.wait) = (false, INTERVAL);
                self.record(changed);
            }
            Ok(Posted::Refused(status, why)) => {
                (self.failing, self.wait) = (false, INTERVAL);
                self.stats
                    .propagation_reports_dropped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    status,
                    reason = %why,
                    versions = ?changed.iter().map(|f| f.version).collect::<Vec<_>>(),
                    "the charging server refused these block propagation figures; dropped, not sent again"
                );
                self.record(changed);
            }
            Ok(Posted::Failed(e)) => {
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(%e, "reporting block propagation to the charging server failed (sent again with backoff, up to every {} s)", MAX_BACKOFF.as_secs());
                }
                self.wait = (self.wait * 2).min(MAX_BACKOFF);
            }
            Err(e) => tracing::error!(%e, "block propagation task failed"),
        }
        self.wait
    }

    /// `figures` are done with: only a change makes them go again.
    fn record(&mut self, figures: Vec<Report>) {
        for f in figures {
            self.sent.insert(f.version, f);
        }
    }
}

/// POSTs `body` to `url` with `token` (blocking).
fn post(agent: &ureq::Agent, url: &str, token: &str, body: serde_json::Value) -> Posted {
    match agent
        .post(url)
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(body)
    {
        Ok(_) => Posted::Taken,
        Err(ureq::Error::Status(code, r))
            if (400..500).contains(&code) && ![401, 408, 429].contains(&code) =>
        {
            let why = r.into_string().unwrap_or_default();
            Posted::Refused(code, why.chars().take(500).collect())
        }
        Err(ureq::Error::Status(code, r)) => {
            let why = r.into_string().unwrap_or_default();
            Posted::Failed(format!(
                "the charging server answered {code}: {}",
                why.chars().take(500).collect::<String>()
            ))
        }
        Err(e) => Posted::Failed(e.to_string()),
    }
}

/// The figures that differ from what was `sent`: the newest [`NEWEST`] versions and those not
/// yet held by every validator; versions the tracker forgot are forgotten here too.
fn changed_figures(stats: &GatewayStats, sent: &mut BTreeMap<u64, Report>) -> Vec<Report> {
    let Ok(p) = stats.propagation.lock() else {
        return Vec::new();
    };
    let versions = p.versions();
    sent.retain(|v, _| versions.binary_search(v).is_ok());
    let newest = versions.len().saturating_sub(NEWEST);
    versions
        .iter()
        .enumerate()
        .filter(|&(i, v)| i >= newest || sent.get(v).is_none_or(|r| r.ms_to_100.is_none()))
        .filter_map(|(_, &v)| p.report(v))
        .filter(|r| sent.get(&r.version) != Some(r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A real HTTP server on loopback answering every POST with `status` (and a reason), and
    /// counting them: its base URL and the count.
    async fn answering(status: u16) -> (String, Arc<AtomicU64>) {
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/v1/blocklist/propagation",
            axum::routing::post(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let code = axum::http::StatusCode::from_u16(status).unwrap();
                    (
                        code,
                        "figures: version 1 is not one this gateway may report",
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (base, hits)
    }

    /// Stats with figures for version 1 to report.
    fn stats_with_figures() -> Arc<GatewayStats> {
        let stats = Arc::new(GatewayStats::default());
        let mut p = stats.propagation.lock().unwrap();
        p.heartbeat(1, 0, true, 0);
        p.published(1, 1_000);
        drop(p);
        stats
    }

    #[tokio::test]
    async fn figures_refused_with_400_are_dropped_once_not_sent_again() {
        let (base, hits) = answering(400).await;
        let stats = stats_with_figures();
        let mut r = Reporter::new(base, "tg_gw".into(), stats.clone());
        assert_eq!(r.round().await, INTERVAL);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(stats.propagation_reports_dropped.load(Ordering::Relaxed), 1);
        for _ in 0..3 {
            assert_eq!(r.round().await, INTERVAL, "no backoff for a refusal");
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "the refused figures are not resent"
        );
        // A change of the figures is new: it goes (and is refused and dropped in turn).
        stats
            .propagation
            .lock()
            .unwrap()
            .heartbeat(1, 1, true, 1_400);
        r.round().await;
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        assert_eq!(stats.propagation_reports_dropped.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn figures_not_taken_for_a_5xx_or_429_are_resent_with_backoff() {
        for status in [503, 429, 401] {
            let (base, hits) = answering(status).await;
            let stats = stats_with_figures();
            let mut r = Reporter::new(base, "tg_gw".into(), stats.clone());
            let mut got = Vec::new();
            for _ in 0..8 {
                got.push(r.round().await.as_secs());
            }
            assert_eq!(got, [2, 4, 8, 16, 32, 60, 60, 60], "status {status}");
            assert_eq!(
                hits.load(Ordering::SeqCst),
                8,
                "status {status}: resent each round"
            );
            assert_eq!(stats.propagation_reports_dropped.load(Ordering::Relaxed), 0);
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retried_with_backoff_and_a_success_resets_it() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let stats = stats_with_figures();
        let mut r = Reporter::new(format!("http://127.0.0.1:{port}"), "t".into(), stats);
        assert_eq!(r.round().await, 2 * INTERVAL);
        assert_eq!(r.round().await, 4 * INTERVAL);
        let (base, hits) = answering(200).await;
        r.url = format!("{base}/v1/blocklist/propagation");
        assert_eq!(r.round().await, INTERVAL);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(r.round().await, INTERVAL);
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "taken figures are not resent"
        );
    }

    #[test]
    fn only_changed_figures_are_sent_again() {
        let stats = GatewayStats::default();
        let mut sent = BTreeMap::new();
        {
            let mut p = stats.propagation.lock().unwrap();
            p.heartbeat(1, 0, true, 0);
            p.heartbeat(2, 0, true, 0);
            p.published(1, 1_000);
        }
        let first = changed_figures(&stats, &mut sent);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].version, first[0].holding), (1, 0));
        sent.insert(1, first[0].clone());
        assert!(changed_figures(&stats, &mut sent).is_empty(), "nothing new");
        stats
            .propagation
            .lock()
            .unwrap()
            .heartbeat(1, 1, true, 1_400);
        let second = changed_figures(&stats, &mut sent);
        assert_eq!(second.len(), 1);
        assert_eq!(
            (second[0].holding, second[0].ms_to_50, second[0].ms_to_100),
            (1, Some(400), None)
        );
    }
}
