//! A signed list relayed from the back office to the operator's validators: the blocklist
//! ([`super::relay`]), the action list ([`super::actions`]) and the fare table
//! ([`super::fares`]) travel the same way. Each round
//! the changes after the version held are fetched (`GET /v1/<path>/signed/delta?after=<v>`,
//! the version in a response header) and, when validators would take them, published at QoS 1
//! on `tapgate/v1/<operator>/<topic>/delta`; the whole list (`…/signed/snapshot`) is published
//! retained on `…/<topic>/snapshot`, at most every 10 s after a change. The gateway cannot forge
//! or alter a list (it has no signing key); one validators would refuse is logged once per
//! version and not relayed. What differs between lists is a [`SignedList`].
//!
//! A list that may be too large for one message (the blocklist, [`SignedList::CHUNKED`]) is
//! fetched `…/signed/snapshot?chunked=1`; an answer in signed chunks is relayed chunk by chunk
//! as it is read, each retained on `…/<topic>/snapshot/<index>` ([`chunks`]).

use crate::store::Store;
use rumqttc::{AsyncClient, QoS};

mod chunks;
use std::time::{Duration, Instant};

/// Least time between two retained snapshots.
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);

/// A fetch from the charging server, run on the blocking pool: the outer error is the
/// blocking task's, the inner one the request's.
type Fetched<T> = Result<Result<Option<T>, String>, tokio::task::JoinError>;

/// What one kind of signed list relays differently.
pub(super) trait SignedList {
    /// The path segment under `/v1/`, the topic segment under `tapgate/v1/<operator>/`, and
    /// the `x-tapgate-<path>-version` response header that carries the list's version.
    const PATH: &'static str;
    /// The list's name in log lines ("blocklist") and as an adjective ("blocklist changes").
    const NAME: &'static str;
    const ADJECTIVE: &'static str = Self::NAME;
    /// The topic under `…/<PATH>/` changes are published on, and whether retained (a list
    /// whose change is the whole of it, a fare table, is one retained topic).
    const DELTA_TOPIC: &'static str = "delta";
    const DELTA_RETAINED: bool = false;
    /// The topic under `…/<PATH>/` the whole list is published on, retained.
    const SNAPSHOT_TOPIC: &'static str = "snapshot";
    /// Whether a snapshot validators would refuse is reported like a delta (logged and
    /// counted; the snapshot then needs its version header), or only left unrelayed.
    const REPORT_SNAPSHOT_REFUSAL: bool;

    /// The version last relayed, when the list keeps its own account of it (the blocklist's is
    /// in the gateway's stats); `None` leaves it to the relay ([`SignedListRelay::held`]).
    fn held(&self) -> Option<u64> {
        None
    }
    /// `Err(why)` when validators would refuse `bytes` as `want` says.
    fn check(&self, bytes: &[u8], want: &Wanted) -> Result<(), String>;
    /// A list was refused (called once per version).
    fn refused(&self) {}
    /// Version `v` was taken by the broker (the relay records it as held itself).
    fn published(&mut self, _v: u64) {}
    /// Records version `v` as relayed (run on the blocking pool).
    fn persist(store: &Store, v: u64);

    /// Whether the whole list is asked for in chunks (`?chunked=1`).
    const CHUNKED: bool = false;
    /// `Err(why)` when validators would refuse `bytes` as chunk `index` of `count` of the
    /// snapshot at `want.version`.
    fn check_chunk(
        &self,
        _bytes: &[u8],
        _want: &Wanted,
        _index: u32,
        _count: u32,
    ) -> Result<(), String> {
        Err(format!("{} snapshots do not come in chunks", Self::NAME))
    }
}

/// What validators want of a list: signed with this key, for this operator, and (when the
/// version is known) at this version.
pub(super) struct Wanted<'a> {
    /// The back office's signing keys, versioned (a list signed by a retired one is refused).
    pub(super) key: &'a purse::rotation::TrustedKeys,
    pub(super) operator: &'a str,
    pub(super) version: Option<u64>,
}

/// The relay of one signed list.
pub(super) struct SignedListRelay<L> {
    pub(super) client: AsyncClient,
    pub(super) operator: String,
    pub(super) store: Store,
    pub(super) verifying_key: purse::rotation::TrustedKeys,
    pub(super) agent: ureq::Agent,
    pub(super) base: String,
    pub(super) token: String,
    pub(super) list: L,
    /// The version last relayed, for a list that does not keep its own account
    /// ([`SignedList::held`]); set at start from the store where the version survives a restart.
    pub(super) held: u64,
    last_snapshot: Instant,
    snapshot_due: bool,
    /// The last version refused (logged once per version).
    refused_version: Option<u64>,
    /// Chunks of the last chunked snapshot published (their retained topics are cleared when
    /// a later snapshot has fewer), and whether the single-message snapshot topic has been
    /// cleared since.
    chunks_published: u32,
    single_cleared: bool,
    /// Most bytes a chunked snapshot may spool ([`chunks::MAX_SPOOL_BYTES`]; a test lowers it).
    spool_max_bytes: u64,
}

impl<L: SignedList> SignedListRelay<L> {
    pub(super) fn new(
        client: AsyncClient,
        operator: String,
        store: Store,
        verifying_key: purse::rotation::TrustedKeys,
        (base, token): (String, String),
        list: L,
    ) -> Self {
        SignedListRelay {
            client,
            operator,
            store,
            verifying_key,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
            base,
            token,
            list,
            held: 0,
            last_snapshot: Instant::now() - Duration::from_secs(60),
            snapshot_due: true,
            refused_version: None,
            chunks_published: 0,
            single_cleared: false,
            spool_max_bytes: chunks::MAX_SPOOL_BYTES,
        }
    }

