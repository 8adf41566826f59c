//! The progress service's durability: every change that matters (owner and
//! epoch changes, completions, failures, the assignment) is appended to a
//! compacted Kafka topic with acks=all before it is acknowledged, and replayed
//! on start. Kafka is the system of record, as changelog topics are for Kafka
//! Streams; no other database to run.

use std::time::Duration;

use matchfleet_api::progress::Assignment;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::leases::OwnerChange;
use super::tasks::TaskRecord;

#[derive(Debug, Error)]
pub enum ChangelogError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("creating changelog topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("replaying {topic}: {reason}")]
    Replay { topic: String, reason: String },
}

/// One changelog entry. The Kafka key makes compaction keep the latest per subject.
/// Externally tagged: an internally tagged enum would buffer the assignment's
/// integer map keys as strings and fail to read them back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Entry {
    Owner {
        lane: String,
        partition: i32,
        holder: Option<String>,
        epoch: u64,
    },
    Task {
        key: String,
        #[serde(flatten)]
        state: TaskState,
    },
    Assignment {
        assignment: Assignment,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum TaskState {
    Done {
        lane: String,
        latency_millis: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        staged: Option<String>,
    },
    Failed {
        attempts: u32,
        reason: String,
    },
    Attempts {
        attempts: u32,
    },
}

impl Entry {
    pub fn owner(c: &OwnerChange) -> Self {
        Entry::Owner {
            lane: c.lane.clone(),
            partition: c.partition,
            holder: c.holder.clone(),
            epoch: c.epoch,
        }
    }

    pub fn task(key: &str, r: &TaskRecord) -> Self {
        let state = match r {
            TaskRecord::Done {
                lane,
                latency_millis,
                staged,
            } => TaskState::Done {
                lane: lane.clone(),
                latency_millis: *latency_millis,
                staged: staged.clone(),
            },
            TaskRecord::Failed { attempts, reason } => TaskState::Failed {
                attempts: *attempts,
                reason: reason.clone(),
            },
            TaskRecord::Attempts { attempts } => TaskState::Attempts {
                attempts: *attempts,
            },
        };
        Entry::Task {
            key: key.to_string(),
            state,
        }
    }

    /// The compaction key: one per lease, per task, and one for the assignment.
    pub fn kafka_key(&self) -> String {
        match self {
            Entry::Owner {
                lane, partition, ..
            } => format!("owner/{lane}/{partition}"),
            Entry::Task { key, .. } => format!("task/{key}"),
            Entry::Assignment { .. } => "assignment".to_string(),
        }
    }
}

impl From<TaskState> for TaskRecord {
    fn from(s: TaskState) -> Self {
        match s {
            TaskState::Done {
                lane,
                latency_millis,
                staged,
            } => TaskRecord::Done {
                lane,
                latency_millis,
                staged,
            },
            TaskState::Failed { attempts, reason } => TaskRecord::Failed { attempts, reason },
            TaskState::Attempts { attempts } => TaskRecord::Attempts { attempts },
        }
    }
}

pub struct Changelog {
    topic: String,
    producer: FutureProducer,
    bootstrap: String,
}

impl Changelog {
    /// Connects, creating the compacted topic if it does not exist.
    pub async fn open(
        bootstrap: &str,
        topic: &str,
        replication: i32,
    ) -> Result<Self, ChangelogError> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()?;
        // One partition: the log is replayed in order and is small (one entry per task).
        let new_topic = NewTopic::new(topic, 1, TopicReplication::Fixed(replication))
            .set("cleanup.policy", "compact")
            .set("min.compaction.lag.ms", "60000");
        let results = admin
            .create_topics(
                &[new_topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(ChangelogError::CreateTopic {
                        topic: topic.to_string(),
                        code,
                    })
                }
            }
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .create()?;
        Ok(Changelog {
            topic: topic.to_string(),
            producer,
            bootstrap: bootstrap.to_string(),
        })
    }

    /// Appends entries in order and returns once the broker acknowledged all
    /// of them (acks=all).
    pub async fn append(&self, entries: &[Entry]) -> Result<(), ChangelogError> {
        let payloads: Vec<(String, String)> = entries
            .iter()
            .map(|e| (e.kafka_key(), serde_json::to_string(e).unwrap_or_default()))
            .collect();
        let sends = payloads.iter().map(|(k, v)| {
            self.producer.send(
                FutureRecord::to(&self.topic).key(k).payload(v),
                Duration::from_secs(10),
            )
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    /// Reads the whole topic from the beginning to its current end.
    pub fn replay(&self) -> Result<Vec<Entry>, ChangelogError> {
        let err = |reason: String| ChangelogError::Replay {
            topic: self.topic.clone(),
            reason,
        };
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", format!("{}.replay", self.topic))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()?;
        let (low, high) = consumer.fetch_watermarks(&self.topic, 0, Duration::from_secs(10))?;
        if high <= low {
            return Ok(vec![]);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let mut entries = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            if std::time::Instant::now() > deadline {
                return Err(err(format!("not at the end ({high}) after 120 s")));
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(msg)) => {
                    if let Some(payload) = msg.payload() {
                        match serde_json::from_slice::<Entry>(payload) {
                            Ok(e) => entries.push(e),
                            // An entry this build cannot read must not be silently skipped.
                            Err(e) => {
                                return Err(err(format!("entry at offset {}: {e}", msg.offset())))
                            }
                        }
                    }
                    if msg.offset() + 1 >= high {
                        break;
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => {
                    let pos = consumer.position()?;
                    if let Some(Offset::Offset(o)) =
                        pos.find_partition(&self.topic, 0).map(|e| e.offset())
                    {
                        if o >= high {
                            break;
                        }
                    }
                }
            }
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_key_by_subject() {
        let entries = vec![
            Entry::owner(&OwnerChange {
                lane: "live".into(),
                partition: 3,
                holder: Some("w-0".into()),
                epoch: 4,
            }),
            Entry::task(
                "user/42",
                &TaskRecord::Done {
                    lane: "live".into(),
                    latency_millis: 12,
                    staged: Some("/out/.staging/k".into()),
                },
            ),
            Entry::Assignment {
                assignment: Assignment {
                    lanes: [("live".to_string(), [(0, "w-0".to_string())].into())].into(),
                    drain_millis: 5,
                },
            },
        ];
        let keys: Vec<String> = entries.iter().map(Entry::kafka_key).collect();
        assert_eq!(keys, vec!["owner/live/3", "task/user/42", "assignment"]);
        for e in entries {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), e);
        }
    }
}
