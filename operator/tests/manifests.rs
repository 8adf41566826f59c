//! The install manifests and the examples agree with what the operator does:
//! the ClusterRole grants exactly the verbs the code uses, the Deployment
//! gives the operator the environment it reads, and the example RenderJob and
//! MatchPipeline are ones the operator can serve.

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use kube::ResourceExt;
use matchfleet_api::match_pipeline::{BuiltinScorer, MatchSettings};
use matchfleet_api::{MatchPipeline, RenderJob};
use serde::de::DeserializeOwned;
use serde::Deserialize;

fn read(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn documents(path: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(&read(path))
        .map(|d| serde_json::Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn one<T: DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> T {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    serde_json::from_value(found[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// (apiGroup, resource, verb) triples a set of rules grants.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn triples(list: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String)> {
    list.iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn operator_manifest_has_everything_in_order() {
    let docs = documents("manifests/operator.yaml");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment"
        ]
    );
    for d in &docs[1..] {
        if d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding" {
            assert_eq!(
                d["metadata"]["namespace"], "matchfleet-system",
                "{}",
                d["kind"]
            );
        }
    }
}

#[test]
fn cluster_role_grants_exactly_what_the_operator_uses() {
    let docs = documents("manifests/operator.yaml");
    let role: ClusterRole = one(&docs, "ClusterRole");
    assert_eq!(role.name_any(), "matchfleet-operator");
    let used: &[(&str, &str, &[&str])] = &[
        ("matchfleet.io", "renderjobs", &["get", "list", "watch"]),
        (
            "matchfleet.io",
            "renderjobs/status",
            &["get", "patch", "update"],
        ),
        // The MatchPipeline controller lists and watches its resources and
        // merge-patches their status, nothing more.
        ("matchfleet.io", "matchpipelines", &["list", "watch"]),
        ("matchfleet.io", "matchpipelines/status", &["patch"]),
        ("", "pods", &["get", "list", "watch", "create", "delete"]),
        ("", "services", &["get", "list", "watch", "create", "patch"]),
        (
            "apps",
            "deployments",
            &["get", "list", "watch", "create", "patch"],
        ),
        // kube-runtime's Recorder writes events.k8s.io/v1 Events.
        ("events.k8s.io", "events", &["create", "patch"]),
    ];
    assert_eq!(
        grants(role.rules.as_deref().unwrap_or_default()),
        triples(used)
    );

    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, "matchfleet-operator");
    let s = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
        (
            "ServiceAccount",
            "matchfleet-operator",
            Some("matchfleet-system")
        )
    );
}

#[test]
fn leader_election_is_namespaced() {
    let docs = documents("manifests/operator.yaml");
    let role: Role = one(&docs, "Role");
    assert_eq!(
        grants(role.rules.as_deref().unwrap_or_default()),
        triples(&[(
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"]
        )])
    );
    let binding: RoleBinding = one(&docs, "RoleBinding");
    assert_eq!(binding.role_ref.name, role.name_any());
    assert_eq!(
        binding.subjects.as_ref().unwrap()[0].name,
        "matchfleet-operator"
    );
}

#[test]
fn operator_deployment_gives_what_the_binary_reads() {
    let docs = documents("manifests/operator.yaml");
    let d: Deployment = one(&docs, "Deployment");
    assert_eq!(d.name_any(), "matchfleet-operator");
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("matchfleet-operator")
    );
    let sc = pod.security_context.unwrap();
    assert_eq!(
        (sc.run_as_non_root, sc.run_as_user, sc.run_as_group),
        (Some(true), Some(65532), Some(65532))
    );
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("matchfleet/operator:dev"));
    assert_eq!(c.args, Some(vec!["--leader-elect".to_string()]));
    let field = |name: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        field("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    assert_eq!(field("POD_IP").as_deref(), Some("status.podIP"));
    let csc = c.security_context.as_ref().unwrap();
    assert_eq!(csc.allow_privilege_escalation, Some(false));
    assert_eq!(
        csc.capabilities.as_ref().unwrap().drop,
        Some(vec!["ALL".to_string()])
    );
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8080);
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .clone()
            .unwrap()
    };
    assert_eq!(path(&c.readiness_probe), "/readyz");
    assert_eq!(path(&c.liveness_probe), "/healthz");
    // The operator's own pods must not look like pods it manages.
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    assert!(!labels.contains_key("app.kubernetes.io/managed-by"));
}

