//! Kafka plumbing of the bench: topics, the request producer, and reading a
//! consumer group's committed offsets (how far a contender has committed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::workload::{Outgoing, Workload};
use crate::Settings;

/// A metadata or offsets call may take this long before the bench gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn reachable(bootstrap: &str) -> anyhow::Result<()> {
    let bootstrap = bootstrap.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        consumer.fetch_metadata(None, Duration::from_secs(5))?;
        Ok(())
    })
    .await?
}

fn admin(bootstrap: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?)
}

pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let results = admin(bootstrap)?
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT)),
        )
        .await?;
    for r in results {
        r.map_err(|(t, code)| anyhow::anyhow!("creating topic {t}: {code}"))?;
    }
    Ok(())
}

/// Deletes the run's topics and consumer groups. Best effort: some may never
/// have been created. (Transactional ids cannot be deleted; the broker
/// expires them after `transactional.id.expiration.ms`.)
pub async fn delete_run_state(bootstrap: &str, topics: &[String], groups: &[String]) {
    let Ok(admin) = admin(bootstrap) else { return };
    let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &options).await;
    let names: Vec<&str> = groups.iter().map(String::as_str).collect();
    let _ = admin.delete_groups(&names, &options).await;
}

/// Counts delivery reports, so a producer that is never awaited still
/// reports lost records.
#[derive(Default)]
pub struct Counting {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() {
            &self.delivered
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub type RequestProducer = ThreadedProducer<Counting>;

/// The load generator's producer: plain (not transactional) and batched.
pub fn request_producer(s: &Settings) -> anyhow::Result<RequestProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create_with_context(Counting::default())?)
}

/// Hands one request to the producer; `Ok(false)` when its queue is full
/// (the caller waits a moment and tries again).
pub fn try_send(
    producer: &RequestProducer,
    topic: &str,
    record: &Outgoing,
) -> anyhow::Result<bool> {
    let sent = producer.send(
        BaseRecord::<str, [u8]>::to(topic)
            .partition(record.partition)
            .key(&record.key)
            .payload(&record.payload),
    );
    match sent {
        Ok(()) => Ok(true),
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => Ok(false),
        Err((e, _)) => Err(e).context("producing a request"),
    }
}

/// Sends one request, waiting while the producer's queue is full.
pub async fn send(
    producer: &RequestProducer,
    topic: &str,
    record: &Outgoing,
) -> anyhow::Result<()> {
    while !try_send(producer, topic, record)? {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

pub struct Produced {
    pub requests: u64,
    pub seconds: f64,
    /// The share of requests in the largest segment.
    pub largest_segment_share: f64,
}

/// The backlog: `s.backlog` requests whose event times are spaced as if they
/// had arrived at `s.rate`, the last one now.
pub async fn produce_backlog(s: &Settings, load: &mut Workload) -> anyhow::Result<Produced> {
    let producer = request_producer(s)?;
    let topic = s.topic();
    let now = crate::system::wall_millis();
    let span = (s.backlog as f64 * 1000.0 / s.rate) as i64;
    let started = Instant::now();
    for i in 0..s.backlog {
        let event_time = now - span + (i as f64 * 1000.0 / s.rate) as i64;
        let record = load.next(event_time);
        send(&producer, &topic, &record).await?;
    }
    let p = Arc::new(producer);
    let flushing = p.clone();
    tokio::task::spawn_blocking(move || flushing.flush(Duration::from_secs(120)))
        .await?
        .context("flushing the backlog")?;
    let failed = p.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        anyhow::bail!("{failed} backlog requests were not delivered");
    }
    Ok(Produced {
        requests: s.backlog,
        seconds: started.elapsed().as_secs_f64(),
        largest_segment_share: load.largest_segment_share(),
    })
}

/// Offsets used in a topic (the sum of its partitions' high watermarks):
/// its records plus one transaction marker per committed transaction and
/// partition.
pub async fn topic_offsets(bootstrap: &str, topic: &str) -> anyhow::Result<i64> {
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), CALL_TIMEOUT)?;
        let mut total = 0;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) = consumer.fetch_watermarks(&topic, p.id(), CALL_TIMEOUT)?;
                total += high;
            }
        }
        Ok(total)
    })
    .await?
}

/// Reads how far a consumer group has committed on the request topic, and
/// where the topic ends. Blocking calls: use from `spawn_blocking`.
#[derive(Clone)]
pub struct OffsetWatch {
    consumer: Arc<BaseConsumer>,
    topic: String,
    partitions: i32,
}

impl OffsetWatch {
    pub fn new(s: &Settings, group: &str) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &s.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(OffsetWatch {
            consumer: Arc::new(consumer),
            topic: s.topic(),
            partitions: s.partitions,
        })
    }

    /// Sum over the partitions of the committed offsets (0 where none).
    pub fn committed(&self) -> anyhow::Result<i64> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self.consumer.committed_offsets(tpl, CALL_TIMEOUT)?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum())
    }

    /// Sum over the partitions of the high watermarks: records produced.
    pub fn ends(&self) -> anyhow::Result<i64> {
        let mut total = 0;
        for p in 0..self.partitions {
            let (_, high) = self
                .consumer
                .fetch_watermarks(&self.topic, p, CALL_TIMEOUT)?;
            total += high;
        }
        Ok(total)
    }

    pub async fn committed_async(&self) -> anyhow::Result<i64> {
        let watch = self.clone();
        tokio::task::spawn_blocking(move || watch.committed()).await?
    }

    pub async fn ends_async(&self) -> anyhow::Result<i64> {
        let watch = self.clone();
        tokio::task::spawn_blocking(move || watch.ends()).await?
    }
}

/// Commits of a contender seen from outside: polls the group's committed
/// offsets until they reach `end`, noting when they first moved.
pub struct CommitProgress {
    /// From the start to the first committed offset.
    pub first: Duration,
    /// From the start to the offsets reaching the end.
    pub done: Duration,
    /// Committed at the first poll that saw any (the steady rate leaves it out).
    pub first_committed: i64,
}

pub async fn wait_committed(
    watch: &OffsetWatch,
    start: Instant,
    end: i64,
    deadline: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<CommitProgress> {
    let mut first = None;
    loop {
        let committed = watch.committed_async().await?;
        let elapsed = start.elapsed();
        if committed > 0 && first.is_none() {
            first = Some((elapsed, committed));
        }
        if committed >= end {
            let (first, first_committed) = first.unwrap_or((elapsed, committed));
            return Ok(CommitProgress {
                first,
                done: elapsed,
                first_committed,
            });
        }
        if elapsed > deadline {
            anyhow::bail!("only {committed} of {end} requests committed after {elapsed:?}");
        }
        alive()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
