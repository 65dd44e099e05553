//! The node's other components through nodegate-agent, on the local cluster where they listen on
//! loopback as kubeadm sets them up (kube-proxy 10249/10256, controller manager 10257,
//! scheduler 10259, etcd metrics 2381): the agent runs in-process on the host, reaches each
//! through a byte-counting TCP forwarder (so a test can tell that nothing was sent), and a real
//! Prometheus scrapes every component with the chart's scrape configs (`helm template`), TLS
//! verified against the agent's serving certificate. The controller manager and scheduler are
//! called with the agent's own service-account token, which the chart's ClusterRole lets get
//! `/metrics` and nothing else.
//!
//! helm: `$NODEGATE_HELM`, else `cargo xtask helm --path`. Prometheus: `$PROMETHEUS`, else
//! Debian's `/usr/bin/prometheus`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use nodegate_agent::authn::{Authenticator, AuthnSettings, KubeTokenReviewer, TokenReviewer};
use nodegate_agent::components::{ComponentFlags, ComponentPresence, ComponentSettings};
use nodegate_agent::config::{self, ApiSourceSettings, ConfigStore};
use nodegate_agent::metrics::Metrics;
use nodegate_agent::server::{self, Components, Running, Settings};
use nodegate_agent::tls::{ReloadingTls, TlsSettings};
use nodegate_agent::upstream::Upstream;
use nodegate_crds::catalogue::{Component, ComponentUpstream};
use nodegate_crds::policy::{MetricsTransform, SubjectKind};
use nodegate_crds::{AgentRule, Endpoint, NodeAgentConfig, Port, Subject};
use nodegate_tests::Cluster;
use rcgen::{CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::*;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "nodegate-{label}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// A TCP forwarder that counts the bytes callers send through it.

struct Forwarder {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn to(target: SocketAddr) -> Forwarder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.split();
                    let (mut ro, mut wo) = outbound.split();
                    let up = async {
                        let mut buf = [0u8; 16384];
                        loop {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let n = match ri.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            counter.fetch_add(n as u64, Ordering::SeqCst);
                            if wo.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut wo).await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut ro, &mut wi).await;
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut wi).await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Forwarder { addr, sent, task }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The local cluster's component ports (docs/local-cluster.md), as kubeadm binds them.
fn real_port(upstream: ComponentUpstream) -> u16 {
    match upstream {
        ComponentUpstream::KubeProxy => 10249,
        ComponentUpstream::KubeProxyHealthz => 10256,
        ComponentUpstream::KubeControllerManager => 10257,
        ComponentUpstream::KubeScheduler => 10259,
        ComponentUpstream::Etcd => 2381,
    }
}

/// Component settings for every component, each upstream through `forwarders`, the controller
/// manager's and scheduler's in-memory self-signed certificates not verified (as the chart's
/// default), the agent's token from `token_file`.
fn settings_through(
    forwarders: &BTreeMap<ComponentUpstream, Forwarder>,
    token_file: &Path,
) -> ComponentSettings {
    let flags = ComponentFlags {
        enabled: Component::ALL.to_vec(),
        urls: forwarders
            .iter()
            .map(|(u, f)| {
                let scheme = if u.default_url().starts_with("https") {
                    "https"
                } else {
                    "http"
                };
                (*u, format!("{scheme}://{}", f.addr).parse().unwrap())
            })
            .collect(),
        insecure_skip_tls_verify: vec![
            ComponentUpstream::KubeControllerManager,
            ComponentUpstream::KubeScheduler,
        ],
        token_file: Some(token_file.to_path_buf()),
        ..Default::default()
    };
    ComponentSettings::from_flags(&flags).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The agent, with a serving certificate Prometheus verifies.

struct ServingPki {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn serving_pki(dir: &Path) -> ServingPki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "nodegate-components-serving-ca");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "nodegate-agent");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let pki = ServingPki {
        ca_file: dir.join("serving-ca.crt"),
        cert_file: dir.join("agent.crt"),
        key_file: dir.join("agent.key"),
    };
    std::fs::write(&pki.ca_file, ca.pem()).unwrap();
    std::fs::write(&pki.cert_file, cert.pem()).unwrap();
    std::fs::write(&pki.key_file, key.serialize_pem()).unwrap();
    pki
}

