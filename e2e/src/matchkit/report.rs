//! What the checker found: the run's figures and every rule broken, as JSON
//! a person (or a test's assertion message) can read.

use std::collections::BTreeMap;

use serde::Serialize;

/// The outcome of a check. `ok` is false as soon as one rule is broken.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub ok: bool,
    pub figures: Figures,
    /// How often each rule was broken (all occurrences).
    pub violation_counts: BTreeMap<&'static str, u64>,
    /// The violations themselves, at most `samples` of each kind.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Violations of one kind (as named in `violation_counts`), for tests.
    pub fn of_kind(&self, kind: &str) -> Vec<&Violation> {
        self.violations
            .iter()
            .filter(|v| v.kind() == kind)
            .collect()
    }
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Figures {
    /// Records on the request topic.
    pub requests: u64,
    pub valid: u64,
    pub invalid: u64,
    /// Records on the results topic.
    pub results: u64,
    /// Distinct match ids.
    pub matched_pairs: u64,
    /// Valid requests settled by a match.
    pub matched_requests: u64,
    /// Expired records by reason (`noPartner`, `tooLate`).
    pub expired: BTreeMap<String, u64>,
    /// Share of valid requests that were matched.
    pub match_rate: f64,
    /// Request event time to the result's `closedAt` (informative: late
    /// events make it look long by design).
    pub latency_millis: Option<Latency>,
    /// Records on the dead-letter topic, if it was read.
    pub dead_letters: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    pub count: u64,
    pub p50: i64,
    pub p99: i64,
    pub max: i64,
}

impl Latency {
    /// Nearest-rank percentiles; `None` without samples.
    pub fn of(mut samples: Vec<i64>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            let r = (p * samples.len() as f64).ceil() as usize;
            samples[r.clamp(1, samples.len()) - 1]
        };
        Some(Latency {
            count: samples.len() as u64,
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
        })
    }
}

/// A broken rule, with what is needed to find the offending records.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Violation {
    /// Two valid input records carry one request id: the run cannot be
    /// checked for that id (a generator problem, not a worker one).
    InputIdReused {
        request_id: String,
        times: u64,
    },
    /// Valid requests without any result.
    Missing {
        count: u64,
        sample: Vec<String>,
    },
    /// A valid request settled by more than one result.
    SettledTwice {
        request_id: String,
        times: u64,
    },
    /// A record of the results topic that is not a `MatchResult`.
    UnreadableResult {
        partition: i32,
        offset: i64,
        error: String,
    },
    /// A result for a request id nobody sent.
    UnknownRequest {
        request_id: String,
    },
    /// A result for a request that should have been dead-lettered.
    InvalidRequestSettled {
        request_id: String,
    },
    /// A result whose copy of a request's field differs from the request.
    ResultDisagrees {
        request_id: String,
        field: &'static str,
        result: String,
        request: String,
    },
    /// A result placed in another segment than its request's.
    WrongSegment {
        request_id: String,
        result_segment: String,
        request_segment: String,
    },
    DuplicateMatchId {
        match_id: String,
    },
    /// A match one of the two users would not accept (or a user with themself).
    Unacceptable {
        match_id: String,
        request_ids: [String; 2],
    },
    UnknownScorer {
        match_id: String,
        scorer: String,
    },
    /// A window whose start is not before its end.
    EmptyWindow {
        match_id: String,
        window_start: i64,
        window_end: i64,
    },
    /// One user in two matches of one window.
    UserTwiceInWindow {
        segment: String,
        window_start: i64,
        user: String,
        match_ids: Vec<String>,
    },
    /// The same two users matched again before the cooldown ran out.
    RematchTooSoon {
        users: [String; 2],
        first_match: String,
        first_window_end: i64,
        second_match: String,
        second_window_start: i64,
    },
    /// An invalid input with no dead letter.
    DeadLetterMissing {
        partition: i32,
        offset: i64,
        reason: String,
    },
    DeadLetteredTwice {
        partition: i32,
        offset: i64,
        times: u64,
    },
    /// A dead letter without a reason header (or an empty one).
    DeadLetterWithoutReason {
        dead_letter_partition: i32,
        dead_letter_offset: i64,
    },
    /// A dead letter without readable source partition and offset headers.
    DeadLetterUnlocated {
        dead_letter_partition: i32,
        dead_letter_offset: i64,
    },
    /// A valid request sent to the dead-letter topic.
    DeadLetterForValid {
        partition: i32,
        offset: i64,
        request_id: String,
    },
    /// A dead letter naming an input record that does not exist.
    DeadLetterForUnknownInput {
        partition: i32,
        offset: i64,
    },
}

