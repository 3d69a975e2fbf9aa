//! A whole list fetched `?chunked=1` (issue 22). The charging server answers either the single
//! signed message (a list that fits one chunk; published retained on `…/<topic>/snapshot` as
//! before) or `application/x-tapgate-chunks`: the chunks, each preceded by its length (4 bytes,
//! big-endian), with the version and the chunk count in headers. The chunks are read one at a
//! time on the blocking pool and each, once validators would take it (signed by the back office
//! under a key version not retired, this operator's, this version, this index of this count),
//! is published retained on `…/<topic>/snapshot/<index>` before the next is read: the gateway
//! never holds the whole list. Then the retained chunks a previous, longer snapshot left beyond
//! this one's count are cleared (an empty retained message), and so, once, is the
//! single-message topic, so that a validator that connects later finds only this snapshot. A
//! validator that connects while the chunks go out gets the new chunks published so far and
//! the older snapshot's beyond them (retained): it ignores the older ones and completes the new
//! snapshot from the chunks still to come.

use super::{SignedList, SignedListRelay};
use std::io::Read;
use tokio::sync::mpsc;

/// The content type of a chunked answer.
const CHUNKS_TYPE: &str = "application/x-tapgate-chunks";
/// Most bytes one chunk may have (a header and the most UIDs a chunk may carry).
const MAX_CHUNK_BYTES: usize = 1_024 + 7 * purse::blocklist::chunked::MAX_CHUNK_ENTRIES;

/// What the reader hands to the relay.
enum Frame {
    /// A single-message answer: its version header (when there is one) and its bytes.
    Single(Option<u64>, Vec<u8>),
    /// A chunked answer: its version and chunk count; `count` [`Frame::Chunk`]s follow.
    Head { version: u64, count: u32 },
    /// The next chunk.
    Chunk(Vec<u8>),
}

impl<L: SignedList> SignedListRelay<L> {
    /// Fetches the whole list `?chunked=1` and relays it as it is read.
    pub(super) async fn relay_chunked_snapshot(&mut self) {
        let (tx, mut rx) = mpsc::channel(2);
        let url = format!("{}/v1/{}/signed/snapshot?chunked=1", self.base, L::PATH);
        let (agent, token) = (self.agent.clone(), self.token.clone());
        let reader =
            tokio::task::spawn_blocking(move || read_frames::<L>(&agent, &url, &token, &tx));
        match rx.recv().await {
            Some(Frame::Single(v, bytes)) => self.relay_single(v, bytes).await,
            Some(Frame::Head { version, count }) => {
                self.relay_chunks(version, count, &mut rx).await
            }
            _ => {}
        }
        drop(rx);
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(%e, "fetching the {} snapshot failed", L::NAME),
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

    /// The `count` chunks of the snapshot at `version`, each checked and published in turn.
    async fn relay_chunks(&mut self, version: u64, count: u32, rx: &mut mpsc::Receiver<Frame>) {
        for i in 0..count {
            let Some(Frame::Chunk(bytes)) = rx.recv().await else {
                return; // the reader says why
            };
            let checked = self
                .list
                .check_chunk(&bytes, &self.wanted(Some(version)), i, count);
            if let Err(why) = checked {
                if self.refused_version != Some(version) {
                    self.refused_version = Some(version);
                    tracing::error!(
                        version,
                        chunk = i,
                        "{} snapshot from the charging server not relayed: validators would refuse it: {why}",
                        L::NAME
                    );
                }
                return;
            }
            let topic = format!("{}/{i}", L::SNAPSHOT_TOPIC);
            if !self.publish(&topic, true, bytes).await {
                return;
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

/// GETs `url` and hands the answer over frame by frame (a chunk at a time); stops quietly
/// when the relay stops listening.
fn read_frames<L: SignedList>(
    agent: &ureq::Agent,
    url: &str,
    token: &str,
    tx: &mpsc::Sender<Frame>,
) -> Result<(), String> {
    let r = agent
        .get(url)
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| e.to_string())?;
    if r.status() == 204 {
        return Ok(());
    }
    let header = |what: &str| r.header(&format!("x-tapgate-{}-{what}", L::PATH));
    let version = header("version").and_then(|v| v.parse::<u64>().ok());
    if r.content_type() != CHUNKS_TYPE {
        let mut bytes = Vec::new();
        r.into_reader()
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        let _ = tx.blocking_send(Frame::Single(version, bytes));
        return Ok(());
    }
    let count: u32 = header("chunks")
        .and_then(|v| v.parse().ok())
        .ok_or("no chunk count header")?;
    let version = version.ok_or("no version header")?;
    if tx.blocking_send(Frame::Head { version, count }).is_err() {
        return Ok(());
    }
    let mut rd = r.into_reader();
    for i in 0..count {
        let mut len = [0u8; 4];
        rd.read_exact(&mut len)
            .map_err(|e| format!("chunk {i} of {count}: {e}"))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_CHUNK_BYTES {
            return Err(format!("chunk {i} of {count} announces {len} bytes"));
        }
        let mut bytes = vec![0u8; len];
        rd.read_exact(&mut bytes)
            .map_err(|e| format!("chunk {i} of {count}: {e}"))?;
        if tx.blocking_send(Frame::Chunk(bytes)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
