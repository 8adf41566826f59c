//! What both controllers (RenderJob, MatchPipeline) share at run time: the
//! context, the errors and their backoff, the I/O of acting on a plan
//! (server-side apply, worker pods, the status patch, Events), and the
//! wiring of a `kube::runtime::Controller` that owns Pods, Deployments and
//! Services.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::serde::de::DeserializeOwned;
use k8s_openapi::serde::Serialize;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher, PredicateConfig, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use matchfleet_api::fleet::Condition;
use matchfleet_api::progress::Assignment;

use tracing::Instrument;

use crate::fleet::{assignment_failed, worker_refused, FleetStatus, PlannedEvent, REQUEUE_BUSY};
use crate::kafka::Kafka;
use crate::metrics::Metrics;
use crate::names::{self, MANAGER};
use crate::progress_client::ProgressClient;
use crate::resources::{InvalidOwner, Owner};

/// Longest wait after repeated failures of one resource.
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
    Invalid(#[from] InvalidOwner),
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

/// The backoff key of an object: kind, namespace and name, as a RenderJob and
/// a MatchPipeline may share a name.
pub fn backoff_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Runs one reconcile of `obj` in its own span, counts it in the metrics and
/// clears the object's backoff when it succeeds.
pub async fn instrumented<K: Resource<DynamicType = ()>>(
    obj: &K,
    ctx: &Context,
    work: impl Future<Output = Result<Action, Error>>,
) -> Result<Action, Error> {
    let span = tracing::info_span!(
        "reconcile",
        kind = %K::kind(&()),
        name = %obj.name_any(),
        namespace = %obj.namespace().unwrap_or_default(),
        generation = obj.meta().generation.unwrap_or_default(),
    );
    let start = Instant::now();
    let result = work.instrument(span).await;
    ctx.metrics
        .reconciled(start.elapsed(), result.as_ref().err().map(Error::category));
    if result.is_ok() {
        ctx.succeeded(&backoff_key(obj));
    }
    result
}

/// Backoff doubling from 1 s to a minute per object, with a log line.
pub fn backoff<K: Resource<DynamicType = ()>>(obj: &K, error: &Error, ctx: &Context) -> Action {
    let key = backoff_key(obj);
    let (n, wait) = ctx.failed(&key);
    tracing::warn!(
        object = %key,
        error = %error,
        failures = n,
        retry_in = ?wait,
        "reconcile failed"
    );
    Action::requeue(wait)
}

pub fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Shared by every reconcile of both controllers.
pub struct Context {
    pub client: Client,
    pub kafka: Kafka,
    pub progress: ProgressClient,
    pub metrics: Arc<Metrics>,
    pub reporter: Reporter,
    /// Consecutive failures per resource, for backoff.
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

    /// Forgets the failures of `key` (it reconciled, or it is gone).
    pub fn succeeded(&self, key: &str) {
        self.failures().remove(key);
    }

    /// Counts one more failure of `key`: how many in a row, and how long to
    /// wait, doubling from 1 s to a minute.
    pub fn failed(&self, key: &str) -> (u32, Duration) {
        let n = {
            let mut failures = self.failures();
            let n = failures.entry(key.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        let wait = Duration::from_secs(1u64 << n.saturating_sub(1).min(6)).min(MAX_BACKOFF);
        (n, wait)
    }
}

/// Server-side applies the progress service's Deployment and Service, with
/// a `CreatedProgressService` Event when the Deployment did not exist.
pub async fn apply_progress(
    client: &Client,
    owner: &Owner,
    (deployment, service): &(Deployment, Service),
    existed: bool,
    events: &mut Vec<PlannedEvent>,
) -> Result<(), Error> {
    let ns = owner.namespace.as_str();
    let name = names::progress_name(&owner.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .patch(&name, &apply_params(), &Patch::Apply(deployment))
        .await
        .map_err(kube_err(format!("apply Deployment {ns}/{name}")))?;
    apply_service(client, ns, service).await?;
    if !existed {
        events.push(PlannedEvent::normal(
            "CreatedProgressService",
            format!("created the progress service {name} (Deployment and Service)"),
        ));
    }
    Ok(())
}

/// Server-side applies a Service we own.
pub async fn apply_service(client: &Client, ns: &str, service: &Service) -> Result<(), Error> {
    let name = service.name_any();
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    services
        .patch(&name, &apply_params(), &Patch::Apply(service))
        .await
        .map_err(kube_err(format!("apply Service {ns}/{name}")))?;
    Ok(())
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// What acting corrects in the planned status (the plan assumed its actions
/// would succeed), and the Events about what it did.
pub struct Acted<'a, S> {
    pub status: &'a mut S,
    /// The conditions before this reconcile, for their transition times.
    pub previous: &'a [Condition],
    pub now: Timestamp,
    pub events: &'a mut Vec<PlannedEvent>,
}

/// Creates and deletes worker pods, with an Event per pod created, refused
/// or deleted. A pod the API server refuses for a reason that stays until
/// something changes (400, 403, 422: an invalid env, a quota, a policy)
/// makes the status Degraded. Returns the first failure, for the caller to
/// return after the status is written, so a pod that cannot be created does
/// not hide the rest of the picture.
pub async fn change_pods<S: FleetStatus>(
    client: &Client,
    ns: &str,
    create: &[Pod],
    delete: &[String],
    acted: &mut Acted<'_, S>,
) -> Option<Error> {
    let created = create_pods(client, ns, create, acted.events).await;
    for (pod, error) in &created.refused {
        worker_refused(acted.status, acted.previous, pod, error, acted.now);
    }
    let deleted = delete_pods(client, ns, delete, acted.events).await;
    created.failure.or(deleted)
}

/// Sends the assignment, unless the progress service did not even answer
/// `/status` (the next reconcile tries again). When the service does not take
/// it, `Ready` says so and the next reconcile comes soon. Returns whether it
/// was taken.
pub async fn send_assignment<S: FleetStatus>(
    ctx: &Context,
    owner: &Owner,
    assignment: Option<&Assignment>,
    service_answered: bool,
    acted: &mut Acted<'_, S>,
    requeue: &mut Duration,
) -> bool {
    let Some(assignment) = assignment.filter(|_| service_answered) else {
        return false;
    };
    let url = names::progress_url(&owner.name, &owner.namespace);
    match ctx.progress.put_assignment(&url, assignment).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "the progress service did not take the assignment");
            assignment_failed(
                acted.status,
                acted.previous,
                &owner.name,
                &e.to_string(),
                acted.now,
            );
            *requeue = (*requeue).min(REQUEUE_BUSY);
            false
        }
    }
}

/// What creating worker pods came to, besides the Events it added.
#[derive(Debug, Default)]
struct Created {
    /// Pods refused for a reason that stays: (pod name, error).
    refused: Vec<(String, String)>,
    failure: Option<Error>,
}

/// Creates worker pods; a pod that exists already (a watch lagging behind)
/// is left for the next reconcile.
async fn create_pods(
    client: &Client,
    ns: &str,
    pods: &[Pod],
    events: &mut Vec<PlannedEvent>,
) -> Created {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut out = Created::default();
    for pod in pods {
        let name = pod.name_any();
        match api.create(&PostParams::default(), pod).await {
            Ok(_) => {
                tracing::info!(pod = %name, "created worker pod");
                events.push(
                    PlannedEvent::normal("CreatedWorker", format!("created worker pod {name}"))
                        .about(pod_ref(ns, &name)),
                );
            }
            Err(e) if api_code(&e) == Some(409) => {}
            Err(e) => {
                events.push(
                    PlannedEvent::warning(
                        "FailedCreateWorker",
                        format!("cannot create worker pod {name}: {e}"),
                    )
                    .about(pod_ref(ns, &name)),
                );
                if matches!(api_code(&e), Some(400 | 403 | 422)) {
                    out.refused.push((name.clone(), e.to_string()));
                }
                out.failure
                    .get_or_insert(kube_err(format!("create Pod {ns}/{name}"))(e));
            }
        }
    }
    out
}

/// Deletes worker pods by name; one already gone is fine.
async fn delete_pods(
    client: &Client,
    ns: &str,
    names: &[String],
    events: &mut Vec<PlannedEvent>,
) -> Option<Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut failure = None;
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
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
    failure
}

