//! RenderJob under faults, on the local cluster with the operator from
//! `manifests/`: workers killed with SIGKILL and deleted mid-run, a worker
//! frozen with SIGSTOP past its lease, the progress service restarted. In
//! every case each event is published and completed exactly once.
//! Needs `e2e/cluster/up`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use matchfleet_e2e::fleetkit::{self, condition, wait_status, RenderDir};
use matchfleet_e2e::testkit::{eventually, Cluster};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// The scenarios share the machine's two cores; one at a time keeps their
/// throughput figures meaningful.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const EVENTS: i32 = 2000;
const PARTITIONS: i32 = 12;

struct Run {
    c: Cluster,
    ns: matchfleet_e2e::testkit::Namespace,
    dir: RenderDir,
    started: Instant,
}

impl Run {
    async fn start(prefix: &str) -> Run {
        let c = Cluster::get();
        fleetkit::install_operator(&c).await;
        let ns = c.namespace(prefix);
        let dir = RenderDir::new();
        let p = dir.root();

        let topic = fleetkit::unique(prefix);
        fleetkit::create_topic(&c.kafka, &topic, PARTITIONS).await;
        let events: Vec<_> = (0..EVENTS)
            .map(|i| (Some(key(i)), i % PARTITIONS, format!("{{\"user\":{i}}}")))
            .collect();
        fleetkit::produce(&fleetkit::producer(&c.kafka), &topic, &events).await;
        let yaml = format!(
            r#"
apiVersion: matchfleet.io/v1alpha1
kind: RenderJob
metadata: {{name: demo}}
spec:
  source: {{bootstrapServers: "127.0.0.1:9092", topic: {topic}}}
  render:
    command: ["{script}", "{{key}}", "{{value_file}}", "{{output}}", "{{slot}}/e{{epoch}}"]
    outputDir: {out}
  workers:
    minReplicas: 3
    maxReplicas: 3
    concurrency: 4
    env: [{{name: RENDER_LOG, value: "{log}"}}]
  heartbeat: {{intervalMillis: 500, leaseMillis: 3000}}
"#,
            script = p.join("render.sh").display(),
            out = p.join("out").display(),
            log = p.join("render.log").display(),
        );
        c.apply_ok_in(Some(&ns.name), &yaml);
        let run = Run {
            c,
            ns,
            dir,
            started: Instant::now(),
        };
        // Wait for work to be under way on every worker.
        run.wait("all 3 workers rendering", Duration::from_secs(120), |rj| {
            rj["status"]["workers"] == "3/3" && rj["status"]["done"].as_i64().unwrap_or(0) > 50
        })
        .await;
        run
    }

