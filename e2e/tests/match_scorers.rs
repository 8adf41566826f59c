//! HTTP scorers deployed in the local cluster: a MatchPipeline whose bandit
//! chooses among a fast, a slow and a dead HTTP scorer and the builtin
//! `cosine`. Every request is still matched or expired exactly once, the
//! fast scorer's answers are used, the slow and dead ones fall back to
//! `cosine`, and no window is held past the scorers' timeout: for every
//! result, its Kafka record timestamp (set when the worker produced it, after
//! the HTTP calls) minus its `closedAt` (taken before them) stays far below
//! the slow scorer's delay. Needs `e2e/cluster/up`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use matchfleet_api::match_pipeline::{BuiltinScorer, HttpScorerSpec, ScorerSpec};
use matchfleet_api::matching::MatchResult;
use matchfleet_api::MatchPipeline;
use matchfleet_e2e::fleetkit::{self, condition};
use matchfleet_e2e::matchkit::{self, CheckOptions, LoadOptions};
use matchfleet_e2e::testkit::{eventually, Cluster};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// Each HTTP scorer's timeout: what a window may wait for its scorer.
const TIMEOUT_MILLIS: i32 = 150;
/// The slow scorer answers correctly, but only after this long: far past
/// the timeout, so a worker that waited for it would hold windows ~20× longer.
const SLOW_DELAY_MILLIS: i64 = 3_000;
/// The most a result may take from its window's close to its production:
/// the timeout plus a wide margin for commits and a busy machine, still
/// well below the slow scorer's delay.
const HOLD_BOUND_MILLIS: i64 = TIMEOUT_MILLIS as i64 + 1_000;
const REQUESTS: u64 = 3_000;
const PARTITIONS: i32 = 8;

/// Two scorers made of test-server pods (fast and slow) behind Services, and
/// a dead one: a Service whose selector matches no pod, as when a scorer's
/// Deployment is scaled to zero or all its pods are unready. The cluster's
/// Service proxy accepts such a connection and closes it at once (as
/// kube-proxy's REJECT rule refuses it), so the dead scorer fails fast,
/// while the slow one keeps the connection open and never answers in time.
fn scorers_manifest() -> String {
    let pod_and_service = |name: &str, delay: i64| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: {name}}}
spec:
  containers:
  - name: scorer
    image: matchfleet/test-server:dev
    ports: [{{name: http, containerPort: 8080}}]
    env:
    - {{name: SCORE_DELAY_MS, value: "{delay}"}}
    - name: POD_IP
      valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
    readinessProbe:
      httpGet: {{path: /healthz, port: http}}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: {name}}}
  ports:
  - {{name: web, port: 80, targetPort: http}}
"#
        )
    };
    format!(
        r#"{}---
{}---
apiVersion: v1
kind: Service
metadata: {{name: dead-scorer}}
spec:
  selector: {{app: dead-scorer}}
  ports:
  - {{name: web, port: 80, targetPort: 8080}}
"#,
        pod_and_service("fast-scorer", 0),
        pod_and_service("slow-scorer", SLOW_DELAY_MILLIS)
    )
}

fn scorer_url(service: &str, ns: &str) -> String {
    format!("http://{service}.{ns}.svc:80/score")
}

fn http_scorer(name: &str, url: String) -> ScorerSpec {
    ScorerSpec {
        name: name.into(),
        builtin: None,
        http: Some(HttpScorerSpec {
            url,
            timeout_millis: TIMEOUT_MILLIS,
        }),
    }
}

/// The example manifest with this run's topics and the four scorers.
fn pipeline(c: &Cluster, ns: &str) -> MatchPipeline {
    let example = std::fs::read_to_string(c.repo.join("manifests/examples/matchpipeline.yaml"))
        .expect("the example manifest");
    let mut mp: MatchPipeline = serde_yaml_ng::from_str(&example).expect("the example parses");
    mp.spec.source.topic = fleetkit::unique("scorer-requests");
    mp.spec.results_topic = fleetkit::unique("scorer-results");
    mp.spec.scorers = vec![
        http_scorer("fast", scorer_url("fast-scorer", ns)),
        http_scorer("slow", scorer_url("slow-scorer", ns)),
        http_scorer("dead", scorer_url("dead-scorer", ns)),
        // The first builtin scorer: what windows fall back to.
        ScorerSpec {
            name: "cosine".into(),
            builtin: Some(BuiltinScorer::Cosine),
            http: None,
        },
    ];
    mp
}

