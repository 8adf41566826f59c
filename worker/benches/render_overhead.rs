//! The fleet's per-task overhead: tasks/s of ONE render worker running a no-op
//! render command, against bare rdkafka consumer loops over the same topic, in
//! the same run, on the same machine.
//!
//! * baseline 1: one `StreamConsumer` `assign()`ed to every partition from the
//!   beginning, reading all messages and committing positions asynchronously.
//! * baseline 2: the same loop that also runs the same no-op command once per
//!   message (tokio::process, stdout/stderr piped like the worker does) with
//!   the same concurrency, committing in order with the worker's own
//!   `OffsetTracker`. This is the fair one: it pays for the processes, so what
//!   the fleet loses against it is matchfleet's protocol (claims, completions
//!   appended to the changelog, value files, publish renames, heartbeats).
//! * fleet: `matchfleet-worker progress` and one `matchfleet-worker render` as
//!   child processes; timed from `PUT /assignment` until `/status` says done.
//!
//! Needs the local cluster's Kafka (`e2e/cluster/up`). Run with
//! `cargo bench -p matchfleet-worker --bench render_overhead`; cargo builds the
//! `matchfleet-worker` binary of the same profile first. Settings come from the
//! environment: BENCH_TASKS (5000), BENCH_PARTITIONS (8), BENCH_CONCURRENCY (8),
//! BENCH_HEARTBEAT_MILLIS (1000, the worker's default), BENCH_COMMAND (a JSON
//! array with `{output}`, the only placeholder baseline 2 expands; default
//! `["touch","{output}"]`, no shell), KAFKA_BOOTSTRAP (127.0.0.1:9092).
//! Results and their reading: BENCHMARKS.md.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use matchfleet_api::progress::{Assignment, ProgressStatus};
use matchfleet_worker::render::offsets::OffsetTracker;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use support::{free_port, metrics, tail, wait_ok, Children, ProcCpu, SysCpu};
use tokio::sync::{mpsc, Semaphore};

/// The worker binary cargo built for this very profile.
const WORKER_EXE: &str = env!("CARGO_BIN_EXE_matchfleet-worker");
/// Offsets are committed this often, as the render worker does.
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// `/status` is polled this often; it takes the service's state lock, so not
/// much faster.
const STATUS_POLL: Duration = Duration::from_millis(20);
/// Sequential probes for the latency figures.
const PROBES: usize = 1000;

#[derive(Debug, Clone)]
struct Settings {
    bootstrap: String,
    tasks: usize,
    partitions: i32,
    concurrency: usize,
    heartbeat_millis: u64,
    command: Vec<String>,
    /// Unique per run: topics, groups and the slot carry it.
    run_id: String,
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
        let command: Vec<String> = match std::env::var("BENCH_COMMAND") {
            Ok(json) => serde_json::from_str(&json)
                .context("BENCH_COMMAND must be a JSON array of strings")?,
            Err(_) => vec!["touch".into(), "{output}".into()],
        };
        if !command.iter().any(|a| a.contains("{output}")) {
            bail!("the render command must write {{output}}: {command:?}");
        }
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        Ok(Settings {
            bootstrap: std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into()),
            tasks: num("BENCH_TASKS", 5000usize)?.max(1),
            partitions: num("BENCH_PARTITIONS", 8i32)?.max(1),
            concurrency: num("BENCH_CONCURRENCY", 8usize)?.max(1),
            heartbeat_millis: num("BENCH_HEARTBEAT_MILLIS", 1000u64)?,
            command,
            run_id: format!("{}-{millis}", std::process::id()),
        })
    }

    fn topic(&self) -> String {
        format!("matchfleet-bench-{}", self.run_id)
    }

    /// The topics this run creates, deleted at the end.
    fn topics(&self) -> Vec<String> {
        let t = self.topic();
        vec![
            t.clone(),
            format!("{t}.dlq"),
            format!("{t}.progress"),
            format!("{t}.append-probe"),
        ]
    }

    /// The command for one output file, expanded as the worker would.
    fn argv(&self, output: &Path) -> Vec<String> {
        let output = output.to_string_lossy();
        self.command
            .iter()
            .map(|a| a.replace("{output}", &output))
            .collect()
    }
}

