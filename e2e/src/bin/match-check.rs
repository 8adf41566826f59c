//! `match-check`: reads a MatchPipeline run back from Kafka (requests,
//! results, optionally dead letters), checks every promise the pipeline
//! makes and prints the report as JSON. Exit code 0: all rules hold; 1: a
//! rule is broken; 2: the topics could not be read.
//!
//! e.g. `match-check --requests-topic requests --results-topic results --dead-letter-topic requests.dlq`

use std::time::Duration;

use clap::Parser;
use matchfleet_e2e::matchkit::{check_topics, CheckConfig, CheckOptions};

#[derive(Parser, Debug)]
#[command(about = "Checks a MatchPipeline run end to end")]
struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    #[arg(long)]
    requests_topic: String,
    #[arg(long)]
    results_topic: String,
    /// Also check that invalid requests, and only they, were dead-lettered once.
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// The pipeline's `features.dimension`.
    #[arg(long, default_value_t = 32)]
    dimension: usize,
    /// A scorer name a match may carry (repeat; none: any name).
    #[arg(long = "scorer")]
    scorers: Vec<String>,
    /// The pipeline's `matching.rematchCooldownSeconds`.
    #[arg(long, default_value_t = 86_400)]
    cooldown_seconds: i64,
    /// Stop waiting for results after this long without a new one.
    #[arg(long, default_value_t = 60)]
    idle_timeout_seconds: u64,
    /// Stop waiting for results after this long in any case.
    #[arg(long, default_value_t = 600)]
    max_wait_seconds: u64,
    /// Violations of each kind listed in full.
    #[arg(long, default_value_t = 20)]
    samples: usize,
}

fn main() {
    matchfleet_e2e::init_tracing();
    let args = Args::parse();
    let options = CheckOptions {
        bootstrap: args.bootstrap,
        requests_topic: args.requests_topic,
        results_topic: args.results_topic,
        dead_letter_topic: args.dead_letter_topic,
        config: CheckConfig {
            dimension: args.dimension,
            scorers: args.scorers,
            cooldown_millis: args.cooldown_seconds.saturating_mul(1000),
            source_topic: None,
            samples: args.samples,
        },
        idle_timeout: Duration::from_secs(args.idle_timeout_seconds),
        max_wait: Duration::from_secs(args.max_wait_seconds),
    };
    let report = match check_topics(&options) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("match-check: {e}");
            std::process::exit(2);
        }
    };
    match serde_json::to_string_pretty(&report) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("match-check: {e}");
            std::process::exit(2);
        }
    }
    std::process::exit(if report.ok { 0 } else { 1 });
}
