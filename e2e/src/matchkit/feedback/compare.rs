//! The rewards topic against the expected samples: every match must have
//! exactly one sample, on the match's partition, keyed by its segment, with
//! the expected label, reward and joined outcome, and the match's own fields.

use std::collections::BTreeMap;

use matchfleet_api::feedback::{FeedbackSample, Label};
use serde::Serialize;

/// A record of the rewards topic as read.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The sample, or why the value is not one.
    pub sample: Result<FeedbackSample, String>,
}

/// The part of a sample that differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Field {
    Label,
    Reward,
    /// The outcome that joined (or that none did).
    Outcome,
    /// Segment, partition, scorer, score, window end or users.
    Match,
    /// The record's Kafka partition or key.
    Placement,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mismatch {
    pub match_id: String,
    pub field: Field,
    pub expected: String,
    pub actual: String,
}

/// What the comparison found. `exact` is true only when nothing is off.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackReport {
    pub exact: bool,
    pub expected: usize,
    /// Records read, readable or not.
    pub records: usize,
    pub expected_labels: BTreeMap<Label, usize>,
    /// Per label, over every readable record (duplicates included).
    pub actual_labels: BTreeMap<Label, usize>,
    /// Expected match ids without a sample.
    pub missing: Vec<String>,
    /// Samples for match ids that were not expected.
    pub unexpected: Vec<String>,
    /// Match ids with more than one sample, and how many.
    pub duplicates: BTreeMap<String, usize>,
    /// Differences in the first sample of each expected match.
    pub wrong: Vec<Mismatch>,
    /// Records whose value is not a sample: "partition/offset: why".
    pub unreadable: Vec<String>,
}

impl FeedbackReport {
    /// Problems of each kind, for a one-line summary.
    pub fn problem_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut wrong: BTreeMap<Field, usize> = BTreeMap::new();
        for m in &self.wrong {
            *wrong.entry(m.field).or_default() += 1;
        }
        let mut counts = BTreeMap::from([
            ("missing", self.missing.len()),
            ("unexpected", self.unexpected.len()),
            ("duplicates", self.duplicates.len()),
            ("unreadable", self.unreadable.len()),
        ]);
        for (field, n) in wrong {
            let name = match field {
                Field::Label => "wrongLabel",
                Field::Reward => "wrongReward",
                Field::Outcome => "wrongOutcome",
                Field::Match => "wrongMatch",
                Field::Placement => "wrongPlacement",
            };
            counts.insert(name, n);
        }
        counts.retain(|_, n| *n > 0);
        counts
    }

    /// The same report with at most `n` entries in each list, for printing.
    pub fn truncated(&self, n: usize) -> FeedbackReport {
        let mut short = self.clone();
        short.missing.truncate(n);
        short.unexpected.truncate(n);
        short.duplicates = self
            .duplicates
            .iter()
            .take(n)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        short.wrong.truncate(n);
        short.unreadable.truncate(n);
        short
    }
}

/// Rewards go through JSON; serde_json may read a float back one unit in the
/// last place off.
const REWARD_TOLERANCE: f64 = 1e-9;
/// Scores are f32 and go through JSON too.
const SCORE_TOLERANCE: f32 = 1e-6;

pub fn compare(expected: &[FeedbackSample], actual: &[RewardRecord]) -> FeedbackReport {
    let mut report = FeedbackReport {
        expected: expected.len(),
        records: actual.len(),
        ..FeedbackReport::default()
    };
    let mut wanted: BTreeMap<&str, &FeedbackSample> = BTreeMap::new();
    for s in expected {
        wanted.entry(s.match_id.as_str()).or_insert(s);
        *report.expected_labels.entry(s.label).or_default() += 1;
    }
    // Readable records per match id, in read order.
    let mut got: BTreeMap<&str, Vec<(&RewardRecord, &FeedbackSample)>> = BTreeMap::new();
    for record in actual {
        match &record.sample {
            Ok(sample) => {
                *report.actual_labels.entry(sample.label).or_default() += 1;
                got.entry(sample.match_id.as_str())
                    .or_default()
                    .push((record, sample));
            }
            Err(why) => report
                .unreadable
                .push(format!("{}/{}: {why}", record.partition, record.offset)),
        }
    }
    for (id, records) in &got {
        if records.len() > 1 {
            report.duplicates.insert(id.to_string(), records.len());
        }
        if !wanted.contains_key(id) {
            report.unexpected.push(id.to_string());
        }
    }
    for (id, want) in &wanted {
        match got.get(id).and_then(|r| r.first()) {
            None => report.missing.push(id.to_string()),
            Some((record, sample)) => differences(want, record, sample, &mut report.wrong),
        }
    }
    report.exact = report.problem_counts().is_empty();
    report
}

