//! Tests of [`PartitionEngine`]: the semantics case by case, then two
//! properties over random operation sequences — restoring from the
//! changelog at any point changes nothing, and every request is settled
//! exactly once within the rules.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use matchfleet_api::feedback::{FeedbackSample, Label, MatchOutcome};
use matchfleet_api::match_pipeline::{
    BuiltinScorer, FeatureSpec, FeedbackSpec, HttpScorerSpec, MatchSettings, MatchingSpec,
    ScorerSpec, WindowSpec,
};
use matchfleet_api::matching::{
    mutually_acceptable, ExpiryReason, MatchRequest, MatchResult, Preferences, Profile,
};
use proptest::prelude::*;

use super::cooldown::UserPair;
use super::*;

fn builtin(name: &str, b: BuiltinScorer) -> ScorerSpec {
    ScorerSpec {
        name: name.into(),
        builtin: Some(b),
        http: None,
    }
}

fn http(name: &str) -> ScorerSpec {
    ScorerSpec {
        name: name.into(),
        builtin: None,
        http: Some(HttpScorerSpec {
            url: "http://scorer:8080/score".into(),
            timeout_millis: 50,
        }),
    }
}

fn settings() -> MatchSettings {
    MatchSettings {
        features: FeatureSpec { dimension: 2 },
        window: WindowSpec {
            size_millis: 1000,
            out_of_order_millis: 200,
            allowed_lateness_millis: 1500,
            idle_millis: 1000,
        },
        matching: MatchingSpec {
            max_wait_windows: 3,
            rematch_cooldown_seconds: 10,
            exact_below: 8,
            min_score: -1.0,
        },
        scorers: vec![builtin("cosine", BuiltinScorer::Cosine)],
        feedback: None,
    }
}

/// The k-th segment of partition p to open a window has its windows start
/// `window_phase(p, k, w)` after each multiple of `w`; the tests below use
/// partition 0 and one segment (phase 0) unless they are about the phase,
/// so their window bounds read as round numbers.
const PARTITION: i32 = 0;

fn engine(s: &MatchSettings) -> PartitionEngine {
    PartitionEngine::new(PARTITION, EngineConfig::from_settings(s).unwrap())
}

/// A request accepting anyone 18–99 of the other gender (`f` ↔ `m`).
fn req(id: &str, user: &str, t: i64, gender: &str, vector: [f32; 2]) -> MatchRequest {
    let other = if gender == "f" { "m" } else { "f" };
    MatchRequest {
        request_id: id.into(),
        user: user.into(),
        segment: "s".into(),
        event_time: t,
        vector: vector.to_vec(),
        profile: Profile {
            gender: gender.into(),
            age: 30,
        },
        wants: Preferences {
            genders: vec![other.into()],
            min_age: 18,
            max_age: 99,
        },
    }
}

fn none() -> HashMap<WindowId, Vec<f32>> {
    HashMap::new()
}

thread_local! {
    /// The request partition of the case tests: every request offered to an
    /// engine, at its offset (each test runs on its own thread).
    static SOURCE: RefCell<Vec<MatchRequest>> = const { RefCell::new(Vec::new()) };
}

/// Appends `r` to the test's request partition; its offset.
fn append(r: &MatchRequest) -> i64 {
    SOURCE.with(|s| {
        let mut s = s.borrow_mut();
        s.push(r.clone());
        s.len() as i64 - 1
    })
}

fn ingest(e: &mut PartitionEngine, r: MatchRequest, now: i64) -> Option<MatchResult> {
    let offset = append(&r);
    e.ingest(r, offset, now).expect("a valid request")
}

/// Ingests `r` (pending, at now 0); its offset.
fn ingest_at(e: &mut PartitionEngine, r: MatchRequest) -> i64 {
    let offset = append(&r);
    assert_eq!(e.ingest(r, offset, 0), Ok(None));
    offset
}

/// Finishes a restore from `source` (the requests by offset), as the worker
/// does from the request partition.
fn replay(restoring: Restoring, source: &[MatchRequest]) -> Result<PartitionEngine, RestoreError> {
    let wanted: Vec<(i64, MatchRequest)> = restoring
        .replay_range()
        .map(|(first, last)| {
            (first..=last)
                .filter(|&o| restoring.wants(o))
                .filter_map(|o| Some((o, source.get(usize::try_from(o).ok()?)?.clone())))
                .collect()
        })
        .unwrap_or_default();
    restoring.finish(wanted)
}

/// Restores from `log` and the test's request partition.
fn restore(
    partition: i32,
    config: EngineConfig,
    log: Vec<(String, Option<Vec<u8>>)>,
) -> Result<PartitionEngine, RestoreError> {
    let restoring = PartitionEngine::restore(partition, config, log)?;
    SOURCE.with(|s| replay(restoring, &s.borrow()))
}

fn matched_ids(results: &[MatchResult]) -> Vec<(String, String)> {
    results
        .iter()
        .filter_map(|r| match r {
            MatchResult::Matched { users, .. } => {
                Some((users[0].request_id.clone(), users[1].request_id.clone()))
            }
            MatchResult::Expired { .. } => None,
        })
        .collect()
}

#[test]
fn a_partition_s_windows_start_at_its_phase() {
    let s = settings();
    let partition = 1;
    let phase = super::window::window_phase(partition, 0, 1000);
    assert!(phase > 0, "partition 1 is staggered");
    let mut e = PartitionEngine::new(partition, EngineConfig::from_settings(&s).unwrap());
    // Both before and after the multiple of 1000 that aligned windows would
    // split them at: one window, [phase, phase + 1000).
    assert!(ingest(&mut e, req("r1", "bob", phase + 10, "m", [1.0, 0.0]), 0).is_none());
    assert!(ingest(&mut e, req("r2", "ann", phase + 990, "f", [1.0, 0.0]), 0).is_none());
    // Watermark phase + 999: not due yet.
    ingest(&mut e, req("r3", "cat", phase + 1199, "f", [1.0, 0.0]), 0);
    assert!(e.close(0, &none()).is_empty());
    ingest(&mut e, req("r4", "dan", phase + 1200, "m", [1.0, 0.0]), 0);
    let results = e.close(0, &none());
    let [MatchResult::Matched {
        window_start,
        window_end,
        partition: p,
        ..
    }] = results.as_slice()
    else {
        panic!("{results:?}");
    };
    assert_eq!(
        (*window_start, *window_end, *p),
        (phase, phase + 1000, partition)
    );
    assert_eq!(matched_ids(&results), vec![("r2".into(), "r1".into())]);
}

#[test]
fn a_partition_s_segments_close_at_staggered_phases() {
    let mut e = engine(&settings());
    let second = super::window::window_phase(PARTITION, 1, 1000);
    assert!((200..800).contains(&second), "{second}");
    // "s" opens the partition's first grid (phase 0), "t" its second.
    ingest_at(&mut e, req("s1", "bob", 10, "m", [1.0, 0.0]));
    ingest_at(&mut e, req("s2", "ann", 20, "f", [1.0, 0.0]));
    let t = |id: &str, user: &str, at: i64, gender: &str| MatchRequest {
        segment: "t".into(),
        ..req(id, user, at, gender, [1.0, 0.0])
    };
    ingest_at(&mut e, t("t1", "cal", second + 10, "m"));
    ingest_at(&mut e, t("t2", "dee", second + 20, "f"));
    // Watermark 1000: "s"'s [0, 1000) is due, "t"'s window is not.
    ingest(&mut e, req("s3", "eve", 1200, "f", [1.0, 0.0]), 0);
    let results = e.close(0, &none());
    assert_eq!(matched_ids(&results), vec![("s2".into(), "s1".into())]);
    // Watermark second + 1000: now "t"'s, [second, second + 1000).
    ingest(&mut e, t("t3", "fay", second + 1200, "f"), 0);
    let results = e.close(0, &none());
    let ids = matched_ids(&results);
    assert!(ids == [("t1".into(), "t2".into())] || ids == [("t2".into(), "t1".into())]);
    let [MatchResult::Matched { window_start, .. }] = results.as_slice() else {
        panic!("{results:?}");
    };
    assert_eq!(*window_start, second);
}

