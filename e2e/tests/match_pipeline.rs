//! MatchPipeline end to end: the operator from `manifests/` (under its own
//! ServiceAccount and ClusterRole) runs the example pipeline's progress
//! service and pinned match workers on the local cluster; the load
//! generator's requests are each matched or expired exactly once, through
//! worker kills, and connected users are nudged. Needs `e2e/cluster/up`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use matchfleet_api::matching::{MatchRequest, Nudge, Preferences, Profile};
use matchfleet_api::MatchPipeline;
use matchfleet_e2e::fleetkit::{self, condition};
use matchfleet_e2e::matchkit::{self, CheckOptions, LoadOptions, Report};
use matchfleet_e2e::testkit::{eventually, Cluster, Namespace};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const NAME: &str = "matchmaker";

/// One pipeline at a time: each runs four workers under load, and on a small
/// machine two at once would measure the machine rather than the pipeline.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The example manifest with this run's own topics.
struct Pipeline {
    c: Cluster,
    ns: Namespace,
    spec: MatchPipeline,
}

impl Pipeline {
    async fn start(prefix: &str) -> Pipeline {
        let c = Cluster::get();
        fleetkit::install_operator(&c).await;
        let ns = c.namespace(prefix);
        let example = std::fs::read_to_string(c.repo.join("manifests/examples/matchpipeline.yaml"))
            .expect("the example manifest");
        let requests = fleetkit::unique("match-requests");
        let results = fleetkit::unique("match-results");
        let yaml = example
            .replace("match-requests", &requests)
            .replace("match-results", &results);
        let spec: MatchPipeline = serde_yaml_ng::from_str(&yaml).expect("the example parses");
        assert_eq!(spec.metadata.name.as_deref(), Some(NAME));
        fleetkit::create_topic(&c.kafka, &requests, 16).await;
        c.apply_ok_in(Some(&ns.name), &yaml);
        let p = Pipeline { c, ns, spec };
        p.wait("workers ready", Duration::from_secs(120), |mp| {
            condition(mp, "Ready").as_deref() == Some("True")
        })
        .await;
        p
    }

    async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        fleetkit::wait_resource(&self.c, &self.ns.name, "mp", NAME, what, timeout, check).await
    }

    fn load(&self, run_id: &str, total: u64, rate: f64, malformed: u64) -> LoadOptions {
        LoadOptions {
            run_id: run_id.into(),
            total,
            rate,
            dimension: self.spec.spec.features.dimension as usize,
            users: 20_000,
            segments: 24,
            skew: 1.0,
            seed: 7,
            out_of_order_fraction: 0.05,
            out_of_order_max_millis: 150,
            late_fraction: 0.0,
            late_millis: 0,
            malformed,
        }
    }

    async fn send(&self, options: &LoadOptions) -> matchkit::Sent {
        matchkit::send_load(&self.c.kafka, &self.spec.spec.source.topic, options)
            .await
            .expect("load sent")
    }

    async fn check(&self) -> Report {
        let mut options = CheckOptions::for_pipeline(&self.spec.spec);
        options.bootstrap = self.c.kafka.clone();
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
        report
    }

    /// Slot -> worker pod name, for the pods that exist now.
    fn workers(&self) -> BTreeMap<String, String> {
        let out = self.c.kubectl_ok(&[
            "-n",
            &self.ns.name,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/component=worker",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.podIP}{\"\\n\"}{end}",
        ]);
        out.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(name, ip)| (name.to_string(), ip.to_string()))
            .collect()
    }
}

