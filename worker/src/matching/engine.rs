//! [`PartitionEngine`]: the state machine of one input partition — windows,
//! watermark, leftovers, cooldowns, bandit, counters — and its changelog.
//! The semantics are in the docs of [`crate::matching`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use matchfleet_api::feedback::{FeedbackSample, MatchOutcome};
use matchfleet_api::match_pipeline::BuiltinScorer;
use matchfleet_api::matching::{
    ExpiryReason, InvalidRequest, MatchRequest, MatchResult, MatchedUser,
};
use thiserror::Error;

use super::bandit::{self, ArmStats};
use super::changelog::{
    self, cooldown_list_key, encode, encode_cooldown_list, join_key, queue_key, segment_key,
    Counters, MetaRecord, QueueRecord, QueuedRequest, Record, RestoreError, SegmentRecord,
    META_KEY,
};
use super::config::{EngineConfig, ScorerKind};
use super::cooldown::CooldownBook;
use super::digest::{Digest, MatchIds};
use super::feedback::{JoinBook, JoinRecord};
use super::hash::{FastMap, FastSet};
use super::matchmaker::{match_window_seeded, min_score_f32, MatchParams, Pair};
use super::pairing::{Scores, WindowFilter, WindowPairs};
use super::pending::{Pending, PendingRequests, Slot};
use super::prescore::OpenWindow;
use super::score::FeatureMatrix;
use super::users::{UserId, UserTable};
use super::window::{window_phase, window_start, EventClock, MAX_ABS_EVENT_TIME};

/// A window of one segment, as `due` saw it: `digest` is a hash of its
/// requests in order, so scores computed for another composition (a late
/// request joined in between, leftovers were carried in) are never applied.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowId {
    pub segment: String,
    pub start: i64,
    pub digest: u64,
}

/// A window that closes at the `now` passed to [`PartitionEngine::due`].
#[derive(Debug, Clone, PartialEq)]
pub struct DueWindow {
    pub id: WindowId,
    pub end: i64,
    /// The scorer the bandit chose.
    pub scorer: String,
    /// Set when that scorer is HTTP: what to send it.
    pub http: Option<HttpScoring>,
}

/// What an HTTP scorer needs for one window. Its answer goes to
/// [`PartitionEngine::close`] as `n × n` scores, row-major, rows and columns
/// in the order of `request_ids`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpScoring {
    pub url: String,
    pub timeout_millis: i32,
    pub request_ids: Vec<String>,
    pub vectors: Vec<Vec<f32>>,
}

/// A request the engine refuses; the caller dead-letters it.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum IngestError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("event time {0} is outside ±{MAX_ABS_EVENT_TIME} ms")]
    EventTimeOutOfRange(i64),
    #[error("request id {0:?} is already pending")]
    Duplicate(String),
}

/// An outcome event the engine refuses; the caller dead-letters it.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum OutcomeError {
    #[error("event time {0} is outside ±{MAX_ABS_EVENT_TIME} ms")]
    EventTimeOutOfRange(i64),
    #[error("match {match_id:?} is of segment {expected:?}, the outcome says {got:?}")]
    SegmentMismatch {
        match_id: String,
        expected: String,
        got: String,
    },
    #[error("the pipeline has no feedback join")]
    NoFeedback,
}

/// What became of an outcome that was not refused.
#[derive(Debug, Clone, PartialEq)]
pub enum OutcomeFate {
    /// It is the match's outcome: its sample, with the reward the bandit got.
    Joined(Box<FeedbackSample>),
    /// Its event time is after the match's deadline.
    Late,
    /// The match already has its outcome.
    Duplicate,
    /// No match of this partition has that id (or its deadline passed).
    Unknown,
}

#[derive(Debug, Clone, Default)]
struct Segment {
    record: SegmentRecord,
    /// Where its windows begin within each window length, fixed when its
    /// first window opens ([`window_phase`]) and derived from its state on
    /// restore (any window start or `closed_until` is on the grid).
    phase: Option<i64>,
    /// Pending requests' slots by window start, then offset.
    windows: BTreeMap<i64, BTreeMap<i64, Slot>>,
    /// Windows whose pending requests changed since the last `take_changes`.
    changed_windows: BTreeSet<i64>,
    /// Open windows whose scorer is builtin, scored as they fill (not
    /// state: rebuilt from the members on restore).
    prescored: BTreeMap<i64, OpenWindow>,
    /// The last closed window's, emptied, for the next one to fill: its
    /// buffers (about 0.9 KB per member: lists, vectors, lanes) are reused instead of allocated,
    /// faulted in and zeroed again every window.
    spare: Option<OpenWindow>,
    /// Requests a close carried into window `.0` (at offset `.1`, its
    /// scorer `.2`), entered into its prescoring by the next `prescore`
    /// rather than by the close: after the close's results are on their
    /// way, not before (a thousand of them in a large window, ~1 ms).
    carried_in: Vec<(i64, i64, BuiltinScorer)>,
}

impl Segment {
    /// Enters a pending request into window `start`'s prescoring, when the
    /// window's scorer is builtin.
    fn enlist(
        &mut self,
        config: &EngineConfig,
        scorer: Option<BuiltinScorer>,
        start: i64,
        offset: i64,
        req: &MatchRequest,
    ) {
        if let Some(b) = scorer {
            self.prescored
                .entry(start)
                .or_insert_with(|| match self.spare.take() {
                    Some(mut w) => {
                        w.reset(b);
                        w
                    }
                    None => OpenWindow::new(b, config.dimension, config.top_k),
                })
                .add(offset, req);
        }
    }

