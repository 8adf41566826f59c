//! End to end through Kafka (issue 4, third benchmark): match requests/s of ONE
//! `matchfleet-worker match` pinned to one core, and how long a closed
//! window's results take to reach a read_committed consumer, against a bare
//! rdkafka exactly-once pipe pinned to the same core, in the same run.
//!
//! * probes: sequential transactions on an idle pipeline: the worker's own
//!   `txn::Transactions`, a bare `BaseProducer`, and a `ThreadedProducer`
//!   that calls `commit_transaction` while records are in flight (the 100 ms
//!   commit; BENCHMARKS.md).
//! * baseline: this binary run again as a child pinned to the worker's core:
//!   per partition a consumer and a transactional producer; every request is
//!   parsed and answered with one result record; results and offsets are
//!   committed in one transaction every 200 ms (the worker's commit
//!   interval). No windows, no matching, no state.
//! * fleet, backlog: `matchfleet-worker progress` and one `matchfleet-worker
//!   match` under `taskset -c <cpu>`, handed every partition, over the same
//!   backlog as the baseline (event times spaced as if the requests had
//!   arrived at BENCH_RATE). Timed from `PUT /assignment` until the lane's
//!   committed offsets reach the end of the topic.
//! * fleet, live: then the bench produces at BENCH_RATE for
//!   BENCH_LIVE_SECONDS (event time = send time) while a read_committed
//!   consumer reads the results: close→produced (the record's CreateTime −
//!   `closedAt`) and close→visible (its receive time − `closedAt`).
//!
//! Needs Kafka (`e2e/cluster/up`, or any broker at KAFKA_BOOTSTRAP) and
//! `taskset`. Run with `cargo bench -p matchfleet-worker --bench match_e2e`;
//! cargo builds the `matchfleet-worker` binary of the same profile first.
//! Settings (environment): KAFKA_BOOTSTRAP (127.0.0.1:9092), BENCH_RATE
//! (50000), BENCH_LIVE_SECONDS (10), BENCH_BACKLOG (300000),
//! BENCH_PARTITIONS (16), BENCH_SEGMENTS (64), BENCH_SKEW (0.5),
//! BENCH_USERS (200000), BENCH_WINDOW_MILLIS (1000), BENCH_WORKER_CPU (0),
//! BENCH_LEASE_MILLIS (6000, the CRD default; heartbeats every 1000 ms);
//! BENCH_WARM_UP_SECONDS (30: sequential transactions that warm the broker's
//! JIT before anything is measured);
//! BENCH_MOVE_BROKER (1: a local broker allowed on the worker's core is
//! moved off it for the run and put back after; 0 leaves it); BENCH_KEEP_LOGS (set: keep the children's logs, and say where);
//! BENCH_WORKER_EXE (another `matchfleet-worker` binary for the fleet: an
//! A/B of two builds in one hour with one bench binary, on a machine whose
//! speed drifts between hours).
//! Results and their reading: BENCHMARKS.md.

mod baseline;
mod fleet;
mod kafka;
mod observer;
mod probes;
mod report;
#[path = "../support/mod.rs"]
mod support;
mod system;
mod workload;

use std::time::Duration;

use anyhow::{bail, Context};
use matchfleet_api::match_pipeline::{
    BuiltinScorer, FeatureSpec, MatchSettings, MatchingSpec, ScorerSpec, WindowSpec,
};

/// Vector length of every request (the pipeline default).
pub const DIMENSION: usize = 32;