fn differences(
    want: &FeedbackSample,
    record: &RewardRecord,
    got: &FeedbackSample,
    out: &mut Vec<Mismatch>,
) {
    let mut differ = |field: Field, expected: String, actual: String| {
        out.push(Mismatch {
            match_id: want.match_id.clone(),
            field,
            expected,
            actual,
        })
    };
    if got.label != want.label {
        differ(
            Field::Label,
            format!("{:?}", want.label),
            format!("{:?}", got.label),
        );
    }
    let rewards_agree = match (want.reward, got.reward) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= REWARD_TOLERANCE,
        _ => false,
    };
    if !rewards_agree {
        differ(
            Field::Reward,
            format!("{:?}", want.reward),
            format!("{:?}", got.reward),
        );
    }
    if got.outcome != want.outcome {
        differ(Field::Outcome, json(&want.outcome), json(&got.outcome));
    }
    let the_match = |s: &FeedbackSample| {
        (
            s.segment.clone(),
            s.partition,
            s.scorer.clone(),
            s.window_end,
            s.users.clone(),
        )
    };
    if the_match(got) != the_match(want) || (got.score - want.score).abs() > SCORE_TOLERANCE {
        differ(
            Field::Match,
            format!("{:?} score {}", the_match(want), want.score),
            format!("{:?} score {}", the_match(got), got.score),
        );
    }
    if record.partition != want.partition || record.key.as_deref() != Some(want.segment.as_str()) {
        differ(
            Field::Placement,
            format!("partition {} key {:?}", want.partition, want.segment),
            format!("partition {} key {:?}", record.partition, record.key),
        );
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use matchfleet_api::feedback::MatchOutcome;

    use super::*;

    fn sample(id: &str, label: Label) -> FeedbackSample {
        let outcome = (label != Label::NoOutcome).then(|| MatchOutcome {
            match_id: id.into(),
            segment: "eu".into(),
            event_time: 2_000,
            call_seconds: if label == Label::Good { 40 } else { 10 },
            skipped: false,
        });
        FeedbackSample {
            match_id: id.into(),
            segment: "eu".into(),
            partition: 2,
            scorer: "cosine".into(),
            score: 0.75,
            window_end: 1_000,
            users: ["a".into(), "b".into()],
            label,
            reward: outcome
                .as_ref()
                .map(|o| (f64::from(o.call_seconds) / 30.0).min(1.0)),
            outcome,
        }
    }

    fn record(offset: i64, sample: FeedbackSample) -> RewardRecord {
        RewardRecord {
            partition: sample.partition,
            offset,
            key: Some(sample.segment.clone()),
            sample: Ok(sample),
        }
    }

    fn expected() -> Vec<FeedbackSample> {
        vec![
            sample("g", Label::Good),
            sample("b", Label::Bad),
            sample("n", Label::NoOutcome),
        ]
    }

    fn actual() -> Vec<RewardRecord> {
        expected()
            .into_iter()
            .enumerate()
            .map(|(i, s)| record(i as i64, s))
            .collect()
    }

    fn sample_of(r: &mut RewardRecord) -> &mut FeedbackSample {
        r.sample.as_mut().expect("a readable record")
    }

    fn fields(report: &FeedbackReport) -> Vec<(&str, Field)> {
        report
            .wrong
            .iter()
            .map(|m| (m.match_id.as_str(), m.field))
            .collect()
    }

    #[test]
    fn the_same_samples_in_any_order_are_exact() {
        let mut records = actual();
        records.reverse();
        let report = compare(&expected(), &records);
        assert!(report.exact, "{report:?}");
        assert!(report.problem_counts().is_empty());
        let per_label = BTreeMap::from([(Label::Good, 1), (Label::Bad, 1), (Label::NoOutcome, 1)]);
        assert_eq!(report.expected_labels, per_label);
        assert_eq!(report.actual_labels, per_label);
        assert_eq!((report.expected, report.records), (3, 3));
    }

    #[test]
    fn missing_unexpected_and_duplicated_samples_are_reported() {
        let mut records = actual();
        records.remove(1);
        records.push(record(7, sample("stranger", Label::Bad)));
        records.push(record(8, sample("g", Label::Good)));
        let report = compare(&expected(), &records);
        assert!(!report.exact);
        assert_eq!(report.missing, ["b"]);
        assert_eq!(report.unexpected, ["stranger"]);
        assert_eq!(report.duplicates, BTreeMap::from([("g".to_string(), 2)]));
        assert!(
            report.wrong.is_empty(),
            "a correct duplicate is only a duplicate"
        );
        assert_eq!(report.actual_labels[&Label::Good], 2);
        assert_eq!(
            report.problem_counts(),
            BTreeMap::from([("duplicates", 1), ("missing", 1), ("unexpected", 1)])
        );
    }

    #[test]
    fn a_wrong_label_reward_or_outcome_is_named() {
        let mut records = actual();
        let good = sample_of(&mut records[0]);
        good.label = Label::Bad;
        let bad = sample_of(&mut records[1]);
        bad.reward = Some(0.5);
        let none = sample_of(&mut records[2]);
        none.outcome = sample("n", Label::Good).outcome;
        let report = compare(&expected(), &records);
        assert_eq!(
            fields(&report),
            [
                ("b", Field::Reward),
                ("g", Field::Label),
                ("n", Field::Outcome)
            ]
        );
        let label = &report.wrong[1];
        assert_eq!(
            (label.expected.as_str(), label.actual.as_str()),
            ("Good", "Bad")
        );
        assert_eq!(report.problem_counts().len(), 3);
    }

    #[test]
    fn a_reward_where_none_belongs_or_none_where_one_does_is_wrong() {
        let mut records = actual();
        let none = sample_of(&mut records[2]);
        none.reward = Some(0.0);
        let good = sample_of(&mut records[0]);
        good.reward = None;
        let report = compare(&expected(), &records);
        assert_eq!(
            fields(&report),
            [("g", Field::Reward), ("n", Field::Reward)]
        );
    }

    #[test]
    fn rewards_and_scores_within_a_rounding_error_agree() {
        let mut records = actual();
        let bad = sample_of(&mut records[1]);
        bad.reward = bad.reward.map(|r| r + 1e-12);
        bad.score += 1e-7;
        assert!(compare(&expected(), &records).exact);
    }

    #[test]
    fn the_match_fields_and_the_placement_must_be_the_match() {
        let mut records = actual();
        let good = sample_of(&mut records[0]);
        good.scorer = "complement".into();
        let bad = sample_of(&mut records[1]);
        bad.users = ["b".into(), "a".into()];
        records[2].partition = 3;
        let report = compare(&expected(), &records);
        assert_eq!(
            fields(&report),
            [
                ("b", Field::Match),
                ("g", Field::Match),
                ("n", Field::Placement)
            ]
        );
        let mut unkeyed = actual().remove(0);
        unkeyed.key = None;
        let report = compare(&expected()[..1], &[unkeyed]);
        assert_eq!(fields(&report), [("g", Field::Placement)]);
    }

    #[test]
    fn unreadable_records_are_listed_and_never_exact() {
        let mut records = actual();
        records.push(RewardRecord {
            partition: 5,
            offset: 9,
            key: None,
            sample: Err("not a sample".into()),
        });
        let report = compare(&expected(), &records);
        assert_eq!(report.unreadable, ["5/9: not a sample"]);
        assert!(!report.exact);
        assert_eq!(report.records, 4);
    }

    #[test]
    fn a_truncated_report_keeps_the_counts_readable() {
        let expected: Vec<FeedbackSample> = (0..50)
            .map(|i| sample(&format!("m{i:02}"), Label::NoOutcome))
            .collect();
        let report = compare(&expected, &[]);
        assert_eq!(report.missing.len(), 50);
        let short = report.truncated(5);
        assert_eq!(short.missing, ["m00", "m01", "m02", "m03", "m04"]);
        assert_eq!(short.expected, 50);
        assert_eq!(report.problem_counts()["missing"], 50);
    }
}
