//! The fleet: `matchfleet-worker progress` (leases) and one
//! `matchfleet-worker match` pinned to one core, as child processes, handed
//! every partition with `PUT /assignment` as the operator would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use matchfleet_api::progress::Assignment;
use rdkafka::producer::Producer;
use tokio_util::sync::CancellationToken;

use crate::baseline::deadline;
use crate::kafka::{self, wait_committed, OffsetWatch};
use crate::observer::Observer;
use crate::report::Measured;
use crate::system::{self, Children, CpuMark, CpuSpent};
use crate::workload::Workload;
use crate::Settings;

/// The worker binary cargo built for this very profile.
pub const WORKER_EXE: &str = env!("CARGO_BIN_EXE_matchfleet-worker");
/// How often the live phase samples the committed lag.
const LAG_SAMPLE: Duration = Duration::from_millis(250);
/// After the last request, results may wait for the idle close and for
/// leftovers to expire; longer than this means something is stuck.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);

pub struct Fleet {
    children: Children,
    logs: Vec<PathBuf>,
    http: reqwest::Client,
    progress_url: String,
    health_url: String,
    progress_pid: u32,
    worker_pid: u32,
    slot: String,
    watch: OffsetWatch,
    broker: Option<u32>,
}

/// The backlog phase: the worker's catch-up rate over the baseline's backlog.
pub struct Backlog {
    pub measured: Measured,
    /// From the PUT until every backlog request had its result visible.
    pub all_settled: Option<Duration>,
    /// Wall clock (ms) when the phase began: results closed after it belong to it.
    pub start_ms: i64,
}

/// The live phase: a paced load while results are read.
pub struct Live {
    pub requests: u64,
    /// How long sending took (the pace, unless the machine could not keep it).
    pub send_seconds: f64,
    /// Committed lag (requests produced and not yet committed by the worker),
    /// sampled every 250 ms while sending: the largest and the last.
    pub max_lag: i64,
    pub end_lag: i64,
    /// From the last request sent until the worker had committed everything.
    pub committed_after: Option<Duration>,
    /// From the last request sent until every live request's result was visible.
    pub settled_after: Option<Duration>,
    /// While sending: the worker, the progress service, the bench.
    pub cpu: CpuSpent,
    /// Wall clock (ms) of the first send.
    pub start_ms: i64,
}

/// What the worker's counters and logs say after the run.
#[derive(Default)]
pub struct FleetDetail {
    pub worker_metrics: HashMap<String, f64>,
    pub warnings: Vec<String>,
    pub threads: HashMap<String, usize>,
    pub worker_cpus: String,
    /// "partition taken" lines: one per partition, more after lost leases.
    pub partitions_taken: usize,
    /// Offsets used in the results and the state topics (records and markers).
    pub results_offsets: i64,
    pub state_offsets: i64,
}

