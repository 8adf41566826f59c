//! One Kafka transaction per commit of a partition's work: its results, its
//! state changes, its feedback samples, its dead letters and the input
//! offsets (requests and outcomes), all or nothing.
//! The transactional.id follows the partition (`<prefix>.<partition>`), so
//! when the partition changes owner the new owner's `init_transactions`
//! fences the old one at the broker - the pattern for `assign()` consumers,
//! which have no group generation to fence by.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::priority::JobThread;
use crate::dead_letters::Letter;

/// How long one transactional call may block.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a commit waits at a time for its records' delivery reports. A
/// commit pays half of it on average after its last ack (1 ms steps: mean
/// transaction 3.6-3.9 ms under the end-to-end bench, 200 us: 3.2-3.4); a
/// non-blocking poll costs about a microsecond.
const DELIVERY_POLL: Duration = Duration::from_micros(200);

/// Where a partition's records go.
#[derive(Debug, Clone)]
pub struct Topics {
    pub source: String,
    pub results: String,
    /// Partitions of the results topic (results go to `partition % this`).
    pub results_partitions: i32,
    pub changelog: String,
    pub dead_letters: String,
    /// The feedback join's topics, when the pipeline has one.
    pub feedback: Option<FeedbackTopics>,
}

/// Where outcome events come from and samples go.
#[derive(Debug, Clone)]
pub struct FeedbackTopics {
    /// Outcome events; partition p is read with request partition p.
    pub outcomes: String,
    pub samples: String,
    /// Partitions of the samples topic (samples go to `partition % this`).
    pub samples_partitions: i32,
}

/// A malformed record, owned so it can cross to the transaction thread.
#[derive(Debug, Clone)]
pub struct OwnedLetter {
    /// The topic it was read from (requests or outcomes).
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub offset: i64,
    pub reason: String,
}

/// Everything one transaction writes.
#[derive(Debug, Default)]
pub struct Commit {
    /// (key, value) of each result.
    pub results: Vec<(String, Vec<u8>)>,
    /// (key, value) of each feedback sample.
    pub samples: Vec<(String, Vec<u8>)>,
    pub changes: Vec<(String, Option<Vec<u8>>)>,
    pub letters: Vec<OwnedLetter>,
    /// The next request offset to read, committed with the transaction
    /// (None: nothing was read since the last commit that moved it).
    pub next_offset: Option<i64>,
    /// The same for the outcome events.
    pub next_outcome_offset: Option<i64>,
}

/// A partition's transactional producer. A `BaseProducer` with no polling
/// thread of its own: its delivery reports are served by the commit that
/// waits for them (`wait_delivered`), on the partition's transaction thread.
/// (A `ThreadedProducer` per partition costs a thread that wakes constantly:
/// ~6% of the worker's core under load, 16 partitions.) That thread and the
/// producer's librdkafka threads are started at the process's priority, not
/// the niced partition loop's (see `priority`).
pub struct Transactions {
    producer: Arc<BaseProducer<DefaultProducerContext>>,
    thread: JobThread,
    topics: Topics,
    partition: i32,
}

impl Transactions {
    /// Creates the partition's transactional producer and fences every
    /// earlier producer of the partition (aborting its open transaction).
    pub async fn open(
        bootstrap: &str,
        transactional_id: &str,
        topics: Topics,
        partition: i32,
    ) -> anyhow::Result<Self> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("transactional.id", transactional_id)
            .set("transaction.timeout.ms", "60000")
            .set("linger.ms", "1")
            // The next transaction's AddPartitionsToTxn and AddOffsetsToTxn are
            // refused with CONCURRENT_TRANSACTIONS until the coordinator has
            // written the last one's markers (2-3 ms on the local broker);
            // librdkafka retries after retry.backoff.ms (100 ms by default,
            // doubling up to retry.backoff.max.ms). A short constant backoff
            // costs one or two refused requests per commit and keeps the wait
            // within 2 ms of the markers (5 ms doubling to 50 ms: ~8 ms).
            .set("retry.backoff.ms", "2")
            .set("retry.backoff.max.ms", "2")
            .set("queue.buffering.max.messages", "1000000");
        let thread = JobThread::start(format!("txn-{partition}")).await?;
        let producer: BaseProducer<DefaultProducerContext> =
            thread.run(move || config.create()).await??;
        let producer = Arc::new(producer);
        let p = producer.clone();
        thread
            .run(move || p.init_transactions(CALL_TIMEOUT))
            .await?
            .map_err(|e| anyhow::anyhow!("init_transactions for {transactional_id}: {e}"))?;
        Ok(Transactions {
            producer,
            thread,
            topics,
            partition,
        })
    }

    /// Writes `commit` in one transaction; how long the transaction took
    /// (from its begin to its commit, on the transaction thread). Any error
    /// leaves nothing visible; the caller then gives the partition up (its
    /// in-memory state is ahead of what was committed) and the next owner
    /// restores from the changelog.
    pub async fn commit(
        &self,
        commit: Commit,
        group: ConsumerGroupMetadata,
    ) -> anyhow::Result<Duration> {
        let producer = self.producer.clone();
        let topics = self.topics.clone();
        let partition = self.partition;
        let mut offsets = TopicPartitionList::new();
        if let Some(next) = commit.next_offset {
            offsets.add_partition_offset(&topics.source, partition, Offset::Offset(next))?;
        }
        if let (Some(next), Some(f)) = (commit.next_outcome_offset, &topics.feedback) {
            offsets.add_partition_offset(&f.outcomes, partition, Offset::Offset(next))?;
        }
        self.thread
            .run(move || {
                let started = std::time::Instant::now();
                producer.begin_transaction()?;
                let written = write_all(&producer, &topics, partition, &commit)
                    .and_then(|()| {
                        if offsets.count() == 0 {
                            return Ok(());
                        }
                        producer.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)
                    })
                    .and_then(|()| wait_delivered(&producer, CALL_TIMEOUT))
                    .and_then(|()| producer.commit_transaction(CALL_TIMEOUT));
                tracing::debug!(
                    micros = started.elapsed().as_micros() as u64,
                    results = commit.results.len(),
                    changes = commit.changes.len(),
                    "transaction"
                );
                if written.is_err() {
                    // Best effort: a fenced producer cannot abort, and need not.
                    let _ = producer.abort_transaction(CALL_TIMEOUT);
                }
                written.map(|()| started.elapsed())
            })
            .await?
            .map_err(|e| anyhow::anyhow!("transaction of partition {partition}: {e}"))
    }

    /// Aborts an open transaction, if any (on fencing: nothing more is written).
    pub async fn abort_quietly(&self) {
        let producer = self.producer.clone();
        let _ = self
            .thread
            .run(move || {
                producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
                let _ = producer.abort_transaction(Duration::from_secs(5));
            })
            .await;
    }
}

