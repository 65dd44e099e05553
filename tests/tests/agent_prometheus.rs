//! A real Prometheus scraping the kubelet's metrics through nodegate-agent, configured like
//! kube-prometheus' kubelet ServiceMonitor (HTTPS with the agent's CA, a service account's
//! bearer token from a file, `honor_labels`, `/metrics/cadvisor` and `/metrics/resource`).
//! Prometheus' query API must show every job up, each service account's series only in its
//! own namespace, and no node-level series for them, while a job with `all` sees everything
//! (so the negative checks can fail). Once in front of kubelet-sim, once in front of the
//! local cluster's real kubelet.
//!
//! Protobuf: Prometheus with `--enable-feature=native-histograms` asks for the protobuf
//! exposition first; through the agent it gets it filtered (a native histogram only protobuf
//! carries is queryable, of its own namespace only), from a protobuf upstream and from the real
//! kubelet, whose answers are also decoded here with prost. Text with UTF-8 names is negotiated
//! down to escaped names, and the upstream's Content-Type reaches the caller as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

#[path = "../../node-agent/tests/support/metrics_proto.rs"]
mod pb;

use nodegate_agent::authn::{Authenticator, AuthnSettings, TokenReviewer};
use nodegate_agent::config::ConfigStore;
use nodegate_agent::metrics::Metrics;
use nodegate_agent::server::{self, Components, Running, Settings};
use nodegate_agent::tls::{ReloadingTls, TlsSettings};
use nodegate_agent::upstream::{Upstream, UpstreamSettings};
use nodegate_crds::policy::SubjectKind;
use nodegate_crds::{AgentRule, Endpoint, Port, Subject};
use nodegate_tests::Cluster;
use nodegate_tests::sim::{Sim, SimOptions};
use rcgen::{CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// How long results may take to show up in Prometheus.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Prometheus' own series, which every job has and which carry no namespace.
const SYNTHETIC: &str = "up|scrape_duration_seconds|scrape_samples_scraped|scrape_samples_post_metric_relabeling|scrape_series_added";

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

/// The agent's serving certificate, signed by a test CA Prometheus trusts (`ca_file`), so the
/// scrape verifies the agent as kube-prometheus verifies a kubelet.
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
        .push(DnType::CommonName, "nodegate-test-serving-ca");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
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

/// The agent in-process with the test CA's serving certificate.
async fn start_agent_serving(
    upstream: UpstreamSettings,
    pki: &ServingPki,
    reviewer: Arc<dyn TokenReviewer>,
    rules: Vec<AgentRule>,
) -> Running {
    let tls = ReloadingTls::new(TlsSettings {
        cert_file: Some(pki.cert_file.clone()),
        key_file: Some(pki.key_file.clone()),
        client_ca_file: None,
        node_name: "prometheus-node".into(),
        node_ips: vec!["127.0.0.1".parse().unwrap()],
        alpn_protocols: vec![b"http/1.1".to_vec()],
    })
    .unwrap();
    let authenticator = Authenticator::new(reviewer, AuthnSettings::default());
    let config = ConfigStore::new();
    config.publish(spec_of(rules));
    server::start(
        Settings::loopback("prometheus-node"),
        Components {
            tls,
            authenticator,
            config,
            upstream: Upstream::new(&upstream).unwrap(),
            access_reviewer: None,
            metrics: Metrics::new(),
        },
    )
    .await
    .unwrap()
}

/// One scrape job: name, path, token file.
struct Job {
    name: String,
    path: &'static str,
    token_file: PathBuf,
}

fn scrape_config(target: SocketAddr, ca_file: &Path, jobs: &[Job]) -> String {
    let q = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap();
    let mut yaml =
        String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
    for job in jobs {
        yaml.push_str(&format!(
            "  - job_name: {name}\n    scheme: https\n    metrics_path: {path}\n    honor_labels: true\n    \
             tls_config:\n      ca_file: {ca}\n    authorization:\n      credentials_file: {token}\n    \
             static_configs:\n      - targets: ['{target}']\n",
            name = job.name,
            path = job.path,
            ca = q(ca_file),
            token = q(&job.token_file),
        ));
    }
    yaml
}

/// A Prometheus server as a child process, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

fn prometheus_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMETHEUS") {
        return PathBuf::from(p);
    }
    let debian = PathBuf::from("/usr/bin/prometheus");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("prometheus")
    }
}

