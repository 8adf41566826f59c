//! The parts of a plan every fleet shares, RenderJob and MatchPipeline
//! alike: how many workers a lane wants, which pods to create and delete,
//! the sticky assignment over Ready workers, the conditions about Kafka, the
//! progress service and the workers, and the corrections `act` makes to a
//! planned status. Pure, like the plans built from it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use matchfleet_api::fleet::condition::{DEGRADED, PROGRESSING, READY};
use matchfleet_api::fleet::{Condition, SourceSpec, WorkerSpec};
use matchfleet_api::{MatchPipelineStatus, RenderJobStatus};

use crate::assign::{self, SlotAssignment};
use crate::conditions::{self, Want};
use crate::kafka::TopicState;
use crate::names::{self, Fleet, COLOR_BLUE};
use crate::observe::{Observed, WorkerPod};

/// Requeue while something is moving (lag, pods starting, not ready): the
/// status counters come from polling the progress service.
pub const REQUEUE_BUSY: Duration = Duration::from_secs(3);
/// Requeue when caught up (or paused).
pub const REQUEUE_IDLE: Duration = Duration::from_secs(10);
/// Requeue of a resource that cannot be served until it changes.
pub const REQUEUE_INVALID: Duration = Duration::from_secs(60);

/// An Event the plan asks for (Events about actions are sent by `act` once
/// the action succeeded).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
    /// A second object the event is about (the pod of `CreatedWorker`).
    /// Events that differ only here stay separate Events rather than being
    /// folded into one series with the first one's message.
    pub related: Option<ObjectReference>,
}

impl PlannedEvent {
    pub fn normal(reason: &'static str, note: String) -> Self {
        PlannedEvent {
            warning: false,
            reason,
            note,
            related: None,
        }
    }
    pub fn warning(reason: &'static str, note: String) -> Self {
        PlannedEvent {
            warning: true,
            reason,
            note,
            related: None,
        }
    }

    /// The same event, about `related` too.
    pub fn about(mut self, related: ObjectReference) -> Self {
        self.related = Some(related);
        self
    }
}

/// Live lane replicas until autoscaling: `clamp(partitions, min, max)`,
/// never more than the partitions, none without a topic.
pub fn desired_replicas(workers: &WorkerSpec, partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    workers
        .min_replicas
        .max(0)
        .max(workers.max_replicas.min(partitions))
        .min(partitions)
}

/// What to do about the worker pods of a lane.
#[derive(Debug, Default, PartialEq)]
pub struct PodActions {
    pub create: Vec<i32>,
    pub delete: Vec<String>,
    /// Pods are being created, replaced or removed.
    pub rolling: bool,
}

/// Create every missing slot of `lane` at once; delete at most one pod per
/// reconcile: a finished pod, else an extra one (highest slot first), else an
/// outdated one that is not ready, else an outdated ready one, but only once
/// every other slot is ready and nothing else is starting or stopping (a
/// rolling replacement with at most one slot down). With `extras_at_once`
/// every extra pod goes in one reconcile (the backlog lane: its extra pods
/// have no partitions left in the assignment and only cost).
pub fn pod_actions(
    job: &str,
    lane: &str,
    pods: &[WorkerPod],
    desired: i32,
    hash: &str,
    extras_at_once: bool,
) -> PodActions {
    let present: BTreeSet<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    let create: Vec<i32> = (0..desired)
        .filter(|&i| !present.contains(names::worker_pod_name(job, lane, COLOR_BLUE, i).as_str()))
        .collect();

    let running: Vec<&WorkerPod> = pods.iter().filter(|p| !p.terminating).collect();
    let terminating = pods.iter().any(|p| p.terminating);
    let is_extra = |p: &WorkerPod| p.slot.is_none_or(|s| s >= desired);
    let mut extra: Vec<&WorkerPod> = running.iter().copied().filter(|p| is_extra(p)).collect();
    // Names that are not slots first, then the highest slot.
    extra.sort_by_key(|p| (p.slot.is_some(), std::cmp::Reverse(p.slot)));
    let mut kept: Vec<&WorkerPod> = running.iter().copied().filter(|p| !is_extra(p)).collect();
    kept.sort_by_key(|p| p.slot);
    let finished: Vec<&WorkerPod> = kept.iter().copied().filter(|p| p.finished).collect();
    let outdated: Vec<&WorkerPod> = kept
        .iter()
        .copied()
        .filter(|p| !p.finished && p.template_hash.as_deref() != Some(hash))
        .collect();
    let all_ready = kept.len() == desired as usize && kept.iter().all(|p| p.ready);

    let mut delete: Vec<String> = finished
        .first()
        .or(extra.first())
        .or(outdated.iter().find(|p| !p.ready))
        .or(outdated
            .first()
            .filter(|_| all_ready && !terminating && create.is_empty()))
        .map(|p| vec![p.name.clone()])
        .unwrap_or_default();
    if extras_at_once {
        for p in &extra {
            if !delete.contains(&p.name) {
                delete.push(p.name.clone());
            }
        }
    }
    let rolling = !create.is_empty()
        || !delete.is_empty()
        || terminating
        || !extra.is_empty()
        || !finished.is_empty()
        || !outdated.is_empty();
    PodActions {
        create,
        delete,
        rolling,
    }
}