/// A small window in the scorer protocol, to probe a scorer from the test.
fn probe_body() -> serde_json::Value {
    serde_json::json!({"requestIds": ["a", "b"], "vectors": [[1.0, 0.0], [0.0, 1.0]]})
}

/// Checks each scorer through its Service, as the workers will reach it:
/// the fast one answers at once, the slow one correctly but late, the dead
/// one not at all. Without this a "slow" scorer that was in fact fast (or
/// down) would make the test prove nothing.
async fn probe_scorers(ns: &str) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client");
    let post = |url: String, timeout: Duration| {
        let client = client.clone();
        async move {
            let started = Instant::now();
            let answer = client
                .post(&url)
                .json(&probe_body())
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            let status = answer.status();
            let body: serde_json::Value = answer.json().await.map_err(|e| format!("{url}: {e}"))?;
            if !status.is_success() {
                return Err(format!("{url}: {status} {body}"));
            }
            Ok((started.elapsed(), body))
        }
    };
    // The Service names reach /etc/hosts shortly after the Services exist.
    let (took, body) = eventually(
        "the fast scorer answers through its Service",
        Duration::from_secs(30),
        || post(scorer_url("fast-scorer", ns), Duration::from_secs(2)),
    )
    .await;
    assert_eq!(body["scores"].as_array().map(Vec::len), Some(4), "{body}");
    println!("fast scorer probe: {took:?}, {body}");
    let (took, body) = post(scorer_url("slow-scorer", ns), Duration::from_secs(10))
        .await
        .expect("the slow scorer answers, late");
    assert_eq!(body["scores"].as_array().map(Vec::len), Some(4), "{body}");
    assert!(
        took >= Duration::from_millis(SLOW_DELAY_MILLIS as u64),
        "the slow scorer answered in {took:?}"
    );
    println!("slow scorer probe: {took:?}");
    let dead = post(scorer_url("dead-scorer", ns), Duration::from_secs(2)).await;
    assert!(dead.is_err(), "the dead scorer answered: {dead:?}");
    println!("dead scorer probe: {}", dead.err().unwrap_or_default());
}

/// A result with its Kafka record timestamp.
struct TimedResult {
    /// Milliseconds; the worker's producer sets it when it produces the record.
    produced_at: i64,
    result: MatchResult,
}

impl TimedResult {
    fn closed_at(&self) -> i64 {
        match &self.result {
            MatchResult::Matched { closed_at, .. } | MatchResult::Expired { closed_at, .. } => {
                *closed_at
            }
        }
    }

    /// How long the window's close held the result before it was produced.
    fn hold_millis(&self) -> i64 {
        self.produced_at - self.closed_at()
    }
}

/// Every committed result of `topic`, read from the beginning to the ends it
/// has now (positions move past transaction markers without a record, so
/// the consumer's position is consulted when nothing arrives).
fn read_timed_results(bootstrap: &str, topic: &str) -> Vec<TimedResult> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", fleetkit::unique("scorer-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .expect("watermarks");
        if high > low {
            ends.insert(p.id(), high);
            assignment
                .add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("assignment");
        }
    }
    if ends.is_empty() {
        return Vec::new();
    }
    consumer.assign(&assignment).expect("assign");
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ends
        .iter()
        .any(|(p, end)| positions.get(p).is_none_or(|at| at < end))
    {
        assert!(
            Instant::now() < deadline,
            "reading {topic} took too long: at {positions:?} of {ends:?}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let at = positions.entry(m.partition()).or_default();
                *at = (*at).max(m.offset() + 1);
                let produced_at = m
                    .timestamp()
                    .to_millis()
                    .unwrap_or_else(|| panic!("result at offset {} has no timestamp", m.offset()));
                let result: MatchResult = serde_json::from_slice(m.payload().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("result at offset {}: {e}", m.offset()));
                out.push(TimedResult {
                    produced_at,
                    result,
                });
            }
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {
                for e in consumer.position().expect("positions").elements() {
                    if let Offset::Offset(next) = e.offset() {
                        let at = positions.entry(e.partition()).or_default();
                        *at = (*at).max(next);
                    }
                }
            }
        }
    }
    out
}

