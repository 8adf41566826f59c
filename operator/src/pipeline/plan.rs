//! Plan: a pure function from a MatchPipeline and what was observed to what
//! to do (objects to apply, pods to create and delete, the assignment to
//! send) and the status to write. The fleet rules are RenderJob's
//! ([`crate::fleet`]); what is the pipeline's own is the worker template,
//! the workers' Service, the counters and the match rate.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use matchfleet_api::fleet::condition::{DEGRADED, PROGRESSING};
use matchfleet_api::fleet::{workers_column, LaneStatus};
use matchfleet_api::progress::Assignment;
use matchfleet_api::{MatchPipeline, MatchPipelineStatus};

use super::rate::{self, Counters, Sample};
use super::resources as pipeline_resources;
use crate::assign;
use crate::conditions::{self, Want};
use crate::fleet::{self, pod_actions, Health, PlannedEvent, PodActions, REQUEUE_INVALID};
use crate::names::{self, COLOR_BLUE, LANE_LIVE};
use crate::observe::{Observed, WorkerPod};
use crate::resources::{self, Owner};

/// The color serving the pipeline. Blue/green cutovers come later; until
/// then every pod and the status say blue.
pub const ACTIVE_COLOR: &str = COLOR_BLUE;

/// What one reconcile of a MatchPipeline does.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelinePlan {
    /// The progress service to server-side apply (`None` when paused or invalid).
    pub progress: Option<(Deployment, Service)>,
    /// The workers' Service to server-side apply (`None` when paused or invalid).
    pub workers_service: Option<Service>,
    pub create: Vec<Pod>,
    /// Pod names to delete.
    pub delete: Vec<String>,
    /// What to `PUT /assignment` (`None` when paused or unknown).
    pub assignment: Option<Assignment>,
    /// The Event to publish once the progress service took `assignment`
    /// (only when it differs from the last one).
    pub assigned: Option<PlannedEvent>,
    pub status: MatchPipelineStatus,
    pub events: Vec<PlannedEvent>,
    pub requeue: Duration,
}

