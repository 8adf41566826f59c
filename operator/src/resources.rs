//! Pure builders of the objects a fleet owns: the owner reference, the
//! progress service's Deployment and Service, and the worker pod around a
//! kind's container settings (security, probes, labels, template hash) -
//! with the RenderJob's live and backlog worker pods. What they put in env,
//! args, ports and probes is the contract with the worker image. The
//! MatchPipeline's own settings are in [`crate::pipeline::resources`].

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use matchfleet_api::fleet::HeartbeatSpec;
use matchfleet_api::render_job::RenderJobSpec;
use matchfleet_api::{MatchPipeline, RenderJob};

use crate::duration;
use crate::names::{self, Fleet, LANE_BACKLOG, LANE_LIVE, PROGRESS_PORT, WORKER_PORT};

/// The unprivileged user (and group) every container runs as: the `nonroot`
/// user of distroless images.
pub const RUN_AS: i64 = 65532;

/// The longest a worker pod may take to stop: it drains in-flight renders on
/// SIGTERM, so its grace is the render timeout plus margin, within an hour.
const MAX_GRACE_SECONDS: i64 = 3600;
/// The longest an old owner may take to drain a released partition.
const MAX_DRAIN_MILLIS: u64 = 10 * 60 * 1000;

/// Why a resource cannot be served at all (it waits for a change).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOwner {
    #[error("the resource has no namespace")]
    NoNamespace,
    #[error("the resource has no uid yet")]
    NoUid,
    #[error("invalid name {name:?}: {reason}")]
    Name { name: String, reason: String },
}

/// A custom resource that owns a fleet of progress service and workers.
pub trait FleetOwner: Resource<DynamicType = ()> {
    const FLEET: Fleet;
}

impl FleetOwner for RenderJob {
    const FLEET: Fleet = Fleet::RenderJob;
}

impl FleetOwner for MatchPipeline {
    const FLEET: Fleet = Fleet::MatchPipeline;
}

/// Who owns the built objects: the resource's kind, name, namespace and a
/// controller owner reference (garbage collection deletes them with it).
#[derive(Debug, Clone, PartialEq)]
pub struct Owner {
    pub fleet: Fleet,
    pub name: String,
    pub namespace: String,
    pub reference: OwnerReference,
}

impl Owner {
    pub fn of<K: FleetOwner>(resource: &K) -> Result<Owner, InvalidOwner> {
        let name = resource.name_any();
        if let Some(reason) = names::invalid_name_reason(&name) {
            return Err(InvalidOwner::Name { name, reason });
        }
        let namespace = resource.namespace().ok_or(InvalidOwner::NoNamespace)?;
        let mut reference = resource
            .controller_owner_ref(&())
            .ok_or(InvalidOwner::NoUid)?;
        // Foreground deletion of the resource waits for its objects.
        reference.block_owner_deletion = Some(true);
        Ok(Owner {
            fleet: K::FLEET,
            name,
            namespace,
            reference,
        })
    }

    pub(crate) fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// `spec.deadLetterTopic`, else `<source.topic>.dlq`.
pub fn dead_letter_topic(spec: &RenderJobSpec) -> String {
    spec.dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{}.dlq", spec.source.topic))
}

/// How long an owner told to release a partition may drain it: one render
/// timeout, at most ten minutes.
pub fn drain_millis(spec: &RenderJobSpec) -> u64 {
    (spec.render.timeout_seconds.max(0) as u64 * 1000).min(MAX_DRAIN_MILLIS)
}

/// A worker pod's grace period: render timeout + 30 s, at most an hour.
pub fn worker_grace_seconds(spec: &RenderJobSpec) -> i64 {
    (i64::from(spec.render.timeout_seconds.max(0)) + 30).min(MAX_GRACE_SECONDS)
}

/// The kubelet expands `$(VAR)` and turns `$$` into `$` in env values; values
/// we pass through (commands, paths) must arrive as written.
pub(crate) fn literal(s: &str) -> String {
    s.replace('$', "$$")
}

pub(crate) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn pod_ip_env() -> EnvVar {
    EnvVar {
        name: "POD_IP".to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: "status.podIP".to_string(),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// Non-root pods (the restricted Pod Security Standard).
pub fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// No privilege escalation, no capabilities. The root filesystem stays
/// writable: renders write staging files to /tmp.
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            add: None,
            drop: Some(vec!["ALL".to_string()]),
        }),
        ..SecurityContext::default()
    }
}

