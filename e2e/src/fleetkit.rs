//! Helpers for the fleet end-to-end tests: installing the operator from
//! `manifests/` (so it runs under its own ServiceAccount and ClusterRole),
//! Kafka topics and events, reading a RenderJob's status and a progress
//! changelog.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::testkit::{eventually, Cluster};

/// Applies the CRDs and the operator manifests (idempotent) and waits until
/// the operator is ready. Serialised across test binaries by kubectl's
/// server-side apply; safe to call from every test.
pub async fn install_operator(c: &Cluster) {
    let crds = c.repo.join("crds");
    c.kubectl_ok(&["apply", "--server-side", "-f", crds.to_str().unwrap()]);
    wait_established(c, "renderjobs.matchfleet.io").await;
    let manifests = c.repo.join("manifests/operator.yaml");
    c.kubectl_ok(&["apply", "--server-side", "-f", manifests.to_str().unwrap()]);
    c.kubectl_ok(&[
        "-n",
        "matchfleet-system",
        "rollout",
        "status",
        "deployment/matchfleet-operator",
        "--timeout=120s",
    ]);
}

/// Waits until a CRD is served. (`kubectl wait --for=condition=Established`
/// fails instead of waiting when the CRD has no conditions yet, which is the
/// case for a moment after it is created.)
pub async fn wait_established(c: &Cluster, crd: &str) {
    eventually(
        &format!("CRD {crd} established"),
        Duration::from_secs(60),
        || async {
            let out = c.kubectl(&[
                "get",
                "crd",
                crd,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ]);
            let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if status == "True" {
                Ok(())
            } else {
                Err(format!(
                    "Established={status:?} {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        },
    )
    .await
}

/// A topic name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() % 10_000_000_000)
            .unwrap_or_default()
    )
}

pub async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            [&NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic");
    for r in results {
        r.expect("topic created");
    }
}

pub fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Produces one event per (key, partition), with an optional key.
pub async fn produce(p: &FutureProducer, topic: &str, events: &[(Option<String>, i32, String)]) {
    let sends = events.iter().map(|(key, partition, value)| {
        let mut record: FutureRecord<'_, str, str> =
            FutureRecord::to(topic).partition(*partition).payload(value);
        if let Some(k) = key {
            record = record.key(k);
        }
        p.send(record, Duration::from_secs(30))
    });
    for r in futures::future::join_all(sends).await {
        r.expect("event produced");
    }
}

/// Every record of a topic, from the beginning: (key, value, headers).
pub type Record = (Option<String>, Option<String>, BTreeMap<String, String>);

pub fn read_all(bootstrap: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("e2e-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in metadata.topics()[0].partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .expect("watermarks");
        if high > low {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
            ends.insert(p.id(), high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    while ends
        .iter()
        .any(|(p, end)| positions.get(p).copied().unwrap_or(-1) + 1 < *end)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic} took too long"
        );
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.expect("record");
        positions.insert(m.partition(), m.offset());
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
            headers,
        ));
    }
    out
}

/// The RenderJob as JSON.
pub fn render_job(c: &Cluster, ns: &str, name: &str) -> serde_json::Value {
    resource(c, ns, "rj", name)
}

/// A namespaced object (`kind` as kubectl takes it: `rj`, `mp`, ...) as JSON.
pub fn resource(c: &Cluster, ns: &str, kind: &str, name: &str) -> serde_json::Value {
    serde_json::from_str(&c.kubectl_ok(&["-n", ns, "get", kind, name, "-o", "json"]))
        .unwrap_or_else(|e| panic!("{kind}/{name} as JSON: {e}"))
}

/// A pod's main process, from the node agent's pid file.
pub fn pod_pid(c: &Cluster, ns: &str, pod: &str) -> i32 {
    let uid = c.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "pod",
        pod,
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let pids = c.state.join("node/pids");
    let file = std::fs::read_dir(&pids)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(uid.trim()))
        .unwrap_or_else(|| panic!("no pid file for {pod} ({uid}) in {}", pids.display()));
    std::fs::read_to_string(file.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The status of a condition type (`True`/`False`/`Unknown`), if set.
pub fn condition(rj: &serde_json::Value, type_: &str) -> Option<String> {
    rj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(String::from))
}

/// Waits until the RenderJob's status satisfies `check`, printing the last status on timeout.
pub async fn wait_status(
    c: &Cluster,
    ns: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_resource(c, ns, "rj", name, what, timeout, check).await
}

/// Waits until the object's JSON satisfies `check`, printing the last status on timeout.
pub async fn wait_resource(
    c: &Cluster,
    ns: &str,
    kind: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(what, timeout, || async {
        let rj = resource(c, ns, kind, name);
        if check(&rj) {
            Ok(rj)
        } else {
            Err(rj["status"].to_string())
        }
    })
    .await
}

/// Completion records per task key in a progress changelog (every record,
/// before compaction could merge them).
pub fn completions(bootstrap: &str, changelog: &str) -> BTreeMap<String, usize> {
    let mut done = BTreeMap::new();
    for (key, value, _) in read_all(bootstrap, changelog) {
        let (Some(key), Some(value)) = (key, value) else {
            continue;
        };
        if let Some(task) = key.strip_prefix("task/") {
            let v: serde_json::Value = serde_json::from_str(&value).unwrap_or_default();
            if v["task"]["state"] == "done" {
                *done.entry(task.to_string()).or_default() += 1;
            }
        }
    }
    done
}

/// The render command of the render suites, called as `render.sh KEY
/// VALUE_FILE OUTPUT WHO`: sleeps 50-300 ms, fails on keys starting with
/// `fail-`, hangs on `hang-`, and writes the key, the value and who rendered
/// it. With `$RENDER_LOG` set it also logs the start and end of each render.
const RENDER_SH: &str = r#"#!/bin/sh
key="$1"; value_file="$2"; output="$3"; who="$4"
log() { if [ -n "$RENDER_LOG" ]; then echo "$1 $key $who" >> "$RENDER_LOG"; fi; }
log start
case "$key" in
  fail-*) echo "cannot render $key" >&2; exit 1 ;;
  hang-*) sleep 30 ;;
esac
ms=$(( $(od -An -N2 -tu2 /dev/urandom) % 251 + 50 ))
sleep "$(printf '0.%03d' "$ms")"
{ echo "$key"; cat "$value_file"; echo; echo "$who"; } > "$output"
log end
"#;

/// A folder for one render test that every pod user can use: the render
/// script (`render.sh`), its log (`render.log`, for `$RENDER_LOG`) and the
/// output folder (`out/`). Workers run as a non-root user, so permissions are
/// open; the folder is removed when dropped.
pub struct RenderDir {
    dir: tempfile::TempDir,
}

impl Default for RenderDir {
    fn default() -> Self {
        Self::new()
    }
}

impl RenderDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("matchfleet-e2e-")
            .tempdir_in("/tmp")
            .expect("temp folder");
        let open = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .expect("permissions")
        };
        open(dir.path(), 0o777);
        let render = dir.path().join("render.sh");
        std::fs::write(&render, RENDER_SH).expect("render.sh");
        open(&render, 0o755);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).expect("out/");
        open(&out, 0o777);
        let log = dir.path().join("render.log");
        std::fs::write(&log, "").expect("render.log");
        open(&log, 0o666);
        RenderDir { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Published outputs: file name -> content (the staging folder excluded).
    pub fn published(&self) -> BTreeMap<String, String> {
        std::fs::read_dir(self.path("out"))
            .expect("out/")
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read_to_string(e.path()).unwrap_or_default(),
                )
            })
            .collect()
    }
}
