//! A small HTTP server the e2e tests run as a pod (image `matchfleet/test-server:dev`).
//! It binds `$POD_IP:$PORT` and answers:
//! - `GET /`            its identity: pod name, namespace and IP (JSON)
//! - `GET /healthz`     always 200
//! - `GET /readyz`      503 until `READY_AFTER_MS` has passed, then 200
//! - `GET /env/NAME`    the value of an environment variable (404 if unset)
//! - `GET /fetch?url=U` fetches U from inside the pod, to test Service reachability
//! - `GET /kube?path=P` GETs P from the API server with the pod's inferred
//!   credentials (its ServiceAccount), answering `{"status": code, "body": ...}`
//! - `POST /score`      a MatchPipeline HTTP scorer: takes
//!   `{"requestIds": [...], "vectors": [[...], ...]}` and answers
//!   `{"scores": [...]}`, the cosine of every pair (n × n, row-major), after
//!   sleeping `SCORE_DELAY_MS` (default 0: a fast scorer; longer: a slow one);
//!   400 if the vectors do not match the ids or each other in length
//!
//! `CRASH_AFTER_MS` makes it exit with code 3 after that long (a crashing
//! container); `IGNORE_SIGTERM=1` makes it ignore SIGTERM (to test SIGKILL
//! after the grace period).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Deserialize;
use warp::http::StatusCode;
use warp::Filter;

/// Bodies larger than this are refused: a window of a few thousand
/// 32-dimensional vectors is well below it.
const MAX_SCORE_BODY: u64 = 64 * 1024 * 1024;

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

#[tokio::main]
async fn main() {
    matchfleet_e2e::init_tracing();
    let ip: IpAddr = std::env::var("POD_IP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or([127, 0, 0, 1].into());
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8080);
    let started = Instant::now();
    let ready_after = env_ms("READY_AFTER_MS").unwrap_or_default();

    if let Some(after) = env_ms("CRASH_AFTER_MS") {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            eprintln!("test-server: crashing on purpose (CRASH_AFTER_MS)");
            std::process::exit(3);
        });
    }

    let identity = warp::path::end().map(move || {
        warp::reply::json(&serde_json::json!({
            "pod": std::env::var("POD_NAME").unwrap_or_default(),
            "namespace": std::env::var("POD_NAMESPACE").unwrap_or_default(),
            "ip": ip.to_string(),
        }))
    });
    let healthz = warp::path("healthz").map(|| "ok");
    let readyz = warp::path("readyz").map(move || {
        if started.elapsed() >= ready_after {
            warp::reply::with_status("ready", StatusCode::OK)
        } else {
            warp::reply::with_status("not yet", StatusCode::SERVICE_UNAVAILABLE)
        }
    });
    let env = warp::path!("env" / String).map(|name: String| match std::env::var(&name) {
        Ok(v) => warp::reply::with_status(v, StatusCode::OK),
        Err(_) => warp::reply::with_status(String::new(), StatusCode::NOT_FOUND),
    });
    let fetch = warp::path("fetch")
        .and(warp::query::<HashMap<String, String>>())
        .then(|q: HashMap<String, String>| async move {
            let Some(url) = q.get("url") else {
                return warp::reply::with_status(
                    "missing url".to_string(),
                    StatusCode::BAD_REQUEST,
                );
            };
            match matchfleet_e2e::http::get(url, Duration::from_secs(5)).await {
                Ok(r) => warp::reply::with_status(
                    serde_json::json!({"status": r.status, "body": r.body}).to_string(),
                    StatusCode::OK,
                ),
                Err(e) => warp::reply::with_status(e.to_string(), StatusCode::BAD_GATEWAY),
            }
        });
    let kube = warp::path("kube")
        .and(warp::query::<HashMap<String, String>>())
        .then(|q: HashMap<String, String>| async move {
            let path = q.get("path").cloned().unwrap_or_else(|| "/api".into());
            let (status, body) = kube_get(&path).await;
            warp::reply::json(&serde_json::json!({"status": status, "body": body}))
        });
    let score_delay = env_ms("SCORE_DELAY_MS").unwrap_or_default();
    let score = warp::post()
        .and(warp::path("score"))
        .and(warp::path::end())
        .and(warp::body::content_length_limit(MAX_SCORE_BODY))
        .and(warp::body::json())
        .then(move |request: ScoreRequest| async move {
            tokio::time::sleep(score_delay).await;
            match request.scores() {
                Some(scores) => warp::reply::with_status(
                    warp::reply::json(&serde_json::json!({ "scores": scores })),
                    StatusCode::OK,
                ),
                None => warp::reply::with_status(
                    warp::reply::json(&serde_json::json!({
                        "error": "every request id needs one vector, all of one length"
                    })),
                    StatusCode::BAD_REQUEST,
                ),
            }
        });
    let routes = warp::get()
        .and(identity.or(healthz).or(readyz).or(env).or(fetch).or(kube))
        .or(score);

    let addr = SocketAddr::new(ip, port);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("test-server: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("test-server: listening on {addr}");
    let ignore_term = std::env::var("IGNORE_SIGTERM").as_deref() == Ok("1");
    warp::serve(routes)
        .incoming(listener)
        .graceful(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            loop {
                term.recv().await;
                if ignore_term {
                    eprintln!("test-server: ignoring SIGTERM");
                } else {
                    eprintln!("test-server: SIGTERM, shutting down");
                    return;
                }
            }
        })
        .run()
        .await;
}

