//! The engine's changelog records: keys, JSON values, and decoding them back.
//!
//! | key | value | written when |
//! |---|---|---|
//! | `m` | [`MetaRecord`]: clock (watermark, max event time, last ingest), counters | it changed |
//! | `s/<segment>` | [`SegmentRecord`]: end of the last closed window, bandit posteriors, arms chosen for open windows | it changed |
//! | `q/<segment>/<windowStart>` | [`QueueRecord`]: the window's pending requests as source offsets, with windows waited | it changed (tombstoned once empty) |
//! | `d/<deadline>/<chunk>` | [`CooldownListRecord`]: the user pairs in cooldown until that deadline | its list changed (tombstoned once it expires) |
//! | `j/<matchId>` | [`JoinRecord`]: a match waiting for (or holding) its outcome until its deadline | known at a `take_changes` |
//!
//! Pending requests are not copied into the changelog: the queue record
//! names their offsets in the partition of the request topic, and a restore
//! re-reads those (at most `maxWaitWindows` windows plus lateness back). A
//! request costs a few bytes in one record per open window and commit
//! instead of its whole body written once and tombstoned once; one record per
//! window keeps each record small (~4 bytes per request) and leaves the
//! windows nothing changed in alone.
//!
//! A window's matches share one cooldown deadline, so the cooldowns are
//! written as one list per deadline: a close writes one record (a chunk per
//! [`COOLDOWN_CHUNK_BYTES`]) where it wrote one per match, and the engine
//! remembers a chunk count per deadline instead of a key per pair. A pair
//! whose deadline moved later may still be in its old deadline's record;
//! a restore keeps each pair's latest deadline.
//! Before lists, a pair was one `c/["<userA>","<userB>"]` record
//! ([`CooldownRecord`]); a restore still reads those, and the engine
//! rewrites them as lists and tombstones them.
//!
//! An expired cooldown list or a finished join that was written is
//! tombstoned (value `None`); one that came and went between two
//! `take_changes` never appears.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::bandit::ArmStats;
use super::cooldown::{canonical, UserPair};
use super::feedback::JoinRecord;
use super::window::EventClock;

pub const META_KEY: &str = "m";
const SEGMENT_PREFIX: &str = "s/";
const QUEUE_PREFIX: &str = "q/";
/// Pending requests as whole records: the format before queue records.
const LEGACY_REQUEST_PREFIX: &str = "r/";
/// A pair per record: the format before cooldown lists.
const COOLDOWN_PREFIX: &str = "c/";
const COOLDOWN_LIST_PREFIX: &str = "d/";
/// A cooldown list record is cut into chunks of about this size, far below
/// Kafka's default 1 MB message limit.
pub const COOLDOWN_CHUNK_BYTES: usize = 256 * 1024;
const JOIN_PREFIX: &str = "j/";

pub fn segment_key(segment: &str) -> String {
    format!("{SEGMENT_PREFIX}{segment}")
}

pub fn queue_key(segment: &str, window_start: i64) -> String {
    format!("{QUEUE_PREFIX}{segment}/{window_start}")
}

pub fn join_key(match_id: &str) -> String {
    format!("{JOIN_PREFIX}{match_id}")
}

pub fn cooldown_list_key(until: i64, chunk: usize) -> String {
    format!("{COOLDOWN_LIST_PREFIX}{until}/{chunk}")
}

/// The values of deadline `until`'s list records, one per chunk; none for
/// no pairs. Each pair is written in canonical order ([`canonical`]).
/// Written by hand: a pair is two borrowed names, no copies.
pub fn encode_cooldown_list<'a>(
    until: i64,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<Vec<u8>> {
    let head = format!(r#"{{"until":{until},"pairs":["#);
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    for (a, b) in pairs {
        let (lo, hi) = canonical(a, b);
        if chunk.is_empty() {
            chunk.extend_from_slice(head.as_bytes());
        } else {
            chunk.push(b',');
        }
        // Serialising two strings into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut chunk, &[lo, hi]);
        if chunk.len() >= COOLDOWN_CHUNK_BYTES {
            chunk.extend_from_slice(b"]}");
            chunks.push(std::mem::take(&mut chunk));
        }
    }
    if !chunk.is_empty() {
        chunk.extend_from_slice(b"]}");
        chunks.push(chunk);
    }
    chunks
}

/// The key of a pair's record in the format before cooldown lists.
pub fn cooldown_key(pair: &UserPair) -> String {
    // Serialising two strings cannot fail.
    let users = serde_json::to_string(&[&*pair.0, &*pair.1]).unwrap_or_default();
    format!("{COOLDOWN_PREFIX}{users}")
}

/// The engine's cumulative counters. The feedback ones default to 0 so
/// state written before the join existed still restores.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    pub requests: u64,
    pub matched: u64,
    pub expired: u64,
    pub dead_lettered: u64,
    /// Valid outcome events read.
    #[serde(default)]
    pub outcomes: u64,
    /// Outcomes joined to their match (one per match at most).
    #[serde(default)]
    pub joined: u64,
    /// Outcomes after their match's deadline.
    #[serde(default)]
    pub outcomes_late: u64,
    /// Outcomes for a match already joined.
    #[serde(default)]
    pub outcomes_duplicate: u64,
    /// Outcomes for no match of the partition (never made here, or expired).
    #[serde(default)]
    pub outcomes_unknown: u64,
    /// Matches whose deadline passed without an outcome.
    #[serde(default)]
    pub no_outcome: u64,
}

