//! Outcome events for a run's matches, seeded and pure: which matches get
//! one, what happened (a skip, a call's length), when it says it happened,
//! and the order each partition of the feedback topic receives them in.
//! Besides the outcomes that join, the plan holds every kind the join must
//! ignore: a second outcome for an already joined match, outcomes after the
//! match's deadline, and outcomes for matches that do not exist.
//!
//! Per partition, every on-time outcome comes before every late one: a late
//! outcome moves the event-time watermark past other matches' deadlines, and
//! sending it last keeps the expected samples independent of timing.

use std::collections::{BTreeMap, HashSet};

use matchfleet_api::feedback::MatchOutcome;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::{FeedbackMatch, JoinRules};

/// An on-time outcome is at least this long after its window's end (a call
/// or a skip takes a moment)...
const ON_TIME_MIN_MILLIS: i64 = 200;
/// ...and at most a third of the TTL, capped at this: outcomes move the
/// watermark too, and keeping them close to their matches keeps it far from
/// every deadline while on-time outcomes still arrive.
const ON_TIME_MAX_MILLIS: i64 = 5_000;
/// Skips that end a call rather than prevent one: such a skip must still be
/// `bad` with reward 0 however long the call was.
const SKIP_AFTER_CALL: f64 = 0.3;
/// Calls exactly at `minCallSeconds` or one second short of it, where the
/// label flips.
const BOUNDARY_CALLS: f64 = 0.1;
/// Other calls last `minCallSeconds × 2^u`, u uniform in ±this: skewed to the
/// right with the median at the threshold, so about half are good.
const CALL_OCTAVES: f64 = 3.0;
/// The scale of calls when `minCallSeconds` is 0 (every call is good then).
const CALL_SCALE_WITHOUT_THRESHOLD: f64 = 30.0;
/// The longest call generated: a day.
const MAX_CALL_SECONDS: f64 = 86_400.0;
/// How much a duplicate's call length differs from its original's at most.
const DUPLICATE_CALL_CHANGE: u32 = 600;

/// Everything that shapes the outcomes of a run.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutcomeOptions {
    pub seed: u64,
    /// Share of matches that get an on-time outcome.
    pub outcome_fraction: f64,
    /// Share of outcomes in which one of the pair skipped.
    pub skip_fraction: f64,
    /// Share of on-time outcomes followed by a second, different outcome for
    /// the same match (which the join must ignore).
    pub duplicate_fraction: f64,
    /// A duplicate comes right after its original or up to this many other
    /// outcomes later.
    pub duplicate_max_distance: usize,
    /// Share of matches that get an outcome after their deadline, whether or
    /// not they got an on-time one (the join must ignore it).
    pub late_fraction: f64,
    /// A late outcome is 1 ms to this long after its match's deadline.
    pub late_spread_millis: i64,
    /// Outcomes for match ids that do not exist, spread over the partitions.
    pub unknown: usize,
}

