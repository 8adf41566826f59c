//! Pure builders of what a MatchPipeline owns besides the shared progress
//! service: its worker pods (`matchfleet-worker match`) and the Service in
//! front of their HTTP API. The env they carry is the contract with the
//! match worker; the pod around it is every fleet's ([`resources::fleet_pod_spec`]).

use k8s_openapi::api::core::v1::{Pod, PodSpec, Service};
use matchfleet_api::match_pipeline::{MatchPipelineSpec, MatchSettings};

use crate::names::{self, COLOR_BLUE, LANE_LIVE, MATCH_API_PORT, WORKER_PORT};
use crate::resources::{self, env, literal, named_port, Owner, ProgressConfig, WorkerContainer};

/// How long a match worker may take to give up a partition: finish the
/// window batch in hand (an HTTP scorer answers within its timeout, at most
/// 10 s), commit or abort its transaction and flush the partition's state.
/// Open windows need not close first: they are part of that state, restored
/// by the next owner from the changelog.
pub const DRAIN_SECONDS: i64 = 30;

/// The pod's grace period: the drain plus time to close the producer and
/// report the release.
const GRACE_SECONDS: i64 = DRAIN_SECONDS + 30;

/// The name of the container port of the health endpoints; `http` is the
/// API's, so a Service can target it by name.
const HEALTH_PORT_NAME: &str = "admin";

/// `PUT /assignment`'s drain for a released partition, in milliseconds.
pub fn drain_millis() -> u64 {
    DRAIN_SECONDS as u64 * 1000
}

/// `spec.deadLetterTopic`, else `<source.topic>.dlq`.
pub fn dead_letter_topic(spec: &MatchPipelineSpec) -> String {
    spec.dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{}.dlq", spec.source.topic))
}

/// The pipeline's progress service: leases and heartbeats, no render claims.
pub fn progress_config(spec: &MatchPipelineSpec) -> ProgressConfig<'_> {
    ProgressConfig {
        image: &spec.workers.image,
        bootstrap_servers: &spec.source.bootstrap_servers,
        heartbeat: &spec.heartbeat,
        max_attempts: None,
        slo_millis: None,
    }
}

/// `MATCH_SETTINGS`: what the worker needs of the spec, as JSON.
pub fn settings_json(spec: &MatchPipelineSpec) -> String {
    // Plain data (numbers, strings, enums) always serializes; the fallback
    // is only there so this cannot panic.
    serde_json::to_string(&MatchSettings::from_spec(spec)).unwrap_or_else(|_| "{}".to_string())
}

/// The pod spec of the live lane's match worker in slot `slot_name`.
pub fn match_pod_spec(owner: &Owner, spec: &MatchPipelineSpec, slot_name: &str) -> PodSpec {
    let (ns, name) = (&owner.namespace, &owner.name);
    let vars = vec![
        env("KAFKA_BOOTSTRAP", literal(&spec.source.bootstrap_servers)),
        env("SOURCE_TOPIC", literal(&spec.source.topic)),
        env("RESULTS_TOPIC", literal(&spec.results_topic)),
        env("DEAD_LETTER_TOPIC", literal(&dead_letter_topic(spec))),
        env(
            "CHANGELOG_TOPIC",
            literal(&names::match_state_topic(ns, name)),
        ),
        env(
            "CONSUMER_GROUP",
            literal(&names::consumer_group(ns, name, LANE_LIVE)),
        ),
        env(
            "TRANSACTIONAL_ID_PREFIX",
            literal(&names::transactional_id_prefix(ns, name, LANE_LIVE)),
        ),
        env("LANE", LANE_LIVE),
        env("SLOT", literal(slot_name)),
        env("PROGRESS_URL", literal(&names::progress_url(name, ns))),
        env(
            "HEARTBEAT_INTERVAL_MILLIS",
            spec.heartbeat.interval_millis.to_string(),
        ),
        env("MATCH_SETTINGS", literal(&settings_json(spec))),
        env("DRAIN_TIMEOUT_SECONDS", DRAIN_SECONDS.to_string()),
    ];
    resources::fleet_pod_spec(WorkerContainer {
        mode: "match",
        image: spec.workers.image.clone(),
        env: vars,
        user_env: spec.workers.env.clone().unwrap_or_default(),
        ports: vec![
            named_port("http", MATCH_API_PORT),
            named_port(HEALTH_PORT_NAME, WORKER_PORT),
        ],
        health_port: HEALTH_PORT_NAME,
        resources: spec.workers.resources.clone(),
        grace_seconds: GRACE_SECONDS,
    })
}

/// The hash of everything a match worker pod is made from (image, env,
/// settings, resources...), so a change replaces the pods.
pub fn template_hash(owner: &Owner, spec: &MatchPipelineSpec) -> String {
    resources::template_hash(&match_pod_spec(owner, spec, ""))
}