impl Violation {
    /// The kind's name, as in the JSON `kind` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::InputIdReused { .. } => "inputIdReused",
            Violation::Missing { .. } => "missing",
            Violation::SettledTwice { .. } => "settledTwice",
            Violation::UnreadableResult { .. } => "unreadableResult",
            Violation::UnknownRequest { .. } => "unknownRequest",
            Violation::InvalidRequestSettled { .. } => "invalidRequestSettled",
            Violation::ResultDisagrees { .. } => "resultDisagrees",
            Violation::WrongSegment { .. } => "wrongSegment",
            Violation::DuplicateMatchId { .. } => "duplicateMatchId",
            Violation::Unacceptable { .. } => "unacceptable",
            Violation::UnknownScorer { .. } => "unknownScorer",
            Violation::EmptyWindow { .. } => "emptyWindow",
            Violation::UserTwiceInWindow { .. } => "userTwiceInWindow",
            Violation::RematchTooSoon { .. } => "rematchTooSoon",
            Violation::DeadLetterMissing { .. } => "deadLetterMissing",
            Violation::DeadLetteredTwice { .. } => "deadLetteredTwice",
            Violation::DeadLetterWithoutReason { .. } => "deadLetterWithoutReason",
            Violation::DeadLetterUnlocated { .. } => "deadLetterUnlocated",
            Violation::DeadLetterForValid { .. } => "deadLetterForValid",
            Violation::DeadLetterForUnknownInput { .. } => "deadLetterForUnknownInput",
        }
    }
}

/// Collects violations, keeping every count but only `samples` of each kind.
#[derive(Debug)]
pub(crate) struct Violations {
    samples: usize,
    counts: BTreeMap<&'static str, u64>,
    kept: Vec<Violation>,
}

impl Violations {
    pub(crate) fn new(samples: usize) -> Self {
        Violations {
            samples,
            counts: BTreeMap::new(),
            kept: Vec::new(),
        }
    }

    pub(crate) fn samples(&self) -> usize {
        self.samples
    }

    pub(crate) fn push(&mut self, v: Violation) {
        let count = self.counts.entry(v.kind()).or_default();
        *count += 1;
        if *count <= self.samples as u64 {
            self.kept.push(v);
        }
    }

    pub(crate) fn into_report(self, figures: Figures) -> Report {
        Report {
            ok: self.counts.is_empty(),
            figures,
            violation_counts: self.counts,
            violations: self.kept,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let l = Latency::of((1..=100).rev().collect()).unwrap();
        assert_eq!((l.count, l.p50, l.p99, l.max), (100, 50, 99, 100));
        let one = Latency::of(vec![7]).unwrap();
        assert_eq!((one.p50, one.p99, one.max), (7, 7, 7));
        assert_eq!(Latency::of(vec![]), None);
    }

    #[test]
    fn kinds_match_the_json_tag() {
        let v = Violation::DeadLetterWithoutReason {
            dead_letter_partition: 0,
            dead_letter_offset: 3,
        };
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["kind"], v.kind());
        assert_eq!(json["deadLetterOffset"], 3);
    }

    #[test]
    fn every_occurrence_is_counted_but_few_are_kept() {
        let mut vs = Violations::new(2);
        for i in 0..5 {
            vs.push(Violation::UnknownRequest {
                request_id: format!("r{i}"),
            });
        }
        let report = vs.into_report(Figures::default());
        assert!(!report.ok);
        assert_eq!(report.violation_counts["unknownRequest"], 5);
        assert_eq!(report.violations.len(), 2);
    }
}
