//! Plan: a pure function from a RenderJob and what was observed to what to
//! do (objects to apply, pods to create and delete, the assignment to send)
//! and the status to write. No I/O here, so every rule is unit-tested. The
//! rules every fleet shares (replicas, pod actions, assignment, conditions)
//! are in [`crate::fleet`]; the backlog lane is in [`crate::backlog`].

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use matchfleet_api::fleet::condition::{DEGRADED, PROGRESSING};
use matchfleet_api::fleet::{workers_column, LaneStatus};
use matchfleet_api::progress::Assignment;
use matchfleet_api::{RenderJob, RenderJobStatus};

use crate::assign;
use crate::backlog::{self, LanePlan};
use crate::conditions::{self, Want};
use crate::duration::format_millis;
use crate::fleet::{pod_actions, to_i64, Health, PodActions};
use crate::names::{self, LANE_BACKLOG, LANE_LIVE};
use crate::observe::{Observed, WorkerPod};
use crate::resources::{self, Owner, ProgressConfig};

pub use crate::fleet::{
    assignment_failed, desired_replicas, worker_refused, PlannedEvent, REQUEUE_BUSY, REQUEUE_IDLE,
    REQUEUE_INVALID,
};

/// Offsets to commit under a lane's consumer group before any worker pod is
/// created (the backlog's start: DESIGN.md §5.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub lane: &'static str,
    pub group: String,
    /// Partition -> the next offset the lane reads.
    pub offsets: BTreeMap<i32, i64>,
}

/// What one reconcile does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The progress service to server-side apply (`None` when paused or invalid).
    pub progress: Option<(Deployment, Service)>,
    /// Commits to make first; if they fail, no pod is created.
    pub seeds: Vec<Seed>,
    pub create: Vec<Pod>,
    /// Pod names to delete.
    pub delete: Vec<String>,
    /// What to `PUT /assignment` (`None` when paused or unknown).
    pub assignment: Option<Assignment>,
    pub status: RenderJobStatus,
    pub events: Vec<PlannedEvent>,
    pub requeue: Duration,
}