pub fn pod_ref(namespace: &str, name: &str) -> ObjectReference {
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
/// `spec.backlog`, a rate that is no longer measured) is sent as an explicit
/// null, and so is an empty live assignment.
pub fn status_patch<S: Serialize>(previous: Option<&S>, status: &S) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(old) = previous.and_then(|p| serde_json::to_value(p).ok()) {
        null_removed(&old, &mut value);
    }
    // An empty assignment is left out of the serialized status.
    if let Some(live) = value.get_mut("live").and_then(|l| l.as_object_mut()) {
        live.entry("assignment").or_insert(serde_json::Value::Null);
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

/// Patches the status subresource of `resource`, only when it changed.
pub async fn write_status<K, S>(
    client: &Client,
    resource: &K,
    previous: Option<&S>,
    status: &S,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
    S: Serialize + PartialEq,
{
    if previous == Some(status) {
        return Ok(());
    }
    let ns = resource.namespace().unwrap_or_default();
    let name = resource.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(status_patch(previous, status)),
    )
    .await
    .map_err(kube_err(format!(
        "patch status of {} {ns}/{name}",
        K::kind(&())
    )))?;
    Ok(())
}

/// Events are best effort: a failure is logged, not a failed reconcile.
pub async fn publish(recorder: &Recorder, reference: &ObjectReference, events: &[PlannedEvent]) {
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

/// What of a resource triggers a reconcile: its spec (generation) and its
/// annotations (pause). Status writes, ours included, do not: the requeue
/// timer polls, or every status patch would trigger another reconcile.
pub fn spec_or_annotations<K: Resource>(resource: &K) -> Option<u64> {
    let meta = resource.meta();
    let mut h = DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.annotations.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// Runs a controller for `K` (owning our Pods, Deployments and Services)
/// until `shutdown` completes and in-flight reconciles end.
pub async fn run<K, Fut>(
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    reconcile: impl FnMut(Arc<K>, Arc<Context>) -> Fut,
    error_policy: impl Fn(Arc<K>, &Error, Arc<Context>) -> Action,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    let kind = K::kind(&()).to_string();
    let client = ctx.client.clone();
    let (reader, writer) = reflector::store();
    let resources = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(spec_or_annotations::<K>, PredicateConfig::default());
    // Only what this operator manages: label-filtered watches keep the
    // operator's memory independent of the cluster's size.
    let owned = || watcher::Config::default().labels(&names::managed_selector());
    tracing::info!(%kind, "controller starting");
    Controller::for_stream(resources, reader)
        .owns(Api::<Pod>::all(client.clone()), owned())
        .owns(Api::<Deployment>::all(client.clone()), owned())
        .owns(Api::<Service>::all(client), owned())
        // Pod status changes come in bursts (a rollout, a restart): one
        // reconcile per burst is enough.
        .with_config(controller::Config::default().debounce(Duration::from_millis(500)))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            let kind = kind.clone();
            async move {
                match result {
                    Ok(_) => {}
                    // Logged with its backoff by the error policy.
                    Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                    Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                        tracing::debug!(%obj, "the {kind} is gone");
                    }
                    Err(e) => tracing::warn!(%kind, error = %e, "controller error"),
                }
            }
        })
        .await;
    tracing::info!(%kind, "controller stopped");
}

/// A mock API server for tests of `act`: each expected request is checked
/// (method, path) and answered.
#[cfg(test)]
pub(crate) mod mock {
    use super::*;
    use serde_json::{json, Value};

    pub type Handle = tower_test::mock::Handle<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >;

    /// A context whose client talks to the returned handle.
    pub fn context() -> (Context, Handle) {
        let (service, handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let ctx = Context::new(
            Client::new(service, "default"),
            ProgressClient::new().unwrap(),
            Arc::new(Metrics::default()),
            "test".to_string(),
        );
        (ctx, handle)
    }

    /// A request the operator made, as the mock API server saw it.
    pub struct Seen {
        pub uri: String,
        pub content_type: Option<String>,
        pub body: Value,
    }

    /// Expects the server-side applies of the progress Deployment and Service
    /// of `demo` in `ns`.
    pub async fn expect_progress_applied(handle: &mut Handle) {
        let path = "/apis/apps/v1/namespaces/ns/deployments/demo-progress";
        expect(handle, "PATCH", path, 200, echo).await;
        let path = "/api/v1/namespaces/ns/services/demo-progress";
        expect(handle, "PATCH", path, 200, echo).await;
    }

    /// Expects the next request to be `method path`, answers `status` with
    /// what `respond` makes of the request body.
    pub async fn expect(
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

    pub fn echo(body: &Value) -> Value {
        body.clone()
    }

    pub fn failure(code: u16, reason: &str) -> impl FnOnce(&Value) -> Value {
        let reason = reason.to_string();
        move |_| {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": format!("mock {reason}"), "reason": reason, "code": code})
        }
    }

    /// Asserts that no further request comes within 200 ms.
    pub async fn expect_nothing_more(handle: &mut Handle) {
        assert!(
            tokio::time::timeout(Duration::from_millis(200), handle.next_request())
                .await
                .is_err(),
            "no more requests"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchfleet_api::{MatchPipelineStatus, RenderJobStatus};
    use serde_json::{json, Value};

    #[tokio::test]
    async fn backoff_doubles_to_a_minute_per_key() {
        let (ctx, _handle) = mock::context();
        let waits: Vec<u64> = (0..9).map(|_| ctx.failed("a").1.as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(ctx.failed("b"), (1, Duration::from_secs(1)));
        ctx.succeeded("a");
        assert_eq!(ctx.failed("a").0, 1);
    }

    #[test]
    fn the_patch_nulls_what_went_away_for_either_kind() {
        let old = MatchPipelineStatus {
            matches_per_second: Some("12.5".to_string()),
            ..Default::default()
        };
        let new = MatchPipelineStatus::default();
        let v = status_patch(Some(&old), &new);
        assert_eq!(v["status"]["matchesPerSecond"], Value::Null);
        assert!(v["status"]
            .as_object()
            .unwrap()
            .contains_key("matchesPerSecond"));
        assert_eq!(v["status"]["live"]["assignment"], Value::Null);
        let mut with = RenderJobStatus::default();
        with.live.assignment.insert("0".to_string(), 1);
        let v = status_patch(None, &with);
        assert_eq!(v["status"]["live"]["assignment"], json!({"0": 1}));
    }
}
