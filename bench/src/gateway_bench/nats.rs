//! `gateway --broker nats`: the same live taps through a three-node NATS cluster on loopback
//! (testkit's, JetStream and MQTT on each node, the shipped users and permissions). The
//! validators' connections are spread over the three nodes; the raw run's subscriber (QoS 1,
//! on the first node) counts the same messages; the gateway takes the taps from JetStream (its
//! durable consumer) and confirms them over MQTT. Then the node one validator is on is killed
//! and the time until that validator is connected to another node (`reconnect_ms`), and until
//! a tap it sends then is confirmed by the gateway (`reconnect_confirmed_ms`), is measured.

use super::*;
use tapgate_testkit::nats::NatsCluster;

/// The devices file of the run: devices 1000… (operator bench) and 2000… (operator raw).
fn devices() -> String {
    (0..VALIDATORS)
        .flat_map(|vi| {
            [(1000, "bench"), (2000, "raw")].map(|(d, op)| format!("{} pw{vi} {op}\n", d + vi))
        })
        .collect()
}

pub(super) fn run(n: Option<u64>, taps_per_message: usize) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let Taps {
        keys,
        records,
        total,
        messages,
    } = taps(n, taps_per_message)?;
    let mut cluster =
        NatsCluster::start(3, &devices(), ("gateway", "gwpw")).map_err(|e| anyhow::anyhow!(e))?;
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.mqtt_port).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // 1. Raw cluster rate: the same messages published at QoS 1 over the three nodes, counted
    //    by one QoS 1 subscriber.
    let raw_cpu0 = cpu_s();
    let took = rt.block_on(raw_run_as(
        &ports,
        ("gateway", "gwpw"),
        &records,
        messages,
        0,
    ))?;
    let raw_rate = total as f64 / took.as_secs_f64();
    let raw_cpu = cpu_s() - raw_cpu0;

    // 2. End to end through the gateway (taps from JetStream, confirmations over MQTT).
    let store = Store::open(&dir.path().join("gw"), 4 << 30)?;
    let stats = Arc::new(GatewayStats::default());
    let cfg = GatewayConfig {
        broker: ("127.0.0.1".into(), ports[0]),
        fallback_brokers: ports[1..]
            .iter()
            .map(|p| ("127.0.0.1".to_string(), *p))
            .collect(),
        mqtt_credentials: Some(("gateway".into(), "gwpw".into())),
        operator: "bench".into(),
        nats: Some(gateway::daemon::NatsIngest {
            urls: cluster.nats_urls(),
            replicas: 3,
            ca_file: None,
        }),
        ..GatewayConfig::default()
    };
    let gw_keys = keys.for_role(Role::Gateway, 0)?;
    let cpu0 = cpu_s();
    let (e2e, confirmed) = rt.block_on(async {
        spawn_gateway(cfg, None, store, gw_keys, stats.clone());
        end_to_end(&ports, &records, &stats, total).await
    })?;
    let cpu = cpu_s() - cpu0;
    let run = Run {
        broker: "nats",
        total,
        taps_per_message,
        e2e_rate: total as f64 / e2e.as_secs_f64(),
        // One raw pass here, before the live run: reported as both.
        raw_rates: (raw_rate, raw_rate),
        confirmed,
        cpu,
        raw_cpu,
        // Three nats-server processes: not counted here.
        broker_cpu: None,
    };
    let mut figures = report(&run, &stats);

    // 3. A validator's node dies: how long until it is connected through another node, and
    //    until a tap it sends is confirmed.
    let (reconnect, confirmed_after) =
        rt.block_on(failover(&mut cluster, &ports, &records[1][0]))?;
    figures.push(("nodes", 3u64.into()));
    figures.push(("reconnect_ms", (reconnect.as_millis() as u64).into()));
    figures.push((
        "reconnect_confirmed_ms",
        (confirmed_after.as_millis() as u64).into(),
    ));
    Ok(figures)
}

/// Device 1001 as a validator connects (persistent session, its confirmations at QoS 1) to
/// node 1 with the other nodes as fallbacks, tried in turn as the validator daemon does; node 1
/// is killed; the time until it is connected again (through another node) and until `tap`
/// (already stored: confirmed again as a duplicate) sent then is confirmed (sent again as the
/// validator daemon would: on a reconnection, or after [`RESEND_AFTER`] unconfirmed).
async fn failover(
    cluster: &mut NatsCluster,
    ports: &[u16],
    tap: &[u8],
) -> anyhow::Result<(Duration, Duration)> {
    let options: Vec<MqttOptions> = [1, 2, 0]
        .map(|i| {
            let mut o = MqttOptions::new("validator-1001", "127.0.0.1", ports[i]);
            o.set_credentials("1001", "pw1")
                .set_clean_session(false)
                .set_keep_alive(Duration::from_secs(15));
            o
        })
        .to_vec();
    let (client, mut ev) = AsyncClient::new(options[0].clone(), 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    tokio::spawn(async move {
        let mut current = 0;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = tx.send("connected");
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    let _ = tx.send("confirmed");
                }
                Ok(_) => {}
                Err(_) => {
                    current = (current + 1) % options.len();
                    ev.mqtt_options = options[current].clone();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    next(&mut rx, "connected").await?;
    client
        .subscribe("tapgate/v1/bench/devices/1001/confirm", QoS::AtLeastOnce)
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    cluster.kill(1);
    next(&mut rx, "connected").await?;
    let reconnect = t0.elapsed();
    // Sent as the validator daemon sends an unconfirmed tap: now, again on every reconnection,
    // and again when it has waited RESEND_AFTER unconfirmed. A PUBACK from NATS covers the
    // message's store in `$MQTT_msgs` only: a tap published while its stream has no leader
    // (the dead node held it, a new one is not elected yet) is acknowledged and never reaches
    // the stream — the validator's resend is what delivers it.
    let send = || {
        client.publish(
            "tapgate/v1/bench/taps/1001",
            QoS::AtLeastOnce,
            false,
            tap.to_vec(),
        )
    };
    send().await?;
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match tokio::time::timeout(RESEND_AFTER, rx.recv()).await {
                Ok(Some("confirmed")) => return Ok(()),
                Ok(Some("connected")) | Err(_) => send().await?,
                Ok(Some(_)) => {}
                Ok(None) => anyhow::bail!("the client stopped"),
            }
        }
    })
    .await??;
    Ok((reconnect, t0.elapsed()))
}

/// When the validator daemon sends an unconfirmed tap again (validator/src/daemon.rs,
/// `RESEND_AFTER_MS`).
const RESEND_AFTER: Duration = Duration::from_secs(30);

/// Waits (120 s at most) for the client's event `want`.
async fn next(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>,
    want: &'static str,
) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match rx.recv().await {
                Some(got) if got == want => return Ok(()),
                Some(_) => {}
                None => anyhow::bail!("the client stopped"),
            }
        }
    })
    .await?
}
