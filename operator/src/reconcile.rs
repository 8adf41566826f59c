//! The RenderJob controller: observe -> plan -> act. Observation and the
//! plan are in their own modules; this one drives the RenderJob's acting
//! (server-side apply, seeding, pod create/delete, the assignment, the status
//! patch, Events) on the I/O both controllers share ([`crate::controller`]).

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::Resource;
use matchfleet_api::{RenderJob, RenderJobStatus};

use crate::controller::{self, publish, Acted};
use crate::observe;
use crate::plan::{self, Plan, PlannedEvent};
use crate::resources::{InvalidOwner, Owner};

pub use crate::controller::{Context, Error};

/// One reconcile of one RenderJob, in its own span.
pub async fn reconcile(job: Arc<RenderJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    controller::instrumented(job.as_ref(), &ctx, reconcile_job(&job, &ctx)).await
}

/// Backoff doubling from 1 s to a minute per RenderJob, with a log line.
pub fn error_policy(job: Arc<RenderJob>, error: &Error, ctx: Arc<Context>) -> Action {
    controller::backoff(job.as_ref(), error, &ctx)
}

async fn reconcile_job(job: &RenderJob, ctx: &Context) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes what it owns; there are no finalizers.
        ctx.succeeded(&controller::backoff_key(job));
        return Ok(Action::await_change());
    }
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let reference = job.object_ref(&());
    let owner = match Owner::of(job) {
        Ok(o) => o,
        Err(InvalidOwner::Name { name, reason }) => {
            let message = format!(
                "cannot serve RenderJob {name:?}: {reason}; recreate it under a valid name"
            );
            let plan = plan::invalid(job, &message, Timestamp::now());
            write_status(ctx, job, &plan.status).await?;
            publish(&recorder, &reference, &plan.events).await;
            return Ok(Action::requeue(plan.requeue));
        }
        Err(e) => return Err(e.into()),
    };

    let observed = observe::observe(&ctx.client, &ctx.kafka, &ctx.progress, job, &owner)
        .await
        .map_err(controller::kube_err("observe"))?;
    let plan = plan::plan(job, &owner, &observed);
    tracing::debug!(
        create = plan.create.len(),
        delete = plan.delete.len(),
        requeue = ?plan.requeue,
        "planned"
    );
    act(ctx, job, &owner, &observed, plan, &recorder, &reference).await
}

async fn act(
    ctx: &Context,
    job: &RenderJob,
    owner: &Owner,
    observed: &observe::Observed,
    mut plan: Plan,
    recorder: &Recorder,
    reference: &ObjectReference,
) -> Result<Action, Error> {
    let ns = owner.namespace.as_str();
    let mut events: Vec<PlannedEvent> = Vec::new();

    if let Some(progress) = &plan.progress {
        let existed = observed.progress.deployment_exists;
        controller::apply_progress(&ctx.client, owner, progress, existed, &mut events).await?;
    }

    // The backlog's starting offsets, before any pod that reads from them
    // exists: a live worker started without them would read the backlog's
    // range too.
    for seed in plan.seeds.clone() {
        let source = &job.spec.source;
        match ctx
            .kafka
            .commit(
                &source.bootstrap_servers,
                &seed.group,
                &source.topic,
                &seed.offsets,
            )
            .await
        {
            Ok(()) => tracing::info!(
                group = %seed.group,
                partitions = seed.offsets.len(),
                "seeded the consumer group's offsets"
            ),
            Err(e) => {
                tracing::warn!(group = %seed.group, error = %e, "cannot seed the consumer group's offsets");
                plan::seeding_failed(
                    &mut plan,
                    job.status.as_ref(),
                    &seed.group,
                    &e,
                    observed.now,
                );
                break;
            }
        }
    }

    let mut acted = Acted {
        status: &mut plan.status,
        previous: previous_conditions(job),
        now: observed.now,
        events: &mut events,
    };
    let failure =
        controller::change_pods(&ctx.client, ns, &plan.create, &plan.delete, &mut acted).await;
    // The assignment goes out on every reconcile (the service takes the same
    // one again as a no-op).
    controller::send_assignment(
        ctx,
        owner,
        plan.assignment.as_ref(),
        observed.progress.status.is_some(),
        &mut acted,
        &mut plan.requeue,
    )
    .await;

    write_status(ctx, job, &plan.status).await?;
    events.extend(plan.events.iter().cloned());
    publish(recorder, reference, &events).await;

    match failure {
        Some(e) => Err(e),
        None => Ok(Action::requeue(plan.requeue)),
    }
}