#[test]
fn example_render_job_is_servable() {
    let docs = documents("manifests/examples/renderjob.yaml");
    assert_eq!(docs.len(), 1);
    let mut job: RenderJob = serde_json::from_value(docs[0].clone()).expect("a RenderJob");
    assert_eq!(job.name_any(), "demo");
    let spec = &job.spec;
    assert_eq!(spec.source.topic, "render-events");
    assert_eq!(spec.source.bootstrap_servers, "127.0.0.1:9092");
    assert!(spec.render.command.iter().any(|a| a.contains("{output}")));
    assert!(spec
        .render
        .command
        .iter()
        .any(|a| a.contains("{value_file}")));
    assert_eq!(spec.render.output_dir, "/tmp/matchfleet-renders/demo");
    assert_eq!(
        (spec.workers.min_replicas, spec.workers.max_replicas),
        (1, 4)
    );
    assert_eq!(
        (spec.heartbeat.interval_millis, spec.heartbeat.lease_millis),
        (500, 3000)
    );
    assert_eq!(
        matchfleet_operator::resources::slo_millis(spec),
        Some(600_000)
    );

    job.metadata.namespace = Some("default".to_string());
    job.metadata.uid = Some("u".to_string());
    let owner = matchfleet_operator::resources::Owner::of(&job).expect("a valid name");
    let hash = matchfleet_operator::resources::worker_template_hash(&owner, &job.spec);
    let pod = matchfleet_operator::resources::worker_pod(&owner, &job.spec, 0, &hash);
    assert_eq!(pod.name_any(), "demo-live-blue-0");
}

#[test]
fn example_match_pipeline_is_servable() {
    let docs = documents("manifests/examples/matchpipeline.yaml");
    assert_eq!(docs.len(), 1);
    let mut mp: MatchPipeline = serde_json::from_value(docs[0].clone()).expect("a MatchPipeline");
    assert_eq!(mp.name_any(), "matchmaker");
    let spec = &mp.spec;
    assert_eq!(spec.source.topic, "match-requests");
    assert_eq!(spec.source.bootstrap_servers, "127.0.0.1:9092");
    assert_eq!(spec.results_topic, "match-results");
    assert_eq!(spec.features.dimension, 32);
    assert_eq!(
        (
            spec.window.size_millis,
            spec.window.out_of_order_millis,
            spec.window.idle_millis
        ),
        (500, 200, 1000)
    );
    let scorers: Vec<(&str, Option<BuiltinScorer>)> = spec
        .scorers
        .iter()
        .map(|s| (s.name.as_str(), s.builtin))
        .collect();
    assert_eq!(
        scorers,
        [
            ("cosine", Some(BuiltinScorer::Cosine)),
            ("complement", Some(BuiltinScorer::Complement))
        ]
    );
    assert!(spec.scorers.iter().all(|s| s.http.is_none()));
    assert_eq!(spec.workers.max_replicas, 4);
    // Heartbeat defaults.
    assert_eq!(
        (spec.heartbeat.interval_millis, spec.heartbeat.lease_millis),
        (1000, 6000)
    );
    assert!(
        matchfleet_operator::pipeline::validate::problems(spec).is_empty(),
        "{:?}",
        matchfleet_operator::pipeline::validate::problems(spec)
    );

    mp.metadata.namespace = Some("default".to_string());
    mp.metadata.uid = Some("u".to_string());
    let owner = matchfleet_operator::resources::Owner::of(&mp).expect("a valid name");
    let hash = matchfleet_operator::pipeline::resources::template_hash(&owner, &mp.spec);
    let pod = matchfleet_operator::pipeline::resources::match_pod(&owner, &mp.spec, 0, &hash);
    assert_eq!(pod.name_any(), "matchmaker-live-blue-0");
    let settings = pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "MATCH_SETTINGS")
        .and_then(|e| e.value.clone())
        .expect("MATCH_SETTINGS");
    let settings: MatchSettings = serde_json::from_str(&settings).expect("MatchSettings JSON");
    assert_eq!(settings.window.size_millis, 500);
    assert_eq!(settings.scorers.len(), 2);
}
