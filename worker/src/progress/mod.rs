//! The progress service (`matchfleet-worker progress`): one per RenderJob or
//! MatchPipeline, the lease authority and the record of what is done.

pub mod changelog;
pub mod leases;
pub mod server;
pub mod service;
pub mod tasks;

use std::net::SocketAddr;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct ProgressArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    pub bootstrap_servers: String,
    /// The compacted changelog topic, `<namespace>.<name>.progress` by convention.
    #[arg(long, env = "PROGRESS_CHANGELOG_TOPIC")]
    pub changelog_topic: String,
    /// Replication factor when the changelog topic has to be created.
    #[arg(long, default_value_t = 1)]
    pub replication_factor: i32,
    /// Address to listen on; defaults to `$POD_IP:8080`.
    #[arg(long, env = "PROGRESS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Lease length in milliseconds.
    #[arg(long, env = "LEASE_MILLIS", default_value_t = 6000)]
    pub lease_millis: u64,
    /// Attempts per task before it is recorded as failed.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Event-to-done latency objective in milliseconds, for SLO breach counting.
    #[arg(long, env = "SLO_MILLIS")]
    pub slo_millis: Option<u64>,
}

pub async fn run(args: ProgressArgs) -> anyhow::Result<()> {
    let listen = match args.listen {
        Some(a) => a,
        None => SocketAddr::new(crate::pod_ip(), 8080),
    };
    let log = changelog::Changelog::open(
        &args.bootstrap_servers,
        &args.changelog_topic,
        args.replication_factor,
    )
    .await?;
    let settings = service::Settings {
        lease_millis: args.lease_millis,
        max_attempts: args.max_attempts,
        slo_millis: args.slo_millis,
    };
    let progress = service::Progress::start(log, &settings).await?;
    server::serve(progress, listen, crate::shutdown_signal()).await?;
    Ok(())
}
