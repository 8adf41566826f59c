//! What the benches that run worker processes share: their child processes,
//! log tails for error messages, waiting for an endpoint, reading metrics,
//! free ports, and CPU time from /proc.
//! Included with `#[path]` (a directory without `main.rs` is not a bench);
//! each bench uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Child processes, killed however the run ends.
#[derive(Default)]
pub struct Children(pub Vec<Child>);

impl Children {
    /// Fails if any child has exited, with the tails of `logs`.
    pub fn check_alive(&mut self, logs: &[PathBuf]) -> anyhow::Result<()> {
        for child in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                bail!("a child process exited ({status})\n{}", tails(logs));
            }
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last lines of a log, headed by its path.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(15);
    format!("--- {} ---\n{}", log.display(), lines[from..].join("\n"))
}

fn tails(logs: &[PathBuf]) -> String {
    logs.iter().map(|l| tail(l)).collect::<Vec<_>>().join("\n")
}

/// Waits until `url` answers 2xx, failing early if a child died.
pub async fn wait_ok(
    http: &reqwest::Client,
    url: &str,
    children: &mut Children,
    logs: &[PathBuf],
) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        children.check_alive(logs)?;
        if Instant::now() > until {
            bail!("{url} did not answer within 60 s\n{}", tails(logs));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Prometheus text as name -> value.
pub async fn metrics(http: &reqwest::Client, url: &str) -> anyhow::Result<HashMap<String, f64>> {
    let text = http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect())
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Linux reports /proc CPU times in USER_HZ, which is 100 on every mainstream
/// architecture (it is ABI, independent of the kernel's CONFIG_HZ).
const USER_HZ: f64 = 100.0;

/// Whole-machine CPU ticks from /proc/stat.
#[derive(Clone, Copy)]
pub struct SysCpu {
    busy: u64,
    total: u64,
}

impl SysCpu {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let total: u64 = fields.iter().take(8).sum();
        // idle and iowait
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        SysCpu {
            busy: total.saturating_sub(idle),
            total,
        }
    }

    pub fn since(&self, before: &SysCpu) -> SysCpu {
        SysCpu {
            busy: self.busy.saturating_sub(before.busy),
            total: self.total.saturating_sub(before.total),
        }
    }

    /// CPU seconds busy (all cores).
    pub fn busy_seconds(&self) -> f64 {
        self.busy as f64 / USER_HZ
    }

    pub fn busy_percent(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        100.0 * self.busy as f64 / self.total as f64
    }
}

/// CPU seconds of one process (all its threads) and of its waited-for children.
pub struct ProcCpu {
    pub own: f64,
    pub children: f64,
}

impl ProcCpu {
    pub fn of(pid: &str) -> Self {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after `(comm)`, which may contain spaces: state is field 3,
        // utime 14, stime 15, cutime 16, cstime 17.
        let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
        let f: Vec<f64> = after
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        let at = |field: usize| f.get(field - 3).copied().unwrap_or(0.0) / USER_HZ;
        ProcCpu {
            own: at(14) + at(15),
            children: at(16) + at(17),
        }
    }

    pub fn since(&self, before: &ProcCpu) -> ProcCpu {
        ProcCpu {
            own: self.own - before.own,
            children: self.children - before.children,
        }
    }
}
