//! The feedback join's side of a load run, without Kafka: outcome events for
//! the matches a run produced (`outcomes`), the samples the join must write
//! for them, computed from the join's contract alone (`expect`), and the
//! comparison with what the rewards topic holds (`compare`). Reading and
//! sending live with the other Kafka code in `read` and `produce`.

mod compare;
mod expect;
mod outcomes;

use matchfleet_api::match_pipeline::MatchPipelineSpec;
use matchfleet_api::matching::MatchResult;
use serde::Serialize;

use super::check::ResultRecord;

pub use compare::{compare, FeedbackReport, Field, Mismatch, RewardRecord};
pub use expect::expected_samples;
pub use outcomes::{
    plan_outcomes, OutcomeKind, OutcomeOptions, OutcomeOptionsError, OutcomePlan, PlanFigures,
    PlannedOutcome,
};

/// What the join knows of a match: everything a sample repeats from it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackMatch {
    pub match_id: String,
    pub segment: String,
    /// The match's input partition: its outcomes go to this partition of the
    /// feedback topic, its sample to this partition of the rewards topic.
    pub partition: i32,
    pub scorer: String,
    pub score: f32,
    pub window_end: i64,
    /// The two user names, sorted (as samples carry them).
    pub users: [String; 2],
}

impl FeedbackMatch {
    /// The match a result announces; `None` for an expiry.
    pub fn from_result(result: &MatchResult) -> Option<Self> {
        let MatchResult::Matched {
            match_id,
            segment,
            window_end,
            partition,
            scorer,
            score,
            users,
            ..
        } = result
        else {
            return None;
        };
        let mut names = [users[0].user.clone(), users[1].user.clone()];
        names.sort();
        Some(FeedbackMatch {
            match_id: match_id.clone(),
            segment: segment.clone(),
            partition: *partition,
            scorer: scorer.clone(),
            score: *score,
            window_end: *window_end,
            users: names,
        })
    }
}

/// The matches among the records of a results topic, each once (by match
/// id), ordered by partition, window and id so that a plan drawn from them
/// does not depend on the order the topic was read in.
pub fn matches_in(records: &[ResultRecord]) -> Vec<FeedbackMatch> {
    let mut by_id = std::collections::BTreeMap::new();
    for record in records {
        let Some(result) = record
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_slice::<MatchResult>(p).ok())
        else {
            continue;
        };
        if let Some(m) = FeedbackMatch::from_result(&result) {
            by_id.entry(m.match_id.clone()).or_insert(m);
        }
    }
    let mut matches: Vec<FeedbackMatch> = by_id.into_values().collect();
    matches.sort_by(|a, b| {
        (a.partition, a.window_end, &a.match_id).cmp(&(b.partition, b.window_end, &b.match_id))
    });
    matches
}

/// The parts of a pipeline's spec the join's outcome depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRules {
    /// `feedback.ttlSeconds` in milliseconds: a match's deadline is its
    /// window end plus this.
    pub ttl_millis: i64,
    /// `feedback.minCallSeconds`.
    pub min_call_seconds: u32,
    /// `window.outOfOrderMillis`: the event-time watermark trails the newest
    /// event time by this much.
    pub out_of_order_millis: i64,
}

impl JoinRules {
    /// The pipeline's rules; `None` when it has no feedback join.
    pub fn for_pipeline(spec: &MatchPipelineSpec) -> Option<Self> {
        let feedback = spec.feedback.as_ref()?;
        Some(JoinRules {
            ttl_millis: i64::from(feedback.ttl_seconds.max(0)) * 1000,
            min_call_seconds: u32::try_from(feedback.min_call_seconds).unwrap_or(0),
            out_of_order_millis: i64::from(spec.window.out_of_order_millis.max(0)),
        })
    }

    /// The last event time at which an outcome still joins the match.
    pub fn deadline(&self, m: &FeedbackMatch) -> i64 {
        m.window_end.saturating_add(self.ttl_millis)
    }
}

#[cfg(test)]
mod tests {
    use matchfleet_api::matching::{ExpiryReason, MatchedUser};

    use super::*;

    fn matched(id: &str, partition: i32, window_end: i64, users: [&str; 2]) -> MatchResult {
        let side = |user: &str| MatchedUser {
            request_id: format!("r-{user}"),
            user: user.into(),
            event_time: window_end - 100,
        };
        MatchResult::Matched {
            match_id: id.into(),
            segment: "eu".into(),
            window_start: window_end - 500,
            window_end,
            partition,
            scorer: "cosine".into(),
            score: 0.25,
            users: [side(users[0]), side(users[1])],
            closed_at: window_end + 300,
        }
    }

    fn record(partition: i32, offset: i64, result: &MatchResult) -> ResultRecord {
        ResultRecord {
            partition,
            offset,
            payload: Some(serde_json::to_vec(result).unwrap()),
        }
    }

    #[test]
    fn matches_are_read_once_each_in_a_stable_order_with_sorted_users() {
        let expired = MatchResult::Expired {
            request_id: "r-x".into(),
            user: "x".into(),
            segment: "eu".into(),
            partition: 0,
            event_time: 1,
            windows: 5,
            reason: ExpiryReason::NoPartner,
            closed_at: 2,
        };
        let records = vec![
            record(3, 0, &matched("m-b", 3, 2_000, ["zoe", "al"])),
            record(1, 0, &matched("m-a", 1, 1_000, ["bo", "cy"])),
            record(0, 0, &expired),
            record(3, 1, &matched("m-b", 3, 2_000, ["zoe", "al"])),
            ResultRecord {
                partition: 2,
                offset: 0,
                payload: Some(b"{".to_vec()),
            },
        ];
        let matches = matches_in(&records);
        let ids: Vec<&str> = matches.iter().map(|m| m.match_id.as_str()).collect();
        assert_eq!(ids, ["m-a", "m-b"]);
        assert_eq!(matches[1].users, ["al".to_string(), "zoe".to_string()]);
        assert_eq!(matches[1].partition, 3);
        assert_eq!(matches[1].window_end, 2_000);
        assert_eq!(matches[1].scorer, "cosine");
    }

    #[test]
    fn rules_follow_the_spec() {
        let yaml = r#"
source: {bootstrapServers: "k:9092", topic: requests}
resultsTopic: results
window: {outOfOrderMillis: 250}
feedback: {topic: outcomes, rewardsTopic: rewards, ttlSeconds: 30, minCallSeconds: 20}
"#;
        let mut spec: MatchPipelineSpec = serde_yaml_ng::from_str(yaml).unwrap();
        let rules = JoinRules::for_pipeline(&spec).unwrap();
        assert_eq!(
            rules,
            JoinRules {
                ttl_millis: 30_000,
                min_call_seconds: 20,
                out_of_order_millis: 250,
            }
        );
        let m = FeedbackMatch::from_result(&matched("m", 0, 5_000, ["a", "b"])).unwrap();
        assert_eq!(rules.deadline(&m), 35_000);
        spec.feedback = None;
        assert_eq!(JoinRules::for_pipeline(&spec), None);
    }
}
