//! The progress service's HTTP protocol (JSON), shared by the service, the
//! workers that heartbeat and claim, and the operator that assigns partitions
//! and reads counters. Keys are in bodies, not paths, because task keys are
//! arbitrary Kafka keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `PUT /assignment` (operator): which slot should own each partition of each lane.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// Lane name (`live`, `backlog`) -> partition -> slot name (the worker pod's name).
    pub lanes: BTreeMap<String, BTreeMap<i32, String>>,
    /// How long an owner told to release a partition may take to drain it.
    pub drain_millis: u64,
}

/// One partition a worker holds, as it reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Holding {
    pub lane: String,
    pub partition: i32,
    pub epoch: u64,
    /// The next offset the worker will commit from (for lag and status only).
    #[serde(default)]
    pub committed: i64,
    /// Cumulative per-partition counters committed with the partition's state
    /// (MatchPipeline: `matched`, `expired`, `deadLettered`), so they survive
    /// a change of owner; the operator derives rates from them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counters: BTreeMap<String, u64>,
}

/// `POST /heartbeat` (worker).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRequest {
    /// The worker's slot name (its pod name).
    pub slot: String,
    /// Partitions the worker holds and still works on.
    #[serde(default)]
    pub holdings: Vec<Holding>,
    /// Partitions the worker finished draining and gave up since its last beat.
    #[serde(default)]
    pub released: Vec<Holding>,
}

/// What a worker must do about one partition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "action")]
pub enum Directive {
    /// Go on; the lease is renewed until `expiresInMillis` from now.
    Keep {
        lane: String,
        partition: i32,
        epoch: u64,
        expires_in_millis: u64,
    },
    /// Start on this partition at this epoch, from the lane group's committed offset.
    Acquire {
        lane: String,
        partition: i32,
        epoch: u64,
        expires_in_millis: u64,
    },
    /// Stop fetching, finish or abort in-flight work, commit, then report it
    /// in `released` within `deadlineMillis`.
    Release {
        lane: String,
        partition: i32,
        epoch: u64,
        deadline_millis: u64,
        /// The lease is renewed only this long: keep heartbeating while draining.
        #[serde(default)]
        expires_in_millis: u64,
    },
    /// The lease moved on: kill this partition's work at once and commit
    /// nothing more for it.
    Fenced {
        lane: String,
        partition: i32,
        current_epoch: u64,
    },
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    pub directives: Vec<Directive>,
}

/// `POST /claims` (render worker): may I render this task?
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRequest {
    pub key: String,
    pub lane: String,
    pub partition: i32,
    pub epoch: u64,
    pub slot: String,
    pub offset: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum ClaimResponse {
    /// Render it; this is attempt number `attempt` (from 1).
    Granted { attempt: u32 },
    /// Already rendered: skip it (a duplicate prevented). `staged` is the
    /// accepted output; if it still exists, its publication was interrupted
    /// and the caller finishes it (an atomic rename, so only one can).
    AlreadyDone {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        staged: Option<String>,
    },
    /// Already failed for good: skip it.
    AlreadyFailed,
    /// Another live lease holder is rendering it: skip it for now.
    Busy,
    /// The worker no longer holds the partition at this epoch.
    Fenced { current_epoch: u64 },
}

/// `POST /claims/complete` (render worker): the render succeeded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CompleteRequest {
    pub key: String,
    pub lane: String,
    pub partition: i32,
    pub epoch: u64,
    pub slot: String,
    /// The message's timestamp (ms since the epoch), for event-to-done latency.
    pub event_time_millis: i64,
    /// Where the render's staged output is. Recorded with the completion, so
    /// whoever meets the task next can finish publishing it if this worker
    /// dies between acceptance and publication (roll forward).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum CompleteResponse {
    /// Recorded durably: publish the output now. This answer is the fencing token.
    Accepted,
    /// Already completed: discard this output, but finish publishing
    /// `staged` (the accepted one) if it still exists - it may be this very
    /// render, accepted on a call whose answer was lost.
    AlreadyDone {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        staged: Option<String>,
    },
    /// The lease moved on: discard the output, commit nothing more.
    Fenced { current_epoch: u64 },
}

/// `POST /claims/fail` (render worker): the render failed or timed out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FailRequest {
    pub key: String,
    pub lane: String,
    pub partition: i32,
    pub epoch: u64,
    pub slot: String,
    pub reason: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum FailResponse {
    /// Try again; the next attempt is number `attempt`.
    Retry {
        attempt: u32,
    },
    /// `maxAttempts` reached: recorded as failed, move on.
    Failed,
    Fenced {
        current_epoch: u64,
    },
}

/// `GET /status`: what the operator folds into the resource's status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressStatus {
    pub done: u64,
    pub failed: u64,
    pub in_flight: u64,
    pub duplicates_prevented: u64,
    pub slo_breaches: u64,
    pub latency_p50_millis: Option<u64>,
    pub latency_p99_millis: Option<u64>,
    /// Lane -> partition -> (holder slot, epoch).
    pub leases: BTreeMap<String, BTreeMap<i32, LeaseView>>,
    /// Lane -> tasks done in that lane.
    pub done_by_lane: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseView {
    pub holder: Option<String>,
    pub epoch: u64,
    pub committed: i64,
    /// The holder's last reported counters (see [`Holding::counters`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counters: BTreeMap<String, u64>,
}