/// The plan for a RenderJob that can be served.
pub fn plan(job: &RenderJob, owner: &Owner, obs: &Observed) -> Plan {
    let spec = &job.spec;
    let name = owner.name.as_str();
    let prev = job.status.clone().unwrap_or_default();
    let paused = names::is_paused(job.annotations());
    let generation = job.metadata.generation;
    let now = conditions::rfc3339(obs.now);

    let (partitions, mut lag) = crate::fleet::partitions_and_lag(
        &obs.kafka.topic,
        obs.kafka.lag,
        prev.partitions,
        prev.lag,
    );
    let desired = partitions.map(|p| desired_replicas(&spec.workers, p));
    let replicas = desired.unwrap_or(prev.live.replicas);
    let hash = resources::worker_template_hash(owner, spec);
    let (backlog_pods, live_pods): (Vec<WorkerPod>, Vec<WorkerPod>) = obs
        .pods
        .iter()
        .cloned()
        .partition(|p| p.lane == LANE_BACKLOG);

    // The backlog lane: planned first, because until its range is captured
    // and the groups are seeded no worker of either lane may start.
    let lane = if paused {
        LanePlan {
            status: prev.backlog.clone(),
            ..LanePlan::default()
        }
    } else {
        backlog::plan_lane(&backlog::Inputs {
            spec: spec.backlog.as_ref(),
            prev: prev.backlog.as_ref(),
            now: obs.now,
            kafka: &obs.kafka,
            pods: &backlog_pods,
            progress: obs.progress.status.as_ref(),
        })
    };
    // The reconcile that seeds the live group: its lag as it will be.
    if let (Some(seeds), Some(offsets)) = (&lane.seeds, &obs.kafka.offsets) {
        let mut seeded = offsets.clone();
        seeded
            .live_committed
            .extend(seeds.live.iter().map(|(p, o)| (*p, *o)));
        lag = crate::kafka::total_lag(&seeded);
    }
    let backlog_end = lane
        .status
        .as_ref()
        .map(|b| b.end.clone())
        .unwrap_or_default();
    let backlog_lane = resources::Lane::Backlog { end: &backlog_end };
    let backlog_hash = resources::lane_template_hash(owner, spec, backlog_lane);
    let backlog_actions = if paused {
        PodActions::default()
    } else {
        pod_actions(
            name,
            LANE_BACKLOG,
            &backlog_pods,
            lane.replicas,
            &backlog_hash,
            true,
        )
    };

    let mut actions = match desired {
        Some(d) if !paused => pod_actions(name, LANE_LIVE, &live_pods, d, &hash, false),
        _ => PodActions::default(),
    };
    if lane.hold {
        actions.create.clear();
        actions.rolling = !actions.delete.is_empty();
    }
    let ready_replicas = crate::fleet::ready_replicas(&live_pods, replicas);

    let slots = crate::fleet::live_slots(
        paused,
        partitions,
        desired,
        &live_pods,
        &prev.live.assignment,
    );
    let slot_names = |l: &str, a: &assign::SlotAssignment| crate::fleet::slot_names(name, l, a);
    let assignment = slots.as_ref().map(|a| {
        let mut lanes = BTreeMap::from([(LANE_LIVE.to_string(), slot_names(LANE_LIVE, a))]);
        if !lane.assignment.is_empty() {
            lanes.insert(
                LANE_BACKLOG.to_string(),
                slot_names(LANE_BACKLOG, &lane.assignment),
            );
        }
        Assignment {
            lanes,
            drain_millis: resources::drain_millis(spec),
        }
    });

    // Counters: the last known values while the progress service does not
    // answer, and the totals never go backwards.
    let ps = obs.progress.status.as_ref();
    let total = |prev: i64, new: Option<u64>| new.map_or(prev, |n| prev.max(to_i64(n)));
    let done = total(prev.done, ps.map(|s| s.done));
    let failed = total(prev.failed, ps.map(|s| s.failed));
    let duplicates_prevented = total(
        prev.duplicates_prevented,
        ps.map(|s| s.duplicates_prevented),
    );
    let slo_breaches = total(prev.slo_breaches, ps.map(|s| s.slo_breaches));
    let in_flight = ps.map_or(prev.in_flight, |s| to_i64(s.in_flight));
    let p50 = ps
        .and_then(|s| s.latency_p50_millis)
        .map(format_millis)
        .or(prev.p50.clone());
    let p99 = ps
        .and_then(|s| s.latency_p99_millis)
        .map(format_millis)
        .or(prev.p99.clone());

    // Conditions.
    let health = Health::of(owner.fleet, name, &spec.source, obs);
    let ready = health.ready(ready_replicas, replicas);

    let progressing = if paused {
        crate::fleet::paused_want()
    } else if lag > 0 || actions.rolling || lane.running {
        let mut what = Vec::new();
        if let Some(m) = &lane.message {
            what.push(m.clone());
        }
        if lag > 0 {
            what.push(format!("lag {lag} messages"));
        }
        if !actions.create.is_empty() {
            what.push(format!("creating {} worker pods", actions.create.len()));
        }
        if actions.rolling && actions.create.is_empty() {
            what.push("replacing or removing worker pods".to_string());
        }
        Want::new(PROGRESSING, true, "Rendering", what.join("; "))
    } else {
        Want::new(
            PROGRESSING,
            false,
            "CaughtUp",
            format!("no lag; {replicas} workers up to date"),
        )
    };

    let degraded = if let Some(common) = health.degraded(&obs.pods) {
        common
    } else if let Some(problem) = &lane.problem {
        Want::new(DEGRADED, true, "InvalidBacklog", problem.clone())
    } else if failed > 0 {
        Want::new(
            DEGRADED,
            true,
            "TasksFailed",
            format!(
                "{failed} tasks failed after maxAttempts ({}); see events",
                spec.render.max_attempts
            ),
        )
    } else {
        Want::new(
            DEGRADED,
            false,
            "AsExpected",
            "no failed tasks; workers running",
        )
    };

    // Events about what changed since the last status.
    let mut events: Vec<PlannedEvent> = health.topic_event(&prev.conditions).into_iter().collect();
    if failed > prev.failed {
        events.push(PlannedEvent::warning(
            "TasksFailed",
            format!(
                "{failed} tasks failed after maxAttempts ({} new)",
                failed - prev.failed
            ),
        ));
    }
    events.extend(crate::fleet::pause_event(paused, &prev.conditions));

    events.extend(lane.events.iter().cloned());

    let requeue = health.requeue(paused, &progressing, &ready);
    let conds = [ready, progressing, degraded]
        .into_iter()
        .map(|w| conditions::build(&prev.conditions, w, generation, &now))
        .collect();

    let status = RenderJobStatus {
        observed_generation: generation,
        conditions: conds,
        workers: workers_column(ready_replicas, replicas),
        partitions: partitions.unwrap_or(prev.partitions),
        lag,
        done,
        failed,
        in_flight,
        duplicates_prevented,
        p50,
        p99,
        slo_breaches,
        live: LaneStatus {
            ready_replicas,
            replicas,
            partitions: partitions.unwrap_or(prev.partitions),
            lag,
            assignment: slots
                .as_ref()
                .map(assign::to_status)
                .unwrap_or(prev.live.assignment.clone()),
        },
        backlog: lane.status.clone(),
    };
    let seeds = match &lane.seeds {
        Some(s) => {
            let group = |l: &str| names::consumer_group(&owner.namespace, name, l);
            [(LANE_LIVE, &s.live), (LANE_BACKLOG, &s.backlog)]
                .into_iter()
                .filter(|(_, offsets)| !offsets.is_empty())
                .map(|(l, offsets)| Seed {
                    lane: l,
                    group: group(l),
                    offsets: offsets.clone(),
                })
                .collect()
        }
        None => Vec::new(),
    };

    Plan {
        progress: (!paused).then(|| {
            (
                resources::progress_deployment(owner, &ProgressConfig::render(spec)),
                resources::progress_service(owner),
            )
        }),
        seeds,
        create: actions
            .create
            .iter()
            .map(|&i| resources::worker_pod(owner, spec, i, &hash))
            .chain(
                backlog_actions
                    .create
                    .iter()
                    .map(|&i| resources::lane_pod(owner, spec, backlog_lane, i, &backlog_hash)),
            )
            .collect(),
        delete: actions
            .delete
            .into_iter()
            .chain(backlog_actions.delete)
            .collect(),
        assignment,
        status,
        events,
        requeue,
    }
}

/// The plan for a RenderJob that cannot be served (its name): only a status
/// that says why, and a Warning the first time.
pub fn invalid(job: &RenderJob, message: &str, now: k8s_openapi::jiff::Timestamp) -> Plan {
    let prev = job.status.clone().unwrap_or_default();
    let generation = job.metadata.generation;
    let (conds, event) =
        crate::fleet::invalid_conditions(&prev.conditions, "InvalidName", message, generation, now);
    let events = event.into_iter().collect();
    Plan {
        progress: None,
        seeds: Vec::new(),
        create: Vec::new(),
        delete: Vec::new(),
        assignment: None,
        status: RenderJobStatus {
            observed_generation: generation,
            conditions: conds,
            ..prev
        },
        events,
        requeue: REQUEUE_INVALID,
    }
}

