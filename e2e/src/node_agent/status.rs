//! What the agent knows about a pod's containers, and the PodStatus it reports.
//! Pure: the phase rules follow the kubelet's (`getPhase`), so controllers and
//! `kubectl` read our pods exactly as they read a real node's.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        started_at: Timestamp,
        finished_at: Timestamp,
    },
}

impl State {
    pub fn waiting(reason: &str, message: Option<String>) -> Self {
        State::Waiting {
            reason: reason.to_string(),
            message,
        }
    }

    /// A terminated state from an exit code, or the signal that ended the
    /// process (reported as 128 + signal, like a container runtime).
    pub fn exited(
        code: Option<i32>,
        signal: Option<i32>,
        started_at: Timestamp,
        finished_at: Timestamp,
    ) -> Self {
        let exit_code = code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
        State::Terminated {
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.to_string(),
            started_at,
            finished_at,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self, State::Running { .. })
    }

    fn to_api(&self) -> ContainerState {
        match self {
            State::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            State::Running { started_at } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*started_at)),
                }),
                ..Default::default()
            },
            State::Terminated {
                exit_code,
                signal,
                reason,
                started_at,
                finished_at,
            } => ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *exit_code,
                    signal: *signal,
                    reason: Some(reason.clone()),
                    started_at: Some(Time(*started_at)),
                    finished_at: Some(Time(*finished_at)),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }
}

/// One container as the agent sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerRecord {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last_terminated: Option<State>,
    pub restart_count: i32,
    pub ready: bool,
}

impl ContainerRecord {
    pub fn new(name: &str, image: &str) -> Self {
        ContainerRecord {
            name: name.to_string(),
            image: image.to_string(),
            state: State::waiting("ContainerCreating", None),
            last_terminated: None,
            restart_count: 0,
            ready: false,
        }
    }

    fn to_api(&self, pid: Option<u32>) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: format!("local://{}", self.image),
            container_id: pid.map(|p| format!("process://{p}")),
            state: Some(self.state.to_api()),
            last_state: self.last_terminated.as_ref().map(State::to_api),
            ready: self.ready,
            restart_count: self.restart_count,
            started: Some(self.state.is_running()),
            ..Default::default()
        }
    }
}

/// The pod phase from its containers, by the kubelet's rules: a container
/// waiting for its first start keeps the pod Pending; one waiting to be
/// restarted counts as stopped.
pub fn phase(restart_policy: &str, containers: &[ContainerRecord]) -> &'static str {
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in containers {
        match &c.state {
            State::Running { .. } => running += 1,
            State::Terminated { exit_code, .. } => {
                stopped += 1;
                if *exit_code == 0 {
                    succeeded += 1;
                }
            }
            State::Waiting { .. } if c.last_terminated.is_some() => stopped += 1,
            State::Waiting { .. } => waiting += 1,
        }
    }
    if waiting > 0 || containers.is_empty() {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped > 0 {
        match restart_policy {
            "Always" => "Running",
            _ if stopped == succeeded => "Succeeded",
            "Never" => "Failed",
            _ => "Running",
        }
    } else {
        "Pending"
    }
}

/// Everything the status is computed from.
pub struct PodView<'a> {
    pub restart_policy: &'a str,
    pub pod_ip: Option<Ipv4Addr>,
    pub host_ip: Ipv4Addr,
    pub start_time: Timestamp,
    pub containers: &'a [ContainerRecord],
    pub pids: &'a [Option<u32>],
    /// The pod-level reason and message, e.g. why it cannot start.
    pub reason: Option<(String, String)>,
}

