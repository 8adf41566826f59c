//! The backlog lane (DESIGN.md §5.3): `spec.backlog` renders a bounded range
//! of old messages on a second consumer group, sized to finish just before
//! `finishBy` rather than as fast as possible (Tinder's cost smoothing).
//! Pure rules only: the range capture, the consumer group seeding, progress,
//! the rate estimate, the sizing, the ETA and the lane's plan. `plan` calls
//! [`plan_lane`]; `act` makes the seeding commits before it creates pods.
//!
//! The lifecycle:
//! 1. **Capture** (once): `end` = where the live lane is (its committed
//!    offset; the high watermark where it never committed), `start` =
//!    `fromOffset` clamped into `[low, end]`, or the first offset at or after
//!    `fromTimestamp` (`end` where no message is that recent).
//! 2. **Seed** (once, before any worker pod is created): the live group at
//!    `end` and the backlog group at `start`, for partitions where they have
//!    no commit yet, so the two lanes never overlap.
//! 3. **Run**: progress from the backlog group's committed offsets, a rate per
//!    worker from how `done` moves between reconciles, replicas sized to the
//!    deadline, partitions with an unfinished range assigned to Ready slots.
//! 4. **Finish**: pods deleted, lane dropped, the status stays with
//!    `finished: true`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use matchfleet_api::progress::ProgressStatus;
use matchfleet_api::render_job::{BacklogSpec, BacklogStatus};
use matchfleet_api::RenderJob;

use crate::assign::{self, SlotAssignment};
use crate::conditions::{parse_time, rfc3339, rfc3339_millis};
use crate::duration::format_millis;
use crate::kafka::{BacklogOffsets, BacklogQuery, KafkaObservation, TopicOffsets, TopicState};
use crate::names::{self, LANE_BACKLOG};
use crate::observe::WorkerPod;
use crate::plan::PlannedEvent;
use crate::resources::Owner;

/// The sizing aims to finish this far through the window from the start of
/// the backlog to `finishBy`: the last fifth is the margin that absorbs a
/// wrong estimate, a slow pod start or a burst of failures.
pub const TARGET_FRACTION: f64 = 0.8;
/// Once past the target with work left, aim for this fraction of the time
/// still left before `finishBy` (so the lane grows smoothly instead of
/// jumping to `maxReplicas` the moment the target passes).
pub const LATE_FRACTION: f64 = 0.5;
/// Scale down only when one fewer worker would still finish within this
/// fraction of the usable time (a band, so the count does not flap around
/// the exact need).
pub const SCALE_DOWN_BAND: f64 = 0.9;
/// Scale down at most this often (scale up at once).
pub const SCALE_DOWN_EVERY_MILLIS: i64 = 15_000;
/// The weight of a new rate sample in the exponentially weighted average.
pub const RATE_WEIGHT: f64 = 0.5;
/// A rate sample spans at least this long: reconciles triggered by pod
/// events in between keep the older sample as the base.
pub const MIN_SAMPLE_MILLIS: i64 = 2_000;
/// Workers before there is a rate: one, measured and then sized...
pub const START_REPLICAS: i32 = 1;
/// ...or two when less than [`QUICK_WINDOW_SECS`] are usable, because the
/// first estimate takes two reconciles with working workers (6-10 s).
pub const QUICK_START_REPLICAS: i32 = 2;
pub const QUICK_WINDOW_SECS: f64 = 60.0;
/// The ETA follows the sizing forward in steps of the reconcile pace.
const ETA_STEP_SECS: f64 = 3.0;
const ETA_MAX_STEPS: usize = 10_000;

/// What the observe step must read for the backlog: the backlog group's
/// offsets while the lane runs, and the offsets at `fromTimestamp` until
/// the range is captured. `None` without a backlog, or once it finished.
pub fn query(job: &RenderJob, owner: &Owner) -> Option<BacklogQuery> {
    let spec = job.spec.backlog.as_ref()?;
    let prev = job.status.as_ref().and_then(|s| s.backlog.as_ref());
    if prev.is_some_and(|b| b.finished) {
        return None;
    }
    let captured = prev.and_then(Range::from_status).is_some();
    let from_time_millis = match (&spec.from_timestamp, captured) {
        (Some(t), false) => parse_time(t).map(|t| t.as_millisecond()),
        _ => None,
    };
    Some(BacklogQuery {
        group: names::consumer_group(&owner.namespace, &owner.name, LANE_BACKLOG),
        from_time_millis,
    })
}

/// The bounded range: per partition, `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Range {
    pub start: BTreeMap<i32, i64>,
    pub end: BTreeMap<i32, i64>,
}

/// Where the range starts, from the spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RangeStart<'a> {
    /// `fromOffset`, the same on every partition.
    Offset(i64),
    /// `fromTimestamp`: partition -> the first offset at or after it, `None`
    /// where no message is that recent.
    Time(&'a BTreeMap<i32, Option<i64>>),
}

impl Range {
    /// Messages in the range.
    pub fn total(&self) -> i64 {
        self.end
            .iter()
            .map(|(p, e)| (e - self.start.get(p).copied().unwrap_or(*e)).max(0))
            .fold(0, i64::saturating_add)
    }

    /// The range a status holds, if it was captured (partition keys that
    /// are not numbers are ignored: the status is user-writable).
    pub fn from_status(b: &BacklogStatus) -> Option<Range> {
        let parse = |m: &BTreeMap<String, i64>| -> BTreeMap<i32, i64> {
            m.iter()
                .filter_map(|(p, o)| Some((p.parse().ok()?, *o)))
                .collect()
        };
        let end = parse(&b.end);
        if end.is_empty() {
            return None;
        }
        let start = parse(&b.start);
        Some(Range { start, end })
    }

    fn to_status(m: &BTreeMap<i32, i64>) -> BTreeMap<String, i64> {
        m.iter().map(|(p, o)| (p.to_string(), *o)).collect()
    }

    /// `[start, end)` of a partition (empty for one not in the range).
    pub fn bounds(&self, partition: i32) -> (i64, i64) {
        let end = self.end.get(&partition).copied().unwrap_or(0);
        let start = self.start.get(&partition).copied().unwrap_or(end).min(end);
        (start, end)
    }
}

/// Captures the range. `end` is where the live lane is: its committed offset
/// (at least the log start, where the live lane would begin), the high
/// watermark where it never committed; so a backlog added to a running job
/// covers what the live lane will not read, and for a new job the live lane
/// starts exactly where the range ends. `start` is clamped into
/// `[low, end]`. `None` when an offset at `fromTimestamp` is missing.
pub fn capture(from: RangeStart, offsets: &TopicOffsets) -> Option<Range> {
    let mut range = Range::default();
    for (&p, &(low, high)) in &offsets.watermarks {
        let end = match offsets.live_committed.get(&p) {
            Some(&c) => high.min(c.max(low)),
            None => high,
        };
        let wanted = match from {
            RangeStart::Offset(o) => o,
            RangeStart::Time(found) => found.get(&p).copied()?.unwrap_or(end),
        };
        let start = wanted.max(low).min(end);
        range.start.insert(p, start);
        range.end.insert(p, end);
    }
    Some(range)
}

