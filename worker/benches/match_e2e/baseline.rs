//! The baseline: a bare rdkafka exactly-once pipe, run as a child process of
//! this very binary, pinned to the worker's core. Per partition (like the
//! worker): one consumer `assign()`ed at the group's committed offset
//! (read_committed), one transactional `BaseProducer`; each request is
//! parsed (the worker's `parse_request`) and answered with one result
//! record of the results' size; every 200 ms (the worker's commit interval)
//! the results and the input offset are committed in one transaction. It
//! has no windows, no matching and no state: what the worker costs beyond it
//! is matchfleet's matching and state, not Kafka's exactly-once.
//!
//! Before each commit it serves its delivery reports until no record is in
//! flight, as the worker waits for them: rust-rdkafka's `commit_transaction`
//! would otherwise wait 100 ms in its flush (see `probes`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use matchfleet_api::matching::{parse_request, ExpiryReason, MatchResult};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::kafka::{wait_committed, OffsetWatch};
use crate::report::Measured;
use crate::system::{self, Children, CpuMark};
use crate::{Settings, DIMENSION};

/// Set (to the JSON of `BaselineArgs`) when this binary runs as the baseline.
pub const ROLE_ENV: &str = "MATCH_E2E_BASELINE";
/// How long one transactional call may block (as the worker).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The worker's defaults: commit at least this often while reading, take up
/// to BURST queued records at once, look at the clock every TICK.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
const BURST: usize = 512;
const TICK: Duration = Duration::from_millis(10);

#[derive(Serialize, Deserialize)]
struct BaselineArgs {
    bootstrap: String,
    topic: String,
    results: String,
    group: String,
    transactional_id_prefix: String,
    partitions: i32,
}

/// Runs the baseline over the backlog: from its start until its group's
/// committed offsets reach the end of the request topic.
pub async fn run(s: &Settings, dir: &Path, broker: Option<u32>) -> anyhow::Result<Measured> {
    let args = serde_json::to_string(&BaselineArgs {
        bootstrap: s.bootstrap.clone(),
        topic: s.topic(),
        results: s.baseline_results_topic(),
        group: s.baseline_group(),
        transactional_id_prefix: format!("{}.baseline", s.topic()),
        partitions: s.partitions,
    })?;
    let exe = std::env::current_exe().context("finding the bench binary")?;
    let logs = [dir.join("baseline.log")];
    let watch = OffsetWatch::new(s, &s.baseline_group())?;
    let end = watch.ends_async().await?;
    let mut children = Children::default();
    let start = Instant::now();
    let pid = system::spawn_pinned(
        Some(s.worker_cpu),
        &exe,
        &[],
        &[(ROLE_ENV, args)],
        &logs[0],
        &mut children,
    )?;
    let mark = CpuMark::new(broker, &[pid]);
    let progress = wait_committed(&watch, start, end, deadline(end), || {
        children.check_alive(&logs)
    })
    .await
    .context("baseline")?;
    let cpu = mark.spent();
    let threads = system::thread_names(pid);
    drop(children);
    Ok(Measured {
        requests: end as u64,
        progress,
        cpu,
        threads,
        warnings: system::warnings(&logs[0]),
    })
}

/// Generous: a contender slower than this is stuck, not slow.
pub fn deadline(requests: i64) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(requests.max(0) as u64 / 100)
}

/// The child's `main`: pipes every partition until it is killed.
pub fn child_main(json: &str) -> i32 {
    let args: BaselineArgs = match serde_json::from_str(json) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("baseline: {ROLE_ENV} is not valid: {e}");
            return 2;
        }
    };
    // Under `taskset -c <cpu>` the runtime sees one core: one worker thread,
    // as the match worker has.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("baseline: no tokio runtime: {e}");
            return 1;
        }
    };
    let result = runtime.block_on(async move {
        let args = Arc::new(args);
        let pipes = (0..args.partitions).map(|p| {
            tokio::spawn(pipe(args.clone(), p)).map(|joined| match joined {
                Ok(r) => r,
                Err(e) => Err(anyhow::anyhow!("partition task: {e}")),
            })
        });
        futures::future::try_join_all(pipes).await
    });
    match result {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("baseline: {e:#}");
            1
        }
    }
}