impl Counters {
    pub fn to_map(&self) -> BTreeMap<String, u64> {
        BTreeMap::from([
            ("requests".to_string(), self.requests),
            ("matched".to_string(), self.matched),
            ("expired".to_string(), self.expired),
            ("deadLettered".to_string(), self.dead_lettered),
            ("outcomes".to_string(), self.outcomes),
            ("joined".to_string(), self.joined),
            ("outcomesLate".to_string(), self.outcomes_late),
            ("outcomesDuplicate".to_string(), self.outcomes_duplicate),
            ("outcomesUnknown".to_string(), self.outcomes_unknown),
            ("noOutcome".to_string(), self.no_outcome),
        ])
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaRecord {
    pub clock: EventClock,
    pub counters: Counters,
    /// The event-time clock of the outcome events (feedback join).
    #[serde(default)]
    pub outcome_clock: EventClock,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SegmentRecord {
    pub closed_until: Option<i64>,
    /// Posteriors by scorer name.
    pub arms: BTreeMap<String, ArmStats>,
    /// Scorer chosen (by `due` or `close`) for a window not closed yet, by start.
    pub chosen: BTreeMap<i64, String>,
}

/// A pending request as the changelog knows it: where it is in the request
/// topic's partition, the window it waits in, the windows waited so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedRequest {
    pub offset: i64,
    pub window: i64,
    pub windows: u32,
}

/// A window's pending requests, compactly: their offsets in ascending
/// order, delta-encoded (the first one absolute), and the (position, windows
/// waited) of those that waited at least one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueRecord {
    pub offsets: Vec<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waited: Vec<(u32, u32)>,
}

impl QueueRecord {
    /// From `[(offset, windows waited)]`, ascending by offset.
    pub fn new(requests: &[(i64, u32)]) -> Self {
        let mut previous = 0;
        let offsets = requests
            .iter()
            .map(|&(offset, _)| {
                let delta = offset - previous;
                previous = offset;
                delta
            })
            .collect();
        let waited = requests
            .iter()
            .enumerate()
            .filter(|(_, (_, windows))| *windows > 0)
            .map(|(i, &(_, windows))| (i as u32, windows))
            .collect();
        QueueRecord { offsets, waited }
    }

