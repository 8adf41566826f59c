//! The samples the feedback join must write, computed from its contract
//! alone (never from worker code): per partition, outcomes are taken in send
//! order; one joins its match if the match is on that partition, the outcome
//! is no later than the match's deadline (window end + TTL), no outcome
//! joined the match before, and the partition's event-time watermark has not
//! passed the deadline yet (the match's state is gone then). Every match gets
//! exactly one sample: from the outcome that joined, else `noOutcome`.
//!
//! The watermark here follows the outcomes' event times only. The worker's
//! also follows the wall clock once a partition idles, which this cannot
//! know: the e2e test sends every outcome before any deadline can be reached
//! that way, so the two agree.

use std::collections::{BTreeMap, HashMap};

use matchfleet_api::feedback::{FeedbackSample, Label, MatchOutcome};

use super::{FeedbackMatch, JoinRules};

/// One sample per match (each match id once), ordered by partition and
/// match id. `sends` are (feedback-topic partition, outcome) in send order;
/// only the order within a partition matters.
pub fn expected_samples<'a>(
    matches: &[FeedbackMatch],
    sends: impl IntoIterator<Item = (i32, &'a MatchOutcome)>,
    rules: &JoinRules,
) -> Vec<FeedbackSample> {
    let mut joined: HashMap<&str, (&FeedbackMatch, Option<&MatchOutcome>)> = HashMap::new();
    for m in matches {
        joined.entry(m.match_id.as_str()).or_insert((m, None));
    }
    // The newest event time seen per partition minus the out-of-order
    // allowance; it only moves forward.
    let mut watermarks: BTreeMap<i32, i64> = BTreeMap::new();
    for (partition, outcome) in sends {
        let watermark = watermarks.entry(partition).or_insert(i64::MIN);
        if let Some((m, first)) = joined.get_mut(outcome.match_id.as_str()) {
            let deadline = rules.deadline(m);
            let joins = m.partition == partition
                && first.is_none()
                && outcome.event_time <= deadline
                && *watermark <= deadline;
            if joins {
                *first = Some(outcome);
            }
        }
        *watermark = (*watermark).max(outcome.event_time.saturating_sub(rules.out_of_order_millis));
    }
    let mut samples: Vec<FeedbackSample> = joined
        .into_values()
        .map(|(m, outcome)| sample(m, outcome, rules))
        .collect();
    samples.sort_by(|a, b| (a.partition, &a.match_id).cmp(&(b.partition, &b.match_id)));
    samples
}

/// The sample of `m` with the outcome that joined it, if any.
fn sample(m: &FeedbackMatch, outcome: Option<&MatchOutcome>, rules: &JoinRules) -> FeedbackSample {
    let (label, reward) = match outcome {
        None => (Label::NoOutcome, None),
        Some(o) => (label(o, rules), Some(reward(o, rules))),
    };
    FeedbackSample {
        match_id: m.match_id.clone(),
        segment: m.segment.clone(),
        partition: m.partition,
        scorer: m.scorer.clone(),
        score: m.score,
        window_end: m.window_end,
        users: m.users.clone(),
        label,
        reward,
        outcome: outcome.cloned(),
    }
}

/// Good: not skipped and a call of at least `minCallSeconds`.
fn label(o: &MatchOutcome, rules: &JoinRules) -> Label {
    if !o.skipped && o.call_seconds >= rules.min_call_seconds {
        Label::Good
    } else {
        Label::Bad
    }
}

