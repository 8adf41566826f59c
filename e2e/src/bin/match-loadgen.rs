//! `match-loadgen`: sends a realistic stream of match requests to a
//! MatchPipeline's request topic and prints what it sent as JSON.
//!
//! e.g. `match-loadgen --bootstrap 127.0.0.1:9092 --topic requests --total 100000 --rate 2000`

use clap::Parser;
use matchfleet_e2e::matchkit::{send_load, LoadOptions};

#[derive(Parser, Debug)]
#[command(about = "Sends match requests to a MatchPipeline's request topic")]
struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
    /// The request topic.
    #[arg(long)]
    topic: String,
    /// Create the topic with this many partitions if it is missing.
    #[arg(long)]
    partitions: Option<i32>,
    /// Records to send, malformed ones included.
    #[arg(long, default_value_t = 1000)]
    total: u64,
    /// Records per second (0: as fast as Kafka takes them).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 32)]
    dimension: usize,
    #[arg(long, default_value_t = 200)]
    users: usize,
    #[arg(long, default_value_t = 4)]
    segments: usize,
    /// Zipf exponent of segment sizes (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    skew: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Prefix of the request ids (default: `run-<epoch millis>`).
    #[arg(long)]
    run_id: Option<String>,
    /// Share of requests whose event time is up to --out-of-order-millis in the past.
    #[arg(long, default_value_t = 0.0)]
    out_of_order_fraction: f64,
    #[arg(long, default_value_t = 0)]
    out_of_order_millis: i64,
    /// Share of requests whose event time is --late-millis in the past.
    #[arg(long, default_value_t = 0.0)]
    late_fraction: f64,
    #[arg(long, default_value_t = 0)]
    late_millis: i64,
    /// Malformed records among --total (bad JSON, wrong length, non-finite, wrong key, in turn).
    #[arg(long, default_value_t = 0)]
    malformed: u64,
    /// Print every record sent, not only the summary.
    #[arg(long)]
    list: bool,
}

#[tokio::main]
async fn main() {
    matchfleet_e2e::init_tracing();
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("match-loadgen: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(partitions) = args.partitions {
        matchfleet_worker::topics::ensure(
            &args.bootstrap,
            &args.topic,
            partitions,
            matchfleet_worker::topics::Retention::Delete,
        )
        .await?;
    }
    let options = LoadOptions {
        run_id: args.run_id.unwrap_or_else(|| {
            format!(
                "run-{}",
                matchfleet_e2e::matchkit::produce::wall_clock_millis()
            )
        }),
        total: args.total,
        rate: args.rate,
        dimension: args.dimension,
        users: args.users,
        segments: args.segments,
        skew: args.skew,
        seed: args.seed,
        out_of_order_fraction: args.out_of_order_fraction,
        out_of_order_max_millis: args.out_of_order_millis,
        late_fraction: args.late_fraction,
        late_millis: args.late_millis,
        malformed: args.malformed,
    };
    let sent = send_load(&args.bootstrap, &args.topic, &options).await?;
    let json = if args.list {
        serde_json::to_string_pretty(&sent)?
    } else {
        serde_json::to_string_pretty(&sent.summary())?
    };
    println!("{json}");
    Ok(())
}
