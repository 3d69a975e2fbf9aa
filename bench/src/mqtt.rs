//! What the MQTT scenarios share: validators publishing their messages side by side.

use rumqttc::{AsyncClient, QoS};

/// Each (client, topic, messages) lane publishes its messages in order at QoS 1 from a task
/// of its own, all lanes at once, as fast as the client takes them; returns once every lane
/// has handed over its last message.
pub async fn publish_lanes(lanes: Vec<(AsyncClient, String, Vec<Vec<u8>>)>) -> anyhow::Result<()> {
    let tasks: Vec<_> = lanes
        .into_iter()
        .map(|(client, topic, messages)| {
            tokio::spawn(async move {
                for m in messages {
                    client
                        .publish(topic.clone(), QoS::AtLeastOnce, false, m)
                        .await?;
                }
                Ok::<(), rumqttc::ClientError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}
