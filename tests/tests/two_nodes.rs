//! The local cluster's two real nodes (issue 17): node-1 (kubelet 1.37, the host) and node-2
//! (kubelet 1.35, its own network namespace, address, containerd, CNI bridge, pod subnet and
//! kube-proxy). Both are Ready with different kubelet versions; pods on each reach the other
//! (un-NATed), Services backed by the other node and the API server; exec, logs and port-forward
//! work on node-2 through the API server; a policy whose `nodeSelector` matches node-2 only
//! reaches node-2's NodeAgentConfig and agent only; and the agent's kubelet credential is tried
//! against the other node's kubelet.
//!
//! Run with `cargo xtask test`, or after `eval "$(cargo xtask cluster env)"` with
//! `cargo test -p nodegate-tests --test two_nodes`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "agent_support.rs"]
mod support;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use kube::ResourceExt;
use kube::api::{Api, AttachParams, DeleteParams, LogParams, ObjectMeta, PostParams};
use nodegate_crds::NodeApiPolicy;
use nodegate_operator::controller::{self, CancellationToken, Metrics, Settings};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{
    NODE_NAME, NODE2_NAME, REAL_NODES, TEST_LABEL, busybox_pod_on, unique_name,
};
use nodegate_tests::configs::{config_policies, effective_config};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const POD_START: Duration = Duration::from_secs(120);

/// Each node's pod subnet and InternalIP on the local cluster (`cargo xtask cluster`).
const LOCAL_POD_SUBNETS: [(&str, &str); 2] = [(NODE_NAME, "10.89."), (NODE2_NAME, "10.90.")];
const NODE2_LOCAL_IP: &str = "10.87.0.2";

/// Polls `check` every 500 ms until it returns `Some`, or fails after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "timed out after {}s waiting for {what}",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn internal_ip(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

#[tokio::test]
async fn two_ready_nodes_with_different_kubelet_versions() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(cluster.admin()?);
    let mut versions = Vec::new();
    let mut ips = Vec::new();
    for name in REAL_NODES {
        let node = nodes.get(name).await?;
        assert!(ready(&node), "{name} is not Ready: {:?}", node.status);
        let version = node.status.as_ref().unwrap().node_info.as_ref().unwrap();
        versions.push(version.kubelet_version.clone());
        ips.push(internal_ip(&node).ok_or(format!("{name} has no InternalIP"))?);
    }
    assert!(versions[0].starts_with("v1.37."), "node-1: {}", versions[0]);
    assert!(versions[1].starts_with("v1.35."), "node-2: {}", versions[1]);
    assert_ne!(ips[0], ips[1], "the two nodes share an address");
    if cluster.location().state_dir.is_some() {
        assert_eq!(ips[1], NODE2_LOCAL_IP, "node-2's own address");
    }
    Ok(())
}

/// A pod on `node` serving `served-by-<pod>` on :8080 with busybox's httpd, which logs each
/// client's address (so a test sees whether it was NATed).
fn web_pod(name: &str, node: &str) -> Pod {
    let mut pod = busybox_pod_on(
        name,
        node,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo served-by-$HOSTNAME > /www/index.html && exec httpd -f -vv -p 8080 -h /www",
        ],
    );
    pod.metadata.labels = Some(BTreeMap::from([("app".into(), name.into())]));
    pod
}

fn service_for(app: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": app},
        "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap()
}

