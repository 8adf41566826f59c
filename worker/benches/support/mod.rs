//! What the benches that run worker processes share: their child processes,
//! log tails for error messages, waiting for an endpoint, reading metrics.
//! Included with `#[path]` (a directory without `main.rs` is not a bench).

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