fn http_probe(
    path: &str,
    port: &str,
    period: i32,
    failures: i32,
    initial_delay: Option<i32>,
) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(port.to_string()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: initial_delay,
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The port every fleet's progress service and render workers serve on: `http`.
fn http_port(port: i32) -> ContainerPort {
    named_port("http", port)
}

/// A TCP container port with a name (Services and probes refer to names).
pub(crate) fn named_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }
}

/// What a fleet's progress service is made from: the parts of the spec it
/// needs, whichever kind the spec is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressConfig<'a> {
    /// The worker image (it runs `matchfleet-worker progress`).
    pub image: &'a str,
    pub bootstrap_servers: &'a str,
    pub heartbeat: &'a HeartbeatSpec,
    /// Render attempts per task (RenderJob only; otherwise the service's default).
    pub max_attempts: Option<i32>,
    /// The latency objective in milliseconds (RenderJob only).
    pub slo_millis: Option<u64>,
}

impl<'a> ProgressConfig<'a> {
    /// A RenderJob's progress service.
    pub fn render(spec: &'a RenderJobSpec) -> Self {
        ProgressConfig {
            image: &spec.workers.image,
            bootstrap_servers: &spec.source.bootstrap_servers,
            heartbeat: &spec.heartbeat,
            max_attempts: Some(spec.render.max_attempts),
            slo_millis: slo_millis(spec),
        }
    }
}

/// The progress service's Deployment: one replica, `Recreate`, because two
/// progress services over one changelog would diverge.
pub fn progress_deployment(owner: &Owner, config: &ProgressConfig) -> Deployment {
    let labels = names::progress_labels(owner.fleet, &owner.name);
    let mut env_vars = vec![
        env("KAFKA_BOOTSTRAP", literal(config.bootstrap_servers)),
        env(
            "PROGRESS_CHANGELOG_TOPIC",
            literal(&names::changelog_topic(&owner.namespace, &owner.name)),
        ),
        env("LEASE_MILLIS", config.heartbeat.lease_millis.to_string()),
    ];
    if let Some(attempts) = config.max_attempts {
        env_vars.push(env("MAX_ATTEMPTS", attempts.to_string()));
    }
    if let Some(ms) = config.slo_millis {
        env_vars.push(env("SLO_MILLIS", ms.to_string()));
    }
    env_vars.push(pod_ip_env());
    env_vars.push(env("RUST_LOG", "info"));

    let container = Container {
        name: "progress".to_string(),
        image: Some(config.image.to_string()),
        args: Some(vec!["progress".to_string()]),
        env: Some(env_vars),
        ports: Some(vec![http_port(PROGRESS_PORT)]),
        // It listens only once the changelog is replayed, so readiness is
        // "answers"; liveness waits long enough for a large replay.
        readiness_probe: Some(http_probe("/readyz", "http", 2, 3, None)),
        liveness_probe: Some(http_probe("/healthz", "http", 10, 6, Some(30))),
        security_context: Some(container_security_context()),
        ..Container::default()
    };
    Deployment {
        metadata: owner.meta(names::progress_name(&owner.name), labels.clone()),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".to_string()),
                rolling_update: None,
            }),
            revision_history_limit: Some(2),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    security_context: Some(pod_security_context()),
                    enable_service_links: Some(false),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The progress service's Service: `NAME-progress:8080` (name `http`).
pub fn progress_service(owner: &Owner) -> Service {
    let labels = names::progress_labels(owner.fleet, &owner.name);
    http_service(
        owner,
        names::progress_name(&owner.name),
        labels.clone(),
        labels,
        PROGRESS_PORT,
    )
}

