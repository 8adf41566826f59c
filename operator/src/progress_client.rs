//! The operator's side of the progress service protocol
//! (`matchfleet_api::progress`): `PUT /assignment` and `GET /status`.

use std::time::Duration;

use matchfleet_api::progress::{Assignment, ProgressStatus};

/// A progress service that does not answer within this is "not ready" for
/// this reconcile; the next one (seconds later) tries again.
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("{url}: {detail}")]
    Request {
        url: String,
        /// The whole cause chain ("... connection refused"), for conditions.
        detail: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

#[derive(Clone)]
pub struct ProgressClient {
    http: reqwest::Client,
}

impl ProgressClient {
    pub fn new() -> Result<Self, ProgressError> {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            // Cluster-internal addresses: an HTTP(S)_PROXY in the operator's
            // environment must not capture them.
            .no_proxy()
            .user_agent("matchfleet-operator")
            .build()
            .map_err(ProgressError::Client)?;
        Ok(ProgressClient { http })
    }

    /// `GET {base}/status`.
    pub async fn status(&self, base: &str) -> Result<ProgressStatus, ProgressError> {
        let url = format!("{base}/status");
        let response = self.http.get(&url).send().await;
        let response = check(&url, response).await?;
        response
            .json()
            .await
            .map_err(|source| request_error(&url, source))
    }

    /// `PUT {base}/assignment`; idempotent on the service's side.
    pub async fn put_assignment(
        &self,
        base: &str,
        assignment: &Assignment,
    ) -> Result<(), ProgressError> {
        let url = format!("{base}/assignment");
        let response = self.http.put(&url).json(assignment).send().await;
        check(&url, response).await.map(|_| ())
    }
}

fn request_error(url: &str, source: reqwest::Error) -> ProgressError {
    let mut detail = source.to_string();
    let mut cause = std::error::Error::source(&source);
    while let Some(c) = cause {
        let text = c.to_string();
        if !detail.contains(&text) {
            detail = format!("{detail}: {text}");
        }
        cause = c.source();
    }
    ProgressError::Request {
        url: url.to_string(),
        detail,
        source,
    }
}

async fn check(
    url: &str,
    response: Result<reqwest::Response, reqwest::Error>,
) -> Result<reqwest::Response, ProgressError> {
    let response = response.map_err(|source| request_error(url, source))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let mut body = response.text().await.unwrap_or_default();
    // Keep condition messages and logs short.
    if body.len() > 200 {
        let mut end = 200;
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        body.truncate(end);
    }
    Err(ProgressError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        body,
    })
}