fn int(v: &serde_json::Value) -> i64 {
    v.as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_is_matched_or_expired_exactly_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let p = Pipeline::start("mp").await;
    let started = Instant::now();
    let sent = p.send(&p.load("mp1", 100_000, 5_000.0, 0)).await;
    println!(
        "sent: {}",
        serde_json::to_string(&sent.summary()).unwrap_or_default()
    );
    let report = p.check().await;
    println!(
        "100,000 requests on 16 partitions settled in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(report.figures.valid, 100_000);
    assert!(
        report.figures.matched_pairs > 30_000,
        "most requests find a partner: {:?}",
        report.figures
    );

    let mp = p
        .wait(
            "lag 0, counters and a match rate",
            Duration::from_secs(60),
            |mp| {
                let s = &mp["status"];
                int(&s["lag"]) == 0
                    && int(&s["matched"]) == report.figures.matched_pairs as i64
                    && s["matchesPerSecond"].is_string()
            },
        )
        .await;
    assert_eq!(mp["status"]["partitions"], 16);
    assert_eq!(
        int(&mp["status"]["expired"]),
        report.figures.expired.values().sum::<u64>() as i64
    );
    let table = p.c.kubectl_ok(&["-n", &p.ns.name, "get", "mp", NAME]);
    println!("{table}");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(column("READY"), "True", "{table}");
    assert_eq!(column("LAG"), "0", "{table}");
    assert!(column("MATCHES/S").parse::<f64>().is_ok(), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_workers_restore_their_state_and_lose_or_repeat_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let p = Pipeline::start("mpkill").await;
    let options = p.load("mpkill", 30_000, 2_000.0, 30);
    let load = {
        let (kafka, topic, options) = (
            p.c.kafka.clone(),
            p.spec.spec.source.topic.clone(),
            options.clone(),
        );
        tokio::spawn(async move { matchkit::send_load(&kafka, &topic, &options).await })
    };
    let mut killed = Vec::new();
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let workers = p.workers();
        let Some((pod, _)) = workers.iter().nth(round % workers.len().max(1)) else {
            continue;
        };
        let pid = fleetkit::pod_pid(&p.c, &p.ns.name, pod);
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL");
        println!("SIGKILL to {pod} (pid {pid})");
        killed.push(pod.clone());
    }
    load.await.expect("load task").expect("load sent");
    let report = p.check().await;
    assert_eq!(report.figures.valid, 30_000 - 30);
    assert_eq!(report.figures.dead_letters, Some(30));
    let restored = worker_counter(&p, "matchfleet_match_restored_records_total").await;
    let replayed = worker_counter(&p, "matchfleet_match_replayed_requests_total").await;
    println!(
        "killed {killed:?}; per worker, state records restored: {restored:?}, \
         pending requests re-read from the request topic: {replayed:?}"
    );
    assert!(
        restored.values().sum::<u64>() > 0,
        "new owners restored state from the changelog"
    );
    assert!(
        replayed.values().sum::<u64>() > 0,
        "new owners re-read the requests that were pending when their owner died"
    );
}

/// A counter of each worker's /metrics.
async fn worker_counter(p: &Pipeline, name: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (pod, ip) in p.workers() {
        let url = format!("http://{ip}:8081/metrics");
        let Ok(text) = reqwest_text(&url).await else {
            continue;
        };
        let value = text
            .lines()
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.insert(pod, value);
    }
    out
}

async fn reqwest_text(url: &str) -> Result<String, reqwest::Error> {
    reqwest::get(url).await?.text().await
}

#[tokio::test(flavor = "multi_thread")]
async fn connected_users_are_nudged_when_matched() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let p = Pipeline::start("mpnudge").await;
    let workers: Vec<String> = p.workers().into_values().collect();
    let dimension = p.spec.spec.features.dimension as usize;
    let pairs = 40;
    let mut latencies = Vec::new();
    for i in 0..pairs {
        // Each user connects to one worker and posts to another: any worker serves any user.
        let ws_ip = &workers[i % workers.len()];
        let post_ip = &workers[(i + 1) % workers.len()];
        let (alice, bob) = (format!("nudge-a-{i}"), format!("nudge-b-{i}"));
        let (mut socket, _) =
            tokio_tungstenite::connect_async(format!("ws://{ws_ip}:8080/nudges/{alice}"))
                .await
                .expect("WebSocket connects");
        let sent = Instant::now();
        for (user, gender, wants) in [(&alice, "f", "m"), (&bob, "m", "f")] {
            let request = MatchRequest {
                request_id: format!("req-{user}"),
                user: user.clone(),
                segment: format!("nudge-{}", i % 4),
                event_time: matchkit::produce::wall_clock_millis(),
                vector: vec![0.1; dimension],
                profile: Profile {
                    gender: gender.into(),
                    age: 30,
                },
                wants: Preferences {
                    genders: vec![wants.into()],
                    min_age: 18,
                    max_age: 60,
                },
            };
            let answer = reqwest::Client::new()
                .post(format!("http://{post_ip}:8080/requests"))
                .json(&request)
                .send()
                .await
                .expect("ingest answers");
            assert_eq!(answer.status().as_u16(), 202, "ingest accepts the request");
        }
        let nudge = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a nudge within 20 s")
            .expect("socket open")
            .expect("a message");
        latencies.push(sent.elapsed());
        let nudge: Nudge = serde_json::from_str(nudge.to_text().expect("text")).expect("a nudge");
        assert_eq!(nudge.user, alice);
        // The polling fallback has the same match (another worker's feed may
        // see the commit a few milliseconds later).
        let url = format!("http://{post_ip}:8080/matches/{bob}");
        let match_id = nudge.match_id.clone();
        eventually(
            "bob's match in GET /matches",
            Duration::from_secs(10),
            || {
                let (url, match_id) = (url.clone(), match_id.clone());
                async move {
                    let recent = reqwest_text(&url).await.map_err(|e| e.to_string())?;
                    if recent.contains(&match_id) {
                        Ok(())
                    } else {
                        Err(recent)
                    }
                }
            },
        )
        .await;
    }
    latencies.sort();
    let pct = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "request to nudge over {pairs} pairs: p50 {:?}, p99 {:?} (window {} ms + out of order {} ms + idle {} ms bound it)",
        pct(0.5),
        pct(0.99),
        p.spec.spec.window.size_millis,
        p.spec.spec.window.out_of_order_millis,
        p.spec.spec.window.idle_millis
    );
}
