//! The agent's own kubelet credential on the real cluster (issue: the agent's power).
//!
//! The grant is `config/rbac/agent/kubelet_cluster_role.yaml`, which `chart.rs` checks is what
//! the chart renders with its default values. With it, the agent's service account reads through
//! the fine-grained subresources and execs nowhere: not on node-1's kubelet, not through the API
//! server's node proxy, not on any other node (SubjectAccessReview); an agent told so
//! (`--kubelet-access`) refuses exec and container logs itself and sends nothing upstream. With
//! `nodes/proxy` added (the chart's `agent.kubeletAccess.proxy`), exec and logs through the agent
//! work, and the same credential could exec on every node: RBAC cannot bind it to one. That,
//! and why it cannot (a pod-bound token names its node; RBAC answers alike for every node), is
//! pinned here so docs/security.md's table stays true.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec, TokenReview};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use kube::api::{Api, ObjectMeta, PostParams};
use nodegate_agent::kubelet_access::KubeletAccess;
use nodegate_agent::upstream::UpstreamSettings;
use nodegate_crds::{Endpoint, Port};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{NODE_NAME, TEST_LABEL, busybox_pod};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// A node name no node has: RBAC on `nodes/*` is the same for it as for any real node.
const OTHER_NODE: &str = "some-other-node";

/// The agent's ClusterRole as `config/rbac/agent/kubelet_cluster_role.yaml` writes it.
fn default_kubelet_rules() -> Vec<PolicyRule> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config/rbac/agent/kubelet_cluster_role.yaml"),
    )
    .unwrap();
    let role = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "ClusterRole")
        .unwrap();
    serde_yaml::from_value(role["rules"].clone()).unwrap()
}

/// `nodes/proxy` as the chart adds it with `agent.kubeletAccess.proxy`.
fn proxy_rules() -> Vec<PolicyRule> {
    vec![PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["nodes/proxy".into()]),
        verbs: vec!["get".into(), "create".into(), "update".into()],
        ..Default::default()
    }]
}

/// A ClusterRole with `rules` bound to a service account; both deleted on drop.
struct Grant {
    cluster: Cluster,
    name: String,
}

impl Grant {
    async fn new(
        cluster: &Cluster,
        name: &str,
        ns: &str,
        account: &str,
        rules: Vec<PolicyRule>,
    ) -> Self {
        let meta = || ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(TEST_LABEL.to_string(), name.to_string())])),
            ..Default::default()
        };
        let role = ClusterRole {
            metadata: meta(),
            rules: Some(rules),
            ..Default::default()
        };
        let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {TEST_LABEL: name}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
        }))
        .unwrap();
        let admin = cluster.admin().unwrap();
        Api::<ClusterRole>::all(admin.clone())
            .create(&PostParams::default(), &role)
            .await
            .unwrap();
        Api::<ClusterRoleBinding>::all(admin)
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
        Grant {
            cluster: cluster.clone(),
            name: name.into(),
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl()
            .args(["delete", "clusterrole,clusterrolebinding", &self.name])
            .args(["--ignore-not-found", "--wait=false"])
            .output();
    }
}

/// Who the kubelet and the API server see when the agent presents its token.
struct Identity {
    user: String,
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
}

impl Identity {
    fn account(ns: &str, name: &str) -> Self {
        Identity {
            user: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            extra: BTreeMap::new(),
        }
    }