#[derive(Debug, Clone)]
pub struct Settings {
    pub bootstrap: String,
    /// Requests/s of the live phase; the backlog's event times follow it too.
    pub rate: f64,
    pub live_seconds: f64,
    /// Requests produced before any contender starts.
    pub backlog: u64,
    pub partitions: i32,
    pub segments: usize,
    /// Zipf exponent of segment sizes (0 = all alike).
    pub skew: f64,
    pub users: usize,
    pub window_millis: i32,
    /// The core the worker (and the baseline) is pinned to.
    pub worker_cpu: usize,
    /// Lease length the progress service grants (the CRD default: 6000).
    pub lease_millis: u64,
    /// Move a local broker off the worker's core for the run.
    pub move_broker: bool,
    /// Seconds of sequential transactions before the probes (broker JIT).
    pub warm_up_seconds: f64,
    /// Unique per run: topics, groups and transactional ids carry it.
    pub run_id: String,
    /// The `matchfleet-worker` binary the fleet runs: this build's, or
    /// BENCH_WORKER_EXE's (an A/B of two builds with one bench binary).
    pub worker_exe: String,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        fn num<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
                Err(_) => Ok(default),
            }
        }
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        let s = Settings {
            bootstrap: std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into()),
            rate: num("BENCH_RATE", 50_000.0)?,
            live_seconds: num("BENCH_LIVE_SECONDS", 10.0)?,
            backlog: num("BENCH_BACKLOG", 300_000)?,
            partitions: num("BENCH_PARTITIONS", 16)?,
            segments: num("BENCH_SEGMENTS", 64)?,
            skew: num("BENCH_SKEW", 0.5)?,
            users: num("BENCH_USERS", 200_000)?,
            window_millis: num("BENCH_WINDOW_MILLIS", 1000)?,
            worker_cpu: num("BENCH_WORKER_CPU", 0)?,
            lease_millis: num("BENCH_LEASE_MILLIS", 6000)?,
            move_broker: num("BENCH_MOVE_BROKER", 1u8)? != 0,
            warm_up_seconds: num("BENCH_WARM_UP_SECONDS", 30.0)?,
            run_id: format!("{}-{millis}", std::process::id()),
            worker_exe: std::env::var("BENCH_WORKER_EXE")
                .unwrap_or_else(|_| fleet::WORKER_EXE.to_string()),
        };
        if !(s.warm_up_seconds >= 0.0 && s.warm_up_seconds.is_finite()) {
            bail!("BENCH_WARM_UP_SECONDS must be a number of seconds >= 0");
        }
        if !(s.rate >= 1.0 && s.rate.is_finite()) {
            bail!("BENCH_RATE must be at least 1");
        }
        if !(s.live_seconds >= 0.0 && s.live_seconds.is_finite()) {
            bail!("BENCH_LIVE_SECONDS must not be negative");
        }
        if s.backlog == 0 || s.partitions < 1 || s.segments == 0 || s.users == 0 {
            bail!("BENCH_BACKLOG, BENCH_PARTITIONS, BENCH_SEGMENTS and BENCH_USERS must be at least 1");
        }
        if !(s.skew >= 0.0 && s.skew.is_finite()) {
            bail!("BENCH_SKEW must not be negative");
        }
        if s.lease_millis < 2000 {
            bail!("BENCH_LEASE_MILLIS must be at least 2000 (twice the heartbeat interval)");
        }
        if !(10..=600_000).contains(&s.window_millis) {
            bail!("BENCH_WINDOW_MILLIS must be 10 to 600000 (the CRD's range)");
        }
        Ok(s)
    }

    pub fn topic(&self) -> String {
        format!("matchfleet-bench-match-{}", self.run_id)
    }
    pub fn results_topic(&self) -> String {
        format!("{}.results", self.topic())
    }
    pub fn state_topic(&self) -> String {
        format!("{}.state", self.topic())
    }
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlq", self.topic())
    }
    pub fn progress_topic(&self) -> String {
        format!("{}.progress", self.topic())
    }
    pub fn baseline_results_topic(&self) -> String {
        format!("{}.baseline-results", self.topic())
    }
    pub fn probe_topic(&self) -> String {
        format!("{}.txn-probe", self.topic())
    }
    pub fn live_group(&self) -> String {
        format!("{}.live", self.topic())
    }
    pub fn baseline_group(&self) -> String {
        format!("{}.baseline", self.topic())
    }

    /// The topics this run may create, deleted at the end.
    fn topics(&self) -> Vec<String> {
        vec![
            self.topic(),
            self.results_topic(),
            self.state_topic(),
            self.dead_letter_topic(),
            self.progress_topic(),
            self.baseline_results_topic(),
            self.probe_topic(),
        ]
    }

    /// The consumer groups this run may create, deleted at the end.
    fn groups(&self) -> Vec<String> {
        let t = self.topic();
        vec![
            self.live_group(),
            self.baseline_group(),
            format!("{t}.observer"),
            format!("{t}.probe"),
            format!("{t}.offsets"),
            format!("{}.replay", self.progress_topic()),
        ]
    }

    pub fn live_requests(&self) -> u64 {
        (self.rate * self.live_seconds).round() as u64
    }

    /// The pipeline as the operator would pass it in MATCH_SETTINGS: the CRD
    /// defaults (cooldown one day, up to 5 windows of waiting, exact below
    /// 12, one builtin cosine scorer), with the window size of the run.
    pub fn match_settings(&self) -> MatchSettings {
        MatchSettings {
            features: FeatureSpec {
                dimension: DIMENSION as i32,
            },
            window: WindowSpec {
                size_millis: self.window_millis,
                ..WindowSpec::default()
            },
            matching: MatchingSpec::default(),
            scorers: vec![ScorerSpec {
                name: "cosine".into(),
                builtin: Some(BuiltinScorer::Cosine),
                http: None,
            }],
            feedback: None,
        }
    }
}

