//! The agent's serving certificate from nodegate's signer, on the local cluster (issue 19):
//! the operator's signer (in-process, its own signerName per test) approves and signs the
//! CertificateSigningRequest an agent (the real binary, as a host process on node-1's address)
//! files with a token bound to a pod on node-1; `curl --cacert <published bundle>` verifies it
//! (no `-k`); the certificate is renewed before it expires; requests for another node's name
//! or address, or from another account, are denied with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec, ClusterTrustBundle,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use nodegate_operator::signer::{self, SignerSettings};
use nodegate_tests::cluster::{NODE_NAME, TEST_LABEL, busybox_pod};
use nodegate_tests::{Cluster, TestNamespace};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use support::*;
use tokio_util::sync::CancellationToken;

/// Cluster-scoped objects of one test, deleted on drop (also when the test fails).
struct ClusterScoped {
    cluster: Cluster,
    signer_name: String,
    names: Vec<(&'static str, String)>,
}

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        for (kind, name) in &self.names {
            let _ = self
                .cluster
                .kubectl()
                .args(["delete", kind, name, "--ignore-not-found", "--wait=false"])
                .output();
        }
        // Every request filed for this test's signer.
        let _ = self
            .cluster
            .kubectl()
            .args([
                "delete",
                "csr",
                "--field-selector",
                &format!("spec.signerName={}", self.signer_name),
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One test's world: a namespace with the agents' account (`agent`) and another (`intruder`),
/// both allowed to file requests, each with a token bound to a pod on node-1; the signer.
struct World {
    cluster: Cluster,
    ns: TestNamespace,
    signer_name: String,
    agent_token: String,
    intruder_token: String,
    dir: PathBuf,
    _scoped: ClusterScoped,
    shutdown: CancellationToken,
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl World {
    async fn new(cluster: Cluster, prefix: &str, max_duration: Duration) -> World {
        let ns = cluster.namespace(prefix).await.unwrap();
        let ns_name = ns.name().to_string();
        let suffix = rand_suffix();
        let signer_name = format!("nodegate.io/test-{suffix}");
        let grant = format!("nodegate-test-serving-{suffix}");
        let scoped = ClusterScoped {
            cluster: cluster.clone(),
            signer_name: signer_name.clone(),
            names: vec![
                ("clusterrole", grant.clone()),
                ("clusterrolebinding", grant.clone()),
                (
                    "clustertrustbundle",
                    signer::trust_bundle_name(&signer_name),
                ),
            ],
        };
        let admin = cluster.admin().unwrap();
        // What the chart grants the agent for this (create and read its requests, read Nodes),
        // given to the intruder too: the signer, not RBAC, must refuse it.
        let role = ClusterRole {
            metadata: ObjectMeta {
                name: Some(grant.clone()),
                labels: Some(BTreeMap::from([(TEST_LABEL.to_string(), grant.clone())])),
                ..Default::default()
            },
            rules: Some(vec![
                PolicyRule {
                    api_groups: Some(vec!["certificates.k8s.io".into()]),
                    resources: Some(vec!["certificatesigningrequests".into()]),
                    verbs: vec!["create".into(), "get".into()],
                    ..Default::default()
                },
                PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["nodes".into()]),
                    verbs: vec!["get".into(), "list".into(), "watch".into()],
                    ..Default::default()
                },
                // The agent reviews its callers' tokens (metrics-server's).
                PolicyRule {
                    api_groups: Some(vec!["authentication.k8s.io".into()]),
                    resources: Some(vec!["tokenreviews".into()]),
                    verbs: vec!["create".into()],
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        Api::<ClusterRole>::all(admin.clone())
            .create(&PostParams::default(), &role)
            .await
            .unwrap();
        let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": grant, "labels": {TEST_LABEL: grant}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": grant},
            "subjects": [
                {"kind": "ServiceAccount", "name": "agent", "namespace": ns_name},
                {"kind": "ServiceAccount", "name": "intruder", "namespace": ns_name},
            ],
        }))
        .unwrap();
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
        let agent_token = bound_token(&cluster, &ns_name, "agent").await;
        let intruder_token = bound_token(&cluster, &ns_name, "intruder").await;
        let shutdown = CancellationToken::new();
        tokio::spawn(signer::run(
            admin,
            SignerSettings {
                signer_name: signer_name.clone(),
                namespace: ns_name.clone(),
                ca_secret: "serving-ca".into(),
                bundle_config_map: "serving-ca-bundle".into(),
                agent_username: format!("system:serviceaccount:{ns_name}:agent"),
                max_duration,
                resync: Duration::from_secs(5),
            },
            shutdown.clone(),
        ));
        let dir = std::env::temp_dir().join(format!("nodegate-serving-{suffix}"));
        std::fs::create_dir_all(&dir).unwrap();
        World {
            cluster,
            ns,
            signer_name,
            agent_token,
            intruder_token,
            dir,
            _scoped: scoped,
            shutdown,
        }
    }

    /// The published bundle (ConfigMap `ca.crt`), written to a file for curl.
    async fn bundle(&self) -> PathBuf {
        let api: Api<ConfigMap> = Api::namespaced(self.cluster.admin().unwrap(), self.ns.name());
        let deadline = Instant::now() + Duration::from_secs(30);
        let pem = loop {
            if let Some(pem) = api
                .get_opt("serving-ca-bundle")
                .await
                .unwrap()
                .and_then(|cm| cm.data)
                .and_then(|d| d.get("ca.crt").cloned())
            {
                break pem;
            }
            assert!(Instant::now() < deadline, "no bundle published in 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let path = self.dir.join("bundle.crt");
        std::fs::write(&path, &pem).unwrap();
        path
    }

    /// A kubeconfig for the agent: the admin's cluster, the bound token as its user.
    fn kubeconfig(&self, token: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.cluster.location().kubeconfig).unwrap();
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        for user in doc["users"].as_sequence_mut().unwrap() {
            user["user"] = serde_yaml::from_str(&format!("token: {token}")).unwrap();
        }
        let path = self.dir.join("agent.kubeconfig");
        std::fs::write(&path, serde_yaml::to_string(&doc).unwrap()).unwrap();
        path
    }

    /// The agent binary on node-1's InternalIP, its certificate from the signer, its rules
    /// from `policy` (a NodeApiPolicy file).
    fn start_agent(&self, ip: &str, policy: &str, upstream: &[String]) -> (Killed, SocketAddr) {
        let binary = nodegate_tests::binaries::path("nodegate-agent", "nodegate-agent").unwrap();
        let policy_file = self.dir.join("policy.yaml");
        std::fs::write(&policy_file, policy).unwrap();
        let port = free_port();
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        let child = Command::new(binary)
            .args(["--node-name", NODE_NAME, "--bind-address", ip])
            .args(["--read-only-port", "0", "--healthz-port", "0"])
            .arg(format!("--secure-port={port}"))
            .arg(format!("--config-source=file:{}", policy_file.display()))
            .args(["--node-labels", "nodegate-test/any=yes"])
            .args(upstream)
            .arg("--kubeconfig")
            .arg(self.kubeconfig(&self.agent_token))
            .arg(format!("--serving-cert-signer={}", self.signer_name))
            .args(["--log-json", "false"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        (Killed(child), SocketAddr::new(ip.parse().unwrap(), port))
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

/// A token of `account` bound to a pod of that account on node-1: it carries
/// `authentication.kubernetes.io/node-name: node-1`, as the agent pod's projected token does.
async fn bound_token(cluster: &Cluster, ns: &str, account: &str) -> String {
    let admin = cluster.admin().unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(account.into());
    accounts.create(&PostParams::default(), &sa).await.unwrap();
    let mut pod: Pod = busybox_pod(account, &["sleep", "3600"]);
    pod.spec.as_mut().unwrap().service_account_name = Some(account.into());
    let pod = Api::<Pod>::namespaced(admin, ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
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
        .create_subresource("token", account, &PostParams::default(), &request)
        .await
        .unwrap();
    issued.status.unwrap().token.unwrap()
}

async fn internal_ip(cluster: &Cluster, node: &str) -> String {
    let node = Api::<Node>::all(cluster.admin().unwrap())
        .get(node)
        .await
        .unwrap();
    node.status
        .unwrap()
        .addresses
        .unwrap()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .unwrap()
        .address
}

/// `curl --cacert bundle https://addr/pods`: curl's exit code and the HTTP status.
fn curl(bundle: Option<&Path>, addr: SocketAddr) -> (i32, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ]);
    if let Some(bundle) = bundle {
        cmd.arg("--cacert").arg(bundle);
    }
    let out = cmd.arg(format!("https://{addr}/pods")).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The certificate the agent serves, read through a connection that verifies it against
/// `bundle` for the agent's IP (the handshake fails otherwise).
async fn served_certificate(
    bundle: &Path,
    addr: SocketAddr,
) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(bundle).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let certs = tls.get_ref().1.peer_certificates().unwrap();
    Ok(certs[0].clone().into_owned())
}

fn validity(cert: &CertificateDer<'_>) -> (String, SystemTime, SystemTime, String) {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64);
    (
        parsed.raw_serial_as_string(),
        at(parsed.validity().not_before.timestamp()),
        at(parsed.validity().not_after.timestamp()),
        parsed.subject().to_string(),
    )
}

fn pods_policy() -> String {
    "apiVersion: nodegate.io/v1alpha1\nkind: NodeApiPolicy\nmetadata:\n  name: nobody\n\
     spec:\n  subjects: [{kind: User, name: nobody-at-all}]\n  access: [pods]\n  namespaces: {all: true}\n"
        .to_string()
}

#[tokio::test]
async fn the_agent_serves_a_certificate_clients_verify_and_renews_it_before_expiry() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    // Certificates of 30 s: renewed 20 s after each arrives.
    let world = World::new(cluster.clone(), "serving-cert", Duration::from_secs(30)).await;
    let bundle = world.bundle().await;
    let bundle_pem = std::fs::read_to_string(&bundle).unwrap();
    // The local 1.37 API server serves certificates.k8s.io/v1 ClusterTrustBundles: the
    // signer publishes the same bundle there, linked to its signerName.
    let ctb = Api::<ClusterTrustBundle>::all(cluster.admin().unwrap())
        .get(&signer::trust_bundle_name(&world.signer_name))
        .await
        .unwrap();
    assert_eq!(
        ctb.spec.signer_name.as_deref(),
        Some(world.signer_name.as_str())
    );
    assert_eq!(ctb.spec.trust_bundle, bundle_pem);

    let ip = internal_ip(&cluster, NODE_NAME).await;
    let (_agent, addr) = world.start_agent(
        &ip,
        &pods_policy(),
        &["--upstream=http://127.0.0.1:9".into()],
    );
    // curl verifies the agent with the published bundle: the request reaches the agent,
    // which answers 403 (anonymous, no rule grants it).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, status) = curl(Some(&bundle), addr);
        if code == 0 {
            assert_eq!(status, "403", "anonymous, no rule");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "curl --cacert never verified the agent (last exit {code}); agent log:\n{}",
            world.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Without the bundle curl refuses the certificate (60: peer certificate cannot be
    // authenticated with known CA certificates): the verification above is real.
    assert_eq!(curl(None, addr).0, 60);

    let first = served_certificate(&bundle, addr).await.unwrap();
    let (serial, not_before, not_after, subject) = validity(&first);
    assert_eq!(subject, format!("CN=nodegate:agent:{NODE_NAME}"));
    assert!(
        not_after.duration_since(not_before).unwrap() <= Duration::from_secs(90),
        "the signer's 30 s cap (plus its 60 s backdate) applies"
    );
    // Renewed before it expires, served without a restart, still verified by the bundle.
    let renewed = loop {
        let now = SystemTime::now();
        assert!(
            now < not_after,
            "certificate {serial} expired before a new one was served; agent log:\n{}",
            world.agent_log()
        );
        let cert = served_certificate(&bundle, addr).await.unwrap();
        if validity(&cert).0 != serial {
            break cert;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (_, _, renewed_not_after, _) = validity(&renewed);
    assert!(renewed_not_after > not_after);
    assert_eq!(curl(Some(&bundle), addr), (0, "403".to_string()));
}

/// Files a request as `client` and waits for the signer's verdict: the Denied condition's
/// reason and message (panics if it is approved or issued).
async fn denied(
    client: kube::Client,
    signer_name: &str,
    cn: &str,
    sans: Vec<String>,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("nodegate-test-".into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: signer_name.into(),
            usages: Some(vec!["digital signature".into(), "server auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    let name = api
        .create(&PostParams::default(), &csr)
        .await
        .unwrap()
        .metadata
        .name
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let csr = api.get(&name).await.unwrap();
        let status = csr.status.unwrap_or_default();
        assert!(status.certificate.is_none(), "{name} was issued");
        for c in status.conditions.iter().flatten() {
            assert_ne!(c.type_, "Approved", "{name} was approved");
            if c.type_ == "Denied" {
                return (
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default(),
                );
            }
        }
        assert!(Instant::now() < deadline, "{name}: no verdict in 30 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn requests_for_another_nodes_name_or_address_or_from_another_account_are_denied() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let world = World::new(cluster.clone(), "serving-deny", Duration::from_secs(3600)).await;
    let other = cluster.fake_nodes("serving-other", 1, &[]).await.unwrap();
    let other_node = other.names()[0].clone();
    let other_ip = internal_ip(&cluster, &other_node).await;
    let ip = internal_ip(&cluster, NODE_NAME).await;
    let agent = cluster.with_token(&world.agent_token).unwrap();
    let intruder = cluster.with_token(&world.intruder_token).unwrap();
    let own_cn = format!("nodegate:agent:{NODE_NAME}");

    // The agent on node-1 asking for another node's address.
    let (reason, message) = denied(
        agent.clone(),
        &world.signer_name,
        &own_cn,
        vec![ip.clone(), other_ip.clone()],
    )
    .await;
    assert_eq!(reason, "AddressNotOfNode", "{message}");
    assert!(message.contains(&other_ip), "{message}");
    // ... or for another node's name.
    let (reason, message) = denied(
        agent.clone(),
        &world.signer_name,
        &format!("nodegate:agent:{other_node}"),
        vec![other_ip.clone()],
    )
    .await;
    assert_eq!(reason, "WrongNode", "{message}");
    // Another account on the same node, asking exactly what the agent may ask.
    let (reason, message) = denied(
        intruder,
        &world.signer_name,
        &own_cn,
        vec![ip.clone(), NODE_NAME.to_string()],
    )
    .await;
    assert_eq!(reason, "NotAnAgent", "{message}");
    assert!(message.contains(":intruder"), "{message}");
    // The admin (no pod-bound token) is no agent either.
    let (reason, _) = denied(
        cluster.admin().unwrap(),
        &world.signer_name,
        &own_cn,
        vec![ip.clone()],
    )
    .await;
    assert_eq!(reason, "NotAnAgent");
    // The same agent token asking for its own node's addresses is issued: the denials above
    // are the signer's checks, not a broken setup.
    let api: Api<CertificateSigningRequest> = Api::all(agent);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec![ip.clone(), NODE_NAME.to_string()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, own_cn.as_str());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("nodegate-test-".into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(
                params
                    .serialize_request(&key)
                    .unwrap()
                    .pem()
                    .unwrap()
                    .into_bytes(),
            ),
            signer_name: world.signer_name.clone(),
            usages: Some(vec!["digital signature".into(), "server auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    let name = api
        .create(&PostParams::default(), &csr)
        .await
        .unwrap()
        .metadata
        .name
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let csr = api.get(&name).await.unwrap();
        if csr
            .status
            .and_then(|s| s.certificate)
            .is_some_and(|c| !c.0.is_empty())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's own request was not issued"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let all = Api::<CertificateSigningRequest>::all(cluster.admin().unwrap())
        .list(&ListParams::default().fields(&format!("spec.signerName={}", world.signer_name)))
        .await
        .unwrap();
    assert_eq!(all.items.len(), 5);
}

/// metrics-server v0.8.0 (built by `cargo xtask test` into the cache; `NODEGATE_METRICS_SERVER`
/// names it).
fn metrics_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NODEGATE_METRICS_SERVER") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    let path = cache.join("nodegate/metrics-server-v0.8.0/metrics-server");
    assert!(
        path.is_file(),
        "{} is missing: `cargo xtask test` builds it (xtask/src/metrics_server.rs)",
        path.display()
    );
    path
}

/// The APIService `v1beta1.metrics.k8s.io` (cluster-wide: `kubectl top` of every user goes
/// through it) and the other objects of the metrics-server test; deleted on drop, also when the
/// test fails.
struct MetricsServerObjects {
    cluster: Cluster,
    names: Vec<(&'static str, String)>,
}

impl Drop for MetricsServerObjects {
    fn drop(&mut self) {
        for (kind, name) in &self.names {
            let _ = self
                .cluster
                .kubectl()
                .arg("delete")
                .args(kind.split_whitespace())
                .args([name, "--ignore-not-found", "--wait=false"])
                .output();
        }
    }
}

fn metrics_server_policy(ns: &str) -> String {
    format!(
        "apiVersion: nodegate.io/v1alpha1\nkind: NodeApiPolicy\nmetadata:\n  name: metrics-server\n\
         spec:\n  subjects: [{{kind: ServiceAccount, name: metrics-server, namespace: {ns}}}]\n  \
         access: [resource]\n  namespaces: {{all: true}}\n"
    )
}

/// `kubectl top <args>`: its exit status and output.
async fn kubectl_top(cluster: &Cluster, args: &[&str]) -> (bool, String) {
    let out = cluster.kubectl().arg("top").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn metrics_server_reads_node_1_through_the_agent_with_verified_tls_until_its_policy_goes() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let Some(state) = cluster.local_state_dir().unwrap() else {
        return;
    };
    let binary = metrics_server_binary();
    let world = World::new(cluster.clone(), "metrics-server", Duration::from_secs(3600)).await;
    let ns = world.ns.name().to_string();
    let admin = cluster.admin().unwrap();
    let bundle = world.bundle().await;
    let ip = node_ip(&cluster).await;

    // The agent in front of node-1's real kubelet, the policy granting metrics-server's account
    // `resource` on every namespace: nodegate's grant, no core nodes/metrics.
    let upstream = [
        format!("--upstream=https://{ip}:10250"),
        format!(
            "--upstream-ca-file={}",
            state.join("kubelet/pki/kubelet.crt").display()
        ),
        format!("--upstream-server-name={NODE_NAME}"),
        format!(
            "--upstream-client-cert-file={}",
            state.join("pki/apiserver-kubelet-client.crt").display()
        ),
        format!(
            "--upstream-client-key-file={}",
            state.join("pki/apiserver-kubelet-client.key").display()
        ),
    ];
    let (_agent, agent_addr) = world.start_agent(&ip, &metrics_server_policy(&ns), &upstream);
    // A pod on node-1 holding 20 MiB (in its /dev/shm, charged to its memory), so its figures
    // in `kubectl top` are not zero.
    let hog = busybox_pod(
        "hog",
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/dev/shm/fill bs=1M count=20; sleep 3600",
        ],
    );
    Api::<Pod>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &hog)
        .await
        .unwrap();

    // metrics-server's account with the RBAC of its own manifests (v0.8.0 components.yaml)
    // minus `nodes/metrics`: it reads Nodes and Pods, delegates authentication and
    // authorization, and reads the extension-apiserver-authentication ConfigMap.
    let suffix = rand_suffix();
    let role = format!("nodegate-test-metrics-server-{suffix}");
    let mut objects = MetricsServerObjects {
        cluster: cluster.clone(),
        names: vec![
            ("apiservice", "v1beta1.metrics.k8s.io".into()),
            ("clusterrole", role.clone()),
            ("clusterrolebinding", role.clone()),
            ("clusterrolebinding", format!("{role}-auth-delegator")),
        ],
    };
    let sa_token = service_account_token(&cluster, &ns, "metrics-server").await;
    let apply = |doc: serde_json::Value| {
        let cluster = cluster.clone();
        async move {
            let file = tempfile_json(&doc);
            let applied = cluster
                .run_kubectl(&["apply", "-f", &file.to_string_lossy()])
                .await;
            let _ = std::fs::remove_file(&file);
            applied.unwrap();
        }
    };
    apply(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": role, "labels": {TEST_LABEL: role}},
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]},
        ],
    }))
    .await;
    let subject =
        serde_json::json!([{"kind": "ServiceAccount", "name": "metrics-server", "namespace": ns}]);
    apply(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": role, "labels": {TEST_LABEL: role}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": subject,
    }))
    .await;
    apply(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": format!("{role}-auth-delegator"), "labels": {TEST_LABEL: role}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
        "subjects": subject,
    }))
    .await;
    let reader = format!("{role}-auth-reader");
    objects
        .names
        .push(("rolebinding -n kube-system", reader.clone()));
    apply(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": reader, "namespace": "kube-system", "labels": {TEST_LABEL: role}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "extension-apiserver-authentication-reader"},
        "subjects": subject,
    }))
    .await;
    // The API server proxies metrics.k8s.io to metrics-server through its front proxy
    // (--proxy-client-cert-file, --requestheader-*), which `cargo xtask cluster up` configures
    // as kubeadm does; metrics-server reads the caller from the X-Remote-* headers.
    let auth = Api::<ConfigMap>::namespaced(admin.clone(), "kube-system")
        .get("extension-apiserver-authentication")
        .await
        .unwrap();
    assert!(
        auth.data
            .as_ref()
            .is_some_and(|d| d.contains_key("requestheader-client-ca-file")),
        "the API server has no front proxy (--requestheader-client-ca-file): run `cargo xtask \
         cluster up` to restart it with the current flags"
    );

    // metrics-server as its manifests run it, apart from address, port and CA: the kubelet
    // port is the agent's, the kubelet CA nodegate's bundle (no --kubelet-insecure-tls).
    let ms_port = free_port();
    let kubeconfig = world.kubeconfig(&sa_token);
    let kubeconfig = {
        let path = world.dir.join("metrics-server.kubeconfig");
        std::fs::rename(&kubeconfig, &path).unwrap();
        path
    };
    let ms_log = std::fs::File::create(world.dir.join("metrics-server.log")).unwrap();
    let _metrics_server = Killed(
        Command::new(&binary)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg(format!(
                "--cert-dir={}",
                world.dir.join("ms-certs").display()
            ))
            .arg(format!("--secure-port={ms_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--kubelet-port={}", agent_addr.port()))
            .arg(format!(
                "--kubelet-certificate-authority={}",
                bundle.display()
            ))
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--kubelet-use-node-status-port=false")
            .arg("--metric-resolution=15s")
            .stdout(Stdio::null())
            .stderr(ms_log)
            .spawn()
            .unwrap(),
    );
    let ms_log =
        || std::fs::read_to_string(world.dir.join("metrics-server.log")).unwrap_or_default();
    // Its Service: an ExternalName for the host, where metrics-server runs as a process.
    apply(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "metrics-server", "namespace": ns},
        "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"name": "https", "port": ms_port}]},
    }))
    .await;
    // The APIService as metrics-server's manifests write it (they skip verifying metrics-server's
    // self-generated certificate too), pointing at this Service.
    apply(serde_json::json!({
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": "v1beta1.metrics.k8s.io", "labels": {TEST_LABEL: role}},
        "spec": {
            "group": "metrics.k8s.io", "version": "v1beta1",
            "groupPriorityMinimum": 100, "versionPriority": 100,
            "insecureSkipTLSVerify": true,
            "service": {"name": "metrics-server", "namespace": ns, "port": ms_port},
        },
    }))
    .await;

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = cluster
            .run_kubectl(&[
                "get",
                "apiservice",
                "v1beta1.metrics.k8s.io",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
            ])
            .await
            .unwrap_or_default();
        if out.trim() == "True" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the APIService is not Available in 120 s ({out}); metrics-server log:\n{}",
            ms_log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Real figures for node-1 and its pods (`hog` runs there).
    let deadline = Instant::now() + Duration::from_secs(120);
    let (nodes, pods) = loop {
        let nodes = kubectl_top(&cluster, &["nodes", "--no-headers"]).await;
        let pods = kubectl_top(&cluster, &["pods", "-A", "--no-headers"]).await;
        let node_line = nodes
            .1
            .lines()
            .find(|l| l.starts_with(&format!("{NODE_NAME} ")))
            .map(String::from);
        let pod_line = pods
            .1
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([ns.as_str(), "hog"]))
            // Its first sample may predate the allocation.
            .filter(|l| {
                l.split_whitespace()
                    .nth(3)
                    .and_then(|m| m.trim_end_matches("Mi").parse::<u64>().ok())
                    .is_some_and(|mi| mi >= 15)
            })
            .map(String::from);
        if let (true, true, Some(node), Some(pod)) = (nodes.0, pods.0, node_line, pod_line) {
            break (node, pod);
        }
        assert!(
            Instant::now() < deadline,
            "kubectl top shows no figures for node-1 in 120 s:\n{}\n{}\nmetrics-server log:\n{}\nagent log:\n{}",
            nodes.1,
            pods.1,
            ms_log(),
            world.agent_log()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    eprintln!("kubectl top nodes: {nodes}\nkubectl top pods -A: {pods}");
    // NAME CPU(cores) CPU% MEMORY(bytes) MEMORY%: figures, not <unknown>.
    let fields: Vec<&str> = nodes.split_whitespace().collect();
    assert!(
        fields[1].ends_with('m') && fields[3].ends_with("Mi"),
        "{nodes}"
    );
    let fields: Vec<&str> = pods.split_whitespace().collect();
    assert!(fields[2].ends_with('m'), "{pods}");
    let memory: u64 = fields[3].trim_end_matches("Mi").parse().unwrap();
    assert!(memory >= 15, "hog holds 20 MB: {pods}");
    assert!(
        !ms_log().contains("x509"),
        "metrics-server verified the agent with the bundle: {}",
        ms_log()
    );

    // The policy goes: the agent refuses metrics-server, and kubectl top fails.
    std::fs::write(world.dir.join("policy.yaml"), pods_policy()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = request(
            agent_addr,
            true,
            &Cred::Token(sa_token.clone()),
            "GET",
            "/metrics/resource",
            &[],
        )
        .await;
        if r.as_ref().is_ok_and(|r| r.status == 403) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still serves metrics-server"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (ok, out) = kubectl_top(&cluster, &["node", NODE_NAME, "--no-headers"]).await;
        if !ok {
            eprintln!("after the policy is deleted, kubectl top node {NODE_NAME}: {out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl top still shows node-1 120 s after the policy went: {out}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop(objects);
}

/// `doc` in a temporary file, for `kubectl apply -f`.
fn tempfile_json(doc: &serde_json::Value) -> PathBuf {
    let path = std::env::temp_dir().join(format!("nodegate-apply-{}.json", rand_suffix()));
    std::fs::write(&path, serde_json::to_vec(doc).unwrap()).unwrap();
    path
}