/// A ClusterIP Service named `name` over the pods `selector` picks, with one
/// TCP port `port` named `http` that targets the pods' port named `http`.
pub fn http_service(
    owner: &Owner,
    name: String,
    labels: BTreeMap<String, String>,
    selector: BTreeMap<String, String>,
    port: i32,
) -> Service {
    Service {
        metadata: owner.meta(name, labels),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".to_string()),
                port,
                target_port: Some(IntOrString::String("http".to_string())),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// `spec.slo.maxLatency` in milliseconds, if there is a valid one.
pub fn slo_millis(spec: &RenderJobSpec) -> Option<u64> {
    spec.slo
        .as_ref()
        .and_then(|s| duration::parse_millis(&s.max_latency))
}

/// Which lane a worker pod serves, with what only that lane has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lane<'a> {
    /// Follows the topic from the live group's committed offsets.
    Live,
    /// Renders a bounded range: partition (as a string) -> end offset (exclusive).
    Backlog { end: &'a BTreeMap<String, i64> },
}

impl Lane<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Lane::Live => LANE_LIVE,
            Lane::Backlog { .. } => LANE_BACKLOG,
        }
    }
}

/// `END_OFFSETS` of a backlog worker: `{"0":167,"1":166}`.
pub fn end_offsets_json(end: &BTreeMap<String, i64>) -> String {
    serde_json::to_string(end).unwrap_or_else(|_| "{}".to_string())
}

/// The pod spec of the live lane's worker in slot `slot_name`.
pub fn worker_pod_spec(owner: &Owner, spec: &RenderJobSpec, slot_name: &str) -> PodSpec {
    lane_pod_spec(owner, spec, Lane::Live, slot_name)
}

/// What one kind's worker container is made of; the pod around it is the
/// same for every fleet ([`fleet_pod_spec`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerContainer {
    /// The worker's subcommand (`render`, `match`).
    pub mode: &'static str,
    pub image: String,
    /// The kind's variables, in order; `POD_IP`, `RUST_LOG` and then the
    /// user's `spec.workers.env` follow.
    pub env: Vec<EnvVar>,
    /// `spec.workers.env`: last, so it may override ours (the last
    /// definition of a name wins).
    pub user_env: Vec<EnvVar>,
    pub ports: Vec<ContainerPort>,
    /// The name of the port the health probes use (`/readyz`, `/healthz`).
    pub health_port: &'static str,
    pub resources: Option<ResourceRequirements>,
    /// How long the pod may take to drain on SIGTERM.
    pub grace_seconds: i64,
}

/// A worker pod's spec: one container, unprivileged, probed for readiness
/// every second, restarted always.
pub fn fleet_pod_spec(worker: WorkerContainer) -> PodSpec {
    let mut env_vars = worker.env;
    env_vars.extend([pod_ip_env(), env("RUST_LOG", "info")]);
    env_vars.extend(worker.user_env);
    let container = Container {
        name: "worker".to_string(),
        image: Some(worker.image),
        args: Some(vec![worker.mode.to_string()]),
        env: Some(env_vars),
        ports: Some(worker.ports),
        // Readiness is what moves a stuck worker's partitions elsewhere (the
        // plan assigns only to Ready slots), so it is checked every second.
        readiness_probe: Some(Probe {
            timeout_seconds: Some(1),
            ..http_probe("/readyz", worker.health_port, 1, 2, None)
        }),
        liveness_probe: Some(http_probe("/healthz", worker.health_port, 10, 3, Some(10))),
        resources: worker.resources,
        security_context: Some(container_security_context()),
        ..Container::default()
    };
    PodSpec {
        containers: vec![container],
        restart_policy: Some("Always".to_string()),
        termination_grace_period_seconds: Some(worker.grace_seconds),
        security_context: Some(pod_security_context()),
        enable_service_links: Some(false),
        ..PodSpec::default()
    }
}