impl Default for OutcomeOptions {
    fn default() -> Self {
        OutcomeOptions {
            seed: 1,
            outcome_fraction: 0.75,
            skip_fraction: 0.3,
            duplicate_fraction: 0.1,
            duplicate_max_distance: 20,
            late_fraction: 0.1,
            late_spread_millis: 3_000,
            unknown: 16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutcomeOptionsError {
    #[error("{0} must be between 0 and 1")]
    Fraction(&'static str),
    #[error("lateSpreadMillis must be at least 1")]
    LateSpread,
    #[error("the feedback TTL must be positive")]
    Ttl,
}

impl OutcomeOptions {
    pub fn validate(&self) -> Result<(), OutcomeOptionsError> {
        for (name, value) in [
            ("outcomeFraction", self.outcome_fraction),
            ("skipFraction", self.skip_fraction),
            ("duplicateFraction", self.duplicate_fraction),
            ("lateFraction", self.late_fraction),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(OutcomeOptionsError::Fraction(name));
            }
        }
        if self.late_spread_millis < 1 {
            return Err(OutcomeOptionsError::LateSpread);
        }
        Ok(())
    }
}

/// Why an outcome is in the plan. For reports and the generator's own tests:
/// the expected samples are computed from the events alone, never from this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OutcomeKind {
    /// The match's first outcome, within its TTL.
    OnTime,
    /// A second, different outcome for a match that already has one.
    Duplicate,
    /// After the match's deadline.
    Late,
    /// For a match id that does not exist.
    Unknown,
}

/// One outcome and the feedback-topic partition it goes to.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedOutcome {
    pub partition: i32,
    pub outcome: MatchOutcome,
    pub kind: OutcomeKind,
}

/// The outcomes in send order (partition by partition), and their figures.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutcomePlan {
    pub sends: Vec<PlannedOutcome>,
    pub figures: PlanFigures,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanFigures {
    /// Distinct matches the plan was drawn for.
    pub matches: usize,
    /// Partitions with at least one match.
    pub partitions: usize,
    pub on_time: usize,
    /// On-time outcomes in which one of the pair skipped.
    pub skipped: usize,
    pub duplicates: usize,
    pub late: usize,
    /// Late outcomes for matches that also got an on-time one.
    pub late_after_on_time: usize,
    pub unknown: usize,
    /// Outcomes with an earlier event time than one sent before them on their
    /// partition.
    pub out_of_order: usize,
}

/// Draws the outcomes for `matches` (each match id counted once).
pub fn plan_outcomes(
    matches: &[FeedbackMatch],
    rules: &JoinRules,
    options: &OutcomeOptions,
) -> Result<OutcomePlan, OutcomeOptionsError> {
    options.validate()?;
    if rules.ttl_millis <= 0 {
        return Err(OutcomeOptionsError::Ttl);
    }
    let mut by_partition: BTreeMap<i32, Vec<&FeedbackMatch>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for m in matches {
        if seen.insert(m.match_id.as_str()) {
            by_partition.entry(m.partition).or_default().push(m);
        }
    }
    // The caller's order must not change the plan.
    for list in by_partition.values_mut() {
        list.sort_by(|a, b| (a.window_end, &a.match_id).cmp(&(b.window_end, &b.match_id)));
    }
    let partitions: Vec<i32> = by_partition.keys().copied().collect();
    let mut unknown: BTreeMap<i32, usize> = BTreeMap::new();
    for k in 0..options.unknown {
        if let Some(p) = partitions.get(k % partitions.len().max(1)) {
            *unknown.entry(*p).or_default() += 1;
        }
    }
    let mut draw = Draw {
        rng: StdRng::seed_from_u64(options.seed),
        rules,
        options,
    };
    let mut plan = OutcomePlan {
        sends: Vec::new(),
        figures: PlanFigures {
            matches: seen.len(),
            partitions: partitions.len(),
            ..PlanFigures::default()
        },
    };
    for (partition, list) in &by_partition {
        let unknown = unknown.get(partition).copied().unwrap_or(0);
        let sends = draw.partition(*partition, list, unknown, &mut plan.figures);
        plan.sends.extend(sends);
    }
    plan.figures.out_of_order = out_of_order(&plan.sends);
    Ok(plan)
}

/// Outcomes whose event time is earlier than that of an outcome sent before
/// them on the same partition.
pub fn out_of_order(sends: &[PlannedOutcome]) -> usize {
    let mut newest: BTreeMap<i32, i64> = BTreeMap::new();
    let mut count = 0;
    for s in sends {
        let newest = newest.entry(s.partition).or_insert(i64::MIN);
        if s.outcome.event_time < *newest {
            count += 1;
        }
        *newest = (*newest).max(s.outcome.event_time);
    }
    count
}

/// The random draws, in one place so that the order of draws (and with it
/// the plan for a seed) is easy to keep stable.
struct Draw<'a> {
    rng: StdRng,
    rules: &'a JoinRules,
    options: &'a OutcomeOptions,
}

