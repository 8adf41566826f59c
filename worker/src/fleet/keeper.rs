//! The lease keeper: a background heartbeat that is the only path by which a
//! worker starts, drains or kills work on a partition.
//!
//! Every interval it reports what it holds and obeys the answer: `Acquire`
//! starts the partition's work under a new [`LeaseGuard`], `Keep` renews the
//! guard, `Release` drains it, `Fenced` kills it at once. An unanswered beat
//! kills every partition whose lease would run out before the next beat could
//! renew it; the guard's own deadline covers the rest (and a worker frozen
//! with SIGSTOP, which finds on waking that its deadlines passed).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use matchfleet_api::progress::{Directive, HeartbeatRequest, Holding};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::client::ProgressClient;
use super::clock;
use super::guard::LeaseGuard;

/// How work on one partition ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkEnd {
    /// Released cleanly: in-flight work finished and committed.
    Drained,
    /// Stopped by a fence or a lost lease: nothing more was committed.
    Killed,
}

/// What a fleet mode does with a partition while it holds its lease. The
/// future must end soon after the guard is fenced (killing its work) and
/// after it is released (draining its work).
pub trait PartitionWorker: Send + Sync + 'static {
    fn run(self: Arc<Self>, guard: Arc<LeaseGuard>) -> BoxFuture<'static, WorkEnd>;
}

/// Counters for `/metrics` and readiness.
#[derive(Debug, Default)]
pub struct KeeperStats {
    pub beats_ok: AtomicU64,
    pub beats_failed: AtomicU64,
    pub acquired: AtomicU64,
    pub fenced: AtomicU64,
    pub released: AtomicU64,
    pub held: AtomicU64,
    /// Set after the first answered beat, cleared while draining.
    pub ready: AtomicBool,
}

impl KeeperStats {
    /// The lease metrics every fleet mode exposes on `/metrics`.
    pub fn write_metrics(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, kind, help, value) in [
            (
                "matchfleet_worker_heartbeats_total",
                "counter",
                "Heartbeats answered.",
                get(&self.beats_ok),
            ),
            (
                "matchfleet_worker_heartbeat_failures_total",
                "counter",
                "Heartbeats that failed.",
                get(&self.beats_failed),
            ),
            (
                "matchfleet_worker_partitions_acquired_total",
                "counter",
                "Partitions acquired.",
                get(&self.acquired),
            ),
            (
                "matchfleet_worker_partitions_fenced_total",
                "counter",
                "Partitions whose work was killed by a fence or a lost lease.",
                get(&self.fenced),
            ),
            (
                "matchfleet_worker_partitions_released_total",
                "counter",
                "Partitions drained and released.",
                get(&self.released),
            ),
            (
                "matchfleet_worker_partitions_held",
                "gauge",
                "Partitions held now.",
                get(&self.held),
            ),
        ] {
            crate::health::write_metric(out, name, kind, help, value);
        }
    }
}

struct Held {
    guard: Arc<LeaseGuard>,
    task: JoinHandle<WorkEnd>,
}

pub struct LeaseKeeper<W: PartitionWorker> {
    client: ProgressClient,
    worker: Arc<W>,
    slot: String,
    interval: Duration,
    held: HashMap<(String, i32), Held>,
    released: Vec<Holding>,
    draining: bool,
    pub stats: Arc<KeeperStats>,
}

impl<W: PartitionWorker> LeaseKeeper<W> {
    pub fn new(client: ProgressClient, worker: Arc<W>, slot: &str, interval: Duration) -> Self {
        LeaseKeeper {
            client,
            worker,
            slot: slot.to_string(),
            interval,
            held: HashMap::new(),
            released: Vec::new(),
            draining: false,
            stats: Arc::new(KeeperStats::default()),
        }
    }