/// The pod spec of a worker of `lane` in slot `slot_name`. Lanes differ only
/// in `LANE`, `CONSUMER_GROUP` and the backlog's `END_OFFSETS`.
pub fn lane_pod_spec(owner: &Owner, spec: &RenderJobSpec, lane: Lane, slot_name: &str) -> PodSpec {
    let (ns, job) = (&owner.namespace, &owner.name);
    let command_json =
        serde_json::to_string(&spec.render.command).unwrap_or_else(|_| "[]".to_string());
    let mut env_vars = vec![
        env("KAFKA_BOOTSTRAP", literal(&spec.source.bootstrap_servers)),
        env("SOURCE_TOPIC", literal(&spec.source.topic)),
        env(
            "CONSUMER_GROUP",
            literal(&names::consumer_group(ns, job, lane.name())),
        ),
        env("LANE", lane.name()),
    ];
    if let Lane::Backlog { end } = lane {
        env_vars.push(env("END_OFFSETS", end_offsets_json(end)));
    }
    env_vars.extend([
        env("SLOT", literal(slot_name)),
        env("PROGRESS_URL", literal(&names::progress_url(job, ns))),
        env(
            "HEARTBEAT_INTERVAL_MILLIS",
            spec.heartbeat.interval_millis.to_string(),
        ),
        env("RENDER_COMMAND", literal(&command_json)),
        env(
            "RENDER_TIMEOUT_SECONDS",
            spec.render.timeout_seconds.to_string(),
        ),
        env("OUTPUT_DIR", literal(&spec.render.output_dir)),
        env("CONCURRENCY", spec.workers.concurrency.to_string()),
        env("DEAD_LETTER_TOPIC", literal(&dead_letter_topic(spec))),
    ]);
    fleet_pod_spec(WorkerContainer {
        mode: "render",
        image: spec.workers.image.clone(),
        env: env_vars,
        user_env: spec.workers.env.clone().unwrap_or_default(),
        ports: vec![http_port(WORKER_PORT)],
        health_port: "http",
        resources: spec.workers.resources.clone(),
        grace_seconds: worker_grace_seconds(spec),
    })
}

/// The hash of everything a live worker pod's template is made from, so a
/// change of image, env, command, resources... replaces the pods.
pub fn worker_template_hash(owner: &Owner, spec: &RenderJobSpec) -> String {
    lane_template_hash(owner, spec, Lane::Live)
}

/// The template hash of a lane's worker pods (see [`template_hash`]).
pub fn lane_template_hash(owner: &Owner, spec: &RenderJobSpec, lane: Lane) -> String {
    template_hash(&lane_pod_spec(owner, spec, lane, ""))
}

