//! Render mode (`matchfleet-worker render`): runs a command once per Kafka
//! message of the partitions this worker leases, and publishes each output
//! exactly once. See `ARCHITECTURE.md` for the protocol.

mod child;
pub mod message;
mod metrics;
pub mod offsets;
mod outputs;
mod partition;
mod task;
pub mod template;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rdkafka::config::ClientConfig;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::dead_letters::DeadLetters;
use crate::fleet::client::ProgressClient;
use crate::fleet::keeper::LeaseKeeper;
use metrics::RenderMetrics;
use outputs::Outputs;

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    pub bootstrap_servers: String,
    /// The topic of render events.
    #[arg(long, env = "SOURCE_TOPIC")]
    pub topic: String,
    /// The lane's consumer group (offsets are committed under it).
    #[arg(long, env = "CONSUMER_GROUP")]
    pub group: String,
    /// The lane: `live` or `backlog`.
    #[arg(long, env = "LANE", default_value = "live")]
    pub lane: String,
    /// This worker's slot (its pod name).
    #[arg(long, env = "SLOT")]
    pub slot: String,
    /// The progress service, e.g. `http://demo-progress.ns.svc:8080`.
    #[arg(long, env = "PROGRESS_URL")]
    pub progress_url: String,
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "HEARTBEAT_INTERVAL_MILLIS", default_value_t = 1000)]
    pub heartbeat_interval_millis: u64,
    /// The render command as a JSON array of strings, with placeholders.
    #[arg(long, env = "RENDER_COMMAND")]
    pub command: String,
    /// Seconds before a render is killed and counted as a failed attempt.
    #[arg(long, env = "RENDER_TIMEOUT_SECONDS", default_value_t = 600)]
    pub timeout_seconds: u64,
    /// Where outputs are published, one file per task key.
    #[arg(long, env = "OUTPUT_DIR")]
    pub output_dir: PathBuf,
    /// Renders at once, over all partitions of this worker.
    #[arg(long, env = "CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Where malformed messages go.
    #[arg(long, env = "DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Address of /healthz, /readyz and /metrics; defaults to `$POD_IP:8081`.
    #[arg(long, env = "HEALTH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A bounded lane (the backlog): JSON object partition -> end offset
    /// (exclusive). Messages at or past a partition's end are left alone.
    #[arg(long, env = "END_OFFSETS")]
    pub end_offsets: Option<String>,
    /// How long a SIGTERM drain may take before in-flight renders are killed.
    #[arg(long, env = "DRAIN_TIMEOUT_SECONDS", default_value_t = 25)]
    pub drain_timeout_seconds: u64,
}

/// The settings the partition work needs.
#[derive(Debug, Clone)]
pub struct RenderConfig {
    pub bootstrap: String,
    pub topic: String,
    pub group: String,
    pub slot: String,
    pub command: Vec<String>,
    pub timeout: Duration,
    pub concurrency: usize,
    /// Partition -> end offset (exclusive), for a bounded lane.
    pub end_offsets: Option<HashMap<i32, i64>>,
}

/// Parses `END_OFFSETS`: `{"0": 167, "1": 166}`.
pub fn parse_end_offsets(json: &str) -> anyhow::Result<HashMap<i32, i64>> {
    let raw: HashMap<String, i64> = serde_json::from_str(json).map_err(|e| {
        anyhow::anyhow!("END_OFFSETS must be a JSON object partition -> offset: {e}")
    })?;
    raw.into_iter()
        .map(|(p, end)| {
            let p = p
                .parse::<i32>()
                .map_err(|_| anyhow::anyhow!("END_OFFSETS: {p:?} is not a partition number"))?;
            Ok((p, end))
        })
        .collect()
}

pub struct RenderWorker {
    config: RenderConfig,
    client: ProgressClient,
    outputs: Outputs,
    values_dir: PathBuf,
    dead_letters: DeadLetters,
    permits: Semaphore,
    metrics: Arc<RenderMetrics>,
}

impl RenderWorker {
    fn kafka_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.config.bootstrap);
        c
    }
}

pub async fn run(args: RenderArgs) -> anyhow::Result<()> {
    let command: Vec<String> = serde_json::from_str(&args.command)
        .map_err(|e| anyhow::anyhow!("RENDER_COMMAND must be a JSON array of strings: {e}"))?;
    if command.is_empty() {
        anyhow::bail!("RENDER_COMMAND is empty");
    }
    let interval = Duration::from_millis(args.heartbeat_interval_millis.max(50));
    let dlq_topic = args
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{}.dlq", args.topic));
    let values_dir = std::env::temp_dir().join(format!("matchfleet-values-{}", args.slot));
    std::fs::create_dir_all(&values_dir)?;
    let outputs = Outputs::open(&args.output_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot prepare OUTPUT_DIR {}: {e}",
            args.output_dir.display()
        )
    })?;
    let dead_letters = DeadLetters::open(&args.bootstrap_servers, &dlq_topic, &args.topic).await?;
    // A call may take at most one interval, so a hung one never delays the next beat.
    let client = ProgressClient::new(&args.progress_url, interval)?;
    let metrics = Arc::new(RenderMetrics::default());
    let worker = Arc::new(RenderWorker {
        config: RenderConfig {
            bootstrap: args.bootstrap_servers.clone(),
            topic: args.topic.clone(),
            group: args.group.clone(),
            slot: args.slot.clone(),
            command,
            timeout: Duration::from_secs(args.timeout_seconds.max(1)),
            concurrency: args.concurrency.max(1),
            end_offsets: args
                .end_offsets
                .as_deref()
                .map(parse_end_offsets)
                .transpose()?,
        },
        client: client.clone(),
        outputs,
        values_dir,
        dead_letters,
        permits: Semaphore::new(args.concurrency.max(1)),
        metrics: metrics.clone(),
    });
    let keeper = LeaseKeeper::new(client, worker, &args.slot, interval);
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::new(crate::pod_ip(), 8081));
    info!(slot = %args.slot, topic = %args.topic, group = %args.group, "render worker started");
    crate::fleet::process::run(
        keeper,
        listen,
        move |stats| metrics.text(stats),
        Duration::from_secs(args.drain_timeout_seconds),
        CancellationToken::new(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_offsets_parse_and_bad_ones_say_why() {
        let e = parse_end_offsets(r#"{"0": 167, "11": 5}"#).unwrap();
        assert_eq!((e[&0], e[&11]), (167, 5));
        assert!(parse_end_offsets(r#"{"x": 1}"#)
            .unwrap_err()
            .to_string()
            .contains("not a partition"));
        assert!(parse_end_offsets("[1]").is_err());
    }
}
