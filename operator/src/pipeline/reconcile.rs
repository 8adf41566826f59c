//! The MatchPipeline controller: name and spec checks -> observe -> plan ->
//! act, on the same observation, I/O and controller wiring as RenderJob
//! ([`crate::observe`], [`crate::controller`]).

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::Resource;
use matchfleet_api::MatchPipeline;

use super::plan::{self, PipelinePlan};
use super::validate;
use crate::controller::{self, publish, Acted, Context, Error};
use crate::fleet::PlannedEvent;
use crate::observe::{self, Observed};
use crate::resources::{InvalidOwner, Owner};

/// One reconcile of one MatchPipeline, in its own span.
pub async fn reconcile(mp: Arc<MatchPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    controller::instrumented(mp.as_ref(), &ctx, reconcile_pipeline(&mp, &ctx)).await
}

/// Backoff doubling from 1 s to a minute per MatchPipeline, with a log line.
pub fn error_policy(mp: Arc<MatchPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    controller::backoff(mp.as_ref(), error, &ctx)
}

async fn reconcile_pipeline(mp: &MatchPipeline, ctx: &Context) -> Result<Action, Error> {
    if mp.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes what it owns; there are no finalizers.
        ctx.succeeded(&controller::backoff_key(mp));
        return Ok(Action::await_change());
    }
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let reference = mp.object_ref(&());
    let refuse = |reason: &'static str, message: String| {
        let plan = plan::invalid(mp, reason, &message, Timestamp::now());
        let (recorder, reference) = (&recorder, &reference);
        async move {
            write_status(ctx, mp, &plan).await?;
            publish(recorder, reference, &plan.events).await;
            Ok(Action::requeue(plan.requeue))
        }
    };
    let owner = match Owner::of(mp) {
        Ok(o) => o,
        Err(InvalidOwner::Name { name, reason }) => {
            let message = format!(
                "cannot serve MatchPipeline {name:?}: {reason}; recreate it under a valid name"
            );
            return refuse("InvalidName", message).await;
        }
        Err(e) => return Err(e.into()),
    };
    let problems = validate::problems(&mp.spec);
    if !problems.is_empty() {
        let message = format!("invalid spec: {}; fix the spec", problems.join("; "));
        return refuse("InvalidSpec", message).await;
    }

    let observed = observe::observe_fleet(
        &ctx.client,
        &ctx.kafka,
        &ctx.progress,
        &owner,
        &mp.spec.source,
        None,
    )
    .await
    .map_err(controller::kube_err("observe"))?;
    let plan = plan::plan(mp, &owner, &observed);
    tracing::debug!(
        create = plan.create.len(),
        delete = plan.delete.len(),
        requeue = ?plan.requeue,
        "planned"
    );
    act(ctx, mp, &owner, &observed, plan, &recorder, &reference).await
}

async fn act(
    ctx: &Context,
    mp: &MatchPipeline,
    owner: &Owner,
    observed: &Observed,
    mut plan: PipelinePlan,
    recorder: &Recorder,
    reference: &ObjectReference,
) -> Result<Action, Error> {
    let ns = owner.namespace.as_str();
    let mut events: Vec<PlannedEvent> = Vec::new();

    if let Some(progress) = &plan.progress {
        let existed = observed.progress.deployment_exists;
        controller::apply_progress(&ctx.client, owner, progress, existed, &mut events).await?;
    }
    if let Some(service) = &plan.workers_service {
        controller::apply_service(&ctx.client, ns, service).await?;
    }

    let previous = mp
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let mut acted = Acted {
        status: &mut plan.status,
        previous,
        now: observed.now,
        events: &mut events,
    };
    let failure =
        controller::change_pods(&ctx.client, ns, &plan.create, &plan.delete, &mut acted).await;
    let taken = controller::send_assignment(
        ctx,
        owner,
        plan.assignment.as_ref(),
        observed.progress.status.is_some(),
        &mut acted,
        &mut plan.requeue,
    )
    .await;
    if taken {
        events.extend(plan.assigned.take());
    }

    write_status(ctx, mp, &plan).await?;
    events.extend(plan.events.iter().cloned());
    publish(recorder, reference, &events).await;

    match failure {
        Some(e) => Err(e),
        None => Ok(Action::requeue(plan.requeue)),
    }
}