/// The template hash of a worker pod spec built for the slot name `""`:
/// FNV-1a over its JSON, so it is stable across builds and Rust versions,
/// unlike `DefaultHasher`.
pub fn template_hash(template: &PodSpec) -> String {
    let bytes = serde_json::to_vec(template).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The worker pod of the live lane's slot `slot` (color blue).
pub fn worker_pod(owner: &Owner, spec: &RenderJobSpec, slot: i32, template_hash: &str) -> Pod {
    lane_pod(owner, spec, Lane::Live, slot, template_hash)
}

/// The worker pod of `lane`'s slot `slot` (color blue): `NAME-LANE-blue-SLOT`.
pub fn lane_pod(
    owner: &Owner,
    spec: &RenderJobSpec,
    lane: Lane,
    slot: i32,
    template_hash: &str,
) -> Pod {
    slot_pod(owner, lane.name(), slot, template_hash, |slot_name| {
        lane_pod_spec(owner, spec, lane, slot_name)
    })
}

/// The pod of `lane`'s slot `slot` (color blue), named
/// `NAME-LANE-blue-SLOT`, labelled for its fleet, lane, color and slot, with
/// its template hash; `spec` builds its pod spec for the slot name.
pub fn slot_pod(
    owner: &Owner,
    lane: &str,
    slot: i32,
    template_hash: &str,
    spec: impl FnOnce(&str) -> PodSpec,
) -> Pod {
    let name = names::worker_pod_name(&owner.name, lane, names::COLOR_BLUE, slot);
    let mut metadata = owner.meta(
        name.clone(),
        names::worker_labels(owner.fleet, &owner.name, lane, names::COLOR_BLUE, slot),
    );
    metadata.annotations = Some(BTreeMap::from([(
        names::TEMPLATE_HASH.to_string(),
        template_hash.to_string(),
    )]));
    Pod {
        metadata,
        spec: Some(spec(&name)),
        status: None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use matchfleet_api::fleet::SourceSpec;
    use matchfleet_api::render_job::{RenderSpec, SloSpec};

    pub fn job(name: &str) -> RenderJob {
        let mut job = RenderJob::new(
            name,
            RenderJobSpec {
                source: SourceSpec {
                    bootstrap_servers: "127.0.0.1:9092".to_string(),
                    topic: "render-events".to_string(),
                },
                render: RenderSpec {
                    command: vec![
                        "sh".to_string(),
                        "-c".to_string(),
                        "cp {value_file} {output} # $$ $(x)".to_string(),
                    ],
                    timeout_seconds: 60,
                    max_attempts: 3,
                    output_dir: "/tmp/out".to_string(),
                },
                workers: Default::default(),
                heartbeat: Default::default(),
                dead_letter_topic: None,
                slo: Some(SloSpec {
                    max_latency: "10m".to_string(),
                }),
                backlog: None,
            },
        );
        job.metadata.namespace = Some("ns".to_string());
        job.metadata.uid = Some("uid-1".to_string());
        job.metadata.generation = Some(1);
        job
    }

    fn env_map(spec: &PodSpec) -> BTreeMap<String, EnvVar> {
        spec.containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.clone()))
            .collect()
    }

    fn value(m: &BTreeMap<String, EnvVar>, k: &str) -> String {
        m.get(k)
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("no {k}"))
    }

    fn assert_owned(meta: &ObjectMeta) {
        let refs = meta.owner_references.as_ref().unwrap();
        assert_eq!(refs.len(), 1);
        let r = &refs[0];
        assert_eq!(r.kind, "RenderJob");
        assert_eq!(r.api_version, "matchfleet.io/v1alpha1");
        assert_eq!(r.name, "demo");
        assert_eq!(r.uid, "uid-1");
        assert_eq!(r.controller, Some(true));
        assert_eq!(r.block_owner_deletion, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("ns"));
        assert!(meta.finalizers.is_none());
    }

    fn assert_secure(spec: &PodSpec) {
        let p = spec.security_context.as_ref().unwrap();
        assert_eq!(p.run_as_non_root, Some(true));
        assert_eq!(p.run_as_user, Some(65532));
        assert_eq!(p.run_as_group, Some(65532));
        for c in &spec.containers {
            let s = c.security_context.as_ref().unwrap();
            assert_eq!(s.allow_privilege_escalation, Some(false));
            assert_eq!(s.read_only_root_filesystem, None);
            assert_eq!(
                s.capabilities.as_ref().unwrap().drop,
                Some(vec!["ALL".to_string()])
            );
        }
    }

    fn probe_path_port(p: &Option<Probe>) -> (String, IntOrString) {
        let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (g.path.clone().unwrap(), g.port.clone())
    }

    #[test]
    fn owner_needs_a_valid_name_namespace_and_uid() {
        let j = job("demo");
        let o = Owner::of(&j).unwrap();
        assert_eq!((o.name.as_str(), o.namespace.as_str()), ("demo", "ns"));
        let mut no_uid = j.clone();
        no_uid.metadata.uid = None;
        assert_eq!(Owner::of(&no_uid), Err(InvalidOwner::NoUid));
        let mut no_ns = j.clone();
        no_ns.metadata.namespace = None;
        assert_eq!(Owner::of(&no_ns), Err(InvalidOwner::NoNamespace));
        assert!(matches!(
            Owner::of(&job("a.b")),
            Err(InvalidOwner::Name { .. })
        ));
        assert_eq!(o.fleet, Fleet::RenderJob);
    }

    #[test]
    fn progress_deployment_follows_the_contract() {
        let j = job("demo");
        let o = Owner::of(&j).unwrap();
        let d = progress_deployment(&o, &ProgressConfig::render(&j.spec));
        assert_eq!(d.metadata.name.as_deref(), Some("demo-progress"));
        assert_owned(&d.metadata);
        let s = d.spec.as_ref().unwrap();
        assert_eq!(s.replicas, Some(1));
        assert_eq!(
            s.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
        let labels = names::progress_labels(Fleet::RenderJob, "demo");
        assert_eq!(s.selector.match_labels.as_ref(), Some(&labels));
        assert_eq!(d.metadata.labels.as_ref(), Some(&labels));
        let t = s.template.metadata.as_ref().unwrap();
        assert_eq!(t.labels.as_ref(), Some(&labels));
        let pod = s.template.spec.as_ref().unwrap();
        assert_secure(pod);
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("matchfleet/worker:dev"));
        assert_eq!(c.args, Some(vec!["progress".to_string()]));
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8080);
        assert_eq!(
            probe_path_port(&c.readiness_probe),
            ("/readyz".to_string(), IntOrString::String("http".into()))
        );
        assert_eq!(probe_path_port(&c.liveness_probe).0, "/healthz");
        let e = env_map(pod);
        assert_eq!(value(&e, "KAFKA_BOOTSTRAP"), "127.0.0.1:9092");
        assert_eq!(
            value(&e, "PROGRESS_CHANGELOG_TOPIC"),
            "matchfleet.ns.demo.progress"
        );
        assert_eq!(value(&e, "LEASE_MILLIS"), "6000");
        assert_eq!(value(&e, "MAX_ATTEMPTS"), "3");
        assert_eq!(value(&e, "SLO_MILLIS"), "600000");
        assert_eq!(value(&e, "RUST_LOG"), "info");
        assert_eq!(
            e["POD_IP"]
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "status.podIP"
        );

        let mut no_slo = j.spec.clone();
        no_slo.slo = None;
        let d = progress_deployment(&o, &ProgressConfig::render(&no_slo));
        assert!(
            !env_map(d.spec.unwrap().template.spec.as_ref().unwrap()).contains_key("SLO_MILLIS")
        );
    }

    #[test]
    fn progress_service_follows_the_contract() {
        let j = job("demo");
        let o = Owner::of(&j).unwrap();
        let s = progress_service(&o);
        assert_eq!(s.metadata.name.as_deref(), Some("demo-progress"));
        assert_owned(&s.metadata);
        let spec = s.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(
            spec.selector,
            Some(names::progress_labels(Fleet::RenderJob, "demo"))
        );
        let p = &spec.ports.unwrap()[0];
        assert_eq!((p.name.as_deref(), p.port), (Some("http"), 8080));
        assert_eq!(p.target_port, Some(IntOrString::String("http".into())));
    }

    #[test]
    fn worker_pod_follows_the_contract() {
        let mut j = job("demo");
        j.spec.workers.env = Some(vec![env("EXTRA", "1")]);
        j.spec.workers.concurrency = 7;
        let o = Owner::of(&j).unwrap();
        let hash = worker_template_hash(&o, &j.spec);
        let pod = worker_pod(&o, &j.spec, 2, &hash);
        assert_eq!(pod.metadata.name.as_deref(), Some("demo-live-blue-2"));
        assert_owned(&pod.metadata);
        assert_eq!(
            pod.metadata.labels.as_ref(),
            Some(&names::worker_labels(
                Fleet::RenderJob,
                "demo",
                "live",
                "blue",
                2
            ))
        );
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()["matchfleet.io/template-hash"],
            hash
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_secure(spec);
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.termination_grace_period_seconds, Some(90));
        let c = &spec.containers[0];
        assert_eq!(c.args, Some(vec!["render".to_string()]));
        assert_eq!(c.image.as_deref(), Some("matchfleet/worker:dev"));
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8081)
        );
        assert_eq!(probe_path_port(&c.readiness_probe).0, "/readyz");
        assert_eq!(probe_path_port(&c.liveness_probe).0, "/healthz");

        let e = env_map(spec);
        assert_eq!(value(&e, "KAFKA_BOOTSTRAP"), "127.0.0.1:9092");
        assert_eq!(value(&e, "SOURCE_TOPIC"), "render-events");
        assert_eq!(value(&e, "CONSUMER_GROUP"), "matchfleet.ns.demo.live");
        assert_eq!(value(&e, "LANE"), "live");
        assert_eq!(value(&e, "SLOT"), "demo-live-blue-2");
        assert_eq!(
            value(&e, "PROGRESS_URL"),
            "http://demo-progress.ns.svc:8080"
        );
        assert_eq!(value(&e, "HEARTBEAT_INTERVAL_MILLIS"), "1000");
        // JSON, with `$` escaped so the kubelet's `$(VAR)` expansion gives it back as written.
        assert_eq!(
            value(&e, "RENDER_COMMAND"),
            r#"["sh","-c","cp {value_file} {output} # $$$$ $$(x)"]"#
        );
        assert_eq!(value(&e, "RENDER_TIMEOUT_SECONDS"), "60");
        assert_eq!(value(&e, "OUTPUT_DIR"), "/tmp/out");
        assert_eq!(value(&e, "CONCURRENCY"), "7");
        assert_eq!(value(&e, "DEAD_LETTER_TOPIC"), "render-events.dlq");
        assert_eq!(value(&e, "RUST_LOG"), "info");
        assert!(e["POD_IP"].value_from.is_some());
        // User env is appended last.
        assert_eq!(c.env.as_ref().unwrap().last().unwrap().name, "EXTRA");
        assert_eq!(value(&e, "EXTRA"), "1");
    }

    #[test]
    fn backlog_pod_differs_from_a_live_one_only_in_lane_group_and_end_offsets() {
        let j = job("demo");
        let o = Owner::of(&j).unwrap();
        let end: BTreeMap<String, i64> = [("0".to_string(), 167), ("1".to_string(), 166)].into();
        let lane = Lane::Backlog { end: &end };
        let hash = lane_template_hash(&o, &j.spec, lane);
        assert_ne!(hash, worker_template_hash(&o, &j.spec));
        let pod = lane_pod(&o, &j.spec, lane, 1, &hash);
        assert_eq!(pod.metadata.name.as_deref(), Some("demo-backlog-blue-1"));
        assert_owned(&pod.metadata);
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["matchfleet.io/lane"], "backlog");
        assert_eq!(labels["matchfleet.io/slot"], "1");
        assert_eq!(labels["matchfleet.io/renderjob"], "demo");
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()["matchfleet.io/template-hash"],
            hash
        );
        let e = env_map(pod.spec.as_ref().unwrap());
        assert_eq!(value(&e, "LANE"), "backlog");
        assert_eq!(value(&e, "CONSUMER_GROUP"), "matchfleet.ns.demo.backlog");
        assert_eq!(value(&e, "END_OFFSETS"), r#"{"0":167,"1":166}"#);
        assert_eq!(value(&e, "SLOT"), "demo-backlog-blue-1");
        // Everything else as in a live pod of the same slot.
        let live = worker_pod(&o, &j.spec, 1, "x");
        let mut le = env_map(live.spec.as_ref().unwrap());
        for k in ["LANE", "CONSUMER_GROUP", "SLOT"] {
            le.remove(k);
        }
        let mut be = e.clone();
        for k in ["LANE", "CONSUMER_GROUP", "SLOT", "END_OFFSETS"] {
            be.remove(k);
        }
        assert_eq!(be, le);
        assert!(!env_map(live.spec.as_ref().unwrap()).contains_key("END_OFFSETS"));
        // The range is part of the template.
        let other: BTreeMap<String, i64> = [("0".to_string(), 1)].into();
        assert_ne!(
            lane_template_hash(&o, &j.spec, Lane::Backlog { end: &other }),
            hash
        );
    }

    #[test]
    fn template_hash_tracks_template_inputs_only() {
        let j = job("demo");
        let o = Owner::of(&j).unwrap();
        let h = worker_template_hash(&o, &j.spec);
        assert_eq!(h.len(), 16);
        assert_eq!(h, worker_template_hash(&o, &j.spec));
        // Not part of the worker template: replicas, SLO, attempts.
        let mut same = j.spec.clone();
        same.workers.max_replicas = 99;
        same.slo = None;
        same.render.max_attempts = 9;
        assert_eq!(worker_template_hash(&o, &same), h);
        // Part of it: image, command, env, resources...
        let mut image = j.spec.clone();
        image.workers.image = "matchfleet/worker:v2".to_string();
        assert_ne!(worker_template_hash(&o, &image), h);
        let mut cmd = j.spec.clone();
        cmd.render.command.push("x".to_string());
        assert_ne!(worker_template_hash(&o, &cmd), h);
        let mut env_changed = j.spec.clone();
        env_changed.workers.env = Some(vec![env("A", "b")]);
        assert_ne!(worker_template_hash(&o, &env_changed), h);
    }

    #[test]
    fn template_hash_is_stable_across_builds() {
        // A change here replaces every running RenderJob worker on upgrade:
        // only a deliberate change of the worker template may move it.
        let j = job("demo");
        let o = Owner::of(&j).unwrap();
        assert_eq!(worker_template_hash(&o, &j.spec), "59e27bb279f9cde6");
    }

    #[test]
    fn limits() {
        let mut j = job("demo");
        assert_eq!(drain_millis(&j.spec), 60_000);
        assert_eq!(dead_letter_topic(&j.spec), "render-events.dlq");
        j.spec.render.timeout_seconds = 86_400;
        assert_eq!(drain_millis(&j.spec), 600_000);
        assert_eq!(worker_grace_seconds(&j.spec), 3600);
        j.spec.dead_letter_topic = Some("bad".to_string());
        assert_eq!(dead_letter_topic(&j.spec), "bad");
    }
}