impl Fleet {
    pub async fn start(s: &Settings, dir: &Path, broker: Option<u32>) -> anyhow::Result<Fleet> {
        let exe = Path::new(&s.worker_exe);
        if !exe.exists() {
            anyhow::bail!(
                "{} is missing: cargo build --release -p matchfleet-worker (or fix BENCH_WORKER_EXE)",
                s.worker_exe
            );
        }
        let (progress_port, health_port, http_port) = (
            system::free_port()?,
            system::free_port()?,
            system::free_port()?,
        );
        let progress_url = format!("http://127.0.0.1:{progress_port}");
        let health_url = format!("http://127.0.0.1:{health_port}");
        let logs = vec![dir.join("progress.log"), dir.join("match.log")];
        let slot = format!("bench-{}", s.run_id);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut children = Children::default();

        // Not pinned: it inherits the bench's cores, off the worker's.
        let progress_pid = system::spawn_pinned(
            None,
            exe,
            &["progress"],
            &[
                ("KAFKA_BOOTSTRAP", s.bootstrap.clone()),
                ("PROGRESS_CHANGELOG_TOPIC", s.progress_topic()),
                ("PROGRESS_LISTEN", format!("127.0.0.1:{progress_port}")),
                ("LEASE_MILLIS", s.lease_millis.to_string()),
                ("MAX_ATTEMPTS", "3".into()),
            ],
            &logs[0],
            &mut children,
        )?;
        system::wait_ok(
            &http,
            &format!("{progress_url}/healthz"),
            &mut children,
            &logs,
        )
        .await?;
        let worker_pid = system::spawn_pinned(
            Some(s.worker_cpu),
            exe,
            &["match"],
            &[
                ("KAFKA_BOOTSTRAP", s.bootstrap.clone()),
                ("SOURCE_TOPIC", s.topic()),
                ("RESULTS_TOPIC", s.results_topic()),
                ("CHANGELOG_TOPIC", s.state_topic()),
                ("DEAD_LETTER_TOPIC", s.dead_letter_topic()),
                ("CONSUMER_GROUP", s.live_group()),
                ("TRANSACTIONAL_ID_PREFIX", format!("{}.live", s.topic())),
                ("LANE", "live".into()),
                ("SLOT", slot.clone()),
                ("PROGRESS_URL", progress_url.clone()),
                ("HEARTBEAT_INTERVAL_MILLIS", "1000".into()),
                (
                    "MATCH_SETTINGS",
                    serde_json::to_string(&s.match_settings())?,
                ),
                ("HTTP_LISTEN", format!("127.0.0.1:{http_port}")),
                ("HEALTH_LISTEN", format!("127.0.0.1:{health_port}")),
            ],
            &logs[1],
            &mut children,
        )?;
        // Ready after its first answered heartbeat; its topics exist by then.
        system::wait_ok(&http, &format!("{health_url}/readyz"), &mut children, &logs).await?;
        Ok(Fleet {
            children,
            logs,
            http,
            progress_url,
            health_url,
            progress_pid,
            worker_pid,
            slot,
            watch: OffsetWatch::new(s, &s.live_group())?,
            broker,
        })
    }

    fn cpu_mark(&self) -> CpuMark {
        CpuMark::new(
            self.broker,
            &[self.worker_pid, self.progress_pid, std::process::id()],
        )
    }

    /// Hands every partition to the worker and times it over the backlog.
    pub async fn backlog_phase(
        &mut self,
        s: &Settings,
        observer: &Observer,
    ) -> anyhow::Result<Backlog> {
        let end = self.watch.ends_async().await?;
        let assignment = Assignment {
            lanes: [(
                "live".to_string(),
                (0..s.partitions).map(|p| (p, self.slot.clone())).collect(),
            )]
            .into(),
            drain_millis: 1000,
        };
        let mark = self.cpu_mark();
        let start_ms = system::wall_millis();
        let start = Instant::now();
        self.http
            .put(format!("{}/assignment", self.progress_url))
            .json(&assignment)
            .send()
            .await?
            .error_for_status()
            .context("PUT /assignment")?;
        let (watch, children, logs) = (&self.watch, &mut self.children, &self.logs);
        let progress = wait_committed(watch, start, end, deadline(end), || {
            children.check_alive(logs)
        })
        .await?;
        let cpu = mark.spent();
        // The last windows close once a partition has been idle for
        // idleMillis; leftovers expire in the same close.
        let all_settled = observer
            .wait_settled(s.backlog, SETTLE_LIMIT)
            .await
            .then(|| start.elapsed());
        Ok(Backlog {
            measured: Measured {
                requests: end as u64,
                progress,
                cpu,
                threads: system::thread_names(self.worker_pid),
                warnings: Vec::new(),
            },
            all_settled,
            start_ms,
        })
    }

