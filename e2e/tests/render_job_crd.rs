//! The RenderJob CRD as the real API server serves it: it installs, a valid
//! RenderJob is accepted with defaults filled in, and invalid ones are refused
//! at apply time with a message that says what to fix. Needs `e2e/cluster/up`.

use std::time::Duration;

use matchfleet_e2e::testkit::{eventually, Cluster};

async fn install_crd(c: &Cluster) {
    let crd = c.repo.join("crds/renderjobs.yaml");
    c.kubectl_ok(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
    matchfleet_e2e::fleetkit::wait_established(c, "renderjobs.matchfleet.io").await;
}

const VALID: &str = r#"
apiVersion: matchfleet.io/v1alpha1
kind: RenderJob
metadata: {name: NAME}
spec:
  source: {bootstrapServers: "127.0.0.1:9092", topic: swipe-night}
  render:
    command: [sh, -c, "render {key} > {output}"]
    outputDir: /tmp/renders
"#;

#[tokio::test]
async fn valid_render_jobs_are_accepted_with_defaults() {
    let c = Cluster::get();
    install_crd(&c).await;
    let ns = c.namespace("rjcrd");
    c.apply_ok_in(Some(&ns.name), &VALID.replace("NAME", "ok"));
    let spec: serde_json::Value = serde_json::from_str(&c.kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "rj",
        "ok",
        "-o",
        "jsonpath={.spec}",
    ]))
    .unwrap();
    assert_eq!(spec["render"]["maxAttempts"], 3);
    assert_eq!(spec["render"]["timeoutSeconds"], 600);
    assert_eq!(spec["workers"]["maxReplicas"], 8);
    assert_eq!(spec["heartbeat"]["leaseMillis"], 6000);
    // The printer columns are served.
    let table = c.kubectl_ok(&["-n", &ns.name, "get", "rj"]);
    for column in [
        "READY",
        "WORKERS",
        "PARTITIONS",
        "LAG",
        "DONE",
        "FAILED",
        "P99",
        "AGE",
    ] {
        assert!(table.contains(column), "no {column} column in:\n{table}");
    }
    // `kubectl explain` is useful: fields carry descriptions.
    let explain = c.kubectl_ok(&["explain", "renderjob.spec.render.command"]);
    assert!(explain.contains("Placeholders"), "{explain}");
}

#[tokio::test]
async fn invalid_render_jobs_are_refused_with_a_clear_message() {
    let c = Cluster::get();
    install_crd(&c).await;
    let ns = c.namespace("rjbad");
    let cases: &[(&str, &str, &str, &str)] = &[
        ("min-over-max", "  render:", "  workers: {minReplicas: 5, maxReplicas: 2}\n  render:", "minReplicas must not exceed workers.maxReplicas"),
        ("short-lease", "  render:", "  heartbeat: {intervalMillis: 1000, leaseMillis: 1500}\n  render:", "at least 3 heartbeat intervals"),
        ("no-output", r#"command: [sh, -c, "render {key} > {output}"]"#, "command: [render, \"{key}\"]", "must write to {output}"),
        ("relative-dir", "outputDir: /tmp/renders", "outputDir: renders", "absolute path"),
        ("bad-topic", "topic: swipe-night", "topic: \"swipe night!\"", "spec.source.topic"),
        ("dlq-is-source", "  render:", "  deadLetterTopic: swipe-night\n  render:", "deadLetterTopic must differ from source.topic"),
        ("two-starts", "  render:", "  backlog: {fromOffset: 0, fromTimestamp: \"2026-01-01T00:00:00Z\", finishBy: \"2026-01-01T01:00:00Z\"}\n  render:", "exactly one of fromTimestamp or fromOffset"),
        ("zero-attempts", "outputDir: /tmp/renders", "outputDir: /tmp/renders\n    maxAttempts: 0", "spec.render.maxAttempts"),
        ("empty-command", r#"command: [sh, -c, "render {key} > {output}"]"#, "command: []", "spec.render.command"),
        ("long-name", "metadata: {name: long-name}", "metadata: {name: a-render-job-name-far-too-long-for-its-progress-service-name}", "at most 54 characters"),
    ];
    for (name, from, to, expected) in cases {
        let manifest = VALID.replace("NAME", name).replacen(from, to, 1);
        assert_ne!(
            manifest,
            VALID.replace("NAME", name),
            "case {name} changed nothing"
        );
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
        let list = c.kubectl_ok(&["-n", &ns.name, "get", "rj", "-o", "name"]);
        if list.trim().is_empty() {
            Ok(())
        } else {
            Err(list)
        }
    })
    .await;
}
