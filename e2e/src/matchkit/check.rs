//! The end-to-end rules of a MatchPipeline run, as a pure function over the
//! records of the request, results and dead-letter topics: every valid
//! request settled exactly once, every match allowed (same segment, both
//! preferences, a configured scorer, no user twice in a window, no rematch
//! within the cooldown), every invalid input dead-lettered once with a reason.

use std::collections::{BTreeMap, HashMap, HashSet};

use matchfleet_api::match_pipeline::MatchPipelineSpec;
use matchfleet_api::matching::{
    mutually_acceptable, parse_request, ExpiryReason, MatchRequest, MatchResult, MatchedUser,
};
use matchfleet_worker::dead_letters::header;

use super::report::{Figures, Latency, Report, Violation, Violations};

/// A record of the request topic.
#[derive(Clone, Debug, PartialEq)]
pub struct InputRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// A record of the results topic.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultRecord {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
}

/// A record of the dead-letter topic; only its headers matter here.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetterRecord {
    pub partition: i32,
    pub offset: i64,
    pub headers: BTreeMap<String, String>,
}

impl DeadLetterRecord {
    /// The input (partition, offset) the letter names in its headers.
    pub fn source(&self) -> Option<(i32, i64)> {
        let partition = self.headers.get(header::SOURCE_PARTITION)?.parse().ok()?;
        let offset = self.headers.get(header::SOURCE_OFFSET)?.parse().ok()?;
        Some((partition, offset))
    }
}

/// What the pipeline was configured with, as far as the rules need it.
#[derive(Clone, Debug)]
pub struct CheckConfig {
    /// `features.dimension`: decides which inputs are valid.
    pub dimension: usize,
    /// Scorer names a match may carry; empty accepts any.
    pub scorers: Vec<String>,
    /// `matching.rematchCooldownSeconds`, in milliseconds.
    pub cooldown_millis: i64,
    /// The request topic: dead letters naming another source are ignored.
    pub source_topic: Option<String>,
    /// Violations of each kind listed in full (all are counted).
    pub samples: usize,
}

impl CheckConfig {
    /// The CRD's defaults: dimension 32, the `cosine` scorer, a day's cooldown.
    pub fn new(dimension: usize) -> Self {
        CheckConfig {
            dimension,
            scorers: vec!["cosine".into()],
            cooldown_millis: 86_400_000,
            source_topic: None,
            samples: 20,
        }
    }

    /// The rules as a pipeline's spec sets them.
    pub fn for_pipeline(spec: &MatchPipelineSpec) -> Self {
        CheckConfig {
            dimension: usize::try_from(spec.features.dimension).unwrap_or(0),
            scorers: spec.scorers.iter().map(|s| s.name.clone()).collect(),
            cooldown_millis: i64::from(spec.matching.rematch_cooldown_seconds) * 1000,
            source_topic: Some(spec.source.topic.clone()),
            samples: 20,
        }
    }
}

/// An input that parses and validates.
#[derive(Clone, Debug)]
pub struct ValidInput {
    pub partition: i32,
    pub offset: i64,
    pub request: MatchRequest,
}

/// An input the pipeline must dead-letter.
#[derive(Clone, Debug)]
pub struct InvalidInput {
    pub partition: i32,
    pub offset: i64,
    /// The `requestId`, if the payload is JSON that has one.
    pub request_id: Option<String>,
    pub reason: String,
}

/// The request topic sorted by `parse_request`, in input order.
#[derive(Clone, Debug, Default)]
pub struct Classified {
    pub valid: Vec<ValidInput>,
    pub invalid: Vec<InvalidInput>,
}

pub fn classify(inputs: &[InputRecord], dimension: usize) -> Classified {
    let mut out = Classified::default();
    for r in inputs {
        match parse_request(r.key.as_deref(), r.payload.as_deref(), dimension) {
            Ok(request) => out.valid.push(ValidInput {
                partition: r.partition,
                offset: r.offset,
                request,
            }),
            Err(reason) => out.invalid.push(InvalidInput {
                partition: r.partition,
                offset: r.offset,
                request_id: r.payload.as_deref().and_then(loose_request_id),
                reason: reason.to_string(),
            }),
        }
    }
    out
}

/// The request id of a payload that is JSON but not a valid request.
fn loose_request_id(payload: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    value.get("requestId")?.as_str().map(String::from)
}