fn previous_conditions(job: &RenderJob) -> &[matchfleet_api::fleet::Condition] {
    job.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[])
}

/// Patches the status subresource, only when it changed.
async fn write_status(
    ctx: &Context,
    job: &RenderJob,
    status: &RenderJobStatus,
) -> Result<(), Error> {
    controller::write_status(&ctx.client, job, job.status.as_ref(), status).await
}

/// Runs the RenderJob controller until `shutdown` completes and in-flight reconciles end.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    controller::run::<RenderJob, _>(ctx, shutdown, reconcile, error_policy).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::mock::{echo, expect, expect_progress_applied, failure, Handle};
    use crate::controller::{spec_or_annotations, status_patch};
    use crate::kafka::{KafkaObservation, TopicState};
    use crate::names;
    use crate::observe::{Observed, ProgressObservation, WorkerPod};
    use serde_json::{json, Value};
    use std::time::Duration;

    fn setup() -> (Context, Handle, RenderJob, Owner) {
        let (ctx, handle) = crate::controller::mock::context();
        let job = crate::resources::tests::job("demo");
        let owner = Owner::of(&job).unwrap();
        (ctx, handle, job, owner)
    }

    fn observed(pods: Vec<WorkerPod>) -> Observed {
        Observed {
            now: Timestamp::from_second(1_800_000_000).unwrap(),
            pods,
            // Not answering: the assignment is not sent (no HTTP in this test).
            progress: ProgressObservation::default(),
            kafka: KafkaObservation {
                topic: TopicState::Found { partitions: 2 },
                lag: Some(0),
                offsets: None,
                backlog: None,
            },
        }
    }

    async fn run_act(
        ctx: &Context,
        job: &RenderJob,
        owner: &Owner,
        obs: &Observed,
    ) -> Result<Action, Error> {
        let plan = plan::plan(job, owner, obs);
        let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        let reference = job.object_ref(&());
        act(ctx, job, owner, obs, plan, &recorder, &reference).await
    }

    #[tokio::test]
    async fn act_applies_creates_patches_status_and_records_events() {
        let (ctx, mut handle, job, owner) = setup();
        let obs = observed(vec![]);
        let server = tokio::spawn(async move {
            let d = expect(
                &mut handle,
                "PATCH",
                "/apis/apps/v1/namespaces/ns/deployments/demo-progress",
                200,
                echo,
            )
            .await;
            assert!(
                d.uri.contains("fieldManager=matchfleet-operator") && d.uri.contains("force=true"),
                "{}",
                d.uri
            );
            assert_eq!(
                d.content_type.as_deref(),
                Some("application/apply-patch+yaml")
            );
            assert_eq!(d.body["kind"], "Deployment");
            assert_eq!(d.body["spec"]["strategy"]["type"], "Recreate");
            let s = expect(
                &mut handle,
                "PATCH",
                "/api/v1/namespaces/ns/services/demo-progress",
                200,
                echo,
            )
            .await;
            assert!(
                s.uri.contains("fieldManager=matchfleet-operator"),
                "{}",
                s.uri
            );
            assert_eq!(s.body["kind"], "Service");
            for i in 0..2 {
                let p = expect(&mut handle, "POST", "/api/v1/namespaces/ns/pods", 200, echo).await;
                assert_eq!(p.body["metadata"]["name"], format!("demo-live-blue-{i}"));
                assert_eq!(p.body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
            }
            let st = expect(
                &mut handle,
                "PATCH",
                "/apis/matchfleet.io/v1alpha1/namespaces/ns/renderjobs/demo/status",
                200,
                |_| serde_json::to_value(crate::resources::tests::job("demo")).unwrap(),
            )
            .await;
            assert_eq!(
                st.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
            assert_eq!(st.body["status"]["workers"], "0/2");
            assert_eq!(st.body["status"]["partitions"], 2);
            assert_eq!(
                st.body["status"]["live"]["assignment"],
                json!({"0": 0, "1": 1})
            );
            let mut reasons = Vec::new();
            for _ in 0..3 {
                let e = expect(
                    &mut handle,
                    "POST",
                    "/apis/events.k8s.io/v1/namespaces/ns/events",
                    200,
                    echo,
                )
                .await;
                assert_eq!(e.body["regarding"]["name"], "demo");
                assert_eq!(e.body["reportingController"], "matchfleet-operator");
                reasons.push(e.body["reason"].as_str().unwrap().to_string());
                if e.body["reason"] == "CreatedWorker" {
                    assert_eq!(e.body["related"]["kind"], "Pod");
                    assert!(e.body["note"]
                        .as_str()
                        .unwrap()
                        .ends_with(e.body["related"]["name"].as_str().unwrap()));
                }
            }
            assert_eq!(
                reasons,
                ["CreatedProgressService", "CreatedWorker", "CreatedWorker"]
            );
        });
        let action = run_act(&ctx, &job, &owner, &obs).await.unwrap();
        assert_eq!(action, Action::requeue(plan::REQUEUE_BUSY));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn act_reports_a_pod_it_cannot_create_after_writing_the_status() {
        let (ctx, mut handle, job, owner) = setup();
        let server = tokio::spawn(async move {
            expect_progress_applied(&mut handle).await;
            // Slot 0 exists already (a lagging view): fine. Slot 1 is refused.
            expect(
                &mut handle,
                "POST",
                "/api/v1/namespaces/ns/pods",
                409,
                failure(409, "AlreadyExists"),
            )
            .await;
            expect(
                &mut handle,
                "POST",
                "/api/v1/namespaces/ns/pods",
                403,
                failure(403, "Forbidden"),
            )
            .await;
            let st = expect(
                &mut handle,
                "PATCH",
                "/apis/matchfleet.io/v1alpha1/namespaces/ns/renderjobs/demo/status",
                200,
                |_| serde_json::to_value(crate::resources::tests::job("demo")).unwrap(),
            )
            .await;
            let degraded = st.body["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Degraded")
                .unwrap()
                .clone();
            assert_eq!(degraded["reason"], "WorkerCreateFailed");
            assert!(
                degraded["message"]
                    .as_str()
                    .unwrap()
                    .contains("mock Forbidden"),
                "{degraded}"
            );
            // No CreatedWorker for slot 0: it already existed.
            let mut reasons = Vec::new();
            for _ in 0..2 {
                let e = expect(
                    &mut handle,
                    "POST",
                    "/apis/events.k8s.io/v1/namespaces/ns/events",
                    200,
                    echo,
                )
                .await;
                reasons.push(format!(
                    "{} {}",
                    e.body["type"].as_str().unwrap(),
                    e.body["reason"].as_str().unwrap()
                ));
            }
            assert_eq!(
                reasons,
                [
                    "Normal CreatedProgressService",
                    "Warning FailedCreateWorker"
                ]
            );
        });
        let err = run_act(&ctx, &job, &owner, &observed(vec![]))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("create Pod ns/demo-live-blue-1"),
            "{err}"
        );
        assert_eq!(err.category(), "kube_api");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn act_deletes_and_ignores_pods_already_gone() {
        let (ctx, mut handle, job, owner) = setup();
        let hash = crate::resources::worker_template_hash(&owner, &job.spec);
        let pod = |slot: i32| WorkerPod {
            name: names::worker_pod_name("demo", "live", "blue", slot),
            slot: Some(slot),
            template_hash: Some(hash.clone()),
            ready: true,
            ..Default::default()
        };
        // Three pods for two partitions: slot 2 goes. The status already
        // says what this reconcile finds.
        let mut obs = observed(vec![pod(0), pod(1), pod(2)]);
        obs.progress.deployment_exists = true;
        let mut j = job.clone();
        j.status = Some(plan::plan(&job, &owner, &obs).status);
        let server = tokio::spawn(async move {
            expect_progress_applied(&mut handle).await;
            expect(
                &mut handle,
                "DELETE",
                "/api/v1/namespaces/ns/pods/demo-live-blue-2",
                404,
                failure(404, "NotFound"),
            )
            .await;
            // Status unchanged: no patch. The progress service existed: no event.
            assert!(
                tokio::time::timeout(Duration::from_millis(200), handle.next_request())
                    .await
                    .is_err(),
                "no more requests"
            );
        });
        let action = run_act(&ctx, &j, &owner, &obs).await.unwrap();
        assert_eq!(action, Action::requeue(plan::REQUEUE_BUSY));
        server.await.unwrap();
    }

    #[test]
    fn empty_assignment_is_removed_by_the_patch() {
        let mut s = RenderJobStatus::default();
        let v = status_patch(None, &s);
        assert_eq!(v["status"]["live"]["assignment"], serde_json::Value::Null);
        assert!(v["status"]["live"]
            .as_object()
            .unwrap()
            .contains_key("assignment"));
        s.live.assignment.insert("0".to_string(), 1);
        let v = status_patch(None, &s);
        assert_eq!(v["status"]["live"]["assignment"]["0"], 1);
        // No backlog before or now: nothing said about it.
        assert!(!v["status"].as_object().unwrap().contains_key("backlog"));
    }

    #[test]
    fn fields_that_went_away_are_removed_by_the_patch() {
        use matchfleet_api::render_job::BacklogStatus;
        let old = RenderJobStatus {
            p99: Some("2s".to_string()),
            backlog: Some(BacklogStatus {
                total: 10,
                assignment: [("0".to_string(), 0), ("1".to_string(), 1)].into(),
                eta: Some("2027-01-15T08:00:00Z".to_string()),
                ..Default::default()
            }),
            ..Default::default()
        };
        // A finished partition leaves the backlog assignment; the ETA goes.
        let mut new = old.clone();
        let b = new.backlog.as_mut().unwrap();
        b.assignment.remove("1");
        b.eta = None;
        let v = status_patch(Some(&old), &new);
        assert_eq!(
            v["status"]["backlog"]["assignment"],
            json!({"0": 0, "1": null})
        );
        assert_eq!(v["status"]["backlog"]["eta"], Value::Null);
        assert!(v["status"]["backlog"]
            .as_object()
            .unwrap()
            .contains_key("eta"));
        assert_eq!(v["status"]["p99"], "2s");
        // spec.backlog removed: the whole backlog status goes.
        new.backlog = None;
        let v = status_patch(Some(&old), &new);
        assert!(v["status"]
            .as_object()
            .unwrap()
            .get("backlog")
            .is_some_and(Value::is_null));
    }

    #[test]
    fn status_writes_do_not_trigger_reconciles() {
        let mut j = crate::resources::tests::job("demo");
        let before = spec_or_annotations(&j);
        j.status = Some(RenderJobStatus {
            done: 5,
            ..Default::default()
        });
        assert_eq!(spec_or_annotations(&j), before);
        j.metadata.generation = Some(2);
        assert_ne!(spec_or_annotations(&j), before);
        let gen2 = spec_or_annotations(&j);
        j.metadata.annotations = Some([(names::PAUSED.to_string(), "true".to_string())].into());
        assert_ne!(spec_or_annotations(&j), gen2);
    }
}
