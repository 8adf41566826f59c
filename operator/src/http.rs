//! The admin endpoints, served by every replica whether it leads or not:
//! `/metrics` (Prometheus text), `/healthz` (the process runs) and `/readyz`
//! (it leads and runs the controller, or stands by for the Lease).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

use crate::metrics::Metrics;

/// Where the replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    StandingBy = 1,
    Leading = 2,
    Stopping = 3,
}

/// The replica's phase, shared with the endpoints.
#[derive(Clone, Default)]
pub struct Health(Arc<AtomicU8>);

impl Health {
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        match self.0.load(Ordering::Relaxed) {
            1 => Phase::StandingBy,
            2 => Phase::Leading,
            3 => Phase::Stopping,
            _ => Phase::Starting,
        }
    }

    pub fn ready(&self) -> bool {
        matches!(self.phase(), Phase::StandingBy | Phase::Leading)
    }
}

/// All admin routes.
pub fn routes(
    metrics: Arc<Metrics>,
    health: Health,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let metrics = warp::get().and(warp::path!("metrics")).map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "text/plain; version=0.0.4",
        )
        .into_response()
    });
    let healthz = warp::get()
        .and(warp::path!("healthz"))
        .map(|| warp::reply::with_status("ok", StatusCode::OK).into_response());
    let readyz = warp::get().and(warp::path!("readyz")).map(move || {
        if health.ready() {
            warp::reply::with_status("ok".to_string(), StatusCode::OK).into_response()
        } else {
            let phase = format!("{:?}", health.phase()).to_lowercase();
            warp::reply::with_status(phase, StatusCode::SERVICE_UNAVAILABLE).into_response()
        }
    });
    metrics
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .recover(|_rejection: warp::Rejection| async {
            Ok::<_, Infallible>(
                warp::reply::with_status("not found", StatusCode::NOT_FOUND).into_response(),
            )
        })
        .unify()
}

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoints listening");
    }
    warp::serve(routes(metrics, health))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readyz_follows_the_phase() {
        let health = Health::default();
        let routes = routes(Arc::new(Metrics::default()), health.clone());
        let get = |path: &'static str| {
            let routes = routes.clone();
            async move { warp::test::request().path(path).reply(&routes).await }
        };
        assert_eq!(get("/readyz").await.status(), 503);
        health.set(Phase::StandingBy);
        assert_eq!(get("/readyz").await.status(), 200);
        health.set(Phase::Leading);
        assert_eq!(get("/readyz").await.status(), 200);
        health.set(Phase::Stopping);
        assert_eq!(get("/readyz").await.status(), 503);
        assert_eq!(get("/healthz").await.status(), 200);
        let m = get("/metrics").await;
        assert_eq!(m.status(), 200);
        assert!(
            String::from_utf8_lossy(m.body()).contains("matchfleet_operator_reconciles_total 0")
        );
        assert_eq!(get("/nope").await.status(), 404);
    }
}
