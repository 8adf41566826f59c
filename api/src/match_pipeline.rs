//! `MatchPipeline` (short name `mp`): real-time matchmaking on a fleet of
//! partition-pinned workers. Requests are windowed by event time per
//! segment, scored in batches, matched, and their results written to Kafka
//! exactly once (Azar's HyperMatch without a Flink cluster).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::fleet::{Condition, HeartbeatSpec, LaneStatus, SourceSpec, WorkerSpec};

/// A matchmaking pipeline over a Kafka topic of match requests.
// Printer columns repeat `type_ = ...`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "matchfleet.io",
    version = "v1alpha1",
    kind = "MatchPipeline",
    plural = "matchpipelines",
    shortname = "mp",
    category = "matchfleet",
    namespaced,
    status = "MatchPipelineStatus",
    validation = Rule::new("self.metadata.name.size() <= 54").message("metadata.name must be at most 54 characters: the progress Service is named <name>-progress"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter): it names the pipeline's Services"),
    doc = "MatchPipeline matches requests from a Kafka topic in event-time windows on partition-pinned workers and writes every result exactly once.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Active", type_ = "string", json_path = ".status.active"),
    printcolumn(name = "Workers", type_ = "string", json_path = ".status.workers"),
    printcolumn(
        name = "Partitions",
        type_ = "integer",
        json_path = ".status.partitions"
    ),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lag"),
    printcolumn(
        name = "Matches/s",
        type_ = "string",
        json_path = ".status.matchesPerSecond"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// Topics must not feed into each other: every message names the loop it prevents.
// The API server estimates a rule's cost from maxLength/maxItems, not from
// patterns: the topics here and the scorers carry both, so even the quadratic
// uniqueness rule costs little (`source.topic` has no maxLength; a few
// comparisons with it stay well within the budget).
#[x_kube(validation = Rule::new("self.resultsTopic != self.source.topic").message("resultsTopic must differ from source.topic, or results would be read back as requests"))]
#[x_kube(validation = Rule::new("has(self.deadLetterTopic) || self.resultsTopic != self.source.topic + '.dlq'").message("resultsTopic must differ from the default deadLetterTopic <source.topic>.dlq; set deadLetterTopic to another topic"))]
#[x_kube(validation = Rule::new("!has(self.deadLetterTopic) || (self.deadLetterTopic != self.source.topic && self.deadLetterTopic != self.resultsTopic)").message("deadLetterTopic must differ from source.topic and resultsTopic, or malformed requests would be read again or mixed with results"))]
#[x_kube(validation = Rule::new("!has(self.feedback) || (self.feedback.topic != self.source.topic && self.feedback.topic != self.resultsTopic)").message("feedback.topic must differ from source.topic and resultsTopic: it holds outcome events, not requests or results"))]
#[x_kube(validation = Rule::new("!has(self.feedback) || (self.feedback.rewardsTopic != self.source.topic && self.feedback.rewardsTopic != self.resultsTopic)").message("feedback.rewardsTopic must differ from source.topic and resultsTopic"))]
#[x_kube(validation = Rule::new("self.scorers.all(s, self.scorers.exists_one(t, t.name == s.name))").message("scorer names must be unique: results and rewards name the scorer"))]
pub struct MatchPipelineSpec {
    /// The topic of match requests, keyed by segment.
    pub source: SourceSpec,
    /// Where results go: one record per match and per expired request. Created with the
    /// source's partition count if missing.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"), length(max = 249))]
    pub results_topic: String,
    /// The feature vectors.
    #[serde(default)]
    pub features: FeatureSpec,
    /// Event-time windows.
    #[serde(default)]
    pub window: WindowSpec,
    /// The matchmaker.
    #[serde(default)]
    pub matching: MatchingSpec,
    /// Scorers the bandit chooses among, per segment: 1 to 16, with unique names. Default: one
    /// built-in `cosine`.
    #[serde(default = "default_scorers")]
    #[schemars(length(min = 1, max = 16))]
    pub scorers: Vec<ScorerSpec>,
    /// Joins outcome events to results and emits bandit rewards and labelled samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackSpec>,
    /// The worker pods.
    #[serde(default)]
    pub workers: WorkerSpec,
    /// Heartbeat interval and lease length.
    #[serde(default)]
    pub heartbeat: HeartbeatSpec,
    /// Where malformed requests go, with the reason in a header. Default `<source.topic>.dlq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"), length(max = 249))]
    pub dead_letter_topic: Option<String>,
}

/// The feature vector every request carries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeatureSpec {
    /// Length of every request's vector; requests with another length are dead-lettered.
    #[serde(default = "default_dimension")]
    #[schemars(range(min = 1, max = 1024))]
    pub dimension: i32,
}

