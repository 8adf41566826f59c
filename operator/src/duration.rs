//! Durations as people write them (`spec.slo.maxLatency`) and read them
//! (`status.p50`, `status.p99`).

/// Parses `500ms`, `90s`, `10m`, `2h` (the CRD's pattern `^[0-9]+(ms|s|m|h)$`)
/// into milliseconds. `None` for anything else, including overflow.
pub fn parse_millis(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, unit_ms) = if let Some(d) = s.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1_000)
    } else if let Some(d) = s.strip_suffix('m') {
        (d, 60_000)
    } else if let Some(d) = s.strip_suffix('h') {
        (d, 3_600_000)
    } else {
        return None;
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(unit_ms)
}

/// A latency for a person: `850ms`, `2.3s`, `4m10s`, `2h5m`.
pub fn format_millis(ms: u64) -> String {
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    // Seconds with one decimal, rounded; 59.96s would print as "60.0s", so
    // anything that rounds to a minute goes to the next form.
    let tenths = ms.saturating_add(50) / 100;
    if tenths < 600 {
        let (s, t) = (tenths / 10, tenths % 10);
        return if t == 0 {
            format!("{s}s")
        } else {
            format!("{s}.{t}s")
        };
    }
    let secs = ms.saturating_add(500) / 1_000;
    if secs < 3_600 {
        let (m, s) = (secs / 60, secs % 60);
        return if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{s}s")
        };
    }
    let mins = secs.saturating_add(30) / 60;
    let (h, m) = (mins / 60, mins % 60);
    if m == 0 {
        format!("{h}h")
    } else {
        format!("{h}h{m}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_crd_forms() {
        assert_eq!(parse_millis("500ms"), Some(500));
        assert_eq!(parse_millis("90s"), Some(90_000));
        assert_eq!(parse_millis("10m"), Some(600_000));
        assert_eq!(parse_millis("2h"), Some(7_200_000));
        assert_eq!(parse_millis("0s"), Some(0));
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "ms",
            "s",
            "10",
            "1.5s",
            "-1s",
            "10x",
            "1d",
            "1m30s",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_millis(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_millis(0), "0ms");
        assert_eq!(format_millis(850), "850ms");
        assert_eq!(format_millis(999), "999ms");
        assert_eq!(format_millis(1_000), "1s");
        assert_eq!(format_millis(2_300), "2.3s");
        assert_eq!(format_millis(2_349), "2.3s");
        assert_eq!(format_millis(59_900), "59.9s");
        assert_eq!(format_millis(59_960), "1m");
        assert_eq!(format_millis(250_000), "4m10s");
        assert_eq!(format_millis(600_000), "10m");
        assert_eq!(format_millis(3_599_600), "1h");
        assert_eq!(format_millis(7_500_000), "2h5m");
        assert!(format_millis(u64::MAX).ends_with(['h', 'm'])); // no overflow panic
    }
}