async fn pipe(args: Arc<BaselineArgs>, partition: i32) -> anyhow::Result<()> {
    // The worker's producer settings (txn.rs), on a BaseProducer.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set(
            "transactional.id",
            format!("{}.{partition}", args.transactional_id_prefix),
        )
        .set("transaction.timeout.ms", "60000")
        .set("linger.ms", "1")
        .set("retry.backoff.ms", "2")
        .set("retry.backoff.max.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let producer = Arc::new(producer);
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(CALL_TIMEOUT))
        .await?
        .context("init_transactions")?;
    producer.begin_transaction()?;
    // The worker's consumer settings (partition.rs).
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&args.topic, partition, Offset::Stored)?;
    consumer.assign(&tpl)?;

    let mut stream = consumer.stream();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_commit = Instant::now();
    let mut next_offset = None;
    let mut uncommitted = 0usize;
    loop {
        tokio::select! {
            next = stream.next() => {
                let Some(first) = next else { anyhow::bail!("the request stream ended") };
                answer(&producer, &args, partition, first?, &mut next_offset)?;
                uncommitted += 1;
                for _ in 1..BURST {
                    match stream.next().now_or_never() {
                        Some(Some(more)) => {
                            answer(&producer, &args, partition, more?, &mut next_offset)?;
                            uncommitted += 1;
                        }
                        _ => break,
                    }
                }
                // Serve the delivery reports of earlier records.
                producer.poll(Duration::ZERO);
            }
            _ = tick.tick() => {}
        }
        let Some(next) = next_offset else { continue };
        if uncommitted == 0 || last_commit.elapsed() < COMMIT_INTERVAL {
            continue;
        }
        let group = consumer
            .group_metadata()
            .context("the consumer has no group metadata")?;
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(&args.topic, partition, Offset::Offset(next))?;
        let p = producer.clone();
        tokio::task::spawn_blocking(move || -> KafkaResult<()> {
            p.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)?;
            serve_deliveries(&p)?;
            p.commit_transaction(CALL_TIMEOUT)?;
            p.begin_transaction()
        })
        .await?
        .with_context(|| format!("transaction of partition {partition}"))?;
        uncommitted = 0;
        last_commit = Instant::now();
    }
}

/// Serves delivery reports until no record is in flight. rust-rdkafka's
/// `commit_transaction` first flushes, and its flush polls for a full 100 ms
/// (`BaseProducer::poll` runs until its timeout) whenever a record is still
/// in flight; after this it finds none.
pub fn serve_deliveries(producer: &BaseProducer) -> KafkaResult<()> {
    let deadline = Instant::now() + CALL_TIMEOUT;
    while producer.in_flight_count() > 0 {
        if Instant::now() > deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        producer.poll(Duration::from_millis(1));
    }
    Ok(())
}

/// Parses one request and produces its result record.
fn answer(
    producer: &BaseProducer,
    args: &BaselineArgs,
    partition: i32,
    message: BorrowedMessage<'_>,
    next_offset: &mut Option<i64>,
) -> anyhow::Result<()> {
    *next_offset = Some(message.offset() + 1);
    // The bench sends no malformed requests; one would only be skipped.
    let Ok(request) = parse_request(message.key(), message.payload(), DIMENSION) else {
        return Ok(());
    };
    let segment = request.segment.clone();
    let result = MatchResult::Expired {
        request_id: request.request_id,
        user: request.user,
        segment: request.segment,
        partition,
        event_time: request.event_time,
        windows: 0,
        reason: ExpiryReason::NoPartner,
        closed_at: system::wall_millis(),
    };
    let payload = serde_json::to_vec(&result)?;
    let mut record = BaseRecord::<str, [u8]>::to(&args.results)
        .partition(partition)
        .key(segment.as_str())
        .payload(&payload);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                producer.poll(Duration::from_millis(1));
                record = back;
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}
