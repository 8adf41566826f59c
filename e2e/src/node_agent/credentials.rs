//! ServiceAccount credentials for pods. A kubelet mounts a projected token at
//! /var/run/secrets/kubernetes.io/serviceaccount; processes here share one
//! filesystem, so each pod gets its own folder with `token`, `ca.crt` and
//! `namespace`, and a kubeconfig (`KUBECONFIG`) whose `tokenFile` points at the
//! token. Clients that infer their config (kube-rs, client-go) pick it up and
//! reach the API server through the `kubernetes` Service, as in-cluster clients do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::Client;
use thiserror::Error;

/// Tokens live an hour and are renewed at 80% of that, like the kubelet's.
pub const TOKEN_SECONDS: i64 = 3600;
pub const TOKEN_REFRESH: Duration = Duration::from_secs(TOKEN_SECONDS as u64 * 8 / 10);

#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("requesting a token for ServiceAccount {account}: {source}")]
    Token {
        account: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing credentials to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a pod's credentials are.
#[derive(Debug, Clone)]
pub struct PodCredentials {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

/// Requests a token bound to the pod (so it dies with it) and writes the
/// credential files. `api_server` is the URL pods use to reach the API server.
pub async fn write_for_pod(
    client: &Client,
    pod: &Pod,
    dir: &Path,
    ca_pem: &[u8],
    api_server: &str,
) -> Result<PodCredentials, CredentialsError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_string());
    let token = request_token(client, pod, ns, &account).await?;
    let write = |name: &str, content: &[u8]| -> Result<PathBuf, CredentialsError> {
        let path = dir.join(name);
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&path, content))
            .map_err(|source| CredentialsError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    };
    let token_path = write("token", token.as_bytes())?;
    let ca_path = write("ca.crt", ca_pem)?;
    write("namespace", ns.as_bytes())?;
    let kubeconfig = write(
        "kubeconfig",
        kubeconfig_yaml(api_server, &ca_path, &token_path, ns, &account).as_bytes(),
    )?;
    Ok(PodCredentials {
        dir: dir.to_path_buf(),
        kubeconfig,
    })
}

/// Renews the token file in place; clients re-read `tokenFile` on their own.
pub async fn refresh(
    client: &Client,
    pod: &Pod,
    creds: &PodCredentials,
) -> Result<(), CredentialsError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_string());
    let token = request_token(client, pod, ns, &account).await?;
    let path = creds.dir.join("token");
    let tmp = creds.dir.join("token.new");
    std::fs::write(&tmp, token)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|source| CredentialsError::Write { path, source })
}

async fn request_token(
    client: &Client,
    pod: &Pod,
    ns: &str,
    account: &str,
) -> Result<String, CredentialsError> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    // NodeRestriction only lets a node ask for tokens bound to its own pods.
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .map(|tr| tr.status.map(|s| s.token).unwrap_or_default())
        .map_err(|source| CredentialsError::Token {
            account: format!("{ns}/{account}"),
            source,
        })
}

fn kubeconfig_yaml(server: &str, ca: &Path, token: &Path, ns: &str, account: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: in-cluster\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {account}\n  user:\n    tokenFile: {token}\ncontexts:\n- name: in-cluster\n  context: {{cluster: in-cluster, user: {account}, namespace: {ns}}}\ncurrent-context: in-cluster\n",
        ca = ca.display(),
        token = token.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_is_loadable_by_kube() {
        let yaml = kubeconfig_yaml(
            "https://127.96.0.1:443",
            Path::new("/x/ca.crt"),
            Path::new("/x/token"),
            "ns",
            "sa",
        );
        let kc: kube::config::Kubeconfig = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("in-cluster"));
        let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.token_file.as_deref(), Some("/x/token"));
        let ctx = kc.contexts[0].context.as_ref().unwrap();
        assert_eq!(ctx.namespace.as_deref(), Some("ns"));
    }
}