/// The status to report. Conditions keep their last transition time from
/// `previous` while their value is unchanged; PodScheduled (the scheduler's)
/// is carried over as it is.
pub fn pod_status(view: &PodView, previous: Option<&PodStatus>, now: Timestamp) -> PodStatus {
    let phase = phase(view.restart_policy, view.containers);
    let all_ready = !view.containers.is_empty() && view.containers.iter().all(|c| c.ready);
    let ready = all_ready && phase == "Running";
    let prev_conditions = previous
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let condition = |type_: &str, status: bool| {
        let status = if status { "True" } else { "False" }.to_string();
        let since = prev_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        PodCondition {
            type_: type_.to_string(),
            status,
            last_transition_time: Some(since),
            ..Default::default()
        }
    };
    let mut conditions: Vec<PodCondition> = prev_conditions
        .iter()
        .filter(|c| c.type_ == "PodScheduled")
        .cloned()
        .collect();
    conditions.push(condition(
        "PodReadyToStartContainers",
        view.pod_ip.is_some(),
    ));
    conditions.push(condition("Initialized", true));
    conditions.push(condition("ContainersReady", all_ready));
    conditions.push(condition("Ready", ready));

    let pod_ip = view.pod_ip.map(|ip| ip.to_string());
    PodStatus {
        phase: Some(phase.to_string()),
        conditions: Some(conditions),
        host_ip: Some(view.host_ip.to_string()),
        host_ips: Some(vec![HostIP {
            ip: view.host_ip.to_string(),
        }]),
        pod_ip: pod_ip.clone(),
        pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
        start_time: Some(Time(view.start_time)),
        container_statuses: Some(
            view.containers
                .iter()
                .zip(view.pids.iter().chain(std::iter::repeat(&None)))
                .map(|(c, pid)| c.to_api(*pid))
                .collect(),
        ),
        reason: view.reason.as_ref().map(|(r, _)| r.clone()),
        message: view.reason.as_ref().map(|(_, m)| m.clone()),
        // The API server sets the QoS class at creation and it is immutable.
        qos_class: None,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(state: State, last: bool) -> ContainerRecord {
        ContainerRecord {
            last_terminated: last
                .then(|| State::exited(Some(1), None, Timestamp::now(), Timestamp::now())),
            state,
            ..ContainerRecord::new("c", "img")
        }
    }

    fn running() -> State {
        State::Running {
            started_at: Timestamp::now(),
        }
    }

    fn exited(code: i32) -> State {
        State::exited(Some(code), None, Timestamp::now(), Timestamp::now())
    }

    #[test]
    fn phase_follows_the_kubelet() {
        let waiting = State::waiting("ContainerCreating", None);
        assert_eq!(phase("Always", &[rec(waiting.clone(), false)]), "Pending");
        assert_eq!(
            phase(
                "Always",
                &[rec(running(), false), rec(waiting.clone(), false)]
            ),
            "Pending"
        );
        assert_eq!(phase("Always", &[rec(running(), false)]), "Running");
        // Crash-looping under Always or OnFailure is still Running.
        assert_eq!(
            phase(
                "Always",
                &[rec(State::waiting("CrashLoopBackOff", None), true)]
            ),
            "Running"
        );
        assert_eq!(
            phase(
                "OnFailure",
                &[rec(State::waiting("CrashLoopBackOff", None), true)]
            ),
            "Running"
        );
        assert_eq!(phase("Never", &[rec(exited(0), false)]), "Succeeded");
        assert_eq!(phase("OnFailure", &[rec(exited(0), false)]), "Succeeded");
        assert_eq!(
            phase("Never", &[rec(exited(0), false), rec(exited(2), false)]),
            "Failed"
        );
    }

    #[test]
    fn signals_map_to_128_plus_signal() {
        match State::exited(None, Some(9), Timestamp::now(), Timestamp::now()) {
            State::Terminated {
                exit_code, reason, ..
            } => {
                assert_eq!(exit_code, 137);
                assert_eq!(reason, "Error");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn conditions_keep_transition_times_and_scheduling() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut c = rec(running(), false);
        c.ready = true;
        let containers = [c];
        let view = PodView {
            restart_policy: "Always",
            pod_ip: Some(Ipv4Addr::new(127, 1, 0, 2)),
            host_ip: Ipv4Addr::LOCALHOST,
            start_time: t0,
            containers: &containers,
            pids: &[Some(42)],
            reason: None,
        };
        let mut first = pod_status(&view, None, t0);
        first.conditions.as_mut().unwrap().push(PodCondition {
            type_: "PodScheduled".into(),
            status: "True".into(),
            ..Default::default()
        });
        let second = pod_status(&view, Some(&first), t1);
        let conds = second.conditions.unwrap();
        let ready = conds.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(ready.last_transition_time, Some(Time(t0)));
        assert!(conds.iter().any(|c| c.type_ == "PodScheduled"));
        assert_eq!(second.pod_ip.as_deref(), Some("127.1.0.2"));
        let cs = &second.container_statuses.unwrap()[0];
        assert_eq!(cs.container_id.as_deref(), Some("process://42"));
    }
}
