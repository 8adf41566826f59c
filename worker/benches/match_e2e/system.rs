//! The machine and its processes: what the bench runs on, CPU accounting from
//! /proc, pinning with `taskset`, and the child processes' lifetimes.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub use crate::support::{free_port, metrics, wait_ok, Children, ProcCpu, SysCpu};

pub fn wall_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Wall clock in fractional milliseconds, for receive times.
pub fn wall_millis_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub rustc: String,
    pub librdkafka: String,
    /// Share of all cores busy in the second before the bench started.
    pub background_busy: f64,
    /// The cores the bench itself runs on, and the broker's, as /proc says.
    pub bench_cpus: String,
    pub broker_cpus: Option<String>,
    /// The broker's process, if it runs on this machine.
    pub broker_pid: Option<u32>,
}

pub fn machine(worker_cpu: usize, bootstrap: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = online_cores().len();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| format!("Linux {}", k.trim()))
        .unwrap_or_else(|_| "unknown".into());
    // From the workspace, so rust-toolchain.toml picks the pinned toolchain.
    let rustc = Command::new("rustc")
        .arg("--version")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
    let broker = broker_pid(bootstrap);
    let broker_cpus = broker.and_then(|pid| cpus_allowed(&pid.to_string()));
    let bench_cpus = cpus_allowed("self").unwrap_or_else(|| "?".into());
    if let Some(b) = &broker_cpus {
        if parse_cpu_list(b).contains(&worker_cpu) {
            eprintln!(
                "match_e2e: note: the broker may run on cpu {worker_cpu} too (allowed: {b}); \
                 the worker shares its core with it unless it is moved (BENCH_MOVE_BROKER=1, the default)"
            );
        }
    }
    Machine {
        cpu,
        cores,
        kernel,
        rustc,
        librdkafka,
        background_busy: 0.0,
        bench_cpus,
        broker_cpus,
        broker_pid: broker,
    }
}

/// The online CPUs, from /sys (all of them, whatever this process's mask).
fn online_cores() -> Vec<usize> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|s| parse_cpu_list(s.trim()))
        .ok()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| {
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
        })
}

/// "0-3,6" -> [0, 1, 2, 3, 6].
pub fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.parse::<usize>().ok()),
        }
    }
    cpus
}

/// `Cpus_allowed_list` of a process ("self" for this one).
pub fn cpus_allowed(pid: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

/// Moves this process off `worker_cpu` (onto every other online core), so
/// the load generator and the result reader never take the worker's core.
/// On a one-core machine there is nowhere else to go: it stays.
pub fn pin_self_away_from(worker_cpu: usize) -> anyhow::Result<()> {
    let cores = online_cores();
    if !cores.contains(&worker_cpu) {
        bail!("BENCH_WORKER_CPU={worker_cpu} is not an online cpu ({cores:?})");
    }
    let others: Vec<String> = cores
        .iter()
        .filter(|&&c| c != worker_cpu)
        .map(|c| c.to_string())
        .collect();
    if others.is_empty() {
        eprintln!("match_e2e: one core only: the bench shares it with the worker");
        return Ok(());
    }
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &others.join(",")])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .context(
            "running taskset (util-linux) to pin the bench; it is needed to pin the worker too",
        )?;
    if !status.success() {
        bail!("taskset could not pin the bench: {status}");
    }
    Ok(())
}

/// The broker moved off the worker's core for the run; its old mask comes
/// back on drop (the broker may be the local cluster's, shared with others).
pub struct BrokerMoved {
    pid: u32,
    was: String,
}

impl Drop for BrokerMoved {
    fn drop(&mut self) {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", &self.was])
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .status();
    }
}

/// Moves every thread of the broker `pid` off `worker_cpu`, if it may run
/// there and another core exists: "one worker core" then means a core the
/// worker does not share with the broker it drives.
pub fn move_broker_away_from(worker_cpu: usize, pid: u32) -> anyhow::Result<Option<BrokerMoved>> {
    let Some(was) = cpus_allowed(&pid.to_string()) else {
        return Ok(None);
    };
    let others: Vec<String> = parse_cpu_list(&was)
        .into_iter()
        .filter(|&c| c != worker_cpu)
        .map(|c| c.to_string())
        .collect();
    if others.is_empty() || !parse_cpu_list(&was).contains(&worker_cpu) {
        return Ok(None);
    }
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &others.join(",")])
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status()
        .context("running taskset to move the broker")?;
    if !status.success() {
        bail!("taskset could not move the broker (pid {pid}): {status}");
    }
    Ok(Some(BrokerMoved { pid, was }))
}