async fn start_component_agent(
    pki: &ServingPki,
    reviewer: Arc<dyn TokenReviewer>,
    rules: Vec<AgentRule>,
    components: ComponentSettings,
) -> Running {
    let tls = ReloadingTls::new(TlsSettings {
        cert_file: Some(pki.cert_file.clone()),
        key_file: Some(pki.key_file.clone()),
        client_ca_file: None,
        node_name: "components-node".into(),
        node_ips: vec!["127.0.0.1".parse().unwrap()],
        alpn_protocols: vec![b"http/1.1".to_vec()],
    })
    .unwrap();
    let config = ConfigStore::new();
    config.publish(spec_of(rules));
    let mut settings = Settings::loopback("components-node");
    settings.components = components;
    server::start(
        settings,
        Components {
            tls,
            authenticator: Authenticator::new(reviewer, AuthnSettings::default()),
            config,
            // The kubelet is not what these tests are about: nothing may reach it.
            upstream: Upstream::new(&http_upstream(SocketAddr::from(([127, 0, 0, 1], 1)))).unwrap(),
            access_reviewer: None,
            metrics: Metrics::new(),
        },
    )
    .await
    .unwrap()
}

fn service_account(namespace: &str, name: &str) -> Subject {
    Subject {
        kind: SubjectKind::ServiceAccount,
        name: name.into(),
        namespace: Some(namespace.into()),
    }
}

fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, content).unwrap();
    file
}

// ---------------------------------------------------------------------------------------------
// helm and Prometheus

fn helm() -> PathBuf {
    if let Some(path) = std::env::var_os("NODEGATE_HELM").filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = repo("");
    let out = Command::new(cargo)
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", root.join("target/xtask-from-tests"))
        .args(["xtask", "helm", "--path"])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        out.status.success() && Path::new(&path).is_file(),
        "NODEGATE_HELM is unset and `cargo xtask helm --path` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(path)
}

/// `helm template` of the chart with `args` (`--set …`, `--show-only …`): its documents.
fn helm_template(release: &str, namespace: &str, args: &[&str]) -> Vec<serde_yaml::Value> {
    let out = Command::new(helm())
        .args(["template", release])
        .arg(repo("charts/nodegate"))
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

/// `helm template` of the chart with every component enabled; the documents of
/// `templates/agent/components.yaml`.
fn chart_component_objects(
    release: &str,
    namespace: &str,
    agent_sa: &str,
) -> Vec<serde_yaml::Value> {
    helm_template(
        release,
        namespace,
        &[
            "--set",
            "agent.hostNetwork=true",
            "--set",
            "agent.components.enabled={kube-proxy,kube-controller-manager,kube-scheduler,etcd}",
            "--set",
            "agent.components.scrape.caFile=/prometheus/agent-ca.crt",
            "--set",
            &format!("agent.serviceAccount.name={agent_sa}"),
            "--show-only",
            "templates/agent/components.yaml",
        ],
    )
}

fn kind_of<'a>(objects: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    objects
        .iter()
        .filter(|o| o["kind"].as_str() == Some(kind))
        .collect()
}