/// The plan for a MatchPipeline whose name and spec can be served.
pub fn plan(mp: &MatchPipeline, owner: &Owner, obs: &Observed) -> PipelinePlan {
    let spec = &mp.spec;
    let name = owner.name.as_str();
    let prev = mp.status.clone().unwrap_or_default();
    if let Some(other) = &obs.progress.foreign_controller {
        // Applying would take the other resource's progress service over.
        let message = format!(
            "the progress service {} belongs to {other}: a MatchPipeline cannot share its name with another fleet in the namespace; recreate one of them under another name",
            names::progress_name(name)
        );
        return invalid(mp, "NameConflict", &message, obs.now);
    }
    let paused = names::is_paused(mp.annotations());
    let generation = mp.metadata.generation;
    let now = conditions::rfc3339(obs.now);

    let (partitions, lag) =
        fleet::partitions_and_lag(&obs.kafka.topic, obs.kafka.lag, prev.partitions, prev.lag);
    let desired = partitions.map(|p| fleet::desired_replicas(&spec.workers, p));
    let replicas = desired.unwrap_or(prev.live.replicas);
    let hash = pipeline_resources::template_hash(owner, spec);
    // Every pod is the live lane's: one with another lane's name has no slot
    // here, so it goes as an extra.
    let pods: Vec<WorkerPod> = obs
        .pods
        .iter()
        .cloned()
        .map(|mut p| {
            if p.lane != LANE_LIVE {
                p.slot = None;
            }
            p
        })
        .collect();
    let actions = match desired {
        Some(d) if !paused => pod_actions(name, LANE_LIVE, &pods, d, &hash, false),
        _ => PodActions::default(),
    };
    let ready_replicas = fleet::ready_replicas(&pods, replicas);
    let slots = fleet::live_slots(paused, partitions, desired, &pods, &prev.live.assignment);
    let assignment = slots.as_ref().map(|a| Assignment {
        lanes: BTreeMap::from([(LANE_LIVE.to_string(), fleet::slot_names(name, LANE_LIVE, a))]),
        drain_millis: pipeline_resources::drain_millis(),
    });
    let assigned = slots.as_ref().and_then(|a| {
        let before = assign::from_status(&prev.live.assignment);
        (a != &before).then(|| {
            let workers = a.values().collect::<std::collections::BTreeSet<_>>().len();
            PlannedEvent::normal(
                "Assigned",
                format!(
                    "assigned {} to {} ({} moved)",
                    count(a.len(), "partition"),
                    count(workers, "worker"),
                    assign::moves(&before, a)
                ),
            )
        })
    });

    // Counters never go back (a progress service that restarts shows none
    // until the workers' next beats); the rate is sampled only from a view
    // that is not missing any of them.
    let ps = obs.progress.status.as_ref();
    let seen = ps.map(rate::live_counters);
    let counters = Counters {
        matched: prev.matched.max(seen.map_or(0, |c| c.matched)),
        expired: prev.expired.max(seen.map_or(0, |c| c.expired)),
        dead_lettered: prev.dead_lettered.max(seen.map_or(0, |c| c.dead_lettered)),
        feedback: rate::feedback_max(
            prev.feedback.unwrap_or_default(),
            seen.map(|c| c.feedback).unwrap_or_default(),
        ),
    };
    let (last_matched, last_sample_time, matches_per_second) =
        match seen.filter(|c| c.matched >= prev.matched) {
            Some(c) => sample_rate(&prev, c.matched, obs.now),
            None => (
                prev.last_matched,
                prev.last_sample_time.clone(),
                prev.matches_per_second.clone(),
            ),
        };

    // Conditions.
    let health = Health::of(owner.fleet, name, &spec.source, obs);
    let ready = health.ready(ready_replicas, replicas);
    let progressing = if paused {
        fleet::paused_want()
    } else if lag > 0 || actions.rolling {
        let mut what = Vec::new();
        if lag > 0 {
            what.push(format!("lag {lag} requests"));
        }
        if !actions.create.is_empty() {
            what.push(format!("creating {} worker pods", actions.create.len()));
        }
        if actions.rolling && actions.create.is_empty() {
            what.push("replacing or removing worker pods".to_string());
        }
        Want::new(PROGRESSING, true, "Matching", what.join("; "))
    } else {
        Want::new(
            PROGRESSING,
            false,
            "CaughtUp",
            format!("no lag; {replicas} workers up to date"),
        )
    };
    let degraded = health
        .degraded(&pods)
        .unwrap_or_else(|| Want::new(DEGRADED, false, "AsExpected", "workers running"));

    // Events about what changed since the last status.
    let mut events: Vec<PlannedEvent> = health.topic_event(&prev.conditions).into_iter().collect();
    if counters.dead_lettered > prev.dead_lettered {
        events.push(PlannedEvent::warning(
            "RequestsDeadLettered",
            format!(
                "{} malformed requests or outcomes set aside in {} ({} new); their reason is in a header",
                counters.dead_lettered,
                pipeline_resources::dead_letter_topic(spec),
                counters.dead_lettered - prev.dead_lettered
            ),
        ));
    }
    events.extend(fleet::pause_event(paused, &prev.conditions));

    let requeue = health.requeue(paused, &progressing, &ready);
    let conds = [ready, progressing, degraded]
        .into_iter()
        .map(|w| conditions::build(&prev.conditions, w, generation, &now))
        .collect();
    let partitions_now = partitions.unwrap_or(prev.partitions);
    let status = MatchPipelineStatus {
        observed_generation: generation,
        conditions: conds,
        active: ACTIVE_COLOR.to_string(),
        workers: workers_column(ready_replicas, replicas),
        partitions: partitions_now,
        lag,
        matches_per_second,
        matched: counters.matched,
        expired: counters.expired,
        dead_lettered: counters.dead_lettered,
        feedback: spec.feedback.as_ref().map(|_| counters.feedback),
        last_matched,
        last_sample_time,
        live: LaneStatus {
            ready_replicas,
            replicas,
            partitions: partitions_now,
            lag,
            assignment: slots
                .as_ref()
                .map(assign::to_status)
                .unwrap_or(prev.live.assignment.clone()),
        },
    };

    PipelinePlan {
        progress: (!paused).then(|| {
            (
                resources::progress_deployment(owner, &pipeline_resources::progress_config(spec)),
                resources::progress_service(owner),
            )
        }),
        workers_service: (!paused).then(|| pipeline_resources::workers_service(owner)),
        create: actions
            .create
            .iter()
            .map(|&i| pipeline_resources::match_pod(owner, spec, i, &hash))
            .collect(),
        delete: actions.delete,
        assignment,
        assigned,
        status,
        events,
        requeue,
    }
}

