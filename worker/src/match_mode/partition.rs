//! The work on one leased partition: fence the previous owner, restore the
//! state, then read requests (and, with a feedback join, the outcome events
//! of the same partition number) from the committed offsets and commit each
//! step (results + samples + state changes + dead letters + offsets) in one
//! transaction, only while the lease guard is valid.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use matchfleet_api::feedback::{parse_outcome, FeedbackSample};
use matchfleet_api::matching::{parse_request, MatchResult};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{error, info, warn, Instrument};

use super::metrics::MatchMetrics;
use super::priority::{at_default, JobThread};
use super::restore;
use super::scorers::score_http_windows;
use super::txn::{Commit, OwnedLetter, Transactions};
use super::MatchWorker;
use crate::fleet::guard::LeaseGuard;
use crate::fleet::keeper::{PartitionWorker, WorkEnd};
use crate::matching::{OutcomeFate, PartitionEngine};

/// Requests taken from the consumer's queue at once before windows are checked.
const BURST: usize = 512;
/// How often due windows are checked when no request arrives (idle close).
const TICK: Duration = Duration::from_millis(10);
/// Pause after a consume error.
const CONSUME_ERROR_BACKOFF: Duration = Duration::from_millis(200);

impl PartitionWorker for MatchWorker {
    fn run(self: Arc<Self>, guard: Arc<LeaseGuard>) -> BoxFuture<'static, WorkEnd> {
        let span = tracing::info_span!("partition", lane = %guard.lane, partition = guard.partition, epoch = guard.epoch);
        Box::pin(
            async move {
                match self.work(&guard).await {
                    Ok(end) => end,
                    Err(e) => {
                        error!(error = %e, "partition work failed; giving the lease back");
                        guard.fence();
                        WorkEnd::Killed
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// What was read but not yet committed.
#[derive(Default)]
struct Uncommitted {
    results: Vec<MatchResult>,
    samples: Vec<FeedbackSample>,
    letters: Vec<OwnedLetter>,
    /// The next request offset to read, once any request was read.
    next_offset: Option<i64>,
    /// The same for outcome events.
    next_outcome_offset: Option<i64>,
    /// Whether anything was read since the last commit.
    read: bool,
}

/// Room for one result record's JSON up front (a match is ~350 bytes with
/// the ids the load generator uses; longer ids grow the buffer once).
const RESULT_JSON_CAPACITY: usize = 384;

fn wall_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl MatchWorker {
    async fn consumer(&self, partition: i32) -> anyhow::Result<StreamConsumer> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            // A fetch answers once 64 KB are ready or after 50 ms. With the
            // defaults of 1 byte and this pipeline's old 10 ms, every
            // partition's consumer fetched again as soon as one request
            // arrived: thousands of fetches/s against the broker under a
            // steady trickle, and 100/s per idle partition. Requests wait
            // for their window (a second by default) anyway; 50 ms of read
            // delay at low rates is the price.
            .set("fetch.wait.max.ms", "50")
            .set("fetch.min.bytes", "65536");
        // librdkafka's threads at the process's priority (see `priority`).
        let consumer: StreamConsumer = at_default(move || config.create()).await??;
        let mut tpl = TopicPartitionList::new();
        // `Stored`: the offset the last committed transaction left (earliest if none).
        tpl.add_partition_offset(&self.topics.source, partition, Offset::Stored)?;
        if let Some(f) = &self.topics.feedback {
            tpl.add_partition_offset(&f.outcomes, partition, Offset::Stored)?;
        }
        consumer.assign(&tpl)?;
        Ok(consumer)
    }

    async fn work(&self, guard: &LeaseGuard) -> anyhow::Result<WorkEnd> {
        let partition = guard.partition;
        let started = Instant::now();
        // Fence first: after this no earlier owner can commit, and its open
        // transaction is aborted, so the state read next is final.
        let txn = Transactions::open(
            &self.bootstrap,
            &self.transactional_id(partition),
            self.topics.clone(),
            partition,
        )
        .await?;
        // The restore's reads (and their consumers' librdkafka threads) at the
        // process's priority, not the niced loops' (see `priority`).
        let restorer = JobThread::start(format!("restore-{partition}")).await?;
        let (bootstrap, changelog) = (self.bootstrap.clone(), self.topics.changelog.clone());
        let records = restorer
            .run(move || restore::read_partition(&bootstrap, &changelog, partition))
            .await??;
        MatchMetrics::add(&self.metrics.restored_records, records.len() as u64);
        let restored = records.len();
        let restoring = PartitionEngine::restore(partition, self.engine_config.clone(), records)
            .map_err(|e| anyhow::anyhow!("cannot restore partition {partition}'s state: {e}"))?;
        let (bootstrap, source) = (self.bootstrap.clone(), self.topics.source.clone());
        let dimension = self.engine_config.dimension();
        let (mut engine, replayed) = restorer
            .run(move || {
                restore::replay_pending(&bootstrap, &source, partition, dimension, restoring)
            })
            .await?
            .map_err(|e| {
                anyhow::anyhow!("cannot restore partition {partition}'s pending requests: {e}")
            })?;
        // Its thread ends here rather than idling for the partition's lifetime.
        drop(restorer);
        MatchMetrics::add(&self.metrics.replayed_requests, replayed as u64);
        guard.set_counters(engine.counters());
        if !guard.valid() {
            return Ok(WorkEnd::Killed);
        }
        let consumer = self.consumer(partition).await?;
        if consumer.group_metadata().is_none() {
            anyhow::bail!("the consumer has no group metadata");
        }
        info!(
            restored,
            replayed,
            pending = engine.pending(),
            millis = started.elapsed().as_millis() as u64,
            "partition taken"
        );

        let mut stream = consumer.stream();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_commit = Instant::now();
        let mut pending = Uncommitted::default();
        let mut releasing = false;
        loop {
            // Whichever runtime thread runs this iteration.
            super::priority::lower_this_thread();
            tokio::select! {
                biased;
                _ = guard.fenced() => {
                    txn.abort_quietly().await;
                    return Ok(WorkEnd::Killed);
                }
                _ = guard.releasing(), if !releasing => {
                    releasing = true;
                    info!("release: committing what was read, then handing over");
                }
                next = stream.next(), if !releasing => {
                    let Some(first) = next else { return Ok(WorkEnd::Killed) };
                    let mut healthy = self.take(&mut engine, &mut pending, first);
                    // Whatever else is already queued, without waiting.
                    for _ in 1..BURST {
                        if !healthy {
                            break;
                        }
                        match stream.next().now_or_never() {
                            Some(Some(more)) => healthy = self.take(&mut engine, &mut pending, more),
                            _ => break,
                        }
                    }
                    if !healthy {
                        // The consumer is failing (broker gone, partition
                        // moving): back off rather than spin and flood the log;
                        // windows still close by the tick below.
                        tokio::time::sleep(CONSUME_ERROR_BACKOFF).await;
                    } else {
                        // rdkafka's stream is always ready under a backlog and
                        // is outside tokio's co-operative budget: without this
                        // the loop would run until its next commit, starving the
                        // other partitions and the heartbeat (leases then lapse
                        // on a saturated core).
                        tokio::task::yield_now().await;
                    }
                }
                _ = tick.tick() => {}
            }
            let now = wall_millis();
            // Listing the due windows costs a pass over each one; only HTTP
            // scorers need it (builtin ones are chosen and run by `close`).
            let external = if self.engine_config.has_http_scorers() {
                let due = engine.due(now);
                // Nothing is read while HTTP scorers answer, so the windows
                // `close` sees are the ones `due` listed.
                let external = score_http_windows(&self.scorer_client, &due).await;
                let asked = due.iter().filter(|w| w.http.is_some()).count();
                MatchMetrics::add(
                    &self.metrics.http_scorer_fallbacks,
                    (asked - external.len()) as u64,
                );
                external
            } else {
                HashMap::new()
            };
            let closed_before = (
                engine.windows_closed(),
                engine.windows_prescored(),
                engine.windows_presorted(),
            );
            let close_started = Instant::now();
            pending.results.extend(engine.close(now, &external));
            let closed = engine.windows_closed() - closed_before.0;
            if closed > 0 {
                self.metrics
                    .latencies
                    .close
                    .observe(close_started.elapsed());
            }
            MatchMetrics::add(&self.metrics.windows_closed, closed);
            MatchMetrics::add(
                &self.metrics.windows_prescored,
                engine.windows_prescored() - closed_before.1,
            );
            MatchMetrics::add(
                &self.metrics.windows_presorted,
                engine.windows_presorted() - closed_before.2,
            );
            pending.samples.extend(engine.settle_feedback(now));
            let settled = !pending.results.is_empty()
                || !pending.samples.is_empty()
                || !pending.letters.is_empty();
            let stale = pending.read && last_commit.elapsed() >= self.commit_interval;
            if settled || stale || (releasing && pending.read) {
                if !guard.valid() {
                    txn.abort_quietly().await;
                    return Ok(WorkEnd::Killed);
                }
                if !self
                    .commit(&txn, &consumer, &mut engine, &mut pending, guard)
                    .await
                {
                    return Ok(WorkEnd::Killed);
                }
                last_commit = Instant::now();
            }
            if releasing {
                info!(committed = guard.committed(), "released");
                return Ok(WorkEnd::Drained);
            }
            // After the close and its commit, not before: the requests just
            // read are scored against their open windows while the results
            // are already on their way, so the next close only has the
            // greedy left to run.
            engine.prescore();
        }
    }

    /// Reads one record into the engine, or into the dead letters; false on
    /// a consume error.
    fn take(
        &self,
        engine: &mut PartitionEngine,
        pending: &mut Uncommitted,
        next: Result<BorrowedMessage<'_>, rdkafka::error::KafkaError>,
    ) -> bool {
        let msg = match next {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "consume error");
                return false;
            }
        };
        let offset = msg.offset();
        pending.read = true;
        if msg.topic() != self.topics.source {
            pending.next_outcome_offset = Some(offset + 1);
            self.take_outcome(engine, pending, &msg);
            return true;
        }
        pending.next_offset = Some(offset + 1);
        let parsed = parse_request(msg.key(), msg.payload(), engine.config().dimension())
            .map_err(|e| e.to_string())
            .and_then(|req| {
                engine
                    .ingest(req, offset, wall_millis())
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok(settled) => {
                MatchMetrics::add(&self.metrics.requests, 1);
                pending.results.extend(settled);
            }
            Err(reason) => {
                warn!(offset, %reason, "malformed request to the dead-letter topic");
                engine.record_dead_letter();
                pending.letters.push(OwnedLetter {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(<[u8]>::to_vec),
                    value: msg.payload().map(<[u8]>::to_vec),
                    offset,
                    reason,
                });
            }
        }
        true
    }

    /// Joins one outcome event, or sets it aside in the dead letters.
    fn take_outcome(
        &self,
        engine: &mut PartitionEngine,
        pending: &mut Uncommitted,
        msg: &BorrowedMessage<'_>,
    ) {
        let fate = parse_outcome(msg.key(), msg.payload())
            .map_err(|e| e.to_string())
            .and_then(|o| {
                engine
                    .ingest_outcome(o, wall_millis())
                    .map_err(|e| e.to_string())
            });
        match fate {
            Ok(fate) => {
                MatchMetrics::add(&self.metrics.outcomes, 1);
                if let OutcomeFate::Joined(sample) = fate {
                    pending.samples.push(*sample);
                }
            }
            Err(reason) => {
                warn!(offset = msg.offset(), %reason, "malformed outcome to the dead-letter topic");
                engine.record_dead_letter();
                pending.letters.push(OwnedLetter {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(<[u8]>::to_vec),
                    value: msg.payload().map(<[u8]>::to_vec),
                    offset: msg.offset(),
                    reason,
                });
            }
        }
    }

    /// Commits what was read and settled; false when the partition must be given up.
    async fn commit(
        &self,
        txn: &Transactions,
        consumer: &StreamConsumer,
        engine: &mut PartitionEngine,
        pending: &mut Uncommitted,
        guard: &LeaseGuard,
    ) -> bool {
        // None when windows closed (idle) before anything was read under this
        // lease: the input offset stays where the last owner committed it.
        let next_offset = pending.next_offset;
        let next_outcome_offset = pending.next_outcome_offset;
        let results = std::mem::take(&mut pending.results);
        let samples = std::mem::take(&mut pending.samples);
        let labelled = samples.len() as u64;
        let (matched, expired) = results.iter().fold((0, 0), |(m, e), r| match r {
            MatchResult::Matched { .. } => (m + 1, e),
            MatchResult::Expired { .. } => (m, e + 1),
        });
        let commit = Commit {
            results: results
                .iter()
                .map(|r| {
                    let mut json = Vec::with_capacity(RESULT_JSON_CAPACITY);
                    r.write_json(&mut json);
                    (result_key(r), json)
                })
                .collect(),
            samples: samples
                .iter()
                .map(|s| (s.segment.clone(), serde_json::to_vec(s).unwrap_or_default()))
                .collect(),
            changes: engine.take_changes(),
            letters: std::mem::take(&mut pending.letters),
            next_offset,
            next_outcome_offset,
        };
        let letters = commit.letters.len() as u64;
        let committed = match consumer.group_metadata() {
            Some(group) => txn.commit(commit, group).await,
            None => Err(anyhow::anyhow!("the consumer has no group metadata")),
        };
        match committed {
            Ok(took) => {
                self.metrics.latencies.transaction.observe(took);
                MatchMetrics::add(&self.metrics.commits, 1);
                MatchMetrics::add(&self.metrics.matched, matched);
                MatchMetrics::add(&self.metrics.expired, expired);
                MatchMetrics::add(&self.metrics.dead_lettered, letters);
                MatchMetrics::add(&self.metrics.samples, labelled);
                pending.read = false;
                if let Some(next) = next_offset {
                    guard.set_committed(next);
                }
                guard.set_counters(engine.counters());
                true
            }
            Err(e) => {
                // The engine is ahead of what Kafka has: give the partition up;
                // its next owner (maybe this worker) restores the committed state.
                MatchMetrics::add(&self.metrics.commit_failures, 1);
                warn!(error = %e, "transaction failed; giving the partition up");
                guard.fence();
                false
            }
        }
    }
}

/// Results are keyed by segment, like the requests they settle.
fn result_key(r: &MatchResult) -> String {
    match r {
        MatchResult::Matched { segment, .. } | MatchResult::Expired { segment, .. } => {
            segment.clone()
        }
    }
}
