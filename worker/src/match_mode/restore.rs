//! Reads one partition of the state changelog from the beginning to its end,
//! so a new owner starts from exactly the state the last committed
//! transaction left, then re-reads the pending requests that state names
//! from the request partition. It runs after `init_transactions`, which
//! completed or aborted every transaction of the previous owner, so with
//! read_committed the end is final: nobody else writes this partition.

use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use crate::matching::{PartitionEngine, Restoring};
use matchfleet_api::matching::parse_request;

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

/// Blocking: call from a thread of its own (`priority::JobThread`).
pub fn read_partition(
    bootstrap: &str,
    topic: &str,
    partition: i32,
) -> anyhow::Result<Vec<StateRecord>> {
    let mut records = Vec::new();
    read_range(bootstrap, topic, partition, None, |m| {
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            warn!(
                offset = m.offset(),
                "state record without a UTF-8 key skipped"
            );
            return true;
        };
        records.push((key.to_string(), m.payload().map(<[u8]>::to_vec)));
        true
    })?;
    Ok(records)
}

/// Re-reads the pending requests `restoring` names from `topic[partition]`
/// (the request topic) and finishes the restore. Blocking: call from a
/// thread of its own (`priority::JobThread`).
pub fn replay_pending(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    dimension: usize,
    restoring: Restoring,
) -> anyhow::Result<(PartitionEngine, usize)> {
    let Some((first, last)) = restoring.replay_range() else {
        return Ok((restoring.finish(std::iter::empty())?, 0));
    };
    let mut replayed = Vec::new();
    let mut unreadable = None;
    read_range(bootstrap, topic, partition, Some((first, last)), |m| {
        if restoring.wants(m.offset()) {
            match parse_request(m.key(), m.payload(), dimension) {
                Ok(r) => replayed.push((m.offset(), r)),
                Err(e) => unreadable = Some(format!("offset {}: {e}", m.offset())),
            }
        }
        m.offset() < last && unreadable.is_none()
    })?;
    if let Some(reason) = unreadable {
        anyhow::bail!("a pending request of {topic}[{partition}] no longer parses: {reason}");
    }
    let count = replayed.len();
    Ok((restoring.finish(replayed)?, count))
}

/// Reads `topic[partition]` (read_committed) from the beginning, or from
/// `first` of `Some((first, last))`, handing each record to `take` until it
/// returns false, the end is reached, or an offset ≥ `last` was read.
fn read_range(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    range: Option<(i64, i64)>,
    mut take: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> bool,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer<EndIsExpected> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // Required by librdkafka for a consumer; nothing is committed under it.
        .set("group.id", "matchfleet-state-restore")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .create_with_context(EndIsExpected)?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let start = match range {
        None if high <= low => return Ok(()),
        None => Offset::Beginning,
        Some((first, _)) if first < low => anyhow::bail!(
            "the pending request at offset {first} of {topic}[{partition}] is gone (the \
             partition starts at {low}): its retention must keep a few windows of requests"
        ),
        Some((first, _)) => Offset::Offset(first),
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, start)?;
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut read = 0usize;
    loop {
        if started.elapsed() > RESTORE_TIMEOUT {
            anyhow::bail!(
                "restoring from {topic}[{partition}] took over {}s (read {read} records)",
                RESTORE_TIMEOUT.as_secs(),
            );
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                read += 1;
                let done = range.is_some_and(|(_, last)| m.offset() >= last);
                if !take(&m) || done {
                    return Ok(());
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(()),
            Some(Err(e)) => {
                warn!(error = %e, "state restore: consume error");
                std::thread::sleep(Duration::from_millis(100));
            }
            None => {}
        }
    }
}
