//! The RenderJob controller: observe -> plan -> act. Observation and the
//! plan are in their own modules; this one owns the I/O of acting (server-side
//! apply, pod create/delete, the assignment, the status patch, Events) and the
//! wiring of `kube::runtime::Controller`.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher, PredicateConfig, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use matchfleet_api::{RenderJob, RenderJobStatus};
use tracing::Instrument;

use crate::kafka::Kafka;
use crate::metrics::Metrics;
use crate::names::{self, MANAGER};
use crate::observe;
use crate::plan::{self, Plan, PlannedEvent};
use crate::progress_client::ProgressClient;
use crate::resources::{InvalidJob, Owner};

/// Longest wait after repeated failures of one RenderJob.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Invalid(#[from] InvalidJob),
}

impl Error {
    /// A bounded label for the errors metric.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_api",
            Error::Invalid(_) => "invalid_object",
        }
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub kafka: Kafka,
    pub progress: ProgressClient,
    pub metrics: Arc<Metrics>,
    pub reporter: Reporter,
    /// Consecutive failures per RenderJob (`namespace/name`), for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        progress: ProgressClient,
        metrics: Arc<Metrics>,
        instance: String,
    ) -> Self {
        Context {
            client,
            kafka: Kafka::default(),
            progress,
            metrics,
            reporter: Reporter {
                controller: MANAGER.to_string(),
                instance: Some(instance),
            },
            failures: Mutex::default(),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn key(job: &RenderJob) -> String {
    format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any())
}

/// One reconcile of one RenderJob, in its own span.
pub async fn reconcile(job: Arc<RenderJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!(
        "reconcile",
        name = %job.name_any(),
        namespace = %job.namespace().unwrap_or_default(),
        generation = job.metadata.generation.unwrap_or_default(),
    );
    let start = Instant::now();
    let result = reconcile_job(&job, &ctx).instrument(span).await;
    ctx.metrics
        .reconciled(start.elapsed(), result.as_ref().err().map(Error::category));
    if result.is_ok() {
        ctx.failures().remove(&key(&job));
    }
    result
}

/// Backoff doubling from 1 s to a minute per RenderJob, with a log line.
pub fn error_policy(job: Arc<RenderJob>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut failures = ctx.failures();
        let n = failures.entry(key(&job)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let wait = Duration::from_secs(1u64 << n.saturating_sub(1).min(6)).min(MAX_BACKOFF);
    tracing::warn!(
        renderjob = %key(&job),
        error = %error,
        failures = n,
        retry_in = ?wait,
        "reconcile failed"
    );
    Action::requeue(wait)
}

async fn reconcile_job(job: &RenderJob, ctx: &Context) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes what it owns; there are no finalizers.
        ctx.failures().remove(&key(job));
        return Ok(Action::await_change());
    }
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let reference = job.object_ref(&());
    let owner = match Owner::of(job) {
        Ok(o) => o,
        Err(InvalidJob::Name { name, reason }) => {
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
        .map_err(kube_err("observe"))?;
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
    // The first failure is returned after the status is written, so a pod
    // that cannot be created does not hide the rest of the picture.
    let mut failure: Option<Error> = None;

    if let Some((deployment, service)) = &plan.progress {
        let apply = PatchParams::apply(MANAGER).force();
        let name = names::progress_name(&owner.name);
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
        deployments
            .patch(&name, &apply, &Patch::Apply(deployment))
            .await
            .map_err(kube_err(format!("apply Deployment {ns}/{name}")))?;
        services
            .patch(&name, &apply, &Patch::Apply(service))
            .await
            .map_err(kube_err(format!("apply Service {ns}/{name}")))?;
        if !observed.progress.deployment_exists {
            events.push(PlannedEvent::normal(
                "CreatedProgressService",
                format!("created the progress service {name} (Deployment and Service)"),
            ));
        }
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

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for pod in &plan.create {
        let name = pod.name_any();
        match pods.create(&PostParams::default(), pod).await {
            Ok(_) => {
                tracing::info!(pod = %name, "created worker pod");
                events.push(
                    PlannedEvent::normal("CreatedWorker", format!("created worker pod {name}"))
                        .about(pod_ref(ns, &name)),
                );
            }
            // Still there from before (a watch lagging behind): next time.
            Err(e) if api_code(&e) == Some(409) => {}
            Err(e) => {
                events.push(
                    PlannedEvent::warning(
                        "FailedCreateWorker",
                        format!("cannot create worker pod {name}: {e}"),
                    )
                    .about(pod_ref(ns, &name)),
                );
                // Refused for a reason that stays until something changes.
                if matches!(api_code(&e), Some(400 | 403 | 422)) {
                    plan::worker_refused(
                        &mut plan.status,
                        previous_conditions(job),
                        &name,
                        &e.to_string(),
                        observed.now,
                    );
                }
                failure.get_or_insert(kube_err(format!("create Pod {ns}/{name}"))(e));
            }
        }
    }
    for name in &plan.delete {
        match pods.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(pod = %name, "deleted worker pod");
                events.push(
                    PlannedEvent::normal("DeletedWorker", format!("deleted worker pod {name}"))
                        .about(pod_ref(ns, name)),
                );
            }
            Err(e) if api_code(&e) == Some(404) => {}
            Err(e) => {
                failure.get_or_insert(kube_err(format!("delete Pod {ns}/{name}"))(e));
            }
        }
    }

    // The assignment goes out on every reconcile (the service takes the same
    // one again as a no-op), unless the service did not even answer /status.
    if let Some(assignment) = &plan.assignment {
        if observed.progress.status.is_some() {
            let url = names::progress_url(&owner.name, ns);
            if let Err(e) = ctx.progress.put_assignment(&url, assignment).await {
                tracing::warn!(error = %e, "the progress service did not take the assignment");
                plan::assignment_failed(
                    &mut plan.status,
                    previous_conditions(job),
                    &owner.name,
                    &e.to_string(),
                    observed.now,
                );
                plan.requeue = plan.requeue.min(plan::REQUEUE_BUSY);
            }
        }
    }

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

fn pod_ref(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Pod".to_string()),
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        ..ObjectReference::default()
    }
}

/// The status as a merge patch. Merge patches cannot remove a field by
/// leaving it out, so every field the previous status had and this one does
/// not (a finished partition's assignment, the backlog of a removed
/// `spec.backlog`) is sent as an explicit null, and so is an empty live
/// assignment.
pub fn status_patch(
    previous: Option<&RenderJobStatus>,
    status: &RenderJobStatus,
) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(old) = previous.and_then(|p| serde_json::to_value(p).ok()) {
        null_removed(&old, &mut value);
    }
    if status.live.assignment.is_empty() {
        if let Some(live) = value.get_mut("live").and_then(|l| l.as_object_mut()) {
            live.insert("assignment".to_string(), serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": value })
}

/// Adds a null to `new` for every object key `old` has and `new` lacks, at
/// any depth (arrays are replaced whole by a merge patch).
fn null_removed(old: &serde_json::Value, new: &mut serde_json::Value) {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object_mut()) else {
        return;
    };
    for (k, v) in old {
        match new.get_mut(k) {
            Some(n) => null_removed(v, n),
            None => {
                new.insert(k.clone(), serde_json::Value::Null);
            }
        }
    }
}

/// Patches the status subresource, only when it changed.
async fn write_status(
    ctx: &Context,
    job: &RenderJob,
    status: &RenderJobStatus,
) -> Result<(), Error> {
    if job.status.as_ref() == Some(status) {
        return Ok(());
    }
    let ns = job.namespace().unwrap_or_default();
    let api: Api<RenderJob> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &job.name_any(),
        &PatchParams::default(),
        &Patch::Merge(status_patch(job.status.as_ref(), status)),
    )
    .await
    .map_err(kube_err(format!(
        "patch status of RenderJob {ns}/{}",
        job.name_any()
    )))?;
    Ok(())
}

/// Events are best effort: a failure is logged, not a failed reconcile.
async fn publish(recorder: &Recorder, reference: &ObjectReference, events: &[PlannedEvent]) {
    for e in events {
        let event = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.to_string(),
            note: Some(e.note.chars().take(1000).collect()),
            action: "Reconcile".to_string(),
            secondary: e.related.clone(),
        };
        if let Err(err) = recorder.publish(&event, reference).await {
            tracing::warn!(reason = e.reason, error = %err, "cannot publish an Event");
        }
    }
}