/// Patches the status subresource, only when it changed.
async fn write_status(ctx: &Context, mp: &MatchPipeline, plan: &PipelinePlan) -> Result<(), Error> {
    controller::write_status(&ctx.client, mp, mp.status.as_ref(), &plan.status).await
}

/// Runs the MatchPipeline controller until `shutdown` completes and in-flight reconciles end.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    controller::run::<MatchPipeline, _>(ctx, shutdown, reconcile, error_policy).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::mock::{
        echo, expect, expect_nothing_more, expect_progress_applied, failure, Handle,
    };
    use crate::kafka::{KafkaObservation, TopicState};
    use crate::observe::ProgressObservation;
    use crate::pipeline::resources::tests::pipeline;
    use serde_json::json;

    const STATUS: &str = "/apis/matchfleet.io/v1alpha1/namespaces/ns/matchpipelines/demo/status";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

    fn setup() -> (Context, Handle, MatchPipeline, Owner) {
        let (ctx, handle) = crate::controller::mock::context();
        let mp = pipeline("demo");
        let owner = Owner::of(&mp).unwrap();
        (ctx, handle, mp, owner)
    }

    fn observed() -> Observed {
        Observed {
            now: Timestamp::from_second(1_800_000_000).unwrap(),
            pods: Vec::new(),
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
        mp: &MatchPipeline,
        owner: &Owner,
        obs: &Observed,
    ) -> Result<Action, Error> {
        let plan = plan::plan(mp, owner, obs);
        let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        let reference = mp.object_ref(&());
        act(ctx, mp, owner, obs, plan, &recorder, &reference).await
    }

    async fn event_reasons(handle: &mut Handle, n: usize) -> Vec<String> {
        let mut reasons = Vec::new();
        for _ in 0..n {
            let e = expect(handle, "POST", EVENTS, 200, echo).await;
            assert_eq!(e.body["regarding"]["kind"], "MatchPipeline");
            assert_eq!(e.body["regarding"]["name"], "demo");
            reasons.push(e.body["reason"].as_str().unwrap().to_string());
        }
        reasons
    }

    #[tokio::test]
    async fn act_applies_both_services_creates_workers_and_writes_the_status() {
        let (ctx, mut handle, mp, owner) = setup();
        let obs = observed();
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
                d.uri.contains("fieldManager=matchfleet-operator") && d.uri.contains("force=true")
            );
            assert_eq!(
                d.body["metadata"]["labels"]["matchfleet.io/matchpipeline"],
                "demo"
            );
            expect(
                &mut handle,
                "PATCH",
                "/api/v1/namespaces/ns/services/demo-progress",
                200,
                echo,
            )
            .await;
            let w = expect(
                &mut handle,
                "PATCH",
                "/api/v1/namespaces/ns/services/demo-workers",
                200,
                echo,
            )
            .await;
            assert_eq!(
                w.content_type.as_deref(),
                Some("application/apply-patch+yaml")
            );
            assert_eq!(w.body["spec"]["ports"][0]["port"], 8080);
            for i in 0..2 {
                let p = expect(&mut handle, "POST", "/api/v1/namespaces/ns/pods", 200, echo).await;
                assert_eq!(p.body["metadata"]["name"], format!("demo-live-blue-{i}"));
                assert_eq!(
                    p.body["metadata"]["ownerReferences"][0]["kind"],
                    "MatchPipeline"
                );
                assert_eq!(p.body["spec"]["containers"][0]["args"], json!(["match"]));
            }
            let st = expect(&mut handle, "PATCH", STATUS, 200, |_| {
                serde_json::to_value(pipeline("demo")).unwrap()
            })
            .await;
            assert_eq!(
                st.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
            assert_eq!(st.body["status"]["active"], "blue");
            assert_eq!(st.body["status"]["workers"], "0/2");
            assert_eq!(st.body["status"]["partitions"], 2);
            assert_eq!(
                st.body["status"]["live"]["assignment"],
                json!({"0": 0, "1": 1})
            );
            assert_eq!(
                event_reasons(&mut handle, 3).await,
                ["CreatedProgressService", "CreatedWorker", "CreatedWorker"]
            );
            expect_nothing_more(&mut handle).await;
        });
        let action = run_act(&ctx, &mp, &owner, &obs).await.unwrap();
        assert_eq!(action, Action::requeue(crate::fleet::REQUEUE_BUSY));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn act_reports_a_refused_pod_after_writing_the_status() {
        let (ctx, mut handle, mp, owner) = setup();
        let server = tokio::spawn(async move {
            expect_progress_applied(&mut handle).await;
            expect(
                &mut handle,
                "PATCH",
                "/api/v1/namespaces/ns/services/demo-workers",
                200,
                echo,
            )
            .await;
            expect(&mut handle, "POST", "/api/v1/namespaces/ns/pods", 200, echo).await;
            expect(
                &mut handle,
                "POST",
                "/api/v1/namespaces/ns/pods",
                422,
                failure(422, "Invalid"),
            )
            .await;
            let st = expect(&mut handle, "PATCH", STATUS, 200, |_| {
                serde_json::to_value(pipeline("demo")).unwrap()
            })
            .await;
            let degraded = st.body["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Degraded")
                .unwrap()
                .clone();
            assert_eq!(degraded["reason"], "WorkerCreateFailed");
            assert!(degraded["message"]
                .as_str()
                .unwrap()
                .contains("demo-live-blue-1"));
            assert_eq!(
                event_reasons(&mut handle, 3).await,
                [
                    "CreatedProgressService",
                    "CreatedWorker",
                    "FailedCreateWorker"
                ]
            );
        });
        let err = run_act(&ctx, &mp, &owner, &observed()).await.unwrap_err();
        assert!(
            err.to_string().contains("create Pod ns/demo-live-blue-1"),
            "{err}"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_invalid_spec_only_gets_a_status_and_a_warning() {
        let (ctx, mut handle, mut mp, _) = setup();
        mp.spec.results_topic = mp.spec.source.topic.clone();
        let server = tokio::spawn(async move {
            let st = expect(&mut handle, "PATCH", STATUS, 200, |_| {
                serde_json::to_value(pipeline("demo")).unwrap()
            })
            .await;
            let ready = st.body["status"]["conditions"][0].clone();
            assert_eq!(ready["type"], "Ready");
            assert_eq!(ready["reason"], "InvalidSpec");
            assert!(
                ready["message"]
                    .as_str()
                    .unwrap()
                    .contains("resultsTopic must differ"),
                "{ready}"
            );
            let e = expect(&mut handle, "POST", EVENTS, 200, echo).await;
            assert_eq!(
                (e.body["type"].as_str(), e.body["reason"].as_str()),
                (Some("Warning"), Some("InvalidSpec"))
            );
            expect_nothing_more(&mut handle).await;
        });
        let action = reconcile_pipeline(&mp, &ctx).await.unwrap();
        assert_eq!(action, Action::requeue(crate::fleet::REQUEUE_INVALID));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_unchanged_status_is_not_written() {
        let (ctx, mut handle, mp, owner) = setup();
        let hash = crate::pipeline::resources::template_hash(&owner, &mp.spec);
        let mut obs = observed();
        obs.progress.deployment_exists = true;
        obs.pods = (0..2)
            .map(|slot| crate::observe::WorkerPod {
                name: crate::names::worker_pod_name("demo", "live", "blue", slot),
                lane: "live".to_string(),
                slot: Some(slot),
                template_hash: Some(hash.clone()),
                ready: true,
                ..Default::default()
            })
            .collect();
        let mut current = mp.clone();
        current.status = Some(plan::plan(&mp, &owner, &obs).status);
        let server = tokio::spawn(async move {
            expect_progress_applied(&mut handle).await;
            expect(
                &mut handle,
                "PATCH",
                "/api/v1/namespaces/ns/services/demo-workers",
                200,
                echo,
            )
            .await;
            expect_nothing_more(&mut handle).await;
        });
        run_act(&ctx, &current, &owner, &obs).await.unwrap();
        server.await.unwrap();
    }

    #[test]
    fn backoff_keys_tell_the_kinds_apart() {
        assert_eq!(
            controller::backoff_key(&pipeline("demo")),
            "MatchPipeline/ns/demo"
        );
    }
}
