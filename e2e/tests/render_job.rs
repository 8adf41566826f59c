//! RenderJob end to end: the operator from `manifests/` (under its own
//! ServiceAccount and ClusterRole) runs a progress service and pinned render
//! workers on the local cluster; every event's output is published exactly
//! once. Needs `e2e/cluster/up`.

use std::path::Path;
use std::time::{Duration, Instant};

use matchfleet_e2e::fleetkit::{self, condition, wait_status, RenderDir};
use matchfleet_e2e::testkit::Cluster;

fn render_job_yaml(name: &str, topic: &str, ws: &RenderDir, extra: &str) -> String {
    format!(
        r#"
apiVersion: matchfleet.io/v1alpha1
kind: RenderJob
metadata: {{name: {name}}}
spec:
  source: {{bootstrapServers: "127.0.0.1:9092", topic: {topic}}}
  render:
    command: ["{script}", "{{key}}", "{{value_file}}", "{{output}}", "{{slot}}/e{{epoch}}/a{{attempt}}"]
    outputDir: {out}
{extra}
  workers:
    minReplicas: 1
    maxReplicas: 3
    concurrency: 6
    env: [{{name: RENDER_LOG, value: "{log}"}}]
  heartbeat: {{intervalMillis: 500, leaseMillis: 3000}}
"#,
        script = ws.path("render.sh").display(),
        out = ws.path("out").display(),
        log = ws.path("render.log").display(),
    )
}

