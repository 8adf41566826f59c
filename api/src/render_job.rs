//! `RenderJob` (short name `rj`): run a command once per Kafka message, on a
//! fleet of partition-pinned workers, each task done exactly once (Tinder's
//! render service, done right). An optional backlog lane works through a
//! bounded range of old messages by a deadline.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::fleet::{Condition, HeartbeatSpec, LaneStatus, SourceSpec, WorkerSpec};

/// RFC 3339 timestamps, e.g. `2026-11-23T10:00:00Z`.
const RFC3339: &str =
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$";

/// A render job: a command run once per message of a Kafka topic.
// Printer columns repeat `type_ = ...`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "matchfleet.io",
    version = "v1alpha1",
    kind = "RenderJob",
    plural = "renderjobs",
    shortname = "rj",
    category = "matchfleet",
    namespaced,
    status = "RenderJobStatus",
    validation = Rule::new("self.metadata.name.size() <= 54").message("metadata.name must be at most 54 characters: the progress Service is named <name>-progress"),
    doc = "RenderJob runs a render command once per message of a Kafka topic on partition-pinned workers, with leases, heartbeat fail-fast and a progress service that makes every render happen exactly once.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Workers", type_ = "string", json_path = ".status.workers"),
    printcolumn(
        name = "Partitions",
        type_ = "integer",
        json_path = ".status.partitions"
    ),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lag"),
    printcolumn(name = "Done", type_ = "integer", json_path = ".status.done"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(name = "P99", type_ = "string", json_path = ".status.p99"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.deadLetterTopic) || self.deadLetterTopic != self.source.topic").message("deadLetterTopic must differ from source.topic, or bad messages would be read again"))]
pub struct RenderJobSpec {
    /// The topic of render events, keyed by the task key (for example the user id).
    pub source: SourceSpec,
    /// The command run once per message.
    pub render: RenderSpec,
    /// The worker pods.
    #[serde(default)]
    pub workers: WorkerSpec,
    /// Heartbeat interval and lease length.
    #[serde(default)]
    pub heartbeat: HeartbeatSpec,
    /// Where malformed messages go, with the reason in a header. Default `<source.topic>.dlq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub dead_letter_topic: Option<String>,
    /// The latency objective from event time to a published render.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<SloSpec>,
    /// A bounded range of old messages to render by a deadline, on a second consumer group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<BacklogSpec>,
}

/// How each task is rendered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.command.exists(a, a.contains('{output}'))").message("render.command must write to {output}: the worker publishes that file once the render is accepted"))]
#[x_kube(validation = Rule::new("self.outputDir.startsWith('/')").message("render.outputDir must be an absolute path"))]
pub struct RenderSpec {
    /// The program and its arguments, run without a shell (use `sh -c` for one). Placeholders replaced per
    /// task: `{key}`, `{partition}`, `{offset}`, `{attempt}`, `{value_file}` (the message value in a file),
    /// `{output}` (the staging file to write; published only if the render is accepted).
    /// (Each argument is at most 1024 characters, which keeps the CEL rule's cost within the API server's budget.)
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 1024)))]
    pub command: Vec<String>,
    /// A render still running after this many seconds is killed and counts as a failed attempt.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: i32,
    /// Attempts per task before it is recorded as failed.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: i32,
    /// Where published outputs go, one file per task key.
    #[schemars(length(min = 1, max = 1024))]
    pub output_dir: String,
}

fn default_timeout() -> i32 {
    600
}
fn default_attempts() -> i32 {
    3
}

/// Latency objective.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SloSpec {
    /// The longest acceptable time from an event to its published render, e.g. `10m`, `90s`.
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub max_latency: String,
}

/// The backlog lane: a second consumer group over a bounded range, sized to
/// finish just before `finishBy` rather than as fast as possible.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.fromTimestamp) != has(self.fromOffset)").message("backlog needs exactly one of fromTimestamp or fromOffset"))]
pub struct BacklogSpec {
    /// Start of the range: the first message at or after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = RFC3339))]
    pub from_timestamp: Option<String>,
    /// Start of the range: this offset on every partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub from_offset: Option<i64>,
    /// The time by which every message of the range must be rendered (RFC 3339). The range ends
    /// where the live lane was when the backlog started; the operator sizes the lane to finish
    /// just before this time rather than as fast as possible.
    #[schemars(regex(pattern = RFC3339))]
    pub finish_by: String,
    /// The most backlog workers. Never more than the partitions whose range is unfinished are used.
    #[serde(default = "default_backlog_replicas")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
}

fn default_backlog_replicas() -> i32 {
    4
}

/// What the operator observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RenderJobStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and Degraded, with reasons.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Ready/desired live workers.
    #[serde(default)]
    pub workers: String,
    /// Partitions of the source topic.
    #[serde(default)]
    pub partitions: i32,
    /// Live lane lag, in messages.
    #[serde(default)]
    pub lag: i64,
    /// Tasks rendered and published.
    #[serde(default)]
    pub done: i64,
    /// Tasks that failed `maxAttempts` times.
    #[serde(default)]
    pub failed: i64,
    /// Tasks being rendered now.
    #[serde(default)]
    pub in_flight: i64,
    /// Renders that were not started because the task was already done or held.
    #[serde(default)]
    pub duplicates_prevented: i64,
    /// Event to published render, median, e.g. `850ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50: Option<String>,
    /// Event to published render, 99th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<String>,
    /// Tasks that missed `slo.maxLatency`.
    #[serde(default)]
    pub slo_breaches: i64,
    /// The live lane in detail.
    #[serde(default)]
    pub live: LaneStatus,
    /// The backlog lane, while there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<BacklogStatus>,
}

/// Progress of the backlog lane. The range is captured once, when the backlog
/// starts; the rest is updated on every reconcile while it runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BacklogStatus {
    /// Messages in the range.
    pub total: i64,
    /// Messages of the range done: the backlog group's committed offsets within the range, so
    /// dead-lettered, failed and retention-deleted messages count as done too.
    pub done: i64,
    /// Backlog workers now.
    pub replicas: i32,
    /// When the range will be done at the current rate, following the planned sizing (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    /// True once every message of the range is done; the lane is then removed.
    pub finished: bool,
    /// Backlog workers ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Partition -> first offset of the range, captured when the backlog started.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub start: BTreeMap<String, i64>,
    /// Partition -> end of the range (exclusive), captured when the backlog started: the live
    /// lane's offsets at that time, where the live lane starts, so the two lanes never overlap.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub end: BTreeMap<String, i64>,
    /// Partition -> backlog slot index, as sent to the progress service; unfinished partitions only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub assignment: BTreeMap<String, i32>,
    /// Tasks per second one backlog worker does, an exponentially weighted average of the
    /// measured rate, e.g. `8.250`. Absent until it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_worker: Option<String>,
    /// `done` at the last rate sample; absent for the first sample after the workers changed,
    /// because the interval after it still has their start in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_done: Option<i64>,
    /// When the last rate sample was taken (RFC 3339, milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sample_time: Option<String>,
    /// Backlog workers holding partitions at the last rate sample; a sample is used only when
    /// this did not change in between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sample_workers: Option<i32>,
    /// When the number of backlog workers last changed (RFC 3339); scale-downs wait 15 s after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    /// When the range was captured and the backlog started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// The time the sizing aims to finish by (RFC 3339): 80% of the way from `startedAt` to
    /// `finishBy`, so the backlog ends just before its deadline with a margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// When the range was seen done (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}
