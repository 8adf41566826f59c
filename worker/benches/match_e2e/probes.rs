//! Sequential transactions on an idle pipeline (one record to the results,
//! one to the state, the input offset): the floor under close→visible, and
//! where a commit's time goes with each way of driving librdkafka.
//!
//! * the worker's own `txn::Transactions` (a `BaseProducer` whose commit
//!   serves its delivery reports until none is in flight, 1 ms apart, before
//!   `commit_transaction`);
//! * a bare `BaseProducer` that serves its delivery reports until none is
//!   in flight before `commit_transaction` (the baseline's way);
//! * a bare `BaseProducer` and a bare `ThreadedProducer` calling
//!   `commit_transaction` at once. rust-rdkafka's `commit_transaction`
//!   flushes first; its flush calls `rd_kafka_flush(0)` and, while a record
//!   is in flight, `poll(min(remaining, 100 ms))` - and `BaseProducer::poll`
//!   runs until its timeout, however early the delivery report comes. So a
//!   commit with a record in flight takes 100 ms more: always for the
//!   `BaseProducer` (nobody served its reports), whenever the acks were not
//!   in yet for the `ThreadedProducer` (its own thread serves them). The
//!   latter was the worker's commit before txn.rs waited for its records.

use std::time::{Duration, Instant};

use anyhow::Context;
use matchfleet_worker::match_mode::txn::{Commit, Topics, Transactions};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaResult;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, Producer, ThreadedProducer,
};
use rdkafka::{Offset, TopicPartitionList};

use crate::baseline::serve_deliveries;
use crate::kafka;
use crate::report::Stats;
use crate::Settings;

const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Transactions timed per probe, after a few that pay for metadata and the
/// producer id.
const ROUNDS: usize = 100;
const WARM_UP: usize = 3;
/// The probes that wait 100 ms per commit: fewer rounds.
const SLOW_ROUNDS: usize = 30;

pub struct Probes {
    pub warm_up: WarmUp,
    pub worker: Stats,
    pub base_served: Stats,
    pub base_at_once: Stats,
    pub threaded_at_once: Stats,
}

pub async fn run(s: &Settings) -> anyhow::Result<Probes> {
    let topic = s.probe_topic();
    kafka::create_topic(&s.bootstrap, &topic, 1).await?;
    let (bootstrap, t, group) = (s.bootstrap.clone(), topic.clone(), probe_group(s));
    tokio::task::spawn_blocking(move || group_offsets_ready(&bootstrap, &t, &group)).await??;
    let warm_up = warm_up(s, &topic).await?;
    let worker = worker_transactions(s, &topic, Rounds::Count(WARM_UP + ROUNDS))
        .await?
        .split_off(WARM_UP);
    let worker = Stats::of_durations(worker);
    let (bootstrap, t, group) = (s.bootstrap.clone(), topic.clone(), probe_group(s));
    let base_served = tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = transactional(&bootstrap, &format!("{t}.base-served"))?;
        bare_transactions(
            &producer,
            &bootstrap,
            &t,
            &group,
            ROUNDS,
            |p, r| p.send(r).map_err(|(e, _)| e),
            serve_deliveries,
        )
    })
    .await??;
    let (bootstrap, t, group) = (s.bootstrap.clone(), topic.clone(), probe_group(s));
    let base_at_once = tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = transactional(&bootstrap, &format!("{t}.base"))?;
        bare_transactions(
            &producer,
            &bootstrap,
            &t,
            &group,
            SLOW_ROUNDS,
            |p, r| p.send(r).map_err(|(e, _)| e),
            |_| Ok(()),
        )
    })
    .await??;
    let (bootstrap, t, group) = (s.bootstrap.clone(), topic.clone(), probe_group(s));
    let threaded_at_once = tokio::task::spawn_blocking(move || {
        let producer: ThreadedProducer<DefaultProducerContext> =
            transactional(&bootstrap, &format!("{t}.threaded"))?;
        bare_transactions(
            &producer,
            &bootstrap,
            &t,
            &group,
            SLOW_ROUNDS,
            |p, r| p.send(r).map_err(|(e, _)| e),
            |_| Ok(()),
        )
    })
    .await??;
    Ok(Probes {
        warm_up,
        worker,
        base_served,
        base_at_once,
        threaded_at_once,
    })
}

fn probe_group(s: &Settings) -> String {
    format!("{}.probe", s.topic())
}

/// A consumer of the probe group, for the group metadata transactions need.
fn group_consumer(bootstrap: &str, topic: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Waits until the probe group can commit offsets. A broker that never had
/// a consumer group creates `__consumer_offsets` on the first commit; when
/// that first commit was a transaction's, the transaction failed ("old
/// epoch") and the bench went down its slow error path.
fn group_offsets_ready(bootstrap: &str, topic: &str, group: &str) -> anyhow::Result<()> {
    let consumer = group_consumer(bootstrap, topic, group)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(0))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("match_e2e: waiting for the group coordinator: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e).context("the probe group cannot commit offsets"),
        }
    }
}

