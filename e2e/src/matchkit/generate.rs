//! The records of a load run, without Kafka: which user asks next, when the
//! request says it was made (on time, out of order or very late), and which
//! records are deliberately malformed for the dead-letter tests.

use matchfleet_api::matching::MatchRequest;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::population::{draw_population, PopulationSpec, User};

/// Everything that shapes a load run.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadOptions {
    /// Prefix of every request id, so runs on one topic never collide.
    pub run_id: String,
    /// Records to send, malformed ones included.
    pub total: u64,
    /// Records per second; 0 sends as fast as Kafka takes them.
    pub rate: f64,
    pub dimension: usize,
    pub users: usize,
    pub segments: usize,
    /// Zipf exponent of segment sizes (0 = uniform).
    pub skew: f64,
    pub seed: u64,
    /// Share of records whose event time is up to `out_of_order_max_millis` in the past.
    pub out_of_order_fraction: f64,
    pub out_of_order_max_millis: i64,
    /// Share of records whose event time is exactly `late_millis` in the past.
    pub late_fraction: f64,
    pub late_millis: i64,
    /// Malformed records, spread evenly over the run, kinds in turn.
    pub malformed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            run_id: "run".into(),
            total: 1000,
            rate: 0.0,
            dimension: 32,
            users: 200,
            segments: 4,
            skew: 1.0,
            seed: 1,
            out_of_order_fraction: 0.0,
            out_of_order_max_millis: 0,
            late_fraction: 0.0,
            late_millis: 0,
            malformed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptionsError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{0} must be between 0 and 1")]
    Fraction(&'static str),
    #[error("out-of-order and late fractions add up to more than 1")]
    Fractions,
    #[error("{0} must not be negative")]
    Negative(&'static str),
    #[error("{malformed} malformed records do not fit in {total}")]
    TooManyMalformed { malformed: u64, total: u64 },
    #[error("the run id must be 1 to 100 characters")]
    RunId,
}

impl LoadOptions {
    pub fn validate(&self) -> Result<(), OptionsError> {
        for (name, value) in [
            ("dimension", self.dimension),
            ("users", self.users),
            ("segments", self.segments),
        ] {
            if value == 0 {
                return Err(OptionsError::Zero(name));
            }
        }
        for (name, value) in [
            ("outOfOrderFraction", self.out_of_order_fraction),
            ("lateFraction", self.late_fraction),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(OptionsError::Fraction(name));
            }
        }
        if self.out_of_order_fraction + self.late_fraction > 1.0 {
            return Err(OptionsError::Fractions);
        }
        for (name, value) in [
            ("outOfOrderMaxMillis", self.out_of_order_max_millis as f64),
            ("lateMillis", self.late_millis as f64),
            ("rate", self.rate),
            ("skew", self.skew),
        ] {
            if value.is_nan() || value < 0.0 {
                return Err(OptionsError::Negative(name));
            }
        }
        if self.malformed > self.total {
            return Err(OptionsError::TooManyMalformed {
                malformed: self.malformed,
                total: self.total,
            });
        }
        // Ids are at most 128 characters; the sequence suffix takes up to 21.
        if self.run_id.is_empty() || self.run_id.len() > 100 {
            return Err(OptionsError::RunId);
        }
        Ok(())
    }
}

/// The ways a record is made unacceptable, each caught by `parse_request`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Malformed {
    /// The JSON is cut off half way.
    BadJson,
    /// One value more than the pipeline's dimension.
    WrongDimension,
    /// A literal too large for f32 (JSON has no NaN). serde_json parses it
    /// to infinity (reason "not finite"), or, when its `float_roundtrip`
    /// feature is on, refuses it as out of range (a JSON reason): invalid
    /// either way.
    NotFinite,
    /// Keyed by another segment than the request's.
    KeyMismatch,
}

impl Malformed {
    const ALL: [Malformed; 4] = [
        Malformed::BadJson,
        Malformed::WrongDimension,
        Malformed::NotFinite,
        Malformed::KeyMismatch,
    ];
}

/// One record to send.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub key: String,
    pub payload: Vec<u8>,
    /// The request the record was made from (for a malformed record, before
    /// it was broken).
    pub request: MatchRequest,
    pub malformed: Option<Malformed>,
}

/// Produces the run's records one at a time; deterministic for a seed and a
/// sequence of clock readings.
pub struct Generator {
    options: LoadOptions,
    users: Vec<User>,
    rng: StdRng,
    sequence: u64,
    /// Users take turns in a shuffled order, reshuffled every round, so all
    /// re-request and a user's requests are spread over the run.
    turns: Vec<usize>,
    next_turn: usize,
    next_malformed: u64,
}

