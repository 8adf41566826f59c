//! A small HTTP server the e2e tests run as a pod (image `matchfleet/test-server:dev`).
//! It binds `$POD_IP:$PORT` and answers:
//! - `GET /`            its identity: pod name, namespace and IP (JSON)
//! - `GET /healthz`     always 200
//! - `GET /readyz`      503 until `READY_AFTER_MS` has passed, then 200
//! - `GET /env/NAME`    the value of an environment variable (404 if unset)
//! - `GET /fetch?url=U` fetches U from inside the pod, to test Service reachability
//! - `GET /kube?path=P` GETs P from the API server with the pod's inferred
//!   credentials (its ServiceAccount), answering `{"status": code, "body": ...}`
//!
//! `CRASH_AFTER_MS` makes it exit with code 3 after that long (a crashing
//! container); `IGNORE_SIGTERM=1` makes it ignore SIGTERM (to test SIGKILL
//! after the grace period).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use warp::http::StatusCode;
use warp::Filter;

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
    let routes = warp::get().and(identity.or(healthz).or(readyz).or(env).or(fetch).or(kube));

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
