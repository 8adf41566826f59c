//! Writing result records: `MatchResult::write_json` (the worker's way: one
//! buffer per record, sized up front) against `serde_json::to_vec`, on the
//! same results, one thread. Both produce the same bytes (checked here, and
//! property-tested in `result_json`). Prints the machine and both rates; the
//! ratio is the figure.
//!
//! `cargo bench -p matchfleet-api --bench result_write`

use matchfleet_api::matching::{ExpiryReason, MatchResult, MatchedUser};

#[path = "support/mod.rs"]
mod support;

/// The match worker's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RESULTS: usize = 20_000;
const ROUNDS: usize = 15;
/// The worker's buffer per record (a matched result is ~330 bytes).
const CAPACITY: usize = 384;

/// Results as a close writes them: nine matches to one expiry, 32-hex match
/// ids, short request ids and user names, the builtin scorer.
fn results() -> Vec<MatchResult> {
    (0..RESULTS)
        .map(|i| {
            let segment = format!("seg-{:02}", i % 64);
            let user = |k: usize| MatchedUser {
                request_id: format!("req-{k:08}"),
                user: format!("user-{:06}", k * 7919 % 200_000),
                event_time: 1_764_000_000_000 + k as i64 * 20,
            };
            if i % 10 == 9 {
                MatchResult::Expired {
                    request_id: format!("req-{i:08}"),
                    user: format!("user-{:06}", i * 7919 % 200_000),
                    segment,
                    partition: (i % 16) as i32,
                    event_time: 1_764_000_000_000 + i as i64 * 20,
                    windows: 5,
                    reason: ExpiryReason::NoPartner,
                    closed_at: 1_764_000_005_000,
                }
            } else {
                MatchResult::Matched {
                    match_id: format!(
                        "{:032x}",
                        (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
                    ),
                    segment,
                    window_start: 1_764_000_000_000,
                    window_end: 1_764_000_001_000,
                    partition: (i % 16) as i32,
                    scorer: "cosine".into(),
                    score: (i as f32 * 0.618_034).fract(),
                    users: [user(2 * i), user(2 * i + 1)],
                    closed_at: 1_764_000_001_204,
                }
            }
        })
        .collect()
}

fn fast(r: &MatchResult) -> Vec<u8> {
    let mut out = Vec::with_capacity(CAPACITY);
    r.write_json(&mut out);
    out
}

fn main() {
    let cpu = support::cpu_model();
    let results = results();
    let mut bytes = 0;
    for r in &results {
        let ours = fast(r);
        assert_eq!(ours, serde_json::to_vec(r).expect("a result serialises"));
        bytes += ours.len();
    }
    println!("writing result records, one thread");
    println!(
        "machine: {cpu} | {} cores | {RESULTS} results of {} bytes on average | median of {ROUNDS} rounds",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        bytes / RESULTS
    );
    let baseline = support::median_ns_per_item(&results, ROUNDS, |r| {
        serde_json::to_vec(r).expect("a result serialises")
    });
    let written = support::median_ns_per_item(&results, ROUNDS, fast);
    println!("                                   ns/result   results/s");
    for (name, ns) in [
        ("baseline: serde_json::to_vec", baseline),
        ("MatchResult::write_json", written),
    ] {
        println!("{name:<34} {ns:>9.0} {:>11.0}", 1e9 / ns);
    }
    println!("ratio baseline / write_json: {:.2}x", baseline / written);
}