impl Generator {
    pub fn new(options: &LoadOptions) -> Result<Self, OptionsError> {
        options.validate()?;
        let mut rng = StdRng::seed_from_u64(options.seed);
        let users = draw_population(
            &PopulationSpec {
                users: options.users,
                segments: options.segments,
                skew: options.skew,
                dimension: options.dimension,
            },
            &mut rng,
        );
        let turns = (0..users.len()).collect();
        Ok(Generator {
            options: options.clone(),
            users,
            rng,
            sequence: 0,
            turns,
            next_turn: usize::MAX,
            next_malformed: 0,
        })
    }

    pub fn users(&self) -> &[User] {
        &self.users
    }

    /// The next record, its event time derived from `now_millis` (the wall
    /// clock at send); `None` once the run's total has been produced.
    pub fn next_record(&mut self, now_millis: i64) -> Option<Outgoing> {
        if self.sequence >= self.options.total {
            return None;
        }
        let index = self.next_user();
        let event_time = self.event_time(now_millis);
        let malformed = self.malformed_now();
        let user = &self.users[index];
        let request = MatchRequest {
            request_id: format!("{}-{:08}", self.options.run_id, self.sequence),
            user: user.id.clone(),
            segment: user.segment.clone(),
            event_time,
            vector: user.request_vector(&mut self.rng),
            profile: user.profile.clone(),
            wants: user.wants.clone(),
        };
        self.sequence += 1;
        let (key, payload) = encode(&request, malformed);
        Some(Outgoing {
            key,
            payload,
            request,
            malformed,
        })
    }

    fn next_user(&mut self) -> usize {
        if self.next_turn >= self.turns.len() {
            self.turns.shuffle(&mut self.rng);
            self.next_turn = 0;
        }
        self.next_turn += 1;
        self.turns[self.next_turn - 1]
    }

    fn event_time(&mut self, now_millis: i64) -> i64 {
        let u: f64 = self.rng.random();
        let o = &self.options;
        if u < o.late_fraction {
            now_millis - o.late_millis
        } else if u < o.late_fraction + o.out_of_order_fraction {
            now_millis - self.rng.random_range(0..=o.out_of_order_max_millis)
        } else {
            now_millis
        }
    }

    /// The k-th malformed record sits in the middle of the k-th of
    /// `malformed` equal slices of the run.
    fn malformed_now(&mut self) -> Option<Malformed> {
        let (k, count, total) = (
            self.next_malformed,
            self.options.malformed,
            self.options.total,
        );
        if k >= count {
            return None;
        }
        let position = ((2 * k + 1) as u128 * total as u128 / (2 * count) as u128) as u64;
        if position != self.sequence {
            return None;
        }
        self.next_malformed += 1;
        Some(Malformed::ALL[(k % 4) as usize])
    }
}

