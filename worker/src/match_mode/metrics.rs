//! The match worker's counters, exposed as Prometheus text on `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use matchfleet_api::metrics::DurationHistogram;

use crate::fleet::keeper::KeeperStats;

/// Upper bounds (seconds) of the close and transaction histograms: a window's
/// results should be readable within tens of milliseconds of its close.
const LATENCY_BOUNDS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Where the time between a window's close and its results goes.
#[derive(Debug)]
pub struct Latencies {
    /// A partition's close call that closed at least one window (matching,
    /// results, state changes).
    pub close: DurationHistogram,
    /// A committed transaction, from its begin to its commit.
    pub transaction: DurationHistogram,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            close: DurationHistogram::new(&LATENCY_BOUNDS),
            transaction: DurationHistogram::new(&LATENCY_BOUNDS),
        }
    }
}

#[derive(Debug, Default)]
pub struct MatchMetrics {
    pub requests: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub windows_closed: AtomicU64,
    pub windows_prescored: AtomicU64,
    pub windows_presorted: AtomicU64,
    pub matched: AtomicU64,
    pub expired: AtomicU64,
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    pub latencies: Latencies,
    pub restored_records: AtomicU64,
    pub replayed_requests: AtomicU64,
    pub http_scorer_fallbacks: AtomicU64,
    pub nudges_sent: AtomicU64,
    pub ingested_http: AtomicU64,
    pub outcomes: AtomicU64,
    pub samples: AtomicU64,
}

impl MatchMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn text(&self, keeper: &KeeperStats) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, help, value) in [
            (
                "requests_total",
                "Valid match requests read.",
                get(&self.requests),
            ),
            (
                "dead_lettered_total",
                "Malformed requests and outcomes sent to the dead-letter topic.",
                get(&self.dead_lettered),
            ),
            (
                "outcomes_total",
                "Valid outcome events read (feedback join).",
                get(&self.outcomes),
            ),
            (
                "feedback_samples_total",
                "Labelled samples committed to the rewards topic.",
                get(&self.samples),
            ),
            (
                "windows_closed_total",
                "Event-time windows closed.",
                get(&self.windows_closed),
            ),
            (
                "windows_prescored_total",
                "Windows matched from candidate lists scored while they filled.",
                get(&self.windows_prescored),
            ),
            (
                "windows_presorted_total",
                "Prescored windows whose candidate edges were sorted before the close.",
                get(&self.windows_presorted),
            ),
            (
                "matched_total",
                "Matches committed (pairs).",
                get(&self.matched),
            ),
            (
                "expired_total",
                "Requests committed as expired.",
                get(&self.expired),
            ),
            (
                "commits_total",
                "Transactions committed.",
                get(&self.commits),
            ),
            (
                "commit_failures_total",
                "Transactions that failed (the partition was given up).",
                get(&self.commit_failures),
            ),
            (
                "restored_records_total",
                "State changelog records read when taking partitions.",
                get(&self.restored_records),
            ),
            (
                "replayed_requests_total",
                "Pending requests re-read from the request topic when taking partitions.",
                get(&self.replayed_requests),
            ),
            (
                "http_scorer_fallbacks_total",
                "Windows an HTTP scorer did not answer in time for (a builtin scorer was used).",
                get(&self.http_scorer_fallbacks),
            ),
            (
                "nudges_sent_total",
                "Nudges pushed to connected WebSocket clients.",
                get(&self.nudges_sent),
            ),
            (
                "ingested_http_total",
                "Requests accepted over HTTP and produced to the request topic.",
                get(&self.ingested_http),
            ),
        ] {
            crate::health::write_metric(
                &mut out,
                &format!("matchfleet_match_{name}"),
                "counter",
                help,
                value,
            );
        }
        self.latencies.close.render(
            &mut out,
            "matchfleet_match_window_close_seconds",
            "Time a partition's close call took, when it closed at least one window.",
        );
        self.latencies.transaction.render(
            &mut out,
            "matchfleet_match_transaction_seconds",
            "Time a committed transaction (results, state, offsets) took from its begin to its commit.",
        );
        keeper.write_metrics(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_close_and_transaction_histograms_are_exposed() {
        let m = MatchMetrics::default();
        m.latencies.close.observe(Duration::from_millis(3));
        m.latencies.transaction.observe(Duration::from_millis(30));
        MatchMetrics::add(&m.commits, 1);
        let text = m.text(&KeeperStats::default());
        for line in [
            "# TYPE matchfleet_match_window_close_seconds histogram",
            "matchfleet_match_window_close_seconds_bucket{le=\"0.0025\"} 0",
            "matchfleet_match_window_close_seconds_bucket{le=\"0.005\"} 1",
            "matchfleet_match_window_close_seconds_count 1",
            "matchfleet_match_transaction_seconds_bucket{le=\"0.025\"} 0",
            "matchfleet_match_transaction_seconds_bucket{le=\"0.05\"} 1",
            "matchfleet_match_transaction_seconds_sum 0.03",
            "matchfleet_match_commits_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