/// One measured contender.
struct Measured {
    name: &'static str,
    tasks: usize,
    /// From the start (consumer creation, or the PUT) to the last task done.
    wall: Duration,
    /// From the start to the first task done (fleet: first /status poll seeing it).
    first: Duration,
    /// Where the CPU went over the whole run.
    cpu: CpuSplit,
}

/// CPU seconds spent over one run, by whom.
#[derive(Default)]
struct CpuSplit {
    /// The bare loop (the bench process), or the render worker.
    consumer: f64,
    /// The progress service (fleet only).
    progress: f64,
    /// The render commands.
    commands: f64,
    /// The Kafka broker, if its process was found.
    broker: Option<f64>,
    /// Every core's busy time, from /proc/stat.
    machine: f64,
    /// Share of all cores busy, in percent.
    busy_percent: f64,
}

impl CpuSplit {
    /// Everything else on the machine: the local cluster, other fleets, and
    /// the bench itself while it polls the fleet.
    fn rest(&self) -> f64 {
        self.machine - self.consumer - self.progress - self.commands - self.broker.unwrap_or(0.0)
    }
}

/// CPU counters at the start of a run.
struct CpuMark {
    machine: SysCpu,
    broker: Option<(u32, ProcCpu)>,
}

impl CpuMark {
    fn now() -> Self {
        CpuMark {
            machine: SysCpu::now(),
            broker: broker_pid().map(|pid| (pid, ProcCpu::of(&pid.to_string()))),
        }
    }

    /// Fills in the machine's and the broker's share since the mark.
    fn split(&self, mut split: CpuSplit) -> CpuSplit {
        let spent = SysCpu::now().since(&self.machine);
        split.machine = spent.busy_seconds();
        split.busy_percent = spent.busy_percent();
        split.broker = self
            .broker
            .as_ref()
            .map(|(pid, before)| ProcCpu::of(&pid.to_string()).since(before).own);
        split
    }
}

/// The local broker's JVM (main class `kafka.Kafka`), to account its CPU.
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == b"kafka.Kafka")
            .then_some(pid)
    })
}

impl Measured {
    fn rate(&self) -> f64 {
        self.tasks as f64 / self.wall.as_secs_f64()
    }

    /// Tasks/s once the first task is done: start-up (assignment, the first
    /// heartbeat, consumer joins) left out.
    fn steady_rate(&self) -> f64 {
        let span = self.wall.saturating_sub(self.first).as_secs_f64();
        if self.tasks < 2 || span <= 0.0 {
            return self.rate();
        }
        (self.tasks - 1) as f64 / span
    }
}

/// What the fleet run reveals about where its time goes.
#[derive(Default)]
struct FleetDetail {
    progress_metrics: HashMap<String, f64>,
    worker_metrics: HashMap<String, f64>,
    warnings: usize,
    http_rtt: Duration,
}

fn main() {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("render_overhead: {e:#}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let code = runtime.block_on(async move {
        if let Err(e) = kafka_reachable(&settings.bootstrap).await {
            eprintln!(
                "render_overhead: Kafka at {} is unreachable ({e:#}).\n\
                 Start the local cluster first: e2e/cluster/up",
                settings.bootstrap
            );
            return 2;
        }
        // The work runs in its own task so that a panic still reaches the
        // Kafka cleanup below (child processes are killed by their guard).
        let work = tokio::spawn(bench(settings.clone()));
        let result = work.await;
        delete_kafka_state(&settings).await;
        match result {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                eprintln!("render_overhead failed: {e:#}");
                1
            }
            Err(e) => {
                eprintln!("render_overhead panicked: {e}");
                1
            }
        }
    });
    std::process::exit(code);
}

