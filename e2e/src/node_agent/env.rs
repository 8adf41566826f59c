//! A container's environment, built as the kubelet builds it: Service link
//! variables, then `envFrom`, then `env` (later wins), with the downward API
//! and `$(VAR)` expansion. Pure: the caller fetches ConfigMaps and Secrets.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Service};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("{kind} {name:?} not found (referenced by {var})")]
    MissingObject {
        kind: &'static str,
        name: String,
        var: String,
    },
    #[error("key {key:?} not found in {kind} {name:?} (referenced by {var})")]
    MissingKey {
        kind: &'static str,
        name: String,
        key: String,
        var: String,
    },
    #[error("unsupported field path {path:?} in env var {var}")]
    FieldPath { path: String, var: String },
    #[error("env var {0} has valueFrom with no source")]
    EmptySource(String),
}

/// Everything outside the pod spec that a container's environment depends on.
#[derive(Debug, Default)]
pub struct EnvSources {
    pub pod_ip: Option<Ipv4Addr>,
    pub host_ip: Option<Ipv4Addr>,
    /// ConfigMap name -> data, for the ConfigMaps the pod references that exist.
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// Secret name -> decoded data, likewise.
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    /// Service link variables (see `service_env`).
    pub service_env: Vec<(String, String)>,
    /// Node capacity, for `resourceFieldRef` without a limit.
    pub node_cpus: u32,
    pub node_memory_bytes: u64,
}

/// The environment of `container` in `pod`, in definition order.
pub fn container_env(
    pod: &Pod,
    container: &Container,
    src: &EnvSources,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(slot) = env.iter_mut().find(|(name, _)| *name == k) {
            slot.1 = v;
        } else {
            env.push((k, v));
        }
    };

    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(cm) = &from.config_map_ref {
            (
                "ConfigMap",
                cm.name.clone(),
                cm.optional.unwrap_or(false),
                src.config_maps.get(&cm.name),
            )
        } else if let Some(s) = &from.secret_ref {
            (
                "Secret",
                s.name.clone(),
                s.optional.unwrap_or(false),
                src.secrets.get(&s.name),
            )
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    let key = format!("{prefix}{k}");
                    // The kubelet skips keys that are not valid variable names.
                    if is_env_name(&key) {
                        set(&mut env, key, v.clone());
                    }
                }
            }
            None if optional => {}
            None => {
                return Err(EnvError::MissingObject {
                    kind,
                    name,
                    var: "envFrom".into(),
                })
            }
        }
    }

    for var in container.env.iter().flatten() {
        if let Some(value) = env_value(pod, container, var, src, &env)? {
            set(&mut env, var.name.clone(), value);
        }
    }

    // Service links never override what the pod defines itself.
    for (k, v) in &src.service_env {
        if !env.iter().any(|(name, _)| name == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    Ok(env)
}

fn env_value(
    pod: &Pod,
    container: &Container,
    var: &EnvVar,
    src: &EnvSources,
    defined: &[(String, String)],
) -> Result<Option<String>, EnvError> {
    if let Some(value) = &var.value {
        return Ok(Some(expand(value, defined)));
    }
    let Some(from) = &var.value_from else {
        return Ok(Some(String::new()));
    };
    if let Some(field) = &from.field_ref {
        return field_value(pod, &field.field_path, src)
            .map(Some)
            .ok_or_else(|| EnvError::FieldPath {
                path: field.field_path.clone(),
                var: var.name.clone(),
            });
    }
    if let Some(res) = &from.resource_field_ref {
        return Ok(Some(resource_value(container, &res.resource, src)));
    }
    let (kind, name, key, optional, data) = if let Some(r) = &from.config_map_key_ref {
        (
            "ConfigMap",
            &r.name,
            &r.key,
            r.optional.unwrap_or(false),
            src.config_maps.get(&r.name),
        )
    } else if let Some(r) = &from.secret_key_ref {
        (
            "Secret",
            &r.name,
            &r.key,
            r.optional.unwrap_or(false),
            src.secrets.get(&r.name),
        )
    } else {
        return Err(EnvError::EmptySource(var.name.clone()));
    };
    match data.map(|d| d.get(key)) {
        Some(Some(v)) => Ok(Some(v.clone())),
        _ if optional => Ok(None),
        None => Err(EnvError::MissingObject {
            kind,
            name: name.clone(),
            var: var.name.clone(),
        }),
        Some(None) => Err(EnvError::MissingKey {
            kind,
            name: name.clone(),
            key: key.clone(),
            var: var.name.clone(),
        }),
    }
}

/// The downward API's `fieldRef` paths.
pub fn field_value(pod: &Pod, path: &str, src: &EnvSources) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let ip = |ip: Option<Ipv4Addr>| ip.map(|i| i.to_string()).unwrap_or_default();
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['"))
            .and_then(|rest| rest.strip_suffix("']"))
    };
    Some(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => ip(src.pod_ip),
        "status.hostIP" | "status.hostIPs" => ip(src.host_ip),
        _ => {
            if let Some(key) = subscript("metadata.labels") {
                meta.labels.as_ref()?.get(key).cloned().unwrap_or_default()
            } else if let Some(key) = subscript("metadata.annotations") {
                meta.annotations
                    .as_ref()?
                    .get(key)
                    .cloned()
                    .unwrap_or_default()
            } else {
                return None;
            }
        }
    })
}

