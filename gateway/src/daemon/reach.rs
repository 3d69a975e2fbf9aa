//! Reporting block propagation to the back office: every second, the figures of the blocklist
//! versions this gateway published (how many of its online validators hold each, and how long
//! until 50, 99 and 100 % did: [`crate::propagation`]) that changed since they were last sent go
//! to the charging server, `POST /v1/blocklist/propagation` with the gateway's token. The
//! charging server keeps them per gateway and shows a card's block reaching the validators on
//! the cardholder's page and its console. A figure not taken (the server unreachable) is sent
//! again at the next round.

use super::{GatewayConfig, GatewayStats};
use crate::propagation::Report;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Time between two rounds.
const INTERVAL: Duration = Duration::from_secs(1);
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
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build();
        let mut sent: BTreeMap<u64, Report> = BTreeMap::new();
        // Logged once per spell of failures, not every second.
        let mut failing = false;
        loop {
            tokio::time::sleep(INTERVAL).await;
            let changed = changed_figures(&stats, &mut sent);
            if changed.is_empty() {
                continue;
            }
            let (a, url, t) = (
                agent.clone(),
                format!("{base}/v1/blocklist/propagation"),
                token.clone(),
            );
            let body = serde_json::json!({ "figures": changed });
            let posted = tokio::task::spawn_blocking(move || {
                a.post(&url)
                    .set("Authorization", &format!("Bearer {t}"))
                    .send_json(body)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await;
            match posted {
                Ok(Ok(())) => {
                    failing = false;
                    for f in changed {
                        sent.insert(f.version, f);
                    }
                }
                Ok(Err(e)) if !failing => {
                    failing = true;
                    tracing::warn!(%e, "reporting block propagation to the charging server failed (retried every second)");
                }
                Ok(Err(_)) => {}
                Err(e) => tracing::error!(%e, "block propagation task failed"),
            }
        }
    })
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
