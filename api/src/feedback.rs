//! The feedback join's wire format: outcome events on `feedback.topic` and
//! the labelled samples (with the bandit's reward) on `feedback.rewardsTopic`.
//!
//! Co-partitioning: a match's state lives on the partition of its requests,
//! so an outcome must be on the same partition number of the feedback topic
//! as the match's result is on the results topic (results are written to
//! their requests' partition). Producers either write the outcome to the
//! result's partition, or key it by segment with the partitioner they use for
//! requests — the feedback topic has as many partitions as the source topic.

use serde::{Deserialize, Serialize};

/// What happened after a match (from the call service). Kafka key: the segment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MatchOutcome {
    /// The `matchId` of the result this outcome is about.
    pub match_id: String,
    pub segment: String,
    /// When the call ended or the skip happened (ms since the epoch).
    pub event_time: i64,
    /// How long the pair talked, in seconds (0 without a call).
    pub call_seconds: u32,
    /// One of the two skipped the other.
    pub skipped: bool,
}

/// Why a record of the feedback topic cannot be joined; it goes to the
/// dead-letter topic with this text as its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOutcome {
    #[error("no value")]
    Empty,
    #[error("not a match outcome: {0}")]
    Json(String),
    #[error("{0} must be 1 to 128 characters")]
    BadId(&'static str),
    #[error("the Kafka key {key:?} is not the outcome's segment {segment:?}")]
    KeyMismatch { key: String, segment: String },
}

/// Parses and validates one record of the feedback topic. As for requests, a
/// missing key is accepted and a present one must be the segment.
pub fn parse_outcome(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Result<MatchOutcome, InvalidOutcome> {
    let payload = payload
        .filter(|p| !p.is_empty())
        .ok_or(InvalidOutcome::Empty)?;
    let outcome: MatchOutcome =
        serde_json::from_slice(payload).map_err(|e| InvalidOutcome::Json(e.to_string()))?;
    for (name, value) in [
        ("matchId", &outcome.match_id),
        ("segment", &outcome.segment),
    ] {
        if value.is_empty() || value.len() > 128 {
            return Err(InvalidOutcome::BadId(name));
        }
    }
    if let Some(key) = key {
        let key = String::from_utf8_lossy(key);
        if key != outcome.segment {
            return Err(InvalidOutcome::KeyMismatch {
                key: key.into_owned(),
                segment: outcome.segment,
            });
        }
    }
    Ok(outcome)
}

/// A match's label for training.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum Label {
    /// Not skipped and a call of at least `feedback.minCallSeconds`.
    Good,
    /// Skipped, or a shorter call.
    Bad,
    /// No outcome within `feedback.ttlSeconds`: no reward is given.
    NoOutcome,
}

/// A record of the rewards topic: exactly one per match of a pipeline with
/// feedback, written when its first outcome joins or when its TTL passes
/// without one. Kafka key: the segment; partition: the match's partition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackSample {
    pub match_id: String,
    pub segment: String,
    pub partition: i32,
    /// The scorer that made the match: the bandit arm the reward is for.
    pub scorer: String,
    pub score: f32,
    pub window_end: i64,
    /// The two users, sorted.
    pub users: [String; 2],
    pub label: Label,
    /// What the bandit got for `scorer` in `segment`, in [0, 1]: 0 when
    /// skipped, else `min(1, callSeconds / minCallSeconds)`. None for `noOutcome`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    /// The outcome that joined, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<MatchOutcome>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> MatchOutcome {
        MatchOutcome {
            match_id: "m1".into(),
            segment: "eu".into(),
            event_time: 5,
            call_seconds: 40,
            skipped: false,
        }
    }

    #[test]
    fn outcomes_parse_and_bad_ones_say_why() {
        let json = serde_json::to_vec(&outcome()).unwrap();
        assert_eq!(parse_outcome(Some(b"eu"), Some(&json)).unwrap(), outcome());
        assert_eq!(parse_outcome(None, Some(&json)).unwrap(), outcome());
        assert_eq!(parse_outcome(None, None), Err(InvalidOutcome::Empty));
        let why = |key: Option<&[u8]>, payload: &[u8]| {
            parse_outcome(key, Some(payload)).unwrap_err().to_string()
        };
        assert!(why(None, b"{").starts_with("not a match outcome"));
        assert!(why(Some(b"us"), &json).contains("not the outcome's segment"));
        let negative = String::from_utf8(json.clone())
            .unwrap()
            .replace(":40", ":-1");
        assert!(why(None, negative.as_bytes()).starts_with("not a match outcome"));
        let mut empty = outcome();
        empty.match_id.clear();
        let empty = serde_json::to_vec(&empty).unwrap();
        assert_eq!(why(None, &empty), "matchId must be 1 to 128 characters");
    }

    #[test]
    fn samples_are_camel_case_and_round_trip() {
        let s = FeedbackSample {
            match_id: "m1".into(),
            segment: "eu".into(),
            partition: 2,
            scorer: "cosine".into(),
            score: 0.5,
            window_end: 1000,
            users: ["a".into(), "b".into()],
            label: Label::NoOutcome,
            reward: None,
            outcome: None,
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""label":"noOutcome""#), "{json}");
        assert!(json.contains(r#""windowEnd":1000"#), "{json}");
        assert!(!json.contains("reward"), "{json}");
        assert_eq!(serde_json::from_str::<FeedbackSample>(&json).unwrap(), s);
    }
}
