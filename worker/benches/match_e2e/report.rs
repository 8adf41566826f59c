//! Figures and the printed report.

use std::collections::HashMap;
use std::time::Duration;

use crate::fleet::{Backlog, FleetDetail, Live};
use crate::kafka::{CommitProgress, Produced};
use crate::observer::{Observed, Sample};
use crate::probes::Probes;
use crate::system::{CpuSpent, Machine};
use crate::Settings;

/// The goal for this benchmark.
const GOAL_RATE: f64 = 50_000.0;
const GOAL_P99_MILLIS: f64 = 20.0;

/// Nearest-rank percentiles of a set of milliseconds.
pub struct Stats {
    sorted: Vec<f64>,
}

impl Stats {
    pub fn of_millis(mut values: Vec<f64>) -> Stats {
        values.retain(|v| v.is_finite());
        values.sort_by(f64::total_cmp);
        Stats { sorted: values }
    }

    pub fn of_durations(values: Vec<Duration>) -> Stats {
        Stats::of_millis(values.iter().map(|d| d.as_secs_f64() * 1000.0).collect())
    }

    pub fn count(&self) -> usize {
        self.sorted.len()
    }

    /// The value at percentile `p` (0 < p <= 100), NaN without samples.
    pub fn at(&self, p: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let rank = (p / 100.0 * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(f64::NAN)
    }
}

/// One contender over the backlog.
pub struct Measured {
    pub requests: u64,
    pub progress: CommitProgress,
    /// `processes[0]` is the contender (the baseline child, or the worker).
    pub cpu: CpuSpent,
    pub threads: HashMap<String, usize>,
    pub warnings: Vec<String>,
}

impl Measured {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.progress.done.as_secs_f64().max(1e-9)
    }

    /// Requests/s once the first commit is in: start-up (leases, fencing,
    /// restore, consumer start) left out.
    pub fn steady_rate(&self) -> f64 {
        let span = self.progress.done.saturating_sub(self.progress.first);
        let after_first = self.requests as f64 - self.progress.first_committed as f64;
        if span.is_zero() || after_first <= 0.0 {
            return self.rate();
        }
        after_first / span.as_secs_f64()
    }

    /// Share of one core the contender used, in percent.
    pub fn core_busy(&self) -> f64 {
        100.0 * self.cpu.processes.first().copied().unwrap_or(0.0) / self.cpu.wall.max(1e-9)
    }
}

pub struct Report<'a> {
    pub settings: &'a Settings,
    pub machine: &'a Machine,
    pub probes: &'a Probes,
    pub produced: &'a Produced,
    pub baseline: &'a Measured,
    pub backlog: &'a Backlog,
    pub live: Option<&'a Live>,
    pub observed: &'a Observed,
    pub fleet: &'a FleetDetail,
}

/// Threads named by tokio: its runtime workers and its blocking pool.
fn tokio_threads(threads: &HashMap<String, usize>) -> usize {
    threads
        .iter()
        .filter(|(name, _)| name.starts_with("tokio-rt-worker"))
        .map(|(_, n)| n)
        .sum()
}

fn total_threads(threads: &HashMap<String, usize>) -> usize {
    threads.values().sum()
}

/// Latencies of the result records whose window closed in [from_ms,
/// until_ms): close -> produced, close -> visible, produced -> visible.
struct Latencies {
    produced: Stats,
    visible: Stats,
    kafka: Stats,
}

fn latencies(samples: &[Sample], from_ms: i64, until_ms: i64) -> Latencies {
    let chosen: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.closed_at >= from_ms && s.closed_at < until_ms)
        .collect();
    let since = |s: &&Sample, t: i64| s.created.map(|c| (c - t) as f64);
    Latencies {
        produced: Stats::of_millis(
            chosen
                .iter()
                .filter_map(|s| since(s, s.closed_at))
                .collect(),
        ),
        visible: Stats::of_millis(
            chosen
                .iter()
                .map(|s| s.visible - s.closed_at as f64)
                .collect(),
        ),
        kafka: Stats::of_millis(
            chosen
                .iter()
                .filter_map(|s| s.created.map(|c| s.visible - c as f64))
                .collect(),
        ),
    }
}

