//! Pod events, written as core/v1 Events like the kubelet writes them: the
//! Node authorizer grants nodes `events` in the core group, not events.k8s.io
//! (which kube-runtime's Recorder uses).

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// The Event to record `reason` / `message` about `pod`, reported by `node`.
pub fn pod_event(
    pod: &Pod,
    node: &str,
    severity: Severity,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Event {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name),
            namespace: Some(ns),
            uid: pod.uid(),
            resource_version: pod.resource_version(),
            ..Default::default()
        },
        reason: Some(reason.to_string()),
        message: Some(message.chars().take(1024).collect()),
        type_: Some(format!("{severity:?}")),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(node.to_string()),
        }),
        reporting_component: Some("matchfleet-node-agent".into()),
        reporting_instance: Some(node.to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Default::default()
    }
}

/// Records an event; failures only cost the event, so they are just logged.
pub async fn record(client: Client, event: Event) {
    let ns = event.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client, &ns);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        tracing::debug!(error = %e, "recording event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_refers_to_the_pod() {
        let pod: Pod =
            serde_yaml_ng::from_str("metadata: {name: p, namespace: n, uid: u}").unwrap();
        let e = pod_event(
            &pod,
            "node",
            Severity::Warning,
            "Failed",
            "why",
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(e.involved_object.uid.as_deref(), Some("u"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.metadata.namespace.as_deref(), Some("n"));
        assert_eq!(e.metadata.name.as_deref(), Some("p.0"));
    }
}
