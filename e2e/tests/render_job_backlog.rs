//! The backlog lane: a RenderJob with `spec.backlog` renders a bounded range
//! of old events on a second consumer group, sized by the operator to finish
//! just before `finishBy` rather than as fast as possible. Needs `e2e/cluster/up`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use matchfleet_e2e::fleetkit::{self, RenderDir};
use matchfleet_e2e::testkit::Cluster;

const EVENTS: i32 = 2000;
const PARTITIONS: i32 = 12;
const MAX_REPLICAS: i64 = 6;
const DEADLINE_SECS: u64 = 90;

fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .unwrap()
        .to_string()
}

fn parse_time(s: &str) -> Option<SystemTime> {
    let ts: k8s_openapi::jiff::Timestamp = s.parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ts.as_millisecond().max(0) as u64))
}

struct Sample {
    at: SystemTime,
    done: i64,
    replicas: i64,
    eta: Option<SystemTime>,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_finishes_before_its_deadline_with_fewer_replicas_than_allowed() {
    let c = Cluster::get();
    fleetkit::install_operator(&c).await;
    let ns = c.namespace("rjbacklog");
    let dir = RenderDir::new();
    let p = dir.root();

    // 2,000 old events, already in the topic before the job exists.
    let topic = fleetkit::unique("render-backlog");
    fleetkit::create_topic(&c.kafka, &topic, PARTITIONS).await;
    let events: Vec<_> = (0..EVENTS)
        .map(|i| {
            (
                Some(format!("old-{i:04}")),
                i % PARTITIONS,
                format!("{{\"user\":{i}}}"),
            )
        })
        .collect();
    fleetkit::produce(&fleetkit::producer(&c.kafka), &topic, &events).await;

    let started = SystemTime::now();
    let deadline = started + Duration::from_secs(DEADLINE_SECS);
    let yaml = format!(
        r#"
apiVersion: matchfleet.io/v1alpha1
kind: RenderJob
metadata: {{name: demo}}
spec:
  source: {{bootstrapServers: "127.0.0.1:9092", topic: {topic}}}
  render:
    command: ["{script}", "{{key}}", "{{value_file}}", "{{output}}", "{{slot}}"]
    outputDir: {out}
  workers: {{minReplicas: 1, maxReplicas: 1, concurrency: 2}}
  heartbeat: {{intervalMillis: 500, leaseMillis: 3000}}
  backlog:
    fromOffset: 0
    finishBy: "{finish_by}"
    maxReplicas: {MAX_REPLICAS}
"#,
        script = p.join("render.sh").display(),
        out = p.join("out").display(),
        finish_by = rfc3339(deadline),
    );
    c.apply_ok_in(Some(&ns.name), &yaml);

    let mut samples: Vec<Sample> = Vec::new();
    let poll_until = Instant::now() + Duration::from_secs(DEADLINE_SECS + 60);
    let finished_at = loop {
        assert!(
            Instant::now() < poll_until,
            "the backlog did not finish; last status: {}",
            fleetkit::render_job(&c, &ns.name, "demo")["status"]
        );
        let rj = fleetkit::render_job(&c, &ns.name, "demo");
        let b = &rj["status"]["backlog"];
        if b.is_object() {
            samples.push(Sample {
                at: SystemTime::now(),
                done: b["done"].as_i64().unwrap_or(0),
                replicas: b["replicas"].as_i64().unwrap_or(0),
                eta: b["eta"].as_str().and_then(parse_time),
            });
            if b["finished"] == true {
                assert_eq!(b["total"].as_i64(), Some(EVENTS as i64), "{b}");
                break SystemTime::now();
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    // Every old event rendered once, by the backlog lane (the live lane starts where the range ends).
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    let mut last_write = started;
    for e in std::fs::read_dir(p.join("out")).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            let content = std::fs::read_to_string(e.path()).unwrap();
            last_write = last_write.max(e.metadata().unwrap().modified().unwrap());
            published.insert(
                e.file_name().to_string_lossy().into_owned(),
                content.lines().last().unwrap_or_default().to_string(),
            );
        }
    }
    assert_eq!(published.len(), EVENTS as usize);
    let by_live: Vec<_> = published
        .iter()
        .filter(|(_, who)| !who.starts_with("demo-backlog-"))
        .collect();
    assert!(
        by_live.is_empty(),
        "rendered outside the backlog lane: {:?}",
        &by_live[..by_live.len().min(5)]
    );
    let changelog = format!("matchfleet.{}.demo.progress", ns.name);
    let done = fleetkit::completions(&c.kafka, &changelog);
    assert!(done.values().all(|n| *n == 1) && done.len() == EVENTS as usize);

    let secs = |t: SystemTime| t.duration_since(started).unwrap_or_default().as_secs_f64();
    let peak = samples.iter().map(|s| s.replicas).max().unwrap_or(0);
    println!(
        "backlog of {EVENTS}: last render at {:.1}s, seen finished at {:.1}s, deadline {DEADLINE_SECS}s, peak {peak} of {MAX_REPLICAS} replicas",
        secs(last_write),
        secs(finished_at)
    );
    for s in samples.iter().step_by(5) {
        println!(
            "  t={:5.1}s done={:4} replicas={} eta={}",
            secs(s.at),
            s.done,
            s.replicas,
            s.eta
                .map(|e| format!("{:.1}s", secs(e)))
                .unwrap_or("-".into())
        );
    }
    assert!(
        last_write <= deadline,
        "finished {:.1}s after the deadline",
        secs(last_write) - DEADLINE_SECS as f64
    );
    assert!(
        peak < MAX_REPLICAS,
        "used all {MAX_REPLICAS} replicas: not sized to the deadline"
    );

    // The ETA shown once a quarter was done, against the actual finish.
    let s = samples
        .iter()
        .find(|s| s.eta.is_some() && s.done >= EVENTS as i64 / 4)
        .expect("an ETA while the backlog ran");
    let eta = s.eta.unwrap();
    let predicted = secs(eta) - secs(s.at);
    let actual = secs(last_write) - secs(s.at);
    let error = (predicted - actual).abs() / actual;
    println!(
        "ETA at t={:.1}s (done {}): {:.1}s ahead; actual {:.1}s; error {:.0}%",
        secs(s.at),
        s.done,
        predicted,
        actual,
        error * 100.0
    );
    assert!(error <= 0.25, "ETA off by {:.0}%", error * 100.0);

    // The lane goes away when done.
    let pods = c.kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "pods",
        "-l",
        "matchfleet.io/lane=backlog",
        "-o",
        "name",
    ]);
    let gone = pods.trim().is_empty();
    if !gone {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let pods = c.kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "pods",
        "-l",
        "matchfleet.io/lane=backlog",
        "-o",
        "name",
    ]);
    assert!(pods.trim().is_empty(), "backlog pods left: {pods}");
}
