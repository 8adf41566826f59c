//! One supervisor task per pod bound to this node: prepares the pod (address,
//! image, credentials, environment), runs its containers as process groups,
//! restarts them by `restartPolicy` with back-off, probes them, reports the
//! PodStatus, and on deletion stops them within the grace period (SIGTERM,
//! then SIGKILL) before removing the pod from the API, as the kubelet does.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodStatus, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::{ImageEntry, ImageMap};
use super::credentials::{self, PodCredentials};
use super::env::{self, EnvSources};
use super::events::{self, Severity};
use super::ip_pool::IpPool;
use super::probe::{self, ProbePlan, ProbeState};
use super::process::{self, LaunchSpec, PidFile};
use super::status::{self, ContainerRecord, PodView, State};

/// Restart back-off: 1 s doubling to 30 s, reset after a container ran for a
/// minute. Shorter than the kubelet's 10 s..5 min so tests see restarts quickly.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// How often a pod that cannot start yet (missing ConfigMap, API error) retries.
const PREPARE_RETRY: Duration = Duration::from_secs(3);
/// Grace for a pod that vanished from the API (force deletion).
const FORCED_GRACE: Duration = Duration::from_secs(2);
/// A status patch that failed is retried this often.
const RESYNC: Duration = Duration::from_secs(5);

/// What every supervisor shares.
pub struct Agent {
    pub client: Client,
    pub node_name: String,
    pub images: ImageMap,
    pub images_path: PathBuf,
    pub logs_dir: PathBuf,
    pub pids_dir: PathBuf,
    pub pods_dir: PathBuf,
    pub image_store: super::image_store::ImageStore,
    pub ips: Mutex<IpPool>,
    pub services: Store<Service>,
    pub host_ip: Ipv4Addr,
    pub ca_pem: Vec<u8>,
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// What the agent's pod watch tells a supervisor.
#[derive(Debug, Clone)]
pub enum PodUpdate {
    Changed(Arc<Pod>),
    /// The pod is gone from the API (force-deleted, or deleted while the agent
    /// was away): stop at once.
    Removed,
}

/// Starts the supervisor for `pod`; send it updates through the returned sender.
pub fn spawn(
    agent: Arc<Agent>,
    pod: Arc<Pod>,
    shutdown: CancellationToken,
) -> (watch::Sender<PodUpdate>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(PodUpdate::Changed(pod.clone()));
    let handle = tokio::spawn(async move {
        let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        let Some(mut sup) = Supervisor::new(agent, pod) else {
            warn!(pod = %name, "no pod address left; not starting pod");
            return;
        };
        sup.run(rx, shutdown).await;
        sup.cleanup();
        debug!(pod = %name, "supervisor finished");
    });
    (tx, handle)
}

struct Exit {
    idx: usize,
    generation: u64,
    code: Option<i32>,
    signal: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Readiness,
    Liveness,
}

struct ProbeResult {
    idx: usize,
    generation: u64,
    kind: ProbeKind,
    ok: bool,
}

struct Slot {
    spec: Container,
    record: ContainerRecord,
    launch: Option<LaunchSpec>,
    pid: Option<u32>,
    generation: u64,
    started: Option<(Instant, Timestamp)>,
    pid_file: Option<PidFile>,
    probes: Option<JoinHandle<()>>,
    restart_at: Option<Instant>,
    crashes: u32,
    has_run: bool,
    readiness: Option<ProbePlan>,
    liveness: Option<ProbePlan>,
    readiness_state: ProbeState,
    liveness_state: ProbeState,
}

/// Why a pod cannot start yet: shown as each container's waiting reason.
struct NotReady {
    reason: &'static str,
    message: String,
    /// False when only a change to the pod (or the image map) can fix it.
    retry: bool,
}

struct Supervisor {
    agent: Arc<Agent>,
    pod: Arc<Pod>,
    ip: Ipv4Addr,
    slots: Vec<Slot>,
    restart_policy: String,
    start_time: Timestamp,
    last_status: Option<PodStatus>,
    status_dirty: bool,
    reason: Option<(String, String)>,
    credentials: Option<PodCredentials>,
    token_refreshed: Instant,
    terminating: bool,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    probes_tx: mpsc::UnboundedSender<ProbeResult>,
    probes_rx: mpsc::UnboundedReceiver<ProbeResult>,
    warned: Option<String>,
}

impl Supervisor {
    fn new(agent: Arc<Agent>, pod: Arc<Pod>) -> Option<Self> {
        let ip = agent.ips.lock().ok()?.allocate()?;
        let spec = pod.spec.clone().unwrap_or_default();
        let previous: BTreeMap<String, i32> = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .map(|cs| (cs.name.clone(), cs.restart_count))
            .collect();
        let slots = spec
            .containers
            .iter()
            .map(|c| {
                let mut record =
                    ContainerRecord::new(&c.name, c.image.as_deref().unwrap_or_default());
                record.restart_count = previous.get(&c.name).copied().unwrap_or(0);
                Slot {
                    spec: c.clone(),
                    record,
                    launch: None,
                    pid: None,
                    generation: 0,
                    started: None,
                    pid_file: None,
                    probes: None,
                    restart_at: None,
                    crashes: 0,
                    has_run: false,
                    readiness: None,
                    liveness: None,
                    readiness_state: ProbeState::default(),
                    liveness_state: ProbeState::default(),
                }
            })
            .collect();
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let (probes_tx, probes_rx) = mpsc::unbounded_channel();
        Some(Supervisor {
            restart_policy: spec
                .restart_policy
                .clone()
                .unwrap_or_else(|| "Always".into()),
            agent,
            pod,
            ip,
            slots,
            start_time: Timestamp::now(),
            last_status: None,
            status_dirty: true,
            reason: None,
            credentials: None,
            token_refreshed: Instant::now(),
            terminating: false,
            exits_tx,
            exits_rx,
            probes_tx,
            probes_rx,
            warned: None,
        })
    }

