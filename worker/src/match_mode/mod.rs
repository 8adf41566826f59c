//! Match mode (`matchfleet-worker match`): the MatchPipeline worker. For each
//! partition it leases it restores the partition's state from the changelog,
//! feeds requests to the matching engine, and commits results, state changes,
//! dead letters and the input offset in one Kafka transaction. See
//! `ARCHITECTURE.md` for the protocol.

mod feed;
mod http;
mod metrics;
mod partition;
mod priority;
pub mod restore;
mod scorers;
pub mod txn;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use matchfleet_api::match_pipeline::MatchSettings;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::fleet::client::ProgressClient;
use crate::fleet::keeper::LeaseKeeper;
use crate::matching::EngineConfig;
use crate::topics::{self, Retention};
use metrics::MatchMetrics;
use txn::{FeedbackTopics, Topics};

#[derive(Debug, Clone, Args)]
pub struct MatchArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    pub bootstrap_servers: String,
    /// The topic of match requests, keyed by segment.
    #[arg(long, env = "SOURCE_TOPIC")]
    pub topic: String,
    /// Where results go (created with the source's partition count if missing).
    #[arg(long, env = "RESULTS_TOPIC")]
    pub results_topic: String,
    /// The compacted per-partition state topic (created if missing).
    #[arg(long, env = "CHANGELOG_TOPIC")]
    pub changelog_topic: String,
    /// Where malformed requests go; default `<topic>.dlq`.
    #[arg(long, env = "DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// The lane's consumer group (offsets are committed under it, in the transactions).
    #[arg(long, env = "CONSUMER_GROUP")]
    pub group: String,
    /// Each partition's transactional.id is `<prefix>.<partition>`.
    #[arg(long, env = "TRANSACTIONAL_ID_PREFIX")]
    pub transactional_id_prefix: String,
    /// The lane (`live`).
    #[arg(long, env = "LANE", default_value = "live")]
    pub lane: String,
    /// This worker's slot (its pod name).
    #[arg(long, env = "SLOT")]
    pub slot: String,
    /// The progress service, e.g. `http://mp-progress.ns.svc:8080`.
    #[arg(long, env = "PROGRESS_URL")]
    pub progress_url: String,
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "HEARTBEAT_INTERVAL_MILLIS", default_value_t = 1000)]
    pub heartbeat_interval_millis: u64,
    /// The pipeline's settings as JSON (api `MatchSettings`).
    #[arg(long, env = "MATCH_SETTINGS")]
    pub settings: String,
    /// Commit at least this often while requests arrive and no window closes.
    #[arg(long, env = "COMMIT_INTERVAL_MILLIS", default_value_t = 200)]
    pub commit_interval_millis: u64,
    /// Address of the pipeline endpoints (ingest, matches, nudges); defaults to `$POD_IP:8080`.
    #[arg(long, env = "HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Address of /healthz, /readyz and /metrics; defaults to `$POD_IP:8081`.
    #[arg(long, env = "HEALTH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// How long a SIGTERM drain may take.
    #[arg(long, env = "DRAIN_TIMEOUT_SECONDS", default_value_t = 25)]
    pub drain_timeout_seconds: u64,
}

/// What the partition work needs.
pub struct MatchWorker {
    bootstrap: String,
    group: String,
    transactional_id_prefix: String,
    topics: Topics,
    engine_config: EngineConfig,
    commit_interval: Duration,
    metrics: Arc<MatchMetrics>,
    /// For HTTP scorers (each call has its own timeout).
    scorer_client: reqwest::Client,
}

impl MatchWorker {
    fn transactional_id(&self, partition: i32) -> String {
        format!("{}.{partition}", self.transactional_id_prefix)
    }
}

