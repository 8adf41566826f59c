//! The progress service against the real Kafka broker: leases with epochs,
//! claims, completions and failures logged to a compacted topic before they
//! are acknowledged, a zombie fenced after its lease moved, and a restart
//! that replays everything. Needs `e2e/cluster/up` (for Kafka).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use matchfleet_api::progress::*;
use matchfleet_e2e::testkit::Cluster;
use matchfleet_worker::progress::{changelog::Changelog, server, service};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

const LEASE_MILLIS: u64 = 1500;

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

async fn start(bootstrap: &str, topic: &str) -> Running {
    let log = Changelog::open(bootstrap, topic, 1)
        .await
        .expect("changelog");
    let settings = service::Settings {
        lease_millis: LEASE_MILLIS,
        max_attempts: 2,
        slo_millis: None,
    };
    let progress: Arc<service::Progress> = service::Progress::start(log, &settings)
        .await
        .expect("replay");
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server::serve(progress, addr, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    // Wait until it answers.
    for _ in 0..50 {
        if matchfleet_e2e::http::get(&format!("http://{addr}/readyz"), Duration::from_secs(1))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

/// A tiny JSON-over-HTTP call with the e2e crate's raw client.
async fn call<B: Serialize, R: DeserializeOwned>(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &B,
) -> R {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_string(body).unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{method} {path}: {head}\n{body}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn beat(slot: &str, holdings: &[(i32, u64)]) -> HeartbeatRequest {
    HeartbeatRequest {
        slot: slot.into(),
        holdings: holdings
            .iter()
            .map(|&(partition, epoch)| Holding {
                lane: "live".into(),
                partition,
                epoch,
                committed: 0,
                counters: Default::default(),
            })
            .collect(),
        released: vec![],
    }
}

fn claim(key: &str, slot: &str, partition: i32, epoch: u64) -> ClaimRequest {
    ClaimRequest {
        key: key.into(),
        lane: "live".into(),
        partition,
        epoch,
        slot: slot.into(),
        offset: 0,
    }
}

fn complete(key: &str, slot: &str, partition: i32, epoch: u64) -> CompleteRequest {
    CompleteRequest {
        key: key.into(),
        lane: "live".into(),
        partition,
        epoch,
        slot: slot.into(),
        event_time_millis: 0,
        staged: None,
    }
}

fn assignment(pairs: &[(i32, &str)]) -> Assignment {
    Assignment {
        lanes: BTreeMap::from([(
            "live".to_string(),
            pairs.iter().map(|(p, s)| (*p, s.to_string())).collect(),
        )]),
        drain_millis: 1000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_claims_and_completions_survive_a_restart_and_fence_a_zombie() {
    let c = Cluster::get();
    let topic = format!(
        "e2e.progress-{}.progress",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let svc = start(&c.kafka, &topic).await;
    let _: serde_json::Value = call(
        svc.addr,
        "PUT",
        "/assignment",
        &assignment(&[(0, "w-0"), (1, "w-1")]),
    )
    .await;

    let r: HeartbeatResponse = call(svc.addr, "POST", "/heartbeat", &beat("w-0", &[])).await;
    assert!(
        matches!(
            r.directives[..],
            [Directive::Acquire {
                partition: 0,
                epoch: 1,
                ..
            }]
        ),
        "{r:?}"
    );
    let r: HeartbeatResponse = call(svc.addr, "POST", "/heartbeat", &beat("w-1", &[])).await;
    assert!(
        matches!(
            r.directives[..],
            [Directive::Acquire {
                partition: 1,
                epoch: 1,
                ..
            }]
        ),
        "{r:?}"
    );

    // k1 rendered once; the same key seen again on the other partition is skipped.
    let g: ClaimResponse = call(svc.addr, "POST", "/claims", &claim("k1", "w-0", 0, 1)).await;
    assert_eq!(g, ClaimResponse::Granted { attempt: 1 });
    let a: CompleteResponse = call(
        svc.addr,
        "POST",
        "/claims/complete",
        &complete("k1", "w-0", 0, 1),
    )
    .await;
    assert_eq!(a, CompleteResponse::Accepted);
    let d: ClaimResponse = call(svc.addr, "POST", "/claims", &claim("k1", "w-1", 1, 1)).await;
    assert_eq!(d, ClaimResponse::AlreadyDone { staged: None });

    // k2 fails twice: with maxAttempts 2 that is final.
    let fail = FailRequest {
        key: "k2".into(),
        lane: "live".into(),
        partition: 1,
        epoch: 1,
        slot: "w-1".into(),
        reason: "exit status 1".into(),
    };
    let _: ClaimResponse = call(svc.addr, "POST", "/claims", &claim("k2", "w-1", 1, 1)).await;
    let f: FailResponse = call(svc.addr, "POST", "/claims/fail", &fail).await;
    assert_eq!(f, FailResponse::Retry { attempt: 2 });
    let f: FailResponse = call(svc.addr, "POST", "/claims/fail", &fail).await;
    assert_eq!(f, FailResponse::Failed);

    // w-0 claims k3 and then freezes (stops beating).
    let _: ClaimResponse = call(svc.addr, "POST", "/claims", &claim("k3", "w-0", 0, 1)).await;

    // Restart: everything comes back from the changelog.
    svc.stop().await;
    let svc = start(&c.kafka, &topic).await;
    let s: ProgressStatus = call(svc.addr, "GET", "/status", &()).await;
    assert_eq!((s.done, s.failed), (1, 1), "{s:?}");
    assert_eq!(s.leases["live"][&0].epoch, 1);
    let d: ClaimResponse = call(svc.addr, "POST", "/claims", &claim("k1", "w-0", 0, 1)).await;
    assert_eq!(
        d,
        ClaimResponse::AlreadyDone { staged: None },
        "a done task is never rendered again"
    );
    let r: HeartbeatResponse = call(svc.addr, "POST", "/heartbeat", &beat("w-1", &[(1, 1)])).await;
    assert!(
        matches!(r.directives[..], [Directive::Keep { epoch: 1, .. }]),
        "{r:?}"
    );

    // The operator moves partition 0 to w-1 while w-0 is frozen: w-1 gets it at
    // epoch 2 once w-0's lease runs out, and w-0's late work is refused.
    let _: serde_json::Value = call(
        svc.addr,
        "PUT",
        "/assignment",
        &assignment(&[(0, "w-1"), (1, "w-1")]),
    )
    .await;
    let mut acquired = None;
    for _ in 0..40 {
        let r: HeartbeatResponse =
            call(svc.addr, "POST", "/heartbeat", &beat("w-1", &[(1, 1)])).await;
        if let Some(Directive::Acquire { epoch, .. }) = r
            .directives
            .iter()
            .find(|d| matches!(d, Directive::Acquire { partition: 0, .. }))
        {
            acquired = Some(*epoch);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(acquired, Some(2), "w-1 takes partition 0 at epoch 2");
    let z: CompleteResponse = call(
        svc.addr,
        "POST",
        "/claims/complete",
        &complete("k3", "w-0", 0, 1),
    )
    .await;
    assert_eq!(
        z,
        CompleteResponse::Fenced { current_epoch: 2 },
        "the zombie cannot publish"
    );
    let r: HeartbeatResponse = call(svc.addr, "POST", "/heartbeat", &beat("w-0", &[(0, 1)])).await;
    assert!(
        matches!(
            r.directives[..],
            [Directive::Fenced {
                current_epoch: 2,
                ..
            }]
        ),
        "{r:?}"
    );
    let g: ClaimResponse = call(svc.addr, "POST", "/claims", &claim("k3", "w-1", 0, 2)).await;
    assert_eq!(g, ClaimResponse::Granted { attempt: 1 });
    let a: CompleteResponse = call(
        svc.addr,
        "POST",
        "/claims/complete",
        &complete("k3", "w-1", 0, 2),
    )
    .await;
    assert_eq!(a, CompleteResponse::Accepted);

    let metrics = matchfleet_e2e::http::get(
        &format!("http://{}/metrics", svc.addr),
        Duration::from_secs(2),
    )
    .await
    .unwrap()
    .body;
    assert!(
        metrics.contains("matchfleet_progress_tasks_done_total 2"),
        "{metrics}"
    );
    svc.stop().await;

    // The changelog topic is compacted.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka)
        .create()
        .unwrap();
    let configs = admin
        .describe_configs(&[ResourceSpecifier::Topic(&topic)], &AdminOptions::new())
        .await
        .unwrap();
    let config = configs.into_iter().next().unwrap().unwrap();
    assert_eq!(
        config
            .get("cleanup.policy")
            .and_then(|e| e.value.as_deref()),
        Some("compact")
    );
}
