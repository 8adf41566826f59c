//! Helpers for the end-to-end tests: where the local cluster is, kubectl, a
//! kube client, throwaway namespaces, and polling with a deadline.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kube::{Client, Config};

/// The local cluster started by `e2e/cluster/up`.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub repo: PathBuf,
    pub state: PathBuf,
    pub kubeconfig: PathBuf,
    pub kafka: String,
}

impl Cluster {
    /// Finds the running cluster (`MATCHFLEET_CLUSTER_DIR` or `<repo>/.cluster`);
    /// panics with the command to run if it is not up.
    pub fn get() -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("e2e crate lives in the repo")
            .to_path_buf();
        let state = std::env::var_os("MATCHFLEET_CLUSTER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join(".cluster"));
        let kubeconfig = state.join("admin.kubeconfig");
        assert!(
            kubeconfig.exists(),
            "the local cluster is not up ({} missing): run e2e/cluster/up first",
            kubeconfig.display()
        );
        let kafka = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
        Cluster {
            repo,
            state,
            kubeconfig,
            kafka,
        }
    }

    pub fn kubectl_path(&self) -> PathBuf {
        self.state.join("bin/kubectl")
    }

    /// Runs kubectl as the cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig, args)
    }

    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        Command::new(self.kubectl_path())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .expect("running kubectl")
    }

    /// Runs kubectl and returns stdout, failing the test with stderr if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pipes `yaml` into `kubectl apply -f -`.
    pub fn apply(&self, yaml: &str) -> Output {
        self.apply_in(None, yaml)
    }

    /// Pipes `yaml` into `kubectl [-n NS] apply -f -`.
    pub fn apply_in(&self, namespace: Option<&str>, yaml: &str) -> Output {
        use std::io::Write;
        let ns: Vec<&str> = namespace.map(|n| vec!["-n", n]).unwrap_or_default();
        let mut child = Command::new(self.kubectl_path())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(ns)
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running kubectl apply");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("writing manifest");
        child.wait_with_output().expect("kubectl apply")
    }

    pub fn apply_ok(&self, yaml: &str) {
        self.apply_ok_in(None, yaml)
    }

    pub fn apply_ok_in(&self, namespace: Option<&str>, yaml: &str) {
        let out = self.apply_in(namespace, yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n---\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A kube client with admin rights.
    pub async fn client(&self) -> Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("reading kubeconfig");
        let config = Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kubeconfig");
        Client::try_from(config).expect("client")
    }

    /// Runs one of the scripts in `e2e/cluster/`.
    pub fn script(&self, name: &str, args: &[&str]) -> Output {
        Command::new(self.repo.join("e2e/cluster").join(name))
            .args(args)
            .output()
            .expect("running cluster script")
    }

    /// A fresh namespace, deleted when the guard drops.
    pub fn namespace(&self, prefix: &str) -> Namespace {
        let name = format!(
            "{prefix}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() % 1_000_000_000)
                .unwrap_or_default()
        );
        self.kubectl_ok(&["create", "namespace", &name]);
        Namespace {
            name,
            cluster: self.clone(),
        }
    }
}

pub struct Namespace {
    pub name: String,
    cluster: Cluster,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// Polls `check` every 200 ms until it returns `Some`, or panics after `timeout`
/// naming `what` and the last observation.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