pub fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The reason of the previous condition of a type.
pub fn reason_of<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions::find(conds, type_).map(|c| c.reason.as_str())
}

/// The source topic's partitions and the live lag as the plan takes them.
/// When Kafka is unreachable, the last known partition count keeps the
/// fleet as it is rather than scaling it to nothing; a missing topic has no
/// partitions and no lag.
pub fn partitions_and_lag(
    topic: &TopicState,
    lag: Option<i64>,
    prev_partitions: i32,
    prev_lag: i64,
) -> (Option<i32>, i64) {
    match topic {
        TopicState::Found { partitions } => (Some(*partitions), lag.unwrap_or(prev_lag)),
        TopicState::NotFound => (Some(0), 0),
        TopicState::Unreachable { .. } => {
            ((prev_partitions > 0).then_some(prev_partitions), prev_lag)
        }
    }
}

/// Ready workers of a lane among its first `replicas` slots.
pub fn ready_replicas(pods: &[WorkerPod], replicas: i32) -> i32 {
    pods.iter()
        .filter(|p| p.ready && !p.terminating && p.slot.is_some_and(|s| s < replicas))
        .count() as i32
}

/// The live lane's assignment over the desired slots whose workers are
/// Ready, sticky to the last one sent (`previous`, from the status); before
/// any is Ready, over all desired slots. `None` when paused or while the
/// partition count is unknown: nothing is sent then.
pub fn live_slots(
    paused: bool,
    partitions: Option<i32>,
    desired: Option<i32>,
    pods: &[WorkerPod],
    previous: &BTreeMap<String, i32>,
) -> Option<SlotAssignment> {
    let (false, Some(p), Some(d)) = (paused, partitions, desired) else {
        return None;
    };
    let previous = assign::from_status(previous);
    let mut available: Vec<i32> = pods
        .iter()
        .filter(|pod| pod.ready && !pod.terminating)
        .filter_map(|pod| pod.slot.filter(|s| *s < d))
        .collect();
    available.sort_unstable();
    available.dedup();
    Some(if available.is_empty() && previous.is_empty() {
        assign::assign(p, d, &previous)
    } else {
        assign::assign_available(p, &available, &previous)
    })
}

/// An assignment by pod name (color blue), as the progress service takes it.
pub fn slot_names(name: &str, lane: &str, a: &SlotAssignment) -> BTreeMap<i32, String> {
    a.iter()
        .map(|(p, s)| (*p, names::worker_pod_name(name, lane, COLOR_BLUE, *s)))
        .collect()
}

/// What one observation says about the parts every fleet depends on: the
/// source topic, Kafka and the progress service.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    fleet: Fleet,
    name: String,
    pub topic_not_found: bool,
    /// Kafka did not answer (the fleet is kept as it is meanwhile).
    pub kafka_unreachable: bool,
    topic_missing: String,
    kafka_error: Option<String>,
    pub progress_ready: bool,
    progress_problem: String,
}