#[test]
fn state_written_before_staggering_keeps_its_aligned_windows() {
    let s = settings();
    let config = EngineConfig::from_settings(&s).unwrap();
    // Partition 1's state as a worker without staggering wrote it: phase-0
    // windows (and a meta record with a `windowPhase` of 0, as one worker
    // version wrote: ignored, the grid is read off the windows).
    let mut old = PartitionEngine::new(0, config.clone());
    ingest_at(&mut old, req("r1", "bob", 10, "m", [1.0, 0.0]));
    let log: Vec<_> = old
        .take_changes()
        .into_iter()
        .map(|(key, value)| {
            let value = value.map(|v| {
                let mut json: serde_json::Value = serde_json::from_slice(&v).unwrap();
                if key == "m" {
                    json["windowPhase"] = 0.into();
                }
                serde_json::to_vec(&json).unwrap()
            });
            (key, value)
        })
        .collect();
    let partition = 1;
    let phase = super::window::window_phase(partition, 0, 1000);
    assert!((11..990).contains(&phase), "10 and 990 straddle it");

    let mut e = restore(partition, config, log).unwrap();
    // On partition 1's own grid r2 would wait in [phase, phase + 1000), r1
    // in the window before: restored state keeps its grid, so they share [0, 1000).
    ingest_at(&mut e, req("r2", "ann", 990, "f", [1.0, 0.0]));
    ingest(&mut e, req("r3", "cat", 1200, "f", [1.0, 0.0]), 0);
    let results = e.close(0, &none());
    assert_eq!(matched_ids(&results), vec![("r2".into(), "r1".into())]);
    let [MatchResult::Matched { window_start, .. }] = results.as_slice() else {
        panic!("{results:?}");
    };
    assert_eq!(*window_start, 0);
}

#[test]
fn a_restored_partition_keeps_the_phase_its_state_was_written_with() {
    let config = EngineConfig::from_settings(&settings()).unwrap();
    let mut e = PartitionEngine::new(1, config.clone());
    let phase = super::window::window_phase(1, 0, 1000);
    ingest_at(&mut e, req("r1", "bob", phase + 10, "m", [1.0, 0.0]));
    // Restored as another partition (its phase differs): the windows stay.
    let mut e = restore(2, config, e.take_changes()).unwrap();
    ingest_at(&mut e, req("r2", "ann", phase + 990, "f", [1.0, 0.0]));
    ingest(&mut e, req("r3", "cat", phase + 1200, "f", [1.0, 0.0]), 0);
    let results = e.close(0, &none());
    let [MatchResult::Matched { window_start, .. }] = results.as_slice() else {
        panic!("{results:?}");
    };
    assert_eq!(*window_start, phase);
}

#[test]
fn a_segment_with_nothing_pending_keeps_the_grid_of_its_last_close() {
    let config = EngineConfig::from_settings(&settings()).unwrap();
    let mut e = PartitionEngine::new(PARTITION, config.clone());
    ingest_at(&mut e, req("r1", "bob", 10, "m", [1.0, 0.0]));
    ingest_at(&mut e, req("r2", "ann", 20, "f", [1.0, 0.0]));
    ingest(&mut e, req("r3", "cat", 1200, "f", [1.0, 0.0]), 0);
    assert_eq!(e.close(0, &none()).len(), 1);
    let mut log = e.take_changes();
    // r3 settles too (expired, alone), so "s" has only `closedUntil` left.
    assert!(e.close(100_000, &none()).len() == 1);
    log.extend(e.take_changes());
    // Restored on partition 1, whose first grid is not phase 0.
    let phase = super::window::window_phase(1, 0, 1000);
    let mut e = restore(1, config, log).unwrap();
    assert!((11..990).contains(&phase), "10 and 990 straddle it");
    ingest_at(&mut e, req("r4", "dan", 200_010, "m", [1.0, 0.0]));
    ingest_at(&mut e, req("r5", "eve", 200_990, "f", [1.0, 0.0]));
    ingest(&mut e, req("r6", "fay", 205_000, "f", [1.0, 0.0]), 0);
    let results = e.close(0, &none());
    let matched: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            MatchResult::Matched { window_start, .. } => Some(*window_start),
            _ => None,
        })
        .collect();
    // r4 and r5 share the phase-0 window [200_000, 201_000), which on
    // partition 1's own grid they would straddle.
    assert_eq!(matched, vec![200_000], "{results:?}");
}

#[test]
fn a_window_closes_when_the_watermark_passes_its_end() {
    let mut e = engine(&settings());
    assert!(ingest(&mut e, req("r1", "bob", 100, "m", [1.0, 0.0]), 0).is_none());
    assert!(ingest(&mut e, req("r2", "ann", 900, "f", [1.0, 1.0]), 0).is_none());
    assert!(ingest(&mut e, req("r3", "cat", 1150, "f", [0.0, 1.0]), 0).is_none());
    assert_eq!(e.watermark(), Some(950));
    assert!(e.due(10).is_empty());
    assert!(e.close(10, &none()).is_empty());

    ingest(&mut e, req("r4", "dan", 1200, "m", [0.0, 1.0]), 20);
    assert_eq!(e.watermark(), Some(1000));
    let due = e.due(20);
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].id.start, due[0].end, due[0].scorer.as_str()),
        (0, 1000, "cosine")
    );
    assert!(due[0].http.is_none());

    let results = e.close(20, &none());
    assert_eq!(results.len(), 1, "{results:?}");
    let MatchResult::Matched {
        match_id,
        segment,
        window_start,
        window_end,
        partition,
        scorer,
        score,
        users,
        closed_at,
    } = &results[0]
    else {
        panic!("{results:?}");
    };
    assert_eq!(match_id.len(), 32);
    assert_eq!(
        (
            segment.as_str(),
            *window_start,
            *window_end,
            *partition,
            scorer.as_str(),
            *closed_at
        ),
        ("s", 0, 1000, PARTITION, "cosine", 20)
    );
    assert!(
        (score - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6,
        "{score}"
    );
    assert_eq!(
        (users[0].user.as_str(), users[1].user.as_str()),
        ("ann", "bob"),
        "sorted by user"
    );
    assert_eq!(users[1].event_time, 100);
    assert_eq!(e.pending(), 2, "r3 and r4 wait in window [1000, 2000)");
    let counters = e.counters();
    assert_eq!(
        (
            counters["requests"],
            counters["matched"],
            counters["expired"]
        ),
        (4, 1, 0)
    );
}

#[test]
fn the_idle_rule_closes_the_last_windows() {
    let mut e = engine(&settings());
    ingest(&mut e, req("r1", "bob", 100, "m", [1.0, 0.0]), 5000);
    ingest(&mut e, req("r2", "ann", 200, "f", [1.0, 0.0]), 5000);
    assert!(
        e.close(5999, &none()).is_empty(),
        "not idle for 1000 ms yet"
    );
    // Idle: watermark = now - 1000 - 200, and at 2200 it would reach 1000;
    // at 5999 it is already far past, but the idle time is what counts.
    let results = e.close(6000, &none());
    assert_eq!(matched_ids(&results), vec![("r2".into(), "r1".into())]);
    assert_eq!(e.watermark(), Some(4800));
}