/// `GET /` to `host:port` from inside `pod` with busybox's `nc` (its `wget` crashes with a
/// timeout set), returning the body of a 200.
async fn http_get_from(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    host: &str,
    port: u16,
) -> Option<String> {
    let script = format!(r#"printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 {host} {port}"#);
    let response = exec_sh(cluster, ns, pod, &script).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

async fn exec_sh(cluster: &Cluster, ns: &str, pod: &str, script: &str) -> Result<String, String> {
    cluster
        .run_kubectl(&["-n", ns, "exec", pod, "--", "sh", "-c", script])
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn pods_on_the_two_nodes_reach_each_other_services_and_the_api_server() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let local = cluster.location().state_dir.is_some();
    let ns = cluster.namespace("twonodes").await?;
    let pods: Api<Pod> = ns.api();
    let (a, b) = ("web-1", "web-2");
    let (pod_a, pod_b) = (web_pod(a, NODE_NAME), web_pod(b, NODE2_NAME));
    let (ra, rb) = tokio::join!(ns.run_pod(&pod_a, POD_START), ns.run_pod(&pod_b, POD_START));
    ra?;
    rb?;
    let services: Api<Service> = ns.api();
    for app in [a, b] {
        services
            .create(&PostParams::default(), &service_for(app))
            .await?;
    }
    let mut ip = BTreeMap::new();
    for (pod, node) in [(a, NODE_NAME), (b, NODE2_NAME)] {
        let p = pods.get(pod).await?;
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(node));
        let pod_ip = p.status.unwrap().pod_ip.ok_or("no pod IP")?;
        if local {
            let prefix = LOCAL_POD_SUBNETS
                .iter()
                .find(|(n, _)| *n == node)
                .unwrap()
                .1;
            assert!(pod_ip.starts_with(prefix), "{pod} on {node}: {pod_ip}");
        }
        ip.insert(pod, pod_ip);
    }

    for (from, to) in [(a, b), (b, a)] {
        // Pod to pod across the nodes (httpd may need a moment to listen) …
        let body = eventually(
            &format!("{from} to reach {to}"),
            Duration::from_secs(30),
            || http_get_from(&cluster, ns.name(), from, &ip[to], 8080),
        )
        .await?;
        assert_eq!(body, format!("served-by-{to}\n"));
        // … un-NATed: the server saw the client pod's own address.
        let logs = pods.logs(to, &LogParams::default()).await?;
        assert!(
            // `[::ffff:10.89.0.7]:41234: url:/`
            logs.lines().any(|l| l.contains(&format!("{}]:", ip[from]))),
            "{to} never saw {from}'s address {}: {logs}",
            ip[from]
        );
        // Through a Service whose only endpoint is on the other node (the caller's node's
        // kube-proxy rules; no cluster DNS, so by its cluster IP).
        let service_ip = services.get(to).await?.spec.unwrap().cluster_ip.unwrap();
        let body = eventually(
            &format!("{from} to reach Service {to}"),
            Duration::from_secs(30),
            || http_get_from(&cluster, ns.name(), from, &service_ip, 80),
        )
        .await?;
        assert_eq!(
            body,
            format!("served-by-{to}\n"),
            "{from} through Service {to}"
        );
    }

    // Both reach the API server through the `kubernetes` Service (their node's kube-proxy, then
    // the advertised address on the host).
    for pod in [a, b] {
        let out = exec_sh(
            &cluster,
            ns.name(),
            pod,
            r#"printf 'GET /version HTTP/1.0\r\n\r\n' | nc -w 5 "$KUBERNETES_SERVICE_HOST" "$KUBERNETES_SERVICE_PORT""#,
        )
        .await?;
        assert!(
            out.starts_with("HTTP/1.0 400 Bad Request")
                && out.contains("Client sent an HTTP request to an HTTPS server"),
            "{pod}: not the API server's answer: {out:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn exec_logs_and_port_forward_work_on_node_2() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("node2-stream").await?;
    ns.run_pod(&web_pod("web", NODE2_NAME), POD_START).await?;
    let pods: Api<Pod> = ns.api();

    // exec through the API server with kube's websocket client and with kubectl.
    let mut attached = pods
        .exec(
            "web",
            ["echo", "exec on node-2"],
            &AttachParams::default().stderr(false),
        )
        .await?;
    let mut stdout = attached.stdout().ok_or("exec has no stdout")?;
    let mut output = String::new();
    stdout.read_to_string(&mut output).await?;
    attached.join().await?;
    assert_eq!(output, "exec on node-2\n");
    let echoed = cluster
        .run_kubectl(&[
            "-n",
            ns.name(),
            "exec",
            "web",
            "--",
            "cat",
            "/www/index.html",
        ])
        .await?;
    assert_eq!(echoed, "served-by-web\n");

    // port-forward with kube's client (httpd may need a moment to listen) …
    let body = eventually(
        "httpd through port-forward",
        Duration::from_secs(30),
        || async {
            let mut forwarder = pods.portforward("web", &[8080]).await.ok()?;
            let mut stream = forwarder.take_stream(8080)?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await.ok()?;
            drop(stream);
            let _ = forwarder.join().await;
            response.contains("200 OK").then_some(response)
        },
    )
    .await?;
    assert!(body.ends_with("served-by-web\n"), "{body}");

    // … whose request httpd logged: logs through kube and through kubectl.
    let logs = pods.logs("web", &LogParams::default()).await?;
    assert!(logs.contains("url:/"), "{logs}");
    let kubectl_logs = cluster
        .run_kubectl(&["-n", ns.name(), "logs", "web"])
        .await?;
    assert_eq!(kubectl_logs, logs);
    Ok(())
}

#[tokio::test]
async fn node_2_kube_proxy_is_healthy_on_its_own_address() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    if cluster.local_state_dir()?.is_none() {
        return Ok(());
    }
    let mut stream = tokio::net::TcpStream::connect((NODE2_LOCAL_IP, 10256)).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: node-2\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("not HTTP")?;
    assert_eq!(head.split_whitespace().nth(1), Some("200"), "{response}");
    let health: serde_json::Value = serde_json::from_str(body)?;
    assert_eq!(health["healthy"], true, "{body}");
    assert_eq!(health["nodeEligible"], true, "{body}");
    Ok(())
}

/// The agent's kubelet credential (the service-account token the DaemonSet mounts, bound to its
/// pod on node-1, with the agent's kubelet ClusterRole) tried on both kubelets. Today's answer:
/// the other node's kubelet accepts it too — the ClusterRole cannot be limited to one node (RBAC
/// has no "own node" condition and the kubelet does not check a token's node binding), so a
/// stolen agent token reads every node's kubelet (docs/security.md). When per-node credentials
/// land, the node-2 answer here becomes 403.
#[tokio::test]
async fn agent_kubelet_credential_is_accepted_by_the_other_nodes_kubelet_today() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("credx").await?;
    let admin = cluster.admin()?;
    // The agent's kubelet role, as shipped (config/rbac/agent), bound to this test's account.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config/rbac/agent/kubelet_cluster_role.yaml"),
    )?;
    let role_doc = shipped.split("\n---\n").next().unwrap();
    let shipped_role: ClusterRole = serde_yaml::from_str(role_doc)?;
    let rules: Vec<PolicyRule> = shipped_role.rules.unwrap();
    let name = unique_name("e2e-agent-kubelet");
    let labels = BTreeMap::from([(TEST_LABEL.to_string(), name.clone())]);
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        rules: Some(rules),
        ..Default::default()
    };
    roles.create(&PostParams::default(), &role).await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns.name()}],
    }))?;
    bindings.create(&PostParams::default(), &binding).await?;
    let result = async {
        // A pod on node-1 standing in for node-1's agent, and a token bound to it (what the
        // DaemonSet's projected token is).
        let mut pod = busybox_pod_on("agent", NODE_NAME, &["sleep", "3600"]);
        service_account_token(&cluster, ns.name(), "agent").await;
        pod.spec.as_mut().unwrap().service_account_name = Some("agent".into());
        ns.run_pod(&pod, POD_START).await?;
        let uid = Api::<Pod>::namespaced(admin.clone(), ns.name())
            .get("agent")
            .await?
            .uid()
            .unwrap();
        let token = bound_token(&admin, ns.name(), "agent", "agent", &uid).await?;
        let nodes: Api<Node> = Api::all(admin.clone());
        let mut answers = BTreeMap::new();
        for node in REAL_NODES {
            let ip = internal_ip(&nodes.get(node).await?).unwrap();
            // RBAC may take a moment to reach the kubelet's authorizer (it caches answers).
            let code = eventually(
                &format!("{node}'s kubelet to answer"),
                Duration::from_secs(30),
                || {
                    let (ip, token) = (ip.clone(), token.clone());
                    async move {
                        let code = curl_code(&format!("https://{ip}:10250/pods"), &token);
                        (code == 200).then_some(code)
                    }
                },
            )
            .await
            .unwrap_or_else(|_| curl_code(&format!("https://{ip}:10250/pods"), &token));
            answers.insert(node, code);
            // And where the role grants nothing (nodes/proxy only): refused on both.
            let pprof = curl_code(&format!("https://{ip}:10250/debug/pprof/"), &token);
            assert_eq!(pprof, 403, "{node}: /debug/pprof/ needs nodes/proxy");
        }
        assert_eq!(
            answers,
            BTreeMap::from([(NODE_NAME, 200), (NODE2_NAME, 200)]),
            "node-1's agent credential on each kubelet (today: accepted by both)"
        );
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    let _ = bindings.delete(&name, &DeleteParams::default()).await;
    let _ = roles.delete(&name, &DeleteParams::default()).await;
    result
}