/// Checks a run: the request topic's records, the results topic's records
/// and, when given, the dead-letter topic's records.
pub fn check(
    inputs: &[InputRecord],
    results: &[ResultRecord],
    dead_letters: Option<&[DeadLetterRecord]>,
    config: &CheckConfig,
) -> Report {
    let classified = classify(inputs, config.dimension);
    let mut violations = Violations::new(config.samples);
    let mut settlement = Settlement::new(&classified, &mut violations);
    let mut matches = MatchRules::default();
    let mut figures = Figures {
        requests: inputs.len() as u64,
        valid: classified.valid.len() as u64,
        invalid: classified.invalid.len() as u64,
        results: results.len() as u64,
        expired: [("noPartner".to_string(), 0), ("tooLate".to_string(), 0)].into(),
        ..Figures::default()
    };
    for record in results {
        let parsed = record
            .payload
            .as_deref()
            .ok_or_else(|| "no value".to_string())
            .and_then(|p| serde_json::from_slice::<MatchResult>(p).map_err(|e| e.to_string()));
        match parsed {
            Ok(result) => {
                check_result(&result, config, &mut settlement, &mut matches, &mut figures)
            }
            Err(error) => settlement.violations.push(Violation::UnreadableResult {
                partition: record.partition,
                offset: record.offset,
                error,
            }),
        }
    }
    let latencies = settlement.finish();
    figures.matched_pairs = matches.match_ids.len() as u64;
    matches.finish(config.cooldown_millis, &mut violations);
    if let Some(letters) = dead_letters {
        figures.dead_letters = Some(letters.len() as u64);
        check_dead_letters(&classified, letters, config, &mut violations);
    }
    figures.match_rate = if figures.valid == 0 {
        0.0
    } else {
        figures.matched_requests as f64 / figures.valid as f64
    };
    figures.latency_millis = Latency::of(latencies);
    violations.into_report(figures)
}

fn check_result(
    result: &MatchResult,
    config: &CheckConfig,
    settlement: &mut Settlement<'_>,
    matches: &mut MatchRules,
    figures: &mut Figures,
) {
    match result {
        MatchResult::Matched {
            match_id,
            segment,
            window_start,
            window_end,
            scorer,
            users,
            closed_at,
            ..
        } => {
            let mut requests = Vec::new();
            for user in users {
                if let Some((request, first)) = settlement.settle(&user.request_id, *closed_at) {
                    settlement.agrees(request, user, segment);
                    if first {
                        figures.matched_requests += 1;
                    }
                    requests.push(request);
                }
            }
            if !matches.match_ids.insert(match_id.clone()) {
                // The same match again: its requests count as settled twice
                // above; judging it again would repeat every finding.
                settlement.violations.push(Violation::DuplicateMatchId {
                    match_id: match_id.clone(),
                });
                return;
            }
            if let [a, b] = requests[..] {
                if !mutually_acceptable(a, b) {
                    settlement.violations.push(Violation::Unacceptable {
                        match_id: match_id.clone(),
                        request_ids: [a.request_id.clone(), b.request_id.clone()],
                    });
                }
            }
            if !config.scorers.is_empty() && !config.scorers.contains(scorer) {
                settlement.violations.push(Violation::UnknownScorer {
                    match_id: match_id.clone(),
                    scorer: scorer.clone(),
                });
            }
            if window_start >= window_end {
                settlement.violations.push(Violation::EmptyWindow {
                    match_id: match_id.clone(),
                    window_start: *window_start,
                    window_end: *window_end,
                });
            }
            matches.record(match_id, segment, *window_start, *window_end, users);
        }
        MatchResult::Expired {
            request_id,
            user,
            segment,
            event_time,
            reason,
            closed_at,
            ..
        } => {
            let name = match reason {
                ExpiryReason::NoPartner => "noPartner",
                ExpiryReason::TooLate => "tooLate",
            };
            *figures.expired.entry(name.to_string()).or_default() += 1;
            if let Some((request, _)) = settlement.settle(request_id, *closed_at) {
                let copy = MatchedUser {
                    request_id: request_id.clone(),
                    user: user.clone(),
                    event_time: *event_time,
                };
                settlement.agrees(request, &copy, segment);
            }
        }
    }
}

/// Which valid request was settled how often, and the latency of each.
struct Settlement<'a> {
    requests: HashMap<&'a str, &'a MatchRequest>,
    invalid_ids: HashSet<&'a str>,
    /// Valid request ids in input order, each once.
    order: Vec<&'a str>,
    times: HashMap<&'a str, u64>,
    latencies: Vec<i64>,
    violations: &'a mut Violations,
}

