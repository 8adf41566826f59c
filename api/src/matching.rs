//! The MatchPipeline wire format: what producers put on the request topic,
//! what workers write to the results topic, and the nudges pushed to
//! connected users. JSON, camelCase; shared by the worker, the load
//! generator and the checker so all three agree by construction.

use serde::{Deserialize, Serialize};

mod request_json;
mod result_json;

/// A user asking to be matched. Kafka key: the segment (so a segment lives
/// on one partition and every window is complete on its owner).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MatchRequest {
    /// Unique per request; a result names it exactly once.
    pub request_id: String,
    pub user: String,
    /// The matching pool (region, language, mode ...): only requests of one
    /// segment are matched with each other.
    pub segment: String,
    /// When the user asked, in milliseconds since the epoch (event time).
    pub event_time: i64,
    /// The feature vector; its length must be `features.dimension`.
    #[serde(deserialize_with = "vector::deserialize")]
    pub vector: Vec<f32>,
    pub profile: Profile,
    pub wants: Preferences,
}

mod vector {
    //! Reads a feature vector into one allocation. JSON gives serde no
    //! length hint, so the derived `Vec` starts empty and reallocates four
    //! times on the way to 32 values - for every request a worker reads.
    use std::fmt;

    use serde::de::{Deserializer, SeqAccess, Visitor};

    /// Room reserved up front: vectors of up to 32 values (the issue's
    /// dimension) fit without growing; longer ones grow as usual.
    const RESERVED: usize = 32;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        d.deserialize_seq(Floats)
    }

    struct Floats;

    impl<'de> Visitor<'de> for Floats {
        type Value = Vec<f32>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of numbers")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<f32>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(RESERVED).min(RESERVED));
            while let Some(x) = seq.next_element()? {
                v.push(x);
            }
            Ok(v)
        }
    }
}

/// Why a record of the request topic cannot be matched; it goes to the
/// dead-letter topic with this text as its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("no value")]
    Empty,
    #[error("not a match request: {0}")]
    Json(String),
    #[error("{0} must be 1 to 128 characters")]
    BadId(&'static str),
    #[error("the Kafka key {key:?} is not the request's segment {segment:?}")]
    KeyMismatch { key: String, segment: String },
    #[error("vector has {got} values, the pipeline's dimension is {want}")]
    Dimension { got: usize, want: usize },
    #[error("vector value {index} is not finite")]
    NotFinite { index: usize },
    #[error("wants.minAge {min} is above wants.maxAge {max}")]
    AgeRange { min: u8, max: u8 },
}

/// Parses and validates one record of the request topic. A missing key is
/// accepted (HTTP ingest and hand-written producers); a present key must be
/// the segment, or the request would sit on another segment's partition.
pub fn parse_request(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    dimension: usize,
) -> Result<MatchRequest, InvalidRequest> {
    let payload = payload
        .filter(|p| !p.is_empty())
        .ok_or(InvalidRequest::Empty)?;
    let request: MatchRequest = match request_json::read(payload) {
        Some(request) => request,
        None => serde_json::from_slice(payload).map_err(|e| InvalidRequest::Json(e.to_string()))?,
    };
    request.validate(dimension)?;
    if let Some(key) = key {
        let key = String::from_utf8_lossy(key);
        if key != request.segment {
            return Err(InvalidRequest::KeyMismatch {
                key: key.into_owned(),
                segment: request.segment,
            });
        }
    }
    Ok(request)
}

impl MatchRequest {
    pub fn validate(&self, dimension: usize) -> Result<(), InvalidRequest> {
        for (name, value) in [
            ("requestId", &self.request_id),
            ("user", &self.user),
            ("segment", &self.segment),
        ] {
            if value.is_empty() || value.len() > 128 {
                return Err(InvalidRequest::BadId(name));
            }
        }
        if self.vector.len() != dimension {
            return Err(InvalidRequest::Dimension {
                got: self.vector.len(),
                want: dimension,
            });
        }
        if let Some(index) = self.vector.iter().position(|v| !v.is_finite()) {
            return Err(InvalidRequest::NotFinite { index });
        }
        if self.wants.min_age > self.wants.max_age {
            return Err(InvalidRequest::AgeRange {
                min: self.wants.min_age,
                max: self.wants.max_age,
            });
        }
        Ok(())
    }
}