/// A TokenRequest token for `namespace/account` bound to pod `pod` (it then carries the pod's
/// node, as the DaemonSet's projected token does).
async fn bound_token(
    admin: &kube::Client,
    namespace: &str,
    account: &str,
    pod: &str,
    uid: &str,
) -> Result<String, kube::Error> {
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(admin.clone(), namespace);
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({
            "spec": {
                "audiences": [],
                "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid},
            }
        }))
        .unwrap();
    let issued: k8s_openapi::api::authentication::v1::TokenRequest = api
        .create_subresource("token", account, &PostParams::default(), &request)
        .await?;
    Ok(issued.status.and_then(|s| s.token).unwrap_or_default())
}

/// The HTTP status of a GET with a bearer token (`-k`: the kubelets' certificates are
/// self-signed; what is under test is their authorization).
fn curl_code(url: &str, token: &str) -> u16 {
    let out = std::process::Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// An operator (in-process, scoped to this test's policy and the two real nodes) compiles a
/// policy whose `nodeSelector` matches node-2 only: node-2's NodeAgentConfig gets the rule,
/// node-1's none; an agent per node serving its node's config in front of its node's kubelet
/// answers the policy's user on node-2 and refuses it on node-1.
#[tokio::test]
async fn node_selector_policy_reaches_only_node_2() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let Some(state) = cluster.local_state_dir()? else {
        return Ok(());
    };
    cluster.install_crds().await?;
    let admin = cluster.admin()?;
    // Its configs are `<run>.<node>`: another operator on the same nodes (the demo's, a chart
    // test's) keeps its own.
    let ns = cluster.namespace("selnode").await?;
    let run = unique_name("twonode");
    let settings = Settings {
        policy_selector: Some(format!("{TEST_LABEL}={run}")),
        node_selector: Some(format!(
            "kubernetes.io/hostname in ({NODE_NAME},{NODE2_NAME})"
        )),
        instance: Some(run.clone()),
        debounce: Duration::from_millis(100),
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(5),
        reporter_instance: Some(run.clone()),
        ..Settings::default()
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(controller::run(
        admin.clone(),
        settings,
        None,
        Metrics::new()?,
        stop.clone(),
    ));
    let user_name = unique_name("e2e-node2-reader");
    let policy_name = unique_name("only-node-2");
    let mut policy = NodeApiPolicy::new(
        &policy_name,
        serde_json::from_value(json!({
            "subjects": [{"kind": "User", "name": user_name}],
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": NODE2_NAME}},
            "access": ["pods"],
            "namespaces": {"names": [ns.name()]},
        }))?,
    );
    policy.metadata.labels = Some(BTreeMap::from([(TEST_LABEL.to_string(), run.clone())]));
    let policies: Api<NodeApiPolicy> = Api::all(admin.clone());
    policies.create(&PostParams::default(), &policy).await?;

    let result = async {
        let node2 = eventually(
            "node-2's NodeAgentConfig with the rule",
            Duration::from_secs(30),
            || async {
                effective_config(&admin, NODE2_NAME, Some(&run))
                    .await
                    .ok()
                    .flatten()
                    .filter(|c| config_policies(c) == [policy_name.clone()])
            },
        )
        .await?;
        let node1 = eventually(
            "node-1's NodeAgentConfig",
            Duration::from_secs(30),
            || async {
                effective_config(&admin, NODE_NAME, Some(&run))
                    .await
                    .ok()
                    .flatten()
            },
        )
        .await?;
        assert_eq!(
            config_policies(&node1),
            Vec::<String>::new(),
            "node-1's config has no rule"
        );

        // An agent per node with its node's config, in front of its node's kubelet.
        let ns_pod = busybox_pod_on("target", NODE2_NAME, &["sleep", "3600"]);
        ns.run_pod(&ns_pod, POD_START).await?;
        let creds = cluster.user_credentials(&user_name, &[]).await?;
        let user = Cred::Cert(client_cert_from_pem(&creds.certificate_pem, &creds.key_pem));
        let mut answers = BTreeMap::new();
        for (node, config) in [(NODE_NAME, &node1), (NODE2_NAME, &node2)] {
            let ip = node_ip_of(&cluster, node).await;
            let agent = start_agent_with(
                node,
                kubelet_upstream_of(&state, node, &ip),
                state.join("pki/ca.crt"),
                Arc::new(FakeReviewer(BTreeMap::new())),
                vec![],
            )
            .await;
            agent.config.publish(config.spec.clone());
            let r = request(agent.running.secure_addr, true, &user, "GET", "/pods", &[]).await?;
            if r.status == 200 {
                let doc: serde_json::Value = serde_json::from_slice(&r.body)?;
                let names: Vec<String> = doc["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        format!(
                            "{}/{}",
                            p["metadata"]["namespace"].as_str().unwrap_or(""),
                            p["metadata"]["name"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                assert_eq!(
                    names,
                    vec![format!("{}/target", ns.name())],
                    "{node}'s /pods"
                );
            }
            answers.insert(node, r.status);
        }
        assert_eq!(
            answers,
            BTreeMap::from([(NODE_NAME, 403), (NODE2_NAME, 200)]),
            "the policy's user scraping /pods through each node's agent"
        );
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    let _ = policies
        .delete(&policy_name, &DeleteParams::default())
        .await;
    // The configs and rule sets this test's operator wrote carry its instance label; no other
    // operator may find them as foreign objects later.
    let _ = cluster
        .run_kubectl(&[
            "delete",
            "nodeagentconfigs,nodeagentrulesets",
            "-l",
            &format!("nodegate.io/instance={run}"),
            "--ignore-not-found",
        ])
        .await;
    result
}

/// Prometheus 3 built by xtask (`cargo xtask test` passes it as `NODEGATE_PROMETHEUS_K8S_SD`),
/// else the one `cargo xtask prometheus` cached: Debian's Prometheus has no Kubernetes service
/// discovery. Missing, the test fails and says how to get it.
fn prometheus_with_kubernetes_sd() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("NODEGATE_PROMETHEUS_K8S_SD").filter(|p| !p.is_empty()) {
        return path.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .unwrap_or_default();
    let cached = cache.join("nodegate/prometheus-v0.316.0/prometheus");
    assert!(
        cached.is_file(),
        "no Prometheus with Kubernetes service discovery: run `cargo xtask test`, or          `cargo xtask prometheus` once (it builds {})",
        cached.display()
    );
    cached
}

/// A real Prometheus with `kubernetes_sd_configs` (role: node) discovers both real nodes from the
/// API server and scrapes each node's agent (in-process here, one per node in front of its
/// node's kubelet; the relabelling sends each discovered node to its agent, as a DaemonSet's
/// pod address would): each target's `kubelet_node_name` comes from its own node's kubelet.
#[tokio::test]
async fn prometheus_discovers_both_nodes_and_scrapes_both_agents() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let Some(state) = cluster.local_state_dir()? else {
        return Ok(());
    };
    let token = format!("prom-{}", rand_suffix());
    let tokens = BTreeMap::from([(token.clone(), ("prometheus".to_string(), vec![]))]);
    let mut agents = Vec::new();
    for node in REAL_NODES {
        let ip = node_ip_of(&cluster, node).await;
        let agent = start_agent_with(
            node,
            kubelet_upstream_of(&state, node, &ip),
            state.join("pki/ca.crt"),
            Arc::new(FakeReviewer(tokens.clone())),
            vec![rule(
                "prometheus",
                vec![user("prometheus")],
                &[nodegate_crds::Endpoint::Metrics],
                all_namespaces(),
                &[nodegate_crds::Port::Secure],
            )],
        )
        .await;
        agents.push((node, agent));
    }
    let dir = std::env::temp_dir().join(unique_name("prom-sd"));
    std::fs::create_dir_all(&dir)?;
    let mut relabel = format!(
        r#"      - source_labels: [__meta_kubernetes_node_name]
        regex: "{NODE_NAME}|{NODE2_NAME}"
        action: keep
      - source_labels: [__meta_kubernetes_node_name]
        target_label: target_node
"#
    );
    for (node, agent) in &agents {
        relabel.push_str(&format!(
            r#"      - source_labels: [__meta_kubernetes_node_name]
        regex: "{node}"
        target_label: __address__
        replacement: "{}"
"#,
            agent.running.secure_addr
        ));
    }
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: kubelets-through-nodegate
    scheme: https
    metrics_path: /metrics
    honor_labels: true
    authorization:
      credentials: "{token}"
    tls_config:
      insecure_skip_verify: true
    kubernetes_sd_configs:
      - role: node
        kubeconfig_file: "{kubeconfig}"
    relabel_configs:
{relabel}"#,
        kubeconfig = cluster.location().kubeconfig.display(),
    );
    std::fs::write(dir.join("prometheus.yml"), &config)?;
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let binary = prometheus_with_kubernetes_sd();
    let mut child = std::process::Command::new(&binary)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let query = |promql: &'static str| async move {
        let encoded =
            percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let r = request(
            addr,
            false,
            &Cred::None,
            "GET",
            &format!("/api/v1/query?query={encoded}"),
            &[],
        )
        .await
        .ok()?;
        let doc: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        let pairs: std::collections::BTreeSet<(String, String, String)> = doc["data"]["result"]
            .as_array()?
            .iter()
            .map(|s| {
                let label = |k: &str| s["metric"][k].as_str().unwrap_or("").to_string();
                (
                    label("target_node"),
                    label("node"),
                    s["value"][1].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        Some(pairs)
    };
    let want = |value: &str| -> std::collections::BTreeSet<(String, String, String)> {
        [NODE_NAME, NODE2_NAME]
            .iter()
            .map(|n| (n.to_string(), n.to_string(), value.to_string()))
            .collect()
    };
    let result = async {
        // Each discovered node's target scraped its own kubelet through its own agent.
        eventually("kubelet_node_name from both targets", Duration::from_secs(60), || async {
            query("kubelet_node_name").await.filter(|p| *p == want("1"))
        })
        .await?;
        let up = eventually("both targets up", Duration::from_secs(30), || async {
            query(r#"label_replace(up{job="kubelets-through-nodegate"}, "node", "$1", "target_node", "(.*)")"#)
                .await
                .filter(|p| *p == want("1"))
        })
        .await?;
        assert_eq!(up, want("1"));
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    if result.is_err() {
        eprintln!(
            "prometheus log:\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