    /// The requests it names as waiting in `window`; None if it does not
    /// decode to ascending offsets with valid positions.
    pub fn requests(&self, window: i64) -> Option<Vec<QueuedRequest>> {
        let mut out = Vec::with_capacity(self.offsets.len());
        let mut offset = 0i64;
        for (i, delta) in self.offsets.iter().enumerate() {
            if i > 0 && *delta <= 0 {
                return None;
            }
            offset = offset.checked_add(*delta)?;
            if offset < 0 {
                return None;
            }
            out.push(QueuedRequest {
                offset,
                window,
                windows: 0,
            });
        }
        for &(i, windows) in &self.waited {
            out.get_mut(i as usize)?.windows = windows;
        }
        Some(out)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CooldownRecord {
    pub users: [String; 2],
    pub until: i64,
}

/// The user pairs in cooldown until one deadline (one chunk of them).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CooldownListRecord {
    pub until: i64,
    pub pairs: Vec<(String, String)>,
}

/// A changelog record that cannot be restored.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("changelog key {0:?} is not an engine key")]
    UnknownKey(String),
    #[error("changelog record {key:?} does not decode")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("changelog record {key:?}: {reason}")]
    Invalid { key: String, reason: String },
    /// A pending request named by a queue record cannot be re-read.
    #[error("pending request at offset {offset} of the request partition: {reason}")]
    Replay { offset: i64, reason: String },
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Meta(MetaRecord),
    Segment(String, SegmentRecord),
    Queue(String, Vec<QueuedRequest>),
    /// A chunk of a deadline's cooldown list: (deadline, chunk, pairs).
    Cooldowns(i64, usize, Vec<UserPair>),
    /// A pair's cooldown in the format before lists.
    Cooldown(UserPair, i64),
    Join(String, JoinRecord),
}

fn json<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, RestoreError> {
    serde_json::from_slice(value).map_err(|source| RestoreError::Decode {
        key: key.to_string(),
        source,
    })
}

/// Decodes the record under `key`, checking that the key names what the value holds.
pub fn decode(key: &str, value: &[u8]) -> Result<Record, RestoreError> {
    let invalid = |reason: &str| RestoreError::Invalid {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    if key == META_KEY {
        Ok(Record::Meta(json(key, value)?))
    } else if let Some(segment) = key.strip_prefix(SEGMENT_PREFIX) {
        Ok(Record::Segment(segment.to_string(), json(key, value)?))
    } else if let Some(rest) = key.strip_prefix(QUEUE_PREFIX) {
        // The start is after the last '/': a segment name may contain '/'.
        let (segment, start) = rest
            .rsplit_once('/')
            .and_then(|(seg, start)| Some((seg, start.parse::<i64>().ok()?)))
            .ok_or_else(|| invalid("not q/<segment>/<window start>"))?;
        let q: QueueRecord = json(key, value)?;
        let requests = q
            .requests(start)
            .ok_or_else(|| invalid("offsets are not ascending, or a position is out of range"))?;
        Ok(Record::Queue(segment.to_string(), requests))
    } else if key.starts_with(LEGACY_REQUEST_PREFIX) {
        Err(invalid(
            "a pending request in the state format before queue records; \
             this worker cannot restore it: let the pipeline drain with the old worker image first",
        ))
    } else if let Some(rest) = key.strip_prefix(COOLDOWN_LIST_PREFIX) {
        let (until, chunk) = rest
            .split_once('/')
            .and_then(|(until, chunk)| Some((until.parse::<i64>().ok()?, chunk.parse().ok()?)))
            .ok_or_else(|| invalid("not d/<deadline>/<chunk>"))?;
        let list: CooldownListRecord = json(key, value)?;
        if list.until != until {
            return Err(invalid("holds another deadline"));
        }
        let pairs = list
            .pairs
            .iter()
            .map(|(a, b)| UserPair::new(a, b))
            .collect();
        Ok(Record::Cooldowns(until, chunk, pairs))
    } else if key.starts_with(COOLDOWN_PREFIX) {
        let c: CooldownRecord = json(key, value)?;
        let [a, b] = &c.users;
        let pair = UserPair::new(a, b);
        if cooldown_key(&pair) != key {
            return Err(invalid("holds another user pair"));
        }
        Ok(Record::Cooldown(pair, c.until))
    } else if let Some(id) = key.strip_prefix(JOIN_PREFIX) {
        Ok(Record::Join(id.to_string(), json(key, value)?))
    } else {
        Err(RestoreError::UnknownKey(key.to_string()))
    }
}

/// JSON of a record value (the types here always serialise).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_and_unambiguous() {
        assert_eq!(queue_key("eu/west", -1000), "q/eu/west/-1000");
        assert_eq!(segment_key("eu"), "s/eu");
        assert_eq!(
            cooldown_key(&UserPair::new("bob", "ann")),
            r#"c/["ann","bob"]"#
        );
        assert_ne!(
            cooldown_key(&UserPair::new("a\",\"b", "c")),
            cooldown_key(&UserPair::new("a", "b\",\"c"))
        );
    }

    /// Restore must give back every float bit for bit (posteriors are
    /// sampled, scores rewarded): the records that hold floats, over random
    /// bit patterns.
    #[test]
    fn floats_in_records_round_trip_exactly() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..50_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let (wide, narrow) = (f64::from_bits(s), f32::from_bits((s >> 11) as u32));
            if !wide.is_finite() || !narrow.is_finite() {
                continue;
            }
            let mut segment = SegmentRecord::default();
            segment.arms.insert(
                "cosine".into(),
                ArmStats {
                    successes: wide,
                    failures: wide / 3.0,
                },
            );
            let back = decode("s/eu", &encode(&segment)).unwrap();
            assert_eq!(back, Record::Segment("eu".into(), segment.clone()));
            let arm = &segment.arms["cosine"];
            let Record::Segment(_, back) = back else {
                unreachable!()
            };
            assert_eq!(
                back.arms["cosine"].failures.to_bits(),
                arm.failures.to_bits()
            );
            assert_eq!(
                back.arms["cosine"].successes.to_bits(),
                arm.successes.to_bits()
            );

