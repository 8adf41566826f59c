//! Event-time arithmetic: which tumbling window an event belongs to, and the
//! partition's watermark with its idle rule.

use serde::{Deserialize, Serialize};

/// Event times the engine accepts, in ms since the epoch: ±10^15 ms is about
/// ±31,700 years, far beyond any real clock, and keeps every window end and
/// cooldown deadline far from `i64` overflow.
pub const MAX_ABS_EVENT_TIME: i64 = 1_000_000_000_000_000;

/// Start of the tumbling window of `size` ms holding `t`: `floor(t / size) * size`
/// (also for negative `t`).
pub fn window_start(t: i64, size: i64) -> i64 {
    t.div_euclid(size) * size
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
        assert_eq!(window_start(0, 1000), 0);
        assert_eq!(window_start(999, 1000), 0);
        assert_eq!(window_start(1000, 1000), 1000);
        assert_eq!(window_start(-1, 1000), -1000);
        assert_eq!(window_start(-1000, 1000), -1000);
        assert_eq!(
            window_start(MAX_ABS_EVENT_TIME, 7),
            MAX_ABS_EVENT_TIME - MAX_ABS_EVENT_TIME % 7
        );
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