impl Default for FeatureSpec {
    fn default() -> Self {
        FeatureSpec {
            dimension: default_dimension(),
        }
    }
}

fn default_dimension() -> i32 {
    32
}

/// Tumbling event-time windows per (partition, segment).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WindowSpec {
    /// Window length in milliseconds.
    #[serde(default = "default_window")]
    #[schemars(range(min = 10, max = 600000))]
    pub size_millis: i32,
    /// The watermark trails the newest event time seen on a partition by this much: events
    /// this far out of order still land in their own window.
    #[serde(default = "default_out_of_order")]
    #[schemars(range(min = 0, max = 600000))]
    pub out_of_order_millis: i32,
    /// A request whose window already closed joins the next open window if it is at most
    /// this late; later ones are expired with reason `tooLate`.
    #[serde(default = "default_lateness")]
    #[schemars(range(min = 0, max = 3600000))]
    pub allowed_lateness_millis: i32,
    /// When a partition receives nothing for this long, its watermark follows the wall
    /// clock, so the last windows close without new traffic.
    #[serde(default = "default_idle")]
    #[schemars(range(min = 10, max = 600000))]
    pub idle_millis: i32,
}

impl Default for WindowSpec {
    fn default() -> Self {
        WindowSpec {
            size_millis: default_window(),
            out_of_order_millis: default_out_of_order(),
            allowed_lateness_millis: default_lateness(),
            idle_millis: default_idle(),
        }
    }
}

fn default_window() -> i32 {
    1000
}
fn default_out_of_order() -> i32 {
    200
}
fn default_lateness() -> i32 {
    5000
}
fn default_idle() -> i32 {
    1000
}

/// The matchmaker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchingSpec {
    /// Windows an unmatched request is carried through before it expires (reason `noPartner`).
    #[serde(default = "default_max_wait")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_wait_windows: i32,
    /// Two users matched once are not matched again for this long (event time).
    #[serde(default = "default_cooldown")]
    #[schemars(range(min = 0, max = 31536000))]
    pub rematch_cooldown_seconds: i32,
    /// Windows with at most this many requests are matched exactly (maximum total score);
    /// larger ones greedily (at least half the optimum).
    #[serde(default = "default_exact_below")]
    #[schemars(range(min = 0, max = 20))]
    pub exact_below: i32,
    /// Pairs scoring below this are never matched.
    #[serde(default = "default_min_score")]
    #[schemars(range(min = -1.0, max = 1.0))]
    pub min_score: f64,
}

impl Default for MatchingSpec {
    fn default() -> Self {
        MatchingSpec {
            max_wait_windows: default_max_wait(),
            rematch_cooldown_seconds: default_cooldown(),
            exact_below: default_exact_below(),
            min_score: default_min_score(),
        }
    }
}

fn default_max_wait() -> i32 {
    5
}
fn default_cooldown() -> i32 {
    86400
}
fn default_exact_below() -> i32 {
    12
}
fn default_min_score() -> f64 {
    -1.0
}

/// A scorer: built in (batch GEMM over the window) or an HTTP service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.builtin) != has(self.http)").message("a scorer needs exactly one of builtin or http"))]
pub struct ScorerSpec {
    /// The scorer's name in results and rewards: a DNS label, unique among the scorers.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinScorer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpScorerSpec>,
}

/// Scorers computed as one matrix product over the window.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BuiltinScorer {
    /// Cosine similarity of the two vectors: like with like.
    Cosine,
    /// Negated cosine similarity: opposites attract.
    Complement,
}

