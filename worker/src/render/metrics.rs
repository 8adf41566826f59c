//! The render worker's counters, exposed as Prometheus text on `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::fleet::keeper::KeeperStats;

#[derive(Debug, Default)]
pub struct RenderMetrics {
    pub renders_started: AtomicU64,
    pub published: AtomicU64,
    pub rolled_forward: AtomicU64,
    pub attempts_failed: AtomicU64,
    pub tasks_failed: AtomicU64,
    pub skipped_done: AtomicU64,
    pub renders_killed: AtomicU64,
    pub discarded_fenced: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub commits: AtomicU64,
    pub render_millis_sum: AtomicU64,
    pub render_count: AtomicU64,
}

impl RenderMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn text(&self, keeper: &KeeperStats) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            crate::health::write_metric(&mut out, name, kind, help, value)
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        metric(
            "matchfleet_worker_renders_started_total",
            "counter",
            "Render commands started.",
            get(&self.renders_started),
        );
        metric(
            "matchfleet_worker_published_total",
            "counter",
            "Outputs published after an accepted completion.",
            get(&self.published),
        );
        metric(
            "matchfleet_worker_rolled_forward_total",
            "counter",
            "Accepted outputs whose interrupted publication this worker finished.",
            get(&self.rolled_forward),
        );
        metric(
            "matchfleet_worker_attempts_failed_total",
            "counter",
            "Render attempts that failed or timed out.",
            get(&self.attempts_failed),
        );
        metric(
            "matchfleet_worker_tasks_failed_total",
            "counter",
            "Tasks recorded as failed after maxAttempts.",
            get(&self.tasks_failed),
        );
        metric(
            "matchfleet_worker_skipped_done_total",
            "counter",
            "Messages skipped because their task was already done or failed.",
            get(&self.skipped_done),
        );
        metric(
            "matchfleet_worker_renders_killed_total",
            "counter",
            "Renders killed because their lease was lost.",
            get(&self.renders_killed),
        );
        metric(
            "matchfleet_worker_discarded_fenced_total",
            "counter",
            "Finished renders discarded because the completion was fenced.",
            get(&self.discarded_fenced),
        );
        metric(
            "matchfleet_worker_dead_lettered_total",
            "counter",
            "Malformed messages sent to the dead-letter topic.",
            get(&self.dead_lettered),
        );
        metric(
            "matchfleet_worker_commits_total",
            "counter",
            "Offset commits.",
            get(&self.commits),
        );
        metric(
            "matchfleet_worker_render_milliseconds_sum",
            "counter",
            "Time spent in render commands.",
            get(&self.render_millis_sum),
        );
        metric(
            "matchfleet_worker_render_count",
            "counter",
            "Render commands finished.",
            get(&self.render_count),
        );
        keeper.write_metrics(&mut out);
        out
    }
}
