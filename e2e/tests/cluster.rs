//! The local cluster works like a real one: API server with RBAC, scheduler,
//! controller-manager (garbage collection), and the node agent running pods as
//! processes with loopback IPs, probes, Services, restarts and graceful deletion.
//! Needs `e2e/cluster/up` (the `make test` target brings it up).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use matchfleet_e2e::testkit::{eventually, Cluster};
use serde_json::Value;

const NODE: &str = "matchfleet-node";

fn pod_json(c: &Cluster, ns: &str, name: &str) -> Result<Value, String> {
    let out = c.kubectl(&["-n", ns, "get", "pod", name, "-o", "json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn pid_of(pod: &Value, container: usize) -> Option<i32> {
    pod["status"]["containerStatuses"][container]["containerID"]
        .as_str()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

fn process_exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

async fn wait_ready(c: &Cluster, ns: &str, name: &str) -> Value {
    eventually(
        &format!("pod {ns}/{name} Ready"),
        Duration::from_secs(60),
        || async {
            let pod = pod_json(c, ns, name)?;
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready {
                Ok(pod)
            } else {
                Err(format!("status: {}", pod["status"]))
            }
        },
    )
    .await
}

#[tokio::test]
async fn control_plane_is_ready_and_rbac_denies_a_bare_service_account() {
    let c = Cluster::get();
    assert_eq!(c.kubectl_ok(&["get", "--raw", "/readyz"]).trim(), "ok");
    assert_eq!(
        c.kubectl_ok(&["auth", "can-i", "create", "pods"]).trim(),
        "yes"
    );

    let ns = c.namespace("rbac");
    c.kubectl_ok(&["-n", &ns.name, "create", "serviceaccount", "bare"]);
    let out = c.script("kubeconfig-for-sa", &[&ns.name, "bare"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sa_kubeconfig = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let can_i = c.kubectl_as(sa_kubeconfig.as_ref(), &["auth", "can-i", "create", "pods"]);
    assert_eq!(String::from_utf8_lossy(&can_i.stdout).trim(), "no");
    let get = c.kubectl_as(sa_kubeconfig.as_ref(), &["get", "pods"]);
    assert!(!get.status.success());
    let err = String::from_utf8_lossy(&get.stderr);
    assert!(
        err.contains("Forbidden")
            && err.contains(&format!("system:serviceaccount:{}:bare", ns.name)),
        "expected a Forbidden error naming the service account, got: {err}"
    );

    // The same account can do what a Role grants it, and nothing more.
    c.kubectl_ok(&[
        "-n",
        &ns.name,
        "create",
        "role",
        "read-pods",
        "--verb=get,list",
        "--resource=pods",
    ]);
    c.kubectl_ok(&[
        "-n",
        &ns.name,
        "create",
        "rolebinding",
        "bare-reads",
        "--role=read-pods",
        &format!("--serviceaccount={}:bare", ns.name),
    ]);
    let can_list = c.kubectl_as(sa_kubeconfig.as_ref(), &["auth", "can-i", "list", "pods"]);
    assert_eq!(String::from_utf8_lossy(&can_list.stdout).trim(), "yes");
    let can_delete = c.kubectl_as(sa_kubeconfig.as_ref(), &["auth", "can-i", "delete", "pods"]);
    assert_eq!(String::from_utf8_lossy(&can_delete.stdout).trim(), "no");
}

#[tokio::test]
async fn node_is_registered_ready_and_keeps_its_lease() {
    let c = Cluster::get();
    let node: Value =
        serde_json::from_str(&c.kubectl_ok(&["get", "node", NODE, "-o", "json"])).unwrap();
    let ready = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "True");
    assert_eq!(node["status"]["nodeInfo"]["kubeletVersion"], "v1.34.4");
    // No taint from the node lifecycle controller: it sees the node as alive.
    assert!(
        node["spec"]["taints"]
            .as_array()
            .map(|t| t.is_empty())
            .unwrap_or(true),
        "{}",
        node["spec"]
    );

    let renew = |c: &Cluster| {
        let lease: Value = serde_json::from_str(&c.kubectl_ok(&[
            "-n",
            "kube-node-lease",
            "get",
            "lease",
            NODE,
            "-o",
            "json",
        ]))
        .unwrap();
        lease["spec"]["renewTime"].as_str().unwrap().to_string()
    };
    let first = renew(&c);
    eventually(
        "the node lease to be renewed",
        Duration::from_secs(30),
        || async {
            let now = renew(&c);
            if now != first {
                Ok(())
            } else {
                Err(format!("renewTime still {now}"))
            }
        },
    )
    .await;
}

const SERVER_POD: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: server-config}
data: {GREETING: hello, MODE: test}
---
apiVersion: v1
kind: Secret
metadata: {name: server-secret}
stringData: {token: s3cret}
---
apiVersion: v1
kind: Service
metadata: {name: server}
spec:
  selector: {app: server}
  ports:
  - {name: web, port: 80, targetPort: http}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  labels: {app: server, tier: backend}
spec:
  containers:
  - name: server
    image: matchfleet/test-server:dev
    ports: [{name: http, containerPort: 8080}]
    envFrom: [{configMapRef: {name: server-config}}]
    env:
    - {name: READY_AFTER_MS, value: "1500"}
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    - name: POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    - name: TIER
      valueFrom: {fieldRef: {fieldPath: "metadata.labels['tier']"}}
    - name: TOKEN
      valueFrom: {secretKeyRef: {name: server-secret, key: token}}
    - {name: COMBINED, value: "$(GREETING)-$(TIER)"}
    readinessProbe:
      httpGet: {path: /readyz, port: http}
      periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  containers:
  - name: client
    image: matchfleet/test-server:dev
    env:
    - name: POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    readinessProbe:
      httpGet: {path: /healthz, port: 8080}
      periodSeconds: 1
"#;

#[tokio::test]
async fn a_pod_is_scheduled_run_ready_and_reachable_through_its_service() {
    let c = Cluster::get();
    let ns = c.namespace("pods");
    let started = Instant::now();
    c.apply_ok_in(Some(&ns.name), SERVER_POD);

    let server = wait_ready(&c, &ns.name, "server").await;
    let became_ready = started.elapsed();
    // Bound by kube-scheduler (the manifest names no node), run by the agent.
    assert_eq!(server["spec"]["nodeName"], NODE);
    let scheduled = server["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodScheduled")
        .cloned()
        .unwrap_or_default();
    assert_eq!(scheduled["status"], "True", "{}", server["status"]);
    assert_eq!(server["status"]["phase"], "Running");
    let ip = server["status"]["podIP"].as_str().unwrap().to_string();
    assert!(
        ip.starts_with("127.1."),
        "pod IP {ip} is not a loopback pod address"
    );
    // The readiness probe held the pod back until the server said ready.
    assert!(
        became_ready >= Duration::from_millis(1500),
        "ready after {became_ready:?}"
    );
    let pid = pid_of(&server, 0).expect("container pid");
    assert!(process_exists(pid));

    // Environment: ConfigMap, Secret, downward API and $(VAR) expansion.
    let env = |name: &str| {
        let url = format!("http://{ip}:8080/env/{name}");
        async move {
            matchfleet_e2e::http::get(&url, Duration::from_secs(5))
                .await
                .unwrap()
                .body
        }
    };
    assert_eq!(env("GREETING").await, "hello");
    assert_eq!(env("TOKEN").await, "s3cret");
    assert_eq!(env("POD_NAME").await, "server");
    assert_eq!(env("POD_NAMESPACE").await, ns.name);
    assert_eq!(env("COMBINED").await, "hello-backend");
    assert_eq!(env("POD_IP").await, ip);

    // From the other pod, through the Service: by DNS name and by the
    // kubelet-style environment variables.
    let client = wait_ready(&c, &ns.name, "client").await;
    let client_ip = client["status"]["podIP"].as_str().unwrap().to_string();
    assert_ne!(client_ip, ip);
    let fetch = |target: String| {
        let url = format!("http://{client_ip}:8080/fetch?url={target}");
        async move {
            let r = matchfleet_e2e::http::get(&url, Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(r.status, 200, "fetch {target}: {}", r.body);
            let v: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["status"], 200, "{v}");
            let identity: Value = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
            identity
        }
    };
    let by_name = fetch(format!("http://server.{}.svc:80/", ns.name)).await;
    assert_eq!(by_name["pod"], "server");
    assert_eq!(by_name["ip"], ip);
    let cluster_ip = c.kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "svc",
        "server",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let host = {
        let url = format!("http://{client_ip}:8080/env/SERVER_SERVICE_HOST");
        matchfleet_e2e::http::get(&url, Duration::from_secs(5))
            .await
            .unwrap()
            .body
    };
    assert_eq!(host, cluster_ip);
    let by_env = fetch(format!("http://{host}:80/")).await;
    assert_eq!(by_env["pod"], "server");
    println!("server Ready {became_ready:?} after apply; pod IP {ip}; service {cluster_ip}");
}

#[tokio::test]
async fn pods_use_their_service_account_through_the_kubernetes_service() {
    let c = Cluster::get();
    let ns = c.namespace("sa");
    c.kubectl_ok(&["-n", &ns.name, "create", "serviceaccount", "reader"]);
    c.apply_ok(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: api-client, namespace: {ns}}}
spec:
  serviceAccountName: reader
  containers:
  - name: c
    image: matchfleet/test-server:dev
    env:
    - name: POD_IP
      valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
"#,
        ns = ns.name
    ));
    let pod = wait_ready(&c, &ns.name, "api-client").await;
    let ip = pod["status"]["podIP"].as_str().unwrap().to_string();
    let list = |ip: String, ns: String| async move {
        let url = format!("http://{ip}:8080/kube?path=/api/v1/namespaces/{ns}/pods");
        let r = matchfleet_e2e::http::get(&url, Duration::from_secs(10))
            .await
            .unwrap();
        serde_json::from_str::<Value>(&r.body).unwrap()
    };
    let denied = list(ip.clone(), ns.name.clone()).await;
    assert_eq!(denied["status"], 403, "{denied}");
    assert!(denied["body"]
        .as_str()
        .unwrap()
        .contains(&format!("system:serviceaccount:{}:reader", ns.name)));

    c.kubectl_ok(&[
        "-n",
        &ns.name,
        "create",
        "role",
        "read-pods",
        "--verb=list",
        "--resource=pods",
    ]);
    c.kubectl_ok(&[
        "-n",
        &ns.name,
        "create",
        "rolebinding",
        "reader",
        "--role=read-pods",
        &format!("--serviceaccount={}:reader", ns.name),
    ]);
    eventually(
        "the granted list to succeed",
        Duration::from_secs(20),
        || {
            let (ip, ns) = (ip.clone(), ns.name.clone());
            async move {
                let r = list(ip, ns).await;
                if r["status"] == 200
                    && r["body"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("api-client")
                {
                    Ok(())
                } else {
                    Err(r.to_string())
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn deleting_a_pod_ends_its_processes_within_the_grace_period() {
    let c = Cluster::get();
    let ns = c.namespace("grace");
    let pod = |name: &str, ignore_term: bool, grace: u32| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: {grace}
  containers:
  - name: c
    image: matchfleet/test-server:dev
    env:
    - {{name: IGNORE_SIGTERM, value: "{}"}}
    - name: POD_IP
      valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
"#,
            if ignore_term { "1" } else { "0" },
            ns = ns.name
        )
    };
    c.apply_ok(&pod("polite", false, 30));
    c.apply_ok(&pod("stubborn", true, 3));
    let polite = wait_ready(&c, &ns.name, "polite").await;
    let stubborn = wait_ready(&c, &ns.name, "stubborn").await;
    let (polite_pid, stubborn_pid) = (pid_of(&polite, 0).unwrap(), pid_of(&stubborn, 0).unwrap());

    let api: Api<Pod> = Api::namespaced(c.client().await, &ns.name);
    for (name, pid, grace) in [("polite", polite_pid, 30u64), ("stubborn", stubborn_pid, 3)] {
        let t0 = Instant::now();
        c.kubectl_ok(&["-n", &ns.name, "delete", "pod", name, "--wait=false"]);
        eventually(
            &format!("{name}'s process to end"),
            Duration::from_secs(grace + 10),
            || async {
                if process_exists(pid) {
                    Err(format!("pid {pid} alive"))
                } else {
                    Ok(())
                }
            },
        )
        .await;
        let ended = t0.elapsed();
        // The polite server exits on SIGTERM at once; the stubborn one ignores
        // it and is killed when its 3 s grace period ends, not before.
        if name == "polite" {
            assert!(ended < Duration::from_secs(10), "polite pod took {ended:?}");
        } else {
            assert!(
                ended >= Duration::from_secs(3),
                "stubborn pod killed early, after {ended:?}"
            );
            assert!(
                ended < Duration::from_secs(grace + 5),
                "stubborn pod took {ended:?}"
            );
        }
        eventually(
            &format!("{name} to be gone from the API"),
            Duration::from_secs(15),
            || async {
                match api.get_opt(name).await {
                    Ok(None) => Ok(()),
                    Ok(Some(_)) => Err("still there".into()),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
        println!("{name}: process ended {ended:?} after delete (grace {grace}s)");
    }
}

#[tokio::test]
async fn containers_restart_by_restart_policy_and_show_the_count() {
    let c = Cluster::get();
    let ns = c.namespace("restart");
    let crasher = |name: &str, policy: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  restartPolicy: {policy}
  containers:
  - name: c
    image: matchfleet/test-server:dev
    env:
    - {{name: CRASH_AFTER_MS, value: "300"}}
    - name: POD_IP
      valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
"#,
            ns = ns.name
        )
    };
    c.apply_ok(&crasher("always", "Always"));
    c.apply_ok(&crasher("never", "Never"));
    c.apply_ok(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: done, namespace: {}}}\nspec:\n  restartPolicy: OnFailure\n  containers:\n  - {{name: c, image: 'busybox:1.36', command: [sh, -c, 'exit 0']}}\n",
        ns.name
    ));

    let always = eventually(
        "restarts of the crashing container",
        Duration::from_secs(60),
        || async {
            let pod = pod_json(&c, &ns.name, "always")?;
            let cs = &pod["status"]["containerStatuses"][0];
            if cs["restartCount"].as_i64().unwrap_or(0) >= 2 {
                Ok(pod)
            } else {
                Err(cs.to_string())
            }
        },
    )
    .await;
    let cs = &always["status"]["containerStatuses"][0];
    assert_eq!(cs["lastState"]["terminated"]["exitCode"], 3, "{cs}");
    assert_eq!(always["status"]["phase"], "Running");
    let printed = c.kubectl_ok(&["-n", &ns.name, "get", "pod", "always", "--no-headers"]);
    let restarts: i64 = printed.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(restarts >= 2, "kubectl get shows {printed}");

    let never = eventually("the Never pod to fail", Duration::from_secs(30), || async {
        let pod = pod_json(&c, &ns.name, "never")?;
        if pod["status"]["phase"] == "Failed" {
            Ok(pod)
        } else {
            Err(pod["status"].to_string())
        }
    })
    .await;
    let cs = &never["status"]["containerStatuses"][0];
    assert_eq!(cs["restartCount"], 0);
    assert_eq!(cs["state"]["terminated"]["exitCode"], 3);

    eventually(
        "the OnFailure pod that exits 0 to succeed",
        Duration::from_secs(30),
        || async {
            let pod = pod_json(&c, &ns.name, "done")?;
            if pod["status"]["phase"] == "Succeeded"
                && pod["status"]["containerStatuses"][0]["restartCount"] == 0
            {
                Ok(())
            } else {
                Err(pod["status"].to_string())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn an_unknown_image_fails_the_pod_with_a_clear_reason() {
    let c = Cluster::get();
    let ns = c.namespace("image");
    c.apply_ok(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: nope, namespace: {}}}\nspec:\n  containers:\n  - {{name: c, image: 'nginx:1.27'}}\n",
        ns.name
    ));
    let waiting = eventually("ErrImagePull", Duration::from_secs(30), || async {
        let pod = pod_json(&c, &ns.name, "nope")?;
        let w = pod["status"]["containerStatuses"][0]["state"]["waiting"].clone();
        if w["reason"] == "ErrImagePull" {
            Ok(w)
        } else {
            Err(pod["status"].to_string())
        }
    })
    .await;
    let message = waiting["message"].as_str().unwrap();
    assert!(
        message.contains("nginx:1.27") && message.contains("image map"),
        "{message}"
    );
    let events = c.kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=nope",
    ]);
    assert!(
        events.contains("image map"),
        "no Event explains it: {events}"
    );
}

#[tokio::test]
async fn the_garbage_collector_removes_dependents_of_deleted_owners() {
    let c = Cluster::get();
    let ns = c.namespace("gc");
    c.kubectl_ok(&["-n", &ns.name, "create", "configmap", "owner"]);
    let uid = c.kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "configmap",
        "owner",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let dependent = |name: &str, uid: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {}\n  ownerReferences:\n  - {{apiVersion: v1, kind: ConfigMap, name: owner, uid: {uid}}}\n",
            ns.name
        )
    };
    c.apply_ok(&dependent("child", &uid));
    // A dependent whose owner never existed (already deleted) goes too.
    c.apply_ok(&dependent("orphan", "00000000-0000-0000-0000-000000000000"));
    c.kubectl_ok(&["-n", &ns.name, "delete", "configmap", "owner"]);
    for name in ["child", "orphan"] {
        eventually(
            &format!("{name} to be garbage-collected"),
            Duration::from_secs(60),
            || async {
                let out = c.kubectl(&["-n", &ns.name, "get", "configmap", name]);
                if out.status.success() {
                    Err("still there".into())
                } else {
                    Ok(())
                }
            },
        )
        .await;
    }
}
