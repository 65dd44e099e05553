//! Shared by the agent's end-to-end tests (included with `#[path]`): a test PKI, a fake
//! TokenReview, an in-process agent, and a small HTTPS client that can present a client
//! certificate or a token.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use nodegate_agent::authn::{
    Authenticator, AuthnSettings, BoxFuture, ReviewOutcome, TokenReviewer,
};
use nodegate_agent::config::ConfigStore;
use nodegate_agent::metrics::Metrics;
use nodegate_agent::server::{self, Components, Running, Settings};
use nodegate_agent::tls::{ReloadingTls, TlsSettings};
use nodegate_agent::upstream::{Upstream, UpstreamSettings};
use nodegate_crds::policy::SubjectKind;
use nodegate_crds::{AgentRule, Endpoint, NodeAgentConfigSpec, Port, ResolvedNamespaces, Subject};
use nodegate_tests::sim::{Sim, SimOptions};
use rcgen::{CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// A client CA and the certificates it signs.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    pub dir: PathBuf,
    pub ca_file: PathBuf,
}

/// A client certificate and its key.
#[derive(Clone)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

impl ClientCert {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    orgs: &[&str],
    expired: bool,
) -> ClientCert {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    for o in orgs {
        params.distinguished_name.push(DnType::OrganizationName, *o);
    }
    if expired {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    ClientCert {
        chain: vec![cert.der().clone()],
        key_der: key.serialize_der(),
    }
}

impl Pki {
    pub fn new(label: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "nodegate-{label}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = ca("nodegate-test-client-ca");
        let ca_file = dir.join("client-ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Pki { ca, dir, ca_file }
    }

    pub fn client(&self, cn: &str, orgs: &[&str]) -> ClientCert {
        leaf(&self.ca, cn, orgs, false)
    }

    pub fn expired_client(&self, cn: &str, orgs: &[&str]) -> ClientCert {
        leaf(&self.ca, cn, orgs, true)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A certificate from a CA the agent does not trust.
pub fn foreign_client(cn: &str, orgs: &[&str]) -> ClientCert {
    leaf(&ca("somebody-else"), cn, orgs, false)
}

pub fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{nanos:x}")
}

/// Tokens the fake TokenReview knows: token → (user, groups).
pub struct FakeReviewer(pub BTreeMap<String, (String, Vec<String>)>);

impl TokenReviewer for FakeReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        _: &'a [String],
    ) -> BoxFuture<'a, Result<ReviewOutcome, String>> {
        Box::pin(async move {
            Ok(match self.0.get(token) {
                Some((name, groups)) => ReviewOutcome::Authenticated {
                    name: name.clone(),
                    uid: None,
                    groups: groups.clone(),
                    extra: BTreeMap::new(),
                    audiences: vec![],
                },
                None => ReviewOutcome::Refused,
            })
        })
    }
}

pub fn user(name: &str) -> Subject {
    Subject {
        kind: SubjectKind::User,
        name: name.into(),
        namespace: None,
    }
}

pub fn group(name: &str) -> Subject {
    Subject {
        kind: SubjectKind::Group,
        name: name.into(),
        namespace: None,
    }
}

pub fn namespaces(names: &[&str]) -> ResolvedNamespaces {
    let mut names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    names.sort();
    ResolvedNamespaces { all: false, names }
}

pub fn all_namespaces() -> ResolvedNamespaces {
    ResolvedNamespaces {
        all: true,
        names: vec![],
    }
}

pub fn rule(
    policy: &str,
    subjects: Vec<Subject>,
    endpoints: &[Endpoint],
    ns: ResolvedNamespaces,
    ports: &[Port],
) -> AgentRule {
    AgentRule {
        policy: policy.into(),
        subjects,
        endpoints: endpoints.to_vec(),
        namespaces: ns,
        ports: ports.to_vec(),
        metrics: None,
    }
}

pub fn spec_of(rules: Vec<AgentRule>) -> NodeAgentConfigSpec {
    let mut spec = NodeAgentConfigSpec::pack(&rules);
    spec.hash = "test".into();
    spec
}

/// An agent in-process, in front of `upstream`.
pub struct TestAgent {
    pub running: Running,
    pub config: ConfigStore,
}

