//! A whole list fetched `?chunked=1` (issue 22). The charging server answers either the single
//! signed message (a list that fits one chunk; published retained on `…/<topic>/snapshot` as
//! before) or `application/x-tapgate-chunks`: the chunks, each preceded by its length (4 bytes,
//! big-endian), with the version and the chunk count in headers.
//!
//! All or nothing: the chunks are read one at a time on the blocking pool, spooled to an
//! unnamed temporary file in the gateway's data directory (the gateway never holds the whole
//! list in memory, nor in a tmpfs `/tmp`, which is memory again) and each checked as validators
//! would check it (signed by the back office under a key version not retired, this operator's,
//! this version, this index of this count). Only once every chunk of the answer is in and
//! checked are they published, retained on `…/<topic>/snapshot/<index>`, read back from the
//! spool one at a time. An answer with a chunk validators would refuse, a chunk beyond
//! [`MAX_CHUNK_BYTES`], chunks beyond [`MAX_SPOOL_BYTES`] in all, a chunk count of 0 or beyond
//! [`purse::blocklist::chunked::MAX_CHUNKS`], or one cut short, publishes nothing: the retained
//! set already in force stays whole. A refusal is logged once per version with its reason and
//! counted ([`SignedList::refused`]: the blocklist's `tapgate_gateway_blocklists_refused_total`).
//! The set in force stays whole unless the broker fails mid-publish (the new chunks published
//! so far then sit over the old set's); the snapshot is then still due, and the next round
//! fetches and publishes the whole set again.
//!
//! After the chunks, the retained chunks a previous, longer snapshot left beyond this one's
//! count are cleared (an empty retained message), and so, once, is the single-message topic,
//! so that a validator that connects later finds only this snapshot. A validator that connects
//! while the chunks go out gets the new chunks published so far and the older snapshot's beyond
//! them (retained): validators assemble one version at a time, so it ignores the older ones and
//! completes the new snapshot from the chunks still to come, which are all on their way.

use super::{SignedList, SignedListRelay};
use std::io::{Read, Seek, SeekFrom, Write};
use tokio::sync::mpsc;

/// The content type of a chunked answer.
const CHUNKS_TYPE: &str = "application/x-tapgate-chunks";
/// Most bytes one chunk may have (a header and the most UIDs a chunk may carry).
const MAX_CHUNK_BYTES: usize = 1_024 + 7 * purse::blocklist::chunked::MAX_CHUNK_ENTRIES;
/// Most bytes of chunks one answer may spool: 20,000,000 cards of 7 bytes and 1 KiB of header
/// and signature for each of the most chunks a snapshot may have (144.2 MB). Twice the
/// 10,000,000-card list the design sizes for, and more than a validator can hold (its 64 MiB
/// budget takes about 13 M cards at 4.8 bytes each, docs/benchmarks.md): an answer beyond it
/// is a hostile or broken one, refused before it fills the data directory's disk
/// (`MAX_CHUNKS` × [`MAX_CHUNK_BYTES`] would be 7.5 GB).
pub(super) const MAX_SPOOL_BYTES: u64 =
    7 * 20_000_000 + 1_024 * purse::blocklist::chunked::MAX_CHUNKS as u64;

/// What the reader hands to the relay.
enum Frame {
    /// A single-message answer: its version header (when there is one) and its bytes.
    Single(Option<u64>, Vec<u8>),
    /// A chunked answer: its version and chunk count; `count` [`Frame::Chunk`]s follow.
    Head { version: u64, count: u32 },
    /// The next chunk (also written to the spool).
    Chunk(Vec<u8>),
}

/// Why a chunked answer was not relayed.
#[derive(Debug)]
enum Failed {
    /// The request or the connection failed (retried at the next snapshot round).
    Fetch(String),
    /// Validators would refuse the answer at `version` (logged once per version, counted).
    Refused(u64, String),
}

/// The chunks of one answer, spooled to an unnamed temporary file as they are read.
struct Spool {
    file: std::fs::File,
    lens: Vec<u32>,
    /// Bytes spooled so far.
    bytes: u64,
}

