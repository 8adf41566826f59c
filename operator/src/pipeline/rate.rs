//! The pipeline's counters and its matches-per-second. Workers report
//! cumulative per-partition counters with their heartbeats (committed with
//! the partition's state, so they survive a change of owner); the progress
//! service shows each lease's last report. The status sums the live lane's,
//! and derives the rate from `matched` between reconciles, smoothed.

use matchfleet_api::match_pipeline::FeedbackCounts;
use matchfleet_api::progress::ProgressStatus;

use crate::fleet::to_i64;
use crate::names::LANE_LIVE;

/// Counter names in a lease's `counters`.
pub const MATCHED: &str = "matched";
pub const EXPIRED: &str = "expired";
pub const DEAD_LETTERED: &str = "deadLettered";

/// Weight of the newest measurement in the moving average. At the busy
/// reconcile pace (3 s) 0.4 gives a time constant of about 7 s: a steady
/// column that still follows a change of load within 15 s or so.
const WEIGHT: f64 = 0.4;
/// Shorter intervals (a reconcile right after another, on a pod event) are
/// skipped: their few matches say more about batching than about the rate.
const MIN_SAMPLE_MILLIS: i64 = 2_000;
/// A sample older than this (the operator was down, leadership moved, the
/// pipeline sat idle) no longer describes the present: it only starts the
/// next interval.
const STALE_MILLIS: i64 = 60_000;
/// Below this a decaying average shows as `0.0`: it is then held at 0, so an
/// idle pipeline's status stops changing.
const IDLE_RATE: f64 = 0.05;

/// The feedback join's counter names, in the order of [`FeedbackCounts`]'s fields.
const FEEDBACK: [&str; 6] = [
    "outcomes",
    "joined",
    "noOutcome",
    "outcomesLate",
    "outcomesDuplicate",
    "outcomesUnknown",
];

/// The live lane's counters, summed over its partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub matched: i64,
    pub expired: i64,
    pub dead_lettered: i64,
    pub feedback: FeedbackCounts,
}

/// `a` with each count raised to `b`'s where that is higher: counters never go back.
pub fn feedback_max(a: FeedbackCounts, b: FeedbackCounts) -> FeedbackCounts {
    FeedbackCounts {
        outcomes: a.outcomes.max(b.outcomes),
        joined: a.joined.max(b.joined),
        no_outcome: a.no_outcome.max(b.no_outcome),
        late: a.late.max(b.late),
        duplicate: a.duplicate.max(b.duplicate),
        unknown: a.unknown.max(b.unknown),
    }
}

/// The sums over the live lane's leases of what their holders last reported.
pub fn live_counters(status: &ProgressStatus) -> Counters {
    let mut out = Counters::default();
    for lease in status
        .leases
        .get(LANE_LIVE)
        .into_iter()
        .flat_map(|l| l.values())
    {
        let get = |k: &str| to_i64(lease.counters.get(k).copied().unwrap_or(0));
        out.matched = out.matched.saturating_add(get(MATCHED));
        out.expired = out.expired.saturating_add(get(EXPIRED));
        out.dead_lettered = out.dead_lettered.saturating_add(get(DEAD_LETTERED));
        let f = &mut out.feedback;
        let [o, j, n, l, d, u] = FEEDBACK.map(get);
        f.outcomes = f.outcomes.saturating_add(o);
        f.joined = f.joined.saturating_add(j);
        f.no_outcome = f.no_outcome.saturating_add(n);
        f.late = f.late.saturating_add(l);
        f.duplicate = f.duplicate.saturating_add(d);
        f.unknown = f.unknown.saturating_add(u);
    }
    out
}

/// `matched` at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub matched: i64,
    pub at_millis: i64,
}

/// The sample to keep and the rate (matches per second) after observing
/// `now`, given the last kept sample and rate. The first sample gives no
/// rate; each later interval of at least [`MIN_SAMPLE_MILLIS`] is averaged
/// in with weight [`WEIGHT`]. An idle pipeline whose rate reached 0 keeps its
/// sample, so its status stops changing; the stale-sample rule then makes the
/// first interval after the pause start afresh rather than averaging the
/// pause in.
pub fn next_rate(prev: Option<Sample>, rate: Option<f64>, now: Sample) -> (Sample, Option<f64>) {
    let Some(p) = prev else {
        return (now, rate);
    };
    let millis = now.at_millis - p.at_millis;
    // A clock that went back or a counter that did: measure from here on.
    if millis < 0 || now.matched < p.matched {
        return (now, rate);
    }
    if now.matched == p.matched && rate == Some(0.0) {
        return (p, rate);
    }
    if millis > STALE_MILLIS {
        return (now, rate);
    }
    if millis < MIN_SAMPLE_MILLIS {
        return (p, rate);
    }
    let measured = (now.matched - p.matched) as f64 * 1000.0 / millis as f64;
    let next = match rate {
        Some(r) => WEIGHT * measured + (1.0 - WEIGHT) * r,
        None => measured,
    };
    (now, Some(if next < IDLE_RATE { 0.0 } else { next }))
}