/// What a user is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub gender: String,
    pub age: u8,
}

/// Whom a user accepts. A pair is allowed only if each accepts the other.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Preferences {
    /// Accepted genders; empty accepts any.
    #[serde(default)]
    pub genders: Vec<String>,
    pub min_age: u8,
    pub max_age: u8,
}

impl Preferences {
    pub fn accepts(&self, other: &Profile) -> bool {
        (self.genders.is_empty() || self.genders.contains(&other.gender))
            && self.min_age <= other.age
            && other.age <= self.max_age
    }
}

/// Both accept each other.
pub fn mutually_acceptable(a: &MatchRequest, b: &MatchRequest) -> bool {
    a.user != b.user && a.wants.accepts(&b.profile) && b.wants.accepts(&a.profile)
}

/// One side of a match.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MatchedUser {
    pub request_id: String,
    pub user: String,
    pub event_time: i64,
}

/// Why a request left without a partner.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ExpiryReason {
    /// Carried through `matching.maxWaitWindows` windows without a partner.
    NoPartner,
    /// Arrived after its window closed by more than `window.allowedLatenessMillis`.
    TooLate,
}

/// A record of the results topic. Every request yields exactly one: it is
/// in one `Matched` or one `Expired`. Kafka key: the segment; partition: the
/// request's input partition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "kind"
)]
pub enum MatchResult {
    Matched {
        /// Deterministic: derived from the segment, window and request ids.
        match_id: String,
        segment: String,
        /// The window (event time, milliseconds) in which the pair was made.
        window_start: i64,
        window_end: i64,
        partition: i32,
        /// The scorer the bandit chose for this segment's window.
        scorer: String,
        score: f32,
        users: [MatchedUser; 2],
        /// Wall-clock time the window closed (milliseconds), for latency figures.
        closed_at: i64,
    },
    Expired {
        request_id: String,
        user: String,
        segment: String,
        partition: i32,
        event_time: i64,
        /// Windows the request took part in.
        windows: u32,
        reason: ExpiryReason,
        closed_at: i64,
    },
}

impl MatchResult {
    /// Appends this result's JSON to `out`: the bytes `serde_json::to_vec`
    /// returns, written without its generic path (see `result_json`).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        result_json::write(self, out)
    }

    /// The request ids this result settles.
    pub fn request_ids(&self) -> Vec<&str> {
        match self {
            MatchResult::Matched { users, .. } => {
                users.iter().map(|u| u.request_id.as_str()).collect()
            }
            MatchResult::Expired { request_id, .. } => vec![request_id.as_str()],
        }
    }
}