impl Spool {
    /// An empty spool in `dir` (the gateway's data directory).
    fn new(dir: &std::path::Path) -> std::io::Result<Spool> {
        Ok(Spool {
            file: tempfile::tempfile_in(dir)?,
            lens: Vec::new(),
            bytes: 0,
        })
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.lens.push(bytes.len() as u32);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Back to the first chunk, for reading the chunks back in order.
    fn rewind(&mut self) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(0)).map(|_| ())
    }

    /// The next chunk, `len` bytes.
    fn read_next(&mut self, len: u32) -> std::io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; len as usize];
        self.file.read_exact(&mut bytes)?;
        Ok(bytes)
    }
}

impl<L: SignedList> SignedListRelay<L> {
    /// Fetches the whole list `?chunked=1` and relays it once all of it is in and checked.
    pub(super) async fn relay_chunked_snapshot(&mut self) {
        let (tx, mut rx) = mpsc::channel(2);
        let url = format!("{}/v1/{}/signed/snapshot?chunked=1", self.base, L::PATH);
        let (agent, token) = (self.agent.clone(), self.token.clone());
        let spool = (self.store.dir().to_path_buf(), self.spool_max_bytes);
        let reader = tokio::task::spawn_blocking(move || {
            read_frames::<L>(&agent, &url, &token, &tx, (&spool.0, spool.1))
        });
        let mut checked = None;
        match rx.recv().await {
            Some(Frame::Single(v, bytes)) => self.relay_single(v, bytes).await,
            Some(Frame::Head { version, count }) => {
                checked = self
                    .check_chunks(version, count, &mut rx)
                    .await
                    .map(|()| (version, count));
            }
            _ => {}
        }
        drop(rx);
        match reader.await {
            Ok(Ok(spool)) => {
                if let (Some((version, count)), Some(spool)) = (checked, spool) {
                    self.publish_chunks(version, count, spool).await;
                }
            }
            Ok(Err(Failed::Refused(version, why))) => self.refuse(version, None, &why),
            Ok(Err(Failed::Fetch(e))) => {
                tracing::warn!(%e, "fetching the {} snapshot failed", L::NAME)
            }
            Err(e) => tracing::error!(%e, "{} task failed", L::NAME),
        }
    }

    /// A single-message snapshot, as [`SignedListRelay::relay_snapshot`] relays one; the
    /// chunks of an earlier chunked snapshot are cleared.
    async fn relay_single(&mut self, v: Option<u64>, bytes: Vec<u8>) {
        if self.list.check(&bytes, &self.wanted(v)).is_err() {
            return;
        }
        if self.publish(L::SNAPSHOT_TOPIC, true, bytes).await {
            self.snapshot_due = false;
            self.single_cleared = false;
            self.clear_chunks_from(0).await;
        }
    }

    /// Checks the `count` chunks of the snapshot at `version` as they arrive: `None` (nothing
    /// to publish) at the first one validators would refuse (refused here) or when the
    /// answer stops short (the reader says why).
    async fn check_chunks(
        &mut self,
        version: u64,
        count: u32,
        rx: &mut mpsc::Receiver<Frame>,
    ) -> Option<()> {
        for i in 0..count {
            let Some(Frame::Chunk(bytes)) = rx.recv().await else {
                return None;
            };
            let checked = self
                .list
                .check_chunk(&bytes, &self.wanted(Some(version)), i, count);
            if let Err(why) = checked {
                self.refuse(version, Some(i), &why);
                return None;
            }
        }
        Some(())
    }

    /// A chunked snapshot at `version` not relayed because validators would refuse it: logged
    /// (once per version) with `why`, and counted.
    fn refuse(&mut self, version: u64, chunk: Option<u32>, why: &str) {
        if self.refused_version == Some(version) {
            return;
        }
        self.refused_version = Some(version);
        self.list.refused();
        tracing::error!(
            version,
            chunk,
            "{} snapshot from the charging server not relayed (none of its chunks published; the snapshot in force stays): validators would refuse it: {why}",
            L::NAME
        );
    }