/// The chart's scrape configs aimed at this agent: node discovery replaced by a static target
/// (its relabelling then leaves the address alone), Prometheus' token and the agent's CA at
/// their paths here, a 1 s interval. Job names, paths, scheme and TLS are the chart's.
fn scrape_configs_for(
    chart: &[serde_yaml::Value],
    target: SocketAddr,
    token_file: &Path,
    ca_file: &Path,
) -> (String, BTreeMap<String, String>) {
    let map = kind_of(chart, "ConfigMap")
        .into_iter()
        .find(|m| {
            m["metadata"]["name"]
                .as_str()
                .unwrap()
                .ends_with("component-scrape-configs")
        })
        .expect("the chart's component scrape configs");
    let mut jobs: Vec<serde_yaml::Value> =
        serde_yaml::from_str(map["data"]["scrape-configs.yaml"].as_str().unwrap()).unwrap();
    let mut paths = BTreeMap::new();
    for job in &mut jobs {
        let m = job.as_mapping_mut().unwrap();
        assert_eq!(m["scheme"].as_str(), Some("https"));
        assert!(m.remove("kubernetes_sd_configs").is_some());
        m.insert(
            "static_configs".into(),
            serde_yaml::from_str(&format!("[{{targets: ['{target}']}}]")).unwrap(),
        );
        m.insert("scrape_interval".into(), "1s".into());
        m.insert("scrape_timeout".into(), "1s".into());
        m["authorization"]["credentials_file"] = token_file.display().to_string().into();
        m["tls_config"]["ca_file"] = ca_file.display().to_string().into();
        paths.insert(
            m["job_name"].as_str().unwrap().to_string(),
            m["metrics_path"].as_str().unwrap().to_string(),
        );
    }
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{}",
        serde_yaml::to_string(&jobs).unwrap()
    );
    (config, paths)
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Prometheus {
    async fn start(config: &str) -> Prometheus {
        let dir = TempDir::new("components-prometheus");
        let config_file = write_file(&dir.0, "prometheus.yml", config);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
        let binary = std::env::var_os("PROMETHEUS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"));
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "prometheus (Debian package `prometheus`, see .ci/install-deps) must be installed",
            );
        let prometheus = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = request(addr, false, &Cred::None, "GET", "/-/ready", &[]).await
                && r.status == 200
            {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready: {}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    async fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let encoded =
            percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let r = request(
            self.addr,
            false,
            &Cred::None,
            "GET",
            &format!("/api/v1/query?query={encoded}"),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{promql}: {}", r.text());
        let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        doc["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                (labels, s["value"][1].as_str().unwrap().parse().unwrap())
            })
            .collect()
    }

    /// The `job` labels of `promql`'s series once `done` holds for them (60 s at most).
    async fn jobs_of(
        &self,
        promql: &str,
        done: impl Fn(&BTreeSet<String>) -> bool,
    ) -> BTreeSet<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let jobs: BTreeSet<String> = self
                .query(promql)
                .await
                .into_iter()
                .filter_map(|(l, _)| l.get("job").cloned())
                .collect();
            if done(&jobs) {
                return jobs;
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: jobs {jobs:?} after 60 s; prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deletes cluster-scoped objects (the chart's ClusterRole and binding, a NodeAgentConfig)
/// when the test ends, also on panic.
struct KubectlCleanup(Vec<Command>);

impl KubectlCleanup {
    fn new(cluster: &Cluster, objects: Vec<String>) -> KubectlCleanup {
        KubectlCleanup(
            objects
                .iter()
                .map(|object| {
                    let mut cmd = cluster.kubectl();
                    cmd.args(["delete", "--ignore-not-found", "--wait=false", object]);
                    cmd
                })
                .collect(),
        )
    }
}

impl Drop for KubectlCleanup {
    fn drop(&mut self) {
        for cmd in &mut self.0 {
            let _ = cmd.output();
        }
    }
}

async fn kubectl_apply(cluster: &Cluster, dir: &Path, objects: &[&serde_yaml::Value]) {
    let mut text = String::new();
    for o in objects {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(o).unwrap());
    }
    let file = write_file(dir, "chart-rbac.yaml", &text);
    cluster
        .run_kubectl(&["apply", "-f", &file.display().to_string()])
        .await
        .unwrap();
}

/// GET `path` on a component's real secure port with `token`, no agent in between (curl; the
/// component's in-memory self-signed certificate is not verified).
async fn direct(port: u16, token: &str, path: &str) -> u16 {
    let out = tokio::process::Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .await
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn prometheus_scrapes_every_component_through_the_agent_and_nothing_else_gets_through()
-> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let dir = TempDir::new("components");
    let ns = cluster.namespace("components").await?;
    let prometheus_token = service_account_token(&cluster, ns.name(), "prometheus").await;
    let other_token = service_account_token(&cluster, ns.name(), "kubelet-only").await;
    let keeper_token = service_account_token(&cluster, ns.name(), "etcd-keeper").await;
    let agent_token = service_account_token(&cluster, ns.name(), "agent").await;

    // The chart's RBAC for the agent, bound to this test's agent account.
    let release = format!("c{}", rand_suffix().to_lowercase());
    let chart = chart_component_objects(&release, ns.name(), "agent");
    let rbac: Vec<&serde_yaml::Value> = chart
        .iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some("ClusterRole" | "ClusterRoleBinding")
            )
        })
        .collect();
    assert_eq!(
        rbac.len(),
        2,
        "the chart's ClusterRole and binding for components"
    );
    let role = kind_of(&chart, "ClusterRole")[0];
    assert_eq!(
        serde_yaml::to_string(&role["rules"]).unwrap(),
        "- nonResourceURLs:\n  - /metrics\n  - /metrics/slis\n  verbs:\n  - get\n",
        "the agent gets /metrics (and /metrics/slis) of the components, nothing more"
    );
    let _cleanup = KubectlCleanup::new(
        &cluster,
        rbac.iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap().to_lowercase(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect(),
    );
    kubectl_apply(&cluster, &dir.0, &rbac).await;

    // The agent's identity as the controller manager and scheduler see it: /metrics yes,
    // /configz no; an account without the chart's role gets neither (the control).
    for port in [10257, 10259] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while direct(port, &agent_token, "/metrics").await != 200 {
            assert!(
                Instant::now() < deadline,
                "the agent's token never got {port}/metrics"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(
            direct(port, &agent_token, "/metrics/slis").await,
            200,
            "{port}"
        );
        assert_eq!(direct(port, &agent_token, "/configz").await, 403, "{port}");
        assert_eq!(direct(port, &agent_token, "/flagz").await, 403, "{port}");
        assert_eq!(direct(port, &other_token, "/metrics").await, 403, "{port}");
    }

    let mut forwarders = BTreeMap::new();
    for upstream in ComponentUpstream::ALL {
        let target = SocketAddr::from(([127, 0, 0, 1], real_port(upstream)));
        forwarders.insert(upstream, Forwarder::to(target).await);
    }
    let agent_token_file = write_file(&dir.0, "agent.token", &agent_token);
    let pki = serving_pki(&dir.0);
    let components: Vec<Endpoint> = Endpoint::components().collect();
    let rules = vec![
        rule(
            "control-plane-monitoring",
            vec![service_account(ns.name(), "prometheus")],
            &components,
            all_namespaces(),
            &[Port::Secure],
        ),
        // The kubelet's node-wide metrics, and no component.
        rule(
            "kubelet-only",
            vec![service_account(ns.name(), "kubelet-only")],
            &[Endpoint::Metrics, Endpoint::Healthz],
            all_namespaces(),
            &[Port::Secure],
        ),
        AgentRule {
            metrics: Some(MetricsTransform {
                keep: vec!["etcd_server_has_leader".into()],
                add_labels: [("cluster".to_string(), "local".to_string())].into(),
                ..Default::default()
            }),
            ..rule(
                "etcd-keeper",
                vec![service_account(ns.name(), "etcd-keeper")],
                &[Endpoint::EtcdMetrics],
                all_namespaces(),
                &[Port::Secure],
            )
        },
    ];
    let reviewer = Arc::new(KubeTokenReviewer::new(cluster.admin()?));
    let agent = start_component_agent(
        &pki,
        reviewer,
        rules,
        settings_through(&forwarders, &agent_token_file),
    )
    .await;
    let addr = agent.secure_addr;
    let total = |f: &BTreeMap<ComponentUpstream, Forwarder>| -> u64 {
        f.values().map(Forwarder::sent).sum()
    };
    let get = |token: &str, path: &str| {
        let cred = Cred::Token(token.to_string());
        let path = path.to_string();
        async move { request(addr, true, &cred, "GET", &path, &[]).await.unwrap() }
    };

    // Every catalogue path of every component, for the granted caller: served.
    for endpoint in &components {
        for path in endpoint.spec().patterns {
            let r = get(&prometheus_token, path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
        }
    }
    let scheduler = get(&prometheus_token, "/components/kube-scheduler/metrics").await;
    assert!(
        scheduler.text().contains("scheduler_"),
        "the scheduler's own metrics"
    );

    // A caller whose policy lacks the components: 403, and not a byte reaches any of them.
    let before = total(&forwarders);
    for endpoint in &components {
        for path in endpoint.spec().patterns {
            let r = get(&other_token, path).await;
            assert_eq!(r.status, 403, "{path}: {}", r.text());
        }
    }
    // What is never served, even to the caller granted every component: 403 (no route) or
    // 405, nothing sent upstream.
    for (method, path) in [
        ("GET", "/components/kube-scheduler/configz"),
        ("GET", "/components/kube-scheduler/flagz"),
        ("GET", "/components/kube-scheduler/debug/pprof/profile"),
        ("GET", "/components/kube-scheduler/debug/pprof/"),
        ("GET", "/components/kube-controller-manager/configz"),
        (
            "GET",
            "/components/kube-controller-manager/debug/pprof/heap",
        ),
        ("GET", "/components/kube-proxy/configz"),
        ("GET", "/components/kube-proxy/proxyMode"),
        ("GET", "/components/kube-proxy/flagz"),
        ("GET", "/components/etcd/v3/kv/range"),
        ("POST", "/components/etcd/v3/kv/range"),
        ("POST", "/components/etcd/v3/kv/put"),
        ("GET", "/components/etcd/version"),
        ("GET", "/components/etcd/debug/vars"),
        ("GET", "/components/etcd/../kube-scheduler/configz"),
        ("GET", "/components/etcd/%2e%2e/kube-scheduler/configz"),
        ("POST", "/components/etcd/metrics"),
        ("PUT", "/components/kube-scheduler/healthz"),
    ] {
        let cred = Cred::Token(prometheus_token.clone());
        let r = request(addr, true, &cred, method, path, &[]).await.unwrap();
        assert!(
            [400, 403, 404, 405].contains(&r.status),
            "{method} {path}: {} {}",
            r.status,
            r.text()
        );
    }
    assert_eq!(
        total(&forwarders),
        before,
        "a refused request reached a component"
    );

    // Metric transforms apply to component metrics.
    let kept = get(&keeper_token, "/components/etcd/metrics").await;
    assert_eq!(kept.status, 200);
    let samples: Vec<&str> = kept
        .text()
        .leak()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(!samples.is_empty());
    for line in &samples {
        assert!(
            line.starts_with("etcd_server_has_leader{") && line.contains("cluster=\"local\""),
            "{line}"
        );
    }

    // A real Prometheus with the chart's scrape configs.
    let prometheus_token_file = write_file(&dir.0, "prometheus.token", &prometheus_token);
    let (config, paths) = scrape_configs_for(&chart, addr, &prometheus_token_file, &pki.ca_file);
    let expected: BTreeSet<String> = [
        "kube-proxy",
        "kube-controller-manager",
        "kube-scheduler",
        "kube-etcd",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for c in Component::ALL {
        assert_eq!(paths[c.job()], format!("/components/{c}/metrics"));
    }
    let prometheus = Prometheus::start(&config).await;
    let up = prometheus
        .jobs_of("max_over_time(up[5m]) == 1", |jobs| *jobs == expected)
        .await;
    assert_eq!(up, expected);
    // Each job's series are that component's, under the job names the mixins select.
    for (promql, job) in [
        (
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kube-proxy",
        ),
        ("etcd_server_has_leader", "kube-etcd"),
        (
            "count by (job) ({__name__=~\"scheduler_.+\"})",
            "kube-scheduler",
        ),
        (
            "count by (job) ({__name__=~\"node_collector_.+|endpoint_slice_controller_.+|garbagecollector_controller_.+\"})",
            "kube-controller-manager",
        ),
    ] {
        let jobs = prometheus.jobs_of(promql, |j| !j.is_empty()).await;
        assert_eq!(jobs, BTreeSet::from([job.to_string()]), "{promql}");
    }
    drop(prometheus);
    Ok(())
}

#[tokio::test]
async fn a_component_that_is_down_is_502_and_status_says_which_are_present() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    cluster.install_crds().await?;
    let dir = TempDir::new("components-down");
    let ns = cluster.namespace("components-down").await?;
    let token = service_account_token(&cluster, ns.name(), "prometheus").await;
    let agent_token_file = write_file(&dir.0, "agent.token", "unused");
    // kube-proxy (both ports) for real; the scheduler at a port nothing listens on.
    let dead = free_port();
    let flags = ComponentFlags {
        enabled: vec![Component::KubeProxy, Component::KubeScheduler],
        urls: vec![(
            ComponentUpstream::KubeScheduler,
            format!("https://127.0.0.1:{dead}").parse().unwrap(),
        )],
        insecure_skip_tls_verify: vec![ComponentUpstream::KubeScheduler],
        token_file: Some(agent_token_file),
        ..Default::default()
    };
    let mut components = ComponentSettings::from_flags(&flags).unwrap();
    components.probe_interval = Some(Duration::from_millis(500));
    let presence: ComponentPresence = components.presence.clone();
    let pki = serving_pki(&dir.0);
    let rules = vec![rule(
        "all-components",
        vec![service_account(ns.name(), "prometheus")],
        &Endpoint::components().collect::<Vec<_>>(),
        all_namespaces(),
        &[Port::Secure],
    )];
    let agent = start_component_agent(
        &pki,
        Arc::new(KubeTokenReviewer::new(cluster.admin()?)),
        rules,
        components,
    )
    .await;
    let cred = Cred::Token(token);
    let r = request(
        agent.secure_addr,
        true,
        &cred,
        "GET",
        "/components/kube-scheduler/metrics",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.text(),
        format!("Bad Gateway: kube-scheduler could not be reached at https://127.0.0.1:{dead}/\n")
    );
    let r = request(
        agent.secure_addr,
        true,
        &cred,
        "GET",
        "/components/kube-proxy/livez",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // Enabled nowhere on this agent: 404, naming the flag.
    let r = request(
        agent.secure_addr,
        true,
        &cred,
        "GET",
        "/components/etcd/metrics",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("--components"), "{}", r.text());

    // The status the agent writes on its NodeAgentConfig, and `kubectl get nac`.
    let node = format!("components-node-{}", rand_suffix().to_lowercase());
    let client = cluster.admin()?;
    let api: kube::Api<NodeAgentConfig> = kube::Api::all(client.clone());
    let object: NodeAgentConfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "nodegate.io/v1alpha1",
        "kind": "NodeAgentConfig",
        "metadata": {"name": node, "labels": {"app.kubernetes.io/managed-by": "nodegate"}},
        "spec": {"policies": "", "hash": "h1", "rules": []},
    }))?;
    api.create(&kube::api::PostParams::default(), &object)
        .await?;
    let _cleanup = KubectlCleanup::new(&cluster, vec![format!("nodeagentconfig/{node}")]);
    let store = ConfigStore::new();
    let source = tokio::spawn(config::run_api(
        client,
        store,
        ApiSourceSettings {
            config_name: node.clone(),
            serving_cert_expiry: None,
            status_interval: Duration::from_millis(300),
            components: Some(presence),
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = api.get(&node).await?.status.unwrap_or_default();
        if status.components.as_deref() == Some("kube-proxy") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status.components is {:?}, want kube-proxy (the scheduler is down)",
            status.components
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Columns are aligned: the value starts where its header does (POLICIES is empty here).
    let text = cluster.run_kubectl(&["get", "nac", &node]).await?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let row = lines.next().unwrap_or_default();
    let column = header.find("COMPONENTS").expect("a COMPONENTS column");
    let value = row
        .get(column..)
        .unwrap_or_default()
        .split_whitespace()
        .next();
    assert_eq!(value, Some("kube-proxy"), "{text}");
    source.abort();
    drop(agent);
    Ok(())
}

/// What goes upstream to a component without credentials (kube-proxy, etcd's metrics port):
/// exactly the catalogue path without `/components/<name>` and the caller's query, and none of
/// the caller's credentials or identity headers — nor the agent's token.
#[tokio::test]
async fn components_without_credentials_get_only_the_path_and_no_credential() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<String>)>::new()));
    let record = seen.clone();
    let fake = fake_kubelet(move |req: http::Request<hyper::body::Incoming>| {
        let headers = req
            .headers()
            .keys()
            .map(|k| k.as_str().to_string())
            .collect();
        record
            .lock()
            .unwrap()
            .push((req.uri().to_string(), headers));
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
            b"# TYPE up gauge\nup 1\n",
        )))
    })
    .await;
    let dir = TempDir::new("components-headers");
    let token_file = write_file(&dir.0, "agent.token", "agent-secret-token-0123456789");
    let flags = ComponentFlags {
        enabled: vec![Component::KubeProxy, Component::Etcd],
        urls: [
            ComponentUpstream::KubeProxy,
            ComponentUpstream::KubeProxyHealthz,
            ComponentUpstream::Etcd,
        ]
        .into_iter()
        .map(|u| (u, format!("http://{fake}").parse().unwrap()))
        .collect(),
        token_file: Some(token_file),
        ..Default::default()
    };
    let pki = serving_pki(&dir.0);
    let rules = vec![rule(
        "root",
        vec![user("root")],
        &Endpoint::components().collect::<Vec<_>>(),
        all_namespaces(),
        &[Port::Secure],
    )];
    let agent = start_component_agent(
        &pki,
        Arc::new(FakeReviewer(tokens())),
        rules,
        ComponentSettings::from_flags(&flags).unwrap(),
    )
    .await;
    let cred = Cred::Token("tok-root-1234567890".into());
    for (target, upstream) in [
        ("/components/kube-proxy/metrics?x=1", "/metrics?x=1"),
        ("/components/kube-proxy/livez", "/livez"),
        (
            "/components/etcd/health?serializable=true",
            "/health?serializable=true",
        ),
        ("/components/etcd/metrics", "/metrics"),
    ] {
        seen.lock().unwrap().clear();
        let r = request(
            agent.secure_addr,
            true,
            &cred,
            "GET",
            target,
            &[
                ("cookie", "session=1"),
                ("impersonate-user", "admin"),
                ("x-remote-user", "admin"),
                ("x-forwarded-for", "10.0.0.1"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{target}");
        let (uri, headers) = &seen[0];
        assert!(uri.ends_with(upstream), "{target}: asked {uri}");
        for banned in [
            "authorization",
            "cookie",
            "impersonate-user",
            "x-remote-user",
            "x-forwarded-for",
        ] {
            assert!(
                !headers.iter().any(|h| h == banned),
                "{target}: {banned} sent: {headers:?}"
            );
        }
    }
}

/// etcd's client port (2379, TLS with client certificates) instead of its metrics port: the
/// agent presents the configured client certificate (here the API server's etcd client
/// certificate of the local cluster, which etcd trusts) and verifies etcd against the CA; the
/// metrics and health are served, and the key-value API a certificate etcd trusts would open is
/// never asked (nothing sent).
#[tokio::test]
async fn etcd_client_port_with_a_client_certificate_serves_metrics_and_never_the_key_space()
-> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let Some(state) = cluster.local_state_dir()? else {
        return Ok(());
    };
    let dir = TempDir::new("components-etcd");
    let forwarder = Forwarder::to(SocketAddr::from(([127, 0, 0, 1], 2379))).await;
    let flags = ComponentFlags {
        enabled: vec![Component::Etcd],
        urls: vec![(
            ComponentUpstream::Etcd,
            format!("https://{}", forwarder.addr).parse().unwrap(),
        )],
        ca_files: vec![(ComponentUpstream::Etcd, state.join("pki/ca.crt"))],
        etcd_client_cert_file: Some(state.join("pki/apiserver-etcd-client.crt")),
        etcd_client_key_file: Some(state.join("pki/apiserver-etcd-client.key")),
        ..Default::default()
    };
    let pki = serving_pki(&dir.0);
    let rules = vec![rule(
        "root",
        vec![user("root")],
        &[Endpoint::EtcdMetrics, Endpoint::EtcdHealth],
        all_namespaces(),
        &[Port::Secure],
    )];
    let agent = start_component_agent(
        &pki,
        Arc::new(FakeReviewer(tokens())),
        rules,
        ComponentSettings::from_flags(&flags).unwrap(),
    )
    .await;
    let cred = Cred::Token("tok-root-1234567890".into());
    let r = request(
        agent.secure_addr,
        true,
        &cred,
        "GET",
        "/components/etcd/metrics",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("etcd_server_has_leader"),
        "etcd's own metrics"
    );
    let r = request(
        agent.secure_addr,
        true,
        &cred,
        "GET",
        "/components/etcd/health",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"health\":\"true\""), "{}", r.text());
    let before = forwarder.sent();
    for (method, path) in [
        ("POST", "/components/etcd/v3/kv/range"),
        ("GET", "/components/etcd/v3/kv/range"),
        ("POST", "/components/etcd/v3/kv/put"),
        ("POST", "/components/etcd/v3/lease/grant"),
        ("GET", "/components/etcd/version"),
        ("GET", "/components/etcd/debug/vars"),
    ] {
        let r = request(agent.secure_addr, true, &cred, method, path, &[])
            .await
            .unwrap();
        assert!(
            [403, 404, 405].contains(&r.status),
            "{method} {path}: {}",
            r.status
        );
    }
    assert_eq!(forwarder.sent(), before, "a key-value request reached etcd");
    Ok(())
}