impl<'a> Settlement<'a> {
    fn new(classified: &'a Classified, violations: &'a mut Violations) -> Self {
        let mut requests = HashMap::new();
        let mut seen: HashMap<&str, u64> = HashMap::new();
        let mut order = Vec::new();
        for v in &classified.valid {
            let id = v.request.request_id.as_str();
            let n = seen.entry(id).or_default();
            *n += 1;
            if *n == 1 {
                order.push(id);
                requests.insert(id, &v.request);
            }
        }
        for id in &order {
            if seen[id] > 1 {
                violations.push(Violation::InputIdReused {
                    request_id: id.to_string(),
                    times: seen[id],
                });
            }
        }
        let invalid_ids = classified
            .invalid
            .iter()
            .filter_map(|i| i.request_id.as_deref())
            .collect();
        Settlement {
            requests,
            invalid_ids,
            order,
            times: HashMap::new(),
            latencies: Vec::new(),
            violations,
        }
    }

    /// Counts one settlement of `request_id`; returns the request (and
    /// whether this was its first settlement) if it is a valid one.
    fn settle(&mut self, request_id: &str, closed_at: i64) -> Option<(&'a MatchRequest, bool)> {
        let Some((id, request)) = self.requests.get_key_value(request_id) else {
            let request_id = request_id.to_string();
            self.violations
                .push(if self.invalid_ids.contains(request_id.as_str()) {
                    Violation::InvalidRequestSettled { request_id }
                } else {
                    Violation::UnknownRequest { request_id }
                });
            return None;
        };
        let (id, request) = (*id, *request);
        let times = self.times.entry(id).or_default();
        *times += 1;
        if *times == 1 {
            self.latencies.push(closed_at - request.event_time);
        }
        Some((request, *times == 1))
    }

    /// A result's copy of a request (user, event time, segment) must be the request's.
    fn agrees(&mut self, request: &MatchRequest, copy: &MatchedUser, segment: &str) {
        if request.segment != segment {
            self.violations.push(Violation::WrongSegment {
                request_id: request.request_id.clone(),
                result_segment: segment.to_string(),
                request_segment: request.segment.clone(),
            });
        }
        let fields = [
            ("user", copy.user.clone(), request.user.clone()),
            (
                "eventTime",
                copy.event_time.to_string(),
                request.event_time.to_string(),
            ),
        ];
        for (field, result, wanted) in fields {
            if result != wanted {
                self.violations.push(Violation::ResultDisagrees {
                    request_id: request.request_id.clone(),
                    field,
                    result,
                    request: wanted,
                });
            }
        }
    }

    /// Reports missing and repeated settlements; returns the latencies.
    fn finish(self) -> Vec<i64> {
        let missing: Vec<&str> = self
            .order
            .iter()
            .filter(|id| !self.times.contains_key(*id))
            .copied()
            .collect();
        if !missing.is_empty() {
            self.violations.push(Violation::Missing {
                count: missing.len() as u64,
                sample: missing
                    .iter()
                    .take(self.violations.samples())
                    .map(|id| id.to_string())
                    .collect(),
            });
        }
        for id in &self.order {
            match self.times.get(id) {
                Some(&times) if times > 1 => self.violations.push(Violation::SettledTwice {
                    request_id: id.to_string(),
                    times,
                }),
                _ => {}
            }
        }
        self.latencies
    }
}

/// A match as the cooldown sees it: (window start, window end, match id).
type PairMatch = (i64, i64, String);

/// The rules that span matches: one user per window, and the cooldown.
#[derive(Default)]
struct MatchRules {
    match_ids: HashSet<String>,
    /// (segment, window start, user) -> matches.
    by_user_window: BTreeMap<(String, i64, String), Vec<String>>,
    /// The two users, in order -> (window start, window end, match id).
    by_pair: BTreeMap<(String, String), Vec<PairMatch>>,
}

impl MatchRules {
    fn record(
        &mut self,
        match_id: &str,
        segment: &str,
        window_start: i64,
        window_end: i64,
        users: &[MatchedUser; 2],
    ) {
        for u in users {
            self.by_user_window
                .entry((segment.to_string(), window_start, u.user.clone()))
                .or_default()
                .push(match_id.to_string());
        }
        let (a, b) = (&users[0].user, &users[1].user);
        let pair = if a <= b { (a, b) } else { (b, a) };
        self.by_pair
            .entry((pair.0.clone(), pair.1.clone()))
            .or_default()
            .push((window_start, window_end, match_id.to_string()));
    }

    fn finish(self, cooldown_millis: i64, violations: &mut Violations) {
        for ((segment, window_start, user), match_ids) in self.by_user_window {
            if match_ids.len() > 1 {
                violations.push(Violation::UserTwiceInWindow {
                    segment,
                    window_start,
                    user,
                    match_ids,
                });
            }
        }
        for ((a, b), mut matches) in self.by_pair {
            matches.sort();
            for (i, first) in matches.iter().enumerate() {
                for second in &matches[i + 1..] {
                    if second.0 < first.1.saturating_add(cooldown_millis) {
                        violations.push(Violation::RematchTooSoon {
                            users: [a.clone(), b.clone()],
                            first_match: first.2.clone(),
                            first_window_end: first.1,
                            second_match: second.2.clone(),
                            second_window_start: second.0,
                        });
                    }
                }
            }
        }
    }
}