/// The sum over the pipeline's worker pods of each named counter.
async fn worker_counters(c: &Cluster, ns: &str, names: &[&str]) -> BTreeMap<String, u64> {
    let ips = c.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=worker",
        "-o",
        "jsonpath={range .items[*]}{.status.podIP}{\"\\n\"}{end}",
    ]);
    let mut sums: BTreeMap<String, u64> = names.iter().map(|n| (n.to_string(), 0)).collect();
    for ip in ips.lines().filter(|l| !l.is_empty()) {
        let url = format!("http://{ip}:8081/metrics");
        let metrics = matchfleet_e2e::http::get(&url, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        for (name, sum) in sums.iter_mut() {
            *sum += counter(&metrics.body, name);
        }
    }
    sums
}

/// A counter's value in Prometheus text (0 if absent).
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The value at quantile `q` of sorted `values`.
fn quantile(sorted: &[i64], q: f64) -> i64 {
    let i = ((sorted.len().saturating_sub(1)) as f64 * q).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_dead_http_scorers_never_hold_a_window_past_their_timeout() {
    let c = Cluster::get();
    fleetkit::install_operator(&c).await;
    let ns = c.namespace("scorers");
    c.apply_ok_in(Some(&ns.name), &scorers_manifest());
    c.kubectl_ok(&[
        "-n",
        &ns.name,
        "wait",
        "--for=condition=Ready",
        "pod/fast-scorer",
        "pod/slow-scorer",
        "--timeout=120s",
    ]);
    probe_scorers(&ns.name).await;

    let mp = pipeline(&c, &ns.name);
    let name = mp.metadata.name.clone().expect("the example has a name");
    fleetkit::create_topic(&c.kafka, &mp.spec.source.topic, PARTITIONS).await;
    c.apply_ok_in(
        Some(&ns.name),
        &serde_yaml_ng::to_string(&mp).expect("the pipeline as YAML"),
    );
    fleetkit::wait_resource(
        &c,
        &ns.name,
        "mp",
        &name,
        "workers ready",
        Duration::from_secs(120),
        |mp| condition(mp, "Ready").as_deref() == Some("True"),
    )
    .await;

    let load = LoadOptions {
        run_id: "scorers".into(),
        total: REQUESTS,
        rate: 300.0,
        dimension: mp.spec.features.dimension as usize,
        users: 5_000,
        segments: 24,
        skew: 1.0,
        seed: 11,
        out_of_order_fraction: 0.05,
        out_of_order_max_millis: 150,
        ..LoadOptions::default()
    };
    let sent = matchkit::send_load(&c.kafka, &mp.spec.source.topic, &load)
        .await
        .expect("load sent");
    println!(
        "sent: {}",
        serde_json::to_string(&sent.summary()).unwrap_or_default()
    );

    let mut options = CheckOptions::for_pipeline(&mp.spec);
    options.bootstrap = c.kafka.clone();
    options.idle_timeout = Duration::from_secs(30);
    options.max_wait = Duration::from_secs(300);
    let report = matchkit::check_topics_async(options)
        .await
        .expect("the checker reads the topics");
    println!(
        "checker: {}",
        serde_json::to_string_pretty(&report.figures).unwrap_or_default()
    );
    assert!(
        report.violations.is_empty(),
        "checker found violations: {}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    assert_eq!(report.figures.valid, REQUESTS);

    let (kafka, topic) = (c.kafka.clone(), mp.spec.results_topic.clone());
    let results = tokio::task::spawn_blocking(move || read_timed_results(&kafka, &topic))
        .await
        .expect("reader task");
    assert_eq!(results.len() as u64, report.figures.results);

    // Every figure first, then the assertions, so a failure shows them all.
    let windows_by_scorer = windows_by_scorer(&results);
    println!(
        "windows with matches, by the scorer named in their results: {:?}",
        windows_by_scorer
    );
    let fallbacks = "matchfleet_match_http_scorer_fallbacks_total";
    let closed = "matchfleet_match_windows_closed_total";
    let counters = worker_counters(&c, &ns.name, &[fallbacks, closed]).await;
    println!("worker counters: {counters:?}");
    let mut holds: Vec<i64> = results.iter().map(TimedResult::hold_millis).collect();
    holds.sort_unstable();
    let (p50, p99, max) = (
        quantile(&holds, 0.5),
        quantile(&holds, 0.99),
        quantile(&holds, 1.0),
    );
    println!(
        "record timestamp - closedAt over {} results: p50 {p50} ms, p99 {p99} ms, max {max} ms \
         (timeout {TIMEOUT_MILLIS} ms, slow scorer {SLOW_DELAY_MILLIS} ms, bound {HOLD_BOUND_MILLIS} ms)",
        holds.len()
    );

    // (a) HTTP scoring works end to end.
    let windows = |scorer: &str| windows_by_scorer.get(scorer).copied().unwrap_or(0);
    assert!(
        windows("fast") > 0,
        "no result was scored by the fast HTTP scorer"
    );
    // (b) The slow and dead scorers were chosen and fell back to `cosine`.
    assert!(
        windows("cosine") > 0,
        "no result names the builtin fallback"
    );
    assert_eq!(
        (windows("slow"), windows("dead")),
        (0, 0),
        "a slow or dead scorer's answer was used"
    );
    assert!(
        counters[fallbacks] > 0,
        "the workers counted no HTTP scorer fallback"
    );
    // Without rewards the bandit picks each of the four arms for ~1/4 of the
    // windows, so slow and dead alone make ~1/2 of them fall back.
    assert!(
        counters[fallbacks] * 4 >= counters[closed],
        "too few fallbacks for a bandit choosing slow and dead half the time: {counters:?}"
    );
    // (c) No result was held past the timeout (plus a margin).
    let held: Vec<String> = results
        .iter()
        .filter(|r| r.hold_millis() > HOLD_BOUND_MILLIS)
        .take(10)
        .map(|r| format!("{} ms: {:?}", r.hold_millis(), r.result))
        .collect();
    assert!(
        held.is_empty(),
        "results held past {HOLD_BOUND_MILLIS} ms (first 10): {held:#?}"
    );
    // The measure does see the scorers: windows closed with a slow one were
    // held for its whole timeout, so the bound above is not met trivially.
    assert!(
        max >= i64::from(TIMEOUT_MILLIS),
        "no result was held for the scorers' timeout ({max} ms at most): were they called?"
    );
}

/// Windows with matches (segment, start), counted by the scorer their results name.
fn windows_by_scorer(results: &[TimedResult]) -> BTreeMap<String, usize> {
    let mut windows: BTreeMap<&str, BTreeSet<(&str, i64)>> = BTreeMap::new();
    for r in results {
        if let MatchResult::Matched {
            scorer,
            segment,
            window_start,
            ..
        } = &r.result
        {
            windows
                .entry(scorer.as_str())
                .or_default()
                .insert((segment.as_str(), *window_start));
        }
    }
    windows
        .into_iter()
        .map(|(scorer, w)| (scorer.to_string(), w.len()))
        .collect()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn counters_are_read_by_exact_name() {
        let text = "# TYPE a_total counter\na_total 7\na_total_more 9\nb_total 2\n";
        assert_eq!(counter(text, "a_total"), 7);
        assert_eq!(counter(text, "b_total"), 2);
        assert_eq!(counter(text, "c_total"), 0);
    }

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let sorted: Vec<i64> = (1..=101).collect();
        assert_eq!(quantile(&sorted, 0.5), 51);
        assert_eq!(quantile(&sorted, 0.99), 100);
        assert_eq!(quantile(&sorted, 1.0), 101);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
