//! What the wire-format benches share: the machine's CPU model for their
//! header, and the median time per item over rounds. Included with
//! `#[path]` (a directory without `main.rs` is not a bench).

use std::hint::black_box;
use std::time::Instant;

/// The CPU model from /proc/cpuinfo ("unknown" elsewhere).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Median ns per item over `rounds` passes of `f` over `items`.
pub fn median_ns_per_item<T, R>(items: &[T], rounds: usize, f: impl Fn(&T) -> R) -> f64 {
    let mut times: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for item in items {
                black_box(f(black_box(item)));
            }
            t.elapsed().as_nanos() as f64 / items.len() as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[rounds / 2]
}