    /// Publishes the `count` checked chunks of the snapshot at `version` from `spool`, then
    /// clears what an older snapshot left. Should the broker fail mid-publish, the chunks
    /// published so far stay over the old set's and the snapshot stays due: the next round
    /// publishes the whole set again (and the chunks published here are cleared should a later
    /// set be shorter).
    async fn publish_chunks(&mut self, version: u64, count: u32, mut spool: Spool) {
        if spool.lens.len() != count as usize || spool.rewind().is_err() {
            return;
        }
        for i in 0..count {
            let len = spool.lens[i as usize];
            let read = tokio::task::spawn_blocking(move || {
                let bytes = spool.read_next(len);
                (spool, bytes)
            })
            .await;
            let bytes = match read {
                Ok((s, Ok(bytes))) => {
                    spool = s;
                    bytes
                }
                Ok((_, Err(e))) => {
                    return tracing::error!(%e, "reading the spooled {} snapshot", L::NAME)
                }
                Err(e) => return tracing::error!(%e, "{} task failed", L::NAME),
            };
            let topic = format!("{}/{i}", L::SNAPSHOT_TOPIC);
            if !self.publish(&topic, true, bytes).await {
                self.chunks_published = self.chunks_published.max(i + 1);
                return tracing::warn!(
                    version,
                    chunk = i,
                    "publishing the {} snapshot's chunks failed; all of them again next round",
                    L::NAME
                );
            }
        }
        self.clear_chunks_from(count).await;
        self.chunks_published = count;
        if !self.single_cleared && self.publish(L::SNAPSHOT_TOPIC, true, Vec::new()).await {
            self.single_cleared = true;
        }
        self.snapshot_due = false;
        tracing::info!(
            version,
            chunks = count,
            "{} snapshot relayed in chunks",
            L::NAME
        );
    }

    /// Clears the retained chunks from `first` to the last one published.
    async fn clear_chunks_from(&mut self, first: u32) {
        for i in first..self.chunks_published {
            let topic = format!("{}/{i}", L::SNAPSHOT_TOPIC);
            let _ = self.publish(&topic, true, Vec::new()).await;
        }
        self.chunks_published = self.chunks_published.min(first);
    }
}

/// GETs `url` and hands the answer over frame by frame (a chunk at a time), spooling the chunks
/// of a chunked answer in `spool.0`, at most `spool.1` bytes of them: the spool once every
/// chunk is read (`None` for a single message, a 204, or when the relay stopped listening).
fn read_frames<L: SignedList>(
    agent: &ureq::Agent,
    url: &str,
    token: &str,
    tx: &mpsc::Sender<Frame>,
    (spool_dir, spool_max): (&std::path::Path, u64),
) -> Result<Option<Spool>, Failed> {
    let fetch = |e: &dyn std::fmt::Display| Failed::Fetch(e.to_string());
    let r = agent
        .get(url)
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| fetch(&e))?;
    if r.status() == 204 {
        return Ok(None);
    }
    let header = |what: &str| r.header(&format!("x-tapgate-{}-{what}", L::PATH));
    let version = header("version").and_then(|v| v.parse::<u64>().ok());
    if r.content_type() != CHUNKS_TYPE {
        let mut bytes = Vec::new();
        r.into_reader()
            .read_to_end(&mut bytes)
            .map_err(|e| fetch(&e))?;
        let _ = tx.blocking_send(Frame::Single(version, bytes));
        return Ok(None);
    }
    let version = version.ok_or_else(|| fetch(&"no version header"))?;
    let refused = |why: String| Failed::Refused(version, why);
    let count: u32 = header("chunks")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| refused("no chunk count header".into()))?;
    if count == 0 || count > purse::blocklist::chunked::MAX_CHUNKS {
        return Err(refused(format!("a chunk count of {count}")));
    }
    let mut spool = Spool::new(spool_dir).map_err(|e| fetch(&format!("a spool file: {e}")))?;
    if tx.blocking_send(Frame::Head { version, count }).is_err() {
        return Ok(None);
    }
    let mut rd = r.into_reader();
    for i in 0..count {
        let cut_short = |e: std::io::Error| fetch(&format!("chunk {i} of {count}: {e}"));
        let mut len = [0u8; 4];
        rd.read_exact(&mut len).map_err(cut_short)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_CHUNK_BYTES {
            return Err(refused(format!(
                "chunk {i} of {count} announces {len} bytes, more than a chunk may have ({MAX_CHUNK_BYTES})"
            )));
        }
        if spool.bytes + len as u64 > spool_max {
            return Err(refused(format!(
                "chunk {i} of {count} ({len} bytes) would bring the snapshot beyond {spool_max} bytes"
            )));
        }
        let mut bytes = vec![0u8; len];
        rd.read_exact(&mut bytes).map_err(cut_short)?;
        spool
            .append(&bytes)
            .map_err(|e| fetch(&format!("spooling chunk {i}: {e}")))?;
        if tx.blocking_send(Frame::Chunk(bytes)).is_err() {
            return Ok(None);
        }
    }
    Ok(Some(spool))
}