fn write_all(
    producer: &BaseProducer<DefaultProducerContext>,
    topics: &Topics,
    partition: i32,
    commit: &Commit,
) -> Result<(), KafkaError> {
    let results_partition = partition % topics.results_partitions.max(1);
    for (key, value) in &commit.results {
        send(
            producer,
            BaseRecord::to(&topics.results)
                .partition(results_partition)
                .key(key.as_bytes())
                .payload(value.as_slice()),
        )?;
    }
    if let Some(f) = &topics.feedback {
        let samples_partition = partition % f.samples_partitions.max(1);
        for (key, value) in &commit.samples {
            send(
                producer,
                BaseRecord::to(&f.samples)
                    .partition(samples_partition)
                    .key(key.as_bytes())
                    .payload(value.as_slice()),
            )?;
        }
    }
    for (key, value) in &commit.changes {
        let mut record = BaseRecord::<[u8], [u8]>::to(&topics.changelog)
            .partition(partition)
            .key(key.as_bytes());
        if let Some(v) = value {
            record = record.payload(v.as_slice());
        }
        send(producer, record)?;
    }
    for letter in &commit.letters {
        let headers = Letter {
            key: letter.key.as_deref(),
            value: letter.value.as_deref(),
            partition,
            offset: letter.offset,
            reason: &letter.reason,
        }
        .headers(&letter.topic);
        let mut record = BaseRecord::<[u8], [u8]>::to(&topics.dead_letters).headers(headers);
        if let Some(k) = &letter.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &letter.value {
            record = record.payload(v.as_slice());
        }
        send(producer, record)?;
    }
    Ok(())
}

/// Waits until every record handed to the producer has been acknowledged,
/// serving the delivery reports as they come.
///
/// rust-rdkafka's `commit_transaction` flushes first, and that flush polls
/// for up to 100 ms at a time while anything is in flight (its poll loops
/// until its timeout however early a report arrives): a commit would take
/// ~100 ms whenever a record is still unacknowledged - most commits, since
/// the records wait for AddPartitionsToTxn (see `retry.backoff.ms`). Serving
/// the reports here in short steps leaves the flush nothing to wait for: a
/// commit then takes a few milliseconds.
fn wait_delivered(
    producer: &BaseProducer<DefaultProducerContext>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let before = producer.in_flight_count();
        // One non-blocking pass: `BaseProducer::poll` with a timeout spins
        // for its last millisecond (it hands librdkafka whole milliseconds,
        // 0 once less than one remains), burning the core the partition
        // loops need.
        producer.poll(Duration::ZERO);
        let after = producer.in_flight_count();
        if after == 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        if after == before {
            std::thread::sleep(DELIVERY_POLL);
        }
    }
}

/// Enqueues a record, waiting while librdkafka's queue is full.
fn send<'a>(
    producer: &BaseProducer<DefaultProducerContext>,
    mut record: BaseRecord<'a, [u8], [u8]>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                // Delivery reports count against the queue until served.
                producer.poll(Duration::ZERO);
                std::thread::sleep(DELIVERY_POLL);
            }
            Err((e, _)) => return Err(e),
        }
    }
}
