//! The MatchPipeline CRD as the real API server serves it: it installs (its
//! CEL rules compile within the cost budget), the example MatchPipeline is
//! accepted with defaults filled in, and invalid ones are refused at apply
//! time with a message that says what to fix. Needs `e2e/cluster/up`.

use std::time::Duration;

use matchfleet_e2e::testkit::{eventually, Cluster};

async fn install_crd(c: &Cluster) {
    let crd = c.repo.join("crds/matchpipelines.yaml");
    c.kubectl_ok(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
    matchfleet_e2e::fleetkit::wait_established(c, "matchpipelines.matchfleet.io").await;
}

const VALID: &str = r#"
apiVersion: matchfleet.io/v1alpha1
kind: MatchPipeline
metadata: {name: NAME}
spec:
  source: {bootstrapServers: "127.0.0.1:9092", topic: match-requests}
  resultsTopic: match-results
  scorers:
    - {name: cosine, builtin: cosine}
"#;

/// `kubectl get mp NAME -o jsonpath={.spec}`, parsed.
fn spec_of(c: &Cluster, ns: &str, name: &str) -> serde_json::Value {
    let out = c.kubectl_ok(&["-n", ns, "get", "mp", name, "-o", "jsonpath={.spec}"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("spec of {name}: {e}: {out}"))
}

#[tokio::test]
async fn the_example_and_a_minimal_pipeline_are_accepted_with_defaults() {
    let c = Cluster::get();
    install_crd(&c).await;
    let ns = c.namespace("mpcrd");

    let example = c.repo.join("manifests/examples/matchpipeline.yaml");
    c.kubectl_ok(&["-n", &ns.name, "apply", "-f", example.to_str().unwrap()]);
    let spec = spec_of(&c, &ns.name, "matchmaker");
    assert_eq!(spec["window"]["sizeMillis"], 500);
    assert_eq!(spec["window"]["outOfOrderMillis"], 200);
    assert_eq!(spec["window"]["allowedLatenessMillis"], 5000);
    assert_eq!(spec["matching"]["maxWaitWindows"], 5);
    assert_eq!(spec["heartbeat"]["leaseMillis"], 6000);
    assert_eq!(spec["workers"]["maxReplicas"], 4);
    assert_eq!(spec["scorers"].as_array().map(Vec::len), Some(2));

    // Without scorers: the one built-in cosine scorer.
    let minimal = VALID
        .replace("NAME", "minimal")
        .replace("  scorers:\n    - {name: cosine, builtin: cosine}\n", "");
    assert!(!minimal.contains("scorers"), "{minimal}");
    c.apply_ok_in(Some(&ns.name), &minimal);
    let spec = spec_of(&c, &ns.name, "minimal");
    assert_eq!(
        spec["scorers"],
        serde_json::json!([{"name": "cosine", "builtin": "cosine"}])
    );
    assert_eq!(spec["features"]["dimension"], 32);

    // The printer columns are served.
    let table = c.kubectl_ok(&["-n", &ns.name, "get", "mp"]);
    for column in [
        "READY",
        "ACTIVE",
        "WORKERS",
        "PARTITIONS",
        "LAG",
        "MATCHES/S",
        "AGE",
    ] {
        assert!(table.contains(column), "no {column} column in:\n{table}");
    }
    // `kubectl explain` is useful: fields carry descriptions.
    let explain = c.kubectl_ok(&["explain", "matchpipeline.spec.window.outOfOrderMillis"]);
    assert!(explain.contains("watermark"), "{explain}");
}

#[tokio::test]
async fn invalid_match_pipelines_are_refused_with_a_clear_message() {
    let c = Cluster::get();
    install_crd(&c).await;
    let ns = c.namespace("mpbad");
    let scorer = "    - {name: cosine, builtin: cosine}";
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "same-scorer-twice",
            scorer,
            "    - {name: cosine, builtin: cosine}\n    - {name: cosine, builtin: complement}",
            "scorer names must be unique",
        ),
        (
            "scorer-both-kinds",
            scorer,
            "    - {name: cosine, builtin: cosine, http: {url: \"http://scorer:8080/score\"}}",
            "exactly one of builtin or http",
        ),
        (
            "scorer-neither-kind",
            scorer,
            "    - {name: cosine}",
            "exactly one of builtin or http",
        ),
        (
            "no-scorers",
            "  scorers:\n    - {name: cosine, builtin: cosine}",
            "  scorers: []",
            "spec.scorers",
        ),
        (
            "results-is-source",
            "resultsTopic: match-results",
            "resultsTopic: match-requests",
            "resultsTopic must differ from source.topic",
        ),
        (
            "results-is-default-dlq",
            "resultsTopic: match-results",
            "resultsTopic: match-requests.dlq",
            "resultsTopic must differ from the default deadLetterTopic",
        ),
        (
            "dlq-is-results",
            "  scorers:",
            "  deadLetterTopic: match-results\n  scorers:",
            "deadLetterTopic must differ from source.topic and resultsTopic",
        ),
        (
            "dlq-is-source",
            "  scorers:",
            "  deadLetterTopic: match-requests\n  scorers:",
            "deadLetterTopic must differ from source.topic and resultsTopic",
        ),
        (
            "feedback-is-results",
            "  scorers:",
            "  feedback: {topic: match-results, rewardsTopic: match-rewards}\n  scorers:",
            "feedback.topic must differ from source.topic and resultsTopic",
        ),
        (
            "rewards-is-source",
            "  scorers:",
            "  feedback: {topic: match-outcomes, rewardsTopic: match-requests}\n  scorers:",
            "feedback.rewardsTopic must differ from source.topic and resultsTopic",
        ),
        (
            "rewards-are-outcomes",
            "  scorers:",
            "  feedback: {topic: match-outcomes, rewardsTopic: match-outcomes}\n  scorers:",
            "feedback.rewardsTopic must differ from feedback.topic",
        ),
        (
            "min-over-max",
            "  scorers:",
            "  workers: {minReplicas: 5, maxReplicas: 2}\n  scorers:",
            "minReplicas must not exceed workers.maxReplicas",
        ),
        (
            "short-lease",
            "  scorers:",
            "  heartbeat: {intervalMillis: 1000, leaseMillis: 1500}\n  scorers:",
            "at least 3 heartbeat intervals",
        ),
        (
            "no-dimension",
            "  scorers:",
            "  features: {dimension: 0}\n  scorers:",
            "spec.features.dimension",
        ),
        (
            "huge-dimension",
            "  scorers:",
            "  features: {dimension: 4096}\n  scorers:",
            "spec.features.dimension",
        ),
        (
            "tiny-window",
            "  scorers:",
            "  window: {sizeMillis: 1}\n  scorers:",
            "spec.window.sizeMillis",
        ),
        (
            "bad-topic",
            "topic: match-requests}",
            "topic: \"match requests!\"}",
            "spec.source.topic",
        ),
        (
            "long-name",
            "metadata: {name: long-name}",
            "metadata: {name: a-match-pipeline-name-far-too-long-for-its-progress-service}",
            "at most 54 characters",
        ),
        (
            "digit-first-name",
            "metadata: {name: digit-first-name}",
            "metadata: {name: 1matchmaker}",
            "DNS-1035 label",
        ),
    ];
    for (name, from, to, expected) in cases {
        let valid = VALID.replace("NAME", name);
        let manifest = valid.replacen(from, to, 1);
        assert_ne!(manifest, valid, "case {name} changed nothing");
        let out = c.apply_in(Some(&ns.name), &manifest);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted:\n{manifest}");
        assert!(
            err.contains(expected),
            "{name}: expected {expected:?} in the error, got: {err}"
        );
        println!("{name}: refused: {}", err.trim());
    }
    // Nothing invalid was stored.
    eventually("an empty namespace", Duration::from_secs(5), || async {
        let list = c.kubectl_ok(&["-n", &ns.name, "get", "mp", "-o", "name"]);
        if list.trim().is_empty() {
            Ok(())
        } else {
            Err(list)
        }
    })
    .await;
}
