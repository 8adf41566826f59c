//! The worker's own HTTP endpoints: `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Reply;
use warp::Filter;

/// Appends one metric in Prometheus text format.
pub fn write_metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    use std::fmt::Write;
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    );
}

/// A value computed on each request.
pub type Probe<T> = Arc<dyn Fn() -> T + Send + Sync>;

/// Serves until `shutdown`. `ready` answers `/readyz`; `metrics` renders `/metrics`.
pub async fn serve(
    addr: SocketAddr,
    ready: Probe<bool>,
    metrics: Probe<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let healthz = warp::path!("healthz").map(|| "ok".into_response());
    let readyz = warp::path!("readyz").map(move || {
        if ready() {
            "ready".into_response()
        } else {
            warp::reply::with_status("not ready", StatusCode::SERVICE_UNAVAILABLE).into_response()
        }
    });
    let metrics = warp::path!("metrics").map(move || {
        warp::reply::with_header(metrics(), "content-type", "text/plain; version=0.0.4")
            .into_response()
    });
    let routes = warp::get().and(healthz.or(readyz).unify().or(metrics).unify());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "health endpoints listening");
    warp::serve(routes)
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    Ok(())
}
