//! The progress service's HTTP API (warp, JSON). Errors from the changelog
//! are 503s: the caller must not act on the change.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use matchfleet_api::progress::{
    Assignment, ClaimRequest, CompleteRequest, FailRequest, HeartbeatRequest,
};
use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

use super::changelog::ChangelogError;
use super::service::Progress;

fn json<T: Serialize>(result: Result<T, ChangelogError>) -> Response {
    match result {
        Ok(v) => warp::reply::json(&v).into_response(),
        Err(e) => warp::reply::with_status(
            warp::reply::json(&serde_json::json!({ "error": e.to_string() })),
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .into_response(),
    }
}

fn body<T: serde::de::DeserializeOwned + Send>(
) -> impl Filter<Extract = (T,), Error = warp::Rejection> + Clone {
    warp::body::content_length_limit(1 << 20).and(warp::body::json())
}

/// All routes of the service.
pub fn routes(p: Arc<Progress>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with = move || {
        let p = p.clone();
        warp::any().map(move || p.clone())
    };
    let assignment = warp::put()
        .and(warp::path!("assignment"))
        .and(with())
        .and(body())
        .then(|p: Arc<Progress>, a: Assignment| async move {
            json(p.put_assignment(a).await.map(|_| serde_json::json!({})))
        });
    let heartbeat = warp::post()
        .and(warp::path!("heartbeat"))
        .and(with())
        .and(body())
        .then(|p: Arc<Progress>, r: HeartbeatRequest| async move { json(p.heartbeat(&r).await) });
    let claim = warp::post()
        .and(warp::path!("claims"))
        .and(with())
        .and(body())
        .then(|p: Arc<Progress>, r: ClaimRequest| async move { json(Ok(p.claim(&r).await)) });
    let complete = warp::post()
        .and(warp::path!("claims" / "complete"))
        .and(with())
        .and(body())
        .then(|p: Arc<Progress>, r: CompleteRequest| async move { json(p.complete(&r).await) });
    let fail = warp::post()
        .and(warp::path!("claims" / "fail"))
        .and(with())
        .and(body())
        .then(|p: Arc<Progress>, r: FailRequest| async move { json(p.fail(&r).await) });
    let status = warp::get()
        .and(warp::path!("status"))
        .and(with())
        .then(|p: Arc<Progress>| async move { json(Ok(p.status().await)) });
    let metrics =
        warp::get()
            .and(warp::path!("metrics"))
            .and(with())
            .then(|p: Arc<Progress>| async move {
                warp::reply::with_header(
                    p.metrics().await,
                    "content-type",
                    "text/plain; version=0.0.4",
                )
                .into_response()
            });
    // The service only listens once the changelog is replayed, so it is ready
    // whenever it answers.
    let health = warp::get()
        .and(warp::path!("healthz").or(warp::path!("readyz")).unify())
        .map(|| warp::reply::with_status("ok", StatusCode::OK).into_response());
    assignment
        .or(heartbeat)
        .unify()
        .or(claim)
        .unify()
        .or(complete)
        .unify()
        .or(fail)
        .unify()
        .or(status)
        .unify()
        .or(metrics)
        .unify()
        .or(health)
        .unify()
        .recover(|rejection: warp::Rejection| async move {
            let (code, message) = if rejection.is_not_found() {
                (StatusCode::NOT_FOUND, "no such endpoint".to_string())
            } else if let Some(e) = rejection.find::<warp::filters::body::BodyDeserializeError>() {
                (StatusCode::BAD_REQUEST, format!("bad request body: {e}"))
            } else {
                (StatusCode::BAD_REQUEST, format!("{rejection:?}"))
            };
            Ok::<_, Infallible>(
                warp::reply::with_status(
                    warp::reply::json(&serde_json::json!({ "error": message })),
                    code,
                )
                .into_response(),
            )
        })
        .unify()
}

/// Serves until `shutdown` completes.
pub async fn serve(
    p: Arc<Progress>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "progress service listening");
    warp::serve(routes(p))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    Ok(())
}
