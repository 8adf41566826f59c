//! One window close of the MatchPipeline engine (issue 4): score + filter +
//! match of 1,000 / 5,000 / 10,000 requests, against the naive approach
//! measured in the same run. Prints the machine, the workload and both times.
//!
//! Run: cargo bench -p matchfleet-worker --bench matchmaker

use std::collections::HashMap;
use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use matchfleet_api::match_pipeline::{
    BuiltinScorer, FeatureSpec, MatchSettings, MatchingSpec, ScorerSpec, WindowSpec,
};
use matchfleet_api::matching::{
    mutually_acceptable, MatchRequest, MatchResult, Preferences, Profile,
};
use matchfleet_worker::matching::{score_path, EngineConfig, FeatureMatrix, PartitionEngine};
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;

const DIM: usize = 32;
/// Acceptable candidates per request the workload aims at, where the window
/// is large enough to hold them.
const TARGET_ACCEPTABLE: f64 = 2_400.0;
/// The naive baseline is skipped where its predicted time exceeds this.
const BASELINE_LIMIT: Duration = Duration::from_secs(60);
const CLUSTERS: usize = 24;

/// A window of `n` requests from distinct users: genders f/m/x at 47/47/6 %;
/// most want the other binary gender, some anyone or their own; ages 18–65,
/// mostly 20–40; an age range around their own whose width is scaled by
/// `breadth`; 32-dim vectors around 24 interest clusters.
fn window(n: usize, breadth: f64, seed: u64) -> Vec<MatchRequest> {
    let mut rng = Pcg64::seed_from_u64(seed);
    let centers: Vec<Vec<f32>> = (0..CLUSTERS)
        .map(|_| {
            (0..DIM)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect()
        })
        .collect();
    (0..n)
        .map(|i| {
            let roll: f64 = rng.random();
            let gender = if roll < 0.47 {
                "f"
            } else if roll < 0.94 {
                "m"
            } else {
                "x"
            };
            let want: f64 = rng.random();
            let genders: Vec<String> = match gender {
                "x" if want < 0.5 => vec![],
                "x" => vec!["x".into(), "f".into(), "m".into()],
                _ if want < 0.10 => vec![],
                g if want < 0.15 => vec![g.into()],
                "f" => vec!["m".into()],
                _ => vec!["f".into()],
            };
            let z: f64 = rng.sample(StandardNormal);
            let age = (29.0 + 7.0 * z).clamp(18.0, 65.0) as u8;
            let below = breadth * rng.random_range(0.5..1.5);
            let above = breadth * rng.random_range(0.5..1.5);
            let min_age = (f64::from(age) - below).clamp(18.0, 99.0) as u8;
            let max_age = (f64::from(age) + above).clamp(18.0, 99.0) as u8;
            let c = &centers[rng.random_range(0..CLUSTERS)];
            let vector = c
                .iter()
                .map(|&x| x + 0.9 * rng.sample::<f32, _>(StandardNormal))
                .collect();
            MatchRequest {
                request_id: format!("req-{i:06}"),
                user: format!("user-{i:06}"),
                segment: "bench".into(),
                event_time: (i % 1000) as i64,
                vector,
                profile: Profile {
                    gender: gender.into(),
                    age,
                },
                wants: Preferences {
                    genders,
                    min_age,
                    max_age,
                },
            }
        })
        .collect()
}

/// Mean acceptable candidates per request, from a sample of rows.
fn acceptable_per_request(reqs: &[MatchRequest]) -> f64 {
    let rows = reqs.len().min(300);
    let count: usize = reqs[..rows]
        .iter()
        .map(|a| reqs.iter().filter(|b| mutually_acceptable(a, b)).count())
        .sum();
    count as f64 / rows as f64
}

