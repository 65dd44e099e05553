//! Authentication under attack, through a real agent in-process: client certificates the API
//! server would read as someone else (several CNs) or that the agent's verifier cannot take
//! (X.509 v1), presented with curl; a flood of random tokens from 64 connections while new
//! service-account tokens from the real API server still authenticate; and the
//! `nodegate_agent_authentications_total` causes an operator reads on /metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use nodegate_agent::authn::{BoxFuture, KubeTokenReviewer, ReviewOutcome, TokenReviewer};
use nodegate_tests::Cluster;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::*;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

// ---------------------------------------------------------------------------------------------
// helpers

/// Runs openssl in `dir`; panics with its stderr when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client CA made by openssl, and leaves signed by it: what an operator's PKI would hand out.
struct OpensslPki {
    dir: PathBuf,
}

impl OpensslPki {
    fn new(ca_name: &str) -> Self {
        let subj = format!("/CN={ca_name}");
        let dir = std::env::temp_dir().join(nodegate_tests::cluster::unique_name("authn-pki"));
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                &subj,
                "-days",
                "2",
            ],
        );
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        OpensslPki { dir }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A leaf for `subject` (openssl `-subj` form); `v3` adds the clientAuth extension (and so
    /// makes a v3 certificate), else openssl 3 makes a v1 one. Returns (cert, key) paths.
    fn leaf(&self, name: &str, subject: &str, v3: bool) -> (PathBuf, PathBuf) {
        let (crt, key, csr) = (
            format!("{name}.crt"),
            format!("{name}.key"),
            format!("{name}.csr"),
        );
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                subject,
            ],
        );
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-out",
            &crt,
            "-days",
            "1",
            "-set_serial",
            "7",
        ];
        if v3 {
            args.extend(["-extfile", "client.ext"]);
        }
        openssl(&self.dir, &args);
        let (crt, key) = (self.dir.join(crt), self.dir.join(key));
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&crt)
            .output()
            .unwrap();
        let version = if v3 { "Version: 3" } else { "Version: 1" };
        assert!(
            String::from_utf8_lossy(&text.stdout).contains(version),
            "openssl made the wrong version"
        );
        (crt, key)
    }
}

impl Drop for OpensslPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// curl against the agent: (HTTP status or 0, body, curl's exit code and stderr).
async fn curl(addr: SocketAddr, args: &[&str]) -> (u16, String, i32, String) {
    let body = std::env::temp_dir().join(nodegate_tests::cluster::unique_name("curl-body"));
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-k", "--max-time", "20", "-o"])
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(format!("https://{addr}/pods"))
        .output()
        .await
        .expect("curl runs");
    let text = std::fs::read_to_string(&body).unwrap_or_default();
    let _ = std::fs::remove_file(&body);
    (
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        text,
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn curl_cert(addr: SocketAddr, cert: &Path, key: &Path) -> (u16, String, i32, String) {
    curl(
        addr,
        &[
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    )
    .await
}

/// The agent's `nodegate_agent_authentications_total` samples, by `method/result/cause`.
async fn authentications(healthz: SocketAddr) -> BTreeMap<String, u64> {
    let reply = request(healthz, false, &Cred::None, "GET", "/metrics", &[])
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for line in reply.text().lines() {
        let Some(rest) = line.strip_prefix("nodegate_agent_authentications_total{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").unwrap();
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap()
        };
        out.insert(
            format!("{}/{}/{}", label("method"), label("result"), label("cause")),
            value.parse().unwrap(),
        );
    }
    out
}

/// A real TokenReview, counted.
struct Counting {
    inner: KubeTokenReviewer,
    total: AtomicUsize,
}

impl TokenReviewer for Counting {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<ReviewOutcome, String>> {
        self.total.fetch_add(1, Ordering::SeqCst);
        self.inner.review(token, audiences)
    }
}

fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn random_b64(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes.div_ceil(8))
        .flat_map(|_| random_u64().to_le_bytes())
        .take(bytes)
        .collect();
    URL_SAFE_NO_PAD.encode(raw)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A JWT-shaped token with these claims and a random signature.
fn jwt(claims: serde_json::Value) -> String {
    let header = serde_json::json!({"alg": "RS256", "kid": random_b64(12)});
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        random_b64(256)
    )
}

/// What a forger would send: a JWT that looks like a service-account token, unexpired.
fn random_service_account_jwt() -> String {
    let now = unix_now();
    jwt(serde_json::json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        "sub": format!("system:serviceaccount:default:{}", random_u64()),
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    }))
}

