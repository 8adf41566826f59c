//! The work on one leased partition: a consumer `assign()`ed to that one
//! partition under the lane's group id (no group membership, so no
//! rebalance, ever), tasks started with bounded concurrency, offsets
//! committed in order - and only while the lease guard is valid.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, Mutex};
use tracing::{error, info, warn, Instrument};

use super::message::{self, Task};
use super::metrics::RenderMetrics;
use super::offsets::OffsetTracker;
use super::task::TaskEnd;
use super::RenderWorker;
use crate::dead_letters::Letter;
use crate::fleet::guard::LeaseGuard;
use crate::fleet::keeper::{PartitionWorker, WorkEnd};

impl PartitionWorker for RenderWorker {
    fn run(self: Arc<Self>, guard: Arc<LeaseGuard>) -> BoxFuture<'static, WorkEnd> {
        let span = tracing::info_span!("partition", lane = %guard.lane, partition = guard.partition, epoch = guard.epoch);
        Box::pin(async move { self.work(guard).await }.instrument(span))
    }
}

impl RenderWorker {
    fn consumer(&self, partition: i32) -> anyhow::Result<StreamConsumer> {
        let consumer: StreamConsumer = self
            .kafka_config()
            .set("group.id", &self.config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        // `Stored`: start from the group's committed offset (earliest if none).
        tpl.add_partition_offset(&self.config.topic, partition, Offset::Stored)?;
        consumer.assign(&tpl)?;
        Ok(consumer)
    }

    async fn work(self: Arc<Self>, guard: Arc<LeaseGuard>) -> WorkEnd {
        let consumer = match self.consumer(guard.partition) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                error!(error = %e, "cannot consume the partition; giving the lease back");
                guard.fence();
                return WorkEnd::Killed;
            }
        };
        let window = self.config.concurrency * 2;
        let mut tracker = OffsetTracker::new();
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<(i64, TaskEnd)>();
        let key_locks: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>> = Default::default();
        let mut stream = consumer.stream();
        let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
        let mut releasing = false;
        // A bounded lane stops reading at the partition's end offset.
        let end = self
            .config
            .end_offsets
            .as_ref()
            .map(|ends| ends.get(&guard.partition).copied().unwrap_or(0));
        let mut exhausted = false;
        loop {
            tokio::select! {
                biased;
                _ = guard.fenced() => break,
                Some((offset, end)) = finished_rx.recv() => {
                    match end {
                        TaskEnd::Finished => tracker.finish(offset),
                        // The lease is lost: the rest of the partition's work is killed too.
                        TaskEnd::Abandoned => guard.fence(),
                    }
                }
                _ = guard.releasing(), if !releasing => {
                    releasing = true;
                    info!(in_flight = tracker.in_flight(), "release: no more fetching; finishing in-flight tasks");
                }
                _ = commit_tick.tick() => self.commit(&consumer, &guard, &mut tracker, false),
                next = stream.next(), if !releasing && !exhausted && tracker.in_flight() < window => {
                    let Some(next) = next else { break };
                    let msg = match next {
                        Ok(m) => m,
                        Err(e) => {
                            warn!(error = %e, "consume error");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let offset = msg.offset();
                    if end.is_some_and(|end| offset >= end) {
                        info!(offset, "reached the end of the range");
                        exhausted = true;
                        continue;
                    }
                    tracker.start(offset);
                    let parsed = message::parse(
                        msg.key(),
                        msg.payload(),
                        msg.partition(),
                        offset,
                        msg.timestamp().to_millis().unwrap_or(0),
                    );
                    let done = finished_tx.clone();
                    match parsed {
                        Ok(task) => {
                            let me = self.clone();
                            let guard = guard.clone();
                            let locks = key_locks.clone();
                            tokio::spawn(async move {
                                let end = me.run_task(&guard, &task, &locks).await;
                                let _ = done.send((task.offset, end));
                            }.in_current_span());
                        }
                        Err(reason) => {
                            let me = self.clone();
                            let guard = guard.clone();
                            let (key, value) = (msg.key().map(<[u8]>::to_vec), msg.payload().map(<[u8]>::to_vec));
                            let partition = msg.partition();
                            tokio::spawn(async move {
                                let end = me.dead_letter(&guard, key.as_deref(), value.as_deref(), partition, offset, &reason.to_string()).await;
                                let _ = done.send((offset, end));
                            }.in_current_span());
                        }
                    }
                }
            }
            if releasing && tracker.in_flight() == 0 {
                self.commit(&consumer, &guard, &mut tracker, true);
                info!(committed = guard.committed(), "released");
                return WorkEnd::Drained;
            }
        }
        // Fenced: in-flight renders see the same guard and kill themselves;
        // nothing more is committed.
        WorkEnd::Killed
    }

    /// Runs a task after any earlier task of the same key in this partition,
    /// holding one of the worker's concurrency permits.
    async fn run_task(
        &self,
        guard: &LeaseGuard,
        task: &Task,
        locks: &Mutex<HashMap<String, Arc<Mutex<()>>>>,
    ) -> TaskEnd {
        let key_lock = locks
            .lock()
            .await
            .entry(task.key.clone())
            .or_default()
            .clone();
        let end = {
            let _same_key = key_lock.lock().await;
            let permit = tokio::select! {
                p = self.permits.acquire() => p,
                _ = guard.fenced() => return TaskEnd::Abandoned,
            };
            let end = self.render_task(guard, task).await;
            drop(permit);
            end
        };
        let mut locks = locks.lock().await;
        if Arc::strong_count(&key_lock) == 2 {
            locks.remove(&task.key);
        }
        end
    }

    async fn dead_letter(
        &self,
        guard: &LeaseGuard,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        partition: i32,
        offset: i64,
        reason: &str,
    ) -> TaskEnd {
        warn!(offset, %reason, topic = self.dead_letters.topic(), "malformed message to the dead-letter topic");
        let letter = Letter {
            key,
            value,
            partition,
            offset,
            reason,
        };
        loop {
            if !guard.valid() {
                return TaskEnd::Abandoned;
            }
            match self.dead_letters.send(&letter).await {
                Ok(()) => {
                    RenderMetrics::add(&self.metrics.dead_lettered, 1);
                    return TaskEnd::Finished;
                }
                Err(e) => {
                    warn!(error = %e, "dead-letter produce failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Commits the finished prefix, if it moved and the lease is still held.
    /// `sync` waits for the broker (used before reporting a release).
    fn commit(
        &self,
        consumer: &StreamConsumer,
        guard: &LeaseGuard,
        tracker: &mut OffsetTracker,
        sync: bool,
    ) {
        if !guard.valid() {
            return;
        }
        let Some(next) = tracker.pending() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&self.config.topic, guard.partition, Offset::Offset(next))
            .is_err()
        {
            return;
        }
        let mode = if sync {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        let result = if sync {
            tokio::task::block_in_place(|| consumer.commit(&tpl, mode))
        } else {
            consumer.commit(&tpl, mode)
        };
        match result {
            Ok(()) => {
                tracker.confirm(next);
                guard.set_committed(next);
                RenderMetrics::add(&self.metrics.commits, 1);
            }
            Err(e) => warn!(error = %e, next, "commit failed"),
        }
    }
}
