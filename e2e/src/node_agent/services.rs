//! Makes Services reachable from pods, as kube-proxy and cluster DNS would:
//! the API server allocates ClusterIPs from a loopback range (127.96.0.0/16),
//! the agent listens on each ClusterIP:port and forwards every TCP connection
//! to a ready backend pod, and writes `<svc>.<ns>.svc[.cluster.local]` names
//! into a marked block of /etc/hosts.
//!
//! Backends come from Pods (selector, Ready condition, podIP), not from
//! EndpointSlices: the API server refuses loopback addresses in EndpointSlices
//! and Endpoints (ValidateEndpointIP), so the endpoint controllers cannot
//! publish our pods' addresses. The selection is the same one they make.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::config::Cidr;

const HOSTS_FILE: &str = "/etc/hosts";
const HOSTS_BEGIN: &str = "# BEGIN matchfleet-cluster (managed by the node agent)";
const HOSTS_END: &str = "# END matchfleet-cluster";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One proxied Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub service: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub target: TargetPort,
}

/// A Service port's `targetPort`: a number, or a container port's name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum TargetPort {
    Number(u16),
    Named(String),
}

impl TargetPort {
    fn from_spec(target: Option<&IntOrString>, port: u16) -> Option<Self> {
        match target {
            None => Some(TargetPort::Number(port)),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok().map(TargetPort::Number),
            Some(IntOrString::String(s)) => Some(match s.parse() {
                Ok(n) => TargetPort::Number(n),
                Err(_) => TargetPort::Named(s.clone()),
            }),
        }
    }
}

/// Watches Services and Pods; `stores` are usable once `ready()` returns.
pub struct ServiceView {
    pub services: Store<Service>,
    pub pods: Store<Pod>,
    changed: Arc<Notify>,
}

impl ServiceView {
    /// Pods are watched on this node only: the Node authorizer lets a node
    /// list just its own pods, and in this one-node cluster that is all of them.
    pub fn start(client: Client, node_name: &str) -> (Self, JoinHandle<()>) {
        let changed = Arc::new(Notify::new());
        let (services, svc_writer) = reflector::store();
        let (pods, pod_writer) = reflector::store();
        let svc_stream = reflector::reflector(
            svc_writer,
            watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects()
        .map(|r| r.map(|_| ()))
        .boxed();
        let pod_stream = reflector::reflector(
            pod_writer,
            watcher(
                Api::<Pod>::all(client),
                watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
            ),
        )
        .default_backoff()
        .touched_objects()
        .map(|r| r.map(|_| ()))
        .boxed();
        let notify = changed.clone();
        let task = tokio::spawn(async move {
            let mut merged = futures::stream::select(svc_stream, pod_stream);
            while let Some(event) = merged.next().await {
                if let Err(e) = event {
                    debug!(error = %e, "service/pod watch error; retrying");
                }
                notify.notify_one();
            }
        });
        (
            ServiceView {
                services,
                pods,
                changed,
            },
            task,
        )
    }

    pub async fn ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
    }
}

/// The listeners the Services call for: one per TCP port of each Service whose
/// ClusterIP lies in the (loopback) service range.
pub fn desired_listeners(services: &[Arc<Service>], range: &Cidr) -> BTreeSet<Listener> {
    let mut out = BTreeSet::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        if !range.contains(ip) {
            continue;
        }
        for p in spec.ports.iter().flatten() {
            if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            let Some(target) = TargetPort::from_spec(p.target_port.as_ref(), port) else {
                continue;
            };
            out.insert(Listener {
                service: svc.name_any(),
                namespace: svc.namespace().unwrap_or_default(),
                ip,
                port,
                target,
            });
        }
    }
    out
}

/// Ready backends of a Service port: pods in its namespace matching its
/// selector, Ready, not terminating, with an IP; the target port resolved by
/// number or by the container port's name.
pub fn backends(svc: &Service, target: &TargetPort, pods: &[Arc<Pod>]) -> Vec<SocketAddr> {
    let Some(selector) = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
    else {
        return vec![];
    };
    let ns = svc.namespace().unwrap_or_default();
    let mut out = Vec::new();
    for pod in pods {
        if pod.namespace().unwrap_or_default() != ns || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let labels = pod.labels();
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let Some(status) = &pod.status else { continue };
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let Some(ip) = status
            .pod_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        if !ready {
            continue;
        }
        let port = match target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Named(name) => pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        };
        if let Some(port) = port {
            out.push(SocketAddr::from((ip, port)));
        }
    }
    out.sort();
    out
}

/// The /etc/hosts lines for the Services with a ClusterIP.
pub fn hosts_block(services: &[Arc<Service>]) -> String {
    let mut lines: Vec<String> = services
        .iter()
        .filter_map(|svc| {
            let ip = svc.spec.as_ref()?.cluster_ip.as_deref()?;
            ip.parse::<Ipv4Addr>().ok()?;
            let (name, ns) = (svc.name_any(), svc.namespace().unwrap_or_default());
            Some(format!(
                "{ip} {name}.{ns}.svc.cluster.local {name}.{ns}.svc"
            ))
        })
        .collect();
    lines.sort();
    format!("{HOSTS_BEGIN}\n{}\n{HOSTS_END}\n", lines.join("\n"))
}

