//! The Node object and its liveness: registration, the `kube-node-lease` Lease
//! the node lifecycle controller watches, and periodic status updates.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use tracing::{info, warn};

/// How long the lease lasts and how often it is renewed: the kubelet's
/// defaults (40 s, renewed every 10 s), so the node lifecycle controller marks
/// the node NotReady within its grace period if the agent dies.
const LEASE_SECONDS: i32 = 40;
const LEASE_RENEW: Duration = Duration::from_secs(10);
const STATUS_EVERY: Duration = Duration::from_secs(60);

/// Capacity the agent advertises.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub name: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub max_pods: u32,
    pub kubelet_version: String,
}

impl NodeFacts {
    pub fn of_this_machine(name: &str, kubelet_version: &str) -> Self {
        NodeFacts {
            name: name.to_string(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory_bytes: total_memory_bytes().unwrap_or(4 << 30),
            max_pods: 250,
            kubelet_version: kubelet_version.to_string(),
        }
    }
}

fn total_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

pub fn node_object(facts: &NodeFacts) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(facts.name.clone()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), facts.name.clone()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
                (
                    "kubernetes.io/arch".to_string(),
                    std::env::consts::ARCH.replace("x86_64", "amd64"),
                ),
            ])),
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn node_status(facts: &NodeFacts, now: Timestamp) -> NodeStatus {
    let resources = BTreeMap::from([
        ("cpu".to_string(), Quantity(facts.cpus.to_string())),
        (
            "memory".to_string(),
            Quantity(format!("{}Ki", facts.memory_bytes / 1024)),
        ),
        ("pods".to_string(), Quantity(facts.max_pods.to_string())),
        (
            "ephemeral-storage".to_string(),
            Quantity("50Gi".to_string()),
        ),
    ]);
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: None,
    };
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "no memory pressure",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "no disk pressure",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "no PID pressure",
            ),
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "matchfleet node agent is posting ready status",
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".to_string(),
                address: "127.0.0.1".to_string(),
            },
            NodeAddress {
                type_: "Hostname".to_string(),
                address: facts.name.clone(),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints::default()),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH.replace("x86_64", "amd64"),
            operating_system: "linux".to_string(),
            kubelet_version: facts.kubelet_version.clone(),
            container_runtime_version: format!(
                "matchfleet-node-agent://{}",
                env!("CARGO_PKG_VERSION")
            ),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            os_image: "local processes".to_string(),
            machine_id: facts.name.clone(),
            system_uuid: facts.name.clone(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates the Node if it does not exist, then posts its status.
pub async fn register(client: &Client, facts: &NodeFacts) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes
        .create(&PostParams::default(), &node_object(facts))
        .await
    {
        Ok(_) => info!(node = %facts.name, "registered node"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            info!(node = %facts.name, "node already registered")
        }
        Err(e) => return Err(e),
    }
    post_status(&nodes, facts).await
}

async fn post_status(nodes: &Api<Node>, facts: &NodeFacts) -> kube::Result<()> {
    let patch = serde_json::json!({ "status": node_status(facts, Timestamp::now()) });
    nodes
        .patch_status(&facts.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Renews the node Lease every 10 s and reposts the status every minute,
/// until the task is dropped. Failures are logged and retried next tick.
pub async fn keep_alive(client: Client, facts: NodeFacts) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client);
    let mut since_status = Duration::ZERO;
    loop {
        if let Err(e) = renew_lease(&leases, &nodes, &facts.name).await {
            warn!(error = %e, "renewing the node lease failed");
        }
        if since_status >= STATUS_EVERY {
            if let Err(e) = post_status(&nodes, &facts).await {
                warn!(error = %e, "posting node status failed");
            }
            since_status = Duration::ZERO;
        }
        tokio::time::sleep(LEASE_RENEW).await;
        since_status += LEASE_RENEW;
    }
}

async fn renew_lease(leases: &Api<Lease>, nodes: &Api<Node>, name: &str) -> kube::Result<()> {
    let node_uid = nodes.get(name).await?.metadata.uid.unwrap_or_default();
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            // Owned by the Node, as the kubelet's lease is, so it goes with it.
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: name.to_string(),
                uid: node_uid,
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.to_string()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    leases
        .patch(
            name,
            &PatchParams::apply("matchfleet-node-agent").force(),
            &Patch::Apply(&lease),
        )
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reports_ready_with_capacity() {
        let facts = NodeFacts {
            name: "n".into(),
            cpus: 2,
            memory_bytes: 2 << 30,
            max_pods: 10,
            kubelet_version: "v1.34.4".into(),
        };
        let status = node_status(&facts, Timestamp::now());
        let ready = status
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(status.capacity.as_ref().unwrap()["memory"].0, "2097152Ki");
        assert_eq!(status.node_info.unwrap().kubelet_version, "v1.34.4");
    }
}