async fn bench(s: Settings) -> anyhow::Result<()> {
    let mut machine = machine();
    // The box is shared (the local cluster, other fleets, builds): say how
    // busy it was before the bench put any load on it.
    let idle = CpuMark::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    machine.background_busy = idle.split(CpuSplit::default()).busy_percent;
    eprintln!(
        "render_overhead: {} tasks over {} partitions, concurrency {}, command {:?}",
        s.tasks, s.partitions, s.concurrency, s.command
    );
    create_topic(&s, &s.topic(), s.partitions).await?;
    produce(&s).await?;
    let dir = tempfile::Builder::new()
        .prefix("matchfleet-bench-")
        .tempdir()?;

    eprintln!("render_overhead: baseline 1 (bare consumer loop)");
    let b1 = bare_loop(&s).await?;
    eprintln!("render_overhead: baseline 2 (bare loop + command per message)");
    let b2 = bare_loop_with_command(&s, &dir.path().join("baseline")).await?;
    eprintln!("render_overhead: fleet (progress service + one render worker)");
    let (fleet, detail) = fleet(&s, dir.path()).await?;
    let append = append_probe(&s).await?;

    report(&s, &machine, &[&b1, &b2, &fleet], &detail, append);
    Ok(())
}

// ---------------------------------------------------------------- Kafka setup

async fn kafka_reachable(bootstrap: &str) -> anyhow::Result<()> {
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

fn admin(s: &Settings) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .create()?)
}

async fn create_topic(s: &Settings, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let results = admin(s)?
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        r.map_err(|(t, code)| anyhow::anyhow!("creating topic {t}: {code}"))?;
    }
    Ok(())
}

/// Deletes the run's topics and consumer groups. Best effort: some of them
/// may never have been created.
async fn delete_kafka_state(s: &Settings) {
    let Ok(admin) = admin(s) else { return };
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let topics = s.topics();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &options).await;
    let t = s.topic();
    let groups = [
        format!("{t}.baseline1"),
        format!("{t}.baseline2"),
        format!("{t}.live"),
        format!("{t}.progress.replay"),
    ];
    let names: Vec<&str> = groups.iter().map(String::as_str).collect();
    let _ = admin.delete_groups(&names, &options).await;
}

/// N messages, keys `task-000001`..., spread round-robin over the partitions.
async fn produce(s: &Settings) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .set("linger.ms", "5")
        .create()?;
    let topic = s.topic();
    let records: Vec<(String, String)> = (1..=s.tasks)
        .map(|i| {
            (
                format!("task-{i:06}"),
                format!(r#"{{"task":{i},"scene":"bench","frames":1}}"#),
            )
        })
        .collect();
    let sends = records.iter().enumerate().map(|(i, (key, value))| {
        producer.send(
            FutureRecord::to(&topic)
                .key(key)
                .payload(value)
                .partition((i % s.partitions as usize) as i32),
            Duration::from_secs(30),
        )
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e).context("producing the tasks")?;
    }
    Ok(())
}

// ------------------------------------------------------------------ baselines