/// The Kafka key and value of a request, broken as asked.
fn encode(request: &MatchRequest, malformed: Option<Malformed>) -> (String, Vec<u8>) {
    let key = request.segment.clone();
    // A MatchRequest is plain data: serialising it cannot fail.
    let Some(malformed) = malformed else {
        return (key, serde_json::to_vec(request).unwrap_or_default());
    };
    let mut value = serde_json::to_value(request).unwrap_or_default();
    match malformed {
        Malformed::BadJson => {
            let json = value.to_string();
            return (key, json.as_bytes()[..json.len() / 2].to_vec());
        }
        Malformed::WrongDimension => {
            if let Some(v) = value["vector"].as_array_mut() {
                v.push(serde_json::json!(0.0));
            }
        }
        Malformed::NotFinite => {
            if let Some(first) = value["vector"].get_mut(0) {
                *first = serde_json::json!(1e60);
            }
        }
        Malformed::KeyMismatch => {
            return (format!("{key}.elsewhere"), value.to_string().into_bytes());
        }
    }
    (key, value.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use matchfleet_api::matching::{parse_request, InvalidRequest};

    use super::*;

    fn options() -> LoadOptions {
        LoadOptions {
            run_id: "t".into(),
            total: 400,
            dimension: 8,
            users: 50,
            segments: 3,
            seed: 11,
            ..LoadOptions::default()
        }
    }

    fn run(options: &LoadOptions) -> Vec<Outgoing> {
        let mut g = Generator::new(options).unwrap();
        std::iter::from_fn(|| g.next_record(1_000_000)).collect()
    }

    #[test]
    fn a_seed_reproduces_the_run() {
        let a = run(&options());
        let b = run(&options());
        assert_eq!(a.len(), 400);
        let payloads = |r: &[Outgoing]| r.iter().map(|o| o.payload.clone()).collect::<Vec<_>>();
        assert_eq!(payloads(&a), payloads(&b));
        let other = run(&LoadOptions {
            seed: 12,
            ..options()
        });
        assert_ne!(payloads(&a), payloads(&other));
    }

    #[test]
    fn valid_records_parse_back_to_their_request() {
        let records = run(&options());
        let mut ids = HashSet::new();
        for o in &records {
            assert_eq!(o.malformed, None);
            let parsed = parse_request(Some(o.key.as_bytes()), Some(&o.payload), 8).unwrap();
            assert_eq!(parsed, o.request);
            assert_eq!(o.key, o.request.segment);
            assert_eq!(o.request.event_time, 1_000_000);
            assert!(ids.insert(o.request.request_id.clone()), "ids are unique");
        }
        assert_eq!(records[7].request.request_id, "t-00000007");
    }

    #[test]
    fn users_take_turns_and_re_request() {
        let records = run(&options());
        let mut per_user: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &records {
            *per_user.entry(&o.request.user).or_default() += 1;
        }
        assert_eq!(per_user.len(), 50);
        assert!(per_user.values().all(|n| *n == 8), "{per_user:?}");
        let first_round: HashSet<_> = records[..50].iter().map(|o| &o.request.user).collect();
        assert_eq!(first_round.len(), 50, "everyone once per round");
        // A user keeps their segment and profile across requests.
        let user = &records[0].request;
        for o in records.iter().filter(|o| o.request.user == user.user) {
            assert_eq!(o.request.segment, user.segment);
            assert_eq!(o.request.profile, user.profile);
            assert_eq!(o.request.wants, user.wants);
        }
    }

    #[test]
    fn malformed_records_are_spread_and_each_fails_for_its_reason() {
        let records = run(&LoadOptions {
            malformed: 8,
            ..options()
        });
        let broken: Vec<(usize, Malformed)> = records
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.malformed.map(|m| (i, m)))
            .collect();
        assert_eq!(broken.len(), 8);
        assert_eq!(broken[0], (25, Malformed::BadJson));
        assert_eq!(broken[7], (375, Malformed::KeyMismatch));
        for (i, kind) in broken {
            let o = &records[i];
            let err = parse_request(Some(o.key.as_bytes()), Some(&o.payload), 8).unwrap_err();
            let fits = match (kind, &err) {
                (Malformed::BadJson, InvalidRequest::Json(_)) => true,
                (Malformed::WrongDimension, InvalidRequest::Dimension { got: 9, want: 8 }) => true,
                (Malformed::NotFinite, InvalidRequest::NotFinite { index: 0 }) => true,
                (Malformed::NotFinite, InvalidRequest::Json(e)) => e.contains("out of range"),
                (Malformed::KeyMismatch, InvalidRequest::KeyMismatch { .. }) => true,
                _ => false,
            };
            assert!(fits, "{kind:?} gave {err:?}");
        }
        let all_broken = run(&LoadOptions {
            total: 4,
            malformed: 4,
            ..options()
        });
        assert!(all_broken.iter().all(|o| o.malformed.is_some()));
    }

    #[test]
    fn event_times_are_shifted_as_asked() {
        let late = run(&LoadOptions {
            late_fraction: 1.0,
            late_millis: 30_000,
            ..options()
        });
        assert!(late
            .iter()
            .all(|o| o.request.event_time == 1_000_000 - 30_000));
        let shuffled = run(&LoadOptions {
            out_of_order_fraction: 0.5,
            out_of_order_max_millis: 300,
            ..options()
        });
        let shifted = shuffled
            .iter()
            .filter(|o| o.request.event_time < 1_000_000)
            .count();
        assert!((150..250).contains(&shifted), "{shifted}");
        assert!(shuffled
            .iter()
            .all(|o| (1_000_000 - 300..=1_000_000).contains(&o.request.event_time)));
    }

    #[test]
    fn nonsense_options_are_refused() {
        let bad = |o: LoadOptions| Generator::new(&o).err();
        assert_eq!(
            bad(LoadOptions {
                users: 0,
                ..options()
            }),
            Some(OptionsError::Zero("users"))
        );
        assert_eq!(
            bad(LoadOptions {
                late_fraction: 0.7,
                out_of_order_fraction: 0.7,
                ..options()
            }),
            Some(OptionsError::Fractions)
        );
        assert!(bad(LoadOptions {
            malformed: 401,
            ..options()
        })
        .is_some());
        assert!(bad(LoadOptions {
            rate: -1.0,
            ..options()
        })
        .is_some());
        assert!(bad(LoadOptions {
            run_id: String::new(),
            ..options()
        })
        .is_some());
    }
}