/// The live lane's worker pod in slot `slot` (color blue): `NAME-live-blue-SLOT`.
pub fn match_pod(owner: &Owner, spec: &MatchPipelineSpec, slot: i32, template_hash: &str) -> Pod {
    resources::slot_pod(owner, LANE_LIVE, slot, template_hash, |slot_name| {
        match_pod_spec(owner, spec, slot_name)
    })
}

/// `NAME-workers:8080` (name `http`): the workers' HTTP API (ingest,
/// `/matches/{user}`, WebSocket nudges), over the active color's live pods.
pub fn workers_service(owner: &Owner) -> Service {
    resources::http_service(
        owner,
        names::workers_service_name(&owner.name),
        names::common_labels(owner.fleet, &owner.name, names::COMPONENT_WORKER),
        names::lane_selector(owner.fleet, &owner.name, LANE_LIVE, COLOR_BLUE),
        MATCH_API_PORT,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::EnvVar;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use matchfleet_api::match_pipeline::{BuiltinScorer, ScorerSpec};
    use matchfleet_api::MatchPipeline;

    use crate::names::Fleet;

    /// `demo` in `ns` over `match-requests`, two built-in scorers.
    pub fn pipeline(name: &str) -> MatchPipeline {
        let spec: MatchPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"bootstrapServers": "127.0.0.1:9092", "topic": "match-requests"},
            "resultsTopic": "match-results",
            "scorers": [
                {"name": "cosine", "builtin": "cosine"},
                {"name": "opposites", "builtin": "complement"}
            ]
        }))
        .unwrap();
        let mut mp = MatchPipeline::new(name, spec);
        mp.metadata.namespace = Some("ns".to_string());
        mp.metadata.uid = Some("uid-mp".to_string());
        mp.metadata.generation = Some(1);
        mp
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

    #[test]
    fn match_pod_follows_the_contract() {
        let mut mp = pipeline("demo");
        mp.spec.workers.env = Some(vec![env("EXTRA", "1")]);
        let o = Owner::of(&mp).unwrap();
        assert_eq!(o.fleet, Fleet::MatchPipeline);
        let hash = template_hash(&o, &mp.spec);
        let pod = match_pod(&o, &mp.spec, 2, &hash);
        assert_eq!(pod.metadata.name.as_deref(), Some("demo-live-blue-2"));
        let r = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (r.kind.as_str(), r.name.as_str(), r.uid.as_str()),
            ("MatchPipeline", "demo", "uid-mp")
        );
        assert_eq!(r.controller, Some(true));
        assert_eq!(
            pod.metadata.labels.as_ref(),
            Some(&names::worker_labels(
                Fleet::MatchPipeline,
                "demo",
                "live",
                "blue",
                2
            ))
        );
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[names::TEMPLATE_HASH],
            hash
        );
        let spec = pod.spec.as_ref().unwrap();
        let sc = spec.security_context.as_ref().unwrap();
        assert_eq!(
            (sc.run_as_non_root, sc.run_as_user),
            (Some(true), Some(65532))
        );
        assert_eq!(spec.termination_grace_period_seconds, Some(60));
        let c = &spec.containers[0];
        assert_eq!(c.args, Some(vec!["match".to_string()]));
        let ports: Vec<(Option<&str>, i32)> = c
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(ports, [(Some("http"), 8080), (Some("admin"), 8081)]);
        // The probes check the health port, not the API.
        for probe in [&c.readiness_probe, &c.liveness_probe] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.port, IntOrString::String("admin".to_string()));
        }
        let readiness = c.readiness_probe.as_ref().unwrap();
        assert_eq!(
            (readiness.period_seconds, readiness.failure_threshold),
            (Some(1), Some(2))
        );

        let e = env_map(spec);
        assert_eq!(value(&e, "KAFKA_BOOTSTRAP"), "127.0.0.1:9092");
        assert_eq!(value(&e, "SOURCE_TOPIC"), "match-requests");
        assert_eq!(value(&e, "RESULTS_TOPIC"), "match-results");
        assert_eq!(value(&e, "DEAD_LETTER_TOPIC"), "match-requests.dlq");
        assert_eq!(
            value(&e, "CHANGELOG_TOPIC"),
            "matchfleet.ns.demo.match-state"
        );
        assert_eq!(value(&e, "CONSUMER_GROUP"), "matchfleet.ns.demo.live");
        assert_eq!(
            value(&e, "TRANSACTIONAL_ID_PREFIX"),
            "matchfleet.ns.demo.live"
        );
        assert_eq!(value(&e, "LANE"), "live");
        assert_eq!(value(&e, "SLOT"), "demo-live-blue-2");
        assert_eq!(
            value(&e, "PROGRESS_URL"),
            "http://demo-progress.ns.svc:8080"
        );
        assert_eq!(value(&e, "HEARTBEAT_INTERVAL_MILLIS"), "1000");
        assert_eq!(value(&e, "DRAIN_TIMEOUT_SECONDS"), "30");
        assert!(e["POD_IP"].value_from.is_some());
        let settings: MatchSettings =
            serde_json::from_str(&value(&e, "MATCH_SETTINGS")).expect("MatchSettings JSON");
        assert_eq!(settings, MatchSettings::from_spec(&mp.spec));
        // No render settings leak in; the user's env comes last.
        for render_only in ["RENDER_COMMAND", "OUTPUT_DIR", "END_OFFSETS", "CONCURRENCY"] {
            assert!(!e.contains_key(render_only), "{render_only}");
        }
        assert_eq!(c.env.as_ref().unwrap().last().unwrap().name, "EXTRA");
    }

    #[test]
    fn settings_survive_the_kubelets_variable_expansion() {
        let mut mp = pipeline("demo");
        mp.spec.scorers = vec![ScorerSpec {
            name: "remote".to_string(),
            builtin: None,
            http: Some(
                serde_json::from_value(serde_json::json!({"url": "http://s/$(HOME)"})).unwrap(),
            ),
        }];
        let o = Owner::of(&mp).unwrap();
        let e = env_map(&match_pod_spec(&o, &mp.spec, "x"));
        let raw = value(&e, "MATCH_SETTINGS");
        assert!(raw.contains("http://s/$$(HOME)"), "{raw}");
        // What the container sees after `$$` -> `$`: the spec's JSON.
        let seen: MatchSettings = serde_json::from_str(&raw.replace("$$", "$")).unwrap();
        assert_eq!(seen, MatchSettings::from_spec(&mp.spec));
    }

    #[test]
    fn template_hash_follows_the_settings() {
        let mp = pipeline("demo");
        let o = Owner::of(&mp).unwrap();
        let h = template_hash(&o, &mp.spec);
        assert_eq!(h, template_hash(&o, &mp.spec));
        let mut replicas = mp.spec.clone();
        replicas.workers.max_replicas = 99;
        assert_eq!(template_hash(&o, &replicas), h);
        let mut window = mp.spec.clone();
        window.window.size_millis += 1;
        assert_ne!(template_hash(&o, &window), h);
        let mut scorers = mp.spec.clone();
        scorers.scorers[0].builtin = Some(BuiltinScorer::Complement);
        assert_ne!(template_hash(&o, &scorers), h);
        let mut dlq = mp.spec.clone();
        dlq.dead_letter_topic = Some("bad-requests".to_string());
        assert_ne!(template_hash(&o, &dlq), h);
    }

    #[test]
    fn progress_service_is_a_fleets_without_render_settings() {
        let mp = pipeline("demo");
        let o = Owner::of(&mp).unwrap();
        let d = resources::progress_deployment(&o, &progress_config(&mp.spec));
        assert_eq!(d.metadata.name.as_deref(), Some("demo-progress"));
        let labels = d.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["matchfleet.io/matchpipeline"], "demo");
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let e = env_map(pod);
        assert_eq!(
            value(&e, "PROGRESS_CHANGELOG_TOPIC"),
            "matchfleet.ns.demo.progress"
        );
        assert_eq!(value(&e, "LEASE_MILLIS"), "6000");
        assert!(!e.contains_key("MAX_ATTEMPTS") && !e.contains_key("SLO_MILLIS"));
    }

    #[test]
    fn workers_service_selects_the_active_live_pods() {
        let mp = pipeline("demo");
        let o = Owner::of(&mp).unwrap();
        let s = workers_service(&o);
        assert_eq!(s.metadata.name.as_deref(), Some("demo-workers"));
        assert_eq!(
            s.metadata.owner_references.as_ref().unwrap()[0].kind,
            "MatchPipeline"
        );
        let spec = s.spec.unwrap();
        let selector = spec.selector.unwrap();
        let pod = names::worker_labels(Fleet::MatchPipeline, "demo", "live", "blue", 3);
        assert!(selector.iter().all(|(k, v)| pod.get(k) == Some(v)));
        assert_eq!(selector["matchfleet.io/color"], "blue");
        let green = names::worker_labels(Fleet::MatchPipeline, "demo", "live", "green", 3);
        assert!(!selector.iter().all(|(k, v)| green.get(k) == Some(v)));
        let p = &spec.ports.unwrap()[0];
        assert_eq!((p.name.as_deref(), p.port), (Some("http"), 8080));
        assert_eq!(p.target_port, Some(IntOrString::String("http".into())));
    }

    #[test]
    fn dead_letters_default_next_to_the_source() {
        let mut mp = pipeline("demo");
        assert_eq!(dead_letter_topic(&mp.spec), "match-requests.dlq");
        mp.spec.dead_letter_topic = Some("bad".to_string());
        assert_eq!(dead_letter_topic(&mp.spec), "bad");
        assert_eq!(drain_millis(), 30_000);
    }
}
