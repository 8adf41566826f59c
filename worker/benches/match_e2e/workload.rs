//! The simulated users and their match requests. Each user is drawn once and
//! keeps a segment (Zipf-skewed sizes, like regions or languages), a
//! profile, preferences and a taste vector; every request of theirs scatters
//! around that taste. Users take turns in a shuffled order, reshuffled every
//! round, so with more users than a window's requests nobody asks twice in
//! one window.

use anyhow::Context;
use matchfleet_api::matching::{MatchRequest, Preferences, Profile};
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;

use crate::{Settings, DIMENSION};

/// Interest clusters the tastes are drawn around.
const CLUSTERS: usize = 24;
/// Spread of a taste around its cluster, and of a request around its taste.
const TASTE_SPREAD: f32 = 0.6;
const REQUEST_NOISE: f32 = 0.15;

struct User {
    id: String,
    segment: String,
    partition: i32,
    profile: Profile,
    wants: Preferences,
    taste: Vec<f32>,
}

/// One record for the request topic.
/// A request made ahead of its send ([`Workload::ahead`]).
pub struct Ahead {
    record: Outgoing,
    /// Where the event time's digits are in the payload.
    digits: std::ops::Range<usize>,
}

impl Ahead {
    /// The request with `event_time` (13 digits: epoch ms until 2286) written in.
    pub fn stamp(&mut self, event_time: i64) -> anyhow::Result<&Outgoing> {
        let text = event_time.to_string();
        anyhow::ensure!(
            text.len() == self.digits.len(),
            "event time {event_time} is not 13 digits"
        );
        self.record.payload[self.digits.clone()].copy_from_slice(text.as_bytes());
        Ok(&self.record)
    }
}

pub struct Outgoing {
    /// The segment, as the worker requires.
    pub key: String,
    /// The segment's partition: segments are spread round-robin, so every
    /// partition carries a similar share.
    pub partition: i32,
    pub payload: Vec<u8>,
}

pub struct Workload {
    users: Vec<User>,
    turns: Vec<usize>,
    next_turn: usize,
    rng: Pcg64,
    seq: u64,
}

/// The request id of the `seq`-th request of a run (the topic is the run's own).
pub fn request_id(seq: u64) -> String {
    format!("r{seq}")
}

/// The sequence number back from a request id, if it is one of ours.
pub fn request_seq(id: &str) -> Option<u64> {
    id.strip_prefix('r')?.parse().ok()
}