impl Prometheus {
    async fn start(config: &str) -> Prometheus {
        Prometheus::start_with(config, &[]).await
    }

    async fn start_with(config: &str, args: &[&str]) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config_file = dir.0.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect(
                "prometheus (Debian package `prometheus`, see .ci/install-deps) must be installed",
            );
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = request(addr, false, &Cred::None, "GET", "/-/ready", &[]).await
                && r.status == 200
            {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 30 s: {}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.0.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query: (labels, value) per series.
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
        assert_eq!(doc["status"], "success", "{promql}: {doc}");
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
                let value = s["value"][1].as_str().unwrap().parse().unwrap();
                (labels, value)
            })
            .collect()
    }

    /// Polls `promql` until `done` holds for its result, up to [`QUERY_TIMEOUT`].
    async fn wait_for(
        &self,
        promql: &str,
        done: impl Fn(&[(BTreeMap<String, String>, f64)]) -> bool,
    ) -> Vec<(BTreeMap<String, String>, f64)> {
        let deadline = Instant::now() + QUERY_TIMEOUT;
        loop {
            let result = self.query(promql).await;
            if done(&result) {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: still {result:?} after {QUERY_TIMEOUT:?}; prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until every job's `up` has been 1 (a scrape that times out now and then on a
    /// busy machine must not hide the others' success).
    async fn wait_all_up(&self, jobs: &[Job]) {
        let expected: BTreeSet<String> = jobs.iter().map(|j| j.name.clone()).collect();
        self.wait_for("max_over_time(up[5m]) == 1", |r| {
            let up: BTreeSet<String> = r.iter().map(|(l, _)| l["job"].clone()).collect();
            up == expected
        })
        .await;
    }

    /// The `namespace` values of `count by (namespace) (<selector>)`, once non-empty
    /// (an empty string for series without one).
    async fn namespaces_of(&self, selector: &str) -> BTreeSet<String> {
        let r = self
            .wait_for(&format!("count by (namespace) ({selector})"), |r| {
                !r.is_empty()
            })
            .await;
        r.iter()
            .map(|(l, _)| l.get("namespace").cloned().unwrap_or_default())
            .collect()
    }

    /// Number of non-synthetic series of `job` without a namespace.
    async fn node_level_series(&self, job: &str) -> f64 {
        let r = self
            .query(&format!(
                "count({{job=\"{job}\", namespace=\"\", __name__!~\"{SYNTHETIC}\"}})"
            ))
            .await;
        r.first().map(|(_, v)| *v).unwrap_or(0.0)
    }

    async fn scalar(&self, promql: &str) -> f64 {
        let r = self.wait_for(promql, |r| !r.is_empty()).await;
        r[0].1
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn service_account(namespace: &str, name: &str) -> Subject {
    Subject {
        kind: SubjectKind::ServiceAccount,
        name: name.into(),
        namespace: Some(namespace.into()),
    }
}

/// Service accounts a, b and root: (reviewer, subjects, tokens). With a cluster, real service
/// accounts reviewed by the API server's TokenReview; without one (local runs only), a fake
/// review of the same user names.
async fn identities(
    cluster: Option<&Cluster>,
) -> (
    Arc<dyn TokenReviewer>,
    Option<nodegate_tests::TestNamespace>,
    [(Subject, String); 3],
) {
    let names = ["prom-a", "prom-b", "prom-root"];
    match cluster {
        Some(cluster) => {
            let ns = cluster.namespace("prom-sa").await.unwrap();
            let mut out = Vec::new();
            for name in names {
                let token = service_account_token(cluster, ns.name(), name).await;
                out.push((service_account(ns.name(), name), token));
            }
            let reviewer = Arc::new(nodegate_agent::authn::KubeTokenReviewer::new(
                cluster.admin().unwrap(),
            ));
            (reviewer, Some(ns), out.try_into().unwrap())
        }
        None => {
            let mut tokens = BTreeMap::new();
            let mut out = Vec::new();
            for name in names {
                let token = format!("token-{name}-{}", rand_suffix());
                tokens.insert(
                    token.clone(),
                    (
                        format!("system:serviceaccount:prom:{name}"),
                        vec!["system:serviceaccounts".into()],
                    ),
                );
                out.push((service_account("prom", name), token));
            }
            (
                Arc::new(FakeReviewer(tokens)),
                None,
                out.try_into().unwrap(),
            )
        }
    }
}

fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let file = dir.join(format!("{name}.token"));
    std::fs::write(&file, token).unwrap();
    file
}

#[tokio::test]
async fn prometheus_through_the_agent_sees_only_its_namespaces_on_kubelet_sim() {
    let sim = Sim::start(SimOptions {
        node_name: "prometheus-node".into(),
        pods: 12,
        namespaces: vec![
            "ns-a".into(),
            "ns-b".into(),
            "ns-c".into(),
            "kube-system".into(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let cluster = Cluster::get().await.unwrap();
    if cluster.is_none() {
        eprintln!("no test cluster: service account tokens are reviewed by a fake TokenReview");
    }
    let (reviewer, _sa_namespace, [(sa_a, tok_a), (sa_b, tok_b), (sa_root, tok_root)]) =
        identities(cluster.as_ref()).await;
    let dir = TempDir::new("prometheus-sim");
    let pki = serving_pki(&dir.0);
    let scrape = [Endpoint::Cadvisor, Endpoint::Resource];
    let rules = vec![
        rule(
            "a",
            vec![sa_a],
            &scrape,
            namespaces(&["ns-a"]),
            &[Port::Secure],
        ),
        rule(
            "b",
            vec![sa_b],
            &scrape,
            namespaces(&["ns-b"]),
            &[Port::Secure],
        ),
        rule(
            "root",
            vec![sa_root],
            &scrape,
            all_namespaces(),
            &[Port::Secure],
        ),
    ];
    let agent = start_agent_serving(
        UpstreamSettings::new(sim.url().parse().unwrap()),
        &pki,
        reviewer,
        rules,
    )
    .await;
    let (ta, tb, troot) = (
        write_token(&dir.0, "a", &tok_a),
        write_token(&dir.0, "b", &tok_b),
        write_token(&dir.0, "root", &tok_root),
    );
    let job = |name: &str, path, token_file: &PathBuf| Job {
        name: name.into(),
        path,
        token_file: token_file.clone(),
    };
    let jobs = [
        job("a-cadvisor", "/metrics/cadvisor", &ta),
        job("a-resource", "/metrics/resource", &ta),
        job("b-cadvisor", "/metrics/cadvisor", &tb),
        job("b-resource", "/metrics/resource", &tb),
        job("root-cadvisor", "/metrics/cadvisor", &troot),
    ];
    let prometheus =
        Prometheus::start(&scrape_config(agent.secure_addr, &pki.ca_file, &jobs)).await;
    prometheus.wait_all_up(&jobs).await;

    // The job with `all` sees every namespace and the node-level series: the data has what
    // the filtered jobs must not see.
    let root = prometheus
        .namespaces_of("container_cpu_usage_seconds_total{job=\"root-cadvisor\"}")
        .await;
    for ns in ["ns-a", "ns-b", "ns-c", "kube-system", ""] {
        assert!(root.contains(ns), "root sees {root:?}, not {ns:?}");
    }
    assert!(prometheus.node_level_series("root-cadvisor").await > 0.0);

    let one = |ns: &str| BTreeSet::from([ns.to_string()]);
    for (job, ns) in [("a", "ns-a"), ("b", "ns-b")] {
        let cadvisor = prometheus
            .namespaces_of(&format!(
                "container_cpu_usage_seconds_total{{job=\"{job}-cadvisor\"}}"
            ))
            .await;
        assert_eq!(cadvisor, one(ns), "{job}-cadvisor");
        let all_cadvisor = prometheus
            .namespaces_of(&format!(
                "{{job=\"{job}-cadvisor\", __name__!~\"{SYNTHETIC}\"}}"
            ))
            .await;
        assert_eq!(all_cadvisor, one(ns), "{job}-cadvisor, every family");
        let resource = prometheus
            .namespaces_of(&format!(
                "{{job=\"{job}-resource\", __name__!~\"{SYNTHETIC}\"}}"
            ))
            .await;
        assert_eq!(resource, one(ns), "{job}-resource");
        for path in ["cadvisor", "resource"] {
            assert_eq!(
                prometheus.node_level_series(&format!("{job}-{path}")).await,
                0.0,
                "{job}-{path} has node-level series"
            );
        }
        // Nothing of the namespace is lost: as many series as the `all` job has for it.
        let filtered = prometheus
            .scalar(&format!(
                "count(container_cpu_usage_seconds_total{{job=\"{job}-cadvisor\"}})"
            ))
            .await;
        let unfiltered = prometheus
            .scalar(&format!(
                "count(container_cpu_usage_seconds_total{{job=\"root-cadvisor\", namespace=\"{ns}\"}})"
            ))
            .await;
        assert_eq!(filtered, unfiltered, "{job}: series of {ns}");
    }
}

#[tokio::test]
async fn prometheus_through_the_agent_sees_only_its_namespace_on_the_real_kubelet() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let Some(state) = cluster.local_state_dir().unwrap() else {
        return;
    };
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let (ns_a, ns_b) = two_namespaces_running(
        &cluster,
        ("prom-a", "prom-b"),
        "busy",
        &["sh", "-c", "while true; do :; done"],
    )
    .await;
    step("pods running");
    let (a, b) = (ns_a.name().to_string(), ns_b.name().to_string());
    let tok_a = service_account_token(&cluster, &a, "scraper").await;
    let tok_root = service_account_token(&cluster, &b, "root-scraper").await;
    let dir = TempDir::new("prometheus-kubelet");
    let pki = serving_pki(&dir.0);
    let rules = vec![
        rule(
            "a",
            vec![service_account(&a, "scraper")],
            &[Endpoint::Cadvisor],
            namespaces(&[&a]),
            &[Port::Secure],
        ),
        rule(
            "root",
            vec![service_account(&b, "root-scraper")],
            &[Endpoint::Cadvisor],
            all_namespaces(),
            &[Port::Secure],
        ),
    ];
    let reviewer = Arc::new(nodegate_agent::authn::KubeTokenReviewer::new(
        cluster.admin().unwrap(),
    ));
    let agent = start_agent_serving(
        kubelet_upstream(&state, &node_ip(&cluster).await),
        &pki,
        reviewer,
        rules,
    )
    .await;
    let jobs = [
        Job {
            name: "kubelet-a-cadvisor".into(),
            path: "/metrics/cadvisor",
            token_file: write_token(&dir.0, "a", &tok_a),
        },
        Job {
            name: "kubelet-root-cadvisor".into(),
            path: "/metrics/cadvisor",
            token_file: write_token(&dir.0, "root", &tok_root),
        },
    ];
    let prometheus =
        Prometheus::start(&scrape_config(agent.secure_addr, &pki.ca_file, &jobs)).await;
    prometheus.wait_all_up(&jobs).await;
    step("both jobs up");

    // Unfiltered, the kubelet reports both pods and node-level cgroups.
    let selector =
        |job: &str| format!("container_cpu_usage_seconds_total{{job=\"{job}\", pod=\"busy\"}}");
    let root = prometheus
        .wait_for(
            &format!(
                "count by (namespace) ({})",
                selector("kubelet-root-cadvisor")
            ),
            |r| r.len() >= 2,
        )
        .await;
    let root: BTreeSet<String> = root.iter().map(|(l, _)| l["namespace"].clone()).collect();
    assert!(root.contains(&a) && root.contains(&b), "{root:?}");
    assert!(prometheus.node_level_series("kubelet-root-cadvisor").await > 0.0);
    step("root job sees both namespaces");
    // Both jobs scrape every second: a few more scrapes of the filtered job, so what it would
    // leak of namespace b (present upstream now) is in Prometheus before the negative checks.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Filtered: the busy pod of namespace a, nothing of b, nothing node-level.
    let busy = prometheus
        .namespaces_of(&selector("kubelet-a-cadvisor"))
        .await;
    assert_eq!(busy, BTreeSet::from([a.clone()]));
    let every = prometheus
        .namespaces_of(&format!(
            "{{job=\"kubelet-a-cadvisor\", __name__!~\"{SYNTHETIC}\"}}"
        ))
        .await;
    assert_eq!(every, BTreeSet::from([a.clone()]));
    assert_eq!(
        prometheus.node_level_series("kubelet-a-cadvisor").await,
        0.0
    );
    step("filtered job sees only its namespace");
}

/// What Prometheus 2.42 sends with `--enable-feature=native-histograms` (scrape.go).
const PROMETHEUS_PROTOBUF_ACCEPT: &str = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

const PROTOBUF_CONTENT_TYPE: &str = "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited; escaping=underscores";

/// A gauge and a native histogram (schema 0, a zero bucket and two positive buckets) for each
/// namespace: what an exporter with native histograms serves over protobuf only.
fn native_families(namespaces: &[&str]) -> Vec<pb::MetricFamily> {
    let labels = |ns: &str| {
        vec![
            pb::LabelPair {
                name: Some("namespace".into()),
                value: Some(ns.into()),
            },
            pb::LabelPair {
                name: Some("pod".into()),
                value: Some("p".into()),
            },
        ]
    };
    vec![
        pb::MetricFamily {
            name: Some("fake_up".into()),
            help: Some("One per namespace.".into()),
            r#type: Some(1),
            metric: namespaces
                .iter()
                .map(|ns| pb::Metric {
                    label: labels(ns),
                    gauge: Some(pb::Gauge { value: Some(1.0) }),
                    ..Default::default()
                })
                .collect(),
            unit: None,
        },
        pb::MetricFamily {
            name: Some("fake_latency_seconds".into()),
            help: Some("A native histogram.".into()),
            r#type: Some(4),
            metric: namespaces
                .iter()
                .map(|ns| pb::Metric {
                    label: labels(ns),
                    histogram: Some(pb::Histogram {
                        sample_count: Some(5),
                        sample_sum: Some(2.5),
                        schema: Some(0),
                        zero_threshold: Some(1e-128),
                        zero_count: Some(1),
                        positive_span: vec![pb::BucketSpan {
                            offset: Some(0),
                            length: Some(2),
                        }],
                        positive_delta: vec![2, 0],
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            unit: None,
        },
    ]
}

/// The same series as text 0.0.4 (no native histogram: text cannot carry one).
fn native_families_text(namespaces: &[&str]) -> String {
    let mut out = String::from("# HELP fake_up One per namespace.\n# TYPE fake_up gauge\n");
    for ns in namespaces {
        out.push_str(&format!("fake_up{{namespace=\"{ns}\",pod=\"p\"}} 1\n"));
    }
    out
}

#[tokio::test]
async fn prometheus_with_native_histograms_gets_filtered_protobuf_through_the_agent() {
    let served = ["ns-a", "ns-b"];
    let accepts = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = accepts.clone();
    let kubelet = fake_kubelet(move |req: http::Request<hyper::body::Incoming>| {
        let accept = req
            .headers()
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        seen.lock().unwrap().push(accept.clone());
        let (content_type, body) = if accept.starts_with("application/vnd.google.protobuf") {
            (
                PROTOBUF_CONTENT_TYPE,
                pb::encode_stream(&native_families(&served)),
            )
        } else {
            (
                "text/plain; version=0.0.4; charset=utf-8; escaping=underscores",
                native_families_text(&served).into_bytes(),
            )
        };
        http::Response::builder()
            .header("content-type", content_type)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    })
    .await;
    let tokens = BTreeMap::from([
        (
            "token-a".to_string(),
            (
                "scraper-a".to_string(),
                vec!["system:authenticated".to_string()],
            ),
        ),
        (
            "token-root".to_string(),
            ("scraper-root".to_string(), vec![]),
        ),
    ]);
    let rules = vec![
        rule(
            "a",
            vec![user("scraper-a")],
            &[Endpoint::Cadvisor],
            namespaces(&["ns-a"]),
            &[Port::Secure],
        ),
        rule(
            "root",
            vec![user("scraper-root")],
            &[Endpoint::Cadvisor],
            all_namespaces(),
            &[Port::Secure],
        ),
    ];
    let dir = TempDir::new("prometheus-protobuf");
    let pki = serving_pki(&dir.0);
    let agent = start_agent_serving(
        http_upstream(kubelet),
        &pki,
        Arc::new(FakeReviewer(tokens)),
        rules,
    )
    .await;

    // A direct scrape with Prometheus' Accept: protobuf, the upstream's Content-Type, ns-a only.
    let r = request(
        agent.secure_addr,
        true,
        &Cred::Token("token-a".into()),
        "GET",
        "/metrics/cadvisor",
        &[("accept", PROMETHEUS_PROTOBUF_ACCEPT)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["content-type"], PROTOBUF_CONTENT_TYPE);
    let families = pb::decode_stream(&r.body).unwrap();
    assert_eq!(families, native_families(&["ns-a"]));
    assert!(
        accepts.lock().unwrap()[0].starts_with("application/vnd.google.protobuf"),
        "{:?}",
        accepts.lock().unwrap()
    );

    let jobs = [
        Job {
            name: "proto-a".into(),
            path: "/metrics/cadvisor",
            token_file: write_token(&dir.0, "a", "token-a"),
        },
        Job {
            name: "proto-root".into(),
            path: "/metrics/cadvisor",
            token_file: write_token(&dir.0, "root", "token-root"),
        },
    ];
    let prometheus = Prometheus::start_with(
        &scrape_config(agent.secure_addr, &pki.ca_file, &jobs),
        &["--enable-feature=native-histograms"],
    )
    .await;
    prometheus.wait_all_up(&jobs).await;
    // The native histogram arrived (only protobuf carries it), for every namespace unfiltered.
    let root = prometheus
        .wait_for(
            "count by (namespace) (histogram_count(fake_latency_seconds{job=\"proto-root\"}))",
            |r| r.len() == 2,
        )
        .await;
    assert_eq!(root.len(), 2, "{root:?}");
    let a = prometheus
        .namespaces_of("histogram_count(fake_latency_seconds{job=\"proto-a\"})")
        .await;
    assert_eq!(a, BTreeSet::from(["ns-a".to_string()]));
    assert_eq!(
        prometheus
            .scalar("histogram_count(fake_latency_seconds{job=\"proto-a\"})")
            .await,
        5.0
    );
    let every = prometheus
        .namespaces_of(&format!("{{job=\"proto-a\", __name__!~\"{SYNTHETIC}\"}}"))
        .await;
    assert_eq!(every, BTreeSet::from(["ns-a".to_string()]));
    // Every scrape of the agent asked the upstream for protobuf.
    let accepts = accepts.lock().unwrap().clone();
    assert!(accepts.len() >= 3, "{accepts:?}");
    assert!(
        accepts
            .iter()
            .filter(|a| !a.starts_with("application/vnd.google.protobuf"))
            .count()
            == 0,
        "{accepts:?}"
    );
}

#[tokio::test]
async fn text_with_utf8_names_is_negotiated_down_and_never_leaks() {
    // Like a Prometheus client library: UTF-8 names only when asked for `escaping=allow-utf-8`.
    let utf8 = |_: &str| {
        (
            "text/plain; version=1.0.0; charset=utf-8; escaping=allow-utf-8",
            "# TYPE \"metric.name\" counter\n{\"metric.name\",namespace=\"ns-a\"} 1\n{\"metric.name\",namespace=\"ns-b\"} 2\n",
        )
    };
    let negotiating = fake_kubelet(move |req: http::Request<hyper::body::Incoming>| {
        let accept = req
            .headers()
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let (content_type, body) = if accept.contains("allow-utf-8") {
            utf8(&accept)
        } else {
            (
                "text/plain; version=0.0.4; charset=utf-8; escaping=underscores",
                "# TYPE metric_name counter\nmetric_name{namespace=\"ns-a\"} 1\nmetric_name{namespace=\"ns-b\"} 2\n",
            )
        };
        http::Response::builder()
            .header("content-type", content_type)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    })
    .await;
    let stubborn = fake_kubelet(move |_req: http::Request<hyper::body::Incoming>| {
        let (content_type, body) = utf8("");
        http::Response::builder()
            .header("content-type", content_type)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    })
    .await;
    let tokens = BTreeMap::from([("token-a".to_string(), ("scraper-a".to_string(), vec![]))]);
    let rules = || {
        vec![rule(
            "a",
            vec![user("scraper-a")],
            &[Endpoint::Cadvisor],
            namespaces(&["ns-a"]),
            &[Port::Secure],
        )]
    };
    let dir = TempDir::new("prometheus-utf8");
    let pki = serving_pki(&dir.0);
    // Prometheus 3's Accept.
    let accept = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let agent = start_agent_serving(
        http_upstream(negotiating),
        &pki,
        Arc::new(FakeReviewer(tokens.clone())),
        rules(),
    )
    .await;
    let r = request(
        agent.secure_addr,
        true,
        &Cred::Token("token-a".into()),
        "GET",
        "/metrics/cadvisor",
        &[("accept", accept)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8; escaping=underscores"
    );
    assert_eq!(
        r.text(),
        "# TYPE metric_name counter\nmetric_name{namespace=\"ns-a\"} 1\n"
    );
    // An upstream that answers with UTF-8 names anyway is refused, not relayed.
    let agent = start_agent_serving(
        http_upstream(stubborn),
        &pki,
        Arc::new(FakeReviewer(tokens)),
        rules(),
    )
    .await;
    let r = request(
        agent.secure_addr,
        true,
        &Cred::Token("token-a".into()),
        "GET",
        "/metrics/cadvisor",
        &[("accept", accept)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(!r.text().contains("ns-b"));
}

/// node-1's real kubelet (1.37, `NativeHistograms` beta and on) through the agent over
/// protobuf: filtered per namespace (decoded with prost, and as Prometheus stores it), and
/// the kubelet's own native histograms reach Prometheus as native histograms
/// (`histogram_count` answers only for those).
#[tokio::test]
async fn real_kubelet_protobuf_is_filtered_and_prometheus_with_native_histograms_stores_only_its_namespace()
 {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let Some(state) = cluster.local_state_dir().unwrap() else {
        return;
    };
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let (ns_a, ns_b) = two_namespaces_running(
        &cluster,
        ("proto-a", "proto-b"),
        "busy",
        &["sh", "-c", "while true; do :; done"],
    )
    .await;
    step("pods running");
    let (a, b) = (ns_a.name().to_string(), ns_b.name().to_string());
    let tok_a = service_account_token(&cluster, &a, "scraper").await;
    let tok_root = service_account_token(&cluster, &b, "root-scraper").await;
    let dir = TempDir::new("prometheus-kubelet-proto");
    let pki = serving_pki(&dir.0);
    let rules = vec![
        rule(
            "a",
            vec![service_account(&a, "scraper")],
            &[Endpoint::Cadvisor, Endpoint::Resource],
            namespaces(&[&a]),
            &[Port::Secure],
        ),
        rule(
            "root",
            vec![service_account(&b, "root-scraper")],
            &[Endpoint::Cadvisor, Endpoint::Resource, Endpoint::Metrics],
            all_namespaces(),
            &[Port::Secure],
        ),
    ];
    let reviewer = Arc::new(nodegate_agent::authn::KubeTokenReviewer::new(
        cluster.admin().unwrap(),
    ));
    let agent = start_agent_serving(
        kubelet_upstream(&state, &node_ip(&cluster).await),
        &pki,
        reviewer,
        rules,
    )
    .await;
    step("agent started");

    // Direct: the kubelet's protobuf through the agent, decoded with prost.
    for path in ["/metrics/cadvisor", "/metrics/resource"] {
        let get = |token: &str, gzip: bool| {
            let token = token.to_string();
            let addr = agent.secure_addr;
            async move {
                let mut headers = vec![("accept", PROMETHEUS_PROTOBUF_ACCEPT)];
                if gzip {
                    headers.push(("accept-encoding", "gzip"));
                }
                request(addr, true, &Cred::Token(token), "GET", path, &headers)
                    .await
                    .unwrap()
            }
        };
        let root = get(&tok_root, false).await;
        assert_eq!(root.status, 200, "{path}: {}", root.text());
        assert_eq!(
            root.headers["content-type"], PROTOBUF_CONTENT_TYPE,
            "{path}"
        );
        let root_families = pb::decode_stream(&root.body).unwrap();
        let of = |families: &[pb::MetricFamily], ns: &str| {
            families
                .iter()
                .flat_map(|f| &f.metric)
                .filter(|m| m.label_value("namespace") == Some(ns))
                .count()
        };
        assert!(
            of(&root_families, &a) > 0 && of(&root_families, &b) > 0,
            "{path}: root sees both"
        );

        let filtered = get(&tok_a, false).await;
        assert_eq!(filtered.status, 200, "{path}: {}", filtered.text());
        // The kubelet's Content-Type, as the unfiltered answer has it.
        assert_eq!(
            filtered.headers["content-type"],
            root.headers["content-type"]
        );
        let families = pb::decode_stream(&filtered.body).unwrap();
        let metrics: Vec<&pb::Metric> = families.iter().flat_map(|f| &f.metric).collect();
        assert!(!metrics.is_empty(), "{path}");
        for m in &metrics {
            assert_eq!(
                m.label_value("namespace"),
                Some(a.as_str()),
                "{path}: {m:?}"
            );
        }
        // Nothing of a is lost (the two answers were taken a moment apart: the same series).
        assert_eq!(metrics.len(), of(&root_families, &a), "{path}");

        let gz = get(&tok_a, true).await;
        assert_eq!(gz.status, 200);
        assert_eq!(gz.headers["content-encoding"], "gzip");
        let mut plain = Vec::new();
        use tokio::io::AsyncReadExt;
        async_compression::tokio::bufread::GzipDecoder::new(&gz.body[..])
            .read_to_end(&mut plain)
            .await
            .unwrap();
        let families = pb::decode_stream(&plain).unwrap();
        assert!(
            families
                .iter()
                .flat_map(|f| &f.metric)
                .all(|m| m.label_value("namespace") == Some(a.as_str()))
        );
    }
    step("protobuf answers decoded");

    // The kubelet's own /metrics over protobuf carries native histograms (node-1's kubelet is
    // 1.37, whose NativeHistograms gate is beta and on): one with observations, by name.
    let own = request(
        agent.secure_addr,
        true,
        &Cred::Token(tok_root.clone()),
        "GET",
        "/metrics",
        &[("accept", PROMETHEUS_PROTOBUF_ACCEPT)],
    )
    .await
    .unwrap();
    assert_eq!(own.status, 200, "{}", own.text());
    let native: Vec<String> = pb::decode_stream(&own.body)
        .unwrap()
        .into_iter()
        .filter(|f| {
            f.metric.iter().any(|m| {
                m.histogram.as_ref().is_some_and(|h| {
                    h.schema.is_some() && !h.positive_span.is_empty() && h.sample_count() > 0
                })
            })
        })
        .filter_map(|f| f.name)
        .collect();
    assert!(
        native.iter().any(|n| n == NATIVE_HISTOGRAM),
        "the kubelet's native histograms with observations: {native:?}"
    );
    step("the kubelet serves native histograms");

    let jobs = [
        Job {
            name: "kubelet-proto-a".into(),
            path: "/metrics/cadvisor",
            token_file: write_token(&dir.0, "a", &tok_a),
        },
        Job {
            name: "kubelet-proto-root".into(),
            path: "/metrics/cadvisor",
            token_file: write_token(&dir.0, "root", &tok_root),
        },
        Job {
            name: "kubelet-own-root".into(),
            path: "/metrics",
            token_file: write_token(&dir.0, "root", &tok_root),
        },
    ];
    let prometheus = Prometheus::start_with(
        &scrape_config(agent.secure_addr, &pki.ca_file, &jobs),
        &["--enable-feature=native-histograms"],
    )
    .await;
    prometheus.wait_all_up(&jobs).await;
    step("both jobs up");
    let selector =
        |job: &str| format!("container_cpu_usage_seconds_total{{job=\"{job}\", pod=\"busy\"}}");
    // Other tests of this file run `busy` pods too (node-1's kubelet reports them all): wait
    // for this test's two namespaces, not for any two.
    let root = prometheus
        .wait_for(
            &format!("count by (namespace) ({})", selector("kubelet-proto-root")),
            |r| {
                let seen: BTreeSet<&str> = r
                    .iter()
                    .filter_map(|(l, _)| l.get("namespace").map(String::as_str))
                    .collect();
                seen.contains(a.as_str()) && seen.contains(b.as_str())
            },
        )
        .await;
    let root: BTreeSet<String> = root.iter().map(|(l, _)| l["namespace"].clone()).collect();
    assert!(root.contains(&a) && root.contains(&b), "{root:?}");
    assert!(prometheus.node_level_series("kubelet-proto-root").await > 0.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy = prometheus.namespaces_of(&selector("kubelet-proto-a")).await;
    assert_eq!(busy, BTreeSet::from([a.clone()]));
    let every = prometheus
        .namespaces_of(&format!(
            "{{job=\"kubelet-proto-a\", __name__!~\"{SYNTHETIC}\"}}"
        ))
        .await;
    assert_eq!(every, BTreeSet::from([a.clone()]));
    assert_eq!(prometheus.node_level_series("kubelet-proto-a").await, 0.0);
    step("filtered job sees only its namespace");

    // Stored as a native histogram: histogram_count() answers only for native samples.
    let native = prometheus
        .wait_for(
            &format!("histogram_count({NATIVE_HISTOGRAM}{{job=\"kubelet-own-root\"}})"),
            |r| r.iter().any(|(_, count)| *count > 0.0),
        )
        .await;
    assert!(!native.is_empty());
    step("a native histogram of the kubelet queried in Prometheus");
}

/// A histogram every kubelet observes while it is scraped (each request to it), so it always
/// has samples by the time the test asks.
const NATIVE_HISTOGRAM: &str = "kubelet_http_requests_duration_seconds";
