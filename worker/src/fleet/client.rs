//! The worker's client of the progress service (JSON over HTTP). Every call
//! has a timeout: a hung call must not hold a heartbeat past its interval.

use std::time::Duration;

use matchfleet_api::progress::{
    ClaimRequest, ClaimResponse, CompleteRequest, CompleteResponse, FailRequest, FailResponse,
    HeartbeatRequest, HeartbeatResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("progress service unreachable: {0}")]
    Unreachable(String),
    #[error("progress service answered {status}: {body}")]
    Status { status: u16, body: String },
}

#[derive(Clone)]
pub struct ProgressClient {
    base: String,
    http: reqwest::Client,
}

impl ProgressClient {
    /// `base` is like `http://demo-progress.ns.svc:8080`.
    pub fn new(base: &str, timeout: Duration) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        Ok(ProgressClient {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(ClientError::Status {
                status: status.as_u16(),
                body,
            });
        }
        response
            .json()
            .await
            .map_err(|e| ClientError::Unreachable(format!("bad answer: {e}")))
    }

    pub async fn heartbeat(
        &self,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.post("/heartbeat", req).await
    }

    pub async fn claim(&self, req: &ClaimRequest) -> Result<ClaimResponse, ClientError> {
        self.post("/claims", req).await
    }

    pub async fn complete(&self, req: &CompleteRequest) -> Result<CompleteResponse, ClientError> {
        self.post("/claims/complete", req).await
    }

    pub async fn fail(&self, req: &FailRequest) -> Result<FailResponse, ClientError> {
        self.post("/claims/fail", req).await
    }
}