/// `resourceFieldRef`: the container's limit (or request), else the node's
/// capacity, in whole CPUs (rounded up) or bytes.
fn resource_value(container: &Container, resource: &str, src: &EnvSources) -> String {
    let (section, name) = resource.split_once('.').unwrap_or(("limits", resource));
    let res = container.resources.as_ref();
    let quantity = match section {
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => res.and_then(|r| r.limits.as_ref()),
    }
    .and_then(|m| m.get(name))
    .map(|q| q.0.clone());
    match (name, quantity) {
        ("cpu", Some(q)) => parse_cpu_millis(&q)
            .map(|m| m.div_ceil(1000).max(1).to_string())
            .unwrap_or(q),
        ("cpu", None) => src.node_cpus.to_string(),
        ("memory", Some(q)) => parse_bytes(&q).map(|b| b.to_string()).unwrap_or(q),
        ("memory", None) => src.node_memory_bytes.to_string(),
        (_, Some(q)) => q,
        (_, None) => "0".to_string(),
    }
}

fn parse_cpu_millis(q: &str) -> Option<u64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0).ceil() as u64),
    }
}

fn parse_bytes(q: &str) -> Option<u64> {
    const UNITS: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok().map(|n| n * factor);
        }
    }
    q.parse().ok()
}