impl Workload {
    pub fn new(s: &Settings, seed: u64) -> Self {
        let mut rng = Pcg64::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..CLUSTERS)
            .map(|_| (0..DIMENSION).map(|_| normal(&mut rng)).collect())
            .collect();
        let segments = Zipf::new(s.segments, s.skew);
        let users = (0..s.users)
            .map(|i| {
                let segment = segments.sample(&mut rng);
                let profile = Profile {
                    gender: gender(&mut rng).into(),
                    age: age(&mut rng),
                };
                let wants = preferences(&profile, &mut rng);
                let centre = &centres[rng.random_range(0..CLUSTERS)];
                let taste = unit(
                    centre
                        .iter()
                        .map(|c| c + TASTE_SPREAD * normal(&mut rng))
                        .collect(),
                );
                User {
                    id: format!("u{i}"),
                    segment: format!("seg-{segment}"),
                    partition: (segment % s.partitions as usize) as i32,
                    profile,
                    wants,
                    taste,
                }
            })
            .collect();
        Workload {
            users,
            turns: (0..s.users).collect(),
            next_turn: usize::MAX,
            rng,
            seq: 0,
        }
    }

    /// The share of users (and so of requests) in the largest segment.
    pub fn largest_segment_share(&self) -> f64 {
        let mut sizes = std::collections::HashMap::new();
        for u in &self.users {
            *sizes.entry(u.segment.as_str()).or_insert(0usize) += 1;
        }
        let largest = sizes.values().copied().max().unwrap_or(0);
        largest as f64 / self.users.len().max(1) as f64
    }

    /// Requests made so far.
    pub fn made(&self) -> u64 {
        self.seq
    }

    /// The next request, made now to be sent later: its event time is a
    /// 13-digit placeholder that [`Ahead::stamp`] overwrites at the send, so
    /// the live phase spends no CPU making requests on the core the broker
    /// shares with the bench.
    pub fn ahead(&mut self) -> anyhow::Result<Ahead> {
        const PLACEHOLDER: i64 = 1_000_000_000_000;
        const FIELD: &[u8] = b"\"eventTime\":";
        let record = self.next(PLACEHOLDER);
        let start = record
            .payload
            .windows(FIELD.len())
            .position(|w| w == FIELD)
            .map(|i| i + FIELD.len())
            .context("a request without eventTime")?;
        let digits = start..start + PLACEHOLDER.to_string().len();
        anyhow::ensure!(
            record.payload.get(digits.clone()) == Some(PLACEHOLDER.to_string().as_bytes()),
            "the placeholder event time is not where expected"
        );
        Ok(Ahead { record, digits })
    }

    /// The next request, made at `event_time` (ms since the epoch).
    pub fn next(&mut self, event_time: i64) -> Outgoing {
        if self.next_turn >= self.turns.len() {
            shuffle(&mut self.turns, &mut self.rng);
            self.next_turn = 0;
        }
        let user = &self.users[self.turns[self.next_turn]];
        self.next_turn += 1;
        let vector = unit(
            user.taste
                .iter()
                .map(|t| t + REQUEST_NOISE * normal(&mut self.rng))
                .collect(),
        );
        let request = MatchRequest {
            request_id: request_id(self.seq),
            user: user.id.clone(),
            segment: user.segment.clone(),
            event_time,
            vector,
            profile: user.profile.clone(),
            wants: user.wants.clone(),
        };
        self.seq += 1;
        Outgoing {
            key: user.segment.clone(),
            partition: user.partition,
            // A MatchRequest is plain data: serialising it cannot fail.
            payload: serde_json::to_vec(&request).unwrap_or_default(),
        }
    }
}

fn normal(rng: &mut Pcg64) -> f32 {
    rng.sample::<f32, _>(StandardNormal)
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    for x in &mut v {
        *x /= norm;
    }
    v
}

fn shuffle(items: &mut [usize], rng: &mut Pcg64) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.random_range(0..=i));
    }
}

/// More men than women and a few users outside the binary, as dating apps report.
fn gender(rng: &mut Pcg64) -> &'static str {
    let u: f64 = rng.random();
    if u < 0.44 {
        "f"
    } else if u < 0.94 {
        "m"
    } else {
        "x"
    }
}

/// 18 to 60, most in their twenties and thirties.
fn age(rng: &mut Pcg64) -> u8 {
    let u: f64 = rng.random();
    (18.0 + (43.0 * u.powf(1.6)).floor()).min(60.0) as u8
}

/// Mostly the other binary gender (some anyone, some their own), an age
/// range around their own; one in ten does not mind the age.
fn preferences(profile: &Profile, rng: &mut Pcg64) -> Preferences {
    let u: f64 = rng.random();
    let genders: &[&str] = match profile.gender.as_str() {
        "f" if u < 0.78 => &["m"],
        "m" if u < 0.78 => &["f"],
        "f" | "m" if u < 0.92 => &[],
        "f" => &["f"],
        "m" => &["m"],
        _ if u < 0.6 => &[],
        _ => &["f", "m", "x"],
    };
    let (min_age, max_age) = if rng.random_bool(0.1) {
        (18, 99)
    } else {
        (
            profile.age.saturating_sub(rng.random_range(2..=8)).max(18),
            profile.age.saturating_add(rng.random_range(2..=10)).min(99),
        )
    };
    Preferences {
        genders: genders.iter().map(|g| g.to_string()).collect(),
        min_age,
        max_age,
    }
}

/// Picks 0..n with probability proportional to 1 / (k + 1)^exponent.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, exponent: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|k| {
                total += 1.0 / (k as f64).powf(exponent);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    fn sample(&self, rng: &mut Pcg64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let target = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|c| *c <= target)
            .min(self.cumulative.len() - 1)
    }
}
