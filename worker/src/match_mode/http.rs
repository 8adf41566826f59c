//! The pipeline's public endpoints on each worker (port 8080):
//! `POST /requests` (HTTP ingest: validated, then produced to the request
//! topic keyed by segment), `GET /matches/{user}` (recent committed matches,
//! the polling fallback) and `GET /nudges/{user}` (a WebSocket that receives
//! a small JSON nudge when a match for the user is committed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use matchfleet_api::matching::{parse_request, Nudge};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc::UnboundedReceiver;
use warp::http::StatusCode;
use warp::ws::{Message, WebSocket};
use warp::Filter;

use super::feed::Feed;
use super::metrics::MatchMetrics;

/// Largest request body accepted by `POST /requests`.
const MAX_BODY: u64 = 64 * 1024;

pub struct Ingest {
    producer: FutureProducer,
    topic: String,
    dimension: usize,
}

impl Ingest {
    pub fn new(bootstrap: &str, topic: &str, dimension: usize) -> anyhow::Result<Self> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()?;
        Ok(Ingest {
            producer,
            topic: topic.to_string(),
            dimension,
        })
    }

    /// Validates and produces one request; the reply says why on failure.
    async fn accept(&self, body: &[u8]) -> (StatusCode, serde_json::Value) {
        let request = match parse_request(None, Some(body), self.dimension) {
            Ok(r) => r,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": e.to_string() }),
                )
            }
        };
        let record = FutureRecord::to(&self.topic)
            .key(request.segment.as_bytes())
            .payload(body);
        match self.producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => (
                StatusCode::ACCEPTED,
                serde_json::json!({ "requestId": request.request_id }),
            ),
            Err((e, _)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": format!("cannot write the request to Kafka: {e}") }),
            ),
        }
    }
}

pub async fn serve(
    addr: SocketAddr,
    ingest: Arc<Ingest>,
    feed: Arc<Feed>,
    metrics: Arc<MatchMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let requests = warp::post()
        .and(warp::path!("requests"))
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .then(move |body: bytes::Bytes| {
            let ingest = ingest.clone();
            let metrics = metrics.clone();
            async move {
                let (status, reply) = ingest.accept(&body).await;
                if status == StatusCode::ACCEPTED {
                    MatchMetrics::add(&metrics.ingested_http, 1);
                }
                warp::reply::with_status(warp::reply::json(&reply), status)
            }
        });
    let recent_feed = feed.clone();
    let matches = warp::get()
        .and(warp::path!("matches" / String))
        .map(move |user: String| warp::reply::json(&recent_feed.recent(&user)));
    let nudges = warp::path!("nudges" / String).and(warp::ws()).map(
        move |user: String, ws: warp::ws::Ws| {
            let feed = feed.clone();
            ws.on_upgrade(move |socket| push_nudges(socket, user, feed))
        },
    );
    let routes = requests.or(matches).or(nudges);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "pipeline endpoints listening");
    warp::serve(routes)
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    Ok(())
}

/// Forwards the user's nudges until either side closes, then forgets the
/// user's closed channels.
async fn push_nudges(socket: WebSocket, user: String, feed: Arc<Feed>) {
    let nudges = feed.subscribe(&user);
    forward_nudges(socket, nudges).await;
    feed.forget_closed(&user);
}

async fn forward_nudges(socket: WebSocket, mut nudges: UnboundedReceiver<Nudge>) {
    let (mut tx, mut rx) = socket.split();
    loop {
        tokio::select! {
            nudge = nudges.recv() => {
                let Some(nudge) = nudge else { return };
                let Ok(text) = serde_json::to_string(&nudge) else { continue };
                if tx.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
            incoming = rx.next() => match incoming {
                // Pings are answered by the library; anything else is ignored.
                Some(Ok(m)) if !m.is_close() => {}
                _ => return,
            }
        }
    }
}
