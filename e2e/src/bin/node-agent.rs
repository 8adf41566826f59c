use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    matchfleet_e2e::init_tracing();
    let args = matchfleet_e2e::node_agent::config::Args::parse();
    matchfleet_e2e::node_agent::run(args).await
}