/// Every invalid input dead-lettered exactly once with a reason; nothing else.
fn check_dead_letters(
    classified: &Classified,
    letters: &[DeadLetterRecord],
    config: &CheckConfig,
    violations: &mut Violations,
) {
    let mut per_input: BTreeMap<(i32, i64), u64> = BTreeMap::new();
    for letter in letters {
        let source = letter.headers.get(header::SOURCE_TOPIC);
        if let (Some(want), Some(got)) = (&config.source_topic, source) {
            if want != got {
                continue;
            }
        }
        if letter
            .headers
            .get(header::REASON)
            .is_none_or(|r| r.trim().is_empty())
        {
            violations.push(Violation::DeadLetterWithoutReason {
                dead_letter_partition: letter.partition,
                dead_letter_offset: letter.offset,
            });
        }
        match letter.source() {
            Some(source) => *per_input.entry(source).or_default() += 1,
            None => violations.push(Violation::DeadLetterUnlocated {
                dead_letter_partition: letter.partition,
                dead_letter_offset: letter.offset,
            }),
        }
    }
    let valid: HashMap<(i32, i64), &str> = classified
        .valid
        .iter()
        .map(|v| ((v.partition, v.offset), v.request.request_id.as_str()))
        .collect();
    let invalid: HashSet<(i32, i64)> = classified
        .invalid
        .iter()
        .map(|i| (i.partition, i.offset))
        .collect();
    for (&(partition, offset), &times) in &per_input {
        if let Some(request_id) = valid.get(&(partition, offset)) {
            violations.push(Violation::DeadLetterForValid {
                partition,
                offset,
                request_id: request_id.to_string(),
            });
        } else if !invalid.contains(&(partition, offset)) {
            violations.push(Violation::DeadLetterForUnknownInput { partition, offset });
        } else if times > 1 {
            violations.push(Violation::DeadLetteredTwice {
                partition,
                offset,
                times,
            });
        }
    }
    for i in &classified.invalid {
        if !per_input.contains_key(&(i.partition, i.offset)) {
            violations.push(Violation::DeadLetterMissing {
                partition: i.partition,
                offset: i.offset,
                reason: i.reason.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use matchfleet_api::matching::{Preferences, Profile};

    use super::*;

    /// A request in segment `s` at event time 1000 accepting ages 18 to 99.
    fn req(id: &str, user: &str, gender: &str, wants: &[&str]) -> MatchRequest {
        MatchRequest {
            request_id: id.into(),
            user: user.into(),
            segment: "s".into(),
            event_time: 1000,
            vector: vec![1.0, 0.0],
            profile: Profile {
                gender: gender.into(),
                age: 30,
            },
            wants: Preferences {
                genders: wants.iter().map(|g| g.to_string()).collect(),
                min_age: 18,
                max_age: 99,
            },
        }
    }

    fn input(offset: i64, r: &MatchRequest) -> InputRecord {
        raw_input(offset, &r.segment, &serde_json::to_string(r).unwrap())
    }

    fn raw_input(offset: i64, key: &str, payload: &str) -> InputRecord {
        InputRecord {
            partition: 0,
            offset,
            key: Some(key.as_bytes().to_vec()),
            payload: Some(payload.as_bytes().to_vec()),
        }
    }

    fn side(r: &MatchRequest) -> MatchedUser {
        MatchedUser {
            request_id: r.request_id.clone(),
            user: r.user.clone(),
            event_time: r.event_time,
        }
    }

    /// A match in the window [start, start + 1000) of `a`'s segment.
    fn matched(id: &str, start: i64, a: &MatchRequest, b: &MatchRequest) -> MatchResult {
        MatchResult::Matched {
            match_id: id.into(),
            segment: a.segment.clone(),
            window_start: start,
            window_end: start + 1000,
            partition: 0,
            scorer: "cosine".into(),
            score: 0.5,
            users: [side(a), side(b)],
            closed_at: start + 1500,
        }
    }

    fn expired(r: &MatchRequest, reason: ExpiryReason) -> MatchResult {
        MatchResult::Expired {
            request_id: r.request_id.clone(),
            user: r.user.clone(),
            segment: r.segment.clone(),
            partition: 0,
            event_time: r.event_time,
            windows: 5,
            reason,
            closed_at: 6000,
        }
    }

    fn records(results: &[MatchResult]) -> Vec<ResultRecord> {
        results
            .iter()
            .enumerate()
            .map(|(i, r)| ResultRecord {
                partition: 0,
                offset: i as i64,
                payload: Some(serde_json::to_vec(r).unwrap()),
            })
            .collect()
    }

    fn config() -> CheckConfig {
        CheckConfig {
            dimension: 2,
            scorers: vec!["cosine".into()],
            cooldown_millis: 60_000,
            source_topic: Some("requests".into()),
            samples: 10,
        }
    }

    /// Alice and Bob, Carol and Dave like each other; Eve finds nobody.
    struct World {
        a: MatchRequest,
        b: MatchRequest,
        c: MatchRequest,
        d: MatchRequest,
        e: MatchRequest,
    }

    fn world() -> World {
        World {
            a: req("a1", "alice", "f", &["m"]),
            b: req("b1", "bob", "m", &["f"]),
            c: req("c1", "carol", "f", &["m"]),
            d: req("d1", "dave", "m", &["f"]),
            e: req("e1", "eve", "x", &["x"]),
        }
    }

    impl World {
        fn inputs(&self) -> Vec<InputRecord> {
            [&self.a, &self.b, &self.c, &self.d, &self.e]
                .iter()
                .enumerate()
                .map(|(i, r)| input(i as i64, r))
                .collect()
        }

        fn results(&self) -> Vec<MatchResult> {
            vec![
                matched("m1", 0, &self.a, &self.b),
                matched("m2", 0, &self.c, &self.d),
                expired(&self.e, ExpiryReason::NoPartner),
            ]
        }
    }

    fn run(inputs: &[InputRecord], results: &[MatchResult]) -> Report {
        check(inputs, &records(results), None, &config())
    }

    /// The report's only violations are of `kind`; returns them.
    fn only(report: &Report, kind: &str) -> Vec<Violation> {
        assert!(!report.ok, "expected {kind}: {report:#?}");
        let kinds: Vec<_> = report.violation_counts.keys().copied().collect();
        assert_eq!(kinds, vec![kind], "{report:#?}");
        report.of_kind(kind).into_iter().cloned().collect()
    }

    #[test]
    fn a_pipeline_spec_sets_the_rules() {
        let spec: MatchPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"bootstrapServers": "k:9092", "topic": "asks"},
            "resultsTopic": "pairs",
            "features": {"dimension": 16},
            "matching": {"rematchCooldownSeconds": 30},
            "scorers": [{"name": "cosine", "builtin": "cosine"}, {"name": "opposites", "builtin": "complement"}],
        }))
        .unwrap();
        let c = CheckConfig::for_pipeline(&spec);
        assert_eq!(c.dimension, 16);
        assert_eq!(c.scorers, vec!["cosine", "opposites"]);
        assert_eq!(c.cooldown_millis, 30_000);
        assert_eq!(c.source_topic.as_deref(), Some("asks"));
    }

    #[test]
    fn a_clean_run_passes_with_its_figures() {
        let w = world();
        let report = run(&w.inputs(), &w.results());
        assert!(report.ok, "{report:#?}");
        let f = &report.figures;
        assert_eq!((f.requests, f.valid, f.invalid, f.results), (5, 5, 0, 3));
        assert_eq!((f.matched_pairs, f.matched_requests), (2, 4));
        assert_eq!(f.expired["noPartner"], 1);
        assert!((f.match_rate - 0.8).abs() < 1e-9);
        let latency = f.latency_millis.clone().unwrap();
        // Four matched at 1500 - 1000, one expired at 6000 - 1000.
        assert_eq!((latency.count, latency.p50, latency.max), (5, 500, 5000));
        assert_eq!(f.dead_letters, None);
    }

    #[test]
    fn a_request_without_a_result_is_missing() {
        let w = world();
        let mut results = w.results();
        results.pop();
        let v = only(&run(&w.inputs(), &results), "missing");
        assert_eq!(
            v,
            vec![Violation::Missing {
                count: 1,
                sample: vec!["e1".into()]
            }]
        );
    }

    #[test]
    fn the_missing_sample_is_capped_but_counted() {
        let inputs: Vec<_> = (0..30)
            .map(|i| input(i, &req(&format!("r{i}"), &format!("u{i}"), "f", &[])))
            .collect();
        let report = run(&inputs, &[]);
        match &only(&report, "missing")[..] {
            [Violation::Missing { count, sample }] => {
                assert_eq!(*count, 30);
                assert_eq!(sample.len(), 10);
                assert_eq!(sample[0], "r0");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_in_a_match_and_an_expiry_is_settled_twice() {
        let w = world();
        let mut results = w.results();
        results.push(expired(&w.a, ExpiryReason::TooLate));
        let report = run(&w.inputs(), &results);
        let v = only(&report, "settledTwice");
        assert_eq!(
            v,
            vec![Violation::SettledTwice {
                request_id: "a1".into(),
                times: 2
            }]
        );
        assert_eq!(report.figures.expired["tooLate"], 1);
    }

    #[test]
    fn a_result_for_a_request_nobody_sent_is_reported() {
        let w = world();
        let mut results = w.results();
        results.push(expired(
            &req("ghost", "casper", "m", &[]),
            ExpiryReason::NoPartner,
        ));
        let v = only(&run(&w.inputs(), &results), "unknownRequest");
        assert_eq!(
            v,
            vec![Violation::UnknownRequest {
                request_id: "ghost".into()
            }]
        );
    }

    #[test]
    fn a_result_for_an_invalid_request_is_reported() {
        let w = world();
        let mut bad = req("bad1", "mallory", "m", &[]);
        bad.vector = vec![1.0, 0.0, 0.0];
        let mut inputs = w.inputs();
        inputs.push(input(5, &bad));
        let mut results = w.results();
        results.push(expired(&bad, ExpiryReason::NoPartner));
        let report = run(&inputs, &results);
        assert_eq!(report.figures.invalid, 1);
        let v = only(&report, "invalidRequestSettled");
        assert_eq!(
            v,
            vec![Violation::InvalidRequestSettled {
                request_id: "bad1".into()
            }]
        );
    }

    #[test]
    fn a_result_that_is_not_a_match_result_is_reported() {
        let w = world();
        let mut results = records(&w.results());
        results.push(ResultRecord {
            partition: 2,
            offset: 9,
            payload: Some(b"{\"kind\":\"mystery\"}".to_vec()),
        });
        let report = check(&w.inputs(), &results, None, &config());
        match &only(&report, "unreadableResult")[..] {
            [Violation::UnreadableResult {
                partition: 2,
                offset: 9,
                ..
            }] => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_repeated_match_id_is_reported() {
        let w = world();
        let mut results = w.results();
        results.push(results[0].clone());
        let report = run(&w.inputs(), &results);
        assert_eq!(
            report.of_kind("duplicateMatchId"),
            vec![&Violation::DuplicateMatchId {
                match_id: "m1".into()
            }]
        );
        assert_eq!(report.violation_counts["settledTwice"], 2);
        assert_eq!(report.violation_counts.len(), 2, "{report:#?}");
    }

    #[test]
    fn a_user_in_two_matches_of_one_window_is_reported() {
        let w = world();
        let a2 = req("a2", "alice", "f", &["m"]);
        let f1 = req("f1", "frank", "m", &["f"]);
        let mut inputs = w.inputs();
        inputs.extend([input(5, &a2), input(6, &f1)]);
        let mut results = w.results();
        results.push(matched("m3", 0, &a2, &f1));
        let v = only(&run(&inputs, &results), "userTwiceInWindow");
        assert_eq!(
            v,
            vec![Violation::UserTwiceInWindow {
                segment: "s".into(),
                window_start: 0,
                user: "alice".into(),
                match_ids: vec!["m1".into(), "m3".into()],
            }]
        );
        // In the next window she may be matched again (with someone new).
        let mut results = w.results();
        results.push(matched("m3", 1000, &a2, &f1));
        assert!(run(&inputs, &results).ok);
    }

    #[test]
    fn a_match_across_segments_is_reported() {
        let mut w = world();
        w.b.segment = "t".into();
        let v = only(&run(&w.inputs(), &w.results()), "wrongSegment");
        assert_eq!(
            v,
            vec![Violation::WrongSegment {
                request_id: "b1".into(),
                result_segment: "s".into(),
                request_segment: "t".into(),
            }]
        );
    }

    #[test]
    fn a_match_against_a_preference_is_reported() {
        let w = world();
        let results = vec![
            matched("m1", 0, &w.a, &w.c),
            matched("m2", 0, &w.b, &w.d),
            expired(&w.e, ExpiryReason::NoPartner),
        ];
        let v = only(&run(&w.inputs(), &results), "unacceptable");
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0],
            Violation::Unacceptable {
                match_id: "m1".into(),
                request_ids: ["a1".into(), "c1".into()],
            }
        );
        // Age counts as much as gender.
        let mut w = world();
        w.b.wants.max_age = 25;
        only(&run(&w.inputs(), &w.results()), "unacceptable");
    }

    #[test]
    fn a_user_matched_with_themself_is_reported() {
        let w = world();
        let a2 = req("a2", "alice", "f", &[]);
        let mut a1 = w.a.clone();
        a1.wants.genders.clear();
        let inputs = vec![input(0, &a1), input(1, &a2)];
        let results = vec![matched("m1", 0, &a1, &a2)];
        let report = run(&inputs, &results);
        assert_eq!(report.violation_counts["unacceptable"], 1, "{report:#?}");
        // ... which also puts her twice in the window.
        assert_eq!(report.violation_counts["userTwiceInWindow"], 1);
    }

    #[test]
    fn a_scorer_not_configured_is_reported_unless_any_is_allowed() {
        let w = world();
        let mut results = w.results();
        if let MatchResult::Matched { scorer, .. } = &mut results[1] {
            *scorer = "mystery".into();
        }
        let v = only(&run(&w.inputs(), &results), "unknownScorer");
        assert_eq!(
            v,
            vec![Violation::UnknownScorer {
                match_id: "m2".into(),
                scorer: "mystery".into()
            }]
        );
        let any = CheckConfig {
            scorers: vec![],
            ..config()
        };
        assert!(check(&w.inputs(), &records(&results), None, &any).ok);
    }

    #[test]
    fn a_window_that_ends_before_it_starts_is_reported() {
        let w = world();
        let mut results = w.results();
        if let MatchResult::Matched { window_end, .. } = &mut results[0] {
            *window_end = 0;
        }
        only(&run(&w.inputs(), &results), "emptyWindow");
    }

    #[test]
    fn a_rematch_within_the_cooldown_is_reported() {
        let w = world();
        let a2 = req("a2", "alice", "f", &["m"]);
        let b2 = req("b2", "bob", "m", &["f"]);
        let mut inputs = w.inputs();
        inputs.extend([input(5, &a2), input(6, &b2)]);
        // The first match's window ends at 1000; the cooldown is 60 s.
        let mut results = w.results();
        results.push(matched("m3", 60_000, &b2, &a2));
        let v = only(&run(&inputs, &results), "rematchTooSoon");
        assert_eq!(
            v,
            vec![Violation::RematchTooSoon {
                users: ["alice".into(), "bob".into()],
                first_match: "m1".into(),
                first_window_end: 1000,
                second_match: "m3".into(),
                second_window_start: 60_000,
            }]
        );
        let mut results = w.results();
        results.push(matched("m3", 61_000, &b2, &a2));
        assert!(
            run(&inputs, &results).ok,
            "exactly the cooldown later is fine"
        );
    }

    #[test]
    fn a_result_that_misquotes_its_request_is_reported() {
        let w = world();
        let mut results = w.results();
        if let MatchResult::Expired { user, .. } = &mut results[2] {
            *user = "mallory".into();
        }
        if let MatchResult::Matched { users, .. } = &mut results[0] {
            users[1].event_time = 999;
        }
        let v = only(&run(&w.inputs(), &results), "resultDisagrees");
        assert_eq!(
            v,
            vec![
                Violation::ResultDisagrees {
                    request_id: "b1".into(),
                    field: "eventTime",
                    result: "999".into(),
                    request: "1000".into(),
                },
                Violation::ResultDisagrees {
                    request_id: "e1".into(),
                    field: "user",
                    result: "mallory".into(),
                    request: "eve".into(),
                },
            ]
        );
    }

    #[test]
    fn a_request_id_sent_twice_is_reported() {
        let w = world();
        let mut inputs = w.inputs();
        inputs.push(input(5, &w.e));
        let v = only(&run(&inputs, &w.results()), "inputIdReused");
        assert_eq!(
            v,
            vec![Violation::InputIdReused {
                request_id: "e1".into(),
                times: 2
            }]
        );
    }

    /// The world plus one record of each malformed kind at offsets 5 to 8.
    fn with_invalid(w: &World) -> Vec<InputRecord> {
        let mut inputs = w.inputs();
        let mut long = req("bad-dim", "mallory", "m", &[]);
        long.vector.push(0.0);
        let json = serde_json::to_string(&req("bad-inf", "mallory", "m", &[])).unwrap();
        inputs.extend([
            raw_input(5, "s", "{\"requestId\":"),
            input(6, &long),
            raw_input(7, "s", &json.replace("[1.0,0.0]", "[1e60,0.0]")),
            raw_input(
                8,
                "elsewhere",
                &serde_json::to_string(&w.a)
                    .unwrap()
                    .replace("a1", "bad-key"),
            ),
        ]);
        inputs
    }

    fn letter(at: i64, partition: i32, offset: i64, reason: &str) -> DeadLetterRecord {
        DeadLetterRecord {
            partition: 0,
            offset: at,
            headers: [
                (header::REASON, reason.to_string()),
                (header::SOURCE_TOPIC, "requests".to_string()),
                (header::SOURCE_PARTITION, partition.to_string()),
                (header::SOURCE_OFFSET, offset.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        }
    }

    fn letters() -> Vec<DeadLetterRecord> {
        (5..=8).map(|o| letter(o - 5, 0, o, "broken")).collect()
    }

    fn run_dlq(inputs: &[InputRecord], letters: &[DeadLetterRecord]) -> Report {
        check(
            inputs,
            &records(&world().results()),
            Some(letters),
            &config(),
        )
    }

    #[test]
    fn every_malformed_kind_is_invalid_and_a_complete_dead_letter_topic_passes() {
        let inputs = with_invalid(&world());
        let classified = classify(&inputs, 2);
        let reasons: Vec<&str> = classified
            .invalid
            .iter()
            .map(|i| i.reason.as_str())
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons[0].starts_with("not a match request"));
        assert!(reasons[1].contains("vector has 3 values"));
        // "not finite", or "out of range" where serde_json's float_roundtrip is on.
        assert!(
            reasons[2].contains("not finite") || reasons[2].contains("out of range"),
            "{reasons:?}"
        );
        assert!(reasons[3].contains("not the request's segment"));
        assert_eq!(classified.invalid[1].request_id.as_deref(), Some("bad-dim"));
        let report = run_dlq(&inputs, &letters());
        assert!(report.ok, "{report:#?}");
        assert_eq!(report.figures.dead_letters, Some(4));
        assert_eq!(report.figures.invalid, 4);
    }

    #[test]
    fn an_invalid_input_without_a_dead_letter_is_reported() {
        let inputs = with_invalid(&world());
        let mut letters = letters();
        letters.remove(1);
        match &only(&run_dlq(&inputs, &letters), "deadLetterMissing")[..] {
            [Violation::DeadLetterMissing {
                partition: 0,
                offset: 6,
                reason,
            }] => assert!(reason.contains("vector has 3 values")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_input_dead_lettered_twice_is_reported() {
        let inputs = with_invalid(&world());
        let mut letters = letters();
        letters.push(letter(9, 0, 7, "again"));
        let v = only(&run_dlq(&inputs, &letters), "deadLetteredTwice");
        assert_eq!(
            v,
            vec![Violation::DeadLetteredTwice {
                partition: 0,
                offset: 7,
                times: 2
            }]
        );
    }

    #[test]
    fn a_dead_letter_without_a_reason_is_reported() {
        let inputs = with_invalid(&world());
        let mut letters = letters();
        letters[2].headers.insert(header::REASON.into(), " ".into());
        letters[3].headers.remove(header::REASON);
        let report = run_dlq(&inputs, &letters);
        assert_eq!(only(&report, "deadLetterWithoutReason").len(), 2);
    }

    #[test]
    fn a_dead_letter_that_does_not_say_where_from_is_reported() {
        let inputs = with_invalid(&world());
        let mut letters = letters();
        letters.push(letter(4, 0, 0, "lost"));
        letters[4]
            .headers
            .insert(header::SOURCE_OFFSET.into(), "x".into());
        let v = only(&run_dlq(&inputs, &letters), "deadLetterUnlocated");
        assert_eq!(
            v,
            vec![Violation::DeadLetterUnlocated {
                dead_letter_partition: 0,
                dead_letter_offset: 4
            }]
        );
    }

    #[test]
    fn a_valid_request_dead_lettered_is_reported() {
        let inputs = with_invalid(&world());
        let mut letters = letters();
        letters.push(letter(4, 0, 1, "wrongly"));
        let v = only(&run_dlq(&inputs, &letters), "deadLetterForValid");
        assert_eq!(
            v,
            vec![Violation::DeadLetterForValid {
                partition: 0,
                offset: 1,
                request_id: "b1".into()
            }]
        );
    }

    #[test]
    fn a_dead_letter_for_no_input_is_reported_and_other_sources_ignored() {
        let inputs = with_invalid(&world());
        let mut letters = letters();
        letters.push(letter(4, 3, 77, "phantom"));
        let mut foreign = letter(5, 0, 1, "not ours");
        foreign
            .headers
            .insert(header::SOURCE_TOPIC.into(), "other-requests".into());
        letters.push(foreign);
        let v = only(&run_dlq(&inputs, &letters), "deadLetterForUnknownInput");
        assert_eq!(
            v,
            vec![Violation::DeadLetterForUnknownInput {
                partition: 3,
                offset: 77
            }]
        );
    }

    #[test]
    fn dead_letters_are_not_checked_unless_given() {
        let w = world();
        let report = check(&with_invalid(&w), &records(&w.results()), None, &config());
        assert!(report.ok, "{report:#?}");
        assert_eq!(report.figures.invalid, 4);
    }
}