/// The age breadth (years) giving ~TARGET_ACCEPTABLE candidates in a window
/// of `n`, or the widest (ages barely matter) if the window cannot hold them.
fn calibrate(n: usize) -> (f64, f64) {
    let (mut lo, mut hi) = (1.0f64, 60.0f64);
    let widest = acceptable_per_request(&window(n, hi, 1));
    if widest <= TARGET_ACCEPTABLE {
        return (hi, widest);
    }
    for _ in 0..14 {
        let mid = 0.5 * (lo + hi);
        if acceptable_per_request(&window(n, mid, 1)) < TARGET_ACCEPTABLE {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (hi, acceptable_per_request(&window(n, hi, 1)))
}

fn settings() -> MatchSettings {
    MatchSettings {
        features: FeatureSpec {
            dimension: DIM as i32,
        },
        window: WindowSpec {
            size_millis: 1000,
            out_of_order_millis: 200,
            allowed_lateness_millis: 5000,
            idle_millis: 1000,
        },
        matching: MatchingSpec {
            max_wait_windows: 5,
            rematch_cooldown_seconds: 86_400,
            exact_below: 12,
            min_score: -1.0,
        },
        scorers: vec![ScorerSpec {
            name: "cosine".into(),
            builtin: Some(BuiltinScorer::Cosine),
            http: None,
        }],
        feedback: None,
    }
}

/// An engine holding `reqs` in window [0, 1000) and a watermark past its
/// end, so the next `close` closes exactly that window.
fn loaded_engine(reqs: &[MatchRequest]) -> PartitionEngine {
    loaded(reqs, None).0
}

/// Requests a partition reads between two prescoring passes in the
/// prescored contender (about one fetch's worth per window at 50,000/s).
const ARRIVAL_BATCH: usize = 64;

/// [`loaded_engine`], with `prescore()` after every `batch` requests
/// (as the worker does after each read); the time those calls took.
fn loaded(reqs: &[MatchRequest], batch: Option<usize>) -> (PartitionEngine, Duration) {
    let config = EngineConfig::from_settings(&settings())
        .expect("valid settings")
        .with_top_k(top_k());
    let mut e = PartitionEngine::new(0, config);
    let mut prescoring = Duration::ZERO;
    for (offset, r) in reqs.iter().enumerate() {
        e.ingest(r.clone(), offset as i64, 0)
            .expect("valid request");
        if batch.is_some_and(|b| (offset + 1) % b == 0 || offset + 1 == reqs.len()) {
            let t = Instant::now();
            e.prescore();
            prescoring += t.elapsed();
        }
    }
    let mut tick = reqs[0].clone();
    tick.request_id = "tick".into();
    tick.user = "tick".into();
    tick.segment = "tick".into();
    tick.event_time = 1300;
    e.ingest(tick, reqs.len() as i64, 0).expect("valid request");
    (e, prescoring)
}

struct Outcome {
    pairs: usize,
    total_score: f64,
}

fn outcome_of(results: &[MatchResult]) -> Outcome {
    let mut o = Outcome {
        pairs: 0,
        total_score: 0.0,
    };
    for r in results {
        if let MatchResult::Matched { score, .. } = r {
            o.pairs += 1;
            o.total_score += f64::from(*score);
        }
    }
    o
}

/// The naive approach: every pair scored one by one (a dot product of the
/// normalised vectors), each checked with `mutually_acceptable` and
/// minScore, all allowed edges sorted, then greedy.
fn naive(reqs: &[MatchRequest], min_score: f64) -> Outcome {
    let n = reqs.len();
    let data: Vec<f32> = reqs.iter().flat_map(|r| r.vector.iter().copied()).collect();
    let mut m = FeatureMatrix::from_vec(data, DIM).expect("whole rows");
    m.normalize_rows();
    let mut edges: Vec<(f32, u32, u32)> = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            // The same loop as `score_naive`'s, one pair at a time.
            let score: f32 = m.row(i).iter().zip(m.row(j)).map(|(x, y)| x * y).sum();
            if f64::from(score) >= min_score && mutually_acceptable(&reqs[i], &reqs[j]) {
                edges.push((score, i as u32, j as u32));
            }
        }
    }
    edges.sort_unstable_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let mut free = vec![true; n];
    let mut o = Outcome {
        pairs: 0,
        total_score: 0.0,
    };
    for (s, i, j) in edges {
        if free[i as usize] && free[j as usize] {
            free[i as usize] = false;
            free[j as usize] = false;
            o.pairs += 1;
            o.total_score += f64::from(s);
        }
    }
    o
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let rustc = Command::new("rustc")
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("machine:");
    println!(
        "  cpu       {} ({} MHz)",
        field("model name"),
        field("cpu MHz")
    );
    println!(
        "  cores     {} logical",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  rustc     {rustc}");
    println!(
        "  load avg  {} (shared VM: other processes may run)",
        load.trim()
    );
    println!("  scorer    score_batch uses {}; one thread", score_path());
}

/// Candidates kept per request: the engine's default, or `BENCH_TOP_K`.
fn top_k() -> usize {
    std::env::var("BENCH_TOP_K")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(matchfleet_worker::matching::config::DEFAULT_TOP_K)
}

fn main() {
    machine();
    let s = settings();
    println!();
    println!(
        "workload: one segment, one window of n requests from distinct users, d = {DIM}, cosine, \
         minScore {} (every acceptable pair may match), top-K {}",
        s.matching.min_score,
        top_k()
    );
    println!(
        "  genders f/m/x 47/47/6 %, 85 % want the other binary gender, 10 % anyone, 5 % their own \
         (x: anyone or all three); ages 18-65 around 29; each wants an age range around their own"
    );
    println!(
        "  the range's width is calibrated per window for ~{TARGET_ACCEPTABLE} acceptable candidates per request; \
         a window too small for that gets the widest ranges, i.e. every candidate the genders allow"
    );
    println!(
        "  engine: PartitionEngine::close of that window (participants, batch scores in row blocks, \
         filter, top-K, greedy with refills, results, cooldowns), median of the reps"
    );
    println!(
        "  prescored: the same close after the window was scored while it filled (prescore() every \
         {ARRIVAL_BATCH} requests, as the worker does after each read; 'while filling' is those calls' total)"
    );
    println!(
        "  naive: n(n-1)/2 pairs scored one by one (score_naive's dot-product loop), mutually_acceptable, \
         all allowed edges sorted, greedy; same requests"
    );
    println!();
    println!(
        "{:>7} {:>10} {:>12} {:>14} {:>7} {:>12} {:>14} {:>7} {:>12} {:>9}",
        "n",
        "breadth y",
        "accept/req",
        "engine median",
        "pairs",
        "score sum",
        "naive median",
        "pairs",
        "score sum",
        "speed-up"
    );
    let mut last_naive: Option<(usize, Duration)> = None;
    let mut prescored_rows = Vec::new();
    for (n, reps, naive_reps) in [(1_000usize, 15, 3), (5_000, 7, 3), (10_000, 5, 1)] {
        let (breadth, acceptable) = calibrate(n);
        let reqs = window(n, breadth, 0xC0FFEE + n as u64);
        let engine = loaded_engine(&reqs);
        let mut times = Vec::new();
        let mut engine_outcome = None;
        for _ in 0..reps {
            let mut e = engine.clone();
            let t = Instant::now();
            let results = e.close(black_box(10), &HashMap::new());
            times.push(t.elapsed());
            let o = outcome_of(black_box(&results));
            // Everyone unmatched is carried to the next window (plus the tick).
            assert_eq!(e.pending(), 1 + n - 2 * o.pairs);
            engine_outcome = Some(o);
        }
        let engine_median = median(times);
        let Some(eo) = engine_outcome else {
            continue;
        };

        let (prescored_engine, filling) = loaded(&reqs, Some(ARRIVAL_BATCH));
        let mut times = Vec::new();
        for _ in 0..reps {
            let mut e = prescored_engine.clone();
            let t = Instant::now();
            let results = e.close(black_box(10), &HashMap::new());
            times.push(t.elapsed());
            let o = outcome_of(black_box(&results));
            assert_eq!(
                e.windows_prescored(),
                1,
                "the window was closed from its lists"
            );
            assert_eq!(
                (o.pairs, o.total_score),
                (eo.pairs, eo.total_score),
                "prescoring changes no match"
            );
        }
        let prescored_median = median(times);
        prescored_rows.push((n, prescored_median, filling, engine_median));

        // Predict the naive time from the last measured window (it is O(n²)).
        let predicted = last_naive.map(|(m, t)| t.mul_f64((n as f64 / m as f64).powi(2)));
        let naive_result = if predicted.is_some_and(|p| p > BASELINE_LIMIT) {
            None
        } else {
            let mut times = Vec::new();
            let mut out = None;
            for _ in 0..naive_reps {
                let t = Instant::now();
                out = Some(naive(black_box(&reqs), s.matching.min_score));
                times.push(t.elapsed());
            }
            let m = median(times);
            last_naive = Some((n, m));
            out.map(|o| (m, o))
        };
        match naive_result {
            Some((m, no)) => println!(
                "{:>7} {:>10.1} {:>12.0} {:>11.1} ms {:>7} {:>12.2} {:>11.1} ms {:>7} {:>12.2} {:>8.1}x",
                n,
                breadth,
                acceptable,
                engine_median.as_secs_f64() * 1e3,
                eo.pairs,
                eo.total_score,
                m.as_secs_f64() * 1e3,
                no.pairs,
                no.total_score,
                m.as_secs_f64() / engine_median.as_secs_f64()
            ),
            None => println!(
                "{:>7} {:>10.1} {:>12.0} {:>11.1} ms {:>7} {:>12.2}   naive skipped: predicted {:.0} s > {} s",
                n,
                breadth,
                acceptable,
                engine_median.as_secs_f64() * 1e3,
                eo.pairs,
                eo.total_score,
                predicted.map_or(0.0, |p| p.as_secs_f64()),
                BASELINE_LIMIT.as_secs()
            ),
        }
    }
    println!();
    println!(
        "{:>7} {:>18} {:>16} {:>14} {:>18}",
        "n", "prescored close", "while filling", "close speed-up", "filling + close"
    );
    for (n, close, filling, engine) in prescored_rows {
        println!(
            "{:>7} {:>15.1} ms {:>13.1} ms {:>13.1}x {:>15.1} ms",
            n,
            close.as_secs_f64() * 1e3,
            filling.as_secs_f64() * 1e3,
            engine.as_secs_f64() / close.as_secs_f64(),
            (filling + close).as_secs_f64() * 1e3
        );
    }
    println!("(prescored: the same pairs and score sum as the engine column, asserted)");
    println!();
    println!(
        "breadth y: the age range's half-width scale in years; accept/req: mean acceptable candidates \
         per request (300 sampled rows)"
    );
    println!(
        "reps: engine 15 / 7 / 5, naive 3 / 3 / 1 (n = 1,000 / 5,000 / 10,000); wall clock, one thread; \
         naive is skipped where its time predicted from the previous window (O(n²)) exceeds {} s",
        BASELINE_LIMIT.as_secs()
    );
}
