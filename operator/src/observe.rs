//! Observe: everything a plan needs, read from the API server, Kafka and the
//! progress service. The reads run concurrently; Kafka and progress service
//! failures are part of what was observed (they become conditions), only API
//! server failures fail the reconcile.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use matchfleet_api::fleet::SourceSpec;
use matchfleet_api::progress::ProgressStatus;
use matchfleet_api::RenderJob;

use crate::backlog;
use crate::kafka::{BacklogQuery, Kafka, KafkaObservation};
use crate::names::{self, COLOR_BLUE, LANE_BACKLOG, LANE_LIVE};
use crate::progress_client::ProgressClient;
use crate::resources::Owner;

/// A container restart this recent makes the resource Degraded.
const RECENT_RESTART_SECONDS: i64 = 300;

/// Waiting reasons that mean a container cannot run (as `kubectl get pods` shows them).
const BROKEN_WAITING: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// One worker pod as the plan sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkerPod {
    pub name: String,
    /// `backlog` for the backlog lane's pods; anything else is the live lane's
    /// (which removes pods of ours it does not recognise).
    pub lane: String,
    /// The slot index within its lane (color blue), when the name is one of ours.
    pub slot: Option<i32>,
    pub template_hash: Option<String>,
    pub ready: bool,
    /// Being deleted (it drains, then disappears).
    pub terminating: bool,
    /// Phase `Succeeded` or `Failed`: it will not run again.
    pub finished: bool,
    /// Why it counts as restarting right now, for the Degraded message.
    pub restarting: Option<String>,
}

/// The progress service's Deployment and `GET /status`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProgressObservation {
    pub deployment_exists: bool,
    /// The Deployment's controller when that is not this resource (e.g. a
    /// RenderJob of the same name owns `NAME-progress`): `Kind name`.
    pub foreign_controller: Option<String>,
    pub ready_replicas: i32,
    /// The status, or why it could not be read.
    pub status: Option<ProgressStatus>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub now: Timestamp,
    pub pods: Vec<WorkerPod>,
    pub progress: ProgressObservation,
    pub kafka: KafkaObservation,
}

/// The plan's view of one pod.
pub fn worker_pod(job: &str, pod: &Pod, now: Timestamp) -> WorkerPod {
    let name = pod.name_any();
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let finished = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let live = names::parse_worker_pod_name(job, LANE_LIVE, COLOR_BLUE, &name);
    let backlog = names::parse_worker_pod_name(job, LANE_BACKLOG, COLOR_BLUE, &name);
    let lane = match (live, backlog) {
        (Some(_), _) => LANE_LIVE,
        (None, Some(_)) => LANE_BACKLOG,
        // Not a slot name: the lane label says whose it is.
        (None, None) => match pod.labels().get(names::LANE).map(String::as_str) {
            Some(LANE_BACKLOG) => LANE_BACKLOG,
            _ => LANE_LIVE,
        },
    };
    WorkerPod {
        lane: lane.to_string(),
        slot: live.or(backlog),
        template_hash: pod.annotations().get(names::TEMPLATE_HASH).cloned(),
        ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        finished,
        restarting: restarting(&name, pod, now),
        name,
    }
}

fn restarting(name: &str, pod: &Pod, now: Timestamp) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    for cs in statuses {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            if let Some(reason) = w.reason.as_deref().filter(|r| BROKEN_WAITING.contains(r)) {
                let detail = w
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                return Some(format!(
                    "pod {name} container {} is waiting with {reason}{detail} ({} restarts)",
                    cs.name, cs.restart_count
                ));
            }
        }
        if cs.restart_count > 0 {
            let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
            let recent = last
                .and_then(|t| t.finished_at.as_ref())
                .is_some_and(|t| now.as_second() - t.0.as_second() < RECENT_RESTART_SECONDS);
            if recent {
                let how = last
                    .map(|t| {
                        let reason = t.reason.as_deref().unwrap_or("exited");
                        format!("{reason}, exit code {}", t.exit_code)
                    })
                    .unwrap_or_default();
                return Some(format!(
                    "pod {name} container {} restarted {} times, last {how}",
                    cs.name, cs.restart_count
                ));
            }
        }
    }
    None
}

/// Reads everything the plan needs for one RenderJob.
pub async fn observe(
    client: &Client,
    kafka: &Kafka,
    progress: &ProgressClient,
    job: &RenderJob,
    owner: &Owner,
) -> Result<Observed, kube::Error> {
    let backlog = backlog::query(job, owner);
    observe_fleet(client, kafka, progress, owner, &job.spec.source, backlog).await
}

