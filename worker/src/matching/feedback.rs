//! The feedback join's state: one entry per match waiting for (or holding)
//! its outcome, until the partition's watermark passes its deadline.
//!
//! Pure bookkeeping; the rules (when an outcome joins, what the reward is)
//! are in [`crate::matching`]'s docs and applied by the engine.

use std::collections::BTreeSet;

use super::hash::FastMap;

use matchfleet_api::feedback::{FeedbackSample, Label, MatchOutcome};
use serde::{Deserialize, Serialize};

/// The join's settings, from `spec.feedback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackConfig {
    /// An outcome counts only if its event time is at most the match's
    /// window end plus this.
    pub ttl_millis: i64,
    /// A call at least this long, not skipped, is a good match (reward 1).
    pub min_call_seconds: u32,
}

impl FeedbackConfig {
    /// The reward and label of an outcome: 0 when skipped, else the call's
    /// share of `min_call_seconds`, capped at 1; good iff that share is 1.
    pub fn judge(&self, outcome: &MatchOutcome) -> (f64, Label) {
        if outcome.skipped {
            return (0.0, Label::Bad);
        }
        if outcome.call_seconds >= self.min_call_seconds {
            return (1.0, Label::Good);
        }
        (
            f64::from(outcome.call_seconds) / f64::from(self.min_call_seconds),
            Label::Bad,
        )
    }
}

/// A match the join knows, persisted under `j/<matchId>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRecord {
    pub segment: String,
    pub scorer: String,
    #[serde(with = "super::exact_float::f32_text")]
    pub score: f32,
    pub window_end: i64,
    pub users: [String; 2],
    /// Whether an outcome joined already (later ones are duplicates).
    pub joined: bool,
}

impl JoinRecord {
    pub fn deadline(&self, ttl_millis: i64) -> i64 {
        self.window_end.saturating_add(ttl_millis)
    }

    /// The sample of this match for `partition`; `outcome` with its reward
    /// and label when one joined.
    pub fn sample(
        &self,
        match_id: &str,
        partition: i32,
        outcome: Option<(MatchOutcome, f64, Label)>,
    ) -> FeedbackSample {
        let (label, reward, outcome) = match outcome {
            Some((o, reward, label)) => (label, Some(reward), Some(o)),
            None => (Label::NoOutcome, None, None),
        };
        FeedbackSample {
            match_id: match_id.to_string(),
            segment: self.segment.clone(),
            partition,
            scorer: self.scorer.clone(),
            score: self.score,
            window_end: self.window_end,
            users: self.users.clone(),
            label,
            reward,
            outcome,
        }
    }
}

/// The matches waiting for their deadline, by id and by deadline.
#[derive(Debug, Clone, Default)]
pub struct JoinBook {
    joins: FastMap<String, JoinRecord>,
    by_deadline: BTreeSet<(i64, String)>,
}

impl JoinBook {
    pub fn insert(&mut self, match_id: String, record: JoinRecord, ttl_millis: i64) {
        if let Some(old) = self.joins.get(&match_id) {
            self.by_deadline
                .remove(&(old.deadline(ttl_millis), match_id.clone()));
        }
        self.by_deadline
            .insert((record.deadline(ttl_millis), match_id.clone()));
        self.joins.insert(match_id, record);
    }

    pub fn get(&self, match_id: &str) -> Option<&JoinRecord> {
        self.joins.get(match_id)
    }

    /// Marks a match joined; false if unknown.
    pub fn mark_joined(&mut self, match_id: &str) -> bool {
        match self.joins.get_mut(match_id) {
            Some(j) => {
                j.joined = true;
                true
            }
            None => false,
        }
    }

    /// Removes and returns the matches whose deadline is before `watermark`,
    /// earliest deadline first (then by id).
    pub fn expire(&mut self, watermark: i64) -> Vec<(String, JoinRecord)> {
        let mut out = Vec::new();
        while let Some((deadline, _)) = self.by_deadline.first() {
            if *deadline >= watermark {
                break;
            }
            let Some((_, id)) = self.by_deadline.pop_first() else {
                break;
            };
            if let Some(j) = self.joins.remove(&id) {
                out.push((id, j));
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.joins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.joins.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(window_end: i64) -> JoinRecord {
        JoinRecord {
            segment: "eu".into(),
            scorer: "cosine".into(),
            score: 0.5,
            window_end,
            users: ["a".into(), "b".into()],
            joined: false,
        }
    }

    fn outcome(call_seconds: u32, skipped: bool) -> MatchOutcome {
        MatchOutcome {
            match_id: "m".into(),
            segment: "eu".into(),
            event_time: 0,
            call_seconds,
            skipped,
        }
    }

    #[test]
    fn rewards_are_the_share_of_a_good_call() {
        let c = FeedbackConfig {
            ttl_millis: 1000,
            min_call_seconds: 40,
        };
        assert_eq!(c.judge(&outcome(10, false)), (0.25, Label::Bad));
        assert_eq!(c.judge(&outcome(40, false)), (1.0, Label::Good));
        assert_eq!(c.judge(&outcome(400, false)), (1.0, Label::Good));
        assert_eq!(c.judge(&outcome(400, true)), (0.0, Label::Bad));
        let any_call = FeedbackConfig {
            ttl_millis: 1000,
            min_call_seconds: 0,
        };
        assert_eq!(any_call.judge(&outcome(0, false)), (1.0, Label::Good));
    }

    #[test]
    fn matches_expire_in_deadline_order_once_the_watermark_passes() {
        let mut book = JoinBook::default();
        book.insert("late".into(), record(5000), 100);
        book.insert("early".into(), record(1000), 100);
        book.insert("early2".into(), record(1000), 100);
        assert!(book.expire(1100).is_empty(), "deadline 1100 not passed yet");
        let gone: Vec<String> = book.expire(1101).into_iter().map(|(id, _)| id).collect();
        assert_eq!(gone, vec!["early", "early2"]);
        assert!(book.mark_joined("late"));
        assert!(!book.mark_joined("early"));
        assert!(book.get("late").is_some_and(|j| j.joined));
        assert_eq!(book.len(), 1);
        let gone = book.expire(i64::MAX);
        assert_eq!(gone.len(), 1);
        assert!(book.is_empty());
    }

    #[test]
    fn reinserting_a_match_keeps_one_deadline_entry() {
        let mut book = JoinBook::default();
        book.insert("m".into(), record(1000), 100);
        book.insert("m".into(), record(3000), 100);
        assert!(book.expire(2000).is_empty());
        assert_eq!(book.expire(4000).len(), 1);
    }

    #[test]
    fn samples_carry_the_match_and_its_outcome() {
        let r = record(1000);
        let none = r.sample("m", 3, None);
        assert_eq!(
            (none.label, none.reward, none.partition),
            (Label::NoOutcome, None, 3)
        );
        let o = outcome(60, false);
        let s = r.sample("m", 3, Some((o.clone(), 1.0, Label::Good)));
        assert_eq!(s.outcome, Some(o));
        assert_eq!((s.label, s.reward), (Label::Good, Some(1.0)));
        assert_eq!(s.users, ["a".to_string(), "b".to_string()]);
    }
}
