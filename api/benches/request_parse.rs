//! Reading match requests: the worker's `parse_request` (the fast reader,
//! serde_json as its fallback) against serde_json alone, on the same
//! records, one thread. Prints the machine and both rates; the ratio is the
//! figure (the machine is shared, so absolute rates vary between runs).
//!
//! `cargo bench -p matchfleet-api --bench request_parse`

use matchfleet_api::matching::{parse_request, MatchRequest, Preferences, Profile};

#[path = "support/mod.rs"]
mod support;

/// The match worker's allocator: a request is seven allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORDS: usize = 20_000;
const DIMENSION: usize = 32;
const ROUNDS: usize = 15;

/// Records as the load generator writes them: unit vectors of 32 values
/// (serde_json's shortest `f32` form), short ids, a preference list.
fn records() -> Vec<Vec<u8>> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    (0..RECORDS)
        .map(|i| {
            let mut vector: Vec<f32> = (0..DIMENSION).map(|_| next()).collect();
            let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
            vector.iter_mut().for_each(|v| *v /= norm);
            let request = MatchRequest {
                request_id: format!("req-{i:08}"),
                user: format!("user-{:06}", i * 7919 % 200_000),
                segment: format!("seg-{:02}", i % 64),
                event_time: 1_764_000_000_000 + i as i64 * 20,
                vector,
                profile: Profile {
                    gender: ["f", "m", "x"][i % 3].into(),
                    age: 18 + (i % 40) as u8,
                },
                wants: Preferences {
                    genders: vec![["m", "f", "x"][i % 3].into()],
                    min_age: 20,
                    max_age: 40,
                },
            };
            serde_json::to_vec(&request).expect("a request serialises")
        })
        .collect()
}

fn main() {
    let cpu = support::cpu_model();
    let records = records();
    let bytes: usize = records.iter().map(Vec::len).sum();
    println!("reading match requests, one thread");
    println!(
        "machine: {cpu} | {} cores | {RECORDS} records of {} bytes on average, {DIMENSION}-value vectors | median of {ROUNDS} rounds",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        bytes / RECORDS
    );
    let baseline = support::median_ns_per_item(&records, ROUNDS, |r| {
        serde_json::from_slice::<MatchRequest>(r).expect("serde_json reads the record")
    });
    let fast = support::median_ns_per_item(&records, ROUNDS, |r| {
        parse_request(None, Some(r), DIMENSION).expect("a valid record")
    });
    println!("                                   ns/record   records/s");
    for (name, ns) in [
        ("baseline: serde_json::from_slice", baseline),
        ("parse_request (fast reader)", fast),
    ] {
        println!("{name:<34} {ns:>9.0} {:>11.0}", 1e9 / ns);
    }
    println!("ratio baseline / parse_request: {:.2}x", baseline / fast);
}
