//! The blocklist relay: signed deltas and snapshots from the back office, relayed to the
//! operator's validators (the gateway cannot forge them: it has no signing key). Deltas at
//! QoS 1; the snapshot retained, refreshed at most every 10 s, for validators that are behind
//! or new. A list every validator would refuse (another operator's, or not signed by the back
//! office this gateway knows) is a configuration error: it is logged once per version, counted
//! ([`GatewayStats::blocklists_refused`]) and not relayed. The relaying itself is
//! [`SignedListRelay`]'s; a list beyond one chunk (65,536 cards) is relayed in signed chunks,
//! each retained on `…/blocklist/snapshot/<index>` (issue 22, `signed_list::chunks`).

use super::signed_list::{SignedList, SignedListRelay, Wanted};
use super::{now_ms, GatewayConfig, GatewayStats};
use crate::store::Store;
use purse::blocklist::chunked::SnapshotChunk;
use purse::blocklist::ListUpdate;
use purse::rotation::SignedMessage;
use rumqttc::AsyncClient;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often the charging server is asked for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Starts the relay (it ends at once when no charging server is configured or relaying is
/// off). The version last relayed is read back from the store first.
pub(super) fn spawn(
    client: AsyncClient,
    cfg: GatewayConfig,
    store: Store,
    verifying_key: purse::rotation::TrustedKeys,
    stats: Arc<GatewayStats>,
) -> JoinHandle<()> {
    if let Ok(v) = store.blocklist_version() {
        stats.blocklist_version.store(v, Ordering::Relaxed);
    }
    let relay = SignedListRelay::for_config(client, cfg, store, verifying_key, Blocklist(stats));
    tokio::spawn(async move {
        if let Some(r) = relay {
            r.run(POLL_INTERVAL).await;
        }
    })
}

/// The blocklist; the version held and the refusals are in the gateway's stats.
pub(super) struct Blocklist(pub(super) Arc<GatewayStats>);

impl SignedList for Blocklist {
    const PATH: &'static str = "blocklist";
    const NAME: &'static str = "blocklist";
    const REPORT_SNAPSHOT_REFUSAL: bool = false;

    fn held(&self) -> Option<u64> {
        Some(self.0.blocklist_version.load(Ordering::Relaxed))
    }

    /// This operator's list, signed by the back office (the version is not checked).
    fn check(&self, bytes: &[u8], want: &Wanted) -> Result<(), String> {
        let (key, operator) = (want.key, want.operator);
        match ListUpdate::verify_trusted(bytes, key).map(|(u, _)| u) {
            Ok(u) if u.operator == operator => Ok(()),
            Ok(u) => Err(format!(
                "it is operator {:?}'s list; this gateway serves {:?} (set operator in the charging server's config)",
                u.operator, operator
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    fn refused(&self) {
        self.0.blocklists_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A list beyond one chunk comes, and is relayed, in signed chunks (issue 22).
    const CHUNKED: bool = true;

    /// One chunk of this operator's snapshot at `want.version`, signed by the back office
    /// under a key version not retired, in the place the answer gave it.
    fn check_chunk(
        &self,
        bytes: &[u8],
        want: &Wanted,
        index: u32,
        count: u32,
    ) -> Result<(), String> {
        let (c, _) = SnapshotChunk::verify_trusted(bytes, want.key).map_err(|e| e.to_string())?;
        if c.operator != want.operator {
            return Err(format!(
                "it is operator {:?}'s list; this gateway serves {:?} (set operator in the charging server's config)",
                c.operator, want.operator
            ));
        }
        if Some(c.version) != want.version || (c.index, c.count) != (index, count) {
            return Err(format!(
                "chunk {}/{} of version {} where chunk {index}/{count} of {:?} was announced",
                c.index, c.count, c.version, want.version
            ));
        }
        Ok(())
    }

    /// The version in the stats and the propagation tracker.
    fn published(&mut self, v: u64) {
        self.0.blocklist_version.store(v, Ordering::Relaxed);
        if let Ok(mut pr) = self.0.propagation.lock() {
            pr.published(v, now_ms());
        }
    }

    fn persist(store: &Store, v: u64) {
        let _ = store.set_blocklist_version(v);
    }
}