/// A window to score, as MatchPipeline workers send it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScoreRequest {
    request_ids: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

impl ScoreRequest {
    /// The cosine of every pair, n × n row-major in the order of the ids;
    /// None when the vectors do not match the ids or each other in length.
    fn scores(&self) -> Option<Vec<f32>> {
        let n = self.request_ids.len();
        let dimension = self.vectors.first().map_or(0, Vec::len);
        if self.vectors.len() != n || self.vectors.iter().any(|v| v.len() != dimension) {
            return None;
        }
        let norms: Vec<f32> = self.vectors.iter().map(|v| dot(v, v).sqrt()).collect();
        let mut scores = Vec::with_capacity(n * n);
        for (a, norm_a) in self.vectors.iter().zip(&norms) {
            for (b, norm_b) in self.vectors.iter().zip(&norms) {
                let denominator = norm_a * norm_b;
                // A zero vector points nowhere: it is like nothing.
                let cosine = if denominator > 0.0 {
                    dot(a, b) / denominator
                } else {
                    0.0
                };
                scores.push(cosine);
            }
        }
        Some(scores)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A GET to the API server as an in-cluster client would make it.
async fn kube_get(path: &str) -> (u16, String) {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => return (0, format!("no client config: {e}")),
    };
    let request = match warp::http::Request::get(path).body(Vec::new()) {
        Ok(r) => r,
        Err(e) => return (0, e.to_string()),
    };
    match client.request_text(request).await {
        Ok(body) => (200, body),
        Err(kube::Error::Api(e)) => (e.code, e.message),
        Err(e) => (0, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(vectors: Vec<Vec<f32>>) -> ScoreRequest {
        ScoreRequest {
            request_ids: (0..vectors.len()).map(|i| format!("r{i}")).collect(),
            vectors,
        }
    }

    #[test]
    fn scores_every_pair_by_cosine_row_major() {
        let scores = request(vec![vec![1.0, 0.0], vec![0.0, 2.0], vec![-3.0, 0.0]])
            .scores()
            .expect("well-formed");
        #[rustfmt::skip]
        let expected = [
            1.0, 0.0, -1.0,
            0.0, 1.0, 0.0,
            -1.0, 0.0, 1.0,
        ];
        assert_eq!(scores.len(), expected.len());
        for (got, want) in scores.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{scores:?}");
        }
    }

    #[test]
    fn zero_vectors_score_zero_and_empty_windows_nothing() {
        let scores = request(vec![vec![0.0, 0.0], vec![1.0, 1.0]])
            .scores()
            .expect("well-formed");
        assert_eq!(scores[..3], [0.0, 0.0, 0.0]);
        assert!((scores[3] - 1.0).abs() < 1e-6, "{scores:?}");
        assert_eq!(request(vec![]).scores(), Some(vec![]));
    }

    #[test]
    fn mismatched_vectors_are_refused() {
        assert_eq!(request(vec![vec![1.0], vec![1.0, 0.0]]).scores(), None);
        let mut missing = request(vec![vec![1.0]]);
        missing.request_ids.push("r1".into());
        assert_eq!(missing.scores(), None);
    }
}