    /// The queue record of window `start`; None once it has no request.
    fn queue_record(&self, start: i64, requests: &PendingRequests) -> Option<QueueRecord> {
        let members = self.windows.get(&start).filter(|m| !m.is_empty())?;
        let waited: Vec<(i64, u32)> = members
            .iter()
            .map(|(&offset, &slot)| (offset, requests.get(slot).map_or(0, |p| p.windows)))
            .collect();
        Some(QueueRecord::new(&waited))
    }
}

/// A changelog key that may have changed since the last `take_changes`
/// (queues are flagged on their segment: they change with every request).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Dirty {
    Segment(String),
    /// A cooldown deadline whose list changed or expired.
    Cooldowns(i64),
    /// A key of a format this engine no longer writes, to tombstone.
    Retired(String),
    Join(String),
}

/// A restore in progress: the changelog is read; the pending requests it
/// names are still to be re-read from the request partition.
#[derive(Debug)]
pub struct Restoring {
    engine: PartitionEngine,
    /// By offset: (segment, window, windows waited).
    queued: BTreeMap<i64, (String, QueuedRequest)>,
}

impl Restoring {
    /// The request offsets to re-read, `[first, last]`; None when nothing is pending.
    pub fn replay_range(&self) -> Option<(i64, i64)> {
        let first = *self.queued.keys().next()?;
        let last = *self.queued.keys().next_back()?;
        Some((first, last))
    }

    /// Whether the record at `offset` is a pending request.
    pub fn wants(&self, offset: i64) -> bool {
        self.queued.contains_key(&offset)
    }

    /// Completes the restore with the re-read requests (`(offset, request)`
    /// for each offset in `replay_range` that [`Self::wants`]; others are
    /// ignored). Every pending request must be among them, of its segment,
    /// and fit the configuration.
    pub fn finish(
        self,
        replayed: impl IntoIterator<Item = (i64, MatchRequest)>,
    ) -> Result<PartitionEngine, RestoreError> {
        let Restoring {
            mut engine,
            mut queued,
        } = self;
        for (offset, request) in replayed {
            let Some((segment, q)) = queued.remove(&offset) else {
                continue;
            };
            let fail = |reason: String| RestoreError::Replay { offset, reason };
            if request.segment != segment {
                return Err(fail(format!(
                    "it is of segment {:?}, its queue is {segment:?}",
                    request.segment
                )));
            }
            check_request(&request, engine.config.dimension).map_err(|e| fail(e.to_string()))?;
            if engine.requests.contains_id(&request.request_id) {
                return Err(fail(format!(
                    "request id {:?} is pending twice",
                    request.request_id
                )));
            }
            let user = engine.users.hold(&request.user);
            let scorer = engine.window_builtin_scorer(&segment, q.window);
            let seg = engine.segments.entry(segment).or_default();
            seg.enlist(&engine.config, scorer, q.window, offset, &request);
            let slot = engine.requests.insert(Pending {
                request,
                user,
                offset,
                window: q.window,
                windows: q.windows,
            });
            seg.windows
                .entry(q.window)
                .or_default()
                .insert(offset, slot);
        }
        match queued.keys().next() {
            Some(&offset) => Err(RestoreError::Replay {
                offset,
                reason: "not found in the request partition (deleted by retention?)".into(),
            }),
            None => Ok(engine),
        }
    }
}

/// Where a close's greedy started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seeded {
    /// Its own first pass.
    No,
    /// The lists prescored while the window filled.
    Lists,
    /// Those lists' edges, sorted before the close.
    Presorted,
}

/// A closing window's participants, as `score_and_match` needs them.
struct WindowMembers<'a> {
    offsets: &'a [i64],
    reqs: &'a [&'a MatchRequest],
    /// The participants' user ids.
    users: &'a [UserId],
    prescored: Option<&'a mut OpenWindow>,
}

/// The matchmaking state of one input partition. Pure: time comes in as
/// arguments, output goes out as return values.
#[derive(Debug, Clone)]
pub struct PartitionEngine {
    partition: i32,
    config: EngineConfig,
    /// Segments whose window grid is fixed (a phase): the next one to open
    /// a window gets the next phase of the partition's sequence.
    grids: u64,
    clock: EventClock,
    counters: Counters,
    segments: BTreeMap<String, Segment>,
    requests: PendingRequests,
    /// The users of the pending requests and of the cooldowns.
    users: UserTable,
    cooldowns: CooldownBook,
    /// Matches waiting for their outcome (feedback join).
    joins: JoinBook,
    outcome_clock: EventClock,
    dirty: BTreeSet<Dirty>,
    /// `q/` and `j/` keys whose last change written was an upsert.
    persisted: FastSet<String>,
    /// Chunks of each cooldown deadline's list last written.
    cooldown_chunks: BTreeMap<i64, usize>,
    /// Windows closed by this engine (not state: a metric).
    windows_closed: u64,
    /// Of those, the ones matched from lists prescored while they filled.
    windows_prescored: u64,
    /// Of those, the ones whose edges were sorted before the close.
    windows_presorted: u64,
    /// The meta value last written (or restored).
    last_meta: Option<Vec<u8>>,
    /// The requests the last close settled, whose ids are forgotten (and
    /// whose vectors and profiles freed) by the next `prescore` or
    /// `ingest`: for a large window ~1 ms the results need not wait for.
    settled: Vec<Pending>,
}