/// A consumer configured like the render worker's, `assign()`ed to every
/// partition from the beginning.
fn bare_consumer(s: &Settings, group: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..s.partitions {
        tpl.add_partition_offset(&s.topic(), p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

fn commit(consumer: &StreamConsumer, topic: &str, next: &BTreeMap<i32, i64>, mode: CommitMode) {
    if next.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in next {
        let _ = tpl.add_partition_offset(topic, p, Offset::Offset(o));
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        eprintln!("render_overhead: commit failed: {e}");
    }
}

/// Generous: a run that takes longer than this is stuck, not slow.
fn deadline(s: &Settings) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(s.tasks as u64 * 20)
}

async fn bare_loop(s: &Settings) -> anyhow::Result<Measured> {
    let topic = s.topic();
    let cpu = ProcCpu::of("self");
    let mark = CpuMark::now();
    let t0 = Instant::now();
    let consumer = bare_consumer(s, &format!("{topic}.baseline1"))?;
    let mut stream = consumer.stream();
    let mut next = BTreeMap::new();
    let mut tick = tokio::time::interval(COMMIT_EVERY);
    let mut first = None;
    let mut read = 0;
    let run = async {
        while read < s.tasks {
            tokio::select! {
                _ = tick.tick() => commit(&consumer, &topic, &next, CommitMode::Async),
                m = stream.next() => {
                    let m = m.context("the consumer stream ended")??;
                    next.insert(m.partition(), m.offset() + 1);
                    read += 1;
                    first.get_or_insert_with(|| t0.elapsed());
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(deadline(s), run)
        .await
        .context("baseline 1 timed out")??;
    commit(&consumer, &topic, &next, CommitMode::Async);
    let wall = t0.elapsed();
    let cpu = mark.split(CpuSplit {
        consumer: ProcCpu::of("self").since(&cpu).own,
        ..Default::default()
    });
    Ok(Measured {
        name: "baseline 1: bare consumer loop",
        tasks: read,
        wall,
        first: first.unwrap_or(wall),
        cpu,
    })
}

/// Runs the no-op command for one message, the way the worker's `child::run`
/// does (stdin closed, stdout and stderr piped and drained, killed on drop).
async fn run_command(argv: &[String], output: &Path) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("could not run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{program} {}", out.status));
    }
    if !output.exists() {
        return Err(format!("{program} did not write {}", output.display()));
    }
    Ok(())
}

async fn bare_loop_with_command(s: &Settings, out_dir: &Path) -> anyhow::Result<Measured> {
    std::fs::create_dir_all(out_dir)?;
    let topic = s.topic();
    let permits = Arc::new(Semaphore::new(s.concurrency));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(i32, i64, Result<(), String>)>();
    let mut trackers: BTreeMap<i32, OffsetTracker> = BTreeMap::new();
    let cpu = ProcCpu::of("self");
    let mark = CpuMark::now();
    let t0 = Instant::now();
    let consumer = bare_consumer(s, &format!("{topic}.baseline2"))?;
    let mut stream = consumer.stream();
    let mut tick = tokio::time::interval(COMMIT_EVERY);
    let (mut read, mut done) = (0, 0);
    let mut first = None;
    let commit_finished = |trackers: &mut BTreeMap<i32, OffsetTracker>, mode| {
        let next: BTreeMap<i32, i64> = trackers
            .iter()
            .filter_map(|(&p, t)| Some((p, t.pending()?)))
            .collect();
        commit(&consumer, &topic, &next, mode);
        for (p, o) in next {
            if let Some(t) = trackers.get_mut(&p) {
                t.confirm(o);
            }
        }
    };
    let run = async {
        while done < s.tasks {
            tokio::select! {
                biased;
                Some((p, offset, result)) = done_rx.recv() => {
                    result.map_err(|e| anyhow::anyhow!("baseline 2 command failed: {e}"))?;
                    trackers.entry(p).or_default().finish(offset);
                    done += 1;
                    first.get_or_insert_with(|| t0.elapsed());
                }
                _ = tick.tick() => commit_finished(&mut trackers, CommitMode::Async),
                // This loop is the only one taking permits, so one is free now.
                m = stream.next(), if read < s.tasks && permits.available_permits() > 0 => {
                    let m = m.context("the consumer stream ended")??;
                    let permit = permits.clone().acquire_owned().await?;
                    let (p, offset) = (m.partition(), m.offset());
                    let key = std::str::from_utf8(m.key().unwrap_or_default())?.to_string();
                    trackers.entry(p).or_default().start(offset);
                    read += 1;
                    let output = out_dir.join(&key);
                    let argv = s.argv(&output);
                    let done_tx = done_tx.clone();
                    tokio::spawn(async move {
                        let result = run_command(&argv, &output).await;
                        drop(permit);
                        let _ = done_tx.send((p, offset, result));
                    });
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(deadline(s), run)
        .await
        .context("baseline 2 timed out")??;
    commit_finished(&mut trackers, CommitMode::Async);
    let wall = t0.elapsed();
    let used = ProcCpu::of("self").since(&cpu);
    let cpu = mark.split(CpuSplit {
        consumer: used.own,
        commands: used.children,
        ..Default::default()
    });
    let files = count_files(out_dir)?;
    if files != s.tasks {
        bail!("baseline 2 wrote {files} output files, not {}", s.tasks);
    }
    Ok(Measured {
        name: "baseline 2: bare loop + command",
        tasks: done,
        wall,
        first: first.unwrap_or(wall),
        cpu,
    })
}

// ---------------------------------------------------------------------- fleet

fn spawn_worker(
    mode: &str,
    env: &[(&str, String)],
    log: &Path,
    children: &mut Children,
) -> anyhow::Result<u32> {
    if !Path::new(WORKER_EXE).exists() {
        bail!("{WORKER_EXE} is missing: cargo build --release -p matchfleet-worker");
    }
    let log_file = File::create(log)?;
    let child = std::process::Command::new(WORKER_EXE)
        .arg(mode)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {WORKER_EXE} {mode}"))?;
    let pid = child.id();
    children.0.push(child);
    Ok(pid)
}

async fn fleet(s: &Settings, dir: &Path) -> anyhow::Result<(Measured, FleetDetail)> {
    let topic = s.topic();
    let out_dir = dir.join("fleet-out");
    let tmp_dir = dir.join("fleet-tmp");
    std::fs::create_dir_all(&tmp_dir)?;
    let (progress_port, health_port) = (free_port()?, free_port()?);
    let progress_url = format!("http://127.0.0.1:{progress_port}");
    let health_url = format!("http://127.0.0.1:{health_port}");
    let logs = [dir.join("progress.log"), dir.join("render.log")];
    let slot = format!("bench-{}", s.run_id);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut children = Children::default();

    let progress_pid = spawn_worker(
        "progress",
        &[
            ("KAFKA_BOOTSTRAP", s.bootstrap.clone()),
            ("PROGRESS_CHANGELOG_TOPIC", format!("{topic}.progress")),
            ("PROGRESS_LISTEN", format!("127.0.0.1:{progress_port}")),
            ("LEASE_MILLIS", "6000".into()),
            ("MAX_ATTEMPTS", "3".into()),
        ],
        &logs[0],
        &mut children,
    )?;
    wait_ok(
        &http,
        &format!("{progress_url}/healthz"),
        &mut children,
        &logs,
    )
    .await?;
    let worker_pid = spawn_worker(
        "render",
        &[
            ("KAFKA_BOOTSTRAP", s.bootstrap.clone()),
            ("SOURCE_TOPIC", topic.clone()),
            ("CONSUMER_GROUP", format!("{topic}.live")),
            ("LANE", "live".into()),
            ("SLOT", slot.clone()),
            ("PROGRESS_URL", progress_url.clone()),
            ("HEARTBEAT_INTERVAL_MILLIS", s.heartbeat_millis.to_string()),
            ("RENDER_COMMAND", serde_json::to_string(&s.command)?),
            ("OUTPUT_DIR", out_dir.to_string_lossy().into_owned()),
            ("CONCURRENCY", s.concurrency.to_string()),
            ("HEALTH_LISTEN", format!("127.0.0.1:{health_port}")),
            ("DEAD_LETTER_TOPIC", format!("{topic}.dlq")),
            // The worker's value files go to $TMPDIR: keep them in the run's folder.
            ("TMPDIR", tmp_dir.to_string_lossy().into_owned()),
        ],
        &logs[1],
        &mut children,
    )?;
    // Ready after its first answered heartbeat.
    wait_ok(&http, &format!("{health_url}/readyz"), &mut children, &logs).await?;

    let assignment = Assignment {
        lanes: [(
            "live".to_string(),
            (0..s.partitions).map(|p| (p, slot.clone())).collect(),
        )]
        .into(),
        drain_millis: 1000,
    };
    let cpu = (
        ProcCpu::of(&progress_pid.to_string()),
        ProcCpu::of(&worker_pid.to_string()),
    );
    let mark = CpuMark::now();
    let t0 = Instant::now();
    http.put(format!("{progress_url}/assignment"))
        .json(&assignment)
        .send()
        .await?
        .error_for_status()
        .context("PUT /assignment")?;
    let mut first = None;
    let until = t0 + deadline(s);
    let wall = loop {
        let status: ProgressStatus = http
            .get(format!("{progress_url}/status"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let elapsed = t0.elapsed();
        if status.done > 0 {
            first.get_or_insert(elapsed);
        }
        if status.failed > 0 {
            bail!("{} tasks failed\n{}", status.failed, tail(&logs[1]));
        }
        if status.done >= s.tasks as u64 {
            break elapsed;
        }
        if Instant::now() > until {
            bail!(
                "only {} of {} tasks done after {:?}\n{}\n{}",
                status.done,
                s.tasks,
                elapsed,
                tail(&logs[0]),
                tail(&logs[1])
            );
        }
        tokio::time::sleep(STATUS_POLL).await;
    };
    let worker_cpu = ProcCpu::of(&worker_pid.to_string()).since(&cpu.1);
    let cpu = mark.split(CpuSplit {
        consumer: worker_cpu.own,
        progress: ProcCpu::of(&progress_pid.to_string()).since(&cpu.0).own,
        commands: worker_cpu.children,
        ..Default::default()
    });

    // The worker may still be renaming the last output when /status says done
    // (publication follows the accepted completion): give it a moment.
    let published_by = Instant::now() + Duration::from_secs(5);
    let mut files = count_files(&out_dir)?;
    while files < s.tasks && Instant::now() < published_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
        files = count_files(&out_dir)?;
    }
    if files != s.tasks {
        bail!("the fleet published {files} output files, not {}", s.tasks);
    }
    let staged_left = count_files(&out_dir.join(".staging"))?;
    if staged_left != 0 {
        bail!("{staged_left} staged outputs were left behind");
    }

    let http_rtt = http_round_trip(&http, &format!("{progress_url}/healthz")).await?;
    let detail = FleetDetail {
        progress_metrics: metrics(&http, &format!("{progress_url}/metrics")).await?,
        worker_metrics: metrics(&http, &format!("{health_url}/metrics")).await?,
        warnings: logs
            .iter()
            .map(|l| {
                std::fs::read_to_string(l)
                    .unwrap_or_default()
                    .lines()
                    .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                    .count()
            })
            .sum(),
        http_rtt,
    };
    drop(children);
    Ok((
        Measured {
            name: "fleet: progress + 1 render worker",
            tasks: s.tasks,
            wall,
            first: first.unwrap_or(wall),
            cpu,
        },
        detail,
    ))
}

fn count_files(dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        if entry?.file_type()?.is_file() {
            n += 1;
        }
    }
    Ok(n)
}

// ------------------------------------------------------------ latency probes

/// Median of sequential keep-alive GETs: the floor of one progress call.
async fn http_round_trip(http: &reqwest::Client, url: &str) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(PROBES);
    for _ in 0..PROBES {
        let t = Instant::now();
        http.get(url)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        times.push(t.elapsed());
    }
    Ok(median(times))
}

/// Sequential sends with the changelog producer's settings (acks=all,
/// idempotent, linger.ms=0): the median latency, the floor of one
/// completion, and the broker's CPU seconds per append, if it was found.
async fn append_probe(s: &Settings) -> anyhow::Result<(Duration, Option<f64>)> {
    let topic = format!("{}.append-probe", s.topic());
    create_topic(s, &topic, 1).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()?;
    let mut times = Vec::with_capacity(PROBES);
    let mut mark = None;
    for i in 0..PROBES + 20 {
        if i == 20 {
            mark = Some(CpuMark::now());
        }
        let key = format!("task/probe-{i}");
        let t = Instant::now();
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(
                    r#"{"task":{"key":"probe","state":"done","lane":"live","latencyMillis":1}}"#,
                ),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        // The first sends pay for metadata and the idempotent producer id.
        if i >= 20 {
            times.push(t.elapsed());
        }
    }
    let broker = mark
        .and_then(|m| m.split(CpuSplit::default()).broker)
        .map(|secs| secs / PROBES as f64);
    Ok((median(times), broker))
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

// -------------------------------------------------------------- the machine

struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
    rustc: String,
    librdkafka: String,
    /// Share of all cores busy in the second before the bench started.
    background_busy: f64,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| format!("Linux {}", k.trim()))
        .unwrap_or_else(|_| "unknown".into());
    // From the workspace, so rust-toolchain.toml picks the pinned toolchain.
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
    Machine {
        cpu,
        cores,
        kernel,
        rustc,
        librdkafka,
        background_busy: 0.0,
    }
}

// ------------------------------------------------------------------- report

fn report(
    s: &Settings,
    m: &Machine,
    runs: &[&Measured],
    fleet: &FleetDetail,
    (append, append_cpu): (Duration, Option<f64>),
) {
    let n = s.tasks as f64;
    let (b1, b2, fl) = (runs[0], runs[1], runs[2]);
    println!();
    println!("render worker per-task overhead");
    println!(
        "machine: {} | {} cores | {} | {} | librdkafka {} | {:.0}% busy before the run",
        m.cpu, m.cores, m.kernel, m.rustc, m.librdkafka, m.background_busy
    );
    println!(
        "tasks: {} | partitions: {} | concurrency: {} | command: {} | heartbeat: {} ms",
        s.tasks,
        s.partitions,
        s.concurrency,
        serde_json::to_string(&s.command).unwrap_or_default(),
        s.heartbeat_millis
    );
    println!();
    println!(
        "{:<34} {:>8} {:>7} {:>11} {:>10} {:>9}",
        "", "tasks/s", "wall s", "1st done s", "steady/s", "CPU busy"
    );
    for r in runs {
        println!(
            "{:<34} {:>8.0} {:>7.2} {:>11.2} {:>10.0} {:>8.0}%",
            r.name,
            r.rate(),
            r.wall.as_secs_f64(),
            r.first.as_secs_f64(),
            r.steady_rate(),
            r.cpu.busy_percent
        );
    }
    println!("(steady: from the first task done to the last, start-up left out)");
    println!();
    println!(
        "ratio fleet / baseline 1: {:.4} (steady {:.4})",
        fl.rate() / b1.rate(),
        fl.steady_rate() / b1.steady_rate()
    );
    println!(
        "ratio fleet / baseline 2: {:.3} (steady {:.3})",
        fl.rate() / b2.rate(),
        fl.steady_rate() / b2.steady_rate()
    );
    let per_task = |r: &Measured| 1000.0 / r.steady_rate();
    println!(
        "steady time per task: baseline 2 {:.3} ms, fleet {:.3} ms: overhead {:.3} ms per task",
        per_task(b2),
        per_task(fl),
        per_task(fl) - per_task(b2)
    );
    println!();
    println!(
        "CPU ms per task (all cores; the machine has {} cores):",
        m.cores
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "consumer", "progress", "commands", "broker", "rest", "total"
    );
    for r in runs {
        let ms = |secs: f64| 1000.0 * secs / r.tasks.max(1) as f64;
        println!(
            "{:<34} {:>9.3} {:>9.3} {:>9.3} {:>9} {:>9.3} {:>9.3}",
            r.name,
            ms(r.cpu.consumer),
            ms(r.cpu.progress),
            ms(r.cpu.commands),
            r.cpu
                .broker
                .map_or("n/a".to_string(), |b| format!("{:.3}", ms(b))),
            ms(r.cpu.rest()),
            ms(r.cpu.machine)
        );
    }
    println!(
        "(consumer: the bench's loop, or the render worker; rest: the local cluster, other \
         fleets, the bench polling /status)"
    );
    println!();
    let p = |k: &str| fleet.progress_metrics.get(k).copied().unwrap_or(0.0);
    let w = |k: &str| fleet.worker_metrics.get(k).copied().unwrap_or(0.0);
    let claims = p("matchfleet_progress_claims_total");
    let completes = w("matchfleet_worker_published_total");
    let fails = w("matchfleet_worker_attempts_failed_total");
    let render_ms = w("matchfleet_worker_render_milliseconds_sum")
        / w("matchfleet_worker_render_count").max(1.0);
    println!("the fleet's protocol:");
    println!(
        "  progress calls per task: {:.2} (claims {:.2}, completions {:.2}, failures {:.2}); \
         heartbeats in the run: {:.0}",
        (claims + completes + fails) / n,
        claims / n,
        completes / n,
        fails / n,
        p("matchfleet_progress_heartbeats_total")
    );
    println!(
        "  changelog appends (acks=all) per task: {:.2}; offset commits: {:.0}",
        p("matchfleet_progress_changelog_appends_total") / n,
        w("matchfleet_worker_commits_total")
    );
    println!(
        "  a concurrency permit is held {:.2} ms per task; the command runs {:.2} ms of it \
         (the rest: claim, value file, complete, publish)",
        s.concurrency as f64 * per_task(fl),
        render_ms
    );
    println!(
        "  idle-machine latencies: HTTP round trip to the progress service {:.3} ms \
         (median GET /healthz); acks=all append {:.3} ms (median, sequential, changelog \
         producer settings) = at most {:.0} completions/s through the state lock",
        secs_ms(fleet.http_rtt),
        secs_ms(append),
        1.0 / append.as_secs_f64().max(1e-9)
    );
    if let Some(cpu) = append_cpu {
        println!(
            "  broker CPU per sequential acks=all append: {:.3} ms",
            1000.0 * cpu
        );
    }
    println!("  WARN/ERROR lines in the fleet's logs: {}", fleet.warnings);
}

fn secs_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