fn metadata(consumer: &BaseConsumer) -> anyhow::Result<ConsumerGroupMetadata> {
    consumer
        .group_metadata()
        .context("the probe consumer has no group metadata")
}

/// The broker's warm-up: sequential transactions for a while before anything
/// is measured. A JVM broker answers slowly until its JIT has compiled the
/// request paths: right after its start an idle transaction took 26-33 ms
/// (p50) here, after a few thousand 3-5 ms, and a long-running cluster
/// broker is the case the figures are for.
pub struct WarmUp {
    pub seconds: f64,
    pub transactions: usize,
    pub first: Stats,
    pub last: Stats,
}

async fn warm_up(s: &Settings, topic: &str) -> anyhow::Result<WarmUp> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(s.warm_up_seconds);
    let mut times = worker_transactions(s, topic, Rounds::Until(deadline)).await?;
    let n = times.len();
    let last = times.split_off(n.saturating_sub(100));
    times.truncate(100);
    Ok(WarmUp {
        seconds: started.elapsed().as_secs_f64(),
        transactions: n,
        first: Stats::of_durations(times),
        last: Stats::of_durations(last),
    })
}

enum Rounds {
    Count(usize),
    Until(Instant),
}

/// Sequential transactions of the worker's `Transactions`; their durations.
async fn worker_transactions(
    s: &Settings,
    topic: &str,
    rounds: Rounds,
) -> anyhow::Result<Vec<Duration>> {
    let topics = Topics {
        source: topic.to_string(),
        results: topic.to_string(),
        results_partitions: 1,
        changelog: topic.to_string(),
        dead_letters: topic.to_string(),
        feedback: None,
    };
    let txn = Transactions::open(&s.bootstrap, &format!("{topic}.worker"), topics, 0).await?;
    let consumer = group_consumer(&s.bootstrap, topic, &probe_group(s))?;
    let mut times = Vec::new();
    for i in 0.. {
        let more = match rounds {
            Rounds::Count(n) => i < n,
            Rounds::Until(t) => i == 0 || Instant::now() < t,
        };
        if !more {
            break;
        }
        let commit = Commit {
            results: vec![("probe".into(), br#"{"probe":true}"#.to_vec())],
            changes: vec![("probe/state".into(), Some(br#"{"probe":true}"#.to_vec()))],
            next_offset: Some(i as i64),
            ..Commit::default()
        };
        let started = Instant::now();
        txn.commit(commit, metadata(&consumer)?).await?;
        times.push(started.elapsed());
    }
    Ok(times)
}

fn transactional<C: rdkafka::config::FromClientConfig>(
    bootstrap: &str,
    id: &str,
) -> anyhow::Result<C> {
    // The worker's producer settings (txn.rs).
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", id)
        .set("transaction.timeout.ms", "60000")
        .set("linger.ms", "1")
        .set("retry.backoff.ms", "2")
        .set("retry.backoff.max.ms", "2")
        .create()?)
}

/// `rounds` transactions of two records and an offset, each timed from
/// `begin_transaction` until `commit_transaction` returns.
fn bare_transactions<P: Producer>(
    producer: &P,
    bootstrap: &str,
    topic: &str,
    group: &str,
    rounds: usize,
    send: impl Fn(&P, BaseRecord<'_, str, str>) -> KafkaResult<()>,
    before_commit: impl Fn(&P) -> KafkaResult<()>,
) -> anyhow::Result<Stats> {
    let consumer = group_consumer(bootstrap, topic, group)?;
    producer.init_transactions(CALL_TIMEOUT)?;
    let mut times = Vec::with_capacity(rounds);
    for i in 0..WARM_UP + rounds {
        let started = Instant::now();
        producer.begin_transaction()?;
        send(
            producer,
            BaseRecord::to(topic)
                .key("probe")
                .payload(r#"{"probe":true}"#),
        )?;
        send(
            producer,
            BaseRecord::to(topic)
                .key("probe/state")
                .payload(r#"{"probe":true}"#),
        )?;
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(topic, 0, Offset::Offset(i as i64))?;
        producer.send_offsets_to_transaction(&offsets, &metadata(&consumer)?, CALL_TIMEOUT)?;
        before_commit(producer)?;
        producer.commit_transaction(CALL_TIMEOUT)?;
        if i >= WARM_UP {
            times.push(started.elapsed());
        }
    }
    Ok(Stats::of_durations(times))
}
