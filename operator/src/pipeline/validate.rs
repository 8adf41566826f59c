//! The spec rules the worker fleet depends on, checked again before anything
//! is built: the CRD's cross-field rules (`api/src/match_pipeline.rs`), no
//! more. The CRD refuses such specs at apply time; this catches objects
//! stored under an older CRD (or with validation bypassed), which would
//! otherwise read their own results back as requests or mix up scorers.

use std::collections::BTreeSet;

use matchfleet_api::match_pipeline::MatchPipelineSpec;

use super::resources::dead_letter_topic;

/// What is wrong with `spec`, one sentence each; empty when it can be served.
pub fn problems(spec: &MatchPipelineSpec) -> Vec<String> {
    let mut out = Vec::new();
    let source = spec.source.topic.as_str();
    let results = spec.results_topic.as_str();
    let dead_letters = dead_letter_topic(spec);
    if results == source {
        out.push("resultsTopic must differ from source.topic".to_string());
    }
    if dead_letters == source || dead_letters == results {
        out.push(format!(
            "the dead-letter topic {dead_letters} must differ from source.topic and resultsTopic"
        ));
    }
    if let Some(f) = &spec.feedback {
        let taken = [source, results];
        if taken.contains(&f.topic.as_str()) {
            out.push(format!(
                "feedback.topic {} must differ from source.topic and resultsTopic",
                f.topic
            ));
        }
        if taken.contains(&f.rewards_topic.as_str()) || f.rewards_topic == f.topic {
            out.push(format!(
                "feedback.rewardsTopic {} must differ from source.topic, resultsTopic and feedback.topic",
                f.rewards_topic
            ));
        }
    }
    if spec.scorers.is_empty() {
        out.push("spec.scorers needs at least one scorer".to_string());
    }
    let mut seen = BTreeSet::new();
    for s in &spec.scorers {
        if !seen.insert(s.name.as_str()) {
            out.push(format!("scorer name {:?} is used twice", s.name));
        }
        if s.builtin.is_some() == s.http.is_some() {
            out.push(format!(
                "scorer {:?} needs exactly one of builtin or http",
                s.name
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::resources::tests::pipeline;
    use matchfleet_api::match_pipeline::{BuiltinScorer, FeedbackSpec};

    #[test]
    fn the_example_spec_has_no_problem() {
        assert!(problems(&pipeline("demo").spec).is_empty());
    }

    #[test]
    fn topic_loops_are_problems() {
        let mut spec = pipeline("demo").spec;
        spec.results_topic = spec.source.topic.clone();
        assert_eq!(problems(&spec).len(), 1, "{:?}", problems(&spec));

        let mut spec = pipeline("demo").spec;
        spec.results_topic = "match-requests.dlq".to_string();
        let p = problems(&spec);
        assert!(
            p[0].contains("dead-letter topic match-requests.dlq"),
            "{p:?}"
        );

        let mut spec = pipeline("demo").spec;
        spec.feedback = Some(FeedbackSpec {
            topic: "outcomes".to_string(),
            rewards_topic: "outcomes".to_string(),
            ttl_seconds: 600,
            min_call_seconds: 30,
        });
        let p = problems(&spec);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("rewardsTopic"), "{p:?}");
        spec.feedback.as_mut().unwrap().topic = "match-results".to_string();
        assert_eq!(problems(&spec).len(), 1);
        spec.feedback.as_mut().unwrap().rewards_topic = "rewards".to_string();
        assert!(problems(&spec)[0].contains("feedback.topic match-results"));
    }

    #[test]
    fn scorer_problems() {
        let mut spec = pipeline("demo").spec;
        spec.scorers[1].name = "cosine".to_string();
        assert_eq!(problems(&spec), ["scorer name \"cosine\" is used twice"]);
        spec.scorers.truncate(1);
        spec.scorers[0].builtin = None;
        assert_eq!(
            problems(&spec),
            ["scorer \"cosine\" needs exactly one of builtin or http"]
        );
        spec.scorers.clear();
        assert_eq!(problems(&spec), ["spec.scorers needs at least one scorer"]);
        spec.scorers = pipeline("demo").spec.scorers;
        spec.scorers[0].builtin = Some(BuiltinScorer::Complement);
        assert!(problems(&spec).is_empty());
    }
}