impl Draw<'_> {
    /// One partition's outcomes in send order: the on-time ones shuffled with
    /// the duplicates and unknown ones among them, then the late ones.
    fn partition(
        &mut self,
        partition: i32,
        matches: &[&FeedbackMatch],
        unknown: usize,
        figures: &mut PlanFigures,
    ) -> Vec<PlannedOutcome> {
        let planned = |outcome, kind| PlannedOutcome {
            partition,
            outcome,
            kind,
        };
        let mut firsts = Vec::new();
        // (index of the original in `firsts`, the duplicate)
        let mut duplicates = Vec::new();
        let mut late = Vec::new();
        for m in matches {
            let on_time = self.rng.random_bool(self.options.outcome_fraction);
            if on_time {
                let outcome = self.outcome(m);
                figures.on_time += 1;
                figures.skipped += usize::from(outcome.skipped);
                if self.rng.random_bool(self.options.duplicate_fraction) {
                    let duplicate = self.duplicate_of(&outcome, m);
                    duplicates.push((firsts.len(), planned(duplicate, OutcomeKind::Duplicate)));
                }
                firsts.push(planned(outcome, OutcomeKind::OnTime));
            }
            if self.rng.random_bool(self.options.late_fraction) {
                figures.late += 1;
                figures.late_after_on_time += usize::from(on_time);
                late.push(planned(self.late_outcome(m), OutcomeKind::Late));
            }
        }
        if !matches.is_empty() {
            for k in 0..unknown {
                let template = matches[self.rng.random_range(0..matches.len())];
                let mut outcome = self.outcome(template);
                outcome.match_id = format!("unknown-{partition}-{k}");
                firsts.push(planned(outcome, OutcomeKind::Unknown));
                figures.unknown += 1;
            }
        }
        figures.duplicates += duplicates.len();

        // Shuffled, so event times are not monotone; a duplicate goes right
        // after its original or a few places later. Sort keys: an original at
        // rank r gets 2r, a duplicate placed after rank r + d gets 2(r + d) + 1.
        let mut order: Vec<usize> = (0..firsts.len()).collect();
        order.shuffle(&mut self.rng);
        let mut rank = vec![0; firsts.len()];
        for (r, i) in order.iter().enumerate() {
            rank[*i] = r;
        }
        let mut keyed: Vec<(usize, PlannedOutcome)> = firsts
            .into_iter()
            .enumerate()
            .map(|(i, o)| (2 * rank[i], o))
            .collect();
        for (original, duplicate) in duplicates {
            let later = self
                .rng
                .random_range(0..=self.options.duplicate_max_distance);
            keyed.push((2 * (rank[original] + later) + 1, duplicate));
        }
        keyed.sort_by_key(|(key, _)| *key);
        late.shuffle(&mut self.rng);
        keyed.into_iter().map(|(_, o)| o).chain(late).collect()
    }

    fn outcome(&mut self, m: &FeedbackMatch) -> MatchOutcome {
        let skipped = self.rng.random_bool(self.options.skip_fraction);
        let call_seconds = if !skipped || self.rng.random_bool(SKIP_AFTER_CALL) {
            self.call_seconds()
        } else {
            0
        };
        MatchOutcome {
            match_id: m.match_id.clone(),
            segment: m.segment.clone(),
            event_time: self.on_time(m),
            call_seconds,
            skipped,
        }
    }

    /// Another outcome for the same match: the skip flipped or the call
    /// longer, so that joining it instead of the first shows.
    fn duplicate_of(&mut self, original: &MatchOutcome, m: &FeedbackMatch) -> MatchOutcome {
        let mut duplicate = original.clone();
        duplicate.event_time = self.on_time(m);
        if self.rng.random_bool(0.5) {
            duplicate.skipped = !duplicate.skipped;
        } else {
            let longer = self.rng.random_range(1..=DUPLICATE_CALL_CHANGE);
            duplicate.call_seconds = duplicate.call_seconds.saturating_add(longer);
        }
        duplicate
    }

    fn late_outcome(&mut self, m: &FeedbackMatch) -> MatchOutcome {
        let mut outcome = self.outcome(m);
        let after = self.rng.random_range(1..=self.options.late_spread_millis);
        outcome.event_time = self.rules.deadline(m).saturating_add(after);
        outcome
    }

    fn on_time(&mut self, m: &FeedbackMatch) -> i64 {
        let (earliest, latest) = on_time_range(self.rules);
        m.window_end + self.rng.random_range(earliest..=latest)
    }

    fn call_seconds(&mut self) -> u32 {
        let threshold = self.rules.min_call_seconds;
        let u: f64 = self.rng.random();
        if u < BOUNDARY_CALLS / 2.0 {
            return threshold;
        }
        if u < BOUNDARY_CALLS {
            return threshold.saturating_sub(1);
        }
        let scale = if threshold == 0 {
            CALL_SCALE_WITHOUT_THRESHOLD
        } else {
            f64::from(threshold)
        };
        let octaves = self.rng.random_range(-CALL_OCTAVES..CALL_OCTAVES);
        (scale * octaves.exp2())
            .round()
            .clamp(0.0, MAX_CALL_SECONDS) as u32
    }
}