/// The tiny message pushed over a user's WebSocket when a match for them is
/// committed (Keepalive's "something new"); the client fetches the details
/// from `GET /matches/{user}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Nudge {
    pub user: String,
    pub match_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        user: &str,
        gender: &str,
        age: u8,
        wants: &[&str],
        min: u8,
        max: u8,
    ) -> MatchRequest {
        MatchRequest {
            request_id: format!("r-{user}"),
            user: user.into(),
            segment: "s".into(),
            event_time: 0,
            vector: vec![1.0],
            profile: Profile {
                gender: gender.into(),
                age,
            },
            wants: Preferences {
                genders: wants.iter().map(|g| g.to_string()).collect(),
                min_age: min,
                max_age: max,
            },
        }
    }

    #[test]
    fn acceptance_is_mutual() {
        let a = request("a", "f", 30, &["m"], 25, 40);
        let b = request("b", "m", 35, &["f"], 20, 32);
        let c = request("c", "m", 45, &[], 18, 99);
        assert!(mutually_acceptable(&a, &b));
        assert!(!mutually_acceptable(&a, &c), "c is too old for a");
        assert!(!mutually_acceptable(&a, &a), "never with oneself");
    }

    #[test]
    fn malformed_requests_say_why() {
        let good = request("a", "f", 30, &["m"], 25, 40);
        let json = serde_json::to_vec(&good).unwrap();
        assert_eq!(parse_request(Some(b"s"), Some(&json), 1).unwrap(), good);
        assert_eq!(parse_request(None, Some(&json), 1).unwrap(), good);
        let reason = |key: Option<&[u8]>, payload: &[u8], dim| {
            parse_request(key, Some(payload), dim)
                .unwrap_err()
                .to_string()
        };
        assert!(reason(None, b"{not json", 1).starts_with("not a match request"));
        assert!(reason(None, &json, 32).contains("vector has 1 values"));
        assert!(reason(Some(b"other"), &json, 1).contains("not the request's segment"));
        // JSON has no NaN; a huge literal overflows f32 to infinity.
        let inf = String::from_utf8(json.clone())
            .unwrap()
            .replace("[1.0]", "[1e60]");
        // (With serde_json's float_roundtrip, which the worker enables, the
        // parser refuses it as out of range instead: refused either way.)
        let why = reason(None, inf.as_bytes(), 1);
        assert!(
            why.contains("not finite") || why.contains("out of range"),
            "{why}"
        );
        let mut backwards = good.clone();
        backwards.wants.min_age = 50;
        let backwards = serde_json::to_vec(&backwards).unwrap();
        assert!(reason(None, &backwards, 1).contains("above wants.maxAge"));
        assert_eq!(parse_request(None, None, 1), Err(InvalidRequest::Empty));
        let not_array = String::from_utf8(json.clone())
            .unwrap()
            .replace("[1.0]", r#""1.0""#);
        assert!(reason(None, not_array.as_bytes(), 1).contains("expected an array of numbers"));
        let not_numbers = String::from_utf8(json)
            .unwrap()
            .replace("[1.0]", "[1.0, null]");
        assert!(reason(None, not_numbers.as_bytes(), 2).contains("not a match request"));
    }

    #[test]
    fn vectors_are_read_into_one_allocation() {
        let mut r = request("a", "f", 30, &["m"], 25, 40);
        r.vector = (0..32).map(|i| i as f32 / 8.0).collect();
        let parsed = parse_request(None, Some(&serde_json::to_vec(&r).unwrap()), 32).unwrap();
        assert_eq!(parsed.vector, r.vector);
        assert_eq!(parsed.vector.capacity(), 32, "reserved once, never grown");
        r.vector = (0..100).map(|i| i as f32).collect();
        let parsed = parse_request(None, Some(&serde_json::to_vec(&r).unwrap()), 100).unwrap();
        assert_eq!(parsed.vector, r.vector, "longer vectors grow as usual");
        r.vector = Vec::new();
        let json = serde_json::to_vec(&r).unwrap();
        assert!(parse_request(None, Some(&json), 1)
            .unwrap_err()
            .to_string()
            .contains("vector has 0 values"));
    }

    #[test]
    fn results_round_trip_with_a_kind_tag() {
        let r = MatchResult::Expired {
            request_id: "r1".into(),
            user: "u1".into(),
            segment: "s".into(),
            partition: 3,
            event_time: 5,
            windows: 4,
            reason: ExpiryReason::NoPartner,
            closed_at: 9,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""kind":"expired""#), "{json}");
        assert!(json.contains(r#""reason":"noPartner""#), "{json}");
        assert!(
            json.contains(r#""requestId":"r1""#),
            "fields are camelCase too: {json}"
        );
        assert_eq!(serde_json::from_str::<MatchResult>(&json).unwrap(), r);
        assert_eq!(r.request_ids(), vec!["r1"]);
    }
}
