//! HTTP scorers: the windows whose bandit-chosen scorer is an HTTP service
//! are sent to it concurrently, each with its own timeout; a window whose
//! scorer is slow, down or answers nonsense is matched with the builtin
//! fallback instead, so no window waits past its scorer's timeout.
//!
//! Protocol: `POST <url>` with `{"requestIds": [...], "vectors": [[...], ...]}`;
//! the answer is `{"scores": [...]}`, the n × n matrix row-major in the order
//! of `requestIds`.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::matching::{DueWindow, HttpScoring, WindowId};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ScoreRequest<'a> {
    request_ids: &'a [String],
    vectors: &'a [Vec<f32>],
}

#[derive(Deserialize)]
struct ScoreAnswer {
    scores: Vec<f32>,
}

/// Scores from the HTTP scorers of `due`, by window; windows missing from
/// the result fall back to a builtin scorer in `PartitionEngine::close`.
pub async fn score_http_windows(
    client: &reqwest::Client,
    due: &[DueWindow],
) -> HashMap<WindowId, Vec<f32>> {
    let calls = due
        .iter()
        .filter_map(|w| w.http.as_ref().map(|h| (w.id.clone(), h)))
        .map(|(id, h)| async move { call(client, h).await.map(|scores| (id, scores)) });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

async fn call(client: &reqwest::Client, h: &HttpScoring) -> Option<Vec<f32>> {
    let timeout = Duration::from_millis(h.timeout_millis.max(1) as u64);
    let body = ScoreRequest {
        request_ids: &h.request_ids,
        vectors: &h.vectors,
    };
    let answer = async {
        let response = client.post(&h.url).json(&body).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json::<ScoreAnswer>().await.ok()
    };
    // The timeout covers the whole exchange, the body included.
    let answer = tokio::time::timeout(timeout, answer).await.ok()??;
    let n = h.request_ids.len();
    let sized = answer.scores.len() == n * n;
    (sized && answer.scores.iter().all(|s| s.is_finite())).then_some(answer.scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Instant;
    use warp::Filter;

    fn window(url: &str, timeout_millis: i32, n: usize) -> DueWindow {
        DueWindow {
            id: WindowId {
                segment: "s".into(),
                start: 0,
                digest: n as u64,
            },
            end: 500,
            scorer: "remote".into(),
            http: Some(HttpScoring {
                url: url.into(),
                timeout_millis,
                request_ids: (0..n).map(|i| format!("r{i}")).collect(),
                vectors: vec![vec![1.0, 0.0]; n],
            }),
        }
    }

    /// A scorer answering every pair with 0.5 after `delay`; `n_override`
    /// answers a matrix of the wrong size.
    async fn scorer(delay: Duration, wrong_size: bool) -> SocketAddr {
        let route =
            warp::post()
                .and(warp::body::json())
                .then(move |body: serde_json::Value| async move {
                    tokio::time::sleep(delay).await;
                    let n = body["requestIds"].as_array().map(Vec::len).unwrap_or(0);
                    let len = if wrong_size { n * n + 1 } else { n * n };
                    warp::reply::json(&serde_json::json!({ "scores": vec![0.5; len] }))
                });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        addr
    }

    #[tokio::test]
    async fn answers_in_time_are_used_and_slow_dead_or_wrong_ones_are_not() {
        let client = reqwest::Client::new();
        let fast = scorer(Duration::ZERO, false).await;
        let slow = scorer(Duration::from_millis(2_000), false).await;
        let wrong = scorer(Duration::ZERO, true).await;
        let mut due = vec![
            window(&format!("http://{fast}/score"), 1_000, 3),
            window(&format!("http://{slow}/score"), 100, 4),
            window(&format!("http://{wrong}/score"), 1_000, 5),
            // Nothing listens on port 9 here: a dead scorer.
            window("http://127.0.0.1:9/score", 100, 6),
        ];
        due.push(DueWindow {
            http: None,
            ..window("unused", 1, 7)
        });
        let started = Instant::now();
        let scores = score_http_windows(&client, &due).await;
        let took = started.elapsed();
        assert_eq!(scores.len(), 1, "only the fast, well-formed answer is used");
        assert_eq!(scores[&due[0].id], vec![0.5; 9]);
        assert!(
            took < Duration::from_millis(1_500),
            "the slow scorer was given up at its timeout, not awaited: {took:?}"
        );
    }
}