            let join = JoinRecord {
                segment: "eu".into(),
                scorer: "cosine".into(),
                score: narrow,
                window_end: 1,
                users: ["a".into(), "b".into()],
                joined: false,
            };
            let Record::Join(_, back) = decode("j/m", &encode(&join)).unwrap() else {
                unreachable!()
            };
            assert_eq!(back.score.to_bits(), narrow.to_bits(), "{narrow:e}");
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_say_why() {
        let pair = UserPair::new("ann", "bob");
        let value = encode(&CooldownRecord {
            users: ["bob".into(), "ann".into()],
            until: 9,
        });
        assert_eq!(
            decode(&cooldown_key(&pair), &value).unwrap(),
            Record::Cooldown(pair, 9)
        );
        assert!(matches!(
            decode(r#"c/["x","y"]"#, &value),
            Err(RestoreError::Invalid { .. })
        ));
        assert!(matches!(
            decode("m", b"{"),
            Err(RestoreError::Decode { .. })
        ));
        assert!(matches!(
            decode("zz", b"{}"),
            Err(RestoreError::UnknownKey(_))
        ));
        assert!(matches!(
            decode("r/x", b"{}"),
            Err(RestoreError::Invalid { .. })
        ));
        let meta = MetaRecord::default();
        assert_eq!(decode("m", &encode(&meta)).unwrap(), Record::Meta(meta));
    }

    #[test]
    fn cooldown_lists_round_trip_in_chunks() {
        let odd = UserPair::new("a\",\"b", "c\\d\u{1}");
        let many: Vec<UserPair> = (0..20_000)
            .map(|i| UserPair::new(&format!("user-{i}"), &format!("partner-{i}")))
            .chain([odd.clone()])
            .collect();
        // Given either way round, written canonically.
        let chunks = encode_cooldown_list(-7, many.iter().map(|p| (&*p.1, &*p.0)));
        assert!(chunks.len() > 1, "{} bytes in one record", chunks[0].len());
        let mut back = Vec::new();
        for (i, value) in chunks.iter().enumerate() {
            assert!(value.len() < COOLDOWN_CHUNK_BYTES + 1024);
            let key = cooldown_list_key(-7, i);
            let Record::Cooldowns(until, chunk, pairs) = decode(&key, value).unwrap() else {
                panic!("{key} is not a cooldown list");
            };
            assert_eq!((until, chunk), (-7, i));
            back.extend(pairs);
        }
        assert_eq!(back, many);
        assert!(encode_cooldown_list(5, std::iter::empty()).is_empty());

        let one = encode_cooldown_list(5, [(&*odd.0, &*odd.1)]).remove(0);
        for bad in ["d/6/0", "d/5", "d/x/0", "d/5/-1"] {
            assert!(
                matches!(decode(bad, &one), Err(RestoreError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            decode("d/5/0", br#"{"until":5,"pairs":[["a"]]}"#),
            Err(RestoreError::Decode { .. })
        ));
    }

    #[test]
    fn queue_records_round_trip_compactly() {
        let q = QueueRecord::new(&[(100, 0), (103, 2), (150, 0)]);
        let text = String::from_utf8(encode(&q)).unwrap();
        assert_eq!(text, r#"{"offsets":[100,3,47],"waited":[[1,2]]}"#);
        let want = |offset, windows| QueuedRequest {
            offset,
            window: 1000,
            windows,
        };
        assert_eq!(
            decode("q/eu/west/1000", text.as_bytes()).unwrap(),
            Record::Queue(
                "eu/west".into(),
                vec![want(100, 0), want(103, 2), want(150, 0)]
            )
        );
        for (key, bad) in [
            ("q/eu/1", r#"{"offsets":[5,0]}"#),
            ("q/eu/1", r#"{"offsets":[-5]}"#),
            ("q/eu/1", r#"{"offsets":[5],"waited":[[1,1]]}"#),
            ("q/eu", r#"{"offsets":[5]}"#),
            ("q/eu/x", r#"{"offsets":[5]}"#),
        ] {
            assert!(
                matches!(
                    decode(key, bad.as_bytes()),
                    Err(RestoreError::Invalid { .. })
                ),
                "{key} {bad}"
            );
        }
    }
}
