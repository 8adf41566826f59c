# Shared by up, down, status, build and kubeconfig-for-sa. Sourced, not run.
# shellcheck shell=bash

CLUSTER_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$CLUSTER_SRC/../.." && pwd)"
# shellcheck source=versions.env
source "$CLUSTER_SRC/versions.env"

# Built binaries and jars live outside the repo, keyed by version, so a clean
# clone reuses them. Runtime state (data, certs, logs, pids) lives in STATE.
CACHE="${MATCHFLEET_CACHE:-$HOME/.cache/matchfleet}"
STATE="${MATCHFLEET_CLUSTER_DIR:-$REPO_ROOT/.cluster}"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
PKI="$STATE/pki"
CARGO_TARGET="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
# Pod sandboxes and image copies: non-root pods must be able to enter it,
# which a checkout under a private home folder does not allow.
if [ "$(id -u)" = 0 ]; then
  SANDBOX="${MATCHFLEET_SANDBOX_DIR:-/var/lib/matchfleet-node}"
else
  SANDBOX="${MATCHFLEET_SANDBOX_DIR:-$STATE/node}"
fi

export GOFLAGS="${GOFLAGS:--mod=readonly}"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

# Short content hash of the files that pin a build, so a change to go.sum or
# pom.xml lands in a new cache folder instead of reusing a stale one.
pin_hash() { cat "$@" | sha256sum | cut -c1-12; }

k8s_bin_dir() { echo "$CACHE/kubernetes-$KUBERNETES_VERSION-$(pin_hash "$CLUSTER_SRC/k8s/go.mod" "$CLUSTER_SRC/k8s/go.sum")/bin"; }
etcd_bin_dir() { echo "$CACHE/etcd-$ETCD_VERSION-$(pin_hash "$CLUSTER_SRC/etcd/go.mod" "$CLUSTER_SRC/etcd/go.sum")/bin"; }
kafka_lib_dir() { echo "$CACHE/kafka-$KAFKA_VERSION-$(pin_hash "$CLUSTER_SRC/kafka/pom.xml" "$CLUSTER_SRC/versions.env")/libs"; }

KUBECTL() { "$(k8s_bin_dir)/kubectl" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# The pid file of a component holds the pid of a process that leads its own
# process group (started with setsid), so the whole group can be signalled.
component_pid() { cat "$PIDS/$1.pid" 2>/dev/null || true; }

component_running() { pid_alive "$(component_pid "$1")"; }

COMPONENTS=(etcd kafka kube-apiserver kube-controller-manager kube-scheduler node-agent)
