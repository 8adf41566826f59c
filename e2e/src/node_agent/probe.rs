//! Readiness and liveness probes: httpGet, tcpSocket and exec, against the
//! pod's own loopback address, with the kubelet's thresholds.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// How a probe is run, resolved from the spec once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    Http { url: String },
    Tcp { addr: String },
    Exec { argv: Vec<String> },
}

/// A probe with its timings and thresholds (kubelet defaults where unset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbePlan {
    pub action: ProbeAction,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// Resolves `probe` for `container` at `ip`; `None` when it names a port the
/// container does not declare or has no action (the caller reports that).
pub fn plan(probe: &Probe, container: &Container, ip: Ipv4Addr) -> Option<ProbePlan> {
    let port = |p: &IntOrString| -> Option<u16> {
        match p {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        }
    };
    let action = if let Some(h) = &probe.http_get {
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let path = if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        };
        ProbeAction::Http {
            url: format!(
                "http://{}:{}{}",
                h.host.as_deref().unwrap_or(&ip.to_string()),
                port(&h.port)?,
                path
            ),
        }
    } else if let Some(t) = &probe.tcp_socket {
        ProbeAction::Tcp {
            addr: format!(
                "{}:{}",
                t.host.as_deref().unwrap_or(&ip.to_string()),
                port(&t.port)?
            ),
        }
    } else if let Some(e) = &probe.exec {
        ProbeAction::Exec {
            argv: e.command.clone().unwrap_or_default(),
        }
    } else {
        return None;
    };
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    Some(ProbePlan {
        action,
        initial_delay: secs(probe.initial_delay_seconds, 0),
        period: secs(probe.period_seconds, 10).max(Duration::from_millis(100)),
        timeout: secs(probe.timeout_seconds, 1).max(Duration::from_millis(100)),
        success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
    })
}

/// Runs the probe once: success is a 2xx/3xx answer, an accepted connection,
/// or an exit code of 0 within the timeout.
pub async fn run(plan: &ProbePlan, env: &[(String, String)]) -> bool {
    match &plan.action {
        ProbeAction::Http { url } => crate::http::get(url, plan.timeout)
            .await
            .map(|r| (200..400).contains(&r.status))
            .unwrap_or(false),
        ProbeAction::Tcp { addr } => matches!(
            tokio::time::timeout(plan.timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        ),
        ProbeAction::Exec { argv } => {
            let Some((program, args)) = argv.split_first() else {
                return false;
            };
            let child = tokio::process::Command::new(program)
                .args(args)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status();
            matches!(
                tokio::time::timeout(plan.timeout, child).await,
                Ok(Ok(status)) if status.success()
            )
        }
    }
}

/// Counts consecutive results against the thresholds.
#[derive(Debug, Clone, Default)]
pub struct ProbeState {
    successes: u32,
    failures: u32,
}

impl ProbeState {
    /// Records a result; returns the new verdict if it changed: `Some(true)`
    /// once `success_threshold` successes in a row, `Some(false)` once
    /// `failure_threshold` failures in a row.
    pub fn record(&mut self, ok: bool, plan: &ProbePlan) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes += 1;
            (self.successes == plan.success_threshold).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures == plan.failure_threshold).then_some(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Container {
        serde_yaml_ng::from_str("name: c\nports:\n- {name: http, containerPort: 8080}\n").unwrap()
    }

    #[test]
    fn resolves_named_ports_and_defaults() {
        let probe: Probe =
            serde_yaml_ng::from_str("httpGet: {path: readyz, port: http}\nperiodSeconds: 2\n")
                .unwrap();
        let p = plan(&probe, &container(), Ipv4Addr::new(127, 1, 0, 5)).unwrap();
        assert_eq!(
            p.action,
            ProbeAction::Http {
                url: "http://127.1.0.5:8080/readyz".into()
            }
        );
        assert_eq!(p.period, Duration::from_secs(2));
        assert_eq!((p.success_threshold, p.failure_threshold), (1, 3));
        let bad: Probe = serde_yaml_ng::from_str("tcpSocket: {port: metrics}\n").unwrap();
        assert!(plan(&bad, &container(), Ipv4Addr::LOCALHOST).is_none());
    }

    #[test]
    fn thresholds_flip_the_verdict_once() {
        let probe: Probe = serde_yaml_ng::from_str(
            "tcpSocket: {port: 1}\nsuccessThreshold: 2\nfailureThreshold: 2\n",
        )
        .unwrap();
        let p = plan(&probe, &container(), Ipv4Addr::LOCALHOST).unwrap();
        let mut s = ProbeState::default();
        assert_eq!(s.record(true, &p), None);
        assert_eq!(s.record(true, &p), Some(true));
        assert_eq!(s.record(true, &p), None);
        assert_eq!(s.record(false, &p), None);
        assert_eq!(s.record(false, &p), Some(false));
        assert_eq!(s.record(false, &p), None);
    }
}