/// `3 workers`, `1 worker`.
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `lastMatched`, `lastSampleTime` and `matchesPerSecond` after seeing
/// `matched` now. A sample the status cannot hold as one (half of it
/// missing, a time that does not parse) starts afresh.
fn sample_rate(
    prev: &MatchPipelineStatus,
    matched: i64,
    now: Timestamp,
) -> (Option<i64>, Option<String>, Option<String>) {
    let last = match (prev.last_matched, prev.last_sample_time.as_deref()) {
        (Some(m), Some(t)) => conditions::parse_time(t).map(|t| Sample {
            matched: m,
            at_millis: t.as_millisecond(),
        }),
        _ => None,
    };
    let rate = crate::backlog::parse_rate(prev.matches_per_second.as_deref());
    let (sample, rate) = rate::next_rate(
        last,
        rate,
        Sample {
            matched,
            at_millis: now.as_millisecond(),
        },
    );
    // The kept sample is either the previous one or now: keep its text as it was.
    let time = if Some(sample) == last {
        prev.last_sample_time.clone()
    } else {
        Some(conditions::rfc3339_millis(now))
    };
    (Some(sample.matched), time, rate.map(rate::format_rate))
}

/// The plan for a MatchPipeline that cannot be served (its name, its spec,
/// a conflict): only a status that says why, and a Warning the first time.
pub fn invalid(
    mp: &MatchPipeline,
    reason: &'static str,
    message: &str,
    now: Timestamp,
) -> PipelinePlan {
    let prev = mp.status.clone().unwrap_or_default();
    let generation = mp.metadata.generation;
    let (conds, event) =
        fleet::invalid_conditions(&prev.conditions, reason, message, generation, now);
    PipelinePlan {
        progress: None,
        workers_service: None,
        create: Vec::new(),
        delete: Vec::new(),
        assignment: None,
        assigned: None,
        status: MatchPipelineStatus {
            observed_generation: generation,
            conditions: conds,
            active: ACTIVE_COLOR.to_string(),
            ..prev
        },
        events: event.into_iter().collect(),
        requeue: REQUEUE_INVALID,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{REQUEUE_BUSY, REQUEUE_IDLE};
    use crate::kafka::{KafkaObservation, TopicState};
    use crate::observe::ProgressObservation;
    use crate::pipeline::resources::tests::pipeline;
    use matchfleet_api::fleet::condition::READY;
    use matchfleet_api::fleet::Condition;
    use matchfleet_api::progress::{LeaseView, ProgressStatus};
    use std::collections::BTreeSet;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn later(secs: i64) -> Timestamp {
        Timestamp::from_second(now().as_second() + secs).unwrap()
    }

    fn owner(mp: &MatchPipeline) -> Owner {
        Owner::of(mp).unwrap()
    }

    fn pod(mp: &MatchPipeline, slot: i32) -> WorkerPod {
        WorkerPod {
            name: names::worker_pod_name("demo", "live", "blue", slot),
            lane: "live".to_string(),
            slot: Some(slot),
            template_hash: Some(pipeline_resources::template_hash(&owner(mp), &mp.spec)),
            ready: true,
            ..Default::default()
        }
    }

    /// A progress service whose live lane reports `matched` per partition.
    fn progress(partitions: i32, matched: u64) -> ProgressObservation {
        let lease = |p: i32| LeaseView {
            holder: Some(format!("demo-live-blue-{}", p % 2)),
            epoch: 1,
            committed: 0,
            counters: [
                ("matched".to_string(), matched),
                ("expired".to_string(), 1),
                ("deadLettered".to_string(), 0),
            ]
            .into(),
        };
        ProgressObservation {
            deployment_exists: true,
            ready_replicas: 1,
            status: Some(ProgressStatus {
                leases: [(
                    "live".to_string(),
                    (0..partitions).map(|p| (p, lease(p))).collect(),
                )]
                .into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn observed(partitions: i32, lag: i64, pods: Vec<WorkerPod>) -> Observed {
        Observed {
            now: now(),
            pods,
            progress: progress(partitions, 0),
            kafka: KafkaObservation {
                topic: TopicState::Found { partitions },
                lag: Some(lag),
                offsets: None,
                backlog: None,
            },
        }
    }

    fn run(mp: &MatchPipeline, obs: &Observed) -> PipelinePlan {
        plan(mp, &owner(mp), obs)
    }

    fn after(mp: &MatchPipeline, p: &PipelinePlan) -> MatchPipeline {
        let mut mp = mp.clone();
        mp.status = Some(p.status.clone());
        mp
    }

    fn cond<'a>(p: &'a PipelinePlan, t: &str) -> &'a Condition {
        conditions::find(&p.status.conditions, t).unwrap()
    }

    fn names_of(pods: &[Pod]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn a_new_pipeline_gets_its_progress_service_workers_and_service() {
        let mut mp = pipeline("demo");
        mp.spec.workers.max_replicas = 4;
        let mut obs = observed(16, 0, vec![]);
        obs.progress = ProgressObservation::default();
        let p = run(&mp, &obs);
        let (d, s) = p.progress.as_ref().unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("demo-progress"));
        assert_eq!(s.metadata.name.as_deref(), Some("demo-progress"));
        assert_eq!(
            p.workers_service.as_ref().unwrap().metadata.name.as_deref(),
            Some("demo-workers")
        );
        assert_eq!(
            names_of(&p.create),
            [0, 1, 2, 3].map(|i| format!("demo-live-blue-{i}"))
        );
        let args = p.create[0].spec.as_ref().unwrap().containers[0]
            .args
            .clone();
        assert_eq!(args, Some(vec!["match".to_string()]));
        // Not Ready yet: spread over every desired slot.
        let a = p.assignment.as_ref().unwrap();
        assert_eq!(a.drain_millis, 30_000);
        assert_eq!(a.lanes.len(), 1);
        assert_eq!(a.lanes["live"].len(), 16);
        assert_eq!(a.lanes["live"].values().collect::<BTreeSet<_>>().len(), 4);
        assert_eq!(
            p.assigned.as_ref().unwrap().note,
            "assigned 16 partitions to 4 workers (0 moved)"
        );
        assert_eq!(p.status.active, "blue");
        assert_eq!(p.status.workers, "0/4");
        assert_eq!(p.status.partitions, 16);
        assert_eq!(p.status.live.replicas, 4);
        assert_eq!(p.status.observed_generation, Some(1));
        assert_eq!(cond(&p, READY).reason, "ProgressServiceNotReady");
        let g = cond(&p, PROGRESSING);
        assert_eq!((g.status.as_str(), g.reason.as_str()), ("True", "Matching"));
        assert!(
            g.message.contains("creating 4 worker pods"),
            "{}",
            g.message
        );
        // No status from the progress service: no counters, no rate yet.
        assert_eq!(p.status.matched, 0);
        assert_eq!(p.status.matches_per_second, None);
        assert_eq!(p.status.last_matched, None);
        assert_eq!(p.requeue, REQUEUE_BUSY);
    }

    #[test]
    fn replicas_follow_the_render_job_rule() {
        let mut mp = pipeline("demo");
        mp.spec.workers.min_replicas = 1;
        mp.spec.workers.max_replicas = 4;
        assert_eq!(run(&mp, &observed(2, 0, vec![])).status.live.replicas, 2);
        assert_eq!(run(&mp, &observed(16, 0, vec![])).status.live.replicas, 4);
        let p = run(&mp, &observed(0, 0, vec![]));
        assert_eq!(p.status.live.replicas, 0);
        assert!(p.create.is_empty());
    }

    #[test]
    fn all_ready_and_caught_up_then_an_identical_status() {
        let mut mp = pipeline("demo");
        mp.spec.workers.max_replicas = 2;
        let obs = observed(4, 0, vec![pod(&mp, 0), pod(&mp, 1)]);
        let p = run(&mp, &obs);
        assert!(p.create.is_empty() && p.delete.is_empty());
        let r = cond(&p, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("True", "AllWorkersReady")
        );
        assert_eq!(cond(&p, PROGRESSING).reason, "CaughtUp");
        assert_eq!(cond(&p, DEGRADED).reason, "AsExpected");
        assert_eq!(cond(&p, DEGRADED).status, "False");
        assert_eq!(p.status.workers, "2/2");
        assert_eq!(p.requeue, REQUEUE_IDLE);
        assert!(p.events.is_empty());
        // Nothing is matched: the second sample says so...
        let mut obs2 = obs.clone();
        obs2.now = later(30);
        let p2 = run(&after(&mp, &p), &obs2);
        assert_eq!(p2.status.matches_per_second.as_deref(), Some("0.0"));
        assert_eq!(p2.assigned, None, "the same assignment again");
        // ... and from then on nothing changes: no status to write.
        let mut obs3 = obs.clone();
        obs3.now = later(40);
        let p3 = run(&after(&mp, &p2), &obs3);
        assert_eq!(p3.status, p2.status);
    }

    #[test]
    fn counters_sum_the_live_partitions_and_never_go_back() {
        let mp = pipeline("demo");
        let mut obs = observed(4, 0, vec![pod(&mp, 0), pod(&mp, 1)]);
        obs.progress = progress(4, 25);
        let p = run(&mp, &obs);
        assert_eq!(
            (p.status.matched, p.status.expired, p.status.dead_lettered),
            (100, 4, 0)
        );
        // A restarted progress service knows nothing yet.
        let mp1 = after(&mp, &p);
        obs.progress = progress(0, 0);
        obs.now = later(3);
        let p1 = run(&mp1, &obs);
        assert_eq!((p1.status.matched, p1.status.expired), (100, 4));
        // ... nor does one that does not answer.
        obs.progress.status = None;
        let p2 = run(&mp1, &obs);
        assert_eq!(p2.status.matched, 100);
        assert_eq!(p2.status.last_sample_time, p.status.last_sample_time);
    }

    #[test]
    fn matches_per_second_appears_after_two_samples() {
        let mp = pipeline("demo");
        let mut obs = observed(4, 0, vec![pod(&mp, 0), pod(&mp, 1)]);
        obs.progress = progress(4, 1_000);
        let p1 = run(&mp, &obs);
        assert_eq!(p1.status.matches_per_second, None);
        assert_eq!(p1.status.last_matched, Some(4_000));
        assert_eq!(
            p1.status.last_sample_time.as_deref(),
            Some("2027-01-15T08:00:00.000Z")
        );
        // 4 partitions x 750 more in 3 s: 1000/s.
        obs.progress = progress(4, 1_750);
        obs.now = later(3);
        let p2 = run(&after(&mp, &p1), &obs);
        assert_eq!(p2.status.matches_per_second.as_deref(), Some("1000.0"));
        assert_eq!(p2.status.matched, 7_000);
        // A view missing partitions is not sampled: it would under-count.
        let mut partial = obs.clone();
        partial.progress = progress(2, 2_000);
        partial.now = later(6);
        let p3 = run(&after(&mp, &p2), &partial);
        assert_eq!(p3.status.matches_per_second, p2.status.matches_per_second);
        assert_eq!(p3.status.last_sample_time, p2.status.last_sample_time);
        assert_eq!(p3.status.matched, 7_000);
        // The full view again: the rate over the whole interval, averaged in.
        let mut full = obs.clone();
        full.progress = progress(4, 3_250);
        full.now = later(9);
        let p4 = run(&after(&mp, &p3), &full);
        assert_eq!(p4.status.matches_per_second.as_deref(), Some("1000.0"));
    }

    #[test]
    fn a_status_sample_that_makes_no_sense_starts_afresh() {
        let mp = pipeline("demo");
        let mut obs = observed(4, 0, vec![pod(&mp, 0), pod(&mp, 1)]);
        obs.progress = progress(4, 10);
        let mut broken = mp.clone();
        broken.status = Some(MatchPipelineStatus {
            last_matched: Some(0),
            last_sample_time: Some("yesterday".to_string()),
            matches_per_second: Some("fast".to_string()),
            ..Default::default()
        });
        let p = run(&broken, &obs);
        assert_eq!(p.status.matches_per_second, None);
        assert_eq!(p.status.last_matched, Some(40));
        assert!(p.status.last_sample_time.unwrap().starts_with("2027-"));
    }

    #[test]
    fn dead_letters_are_reported_once_per_increase() {
        let mp = pipeline("demo");
        let mut obs = observed(1, 0, vec![pod(&mp, 0)]);
        let p0 = run(&mp, &obs);
        if let Some(s) = obs.progress.status.as_mut() {
            let lease = s.leases.get_mut("live").unwrap().get_mut(&0).unwrap();
            lease.counters.insert("deadLettered".to_string(), 3);
        }
        let p1 = run(&after(&mp, &p0), &obs);
        let e: Vec<_> = p1.events.iter().map(|e| (e.reason, e.warning)).collect();
        assert_eq!(e, [("RequestsDeadLettered", true)]);
        assert!(
            p1.events[0].note.contains("match-requests.dlq"),
            "{}",
            p1.events[0].note
        );
        assert_eq!(p1.status.dead_lettered, 3);
        // Dead letters are the producers' problem, not the pipeline's.
        assert_eq!(cond(&p1, DEGRADED).status, "False");
        assert!(run(&after(&mp, &p1), &obs).events.is_empty());
    }

    #[test]
    fn a_missing_topic_stops_the_workers_and_says_so() {
        let mp = pipeline("demo");
        let mut obs = observed(2, 0, vec![pod(&mp, 0), pod(&mp, 1)]);
        obs.kafka.topic = TopicState::NotFound;
        let p = run(&mp, &obs);
        assert_eq!(p.delete, ["demo-live-blue-1"]);
        assert_eq!(p.status.live.replicas, 0);
        let r = cond(&p, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "TopicNotFound")
        );
        assert!(r.message.contains("match-requests"), "{}", r.message);
        let d = cond(&p, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "TopicNotFound")
        );
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.events[0].reason, "TopicNotFound");
        let mut gone = obs.clone();
        gone.pods.clear();
        let p2 = run(&after(&mp, &p), &gone);
        assert!(p2.events.is_empty());
        // Once the workers are gone, the topic is waited for at the idle pace.
        assert_eq!(p2.requeue, REQUEUE_IDLE);
    }

    #[test]
    fn an_unreachable_kafka_keeps_the_fleet() {
        let mp = pipeline("demo");
        let obs = observed(2, 0, vec![pod(&mp, 0), pod(&mp, 1)]);
        let p0 = run(&mp, &obs);
        let mut down = obs.clone();
        down.kafka = KafkaObservation::unreachable("timed out");
        let p = run(&after(&mp, &p0), &down);
        assert!(p.create.is_empty() && p.delete.is_empty());
        assert_eq!(p.status.partitions, 2);
        assert_eq!(p.status.live.assignment, p0.status.live.assignment);
        assert_eq!(cond(&p, READY).reason, "KafkaUnreachable");
        assert_eq!(cond(&p, DEGRADED).reason, "KafkaUnreachable");
    }

    #[test]
    fn a_changed_spec_replaces_pods_one_at_a_time() {
        let mp = pipeline("demo");
        let pods = vec![pod(&mp, 0), pod(&mp, 1)];
        let mut changed = mp.clone();
        changed.spec.window.size_millis = 250;
        let p = run(&changed, &observed(2, 0, pods));
        assert_eq!(p.delete, ["demo-live-blue-0"]);
        assert!(p.create.is_empty());
        assert_eq!(cond(&p, PROGRESSING).reason, "Matching");
    }

    #[test]
    fn a_stuck_worker_loses_its_partitions_and_the_move_is_announced() {
        let mp = pipeline("demo");
        let p1 = run(&mp, &observed(4, 0, vec![pod(&mp, 0), pod(&mp, 1)]));
        let mut frozen = pod(&mp, 0);
        frozen.ready = false;
        let p2 = run(&after(&mp, &p1), &observed(4, 0, vec![frozen, pod(&mp, 1)]));
        let live = &p2.assignment.as_ref().unwrap().lanes["live"];
        assert!(live.values().all(|s| s == "demo-live-blue-1"), "{live:?}");
        assert_eq!(
            p2.assigned.as_ref().unwrap().note,
            "assigned 4 partitions to 1 worker (2 moved)"
        );
        assert_eq!(cond(&p2, READY).reason, "WorkersNotReady");
    }

    #[test]
    fn paused_changes_nothing_but_the_status() {
        let mut mp = pipeline("demo");
        mp.metadata.annotations = Some([(names::PAUSED.to_string(), "true".to_string())].into());
        let p = run(&mp, &observed(4, 7, vec![pod(&mp, 0)]));
        assert!(p.progress.is_none() && p.workers_service.is_none());
        assert!(p.create.is_empty() && p.delete.is_empty() && p.assignment.is_none());
        assert_eq!(cond(&p, PROGRESSING).reason, "Paused");
        assert_eq!(p.status.lag, 7);
        assert_eq!(
            p.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["Paused"]
        );
        assert_eq!(p.requeue, REQUEUE_IDLE);
    }

    #[test]
    fn pods_of_another_lane_go() {
        let mp = pipeline("demo");
        let mut stray = pod(&mp, 0);
        stray.name = "demo-backlog-blue-0".to_string();
        stray.lane = "backlog".to_string();
        let p = run(&mp, &observed(2, 0, vec![pod(&mp, 0), pod(&mp, 1), stray]));
        assert_eq!(p.delete, ["demo-backlog-blue-0"]);
        assert_eq!(p.status.workers, "2/2");
    }

    #[test]
    fn a_progress_service_of_another_fleet_is_left_alone() {
        let mp = pipeline("demo");
        let mut obs = observed(2, 0, vec![]);
        obs.progress.foreign_controller = Some("RenderJob demo".to_string());
        let p = run(&mp, &obs);
        assert!(p.progress.is_none() && p.workers_service.is_none());
        assert!(p.create.is_empty() && p.assignment.is_none());
        let r = cond(&p, READY);
        assert_eq!(r.reason, "NameConflict");
        assert!(r.message.contains("RenderJob demo"), "{}", r.message);
        assert_eq!(cond(&p, DEGRADED).status, "True");
        assert_eq!(p.events[0].reason, "NameConflict");
        assert_eq!(p.requeue, REQUEUE_INVALID);
    }

    #[test]
    fn invalid_keeps_the_last_counters() {
        let mut mp = pipeline("demo");
        mp.status = Some(MatchPipelineStatus {
            matched: 9,
            ..Default::default()
        });
        let p = invalid(&mp, "InvalidSpec", "resultsTopic must differ", now());
        assert_eq!(p.status.matched, 9);
        assert_eq!(p.status.active, "blue");
        assert_eq!(cond(&p, READY).reason, "InvalidSpec");
        assert_eq!(p.events.len(), 1);
        assert!(invalid(&after(&mp, &p), "InvalidSpec", "x", now())
            .events
            .is_empty());
    }
}
