//! Names, labels and annotations of everything the operator owns. The worker
//! image and the e2e tests rely on these exact strings: they are the contract
//! between the operator and the fleet.

use std::collections::BTreeMap;

use matchfleet_api::labels;

/// The field manager for server-side apply and the Events reporter.
pub const MANAGER: &str = "matchfleet-operator";

/// `app.kubernetes.io/part-of`, always `matchfleet`.
pub const PART_OF: &str = "app.kubernetes.io/part-of";
/// The RenderJob an object belongs to (value: its name).
pub const RENDERJOB: &str = "matchfleet.io/renderjob";
/// The MatchPipeline an object belongs to (value: its name).
pub const MATCHPIPELINE: &str = "matchfleet.io/matchpipeline";
/// The lane of a worker pod (`live` or `backlog`).
pub const LANE: &str = "matchfleet.io/lane";
/// The color of a worker pod (`blue` or `green`).
pub const COLOR: &str = "matchfleet.io/color";
/// The slot index of a worker pod.
pub const SLOT: &str = "matchfleet.io/slot";
/// Hash of a worker pod's template inputs; a pod whose hash differs from the
/// desired one is replaced.
pub const TEMPLATE_HASH: &str = "matchfleet.io/template-hash";
/// `"true"` on a RenderJob or MatchPipeline: the operator changes nothing it owns.
pub const PAUSED: &str = "matchfleet.io/paused";

pub const COMPONENT_PROGRESS: &str = "progress";
pub const COMPONENT_WORKER: &str = "worker";

/// The lane that follows the topic as events arrive.
pub const LANE_LIVE: &str = "live";
/// The lane that renders a bounded range of old events by a deadline (`spec.backlog`).
pub const LANE_BACKLOG: &str = "backlog";
/// The design reserves `blue`/`green` for cutovers; only `blue` exists until then.
pub const COLOR_BLUE: &str = "blue";

/// Port of the progress service (container and Service).
pub const PROGRESS_PORT: i32 = 8080;
/// Port of a worker's health endpoints.
pub const WORKER_PORT: i32 = 8081;
/// Port of a match worker's HTTP API (ingest, `/matches/{user}`, WebSocket
/// nudges), on the container and on the `NAME-workers` Service.
pub const MATCH_API_PORT: i32 = 8080;

/// The longest resource name we can serve: `NAME-progress` must be a
/// DNS-1035 label (63 characters), and `NAME` itself is a label value.
pub const MAX_NAME_LEN: usize = 63 - "-progress".len();

/// The kind of resource a fleet serves. Every object of a fleet carries the
/// kind's owner label, so a RenderJob and a MatchPipeline never select each
/// other's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fleet {
    RenderJob,
    MatchPipeline,
}

impl Fleet {
    /// The label whose value is the owning resource's name.
    pub fn owner_label(self) -> &'static str {
        match self {
            Fleet::RenderJob => RENDERJOB,
            Fleet::MatchPipeline => MATCHPIPELINE,
        }
    }

    /// The resource's kind, as in `kind:`.
    pub fn kind(self) -> &'static str {
        match self {
            Fleet::RenderJob => "RenderJob",
            Fleet::MatchPipeline => "MatchPipeline",
        }
    }
}

/// The progress service's Deployment and Service.
pub fn progress_name(job: &str) -> String {
    format!("{job}-progress")
}

/// The progress service's base URL, reachable from pods and from the operator.
pub fn progress_url(job: &str, namespace: &str) -> String {
    format!("http://{job}-progress.{namespace}.svc:{PROGRESS_PORT}")
}

/// The compacted changelog topic of the progress service.
pub fn changelog_topic(namespace: &str, job: &str) -> String {
    format!("matchfleet.{namespace}.{job}.progress")
}

/// The compacted topic a MatchPipeline's workers keep per-partition match
/// state in (history, leftovers, pending joins), restored by a partition's
/// next owner before it processes a record.
pub fn match_state_topic(namespace: &str, pipeline: &str) -> String {
    format!("matchfleet.{namespace}.{pipeline}.match-state")
}

/// The prefix of a lane's Kafka transactional ids; the worker appends
/// `.<partition>`, so the id follows the partition from owner to owner and
/// the broker fences the previous one (DESIGN.md §4.6).
pub fn transactional_id_prefix(namespace: &str, pipeline: &str, lane: &str) -> String {
    format!("matchfleet.{namespace}.{pipeline}.{lane}")
}