    async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_status(&self.c, &self.ns.name, "demo", what, timeout, check).await
    }

    fn out(&self) -> PathBuf {
        self.dir.path("out")
    }

    /// Published outputs: key -> (who rendered it, modification time).
    fn published(&self) -> BTreeMap<String, (String, SystemTime)> {
        std::fs::read_dir(self.out())
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| {
                let content = std::fs::read_to_string(e.path()).unwrap_or_default();
                let who = content.lines().last().unwrap_or_default().to_string();
                let mtime = e.metadata().and_then(|m| m.modified()).unwrap();
                (e.file_name().to_string_lossy().into_owned(), (who, mtime))
            })
            .collect()
    }

    /// Partition -> slot name, from the status.
    fn assignment(&self) -> BTreeMap<i32, String> {
        let rj = fleetkit::render_job(&self.c, &self.ns.name, "demo");
        rj["status"]["live"]["assignment"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(p, slot)| {
                        (
                            p.parse().unwrap(),
                            format!("demo-live-blue-{}", slot.as_i64().unwrap_or(-1)),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The worker pod's main process.
    fn worker_pid(&self, pod: &str) -> i32 {
        fleetkit::pod_pid(&self.c, &self.ns.name, pod)
    }

    /// Every key published once and completed once; returns the outputs.
    async fn assert_exactly_once(&self) -> BTreeMap<String, (String, SystemTime)> {
        let rj = self
            .wait(
                "all renders done and lag 0",
                Duration::from_secs(300),
                |rj| {
                    rj["status"]["done"].as_i64() == Some(EVENTS as i64)
                        && rj["status"]["lag"].as_i64() == Some(0)
                },
            )
            .await;
        println!(
            "{EVENTS} renders in {:.1}s; status: {}",
            self.started.elapsed().as_secs_f64(),
            rj["status"]
        );
        let published = self.published();
        let missing: Vec<String> = (0..EVENTS)
            .map(key)
            .filter(|k| !published.contains_key(k))
            .collect();
        assert!(missing.is_empty(), "lost: {missing:?}");
        assert_eq!(published.len(), EVENTS as usize);
        let changelog = format!("matchfleet.{}.demo.progress", self.ns.name);
        let done = fleetkit::completions(&self.c.kafka, &changelog);
        assert_eq!(done.len(), EVENTS as usize, "completion records");
        let twice: Vec<_> = done.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "completed more than once: {twice:?}");
        let log = std::fs::read_to_string(self.dir.path("render.log")).unwrap();
        let renders = log.lines().filter(|l| l.starts_with("start ")).count();
        println!(
            "renders started: {renders} for {EVENTS} tasks ({} redone after a kill, none published twice)",
            renders - EVENTS as usize
        );
        published
    }
}

fn key(i: i32) -> String {
    format!("user-{i:04}")
}

fn partition_of(key: &str) -> i32 {
    key[5..].parse::<i32>().unwrap() % PARTITIONS
}

/// Outputs published in [from, to), split into the given partitions and the rest, per second per partition.
fn rates(
    published: &BTreeMap<String, (String, SystemTime)>,
    partitions: &BTreeSet<i32>,
    from: SystemTime,
    to: SystemTime,
) -> (f64, f64) {
    let secs = to
        .duration_since(from)
        .unwrap_or_default()
        .as_secs_f64()
        .max(0.001);
    let (mut hit, mut rest) = (0usize, 0usize);
    for (k, (_, t)) in published {
        if *t >= from && *t < to {
            if partitions.contains(&partition_of(k)) {
                hit += 1;
            } else {
                rest += 1;
            }
        }
    }
    let others = (PARTITIONS as usize - partitions.len()).max(1) as f64;
    (
        hit as f64 / secs / partitions.len().max(1) as f64,
        rest as f64 / secs / others,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_and_deleted_workers_lose_nothing_and_publish_nothing_twice() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::start("rjkill").await;
    let mut windows = Vec::new();
    for (round, pod) in ["demo-live-blue-0", "demo-live-blue-1", "demo-live-blue-2"]
        .iter()
        .enumerate()
    {
        let owned: BTreeSet<i32> = run
            .assignment()
            .into_iter()
            .filter(|(_, slot)| slot == pod)
            .map(|(p, _)| p)
            .collect();
        let at = SystemTime::now();
        if round == 1 {
            run.c
                .kubectl_ok(&["-n", &run.ns.name, "delete", "pod", pod, "--wait=false"]);
            println!("deleted pod {pod} (partitions {owned:?})");
        } else {
            let pid = run.worker_pid(pod);
            kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
            println!("SIGKILL to {pod} pid {pid} (partitions {owned:?})");
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        windows.push((pod.to_string(), owned, at, SystemTime::now()));
        // Let it come back before the next fault.
        run.wait("3/3 workers again", Duration::from_secs(60), |rj| {
            rj["status"]["workers"] == "3/3"
        })
        .await;
    }
    let published = run.assert_exactly_once().await;
    if let Some((_, _, first, _)) = windows.first() {
        let before = *first - Duration::from_secs(4);
        let (all, _) = rates(&published, &(0..PARTITIONS).collect(), before, *first);
        println!("4 s before the first fault: {all:.1} renders/s per partition");
    }
    for (pod, owned, from, to) in windows {
        let (theirs, others) = rates(&published, &owned, from, to);
        println!(
            "4 s after the fault on {pod}: its partitions {theirs:.1} renders/s each, the other partitions {others:.1} renders/s each"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_worker_loses_its_partitions_and_fails_fast_when_it_wakes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::start("rjfreeze").await;
    let pod = "demo-live-blue-0";
    let owned: BTreeSet<i32> = run
        .assignment()
        .into_iter()
        .filter(|(_, slot)| slot == pod)
        .map(|(p, _)| p)
        .collect();
    assert!(!owned.is_empty());
    let pid = run.worker_pid(pod);
    killpg(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    println!("SIGSTOP to the process group of {pod} (partitions {owned:?})");

    // Its partitions move to other slots at a new epoch.
    let moved = eventually(
        "the frozen worker's partitions on other slots",
        Duration::from_secs(60),
        || async {
            let a = run.assignment();
            if owned.iter().all(|p| a.get(p).is_some_and(|s| s != pod)) {
                Ok(a)
            } else {
                Err(format!("{a:?}"))
            }
        },
    )
    .await;
    // Work continues on them while the worker is still frozen.
    let before = run.published();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = run.published();
    let moved_progress = during
        .keys()
        .filter(|k| !before.contains_key(*k) && owned.contains(&partition_of(k)))
        .count();
    println!(
        "moved partitions {moved:?}: {moved_progress} renders published while {pod} was frozen"
    );
    assert!(moved_progress > 0, "the moved partitions made no progress");

    // What the frozen worker had rendered and published, as `slot/eN`, before it wakes.
    let log_before = std::fs::read_to_string(run.dir.path("render.log")).unwrap();
    let old_leases: BTreeSet<String> = log_before
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|who| who.starts_with(&format!("{pod}/")))
        .map(String::from)
        .collect();
    let published_before_wake: BTreeSet<String> = during
        .iter()
        .filter(|(_, (who, _))| old_leases.contains(who))
        .map(|(k, _)| k.clone())
        .collect();
    killpg(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
    println!("SIGCONT to {pod}; it held {old_leases:?}");

    let published = run.assert_exactly_once().await;
    // After waking, nothing rendered under the old leases finished or was published.
    let log = std::fs::read_to_string(run.dir.path("render.log")).unwrap();
    let finished_after_wake: Vec<&str> = log[log_before.len()..]
        .lines()
        .filter(|l| {
            l.starts_with("end ")
                && l.split_whitespace()
                    .nth(2)
                    .is_some_and(|w| old_leases.contains(w))
        })
        .collect();
    let published_after_wake: Vec<&String> = published
        .iter()
        .filter(|(k, (who, _))| old_leases.contains(who) && !published_before_wake.contains(*k))
        .map(|(k, _)| k)
        .collect();
    println!(
        "after the wake: {} renders of the old leases finished, {} published",
        finished_after_wake.len(),
        published_after_wake.len()
    );
    assert!(
        published_after_wake.is_empty(),
        "a zombie published: {published_after_wake:?}"
    );
    // (A render child woken with its worker may finish writing its staging
    // file in the milliseconds before the worker kills it; it is never published.)
    let ip = run.c.kubectl_ok(&[
        "-n",
        &run.ns.name,
        "get",
        "pod",
        pod,
        "-o",
        "jsonpath={.status.podIP}",
    ]);
    let metrics = matchfleet_e2e::http::get(
        &format!("http://{}:8081/metrics", ip.trim()),
        Duration::from_secs(5),
    )
    .await
    .expect("worker metrics")
    .body;
    let fail_fast: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("killed") || l.contains("fenced") || l.contains("discarded"))
        })
        .collect();
    println!("{}", fail_fast.join("\n"));
    let fenced: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("matchfleet_worker_partitions_fenced_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        fenced >= 1,
        "the woken worker did not give up its old leases:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_progress_service_loses_no_progress_and_causes_no_duplicate() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = Run::start("rjprogress").await;
    let rj = fleetkit::render_job(&run.c, &run.ns.name, "demo");
    let done_before = rj["status"]["done"].as_i64().unwrap();
    run.c.kubectl_ok(&[
        "-n",
        &run.ns.name,
        "delete",
        "pod",
        "-l",
        "app.kubernetes.io/component=progress",
        "--wait=false",
    ]);
    println!("deleted the progress service's pod at done={done_before}");
    let rj = run
        .wait("the progress service back", Duration::from_secs(90), |rj| {
            condition(rj, "Ready").as_deref() == Some("True")
                && rj["status"]["done"].as_i64().unwrap_or(0) > done_before
        })
        .await;
    assert!(
        rj["status"]["done"].as_i64().unwrap() >= done_before,
        "progress lost"
    );
    run.assert_exactly_once().await;
}