/// 0 when skipped, else the call's share of `minCallSeconds`, at most 1 (1
/// when there is no threshold).
fn reward(o: &MatchOutcome, rules: &JoinRules) -> f64 {
    if o.skipped {
        0.0
    } else if rules.min_call_seconds == 0 {
        1.0
    } else {
        (f64::from(o.call_seconds) / f64::from(rules.min_call_seconds)).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{plan_outcomes, OutcomeKind, OutcomeOptions};
    use super::*;

    fn rules() -> JoinRules {
        JoinRules {
            ttl_millis: 30_000,
            min_call_seconds: 30,
            out_of_order_millis: 200,
        }
    }

    fn m(id: &str, partition: i32, window_end: i64) -> FeedbackMatch {
        FeedbackMatch {
            match_id: id.into(),
            segment: "eu".into(),
            partition,
            scorer: "complement".into(),
            score: -0.5,
            window_end,
            users: ["ann".into(), "ben".into()],
        }
    }

    fn o(id: &str, event_time: i64, call_seconds: u32, skipped: bool) -> MatchOutcome {
        MatchOutcome {
            match_id: id.into(),
            segment: "eu".into(),
            event_time,
            call_seconds,
            skipped,
        }
    }

    fn expected(
        matches: &[FeedbackMatch],
        sends: &[(i32, MatchOutcome)],
        rules: &JoinRules,
    ) -> BTreeMap<String, FeedbackSample> {
        expected_samples(matches, sends.iter().map(|(p, o)| (*p, o)), rules)
            .into_iter()
            .map(|s| (s.match_id.clone(), s))
            .collect()
    }

    #[test]
    fn the_first_on_time_outcome_joins_and_everything_else_is_ignored() {
        let matches = [m("a", 0, 1_000), m("b", 0, 1_000), m("c", 0, 1_000)];
        let sends = [
            (0, o("a", 2_000, 45, false)),
            (0, o("unknown", 2_000, 45, false)),
            // A duplicate: ignored even though it is earlier in event time.
            (0, o("a", 1_500, 0, true)),
            // Late: one past the deadline.
            (0, o("b", 31_001, 45, false)),
        ];
        let e = expected(&matches, &sends, &rules());
        assert_eq!(e.len(), 3);
        assert_eq!(e["a"].label, Label::Good);
        assert_eq!(e["a"].reward, Some(1.0));
        assert_eq!(e["a"].outcome, Some(sends[0].1.clone()));
        for id in ["b", "c"] {
            assert_eq!(e[id].label, Label::NoOutcome);
            assert_eq!(e[id].reward, None);
            assert_eq!(e[id].outcome, None);
        }
        // The sample repeats the match.
        let a = &e["a"];
        assert_eq!(
            (
                a.segment.as_str(),
                a.partition,
                a.scorer.as_str(),
                a.score,
                a.window_end
            ),
            ("eu", 0, "complement", -0.5, 1_000)
        );
        assert_eq!(a.users, ["ann".to_string(), "ben".to_string()]);
    }

    #[test]
    fn labels_and_rewards_follow_skip_and_call_length() {
        let cases = [
            // (call, skipped, min call, label, reward)
            (45, false, 30, Label::Good, 1.0),
            (30, false, 30, Label::Good, 1.0),
            (29, false, 30, Label::Bad, 29.0 / 30.0),
            (0, false, 30, Label::Bad, 0.0),
            (15, false, 30, Label::Bad, 0.5),
            (600, true, 30, Label::Bad, 0.0),
            (0, true, 30, Label::Bad, 0.0),
            (0, false, 0, Label::Good, 1.0),
            (5, true, 0, Label::Bad, 0.0),
        ];
        for (call, skipped, min_call, label, reward) in cases {
            let rules = JoinRules {
                min_call_seconds: min_call,
                ..rules()
            };
            let e = expected(&[m("a", 0, 0)], &[(0, o("a", 500, call, skipped))], &rules);
            assert_eq!(
                e["a"].label, label,
                "{call} s, skipped {skipped}, min {min_call}"
            );
            assert_eq!(
                e["a"].reward,
                Some(reward),
                "{call} s, skipped {skipped}, min {min_call}"
            );
        }
    }

    #[test]
    fn an_outcome_at_the_deadline_joins_one_after_it_does_not() {
        let matches = [m("a", 0, 1_000), m("b", 0, 1_000)];
        // Ordered so that neither moves the watermark past the other's deadline.
        let sends = [
            (0, o("a", 31_000, 10, false)),
            (0, o("b", 31_001, 10, false)),
        ];
        let e = expected(&matches, &sends, &rules());
        assert_eq!(e["a"].label, Label::Bad);
        assert_eq!(e["b"].label, Label::NoOutcome);
    }

    #[test]
    fn outcomes_count_only_on_their_match_partition() {
        let e = expected(
            &[m("a", 3, 1_000)],
            &[(4, o("a", 2_000, 40, false))],
            &rules(),
        );
        assert_eq!(e["a"].label, Label::NoOutcome);
        let e = expected(
            &[m("a", 3, 1_000)],
            &[(3, o("a", 2_000, 40, false))],
            &rules(),
        );
        assert_eq!(e["a"].label, Label::Good);
    }

    #[test]
    fn a_late_outcome_expires_the_matches_whose_deadline_its_watermark_passed() {
        // "late" ends at 1_000 + 30_000; an outcome for it at 31_500 moves
        // partition 0's watermark to 31_300: past "early"'s deadline (31_000),
        // not past "later"'s (31_300).
        let matches = [
            m("late", 0, 1_000),
            m("early", 0, 1_000),
            m("later", 0, 1_300),
            m("elsewhere", 1, 1_000),
        ];
        let sends = [
            (0, o("late", 31_500, 40, false)),
            (0, o("early", 2_000, 40, false)),
            (0, o("later", 2_000, 40, false)),
            // Another partition has its own watermark.
            (1, o("elsewhere", 2_000, 40, false)),
        ];
        let e = expected(&matches, &sends, &rules());
        assert_eq!(e["late"].label, Label::NoOutcome);
        assert_eq!(
            e["early"].label,
            Label::NoOutcome,
            "expired before its outcome came"
        );
        assert_eq!(
            e["later"].label,
            Label::Good,
            "a watermark at the deadline has not passed it"
        );
        assert_eq!(e["elsewhere"].label, Label::Good);
    }

    #[test]
    fn an_ignored_late_outcome_does_not_use_up_the_match() {
        // Out of order: the late outcome comes first, but its watermark
        // (31_001 - 200) is still before the deadline, so the on-time one joins.
        let sends = [(0, o("a", 31_001, 40, false)), (0, o("a", 5_000, 40, true))];
        let e = expected(&[m("a", 0, 1_000)], &sends, &rules());
        assert_eq!(e["a"].label, Label::Bad);
        assert_eq!(e["a"].outcome, Some(sends[1].1.clone()));
    }

    #[test]
    fn a_generated_plan_expects_what_it_was_drawn_to_test() {
        // The generator knows why it sent each outcome; the contract, applied
        // to the events alone, must come to the same samples.
        let rules = rules();
        let matches: Vec<FeedbackMatch> = (0..1_000)
            .map(|i| m(&format!("m{i}"), i % 8, 1_000_000 + i64::from(i % 7) * 500))
            .collect();
        let plan = plan_outcomes(&matches, &rules, &OutcomeOptions::default()).unwrap();
        let samples = expected_samples(
            &matches,
            plan.sends.iter().map(|s| (s.partition, &s.outcome)),
            &rules,
        );
        assert_eq!(samples.len(), 1_000);
        let firsts: HashMap<&str, &MatchOutcome> = plan
            .sends
            .iter()
            .filter(|s| s.kind == OutcomeKind::OnTime)
            .map(|s| (s.outcome.match_id.as_str(), &s.outcome))
            .collect();
        let mut labels: BTreeMap<Label, usize> = BTreeMap::new();
        for s in &samples {
            assert_eq!(s.outcome.as_ref(), firsts.get(s.match_id.as_str()).copied());
            *labels.entry(s.label).or_default() += 1;
        }
        assert!(
            labels.values().all(|n| *n > 100) && labels.len() == 3,
            "{labels:?}"
        );
    }
}
