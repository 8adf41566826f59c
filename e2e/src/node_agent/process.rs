//! Starting a container as a local process and signalling it. Each container
//! leads its own process group, so a stop reaches every process it started
//! (shell pipelines, render children), as a container runtime's cgroup would.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// What to run for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub log_file: PathBuf,
    /// `securityContext.runAsUser` / `runAsGroup`, applied when the agent runs as root.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// The base environment every container gets before its own, like the PATH and
/// HOSTNAME an image and the kubelet provide.
pub fn base_env(hostname: &str) -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOSTNAME".into(), hostname.into()),
        ("HOME".into(), "/tmp".into()),
    ]
}

/// Starts the container's process in a new process group with a clean
/// environment, stdout and stderr appended to its log file.
pub fn spawn(spec: &LaunchSpec) -> std::io::Result<Child> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::other("empty command"))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_file)?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.working_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        // The agent reaps containers itself; if it dies, `cluster/down` kills
        // the groups listed in its pid files.
        .kill_on_drop(false);
    if nix::unistd::geteuid().is_root() {
        if let Some(gid) = spec.gid {
            cmd.gid(gid);
        }
        if let Some(uid) = spec.uid {
            cmd.uid(uid);
        }
    }
    cmd.spawn()
}

/// Sends `signal` to the whole process group led by `pid`. A group that is
/// already gone is not an error.
pub fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Whether any process of the group led by `pid` still exists.
pub fn group_alive(pid: u32) -> bool {
    match i32::try_from(pid) {
        Ok(pid) => killpg(Pid::from_raw(pid), None).is_ok(),
        Err(_) => false,
    }
}

/// Records the process group of a running container, so `cluster/down` can
/// stop it even if the agent itself was killed.
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn write(dir: &Path, name: &str, pid: u32) -> std::io::Result<Self> {
        let path = dir.join(format!("{name}.pid"));
        std::fs::write(&path, pid.to_string())?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Kills the process groups named by pid files a previous agent left behind.
pub fn kill_leftovers(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            if group_alive(pid) {
                signal_group(pid, Signal::SIGKILL);
                killed += 1;
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}