impl Health {
    pub fn of(fleet: Fleet, name: &str, source: &SourceSpec, obs: &Observed) -> Self {
        let bootstrap = &source.bootstrap_servers;
        let topic_missing = format!(
            "topic {} not found on bootstrap servers {bootstrap}; create it or fix spec.source.topic",
            source.topic
        );
        let kafka_error = match &obs.kafka.topic {
            TopicState::Unreachable { error } => Some(format!(
                "cannot reach Kafka at {bootstrap}: {error}; check spec.source.bootstrapServers and the brokers"
            )),
            _ => None,
        };
        let progress_name = names::progress_name(name);
        let progress_problem = if !obs.progress.deployment_exists {
            format!("progress service {progress_name} is being created")
        } else if obs.progress.ready_replicas < 1 {
            format!(
                "progress service {progress_name} has no ready pod; see kubectl get pods -l {}={name},app.kubernetes.io/component=progress",
                fleet.owner_label()
            )
        } else {
            format!(
                "progress service {progress_name} does not answer: {}",
                obs.progress.error.as_deref().unwrap_or("no status")
            )
        };
        Health {
            fleet,
            name: name.to_string(),
            topic_not_found: obs.kafka.topic == TopicState::NotFound,
            kafka_unreachable: kafka_error.is_some(),
            topic_missing,
            kafka_error,
            progress_ready: obs.progress.ready_replicas >= 1 && obs.progress.status.is_some(),
            progress_problem,
        }
    }

    /// `Ready`: the first of topic, Kafka, progress service, workers that is
    /// not there yet, else `AllWorkersReady`.
    pub fn ready(&self, ready_replicas: i32, replicas: i32) -> Want {
        if self.topic_not_found {
            Want::new(READY, false, "TopicNotFound", self.topic_missing.clone())
        } else if let Some(e) = &self.kafka_error {
            Want::new(READY, false, "KafkaUnreachable", e.clone())
        } else if !self.progress_ready {
            Want::new(
                READY,
                false,
                "ProgressServiceNotReady",
                self.progress_problem.clone(),
            )
        } else if ready_replicas < replicas {
            Want::new(
                READY,
                false,
                "WorkersNotReady",
                format!(
                    "{ready_replicas}/{replicas} workers ready; see kubectl get pods -l {}={}",
                    self.fleet.owner_label(),
                    self.name
                ),
            )
        } else {
            Want::new(
                READY,
                true,
                "AllWorkersReady",
                format!("{ready_replicas}/{replicas} workers ready; progress service ready"),
            )
        }
    }

    /// `Degraded` for what every fleet can suffer: a missing topic, an
    /// unreachable Kafka, a worker restarting; `None` when none of these.
    pub fn degraded(&self, pods: &[WorkerPod]) -> Option<Want> {
        let mut restarting = pods
            .iter()
            .filter(|p| !p.terminating)
            .filter_map(|p| p.restarting.as_deref());
        if self.topic_not_found {
            Some(Want::new(
                DEGRADED,
                true,
                "TopicNotFound",
                self.topic_missing.clone(),
            ))
        } else if let Some(e) = &self.kafka_error {
            Some(Want::new(DEGRADED, true, "KafkaUnreachable", e.clone()))
        } else if let Some(first) = restarting.next() {
            let more = restarting.count();
            let tail = if more > 0 {
                format!(" (and {more} more pods)")
            } else {
                String::new()
            };
            Some(Want::new(
                DEGRADED,
                true,
                "WorkerRestarting",
                format!("{first}{tail}"),
            ))
        } else {
            None
        }
    }

    /// The Warning about a missing topic, once (when `Ready` did not say so already).
    pub fn topic_event(&self, previous: &[Condition]) -> Option<PlannedEvent> {
        (self.topic_not_found && reason_of(previous, READY) != Some("TopicNotFound"))
            .then(|| PlannedEvent::warning("TopicNotFound", self.topic_missing.clone()))
    }

    /// Poll fast while things move or are about to (pods starting, the
    /// progress service coming up); a missing topic or an unreachable Kafka
    /// is waited out at the idle pace.
    pub fn requeue(&self, paused: bool, progressing: &Want, ready: &Want) -> Duration {
        let waiting_on_kafka = self.topic_not_found || self.kafka_unreachable;
        let busy = progressing.status || (!ready.status && !waiting_on_kafka);
        if !paused && busy {
            REQUEUE_BUSY
        } else {
            REQUEUE_IDLE
        }
    }
}