/// On-time outcomes are this many milliseconds (inclusive) after their
/// window's end: well inside the TTL.
pub fn on_time_range(rules: &JoinRules) -> (i64, i64) {
    let latest = (rules.ttl_millis / 3).clamp(0, ON_TIME_MAX_MILLIS);
    (ON_TIME_MIN_MILLIS.min(latest), latest)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn rules() -> JoinRules {
        JoinRules {
            ttl_millis: 30_000,
            min_call_seconds: 30,
            out_of_order_millis: 200,
        }
    }

    /// `n` matches over 16 partitions, windows 500 ms apart.
    fn matches(n: usize) -> Vec<FeedbackMatch> {
        (0..n)
            .map(|i| FeedbackMatch {
                match_id: format!("m-{i:05}"),
                segment: format!("s{}", i % 16),
                partition: (i % 16) as i32,
                scorer: "cosine".into(),
                score: 0.5,
                window_end: 1_000_000 + (i as i64 / 16 % 10) * 500,
                users: [format!("a{i}"), format!("b{i}")],
            })
            .collect()
    }

    fn plan(options: &OutcomeOptions) -> OutcomePlan {
        plan_outcomes(&matches(2_000), &rules(), options).unwrap()
    }

    fn of_kind(plan: &OutcomePlan, kind: OutcomeKind) -> Vec<&PlannedOutcome> {
        plan.sends.iter().filter(|s| s.kind == kind).collect()
    }

    #[test]
    fn a_seed_reproduces_the_plan_whatever_the_order_of_the_matches() {
        let a = plan(&OutcomeOptions::default());
        let mut reversed = matches(2_000);
        reversed.reverse();
        let b = plan_outcomes(&reversed, &rules(), &OutcomeOptions::default()).unwrap();
        assert_eq!(a.sends, b.sends);
        assert_eq!(a.figures, b.figures);
        let other = plan(&OutcomeOptions {
            seed: 2,
            ..OutcomeOptions::default()
        });
        assert_ne!(a.sends, other.sends);
    }

    #[test]
    fn shares_are_about_as_asked_and_figures_count_the_plan() {
        let p = plan(&OutcomeOptions::default());
        let f = &p.figures;
        assert_eq!((f.matches, f.partitions), (2_000, 16));
        assert!((1_400..1_600).contains(&f.on_time), "{f:?}");
        assert!(
            (f.on_time / 5..f.on_time * 2 / 5).contains(&f.skipped),
            "{f:?}"
        );
        assert!((80..220).contains(&f.duplicates), "{f:?}");
        assert!((120..280).contains(&f.late), "{f:?}");
        assert_eq!(f.unknown, 16);
        assert_eq!(of_kind(&p, OutcomeKind::OnTime).len(), f.on_time);
        assert_eq!(of_kind(&p, OutcomeKind::Duplicate).len(), f.duplicates);
        assert_eq!(of_kind(&p, OutcomeKind::Late).len(), f.late);
        assert_eq!(of_kind(&p, OutcomeKind::Unknown).len(), f.unknown);
        assert_eq!(p.sends.len(), f.on_time + f.duplicates + f.late + f.unknown);
        // Late outcomes both for matches with an on-time outcome and without.
        assert!(
            f.late_after_on_time > 0 && f.late_after_on_time < f.late,
            "{f:?}"
        );
    }

    #[test]
    fn outcomes_sit_on_their_match_partition_with_its_segment() {
        let all = matches(2_000);
        let by_id: BTreeMap<&str, &FeedbackMatch> =
            all.iter().map(|m| (m.match_id.as_str(), m)).collect();
        let p = plan(&OutcomeOptions::default());
        let segments_of: BTreeMap<i32, BTreeSet<&str>> =
            all.iter().fold(BTreeMap::new(), |mut acc, m| {
                acc.entry(m.partition)
                    .or_default()
                    .insert(m.segment.as_str());
                acc
            });
        let mut on_time_ids = HashSet::new();
        for s in &p.sends {
            match by_id.get(s.outcome.match_id.as_str()) {
                Some(m) => {
                    assert_ne!(s.kind, OutcomeKind::Unknown);
                    assert_eq!(s.partition, m.partition);
                    assert_eq!(s.outcome.segment, m.segment);
                }
                None => {
                    assert_eq!(s.kind, OutcomeKind::Unknown);
                    assert!(segments_of[&s.partition].contains(s.outcome.segment.as_str()));
                }
            }
            if s.kind == OutcomeKind::OnTime {
                assert!(
                    on_time_ids.insert(&s.outcome.match_id),
                    "one first outcome per match"
                );
            }
        }
    }

    #[test]
    fn event_times_are_on_time_or_past_the_deadline_as_their_kind_says() {
        let r = rules();
        let all = matches(2_000);
        let by_id: BTreeMap<&str, &FeedbackMatch> =
            all.iter().map(|m| (m.match_id.as_str(), m)).collect();
        let p = plan(&OutcomeOptions::default());
        let (earliest, latest) = on_time_range(&r);
        assert_eq!((earliest, latest), (200, 5_000));
        for s in &p.sends {
            let Some(m) = by_id.get(s.outcome.match_id.as_str()) else {
                continue;
            };
            let after_window = s.outcome.event_time - m.window_end;
            match s.kind {
                OutcomeKind::Late => {
                    let past = s.outcome.event_time - r.deadline(m);
                    assert!((1..=3_000).contains(&past), "{s:?}");
                }
                _ => assert!((earliest..=latest).contains(&after_window), "{s:?}"),
            }
        }
        // A short TTL keeps on-time outcomes within its first third.
        let short = JoinRules {
            ttl_millis: 1_200,
            ..rules()
        };
        assert_eq!(on_time_range(&short), (200, 400));
        assert_eq!(
            on_time_range(&JoinRules {
                ttl_millis: 300,
                ..rules()
            }),
            (100, 100)
        );
    }

    #[test]
    fn every_partition_sends_all_on_time_outcomes_before_any_late_one() {
        let p = plan(&OutcomeOptions::default());
        let mut late_seen: BTreeSet<i32> = BTreeSet::new();
        for s in &p.sends {
            if s.kind == OutcomeKind::Late {
                late_seen.insert(s.partition);
            } else {
                assert!(!late_seen.contains(&s.partition), "{s:?} after a late one");
            }
        }
        // Partitions are sent one after the other.
        let order: Vec<i32> = p.sends.iter().map(|s| s.partition).collect();
        assert!(order.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn on_time_outcomes_are_out_of_order_and_the_count_says_how_many() {
        let p = plan(&OutcomeOptions::default());
        assert!(p.figures.out_of_order > 100, "{:?}", p.figures);
        // Recounted by hand: an outcome is out of order when an earlier one on
        // its partition says it happened later.
        let mut count = 0;
        for (i, s) in p.sends.iter().enumerate() {
            let later_before = p.sends[..i]
                .iter()
                .any(|t| t.partition == s.partition && t.outcome.event_time > s.outcome.event_time);
            count += usize::from(later_before);
        }
        assert_eq!(p.figures.out_of_order, count);
    }

    #[test]
    fn duplicates_follow_their_original_closely_and_differ_from_it() {
        let options = OutcomeOptions::default();
        let p = plan(&options);
        let mut first_at: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, s) in p.sends.iter().enumerate() {
            match s.kind {
                OutcomeKind::OnTime => {
                    first_at.insert(&s.outcome.match_id, i);
                }
                OutcomeKind::Duplicate => {
                    let at = first_at[s.outcome.match_id.as_str()];
                    let original = &p.sends[at].outcome;
                    assert_ne!(
                        (original.skipped, original.call_seconds),
                        (s.outcome.skipped, s.outcome.call_seconds)
                    );
                    // At most `duplicate_max_distance` other first outcomes
                    // between (other duplicates may sit there too).
                    let firsts_between = p.sends[at + 1..i]
                        .iter()
                        .filter(|t| t.kind != OutcomeKind::Duplicate)
                        .count();
                    assert!(firsts_between <= options.duplicate_max_distance);
                }
                _ => {}
            }
        }
        let right_after = p
            .sends
            .windows(2)
            .filter(|w| {
                w[1].kind == OutcomeKind::Duplicate
                    && w[0].outcome.match_id == w[1].outcome.match_id
            })
            .count();
        assert!(
            right_after > 0,
            "some duplicates come right after their original"
        );
    }

    #[test]
    fn calls_straddle_the_threshold_and_skips_sometimes_end_a_call() {
        let p = plan(&OutcomeOptions::default());
        let on_time = of_kind(&p, OutcomeKind::OnTime);
        let answered: Vec<u32> = on_time
            .iter()
            .filter(|s| !s.outcome.skipped)
            .map(|s| s.outcome.call_seconds)
            .collect();
        let long = answered.iter().filter(|c| **c >= 30).count();
        assert!(
            long > answered.len() / 3 && long < answered.len() * 2 / 3,
            "{long} of {}",
            answered.len()
        );
        assert!(answered.contains(&30) && answered.contains(&29));
        let skipped_with_call = on_time
            .iter()
            .filter(|s| s.outcome.skipped && s.outcome.call_seconds > 0)
            .count();
        assert!(skipped_with_call > 0);
        assert!(answered.iter().all(|c| f64::from(*c) <= MAX_CALL_SECONDS));
    }

    #[test]
    fn no_matches_no_outcomes_and_nonsense_is_refused() {
        let empty = plan_outcomes(&[], &rules(), &OutcomeOptions::default()).unwrap();
        assert!(empty.sends.is_empty());
        assert_eq!(empty.figures, PlanFigures::default());
        let refused =
            |options: OutcomeOptions| plan_outcomes(&matches(10), &rules(), &options).err();
        assert_eq!(
            refused(OutcomeOptions {
                skip_fraction: 1.5,
                ..OutcomeOptions::default()
            }),
            Some(OutcomeOptionsError::Fraction("skipFraction"))
        );
        assert_eq!(
            refused(OutcomeOptions {
                late_fraction: f64::NAN,
                ..OutcomeOptions::default()
            }),
            Some(OutcomeOptionsError::Fraction("lateFraction"))
        );
        assert_eq!(
            refused(OutcomeOptions {
                late_spread_millis: 0,
                ..OutcomeOptions::default()
            }),
            Some(OutcomeOptionsError::LateSpread)
        );
        let no_ttl = JoinRules {
            ttl_millis: 0,
            ..rules()
        };
        assert_eq!(
            plan_outcomes(&matches(10), &no_ttl, &OutcomeOptions::default()).err(),
            Some(OutcomeOptionsError::Ttl)
        );
    }
}
