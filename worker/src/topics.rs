//! Kafka topics the workers create for themselves (dead letters, results,
//! per-partition state), so a pipeline needs no manual topic set-up.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

/// How a topic is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Deleted by age (the broker default).
    Delete,
    /// Compacted: the last record per key is kept (state changelogs).
    Compact,
}

/// Creates `topic` with `partitions` if it does not exist; an existing topic
/// is left as it is (its partition count is checked by the caller if it matters).
pub async fn ensure(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    retention: Retention,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    if retention == Retention::Compact {
        new_topic = new_topic.set("cleanup.policy", "compact");
    }
    let created = admin
        .create_topics(
            [&new_topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for result in created {
        if let Err((name, code)) = result {
            if code != RDKafkaErrorCode::TopicAlreadyExists {
                anyhow::bail!("cannot create topic {name}: {code}");
            }
        }
    }
    Ok(())
}

/// The partition count of `topic`, or an error naming the topic if it does
/// not exist. Blocking: call from `spawn_blocking`.
pub fn partition_count(bootstrap: &str, topic: &str) -> anyhow::Result<i32> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty());
    match found {
        Some(t) => Ok(t.partitions().len() as i32),
        None => anyhow::bail!("topic {topic} does not exist"),
    }
}

/// [`partition_count`] off the async runtime's threads.
pub async fn partition_count_async(bootstrap: &str, topic: &str) -> anyhow::Result<i32> {
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || partition_count(&bootstrap, &topic)).await?
}
