//! Running one render command as a child process: with a timeout, its output
//! captured to the worker's log, and killed - with every process it started -
//! the moment its partition is fenced. Children stay in the worker's process
//! group, so when the pod goes (SIGKILL to the group, as a container runtime
//! does) they go with it; for a fence the worker kills the child's process
//! tree itself.

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Exited non-zero, or could not start.
    Failed(String),
    TimedOut,
    /// Killed because the lease was lost.
    Killed,
}

/// Runs `argv` until it exits, `timeout` passes, or `cancel` completes.
pub async fn run(
    argv: &[String],
    timeout: Duration,
    cancel: impl Future<Output = ()>,
    key: &str,
) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return Outcome::Failed("empty command".into());
    };
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("could not start {program}: {e}")),
    };
    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_lines(out, key.to_string(), "stdout"));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_lines(err, key.to_string(), "stderr"));
    }
    let pid = child.id();
    tokio::select! {
        status = child.wait() => match status {
            Ok(s) if s.success() => Outcome::Succeeded,
            Ok(s) => Outcome::Failed(format!("render command {s}")),
            Err(e) => Outcome::Failed(format!("waiting for the render command: {e}")),
        },
        _ = tokio::time::sleep(timeout) => {
            kill_tree(pid);
            let _ = child.wait().await;
            Outcome::TimedOut
        }
        _ = cancel => {
            kill_tree(pid);
            let _ = child.wait().await;
            Outcome::Killed
        }
    }
}

async fn log_lines(stream: impl tokio::io::AsyncRead + Unpin, key: String, which: &'static str) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(%key, stream = which, "render: {line}");
    }
}

/// SIGKILLs `pid` and all its descendants. The tree is stopped first so it
/// cannot fork while it is walked.
pub fn kill_tree(pid: Option<u32>) {
    let Some(root) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let _ = kill(Pid::from_raw(tree[i]), Signal::SIGSTOP);
        for child in children_of(tree[i]) {
            if !tree.contains(&child) {
                tree.push(child);
            }
        }
        i += 1;
    }
    for pid in tree {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Processes whose parent is `pid`, from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

/// The parent pid in /proc/PID/stat: the 2nd field after the `(comm)`,
/// which may itself contain spaces and parentheses.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_ppid(&stat)
}

fn parse_ppid(stat: &str) -> Option<i32> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn ppid_is_parsed_past_odd_command_names() {
        assert_eq!(parse_ppid("42 (a) b (c)) S 7 42 42 0"), Some(7));
    }

    #[tokio::test]
    async fn success_failure_and_timeout() {
        let never = std::future::pending::<()>;
        let d = Duration::from_secs(5);
        assert_eq!(
            run(&sh("exit 0"), d, never(), "k").await,
            Outcome::Succeeded
        );
        assert!(
            matches!(run(&sh("exit 3"), d, never(), "k").await, Outcome::Failed(m) if m.contains("3"))
        );
        assert!(matches!(
            run(&["/no/such/program".to_string()], d, never(), "k").await,
            Outcome::Failed(m) if m.contains("could not start")
        ));
        assert_eq!(
            run(&sh("sleep 5"), Duration::from_millis(100), never(), "k").await,
            Outcome::TimedOut
        );
    }

    #[tokio::test]
    async fn a_cancel_kills_the_whole_tree() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("late");
        // The grandchild would write the marker after 1 s if it survived.
        let script = format!("(sleep 1; touch {}) & wait", marker.display());
        let outcome = run(
            &sh(&script),
            Duration::from_secs(10),
            tokio::time::sleep(Duration::from_millis(200)),
            "k",
        )
        .await;
        assert_eq!(outcome, Outcome::Killed);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "a grandchild outlived the kill");
    }
}
