//! The fast path for writing a result record.
//!
//! A window's close hands every result to its transaction as JSON, and the
//! largest close of a second (~1,700 results) sits on the p99 record's way
//! to Kafka: serde_json's generic path (a serializer call per field, a
//! `Vec` per record) took ~1 µs per result there. [`write`] emits the same
//! bytes straight into a caller's buffer: the fields in declaration order
//! under their camelCase names, the `kind` tag first, strings escaped the
//! way serde_json escapes them (`"`, `\` and control characters only),
//! integers through `itoa`, the score through `zmij` (serde_json's own
//! float writer; `null` when it is not finite). Property-tested against
//! `serde_json::to_vec`.

use super::{ExpiryReason, MatchResult, MatchedUser};

/// Appends `result`'s JSON to `out`: byte for byte what
/// `serde_json::to_vec(result)` returns.
pub(super) fn write(result: &MatchResult, out: &mut Vec<u8>) {
    match result {
        MatchResult::Matched {
            match_id,
            segment,
            window_start,
            window_end,
            partition,
            scorer,
            score,
            users,
            closed_at,
        } => {
            out.extend_from_slice(br#"{"kind":"matched","matchId":"#);
            string(out, match_id);
            out.extend_from_slice(br#","segment":"#);
            string(out, segment);
            out.extend_from_slice(br#","windowStart":"#);
            integer(out, *window_start);
            out.extend_from_slice(br#","windowEnd":"#);
            integer(out, *window_end);
            out.extend_from_slice(br#","partition":"#);
            integer(out, *partition);
            out.extend_from_slice(br#","scorer":"#);
            string(out, scorer);
            out.extend_from_slice(br#","score":"#);
            float(out, *score);
            out.extend_from_slice(br#","users":["#);
            user(out, &users[0]);
            out.push(b',');
            user(out, &users[1]);
            out.extend_from_slice(br#"],"closedAt":"#);
            integer(out, *closed_at);
            out.push(b'}');
        }
        MatchResult::Expired {
            request_id,
            user,
            segment,
            partition,
            event_time,
            windows,
            reason,
            closed_at,
        } => {
            out.extend_from_slice(br#"{"kind":"expired","requestId":"#);
            string(out, request_id);
            out.extend_from_slice(br#","user":"#);
            string(out, user);
            out.extend_from_slice(br#","segment":"#);
            string(out, segment);
            out.extend_from_slice(br#","partition":"#);
            integer(out, *partition);
            out.extend_from_slice(br#","eventTime":"#);
            integer(out, *event_time);
            out.extend_from_slice(br#","windows":"#);
            integer(out, *windows);
            out.extend_from_slice(match reason {
                ExpiryReason::NoPartner => br#","reason":"noPartner""#.as_slice(),
                ExpiryReason::TooLate => br#","reason":"tooLate""#.as_slice(),
            });
            out.extend_from_slice(br#","closedAt":"#);
            integer(out, *closed_at);
            out.push(b'}');
        }
    }
}

fn user(out: &mut Vec<u8>, u: &MatchedUser) {
    out.extend_from_slice(br#"{"requestId":"#);
    string(out, &u.request_id);
    out.extend_from_slice(br#","user":"#);
    string(out, &u.user);
    out.extend_from_slice(br#","eventTime":"#);
    integer(out, u.event_time);
    out.push(b'}');
}

fn integer(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn float(out: &mut Vec<u8>, x: f32) {
    if x.is_finite() {
        out.extend_from_slice(zmij::Buffer::new().format_finite(x).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// A JSON string: runs of bytes that need no escape are copied whole (ids
/// and names almost never need one).
fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(r: &MatchResult) -> Vec<u8> {
        let mut out = Vec::new();
        write(r, &mut out);
        out
    }

    /// Any text, with quotes, backslashes and control characters common.
    fn arb_text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                4 => any::<char>(),
                2 => prop::sample::select(vec!['"', '\\', '\n', '\t', '\u{0}', '\u{1f}', '\u{7f}', '/', '\u{8}', '\u{c}', '\r']),
                4 => prop::char::range('a', 'z'),
            ],
            0..12,
        )
        .prop_map(|c| c.into_iter().collect())
    }

    fn arb_score() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => -1.0f32..1.0,
            2 => any::<f32>(),
            1 => prop::sample::select(vec![0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE, 1e-45, f32::MAX]),
        ]
    }

    fn arb_user() -> impl Strategy<Value = MatchedUser> {
        (arb_text(), arb_text(), any::<i64>()).prop_map(|(request_id, user, event_time)| {
            MatchedUser {
                request_id,
                user,
                event_time,
            }
        })
    }

    fn arb_result() -> impl Strategy<Value = MatchResult> {
        let matched = (
            (
                arb_text(),
                arb_text(),
                any::<i64>(),
                any::<i64>(),
                any::<i32>(),
            ),
            (
                arb_text(),
                arb_score(),
                arb_user(),
                arb_user(),
                any::<i64>(),
            ),
        )
            .prop_map(
                |(
                    (match_id, segment, window_start, window_end, partition),
                    (scorer, score, a, b, closed_at),
                )| MatchResult::Matched {
                    match_id,
                    segment,
                    window_start,
                    window_end,
                    partition,
                    scorer,
                    score,
                    users: [a, b],
                    closed_at,
                },
            );
        let expired = (
            (arb_text(), arb_text(), arb_text(), any::<i32>()),
            (any::<i64>(), any::<u32>(), any::<bool>(), any::<i64>()),
        )
            .prop_map(
                |(
                    (request_id, user, segment, partition),
                    (event_time, windows, late, closed_at),
                )| {
                    MatchResult::Expired {
                        request_id,
                        user,
                        segment,
                        partition,
                        event_time,
                        windows,
                        reason: if late {
                            ExpiryReason::TooLate
                        } else {
                            ExpiryReason::NoPartner
                        },
                        closed_at,
                    }
                },
            );
        prop_oneof![matched, expired]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn results_are_written_as_serde_writes_them(r in arb_result()) {
            let ours = encoded(&r);
            let theirs = serde_json::to_vec(&r).unwrap();
            prop_assert_eq!(
                &ours, &theirs,
                "{} / {}", String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs)
            );
        }
    }

    #[test]
    fn a_result_is_appended_to_what_the_buffer_holds() {
        let r = MatchResult::Expired {
            request_id: "r\u{1}\"1".into(),
            user: "u-1".into(),
            segment: "eu".into(),
            partition: 3,
            event_time: -5,
            windows: 2,
            reason: ExpiryReason::NoPartner,
            closed_at: 1_764_000_000_000,
        };
        let mut out = b"[".to_vec();
        write(&r, &mut out);
        out.push(b']');
        let back: Vec<MatchResult> = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, vec![r]);
    }
}