/// The commits that start the lanes: partition -> offset per group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Seeds {
    /// The live group starts at `end` where it never committed.
    pub live: BTreeMap<i32, i64>,
    /// The backlog group starts at `start` where it never committed, or
    /// where its commit lies outside the range (left by an earlier backlog).
    pub backlog: BTreeMap<i32, i64>,
}

pub fn seeds(
    range: &Range,
    live_committed: &BTreeMap<i32, i64>,
    backlog_committed: &BTreeMap<i32, i64>,
) -> Seeds {
    let mut s = Seeds::default();
    for &p in range.end.keys() {
        let (start, end) = range.bounds(p);
        if !live_committed.contains_key(&p) {
            s.live.insert(p, end);
        }
        let inside = backlog_committed
            .get(&p)
            .is_some_and(|c| (start..=end).contains(c));
        if !inside {
            s.backlog.insert(p, start);
        }
    }
    s
}

/// Messages of one partition's range that are done: up to the backlog
/// group's committed offset, or the log start if retention removed more
/// (those can never be rendered; like dead-lettered and failed ones, they
/// count as finished). Committed offsets are in order, so this is exact.
pub fn partition_done(start: i64, end: i64, committed: Option<i64>, low: Option<i64>) -> i64 {
    let size = (end - start).max(0);
    let at = committed.unwrap_or(start).max(low.unwrap_or(i64::MIN));
    (at.min(end) - start).clamp(0, size)
}

/// Progress over the whole range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    pub done: i64,
    /// Partitions with messages of the range left, in order.
    pub unfinished: Vec<i32>,
}

pub fn progress(
    range: &Range,
    committed: &BTreeMap<i32, i64>,
    watermarks: Option<&BTreeMap<i32, (i64, i64)>>,
) -> Progress {
    let mut out = Progress::default();
    for &p in range.end.keys() {
        let (start, end) = range.bounds(p);
        let low = watermarks.and_then(|w| w.get(&p)).map(|(low, _)| *low);
        let done = partition_done(start, end, committed.get(&p).copied(), low);
        out.done = out.done.saturating_add(done);
        if done < end - start {
            out.unfinished.push(p);
        }
    }
    out
}

/// One rate sample: `done` at a time, with how many workers were at it.
/// `done` is `None` for the first sample after the workers changed: the
/// interval that follows it still has their start (consumers connecting,
/// first renders) in it, so it only leads to the base of the next one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub done: Option<i64>,
    pub at_millis: i64,
    pub workers: i32,
}

/// The next rate estimate (tasks per second per worker) and the sample to
/// keep. An interval counts only if the same number of workers (> 0) held
/// the partitions through it and through the interval before it, and it is
/// at least [`MIN_SAMPLE_MILLIS`] long: intervals where workers started,
/// stopped or handed partitions over say nothing about a steady worker's
/// pace. `now.done` is the `done` observed now.
pub fn next_rate(prev: Option<Sample>, rate: Option<f64>, now: Sample) -> (Sample, Option<f64>) {
    let steady =
        |p: &Sample| p.workers == now.workers && now.workers > 0 && now.at_millis >= p.at_millis;
    match prev {
        Some(p) if steady(&p) => {
            let millis = now.at_millis - p.at_millis;
            if millis < MIN_SAMPLE_MILLIS {
                return (p, rate);
            }
            let (Some(before), Some(after)) = (p.done, now.done) else {
                // The end of the start-up interval: the base of the next.
                return (now, rate);
            };
            let secs = millis as f64 / 1000.0;
            let measured = (after - before).max(0) as f64 / secs / f64::from(now.workers);
            let next = match rate {
                Some(r) => RATE_WEIGHT * measured + (1.0 - RATE_WEIGHT) * r,
                None => measured,
            };
            (now, Some(next))
        }
        _ => (Sample { done: None, ..now }, rate),
    }
}

/// Why the sizing chose a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The range is done.
    Finished,
    /// No rate measured yet: the start value (or the count already running).
    NoRate,
    /// `finishBy` has passed: as many as allowed.
    DeadlinePassed,
    /// Workers measured as doing nothing: as many as allowed.
    Stalled,
    /// From the measured rate, the remaining work and the usable time.
    Rate,
}

/// Inputs of [`size`]. Times in milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizingInput {
    pub remaining: i64,
    /// Partitions with an unfinished range: more workers than that idle.
    pub unfinished: i32,
    pub max_replicas: i32,
    /// The count wanted so far (0 when the backlog starts).
    pub current: i32,
    /// Tasks per second per worker.
    pub rate: Option<f64>,
    pub now: i64,
    pub target: i64,
    pub finish_by: i64,
    pub last_scale: Option<i64>,
}

/// Seconds the sizing plans with: until the target, or once past it
/// [`LATE_FRACTION`] of the time left before `finishBy`.
pub fn usable_secs(now: i64, target: i64, finish_by: i64) -> f64 {
    let to_target = (target - now) as f64 / 1000.0;
    let left = (finish_by - now) as f64 / 1000.0;
    to_target.max(LATE_FRACTION * left)
}

/// The target of a backlog started at `started`: [`TARGET_FRACTION`] of the
/// way to `finish_by` (`finish_by` itself if that already passed).
pub fn target_millis(started: i64, finish_by: i64) -> i64 {
    if finish_by <= started {
        return finish_by;
    }
    started + ((finish_by - started) as f64 * TARGET_FRACTION) as i64
}

/// Backlog replicas: `clamp(ceil(remaining / (rate × usable)), 1,
/// min(maxReplicas, unfinished partitions))`, up at once; down only when the
/// smaller count still finishes within [`SCALE_DOWN_BAND`] of the usable
/// time, at most every [`SCALE_DOWN_EVERY_MILLIS`], and never once past the
/// target (down to the unfinished partitions always). Without a rate: the
/// start value. Past `finishBy` (or with workers that do nothing): the cap.
pub fn size(i: &SizingInput) -> (i32, Why) {
    if i.remaining <= 0 || i.unfinished <= 0 {
        return (0, Why::Finished);
    }
    let cap = i.max_replicas.min(i.unfinished).max(1);
    if i.now >= i.finish_by {
        return (cap, Why::DeadlinePassed);
    }
    let usable = usable_secs(i.now, i.target, i.finish_by);
    let current = i.current.min(cap);
    let Some(rate) = i.rate else {
        if current > 0 {
            return (current, Why::NoRate);
        }
        let start = if usable < QUICK_WINDOW_SECS {
            QUICK_START_REPLICAS
        } else {
            START_REPLICAS
        };
        return (start.min(cap), Why::NoRate);
    };
    if rate.is_nan() || rate <= 0.0 {
        return (cap, Why::Stalled);
    }
    let workers_for = |time: f64| -> i32 {
        let n = (i.remaining as f64 / (rate * time)).ceil();
        if n.is_finite() {
            n.clamp(1.0, f64::from(cap)) as i32
        } else {
            cap
        }
    };
    let need = workers_for(usable);
    if need >= current {
        return (need, Why::Rate);
    }
    // Past the target the backlog is late: it only grows.
    let waited = i
        .last_scale
        .is_none_or(|t| i.now - t >= SCALE_DOWN_EVERY_MILLIS);
    if !waited || i.now >= i.target {
        return (current, Why::Rate);
    }
    let down = need.max(workers_for(SCALE_DOWN_BAND * usable));
    (down.min(current), Why::Rate)
}

