//! Reads one partition of the state changelog from the beginning to its end,
//! so a new owner starts from exactly the state the last committed
//! transaction left. It runs after `init_transactions`, which completed or
//! aborted every transaction of the previous owner, so with read_committed
//! the end is final: nobody else writes this partition.

use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

/// One changelog record: a key and its value, `None` for a tombstone.
pub type StateRecord = (String, Option<Vec<u8>>);

/// Gives up when the changelog cannot be read for this long.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// Reaching the end is how a restore finishes, not an error worth logging.
struct EndIsExpected;

impl ClientContext for EndIsExpected {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            warn!(error = %error, reason, "state restore: client error");
        }
    }
}

impl ConsumerContext for EndIsExpected {}

/// Blocking: call from `spawn_blocking`.
pub fn read_partition(
    bootstrap: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<Vec<StateRecord>> {
    let consumer: BaseConsumer<EndIsExpected> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // Required by librdkafka for a consumer; nothing is committed under it.
        .set("group.id", "matchfleet-state-restore")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create_with_context(EndIsExpected)?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let mut records = Vec::new();
    if high <= low {
        return Ok(records);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let started = Instant::now();
    loop {
        if started.elapsed() > RESTORE_TIMEOUT {
            anyhow::bail!(
                "restoring {topic}[{partition}] took over {}s (read {} records)",
                RESTORE_TIMEOUT.as_secs(),
                records.len()
            );
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    warn!(
                        offset = m.offset(),
                        "state record without a UTF-8 key skipped"
                    );
                    continue;
                };
                records.push((key.to_string(), m.payload().map(<[u8]>::to_vec)));
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(records),
            Some(Err(e)) => {
                warn!(error = %e, "state restore: consume error");
                std::thread::sleep(Duration::from_millis(100));
            }
            None => {}
        }
    }
}
