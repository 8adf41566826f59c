//! One render task: claim -> render -> complete -> publish, with retries.
//! The completion accepted at the current epoch is the fencing token: only
//! then is the staged output published. A task ends `Finished` (done, failed
//! for good, or already handled: its offset may be committed) or `Abandoned`
//! (the lease was lost: its offset must not be committed).

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use matchfleet_api::progress::{
    ClaimRequest, ClaimResponse, CompleteRequest, CompleteResponse, FailRequest, FailResponse,
};
use tracing::{info, warn};

use super::child::{self, Outcome};
use super::message::Task;
use super::metrics::RenderMetrics;
use super::outputs::Published;
use super::template::{self, Vars};
use super::RenderWorker;
use crate::fleet::client::ClientError;
use crate::fleet::guard::LeaseGuard;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEnd {
    Finished,
    Abandoned,
}

/// Calls the progress service until it answers or the lease is lost.
async fn persist<T, F, Fut>(guard: &LeaseGuard, what: &str, mut call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut wait = Duration::from_millis(50);
    loop {
        if !guard.valid() {
            return None;
        }
        match call().await {
            Ok(v) => return Some(v),
            Err(e) => {
                warn!(error = %e, "{what} failed; retrying while the lease lasts");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
        }
    }
}

impl RenderWorker {
    pub(super) async fn render_task(&self, guard: &LeaseGuard, task: &Task) -> TaskEnd {
        let m = &self.metrics;
        let claim = ClaimRequest {
            key: task.key.clone(),
            lane: guard.lane.clone(),
            partition: guard.partition,
            epoch: guard.epoch,
            slot: self.config.slot.clone(),
            offset: task.offset,
        };
        loop {
            let Some(answer) = persist(guard, "claim", || self.client.claim(&claim)).await else {
                return TaskEnd::Abandoned;
            };
            let attempt = match answer {
                ClaimResponse::Granted { attempt } => attempt,
                ClaimResponse::AlreadyDone { staged } => {
                    RenderMetrics::add(&m.skipped_done, 1);
                    self.roll_forward(staged.as_deref(), &task.key);
                    return TaskEnd::Finished;
                }
                ClaimResponse::AlreadyFailed => {
                    RenderMetrics::add(&m.skipped_done, 1);
                    return TaskEnd::Finished;
                }
                ClaimResponse::Busy => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                ClaimResponse::Fenced { .. } => return TaskEnd::Abandoned,
            };
            match self.attempt(guard, task, attempt).await {
                Some(end) => return end,
                None => {
                    // A failed attempt with retries left: back off a little.
                    let backoff =
                        Duration::from_millis(200 * u64::from(attempt)).min(Duration::from_secs(5));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// One render attempt. `None` means it failed and should be retried.
    async fn attempt(&self, guard: &LeaseGuard, task: &Task, attempt: u32) -> Option<TaskEnd> {
        let m = &self.metrics;
        let slot = &self.config.slot;
        let staged = self
            .outputs
            .staging_path(&task.key, slot, guard.epoch, attempt);
        let value_file = self
            .values_dir
            .join(format!("{}.{}.a{attempt}", task.key, task.offset));
        // Most of a no-op render's cost is file churn: write the value only
        // for commands that read it.
        let uses_value = self
            .config
            .command
            .iter()
            .any(|a| a.contains("{value_file}"));
        if uses_value {
            if let Err(e) = std::fs::write(&value_file, &task.value) {
                return self
                    .fail(guard, task, &format!("cannot write the value file: {e}"))
                    .await;
            }
        }
        let argv = template::expand(
            &self.config.command,
            &Vars {
                key: &task.key,
                partition: task.partition,
                offset: task.offset,
                attempt,
                value_file: &value_file.to_string_lossy(),
                output: &staged.to_string_lossy(),
                slot,
                epoch: guard.epoch,
            },
        );
        RenderMetrics::add(&m.renders_started, 1);
        let started = Instant::now();
        let outcome = child::run(&argv, self.config.timeout, guard.fenced(), &task.key).await;
        RenderMetrics::add(&m.render_millis_sum, started.elapsed().as_millis() as u64);
        RenderMetrics::add(&m.render_count, 1);
        if uses_value {
            let _ = std::fs::remove_file(&value_file);
        }
        let reason = match outcome {
            Outcome::Succeeded if staged.exists() => None,
            Outcome::Succeeded => {
                Some("the render command exited 0 but did not write {output}".to_string())
            }
            Outcome::Failed(reason) => Some(reason),
            Outcome::TimedOut => Some(format!(
                "the render command timed out after {}s",
                self.config.timeout.as_secs()
            )),
            Outcome::Killed => {
                RenderMetrics::add(&m.renders_killed, 1);
                self.outputs.discard(&staged);
                return Some(TaskEnd::Abandoned);
            }
        };
        if let Some(reason) = reason {
            self.outputs.discard(&staged);
            return self.fail(guard, task, &reason).await;
        }
        self.complete(guard, task, &staged).await
    }

    async fn complete(&self, guard: &LeaseGuard, task: &Task, staged: &Path) -> Option<TaskEnd> {
        let m = &self.metrics;
        let req = CompleteRequest {
            key: task.key.clone(),
            lane: guard.lane.clone(),
            partition: guard.partition,
            epoch: guard.epoch,
            slot: self.config.slot.clone(),
            event_time_millis: task.event_time_millis,
            staged: Some(staged.to_string_lossy().into_owned()),
        };
        let Some(answer) = persist(guard, "complete", || self.client.complete(&req)).await else {
            self.outputs.discard(staged);
            RenderMetrics::add(&m.discarded_fenced, 1);
            return Some(TaskEnd::Abandoned);
        };
        match answer {
            CompleteResponse::Accepted => {
                match self.outputs.publish(staged, &task.key) {
                    Ok(Published::Now) => RenderMetrics::add(&m.published, 1),
                    Ok(Published::AlreadyGone) => {}
                    Err(e) => {
                        warn!(key = %task.key, error = %e, "cannot publish an accepted output")
                    }
                }
                Some(TaskEnd::Finished)
            }
            CompleteResponse::AlreadyDone { staged: accepted } => {
                if accepted.as_deref() != Some(&*staged.to_string_lossy()) {
                    self.outputs.discard(staged);
                }
                self.roll_forward(accepted.as_deref(), &task.key);
                Some(TaskEnd::Finished)
            }
            CompleteResponse::Fenced { current_epoch } => {
                info!(key = %task.key, epoch = guard.epoch, current_epoch, "completion fenced; output discarded");
                self.outputs.discard(staged);
                RenderMetrics::add(&m.discarded_fenced, 1);
                guard.fence();
                Some(TaskEnd::Abandoned)
            }
        }
    }

    async fn fail(&self, guard: &LeaseGuard, task: &Task, reason: &str) -> Option<TaskEnd> {
        let m = &self.metrics;
        RenderMetrics::add(&m.attempts_failed, 1);
        warn!(key = %task.key, %reason, "render attempt failed");
        let req = FailRequest {
            key: task.key.clone(),
            lane: guard.lane.clone(),
            partition: guard.partition,
            epoch: guard.epoch,
            slot: self.config.slot.clone(),
            reason: reason.to_string(),
        };
        let Some(answer) = persist(guard, "fail", || self.client.fail(&req)).await else {
            return Some(TaskEnd::Abandoned);
        };
        match answer {
            FailResponse::Retry { .. } => None,
            FailResponse::Failed => {
                RenderMetrics::add(&m.tasks_failed, 1);
                Some(TaskEnd::Finished)
            }
            FailResponse::Fenced { .. } => {
                guard.fence();
                Some(TaskEnd::Abandoned)
            }
        }
    }

    /// Finishes an accepted publication that its worker did not get to.
    fn roll_forward(&self, staged: Option<&str>, key: &str) {
        let Some(staged) = staged else { return };
        let staged = Path::new(staged);
        if !staged.exists() {
            return;
        }
        match self.outputs.publish(staged, key) {
            Ok(Published::Now) => {
                info!(%key, "finished an interrupted publication");
                RenderMetrics::add(&self.metrics.rolled_forward, 1);
            }
            Ok(Published::AlreadyGone) => {}
            Err(e) => warn!(%key, error = %e, "cannot finish an interrupted publication"),
        }
    }
}