pub async fn run(args: MatchArgs) -> anyhow::Result<()> {
    let settings: MatchSettings = serde_json::from_str(&args.settings)
        .map_err(|e| anyhow::anyhow!("MATCH_SETTINGS is not valid pipeline settings: {e}"))?;
    let engine_config = EngineConfig::from_settings(&settings)
        .map_err(|e| anyhow::anyhow!("MATCH_SETTINGS: {e}"))?;
    let topics = prepare_topics(&args, &settings).await?;
    let ingest = Arc::new(http::Ingest::new(
        &args.bootstrap_servers,
        &args.topic,
        engine_config.dimension(),
    )?);
    let interval = Duration::from_millis(args.heartbeat_interval_millis.max(50));
    let client = ProgressClient::new(&args.progress_url, interval)?;
    let metrics = Arc::new(MatchMetrics::default());
    let worker = Arc::new(MatchWorker {
        bootstrap: args.bootstrap_servers.clone(),
        group: args.group.clone(),
        transactional_id_prefix: args.transactional_id_prefix.clone(),
        topics: topics.clone(),
        engine_config,
        commit_interval: Duration::from_millis(args.commit_interval_millis.max(10)),
        metrics: metrics.clone(),
        scorer_client: reqwest::Client::new(),
    });
    let keeper = LeaseKeeper::new(client, worker, &args.slot, interval);
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::new(crate::pod_ip(), 8081));
    // Ends the ingest/matches/nudge endpoints and the results feed with the
    // health endpoints, once the keeper has drained.
    let http_stop = CancellationToken::new();
    let feed = Arc::new(feed::Feed::default());
    let tailer = tokio::spawn(feed::tail(
        feed.clone(),
        args.bootstrap_servers.clone(),
        topics.results.clone(),
        topics.results_partitions,
        metrics.clone(),
        http_stop.clone(),
    ));
    let endpoints = http::serve(
        args.http_listen
            .unwrap_or_else(|| SocketAddr::new(crate::pod_ip(), 8080)),
        ingest,
        feed,
        metrics.clone(),
        http_stop.clone().cancelled_owned(),
    );
    info!(slot = %args.slot, topic = %args.topic, results = %args.results_topic, "match worker started");
    let life = crate::fleet::process::run(
        keeper,
        listen,
        move |stats| metrics.text(stats),
        Duration::from_secs(args.drain_timeout_seconds),
        http_stop,
    );
    let (health, endpoints) = tokio::join!(life, endpoints);
    let _ = tailer.await;
    health?;
    endpoints?;
    Ok(())
}

/// Creates the results, state and dead-letter topics (and the feedback
/// join's) if missing. The state topic needs a partition per source
/// partition: partition p's state lives in its partition p; so does the
/// outcome topic: partition p's outcomes are joined by partition p's owner.
async fn prepare_topics(args: &MatchArgs, settings: &MatchSettings) -> anyhow::Result<Topics> {
    let bootstrap = args.bootstrap_servers.as_str();
    let partitions = topics::partition_count_async(bootstrap, &args.topic).await?;
    let dead_letters = args
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{}.dlq", args.topic));
    topics::ensure(
        bootstrap,
        &args.results_topic,
        partitions,
        Retention::Delete,
    )
    .await?;
    topics::ensure(
        bootstrap,
        &args.changelog_topic,
        partitions,
        Retention::Compact,
    )
    .await?;
    topics::ensure(bootstrap, &dead_letters, 1, Retention::Delete).await?;
    let changelog_partitions =
        topics::partition_count_async(bootstrap, &args.changelog_topic).await?;
    if changelog_partitions < partitions {
        anyhow::bail!(
            "state topic {} has {changelog_partitions} partitions, fewer than the {partitions} of {}; \
             delete it (the pipeline's state is lost) or add partitions",
            args.changelog_topic,
            args.topic
        );
    }
    let results_partitions = topics::partition_count_async(bootstrap, &args.results_topic).await?;
    let feedback = match &settings.feedback {
        None => None,
        Some(f) => {
            topics::ensure(bootstrap, &f.topic, partitions, Retention::Delete).await?;
            topics::ensure(bootstrap, &f.rewards_topic, partitions, Retention::Delete).await?;
            let outcome_partitions = topics::partition_count_async(bootstrap, &f.topic).await?;
            if outcome_partitions != partitions {
                anyhow::bail!(
                    "feedback topic {} has {outcome_partitions} partitions, {} has {partitions}: \
                     outcomes are joined on the partition of their match, so both need the same count",
                    f.topic,
                    args.topic
                );
            }
            Some(FeedbackTopics {
                outcomes: f.topic.clone(),
                samples: f.rewards_topic.clone(),
                samples_partitions: topics::partition_count_async(bootstrap, &f.rewards_topic)
                    .await?,
            })
        }
    };
    Ok(Topics {
        source: args.topic.clone(),
        results: args.results_topic.clone(),
        results_partitions,
        changelog: args.changelog_topic.clone(),
        dead_letters,
        feedback,
    })
}