    fn name(&self) -> String {
        format!(
            "{}/{}",
            self.pod.namespace().unwrap_or_default(),
            self.pod.name_any()
        )
    }

    async fn run(&mut self, mut updates: watch::Receiver<PodUpdate>, shutdown: CancellationToken) {
        let already_done = matches!(
            self.pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        );
        let mut prepared = already_done;
        if already_done {
            // A finished pod from before an agent restart is not run again.
            self.last_status = self.pod.status.clone();
            self.status_dirty = false;
        }
        loop {
            if !prepared && !self.terminating {
                match self.prepare().await {
                    Ok(()) => {
                        prepared = true;
                        self.reason = None;
                        self.warned = None;
                    }
                    Err(e) => self.not_ready(e).await,
                }
            }
            if prepared && !self.terminating {
                self.start_due();
            }
            if self.status_dirty {
                self.report().await;
            }
            if prepared
                && self.credentials.is_some()
                && self.token_refreshed.elapsed() >= credentials::TOKEN_REFRESH
            {
                self.refresh_token().await;
            }
            let next_restart = self.slots.iter().filter_map(|s| s.restart_at).min();
            let retry_prepare = !prepared && !self.terminating;
            tokio::select! {
                Some(exit) = self.exits_rx.recv() => self.on_exit(exit).await,
                Some(result) = self.probes_rx.recv() => self.on_probe(result).await,
                _ = sleep_until(next_restart), if next_restart.is_some() => {}
                _ = tokio::time::sleep(PREPARE_RETRY), if retry_prepare => {}
                _ = tokio::time::sleep(RESYNC), if self.status_dirty => {}
                _ = tokio::time::sleep(credentials::TOKEN_REFRESH), if self.credentials.is_some() => {}
                changed = updates.changed() => {
                    let update = if changed.is_ok() { updates.borrow_and_update().clone() } else { PodUpdate::Removed };
                    match update {
                        PodUpdate::Removed => {
                            self.terminate(FORCED_GRACE, false).await;
                            return;
                        }
                        PodUpdate::Changed(pod) => {
                            let deleting = pod.metadata.deletion_timestamp.is_some();
                            self.pod = pod;
                            if deleting {
                                let grace = self.grace_period();
                                self.terminate(grace, true).await;
                                return;
                            }
                        }
                    }
                }
                _ = shutdown.cancelled() => {
                    // The agent is stopping: stop the processes, leave the pod
                    // in the API for the agent's next start (a node reboot).
                    let grace = self.grace_period().min(Duration::from_secs(10));
                    self.terminate(grace, false).await;
                    return;
                }
            }
        }
    }