fn int(v: &serde_json::Value) -> i64 {
    v.as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_is_rendered_and_published_exactly_once() {
    let c = Cluster::get();
    fleetkit::install_operator(&c).await;
    let ns = c.namespace("rj");
    let ws = RenderDir::new();
    let topic = fleetkit::unique("render-events");
    fleetkit::create_topic(&c.kafka, &topic, 12).await;
    let events: Vec<(Option<String>, i32, String)> = (0..2000)
        .map(|i| {
            (
                Some(format!("user-{i:04}")),
                i % 12,
                format!("{{\"user\":{i}}}"),
            )
        })
        .collect();
    fleetkit::produce(&fleetkit::producer(&c.kafka), &topic, &events).await;

    let started = Instant::now();
    c.apply_ok_in(
        Some(&ns.name),
        &render_job_yaml("demo", &topic, &ws, "    maxAttempts: 3"),
    );
    let rj = wait_status(
        &c,
        &ns.name,
        "demo",
        "2000 renders done and lag 0",
        Duration::from_secs(300),
        |rj| {
            int(&rj["status"]["done"]) == 2000
                && int(&rj["status"]["lag"]) == 0
                && condition(rj, "Ready").as_deref() == Some("True")
        },
    )
    .await;
    println!(
        "2000 renders on 12 partitions in {:.1}s; status: {}",
        started.elapsed().as_secs_f64(),
        rj["status"]
    );
    assert_eq!(rj["status"]["partitions"], 12);
    assert_eq!(int(&rj["status"]["failed"]), 0);

    // Every key published once, with its own content.
    let published = ws.published();
    assert_eq!(published.len(), 2000, "one output per key");
    for (key, _, value) in &events {
        let key = key.as_ref().unwrap();
        let content = published
            .get(key)
            .unwrap_or_else(|| panic!("{key} not published"));
        assert!(
            content.starts_with(&format!("{key}\n{value}\n")),
            "{key}: {content}"
        );
    }
    // Completed once: one completion record per key in the changelog.
    let changelog = format!("matchfleet.{}.demo.progress", ns.name);
    let done = fleetkit::completions(&c.kafka, &changelog);
    assert_eq!(done.len(), 2000);
    let twice: Vec<_> = done.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "completed more than once: {twice:?}");
    // Nothing left in staging.
    let staged = std::fs::read_dir(ws.path("out/.staging")).unwrap().count();
    assert_eq!(staged, 0, "staged outputs left behind");

    // kubectl shows it.
    let table = c.kubectl_ok(&["-n", &ns.name, "get", "rj", "demo"]);
    println!("{table}");
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[1], "True", "{table}");
    assert!(row.contains(&"2000"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_messages_and_failing_renders_are_set_aside_with_reasons() {
    let c = Cluster::get();
    fleetkit::install_operator(&c).await;
    let ns = c.namespace("rjbad");
    let ws = RenderDir::new();
    let topic = fleetkit::unique("render-bad");
    fleetkit::create_topic(&c.kafka, &topic, 2).await;
    let mut events: Vec<(Option<String>, i32, String)> = (0..20)
        .map(|i| (Some(format!("ok-{i}")), i % 2, "{}".to_string()))
        .collect();
    events.push((None, 0, "no key".into()));
    events.push((Some("../escape".into()), 1, "path".into()));
    events.push((Some("fail-1".into()), 0, "{}".into()));
    events.push((Some("hang-1".into()), 1, "{}".into()));
    fleetkit::produce(&fleetkit::producer(&c.kafka), &topic, &events).await;

    c.apply_ok_in(
        Some(&ns.name),
        &render_job_yaml(
            "bad",
            &topic,
            &ws,
            "    maxAttempts: 2\n    timeoutSeconds: 2",
        ),
    );
    let rj = wait_status(
        &c,
        &ns.name,
        "bad",
        "20 done, 2 failed, lag 0",
        Duration::from_secs(120),
        |rj| {
            int(&rj["status"]["done"]) == 20
                && int(&rj["status"]["failed"]) == 2
                && int(&rj["status"]["lag"]) == 0
        },
    )
    .await;
    assert_eq!(
        condition(&rj, "Degraded").as_deref(),
        Some("True"),
        "{}",
        rj["status"]
    );

    // Malformed messages are in the dead-letter topic with their reasons.
    let letters = fleetkit::read_all(&c.kafka, &format!("{topic}.dlq"));
    assert_eq!(letters.len(), 2, "{letters:?}");
    let reasons: Vec<&str> = letters
        .iter()
        .map(|(_, _, h)| h["matchfleet.reason"].as_str())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("no key")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("not a safe file name")),
        "{reasons:?}"
    );

    // Each failing task was tried maxAttempts times, then recorded as failed.
    let log = std::fs::read_to_string(ws.path("render.log")).unwrap();
    for key in ["fail-1", "hang-1"] {
        let tries = log
            .lines()
            .filter(|l| l.starts_with(&format!("start {key} ")))
            .count();
        assert_eq!(tries, 2, "{key} attempts; log:\n{log}");
    }
    assert!(!Path::new(&ws.path("out/fail-1")).exists());
    // ... and an Event says so.
    let events = c.kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=bad",
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
    ]);
    assert!(events.contains("TasksFailed"), "events:\n{events}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_job_is_left_alone_until_resumed() {
    let c = Cluster::get();
    fleetkit::install_operator(&c).await;
    let ns = c.namespace("rjpause");
    let ws = RenderDir::new();
    let topic = fleetkit::unique("render-pause");
    fleetkit::create_topic(&c.kafka, &topic, 2).await;
    c.apply_ok_in(Some(&ns.name), &render_job_yaml("p", &topic, &ws, ""));
    wait_status(
        &c,
        &ns.name,
        "p",
        "2 workers ready",
        Duration::from_secs(90),
        |rj| rj["status"]["workers"] == "2/2",
    )
    .await;

    c.kubectl_ok(&[
        "-n",
        &ns.name,
        "annotate",
        "rj",
        "p",
        "matchfleet.io/paused=true",
    ]);
    wait_status(
        &c,
        &ns.name,
        "p",
        "Progressing False Paused",
        Duration::from_secs(30),
        |rj| {
            rj["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Progressing" && c["reason"] == "Paused")
            })
        },
    )
    .await;
    c.kubectl_ok(&[
        "-n",
        &ns.name,
        "delete",
        "pod",
        "p-live-blue-1",
        "--wait=true",
    ]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pods = c.kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "pods",
        "-l",
        "matchfleet.io/lane=live",
        "-o",
        "name",
    ]);
    assert!(
        !pods.contains("p-live-blue-1"),
        "recreated while paused: {pods}"
    );

    c.kubectl_ok(&[
        "-n",
        &ns.name,
        "annotate",
        "rj",
        "p",
        "matchfleet.io/paused-",
    ]);
    wait_status(
        &c,
        &ns.name,
        "p",
        "2 workers again after resuming",
        Duration::from_secs(60),
        |rj| rj["status"]["workers"] == "2/2",
    )
    .await;
}