    /// Heartbeats until `shutdown`, then drains: releases every partition,
    /// keeps beating (so the leases live while in-flight work finishes) for up
    /// to `drain_timeout`, kills what is left, and reports the releases.
    pub async fn run(mut self, shutdown: CancellationToken, drain_timeout: Duration) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.beat().await,
                _ = shutdown.cancelled() => break,
            }
        }
        info!(partitions = self.held.len(), "draining");
        self.draining = true;
        self.stats.ready.store(false, Ordering::SeqCst);
        for held in self.held.values() {
            held.guard.release();
        }
        let give_up = tokio::time::Instant::now() + drain_timeout;
        while !self.held.is_empty() && tokio::time::Instant::now() < give_up {
            tokio::select! {
                _ = tick.tick() => self.beat().await,
                _ = tokio::time::sleep(Duration::from_millis(20)) => self.reap(),
            }
        }
        for held in self.held.values() {
            held.guard.fence();
        }
        self.reap();
        if !self.released.is_empty() {
            self.beat().await;
        }
        info!(
            released = self.stats.released.load(Ordering::Relaxed),
            "drained"
        );
    }

    /// Collects partitions whose work ended; clean drains are reported as released.
    fn reap(&mut self) {
        let finished: Vec<(String, i32)> = self
            .held
            .iter()
            .filter(|(_, h)| h.task.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for key in finished {
            let Some(held) = self.held.remove(&key) else {
                continue;
            };
            let end = held.task.now_or_never().and_then(|r| r.ok());
            let lost = end != Some(WorkEnd::Drained) || held.guard.is_fenced();
            // Retire the guard either way, so its deadline watch ends quietly.
            held.guard.fence();
            if lost {
                // Killed without a Fenced directive: a failed beat or its deadline.
                self.stats.fenced.fetch_add(1, Ordering::Relaxed);
            } else {
                self.released.push(Holding {
                    lane: held.guard.lane.clone(),
                    partition: held.guard.partition,
                    epoch: held.guard.epoch,
                    committed: held.guard.committed(),
                    counters: held.guard.counters(),
                });
                self.stats.released.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats
            .held
            .store(self.held.len() as u64, Ordering::Relaxed);
    }

    async fn beat(&mut self) {
        self.reap();
        let holdings = self
            .held
            .values()
            .filter(|h| !h.guard.is_fenced())
            .map(|h| Holding {
                lane: h.guard.lane.clone(),
                partition: h.guard.partition,
                epoch: h.guard.epoch,
                committed: h.guard.committed(),
                counters: h.guard.counters(),
            })
            .collect();
        let req = HeartbeatRequest {
            slot: self.slot.clone(),
            holdings,
            released: self.released.clone(),
        };
        let sent = clock::now();
        match self.client.heartbeat(&req).await {
            Ok(answer) => {
                self.released.clear();
                self.stats.beats_ok.fetch_add(1, Ordering::Relaxed);
                if !self.draining {
                    self.stats.ready.store(true, Ordering::SeqCst);
                }
                for directive in answer.directives {
                    self.obey(directive, sent);
                }
            }
            Err(e) => {
                self.stats.beats_failed.fetch_add(1, Ordering::Relaxed);
                // Fail fast: a lease that runs out before the next beat can
                // renew it is given up now, not at a fraction of a timeout.
                // (Counted in `reap` when the killed work ends.)
                let next_beat = clock::now() + self.interval.as_millis() as u64;
                let mut killed = 0;
                for held in self.held.values() {
                    if !held.guard.is_fenced() && held.guard.deadline() <= next_beat {
                        held.guard.fence();
                        killed += 1;
                    }
                }
                warn!(error = %e, killed, "heartbeat failed");
            }
        }
        self.stats
            .held
            .store(self.held.len() as u64, Ordering::Relaxed);
    }

    fn obey(&mut self, directive: Directive, sent: u64) {
        match directive {
            Directive::Keep {
                lane,
                partition,
                epoch,
                expires_in_millis,
            } => {
                if let Some(h) = self.held.get(&(lane, partition)) {
                    if h.guard.epoch == epoch {
                        h.guard.renew(sent + expires_in_millis);
                    }
                }
            }
            Directive::Acquire {
                lane,
                partition,
                epoch,
                expires_in_millis,
            } => {
                if self.draining {
                    return;
                }
                if let Some(old) = self.held.remove(&(lane.clone(), partition)) {
                    old.guard.fence();
                }
                info!(%lane, partition, epoch, "acquired");
                let guard = LeaseGuard::start(&lane, partition, epoch, sent + expires_in_millis);
                let task = tokio::spawn(self.worker.clone().run(guard.clone()));
                self.held.insert((lane, partition), Held { guard, task });
                self.stats.acquired.fetch_add(1, Ordering::Relaxed);
            }
            Directive::Release {
                lane,
                partition,
                epoch,
                deadline_millis,
                expires_in_millis,
            } => {
                if let Some(h) = self.held.get(&(lane.clone(), partition)) {
                    if h.guard.epoch == epoch {
                        if !h.guard.is_releasing() {
                            info!(%lane, partition, epoch, deadline_millis, "releasing");
                        }
                        h.guard.renew(sent + expires_in_millis.min(deadline_millis));
                        h.guard.release();
                    }
                }
            }
            Directive::Fenced {
                lane,
                partition,
                current_epoch,
            } => {
                if let Some(h) = self.held.remove(&(lane.clone(), partition)) {
                    warn!(%lane, partition, epoch = h.guard.epoch, current_epoch, "fenced; killing the partition's work");
                    h.guard.fence();
                    self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use matchfleet_api::progress::HeartbeatResponse;
    use warp::Filter;

    /// Work that runs until fenced (-> Killed) or released (-> Drained).
    struct Idle;

    impl PartitionWorker for Idle {
        fn run(self: Arc<Self>, guard: Arc<LeaseGuard>) -> BoxFuture<'static, WorkEnd> {
            Box::pin(async move {
                tokio::select! {
                    _ = guard.fenced() => WorkEnd::Killed,
                    _ = guard.releasing() => WorkEnd::Drained,
                }
            })
        }
    }

    /// A progress service that answers each beat with the next scripted
    /// directives (then nothing), or not at all once `down` is set.
    async fn fake_service(
        script: Vec<Vec<Directive>>,
        down: Arc<AtomicBool>,
    ) -> (String, Arc<Mutex<Vec<HeartbeatRequest>>>) {
        let script = Arc::new(Mutex::new(script.into_iter()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_in = seen.clone();
        let route = warp::post()
            .and(warp::path!("heartbeat"))
            .and(warp::body::json())
            .and_then(move |req: HeartbeatRequest| {
                let (script, seen, down) = (script.clone(), seen_in.clone(), down.clone());
                async move {
                    if down.load(Ordering::SeqCst) {
                        return Err(warp::reject::not_found());
                    }
                    // After the script: renew whatever is held.
                    let keep = req
                        .holdings
                        .iter()
                        .map(|h| Directive::Keep {
                            lane: h.lane.clone(),
                            partition: h.partition,
                            epoch: h.epoch,
                            expires_in_millis: 300,
                        })
                        .collect();
                    seen.lock().unwrap().push(req);
                    let directives = script.lock().unwrap().next().unwrap_or(keep);
                    Ok(warp::reply::json(&HeartbeatResponse { directives }))
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        (format!("http://{addr}"), seen)
    }

    fn acquire(partition: i32, lease: u64) -> Directive {
        Directive::Acquire {
            lane: "live".into(),
            partition,
            epoch: 1,
            expires_in_millis: lease,
        }
    }

    fn keeper(url: &str) -> LeaseKeeper<Idle> {
        let client = ProgressClient::new(url, Duration::from_millis(200)).unwrap();
        LeaseKeeper::new(client, Arc::new(Idle), "w-0", Duration::from_millis(50))
    }

    #[tokio::test]
    async fn a_fenced_beat_kills_the_work_and_a_release_is_reported() {
        let fenced = Directive::Fenced {
            lane: "live".into(),
            partition: 0,
            current_epoch: 2,
        };
        let release = Directive::Release {
            lane: "live".into(),
            partition: 1,
            epoch: 1,
            deadline_millis: 5_000,
            expires_in_millis: 5_000,
        };
        let down = Arc::new(AtomicBool::new(false));
        let (url, seen) = fake_service(
            vec![
                vec![acquire(0, 5_000), acquire(1, 5_000)],
                vec![fenced, release],
            ],
            down,
        )
        .await;
        let k = keeper(&url);
        let stats = k.stats.clone();
        let stop = CancellationToken::new();
        let run = tokio::spawn(k.run(stop.clone(), Duration::from_secs(1)));
        tokio::time::sleep(Duration::from_millis(400)).await;
        stop.cancel();
        run.await.unwrap();
        assert_eq!(stats.acquired.load(Ordering::SeqCst), 2);
        assert_eq!(
            stats.fenced.load(Ordering::SeqCst),
            1,
            "partition 0 fenced once"
        );
        let seen = seen.lock().unwrap();
        let released: Vec<i32> = seen
            .iter()
            .flat_map(|r| r.released.iter().map(|h| h.partition))
            .collect();
        assert_eq!(released, vec![1], "the drained partition is reported once");
        assert!(
            seen.iter()
                .skip(2)
                .all(|r| r.holdings.iter().all(|h| h.partition != 0)),
            "the fenced partition is no longer reported"
        );
    }

    #[tokio::test]
    async fn unanswered_beats_kill_the_work_before_the_lease_runs_out() {
        let down = Arc::new(AtomicBool::new(false));
        let (url, _) = fake_service(vec![vec![acquire(0, 300)]], down.clone()).await;
        let k = keeper(&url);
        let stats = k.stats.clone();
        let stop = CancellationToken::new();
        let run = tokio::spawn(k.run(stop.clone(), Duration::from_secs(1)));
        // Renewals keep it alive past its first lease while the service answers.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            stats.fenced.load(Ordering::SeqCst),
            0,
            "renewed leases are kept"
        );
        down.store(true, Ordering::SeqCst);
        let lost_at = std::time::Instant::now();
        while stats.fenced.load(Ordering::SeqCst) == 0 {
            assert!(lost_at.elapsed() < Duration::from_secs(2), "never killed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        run.await.unwrap();
        assert_eq!(stats.released.load(Ordering::SeqCst), 0);
    }
}
