use clap::{Parser, Subcommand};

// The match engine allocates and frees many small, short-lived objects per
// request (strings, vectors, map entries); glibc's allocator took ~20% of a
// match worker's core at 50,000 requests/s (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "matchfleet-worker",
    version,
    about = "matchfleet's worker: progress service and fleet modes"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// The progress service: leases with epochs, task claims, completion records.
    Progress(matchfleet_worker::progress::ProgressArgs),
    /// Render mode: run a command once per message of the leased partitions.
    Render(matchfleet_worker::render::RenderArgs),
    /// Match mode: windowed matchmaking over the leased partitions, results exactly once.
    Match(matchfleet_worker::match_mode::MatchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    matchfleet_worker::init_tracing();
    match Cli::parse().mode {
        Mode::Progress(args) => matchfleet_worker::progress::run(args).await,
        Mode::Render(args) => matchfleet_worker::render::run(args).await,
        Mode::Match(args) => matchfleet_worker::match_mode::run(args).await,
    }
}