    fn grace_period(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(secs.max(0) as u64)
    }

    /// Resolves images, writes credentials and builds every container's launch spec.
    async fn prepare(&mut self) -> Result<(), NotReady> {
        let mut entries: Vec<ImageEntry> = Vec::new();
        for slot in &self.slots {
            let image = slot.spec.image.as_deref().unwrap_or_default();
            match self.agent.images.resolve(image) {
                Some(e) => entries.push(e.clone()),
                None => {
                    return Err(NotReady {
                        reason: "ErrImagePull",
                        message: format!(
                            "image {image:?} is not in the node agent's image map ({}); known images: {}",
                            self.agent.images_path.display(),
                            self.agent.images.known().join(", ")
                        ),
                        retry: false,
                    })
                }
            }
        }
        if self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|i| !i.is_empty())
        {
            return Err(NotReady {
                reason: "CreateContainerConfigError",
                message: "init containers are not supported by the matchfleet node agent".into(),
                retry: false,
            });
        }

        let pod_dir = self.agent.pods_dir.join(self.pod.uid().unwrap_or_default());
        std::fs::create_dir_all(&pod_dir).map_err(|e| NotReady {
            reason: "CreateContainerError",
            message: format!("creating {}: {e}", pod_dir.display()),
            retry: true,
        })?;

        let service_env = self.service_env();
        let automount = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.automount_service_account_token)
            .unwrap_or(true);
        if automount && self.credentials.is_none() {
            let api_server = service_env
                .iter()
                .find(|(k, _)| k == "KUBERNETES_SERVICE_HOST")
                .map(|(_, host)| {
                    let port = service_env
                        .iter()
                        .find(|(k, _)| k == "KUBERNETES_SERVICE_PORT")
                        .map(|(_, p)| p.as_str())
                        .unwrap_or("443");
                    format!("https://{host}:{port}")
                })
                .ok_or_else(|| NotReady {
                    reason: "CreateContainerConfigError",
                    message: "the kubernetes Service is not known yet".into(),
                    retry: true,
                })?;
            let creds = credentials::write_for_pod(
                &self.agent.client,
                &self.pod,
                &pod_dir.join("serviceaccount"),
                &self.agent.ca_pem,
                &api_server,
            )
            .await
            .map_err(|e| NotReady {
                reason: "CreateContainerConfigError",
                message: e.to_string(),
                retry: true,
            })?;
            self.credentials = Some(creds);
            self.token_refreshed = Instant::now();
        }