/// `n` distinct TokenRequest tokens of one new service account.
async fn fresh_tokens(cluster: &Cluster, namespace: &str, name: &str, n: usize) -> Vec<String> {
    let first = service_account_token(cluster, namespace, name).await;
    let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(cluster.admin().unwrap(), namespace);
    let request = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: Some(k8s_openapi::api::authentication::v1::TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut tokens = vec![first];
    while tokens.len() < n {
        let issued: k8s_openapi::api::authentication::v1::TokenRequest = api
            .create_subresource("token", name, &kube::api::PostParams::default(), &request)
            .await
            .unwrap();
        tokens.push(issued.status.unwrap().token.unwrap());
    }
    tokens
}

/// The cluster, or a failure: these tests are about the real API server and must not pass
/// without one (`NODEGATE_SKIP_CLUSTER=1` is the only way to skip, and says so).
async fn cluster() -> Option<Cluster> {
    let cluster = Cluster::get().await.expect("a cluster to test against");
    if cluster.is_none() {
        assert_eq!(
            std::env::var("NODEGATE_SKIP_CLUSTER").as_deref(),
            Ok("1"),
            "no cluster and not asked to skip"
        );
    }
    cluster
}

// ---------------------------------------------------------------------------------------------
// client certificates

#[tokio::test]
async fn certificates_the_api_server_would_read_differently_are_refused_with_401() {
    let pki = OpensslPki::new("authn-test-ca");
    let sim = sim().await;
    let agent = start_agent_with(
        NODE,
        upstream_of(&sim),
        pki.ca_file(),
        Arc::new(FakeReviewer(tokens())),
        rules(),
    )
    .await;
    let addr = agent.running.secure_addr;

    // Control: one CN in team-a, as openssl makes it, is served.
    let (crt, key) = pki.leaf("one", "/O=team-a/CN=alice", true);
    let (status, _, _, err) = curl_cert(addr, &crt, &key).await;
    assert_eq!(status, 200, "{err}");

    // Two CNs: Go's pkix.Name (the API server, the kubelet) keeps the last one, so the same
    // certificate would be `system:admin` there and `alice` to a first-CN reader. Refused.
    for (name, subject) in [
        ("two", "/O=team-a/CN=alice/CN=system:admin"),
        ("two-rev", "/O=team-a/CN=system:admin/CN=alice"),
        ("no-cn", "/O=team-a"),
    ] {
        let (crt, key) = pki.leaf(name, subject, true);
        let (status, body, code, err) = curl_cert(addr, &crt, &key).await;
        assert_eq!(
            (status, body.as_str()),
            (401, "Unauthorized"),
            "{subject}: {code} {err}"
        );
    }
    // X.509 v1, signed by the client CA: the kubelet accepts it, webpki does not. The
    // handshake is refused (never anonymous, never a 200) and the agent counts why.
    let (crt, key) = pki.leaf("v1", "/O=team-a/CN=alice", false);
    let (status, body, code, err) = curl_cert(addr, &crt, &key).await;
    assert_eq!(status, 0, "no HTTP answer for a v1 certificate: {body}");
    assert_ne!(code, 0);
    assert!(err.contains("alert"), "the TLS handshake is refused: {err}");

    // A certificate from another CA: refused at the handshake as before (`unknown_ca`); from
    // another CA that names itself as the trusted one: the signature fails
    // (`bad_certificate`).
    for (ca_name, name) in [("someone-else", "foreign"), ("authn-test-ca", "impostor")] {
        let other = OpensslPki::new(ca_name);
        let (crt, key) = other.leaf(name, "/O=team-a/CN=alice", true);
        let (status, _, code, err) = curl_cert(addr, &crt, &key).await;
        assert_eq!(status, 0, "{err}");
        assert_ne!(code, 0);
        assert!(err.contains("alert"), "the TLS handshake is refused: {err}");
    }

    let counted = authentications(agent.running.healthz_addr.unwrap()).await;
    let expected: BTreeMap<String, u64> = [
        ("x509/ok/ok", 1),
        ("x509/refused/bad_certificate", 4),
        ("x509/refused/x509_v1", 1),
        ("x509/refused/unknown_ca", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(counted, expected);
}

/// The real API server reads the last of two CNs (Go's `pkix.Name`): asked with curl who a
/// certificate from the cluster's own client CA with `CN=<alice>` then `CN=<mallory>` is, it
/// answers mallory. The agent, trusting the same CA, refuses that certificate (401), and
/// serves the one-CN certificate as the API server reads it.
#[tokio::test]
async fn the_api_server_reads_the_last_cn_so_the_agent_refuses_two() -> TestResult {
    let Some(cluster) = cluster().await else {
        return Ok(());
    };
    let Some(state) = cluster.local_state_dir()? else {
        return Ok(());
    };
    let (ca_crt, ca_key) = (state.join("pki/ca.crt"), state.join("pki/ca.key"));
    let pki = OpensslPki::new("unused");
    let (alice, mallory) = (
        nodegate_tests::cluster::unique_name("alice"),
        nodegate_tests::cluster::unique_name("mallory"),
    );
    // Signed by the cluster's client CA, as an operator holding it would.
    let sign = |name: &str, subject: &str| {
        let (crt, key, csr) = (
            pki.dir.join(format!("{name}.crt")),
            pki.dir.join(format!("{name}.key")),
            pki.dir.join(format!("{name}.csr")),
        );
        let s = |p: &Path| p.to_str().unwrap().to_string();
        openssl(
            &pki.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &s(&key),
                "-out",
                &s(&csr),
                "-subj",
                subject,
            ],
        );
        openssl(
            &pki.dir,
            &[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                &s(&ca_crt),
                "-CAkey",
                &s(&ca_key),
                "-out",
                &s(&crt),
                "-days",
                "1",
                "-set_serial",
                "9",
                "-extfile",
                "client.ext",
            ],
        );
        (crt, key)
    };
    let two = sign("two", &format!("/O=team-a/CN={alice}/CN={mallory}"));
    let one = sign("one", &format!("/O=team-a/CN={alice}"));

    // Who the API server says each certificate is (SelfSubjectReview, with curl).
    let server = cluster.admin_config().cluster_url.to_string();
    let whoami = |(crt, key): &(PathBuf, PathBuf)| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&ca_crt)
            .arg("--cert")
            .arg(crt)
            .arg("--key")
            .arg(key)
            .args(["-X", "POST", "-H", "Content-Type: application/json", "-d"])
            .arg(r#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#)
            .arg(format!(
                "{}/apis/authentication.k8s.io/v1/selfsubjectreviews",
                server.trim_end_matches('/')
            ))
            .output()
            .unwrap();
        let review: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        review["status"]["userInfo"]["username"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(whoami(&two), mallory, "the API server keeps the last CN");
    assert_eq!(whoami(&one), alice);

    let sim = sim().await;
    let agent = start_agent_with(
        NODE,
        upstream_of(&sim),
        ca_crt.clone(),
        Arc::new(FakeReviewer(tokens())),
        rules(),
    )
    .await;
    let addr = agent.running.secure_addr;
    let (status, body, code, err) = curl_cert(addr, &two.0, &two.1).await;
    assert_eq!(
        (status, body.as_str()),
        (401, "Unauthorized"),
        "{code} {err}"
    );
    let (status, _, _, err) = curl_cert(addr, &one.0, &one.1).await;
    assert_eq!(status, 200, "one CN in team-a is served: {err}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// tokens

#[tokio::test]
async fn each_token_refusal_is_counted_by_its_cause() -> TestResult {
    let Some(cluster) = cluster().await else {
        return Ok(());
    };
    let ns = cluster.namespace("authn-causes").await?;
    let good = service_account_token(&cluster, ns.name(), "causes").await;
    let reviewer = Arc::new(Counting {
        inner: KubeTokenReviewer::new(cluster.admin()?),
        total: AtomicUsize::new(0),
    });
    let pki = Pki::new("authn-causes");
    let sim = sim().await;
    let agent = start_agent_with(
        NODE,
        upstream_of(&sim),
        pki.ca_file.clone(),
        reviewer.clone(),
        rules(),
    )
    .await;
    let addr = agent.running.secure_addr;
    let now = unix_now();
    let cases: Vec<(String, &str)> = vec![
        (good.clone(), "ok"),
        (format!("not-a-token-{}", random_u64()), "invalid"),
        ("abc.def.ghi".into(), "malformed"),
        ("x".repeat(16 * 1024 + 1), "malformed"),
        ("a,b".into(), "malformed"),
        (jwt(serde_json::json!({"exp": now - 3600})), "expired"),
        (jwt(serde_json::json!({"nbf": now + 3600})), "not_yet_valid"),
    ];
    for (token, cause) in &cases {
        let reply = request(addr, true, &Cred::Token(token.clone()), "GET", "/pods", &[]).await?;
        if *cause == "ok" {
            assert_eq!(reply.status, 403, "authenticated, no policy for it");
        } else {
            assert_eq!(
                (reply.status, reply.text().as_str()),
                (401, "Unauthorized"),
                "{cause}"
            );
        }
    }
    let reply = request(
        addr,
        true,
        &Cred::None,
        "GET",
        "/pods",
        &[("authorization", "Basic YTpi")],
    )
    .await?;
    assert_eq!(reply.status, 401);
    // An agent whose API server is unreachable: the review fails, 401, never anonymous.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url: http::Uri = format!("https://{}", closed.local_addr()?).parse()?;
    drop(closed);
    let unreachable = kube::Client::try_from(kube::Config::new(url))?;
    let down = start_agent_with(
        NODE,
        upstream_of(&sim),
        pki.ca_file.clone(),
        Arc::new(KubeTokenReviewer::new(unreachable)),
        rules(),
    )
    .await;
    let reply = request(
        down.running.secure_addr,
        true,
        &Cred::Token(good.clone()),
        "GET",
        "/pods",
        &[],
    )
    .await?;
    assert_eq!((reply.status, reply.text().as_str()), (401, "Unauthorized"));
    assert_eq!(
        authentications(down.running.healthz_addr.unwrap()).await,
        [("token/refused/review_unavailable".to_string(), 1)].into()
    );
    // Only the two tokens that could be tokens were reviewed.
    assert_eq!(reviewer.total.load(Ordering::SeqCst), 2);
    let counted = authentications(agent.running.healthz_addr.unwrap()).await;
    let expected: BTreeMap<String, u64> = [
        ("token/ok/ok", 1),
        ("token/refused/invalid", 1),
        ("token/refused/malformed", 4),
        ("token/refused/expired", 1),
        ("token/refused/not_yet_valid", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(counted, expected);
    Ok(())
}

/// One request with `token` from source address `from` (another pod than the flood's), on a
/// fresh connection: the status.
async fn request_from(from: std::net::IpAddr, addr: SocketAddr, token: &str) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let stream = client_tls(&Cred::None)
        .connect(
            rustls_pki_types::ServerName::try_from("agent").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/pods")
        .header("host", "agent")
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// One flooding connection: HTTP/1.1 keep-alive, a new token per request until `stop`.
/// Returns (requests, requests answered 401 `Unauthorized`).
async fn flood_connection(
    addr: SocketAddr,
    token: fn() -> String,
    stop: Arc<AtomicBool>,
    max_requests: usize,
) -> (usize, usize) {
    let stream = tls_stream(addr, &Cred::None).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (mut sent, mut refused) = (0, 0);
    while !stop.load(Ordering::SeqCst) && sent < max_requests {
        let req = http::Request::get("/pods")
            .header("host", "agent")
            .header("authorization", format!("Bearer {}", token()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        sent += 1;
        if status == 401 && body.as_ref() == b"Unauthorized" {
            refused += 1;
        }
    }
    (sent, refused)
}

const FLOOD_CONNECTIONS: usize = 64;
const FRESH_TOKENS: usize = 40;

/// 64 connections from 127.0.0.1 flood random tokens of one kind for as long as it takes a
/// client on 127.0.0.2 (another pod) to authenticate 40 new service-account tokens one after
/// the other (bounded: 2,000 requests per connection). Checks: every flood request is 401,
/// the client's p99 is at most 1 s, and the TokenReviews sent stay within the documented
/// bound.
async fn flood(kind: &str, token: fn() -> String) -> TestResult {
    // One flood at a time: two at once on a small machine measure each other's CPU load.
    static ONE_FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _alone = ONE_FLOOD.lock().await;
    let Some(cluster) = cluster().await else {
        return Ok(());
    };
    let ns = cluster.namespace("authn-flood").await?;
    let fresh = fresh_tokens(&cluster, ns.name(), "steady", FRESH_TOKENS).await;
    let reviewer = Arc::new(Counting {
        inner: KubeTokenReviewer::new(cluster.admin()?),
        total: AtomicUsize::new(0),
    });
    let pki = Pki::new("authn-flood");
    let sim = sim().await;
    let agent = start_agent_with(
        NODE,
        upstream_of(&sim),
        pki.ca_file.clone(),
        reviewer.clone(),
        rules(),
    )
    .await;
    let addr = agent.running.secure_addr;
    let settings = nodegate_agent::authn::AuthnSettings::default();

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let flooders: Vec<_> = (0..FLOOD_CONNECTIONS)
        .map(|_| tokio::spawn(flood_connection(addr, token, stop.clone(), 2_000)))
        .collect();
    // Let the flood fill the queue first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut latencies = Vec::new();
    for token in &fresh {
        let t = Instant::now();
        let status = request_from([127, 0, 0, 2].into(), addr, token).await;
        latencies.push(t.elapsed());
        assert_eq!(
            status, 403,
            "the new token authenticates (no policy: 403), never 401"
        );
    }
    // Keep flooding for at least 5 s in all, so the bound is tested over a real stretch.
    tokio::time::sleep_until((started + Duration::from_secs(5)).into()).await;
    stop.store(true, Ordering::SeqCst);
    let (mut sent, mut refused) = (0, 0);
    for f in flooders {
        let (s, r) = f.await?;
        sent += s;
        refused += r;
    }
    let elapsed = started.elapsed();
    let reviews = reviewer.total.load(Ordering::SeqCst);
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
    // The bound docs/security.md states: review_burst + 1 + review_rate × seconds.
    let bound =
        settings.review_burst as f64 + 1.0 + settings.review_rate as f64 * elapsed.as_secs_f64();
    eprintln!(
        "{kind} flood: {sent} requests from {FLOOD_CONNECTIONS} connections in {elapsed:?}, \
         {refused} refused; {reviews} TokenReviews (bound {bound:.0}); new-token p99 {p99:?}, \
         max {:?}",
        latencies.last().unwrap()
    );
    assert_eq!(refused, sent, "every flood request is 401 Unauthorized");
    // The operator sees why: refused by the API server, or no review in time; nothing else.
    let counted = authentications(agent.running.healthz_addr.unwrap()).await;
    assert_eq!(counted.get("token/ok/ok"), Some(&(FRESH_TOKENS as u64)));
    let refusals: u64 = counted
        .iter()
        .filter(|(k, _)| k.starts_with("token/refused/"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(refusals, sent as u64, "{counted:?}");
    assert!(
        counted.keys().all(|k| [
            "token/ok/ok",
            "token/refused/invalid",
            "token/refused/review_busy"
        ]
        .contains(&k.as_str())),
        "{counted:?}"
    );
    assert!(sent >= FLOOD_CONNECTIONS, "the flood ran");
    assert!(p99 <= Duration::from_secs(1), "new-token p99 {p99:?}");
    assert!(
        (reviews as f64) <= bound,
        "{reviews} TokenReviews in {elapsed:?}, bound {bound:.0}"
    );
    Ok(())
}

#[tokio::test]
async fn random_jwt_flood_does_not_starve_new_service_account_tokens() -> TestResult {
    flood("JWT", random_service_account_jwt).await
}

#[tokio::test]
async fn random_opaque_token_flood_does_not_starve_new_service_account_tokens() -> TestResult {
    flood("opaque", || format!("{}.{}", random_b64(6), random_b64(24))).await
}

/// A reviewer that takes 200 ms per token, knows one, and records how many reviews ran at
/// once.
struct Slow {
    good: String,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl TokenReviewer for Slow {
    fn review<'a>(
        &'a self,
        token: &'a str,
        _: &'a [String],
    ) -> BoxFuture<'a, Result<ReviewOutcome, String>> {
        Box::pin(async move {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(if token == self.good {
                ReviewOutcome::Authenticated {
                    name: "bob".into(),
                    uid: None,
                    groups: vec![],
                    extra: BTreeMap::new(),
                    audiences: vec![],
                }
            } else {
                ReviewOutcome::Refused
            })
        })
    }
}

/// An HTTP/2 connection multiplexing 32 streams, each with a new token, holds one review at a
/// time (not 16, the agent's slots); its streams that cannot get a review within 2 s are 401
/// `review_busy`, none is anonymous; meanwhile another connection's new token is reviewed at
/// once.
#[tokio::test]
async fn an_http2_connection_holds_one_review_at_a_time() {
    use nodegate_agent::authn::{Authenticator, AuthnSettings};
    use nodegate_agent::tls::{ReloadingTls, TlsSettings};
    let reviewer = Arc::new(Slow {
        good: "good-token-for-bob".into(),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
    });
    let tls = ReloadingTls::new(TlsSettings {
        node_name: NODE.into(),
        node_ips: vec!["127.0.0.1".parse().unwrap()],
        alpn_protocols: TlsSettings::default_alpn(),
        ..Default::default()
    })
    .unwrap();
    let serving = tls.serving_certificate();
    let sim = sim().await;
    let config = nodegate_agent::config::ConfigStore::new();
    config.publish(spec_of(rules()));
    let running = nodegate_agent::server::start(
        nodegate_agent::server::Settings::loopback(NODE),
        nodegate_agent::server::Components {
            tls,
            authenticator: Authenticator::new(reviewer.clone(), AuthnSettings::default()),
            config,
            upstream: nodegate_agent::upstream::Upstream::new(&upstream_of(&sim)).unwrap(),
            access_reviewer: None,
            metrics: nodegate_agent::metrics::Metrics::new(),
        },
    )
    .await
    .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(serving).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(running.secure_addr)
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(rustls_pki_types::ServerName::try_from(NODE).unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let streams: Vec<_> = (0..32)
        .map(|i| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                let req = http::Request::get(format!("https://{NODE}/pods"))
                    .header("authorization", format!("Bearer junk-{i}-{}", random_u64()))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, body)
            })
        })
        .collect();
    // While they wait: another connection's new token goes through.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let other = request(
        running.secure_addr,
        true,
        &Cred::Token("good-token-for-bob".into()),
        "GET",
        "/pods",
        &[],
    )
    .await
    .unwrap();
    let other_took = t.elapsed();
    assert_eq!(
        other.status, 403,
        "bob is authenticated (and has no policy)"
    );
    for s in streams {
        let (status, body) = s.await.unwrap();
        assert_eq!((status, body.as_ref()), (401, &b"Unauthorized"[..]));
    }
    // At most one review for the HTTP/2 connection, plus the other connection's.
    let most = reviewer.max_in_flight.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} reviews at once");
    let counted = authentications(running.healthz_addr.unwrap()).await;
    let refused = counted.get("token/refused/invalid").copied().unwrap_or(0);
    let busy = counted
        .get("token/refused/review_busy")
        .copied()
        .unwrap_or(0);
    assert_eq!(refused + busy, 32, "{counted:?}");
    assert!(
        busy > 0,
        "a 200 ms review at a time cannot serve 32 streams in 2 s"
    );
    eprintln!(
        "HTTP/2: {refused} reviewed and refused, {busy} review_busy; other connection {other_took:?}"
    );
}
