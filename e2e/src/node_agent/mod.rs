//! The node agent: a kubelet for a machine without a container runtime. It
//! registers a Node, keeps its Lease, runs every pod bound to it as local
//! process groups on their own loopback addresses, and proxies Services.
//! See `e2e/cluster/README.md` for what it does and does not emulate.

pub mod config;
pub mod credentials;
pub mod env;
pub mod events;
pub mod image_store;
pub mod ip_pool;
pub mod node;
pub mod pod;
pub mod probe;
pub mod process;
pub mod services;
pub mod status;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use config::{Args, Cidr, ImageMap};
use pod::{Agent, PodUpdate};

/// The Kubernetes version the agent reports as its kubelet version.
const KUBELET_VERSION: &str = "v1.34.4";
/// How long stopping the agent waits for its pods' processes.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

struct Running {
    updates: watch::Sender<PodUpdate>,
    task: JoinHandle<()>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let images = ImageMap::load(&args.images)?;
    let range = Cidr::parse(&args.service_cidr)?;
    let logs_dir = args.state_dir.join("logs");
    let pids_dir = args.state_dir.join("pids");
    let sandbox_dir = args.sandbox_dir.clone().unwrap_or(args.state_dir.clone());
    let pods_dir = sandbox_dir.join("pods");
    for dir in [&logs_dir, &pids_dir, &pods_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let image_store = image_store::ImageStore::new(sandbox_dir.join("images"))
        .with_context(|| format!("creating {}/images", sandbox_dir.display()))?;
    let killed = process::kill_leftovers(&pids_dir);
    if killed > 0 {
        warn!(killed, "killed pod processes left by a previous agent");
    }

    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let ca_pem = cluster_ca(&kubeconfig)?;
    let api_server = api_server_addr(&kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = Client::try_from(config)?;

    let facts = node::NodeFacts::of_this_machine(&args.node_name, KUBELET_VERSION);
    node::register(&client, &facts)
        .await
        .context("registering the Node (is the kubeconfig a node credential?)")?;
    let keep_alive = tokio::spawn(node::keep_alive(client.clone(), facts.clone()));

    let (view, view_task) = services::ServiceView::start(client.clone(), &args.node_name);
    let view = Arc::new(view);
    view.ready().await;
    let proxy = tokio::spawn(services::run_proxy(
        view.clone(),
        range,
        api_server,
        args.write_hosts,
    ));

    let agent = Arc::new(Agent {
        client: client.clone(),
        node_name: args.node_name.clone(),
        images,
        images_path: args.images.clone(),
        logs_dir,
        pids_dir,
        pods_dir,
        image_store,
        ips: Mutex::new(ip_pool::IpPool::new(args.pod_ip_octet)),
        services: view.services.clone(),
        host_ip: Ipv4Addr::LOCALHOST,
        ca_pem,
        cpus: facts.cpus,
        memory_bytes: facts.memory_bytes,
    });

    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
    info!(node = %args.node_name, "node agent ready");
    watch_pods(agent.clone(), shutdown.clone()).await;

    signals.abort();
    keep_alive.abort();
    proxy.abort();
    view_task.abort();
    if args.write_hosts {
        services::remove_hosts_block();
    }
    info!("node agent stopped");
    Ok(())
}

/// Follows the pods bound to this node until shutdown, one supervisor each.
async fn watch_pods(agent: Arc<Agent>, shutdown: CancellationToken) {
    let pods: Api<Pod> = Api::all(agent.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", agent.node_name));
    let mut events = watcher(pods, cfg).default_backoff().boxed();
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut listed: Vec<String> = Vec::new();
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.cancelled() => break,
        };
        let Some(event) = event else { break };
        running.retain(|_, r| !r.task.is_finished());
        match event {
            Ok(watcher::Event::Apply(pod)) => upsert(&agent, &mut running, pod, &shutdown),
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(pod)) => {
                listed.push(pod.uid().unwrap_or_default());
                upsert(&agent, &mut running, pod, &shutdown);
            }
            Ok(watcher::Event::InitDone) => {
                // Pods deleted while the watch was down never send Delete.
                for (uid, r) in running.iter() {
                    if !listed.contains(uid) {
                        let _ = r.updates.send(PodUpdate::Removed);
                    }
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(r) = running.get(&pod.uid().unwrap_or_default()) {
                    let _ = r.updates.send(PodUpdate::Removed);
                }
            }
            Err(e) => warn!(error = %e, "pod watch error; retrying"),
        }
    }
    info!(pods = running.len(), "stopping pods");
    let tasks: Vec<JoinHandle<()>> = running.into_values().map(|r| r.task).collect();
    if tokio::time::timeout(SHUTDOWN_WAIT, futures::future::join_all(tasks))
        .await
        .is_err()
    {
        warn!("pods did not stop in time; `cluster/down` kills what is left");
    }
}

fn upsert(
    agent: &Arc<Agent>,
    running: &mut HashMap<String, Running>,
    pod: Pod,
    shutdown: &CancellationToken,
) {
    let uid = pod.uid().unwrap_or_default();
    let pod = Arc::new(pod);
    match running.get(&uid) {
        Some(r) => {
            let _ = r.updates.send(PodUpdate::Changed(pod));
        }
        None => {
            let (updates, task) = pod::spawn(agent.clone(), pod, shutdown.child_token());
            running.insert(uid, Running { updates, task });
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("signal received; stopping");
    shutdown.cancel();
}

fn current_cluster(kc: &kube::config::Kubeconfig) -> anyhow::Result<&kube::config::Cluster> {
    let ctx_name = kc
        .current_context
        .as_deref()
        .context("kubeconfig has no current-context")?;
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .and_then(|c| c.context.as_ref())
        .context("current context not found")?;
    kc.clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .and_then(|c| c.cluster.as_ref())
        .context("cluster of the current context not found")
}

fn cluster_ca(kc: &kube::config::Kubeconfig) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    let cluster = current_cluster(kc)?;
    if let Some(data) = &cluster.certificate_authority_data {
        return base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .context("decoding certificate-authority-data");
    }
    let path = cluster
        .certificate_authority
        .as_deref()
        .context("kubeconfig has no cluster CA")?;
    std::fs::read(path).with_context(|| format!("reading {path}"))
}

fn api_server_addr(kc: &kube::config::Kubeconfig) -> anyhow::Result<SocketAddr> {
    let server = current_cluster(kc)?
        .server
        .as_deref()
        .context("kubeconfig has no server")?;
    let authority = server
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default();
    authority
        .parse()
        .with_context(|| format!("the API server address must be ip:port, not {server:?}"))
}