/// A scorer behind HTTP: `POST url` with the window's pairs; a window never waits past the timeout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpScorerSpec {
    /// `http://...` or `https://...`.
    #[schemars(regex(pattern = r"^https?://.+$"), length(max = 2048))]
    pub url: String,
    /// After this long the window is matched with a built-in scorer instead.
    #[serde(default = "default_http_timeout")]
    #[schemars(range(min = 1, max = 10000))]
    pub timeout_millis: i32,
}

fn default_http_timeout() -> i32 {
    50
}

fn default_scorers() -> Vec<ScorerSpec> {
    vec![ScorerSpec {
        name: "cosine".into(),
        builtin: Some(BuiltinScorer::Cosine),
        http: None,
    }]
}

/// The feedback join: outcome events joined to results by match id.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.rewardsTopic != self.topic").message("feedback.rewardsTopic must differ from feedback.topic, or rewards would be read back as outcomes"))]
pub struct FeedbackSpec {
    /// The topic of outcome events (call length, skip).
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"), length(max = 249))]
    pub topic: String,
    /// Where rewards and labelled samples go.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"), length(max = 249))]
    pub rewards_topic: String,
    /// Outcomes later than this after the match (event time) are ignored.
    #[serde(default = "default_feedback_ttl")]
    #[schemars(range(min = 1, max = 604800))]
    pub ttl_seconds: i32,
    /// A call at least this long counts as a good match.
    #[serde(default = "default_min_call")]
    #[schemars(range(min = 0, max = 86400))]
    pub min_call_seconds: i32,
}

fn default_feedback_ttl() -> i32 {
    600
}
fn default_min_call() -> i32 {
    30
}

/// What the worker needs of the spec, passed to it as JSON in `MATCH_SETTINGS`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MatchSettings {
    pub features: FeatureSpec,
    pub window: WindowSpec,
    pub matching: MatchingSpec,
    pub scorers: Vec<ScorerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackSpec>,
}

impl MatchSettings {
    pub fn from_spec(spec: &MatchPipelineSpec) -> Self {
        MatchSettings {
            features: spec.features.clone(),
            window: spec.window.clone(),
            matching: spec.matching.clone(),
            scorers: spec.scorers.clone(),
            feedback: spec.feedback.clone(),
        }
    }
}

/// What the operator observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchPipelineStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and Degraded, with reasons.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The color serving the pipeline (`blue` or `green`).
    #[serde(default)]
    pub active: String,
    /// Ready/desired workers.
    #[serde(default)]
    pub workers: String,
    /// Partitions of the source topic.
    #[serde(default)]
    pub partitions: i32,
    /// Requests not yet committed, summed over partitions.
    #[serde(default)]
    pub lag: i64,
    /// Matches per second, smoothed, e.g. `1250.5`. Absent until measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches_per_second: Option<String>,
    /// Matches committed to the results topic.
    #[serde(default)]
    pub matched: i64,
    /// Requests expired without a partner.
    #[serde(default)]
    pub expired: i64,
    /// Requests set aside in the dead-letter topic.
    #[serde(default)]
    pub dead_lettered: i64,
    /// The feedback join's counters (with `spec.feedback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackCounts>,
    /// `matched` at the last rate sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_matched: Option<i64>,
    /// When the last rate sample was taken (RFC 3339, milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sample_time: Option<String>,
    /// The lane in detail.
    #[serde(default)]
    pub live: LaneStatus,
}

/// What the feedback join did, summed over partitions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackCounts {
    /// Valid outcome events read.
    #[serde(default)]
    pub outcomes: i64,
    /// Matches whose outcome joined (one sample each, with its reward).
    #[serde(default)]
    pub joined: i64,
    /// Matches whose TTL passed without an outcome (a `noOutcome` sample).
    #[serde(default)]
    pub no_outcome: i64,
    /// Outcomes after their match's TTL.
    #[serde(default)]
    pub late: i64,
    /// Outcomes for a match that had one already.
    #[serde(default)]
    pub duplicate: i64,
    /// Outcomes for no known match (never made on that partition, or expired).
    #[serde(default)]
    pub unknown: i64,
}
