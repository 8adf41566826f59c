//! The feedback join end to end: the example MatchPipeline with a `feedback`
//! block matches a short load run; the test reads the committed matches,
//! sends outcome events for them (on time, duplicated, out of order, late,
//! for unknown matches) and checks that the rewards topic holds exactly the
//! samples it computes itself from the same events: one per match, with the
//! right label, reward and joined outcome. Needs `e2e/cluster/up`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use matchfleet_api::feedback::Label;
use matchfleet_api::match_pipeline::FeedbackSpec;
use matchfleet_api::MatchPipeline;
use matchfleet_e2e::fleetkit::{self, condition};
use matchfleet_e2e::matchkit::produce::wall_clock_millis;
use matchfleet_e2e::matchkit::{
    self, CheckOptions, JoinRules, LoadOptions, OutcomeOptions, RewardsOptions,
};
use matchfleet_e2e::testkit::Cluster;

const NAME: &str = "matchmaker";
const PARTITIONS: i32 = 16;
const TTL_SECONDS: i32 = 30;
const MIN_CALL_SECONDS: i32 = 30;
/// Every outcome must be in Kafka this long before the first match's
/// deadline: the worker needs a moment to join them, and its watermark must
/// not reach a deadline (by the wall clock) before it has.
const SEND_MARGIN_MILLIS: i64 = 5_000;
/// Past the last deadline plus the watermark's idle and out-of-order delays,
/// every match must have its sample after this much more...
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);
/// ...and the reader gives up after this much more again.
const PATIENCE: Duration = Duration::from_secs(60);

/// The example manifest with this run's topics and a feedback join.
fn pipeline_yaml(c: &Cluster, topics: &Topics) -> String {
    let example = std::fs::read_to_string(c.repo.join("manifests/examples/matchpipeline.yaml"))
        .expect("the example manifest");
    let yaml = example
        .replace("match-requests", &topics.requests)
        .replace("match-results", &topics.results);
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).expect("the example parses");
    doc["spec"]["feedback"] = serde_yaml_ng::to_value(FeedbackSpec {
        topic: topics.outcomes.clone(),
        rewards_topic: topics.rewards.clone(),
        ttl_seconds: TTL_SECONDS,
        min_call_seconds: MIN_CALL_SECONDS,
    })
    .expect("the feedback block as YAML");
    serde_yaml_ng::to_string(&doc).expect("the manifest as YAML")
}

