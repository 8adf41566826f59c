//! `e2e/cluster/down` leaves no process of the cluster running: no component,
//! no pod process, not even a child a pod forked into the background.
//! It stops the shared cluster, so it only builds with `--features cluster-down`
//! and `make test` runs it last.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use matchfleet_e2e::testkit::{eventually, Cluster};

/// Every live process as (pid, process group, command line).
fn processes() -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, pgrp, ...
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r.to_string()) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        let pgrp = fields.get(2).and_then(|f| f.parse().ok()).unwrap_or(0);
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push((pid, pgrp, cmdline));
    }
    out
}

fn pids_in(dir: &Path) -> BTreeSet<i32> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .collect()
}

#[tokio::test]
async fn down_leaves_no_process_of_the_cluster() {
    let c = Cluster::get();
    // A pod whose shell forks a background child: down must end both.
    let ns = c.namespace("down");
    c.apply_ok(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: forker, namespace: {}}}\nspec:\n  containers:\n  - {{name: c, image: 'busybox:1.36', command: [sh, -c, 'sleep 600 & sleep 601; wait']}}\n",
        ns.name
    ));
    eventually(
        "the forking pod to run",
        Duration::from_secs(30),
        || async {
            let ps = processes();
            if ps.iter().any(|(_, _, cmd)| cmd.contains("sleep 601")) {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    )
    .await;
    std::mem::forget(ns); // the API server is about to stop; nothing to delete.

    let mut groups = pids_in(&c.state.join("pids"));
    groups.extend(pids_in(&c.state.join("node/pids")));
    assert!(
        groups.len() >= 7,
        "expected pid files of 6 components and a pod, got {groups:?}"
    );
    let before: Vec<_> = processes()
        .into_iter()
        .filter(|(_, pgrp, _)| groups.contains(pgrp))
        .collect();
    assert!(before.iter().any(|(_, _, cmd)| cmd.contains("sleep 600")));

    let out = c.script("down", &[]);
    assert!(
        out.status.success(),
        "down failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let state = c.state.display().to_string();
    let left: Vec<_> = processes()
        .into_iter()
        .filter(|(pid, pgrp, cmd)| {
            groups.contains(pgrp)
                || before.iter().any(|(p, _, _)| p == pid)
                || cmd.contains(&state)
                || cmd.contains("sleep 600")
                || cmd.contains("sleep 601")
        })
        .collect();
    assert!(left.is_empty(), "processes left after down: {left:#?}");
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    assert!(
        !hosts.contains("matchfleet-cluster"),
        "down left the /etc/hosts block"
    );
    println!(
        "down stopped {} processes in {} process groups",
        before.len(),
        groups.len()
    );
}
