//! Standard conditions (`Ready`, `Progressing`, `Degraded`) with the
//! `metav1.Condition` rule that `lastTransitionTime` moves only when the
//! status flips, so a status that did not change is not rewritten.

use k8s_openapi::jiff::Timestamp;
use matchfleet_api::fleet::Condition;

/// RFC 3339 in UTC, to the second, as Kubernetes writes condition times.
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// RFC 3339 in UTC with milliseconds, for times that rates are computed from.
pub fn rfc3339_millis(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A time the status or spec holds (RFC 3339, any offset); `None` when it is
/// not one (the status is user-writable, so it may hold anything).
pub fn parse_time(s: &str) -> Option<Timestamp> {
    s.trim().parse().ok()
}

/// What a condition should say now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Want {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Want {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The condition for `want`, keeping the previous `lastTransitionTime` when
/// the previous condition of that type had the same status.
pub fn build(previous: &[Condition], want: Want, generation: Option<i64>, now: &str) -> Condition {
    let status = if want.status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == want.type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: want.type_.to_string(),
        status,
        reason: want.reason.to_string(),
        message: want.message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The previous condition of a type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchfleet_api::fleet::condition::READY;

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let t0 = "2026-01-01T00:00:00Z";
        let t1 = "2026-01-01T00:01:00Z";
        let c0 = build(
            &[],
            Want::new(READY, false, "WorkersNotReady", "0/1"),
            Some(1),
            t0,
        );
        assert_eq!(c0.last_transition_time, t0);
        assert_eq!(c0.status, "False");
        // Same status, new reason and message: time kept.
        let c1 = build(
            std::slice::from_ref(&c0),
            Want::new(READY, false, "TopicNotFound", "x"),
            Some(2),
            t1,
        );
        assert_eq!(c1.last_transition_time, t0);
        assert_eq!(
            (c1.reason.as_str(), c1.observed_generation),
            ("TopicNotFound", Some(2))
        );
        // Flip: time moves.
        let c2 = build(
            &[c1],
            Want::new(READY, true, "AllWorkersReady", "ok"),
            Some(2),
            t1,
        );
        assert_eq!(c2.last_transition_time, t1);
        assert_eq!(c2.status, "True");
    }

    #[test]
    fn formats_rfc3339_seconds() {
        let t = Timestamp::from_second(1_800_000_000).unwrap();
        assert_eq!(rfc3339(t), "2027-01-15T08:00:00Z");
    }

    #[test]
    fn millisecond_times_round_trip() {
        let t = Timestamp::from_millisecond(1_800_000_000_250).unwrap();
        assert_eq!(rfc3339_millis(t), "2027-01-15T08:00:00.250Z");
        assert_eq!(parse_time(&rfc3339_millis(t)), Some(t));
        assert_eq!(
            parse_time("2027-01-15T09:00:00+01:00"),
            Some(Timestamp::from_second(1_800_000_000).unwrap())
        );
        assert_eq!(parse_time("2027-02-30T00:00:00Z"), None);
        assert_eq!(parse_time("soon"), None);
    }
}