struct Topics {
    requests: String,
    results: String,
    outcomes: String,
    rewards: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn outcome_events_yield_exactly_the_expected_rewards_and_samples() {
    let c = Cluster::get();
    fleetkit::install_operator(&c).await;
    let ns = c.namespace("mpfeedback");
    let topics = Topics {
        requests: fleetkit::unique("match-requests"),
        results: fleetkit::unique("match-results"),
        outcomes: fleetkit::unique("match-outcomes"),
        rewards: fleetkit::unique("match-rewards"),
    };
    let yaml = pipeline_yaml(&c, &topics);
    let mp: MatchPipeline = serde_yaml_ng::from_str(&yaml).expect("the pipeline parses");
    assert_eq!(mp.metadata.name.as_deref(), Some(NAME));
    let spec = mp.spec;
    let rules = JoinRules::for_pipeline(&spec).expect("the pipeline has a feedback join");
    // Outcomes are co-partitioned with the requests; the workers create the
    // rewards topic themselves.
    fleetkit::create_topic(&c.kafka, &topics.requests, PARTITIONS).await;
    fleetkit::create_topic(&c.kafka, &topics.outcomes, PARTITIONS).await;
    c.apply_ok_in(Some(&ns.name), &yaml);
    fleetkit::wait_resource(
        &c,
        &ns.name,
        "mp",
        NAME,
        "workers ready",
        Duration::from_secs(120),
        |mp| condition(mp, "Ready").as_deref() == Some("True"),
    )
    .await;

    // 1. Matches: a short run, checked clean.
    let started = Instant::now();
    let load = LoadOptions {
        run_id: "fb".into(),
        total: 8_000,
        rate: 4_000.0,
        dimension: spec.features.dimension as usize,
        users: 8_000,
        segments: 24,
        skew: 1.0,
        seed: 7,
        out_of_order_fraction: 0.05,
        out_of_order_max_millis: 150,
        late_fraction: 0.0,
        late_millis: 0,
        malformed: 0,
    };
    let sent = matchkit::send_load(&c.kafka, &topics.requests, &load)
        .await
        .expect("load sent");
    let mut check = CheckOptions::for_pipeline(&spec);
    check.bootstrap = c.kafka.clone();
    check.idle_timeout = Duration::from_secs(5);
    check.max_wait = Duration::from_secs(120);
    let (report, results) = matchkit::check_topics_keeping_results_async(check)
        .await
        .expect("the checker reads the topics");
    assert!(
        report.violations.is_empty(),
        "checker found violations: {}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    let checked_after = started.elapsed();
    let matches = matchkit::matches_in(&results);
    assert_eq!(matches.len() as u64, report.figures.matched_pairs);
    assert!(
        matches.len() > 500,
        "a run of {} requests makes more than 500 matches: {:?}",
        sent.requests.len(),
        report.figures
    );

    // 2. Outcomes for them, sent before any deadline can come near.
    let plan = matchkit::plan_outcomes(
        &matches,
        &rules,
        &OutcomeOptions {
            seed: 11,
            ..OutcomeOptions::default()
        },
    )
    .expect("an outcome plan");
    let deadlines: Vec<i64> = matches.iter().map(|m| rules.deadline(m)).collect();
    let first_deadline = deadlines.iter().copied().min().unwrap_or_default();
    let last_deadline = deadlines.iter().copied().max().unwrap_or_default();
    let delivered = matchkit::send_outcomes(&c.kafka, &topics.outcomes, &plan.sends)
        .await
        .expect("outcomes sent");
    assert!(
        delivered.finished_at_millis < first_deadline - SEND_MARGIN_MILLIS,
        "the outcomes were in Kafka only {} ms before the first deadline (at least {SEND_MARGIN_MILLIS} \
         needed, or the expected samples would depend on timing): load sent in {} ms, checked \
         {:.1} s after the start, outcomes sent in {} ms",
        first_deadline - delivered.finished_at_millis,
        sent.elapsed_millis,
        checked_after.as_secs_f64(),
        delivered.elapsed_millis,
    );
    let expected = matchkit::expected_samples(
        &matches,
        plan.sends.iter().map(|s| (s.partition, &s.outcome)),
        &rules,
    );

    // 3. The samples: every match's by the time its state must have expired
    // (the watermark follows the wall clock `idle + outOfOrder` behind once
    // a partition idles), and any second one written until then.
    let expiry_delay =
        i64::from(spec.window.idle_millis) + i64::from(spec.window.out_of_order_millis);
    let all_expired_in = Duration::from_millis(
        u64::try_from(last_deadline + expiry_delay - wall_clock_millis()).unwrap_or(0),
    );
    let read_until = Instant::now() + all_expired_in + EXPIRY_MARGIN;
    let actual = matchkit::read_rewards_async(RewardsOptions {
        bootstrap: c.kafka.clone(),
        topic: topics.rewards.clone(),
        awaited: matches
            .iter()
            .map(|m| m.match_id.clone())
            .collect::<HashSet<_>>(),
        read_until,
        give_up_at: read_until + PATIENCE,
    })
    .await
    .expect("the rewards topic is read");
    let comparison = matchkit::compare(&expected, &actual);

    println!(
        "{} matches; outcomes sent: {} ({} on time, {} duplicates, {} late of which {} after an on-time one, \
         {} for unknown matches; {} out of order) in {} ms, {} ms before the first deadline",
        matches.len(),
        plan.sends.len(),
        plan.figures.on_time,
        plan.figures.duplicates,
        plan.figures.late,
        plan.figures.late_after_on_time,
        plan.figures.unknown,
        plan.figures.out_of_order,
        delivered.elapsed_millis,
        first_deadline - delivered.finished_at_millis,
    );
    println!(
        "samples: expected {:?}, read {:?} ({} records) after {:.1} s",
        comparison.expected_labels,
        comparison.actual_labels,
        comparison.records,
        started.elapsed().as_secs_f64()
    );
    assert!(
        comparison.exact,
        "the rewards topic differs from the expected samples: {:?}\n{}",
        comparison.problem_counts(),
        serde_json::to_string_pretty(&comparison.truncated(20)).unwrap_or_default()
    );
    for label in [Label::Good, Label::Bad, Label::NoOutcome] {
        assert!(
            comparison.expected_labels.get(&label).copied().unwrap_or(0) > 0,
            "the run covers every label: {:?}",
            comparison.expected_labels
        );
    }
    assert!(plan.figures.out_of_order > 0 && plan.figures.late > 0 && plan.figures.duplicates > 0);

    // 4. The status sums the join's counters over the partitions (they ride
    // the heartbeats): joined and noOutcome are the expected samples; every
    // outcome sent was read, and the rest were counted as ignored.
    let label = |l: Label| comparison.expected_labels.get(&l).copied().unwrap_or(0) as i64;
    let joined = label(Label::Good) + label(Label::Bad);
    let no_outcome = label(Label::NoOutcome);
    let sent_outcomes = plan.sends.len() as i64;
    let status = fleetkit::wait_resource(
        &c,
        &ns.name,
        "mp",
        NAME,
        "the feedback counters in the status",
        Duration::from_secs(60),
        |mp| {
            let f = &mp["status"]["feedback"];
            f["joined"].as_i64() == Some(joined)
                && f["noOutcome"].as_i64() == Some(no_outcome)
                && f["outcomes"].as_i64() == Some(sent_outcomes)
        },
    )
    .await;
    let f = &status["status"]["feedback"];
    let ignored: i64 = ["late", "duplicate", "unknown"]
        .iter()
        .map(|k| f[*k].as_i64().unwrap_or(-1))
        .sum();
    println!("status.feedback: {f}");
    assert_eq!(ignored, sent_outcomes - joined, "{f}");
}