/// What of a RenderJob triggers a reconcile: its spec (generation) and its
/// annotations (pause). Status writes, ours included, do not: the requeue
/// timer polls, or every status patch would trigger another reconcile.
fn spec_or_annotations(job: &RenderJob) -> Option<u64> {
    let mut h = DefaultHasher::new();
    job.metadata.generation.hash(&mut h);
    job.metadata.annotations.hash(&mut h);
    job.metadata.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// Runs the controller until `shutdown` completes and in-flight reconciles end.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (reader, writer) = reflector::store();
    let jobs = watcher(
        Api::<RenderJob>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(spec_or_annotations, PredicateConfig::default());
    // Only what this operator manages: label-filtered watches keep the
    // operator's memory independent of the cluster's size.
    let owned = || watcher::Config::default().labels(&names::managed_selector());
    tracing::info!("controller starting");
    Controller::for_stream(jobs, reader)
        .owns(Api::<Pod>::all(client.clone()), owned())
        .owns(Api::<Deployment>::all(client.clone()), owned())
        .owns(Api::<Service>::all(client), owned())
        // Pod status changes come in bursts (a rollout, a restart): one
        // reconcile per burst is enough.
        .with_config(controller::Config::default().debounce(Duration::from_millis(500)))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                // Logged with its backoff by error_policy.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                    tracing::debug!(%obj, "RenderJob is gone");
                }
                Err(e) => tracing::warn!(error = %e, "controller error"),
            }
        })
        .await;
    tracing::info!("controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{KafkaObservation, TopicState};
    use crate::observe::{Observed, ProgressObservation, WorkerPod};
    use serde_json::{json, Value};

    type Handle = tower_test::mock::Handle<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >;

    /// A request the operator made, as the mock API server saw it.
    struct Seen {
        uri: String,
        content_type: Option<String>,
        body: Value,
    }

    /// Expects the server-side applies of the progress Deployment and Service.
    async fn expect_progress_applied(handle: &mut Handle) {
        let path = "/apis/apps/v1/namespaces/ns/deployments/demo-progress";
        expect(handle, "PATCH", path, 200, echo).await;
        let path = "/api/v1/namespaces/ns/services/demo-progress";
        expect(handle, "PATCH", path, 200, echo).await;
    }

    /// Expects the next request to be `method path`, answers `status` with
    /// what `respond` makes of the request body.
    async fn expect(
        handle: &mut Handle,
        method: &str,
        path: &str,
        status: u16,
        respond: impl FnOnce(&Value) -> Value,
    ) -> Seen {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!(
            (request.method().as_str(), request.uri().path()),
            (method, path),
            "{}",
            request.uri()
        );
        let uri = request.uri().to_string();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let answer = respond(&body);
        send.send_response(
            http::Response::builder()
                .status(status)
                .body(kube::client::Body::from(
                    serde_json::to_vec(&answer).unwrap(),
                ))
                .unwrap(),
        );
        Seen {
            uri,
            content_type,
            body,
        }
    }

    fn echo(body: &Value) -> Value {
        body.clone()
    }

    fn failure(code: u16, reason: &str) -> impl FnOnce(&Value) -> Value {
        let reason = reason.to_string();
        move |_| {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": format!("mock {reason}"), "reason": reason, "code": code})
        }
    }

    fn setup() -> (Context, Handle, RenderJob, Owner) {
        let (service, handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(service, "default");
        let ctx = Context::new(
            client,
            ProgressClient::new().unwrap(),
            Arc::new(Metrics::default()),
            "test".to_string(),
        );
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