/// The status form of a rate: one decimal, e.g. `1250.5`.
pub fn format_rate(rate: f64) -> String {
    format!("{rate:.1}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchfleet_api::progress::LeaseView;
    use proptest::prelude::*;

    fn at(matched: i64, secs: f64) -> Sample {
        Sample {
            matched,
            at_millis: (secs * 1000.0) as i64,
        }
    }

    fn lease(counters: &[(&str, u64)]) -> LeaseView {
        LeaseView {
            holder: Some("x".to_string()),
            epoch: 1,
            committed: 0,
            counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn counters_sum_the_live_lane_only() {
        let status = ProgressStatus {
            leases: [
                (
                    "live".to_string(),
                    [
                        (0, lease(&[("matched", 10), ("expired", 2)])),
                        (
                            1,
                            lease(&[
                                ("matched", 5),
                                ("deadLettered", 1),
                                ("joined", 4),
                                ("outcomes", 6),
                            ]),
                        ),
                        (2, lease(&[])),
                    ]
                    .into(),
                ),
                (
                    "green".to_string(),
                    [(0, lease(&[("matched", 1000)]))].into(),
                ),
            ]
            .into(),
            ..Default::default()
        };
        assert_eq!(
            live_counters(&status),
            Counters {
                matched: 15,
                expired: 2,
                dead_lettered: 1,
                feedback: FeedbackCounts {
                    outcomes: 6,
                    joined: 4,
                    ..Default::default()
                },
            }
        );
        assert_eq!(
            live_counters(&ProgressStatus::default()),
            Counters::default()
        );
    }

    #[test]
    fn the_first_sample_gives_no_rate_the_second_one_does() {
        let (s, r) = next_rate(None, None, at(100, 0.0));
        assert_eq!((s, r), (at(100, 0.0), None));
        let (s, r) = next_rate(Some(s), r, at(400, 3.0));
        assert_eq!((s, r), (at(400, 3.0), Some(100.0)));
        // Then smoothed: 0.4 * 200 + 0.6 * 100.
        let (_, r) = next_rate(Some(s), r, at(1000, 6.0));
        assert_eq!(r.map(format_rate).as_deref(), Some("140.0"));
    }

    #[test]
    fn short_stale_and_backwards_intervals_are_not_measured() {
        let base = at(100, 10.0);
        assert_eq!(
            next_rate(Some(base), Some(5.0), at(200, 11.0)),
            (base, Some(5.0))
        );
        assert_eq!(
            next_rate(Some(base), Some(5.0), at(9000, 100.0)),
            (at(9000, 100.0), Some(5.0))
        );
        assert_eq!(
            next_rate(Some(base), Some(5.0), at(200, 5.0)),
            (at(200, 5.0), Some(5.0))
        );
        assert_eq!(
            next_rate(Some(base), Some(5.0), at(50, 13.0)),
            (at(50, 13.0), Some(5.0))
        );
    }

    #[test]
    fn an_idle_pipeline_settles_at_zero_and_stops_changing() {
        let mut s = at(100, 0.0);
        let mut r = Some(10.0);
        let mut t = 0.0;
        for _ in 0..20 {
            t += 3.0;
            (s, r) = next_rate(Some(s), r, at(100, t));
        }
        assert_eq!(r, Some(0.0));
        let settled = s;
        assert_eq!(
            next_rate(Some(s), r, at(100, t + 3.0)),
            (settled, Some(0.0))
        );
        // Traffic again after a long pause: the pause is not averaged in.
        let (s, r) = next_rate(Some(s), r, at(130, t + 300.0));
        assert_eq!((s, r), (at(130, t + 300.0), Some(0.0)));
        let (_, r) = next_rate(Some(s), r, at(430, t + 303.0));
        assert_eq!(r.map(format_rate).as_deref(), Some("40.0"));
    }

    #[test]
    fn formats_one_decimal() {
        assert_eq!(format_rate(1250.54), "1250.5");
        assert_eq!(format_rate(0.0), "0.0");
    }

    proptest! {
        /// With matches at a constant pace, every rate shown is that pace.
        #[test]
        fn a_steady_pace_is_measured_exactly(
            pace in 1u32..5_000,
            steps in proptest::collection::vec(2_000i64..10_000, 2..30),
        ) {
            let mut t = 0i64;
            let mut s = Sample { matched: 0, at_millis: 0 };
            let mut r = None;
            for dt in steps {
                t += dt;
                let matched = i64::from(pace) * t / 1000;
                (s, r) = next_rate(Some(s), r, Sample { matched, at_millis: t });
                let shown = r.expect("measured after the first interval");
                // Integer counts lose at most one match per interval.
                prop_assert!((shown - f64::from(pace)).abs() <= 1000.0 / 2000.0 + 1e-9, "{shown} vs {pace}");
            }
        }
    }
}