pub async fn start_agent(
    node: &str,
    upstream: UpstreamSettings,
    pki: &Pki,
    tokens: BTreeMap<String, (String, Vec<String>)>,
    rules: Vec<AgentRule>,
) -> TestAgent {
    start_agent_with(
        node,
        upstream,
        pki.ca_file.clone(),
        Arc::new(FakeReviewer(tokens)),
        rules,
    )
    .await
}

/// An agent trusting `client_ca_file` and reviewing tokens with `reviewer`.
pub async fn start_agent_with(
    node: &str,
    upstream: UpstreamSettings,
    client_ca_file: PathBuf,
    reviewer: Arc<dyn TokenReviewer>,
    rules: Vec<AgentRule>,
) -> TestAgent {
    start_agent_mode(
        node,
        upstream,
        client_ca_file,
        reviewer,
        rules,
        server::AuthorizationMode::Policy,
        None,
    )
    .await
}

/// An agent in an authorization mode, with a SubjectAccessReview stand-in.
pub async fn start_agent_mode(
    node: &str,
    upstream: UpstreamSettings,
    client_ca_file: PathBuf,
    reviewer: Arc<dyn TokenReviewer>,
    rules: Vec<AgentRule>,
    mode: server::AuthorizationMode,
    access_reviewer: Option<Arc<dyn nodegate_agent::webhook::AccessReviewer>>,
) -> TestAgent {
    start_agent_configured(
        node,
        upstream,
        client_ca_file,
        reviewer,
        rules,
        access_reviewer,
        |s| s.authorization_mode = mode,
    )
    .await
}

/// An agent whose loopback [`Settings`] `configure` adjusts.
pub async fn start_agent_configured(
    node: &str,
    upstream: UpstreamSettings,
    client_ca_file: PathBuf,
    reviewer: Arc<dyn TokenReviewer>,
    rules: Vec<AgentRule>,
    access_reviewer: Option<Arc<dyn nodegate_agent::webhook::AccessReviewer>>,
    configure: impl FnOnce(&mut Settings),
) -> TestAgent {
    let tls = ReloadingTls::new(TlsSettings {
        cert_file: None,
        key_file: None,
        client_ca_file: Some(client_ca_file),
        node_name: node.into(),
        node_ips: vec!["127.0.0.1".parse().unwrap()],
        alpn_protocols: vec![b"http/1.1".to_vec()],
    })
    .unwrap();
    let authenticator = Authenticator::new(
        reviewer,
        AuthnSettings {
            x509_enabled: tls.client_ca_configured(),
            ..Default::default()
        },
    );
    let config = ConfigStore::new();
    config.publish(spec_of(rules));
    let mut settings = Settings::loopback(node);
    configure(&mut settings);
    let running = server::start(
        settings,
        Components {
            tls,
            authenticator,
            config: config.clone(),
            upstream: Upstream::new(&upstream).unwrap(),
            access_reviewer,
            metrics: Metrics::new(),
        },
    )
    .await
    .unwrap();
    TestAgent { running, config }
}

/// A client certificate from PEM (as the cluster harness returns them).
pub fn client_cert_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> ClientCert {
    use rustls_pki_types::pem::PemObject;
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem).unwrap();
    let key_der = match key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        other => panic!("expected a PKCS#8 key, got {other:?}"),
    };
    ClientCert { chain, key_der }
}

/// The agent's certificate is self-signed: the tests check the agent, not its serving cert.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A caller's credential.
#[derive(Clone)]
pub enum Cred {
    None,
    Token(String),
    Cert(ClientCert),
}

pub fn client_tls(cred: &Cred) -> tokio_rustls::TlsConnector {
    client_tls_alpn(cred, &[b"http/1.1"])
}