#[cfg(test)]
mod tests {
    //! All or nothing (review of issue 22): a chunked answer with a chunk validators would
    //! refuse, a chunk too large, or a bad chunk count publishes none of its chunks; the set
    //! already retained stays whole, and the refusal is counted.

    use super::super::SignedListRelay;
    use super::MAX_CHUNK_BYTES;
    use crate::daemon::relay::Blocklist;
    use crate::daemon::GatewayStats;
    use purse::blocklist::chunked::{cut, SnapshotChunk};
    use purse::keys::KeySet;
    use purse::rotation::SignedMessage;
    use purse::rotation::TrustedKeys;
    use purse::sam::{Hsm, SoftwareHsm};
    use rand::SeedableRng;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::sync::mpsc;

    const TOPIC: &str = "tapgate/v1/metro/blocklist";

    /// What the fake charging server answers to `…/signed/snapshot?chunked=1`: the version and
    /// chunk count headers and the body.
    type Answer = Arc<Mutex<Served>>;
    /// The version header, the chunk count header, the body.
    type Served = (u64, String, Vec<u8>);

    /// A real HTTP server on loopback serving `answer` as a chunked snapshot; its base URL.
    async fn charging(answer: Answer) -> String {
        let app = axum::Router::new().route(
            "/v1/blocklist/signed/snapshot",
            axum::routing::get(move || {
                let (v, count, body) = answer.lock().unwrap().clone();
                async move {
                    (
                        [
                            ("content-type", CHUNKS.to_string()),
                            ("x-tapgate-blocklist-version", v.to_string()),
                            ("x-tapgate-blocklist-chunks", count),
                        ],
                        body,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        base
    }
    const CHUNKS: &str = super::CHUNKS_TYPE;

    /// The snapshot at `version` of six cards in three chunks, signed by `hsm`.
    fn chunks(hsm: &SoftwareHsm, version: u64) -> Vec<Vec<u8>> {
        let uids: Vec<[u8; 7]> = (1..=6u8).map(|i| [4, 0x22, 0, 0, 0, 0, i]).collect();
        cut("metro", version, &uids, 2)
            .iter()
            .map(|c| c.sign_with(|b| hsm.sign(b).unwrap()))
            .collect()
    }

    /// The body of a chunked answer: each chunk preceded by its length.
    fn body(chunks: &[Vec<u8>]) -> Vec<u8> {
        chunks
            .iter()
            .flat_map(|c| {
                let mut b = (c.len() as u32).to_be_bytes().to_vec();
                b.extend_from_slice(c);
                b
            })
            .collect()
    }

    /// A client of the embedded broker on `port` with the gateway's credentials, its event
    /// loop polled in a task that hands every publish it receives to the channel.
    async fn client(
        port: u16,
        id: &str,
    ) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_credentials("gateway", "gw-secret");
        o.set_max_packet_size(4 << 20, 4 << 20);
        let (c, mut el) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(e) = el.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = e {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
            }
        });
        (c, rx)
    }

    /// The blocklist's relay as the daemon runs it: a client of the broker on `port`, its
    /// store in `dir`, the charging server at `base`, trusting `hsm`'s key; and its stats.
    async fn relay(
        port: u16,
        base: String,
        hsm: &SoftwareHsm,
        dir: &std::path::Path,
    ) -> (SignedListRelay<Blocklist>, Arc<GatewayStats>) {
        let (c, _) = client(port, "relay").await;
        let store = crate::store::Store::open(dir, 16 << 20).unwrap();
        let stats = Arc::new(GatewayStats::default());
        let relay = SignedListRelay::new(
            c,
            "metro".into(),
            store,
            TrustedKeys::single(hsm.verifying_key()),
            (base, "tg_gw".into()),
            Blocklist(stats.clone()),
        );
        (relay, stats)
    }

    /// The messages on the list's topics until `marker` is seen (at most 30 s).
    async fn until(
        rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
        marker: &str,
    ) -> Vec<(String, Vec<u8>)> {
        let mut seen = Vec::new();
        let collect = async {
            while let Some((t, p)) = rx.recv().await {
                if t == format!("{TOPIC}/{marker}") {
                    return;
                }
                seen.push((t, p));
            }
        };
        tokio::time::timeout(Duration::from_secs(30), collect)
            .await
            .expect("the marker");
        seen
    }

    /// The version each retained chunk `snapshot/<i>` holds, as a client connecting now gets them.
    async fn retained(port: u16, hsm: &SoftwareHsm) -> Vec<(String, u64)> {
        let (c, mut rx) = client(port, "late").await;
        c.subscribe(format!("{TOPIC}/snapshot/+"), QoS::AtLeastOnce)
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            let (t, p) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("the retained chunks")
                .unwrap();
            let c = SnapshotChunk::verify(&p, &hsm.verifying_key()).unwrap();
            got.push((t, c.version));
        }
        got.sort();
        let _ = c.disconnect().await;
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_oversize_or_miscounted_chunk_publishes_nothing_and_the_set_in_force_stays() {
        let keys = KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(22));
        let hsm = SoftwareHsm::new(&keys).unwrap();
        let forger =
            SoftwareHsm::new(&KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(5))).unwrap();
        let port = tapgate_testkit::broker::embedded(&[("gateway", "gw-secret")]);
        let answer: Answer = Arc::new(Mutex::new((1, "3".into(), body(&chunks(&hsm, 1)))));
        let base = charging(answer.clone()).await;
        let (watch, mut seen) = client(port, "watch").await;
        watch
            .subscribe(format!("{TOPIC}/#"), QoS::AtLeastOnce)
            .await
            .unwrap();
        // The subscription is in force once the watcher gets its own message back (the broker
        // takes a connection's packets in order); else the relay's first marker may go unseen.
        watch
            .publish(
                format!("{TOPIC}/ready"),
                QoS::AtLeastOnce,
                false,
                Vec::new(),
            )
            .await
            .unwrap();
        assert!(until(&mut seen, "ready").await.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let (mut relay, stats) = relay(port, base, &hsm, dir.path()).await;
        // The set in force: version 1's three chunks.
        relay.relay_chunked_snapshot().await;
        assert!(relay.publish("marker", false, b"1".to_vec()).await);
        let first = until(&mut seen, "marker").await;
        // (rumqttd may deliver a retained publish twice to a subscriber already there.)
        let chunk_topics: std::collections::BTreeSet<&str> = first
            .iter()
            .map(|(t, _)| t.as_str())
            .filter(|t| t.contains("/snapshot/"))
            .collect();
        assert_eq!(chunk_topics.len(), 3, "{first:?}");

        let good = |v| chunks(&hsm, v);
        // Chunk 1 of version 2 as the charging server would cut it, signed by another key:
        // chunk 0 before it is good (the old relay published it before reading chunk 1).
        let mut bad_signature = good(2);
        let uids: Vec<[u8; 7]> = (1..=6u8).map(|i| [4, 0x22, 0, 0, 0, 0, i]).collect();
        bad_signature[1] = cut("metro", 2, &uids, 2)[1].sign_with(|b| forger.sign(b).unwrap());
        let mut oversize = body(&good(3)[..1]);
        oversize.extend_from_slice(&(MAX_CHUNK_BYTES as u32 + 1).to_be_bytes());
        oversize.extend_from_slice(&[0; 64]);
        let mut wrong_version = good(4);
        wrong_version[2] = chunks(&hsm, 3).remove(2);
        // Four chunks of version 7, the connection lost after the third (a fetch failure, not
        // a refusal: nothing counted, nothing published).
        let eight: Vec<[u8; 7]> = (1..=8u8).map(|i| [4, 0x22, 0, 0, 0, 0, i]).collect();
        let four: Vec<Vec<u8>> = cut("metro", 7, &eight, 2)
            .iter()
            .map(|c| c.sign_with(|b| hsm.sign(b).unwrap()))
            .collect();
        let cut_short = body(&four[..3]);
        let cases: Vec<(&str, Served, bool)> = vec![
            (
                "a chunk signed by another key",
                (2, "3".into(), body(&bad_signature)),
                true,
            ),
            (
                "a chunk announcing more than a chunk may hold",
                (3, "3".into(), oversize),
                true,
            ),
            (
                "a chunk of another version",
                (4, "3".into(), body(&wrong_version)),
                true,
            ),
            (
                "a count the chunks do not carry",
                (5, "2".into(), body(&good(5))),
                true,
            ),
            ("a count of 0", (6, "0".into(), Vec::new()), true),
            (
                "an answer cut short after 3 of 4 chunks",
                (7, "4".into(), cut_short),
                false,
            ),
        ];
        let mut refused = 0;
        for (what, a, counted) in cases {
            *answer.lock().unwrap() = a;
            relay.snapshot_due = true; // a change since (a delta) asks for a snapshot
            relay.relay_chunked_snapshot().await;
            assert!(relay.publish("marker", false, b"2".to_vec()).await);
            // Nothing of this answer: at most a late second delivery of version 1's chunks.
            let published = until(&mut seen, "marker").await;
            let version =
                |p: &[u8]| SnapshotChunk::verify(p, &hsm.verifying_key()).map(|c| c.version);
            assert!(
                published.iter().all(|(_, p)| version(p).ok() == Some(1)),
                "{what}: {published:?}"
            );
            refused += u64::from(counted);
            assert_eq!(
                stats.blocklists_refused.load(Ordering::Relaxed),
                refused,
                "{what}"
            );
            assert!(
                relay.snapshot_due,
                "{what}: the snapshot is asked for again"
            );
        }
        let versions = retained(port, &hsm).await;
        assert_eq!(
            versions,
            (0..3)
                .map(|i| (format!("{TOPIC}/snapshot/{i}"), 1))
                .collect::<Vec<_>>(),
            "a validator connecting now finds version 1 whole"
        );

        // A good answer afterwards replaces it whole.
        *answer.lock().unwrap() = (8, "3".into(), body(&good(8)));
        relay.relay_chunked_snapshot().await;
        assert!(relay.publish("marker", false, b"3".to_vec()).await);
        until(&mut seen, "marker").await;
        let versions: Vec<u64> = retained(port, &hsm)
            .await
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(versions, [8, 8, 8]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_beyond_the_spool_cap_are_refused_once_and_publish_nothing() {
        let keys = KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(22));
        let hsm = SoftwareHsm::new(&keys).unwrap();
        let port = tapgate_testkit::broker::embedded(&[("gateway", "gw-secret")]);
        let good = chunks(&hsm, 1);
        let answer: Answer = Arc::new(Mutex::new((1, "3".into(), body(&good))));
        let base = charging(answer).await;
        let dir = tempfile::tempdir().unwrap();
        let (mut relay, stats) = relay(port, base, &hsm, dir.path()).await;
        assert_eq!(relay.spool_max_bytes, super::MAX_SPOOL_BYTES);
        // Room for the first two chunks only: the third would go beyond.
        let whole: u64 = good.iter().map(|c| c.len() as u64).sum();
        relay.spool_max_bytes = whole - 1;
        for _ in 0..2 {
            relay.snapshot_due = true;
            relay.relay_chunked_snapshot().await;
            assert_eq!(relay.chunks_published, 0, "nothing published");
            assert!(relay.snapshot_due, "the snapshot is asked for again");
            assert_eq!(
                stats.blocklists_refused.load(Ordering::Relaxed),
                1,
                "counted once for the version"
            );
        }
        // Exactly the cap is enough.
        relay.spool_max_bytes = whole;
        relay.relay_chunked_snapshot().await;
        assert_eq!(relay.chunks_published, 3);
        assert!(!relay.snapshot_due);
        assert_eq!(stats.blocklists_refused.load(Ordering::Relaxed), 1);
    }
}
