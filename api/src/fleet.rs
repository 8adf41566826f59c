//! The fleet model both resources share: where the events are (Kafka), the
//! workers that read them, their heartbeats and leases, and the status parts
//! every fleet reports. `MatchPipeline` reuses these as they are.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The Kafka topic a lane reads.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[schemars(length(min = 1, max = 1024))]
    pub bootstrap_servers: String,
    /// The input topic. Its partition count bounds the number of workers.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub topic: String,
}

/// The worker pods of a lane: one pod per slot, each pinned to a set of partitions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("workers.minReplicas must not exceed workers.maxReplicas"))]
pub struct WorkerSpec {
    /// The worker image (it runs `matchfleet-worker`).
    #[serde(default = "default_worker_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// The fewest worker pods, even when there is no lag. 0 lets an idle lane scale to zero.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1024))]
    pub min_replicas: i32,
    /// The most worker pods. Never more than the topic's partitions are used.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
    /// Tasks one worker runs at once.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 256))]
    pub concurrency: i32,
    /// CPU and memory of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables for the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        WorkerSpec {
            image: default_worker_image(),
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            concurrency: default_concurrency(),
            resources: None,
            env: None,
        }
    }
}

fn default_worker_image() -> String {
    "matchfleet/worker:dev".to_string()
}
fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    8
}
fn default_concurrency() -> i32 {
    4
}

/// Heartbeats and leases. A worker may process a partition only while it
/// holds the partition's lease at the current epoch; at the first failed or
/// fenced heartbeat it kills that partition's work and commits nothing more.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.leaseMillis >= 3 * self.intervalMillis").message("heartbeat.leaseMillis must be at least 3 heartbeat intervals, so one lost beat does not cost the lease"))]
pub struct HeartbeatSpec {
    /// How often workers heartbeat their leases, in milliseconds.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 100, max = 60000))]
    pub interval_millis: i32,
    /// How long a lease lives without a heartbeat, in milliseconds. After that
    /// the partition moves to another worker at a new epoch.
    #[serde(default = "default_lease")]
    #[schemars(range(min = 300, max = 600000))]
    pub lease_millis: i32,
}

impl Default for HeartbeatSpec {
    fn default() -> Self {
        HeartbeatSpec {
            interval_millis: default_interval(),
            lease_millis: default_lease(),
        }
    }
}

fn default_interval() -> i32 {
    1000
}
fn default_lease() -> i32 {
    6000
}

/// A standard Kubernetes condition, as in `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason a person can act on.
    pub reason: String,
    /// What happened and what to do about it.
    pub message: String,
    /// The generation of the spec this condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
}

/// Condition types every fleet reports.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
}

/// The part of the status every lane has.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LaneStatus {
    /// Worker pods ready.
    pub ready_replicas: i32,
    /// Worker pods wanted.
    pub replicas: i32,
    /// Partitions of the lane's topic.
    pub partitions: i32,
    /// Messages not yet committed, summed over partitions.
    pub lag: i64,
    /// Partition -> slot index, as sent to the progress service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub assignment: BTreeMap<String, i32>,
}

/// `"ready/desired"`, the WORKERS printer column.
pub fn workers_column(ready: i32, desired: i32) -> String {
    format!("{ready}/{desired}")
}