/// Expands `$(NAME)` from `defined`; `$$(NAME)` stays literal as `$(NAME)`,
/// and references to undefined names are left as written, as the kubelet does.
pub fn expand(input: &str, defined: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(') {
            match tail.find(')') {
                Some(end) => {
                    let name = &tail[..end];
                    match defined.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &tail[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = tail;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// The kubelet's Service link variables (`<NAME>_SERVICE_HOST`, `_PORT`, and
/// the Docker-link style `<NAME>_PORT_<port>_TCP...`) for Services with a ClusterIP.
pub fn service_env(services: &[Service]) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty() && *ip != "None")
        else {
            continue;
        };
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let name = svc
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .to_ascii_uppercase()
            .replace('-', "_");
        env.push((format!("{name}_SERVICE_HOST"), ip.to_string()));
        env.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for p in ports {
            if let Some(port_name) = &p.name {
                env.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        port_name.to_ascii_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.as_deref().unwrap_or("TCP").to_string()
        };
        env.push((
            format!("{name}_PORT"),
            format!(
                "{}://{ip}:{}",
                proto(first).to_ascii_lowercase(),
                first.port
            ),
        ));
        for p in ports {
            let proto_up = proto(p);
            let base = format!("{name}_PORT_{}_{proto_up}", p.port);
            env.push((
                base.clone(),
                format!("{}://{ip}:{}", proto_up.to_ascii_lowercase(), p.port),
            ));
            env.push((format!("{base}_PROTO"), proto_up.to_ascii_lowercase()));
            env.push((format!("{base}_PORT"), p.port.to_string()));
            env.push((format!("{base}_ADDR"), ip.to_string()));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const POD: &str = r#"
metadata:
  name: p1
  namespace: ns1
  uid: u-1
  labels: {app: demo}
spec:
  nodeName: n1
  serviceAccountName: sa1
  containers:
  - name: c
    image: x
    envFrom:
    - configMapRef: {name: cm}
    - prefix: S_
      secretRef: {name: sec}
    env:
    - {name: A, value: "1"}
    - {name: B, value: "$(A)-$(POD_IP)-$$(A)-$(NOPE)"}
    - name: POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    - name: APP
      valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}
    - name: K
      valueFrom: {configMapKeyRef: {name: cm, key: k}}
    - name: MEM
      valueFrom: {resourceFieldRef: {resource: limits.memory}}
    - name: FROM_CM
      value: overridden
"#;

    fn sources() -> EnvSources {
        EnvSources {
            pod_ip: Some(Ipv4Addr::new(127, 1, 0, 9)),
            host_ip: Some(Ipv4Addr::LOCALHOST),
            config_maps: [(
                "cm".to_string(),
                [("k", "v"), ("FROM_CM", "cm"), ("1bad", "x")]
                    .into_iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            )]
            .into(),
            secrets: [(
                "sec".to_string(),
                [("TOKEN".to_string(), "t".to_string())].into(),
            )]
            .into(),
            service_env: vec![
                ("A".into(), "from-service".into()),
                ("X_SERVICE_HOST".into(), "127.96.0.9".into()),
            ],
            node_cpus: 2,
            node_memory_bytes: 1024,
        }
    }

    #[test]
    fn builds_env_in_kubelet_order() {
        let p = pod(POD);
        let c = &p.spec.as_ref().unwrap().containers[0];
        let env: BTreeMap<_, _> = container_env(&p, c, &sources())
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(env["A"], "1", "pod env beats service links");
        // POD_IP is defined after B, so B sees it unexpanded, as in Kubernetes.
        assert_eq!(env["B"], "1-$(POD_IP)-$(A)-$(NOPE)");
        assert_eq!(env["POD_IP"], "127.1.0.9");
        assert_eq!(env["APP"], "demo");
        assert_eq!(env["K"], "v");
        assert_eq!(env["S_TOKEN"], "t");
        assert_eq!(env["FROM_CM"], "overridden");
        assert_eq!(env["MEM"], "1024");
        assert_eq!(env["X_SERVICE_HOST"], "127.96.0.9");
        assert!(!env.contains_key("1bad"));
    }

    #[test]
    fn missing_required_references_are_errors() {
        let p = pod(POD);
        let c = &p.spec.as_ref().unwrap().containers[0];
        let mut src = sources();
        src.secrets.clear();
        assert_eq!(
            container_env(&p, c, &src).unwrap_err(),
            EnvError::MissingObject {
                kind: "Secret",
                name: "sec".into(),
                var: "envFrom".into()
            }
        );
        let mut src = sources();
        src.config_maps.get_mut("cm").unwrap().remove("k");
        assert!(matches!(
            container_env(&p, c, &src).unwrap_err(),
            EnvError::MissingKey { .. }
        ));
    }

    #[test]
    fn service_links_follow_the_kubelet_naming() {
        let svc: Service = serde_yaml_ng::from_str(
            "metadata: {name: my-svc}\nspec:\n  clusterIP: 127.96.0.7\n  ports:\n  - {name: http-api, port: 80}\n  - {port: 9090, protocol: UDP}\n",
        )
        .unwrap();
        let env: BTreeMap<_, _> = service_env(&[svc]).into_iter().collect();
        assert_eq!(env["MY_SVC_SERVICE_HOST"], "127.96.0.7");
        assert_eq!(env["MY_SVC_SERVICE_PORT"], "80");
        assert_eq!(env["MY_SVC_SERVICE_PORT_HTTP_API"], "80");
        assert_eq!(env["MY_SVC_PORT"], "tcp://127.96.0.7:80");
        assert_eq!(env["MY_SVC_PORT_9090_UDP_PROTO"], "udp");
        assert_eq!(env["MY_SVC_PORT_80_TCP_ADDR"], "127.96.0.7");
    }

    #[test]
    fn expansion_edge_cases() {
        let d = vec![("X".to_string(), "1".to_string())];
        assert_eq!(expand("$(X)$(X)", &d), "11");
        assert_eq!(expand("$$(X) $ $(", &d), "$(X) $ $(");
        assert_eq!(expand("a$", &d), "a$");
    }
}