    /// What RBAC answers for `verb` on `nodes/<subresource>` of `node`.
    async fn can(&self, cluster: &Cluster, verb: &str, subresource: &str, node: &str) -> bool {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(self.user.clone()),
                groups: Some(self.groups.clone()),
                extra: Some(self.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    resource: Some("nodes".into()),
                    subresource: Some(subresource.into()),
                    name: Some(node.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<SubjectAccessReview>::all(cluster.admin().unwrap())
            .create(&PostParams::default(), &review)
            .await
            .unwrap()
            .status
            .is_some_and(|s| s.allowed)
    }

    /// Waits until RBAC's cache has a just-created grant.
    async fn wait_until_can(&self, cluster: &Cluster, verb: &str, subresource: &str) {
        let started = Instant::now();
        while !self.can(cluster, verb, subresource, NODE_NAME).await {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} never got {verb} nodes/{subresource}",
                self.user
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The status line of a request to node-1's kubelet with a bearer token.
async fn kubelet_status(
    ip: &str,
    token: &str,
    method: &str,
    target: &str,
    upgrade: &[(&str, &str)],
) -> u16 {
    let addr = format!("{ip}:10250").parse().unwrap();
    request(
        addr,
        true,
        &Cred::Token(token.into()),
        method,
        target,
        upgrade,
    )
    .await
    .unwrap()
    .status
}

const SPDY: [(&str, &str); 3] = [
    ("connection", "Upgrade"),
    ("upgrade", "SPDY/3.1"),
    ("x-stream-protocol-version", "v4.channel.k8s.io"),
];
const WEBSOCKET: [(&str, &str); 5] = [
    ("connection", "Upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("sec-websocket-protocol", "v5.channel.k8s.io"),
];

#[tokio::test]
async fn the_agents_kubelet_credential_reads_but_never_execs_unless_granted() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let Some(state) = cluster.local_state_dir().unwrap() else {
        return;
    };
    let ns = cluster.namespace("agent-cred").await.unwrap();
    let ns_name = ns.name().to_string();
    let pod = busybox_pod("web", &["sh", "-c", "echo hello-from-web; sleep 3600"]);
    ns.run_pod(&pod, Duration::from_secs(120)).await.unwrap();
    let container = pod.spec.as_ref().unwrap().containers[0].name.clone();

    let suffix = rand_suffix();
    let token = service_account_token(&cluster, &ns_name, "agent").await;
    let agent = Identity::account(&ns_name, "agent");
    let _default = Grant::new(
        &cluster,
        &format!("nodegate-test-agent-kubelet-{suffix}"),
        &ns_name,
        "agent",
        default_kubelet_rules(),
    )
    .await;
    agent.wait_until_can(&cluster, "get", "metrics").await;

    // RBAC: the reads the agent needs, on node-1 and on any other node alike (RBAC cannot say
    // "the caller's own node"); nothing that execs, attaches, forwards or checkpoints.
    for node in [NODE_NAME, OTHER_NODE] {
        for (verb, sub) in [
            ("get", "metrics"),
            ("get", "stats"),
            ("create", "stats"),
            ("get", "pods"),
            ("get", "log"),
            ("get", "healthz"),
            ("get", "configz"),
            ("get", "statusz"),
        ] {
            assert!(
                agent.can(&cluster, verb, sub, node).await,
                "{verb} nodes/{sub} on {node}"
            );
        }
        for (verb, sub) in [
            ("get", "proxy"),
            ("create", "proxy"),
            ("update", "proxy"),
            ("create", "checkpoint"),
            ("create", "metrics"),
            ("update", "stats"),
            ("delete", "pods"),
            ("create", "log"),
        ] {
            assert!(
                !agent.can(&cluster, verb, sub, node).await,
                "{verb} nodes/{sub} on {node}"
            );
        }
    }

    // The real kubelet: reads work with the token, exec is refused whatever the protocol.
    let ip = node_ip(&cluster).await;
    assert_eq!(
        kubelet_status(&ip, &token, "GET", "/metrics/resource", &[]).await,
        200
    );
    assert_eq!(kubelet_status(&ip, &token, "GET", "/pods", &[]).await, 200);
    let exec = format!("/exec/{ns_name}/web/{container}?command=id&stdout=true&output=1");
    assert_eq!(kubelet_status(&ip, &token, "POST", &exec, &SPDY).await, 403);
    assert_eq!(
        kubelet_status(&ip, &token, "GET", &exec, &WEBSOCKET).await,
        403
    );
    let logs = format!("/containerLogs/{ns_name}/web/{container}");
    assert_eq!(kubelet_status(&ip, &token, "GET", &logs, &[]).await, 403);

    // The API server's node proxy: refused for the same reason (nodes/proxy).
    let client = cluster.with_token(&token).unwrap();
    for method in ["POST", "GET"] {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("/api/v1/nodes/{NODE_NAME}/proxy{exec}"))
            .body(Vec::new())
            .unwrap();
        match client.request_text(req).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{method}: {status:?}"),
            other => panic!("{method} exec through the node proxy: {other:?}"),
        }
    }

    // An agent with this credential, told what it holds: reads through it work; exec and logs
    // are refused by the agent itself, naming the chart value, and never reach the kubelet.
    let token_file = std::env::temp_dir().join(format!("nodegate-agent-cred-{suffix}"));
    std::fs::write(&token_file, &token).unwrap();
    let upstream = {
        let mut s = UpstreamSettings::new(format!("https://{ip}:10250").parse().unwrap());
        s.ca_file = Some(state.join("kubelet/pki/kubelet.crt"));
        s.server_name = Some(NODE_NAME.into());
        s.token_file = Some(token_file.clone());
        s
    };
    let caller_name = format!("caller-{suffix}");
    let rules = vec![rule(
        "caller",
        vec![user(&caller_name)],
        &Endpoint::all().collect::<Vec<_>>(),
        namespaces(&[&ns_name]),
        &[Port::Secure],
    )];
    let creds = cluster.user_credentials(&caller_name, &[]).await.unwrap();
    let caller = Cred::Cert(client_cert_from_pem(&creds.certificate_pem, &creds.key_pem));
    let start = |access: KubeletAccess| {
        start_agent_configured(
            NODE_NAME,
            upstream.clone(),
            state.join("pki/ca.crt"),
            Arc::new(FakeReviewer(BTreeMap::new())),
            rules.clone(),
            None,
            move |s| s.kubelet_access = access,
        )
    };
    let narrow = start(KubeletAccess::fine_grained()).await;
    let addr = narrow.running.secure_addr;
    let r = request(addr, true, &caller, "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(addr, true, &caller, "POST", &exec, &SPDY)
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        r.text().contains("nodes/proxy") && r.text().contains("agent.kubeletAccess.proxy"),
        "{}",
        r.text()
    );
    let r = request(addr, true, &caller, "GET", &logs, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        r.text().contains("agent.kubeletAccess.proxy"),
        "{}",
        r.text()
    );
    drop(narrow);

    // With nodes/proxy granted (agent.kubeletAccess.proxy), exec and logs through the agent work
    // — and the same credential could now exec on any node: the blast radius the chart value
    // documents.
    let _proxy = Grant::new(
        &cluster,
        &format!("nodegate-test-agent-kubelet-proxy-{suffix}"),
        &ns_name,
        "agent",
        proxy_rules(),
    )
    .await;
    agent.wait_until_can(&cluster, "create", "proxy").await;
    assert!(agent.can(&cluster, "create", "proxy", OTHER_NODE).await);
    let wide = start(
        "healthz,pods,stats,metrics,configz,statusz,log,proxy"
            .parse()
            .unwrap(),
    )
    .await;
    let addr = wide.running.secure_addr;
    // The kubelet caches its refusals above (cacheUnauthorizedTTL, 30 s by default): retry
    // until that has passed.
    let started = Instant::now();
    let logs_reply = loop {
        let r = request(addr, true, &caller, "GET", &logs, &[])
            .await
            .unwrap();
        if r.status == 200 || started.elapsed() > Duration::from_secs(90) {
            break r;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert_eq!(logs_reply.status, 200, "{}", logs_reply.text());
    assert_eq!(logs_reply.text(), "hello-from-web\n");
    let head = loop {
        let head = spdy_exec_head(addr, &caller, &exec).await;
        if head.starts_with("http/1.1 101") || started.elapsed() > Duration::from_secs(90) {
            break head;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let _ = std::fs::remove_file(&token_file);
}

/// The answer head of an SPDY exec through the agent (the stream itself is not read).
async fn spdy_exec_head(addr: std::net::SocketAddr, cred: &Cred, target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_stream(addr, cred).await;
    let head = format!(
        "POST {target} HTTP/1.1\r\nHost: agent\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).to_ascii_lowercase()
}

/// Why the credential cannot be bound to the agent's node with RBAC, pinned on the real API
/// server: a pod-bound token of the agent's account names its node
/// (`authentication.kubernetes.io/node-name`, what the chart's admission policy keys status
/// writes on), but RBAC ignores that extra and answers the same for another node's kubelet.
#[tokio::test]
async fn a_pod_bound_token_names_its_node_and_rbac_ignores_it() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let ns = cluster.namespace("agent-bound").await.unwrap();
    let ns_name = ns.name().to_string();
    let suffix = rand_suffix();
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.admin().unwrap(), &ns_name);
    let mut account = ServiceAccount::default();
    account.metadata.name = Some("agent".into());
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let _grant = Grant::new(
        &cluster,
        &format!("nodegate-test-agent-bound-{suffix}"),
        &ns_name,
        "agent",
        default_kubelet_rules(),
    )
    .await;
    // A pod of the agent's account on node-1 (it need not run: binding needs only the object).
    let mut pod: Pod = busybox_pod("agent", &["sleep", "3600"]);
    let spec = pod.spec.as_mut().unwrap();
    spec.node_name = Some(NODE_NAME.into());
    spec.service_account_name = Some("agent".into());
    let pod = Api::<Pod>::namespaced(cluster.admin().unwrap(), &ns_name)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            bound_object_ref: Some(k8s_openapi::api::authentication::v1::BoundObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued: TokenRequest = accounts
        .create_subresource("token", "agent", &PostParams::default(), &request)
        .await
        .unwrap();
    let token = issued.status.unwrap().token;
    let review: TokenReview = serde_json::from_value(serde_json::json!({
        "spec": {"token": token},
    }))
    .unwrap();
    let reviewed = Api::<TokenReview>::all(cluster.admin().unwrap())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    let user = reviewed.status.unwrap().user.unwrap();
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/node-name"),
        Some(&vec![NODE_NAME.to_string()]),
        "{extra:?}"
    );
    let identity = Identity {
        user: user.username.unwrap(),
        groups: user.groups.unwrap_or_default(),
        extra,
    };
    identity.wait_until_can(&cluster, "get", "metrics").await;
    assert!(identity.can(&cluster, "get", "metrics", OTHER_NODE).await);
    assert!(identity.can(&cluster, "get", "log", OTHER_NODE).await);
    assert!(!identity.can(&cluster, "create", "proxy", OTHER_NODE).await);
}