/// `Progressing` of a paused resource.
pub fn paused_want() -> Want {
    Want::new(
        PROGRESSING,
        false,
        "Paused",
        format!(
            "paused by annotation {}=true; remove it to resume",
            names::PAUSED
        ),
    )
}

/// `Paused` or `Resumed` when the pause annotation came or went.
pub fn pause_event(paused: bool, previous: &[Condition]) -> Option<PlannedEvent> {
    let was_paused = reason_of(previous, PROGRESSING) == Some("Paused");
    if paused && !was_paused {
        Some(PlannedEvent::normal(
            "Paused",
            "paused: no changes to workers or assignment until the annotation is removed"
                .to_string(),
        ))
    } else if !paused && was_paused {
        Some(PlannedEvent::normal("Resumed", "resumed".to_string()))
    } else {
        None
    }
}

/// The conditions of a resource that cannot be served (`reason` says why):
/// not Ready, not Progressing, Degraded, and a Warning the first time.
pub fn invalid_conditions(
    previous: &[Condition],
    reason: &'static str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> (Vec<Condition>, Option<PlannedEvent>) {
    let now = conditions::rfc3339(now);
    let event = (reason_of(previous, READY) != Some(reason))
        .then(|| PlannedEvent::warning(reason, message.to_string()));
    let conds = [
        Want::new(READY, false, reason, message),
        Want::new(PROGRESSING, false, reason, message),
        Want::new(DEGRADED, true, reason, message),
    ]
    .into_iter()
    .map(|w| conditions::build(previous, w, generation, &now))
    .collect();
    (conds, event)
}

/// A status with conditions, so `act` can correct what the plan assumed.
pub trait FleetStatus {
    fn conditions(&self) -> &[Condition];
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    fn observed_generation(&self) -> Option<i64>;
}

impl FleetStatus for RenderJobStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn observed_generation(&self) -> Option<i64> {
        self.observed_generation
    }
}

impl FleetStatus for MatchPipelineStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn observed_generation(&self) -> Option<i64> {
        self.observed_generation
    }
}

/// Replaces a planned condition with what acting found out (the plan
/// assumed its actions would succeed).
pub fn set_condition(
    status: &mut impl FleetStatus,
    previous: &[Condition],
    want: Want,
    now: Timestamp,
) {
    let generation = status.observed_generation();
    let type_ = want.type_;
    let cond = conditions::build(previous, want, generation, &conditions::rfc3339(now));
    if let Some(c) = status
        .conditions_mut()
        .iter_mut()
        .find(|c| c.type_ == type_)
    {
        *c = cond;
    }
}

/// The PUT of the assignment failed: Ready says so (when nothing more
/// actionable already made it False).
pub fn assignment_failed(
    status: &mut impl FleetStatus,
    previous: &[Condition],
    job: &str,
    error: &str,
    now: Timestamp,
) {
    let ready = conditions::find(status.conditions(), READY).is_some_and(|c| c.status == "True");
    if !ready {
        return;
    }
    let want = Want::new(
        READY,
        false,
        "ProgressServiceNotReady",
        format!(
            "progress service {} did not accept the assignment: {error}",
            names::progress_name(job)
        ),
    );
    set_condition(status, previous, want, now);
}