/// Seconds until the range is done at `rate`, following the sizing forward
/// (so the scale-downs it will make are part of the estimate); with a
/// steady count this is `remaining / (rate × replicas)`.
pub fn eta_secs(i: &SizingInput, replicas: i32) -> Option<f64> {
    let rate = i.rate.filter(|r| *r > 0.0)?;
    if replicas <= 0 || i.remaining <= 0 {
        return None;
    }
    let mut s = SizingInput {
        current: replicas,
        ..*i
    };
    let mut left = i.remaining as f64;
    let mut n = replicas;
    let step_millis = (ETA_STEP_SECS * 1000.0) as i64;
    for step in 0..ETA_MAX_STEPS {
        let per_step = f64::from(n) * rate * ETA_STEP_SECS;
        if left <= per_step {
            return Some(step as f64 * ETA_STEP_SECS + left / (f64::from(n) * rate));
        }
        left -= per_step;
        s.now += step_millis;
        s.remaining = left.ceil() as i64;
        let (next, _) = size(&s);
        if next != n {
            s.last_scale = Some(s.now);
        }
        n = next.max(1);
        s.current = n;
    }
    // Beyond the horizon the count is taken as it is then.
    Some(ETA_MAX_STEPS as f64 * ETA_STEP_SECS + left / (f64::from(n) * rate))
}

/// Distinct workers holding backlog partitions, per the progress service.
pub fn holders(progress: &ProgressStatus) -> i32 {
    let holders: BTreeSet<&str> = progress
        .leases
        .get(LANE_BACKLOG)
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|l| l.holder.as_deref())
        .collect();
    holders.len() as i32
}

/// The rate a status holds.
pub fn parse_rate(s: Option<&str>) -> Option<f64> {
    s?.trim()
        .parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r >= 0.0)
}

fn format_rate(r: f64) -> String {
    format!("{r:.3}")
}

fn secs_text(secs: f64) -> String {
    format_millis((secs.max(0.0) * 1000.0) as u64)
}

/// What the backlog lane needs from one reconcile.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub spec: Option<&'a BacklogSpec>,
    pub prev: Option<&'a BacklogStatus>,
    pub now: Timestamp,
    pub kafka: &'a KafkaObservation,
    /// The backlog lane's pods only.
    pub pods: &'a [WorkerPod],
    pub progress: Option<&'a ProgressStatus>,
}

/// The backlog lane's part of a plan.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LanePlan {
    /// `status.backlog`.
    pub status: Option<BacklogStatus>,
    /// Backlog worker pods wanted.
    pub replicas: i32,
    /// Partition -> backlog slot; empty when the lane has nothing to do.
    pub assignment: SlotAssignment,
    /// Commits to make before any pod is created (the reconcile that
    /// captures the range).
    pub seeds: Option<Seeds>,
    pub events: Vec<PlannedEvent>,
    /// The range is not captured yet: no worker pod of either lane may start.
    pub hold: bool,
    /// The lane is working (or waiting to): poll at the fast pace.
    pub running: bool,
    /// For the Progressing condition.
    pub message: Option<String>,
    /// For the Degraded condition: the spec cannot be served as it is.
    pub problem: Option<String>,
}

/// Ready, not terminating backlog slots below `replicas`.
fn ready_slots(pods: &[WorkerPod], replicas: i32) -> Vec<i32> {
    let mut slots: Vec<i32> = pods
        .iter()
        .filter(|p| p.ready && !p.terminating)
        .filter_map(|p| p.slot.filter(|s| *s < replicas))
        .collect();
    slots.sort_unstable();
    slots.dedup();
    slots
}