    /// Produces `s.rate` requests/s for `s.live_seconds` (event time = send
    /// time) and follows the worker's committed lag.
    pub async fn live_phase(
        &mut self,
        s: &Settings,
        observer: &Observer,
        load: &mut Workload,
    ) -> anyhow::Result<Live> {
        let producer = kafka::request_producer(s)?;
        let topic = s.topic();
        let n = s.live_requests();
        let already = load.made();
        // Made before the clock starts: only their send is paced and timed.
        let mut ahead = (0..n)
            .map(|_| load.ahead())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let stop = CancellationToken::new();
        let lags = Arc::new(Mutex::new(Vec::new()));
        let sampler = tokio::spawn(sample_lag(self.watch.clone(), lags.clone(), stop.clone()));

        let mark = self.cpu_mark();
        let start_ms = system::wall_millis();
        let start = Instant::now();
        let mut sent = 0u64;
        let mut last_alive_check = Instant::now();
        while sent < n {
            let due = ((s.rate * start.elapsed().as_secs_f64()) as u64).min(n);
            while sent < due {
                let record = ahead[sent as usize].stamp(system::wall_millis())?;
                kafka::send(&producer, &topic, record).await?;
                sent += 1;
            }
            if last_alive_check.elapsed() > Duration::from_millis(500) {
                self.children.check_alive(&self.logs)?;
                last_alive_check = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let sent_at = Instant::now();
        let send_seconds = start.elapsed().as_secs_f64();
        let cpu = mark.spent();
        stop.cancel();
        let _ = sampler.await;
        let producer = Arc::new(producer);
        let flushing = producer.clone();
        tokio::task::spawn_blocking(move || flushing.flush(Duration::from_secs(60)))
            .await?
            .context("flushing the live requests")?;
        let failed = producer
            .context()
            .failed
            .load(std::sync::atomic::Ordering::Relaxed);
        if failed > 0 {
            anyhow::bail!("{failed} live requests were not delivered");
        }
        let lags = lags.lock().map(|l| l.clone()).unwrap_or_default();
        let max_lag = lags.iter().copied().max().unwrap_or(0);
        let end_lag = lags.last().copied().unwrap_or(0);

        let end = self.watch.ends_async().await?;
        let (watch, children, logs) = (&self.watch, &mut self.children, &self.logs);
        let committed_after = wait_committed(watch, sent_at, end, SETTLE_LIMIT, || {
            children.check_alive(logs)
        })
        .await
        .ok()
        .map(|p| p.done);
        let settled_after = observer
            .wait_settled(already + n, SETTLE_LIMIT)
            .await
            .then(|| sent_at.elapsed());
        Ok(Live {
            requests: n,
            send_seconds,
            max_lag,
            end_lag,
            committed_after,
            settled_after,
            cpu,
            start_ms,
        })
    }

    pub async fn detail(&self) -> anyhow::Result<FleetDetail> {
        Ok(FleetDetail {
            worker_metrics: system::metrics(&self.http, &format!("{}/metrics", self.health_url))
                .await?,
            warnings: self.logs.iter().flat_map(|l| system::warnings(l)).collect(),
            threads: system::thread_names(self.worker_pid),
            worker_cpus: system::cpus_allowed(&self.worker_pid.to_string())
                .unwrap_or_else(|| "?".into()),
            partitions_taken: std::fs::read_to_string(&self.logs[1])
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("partition taken"))
                .count(),
            ..FleetDetail::default()
        })
    }
}

/// Committed lag every LAG_SAMPLE until stopped.
async fn sample_lag(watch: OffsetWatch, lags: Arc<Mutex<Vec<i64>>>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LAG_SAMPLE) => {}
        }
        // Committed first: offsets that move between the two reads make the
        // lag look larger, never negative (ends read first, then a slow
        // committed read, once gave -100,000).
        let sample = async {
            let committed = watch.committed_async().await?;
            anyhow::Ok(watch.ends_async().await? - committed)
        };
        match sample.await {
            Ok(lag) => {
                if let Ok(mut l) = lags.lock() {
                    l.push(lag);
                }
            }
            Err(e) => eprintln!("match_e2e: sampling the lag: {e:#}"),
        }
    }
}