/// The API server refused a worker pod (an invalid `spec.workers.env` or
/// `resources`, a quota, a policy): Degraded says which and why, because
/// retrying will not help until something changes.
pub fn worker_refused(
    status: &mut impl FleetStatus,
    previous: &[Condition],
    pod: &str,
    error: &str,
    now: Timestamp,
) {
    let want = Want::new(
        DEGRADED,
        true,
        "WorkerCreateFailed",
        format!("cannot create worker pod {pod}: {error}; check spec.workers and the namespace's quotas and policies"),
    );
    set_condition(status, previous, want, now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::KafkaObservation;
    use crate::observe::ProgressObservation;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn source() -> SourceSpec {
        SourceSpec {
            bootstrap_servers: "127.0.0.1:9092".to_string(),
            topic: "t".to_string(),
        }
    }

    fn observed(topic: TopicState, progress: ProgressObservation) -> Observed {
        Observed {
            now: now(),
            pods: Vec::new(),
            progress,
            kafka: KafkaObservation {
                topic,
                lag: Some(0),
                offsets: None,
                backlog: None,
            },
        }
    }

    fn pod(slot: i32, ready: bool) -> WorkerPod {
        WorkerPod {
            name: names::worker_pod_name("demo", "live", "blue", slot),
            slot: Some(slot),
            ready,
            ..Default::default()
        }
    }

    #[test]
    fn partitions_and_lag_follow_what_kafka_said() {
        let found = TopicState::Found { partitions: 4 };
        assert_eq!(partitions_and_lag(&found, Some(7), 2, 1), (Some(4), 7));
        assert_eq!(partitions_and_lag(&found, None, 2, 1), (Some(4), 1));
        assert_eq!(
            partitions_and_lag(&TopicState::NotFound, None, 2, 1),
            (Some(0), 0)
        );
        let down = TopicState::Unreachable {
            error: "x".to_string(),
        };
        assert_eq!(partitions_and_lag(&down, None, 2, 1), (Some(2), 1));
        assert_eq!(partitions_and_lag(&down, None, 0, 0), (None, 0));
    }

    #[test]
    fn live_slots_go_to_ready_workers_only() {
        let pods = [pod(0, false), pod(1, true), pod(2, true)];
        let a = live_slots(false, Some(4), Some(3), &pods, &BTreeMap::new()).unwrap();
        assert!(a.values().all(|s| *s == 1 || *s == 2), "{a:?}");
        // None Ready yet: spread over every desired slot.
        let none = [pod(0, false)];
        let a = live_slots(false, Some(4), Some(2), &none, &BTreeMap::new()).unwrap();
        assert_eq!(a.values().copied().collect::<BTreeSet<_>>(), [0, 1].into());
        assert_eq!(
            live_slots(true, Some(4), Some(2), &pods, &BTreeMap::new()),
            None
        );
        assert_eq!(live_slots(false, None, None, &pods, &BTreeMap::new()), None);
        assert_eq!(ready_replicas(&pods, 2), 1);
        assert_eq!(
            slot_names("demo", "live", &[(5, 1)].into())[&5],
            "demo-live-blue-1"
        );
    }

    #[test]
    fn ready_names_the_first_missing_part_with_the_kinds_label() {
        let ok = ProgressObservation {
            deployment_exists: true,
            ready_replicas: 1,
            status: Some(Default::default()),
            ..Default::default()
        };
        let obs = observed(TopicState::Found { partitions: 2 }, ok.clone());
        let h = Health::of(Fleet::MatchPipeline, "mm", &source(), &obs);
        let w = h.ready(1, 2);
        assert_eq!(w.reason, "WorkersNotReady");
        assert!(
            w.message.contains("matchfleet.io/matchpipeline=mm"),
            "{}",
            w.message
        );
        assert!(h.ready(2, 2).status);
        assert_eq!(h.degraded(&[]), None);

        let obs = observed(TopicState::NotFound, ok);
        let h = Health::of(Fleet::MatchPipeline, "mm", &source(), &obs);
        assert_eq!(h.ready(2, 2).reason, "TopicNotFound");
        assert_eq!(h.degraded(&[]).unwrap().reason, "TopicNotFound");
        assert!(h.topic_event(&[]).is_some());

        let obs = observed(
            TopicState::Found { partitions: 2 },
            ProgressObservation {
                deployment_exists: true,
                ..Default::default()
            },
        );
        let h = Health::of(Fleet::MatchPipeline, "mm", &source(), &obs);
        let w = h.ready(2, 2);
        assert_eq!(w.reason, "ProgressServiceNotReady");
        assert!(w.message.contains("matchfleet.io/matchpipeline=mm,"));
    }

    #[test]
    fn invalid_conditions_warn_once() {
        let (conds, event) = invalid_conditions(&[], "InvalidSpec", "bad", Some(2), now());
        assert_eq!(conds.len(), 3);
        assert!(conds.iter().all(|c| c.reason == "InvalidSpec"));
        assert_eq!(event.unwrap().reason, "InvalidSpec");
        let (_, again) = invalid_conditions(&conds, "InvalidSpec", "bad", Some(2), now());
        assert_eq!(again, None);
    }
}
