//! The progress service's state behind one lock, and the rule that makes it
//! durable: decide, append to the changelog (acks=all), then apply and answer.
//! A change whose append fails is answered with an error, so no worker acts on
//! something the log does not have.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use matchfleet_api::progress::{
    Assignment, ClaimRequest, ClaimResponse, CompleteRequest, CompleteResponse, Directive,
    FailRequest, FailResponse, HeartbeatRequest, HeartbeatResponse, ProgressStatus,
};
use tokio::sync::Mutex;
use tracing::info;

use super::changelog::{Changelog, ChangelogError, Entry};
use super::leases::{LeaseTable, OwnerChange};
use super::tasks::{TaskRecord, TaskTable};

/// Settings of one progress service.
#[derive(Debug, Clone)]
pub struct Settings {
    pub lease_millis: u64,
    pub max_attempts: u32,
    pub slo_millis: Option<u64>,
}

struct State {
    leases: LeaseTable,
    tasks: TaskTable,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub heartbeats: AtomicU64,
    pub fenced: AtomicU64,
    pub claims: AtomicU64,
    pub log_appends: AtomicU64,
    pub log_errors: AtomicU64,
}

pub struct Progress {
    state: Mutex<State>,
    log: Changelog,
    pub counters: Counters,
}

pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Progress {
    /// Replays the changelog and returns a service ready to answer.
    pub async fn start(log: Changelog, settings: &Settings) -> Result<Arc<Self>, ChangelogError> {
        let mut leases = LeaseTable::new(settings.lease_millis);
        let mut tasks = TaskTable::new(settings.max_attempts, settings.slo_millis);
        let log_for_replay = &log;
        let entries = tokio::task::block_in_place(|| log_for_replay.replay())?;
        let now = now_millis();
        let count = entries.len();
        for entry in entries {
            match entry {
                Entry::Owner {
                    lane,
                    partition,
                    holder,
                    epoch,
                } => leases.restore(
                    &OwnerChange {
                        lane,
                        partition,
                        holder,
                        epoch,
                    },
                    now,
                ),
                Entry::Task { key, state } => tasks.restore(&key, state.into()),
                Entry::Assignment { assignment } => leases.set_assignment(assignment),
            }
        }
        info!(
            entries = count,
            done = tasks.done(),
            failed = tasks.failed(),
            "replayed the changelog"
        );
        Ok(Arc::new(Progress {
            state: Mutex::new(State { leases, tasks }),
            log,
            counters: Counters::default(),
        }))
    }

    async fn append(&self, entries: &[Entry]) -> Result<(), ChangelogError> {
        if entries.is_empty() {
            return Ok(());
        }
        let result = self.log.append(entries).await;
        match &result {
            Ok(()) => self
                .counters
                .log_appends
                .fetch_add(entries.len() as u64, Ordering::Relaxed),
            Err(_) => self.counters.log_errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    pub async fn put_assignment(&self, assignment: Assignment) -> Result<(), ChangelogError> {
        let mut state = self.state.lock().await;
        if state.leases.assignment() == &assignment {
            return Ok(());
        }
        self.append(&[Entry::Assignment {
            assignment: assignment.clone(),
        }])
        .await?;
        state.leases.set_assignment(assignment);
        Ok(())
    }

    pub async fn heartbeat(
        &self,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ChangelogError> {
        self.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().await;
        let (directives, changes) = state.leases.heartbeat(req, now_millis());
        let entries: Vec<Entry> = changes.iter().map(Entry::owner).collect();
        // The in-memory table already moved; if the append fails the worker is
        // not told, so it never acts on an owner change the log lacks, and its
        // next beat re-acquires at a new epoch.
        self.append(&entries).await?;
        let fenced = directives
            .iter()
            .filter(|d| matches!(d, Directive::Fenced { .. }))
            .count();
        self.counters
            .fenced
            .fetch_add(fenced as u64, Ordering::Relaxed);
        Ok(HeartbeatResponse { directives })
    }

    pub async fn claim(&self, req: &ClaimRequest) -> ClaimResponse {
        self.counters.claims.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().await;
        let State { leases, tasks } = &mut *state;
        tasks.claim(req, leases, now_millis())
    }

    pub async fn complete(
        &self,
        req: &CompleteRequest,
    ) -> Result<CompleteResponse, ChangelogError> {
        let mut state = self.state.lock().await;
        let record = match state.tasks.complete(req, &state.leases, now_millis()) {
            Ok(record) => record,
            Err(answer) => return Ok(answer),
        };
        self.append(&[Entry::task(&req.key, &record)]).await?;
        state.tasks.apply(&req.key, record);
        Ok(CompleteResponse::Accepted)
    }

    pub async fn fail(&self, req: &FailRequest) -> Result<FailResponse, ChangelogError> {
        let mut state = self.state.lock().await;
        let (record, answer) = match state.tasks.fail(req, &state.leases, now_millis()) {
            Ok(decision) => decision,
            Err(answer) => return Ok(answer),
        };
        self.append(&[Entry::task(&req.key, &record)]).await?;
        if matches!(record, TaskRecord::Failed { .. }) {
            info!(key = %req.key, reason = %req.reason, "task failed for good");
        }
        state.tasks.apply(&req.key, record);
        Ok(answer)
    }

    pub async fn status(&self) -> ProgressStatus {
        let state = self.state.lock().await;
        let now = now_millis();
        ProgressStatus {
            done: state.tasks.done(),
            failed: state.tasks.failed(),
            in_flight: state.tasks.in_flight(&state.leases, now),
            duplicates_prevented: state.tasks.duplicates_prevented,
            slo_breaches: state.tasks.slo_breaches,
            latency_p50_millis: state.tasks.percentile(50.0),
            latency_p99_millis: state.tasks.percentile(99.0),
            leases: state.leases.view(now),
            done_by_lane: state.tasks.done_by_lane().clone(),
        }
    }

    /// Prometheus text exposition.
    pub async fn metrics(&self) -> String {
        let s = self.status().await;
        let c = &self.counters;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        metric(
            "matchfleet_progress_tasks_done_total",
            "counter",
            "Tasks completed and accepted.",
            s.done,
        );
        metric(
            "matchfleet_progress_tasks_failed_total",
            "counter",
            "Tasks failed after maxAttempts.",
            s.failed,
        );
        metric(
            "matchfleet_progress_tasks_in_flight",
            "gauge",
            "Tasks claimed under a current lease.",
            s.in_flight,
        );
        metric(
            "matchfleet_progress_duplicates_prevented_total",
            "counter",
            "Claims refused because the task was done or held.",
            s.duplicates_prevented,
        );
        metric(
            "matchfleet_progress_slo_breaches_total",
            "counter",
            "Tasks done later than the SLO.",
            s.slo_breaches,
        );
        metric(
            "matchfleet_progress_latency_p99_milliseconds",
            "gauge",
            "Event to done, 99th percentile.",
            s.latency_p99_millis.unwrap_or(0),
        );
        metric(
            "matchfleet_progress_heartbeats_total",
            "counter",
            "Heartbeats handled.",
            c.heartbeats.load(Ordering::Relaxed),
        );
        metric(
            "matchfleet_progress_fenced_total",
            "counter",
            "Fenced directives sent.",
            c.fenced.load(Ordering::Relaxed),
        );
        metric(
            "matchfleet_progress_claims_total",
            "counter",
            "Claims handled.",
            c.claims.load(Ordering::Relaxed),
        );
        metric(
            "matchfleet_progress_changelog_appends_total",
            "counter",
            "Entries appended to the changelog.",
            c.log_appends.load(Ordering::Relaxed),
        );
        metric(
            "matchfleet_progress_changelog_errors_total",
            "counter",
            "Failed changelog appends.",
            c.log_errors.load(Ordering::Relaxed),
        );
        out
    }
}