#[test]
fn late_requests_join_the_next_open_window_or_expire() {
    let mut e = engine(&settings());
    ingest(&mut e, req("r1", "bob", 100, "m", [1.0, 0.0]), 0);
    ingest(&mut e, req("r2", "ann", 2300, "f", [1.0, 0.0]), 0);
    // Watermark 2100: window [0, 1000) closes, r1 carried to [1000, 2000),
    // which is due too and closes in the same call: r1 has waited 2.
    assert!(e.close(0, &none()).is_empty());
    assert_eq!(e.pending(), 2);

    // t = 700: window [0, 1000) is closed, 1400 late (allowed 1500): joins
    // the earliest open window [2000, 3000) with r1 and r2.
    assert!(ingest(&mut e, req("r3", "cat", 700, "f", [1.0, 0.0]), 0).is_none());
    // t = 500: 1600 late: expired at once.
    let late = ingest(&mut e, req("r4", "dan", 500, "m", [1.0, 0.0]), 0);
    assert_eq!(
        late,
        Some(MatchResult::Expired {
            request_id: "r4".into(),
            user: "dan".into(),
            segment: "s".into(),
            partition: PARTITION,
            event_time: 500,
            windows: 0,
            reason: ExpiryReason::TooLate,
            closed_at: 0,
        })
    );
    let results = e.close(10_000, &none());
    // r1 (waited most) meets r2 or r3; both f, same vector: the tie goes to the
    // lower window index, r2 (ingested first). r3 carries on alone and expires.
    assert_eq!(matched_ids(&results)[0], ("r2".into(), "r1".into()));
    assert!(results.iter().any(|r| matches!(r,
        MatchResult::Expired { request_id, reason: ExpiryReason::NoPartner, windows: 3, .. } if request_id == "r3")));
    assert_eq!(e.pending(), 0);
    assert_eq!(e.counters()["expired"], 2);
}

#[test]
fn leftovers_carry_over_and_expire_after_max_wait_windows() {
    let mut e = engine(&settings());
    ingest(&mut e, req("r1", "bob", 100, "m", [1.0, 0.0]), 0);
    ingest(&mut e, req("r2", "joe", 150, "m", [1.0, 0.0]), 0);
    ingest(&mut e, req("r3", "ann", 1100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("r4", "max", 2500, "m", [1.0, 0.0]), 0);
    // Watermark 2300: window 0 has two men (no pair): both carried into
    // [1000, 2000) where ann takes one of them (a tie: the DP keeps the
    // lowest index unmatched); the other carries on.
    let results = e.close(0, &none());
    assert_eq!(matched_ids(&results), vec![("r3".into(), "r2".into())]);
    assert_eq!(e.pending(), 2);
    // Idle far ahead: r1 (2 windows) expires after its third, r4 after 3.
    let results = e.close(100_000, &none());
    let expired: BTreeMap<String, u32> = results
        .iter()
        .filter_map(|r| match r {
            MatchResult::Expired {
                request_id,
                windows,
                reason: ExpiryReason::NoPartner,
                ..
            } => Some((request_id.clone(), *windows)),
            _ => None,
        })
        .collect();
    assert_eq!(
        expired,
        BTreeMap::from([("r1".into(), 3), ("r4".into(), 3)])
    );
}

#[test]
fn requests_carried_over_join_the_next_window_s_prescoring() {
    let mut s = settings();
    s.matching.exact_below = 0;
    let config = EngineConfig::from_settings(&s)
        .unwrap()
        .with_prescore_from(0);
    let mut e = PartitionEngine::new(PARTITION, config);
    // [0, 1000): three men and a woman: one pair, two men carried over.
    for (id, user, t, g) in [
        ("r1", "bob", 100, "m"),
        ("r2", "joe", 150, "m"),
        ("r3", "max", 200, "m"),
        ("r4", "ann", 300, "f"),
    ] {
        ingest(&mut e, req(id, user, t, g, [1.0, 0.0]), 0);
    }
    e.prescore();
    ingest(&mut e, req("r5", "eve", 1300, "f", [1.0, 0.0]), 0);
    let matched = |results: &[MatchResult]| {
        results
            .iter()
            .filter(|r| matches!(r, MatchResult::Matched { .. }))
            .count()
    };
    assert_eq!(matched(&e.close(0, &none())), 1);
    assert_eq!((e.windows_closed(), e.windows_prescored()), (1, 1));
    e.prescore();
    ingest(&mut e, req("r6", "sue", 1400, "f", [0.0, 1.0]), 0);
    e.prescore();
    // [1000, 2000): eve and sue take the two carried men, matched from the
    // lists kept while it filled, the carried men's included.
    ingest(&mut e, req("r7", "tom", 2300, "m", [1.0, 0.0]), 0);
    assert_eq!(
        e.windows_presorted(),
        0,
        "no window closed yet after its end"
    );
    // Event time is past the window's end: its edges are sorted now.
    e.prescore();
    assert_eq!(matched(&e.close(0, &none())), 2);
    assert_eq!((e.windows_closed(), e.windows_prescored()), (2, 2));
    assert_eq!(
        e.windows_presorted(),
        1,
        "the first window closed before its presort"
    );
}

#[test]
fn a_user_takes_part_once_per_window() {
    let mut e = engine(&settings());
    ingest(&mut e, req("u1", "ann", 100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("u2", "ann", 200, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("p1", "bob", 300, "m", [1.0, 0.0]), 0);
    ingest(&mut e, req("p2", "joe", 400, "m", [0.0, 1.0]), 0);
    ingest(&mut e, req("x", "zed", 1300, "m", [0.0, 1.0]), 0);
    let results = e.close(0, &none());
    // Window 0: ann's first request takes part and gets bob; u2 is held back.
    assert_eq!(matched_ids(&results), vec![("u1".into(), "p1".into())]);
    // Window [1000, 2000): u2 (held back) with joe (left over) and zed.
    let results = e.close(100_000, &none());
    let pairs = matched_ids(&results);
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].0, "u2");
    let expired: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            MatchResult::Expired {
                request_id,
                windows,
                ..
            } => Some((request_id.as_str(), *windows)),
            _ => None,
        })
        .collect();
    assert_eq!(expired.len(), 1, "{results:?}");
}