/// The Service in front of a MatchPipeline's workers' HTTP API.
pub fn workers_service_name(pipeline: &str) -> String {
    format!("{pipeline}-workers")
}

/// The consumer group a lane commits its offsets under.
pub fn consumer_group(namespace: &str, job: &str, lane: &str) -> String {
    format!("matchfleet.{namespace}.{job}.{lane}")
}

/// A worker pod (slot) name: `<job>-<lane>-<color>-<index>`.
pub fn worker_pod_name(job: &str, lane: &str, color: &str, slot: i32) -> String {
    format!("{job}-{lane}-{color}-{slot}")
}

/// The slot index of a pod named by [`worker_pod_name`], if it is one.
pub fn parse_worker_pod_name(job: &str, lane: &str, color: &str, pod: &str) -> Option<i32> {
    let rest = pod.strip_prefix(job)?.strip_prefix('-')?;
    let rest = rest.strip_prefix(lane)?.strip_prefix('-')?;
    let digits = rest.strip_prefix(color)?.strip_prefix('-')?;
    // `007` is not slot 7: only the canonical form counts, so names round-trip.
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Why a resource's name cannot be served.
pub fn invalid_name_reason(job: &str) -> Option<String> {
    if job.len() > MAX_NAME_LEN {
        return Some(format!(
            "the name is {} characters long; at most {MAX_NAME_LEN} fit, because the progress Service `{}` must be a DNS-1035 label",
            job.len(),
            progress_name(job)
        ));
    }
    if !is_dns1035_label(job) {
        return Some(
            "the name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter), because it names the progress Service".to_string(),
        );
    }
    None
}

fn is_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Labels on every object the operator owns for a resource of `fleet`.
pub fn common_labels(fleet: Fleet, job: &str, component: &str) -> BTreeMap<String, String> {
    [
        (labels::MANAGED_BY, MANAGER),
        (PART_OF, "matchfleet"),
        (fleet.owner_label(), job),
        (labels::COMPONENT, component),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Labels of the progress service's pods; also its Deployment and Service selector.
pub fn progress_labels(fleet: Fleet, job: &str) -> BTreeMap<String, String> {
    common_labels(fleet, job, COMPONENT_PROGRESS)
}

/// Labels of one worker pod.
pub fn worker_labels(
    fleet: Fleet,
    job: &str,
    lane: &str,
    color: &str,
    slot: i32,
) -> BTreeMap<String, String> {
    let mut l = common_labels(fleet, job, COMPONENT_WORKER);
    l.insert(LANE.to_string(), lane.to_string());
    l.insert(COLOR.to_string(), color.to_string());
    l.insert(SLOT.to_string(), slot.to_string());
    l
}

/// The selector of a resource's worker pods (all lanes and colors).
pub fn worker_selector(fleet: Fleet, job: &str) -> String {
    format!(
        "{}={job},{}={COMPONENT_WORKER}",
        fleet.owner_label(),
        labels::COMPONENT
    )
}

/// The labels of the worker pods of one lane and color, e.g. the ones a
/// Service in front of the active color selects.
pub fn lane_selector(fleet: Fleet, job: &str, lane: &str, color: &str) -> BTreeMap<String, String> {
    let mut l = common_labels(fleet, job, COMPONENT_WORKER);
    l.insert(LANE.to_string(), lane.to_string());
    l.insert(COLOR.to_string(), color.to_string());
    l
}

/// The selector the controller's watches use: everything this operator manages.
pub fn managed_selector() -> String {
    format!("{}={MANAGER}", labels::MANAGED_BY)
}

/// Whether a resource's annotations pause it.
pub fn is_paused(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(PAUSED)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(progress_name("demo"), "demo-progress");
        assert_eq!(
            progress_url("demo", "ns"),
            "http://demo-progress.ns.svc:8080"
        );
        assert_eq!(changelog_topic("ns", "demo"), "matchfleet.ns.demo.progress");
        assert_eq!(
            consumer_group("ns", "demo", "live"),
            "matchfleet.ns.demo.live"
        );
        assert_eq!(
            worker_pod_name("demo", "live", "blue", 3),
            "demo-live-blue-3"
        );
        assert_eq!(
            match_state_topic("ns", "mm"),
            "matchfleet.ns.mm.match-state"
        );
        assert_eq!(
            transactional_id_prefix("ns", "mm", "live"),
            "matchfleet.ns.mm.live"
        );
        assert_eq!(workers_service_name("mm"), "mm-workers");
        // The longest servable name still gives a DNS-1035 Service name.
        assert!(workers_service_name(&"a".repeat(MAX_NAME_LEN)).len() <= 63);
    }

    #[test]
    fn pod_names_round_trip() {
        for i in [0, 1, 9, 10, 1023] {
            let n = worker_pod_name("demo", "live", "blue", i);
            assert_eq!(parse_worker_pod_name("demo", "live", "blue", &n), Some(i));
        }
        for bad in [
            "demo-live-blue-",
            "demo-live-blue-01",
            "demo-live-blue-x",
            "demo-live-green-1",
            "demo-backlog-blue-1",
            "demo2-live-blue-1",
            "demo-live-blue--1",
            "demo-progress-abc",
        ] {
            assert_eq!(
                parse_worker_pod_name("demo", "live", "blue", bad),
                None,
                "{bad}"
            );
        }
        // A job whose name is a prefix of another's does not claim its pods.
        assert_eq!(
            parse_worker_pod_name("a", "live", "blue", "a-b-live-blue-1"),
            None
        );
    }

    #[test]
    fn labels_follow_the_contract() {
        let l = worker_labels(Fleet::RenderJob, "demo", "live", "blue", 2);
        assert_eq!(l["app.kubernetes.io/managed-by"], "matchfleet-operator");
        assert_eq!(l["app.kubernetes.io/part-of"], "matchfleet");
        assert_eq!(l["matchfleet.io/renderjob"], "demo");
        assert_eq!(l["app.kubernetes.io/component"], "worker");
        assert_eq!(l["matchfleet.io/lane"], "live");
        assert_eq!(l["matchfleet.io/color"], "blue");
        assert_eq!(l["matchfleet.io/slot"], "2");
        let p = progress_labels(Fleet::RenderJob, "demo");
        assert_eq!(p["app.kubernetes.io/component"], "progress");
        assert_eq!(p.len(), 4);
        assert_eq!(
            worker_selector(Fleet::RenderJob, "demo"),
            "matchfleet.io/renderjob=demo,app.kubernetes.io/component=worker"
        );
        assert_eq!(
            managed_selector(),
            "app.kubernetes.io/managed-by=matchfleet-operator"
        );
    }

    #[test]
    fn each_kind_labels_its_own_objects() {
        let l = worker_labels(Fleet::MatchPipeline, "demo", "live", "blue", 0);
        assert_eq!(l["matchfleet.io/matchpipeline"], "demo");
        assert!(!l.contains_key("matchfleet.io/renderjob"));
        assert_eq!(
            progress_labels(Fleet::MatchPipeline, "demo")["matchfleet.io/matchpipeline"],
            "demo"
        );
        assert_eq!(
            worker_selector(Fleet::MatchPipeline, "demo"),
            "matchfleet.io/matchpipeline=demo,app.kubernetes.io/component=worker"
        );
        // A lane's selector is a subset of each of its pods' labels.
        let sel = lane_selector(Fleet::MatchPipeline, "demo", "live", "blue");
        assert!(sel.iter().all(|(k, v)| l.get(k) == Some(v)), "{sel:?}");
        assert!(!sel.contains_key(SLOT));
        assert_eq!(Fleet::MatchPipeline.kind(), "MatchPipeline");
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(invalid_name_reason("demo"), None);
        assert_eq!(invalid_name_reason("a-1"), None);
        assert_eq!(invalid_name_reason(&"a".repeat(MAX_NAME_LEN)), None);
        assert!(invalid_name_reason(&"a".repeat(MAX_NAME_LEN + 1)).is_some());
        for bad in ["1abc", "a.b", "a-", "", "Abc"] {
            assert!(invalid_name_reason(bad).is_some(), "{bad}");
        }
        // The Service name built from the longest valid name is a DNS-1035 label.
        assert_eq!(progress_name(&"a".repeat(MAX_NAME_LEN)).len(), 63);
    }

    #[test]
    fn paused_annotation() {
        let mut a = BTreeMap::new();
        assert!(!is_paused(&a));
        a.insert(PAUSED.to_string(), "true".to_string());
        assert!(is_paused(&a));
        a.insert(PAUSED.to_string(), "false".to_string());
        assert!(!is_paused(&a));
    }
}
