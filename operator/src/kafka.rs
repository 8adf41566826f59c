//! What the operator reads from Kafka: the source topic's partition count,
//! its offsets and the lanes' committed offsets (lag, the backlog's range and
//! progress), and the one write it makes: seeding a lane group's committed
//! offsets before the backlog starts. librdkafka calls block, so they run on
//! the blocking pool with short timeouts; a Kafka outage becomes a condition,
//! not a stuck reconcile.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

/// Per Kafka request: long enough for a loaded broker, short enough that a
/// reconcile against a dead cluster ends in seconds.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long librdkafka waits for a group coordinator before failing a commit
/// (`session.timeout.ms`; our clients never join the group, so it bounds
/// nothing else).
const COORDINATOR_WAIT_MILLIS: &str = "10000";
/// The longest a seeding commit (and its read-back) may take.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(15);
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

/// Offsets of the source topic's partitions, as one look read them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicOffsets {
    /// Partition -> (low, high) watermarks.
    pub watermarks: BTreeMap<i32, (i64, i64)>,
    /// Partition -> the live group's committed offset; partitions it never
    /// committed are absent.
    pub live_committed: BTreeMap<i32, i64>,
}

/// What the backlog lane needs to read besides the topic's offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BacklogQuery {
    /// The backlog lane's consumer group.
    pub group: String,
    /// Also look up, per partition, the first offset whose timestamp is at or
    /// after this time (ms since the epoch): the start of a range given by
    /// `fromTimestamp`, needed only until the range is captured.
    pub from_time_millis: Option<i64>,
}

/// The backlog group's offsets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BacklogOffsets {
    /// Partition -> the backlog group's committed offset; partitions it never
    /// committed are absent.
    pub committed: BTreeMap<i32, i64>,
    /// Partition -> the first offset at or after the query's time, `None`
    /// when no message is that recent (asked for only with a time).
    pub from_time: Option<BTreeMap<i32, Option<i64>>>,
}

/// What one look at Kafka found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaObservation {
    pub topic: TopicState,
    /// The live group's lag summed over partitions; `None` when it could not
    /// be read (the previous value is kept then).
    pub lag: Option<i64>,
    /// The topic's offsets; `None` when they could not be read.
    pub offsets: Option<TopicOffsets>,
    /// The backlog group's offsets; `None` when not asked for or not read.
    pub backlog: Option<BacklogOffsets>,
}

impl KafkaObservation {
    pub fn unreachable(error: impl Into<String>) -> Self {
        KafkaObservation {
            topic: TopicState::Unreachable {
                error: error.into(),
            },
            lag: None,
            offsets: None,
            backlog: None,
        }
    }