/// Reads what every fleet's plan needs: its worker pods, its progress
/// service (Deployment and `GET /status`), and the source topic with the
/// live group's offsets (and the backlog group's, with `backlog`).
pub async fn observe_fleet(
    client: &Client,
    kafka: &Kafka,
    progress: &ProgressClient,
    owner: &Owner,
    source: &SourceSpec,
    backlog: Option<BacklogQuery>,
) -> Result<Observed, kube::Error> {
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &owner.namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &owner.namespace);
    let group = names::consumer_group(&owner.namespace, &owner.name, LANE_LIVE);
    let url = names::progress_url(&owner.name, &owner.namespace);

    let list = ListParams::default().labels(&names::worker_selector(owner.fleet, &owner.name));
    let progress_name = names::progress_name(&owner.name);
    let (pods, deployment, kafka, status) = tokio::join!(
        pods_api.list(&list),
        deployments.get_opt(&progress_name),
        kafka.observe(&source.bootstrap_servers, &source.topic, &group, backlog,),
        progress.status(&url),
    );
    let now = Timestamp::now();
    let pods = pods?
        .items
        .into_iter()
        // Ours only: a pod with our labels that another object (or an older
        // RenderJob of the same name) controls is not ours to delete.
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|r| r.controller == Some(true) && r.uid == owner.reference.uid)
        })
        .map(|p| worker_pod(&owner.name, &p, now))
        .collect();
    let deployment = deployment?;
    let (status, error) = match status {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(Observed {
        now,
        pods,
        progress: ProgressObservation {
            deployment_exists: deployment.is_some(),
            foreign_controller: deployment
                .as_ref()
                .and_then(|d| foreign_controller(d, owner)),
            ready_replicas: deployment
                .and_then(|d| d.status)
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
            status,
            error,
        },
        kafka,
    })
}

/// `Kind name` of an object's controller when that is not `owner`.
pub fn foreign_controller(object: &impl ResourceExt, owner: &Owner) -> Option<String> {
    object
        .owner_references()
        .iter()
        .find(|r| r.controller == Some(true))
        .filter(|r| r.uid != owner.reference.uid)
        .map(|r| format!("{} {}", r.kind, r.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
        PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use std::collections::BTreeMap;

    fn pod(name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                annotations: Some(BTreeMap::from([(
                    names::TEMPLATE_HASH.to_string(),
                    "h1".to_string(),
                )])),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some("Running".to_string()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_string(),
                    status: "True".to_string(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn reads_slot_hash_and_readiness() {
        let w = worker_pod("demo", &pod("demo-live-blue-3"), now());
        assert_eq!(w.slot, Some(3));
        assert_eq!(w.template_hash.as_deref(), Some("h1"));
        assert!(w.ready && !w.terminating && !w.finished);
        assert_eq!(w.restarting, None);
        assert_eq!(w.lane, "live");
        let b = worker_pod("demo", &pod("demo-backlog-blue-3"), now());
        assert_eq!((b.lane.as_str(), b.slot), ("backlog", Some(3)));
        // A name that is no slot: its lane label decides, else it is the live lane's.
        let mut odd = pod("demo-backlog-blue-03");
        assert_eq!(worker_pod("demo", &odd, now()).lane, "live");
        odd.metadata.labels = Some([(names::LANE.to_string(), "backlog".to_string())].into());
        let o = worker_pod("demo", &odd, now());
        assert_eq!((o.lane.as_str(), o.slot), ("backlog", None));
    }

    #[test]
    fn a_deployment_controlled_by_another_resource_is_foreign() {
        let job = crate::resources::tests::job("demo");
        let owner = Owner::of(&job).unwrap();
        let mut d = Deployment::default();
        assert_eq!(foreign_controller(&d, &owner), None);
        d.metadata.owner_references = Some(vec![owner.reference.clone()]);
        assert_eq!(foreign_controller(&d, &owner), None);
        let mp = crate::pipeline::resources::tests::pipeline("demo");
        let other = Owner::of(&mp).unwrap();
        d.metadata.owner_references = Some(vec![other.reference.clone()]);
        assert_eq!(
            foreign_controller(&d, &owner).as_deref(),
            Some("MatchPipeline demo")
        );
        // Only a controller counts.
        let mut plain = other.reference.clone();
        plain.controller = None;
        d.metadata.owner_references = Some(vec![plain]);
        assert_eq!(foreign_controller(&d, &owner), None);
    }

    #[test]
    fn terminating_and_finished_pods() {
        let mut p = pod("demo-live-blue-0");
        p.metadata.deletion_timestamp = Some(Time(now()));
        p.status.as_mut().unwrap().phase = Some("Failed".to_string());
        let w = worker_pod("demo", &p, now());
        assert!(w.terminating && w.finished);
    }

    fn with_container(p: &mut Pod, cs: ContainerStatus) {
        p.status.as_mut().unwrap().container_statuses = Some(vec![cs]);
    }

    #[test]
    fn crash_loops_count_as_restarting() {
        let mut p = pod("demo-live-blue-0");
        with_container(
            &mut p,
            ContainerStatus {
                name: "worker".to_string(),
                restart_count: 4,
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CrashLoopBackOff".to_string()),
                        message: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let r = worker_pod("demo", &p, now()).restarting.unwrap();
        assert!(r.contains("CrashLoopBackOff"), "{r}");
    }

    #[test]
    fn only_recent_restarts_count() {
        let restarted = |finished: i64| {
            let mut p = pod("demo-live-blue-0");
            with_container(
                &mut p,
                ContainerStatus {
                    name: "worker".to_string(),
                    restart_count: 1,
                    last_state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 137,
                            reason: Some("Error".to_string()),
                            finished_at: Some(Time(
                                Timestamp::from_second(now().as_second() - finished).unwrap(),
                            )),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
            worker_pod("demo", &p, now()).restarting
        };
        assert!(restarted(10).unwrap().contains("exit code 137"));
        assert_eq!(restarted(3600), None);
    }
}