/// The backlog lane's plan (not called while paused: then nothing changes).
pub fn plan_lane(i: &Inputs) -> LanePlan {
    let now = i.now;
    let now_ms = now.as_millisecond();
    let Some(spec) = i.spec else {
        // No backlog (any more): the lane goes, and with it its status.
        let mut out = LanePlan::default();
        if let Some(prev) = i.prev {
            if !prev.finished {
                out.events.push(PlannedEvent::normal(
                    "BacklogRemoved",
                    format!(
                        "spec.backlog was removed with {} of {} messages done; the backlog workers stop",
                        prev.done, prev.total
                    ),
                ));
            }
        }
        return out;
    };
    let Some(finish_by) = parse_time(&spec.finish_by) else {
        // Not started yet: no worker starts either (a live worker would read
        // the range the backlog was meant to take).
        return LanePlan {
            hold: i.prev.and_then(Range::from_status).is_none(),
            status: i.prev.cloned(),
            replicas: i.prev.map_or(0, |p| p.replicas),
            assignment: i
                .prev
                .map(|p| assign::from_status(&p.assignment))
                .unwrap_or_default(),
            problem: Some(format!(
                "spec.backlog.finishBy {:?} is not a valid time; use RFC 3339, e.g. 2026-11-23T10:00:00Z",
                spec.finish_by
            )),
            ..LanePlan::default()
        };
    };
    let finish_by_ms = finish_by.as_millisecond();
    let prev = i.prev.cloned().unwrap_or_default();
    let bad_from = match (spec.from_offset, &spec.from_timestamp) {
        (None, Some(t)) => parse_time(t).is_none().then(|| {
            format!("spec.backlog.fromTimestamp {t:?} is not a valid time; use RFC 3339, e.g. 2026-11-23T10:00:00Z")
        }),
        (None, None) => Some("spec.backlog needs fromOffset or fromTimestamp".to_string()),
        _ => None,
    };
    if let (Some(problem), None) = (bad_from, i.prev.and_then(Range::from_status)) {
        return LanePlan {
            hold: true,
            problem: Some(problem),
            ..LanePlan::default()
        };
    }
    let offsets = match &i.kafka.topic {
        TopicState::Found { .. } => i.kafka.offsets.as_ref(),
        _ => None,
    };
    let mut out = LanePlan::default();

    // 1. The range, captured once.
    let captured = i.prev.and_then(Range::from_status);
    let starting = captured.is_none();
    let (range, backlog_offsets): (Range, Option<BacklogOffsets>) = match captured {
        Some(r) => (r, i.kafka.backlog.clone()),
        None => {
            let from = match (spec.from_offset, &i.kafka.backlog) {
                (Some(o), _) => Some(RangeStart::Offset(o)),
                (None, Some(b)) => b.from_time.as_ref().map(RangeStart::Time),
                (None, None) => None,
            };
            let range = match (from, offsets, &i.kafka.backlog) {
                (Some(from), Some(o), Some(_)) => capture(from, o),
                _ => None,
            };
            let (Some(range), Some(o), Some(b)) = (range, offsets, &i.kafka.backlog) else {
                return LanePlan {
                    hold: true,
                    running: true,
                    message: Some(
                        "waiting for Kafka to capture the backlog range before starting workers"
                            .to_string(),
                    ),
                    ..LanePlan::default()
                };
            };
            let s = seeds(&range, &o.live_committed, &b.committed);
            // What the backlog group's offsets will be once seeded.
            let mut committed = b.committed.clone();
            committed.extend(s.backlog.iter().map(|(p, o)| (*p, *o)));
            out.seeds = Some(s);
            (
                range,
                Some(BacklogOffsets {
                    committed,
                    from_time: None,
                }),
            )
        }
    };
    let total = range.total();
    let started_ms = if starting {
        now_ms
    } else {
        prev.started_at
            .as_deref()
            .and_then(parse_time)
            .map_or(now_ms, |t| t.as_millisecond())
    };
    let target_ms = target_millis(started_ms, finish_by_ms);
    let ts = |ms: i64| Timestamp::from_millisecond(ms).map(rfc3339).ok();

    // 2. Progress; the last known one when Kafka did not answer.
    let measured = backlog_offsets
        .as_ref()
        .map(|b| progress(&range, &b.committed, offsets.map(|o| &o.watermarks)));
    let (done, unfinished) = match &measured {
        Some(p) => (
            if starting {
                p.done
            } else {
                p.done.max(prev.done)
            },
            p.unfinished.clone(),
        ),
        None => {
            let mut left: Vec<i32> = assign::from_status(&prev.assignment).into_keys().collect();
            if left.is_empty() {
                left = range
                    .end
                    .keys()
                    .copied()
                    .filter(|p| {
                        let (s, e) = range.bounds(*p);
                        e > s
                    })
                    .collect();
            }
            (prev.done, left)
        }
    };
    let done = done.min(total);
    let finished = prev.finished || done >= total;

    let mut status = BacklogStatus {
        total,
        done,
        start: Range::to_status(&range.start),
        end: Range::to_status(&range.end),
        started_at: ts(started_ms),
        target: ts(target_ms),
        ..prev.clone()
    };
    let started_note = |workers: i32| {
        let from = match (spec.from_offset, &spec.from_timestamp) {
            (Some(o), _) => format!("offset {o}"),
            (None, Some(t)) => format!("the first message at or after {t}"),
            (None, None) => "the log start".to_string(),
        };
        PlannedEvent::normal(
            "BacklogStarted",
            format!(
                "backlog of {total} messages on {} partitions, from {from} to where the live lane starts (status.backlog.start/end); finishBy {}, sized to finish around {}; starting with {workers} workers",
                range.end.len(),
                spec.finish_by,
                ts(target_ms).unwrap_or_default()
            ),
        )
    };

    // 3. Finished: the lane goes, the status stays.
    if finished {
        if starting {
            out.events.push(started_note(0));
        }
        status.done = total;
        status.finished = true;
        status.replicas = 0;
        status.ready_replicas = 0;
        status.assignment = BTreeMap::new();
        status.eta = None;
        if !prev.finished {
            status.finished_at = Some(rfc3339(now));
            let took = secs_text((now_ms - started_ms) as f64 / 1000.0);
            let slack = (finish_by_ms - now_ms) as f64 / 1000.0;
            let met = if slack >= 0.0 {
                format!(
                    "met finishBy {} with {} to spare",
                    spec.finish_by,
                    secs_text(slack)
                )
            } else {
                format!(
                    "missed finishBy {} by {}",
                    spec.finish_by,
                    secs_text(-slack)
                )
            };
            out.events.push(PlannedEvent::normal(
                "BacklogFinished",
                format!("backlog of {total} messages finished in {took}; {met}"),
            ));
        }
        out.status = Some(status);
        return out;
    }

    // 4. The rate, from how `done` moved while the same workers held the
    // partitions (only with fresh numbers from both Kafka and the service).
    let mut rate = if starting {
        None
    } else {
        parse_rate(prev.rate_per_worker.as_deref())
    };
    let workers = i.progress.map(holders);
    if let (Some(workers), Some(_), false) = (workers, &measured, starting) {
        let last = match (
            prev.last_sample_time.as_deref().and_then(parse_time),
            prev.last_sample_workers,
        ) {
            (Some(t), Some(w)) => Some(Sample {
                done: prev.last_done,
                at_millis: t.as_millisecond(),
                workers: w,
            }),
            _ => None,
        };
        let (sample, next) = next_rate(
            last,
            rate,
            Sample {
                done: Some(done),
                at_millis: now_ms,
                workers,
            },
        );
        rate = next;
        status.last_done = sample.done;
        status.last_sample_time = Timestamp::from_millisecond(sample.at_millis)
            .map(rfc3339_millis)
            .ok();
        status.last_sample_workers = Some(sample.workers);
    }
    status.rate_per_worker = rate.map(format_rate);

    // 5. Sizing.
    let current = if starting { 0 } else { prev.replicas.max(0) };
    let last_scale = prev
        .last_scale_time
        .as_deref()
        .and_then(parse_time)
        .map(|t| t.as_millisecond());
    let input = SizingInput {
        remaining: total - done,
        unfinished: unfinished.len() as i32,
        max_replicas: spec.max_replicas,
        current,
        rate,
        now: now_ms,
        target: target_ms,
        finish_by: finish_by_ms,
        last_scale: if starting { None } else { last_scale },
    };
    let (replicas, why) = size(&input);
    if starting {
        out.events.push(started_note(replicas));
    }
    if replicas != current {
        status.last_scale_time = Some(rfc3339(now));
        if !starting {
            let because = match why {
                Why::DeadlinePassed => format!("finishBy {} has passed", spec.finish_by),
                Why::Stalled => "the workers did nothing since the last sample".to_string(),
                Why::Finished => "the range is done".to_string(),
                Why::NoRate | Why::Rate => {
                    let to_target = (target_ms - now_ms) as f64 / 1000.0;
                    format!(
                        "{} remaining at {} tasks/s per worker, {} usable ({} to the target, {} to finishBy){}",
                        input.remaining,
                        rate.map_or("?".to_string(), format_rate),
                        secs_text(usable_secs(now_ms, target_ms, finish_by_ms)),
                        if to_target >= 0.0 { secs_text(to_target) } else { "past".to_string() },
                        secs_text((finish_by_ms - now_ms) as f64 / 1000.0),
                        if replicas < current && input.unfinished < current {
                            format!("; {} partitions left", input.unfinished)
                        } else {
                            String::new()
                        }
                    )
                }
            };
            out.events.push(PlannedEvent::normal(
                "BacklogScaled",
                format!("backlog workers {current} -> {replicas}: {because}"),
            ));
        }
    }
    status.replicas = replicas;
    let planned = SizingInput {
        last_scale: if replicas != current {
            Some(now_ms)
        } else {
            input.last_scale
        },
        ..input
    };
    status.eta = eta_secs(&planned, replicas)
        .and_then(|s| Timestamp::from_millisecond(now_ms + (s * 1000.0) as i64).ok())
        .map(rfc3339);

    // 6. The assignment: unfinished partitions over Ready slots, sticky.
    let ready = ready_slots(i.pods, replicas);
    status.ready_replicas = ready.len() as i32;
    let previous = assign::from_status(&prev.assignment);
    let assignment = if ready.is_empty() && previous.is_empty() {
        let all: Vec<i32> = (0..replicas).collect();
        assign::assign_partitions(&unfinished, &all, &previous)
    } else {
        assign::assign_partitions(&unfinished, &ready, &previous)
    };
    status.assignment = assign::to_status(&assignment);

    out.message = Some(format!(
        "backlog {done}/{total} done by {}/{replicas} workers{}{}; finishBy {}",
        status.ready_replicas,
        rate.map_or(String::new(), |r| format!(
            " at {} tasks/s each",
            format_rate(r)
        )),
        status
            .eta
            .as_deref()
            .map_or(String::new(), |e| format!(", ETA {e}")),
        spec.finish_by
    ));
    out.replicas = replicas;
    out.assignment = assignment;
    out.running = true;
    out.status = Some(status);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchfleet_api::progress::LeaseView;

    const NOW: i64 = 1_800_000_000_000;

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(ms).unwrap()
    }

    fn offsets(watermarks: &[(i32, i64, i64)], live: &[(i32, i64)]) -> TopicOffsets {
        TopicOffsets {
            watermarks: watermarks.iter().map(|(p, l, h)| (*p, (*l, *h))).collect(),
            live_committed: live.iter().copied().collect(),
        }
    }

    fn range(parts: &[(i32, i64, i64)]) -> Range {
        Range {
            start: parts.iter().map(|(p, s, _)| (*p, *s)).collect(),
            end: parts.iter().map(|(p, _, e)| (*p, *e)).collect(),
        }
    }

    #[test]
    fn capture_from_an_offset_clamps_into_the_log() {
        let o = offsets(&[(0, 0, 167), (1, 10, 166), (2, 0, 0), (3, 50, 100)], &[]);
        let r = capture(RangeStart::Offset(20), &o).unwrap();
        assert_eq!(r.start, [(0, 20), (1, 20), (2, 0), (3, 50)].into());
        assert_eq!(r.end, [(0, 167), (1, 166), (2, 0), (3, 100)].into());
        assert_eq!(r.total(), 147 + 146 + 50);
        // Below the log start: from the log start. Past the end: empty.
        let r = capture(RangeStart::Offset(0), &o).unwrap();
        assert_eq!(r.start[&1], 10);
        let r = capture(RangeStart::Offset(500), &o).unwrap();
        assert_eq!(r.start, r.end);
        assert_eq!(r.total(), 0);
    }

    #[test]
    fn capture_ends_where_the_live_lane_is() {
        // Partition 0: the live lane is at 120, so the range stops there (it
        // reads the rest). Partition 1: retention removed what it committed;
        // it would start at the log start. Partition 2: it never committed.
        let o = offsets(
            &[(0, 0, 167), (1, 30, 166), (2, 0, 90)],
            &[(0, 120), (1, 5)],
        );
        let r = capture(RangeStart::Offset(0), &o).unwrap();
        assert_eq!(r.end, [(0, 120), (1, 30), (2, 90)].into());
        assert_eq!(r.start, [(0, 0), (1, 30), (2, 0)].into());
    }

    #[test]
    fn capture_from_a_time() {
        let o = offsets(&[(0, 0, 100), (1, 0, 80), (2, 40, 60)], &[]);
        let found: BTreeMap<i32, Option<i64>> = [(0, Some(70)), (1, None), (2, Some(3))].into();
        let r = capture(RangeStart::Time(&found), &o).unwrap();
        // No message that recent on partition 1: nothing to do there.
        assert_eq!(r.start, [(0, 70), (1, 80), (2, 40)].into());
        assert_eq!(r.total(), 30 + 20);
        // A partition the lookup did not answer for: not captured yet.
        let partial: BTreeMap<i32, Option<i64>> = [(0, Some(70))].into();
        assert_eq!(capture(RangeStart::Time(&partial), &o), None);
    }

    #[test]
    fn seeds_only_where_a_group_has_no_usable_commit() {
        let r = range(&[(0, 0, 100), (1, 10, 50), (2, 5, 5)]);
        let s = seeds(&r, &[(1, 50)].into(), &[(0, 40), (1, 70)].into());
        // Live: where it never committed, at the end of the range.
        assert_eq!(s.live, [(0, 100), (2, 5)].into());
        // Backlog: 0 is inside its range (progress made before a lost status
        // write); 1 is past it (an earlier backlog); 2 never committed.
        assert_eq!(s.backlog, [(1, 10), (2, 5)].into());
    }

    #[test]
    fn done_counts_committed_offsets_within_the_range() {
        // No commit yet.
        assert_eq!(partition_done(100, 200, None, None), 0);
        assert_eq!(partition_done(100, 200, None, Some(0)), 0);
        // Progress.
        assert_eq!(partition_done(100, 200, Some(150), Some(0)), 50);
        // Committed at or beyond the end: the whole range, no more.
        assert_eq!(partition_done(100, 200, Some(200), None), 100);
        assert_eq!(partition_done(100, 200, Some(900), None), 100);
        // Retention moved the log start above the start: gone counts as done.
        assert_eq!(partition_done(100, 200, Some(110), Some(130)), 30);
        assert_eq!(partition_done(100, 200, None, Some(250)), 100);
        // A commit below the start (not ours) is not negative progress.
        assert_eq!(partition_done(100, 200, Some(10), None), 0);
        // Empty range.
        assert_eq!(partition_done(5, 5, None, None), 0);
    }

    #[test]
    fn progress_lists_unfinished_partitions() {
        let r = range(&[(0, 0, 100), (1, 0, 50), (2, 5, 5), (3, 0, 10)]);
        let committed = [(0, 100), (1, 20)].into();
        let wm: BTreeMap<i32, (i64, i64)> = [(3, (10, 10))].into();
        let p = progress(&r, &committed, Some(&wm));
        assert_eq!(p.done, 100 + 20 + 10);
        assert_eq!(p.unfinished, [1]);
        let p = progress(&r, &BTreeMap::new(), None);
        assert_eq!((p.done, p.unfinished), (0, vec![0, 1, 3]));
    }

    fn sample(done: Option<i64>, secs: f64, workers: i32) -> Sample {
        Sample {
            done,
            at_millis: NOW + (secs * 1000.0) as i64,
            workers,
        }
    }

    #[test]
    fn rate_comes_from_steady_intervals_only() {
        // Workers seen for the first time: their start is in the next
        // interval, so no base yet.
        let (s, r) = next_rate(None, None, sample(Some(0), 0.0, 2));
        assert_eq!((s, r), (sample(None, 0.0, 2), None));
        // Still the same workers: now a base.
        let (s, r) = next_rate(Some(s), r, sample(Some(6), 3.0, 2));
        assert_eq!((s, r), (sample(Some(6), 3.0, 2), None));
        // 60 tasks in 3 s by 2 workers: 10 per second each.
        let (s, r) = next_rate(Some(s), r, sample(Some(66), 6.0, 2));
        assert_eq!(s, sample(Some(66), 6.0, 2));
        assert!((r.unwrap() - 10.0).abs() < 1e-9);
        // Then an exponentially weighted average: 6/s measured -> 8/s.
        let (s, r) = next_rate(Some(s), r, sample(Some(102), 9.0, 2));
        assert!((r.unwrap() - 8.0).abs() < 1e-9);
        // Too short an interval keeps the older base.
        let (s2, r2) = next_rate(Some(s), r, sample(Some(110), 10.0, 2));
        assert_eq!((s2, r2), (s, r));
        // The workers changed: no base, the estimate stays.
        let (s3, r3) = next_rate(Some(s), r, sample(Some(150), 12.0, 3));
        assert_eq!((s3, r3), (sample(None, 12.0, 3), r));
        // Nobody working: no sample.
        let (s4, r4) = next_rate(
            Some(sample(Some(150), 12.0, 0)),
            r,
            sample(Some(150), 15.0, 0),
        );
        assert_eq!((s4, r4), (sample(None, 15.0, 0), r));
        // A sample from the future (another operator's clock) is replaced.
        let (s5, _) = next_rate(Some(sample(Some(0), 60.0, 2)), r, sample(Some(10), 12.0, 2));
        assert_eq!(s5, sample(None, 12.0, 2));
    }

    /// 2,000 messages, 90 s to the deadline from the start now (target 72 s).
    fn input() -> SizingInput {
        SizingInput {
            remaining: 2000,
            unfinished: 12,
            max_replicas: 6,
            current: 1,
            rate: Some(10.0),
            now: NOW,
            target: target_millis(NOW, NOW + 90_000),
            finish_by: NOW + 90_000,
            last_scale: None,
        }
    }

    #[test]
    fn the_target_is_four_fifths_of_the_window() {
        assert_eq!(target_millis(NOW, NOW + 90_000), NOW + 72_000);
        assert_eq!(target_millis(NOW, NOW - 5), NOW - 5);
        assert_eq!(usable_secs(NOW, NOW + 72_000, NOW + 90_000), 72.0);
        // Past the target: half of what is left before the deadline.
        assert_eq!(usable_secs(NOW + 80_000, NOW + 72_000, NOW + 90_000), 5.0);
    }

    #[test]
    fn sizing_follows_remaining_work_and_time() {
        // 2000 / (10/s × 72 s) = 2.8 -> 3.
        assert_eq!(size(&input()), (3, Why::Rate));
        // More remaining: more workers.
        let more = SizingInput {
            remaining: 4000,
            ..input()
        };
        assert_eq!(size(&more).0, 6);
        // Less time: more workers.
        let later = SizingInput {
            now: NOW + 40_000,
            ..input()
        };
        assert_eq!(size(&later).0, 6); // 2000 / (10 × 32) = 6.25, capped
        let later = SizingInput {
            now: NOW + 30_000,
            remaining: 1500,
            ..input()
        };
        assert_eq!(size(&later).0, 4); // 1500 / (10 × 42) = 3.6
                                       // Slower workers: more of them.
        let slow = SizingInput {
            rate: Some(5.0),
            ..input()
        };
        assert_eq!(size(&slow).0, 6);
    }

    #[test]
    fn sizing_never_exceeds_max_replicas_or_unfinished_partitions() {
        let huge = SizingInput {
            remaining: 1_000_000,
            ..input()
        };
        assert_eq!(size(&huge), (6, Why::Rate));
        let few_partitions = SizingInput {
            unfinished: 2,
            ..huge
        };
        assert_eq!(size(&few_partitions).0, 2);
        // A count above the partitions left drops at once, hysteresis or not.
        let shrinking = SizingInput {
            current: 5,
            last_scale: Some(NOW),
            ..few_partitions
        };
        assert_eq!(size(&shrinking).0, 2);
        // At least one while anything is left.
        let tiny = SizingInput {
            remaining: 1,
            ..input()
        };
        assert_eq!(size(&tiny).0, 1);
        // Done: none.
        let done = SizingInput {
            remaining: 0,
            ..input()
        };
        assert_eq!(size(&done), (0, Why::Finished));
    }

    #[test]
    fn scaling_down_waits_and_needs_a_margin() {
        // 5 running where 3 would do (2.8 needed).
        let over = SizingInput {
            current: 5,
            last_scale: Some(NOW - 5_000),
            ..input()
        };
        // Scaled 5 s ago: wait.
        assert_eq!(size(&over), (5, Why::Rate));
        // 15 s later: down, but only as far as finishing within 90% of the
        // usable time allows: 2000 / (10 × 0.9 × 72) = 3.09 -> 4.
        let waited = SizingInput {
            last_scale: Some(NOW - 15_000),
            ..over
        };
        assert_eq!(size(&waited), (4, Why::Rate));
        // No scale before: free to go down.
        let never = SizingInput {
            last_scale: None,
            ..over
        };
        assert_eq!(size(&never).0, 4);
        // Right at the need, one fewer would not finish in time: stay.
        let tight = SizingInput {
            current: 3,
            remaining: 2100, // needs 2.9: 3
            last_scale: None,
            ..input()
        };
        assert_eq!(size(&tight).0, 3);
        // Up at once, even right after a scale.
        let behind = SizingInput {
            current: 2,
            last_scale: Some(NOW),
            ..input()
        };
        assert_eq!(size(&behind).0, 3);
    }

    #[test]
    fn without_a_rate_start_small() {
        let none = SizingInput {
            rate: None,
            current: 0,
            ..input()
        };
        assert_eq!(size(&none), (START_REPLICAS, Why::NoRate));
        // A close deadline: two, so the first estimate comes with some work done.
        let close = SizingInput {
            finish_by: NOW + 45_000,
            target: target_millis(NOW, NOW + 45_000),
            ..none
        };
        assert_eq!(size(&close), (QUICK_START_REPLICAS, Why::NoRate));
        let one_partition = SizingInput {
            unfinished: 1,
            ..close
        };
        assert_eq!(size(&one_partition).0, 1);
        // Running already: keep the count until there is a measurement.
        let running = SizingInput { current: 4, ..none };
        assert_eq!(size(&running), (4, Why::NoRate));
    }

    #[test]
    fn past_the_target_a_backlog_only_grows() {
        let late = SizingInput {
            now: NOW + 80_000,
            remaining: 100,
            current: 5,
            ..input()
        };
        // 100 / (10 × 5 s usable) = 2, but it is late: it keeps its 5.
        assert_eq!(size(&late), (5, Why::Rate));
        let behind = SizingInput {
            remaining: 400,
            current: 2,
            ..late
        };
        assert_eq!(size(&behind).0, 6);
    }

    #[test]
    fn past_the_deadline_or_stalled_use_everything_allowed() {
        let late = SizingInput {
            now: NOW + 90_000,
            remaining: 10,
            ..input()
        };
        assert_eq!(size(&late), (6, Why::DeadlinePassed));
        let late_no_rate = SizingInput { rate: None, ..late };
        assert_eq!(size(&late_no_rate), (6, Why::DeadlinePassed));
        let stalled = SizingInput {
            rate: Some(0.0),
            ..input()
        };
        assert_eq!(size(&stalled), (6, Why::Stalled));
    }

    #[test]
    fn eta_follows_the_planned_sizing() {
        // A steady count (all it may use): remaining / (rate × workers).
        let steady = SizingInput {
            remaining: 5000,
            current: 6,
            ..input()
        };
        let eta = eta_secs(&steady, 6).unwrap();
        assert!((eta - 5000.0 / 60.0).abs() < 1e-9, "{eta}");
        // Well ahead of the target with 6 workers: the sizing will shed some,
        // so the range ends later than at today's count, and before the target.
        let ahead = SizingInput {
            remaining: 1000,
            current: 6,
            ..input()
        };
        let eta = eta_secs(&ahead, 6).unwrap();
        assert!(eta > 1000.0 / 60.0 + 1.0, "{eta}");
        assert!(eta <= 72.0, "{eta}");
        // No rate or no workers: no ETA.
        assert_eq!(
            eta_secs(
                &SizingInput {
                    rate: None,
                    ..steady
                },
                6
            ),
            None
        );
        assert_eq!(eta_secs(&steady, 0), None);
    }

    #[test]
    fn holders_are_distinct_backlog_lease_holders() {
        let lease = |h: Option<&str>| LeaseView {
            holder: h.map(str::to_string),
            epoch: 1,
            committed: 0,
            counters: Default::default(),
        };
        let status = ProgressStatus {
            leases: [
                (
                    "backlog".to_string(),
                    [
                        (0, lease(Some("a"))),
                        (1, lease(Some("a"))),
                        (2, lease(Some("b"))),
                        (3, lease(None)),
                    ]
                    .into(),
                ),
                ("live".to_string(), [(0, lease(Some("c")))].into()),
            ]
            .into(),
            ..Default::default()
        };
        assert_eq!(holders(&status), 2);
        assert_eq!(holders(&ProgressStatus::default()), 0);
    }

    #[test]
    fn rates_in_the_status_are_checked() {
        assert_eq!(parse_rate(Some("8.250")), Some(8.25));
        assert_eq!(parse_rate(Some("-1")), None);
        assert_eq!(parse_rate(Some("NaN")), None);
        assert_eq!(parse_rate(Some("fast")), None);
        assert_eq!(parse_rate(None), None);
        assert_eq!(format_rate(8.25), "8.250");
    }

    // The lane's plan over a life cycle.

    fn spec() -> BacklogSpec {
        BacklogSpec {
            from_timestamp: None,
            from_offset: Some(0),
            finish_by: rfc3339(ts(NOW + 90_000)),
            max_replicas: 6,
        }
    }

    fn kafka(committed: Option<&[(i32, i64)]>) -> KafkaObservation {
        KafkaObservation {
            topic: TopicState::Found { partitions: 4 },
            lag: Some(0),
            offsets: Some(offsets(
                &[(0, 0, 100), (1, 0, 100), (2, 0, 100), (3, 0, 0)],
                &[],
            )),
            backlog: committed.map(|c| BacklogOffsets {
                committed: c.iter().copied().collect(),
                from_time: None,
            }),
        }
    }

    fn backlog_pod(slot: i32, ready: bool) -> WorkerPod {
        WorkerPod {
            name: names::worker_pod_name("demo", "backlog", "blue", slot),
            lane: "backlog".to_string(),
            slot: Some(slot),
            ready,
            ..Default::default()
        }
    }

    fn with_holders(n: usize) -> ProgressStatus {
        let leases = (0..n as i32)
            .map(|p| {
                (
                    p,
                    LeaseView {
                        holder: Some(format!("demo-backlog-blue-{p}")),
                        epoch: 1,
                        committed: 0,
                        counters: Default::default(),
                    },
                )
            })
            .collect();
        ProgressStatus {
            leases: [("backlog".to_string(), leases)].into(),
            ..Default::default()
        }
    }

    fn run(
        prev: Option<&BacklogStatus>,
        at: i64,
        kafka: &KafkaObservation,
        pods: &[WorkerPod],
        progress: Option<&ProgressStatus>,
    ) -> LanePlan {
        let s = spec();
        plan_lane(&Inputs {
            spec: Some(&s),
            prev,
            now: ts(at),
            kafka,
            pods,
            progress,
        })
    }

    #[test]
    fn a_backlog_starts_by_capturing_and_seeding() {
        let p = run(None, NOW, &kafka(Some(&[])), &[], None);
        assert!(!p.hold && p.running);
        let s = p.seeds.as_ref().unwrap();
        assert_eq!(s.live, [(0, 100), (1, 100), (2, 100), (3, 0)].into());
        assert_eq!(s.backlog, [(0, 0), (1, 0), (2, 0), (3, 0)].into());
        let b = p.status.as_ref().unwrap();
        assert_eq!(
            (b.total, b.done, b.replicas, b.finished),
            (300, 0, 1, false)
        );
        assert_eq!(b.end["0"], 100);
        assert_eq!(b.start["0"], 0);
        assert_eq!(b.started_at.as_deref(), Some(rfc3339(ts(NOW)).as_str()));
        assert_eq!(
            b.target.as_deref(),
            Some(rfc3339(ts(NOW + 72_000)).as_str())
        );
        assert_eq!(b.rate_per_worker, None);
        assert_eq!(b.eta, None);
        // Not Ready yet: assigned over the wanted slot; the empty partition 3 is not.
        assert_eq!(p.replicas, 1);
        assert_eq!(p.assignment, [(0, 0), (1, 0), (2, 0)].into());
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.events[0].reason, "BacklogStarted");
        assert!(
            p.events[0].note.contains("300 messages"),
            "{}",
            p.events[0].note
        );
        assert!(p
            .message
            .as_deref()
            .unwrap()
            .starts_with("backlog 0/300 done"));
    }

    #[test]
    fn without_kafka_a_backlog_holds_every_worker() {
        let mut k = kafka(None);
        let p = run(None, NOW, &k, &[], None);
        assert!(p.hold && p.running && p.status.is_none() && p.seeds.is_none());
        k.topic = TopicState::Unreachable {
            error: "down".to_string(),
        };
        k.backlog = Some(BacklogOffsets::default());
        assert!(run(None, NOW, &k, &[], None).hold);
    }

    #[test]
    fn a_running_backlog_measures_sizes_and_assigns_unfinished_partitions() {
        let start = run(None, NOW, &kafka(Some(&[])), &[], None);
        let b0 = start.status.unwrap();
        // 3 s later: one worker holds the partitions. It just started, so
        // this is no base yet; 3 s later it is.
        let pods = [backlog_pod(0, true)];
        let p1 = run(
            Some(&b0),
            NOW + 3_000,
            &kafka(Some(&[(0, 0), (1, 0), (2, 0)])),
            &pods,
            Some(&with_holders(1)),
        );
        let b1 = p1.status.unwrap();
        assert_eq!((b1.last_sample_workers, b1.last_done), (Some(1), None));
        assert!(p1.events.is_empty());
        let b1 = run(
            Some(&b1),
            NOW + 6_000,
            &kafka(Some(&[(0, 0), (1, 0), (2, 0)])),
            &pods,
            Some(&with_holders(1)),
        )
        .status
        .unwrap();
        assert_eq!(
            (b1.last_done, b1.rate_per_worker.as_deref()),
            (Some(0), None)
        );
        assert_eq!(
            b1.last_sample_time.as_deref(),
            Some("2027-01-15T08:00:06.000Z")
        );
        // 3 s later: 30 done by one worker = 10/s; 270 left with 63 s to the
        // target: 0.4 -> stays at one, ETA 27 s.
        let p2 = run(
            Some(&b1),
            NOW + 9_000,
            &kafka(Some(&[(0, 30), (1, 0), (2, 0)])),
            &pods,
            Some(&with_holders(1)),
        );
        let b2 = p2.status.unwrap();
        assert_eq!(b2.done, 30);
        assert_eq!(b2.rate_per_worker.as_deref(), Some("10.000"));
        assert_eq!(b2.replicas, 1);
        assert_eq!(b2.eta.as_deref(), Some(rfc3339(ts(NOW + 36_000)).as_str()));
        assert_eq!(b2.ready_replicas, 1);
        assert!(p2.events.is_empty());
        // Partition 0 finishes: it leaves the assignment.
        let p3 = run(
            Some(&b2),
            NOW + 12_000,
            &kafka(Some(&[(0, 100), (1, 5), (2, 0)])),
            &pods,
            Some(&with_holders(1)),
        );
        assert_eq!(p3.assignment, [(1, 0), (2, 0)].into());
        let b3 = p3.status.unwrap();
        assert_eq!(
            b3.assignment,
            [("1".to_string(), 0), ("2".to_string(), 0)].into()
        );
        assert_eq!(b3.done, 105);
        // Kafka does not answer: the last numbers stay, nothing is sampled.
        let p4 = run(
            Some(&b3),
            NOW + 15_000,
            &kafka(None),
            &pods,
            Some(&with_holders(1)),
        );
        let b4 = p4.status.unwrap();
        assert_eq!((b4.done, b4.last_done), (105, b3.last_done));
        assert_eq!(p4.assignment, [(1, 0), (2, 0)].into());
    }

    #[test]
    fn a_slow_backlog_scales_up_and_says_why() {
        let mut b = run(None, NOW, &kafka(Some(&[])), &[], None).status.unwrap();
        let pods = [backlog_pod(0, true)];
        for at in [3_000, 6_000] {
            b = run(
                Some(&b),
                NOW + at,
                &kafka(Some(&[])),
                &pods,
                Some(&with_holders(1)),
            )
            .status
            .unwrap();
        }
        // 1/s per worker: 297 left in 63 s needs 5, capped at 3 unfinished partitions.
        let p = run(
            Some(&b),
            NOW + 9_000,
            &kafka(Some(&[(0, 3)])),
            &pods,
            Some(&with_holders(1)),
        );
        assert_eq!(p.replicas, 3);
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.events[0].reason, "BacklogScaled");
        assert!(
            p.events[0]
                .note
                .starts_with("backlog workers 1 -> 3: 297 remaining at 1.000 tasks/s per worker"),
            "{}",
            p.events[0].note
        );
        let b = p.status.unwrap();
        assert_eq!(
            b.last_scale_time.as_deref(),
            Some(rfc3339(ts(NOW + 9_000)).as_str())
        );
        // The assignment waits for the new slots to be Ready.
        assert_eq!(p.assignment, [(0, 0), (1, 0), (2, 0)].into());
        let ready = [
            backlog_pod(0, true),
            backlog_pod(1, true),
            backlog_pod(2, true),
        ];
        let p = run(
            Some(&b),
            NOW + 11_000,
            &kafka(Some(&[(0, 5)])),
            &ready,
            None,
        );
        assert_eq!(p.assignment, [(0, 0), (1, 1), (2, 2)].into());
    }

    #[test]
    fn a_finished_backlog_drops_its_lane_and_keeps_its_status() {
        let b0 = run(None, NOW, &kafka(Some(&[])), &[], None).status.unwrap();
        let pods = [backlog_pod(0, true)];
        let done = kafka(Some(&[(0, 100), (1, 100), (2, 100), (3, 0)]));
        let p = run(
            Some(&b0),
            NOW + 60_000,
            &done,
            &pods,
            Some(&with_holders(1)),
        );
        assert!(!p.running && p.assignment.is_empty());
        assert_eq!(p.replicas, 0);
        let b = p.status.unwrap();
        assert!(b.finished);
        assert_eq!(
            (b.done, b.total, b.replicas, b.eta.as_deref()),
            (300, 300, 0, None)
        );
        assert!(b.assignment.is_empty());
        assert_eq!(
            b.finished_at.as_deref(),
            Some(rfc3339(ts(NOW + 60_000)).as_str())
        );
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.events[0].reason, "BacklogFinished");
        assert_eq!(
            p.events[0].note,
            format!(
                "backlog of 300 messages finished in 1m; met finishBy {} with 30s to spare",
                spec().finish_by
            )
        );
        // Afterwards: nothing more to read, nothing changes, no second event.
        let later = run(Some(&b), NOW + 70_000, &kafka(None), &[], None);
        assert_eq!(later.status.as_ref(), Some(&b));
        assert!(later.events.is_empty() && later.replicas == 0);
        // Late: the event says by how much.
        let late = run(Some(&b0), NOW + 95_000, &done, &pods, None);
        assert!(late.events[0]
            .note
            .ends_with("missed finishBy 2027-01-15T08:01:30Z by 5s"));
        // An empty range is finished at once, with both events.
        let empty = KafkaObservation {
            offsets: Some(offsets(&[(0, 7, 7)], &[])),
            ..kafka(Some(&[]))
        };
        let p = run(None, NOW, &empty, &[], None);
        let reasons: Vec<_> = p.events.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, ["BacklogStarted", "BacklogFinished"]);
        assert!(p.status.unwrap().finished);
        assert_eq!(p.seeds.unwrap().live, [(0, 7)].into());
    }

    #[test]
    fn a_removed_backlog_goes_away() {
        let b0 = run(None, NOW, &kafka(Some(&[])), &[], None).status.unwrap();
        let k = kafka(None);
        let p = plan_lane(&Inputs {
            spec: None,
            prev: Some(&b0),
            now: ts(NOW + 5_000),
            kafka: &k,
            pods: &[backlog_pod(0, true)],
            progress: None,
        });
        assert!(p.status.is_none() && p.assignment.is_empty() && p.replicas == 0);
        assert_eq!(p.events[0].reason, "BacklogRemoved");
    }

    #[test]
    fn invalid_times_hold_a_backlog_that_has_not_started() {
        let mut s = spec();
        s.finish_by = "2027-02-30T00:00:00Z".to_string();
        let k = kafka(Some(&[]));
        let p = plan_lane(&Inputs {
            spec: Some(&s),
            prev: None,
            now: ts(NOW),
            kafka: &k,
            pods: &[],
            progress: None,
        });
        assert!(p.hold && p.problem.unwrap().contains("finishBy"));
        let mut s = spec();
        s.from_offset = None;
        s.from_timestamp = Some("2027-02-30T00:00:00Z".to_string());
        let p = plan_lane(&Inputs {
            spec: Some(&s),
            prev: None,
            now: ts(NOW),
            kafka: &k,
            pods: &[],
            progress: None,
        });
        assert!(p.hold && p.problem.unwrap().contains("fromTimestamp"));
    }

    #[test]
    fn a_time_range_waits_for_the_lookup() {
        let mut s = spec();
        s.from_offset = None;
        s.from_timestamp = Some("2027-01-15T07:00:00Z".to_string());
        let mut k = kafka(Some(&[]));
        let plan = |k: &KafkaObservation| {
            plan_lane(&Inputs {
                spec: Some(&s),
                prev: None,
                now: ts(NOW),
                kafka: k,
                pods: &[],
                progress: None,
            })
        };
        assert!(plan(&k).hold);
        k.backlog.as_mut().unwrap().from_time =
            Some([(0, Some(40)), (1, None), (2, Some(0)), (3, None)].into());
        let p = plan(&k);
        assert!(!p.hold);
        let b = p.status.unwrap();
        // 60 on partition 0, none on 1, all 100 on 2.
        assert_eq!(b.total, 160);
        assert_eq!(b.start["1"], 100);
    }
}