/// The seeding commits failed: nothing that depends on them happens (no pod
/// is created, the backlog is not recorded as started, its lane is not
/// assigned), Degraded says why, and the next reconcile captures and seeds
/// again (both are idempotent: partitions seeded already keep their offsets).
pub fn seeding_failed(
    plan: &mut Plan,
    previous: Option<&RenderJobStatus>,
    group: &str,
    error: &str,
    now: k8s_openapi::jiff::Timestamp,
) {
    plan.create.clear();
    plan.status.backlog = previous.and_then(|p| p.backlog.clone());
    plan.events.retain(|e| !e.reason.starts_with("Backlog"));
    if let Some(a) = plan.assignment.as_mut() {
        a.lanes.remove(LANE_BACKLOG);
    }
    plan.requeue = plan.requeue.min(REQUEUE_BUSY);
    let want = Want::new(
        DEGRADED,
        true,
        "BacklogNotStarted",
        format!(
            "cannot commit the starting offsets of consumer group {group}: {error}; no worker starts until they are committed, retrying"
        ),
    );
    let previous = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    crate::fleet::set_condition(&mut plan.status, previous, want, now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{KafkaObservation, TopicState};
    use crate::observe::ProgressObservation;
    use crate::resources::tests::job;
    use k8s_openapi::jiff::Timestamp;
    use matchfleet_api::fleet::condition::READY;
    use matchfleet_api::fleet::{Condition, WorkerSpec};
    use matchfleet_api::progress::ProgressStatus;
    use std::collections::BTreeSet;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn hash(j: &RenderJob) -> String {
        resources::worker_template_hash(&Owner::of(j).unwrap(), &j.spec)
    }

    fn pod(j: &RenderJob, slot: i32) -> WorkerPod {
        WorkerPod {
            name: names::worker_pod_name("demo", "live", "blue", slot),
            slot: Some(slot),
            template_hash: Some(hash(j)),
            ready: true,
            ..Default::default()
        }
    }

    fn progress_ok(done: u64, failed: u64) -> ProgressObservation {
        ProgressObservation {
            deployment_exists: true,
            ready_replicas: 1,
            status: Some(ProgressStatus {
                done,
                failed,
                in_flight: 2,
                duplicates_prevented: 1,
                slo_breaches: 0,
                latency_p50_millis: Some(850),
                latency_p99_millis: Some(2_300),
                ..Default::default()
            }),
            error: None,
            foreign_controller: None,
        }
    }

    fn observed(partitions: i32, lag: i64, pods: Vec<WorkerPod>) -> Observed {
        Observed {
            now: now(),
            pods,
            progress: progress_ok(10, 0),
            kafka: KafkaObservation {
                topic: TopicState::Found { partitions },
                lag: Some(lag),
                offsets: None,
                backlog: None,
            },
        }
    }

    fn run(j: &RenderJob, obs: &Observed) -> Plan {
        plan(j, &Owner::of(j).unwrap(), obs)
    }

    fn cond<'a>(p: &'a Plan, t: &str) -> &'a Condition {
        conditions::find(&p.status.conditions, t).unwrap()
    }

    fn names_of(pods: &[Pod]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    /// The job after the plan's status was written.
    fn after(j: &RenderJob, p: &Plan) -> RenderJob {
        let mut j = j.clone();
        j.status = Some(p.status.clone());
        j
    }

    #[test]
    fn replicas_follow_partitions_within_bounds() {
        let w = |min, max| WorkerSpec {
            min_replicas: min,
            max_replicas: max,
            ..Default::default()
        };
        assert_eq!(desired_replicas(&w(1, 4), 8), 4);
        assert_eq!(desired_replicas(&w(1, 4), 2), 2);
        assert_eq!(desired_replicas(&w(3, 4), 2), 2); // never above partitions
        assert_eq!(desired_replicas(&w(0, 4), 0), 0);
        assert_eq!(desired_replicas(&w(2, 4), 0), 0);
        assert_eq!(desired_replicas(&w(0, 8), 3), 3);
    }

    #[test]
    fn creates_missing_pods_and_the_progress_service() {
        let mut j = job("demo");
        j.spec.workers.max_replicas = 4;
        let mut obs = observed(8, 100, vec![pod(&j, 1)]);
        obs.progress = ProgressObservation::default();
        let p = run(&j, &obs);
        assert_eq!(
            names_of(&p.create),
            ["demo-live-blue-0", "demo-live-blue-2", "demo-live-blue-3"]
        );
        assert!(p.delete.is_empty());
        let (d, s) = p.progress.as_ref().unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("demo-progress"));
        assert_eq!(s.metadata.name.as_deref(), Some("demo-progress"));
        // Assignment: 8 partitions, by pod name, over the one Ready worker
        // (the others get theirs once they are Ready).
        let a = p.assignment.as_ref().unwrap();
        assert_eq!(a.drain_millis, 60_000);
        let live = &a.lanes["live"];
        assert_eq!(live.len(), 8);
        assert!(
            live.values().all(|slot| slot == "demo-live-blue-1"),
            "{live:?}"
        );
        assert_eq!(p.status.live.assignment.len(), 8);
        assert_eq!(p.status.live.replicas, 4);
        assert_eq!(p.status.workers, "1/4");
        assert_eq!(p.status.partitions, 8);
        assert_eq!(p.status.lag, 100);
        assert_eq!(p.status.observed_generation, Some(1));
        assert_eq!(cond(&p, READY).reason, "ProgressServiceNotReady");
        assert_eq!(cond(&p, PROGRESSING).reason, "Rendering");
        assert_eq!(cond(&p, PROGRESSING).status, "True");
        assert_eq!(p.requeue, REQUEUE_BUSY);
    }

    #[test]
    fn all_ready_and_caught_up() {
        let j = job("demo");
        let obs = observed(2, 0, vec![pod(&j, 0), pod(&j, 1)]);
        let p = run(&j, &obs);
        assert!(p.create.is_empty() && p.delete.is_empty());
        let r = cond(&p, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("True", "AllWorkersReady")
        );
        let g = cond(&p, PROGRESSING);
        assert_eq!(
            (g.status.as_str(), g.reason.as_str()),
            ("False", "CaughtUp")
        );
        let d = cond(&p, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("False", "AsExpected")
        );
        assert_eq!(p.status.workers, "2/2");
        assert_eq!(p.status.done, 10);
        assert_eq!(p.status.in_flight, 2);
        assert_eq!(p.status.p50.as_deref(), Some("850ms"));
        assert_eq!(p.status.p99.as_deref(), Some("2.3s"));
        assert_eq!(p.requeue, REQUEUE_IDLE);
        assert!(p.events.is_empty());
    }

    #[test]
    fn unchanged_world_gives_an_identical_status() {
        let j = job("demo");
        let obs = observed(2, 5, vec![pod(&j, 0), pod(&j, 1)]);
        let p1 = run(&j, &obs);
        let j1 = after(&j, &p1);
        let mut later = obs.clone();
        later.now = Timestamp::from_second(now().as_second() + 60).unwrap();
        let p2 = run(&j1, &later);
        // Same conditions, same lastTransitionTime: nothing to patch.
        assert_eq!(p2.status, p1.status);
        // A flip moves only that condition's time.
        later.kafka.lag = Some(0);
        let p3 = run(&j1, &later);
        assert_eq!(
            cond(&p3, PROGRESSING).last_transition_time,
            "2027-01-15T08:01:00Z"
        );
        assert_eq!(
            cond(&p3, READY).last_transition_time,
            "2027-01-15T08:00:00Z"
        );
    }

    #[test]
    fn deletes_extra_pods_one_at_a_time_highest_first() {
        let mut j = job("demo");
        j.spec.workers.max_replicas = 2;
        let mut stray = pod(&j, 0);
        stray.name = "demo-live-blue-007".to_string();
        stray.slot = None;
        let pods = vec![pod(&j, 0), pod(&j, 1), pod(&j, 2), pod(&j, 3)];
        let p = run(&j, &observed(4, 0, pods.clone()));
        assert_eq!(p.delete, ["demo-live-blue-3"]);
        assert!(p.create.is_empty());
        assert_eq!(p.status.live.replicas, 2);
        // The assignment already leaves the extra slots out.
        let slots: BTreeSet<i32> = p.status.live.assignment.values().copied().collect();
        assert_eq!(slots, BTreeSet::from([0, 1]));
        assert_eq!(cond(&p, PROGRESSING).reason, "Rendering");
        // Next reconcile: slot 3 terminating, slot 2 goes; unknown names first.
        let mut pods2 = pods.clone();
        pods2[3].terminating = true;
        pods2.push(stray);
        let p = run(&j, &observed(4, 0, pods2.clone()));
        assert_eq!(p.delete, ["demo-live-blue-007"]);
        pods2.pop();
        let p = run(&j, &observed(4, 0, pods2));
        assert_eq!(p.delete, ["demo-live-blue-2"]);
    }

    #[test]
    fn replaces_outdated_pods_one_at_a_time() {
        let j = job("demo");
        let old = |slot| {
            let mut p = pod(&j, slot);
            p.template_hash = Some("old".to_string());
            p
        };
        let pods = vec![old(0), old(1), old(2)];
        let p = run(&j, &observed(3, 0, pods.clone()));
        assert_eq!(p.delete, ["demo-live-blue-0"]);
        assert!(p.create.is_empty());
        // While slot 0 is terminating, nothing else is deleted.
        let mut pods = pods;
        pods[0].terminating = true;
        let p = run(&j, &observed(3, 0, pods.clone()));
        assert!(p.delete.is_empty());
        assert!(p.create.is_empty(), "slot 0's name is still taken");
        // Slot 0 gone: recreated, and still nothing else deleted until it is ready.
        pods.remove(0);
        let p = run(&j, &observed(3, 0, pods.clone()));
        assert_eq!(names_of(&p.create), ["demo-live-blue-0"]);
        assert!(p.delete.is_empty());
        let mut fresh = pod(&j, 0);
        fresh.ready = false;
        pods.insert(0, fresh);
        let p = run(&j, &observed(3, 0, pods.clone()));
        assert!(p.delete.is_empty());
        // Ready: the next one goes.
        pods[0].ready = true;
        let p = run(&j, &observed(3, 0, pods.clone()));
        assert_eq!(p.delete, ["demo-live-blue-1"]);
        // An outdated pod that is not ready anyway goes at once.
        pods[2].ready = false;
        pods[1].terminating = true;
        let p = run(&j, &observed(3, 0, pods));
        assert_eq!(p.delete, ["demo-live-blue-2"]);
    }

    #[test]
    fn finished_pods_are_replaced() {
        let j = job("demo");
        let mut dead = pod(&j, 0);
        dead.finished = true;
        dead.ready = false;
        let p = run(&j, &observed(2, 0, vec![dead, pod(&j, 1)]));
        assert_eq!(p.delete, ["demo-live-blue-0"]);
    }

    #[test]
    fn missing_topic_means_no_pods_and_says_so() {
        let j = job("demo");
        let mut obs = observed(2, 0, vec![pod(&j, 0), pod(&j, 1)]);
        obs.kafka = KafkaObservation {
            topic: TopicState::NotFound,
            lag: Some(0),
            offsets: None,
            backlog: None,
        };
        let p = run(&j, &obs);
        assert!(p.create.is_empty());
        assert_eq!(p.delete, ["demo-live-blue-1"]);
        assert_eq!(p.assignment.as_ref().unwrap().lanes["live"].len(), 0);
        assert!(p.status.live.assignment.is_empty());
        assert_eq!(p.status.live.replicas, 0);
        assert_eq!(p.status.partitions, 0);
        let r = cond(&p, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "TopicNotFound")
        );
        assert!(r.message.contains("render-events") && r.message.contains("127.0.0.1:9092"));
        let d = cond(&p, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "TopicNotFound")
        );
        assert_eq!(p.events.len(), 1);
        assert_eq!(
            (p.events[0].reason, p.events[0].warning),
            ("TopicNotFound", true)
        );
        // The Warning is sent once, not on every reconcile.
        let p2 = run(&after(&j, &p), &obs);
        assert!(p2.events.is_empty());
        // Brand new job with no topic: no pods at all.
        let mut empty = obs.clone();
        empty.pods.clear();
        let p3 = run(&j, &empty);
        assert!(p3.create.is_empty() && p3.delete.is_empty());
        assert_eq!(p3.status.workers, "0/0");
        // Waiting for someone to create the topic: the idle pace.
        assert_eq!(p3.requeue, REQUEUE_IDLE);
    }

    #[test]
    fn kafka_unreachable_holds_the_fleet() {
        let j = job("demo");
        let p1 = run(&j, &observed(2, 7, vec![pod(&j, 0), pod(&j, 1)]));
        let j1 = after(&j, &p1);
        let mut obs = observed(2, 0, vec![pod(&j, 0), pod(&j, 1)]);
        obs.kafka = KafkaObservation::unreachable("BrokerTransportFailure");
        let p = run(&j1, &obs);
        assert!(p.create.is_empty() && p.delete.is_empty());
        assert_eq!(p.status.partitions, 2);
        assert_eq!(p.status.lag, 7);
        assert_eq!(p.assignment.as_ref().unwrap().lanes["live"].len(), 2);
        assert_eq!(cond(&p, READY).reason, "KafkaUnreachable");
        assert_eq!(cond(&p, DEGRADED).reason, "KafkaUnreachable");
        assert!(cond(&p, DEGRADED).message.contains("127.0.0.1:9092"));
        // Never seen the topic: nothing created, no assignment.
        let p = run(&j, &obs);
        assert!(p.create.is_empty() && p.assignment.is_none());
    }

    #[test]
    fn paused_changes_nothing_but_status() {
        let mut j = job("demo");
        j.metadata.annotations = Some(BTreeMap::from([(
            names::PAUSED.to_string(),
            "true".to_string(),
        )]));
        let p = run(&j, &observed(4, 10, vec![pod(&j, 3)]));
        assert!(p.progress.is_none());
        assert!(p.create.is_empty() && p.delete.is_empty());
        assert!(p.assignment.is_none());
        let g = cond(&p, PROGRESSING);
        assert_eq!((g.status.as_str(), g.reason.as_str()), ("False", "Paused"));
        assert_eq!(
            p.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["Paused"]
        );
        assert_eq!(p.status.lag, 10);
        // Once paused, no more Paused events; unpausing says Resumed.
        let j1 = after(&j, &p);
        assert!(run(&j1, &observed(4, 10, vec![])).events.is_empty());
        let mut resumed = j1.clone();
        resumed.metadata.annotations = None;
        let p = run(&resumed, &observed(4, 10, vec![]));
        assert_eq!(
            p.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["Resumed"]
        );
        assert_eq!(p.create.len(), 4);
    }

    #[test]
    fn counters_never_go_back() {
        let j = job("demo");
        let p1 = run(&j, &observed(2, 0, vec![pod(&j, 0), pod(&j, 1)]));
        let j1 = after(&j, &p1);
        // Unreachable progress service: last known values stay.
        let mut obs = observed(2, 0, vec![pod(&j, 0), pod(&j, 1)]);
        obs.progress = ProgressObservation {
            deployment_exists: true,
            ready_replicas: 0,
            status: None,
            error: Some("connection refused".to_string()),
            foreign_controller: None,
        };
        let p = run(&j1, &obs);
        assert_eq!(p.status.done, 10);
        assert_eq!(p.status.in_flight, 2);
        assert_eq!(p.status.duplicates_prevented, 1);
        assert_eq!(p.status.p99.as_deref(), Some("2.3s"));
        let r = cond(&p, READY);
        assert_eq!(r.reason, "ProgressServiceNotReady");
        assert!(r.message.contains("no ready pod"), "{}", r.message);
        // A service that answers with smaller totals does not lower them.
        obs.progress = progress_ok(3, 0);
        assert_eq!(run(&j1, &obs).status.done, 10);
    }

    #[test]
    fn failed_tasks_degrade_and_warn_when_they_rise() {
        let j = job("demo");
        let mut obs = observed(2, 0, vec![pod(&j, 0), pod(&j, 1)]);
        obs.progress = progress_ok(10, 2);
        let p = run(&j, &obs);
        let d = cond(&p, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "TasksFailed")
        );
        assert!(d.message.starts_with("2 tasks failed after maxAttempts"));
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.events[0].reason, "TasksFailed");
        assert!(p.events[0].note.contains('2'));
        let j1 = after(&j, &p);
        assert!(run(&j1, &obs).events.is_empty());
        obs.progress = progress_ok(10, 5);
        let p = run(&j1, &obs);
        assert!(p.events[0].note.starts_with("5 tasks failed"));
    }

    #[test]
    fn restarting_workers_degrade() {
        let j = job("demo");
        let mut crashing = pod(&j, 1);
        crashing.restarting =
            Some("pod demo-live-blue-1 container worker is waiting with CrashLoopBackOff".into());
        crashing.ready = false;
        let p = run(&j, &observed(2, 0, vec![pod(&j, 0), crashing]));
        let d = cond(&p, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "WorkerRestarting")
        );
        assert!(d.message.contains("CrashLoopBackOff"));
        let r = cond(&p, READY);
        assert_eq!(r.reason, "WorkersNotReady");
        assert_eq!(
            r.message,
            "1/2 workers ready; see kubectl get pods -l matchfleet.io/renderjob=demo"
        );
    }

    #[test]
    fn scaling_keeps_the_previous_assignment() {
        let mut j = job("demo");
        j.spec.workers.max_replicas = 2;
        let p1 = run(&j, &observed(6, 0, vec![pod(&j, 0), pod(&j, 1)]));
        let mut j1 = after(&j, &p1);
        j1.spec.workers.max_replicas = 3;
        let p2 = run(&j1, &observed(6, 0, vec![pod(&j, 0), pod(&j, 1)]));
        let before = assign::from_status(&p1.status.live.assignment);
        let now = assign::from_status(&p2.status.live.assignment);
        assert_eq!(names_of(&p2.create), ["demo-live-blue-2"]);
        assert_eq!(
            assign::moves(&before, &now),
            0,
            "the new slot is not Ready yet"
        );
        // Once it is Ready it takes a fair share, moving only what it needs.
        let j2 = after(&j1, &p2);
        let p3 = run(
            &j2,
            &observed(6, 0, vec![pod(&j, 0), pod(&j, 1), pod(&j, 2)]),
        );
        let then = assign::from_status(&p3.status.live.assignment);
        assert_eq!(assign::moves(&now, &then), 2);
    }

    #[test]
    fn a_stuck_worker_loses_its_partitions_to_ready_ones() {
        let j = job("demo");
        let p1 = run(&j, &observed(6, 0, vec![pod(&j, 0), pod(&j, 1)]));
        let j1 = after(&j, &p1);
        let mut frozen = pod(&j, 0);
        frozen.ready = false;
        let p2 = run(&j1, &observed(6, 0, vec![frozen, pod(&j, 1)]));
        let live = &p2.assignment.as_ref().unwrap().lanes["live"];
        assert!(
            live.values().all(|slot| slot == "demo-live-blue-1"),
            "{live:?}"
        );
    }

    #[test]
    fn invalid_names_only_get_a_status() {
        let mut j = job("demo");
        j.metadata.name = Some("a.b".to_string());
        let p = invalid(&j, "bad name", now());
        assert!(p.progress.is_none() && p.create.is_empty() && p.assignment.is_none());
        assert_eq!(cond(&p, READY).reason, "InvalidName");
        assert_eq!(cond(&p, DEGRADED).status, "True");
        assert_eq!(p.events.len(), 1);
        assert!(invalid(&after(&j, &p), "bad name", now()).events.is_empty());
    }

    #[test]
    fn refused_pods_degrade() {
        let j = job("demo");
        let mut p = run(&j, &observed(2, 0, vec![pod(&j, 0)]));
        worker_refused(&mut p.status, &[], "demo-live-blue-1", "Invalid env", now());
        let d = cond(&p, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "WorkerCreateFailed")
        );
        assert!(d.message.contains("demo-live-blue-1") && d.message.contains("Invalid env"));
    }

    #[test]
    fn failed_assignment_turns_ready_false() {
        let j = job("demo");
        let mut p = run(&j, &observed(2, 0, vec![pod(&j, 0), pod(&j, 1)]));
        assignment_failed(&mut p.status, &[], "demo", "HTTP 503", now());
        let r = cond(&p, READY);
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", "ProgressServiceNotReady")
        );
        assert!(r.message.contains("HTTP 503"));
        // A Ready that was False already keeps its more actionable reason.
        let mut p = run(&j, &observed(2, 0, vec![pod(&j, 0)]));
        assignment_failed(&mut p.status, &[], "demo", "HTTP 503", now());
        assert_eq!(cond(&p, READY).reason, "WorkersNotReady");
    }

    // The backlog lane.

    use crate::kafka::{BacklogOffsets, TopicOffsets};
    use matchfleet_api::progress::LeaseView;
    use matchfleet_api::render_job::BacklogSpec;

    fn with_backlog(j: &RenderJob) -> RenderJob {
        let mut j = j.clone();
        j.spec.backlog = Some(BacklogSpec {
            from_timestamp: None,
            from_offset: Some(0),
            finish_by: "2027-01-15T08:01:30Z".to_string(),
            max_replicas: 6,
        });
        j
    }

    /// 4 partitions of 100 messages; the backlog group committed `committed`.
    fn with_offsets(mut obs: Observed, committed: &[(i32, i64)]) -> Observed {
        obs.kafka.offsets = Some(TopicOffsets {
            watermarks: (0..4).map(|p| (p, (0, 100))).collect(),
            live_committed: BTreeMap::new(),
        });
        obs.kafka.backlog = Some(BacklogOffsets {
            committed: committed.iter().copied().collect(),
            from_time: None,
        });
        obs
    }

    fn backlog_pod(j: &RenderJob, end: &BTreeMap<String, i64>, slot: i32) -> WorkerPod {
        let o = Owner::of(j).unwrap();
        WorkerPod {
            name: names::worker_pod_name("demo", "backlog", "blue", slot),
            lane: "backlog".to_string(),
            slot: Some(slot),
            template_hash: Some(resources::lane_template_hash(
                &o,
                &j.spec,
                resources::Lane::Backlog { end },
            )),
            ready: true,
            ..Default::default()
        }
    }

    fn env_of(pod: &Pod, name: &str) -> Option<String> {
        pod.spec.as_ref()?.containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    fn reasons(p: &Plan) -> Vec<&'static str> {
        p.events.iter().map(|e| e.reason).collect()
    }

    #[test]
    fn no_worker_starts_before_the_backlog_range_is_captured() {
        let mut j = with_backlog(&job("demo"));
        j.spec.workers.max_replicas = 1;
        // Kafka answered for the topic but not for the offsets.
        let p = run(&j, &observed(4, 0, vec![]));
        assert!(p.create.is_empty(), "{:?}", names_of(&p.create));
        assert!(p.seeds.is_empty());
        assert!(p.status.backlog.is_none());
        let g = cond(&p, PROGRESSING);
        assert_eq!(g.status, "True");
        assert!(
            g.message.contains("capture the backlog range"),
            "{}",
            g.message
        );
        assert_eq!(p.requeue, REQUEUE_BUSY);
        // The progress service is set up meanwhile.
        assert!(p.progress.is_some());
    }

    #[test]
    fn a_backlog_starts_with_seeds_and_its_own_pods() {
        let mut j = with_backlog(&job("demo"));
        j.spec.workers.max_replicas = 1;
        let p = run(&j, &with_offsets(observed(4, 0, vec![]), &[]));
        // Seeds: the live group at the end of the range, the backlog group at its start.
        assert_eq!(
            p.seeds,
            [
                Seed {
                    lane: "live",
                    group: "matchfleet.ns.demo.live".to_string(),
                    offsets: (0..4).map(|p| (p, 100)).collect(),
                },
                Seed {
                    lane: "backlog",
                    group: "matchfleet.ns.demo.backlog".to_string(),
                    offsets: (0..4).map(|p| (p, 0)).collect(),
                },
            ]
        );
        // One live worker, one backlog worker to start with.
        assert_eq!(
            names_of(&p.create),
            ["demo-live-blue-0", "demo-backlog-blue-0"]
        );
        let b = &p.create[1];
        assert_eq!(env_of(b, "LANE").as_deref(), Some("backlog"));
        assert_eq!(
            env_of(b, "CONSUMER_GROUP").as_deref(),
            Some("matchfleet.ns.demo.backlog")
        );
        assert_eq!(
            env_of(b, "END_OFFSETS").as_deref(),
            Some(r#"{"0":100,"1":100,"2":100,"3":100}"#)
        );
        let labels = b.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["matchfleet.io/lane"], "backlog");
        assert_eq!(env_of(&p.create[0], "END_OFFSETS"), None);
        // The assignment has both lanes.
        let a = p.assignment.as_ref().unwrap();
        assert_eq!(a.lanes["live"].len(), 4);
        assert_eq!(a.lanes["backlog"].len(), 4);
        assert!(a.lanes["backlog"]
            .values()
            .all(|s| s == "demo-backlog-blue-0"));
        let st = p.status.backlog.as_ref().unwrap();
        assert_eq!((st.total, st.done, st.replicas), (400, 0, 1));
        assert_eq!(reasons(&p), ["BacklogStarted"]);
        // The live lane's lag as seeded: nothing, the range is the backlog's.
        assert_eq!(p.status.lag, 0);
        let g = cond(&p, PROGRESSING);
        assert!(g.message.starts_with("backlog 0/400 done"), "{}", g.message);
        assert_eq!(p.requeue, REQUEUE_BUSY);
    }

    #[test]
    fn the_backlog_lane_assigns_only_unfinished_partitions() {
        let mut j = with_backlog(&job("demo"));
        j.spec.workers.max_replicas = 1;
        let p0 = run(&j, &with_offsets(observed(4, 0, vec![]), &[]));
        let j1 = after(&j, &p0);
        let end = p0.status.backlog.as_ref().unwrap().end.clone();
        let pods = vec![
            pod(&j, 0),
            backlog_pod(&j, &end, 0),
            backlog_pod(&j, &end, 1),
        ];
        // Partitions 0 and 2 are done.
        let mut obs = with_offsets(observed(4, 0, pods), &[(0, 100), (1, 40), (2, 100), (3, 0)]);
        obs.now = Timestamp::from_second(now().as_second() + 3).unwrap();
        let p = run(&j1, &obs);
        let backlog = &p.assignment.as_ref().unwrap().lanes["backlog"];
        assert_eq!(backlog.keys().copied().collect::<Vec<_>>(), [1, 3]);
        // The live lane leaves the backlog's pods alone; the backlog lane
        // wants one worker, so slot 1 goes (and gets no partitions).
        assert_eq!(p.delete, ["demo-backlog-blue-1"]);
        assert!(p.create.is_empty(), "{:?}", names_of(&p.create));
        assert_eq!(p.status.workers, "1/1");
        let st = p.status.backlog.as_ref().unwrap();
        assert_eq!(st.done, 240);
        assert!(backlog.values().all(|s| s == "demo-backlog-blue-0"));
        // With two wanted, both stay and share the partitions.
        let mut p1 = p.clone();
        p1.status.backlog.as_mut().unwrap().replicas = 2;
        let j2 = after(&j1, &p1);
        let p2 = run(&j2, &obs);
        assert_eq!(p2.status.backlog.as_ref().unwrap().replicas, 2);
        assert!(p2.delete.is_empty());
        let backlog = &p2.assignment.as_ref().unwrap().lanes["backlog"];
        assert_eq!(
            backlog.values().collect::<BTreeSet<_>>().len(),
            2,
            "{backlog:?}"
        );
    }

    #[test]
    fn a_finished_backlog_deletes_its_pods_and_drops_its_lane() {
        let mut j = with_backlog(&job("demo"));
        j.spec.workers.max_replicas = 1;
        let p0 = run(&j, &with_offsets(observed(4, 0, vec![]), &[]));
        let j1 = after(&j, &p0);
        let end = p0.status.backlog.as_ref().unwrap().end.clone();
        let pods = vec![
            pod(&j, 0),
            backlog_pod(&j, &end, 0),
            backlog_pod(&j, &end, 1),
        ];
        let mut obs = with_offsets(
            observed(4, 0, pods),
            &[(0, 100), (1, 100), (2, 100), (3, 100)],
        );
        obs.progress.status.as_mut().unwrap().leases =
            [("backlog".to_string(), [(0, LeaseView::default())].into())].into();
        obs.now = Timestamp::from_second(now().as_second() + 60).unwrap();
        let p = run(&j1, &obs);
        // Every backlog pod at once; the live one stays.
        assert_eq!(p.delete, ["demo-backlog-blue-1", "demo-backlog-blue-0"]);
        assert!(p.create.is_empty());
        let a = p.assignment.as_ref().unwrap();
        assert!(!a.lanes.contains_key("backlog"));
        let st = p.status.backlog.as_ref().unwrap();
        assert!(st.finished);
        assert_eq!((st.done, st.total, st.replicas), (400, 400, 0));
        assert_eq!(reasons(&p), ["BacklogFinished"]);
        assert!(!cond(&p, PROGRESSING).message.contains("backlog"));
        // Done: the idle pace again, and the finished status stays.
        assert_eq!(p.requeue, REQUEUE_IDLE);
        let p2 = run(&after(&j1, &p), &obs);
        assert_eq!(p2.status.backlog, p.status.backlog);
        assert!(p2.events.is_empty());
    }

    #[test]
    fn a_removed_backlog_takes_its_lane_and_status_along() {
        let mut j = with_backlog(&job("demo"));
        j.spec.workers.max_replicas = 1;
        let p0 = run(&j, &with_offsets(observed(4, 0, vec![]), &[]));
        let mut j1 = after(&j, &p0);
        j1.spec.backlog = None;
        let end = p0.status.backlog.as_ref().unwrap().end.clone();
        let obs = observed(4, 0, vec![pod(&j, 0), backlog_pod(&j, &end, 0)]);
        let p = run(&j1, &obs);
        assert_eq!(p.delete, ["demo-backlog-blue-0"]);
        assert!(p.status.backlog.is_none());
        assert!(!p.assignment.as_ref().unwrap().lanes.contains_key("backlog"));
        assert_eq!(reasons(&p), ["BacklogRemoved"]);
    }

    #[test]
    fn a_failed_seeding_starts_nothing() {
        let mut j = with_backlog(&job("demo"));
        j.spec.workers.max_replicas = 1;
        let mut p = run(&j, &with_offsets(observed(4, 0, vec![]), &[]));
        seeding_failed(
            &mut p,
            None,
            "matchfleet.ns.demo.live",
            "no answer from Kafka within 15s",
            now(),
        );
        assert!(p.create.is_empty());
        assert!(p.status.backlog.is_none());
        assert!(p.events.is_empty());
        assert!(!p.assignment.as_ref().unwrap().lanes.contains_key("backlog"));
        let d = cond(&p, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "BacklogNotStarted")
        );
        assert!(
            d.message.contains("matchfleet.ns.demo.live"),
            "{}",
            d.message
        );
        assert_eq!(p.requeue, REQUEUE_BUSY);
    }

    #[test]
    fn a_paused_backlog_keeps_its_status_and_pods() {
        let mut j = with_backlog(&job("demo"));
        j.spec.workers.max_replicas = 1;
        let p0 = run(&j, &with_offsets(observed(4, 0, vec![]), &[]));
        let mut j1 = after(&j, &p0);
        j1.metadata.annotations = Some(BTreeMap::from([(
            names::PAUSED.to_string(),
            "true".to_string(),
        )]));
        let end = p0.status.backlog.as_ref().unwrap().end.clone();
        let obs = with_offsets(
            observed(4, 0, vec![pod(&j, 0), backlog_pod(&j, &end, 0)]),
            &[(0, 100), (1, 100), (2, 100), (3, 100)],
        );
        let p = run(&j1, &obs);
        assert!(p.create.is_empty() && p.delete.is_empty() && p.seeds.is_empty());
        assert_eq!(p.status.backlog, p0.status.backlog);
    }

    #[test]
    fn an_invalid_backlog_degrades_and_holds() {
        let mut j = with_backlog(&job("demo"));
        j.spec.backlog.as_mut().unwrap().finish_by = "2027-02-30T00:00:00Z".to_string();
        let p = run(&j, &with_offsets(observed(4, 0, vec![]), &[]));
        assert!(p.create.is_empty());
        let d = cond(&p, DEGRADED);
        assert_eq!(d.reason, "InvalidBacklog");
        assert!(d.message.contains("finishBy"), "{}", d.message);
    }
}