    fn not_found() -> Self {
        KafkaObservation {
            topic: TopicState::NotFound,
            lag: Some(0),
            offsets: None,
            backlog: None,
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

/// The live group's lag over every partition.
pub fn total_lag(offsets: &TopicOffsets) -> i64 {
    offsets
        .watermarks
        .iter()
        .map(|(p, (low, high))| partition_lag(*low, *high, offsets.live_committed.get(p).copied()))
        .fold(0i64, i64::saturating_add)
}

type Key = (String, String);

struct Cached {
    consumer: Arc<BaseConsumer>,
    used: Instant,
}

/// Reads partition counts and offsets, with one client per (bootstrap
/// servers, group) kept between reconciles. The clients never subscribe, so
/// they never join (or rebalance) a lane's group; they fetch its offsets and,
/// when the backlog starts, commit its first ones (a commit from outside the
/// group, which Kafka accepts for a group without members - and the workers
/// never join either).
#[derive(Default, Clone)]
pub struct Kafka {
    clients: Arc<Mutex<HashMap<Key, Cached>>>,
}

fn has_nul(names: &[&str]) -> bool {
    names.iter().any(|s| s.contains('\0'))
}

impl Kafka {
    /// The topic, the live group's offsets and, with `backlog`, the backlog
    /// group's.
    pub async fn observe(
        &self,
        bootstrap: &str,
        topic: &str,
        group: &str,
        backlog: Option<BacklogQuery>,
    ) -> KafkaObservation {
        let backlog_group = backlog.as_ref().map_or("", |b| b.group.as_str());
        if has_nul(&[bootstrap, topic, group, backlog_group]) {
            return KafkaObservation::unreachable("names must not contain NUL characters");
        }
        let (consumer, mut idle) = match self.client(bootstrap, group) {
            Ok(c) => c,
            Err(e) => {
                return KafkaObservation::unreachable(format!("cannot create a Kafka client: {e}"))
            }
        };
        let backlog = match backlog {
            Some(query) => match self.client(bootstrap, &query.group) {
                Ok((c, more_idle)) => {
                    idle.extend(more_idle);
                    Some((c, query))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create a Kafka client for the backlog group");
                    None
                }
            },
            None => None,
        };
        let topic = topic.to_string();
        let result = tokio::task::spawn_blocking(move || {
            // Closing a client blocks; do it here, not on the runtime.
            drop(idle);
            let mut obs = observe_blocking(&consumer, &topic);
            if let (TopicState::Found { .. }, Some((client, query))) = (&obs.topic, backlog) {
                let ids: Vec<i32> = match &obs.offsets {
                    Some(o) => o.watermarks.keys().copied().collect(),
                    None => Vec::new(),
                };
                if !ids.is_empty() {
                    match backlog_blocking(&client, &topic, &ids, &query) {
                        Ok(b) => obs.backlog = Some(b),
                        Err(e) => {
                            tracing::warn!(topic, error = %describe(&e), "could not read the backlog group's offsets");
                        }
                    }
                }
            }
            obs
        })
        .await;
        result.unwrap_or_else(|e| KafkaObservation::unreachable(format!("Kafka task failed: {e}")))
    }

    /// Commits `offsets` (partition -> next offset to read) of `topic` under
    /// `group`, then reads them back: the commit's own answer does not carry
    /// per-partition errors.
    pub async fn commit(
        &self,
        bootstrap: &str,
        group: &str,
        topic: &str,
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<(), String> {
        if offsets.is_empty() {
            return Ok(());
        }
        if has_nul(&[bootstrap, topic, group]) {
            return Err("names must not contain NUL characters".to_string());
        }
        let (consumer, idle) = self
            .client(bootstrap, group)
            .map_err(|e| format!("cannot create a Kafka client: {e}"))?;
        let (topic, offsets) = (topic.to_string(), offsets.clone());
        let task = tokio::task::spawn_blocking(move || {
            drop(idle);
            commit_blocking(&consumer, &topic, &offsets)
        });
        match tokio::time::timeout(COMMIT_TIMEOUT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(format!("Kafka task failed: {e}")),
            Err(_) => Err(format!(
                "no answer from Kafka within {}s",
                COMMIT_TIMEOUT.as_secs()
            )),
        }
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
            .set("session.timeout.ms", COORDINATOR_WAIT_MILLIS)
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
        return KafkaObservation::not_found();
    };
    if let Some(err) = t.error() {
        let code = RDKafkaErrorCode::from(err);
        return if code == RDKafkaErrorCode::UnknownTopicOrPartition {
            KafkaObservation::not_found()
        } else {
            KafkaObservation::unreachable(format!("metadata of topic {topic}: {code:?}"))
        };
    }
    let ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    if ids.is_empty() {
        return KafkaObservation::not_found();
    }
    let partitions = i32::try_from(ids.len()).unwrap_or(i32::MAX);
    let offsets = match offsets_blocking(consumer, topic, &ids) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(topic, error = %describe(&e), "could not read offsets and lag");
            None
        }
    };
    KafkaObservation {
        topic: TopicState::Found { partitions },
        lag: offsets.as_ref().map(total_lag),
        offsets,
        backlog: None,
    }
}

fn partition_list(topic: &str, ids: &[i32]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for &p in ids {
        tpl.add_partition(topic, p);
    }
    tpl
}

/// The committed offsets of the client's group (partitions without one are left out).
fn committed_blocking(
    consumer: &BaseConsumer,
    topic: &str,
    ids: &[i32],
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    Ok(consumer
        .committed_offsets(partition_list(topic, ids), TIMEOUT)?
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) if o >= 0 => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

fn offsets_blocking(
    consumer: &BaseConsumer,
    topic: &str,
    ids: &[i32],
) -> Result<TopicOffsets, KafkaError> {
    let live_committed = committed_blocking(consumer, topic, ids)?;
    let mut watermarks = BTreeMap::new();
    for &p in ids {
        watermarks.insert(p, consumer.fetch_watermarks(topic, p, TIMEOUT)?);
    }
    Ok(TopicOffsets {
        watermarks,
        live_committed,
    })
}

fn backlog_blocking(
    consumer: &BaseConsumer,
    topic: &str,
    ids: &[i32],
    query: &BacklogQuery,
) -> Result<BacklogOffsets, KafkaError> {
    let committed = committed_blocking(consumer, topic, ids)?;
    let from_time = match query.from_time_millis {
        Some(millis) => {
            let mut tpl = TopicPartitionList::new();
            for &p in ids {
                // librdkafka takes the timestamp in the offset field.
                tpl.add_partition_offset(topic, p, Offset::Offset(millis))?;
            }
            let found = consumer.offsets_for_times(tpl, TIMEOUT)?;
            let mut out = BTreeMap::new();
            for e in found.elements() {
                e.error()?;
                // `End` (-1): no message at or after the time.
                let offset = match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some(o),
                    _ => None,
                };
                out.insert(e.partition(), offset);
            }
            Some(out)
        }
        None => None,
    };
    Ok(BacklogOffsets {
        committed,
        from_time,
    })
}

fn commit_blocking(
    consumer: &BaseConsumer,
    topic: &str,
    offsets: &BTreeMap<i32, i64>,
) -> Result<(), String> {
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in offsets {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))
            .map_err(|e| describe(&e))?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| describe(&e))?;
    let ids: Vec<i32> = offsets.keys().copied().collect();
    let now = committed_blocking(consumer, topic, &ids).map_err(|e| describe(&e))?;
    // A different offset than ours means someone else committed since: not
    // ours to undo. No offset at all means ours did not take.
    let missing: Vec<String> = offsets
        .iter()
        .filter(|(p, _)| !now.contains_key(p))
        .map(|(p, o)| format!("{p}@{o}"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the commit did not take for partitions {}",
            missing.join(", ")
        ))
    }
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

    #[test]
    fn total_lag_sums_partitions() {
        let o = TopicOffsets {
            watermarks: [(0, (0, 100)), (1, (10, 50)), (2, (0, 0))].into(),
            live_committed: [(0, 40)].into(),
        };
        assert_eq!(total_lag(&o), 60 + 40);
    }
}
