//! The taps of a NATS cluster, natively (async-nats, JetStream): validators publish over the
//! cluster's MQTT listeners; their tap subjects (`tapgate.v1.<operator>.taps.<device>`, the
//! MQTT topic with `/` as `.`) are captured by one work-queue stream, replicated over the
//! cluster; every gateway of the operator pulls from ONE durable consumer of it, so the
//! cluster splits the taps among them and redelivers what a gateway took but never
//! acknowledged (it died) to another. A message is acknowledged only once its batch is durable
//! in the gateway's store ([`super::ingest_loop`]); the validator's outbox keeps each tap until
//! the gateway's confirmation in any case (docs/nats.md).

use super::{GatewayStats, Source};
use crate::store::Message;
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{self, Sender};
use tokio::task::JoinHandle;

/// Where and how a gateway takes its operator's taps from a NATS cluster.
#[derive(Clone, Debug)]
pub struct NatsIngest {
    /// The cluster's client URLs (`nats://host:port`, `tls://host:port`); the client fails over
    /// among them and the servers the cluster announces.
    pub urls: Vec<String>,
    /// Replicas of the tap stream when this gateway creates it (at most the cluster's size).
    pub replicas: usize,
    /// A PEM CA file: connect over TLS, verifying the servers against it.
    pub ca_file: Option<std::path::PathBuf>,
}

/// How long the cluster waits for a delivered tap's ack before delivering it again (to any
/// gateway of the consumer): well beyond an ingest batch's fsync, even a slow one.
pub const ACK_WAIT: Duration = Duration::from_secs(30);

/// Most taps delivered and not acknowledged yet, over all the consumer's gateways.
pub const MAX_ACK_PENDING: i64 = 50_000;

/// The tap stream of `operator`: its name and subject.
pub fn tap_stream(operator: &str) -> (String, String) {
    (
        format!("TAPGATE_TAPS_{operator}"),
        format!("tapgate.v1.{operator}.taps.*"),
    )
}

/// The durable consumer every gateway of `operator` shares.
pub fn tap_consumer(operator: &str) -> String {
    format!("tapgate-gateways-{operator}")
}

/// A NATS subject as the MQTT topic it was published on (NATS maps `/` to `.` and `.` to `//`).
pub fn subject_to_topic(subject: &str) -> String {
    subject
        .split("//")
        .map(|part| part.replace('.', "/"))
        .collect::<Vec<_>>()
        .join(".")
}

/// A message taken from the consumer, acknowledged once its batch is durable.
pub(super) type Delivery = jetstream::Message;

/// The task taking taps from the cluster into `tx`, and the one acknowledging them (fed by the
/// returned sender). The first ends with the reason it stopped (ingestion stopped); lost
/// connections, a consumer that went away or a node's death are retried, never the end.
pub(super) fn spawn(
    nats: NatsIngest,
    operator: String,
    credentials: Option<(String, String)>,
    tx: Sender<(Source, Message)>,
    stats: Arc<GatewayStats>,
) -> (
    JoinHandle<String>,
    JoinHandle<()>,
    mpsc::UnboundedSender<Box<Delivery>>,
) {
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Box<Delivery>>();
    let acks = tokio::spawn(async move {
        while let Some(m) = ack_rx.recv().await {
            if let Err(e) = m.ack().await {
                tracing::warn!(%e, "JetStream ack failed; the cluster will redeliver (a duplicate)");
            }
        }
    });
    let taps = tokio::spawn(async move {
        let mut backoff_ms = 100u64;
        loop {
            match take(&nats, &operator, credentials.clone(), &tx, &stats).await {
                Ok(()) => break "ingestion stopped".to_string(),
                Err(e) => {
                    stats.subscribed.store(false, Ordering::Release);
                    tracing::warn!(%e, backoff_ms, "NATS tap consumer lost; retrying");
                }
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(5_000);
        }
    });
    (taps, acks, ack_tx)
}

/// Connects, makes sure the stream and the durable consumer exist and takes messages until
/// ingestion stops (`Ok`) or the consumer fails (`Err`, retried by the caller).
async fn take(
    nats: &NatsIngest,
    operator: &str,
    credentials: Option<(String, String)>,
    tx: &Sender<(Source, Message)>,
    stats: &GatewayStats,
) -> Result<(), String> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("tapgate-gateway-{operator}"))
        .retry_on_initial_connect()
        // The URLs in the order given (the nearest node first), then the others.
        .retain_servers_order()
        .max_reconnects(None);
    if let Some((u, p)) = credentials {
        opts = opts.user_and_password(u, p);
    }
    if let Some(ca) = &nats.ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let client = opts
        .connect(nats.urls.as_slice())
        .await
        .map_err(|e| format!("connecting to {:?}: {e}", nats.urls))?;
    let js = jetstream::new(client);
    let (name, subject) = tap_stream(operator);
    let stream = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: nats.replicas.max(1),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("the tap stream {name}: {e}"))?;
    let durable = tap_consumer(operator);
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &durable,
            consumer::pull::Config {
                durable_name: Some(durable.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                num_replicas: nats.replicas.max(1),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("the consumer {durable}: {e}"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1_000)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .map_err(|e| format!("pulling from {durable}: {e}"))?;
    stats.subscribed.store(true, Ordering::Release);
    tracing::info!(stream = %name, consumer = %durable, "taking taps from the NATS cluster");
    let mut errors = 0u32;
    while let Some(m) = messages.next().await {
        // A missed heartbeat or a node's death is an error the pull recovers from (it asks
        // again, on whichever server the client is connected to); many in a row start over.
        let m = match m {
            Ok(m) => {
                errors = 0;
                m
            }
            Err(e) if errors < 10 => {
                errors += 1;
                tracing::warn!(%e, "pulling taps from the NATS cluster");
                continue;
            }
            Err(e) => return Err(format!("pulling from {durable}: {e}")),
        };
        let message = Message {
            topic: subject_to_topic(m.subject.as_str()),
            payload: m.payload.to_vec(),
        };
        if tx.send((Source::Nats(Box::new(m)), message)).await.is_err() {
            return Ok(());
        }
    }
    Err(format!("the pull from {durable} ended"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_read_back_as_the_topics_they_were_published_on() {
        assert_eq!(
            subject_to_topic("tapgate.v1.metro.taps.1001"),
            "tapgate/v1/metro/taps/1001"
        );
        assert_eq!(subject_to_topic("a.b//c.d"), "a/b.c/d");
        assert_eq!(tap_stream("metro").1, "tapgate.v1.metro.taps.*");
    }
}
