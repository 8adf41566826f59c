//! Event-time arithmetic: which tumbling window an event belongs to, and the
//! partition's watermark with its idle rule.

use serde::{Deserialize, Serialize};

/// Event times the engine accepts, in ms since the epoch: ±10^15 ms is about
/// ±31,700 years, far beyond any real clock, and keeps every window end and
/// cooldown deadline far from `i64` overflow.
pub const MAX_ABS_EVENT_TIME: i64 = 1_000_000_000_000_000;

/// Start of the tumbling window of `size` ms holding `t`, for windows that
/// begin `phase` ms after each multiple of `size` (`0 <= phase < size`):
/// `floor((t - phase) / size) * size + phase` (also for negative `t`).
pub fn window_start(t: i64, size: i64, phase: i64) -> i64 {
    (t - phase).div_euclid(size) * size + phase
}

/// The phase of the windows of the `k`-th segment of partition `partition`
/// to open a window: a fraction of the window given by a two-dimensional
/// Weyl sequence, the golden ratio's over partitions and the plastic
/// number's over a partition's segments, so any number of either gets
/// phases spread over the window without knowing how many there are.
/// Aligned windows would make every window of a worker close at the same
/// watermark - a burst of closes and commits on its core once per window,
/// and the last of them waits for all the others; one phase per partition
/// still closed all of a partition's segments in one call, whose results
/// then waited for the largest window's matching. Staggered, they arrive
/// spread over the window. Segment 0 of partition 0 keeps phase 0.
pub fn window_phase(partition: i32, k: u64, size: i64) -> i64 {
    // 2^64 / golden ratio, the multiplier of Fibonacci hashing.
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    // 2^64 / plastic number (the real root of x³ = x + 1).
    const PLASTIC: u64 = 0xC13F_A9A9_02A6_328F;
    let fraction = u64::from(partition.unsigned_abs())
        .wrapping_mul(GOLDEN)
        .wrapping_add(k.wrapping_mul(PLASTIC));
    // The fraction's top 32 bits times size, over 2^32: below size.
    (((fraction >> 32) * size.max(1) as u64) >> 32) as i64
}

/// The partition's event-time clock. Persisted, so a new owner continues
/// with the same watermark and idle deadline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventClock {
    /// Largest event time ingested.
    pub max_event_time: Option<i64>,
    /// Never goes back.
    pub watermark: Option<i64>,
    /// Wall time (the caller's `now`) of the last ingest.
    pub last_ingest_at: Option<i64>,
}

impl EventClock {
    /// An event was ingested at wall time `now`.
    pub fn observe(&mut self, event_time: i64, now: i64, out_of_order: i64) {
        let max = self
            .max_event_time
            .map_or(event_time, |m| m.max(event_time));
        self.max_event_time = Some(max);
        self.advance_to(max.saturating_sub(out_of_order));
        self.last_ingest_at = Some(now);
    }

    /// The idle rule: after `idle` ms of wall time without an ingest, the
    /// watermark follows the wall clock (`now − idle − out_of_order`), so the
    /// last windows close without new traffic. Nothing ever ingested: no-op.
    pub fn apply_idle(&mut self, now: i64, idle: i64, out_of_order: i64) {
        let Some(last) = self.last_ingest_at else {
            return;
        };
        if now.saturating_sub(last) >= idle {
            self.advance_to(now.saturating_sub(idle).saturating_sub(out_of_order));
        }
    }

    fn advance_to(&mut self, wm: i64) {
        self.watermark = Some(self.watermark.map_or(wm, |old| old.max(wm)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_floor_also_below_zero() {
        assert_eq!(window_start(0, 1000, 0), 0);
        assert_eq!(window_start(999, 1000, 0), 0);
        assert_eq!(window_start(1000, 1000, 0), 1000);
        assert_eq!(window_start(-1, 1000, 0), -1000);
        assert_eq!(window_start(-1000, 1000, 0), -1000);
        assert_eq!(
            window_start(MAX_ABS_EVENT_TIME, 7, 0),
            MAX_ABS_EVENT_TIME - MAX_ABS_EVENT_TIME % 7
        );
        assert_eq!(
            window_start(-MAX_ABS_EVENT_TIME, 7, 6),
            -MAX_ABS_EVENT_TIME - (-MAX_ABS_EVENT_TIME - 6).rem_euclid(7)
        );
    }

    #[test]
    fn a_phase_shifts_every_window_by_it() {
        assert_eq!(window_start(249, 1000, 250), -750);
        assert_eq!(window_start(250, 1000, 250), 250);
        assert_eq!(window_start(1249, 1000, 250), 250);
        assert_eq!(window_start(1250, 1000, 250), 1250);
        assert_eq!(window_start(-751, 1000, 250), -1750);
    }

    #[test]
    fn phases_spread_over_the_window() {
        assert_eq!(window_phase(0, 0, 1000), 0);
        for size in [1, 7, 500, 1000, i64::from(i32::MAX)] {
            for p in [0, 1, 15, 1000, i32::MAX, i32::MIN] {
                for k in [0, 1, 3, 1000, u64::MAX] {
                    let phase = window_phase(p, k, size);
                    assert!((0..size).contains(&phase), "{p} {k} {size}: {phase}");
                }
            }
        }
        let min_gap = |mut phases: Vec<i64>| {
            phases.sort();
            let mut gaps: Vec<i64> = phases.windows(2).map(|w| w[1] - w[0]).collect();
            gaps.push(1000 + phases[0] - phases[phases.len() - 1]);
            gaps.into_iter().min().unwrap()
        };
        // 16 partitions' first segments over 1 s: no two closer than a
        // quarter of the even spacing (62.5 ms), so closes never pile up.
        assert!(min_gap((0..16).map(|p| window_phase(p, 0, 1000)).collect()) >= 16);
        // A partition's first four segments: at least 200 ms apart, so one
        // close call rarely closes two of them.
        for p in 0..16 {
            let own: Vec<i64> = (0..4).map(|k| window_phase(p, k, 1000)).collect();
            assert!(min_gap(own.clone()) >= 200, "partition {p}: {own:?}");
        }
        // All 64 of 16 partitions x 4 segments: distinct close times.
        let all: Vec<i64> = (0..16)
            .flat_map(|p| (0..4).map(move |k| window_phase(p, k, 1000)))
            .collect();
        assert!(min_gap(all) >= 4);
    }

    #[test]
    fn watermark_trails_and_never_goes_back() {
        let mut c = EventClock::default();
        c.apply_idle(10_000, 1000, 200);
        assert_eq!(c.watermark, None, "nothing ingested: nothing to close");
        c.observe(5000, 100, 200);
        assert_eq!(c.watermark, Some(4800));
        c.observe(3000, 150, 200);
        assert_eq!(
            c.watermark,
            Some(4800),
            "an old event does not move it back"
        );
        c.apply_idle(1149, 1000, 200);
        assert_eq!(c.watermark, Some(4800), "not idle yet");
        c.apply_idle(7000, 1000, 200);
        assert_eq!(
            c.watermark,
            Some(5800),
            "idle: follows now - idle - out-of-order"
        );
        c.apply_idle(1200, 1000, 200);
        assert_eq!(
            c.watermark,
            Some(5800),
            "a wall clock going back changes nothing"
        );
        c.apply_idle(i64::MAX, 1000, 200);
        assert_eq!(c.watermark, Some(i64::MAX - 1200), "no overflow");
    }
}