        let (config_maps, secrets) = self.fetch_references().await?;
        let sources = EnvSources {
            pod_ip: Some(self.ip),
            host_ip: Some(self.agent.host_ip),
            config_maps,
            secrets,
            service_env,
            node_cpus: self.agent.cpus,
            node_memory_bytes: self.agent.memory_bytes,
        };
        let pod_security = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.clone());
        let pod_name = self.pod.name_any();
        for (slot, entry) in self.slots.iter_mut().zip(entries) {
            let mut vars = process::base_env(&pod_name);
            if let Some(creds) = &self.credentials {
                vars.push(("KUBECONFIG".into(), creds.kubeconfig.display().to_string()));
            }
            let own =
                env::container_env(&self.pod, &slot.spec, &sources).map_err(|e| NotReady {
                    reason: "CreateContainerConfigError",
                    message: e.to_string(),
                    retry: true,
                })?;
            for (k, v) in own {
                match vars.iter_mut().find(|(name, _)| *name == k) {
                    Some(slot) => slot.1 = v,
                    None => vars.push((k, v)),
                }
            }
            let mut argv = argv_for(&slot.spec, &entry, &vars);
            let sc = slot.spec.security_context.as_ref();
            let uid = sc
                .and_then(|s| s.run_as_user)
                .or_else(|| pod_security.as_ref().and_then(|s| s.run_as_user));
            let gid = sc
                .and_then(|s| s.run_as_group)
                .or_else(|| pod_security.as_ref().and_then(|s| s.run_as_group));
            let non_root = sc
                .and_then(|s| s.run_as_non_root)
                .or_else(|| pod_security.as_ref().and_then(|s| s.run_as_non_root))
                .unwrap_or(false);
            if non_root && uid.unwrap_or(0) == 0 {
                return Err(NotReady {
                    reason: "CreateContainerConfigError",
                    message: format!(
                        "container {} has runAsNonRoot and no non-zero runAsUser (images here have no USER to check)",
                        slot.spec.name
                    ),
                    retry: false,
                });
            }
            if uid.is_some_and(|u| u != 0) && nix::unistd::geteuid().is_root() {
                if let Some(program) = argv.first_mut() {
                    *program = self
                        .agent
                        .image_store
                        .readable(program)
                        .map_err(|e| NotReady {
                            reason: "ErrImagePull",
                            message: format!("copying {program} for a non-root container: {e}"),
                            retry: true,
                        })?;
                }
            }
            let working_dir = slot
                .spec
                .working_dir
                .as_ref()
                .map(PathBuf::from)
                .filter(|p| p.is_dir())
                .unwrap_or_else(|| pod_dir.clone());
            slot.launch = Some(LaunchSpec {
                argv,
                env: vars,
                working_dir,
                log_file: self.agent.logs_dir.join(format!(
                    "{}_{}_{}.log",
                    self.pod.namespace().unwrap_or_default(),
                    pod_name,
                    slot.spec.name
                )),
                uid: uid.and_then(|u| u32::try_from(u).ok()),
                gid: gid.and_then(|g| u32::try_from(g).ok()),
            });
            slot.readiness = slot
                .spec
                .readiness_probe
                .as_ref()
                .and_then(|p| probe::plan(p, &slot.spec, self.ip));
            slot.liveness = slot
                .spec
                .liveness_probe
                .as_ref()
                .and_then(|p| probe::plan(p, &slot.spec, self.ip));
        }
        // A non-root container must be able to write its working folder and read its token.
        if let Some(uid) = self
            .slots
            .iter()
            .filter_map(|s| s.launch.as_ref()?.uid)
            .next()
        {
            chown_tree(&pod_dir, uid);
        }
        Ok(())
    }

    /// The kubelet's Service links: the pod's namespace's Services (unless
    /// `enableServiceLinks: false`) and always the `kubernetes` Service.
    fn service_env(&self) -> Vec<(String, String)> {
        let ns = self.pod.namespace().unwrap_or_default();
        let links = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        let mut services: Vec<Service> = self
            .agent
            .services
            .state()
            .iter()
            .filter(|s| {
                let sns = s.namespace().unwrap_or_default();
                (links && sns == ns) || (sns == "default" && s.name_any() == "kubernetes")
            })
            .map(|s| (**s).clone())
            .collect();
        services.sort_by_key(|s| (s.namespace(), s.name_any()));
        services.dedup_by_key(|s| (s.namespace(), s.name_any()));
        env::service_env(&services)
    }

    async fn fetch_references(
        &self,
    ) -> Result<
        (
            BTreeMap<String, BTreeMap<String, String>>,
            BTreeMap<String, BTreeMap<String, String>>,
        ),
        NotReady,
    > {
        let ns = self.pod.namespace().unwrap_or_default();
        let (mut cm_names, mut secret_names) = (Vec::new(), Vec::new());
        for c in &self.slots {
            for from in c.spec.env_from.iter().flatten() {
                if let Some(r) = &from.config_map_ref {
                    cm_names.push(r.name.clone());
                }
                if let Some(r) = &from.secret_ref {
                    secret_names.push(r.name.clone());
                }
            }
            for var in c.spec.env.iter().flatten() {
                if let Some(from) = &var.value_from {
                    if let Some(r) = &from.config_map_key_ref {
                        cm_names.push(r.name.clone());
                    }
                    if let Some(r) = &from.secret_key_ref {
                        secret_names.push(r.name.clone());
                    }
                }
            }
        }
        let api_err = |kind: &str, name: &str, e: kube::Error| NotReady {
            reason: "CreateContainerConfigError",
            message: format!("reading {kind} {name}: {e}"),
            retry: true,
        };
        let mut config_maps = BTreeMap::new();
        let cms: Api<ConfigMap> = Api::namespaced(self.agent.client.clone(), &ns);
        for name in cm_names {
            if let Some(cm) = cms
                .get_opt(&name)
                .await
                .map_err(|e| api_err("ConfigMap", &name, e))?
            {
                let mut data = cm.data.unwrap_or_default();
                for (k, v) in cm.binary_data.unwrap_or_default() {
                    data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
                }
                config_maps.insert(name, data);
            }
        }
        let mut secrets = BTreeMap::new();
        let api: Api<Secret> = Api::namespaced(self.agent.client.clone(), &ns);
        for name in secret_names {
            if let Some(s) = api
                .get_opt(&name)
                .await
                .map_err(|e| api_err("Secret", &name, e))?
            {
                let mut data: BTreeMap<String, String> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                    .collect();
                data.extend(s.string_data.unwrap_or_default());
                secrets.insert(name, data);
            }
        }
        Ok((config_maps, secrets))
    }

    async fn not_ready(&mut self, e: NotReady) {
        for slot in &mut self.slots {
            slot.record.state = State::waiting(e.reason, Some(e.message.clone()));
        }
        self.reason = Some((e.reason.to_string(), e.message.clone()));
        self.status_dirty = true;
        if self.warned.as_deref() != Some(e.message.as_str()) {
            warn!(pod = %self.name(), reason = e.reason, retry = e.retry, "{}", e.message);
            self.spawn_event(Severity::Warning, "Failed", e.message.clone());
            self.warned = Some(e.message);
        }
    }

    /// Starts every container that has not run yet or whose back-off is over.
    fn start_due(&mut self) {
        let now = Instant::now();
        for idx in 0..self.slots.len() {
            let slot = &self.slots[idx];
            let due = slot.pid.is_none()
                && slot.launch.is_some()
                && match slot.restart_at {
                    Some(at) => at <= now,
                    None => !slot.has_run,
                };
            if due {
                self.start(idx);
            }
        }
    }

    fn start(&mut self, idx: usize) {
        let name = self.name();
        let slot = &mut self.slots[idx];
        let Some(launch) = slot.launch.clone() else {
            return;
        };
        slot.restart_at = None;
        match process::spawn(&launch) {
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                slot.generation += 1;
                if slot.has_run {
                    slot.record.restart_count += 1;
                }
                slot.has_run = true;
                slot.pid = Some(pid);
                let started = Timestamp::now();
                slot.started = Some((Instant::now(), started));
                slot.record.state = State::Running {
                    started_at: started,
                };
                slot.record.ready = slot.readiness.is_none();
                slot.readiness_state = ProbeState::default();
                slot.liveness_state = ProbeState::default();
                slot.pid_file = PidFile::write(
                    &self.agent.pids_dir,
                    &format!("{}-{}", self.pod.uid().unwrap_or_default(), slot.spec.name),
                    pid,
                )
                .map_err(|e| warn!(error = %e, "writing pid file"))
                .ok();
                let generation = slot.generation;
                let exits = self.exits_tx.clone();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    // When a container's main process ends, a runtime ends the
                    // whole container: no child (a render) outlives it.
                    process::signal_group(pid, Signal::SIGKILL);
                    let (code, signal) = match status {
                        Ok(s) => {
                            use std::os::unix::process::ExitStatusExt;
                            (s.code(), s.signal())
                        }
                        Err(_) => (None, Some(9)),
                    };
                    let _ = exits.send(Exit {
                        idx,
                        generation,
                        code,
                        signal,
                    });
                });
                slot.probes =
                    spawn_probes(idx, generation, slot, &launch.env, self.probes_tx.clone());
                info!(pod = %name, container = %slot.spec.name, pid, "started container");
                let note = format!("Started container {} (pid {pid})", slot.spec.name);
                self.status_dirty = true;
                self.spawn_event(Severity::Normal, "Started", note);
            }
            Err(e) => {
                let message = format!("starting {:?}: {e}", launch.argv);
                warn!(pod = %name, container = %slot.spec.name, "{message}");
                slot.has_run = true;
                slot.crashes += 1;
                slot.record.state = State::waiting("RunContainerError", Some(message.clone()));
                slot.restart_at = Some(Instant::now() + backoff(slot.crashes));
                self.status_dirty = true;
                self.spawn_event(Severity::Warning, "Failed", message);
            }
        }
    }

    async fn on_exit(&mut self, exit: Exit) {
        let name = self.name();
        let policy = self.restart_policy.clone();
        let terminating = self.terminating;
        let slot = &mut self.slots[exit.idx];
        if slot.generation != exit.generation {
            return;
        }
        if let Some(p) = slot.probes.take() {
            p.abort();
        }
        slot.pid = None;
        slot.pid_file = None;
        slot.record.ready = false;
        let (ran_for, started_at) = slot
            .started
            .take()
            .map(|(i, t)| (i.elapsed(), t))
            .unwrap_or((Duration::ZERO, Timestamp::now()));
        let terminated = State::exited(exit.code, exit.signal, started_at, Timestamp::now());
        let failed = !matches!(terminated, State::Terminated { exit_code: 0, .. });
        info!(pod = %name, container = %slot.spec.name, code = ?exit.code, signal = ?exit.signal, "container exited");
        let restart = !terminating
            && match policy.as_str() {
                "Always" => true,
                "OnFailure" => failed,
                _ => false,
            };
        if restart {
            slot.crashes = if ran_for >= BACKOFF_RESET_AFTER {
                1
            } else {
                slot.crashes + 1
            };
            let delay = backoff(slot.crashes);
            slot.restart_at = Some(Instant::now() + delay);
            slot.record.last_terminated = Some(terminated);
            slot.record.state = State::waiting(
                "CrashLoopBackOff",
                Some(format!(
                    "back-off {}s restarting failed container={} pod={}",
                    delay.as_secs_f32().ceil(),
                    slot.spec.name,
                    name
                )),
            );
            let note = format!(
                "Back-off {:.0}s restarting container {}",
                delay.as_secs_f32(),
                slot.spec.name
            );
            self.status_dirty = true;
            self.spawn_event(Severity::Warning, "BackOff", note);
        } else {
            slot.record.state = terminated;
            self.status_dirty = true;
        }
    }

    async fn on_probe(&mut self, result: ProbeResult) {
        let name = self.name();
        let slot = &mut self.slots[result.idx];
        if slot.generation != result.generation || slot.pid.is_none() {
            return;
        }
        match result.kind {
            ProbeKind::Readiness => {
                let Some(plan) = &slot.readiness else { return };
                if let Some(ready) = slot.readiness_state.record(result.ok, plan) {
                    slot.record.ready = ready;
                    self.status_dirty = true;
                    if !ready {
                        let note = format!("Readiness probe of {} failed", slot.spec.name);
                        self.spawn_event(Severity::Warning, "Unhealthy", note);
                    }
                }
            }
            ProbeKind::Liveness => {
                let Some(plan) = &slot.liveness else { return };
                if slot.liveness_state.record(result.ok, plan) == Some(false) {
                    let pid = slot.pid.unwrap_or(0);
                    warn!(pod = %name, container = %slot.spec.name, "liveness probe failed; restarting");
                    process::signal_group(pid, Signal::SIGTERM);
                    let grace = self.grace_period();
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        process::signal_group(pid, Signal::SIGKILL);
                    });
                    let note = format!(
                        "Liveness probe of {} failed; container will be restarted",
                        self.slots[result.idx].spec.name
                    );
                    self.spawn_event(Severity::Warning, "Unhealthy", note);
                }
            }
        }
    }

    /// Stops every container: SIGTERM to each process group, SIGKILL to what
    /// is left when the grace period ends; then optionally removes the pod.
    async fn terminate(&mut self, grace: Duration, delete_from_api: bool) {
        self.terminating = true;
        let running: Vec<u32> = self.slots.iter().filter_map(|s| s.pid).collect();
        if !running.is_empty() {
            info!(pod = %self.name(), grace_s = grace.as_secs_f32(), "stopping containers");
            let note = format!(
                "Stopping containers with a grace period of {}s",
                grace.as_secs()
            );
            self.spawn_event(Severity::Normal, "Killing", note);
        }
        for s in &mut self.slots {
            s.restart_at = None;
            if let Some(p) = s.probes.take() {
                p.abort();
            }
        }
        for &pid in &running {
            process::signal_group(pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        self.wait_exits(deadline).await;
        let left: Vec<u32> = self.slots.iter().filter_map(|s| s.pid).collect();
        if !left.is_empty() {
            warn!(pod = %self.name(), "grace period over; sending SIGKILL");
            for &pid in &left {
                process::signal_group(pid, Signal::SIGKILL);
            }
            self.wait_exits(Instant::now() + Duration::from_secs(5))
                .await;
        }
        // Members of a group whose leader exited on SIGTERM may linger.
        for &pid in &running {
            if process::group_alive(pid) {
                process::signal_group(pid, Signal::SIGKILL);
            }
        }
        for s in &mut self.slots {
            if !matches!(
                s.record.state,
                State::Terminated { .. } | State::Running { .. }
            ) {
                if let Some(last) = s.record.last_terminated.clone() {
                    s.record.state = last;
                }
            }
        }
        self.status_dirty = true;
        if delete_from_api {
            self.report().await;
            let pods: Api<Pod> = Api::namespaced(
                self.agent.client.clone(),
                &self.pod.namespace().unwrap_or_default(),
            );
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: self.pod.uid(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match pods.delete(&self.pod.name_any(), &params).await {
                Ok(_) => info!(pod = %self.name(), "pod removed"),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => warn!(pod = %self.name(), error = %e, "removing pod failed"),
            }
        }
    }

    async fn wait_exits(&mut self, deadline: Instant) {
        while self.slots.iter().any(|s| s.pid.is_some()) {
            match tokio::time::timeout_at(deadline, self.exits_rx.recv()).await {
                Ok(Some(exit)) => self.on_exit(exit).await,
                _ => return,
            }
        }
    }

    async fn refresh_token(&mut self) {
        let Some(creds) = self.credentials.clone() else {
            return;
        };
        match credentials::refresh(&self.agent.client, &self.pod, &creds).await {
            Ok(()) => self.token_refreshed = Instant::now(),
            Err(e) => {
                warn!(pod = %self.name(), error = %e, "refreshing the service account token failed")
            }
        }
    }

    /// Patches the pod's status if it changed since the last successful patch.
    async fn report(&mut self) {
        let pids: Vec<Option<u32>> = self.slots.iter().map(|s| s.pid).collect();
        let records: Vec<ContainerRecord> = self.slots.iter().map(|s| s.record.clone()).collect();
        let view = PodView {
            restart_policy: &self.restart_policy,
            pod_ip: Some(self.ip),
            host_ip: self.agent.host_ip,
            start_time: self.start_time,
            containers: &records,
            pids: &pids,
            reason: self.reason.clone(),
        };
        let mut previous = self.last_status.clone().unwrap_or_default();
        if let Some(scheduled) = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
        {
            let conds = previous.conditions.get_or_insert_with(Vec::new);
            conds.retain(|c| c.type_ != "PodScheduled");
            conds.push(scheduled.clone());
        }
        let status = status::pod_status(&view, Some(&previous), Timestamp::now());
        if self.last_status.as_ref() == Some(&status) {
            self.status_dirty = false;
            return;
        }
        let pods: Api<Pod> = Api::namespaced(
            self.agent.client.clone(),
            &self.pod.namespace().unwrap_or_default(),
        );
        let patch = serde_json::json!({ "status": status });
        match pods
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                self.last_status = Some(status);
                self.status_dirty = false;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => self.status_dirty = false,
            Err(e) => {
                warn!(pod = %self.name(), error = %e, "status patch failed; retrying");
                self.status_dirty = true;
            }
        }
    }

    /// Events are best effort and must not hold up the supervisor.
    fn spawn_event(&self, severity: Severity, reason: &'static str, message: String) {
        let event = events::pod_event(
            &self.pod,
            &self.agent.node_name,
            severity,
            reason,
            &message,
            Timestamp::now(),
        );
        tokio::spawn(events::record(self.agent.client.clone(), event));
    }

    fn cleanup(&mut self) {
        if let Ok(mut ips) = self.agent.ips.lock() {
            ips.release(self.ip);
        }
        if self.terminating {
            let dir = self.agent.pods_dir.join(self.pod.uid().unwrap_or_default());
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn backoff(crashes: u32) -> Duration {
    let exp = crashes.saturating_sub(1).min(16);
    (BACKOFF_BASE * 2u32.pow(exp)).min(BACKOFF_MAX)
}

/// The process to run: like a container runtime, `command` replaces the
/// image's entrypoint and `args` its default arguments; `$(VAR)` references
/// expand from the container's environment. A `command` that names the
/// image's binary by its in-image path (e.g. `/usr/local/bin/matchfleet-worker`)
/// runs the mapped local binary.
pub fn argv_for(
    container: &Container,
    entry: &ImageEntry,
    env: &[(String, String)],
) -> Vec<String> {
    let mut argv: Vec<String> = match &container.command {
        Some(cmd) if !cmd.is_empty() => {
            let mut cmd = cmd.clone();
            if let Some(local) = entry.entrypoint.first() {
                let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
                if !std::path::Path::new(&cmd[0]).exists() && base(&cmd[0]) == base(local) {
                    cmd[0] = local.clone();
                }
            }
            cmd
        }
        _ => entry.entrypoint.clone(),
    };
    match &container.args {
        Some(args) => argv.extend(args.iter().cloned()),
        None if container.command.is_none() => argv.extend(entry.cmd.iter().cloned()),
        None => {}
    }
    argv.into_iter().map(|a| env::expand(&a, env)).collect()
}

fn spawn_probes(
    idx: usize,
    generation: u64,
    slot: &Slot,
    env: &[(String, String)],
    tx: mpsc::UnboundedSender<ProbeResult>,
) -> Option<JoinHandle<()>> {
    let plans: Vec<(ProbeKind, ProbePlan)> = [
        slot.readiness.clone().map(|p| (ProbeKind::Readiness, p)),
        slot.liveness.clone().map(|p| (ProbeKind::Liveness, p)),
    ]
    .into_iter()
    .flatten()
    .collect();
    if plans.is_empty() {
        return None;
    }
    let env = env.to_vec();
    Some(tokio::spawn(async move {
        let loops = plans.into_iter().map(|(kind, plan)| {
            let tx = tx.clone();
            let env = env.clone();
            async move {
                tokio::time::sleep(plan.initial_delay).await;
                loop {
                    let ok = probe::run(&plan, &env).await;
                    if tx
                        .send(ProbeResult {
                            idx,
                            generation,
                            kind,
                            ok,
                        })
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(plan.period).await;
                }
            }
        });
        futures::future::join_all(loops).await;
    }))
}

fn chown_tree(dir: &std::path::Path, uid: u32) {
    let uid = Some(nix::unistd::Uid::from_raw(uid));
    let _ = nix::unistd::chown(dir, uid, None);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                chown_tree(&path, uid.map(|u| u.as_raw()).unwrap_or(0));
            } else {
                let _ = nix::unistd::chown(&path, uid, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ImageEntry {
        ImageEntry {
            entrypoint: vec!["/build/matchfleet-worker".into()],
            cmd: vec!["--help".into()],
        }
    }

    fn container(yaml: &str) -> Container {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn argv_follows_entrypoint_and_cmd_rules() {
        let env = vec![("MODE".to_string(), "render".to_string())];
        assert_eq!(
            argv_for(&container("name: c"), &entry(), &env),
            vec!["/build/matchfleet-worker", "--help"]
        );
        assert_eq!(
            argv_for(&container("name: c\nargs: [$(MODE), -v]"), &entry(), &env),
            vec!["/build/matchfleet-worker", "render", "-v"]
        );
        // An in-image path to the same binary maps to the local build.
        assert_eq!(
            argv_for(
                &container("name: c\ncommand: [/usr/local/bin/matchfleet-worker]"),
                &entry(),
                &env
            ),
            vec!["/build/matchfleet-worker"]
        );
        assert_eq!(
            argv_for(
                &container("name: c\ncommand: [sh, -c, 'echo hi']"),
                &entry(),
                &env
            ),
            vec!["sh", "-c", "echo hi"]
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(50), BACKOFF_MAX);
    }
}