impl PartitionEngine {
    pub fn new(partition: i32, config: EngineConfig) -> Self {
        PartitionEngine {
            partition,
            grids: 0,
            config,
            clock: EventClock::default(),
            counters: Counters::default(),
            segments: BTreeMap::new(),
            requests: PendingRequests::default(),
            users: UserTable::default(),
            cooldowns: CooldownBook::default(),
            joins: JoinBook::default(),
            outcome_clock: EventClock::default(),
            dirty: BTreeSet::new(),
            persisted: FastSet::default(),
            cooldown_chunks: BTreeMap::new(),
            windows_closed: 0,
            windows_prescored: 0,
            windows_presorted: 0,
            last_meta: None,
            settled: Vec::new(),
        }
    }

    /// Rebuilds the engine from its changelog: `(key, Some(value))` upserts
    /// and `(key, None)` tombstones in log order, the last per key winning.
    /// Pending requests are then re-read from the request partition
    /// ([`Restoring::finish`]); they must fit `config` (vector dimension,
    /// event time).
    pub fn restore(
        partition: i32,
        config: EngineConfig,
        records: impl IntoIterator<Item = (String, Option<Vec<u8>>)>,
    ) -> Result<Restoring, RestoreError> {
        let mut latest: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (key, value) in records {
            match value {
                Some(v) => latest.insert(key, v),
                None => latest.remove(&key),
            };
        }
        let mut e = PartitionEngine::new(partition, config);
        let mut queued = BTreeMap::new();
        for (key, value) in latest {
            match changelog::decode(&key, &value)? {
                Record::Meta(m) => {
                    e.clock = m.clock;
                    e.counters = m.counters;
                    e.outcome_clock = m.outcome_clock;
                    e.last_meta = Some(value);
                }
                Record::Segment(name, record) => {
                    e.segments.entry(name).or_default().record = record;
                }
                Record::Queue(segment, requests) => {
                    for q in requests {
                        if queued.insert(q.offset, (segment.clone(), q)).is_some() {
                            return Err(RestoreError::Invalid {
                                key,
                                reason: format!("offset {} is queued twice", q.offset),
                            });
                        }
                    }
                    e.persisted.insert(key);
                }
                Record::Cooldowns(until, chunk, pairs) => {
                    for pair in pairs {
                        e.cooldowns
                            .insert_names(&mut e.users, &pair.0, &pair.1, until);
                    }
                    let chunks = e.cooldown_chunks.entry(until).or_default();
                    *chunks = (*chunks).max(chunk + 1);
                }
                Record::Cooldown(pair, until) => {
                    // Rewritten into its deadline's list, then tombstoned.
                    e.cooldowns
                        .insert_names(&mut e.users, &pair.0, &pair.1, until);
                    e.dirty.insert(Dirty::Cooldowns(until));
                    e.persisted.insert(key.clone());
                    e.dirty.insert(Dirty::Retired(key));
                }
                Record::Join(id, record) => {
                    e.persisted.insert(key);
                    match e.config.feedback {
                        Some(f) => e.joins.insert(id, record, f.ttl_millis),
                        // The join was switched off: forget (tombstone) its state.
                        None => {
                            e.dirty.insert(Dirty::Join(id));
                        }
                    }
                }
            }
        }
        e.restore_grids(
            queued
                .values()
                .map(|(segment, q)| (segment.as_str(), q.window)),
        );
        Ok(Restoring { engine: e, queued })
    }

