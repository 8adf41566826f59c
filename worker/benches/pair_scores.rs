//! Pair scores/s of the MatchPipeline scorer kernel (issue 4): the batch GEMM
//! (`score_batch`) against the pair-by-pair loop (`score_naive`), 32-dim f32
//! vectors, on one thread. Prints the machine and both figures from the same
//! run. Goal ≥ 0.5 billion pair scores/s, stretch 1 billion/s.
//!
//! Run: cargo bench -p matchfleet-worker --bench pair_scores

use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};

use matchfleet_worker::matching::{score_batch, score_naive, score_path, FeatureMatrix};

const DIM: usize = 32;

/// xorshift64: fixed-seed vectors in [-1, 1) without a new dependency.
fn vectors(rows: usize, seed: u64) -> FeatureMatrix {
    let mut s = seed;
    let data = (0..rows * DIM)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let mut m = FeatureMatrix::from_vec(data, DIM).expect("generated a whole number of rows");
    m.normalize_rows();
    m
}

/// A checksum that reads every score, so no work can be deleted.
fn checksum(out: &[f32]) -> f64 {
    out.iter().map(|&x| x as f64).sum()
}

struct Timing {
    best: Duration,
    median: Duration,
    checksum: f64,
}

fn time(
    reps: usize,
    r: &FeatureMatrix,
    c: &FeatureMatrix,
    out: &mut [f32],
    f: fn(
        &FeatureMatrix,
        &FeatureMatrix,
        &mut [f32],
    ) -> Result<(), matchfleet_worker::matching::ScoreError>,
) -> Timing {
    let mut times = Vec::with_capacity(reps);
    // One warm-up run: page-faults the output in and warms the caches.
    f(black_box(r), black_box(c), black_box(&mut *out)).expect("valid shapes");
    for _ in 0..reps {
        let t = Instant::now();
        f(black_box(r), black_box(c), black_box(&mut *out)).expect("valid shapes");
        black_box(&mut *out);
        times.push(t.elapsed());
    }
    times.sort();
    Timing {
        best: times[0],
        median: times[times.len() / 2],
        checksum: checksum(out),
    }
}

fn rate(pairs: usize, d: Duration) -> f64 {
    pairs as f64 / d.as_secs_f64()
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
    let flags = field("flags");
    let simd: Vec<&str> = ["avx2", "fma", "avx512f"]
        .into_iter()
        .filter(|f| flags.split(' ').any(|x| x == *f))
        .collect();
    let cmd = |p: &str, a: &[&str]| {
        Command::new(p)
            .args(a)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("machine:");
    println!(
        "  cpu       {} ({} MHz), flags {}",
        field("model name"),
        field("cpu MHz"),
        simd.join(" ")
    );
    println!(
        "  cores     {} logical (std::thread::available_parallelism)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  kernel    {}", cmd("uname", &["-sr"]));
    println!("  rustc     {}", cmd("rustc", &["-V"]));
    println!(
        "  load avg  {} (shared VM: other processes may run)",
        load.trim()
    );
    println!("  path      score_batch uses {}", score_path());
    println!("  threads   1 (this bench never spawns)");
}

fn main() {
    machine();
    println!();
    println!("d = {DIM}, vectors normalised (cosine), times best / median of the reps");
    println!(
        "{:>13} {:>6} {:>16} {:>16} {:>16} {:>16} {:>8}",
        "window",
        "out MB",
        "naive pairs/s",
        "naive median",
        "batch pairs/s",
        "batch median",
        "ratio"
    );
    // (requests, candidates, naive reps, batch reps). 120 × 2,400 has a
    // 1.2 MB output that stays in cache, so it shows the kernel's compute
    // ceiling; 1,000 and 5,000 × 2,400 are the windows (9.6 and 48 MB
    // of output, written once per call). Packing the candidates is timed too.
    for (n, m, naive_reps, batch_reps) in [
        (120, 2_400, 5, 51),
        (1_000, 2_400, 3, 21),
        (5_000, 2_400, 3, 11),
    ] {
        let r = vectors(n, 0x5EED_0001 + n as u64);
        let c = vectors(m, 0x5EED_0002 + m as u64);
        let mut out_naive = vec![0.0f32; n * m];
        let mut out_batch = vec![0.0f32; n * m];
        let naive = time(naive_reps, &r, &c, &mut out_naive, score_naive);
        let batch = time(batch_reps, &r, &c, &mut out_batch, score_batch);
        let pairs = n * m;
        let max_diff = out_naive
            .iter()
            .zip(&out_batch)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_diff < 1e-4, "batch and naive disagree by {max_diff}");
        println!(
            "{:>13} {:>6.1} {:>16.3e} {:>16.3e} {:>16.3e} {:>16.3e} {:>7.1}x",
            format!("{n} x {m}"),
            (pairs * 4) as f64 / 1e6,
            rate(pairs, naive.best),
            rate(pairs, naive.median),
            rate(pairs, batch.best),
            rate(pairs, batch.median),
            rate(pairs, batch.median) / rate(pairs, naive.median),
        );
        println!(
            "{:>13} checksums naive {:.3} batch {:.3}, max |diff| {max_diff:.2e}",
            "", naive.checksum, batch.checksum
        );
    }
    println!();
    println!("goal 5.0e8 pairs/s, stretch 1.0e9 pairs/s (one core); ratio = batch / naive medians");
}
