//! What the operator reads from Kafka: the source topic's partition count
//! and the live lane's lag. librdkafka calls block, so they run on the
//! blocking pool with short timeouts; a Kafka outage becomes a condition, not
//! a stuck reconcile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

/// Per Kafka request: long enough for a loaded broker, short enough that a
/// reconcile against a dead cluster ends in seconds.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Cached clients unused this long are closed (their RenderJob went away or
/// moved to other brokers).
const IDLE: Duration = Duration::from_secs(600);

/// The source topic, as Kafka sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicState {
    Found { partitions: i32 },
    NotFound,
    Unreachable { error: String },
}

/// What one look at Kafka found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaObservation {
    pub topic: TopicState,
    /// The lane group's lag summed over partitions; `None` when it could not
    /// be read (the previous value is kept then).
    pub lag: Option<i64>,
}

impl KafkaObservation {
    pub fn unreachable(error: impl Into<String>) -> Self {
        KafkaObservation {
            topic: TopicState::Unreachable {
                error: error.into(),
            },
            lag: None,
        }
    }
}

/// Lag of one partition: messages from the group's committed offset (or the
/// log start, when the group never committed or retention removed what it
/// committed) to the end of the log.
pub fn partition_lag(low: i64, high: i64, committed: Option<i64>) -> i64 {
    let from = committed.map_or(low, |c| c.max(low));
    (high - from).max(0)
}

type Key = (String, String);

struct Cached {
    consumer: Arc<BaseConsumer>,
    used: Instant,
}

/// Reads partition counts and lag, with one client per (bootstrap servers,
/// group) kept between reconciles. The clients never subscribe, so they
/// never join (or rebalance) the lane's group; they only fetch its offsets.
#[derive(Default, Clone)]
pub struct Kafka {
    clients: Arc<Mutex<HashMap<Key, Cached>>>,
}

impl Kafka {
    pub async fn observe(&self, bootstrap: &str, topic: &str, group: &str) -> KafkaObservation {
        if [bootstrap, topic, group].iter().any(|s| s.contains('\0')) {
            return KafkaObservation::unreachable("names must not contain NUL characters");
        }
        let (consumer, idle) = match self.client(bootstrap, group) {
            Ok(c) => c,
            Err(e) => {
                return KafkaObservation::unreachable(format!("cannot create a Kafka client: {e}"))
            }
        };
        let topic = topic.to_string();
        let result = tokio::task::spawn_blocking(move || {
            // Closing a client blocks; do it here, not on the runtime.
            drop(idle);
            observe_blocking(&consumer, &topic)
        })
        .await;
        result.unwrap_or_else(|e| KafkaObservation::unreachable(format!("Kafka task failed: {e}")))
    }

    /// The cached client for a key, and the clients that went idle.
    fn client(
        &self,
        bootstrap: &str,
        group: &str,
    ) -> Result<(Arc<BaseConsumer>, Vec<Cached>), KafkaError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let idle_keys: Vec<Key> = clients
            .iter()
            .filter(|(_, c)| now.duration_since(c.used) > IDLE)
            .map(|(k, _)| k.clone())
            .collect();
        let idle = idle_keys.iter().filter_map(|k| clients.remove(k)).collect();
        let key = (bootstrap.to_string(), group.to_string());
        if let Some(c) = clients.get_mut(&key) {
            c.used = now;
            return Ok((c.consumer.clone(), idle));
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("client.id", "matchfleet-operator")
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false")
            .create()?;
        let consumer = Arc::new(consumer);
        clients.insert(
            key,
            Cached {
                consumer: consumer.clone(),
                used: now,
            },
        );
        Ok((consumer, idle))
    }
}

fn describe(e: &KafkaError) -> String {
    // KafkaError's Display already names the librdkafka error code.
    e.to_string()
}

fn observe_blocking(consumer: &BaseConsumer, topic: &str) -> KafkaObservation {
    // The client is never assigned anything, so polling returns no messages;
    // it hands over queued client events (connection errors, logged by the
    // context), which would otherwise pile up in a long outage.
    for _ in 0..1000 {
        if consumer.poll(Duration::ZERO).is_none() {
            break;
        }
    }
    let metadata = match consumer.fetch_metadata(Some(topic), TIMEOUT) {
        Ok(m) => m,
        Err(e) => return KafkaObservation::unreachable(describe(&e)),
    };
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return KafkaObservation {
            topic: TopicState::NotFound,
            lag: Some(0),
        };
    };
    if let Some(err) = t.error() {
        let code = RDKafkaErrorCode::from(err);
        return if code == RDKafkaErrorCode::UnknownTopicOrPartition {
            KafkaObservation {
                topic: TopicState::NotFound,
                lag: Some(0),
            }
        } else {
            KafkaObservation::unreachable(format!("metadata of topic {topic}: {code:?}"))
        };
    }
    let ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    if ids.is_empty() {
        return KafkaObservation {
            topic: TopicState::NotFound,
            lag: Some(0),
        };
    }
    let partitions = i32::try_from(ids.len()).unwrap_or(i32::MAX);
    let lag = match lag_blocking(consumer, topic, &ids) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(topic, error = %describe(&e), "could not read lag");
            None
        }
    };
    KafkaObservation {
        topic: TopicState::Found { partitions },
        lag,
    }
}

fn lag_blocking(consumer: &BaseConsumer, topic: &str, ids: &[i32]) -> Result<i64, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for &p in ids {
        tpl.add_partition(topic, p);
    }
    let committed: HashMap<i32, i64> = consumer
        .committed_offsets(tpl, TIMEOUT)?
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) if o >= 0 => Some((e.partition(), o)),
            _ => None,
        })
        .collect();
    let mut total = 0i64;
    for &p in ids {
        let (low, high) = consumer.fetch_watermarks(topic, p, TIMEOUT)?;
        total = total.saturating_add(partition_lag(low, high, committed.get(&p).copied()));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_committed_offset() {
        assert_eq!(partition_lag(0, 100, Some(40)), 60);
        assert_eq!(partition_lag(0, 100, Some(100)), 0);
    }

    #[test]
    fn lag_without_a_commit_counts_from_the_log_start() {
        assert_eq!(partition_lag(0, 100, None), 100);
        assert_eq!(partition_lag(30, 100, None), 70);
        assert_eq!(partition_lag(5, 5, None), 0);
    }

    #[test]
    fn lag_ignores_commits_retention_removed() {
        assert_eq!(partition_lag(50, 100, Some(10)), 50);
    }

    #[test]
    fn lag_is_never_negative() {
        assert_eq!(partition_lag(0, 10, Some(20)), 0);
    }
}