fn latency_rows(phase: &str, l: &Latencies) {
    stats_row(
        &format!("{phase}: close -> produced (CreateTime)"),
        &l.produced,
    );
    stats_row(
        &format!("{phase}: close -> visible (read_committed)"),
        &l.visible,
    );
    stats_row(&format!("{phase}: produced -> visible"), &l.kafka);
}

fn stats_row(name: &str, s: &Stats) {
    println!(
        "{name:<46} {:>8} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1}",
        s.count(),
        s.at(50.0),
        s.at(90.0),
        s.at(99.0),
        s.at(99.9),
        s.max()
    );
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("never (gave up)".into(), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

/// CPU milliseconds per 1,000 requests.
fn per_thousand(cpu_seconds: f64, requests: u64) -> f64 {
    1e6 * cpu_seconds / requests.max(1) as f64
}

pub fn print(r: &Report<'_>) {
    let (s, m) = (r.settings, r.machine);
    println!();
    println!("MatchPipeline end to end through Kafka, one worker core");
    println!(
        "machine: {} | {} cores | {} | {} | librdkafka {} | {:.0}% busy before the run",
        m.cpu, m.cores, m.kernel, m.rustc, m.librdkafka, m.background_busy
    );
    println!(
        "cores: worker and baseline pinned with `taskset -c {}` (allowed: {}; the worker had {} tokio threads - \
         runtime and blocking pool - of {}); bench on {}; broker allowed on {}",
        s.worker_cpu,
        r.fleet.worker_cpus,
        tokio_threads(&r.fleet.threads),
        total_threads(&r.fleet.threads),
        m.bench_cpus,
        m.broker_cpus.as_deref().unwrap_or("? (broker process not found)")
    );
    if s.worker_exe != crate::fleet::WORKER_EXE {
        println!("worker binary: {} (BENCH_WORKER_EXE)", s.worker_exe);
    }
    let per_window =
        s.rate * f64::from(s.window_millis) / 1000.0 * r.produced.largest_segment_share;
    println!(
        "workload: {} partitions, {} segments (Zipf {}; the largest ~{:.0} requests per {} ms window at \
         {}/s), {} users, {}-dim vectors; leases {} ms, heartbeats every 1000 ms; CRD defaults otherwise \
         (cooldown 1 day, maxWaitWindows 5, exactBelow 12, cosine, commit interval 200 ms)",
        s.partitions,
        s.segments,
        s.skew,
        per_window,
        s.window_millis,
        s.rate,
        s.users,
        crate::DIMENSION,
        s.lease_millis
    );
    println!(
        "backlog: {} requests, event times spaced as if they arrived at {}/s; produced in {:.1} s",
        r.produced.requests, s.rate, r.produced.seconds
    );

    let w = &r.probes.warm_up;
    println!(
        "broker warm-up: {} sequential transactions in {:.0} s; p50 of the first 100 {:.1} ms, of the last 100 {:.1} ms",
        w.transactions,
        w.seconds,
        w.first.at(50.0),
        w.last.at(50.0)
    );
    println!();
    println!("transactions on an idle pipeline, sequential (1 result + 1 state record + the input offset), ms:");
    println!(
        "{:<46} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "", "n", "p50", "p90", "p99", "p99.9", "max"
    );
    stats_row("worker's txn::Transactions", &r.probes.worker);
    stats_row(
        "bare BaseProducer, deliveries served first",
        &r.probes.base_served,
    );
    stats_row("bare BaseProducer, commit at once", &r.probes.base_at_once);
    stats_row(
        "bare ThreadedProducer, commit at once",
        &r.probes.threaded_at_once,
    );

    println!();
    println!("throughput over the backlog ({} requests):", s.backlog);
    println!(
        "{:<40} {:>9} {:>7} {:>10} {:>10} {:>10}",
        "", "req/s", "wall s", "1st cmt s", "steady/s", "core busy"
    );
    let (b, f) = (r.baseline, &r.backlog.measured);
    for (name, x) in [
        ("baseline: bare rdkafka exactly-once pipe", b),
        ("fleet: progress + 1 match worker", f),
    ] {
        println!(
            "{name:<40} {:>9.0} {:>7.2} {:>10.2} {:>10.0} {:>9.0}%",
            x.rate(),
            x.progress.done.as_secs_f64(),
            x.progress.first.as_secs_f64(),
            x.steady_rate(),
            x.core_busy()
        );
    }
    println!("(wall: start, or the PUT /assignment, until the committed offsets reach the end; steady: from the first commit)");
    println!(
        "ratio fleet / baseline: {:.3} (steady {:.3}); every backlog result visible {} after the PUT",
        f.rate() / b.rate(),
        f.steady_rate() / b.steady_rate(),
        secs(r.backlog.all_settled)
    );
    println!(
        "baseline: {} tokio threads of {}",
        tokio_threads(&b.threads),
        total_threads(&b.threads)
    );
    println!("CPU ms per 1,000 requests (all cores):");
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>13}",
        "", "contender", "progress", "bench", "broker", "rest", "total", "machine busy"
    );
    cpu_row("baseline", &b.cpu, b.requests, false);
    cpu_row("fleet, backlog", &f.cpu, f.requests, true);
    if let Some(live) = r.live {
        cpu_row(
            "fleet, live (while sending)",
            &live.cpu,
            live.requests,
            true,
        );
    }
    println!(
        "(contender: the baseline child or the worker; bench: the load generator and the results reader; \
         the live phase's requests are made before it starts, only sent during it)"
    );

    let live_from = r.live.map_or(i64::MAX, |l| l.start_ms);
    let backlog_latencies = latencies(&r.observed.samples, r.backlog.start_ms, live_from);
    if let Some(live) = r.live {
        println!();
        println!("live: {}/s offered for {} s", s.rate, s.live_seconds);
        println!(
            "  sent {} requests in {:.2} s ({:.0}/s{})",
            live.requests,
            live.send_seconds,
            live.requests as f64 / live.send_seconds.max(1e-9),
            if live.send_seconds > s.live_seconds * 1.05 {
                "; the machine could not keep the pace"
            } else {
                ""
            }
        );
        println!(
            "  committed lag while sending: max {} requests (~{:.0} ms of input), last {}; all committed {} \
             after the last send, every result visible {} after it",
            live.max_lag,
            live.max_lag as f64 * 1000.0 / s.rate,
            live.end_lag,
            secs(live.committed_after),
            secs(live.settled_after)
        );
        let worker = live.cpu.processes.first().copied().unwrap_or(0.0);
        println!(
            "  worker core busy while sending: {:.0}%",
            100.0 * worker / live.cpu.wall.max(1e-9)
        );
    }
    println!();
    println!("window close -> result, per result record, ms:");
    println!(
        "{:<46} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "", "records", "p50", "p90", "p99", "p99.9", "max"
    );
    let mut live_visible_p99 = None;
    if let Some(live) = r.live {
        let l = latencies(&r.observed.samples, live.start_ms, i64::MAX);
        latency_rows("live", &l);
        live_visible_p99 = Some(l.visible.at(99.0));
    }
    latency_rows("backlog", &backlog_latencies);
    println!(
        "(closedAt and CreateTime are whole ms. closedAt is read once per close call, so a window's figure \
         includes the windows closed before it in the same call; produced -> visible is the transaction, \
         its markers and the fetch)"
    );

    println!();
    let w = |k: &str| {
        r.fleet
            .worker_metrics
            .get(&format!("matchfleet_match_{k}"))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "worker: {:.0} requests, {:.0} windows closed ({:.0} from prescored lists, {:.0} of them presorted), {:.0} matched pairs, {:.0} expired, {:.0} transactions \
         (mean {:.2} ms each), {:.0} failed",
        w("requests_total"),
        w("windows_closed_total"),
        w("windows_prescored_total"),
        w("windows_presorted_total"),
        w("matched_total"),
        w("expired_total"),
        w("commits_total"),
        1000.0 * w("transaction_seconds_sum") / w("transaction_seconds_count").max(1.0),
        w("commit_failures_total")
    );
    // The worker's own histograms: share of observations within each bound.
    for (name, what) in [
        ("window_close_seconds", "close calls that closed a window"),
        ("transaction_seconds", "transactions"),
    ] {
        let count = w(&format!("{name}_count"));
        let within: Vec<String> = [0.005, 0.01, 0.025, 0.05, 0.1]
            .iter()
            .map(|b| {
                let n = w(&format!("{name}_bucket{{le=\"{b}\"}}"));
                format!("<= {:.0} ms {:.1}%", b * 1000.0, 100.0 * n / count.max(1.0))
            })
            .collect();
        println!(
            "worker: {count:.0} {what} (mean {:.2} ms): {}",
            1000.0 * w(&format!("{name}_sum")) / count.max(1.0),
            within.join(", ")
        );
    }
    println!(
        "worker: partitions taken {} times for {} partitions; {:.0} requests read for {} made; {:.0} state \
         records restored{}",
        r.fleet.partitions_taken,
        s.partitions,
        w("requests_total"),
        s.backlog + r.live.map_or(0, |l| l.requests),
        w("restored_records_total"),
        if r.fleet.partitions_taken > s.partitions as usize {
            " (leases were lost and partitions restored: see the WARN lines)"
        } else {
            ""
        }
    );
    let made = s.backlog + r.live.map_or(0, |l| l.requests);
    println!(
        "Kafka offsets used per request: results {:.2}, state {:.2} (records plus one marker per transaction \
         and partition); input 1",
        r.fleet.results_offsets as f64 / made.max(1) as f64,
        r.fleet.state_offsets as f64 / made.max(1) as f64
    );
    let o = r.observed;
    let missing = o.missing_below(made);
    let exactly_once = missing == 0 && o.duplicates == 0 && o.unknown == 0 && o.unparsable == 0;
    println!(
        "exactly once: {} ({} requests, {} settled; missing {}, duplicates {}, unknown {}, unparsable {}; \
         {} match records, {} expiries)",
        if exactly_once { "yes" } else { "NO" },
        made,
        o.settled_total,
        missing,
        o.duplicates,
        o.unknown,
        o.unparsable,
        o.matched,
        o.expired
    );
    println!(
        "WARN/ERROR lines in the fleet's logs: {}; in the baseline's: {}",
        r.fleet.warnings.len(),
        r.baseline.warnings.len()
    );
    for line in r.fleet.warnings.iter().take(3) {
        println!("  {line}");
    }

    println!();
    let capacity = f.steady_rate();
    match live_visible_p99 {
        Some(p99) => println!(
            "goal (issue 4): >= {GOAL_RATE:.0} requests/s with p99 close -> visible <= {GOAL_P99_MILLIS:.0} ms \
             on one worker core: rate {} (backlog steady {:.0}/s{}), p99 {} ({:.1} ms at {}/s)",
            if capacity >= GOAL_RATE { "met" } else { "NOT met" },
            capacity,
            match r.live {
                Some(l) if l.max_lag as f64 > s.rate => ", live lag grew past a second of input",
                _ => "",
            },
            if p99 <= GOAL_P99_MILLIS { "met" } else { "NOT met" },
            p99,
            s.rate
        ),
        None => println!(
            "goal (issue 4): >= {GOAL_RATE:.0} requests/s: {} (backlog steady {:.0}/s); no live phase, no latency goal",
            if capacity >= GOAL_RATE { "met" } else { "NOT met" },
            capacity
        ),
    }
}

fn cpu_row(name: &str, cpu: &CpuSpent, requests: u64, fleet: bool) {
    let p = |i: usize| cpu.processes.get(i).copied().unwrap_or(0.0);
    let (contender, progress, bench) = if fleet {
        (p(0), p(1), p(2))
    } else {
        (p(0), 0.0, 0.0)
    };
    let broker = cpu.broker.unwrap_or(0.0);
    let rest = cpu.machine - contender - progress - bench - broker;
    println!(
        "{name:<40} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>9.1} {:>9.1} {:>12.0}%",
        per_thousand(contender, requests),
        per_thousand(progress, requests),
        per_thousand(bench, requests),
        cpu.broker.map_or("n/a".to_string(), |b| format!(
            "{:.1}",
            per_thousand(b, requests)
        )),
        per_thousand(rest, requests),
        per_thousand(cpu.machine, requests),
        cpu.busy_percent
    );
}
