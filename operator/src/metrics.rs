//! The operator's Prometheus metrics, in the text exposition format. A few
//! atomics are all it needs; labels are bounded (error categories are a
//! fixed set of static strings).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use matchfleet_api::metrics::DurationHistogram;

/// Upper bounds (seconds) of the reconcile duration histogram: a reconcile
/// is a few API calls, a Kafka look-up (5 s timeout) and a progress service
/// call (3 s timeout).
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

pub struct Metrics {
    errors: Mutex<BTreeMap<&'static str, u64>>,
    durations: DurationHistogram,
    leader: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            errors: Mutex::default(),
            durations: DurationHistogram::new(&BUCKETS),
            leader: AtomicBool::default(),
        }
    }
}

impl Metrics {
    /// Records one reconcile, and its error category if it failed.
    pub fn reconciled(&self, took: Duration, error: Option<&'static str>) {
        self.durations.observe(took);
        if let Some(category) = error {
            let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            *errors.entry(category).or_default() += 1;
        }
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let count = self.durations.count();
        let _ = writeln!(
            out,
            "# HELP matchfleet_operator_reconciles_total Reconciles run.\n\
             # TYPE matchfleet_operator_reconciles_total counter\n\
             matchfleet_operator_reconciles_total {count}"
        );
        let _ = writeln!(
            out,
            "# HELP matchfleet_operator_reconcile_errors_total Reconciles that failed, by error category.\n\
             # TYPE matchfleet_operator_reconcile_errors_total counter"
        );
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (category, n) in errors {
            let _ = writeln!(
                out,
                "matchfleet_operator_reconcile_errors_total{{category=\"{category}\"}} {n}"
            );
        }
        self.durations.render(
            &mut out,
            "matchfleet_operator_reconcile_duration_seconds",
            "Time one reconcile took.",
        );
        let _ = writeln!(
            out,
            "# HELP matchfleet_operator_leader 1 while this replica holds the leader Lease.\n\
             # TYPE matchfleet_operator_leader gauge\n\
             matchfleet_operator_leader {}",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(20), None);
        m.reconciled(Duration::from_millis(300), Some("kube"));
        m.set_leader(true);
        let text = m.render();
        assert!(text.contains("matchfleet_operator_reconciles_total 2\n"));
        assert!(text.contains("matchfleet_operator_reconcile_errors_total{category=\"kube\"} 1\n"));
        assert!(
            text.contains("matchfleet_operator_reconcile_duration_seconds_bucket{le=\"0.01\"} 0\n")
        );
        assert!(text
            .contains("matchfleet_operator_reconcile_duration_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(
            text.contains("matchfleet_operator_reconcile_duration_seconds_bucket{le=\"0.5\"} 2\n")
        );
        assert!(
            text.contains("matchfleet_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("matchfleet_operator_reconcile_duration_seconds_sum 0.32\n"));
        assert!(text.contains("matchfleet_operator_leader 1\n"));
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split(' ').count(), 2, "{line}");
        }
    }
}