    /// The relay of `list` for `cfg`'s gateway: `None` without a charging server or with
    /// relaying off.
    pub(super) fn for_config(
        client: AsyncClient,
        cfg: super::GatewayConfig,
        store: Store,
        verifying_key: purse::rotation::TrustedKeys,
        list: L,
    ) -> Option<Self> {
        let charging = cfg.charging.clone()?;
        cfg.relay_blocklists.then(|| {
            SignedListRelay::new(client, cfg.operator, store, verifying_key, charging, list)
        })
    }

    /// Relays round after round, `interval` apart, until the task is aborted.
    pub(super) async fn run(mut self, interval: Duration) {
        loop {
            self.round().await;
            tokio::time::sleep(interval).await;
        }
    }

    fn wanted(&self, version: Option<u64>) -> Wanted<'_> {
        Wanted {
            key: &self.verifying_key,
            operator: &self.operator,
            version,
        }
    }

    /// Publishes `bytes` on `tapgate/v1/<operator>/<topic>/<kind>`; whether the broker took it.
    async fn publish(&self, kind: &str, retain: bool, bytes: Vec<u8>) -> bool {
        let topic = format!("tapgate/v1/{}/{}/{kind}", self.operator, L::PATH);
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, bytes)
            .await
            .is_ok()
    }

    /// One round: the next changes, then the snapshot when one is due.
    pub(super) async fn round(&mut self) {
        self.relay_delta().await;
        if self.snapshot_due && self.last_snapshot.elapsed() >= SNAPSHOT_INTERVAL {
            self.relay_snapshot().await;
        }
    }

    /// GET `path` from the charging server on the blocking pool: `None` on 204, else the
    /// body and the version header (when there is one).
    async fn get(&self, path: String) -> Fetched<(Option<String>, Vec<u8>)> {
        let (a, b, t) = (self.agent.clone(), self.base.clone(), self.token.clone());
        let header = format!("x-tapgate-{}-version", L::PATH);
        tokio::task::spawn_blocking(move || {
            let r = a
                .get(&format!("{b}{path}"))
                .set("Authorization", &format!("Bearer {t}"))
                .call()
                .map_err(|e| e.to_string())?;
            if r.status() == 204 {
                return Ok(None);
            }
            let h = r.header(&header).map(str::to_string);
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes)
                .map_err(|e| e.to_string())?;
            Ok(Some((h, bytes)))
        })
        .await
    }

    /// The changes after the version held, with their version.
    async fn fetch_delta(&self) -> Fetched<(u64, Vec<u8>)> {
        let held = self.list.held().unwrap_or(self.held);
        let path = format!("/v1/{}/signed/delta?after={held}", L::PATH);
        self.get(path).await.map(|r| {
            r.and_then(|o| {
                o.map(|(h, bytes)| {
                    let v: u64 = h.and_then(|v| v.parse().ok()).ok_or("no version header")?;
                    Ok((v, bytes))
                })
                .transpose()
            })
        })
    }

    /// Whether validators would take `bytes` as version `v`; a refusal is logged (once per
    /// version) and reported to the list.
    fn acceptable(&mut self, v: u64, bytes: &[u8]) -> bool {
        let Err(why) = self.list.check(bytes, &self.wanted(Some(v))) else {
            return true;
        };
        if self.refused_version != Some(v) {
            self.refused_version = Some(v);
            self.list.refused();
            tracing::error!(
                version = v,
                "{} from the charging server not relayed: validators would refuse it: {why}",
                L::NAME
            );
        }
        false
    }

    /// The next changes, if any and acceptable, published at QoS 1; the version is recorded
    /// (the list's own account, the store) once the broker took them.
    async fn relay_delta(&mut self) {
        let (v, delta) = match self.fetch_delta().await {
            Ok(Ok(Some((v, delta)))) => (v, delta),
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return tracing::warn!(%e, "fetching {} changes failed", L::ADJECTIVE),
            Err(e) => return tracing::error!(%e, "{} task failed", L::NAME),
        };
        if !self.acceptable(v, &delta) {
            return;
        }
        if self.publish(L::DELTA_TOPIC, L::DELTA_RETAINED, delta).await {
            self.held = v;
            self.list.published(v);
            let s = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || L::persist(&s, v)).await;
            self.snapshot_due = true;
        }
    }

    /// The whole list as a retained snapshot (when validators would take it).
    async fn relay_snapshot(&mut self) {
        self.last_snapshot = Instant::now();
        if L::CHUNKED {
            return self.relay_chunked_snapshot().await;
        }
        let path = format!("/v1/{}/signed/snapshot", L::PATH);
        let Ok(Ok(Some((h, bytes)))) = self.get(path).await else {
            return;
        };
        let v = h.and_then(|v| v.parse::<u64>().ok());
        let take = if L::REPORT_SNAPSHOT_REFUSAL {
            v.is_some_and(|v| self.acceptable(v, &bytes))
        } else {
            self.list.check(&bytes, &self.wanted(v)).is_ok()
        };
        if !take {
            return;
        }
        if self.publish(L::SNAPSHOT_TOPIC, true, bytes).await {
            self.snapshot_due = false;
        }
    }
}
