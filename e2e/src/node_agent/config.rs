//! The node agent's command line and its image map: which local program runs
//! for which container image, since there is no container runtime here.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, clap::Parser)]
#[command(about = "Runs the pods bound to one Node of the local cluster as local processes")]
pub struct Args {
    /// Kubeconfig with the node's credentials (CN=system:node:NAME, O=system:nodes).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// The Node to register and serve.
    #[arg(long, default_value = "matchfleet-node")]
    pub node_name: String,
    /// The image map (YAML), see `ImageMap`.
    #[arg(long)]
    pub images: PathBuf,
    /// Folder for pod logs, service-account credentials and pid files.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Folder for pod sandboxes (working folder, credentials) and image copies
    /// for non-root containers; every user a pod runs as must be able to enter
    /// it. Defaults to the state folder.
    #[arg(long)]
    pub sandbox_dir: Option<PathBuf>,
    /// The cluster's Service range, where ClusterIPs are allocated; the node agent
    /// proxies those addresses (they are on loopback here).
    #[arg(long, default_value = "127.96.0.0/16")]
    pub service_cidr: String,
    /// Pod IPs are handed out from 127.<pod_ip_octet>.0.0/16.
    #[arg(long, default_value_t = 1)]
    pub pod_ip_octet: u8,
    /// Write `<svc>.<ns>.svc[.cluster.local]` names into /etc/hosts.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub write_hosts: bool,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading image map {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing image map {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("bad service CIDR {0:?}: expected an IPv4 a.b.c.d/n")]
    Cidr(String),
}

/// `images.yaml`:
/// ```yaml
/// images:
///   matchfleet/worker:dev:
///     entrypoint: [/path/to/matchfleet-worker]
///     cmd: []            # optional default args (the image's CMD)
/// ```
/// As with a container runtime, a container's `command` replaces `entrypoint`
/// and its `args` replace `cmd`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageMap {
    pub images: BTreeMap<String, ImageEntry>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ImageEntry {
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
}

impl ImageMap {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The entry for `image`, also matching `docker.io/`-qualified spellings of it.
    pub fn resolve(&self, image: &str) -> Option<&ImageEntry> {
        self.images.get(image).or_else(|| {
            let short = image
                .strip_prefix("docker.io/")
                .map(|s| s.strip_prefix("library/").unwrap_or(s))?;
            self.images.get(short)
        })
    }

    pub fn known(&self) -> Vec<&str> {
        self.images.keys().map(String::as_str).collect()
    }
}

/// An IPv4 CIDR, e.g. the Service range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Cidr(s.to_string());
        let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
        let base: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ok(Cidr { base, prefix })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        u32::from(ip) & mask == u32::from(self.base) & mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_images_with_registry_prefixes() {
        let map: ImageMap = serde_yaml_ng::from_str(
            "images:\n  busybox:\n    entrypoint: [/bin/sh]\n  matchfleet/worker:dev:\n    entrypoint: [/w]\n    cmd: [x]\n",
        )
        .unwrap();
        assert_eq!(map.resolve("matchfleet/worker:dev").unwrap().cmd, vec!["x"]);
        assert!(map.resolve("docker.io/library/busybox").is_some());
        assert!(map.resolve("docker.io/matchfleet/worker:dev").is_some());
        assert!(map.resolve("nginx").is_none());
    }

    #[test]
    fn cidr_membership() {
        let c = Cidr::parse("127.96.0.0/16").unwrap();
        assert!(c.contains("127.96.3.4".parse().unwrap()));
        assert!(!c.contains("127.97.0.1".parse().unwrap()));
        assert!(Cidr::parse("127.96.0.0").is_err());
        assert!(Cidr::parse("127.96.0.0/33").is_err());
    }
}