fn main() {
    if let Some(args) = std::env::var_os(baseline::ROLE_ENV) {
        // Re-run as the pinned baseline child.
        std::process::exit(baseline::child_main(&args.to_string_lossy()));
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("match_e2e: {e:#}");
            std::process::exit(2);
        }
    };
    // Before any thread exists, so every thread of the bench (its Kafka
    // clients included) keeps off the worker's core.
    if let Err(e) = system::pin_self_away_from(settings.worker_cpu) {
        eprintln!("match_e2e: {e:#}");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let code = runtime.block_on(async move {
        if let Err(e) = kafka::reachable(&settings.bootstrap).await {
            eprintln!(
                "match_e2e: Kafka at {} is unreachable ({e:#}).\n\
                 Start the local cluster first (e2e/cluster/up) or set KAFKA_BOOTSTRAP",
                settings.bootstrap
            );
            return 2;
        }
        // The work runs in its own task so that a panic still reaches the
        // Kafka cleanup below (child processes are killed by their guards).
        let result = tokio::spawn(bench(settings.clone())).await;
        kafka::delete_run_state(&settings.bootstrap, &settings.topics(), &settings.groups()).await;
        match result {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                eprintln!("match_e2e failed: {e:#}");
                1
            }
            Err(e) => {
                eprintln!("match_e2e panicked: {e}");
                1
            }
        }
    });
    std::process::exit(code);
}

async fn bench(s: Settings) -> anyhow::Result<()> {
    let mut machine = system::machine(s.worker_cpu, &s.bootstrap);
    // Restored when the bench ends (dropped at the end of this function).
    let _broker_moved = match (s.move_broker, machine.broker_pid) {
        (true, Some(pid)) => {
            let moved = system::move_broker_away_from(s.worker_cpu, pid)?;
            if moved.is_some() {
                machine.broker_cpus = system::cpus_allowed(&pid.to_string())
                    .map(|c| format!("{c} (moved off cpu {} for the run)", s.worker_cpu));
            }
            moved
        }
        _ => None,
    };
    machine.background_busy = system::busy_percent_over(Duration::from_secs(1)).await;
    eprintln!(
        "match_e2e: backlog {} requests, live {}/s for {} s, {} partitions, {} segments, worker on cpu {}",
        s.backlog, s.rate, s.live_seconds, s.partitions, s.segments, s.worker_cpu
    );
    let dir = tempfile::Builder::new()
        .prefix("matchfleet-bench-match-")
        .tempdir()?;

    eprintln!("match_e2e: transaction probes");
    let probes = probes::run(&s).await?;

    kafka::create_topic(&s.bootstrap, &s.topic(), s.partitions).await?;
    kafka::create_topic(&s.bootstrap, &s.baseline_results_topic(), s.partitions).await?;
    let mut load = workload::Workload::new(&s, 1);
    eprintln!("match_e2e: producing the backlog");
    let produced = kafka::produce_backlog(&s, &mut load).await?;

    eprintln!("match_e2e: baseline (bare rdkafka exactly-once pipe, pinned)");
    let base = baseline::run(&s, dir.path(), machine.broker_pid).await?;

    eprintln!("match_e2e: fleet (progress service + one pinned match worker)");
    let mut fleet = fleet::Fleet::start(&s, dir.path(), machine.broker_pid).await?;
    let observer = observer::Observer::start(&s, s.backlog + s.live_requests())?;
    let backlog = fleet
        .backlog_phase(&s, &observer)
        .await
        .context("fleet, backlog phase")?;
    let live = if s.live_requests() > 0 {
        eprintln!("match_e2e: live phase");
        Some(
            fleet
                .live_phase(&s, &observer, &mut load)
                .await
                .context("fleet, live phase")?,
        )
    } else {
        None
    };
    let mut detail = fleet.detail().await?;
    detail.results_offsets = kafka::topic_offsets(&s.bootstrap, &s.results_topic()).await?;
    detail.state_offsets = kafka::topic_offsets(&s.bootstrap, &s.state_topic()).await?;
    let observed = observer.stop().await;
    drop(fleet);
    if std::env::var_os("BENCH_KEEP_LOGS").is_some() {
        eprintln!("match_e2e: logs kept in {}", dir.keep().display());
    }

    report::print(&report::Report {
        settings: &s,
        machine: &machine,
        probes: &probes,
        produced: &produced,
        baseline: &base,
        backlog: &backlog,
        live: live.as_ref(),
        observed: &observed,
        fleet: &detail,
    });
    Ok(())
}