/// `agent.components.nodeUpstreams` end to end: the chart's ConfigMap and flags, given to the
/// real agent binary. On the node the entry names, the agent asks the URL of that entry (the
/// installation's URL, a dead port here, is not used); on another node, the installation's URL
/// (502, nothing reaches the entry's upstream).
#[tokio::test]
async fn a_node_entry_of_the_chart_points_that_nodes_agent_at_its_own_upstream() -> TestResult {
    // Components are served on the secure port only: a real token, reviewed by the API server.
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("node-upstreams").await?;
    let token = service_account_token(&cluster, ns.name(), "caller").await;
    let asked = Arc::new(AtomicU64::new(0));
    let count = asked.clone();
    let fake = fake_kubelet(move |_req: http::Request<hyper::body::Incoming>| {
        count.fetch_add(1, Ordering::SeqCst);
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
            b"# TYPE up gauge\nup 1\n",
        )))
    })
    .await;
    let entry = format!("agent.components.nodeUpstreams.cp-1.kube-proxy=http://{fake}");
    let objects = helm_template(
        "rel",
        "ns",
        &[
            "--set",
            "agent.hostNetwork=true",
            "--set",
            "agent.components.enabled={kube-proxy}",
            "--set",
            "agent.components.scrape.caFile=/ca.crt",
            "--set",
            "agent.components.upstreams.kube-proxy=http://127.0.0.1:1",
            "--set",
            &entry,
        ],
    );
    let map = kind_of(&objects, "ConfigMap")
        .into_iter()
        .find(|o| o["metadata"]["name"] == "rel-nodegate-agent-component-node-upstreams")
        .expect("the per-node upstreams ConfigMap");
    let document = map["data"]["upstreams.yaml"].as_str().unwrap().to_string();
    let daemonset = kind_of(&objects, "DaemonSet")[0];
    let args: Vec<String> = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let mounted = "/etc/nodegate/component-node-upstreams/upstreams.yaml";
    for want in [
        "--components=kube-proxy".to_string(),
        "--component-upstream=kube-proxy=http://127.0.0.1:1".to_string(),
        format!("--component-node-upstreams-file={mounted}"),
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }

    // The agent binary, with those flags (the file where the chart mounts it, here).
    let dir = TempDir::new("components-node-upstreams");
    let file = write_file(&dir.0, "upstreams.yaml", &document);
    // A kubelet that answers (the agent is ready only when its kubelet is reachable).
    let kubelet = fake_kubelet(|_req: http::Request<hyper::body::Incoming>| {
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
    })
    .await;
    let binary = nodegate_tests::binaries::path("nodegate-agent", "nodegate-agent").unwrap();
    for (node, status) in [("cp-1", 200), ("worker-1", 502)] {
        let config = write_file(
            &dir.0,
            &format!("{node}.yaml"),
            &serde_yaml::to_string(&NodeAgentConfig::new(
                node,
                spec_of(vec![rule(
                    "caller-kube-proxy",
                    vec![service_account(ns.name(), "caller")],
                    &[Endpoint::KubeProxyMetrics],
                    all_namespaces(),
                    &[Port::Secure],
                )]),
            ))
            .unwrap(),
        );
        let (secure, read_only, healthz) = (free_port(), free_port(), free_port());
        let mut child = Command::new(&binary)
            .args(["--node-name", node])
            .args([
                "--bind-address",
                "127.0.0.1",
                "--healthz-bind-address",
                "127.0.0.1",
            ])
            .arg(format!("--config-source=file:{}", config.display()))
            .arg(format!("--upstream=http://{kubelet}"))
            // No Node object of that name: its labels are given.
            .arg(format!("--node-labels=kubernetes.io/hostname={node}"))
            .arg(format!("--secure-port={secure}"))
            .arg(format!("--read-only-port={read_only}"))
            .arg(format!("--healthz-port={healthz}"))
            .args(args.iter().filter(|a| {
                a.starts_with("--component") && !a.starts_with("--component-node-upstreams-file")
            }))
            .arg(format!(
                "--component-node-upstreams-file={}",
                file.display()
            ))
            .env("KUBECONFIG", &cluster.location().kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join(format!("{node}.log"))).unwrap())
            .spawn()
            .unwrap();
        let log = || std::fs::read_to_string(dir.0.join(format!("{node}.log"))).unwrap_or_default();
        let healthz_addr = SocketAddr::from(([127, 0, 0, 1], healthz));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = request(healthz_addr, false, &Cred::None, "GET", "/readyz", &[]).await
                && r.status == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent for {node} not ready in 30 s: {}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let before = asked.load(Ordering::SeqCst);
        let addr = SocketAddr::from(([127, 0, 0, 1], secure));
        let r = request(
            addr,
            true,
            &Cred::Token(token.clone()),
            "GET",
            "/components/kube-proxy/metrics",
            &[],
        )
        .await
        .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(r.status, status, "{node}: {}\n{}", r.text(), log());
        let reached = asked.load(Ordering::SeqCst) - before;
        if status == 200 {
            assert!(r.text().contains("up 1"), "{}", r.text());
            assert_eq!(reached, 1, "{node}: the entry's upstream answered");
        } else {
            assert_eq!(reached, 0, "{node}: the entry is not this node's");
        }
    }
    Ok(())
}