    /// Gives each restored segment the grid its state was written on: its
    /// `closed_until`, or else a pending window's start (all of a segment's
    /// windows are on one grid). Segments with neither get theirs when their
    /// first window opens.
    fn restore_grids<'a>(&mut self, pending: impl Iterator<Item = (&'a str, i64)>) {
        let w = self.config.window_millis.max(1);
        for (name, start) in pending {
            let seg = self.segments.entry(name.to_string()).or_default();
            seg.phase.get_or_insert(start.rem_euclid(w));
        }
        for seg in self.segments.values_mut() {
            if let Some(c) = seg.record.closed_until {
                seg.phase = Some(c.rem_euclid(w));
            }
        }
        self.grids = self.segments.values().filter(|s| s.phase.is_some()).count() as u64;
    }

    /// `segment`'s phase, fixing it (the partition's next) on first use.
    fn segment_phase(&mut self, segment: &str) -> i64 {
        if let Some(phase) = self.segments.get(segment).and_then(|s| s.phase) {
            return phase;
        }
        let phase = window_phase(self.partition, self.grids, self.config.window_millis);
        self.grids += 1;
        self.segments.entry(segment.to_string()).or_default().phase = Some(phase);
        phase
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Takes one request, read at `offset` of the request partition (records
    /// arrive in offset order; `now` is the wall clock in ms). Returns the result when it is settled at once (too
    /// late); otherwise it waits for its window. A refused request changes
    /// nothing: the caller dead-letters it (and calls `record_dead_letter`).
    pub fn ingest(
        &mut self,
        req: MatchRequest,
        offset: i64,
        now: i64,
    ) -> Result<Option<MatchResult>, IngestError> {
        check_request(&req, self.config.dimension)?;
        self.forget_settled();
        if self.requests.contains_id(&req.request_id) {
            return Err(IngestError::Duplicate(req.request_id));
        }
        let cfg = &self.config;
        self.clock
            .observe(req.event_time, now, cfg.out_of_order_millis);
        self.counters.requests += 1;

        let phase = self.segment_phase(&req.segment);
        let cfg = &self.config;
        let own = window_start(req.event_time, cfg.window_millis, phase);
        let closed_until = self
            .segments
            .get(&req.segment)
            .and_then(|s| s.record.closed_until);
        let window = match closed_until {
            Some(c) if own < c => {
                let wm = self.clock.watermark.unwrap_or(req.event_time);
                if wm.saturating_sub(req.event_time) > cfg.allowed_lateness_millis {
                    self.counters.expired += 1;
                    return Ok(Some(self.expired(&req, 0, ExpiryReason::TooLate, now)));
                }
                c
            }
            _ => own,
        };
        let scorer = self.window_builtin_scorer(&req.segment, window);
        // A new segment needs no record yet: restore derives its windows
        // from the queue, and an empty record is the default.
        let segment = match self.segments.get_mut(&req.segment) {
            Some(s) => s,
            None => self.segments.entry(req.segment.clone()).or_default(),
        };
        segment.changed_windows.insert(window);
        segment.enlist(&self.config, scorer, window, offset, &req);
        let user = self.users.hold(&req.user);
        let slot = self.requests.insert(Pending {
            request: req,
            user,
            offset,
            window,
            windows: 0,
        });
        segment
            .windows
            .entry(window)
            .or_default()
            .insert(offset, slot);
        Ok(None)
    }

    /// Takes one outcome event (feedback topic, offset order). The first
    /// outcome of a known match with event time ≤ its deadline joins: the
    /// bandit gets its reward and the sample is returned; any other is
    /// counted and dropped. A refused outcome changes nothing: the caller
    /// dead-letters it (and calls `record_dead_letter`).
    pub fn ingest_outcome(
        &mut self,
        outcome: MatchOutcome,
        now: i64,
    ) -> Result<OutcomeFate, OutcomeError> {
        let Some(feedback) = self.config.feedback else {
            return Err(OutcomeError::NoFeedback);
        };
        if outcome.event_time.abs() > MAX_ABS_EVENT_TIME {
            return Err(OutcomeError::EventTimeOutOfRange(outcome.event_time));
        }
        if let Some(j) = self.joins.get(&outcome.match_id) {
            if j.segment != outcome.segment {
                return Err(OutcomeError::SegmentMismatch {
                    match_id: outcome.match_id,
                    expected: j.segment.clone(),
                    got: outcome.segment,
                });
            }
        }
        self.outcome_clock
            .observe(outcome.event_time, now, self.config.out_of_order_millis);
        self.counters.outcomes += 1;
        // A match whose deadline the partition's event time has passed is
        // gone, even if `settle_feedback` has not dropped it yet: what joins
        // depends on the record order only, not on when the caller settles.
        let now_event_time = self.feedback_watermark();
        let Some(j) = self
            .joins
            .get(&outcome.match_id)
            .filter(|j| now_event_time.is_none_or(|wm| j.deadline(feedback.ttl_millis) >= wm))
        else {
            self.counters.outcomes_unknown += 1;
            return Ok(OutcomeFate::Unknown);
        };
        if outcome.event_time > j.deadline(feedback.ttl_millis) {
            self.counters.outcomes_late += 1;
            return Ok(OutcomeFate::Late);
        }
        if j.joined {
            self.counters.outcomes_duplicate += 1;
            return Ok(OutcomeFate::Duplicate);
        }
        let (reward, label) = feedback.judge(&outcome);
        let (segment, scorer) = (j.segment.clone(), j.scorer.clone());
        let id = outcome.match_id.clone();
        let sample = j.sample(&id, self.partition, Some((outcome, reward, label)));
        self.joins.mark_joined(&id);
        self.dirty.insert(Dirty::Join(id));
        self.record_reward(&segment, &scorer, reward);
        self.counters.joined += 1;
        Ok(OutcomeFate::Joined(Box::new(sample)))
    }

    /// Drops the matches whose deadline the partition's event time has
    /// passed — the later of the request and outcome watermarks (each with
    /// its idle rule) — and returns a `noOutcome` sample for each that never
    /// joined.
    pub fn settle_feedback(&mut self, now: i64) -> Vec<FeedbackSample> {
        if self.joins.is_empty() {
            return Vec::new();
        }
        let c = &self.config;
        self.outcome_clock
            .apply_idle(now, c.idle_millis, c.out_of_order_millis);
        self.apply_idle(now);
        let Some(watermark) = self.feedback_watermark() else {
            return Vec::new();
        };
        let mut samples = Vec::new();
        for (id, j) in self.joins.expire(watermark) {
            if !j.joined {
                self.counters.no_outcome += 1;
                samples.push(j.sample(&id, self.partition, None));
            }
            self.dirty.insert(Dirty::Join(id));
        }
        samples
    }

    /// The partition's event time for the join: the later of the request
    /// and outcome watermarks.
    fn feedback_watermark(&self) -> Option<i64> {
        match (self.clock.watermark, self.outcome_clock.watermark) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Counts a record the caller sent to the dead-letter topic.
    pub fn record_dead_letter(&mut self) {
        self.counters.dead_lettered += 1;
    }

    /// Feeds a reward in [0, 1] for `scorer` in `segment` to the bandit.
    /// False (and nothing recorded) for a scorer not configured or a NaN.
    pub fn record_reward(&mut self, segment: &str, scorer: &str, reward: f64) -> bool {
        if !self.config.scorers.iter().any(|s| s.name == scorer) || reward.is_nan() {
            return false;
        }
        let seg = self.segments.entry(segment.to_string()).or_default();
        seg.record
            .arms
            .entry(scorer.to_string())
            .or_default()
            .reward(reward);
        self.dirty.insert(Dirty::Segment(segment.to_string()));
        true
    }

    /// The windows that `close(now)` will close, oldest first, with the
    /// scorer the bandit chose for each (the choice is kept for `close`).
    /// Windows that only come into being during `close` (leftovers carried
    /// into a window that is itself due) are not listed: if their scorer is
    /// HTTP they fall back to a builtin one.
    pub fn due(&mut self, now: i64) -> Vec<DueWindow> {
        let Some(wm) = self.apply_idle(now) else {
            return Vec::new();
        };
        let w = self.config.window_millis;
        let mut due: Vec<(i64, String)> = Vec::new();
        for (name, seg) in &self.segments {
            for &start in seg.windows.keys() {
                if start + w > wm {
                    break;
                }
                due.push((start, name.clone()));
            }
        }
        due.sort();
        due.into_iter()
            .map(|(start, segment)| {
                let (taking, _) = self.participants(&segment, start);
                let participants: Vec<&Pending> = taking
                    .iter()
                    .filter_map(|&s| self.requests.get(s))
                    .collect();
                let ids: Vec<String> = participants
                    .iter()
                    .map(|p| p.request.request_id.clone())
                    .collect();
                let vectors: Vec<Vec<f32>> = participants
                    .iter()
                    .map(|p| p.request.vector.clone())
                    .collect();
                let scorer = self.choose_scorer(&segment, start);
                let http = match &self.config.scorers[scorer].kind {
                    ScorerKind::Http {
                        url,
                        timeout_millis,
                    } => Some(HttpScoring {
                        url: url.clone(),
                        timeout_millis: *timeout_millis,
                        request_ids: ids.clone(),
                        vectors,
                    }),
                    ScorerKind::Builtin(_) => None,
                };
                DueWindow {
                    id: WindowId {
                        digest: window_digest(ids.iter().map(String::as_str)),
                        segment,
                        start,
                    },
                    end: start + w,
                    scorer: self.config.scorers[scorer].name.clone(),
                    http,
                }
            })
            .collect()
    }

    /// Closes every window due at `now` (oldest first; a window made due by
    /// leftovers carried into it closes in the same call) and returns the
    /// results. `external` holds HTTP scorers' answers by the ids `due` gave;
    /// a window whose answer is missing or does not fit is scored by the
    /// first builtin scorer (or cosine), and its results name that scorer.
    pub fn close(&mut self, now: i64, external: &HashMap<WindowId, Vec<f32>>) -> Vec<MatchResult> {
        let Some(wm) = self.apply_idle(now) else {
            return Vec::new();
        };
        let w = self.config.window_millis;
        let first_due = |seg: &Segment| seg.windows.keys().next().copied().filter(|&s| s + w <= wm);
        let mut queue: BTreeSet<(i64, String)> = self
            .segments
            .iter()
            .filter_map(|(name, seg)| first_due(seg).map(|s| (s, name.clone())))
            .collect();
        let mut results = Vec::new();
        while let Some((start, segment)) = queue.pop_first() {
            // Normally `prescore` did this since the last close; a window
            // whose carried requests are not members yet is scored whole.
            self.enlist_carried();
            self.close_window(&segment, start, now, external, &mut results);
            if let Some(next) = self.segments.get(&segment).and_then(first_due) {
                queue.insert((next, segment));
            }
        }
        for until in self.cooldowns.expire(&mut self.users, wm) {
            self.dirty.insert(Dirty::Cooldowns(until));
        }
        results
    }

    /// The changelog delta since the last call, one entry per key, in a
    /// deterministic order (queues, then segments, cooldowns and joins each
    /// by key, then the meta record): upserts of what changed and still
    /// exists, tombstones of what was written before and is gone.
    pub fn take_changes(&mut self) -> Vec<(String, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        let mut queues = Vec::new();
        for (name, seg) in self.segments.iter_mut() {
            for start in std::mem::take(&mut seg.changed_windows) {
                let value = seg.queue_record(start, &self.requests).map(|q| encode(&q));
                queues.push((queue_key(name, start), value));
            }
        }
        for (key, value) in queues {
            self.push_change(&mut out, key, value);
        }
        for d in std::mem::take(&mut self.dirty) {
            match d {
                Dirty::Segment(name) => {
                    if let Some(seg) = self.segments.get(&name) {
                        out.push((segment_key(&name), Some(encode(&seg.record))));
                    }
                }
                Dirty::Cooldowns(until) => {
                    let users = &self.users;
                    let listed = self.cooldowns.listed(until);
                    let named = listed.map(|(a, b)| (users.name(a), users.name(b)));
                    let chunks = encode_cooldown_list(until, named);
                    let before = self.cooldown_chunks.remove(&until).unwrap_or(0);
                    for chunk in chunks.len()..before {
                        out.push((cooldown_list_key(until, chunk), None));
                    }
                    if !chunks.is_empty() {
                        self.cooldown_chunks.insert(until, chunks.len());
                    }
                    for (chunk, value) in chunks.into_iter().enumerate() {
                        out.push((cooldown_list_key(until, chunk), Some(value)));
                    }
                }
                Dirty::Retired(key) => self.push_change(&mut out, key, None),
                Dirty::Join(id) => {
                    let value = self.joins.get(&id).map(encode);
                    self.push_change(&mut out, join_key(&id), value);
                }
            }
        }
        let meta = encode(&MetaRecord {
            clock: self.clock.clone(),
            counters: self.counters.clone(),
            outcome_clock: self.outcome_clock.clone(),
        });
        if self.last_meta.as_ref() != Some(&meta) {
            self.last_meta = Some(meta.clone());
            out.push((META_KEY.to_string(), Some(meta)));
        }
        out
    }

    /// Scores the requests that arrived since the last call against their
    /// open windows ([`crate::matching::prescore`]): the work a window's
    /// close would otherwise do, done while it fills. A no-op for pipelines
    /// whose windows get their scorer only at the close.
    pub fn prescore(&mut self) {
        self.forget_settled();
        self.enlist_carried();
        let min = min_score_f32(self.config.min_score);
        let from = self.config.prescore_from;
        let (w, newest) = (self.config.window_millis, self.clock.max_event_time);
        for seg in self.segments.values_mut() {
            for (&start, window) in seg.prescored.iter_mut() {
                window.score_new(min, from);
                // Event time is past the window's end: it closes within the
                // out-of-order bound and takes only stragglers till then.
                // Its lists are cut and its edges sorted now rather than at
                // the close (doing it after every read would cost more than
                // the close saves).
                if newest.is_some_and(|t| t >= start.saturating_add(w)) {
                    window.presort();
                }
            }
        }
    }

    /// Forgets the ids of the requests the last close settled (see `settled`).
    fn forget_settled(&mut self) {
        for p in self.settled.drain(..) {
            self.requests.forget(&p.request.request_id);
        }
    }

    /// Enters the requests carried into windows by earlier closes into
    /// those windows' prescoring (see `Segment::carried_in`).
    fn enlist_carried(&mut self) {
        let (config, requests) = (&self.config, &self.requests);
        for seg in self.segments.values_mut() {
            let mut carried_in = std::mem::take(&mut seg.carried_in);
            for &(start, offset, scorer) in &carried_in {
                let pending = seg
                    .windows
                    .get(&start)
                    .and_then(|members| members.get(&offset))
                    .and_then(|&slot| requests.get(slot));
                if let Some(p) = pending {
                    seg.enlist(config, Some(scorer), start, offset, &p.request);
                }
            }
            carried_in.clear();
            seg.carried_in = carried_in;
        }
    }

    /// Windows this engine closed since it was made or restored.
    pub fn windows_closed(&self) -> u64 {
        self.windows_closed
    }

    /// Of [`Self::windows_closed`], those matched from prescored lists.
    pub fn windows_prescored(&self) -> u64 {
        self.windows_prescored
    }

    /// Of the prescored windows, those matched from edges sorted before their close.
    pub fn windows_presorted(&self) -> u64 {
        self.windows_presorted
    }

    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.counters.to_map()
    }

    pub fn watermark(&self) -> Option<i64> {
        self.clock.watermark
    }

    /// Requests ingested and not settled yet.
    pub fn pending(&self) -> usize {
        self.requests.len()
    }

    /// Cooldown entries held.
    pub fn cooldowns(&self) -> usize {
        self.cooldowns.len()
    }

    /// Users whose ids are held: by a pending request or a cooldown.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// The bandit's posteriors: ((segment, scorer), evidence).
    pub fn arm_evidence(&self) -> Vec<((String, String), ArmStats)> {
        self.segments
            .iter()
            .flat_map(|(segment, s)| {
                s.record
                    .arms
                    .iter()
                    .map(move |(scorer, arm)| ((segment.clone(), scorer.clone()), arm.clone()))
            })
            .collect()
    }

    /// Matches waiting for their outcome's deadline.
    pub fn awaiting_outcome(&self) -> usize {
        self.joins.len()
    }

    fn push_change(
        &mut self,
        out: &mut Vec<(String, Option<Vec<u8>>)>,
        key: String,
        value: Option<Vec<u8>>,
    ) {
        match value {
            Some(v) => {
                self.persisted.insert(key.clone());
                out.push((key, Some(v)));
            }
            None => {
                if self.persisted.remove(&key) {
                    out.push((key, None));
                }
            }
        }
    }

    fn apply_idle(&mut self, now: i64) -> Option<i64> {
        let c = &self.config;
        self.clock
            .apply_idle(now, c.idle_millis, c.out_of_order_millis);
        self.clock.watermark
    }

    /// The slots of the requests of a window that take part (one per user:
    /// the one that waited most windows, then the earliest), in ingest
    /// order, and of the ones held back for a later window.
    fn participants(&self, segment: &str, start: i64) -> (Vec<Slot>, Vec<Slot>) {
        let members = self
            .segments
            .get(segment)
            .and_then(|s| s.windows.get(&start))
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|&slot| Some((slot, self.requests.get(slot)?)));
        let all: Vec<(Slot, &Pending)> = members.collect();
        // Each user's taking request, by index into `all`.
        let mut best: FastMap<UserId, usize> = FastMap::default();
        best.reserve(all.len());
        for (i, (_, p)) in all.iter().enumerate() {
            let b = best.entry(p.user).or_insert(i);
            if p.windows > all[*b].1.windows {
                *b = i;
            }
        }
        let mut takes = vec![false; all.len()];
        for &i in best.values() {
            takes[i] = true;
        }
        let (mut taking, mut held) = (Vec::with_capacity(best.len()), Vec::new());
        for ((slot, _), takes) in all.into_iter().zip(takes) {
            if takes {
                taking.push(slot);
            } else {
                held.push(slot);
            }
        }
        (taking, held)
    }

    /// The builtin scorer of window `start` (chosen now if it has none yet);
    /// None when it is an HTTP scorer.
    fn window_builtin_scorer(&mut self, segment: &str, start: i64) -> Option<BuiltinScorer> {
        let i = self.choose_scorer(segment, start);
        match self.config.scorers[i].kind {
            ScorerKind::Builtin(b) => Some(b),
            ScorerKind::Http { .. } => None,
        }
    }

    /// The scorer for a window: the one already chosen for it, else a fresh
    /// Thompson draw, remembered until the window closes. Called when the
    /// window opens (its first request, or leftovers carried into it), so
    /// that a builtin scorer's window can be scored while it fills.
    fn choose_scorer(&mut self, segment: &str, start: i64) -> usize {
        let scorers = &self.config.scorers;
        if scorers.len() == 1 {
            return 0;
        }
        let seg = match self.segments.get_mut(segment) {
            Some(s) => s,
            None => self.segments.entry(segment.to_string()).or_default(),
        };
        if let Some(i) = seg
            .record
            .chosen
            .get(&start)
            .and_then(|name| scorers.iter().position(|s| s.name == *name))
        {
            return i;
        }
        let arms: Vec<ArmStats> = scorers
            .iter()
            .map(|s| seg.record.arms.get(&s.name).cloned().unwrap_or_default())
            .collect();
        let i = bandit::choose(&arms, bandit::seed(self.partition, segment, start));
        seg.record.chosen.insert(start, scorers[i].name.clone());
        self.dirty.insert(Dirty::Segment(segment.to_string()));
        i
    }

    fn close_window(
        &mut self,
        segment: &str,
        start: i64,
        now: i64,
        external: &HashMap<WindowId, Vec<f32>>,
        results: &mut Vec<MatchResult>,
    ) {
        let end = start + self.config.window_millis;
        self.windows_closed += 1;
        let (taking, held_back) = self.participants(segment, start);
        let scorer = self.choose_scorer(segment, start);
        let mut prescored = self
            .segments
            .get_mut(segment)
            .and_then(|s| s.prescored.remove(&start));

        let pairs = {
            let pending: Vec<&Pending> = taking
                .iter()
                .filter_map(|&s| self.requests.get(s))
                .collect();
            let reqs: Vec<&MatchRequest> = pending.iter().map(|p| &p.request).collect();
            let users: Vec<UserId> = pending.iter().map(|p| p.user).collect();
            let offsets: Vec<i64> = pending.iter().map(|p| p.offset).collect();
            let window = WindowMembers {
                offsets: &offsets,
                reqs: &reqs,
                users: &users,
                prescored: prescored.as_mut(),
            };
            self.score_and_match(segment, start, window, scorer, external)
        };
        let (scorer_name, pairs, seeded) = pairs;
        self.windows_prescored += u64::from(seeded != Seeded::No);
        self.windows_presorted += u64::from(seeded == Seeded::Presorted);
        if let (Some(seg), Some(window)) = (self.segments.get_mut(segment), prescored) {
            seg.spare = Some(window);
        }

        // Every participant and held-back request is a member of this
        // window, whose list goes as a whole below: settling one here only
        // takes it out of its slot.
        let mut matched = vec![false; taking.len()];
        // The window's matches share one cooldown deadline (and list).
        let until = end.saturating_add(self.config.cooldown_millis);
        let mut listed = false;
        let match_ids = MatchIds::new(segment, start);
        for pair in &pairs {
            matched[pair.i as usize] = true;
            matched[pair.j as usize] = true;
            let (Some(a), Some(b)) = (
                self.requests.settle(taking[pair.i as usize]),
                self.requests.settle(taking[pair.j as usize]),
            ) else {
                continue;
            };
            listed |= self
                .cooldowns
                .insert(&mut self.users, a.user, b.user, until);
            self.users.release(a.user);
            self.users.release(b.user);
            self.counters.matched += 1;
            let window = (segment, start, end);
            let result = self.matched(&match_ids, window, &scorer_name, pair.score, [a, b], now);
            self.await_outcome(&result);
            results.push(result);
        }

        if listed {
            self.dirty.insert(Dirty::Cooldowns(until));
        }

        let leftovers = taking
            .iter()
            .zip(&matched)
            .filter(|(_, &m)| !m)
            .map(|(&slot, _)| slot)
            .chain(held_back);
        let mut carried = Vec::new();
        for slot in leftovers {
            let max_wait = self.config.max_wait_windows;
            let Some(p) = self.requests.get_mut(slot) else {
                continue;
            };
            p.windows += 1;
            if p.windows < max_wait {
                p.window = end;
                carried.push((p.offset, slot));
            } else if let Some(p) = self.requests.remove(slot) {
                self.users.release(p.user);
                self.counters.expired += 1;
                results.push(self.expired(&p.request, p.windows, ExpiryReason::NoPartner, now));
            }
        }

        let next_scorer = match carried.is_empty() {
            true => None,
            false => self.window_builtin_scorer(segment, end),
        };
        let seg = self.segments.entry(segment.to_string()).or_default();
        seg.windows.remove(&start);
        if let Some(scorer) = next_scorer {
            let carried_in = carried.iter().map(|&(offset, _)| (end, offset, scorer));
            seg.carried_in.extend(carried_in);
        }
        if !carried.is_empty() {
            seg.windows.entry(end).or_default().extend(carried);
        }
        seg.changed_windows.insert(start);
        seg.changed_windows.insert(end);
        seg.record.chosen.remove(&start);
        seg.record.closed_until = Some(seg.record.closed_until.map_or(end, |c| c.max(end)));
        self.dirty.insert(Dirty::Segment(segment.to_string()));
    }

    /// Scores the window with its scorer and matches it; returns the name of
    /// the scorer actually used.
    fn score_and_match(
        &self,
        segment: &str,
        start: i64,
        window: WindowMembers<'_>,
        scorer: usize,
        external: &HashMap<WindowId, Vec<f32>>,
    ) -> (String, Vec<Pair>, Seeded) {
        let WindowMembers {
            offsets,
            reqs,
            users,
            prescored,
        } = window;
        let n = reqs.len();
        let spec = &self.config.scorers[scorer];
        let builtin = |b: BuiltinScorer| -> Option<Scores<'static>> {
            let mut data = Vec::with_capacity(n * self.config.dimension);
            for r in reqs {
                data.extend_from_slice(&r.vector);
            }
            FeatureMatrix::from_vec(data, self.config.dimension)
                .ok()
                .map(|m| Scores::builtin(m, b))
        };
        let (name, scores) = match &spec.kind {
            ScorerKind::Builtin(b) => (spec.name.clone(), builtin(*b)),
            ScorerKind::Http { .. } => {
                let id = WindowId {
                    segment: segment.to_string(),
                    start,
                    digest: window_digest(reqs.iter().map(|r| r.request_id.as_str())),
                };
                match external.get(&id).and_then(|s| Scores::external(n, s)) {
                    Some(s) => (spec.name.clone(), Some(s)),
                    None => {
                        let (name, b) = self.config.fallback_scorer();
                        (name, builtin(b))
                    }
                }
            }
        };
        // Vectors were validated on ingest and restore, so `scores` is set;
        // if not, nobody is matched rather than anyone on garbage.
        let Some(scores) = scores else {
            return (name, Vec::new(), Seeded::No);
        };
        // Prescored lists are only for the scorer they were scored with.
        let used = match &spec.kind {
            ScorerKind::Builtin(b) => Some(*b),
            ScorerKind::Http { .. } => None,
        };
        let mut prescored = prescored.zip(used).and_then(|(window, b)| {
            let members = window.members_of(b, offsets)?;
            Some((window, members))
        });
        let blocked = self.cooldowns.blocked(users, start);
        let filter = match &prescored {
            Some((window, members)) => window.filter(members, blocked),
            None => WindowFilter::new(reqs, users, blocked),
        };
        let pairs = WindowPairs {
            filter,
            scores,
            len: n,
        };
        let params = MatchParams {
            min_score: self.config.min_score,
            exact_below: self.config.exact_below,
            top_k: self.config.top_k,
        };
        let mut seeded = Seeded::No;
        let seeds = || {
            let (window, members) = prescored.as_mut()?;
            let min = min_score_f32(self.config.min_score);
            let seeds = window.seeds(min, members, |p, q| pairs.filter.in_cooldown(p, q));
            seeded = match seeds.sorted {
                true => Seeded::Presorted,
                false => Seeded::Lists,
            };
            Some(seeds)
        };
        let matched = match_window_seeded(&pairs, &params, seeds);
        (name, matched, seeded)
    }

    /// Starts the feedback join of a match, when the pipeline has one.
    fn await_outcome(&mut self, result: &MatchResult) {
        let (
            Some(f),
            MatchResult::Matched {
                match_id,
                segment,
                window_end,
                scorer,
                score,
                users,
                ..
            },
        ) = (self.config.feedback, result)
        else {
            return;
        };
        let record = JoinRecord {
            segment: segment.clone(),
            scorer: scorer.clone(),
            score: *score,
            window_end: *window_end,
            users: [users[0].user.clone(), users[1].user.clone()],
            joined: false,
        };
        self.joins.insert(match_id.clone(), record, f.ttl_millis);
        self.dirty.insert(Dirty::Join(match_id.clone()));
    }

    fn matched(
        &mut self,
        ids: &MatchIds,
        (segment, start, end): (&str, i64, i64),
        scorer: &str,
        score: f32,
        [mut a, mut b]: [Pending; 2],
        now: i64,
    ) -> MatchResult {
        let match_id = ids.of(&a.request.request_id, &b.request.request_id);
        // The requests are settled: their users' names move into the
        // result, the rest waits for `forget_settled`.
        let side = |p: &mut Pending| MatchedUser {
            request_id: p.request.request_id.clone(),
            user: std::mem::take(&mut p.request.user),
            event_time: p.request.event_time,
        };
        let mut users = [side(&mut a), side(&mut b)];
        self.settled.extend([a, b]);
        users.sort_by(|x, y| (&x.user, &x.request_id).cmp(&(&y.user, &y.request_id)));
        MatchResult::Matched {
            match_id,
            segment: segment.to_string(),
            window_start: start,
            window_end: end,
            partition: self.partition,
            scorer: scorer.to_string(),
            score,
            users,
            closed_at: now,
        }
    }

    fn expired(
        &self,
        r: &MatchRequest,
        windows: u32,
        reason: ExpiryReason,
        now: i64,
    ) -> MatchResult {
        MatchResult::Expired {
            request_id: r.request_id.clone(),
            user: r.user.clone(),
            segment: r.segment.clone(),
            partition: self.partition,
            event_time: r.event_time,
            windows,
            reason,
            closed_at: now,
        }
    }
}

/// What the engine requires of a request beyond the wire format's rules.
fn check_request(r: &MatchRequest, dimension: usize) -> Result<(), IngestError> {
    r.validate(dimension)?;
    if r.event_time.abs() > MAX_ABS_EVENT_TIME {
        return Err(IngestError::EventTimeOutOfRange(r.event_time));
    }
    Ok(())
}

/// Hash of a window's request ids in order.
fn window_digest<'a>(ids: impl Iterator<Item = &'a str>) -> u64 {
    ids.fold(Digest::new(), |d, id| d.str(id)).finish64()
}