/// A TLS connector offering the ALPN protocols `alpn` (e.g. `h2` for an HTTP/2 client).
pub fn client_tls_alpn(cred: &Cred, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let mut config = match cred {
        Cred::Cert(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key())
            .unwrap(),
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// What came back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh connection. `Err` when the connection or TLS handshake failed.
pub async fn request(
    addr: SocketAddr,
    tls: bool,
    cred: &Cred,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "agent");
    if let Cred::Token(t) = cred {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    if tls {
        let stream = client_tls(cred)
            .connect(ServerName::try_from("agent").unwrap(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(hyper_util::rt::TokioIo::new(stream), req).await
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req).await
    }
}

async fn send<I>(io: I, req: http::Request<Empty<Bytes>>) -> Result<Reply, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes()
        .to_vec();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

// ---- the simulator world the in-process agent tests share ----

pub const NODE: &str = "sim-node";
pub const TEAM: &str = "team-a";
pub const OTHER: &str = "team-b";

pub async fn sim() -> Sim {
    Sim::start(SimOptions {
        node_name: NODE.into(),
        pods: 12,
        namespaces: vec![TEAM.into(), OTHER.into(), "kube-system".into()],
        ..Default::default()
    })
    .await
    .unwrap()
}

pub fn upstream_of(sim: &Sim) -> UpstreamSettings {
    UpstreamSettings::new(sim.url().parse().unwrap())
}

pub fn tokens() -> BTreeMap<String, (String, Vec<String>)> {
    let mut t = BTreeMap::new();
    t.insert(
        "tok-alice-1234567890".into(),
        (
            "alice".into(),
            vec!["team-a".into(), "system:authenticated".into()],
        ),
    );
    t.insert(
        "tok-root-1234567890".into(),
        ("root".into(), vec!["system:authenticated".into()]),
    );
    t.insert(
        "tok-bob-1234567890".into(),
        ("bob".into(), vec!["system:authenticated".into()]),
    );
    t.insert(
        "tok-reader-1234567890".into(),
        ("reader".into(), vec!["system:authenticated".into()]),
    );
    t
}

/// team-a may use every endpoint for its namespace; root everything everywhere; the reader
/// only reads (no exec); anonymous callers read pods, stats, cadvisor and health of
/// team-a on the read-only port.
pub fn rules() -> Vec<nodegate_crds::AgentRule> {
    let every: Vec<Endpoint> = Endpoint::all().collect();
    vec![
        rule(
            "team-a",
            vec![group("team-a")],
            &every,
            namespaces(&[TEAM]),
            &[Port::Secure],
        ),
        rule(
            "root",
            vec![user("root")],
            &every,
            all_namespaces(),
            &[Port::Secure],
        ),
        rule(
            "reader",
            vec![user("reader")],
            &[Endpoint::Pods, Endpoint::ContainerLogs],
            namespaces(&[TEAM]),
            &[Port::Secure],
        ),
        rule(
            "anonymous-read-only",
            vec![group("system:unauthenticated")],
            &[
                Endpoint::Pods,
                Endpoint::Stats,
                Endpoint::Cadvisor,
                Endpoint::Healthz,
            ],
            namespaces(&[TEAM]),
            &[Port::ReadOnly],
        ),
    ]
}

/// A service account in `namespace` and a bearer token for it (TokenRequest).
pub async fn service_account_token(
    cluster: &nodegate_tests::Cluster,
    namespace: &str,
    name: &str,
) -> String {
    let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(cluster.admin().unwrap(), namespace);
    let mut sa = k8s_openapi::api::core::v1::ServiceAccount::default();
    sa.metadata.name = Some(name.into());
    api.create(&kube::api::PostParams::default(), &sa)
        .await
        .unwrap();
    let request = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: Some(k8s_openapi::api::authentication::v1::TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued: k8s_openapi::api::authentication::v1::TokenRequest = api
        .create_subresource("token", name, &kube::api::PostParams::default(), &request)
        .await
        .unwrap();
    issued
        .status
        .unwrap()
        .token
        .expect("TokenRequest returned a token")
}

/// A raw TLS stream to the agent, for requests written by hand (upgrades).
pub async fn tls_stream(
    addr: std::net::SocketAddr,
    cred: &Cred,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    client_tls(cred)
        .connect(
            rustls_pki_types::ServerName::try_from("agent").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// node-1's InternalIP, where its kubelet listens.
pub async fn node_ip(cluster: &nodegate_tests::Cluster) -> String {
    let node = kube::Api::<k8s_openapi::api::core::v1::Node>::all(cluster.admin().unwrap())
        .get(nodegate_tests::cluster::NODE_NAME)
        .await
        .unwrap();
    node.status
        .unwrap()
        .addresses
        .unwrap()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .expect("node-1 has an InternalIP")
}

/// The kubelet as the agent reaches it on the local cluster.
pub fn kubelet_upstream(state: &std::path::Path, ip: &str) -> UpstreamSettings {
    let mut s = UpstreamSettings::new(format!("https://{ip}:10250").parse().unwrap());
    // The kubelet's self-signed certificate names the host, not the IP.
    s.ca_file = Some(state.join("kubelet/pki/kubelet.crt"));
    s.server_name = Some(nodegate_tests::cluster::NODE_NAME.into());
    s.client_cert_file = Some(state.join("pki/apiserver-kubelet-client.crt"));
    s.client_key_file = Some(state.join("pki/apiserver-kubelet-client.key"));
    s
}

/// A request target for every catalogue endpoint: pod `pod` and container `container` of
/// namespace `ns` where the path names them, `command` for exec and run.
pub fn endpoint_target(
    endpoint: Endpoint,
    ns: &str,
    pod: &str,
    container: &str,
    command: &str,
) -> String {
    match endpoint {
        Endpoint::Healthz => "/healthz".into(),
        Endpoint::Pods => "/pods".into(),
        Endpoint::RunningPods => "/runningpods/".into(),
        Endpoint::Stats => "/stats/summary".into(),
        Endpoint::Metrics => "/metrics".into(),
        Endpoint::Cadvisor => "/metrics/cadvisor".into(),
        Endpoint::Resource => "/metrics/resource".into(),
        Endpoint::Probes => "/metrics/probes".into(),
        Endpoint::Slis => "/metrics/slis".into(),
        Endpoint::Configz => "/configz".into(),
        Endpoint::Statusz => "/statusz".into(),
        Endpoint::Flagz => "/flagz".into(),
        Endpoint::Logs => "/logs/".into(),
        Endpoint::ContainerLogs => format!("/containerLogs/{ns}/{pod}/{container}?tailLines=5"),
        Endpoint::Exec => format!("/exec/{ns}/{pod}/{container}?command={command}&stdout=true"),
        Endpoint::Attach => format!("/attach/{ns}/{pod}/{container}?stdout=true"),
        Endpoint::PortForward => format!("/portForward/{ns}/{pod}?port=80"),
        Endpoint::Run => format!("/run/{ns}/{pod}/{container}?cmd={command}"),
        Endpoint::Checkpoint => format!("/checkpoint/{ns}/{pod}/{container}"),
        Endpoint::Pprof => "/debug/pprof/".into(),
        // An empty body: a real kubelet refuses it (400), so verbosity never changes.
        Endpoint::DebugFlags => "/debug/flags/v".into(),
    }
}

/// A free loopback port (bound, then released for the caller to bind).
/// A plain-HTTP "kubelet" on a free loopback port that answers every request with `answer`:
/// for tests that need an upstream the simulator cannot be (one that ignores negotiation,
/// or streams more than it holds).
pub async fn fake_kubelet<F, B>(answer: F) -> SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> http::Response<B>
        + Clone
        + Send
        + Sync
        + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let resp = answer(req);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// The agent's upstream settings for a plain-HTTP kubelet at `addr`.
pub fn http_upstream(addr: SocketAddr) -> UpstreamSettings {
    UpstreamSettings::new(format!("http://{addr}").parse().unwrap())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two fresh namespaces (`prefix_a-…`, `prefix_b-…`), each running a busybox pod `name` with
/// `command`, started together; returns once both pods run.
pub async fn two_namespaces_running(
    cluster: &nodegate_tests::Cluster,
    (prefix_a, prefix_b): (&str, &str),
    name: &str,
    command: &[&str],
) -> (nodegate_tests::TestNamespace, nodegate_tests::TestNamespace) {
    let ns_a = cluster.namespace(prefix_a).await.unwrap();
    let ns_b = cluster.namespace(prefix_b).await.unwrap();
    let pod = nodegate_tests::cluster::busybox_pod(name, command);
    let timeout = std::time::Duration::from_secs(120);
    let (pa, pb) = tokio::join!(ns_a.run_pod(&pod, timeout), ns_b.run_pod(&pod, timeout));
    pa.unwrap();
    pb.unwrap();
    (ns_a, ns_b)
}