#[test]
fn cooldown_blocks_a_rematch_until_it_ends() {
    let mut s = settings();
    s.matching.rematch_cooldown_seconds = 3;
    s.matching.max_wait_windows = 1;
    let mut e = engine(&s);
    ingest(&mut e, req("a1", "ann", 100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("b1", "bob", 100, "m", [1.0, 0.0]), 0);
    ingest(&mut e, req("a2", "ann", 1100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("b2", "bob", 1100, "m", [1.0, 0.0]), 0);
    ingest(&mut e, req("z", "zed", 2300, "m", [1.0, 0.0]), 0);
    let results = e.close(0, &none());
    // Window 0 matches ann and bob until 1000 + 3000 = 4000: in window
    // [1000, 2000) they may not meet again and both expire.
    assert_eq!(matched_ids(&results), vec![("a1".into(), "b1".into())]);
    assert_eq!(results.len(), 3, "{results:?}");
    assert_eq!(e.cooldowns(), 1);
    // From window [4000, 5000) on they may.
    ingest(&mut e, req("a3", "ann", 3100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("b3", "bob", 3200, "m", [1.0, 0.0]), 0);
    ingest(&mut e, req("a4", "ann", 4100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("b4", "bob", 4200, "m", [1.0, 0.0]), 0);
    let results = e.close(100_000, &none());
    assert_eq!(
        matched_ids(&results),
        vec![("a4".into(), "b4".into())],
        "{results:?}"
    );
    // The first cooldown ended (≤ watermark) and was dropped; the new one
    // (5000 + 3000) is far below the idle watermark too.
    assert_eq!(e.cooldowns(), 0);
    assert_eq!(
        e.users(),
        0,
        "no request pending, no cooldown: no user held"
    );
}

#[test]
fn min_score_and_preferences_are_respected() {
    let mut s = settings();
    s.matching.min_score = 0.5;
    let mut e = engine(&s);
    ingest(&mut e, req("a", "ann", 100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("b", "bob", 100, "m", [0.0, 1.0]), 0); // cosine 0 with ann
    let mut c = req("c", "cat", 100, "f", [0.0, 1.0]);
    c.profile.age = 17; // bob wants 18+
    ingest(&mut e, c, 0);
    ingest(&mut e, req("d", "dan", 100, "m", [1.0, 0.1]), 0);
    let results = e.close(100_000, &none());
    assert_eq!(matched_ids(&results), vec![("a".into(), "d".into())]);
}

#[test]
fn http_scores_are_used_when_they_fit_the_window() {
    let mut s = settings();
    s.scorers = vec![
        http("remote"),
        builtin("opposites", BuiltinScorer::Complement),
    ];
    let setup = || {
        let mut e = engine(&s);
        // Make sure the bandit picks the HTTP arm: it alone was rewarded.
        for _ in 0..200 {
            e.record_reward("s", "remote", 1.0);
            e.record_reward("s", "opposites", 0.0);
        }
        ingest(&mut e, req("a", "ann", 100, "f", [1.0, 0.0]), 0);
        ingest(&mut e, req("b", "bob", 100, "m", [1.0, 0.0]), 0);
        ingest(&mut e, req("c", "cat", 100, "f", [0.0, 1.0]), 0);
        e
    };
    let mut e = setup();
    let due = e.due(100_000);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].scorer, "remote");
    let h = due[0].http.clone().expect("an HTTP window");
    assert_eq!(h.request_ids, vec!["a", "b", "c"]);
    assert_eq!(h.vectors[2], vec![0.0, 1.0]);
    assert_eq!(
        (h.url.as_str(), h.timeout_millis),
        ("http://scorer:8080/score", 50)
    );
    // The HTTP scorer prefers cat with bob (0.9) over ann with bob (0.1).
    let answer = vec![0.0, 0.1, 0.0, 0.1, 0.0, 0.9, 0.0, 0.9, 0.0];
    let external = HashMap::from([(due[0].id.clone(), answer.clone())]);
    let results = e.close(100_000, &external);
    assert_eq!(matched_ids(&results), vec![("b".into(), "c".into())]);
    assert!(
        matches!(&results[0], MatchResult::Matched { scorer, score, .. } if scorer == "remote" && (*score - 0.9).abs() < 1e-6)
    );

    // Missing, mis-sized or stale answers fall back to the first builtin
    // scorer, named in the result: complement pairs bob with cat (-0 > -1).
    for external in [
        HashMap::new(),
        HashMap::from([(due[0].id.clone(), vec![0.5; 4])]),
        HashMap::from([(
            WindowId {
                digest: due[0].id.digest ^ 1,
                ..due[0].id.clone()
            },
            answer.clone(),
        )]),
    ] {
        let mut e = setup();
        let results = e.close(100_000, &external);
        assert_eq!(matched_ids(&results), vec![("b".into(), "c".into())]);
        assert!(
            matches!(&results[0], MatchResult::Matched { scorer, .. } if scorer == "opposites")
        );
    }
}

#[test]
fn a_window_s_scorer_is_drawn_when_the_window_opens() {
    let mut s = settings();
    s.scorers = vec![
        builtin("cosine", BuiltinScorer::Cosine),
        builtin("opposites", BuiltinScorer::Complement),
    ];
    let mut e = PartitionEngine::new(0, EngineConfig::from_settings(&s).unwrap());
    ingest(&mut e, req("r1", "ann", 100, "f", [1.0, 0.0]), 0);
    // The draw is in the first delta, with the window's first request.
    let changes = e.take_changes();
    let record = changes
        .iter()
        .find(|(k, _)| k == "s/s")
        .and_then(|(_, v)| v.clone())
        .expect("the segment record carries the choice");
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let drawn = record["chosen"]["0"].as_str().unwrap().to_string();
    // Evidence for the other arm after the opening does not change it.
    let other = if drawn == "cosine" {
        "opposites"
    } else {
        "cosine"
    };
    for _ in 0..100 {
        assert!(e.record_reward("s", other, 1.0));
        assert!(e.record_reward("s", &drawn, 0.0));
    }
    ingest(&mut e, req("r2", "bob", 900, "m", [1.0, 0.0]), 0);
    let due = e.due(10_000);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].scorer, drawn);
}

#[test]
fn the_bandit_prefers_the_rewarded_scorer_and_chooses_deterministically() {
    let mut s = settings();
    s.scorers = vec![
        builtin("cosine", BuiltinScorer::Cosine),
        builtin("opposites", BuiltinScorer::Complement),
    ];
    let run = |partition: i32, rewards: bool| {
        let mut e = PartitionEngine::new(partition, EngineConfig::from_settings(&s).unwrap());
        if rewards {
            for _ in 0..50 {
                assert!(e.record_reward("s", "opposites", 0.9));
                assert!(e.record_reward("s", "cosine", 0.1));
            }
        }
        assert!(!e.record_reward("s", "nope", 1.0));
        assert!(!e.record_reward("s", "cosine", f64::NAN));
        let mut chosen = Vec::new();
        for w in 0..200i64 {
            ingest(
                &mut e,
                req(&format!("r{w}"), "u", w * 1000 + 1, "f", [1.0, 0.0]),
                0,
            );
        }
        for d in e.due(1_000_000) {
            chosen.push(d.scorer);
        }
        chosen
    };
    let a = run(1, true);
    assert_eq!(a.len(), 200);
    assert_eq!(a, run(1, true), "same state, same windows: same arms");
    let good = a.iter().filter(|s| *s == "opposites").count();
    assert!(good > 190, "rewarded arm chosen {good} of 200");
    let uninformed = run(1, false);
    let explored = uninformed.iter().filter(|s| *s == "opposites").count();
    assert!(
        (60..140).contains(&explored),
        "no evidence: both explored, {explored}"
    );
    assert_ne!(
        uninformed,
        run(2, false),
        "another partition draws differently"
    );
}

#[test]
fn refused_requests_change_nothing() {
    let mut e = engine(&settings());
    let mut bad = req("r1", "bob", 100, "m", [1.0, 0.0]);
    bad.vector.push(1.0);
    assert!(matches!(e.ingest(bad, 0, 0), Err(IngestError::Invalid(_))));
    let far = req("r1", "bob", i64::MAX, "m", [1.0, 0.0]);
    assert_eq!(
        e.ingest(far, 1, 0),
        Err(IngestError::EventTimeOutOfRange(i64::MAX))
    );
    ingest(&mut e, req("r1", "bob", 100, "m", [1.0, 0.0]), 0);
    assert_eq!(
        e.ingest(req("r1", "bob", 100, "m", [1.0, 0.0]), 99, 0),
        Err(IngestError::Duplicate("r1".into()))
    );
    e.record_dead_letter();
    let c = e.counters();
    assert_eq!((c["requests"], c["deadLettered"]), (1, 1));
    assert_eq!(e.pending(), 1);
}

#[test]
fn a_settled_request_s_id_is_free_again() {
    let mut e = engine(&settings());
    ingest(&mut e, req("a", "ann", 100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("b", "bob", 100, "m", [1.0, 0.2]), 0);
    ingest(&mut e, req("z", "zoe", 1300, "f", [1.0, 0.0]), 0);
    assert_eq!(
        matched_ids(&e.close(0, &none())),
        vec![("a".into(), "b".into())]
    );
    assert_eq!(e.pending(), 1);
    // Straight after the close (no `prescore` in between), as after one.
    assert_eq!(
        e.ingest(req("a", "ann", 1400, "f", [1.0, 0.0]), 5, 0),
        Ok(None)
    );
    assert_eq!(
        e.ingest(req("a", "ann", 1400, "f", [1.0, 0.0]), 6, 0),
        Err(IngestError::Duplicate("a".into()))
    );
    assert_eq!(e.pending(), 2);
}

#[test]
fn the_queue_names_pending_requests_by_offset_and_goes_when_empty() {
    let mut e = engine(&settings());
    ingest(&mut e, req("a", "ann", 100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("b", "bob", 100, "m", [1.0, 0.2]), 0);
    let c = ingest_at(&mut e, req("c", "cat", 100, "f", [0.0, 1.0]));
    let d = ingest_at(&mut e, req("d", "dan", 1300, "f", [1.0, 0.0]));
    assert_eq!(e.close(0, &none()).len(), 1);
    let changes = e.take_changes();
    let keys: Vec<&str> = changes
        .iter()
        .map(|(k, v)| {
            assert!(v.is_some(), "{k}: nothing to tombstone yet");
            k.as_str()
        })
        .collect();
    // Window [0, 1000) matched ann and bob: their cooldown ends 1000 + 10 s later.
    assert_eq!(keys, vec!["q/s/1000", "s/s", "d/11000/0", "m"]);
    let list = changes.iter().find(|(k, _)| k == "d/11000/0").unwrap();
    assert_eq!(
        changelog::decode(&list.0, list.1.as_deref().unwrap()).unwrap(),
        changelog::Record::Cooldowns(11_000, 0, vec![UserPair::new("ann", "bob")]),
    );
    let queue = changes.iter().find(|(k, _)| k == "q/s/1000").unwrap();
    let queued = |window, windows, offset| changelog::QueuedRequest {
        offset,
        window,
        windows,
    };
    assert_eq!(
        changelog::decode(&queue.0, queue.1.as_deref().unwrap()).unwrap(),
        changelog::Record::Queue("s".into(), vec![queued(1000, 1, c), queued(1000, 0, d)]),
        "c carried into d's window after one window; only offsets, no bodies"
    );
    assert!(e.take_changes().is_empty(), "nothing changed since");

    let results = e.close(100_000, &none());
    assert_eq!(results.len(), 2, "c and d expire: both women");
    let changes: BTreeMap<String, Option<Vec<u8>>> = e.take_changes().into_iter().collect();
    assert_eq!(changes["d/11000/0"], None, "cooldown over: tombstoned");
    assert_eq!(
        changes["q/s/1000"], None,
        "nothing pending: the queue is tombstoned"
    );
    assert!(changes["m"].is_some() && changes["s/s"].is_some());

    let restored = restore(PARTITION, e.config().clone(), Vec::new()).unwrap();
    assert_eq!(restored.pending(), 0);
}

#[test]
fn cooldowns_are_written_per_deadline_and_the_pair_format_is_rewritten() {
    use changelog::{encode_cooldown_list, Record};
    let config = EngineConfig::from_settings(&settings()).unwrap();
    let (xy, pq) = (UserPair::new("xi", "yu"), UserPair::new("pat", "quin"));
    let list = |until, pair: &UserPair| {
        Some(encode_cooldown_list(until, [(&*pair.0, &*pair.1)]).remove(0))
    };
    let legacy = changelog::encode(&changelog::CooldownRecord {
        users: ["dan".into(), "cat".into()],
        until: 11_000,
    });
    let mut log = vec![
        (r#"c/["cat","dan"]"#.to_string(), Some(legacy)),
        ("d/11000/0".to_string(), list(11_000, &xy)),
        ("d/11000/1".to_string(), list(11_000, &pq)),
        // Pat and quin matched again later: their old list still names them.
        ("d/12000/0".to_string(), list(12_000, &pq)),
    ];
    let mut e = restore(PARTITION, config.clone(), log.clone()).unwrap();
    assert_eq!(e.cooldowns(), 3);
    ingest(&mut e, req("a", "ann", 100, "f", [1.0, 0.0]), 0);
    ingest(&mut e, req("b", "bob", 100, "m", [1.0, 0.2]), 0);
    ingest(&mut e, req("z", "zoe", 1300, "f", [1.0, 0.0]), 0);
    assert_eq!(e.close(0, &none()).len(), 1);
    let changes = e.take_changes();
    let by_key: BTreeMap<&str, Option<&[u8]>> = changes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    assert_eq!(
        changelog::decode("d/11000/0", by_key["d/11000/0"].unwrap()).unwrap(),
        Record::Cooldowns(
            11_000,
            0,
            vec![UserPair::new("cat", "dan"), xy, UserPair::new("ann", "bob")]
        ),
        "the deadline's pairs in one record; pat and quin moved on"
    );
    assert_eq!(
        by_key["d/11000/1"], None,
        "a chunk no longer needed is tombstoned"
    );
    assert_eq!(
        by_key[r#"c/["cat","dan"]"#], None,
        "the pair record is retired"
    );
    assert!(!by_key.contains_key("d/12000/0"), "unchanged");

    log.extend(changes);
    let mut again = restore(PARTITION, config, log).unwrap();
    assert_eq!(again.cooldowns(), 4);
    assert!(again.take_changes().is_empty(), "nothing left to rewrite");
    assert_eq!(e.close(100_000, &none()).len(), 1, "zoe expires");
    assert_eq!(e.cooldowns(), 0);
    let changes: BTreeMap<String, Option<Vec<u8>>> = e.take_changes().into_iter().collect();
    assert_eq!(
        (&changes["d/11000/0"], &changes["d/12000/0"]),
        (&None, &None),
        "expired lists are tombstoned"
    );
    assert!(!changes.contains_key("d/11000/1"), "already tombstoned");
}

#[test]
fn restore_refuses_records_it_cannot_use() {
    let config = EngineConfig::from_settings(&settings()).unwrap();
    let bad = |records: Vec<(String, Option<Vec<u8>>)>| {
        PartitionEngine::restore(0, config.clone(), records).unwrap_err()
    };
    assert!(matches!(
        bad(vec![("x".into(), Some(b"{}".to_vec()))]),
        RestoreError::UnknownKey(_)
    ));
    assert!(matches!(
        bad(vec![("m".into(), Some(b"[".to_vec()))]),
        RestoreError::Decode { .. }
    ));

    // A pending request of another dimension (the pipeline's changed).
    let mut e = engine(&settings());
    let a = ingest_at(&mut e, req("a", "ann", 100, "f", [1.0, 0.0]));
    let log = e.take_changes();
    let mut s3 = settings();
    s3.features.dimension = 3;
    let err = restore(0, EngineConfig::from_settings(&s3).unwrap(), log.clone()).unwrap_err();
    assert!(
        matches!(err, RestoreError::Replay { offset, .. } if offset == a),
        "{err}"
    );
    // The request partition lost it (retention), or holds another segment there.
    let restoring = PartitionEngine::restore(0, config.clone(), log.clone()).unwrap();
    assert_eq!(restoring.replay_range(), Some((a, a)));
    let err = restoring.finish(Vec::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains("not found in the request partition"),
        "{err}"
    );
    let mut other = req("a", "ann", 100, "f", [1.0, 0.0]);
    other.segment = "t".into();
    let err = PartitionEngine::restore(0, config.clone(), log.clone())
        .unwrap()
        .finish([(a, other)])
        .unwrap_err();
    assert!(err.to_string().contains("segment"), "{err}");
    // A tombstone later in the log wins.
    let mut with_tombstone = log;
    with_tombstone.push(("q/s/0".into(), None));
    let e = restore(0, EngineConfig::from_settings(&s3).unwrap(), with_tombstone).unwrap();
    assert_eq!(e.pending(), 0);
}

#[test]
fn a_large_window_is_matched_greedily_without_losing_anyone() {
    let mut s = settings();
    s.features.dimension = 4;
    s.matching.exact_below = 4;
    let config = EngineConfig::from_settings(&s).unwrap().with_top_k(2);
    let mut e = PartitionEngine::new(0, config);
    let mut seen = HashSet::new();
    for i in 0..300u32 {
        let g = if i % 2 == 0 { "f" } else { "m" };
        let v = [
            (i % 7) as f32 - 3.0,
            (i % 5) as f32,
            (i % 3) as f32 + 0.5,
            1.0,
        ];
        let mut r = req(
            &format!("r{i}"),
            &format!("u{}", i % 250),
            100,
            g,
            [0.0, 0.0],
        );
        r.vector = v.to_vec();
        ingest(&mut e, r, 0);
        seen.insert(format!("r{i}"));
    }
    let results = e.close(100_000, &none());
    let mut settled = Vec::new();
    for r in &results {
        settled.extend(r.request_ids().into_iter().map(String::from));
    }
    settled.sort();
    let mut want: Vec<String> = seen.into_iter().collect();
    want.sort();
    assert_eq!(settled, want);
    assert!(
        matched_ids(&results).len() >= 140,
        "{}",
        matched_ids(&results).len()
    );
}

#[test]
fn outcomes_join_once_within_the_ttl_and_the_rest_is_counted() {
    let mut s = settings();
    s.feedback = Some(FeedbackSpec {
        topic: "outcomes".into(),
        rewards_topic: "samples".into(),
        ttl_seconds: 5,
        min_call_seconds: 40,
    });
    let mut e = engine(&s);
    for (id, user, g) in [
        ("r1", "ann", "f"),
        ("r2", "bob", "m"),
        ("r3", "cy", "f"),
        ("r4", "dan", "m"),
    ] {
        assert_eq!(
            ingest(&mut e, req(id, user, 10_100, g, [1.0, 0.0]), 10_100),
            None
        );
    }
    let results = e.close(12_200, &none());
    let ids: Vec<String> = results
        .iter()
        .filter_map(|r| match r {
            MatchResult::Matched { match_id, .. } => Some(match_id.clone()),
            MatchResult::Expired { .. } => None,
        })
        .collect();
    assert_eq!(ids.len(), 2, "{results:?}");
    assert_eq!(e.awaiting_outcome(), 2);
    let outcome = |id: &str, t: i64, call_seconds: u32| MatchOutcome {
        match_id: id.into(),
        segment: "s".into(),
        event_time: t,
        call_seconds,
        skipped: false,
    };
    // Window end 11,000, deadline 16,000.
    let Ok(OutcomeFate::Joined(sample)) = e.ingest_outcome(outcome(&ids[0], 12_000, 10), 12_000)
    else {
        panic!("the first on-time outcome joins");
    };
    assert_eq!(
        (sample.label, sample.reward, sample.partition),
        (Label::Bad, Some(0.25), PARTITION)
    );
    assert_eq!(sample.scorer, "cosine");
    let evidence = e.arm_evidence();
    assert_eq!(evidence.len(), 1);
    assert_eq!(
        (evidence[0].1.successes, evidence[0].1.failures),
        (0.25, 0.75)
    );
    assert_eq!(
        e.ingest_outcome(outcome(&ids[0], 12_100, 90), 12_100),
        Ok(OutcomeFate::Duplicate)
    );
    assert_eq!(
        e.ingest_outcome(outcome(&ids[1], 16_001, 90), 12_200),
        Ok(OutcomeFate::Late)
    );
    assert_eq!(
        e.ingest_outcome(outcome("nope", 12_300, 90), 12_300),
        Ok(OutcomeFate::Unknown)
    );
    let mut wrong_segment = outcome(&ids[1], 12_400, 90);
    wrong_segment.segment = "t".into();
    assert!(matches!(
        e.ingest_outcome(wrong_segment, 12_400),
        Err(OutcomeError::SegmentMismatch { .. })
    ));
    assert!(matches!(
        e.ingest_outcome(outcome(&ids[1], i64::MAX, 90), 12_500),
        Err(OutcomeError::EventTimeOutOfRange(_))
    ));

    // A restart keeps the join: the duplicate is still one.
    let log = e.take_changes();
    assert!(log.iter().any(|(k, v)| k.starts_with("j/") && v.is_some()));
    let mut e = restore(PARTITION, e.config().clone(), log.clone()).unwrap();
    assert_eq!(
        e.ingest_outcome(outcome(&ids[0], 12_600, 90), 12_600),
        Ok(OutcomeFate::Duplicate)
    );

    // The outcome watermark (16,001 − 200) has not passed 16,000 yet; the
    // request clock idles on the wall clock (now − 1,000 − 200) past it.
    assert_eq!(e.settle_feedback(12_700), vec![]);
    let late: Vec<FeedbackSample> = e.settle_feedback(17_201);
    assert_eq!(
        late.len(),
        1,
        "only the match without an outcome gets a sample now"
    );
    assert_eq!(
        (late[0].match_id.as_str(), late[0].label, late[0].reward),
        (ids[1].as_str(), Label::NoOutcome, None)
    );
    assert_eq!(e.awaiting_outcome(), 0);
    let c = e.counters();
    assert_eq!(
        [
            c["outcomes"],
            c["joined"],
            c["outcomesDuplicate"],
            c["outcomesLate"],
            c["outcomesUnknown"],
            c["noOutcome"]
        ],
        [5, 1, 2, 1, 1, 1]
    );
    let tombstones = e.take_changes();
    assert_eq!(
        tombstones
            .iter()
            .filter(|(k, v)| k.starts_with("j/") && v.is_none())
            .count(),
        2
    );

    // Without a feedback join, outcomes are refused.
    let mut plain = engine(&settings());
    assert_eq!(
        plain.ingest_outcome(outcome("x", 1, 1), 1),
        Err(OutcomeError::NoFeedback)
    );
}

// ---- properties ----

#[derive(Debug, Clone)]
enum Op {
    Ingest {
        user: u8,
        segment: u8,
        dt: i64,
        gender: u8,
        age: u8,
        wants_any: bool,
        vector: (i8, i8),
    },
    Due {
        advance: i64,
    },
    Close {
        advance: i64,
        answer_http: bool,
    },
    Reward {
        segment: u8,
        scorer: u8,
        reward: f64,
    },
    /// An outcome for the `pick`-th match so far (none yet: an unknown id).
    Outcome {
        pick: u8,
        dt: i64,
        call_seconds: u32,
        skipped: bool,
    },
    Settle {
        advance: i64,
    },
    DeadLetter,
    TakeChanges,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..6, 0u8..2, -2500i64..1500, 0u8..2, 20u8..40, any::<bool>(), (-3i8..4, -3i8..4)).prop_map(
            |(user, segment, dt, gender, age, wants_any, vector)| Op::Ingest { user, segment, dt, gender, age, wants_any, vector }
        ),
        2 => (0i64..1500).prop_map(|advance| Op::Due { advance }),
        3 => (0i64..2500, any::<bool>()).prop_map(|(advance, answer_http)| Op::Close { advance, answer_http }),
        1 => (0u8..2, 0u8..4, 0.0f64..1.0).prop_map(|(segment, scorer, reward)| Op::Reward { segment, scorer, reward }),
        4 => (any::<u8>(), -1500i64..4500, 0u32..90, prop::bool::weighted(0.3)).prop_map(
            |(pick, dt, call_seconds, skipped)| Op::Outcome { pick, dt, call_seconds, skipped }
        ),
        2 => (0i64..3000).prop_map(|advance| Op::Settle { advance }),
        1 => Just(Op::DeadLetter),
        2 => Just(Op::TakeChanges),
        2 => Just(Op::Restart),
    ]
}

fn prop_settings(exact_below: i32) -> MatchSettings {
    let mut s = settings();
    s.matching.exact_below = exact_below;
    s.matching.rematch_cooldown_seconds = 2;
    s.matching.min_score = -0.5;
    s.scorers = vec![
        builtin("cosine", BuiltinScorer::Cosine),
        builtin("opposites", BuiltinScorer::Complement),
        http("remote"),
    ];
    s.feedback = Some(FeedbackSpec {
        topic: "outcomes".into(),
        rewards_topic: "samples".into(),
        ttl_seconds: 3,
        min_call_seconds: 30,
    });
    s
}

/// The outcome an `Op::Outcome` makes, given the matches (id, segment) so far.
fn prop_outcome(op: &Op, matches: &[(String, String)], now: i64) -> Option<MatchOutcome> {
    let Op::Outcome {
        pick,
        dt,
        call_seconds,
        skipped,
    } = *op
    else {
        return None;
    };
    let (match_id, segment) = match matches.len() {
        0 => ("nobody".to_string(), "s0".to_string()),
        n => matches[usize::from(pick) % n].clone(),
    };
    Some(MatchOutcome {
        match_id,
        segment,
        event_time: now + dt,
        call_seconds,
        skipped,
    })
}

fn match_ids(results: &[MatchResult]) -> impl Iterator<Item = (String, String)> + '_ {
    results.iter().filter_map(|r| match r {
        MatchResult::Matched {
            match_id, segment, ..
        } => Some((match_id.clone(), segment.clone())),
        MatchResult::Expired { .. } => None,
    })
}

fn prop_request(i: usize, op: &Op, now: i64) -> Option<MatchRequest> {
    let Op::Ingest {
        user,
        segment,
        dt,
        gender,
        age,
        wants_any,
        vector,
    } = *op
    else {
        return None;
    };
    let g = ["f", "m"][usize::from(gender)];
    let mut r = req(
        &format!("r{i}"),
        &format!("u{user}"),
        now + dt,
        g,
        [f32::from(vector.0), f32::from(vector.1)],
    );
    r.segment = format!("s{segment}");
    r.profile.age = age;
    r.wants.min_age = age.saturating_sub(8);
    r.wants.max_age = age + 8;
    if wants_any {
        r.wants.genders.clear();
    }
    Some(r)
}

/// Deterministic "HTTP" answers: a score per ordered pair from the ids.
fn answers(due: &[DueWindow]) -> HashMap<WindowId, Vec<f32>> {
    due.iter()
        .filter_map(|d| d.http.as_ref().map(|h| (d, h)))
        .map(|(d, h)| {
            let n = h.request_ids.len();
            let mut scores = vec![0.0; n * n];
            for (i, a) in h.request_ids.iter().enumerate() {
                for (j, b) in h.request_ids.iter().enumerate() {
                    let x = a.len() * 7
                        + b.len() * 3
                        + a.bytes().chain(b.bytes()).map(usize::from).sum::<usize>();
                    scores[i * n + j] = (x % 19) as f32 / 9.0 - 1.0;
                }
            }
            (d.id.clone(), scores)
        })
        .collect()
}

/// Everything observable an operation produced.
#[derive(Debug, PartialEq)]
enum Seen {
    Ingest(Result<Option<MatchResult>, IngestError>),
    Due(Vec<DueWindow>),
    Close(Vec<MatchResult>),
    Reward(bool),
    Outcome(Result<OutcomeFate, OutcomeError>),
    Settle(Vec<FeedbackSample>),
    Changes(Vec<(String, Option<Vec<u8>>)>),
    State(BTreeMap<String, u64>, Option<i64>, usize, usize, usize),
}

/// Runs `ops` on `engine`; `log` collects its changelog; `restart` rebuilds
/// it from the log at `Op::Restart` (else `take_changes` only); `prescore`
/// prescores after every ingest.
fn run(
    engine: &mut PartitionEngine,
    log: &mut Vec<(String, Option<Vec<u8>>)>,
    ops: &[Op],
    restart: bool,
    prescore: bool,
) -> Vec<Seen> {
    // The request partition: each ingested request at its offset.
    let mut source: Vec<MatchRequest> = Vec::new();
    let mut seen = Vec::new();
    let mut matches = Vec::new();
    let mut now = 10_000;
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Ingest { .. } => {
                now += 37;
                let r = prop_request(i, op, now).unwrap_or_else(|| unreachable!());
                let offset = source.len() as i64;
                source.push(r.clone());
                seen.push(Seen::Ingest(engine.ingest(r, offset, now)));
                if prescore {
                    engine.prescore();
                }
            }
            Op::Outcome { .. } => {
                now += 11;
                let o = prop_outcome(op, &matches, now).unwrap_or_else(|| unreachable!());
                seen.push(Seen::Outcome(engine.ingest_outcome(o, now)));
            }
            Op::Settle { advance } => {
                now += advance;
                seen.push(Seen::Settle(engine.settle_feedback(now)));
            }
            Op::Due { advance } => {
                now += advance;
                seen.push(Seen::Due(engine.due(now)));
            }
            Op::Close {
                advance,
                answer_http,
            } => {
                now += advance;
                let external = if *answer_http {
                    answers(&engine.due(now))
                } else {
                    HashMap::new()
                };
                let results = engine.close(now, &external);
                matches.extend(match_ids(&results));
                seen.push(Seen::Close(results));
            }
            Op::Reward {
                segment,
                scorer,
                reward,
            } => {
                let name = ["cosine", "opposites", "remote", "unknown"][usize::from(*scorer)];
                seen.push(Seen::Reward(engine.record_reward(
                    &format!("s{segment}"),
                    name,
                    *reward,
                )));
            }
            Op::DeadLetter => engine.record_dead_letter(),
            Op::TakeChanges | Op::Restart => {
                let changes = engine.take_changes();
                log.extend(changes.iter().cloned());
                seen.push(Seen::Changes(changes));
                if restart && matches!(op, Op::Restart) {
                    let restoring = PartitionEngine::restore(
                        engine.partition(),
                        engine.config().clone(),
                        log.clone(),
                    )
                    .expect("the engine's own changelog restores");
                    *engine = replay(restoring, &source)
                        .expect("the pending requests are in the request partition");
                }
            }
        }
        seen.push(Seen::State(
            engine.counters(),
            engine.watermark(),
            engine.pending(),
            engine.cooldowns(),
            engine.awaiting_outcome(),
        ));
    }
    seen
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Restoring from the changelog at any point (with deltas taken at
    /// arbitrary points before) gives an engine that behaves exactly as the
    /// one that never stopped: same results, same choices, same deltas.
    #[test]
    fn a_restored_engine_behaves_like_the_original(
        ops in prop::collection::vec(op(), 1..80),
        exact_below in prop::sample::select(vec![0, 3, 20]),
        top_k in 1usize..4,
    ) {
        let config = EngineConfig::from_settings(&prop_settings(exact_below)).unwrap().with_top_k(top_k);
        let mut original = PartitionEngine::new(3, config.clone());
        let mut restarted = PartitionEngine::new(3, config);
        let want = run(&mut original, &mut Vec::new(), &ops, false, false);
        let got = run(&mut restarted, &mut Vec::new(), &ops, true, false);
        prop_assert_eq!(got, want);
    }

    /// Windows scored while they fill (restarts included: the lists are
    /// rebuilt in another order) match exactly as windows scored at their
    /// close — ties, held-back requests, cooldowns and small K included.
    #[test]
    fn prescored_windows_match_as_scored_at_the_close(
        ops in prop::collection::vec(op(), 1..80),
        exact_below in prop::sample::select(vec![0, 3]),
        top_k in 1usize..4,
        from in 0usize..4,
        single in any::<bool>(),
    ) {
        // One builtin scorer, or the bandit over two builtin ones and an
        // HTTP one (its windows are scored at the close).
        let mut s = prop_settings(exact_below);
        if single {
            s.scorers = vec![builtin("cosine", BuiltinScorer::Cosine)];
        }
        let config = EngineConfig::from_settings(&s).unwrap().with_top_k(top_k);
        let mut at_close = PartitionEngine::new(3, config.clone().with_prescore_from(usize::MAX));
        let mut prescored = PartitionEngine::new(3, config.with_prescore_from(from));
        let want = run(&mut at_close, &mut Vec::new(), &ops, false, false);
        let got = run(&mut prescored, &mut Vec::new(), &ops, true, true);
        prop_assert_eq!(got, want);
    }

    /// Every accepted request is settled exactly once; within a window no
    /// user appears twice; matched pairs accept each other, reach minScore,
    /// and are not in cooldown by the spec's own rule (checked against an
    /// independent model of the cooldown book).
    #[test]
    fn every_request_is_settled_once_within_the_rules(
        ops in prop::collection::vec(op(), 1..80),
        exact_below in prop::sample::select(vec![0, 3, 20]),
        top_k in 1usize..4,
    ) {
        let s = prop_settings(exact_below);
        let mut e = PartitionEngine::new(3, EngineConfig::from_settings(&s).unwrap().with_top_k(top_k));
        let mut requests: HashMap<String, MatchRequest> = HashMap::new();
        let mut settled: HashMap<String, usize> = HashMap::new();
        let mut window_users: HashMap<(String, i64), HashSet<String>> = HashMap::new();
        let mut book: HashMap<UserPair, i64> = HashMap::new();
        let cooldown = i64::from(s.matching.rematch_cooldown_seconds) * 1000;
        let mut check = |results: Vec<MatchResult>, wm: Option<i64>,
                         requests: &HashMap<String, MatchRequest>| -> Result<(), TestCaseError> {
            for r in &results {
                for id in r.request_ids() {
                    *settled.entry(id.to_string()).or_default() += 1;
                }
                if let MatchResult::Matched { segment, window_start, window_end, score, users, .. } = r {
                    let (a, b) = (&requests[&users[0].request_id], &requests[&users[1].request_id]);
                    prop_assert!(mutually_acceptable(a, b), "{:?} / {:?}", a, b);
                    prop_assert!(f64::from(*score) >= s.matching.min_score);
                    prop_assert_eq!(&a.segment, segment);
                    let pair = UserPair::new(&a.user, &b.user);
                    prop_assert!(book.get(&pair).is_none_or(|&until| until <= *window_start), "{:?} rematched in cooldown", pair);
                    book.insert(pair, window_end + cooldown);
                    let users_here = window_users.entry((segment.clone(), *window_start)).or_default();
                    for u in [&a.user, &b.user] {
                        prop_assert!(users_here.insert(u.clone()), "{} twice in window {}", u, window_start);
                    }
                }
            }
            if let Some(wm) = wm {
                book.retain(|_, until| *until > wm);
            }
            Ok(())
        };
        let mut now = 10_000;
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Ingest { .. } => {
                    now += 37;
                    let r = prop_request(i, op, now).unwrap_or_else(|| unreachable!());
                    let id = r.request_id.clone();
                    requests.insert(id, r.clone());
                    if let Some(result) = e.ingest(r, i as i64, now).expect("valid") {
                        check(vec![result], None, &requests)?;
                    }
                }
                Op::Close { advance, .. } | Op::Due { advance } => {
                    now += advance;
                    let results = e.close(now, &HashMap::new());
                    check(results, e.watermark(), &requests)?;
                }
                _ => {}
            }
        }
        // The idle rule closes everything eventually.
        let results = e.close(now + 10_000_000, &HashMap::new());
        check(results, e.watermark(), &requests)?;
        prop_assert_eq!(e.pending(), 0);
        for id in requests.keys() {
            prop_assert_eq!(settled.get(id).copied(), Some(1), "{} settled {:?} times", id, settled.get(id));
        }
        prop_assert_eq!(settled.len(), requests.len());
        // Nothing pending: the users held are those still in cooldown.
        let in_cooldown: HashSet<&Arc<str>> = book.keys().flat_map(|p| [&p.0, &p.1]).collect();
        prop_assert_eq!(e.users(), in_cooldown.len());
        let c = e.counters();
        prop_assert_eq!(c["requests"] as usize, requests.len());
        prop_assert_eq!((c["matched"] * 2 + c["expired"]) as usize, requests.len());
    }

    /// Every match gets exactly one sample once the deadlines pass; a joined
    /// one carries the first on-time outcome fed for its match, judged by
    /// the spec's rule; the bandit's evidence grows by exactly the rewards.
    #[test]
    fn every_match_gets_exactly_one_sample(
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let s = prop_settings(3);
        let f = s.feedback.clone().unwrap();
        let mut e = PartitionEngine::new(3, EngineConfig::from_settings(&s).unwrap());
        let mut matches: Vec<(String, String)> = Vec::new();
        let mut window_end: HashMap<String, i64> = HashMap::new();
        let mut first_on_time: HashMap<String, MatchOutcome> = HashMap::new();
        let mut samples: Vec<FeedbackSample> = Vec::new();
        let mut now = 10_000;
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Ingest { .. } => {
                    now += 37;
                    let r = prop_request(i, op, now).unwrap_or_else(|| unreachable!());
                    let _ = e.ingest(r, i as i64, now);
                }
                Op::Close { advance, .. } | Op::Due { advance } => {
                    now += advance;
                    for r in e.close(now, &HashMap::new()) {
                        if let MatchResult::Matched { match_id, segment, window_end: end, .. } = r {
                            window_end.insert(match_id.clone(), end);
                            matches.push((match_id, segment));
                        }
                    }
                }
                Op::Outcome { .. } => {
                    now += 11;
                    let o = prop_outcome(op, &matches, now).unwrap_or_else(|| unreachable!());
                    if window_end.get(&o.match_id).is_some_and(|end| o.event_time <= end + i64::from(f.ttl_seconds) * 1000) {
                        first_on_time.entry(o.match_id.clone()).or_insert_with(|| o.clone());
                    }
                    if let Ok(OutcomeFate::Joined(sample)) = e.ingest_outcome(o, now) {
                        samples.push(*sample);
                    }
                }
                Op::Settle { advance } => {
                    now += advance;
                    samples.extend(e.settle_feedback(now));
                }
                _ => {}
            }
        }
        samples.extend(e.settle_feedback(now + 10_000_000));
        prop_assert_eq!(e.awaiting_outcome(), 0);
        let mut by_match: HashMap<&str, &FeedbackSample> = HashMap::new();
        for sample in &samples {
            prop_assert!(by_match.insert(&sample.match_id, sample).is_none(), "two samples for {}", sample.match_id);
        }
        prop_assert_eq!(by_match.len(), matches.len());
        let (mut successes, mut failures) = (0.0, 0.0);
        for sample in &samples {
            match (&sample.outcome, sample.reward) {
                (Some(o), Some(reward)) => {
                    prop_assert_eq!(Some(o), first_on_time.get(&sample.match_id));
                    let want = if o.skipped { 0.0 } else { (f64::from(o.call_seconds) / f64::from(f.min_call_seconds)).min(1.0) };
                    prop_assert_eq!(reward, want);
                    prop_assert_eq!(sample.label == Label::Good, want == 1.0);
                    successes += reward;
                    failures += 1.0 - reward;
                }
                (None, None) => prop_assert_eq!(sample.label, Label::NoOutcome),
                other => prop_assert!(false, "outcome and reward disagree: {:?}", other),
            }
        }
        let c = e.counters();
        prop_assert_eq!((c["joined"] + c["noOutcome"]) as usize, matches.len());
        prop_assert_eq!(c["outcomes"], c["joined"] + c["outcomesLate"] + c["outcomesDuplicate"] + c["outcomesUnknown"]);
        let evidence: f64 = e.arm_evidence().iter().map(|(_, a)| a.successes + a.failures).sum();
        prop_assert!((evidence - (successes + failures)).abs() < 1e-9, "bandit evidence {} vs rewards {}", evidence, successes + failures);
    }
}