/// `current` with its managed block replaced by `block` (or removed if empty).
pub fn replace_hosts_block(current: &str, block: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in current.lines() {
        if line.starts_with("# BEGIN matchfleet-cluster") {
            inside = true;
            continue;
        }
        if inside {
            if line.starts_with(HOSTS_END) {
                inside = false;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(block);
    out
}

fn write_hosts(block: &str) {
    let result = std::fs::read_to_string(HOSTS_FILE)
        .and_then(|current| std::fs::write(HOSTS_FILE, replace_hosts_block(&current, block)));
    if let Err(e) = result {
        warn!(error = %e, "cannot update {HOSTS_FILE}; Service names will not resolve (the _SERVICE_HOST variables still work)");
    }
}

pub fn remove_hosts_block() {
    write_hosts("");
}

/// Keeps the listeners and the hosts block in line with the Services, until dropped.
pub async fn run_proxy(
    view: Arc<ServiceView>,
    range: Cidr,
    api_server: SocketAddr,
    write_hosts_file: bool,
) {
    view.ready().await;
    let mut running: BTreeMap<Listener, JoinHandle<()>> = BTreeMap::new();
    let mut last_hosts = String::new();
    loop {
        let services = view.services.state();
        let desired = desired_listeners(&services, &range);
        running.retain(|l, task| {
            let keep = desired.contains(l) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for l in desired {
            if running.contains_key(&l) {
                continue;
            }
            let task = tokio::spawn(serve_listener(view.clone(), l.clone(), api_server));
            running.insert(l, task);
        }
        if write_hosts_file {
            let block = hosts_block(&services);
            if block != last_hosts {
                write_hosts(&block);
                last_hosts = block;
            }
        }
        // Coalesce bursts of watch events; also recheck now and then so a
        // listener that failed to bind is retried.
        tokio::select! {
            _ = view.changed.notified() => tokio::time::sleep(Duration::from_millis(50)).await,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

async fn serve_listener(view: Arc<ServiceView>, l: Listener, api_server: SocketAddr) {
    let listener = match TcpListener::bind((l.ip, l.port)).await {
        Ok(listener) => listener,
        Err(e) => {
            warn!(service = %format!("{}/{}", l.namespace, l.service), ip = %l.ip, port = l.port, error = %e, "cannot listen for Service");
            tokio::time::sleep(Duration::from_secs(2)).await;
            return;
        }
    };
    info!(service = %format!("{}/{}", l.namespace, l.service), addr = %format!("{}:{}", l.ip, l.port), "proxying Service");
    let next = AtomicUsize::new(0);
    // The `kubernetes` Service fronts the API server, which the endpoint
    // reconciler cannot publish here (its address is loopback too).
    let is_apiserver = l.namespace == "default" && l.service == "kubernetes";
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let backend = if is_apiserver {
            Some(api_server)
        } else {
            let key = ObjectRef::<Service>::new(&l.service).within(&l.namespace);
            view.services.get(&key).and_then(|svc| {
                let all = backends(&svc, &l.target, &view.pods.state());
                (!all.is_empty()).then(|| all[next.fetch_add(1, Ordering::Relaxed) % all.len()])
            })
        };
        let Some(backend) = backend else {
            // No ready endpoint: refuse, as kube-proxy's REJECT rule does.
            debug!(service = %l.service, "no ready backend; closing connection");
            continue;
        };
        tokio::spawn(async move {
            let outbound =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
                    Ok(Ok(s)) => s,
                    _ => return,
                };
            let (mut a, mut b) = (inbound, outbound);
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Arc<Service> {
        Arc::new(serde_yaml_ng::from_str(yaml).unwrap())
    }

    fn pod(yaml: &str) -> Arc<Pod> {
        Arc::new(serde_yaml_ng::from_str(yaml).unwrap())
    }

    const SVC: &str = "metadata: {name: web, namespace: a}\nspec:\n  clusterIP: 127.96.0.20\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: http}\n  - {port: 53, protocol: UDP}\n";

    fn ready_pod(name: &str, ns: &str, ip: &str, ready: bool) -> Arc<Pod> {
        pod(&format!(
            "metadata: {{name: {name}, namespace: {ns}, labels: {{app: web}}}}\nspec:\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: 8080}}]\nstatus:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"{}\"}}]\n",
            if ready { "True" } else { "False" }
        ))
    }

    #[test]
    fn listeners_cover_tcp_ports_in_range() {
        let range = Cidr::parse("127.96.0.0/16").unwrap();
        let outside = svc("metadata: {name: x, namespace: a}\nspec:\n  clusterIP: 10.0.0.1\n  ports: [{port: 1}]\n");
        let ls = desired_listeners(&[svc(SVC), outside], &range);
        assert_eq!(ls.len(), 1);
        let l = ls.iter().next().unwrap();
        assert_eq!((l.ip, l.port), (Ipv4Addr::new(127, 96, 0, 20), 80));
        assert_eq!(l.target, TargetPort::Named("http".into()));
    }

    #[test]
    fn backends_are_ready_selected_pods_in_the_namespace() {
        let s = svc(SVC);
        let pods = vec![
            ready_pod("p1", "a", "127.1.0.2", true),
            ready_pod("p2", "a", "127.1.0.3", false),
            ready_pod("p3", "b", "127.1.0.4", true),
        ];
        assert_eq!(
            backends(&s, &TargetPort::Named("http".into()), &pods),
            vec!["127.1.0.2:8080".parse().unwrap()]
        );
        assert_eq!(
            backends(&s, &TargetPort::Number(9000), &pods),
            vec!["127.1.0.2:9000".parse().unwrap()]
        );
    }

    #[test]
    fn hosts_block_is_replaced_not_duplicated() {
        let block = hosts_block(&[svc(SVC)]);
        assert!(block.contains("127.96.0.20 web.a.svc.cluster.local web.a.svc"));
        let once = replace_hosts_block("127.0.0.1 localhost\n", &block);
        let twice = replace_hosts_block(&once, &block);
        assert_eq!(once, twice);
        assert_eq!(replace_hosts_block(&twice, ""), "127.0.0.1 localhost\n");
    }
}