/// Share of all cores busy over `span`, in percent.
pub async fn busy_percent_over(span: Duration) -> f64 {
    let before = SysCpu::now();
    tokio::time::sleep(span).await;
    SysCpu::now().since(&before).busy_percent()
}

/// The broker serving `bootstrap` (its first `host:port`), to account its
/// CPU: the `kafka.Kafka` JVM holding the listening socket of that port.
/// Several brokers may run on one machine (the local cluster's and a
/// private one), so the port decides, not the main class alone.
pub fn broker_pid(bootstrap: &str) -> Option<u32> {
    let port: u16 = bootstrap
        .split(',')
        .next()?
        .rsplit_once(':')?
        .1
        .trim()
        .parse()
        .ok()?;
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        if !cmdline.split(|&b| b == 0).any(|arg| arg == b"kafka.Kafka") {
            return None;
        }
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        fds.flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|link| {
                let link = link.to_string_lossy();
                link.strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .and_then(|inode| inode.parse::<u64>().ok())
                    .is_some_and(|inode| inodes.contains(&inode))
            })
            .then_some(pid)
    })
}

/// Inodes of the sockets listening on `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is "ADDR:PORT" in hex; state 0A is LISTEN; inode is field 9.
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                inodes.extend(f.get(9).and_then(|i| i.parse::<u64>().ok()));
            }
        }
    }
    inodes
}

/// Threads of a process by name (`tokio-runtime-w`, `rdk:broker...`).
pub fn thread_names(pid: u32) -> HashMap<String, usize> {
    let mut names = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return names;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_string()).or_default() += 1;
    }
    names
}

/// CPU marks of the processes a phase is accounted to.
pub struct CpuMark {
    machine: SysCpu,
    broker: Option<(u32, f64)>,
    pids: Vec<(u32, f64)>,
    started: Instant,
}

/// Where the CPU went during a phase, in CPU seconds.
#[derive(Clone, Default)]
pub struct CpuSpent {
    pub wall: f64,
    /// Per accounted process, in the order given to `CpuMark::new`.
    pub processes: Vec<f64>,
    pub broker: Option<f64>,
    pub machine: f64,
    pub busy_percent: f64,
}

impl CpuMark {
    /// Marks the machine, the broker (None: not found on this machine) and `pids`.
    pub fn new(broker: Option<u32>, pids: &[u32]) -> Self {
        CpuMark {
            machine: SysCpu::now(),
            broker: broker.map(|pid| (pid, ProcCpu::of(&pid.to_string()).own)),
            pids: pids
                .iter()
                .map(|&pid| (pid, ProcCpu::of(&pid.to_string()).own))
                .collect(),
            started: Instant::now(),
        }
    }

    pub fn spent(&self) -> CpuSpent {
        let machine = SysCpu::now().since(&self.machine);
        CpuSpent {
            wall: self.started.elapsed().as_secs_f64(),
            processes: self
                .pids
                .iter()
                .map(|(pid, before)| ProcCpu::of(&pid.to_string()).own - before)
                .collect(),
            broker: self
                .broker
                .map(|(pid, before)| ProcCpu::of(&pid.to_string()).own - before),
            machine: machine.busy_seconds(),
            busy_percent: machine.busy_percent(),
        }
    }
}

/// Starts `program args` pinned to `cpu` with `taskset -c` (taskset execs
/// the program, so the pid is the program's), output to `log`.
pub fn spawn_pinned(
    cpu: Option<usize>,
    program: &Path,
    args: &[&str],
    env: &[(&str, String)],
    log: &Path,
    children: &mut Children,
) -> anyhow::Result<u32> {
    let log_file = File::create(log)?;
    let mut command = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    };
    let child = command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id();
    children.0.push(child);
    Ok(pid)
}

/// Lines of a log that carry WARN or ERROR.
pub fn warnings(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(str::to_string)
        .collect()
}
