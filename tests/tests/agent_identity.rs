//! The agent's identity and configuration against a real API server: TokenReview
//! authentication (users, groups, caching, collapsing, junk floods), x509 identities minted by
//! the cluster's CA, TLS rotation by atomic rename, and the `api` config source watching a
//! NodeAgentConfig and writing its status.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use http::{HeaderMap, HeaderValue};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use nodegate_agent::authn::{
    AuthMethod, Authenticator, AuthnError, AuthnSettings, BoxFuture, KubeTokenReviewer,
    ReviewOutcome, TokenReviewer,
};
use nodegate_agent::config::{self, ApiSourceSettings, ConfigStore};
use nodegate_agent::tls::{ReloadingTls, TlsSettings};
use nodegate_crds::{NodeAgentConfig, NodeAgentRuleSet};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::unique_name;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const NODE: &str = "node-x";

// ---------------------------------------------------------------------------------------------
// helpers

/// A real TokenReview, counted per token.
struct Counting {
    inner: KubeTokenReviewer,
    reviews: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
}

impl Counting {
    fn new(client: kube::Client) -> Arc<Self> {
        Arc::new(Counting {
            inner: KubeTokenReviewer::new(client),
            reviews: Mutex::default(),
            total: AtomicUsize::new(0),
        })
    }
    fn count(&self, token: &str) -> usize {
        self.reviews
            .lock()
            .unwrap()
            .get(token)
            .copied()
            .unwrap_or(0)
    }
}

impl TokenReviewer for Counting {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<ReviewOutcome, String>> {
        *self
            .reviews
            .lock()
            .unwrap()
            .entry(token.to_string())
            .or_default() += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        self.inner.review(token, audiences)
    }
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

/// Creates service account `name` in `namespace` and returns a TokenRequest token for it.
async fn service_account_token(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let sa = ServiceAccount {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    sas.create(&PostParams::default(), &sa).await?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    // The token controller may need a moment to see the new account.
    for _ in 0..50 {
        match sas
            .create_subresource::<_, TokenRequest>("token", name, &PostParams::default(), &request)
            .await
        {
            Ok(issued) => return Ok(issued.status.and_then(|s| s.token).unwrap()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Err("no token issued".into())
}

/// The API server's client CA bundle, as published for delegated authentication (works on
/// any cluster, not only ours).
async fn cluster_client_ca(client: &kube::Client) -> String {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let cm = cms.get("extension-apiserver-authentication").await.unwrap();
    cm.data.unwrap().get("client-ca-file").unwrap().clone()
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);
impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("nodegate-identity"));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// Replaces `name` the way Kubernetes volumes do: a new file renamed over the old one.
    fn replace(&self, name: &str, content: &[u8]) {
        let tmp = self.0.join(format!(".{name}.new"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.path(name)).unwrap();
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn client_config(
    trust: CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust).unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    }
}

/// A TLS handshake over a real loopback connection; the server's view of the client's
/// verified chain, or why it failed.
async fn handshake(
    tls: &ReloadingTls,
    client: ClientConfig,
) -> Result<Option<Vec<CertificateDer<'static>>>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.acceptor();
    let server = async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut stream = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(stream.get_ref().1.peer_certificates().map(|c| c.to_vec()))
    };
    let client = async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        if let Ok(mut stream) = connector
            .connect(ServerName::try_from(NODE).unwrap(), tcp)
            .await
        {
            let _ = stream.write_all(b"x").await;
            let _ = stream.flush().await;
            let mut buf = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await;
        }
    };
    let (result, ()) = tokio::join!(server, client);
    result
}

fn identity_of(
    pem_cert: &[u8],
    pem_key: &[u8],
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_slice_iter(pem_cert)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (chain, PrivateKeyDer::from_pem_slice(pem_key).unwrap())
}

/// A CA of our own and a client certificate from it (not trusted by the cluster).
fn foreign_identity(cn: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "foreign-ca");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        ca_pem,
    )
}

/// A serving certificate for NODE, self-signed, valid until 1 January of `year`.
fn serving_cert(year: i32) -> (String, String, CertificateDer<'static>) {
    let mut params = rcgen::CertificateParams::new(vec![NODE.to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

async fn eventually<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---------------------------------------------------------------------------------------------
// TokenReview

#[tokio::test]
async fn service_account_token_authenticates_with_its_groups() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("identity").await?;
    let token = service_account_token(&cluster.admin()?, ns.name(), "prom").await?;
    let reviewer = Counting::new(cluster.admin()?);
    let authn = Authenticator::new(reviewer.clone(), AuthnSettings::default());

    let user = authn.authenticate(None, &bearer(&token)).await.unwrap();
    assert_eq!(
        user.name,
        format!("system:serviceaccount:{}:prom", ns.name())
    );
    assert_eq!(user.method, AuthMethod::Token);
    assert!(user.uid.is_some(), "service accounts have a UID");
    for group in [
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{}", ns.name()),
        "system:authenticated".to_string(),
    ] {
        assert!(user.groups.contains(&group), "{group} in {:?}", user.groups);
    }
    // Cached: no second review.
    authn.authenticate(None, &bearer(&token)).await.unwrap();
    assert_eq!(reviewer.count(&token), 1);

    // The API server's audience is accepted when asked for explicitly; another is not.
    let wrong = Authenticator::new(
        reviewer.clone(),
        AuthnSettings {
            audiences: vec!["not-the-api-server".into()],
            ..Default::default()
        },
    );
    assert_eq!(
        wrong.authenticate(None, &bearer(&token)).await,
        Err(AuthnError::Invalid)
    );
    Ok(())
}

#[tokio::test]
async fn garbage_token_is_invalid_not_anonymous() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let authn = Authenticator::with_client(cluster.admin()?, AuthnSettings::default());
    let garbage = unique_name("garbage");
    assert_eq!(
        authn.authenticate(None, &bearer(&garbage)).await,
        Err(AuthnError::Invalid)
    );
    Ok(())
}

#[tokio::test]
async fn unreachable_api_server_is_unavailable_never_anonymous() -> TestResult {
    // A client pointed at a closed port: the review fails.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url: http::Uri = format!("https://{}", listener.local_addr()?).parse()?;
    drop(listener);
    let client = kube::Client::try_from(kube::Config::new(url))?;
    let authn = Authenticator::with_client(client, AuthnSettings::default());
    let result = authn.authenticate(None, &bearer("some-token")).await;
    assert!(
        matches!(result, Err(AuthnError::Unavailable(_))),
        "{result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn fifty_concurrent_requests_make_one_review() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("identity").await?;
    let token = service_account_token(&cluster.admin()?, ns.name(), "burst").await?;
    let reviewer = Counting::new(cluster.admin()?);
    let authn = Authenticator::new(reviewer.clone(), AuthnSettings::default());
    let results = futures::future::join_all((0..50).map(|_| {
        let authn = authn.clone();
        let headers = bearer(&token);
        tokio::spawn(async move { authn.authenticate(None, &headers).await })
    }))
    .await;
    for r in results {
        assert!(r?.is_ok());
    }
    assert_eq!(reviewer.count(&token), 1);
    Ok(())
}

#[tokio::test]
async fn junk_token_flood_does_not_evict_a_good_token() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("identity").await?;
    let token = service_account_token(&cluster.admin()?, ns.name(), "steady").await?;
    let reviewer = Counting::new(cluster.admin()?);
    let authn = Authenticator::new(
        reviewer.clone(),
        AuthnSettings {
            success_capacity: 16,
            failure_capacity: 16,
            max_concurrent_reviews: 4,
            // Every junk token must be reviewed here (the flood limits are tested in
            // agent_authn_limits): leave room to wait on a busy test machine.
            review_wait: Duration::from_secs(120),
            review_timeout: Duration::from_secs(120),
            ..Default::default()
        },
    );
    authn.authenticate(None, &bearer(&token)).await.unwrap();
    let junk = futures::future::join_all((0..300).map(|i| {
        let authn = authn.clone();
        let headers = bearer(&format!("junk-{i}-{}", unique_name("t")));
        tokio::spawn(async move { authn.authenticate(None, &headers).await })
    }))
    .await;
    for r in junk {
        assert_eq!(r?, Err(AuthnError::Invalid));
    }
    assert_eq!(reviewer.total.load(Ordering::SeqCst), 301);
    authn.authenticate(None, &bearer(&token)).await.unwrap();
    assert_eq!(reviewer.count(&token), 1, "the good token is still cached");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// x509

#[tokio::test]
async fn cluster_minted_certificate_maps_cn_and_every_o() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let admin = cluster.admin()?;
    let scratch = Scratch::new();
    scratch.replace("ca.crt", cluster_client_ca(&admin).await.as_bytes());
    let tls = ReloadingTls::new(TlsSettings {
        client_ca_file: Some(scratch.path("ca.crt")),
        node_name: NODE.into(),
        ..Default::default()
    })?;
    let user_name = unique_name("alice");
    let creds = cluster
        .user_credentials(&user_name, &["team-a", "team-b"])
        .await?;
    let identity = identity_of(&creds.certificate_pem, &creds.key_pem);
    let chain = handshake(
        &tls,
        client_config(tls.serving_certificate(), Some(identity)),
    )
    .await?
    .expect("the client's chain");
    let authn = Authenticator::with_client(
        admin,
        AuthnSettings {
            x509_enabled: tls.client_ca_configured(),
            ..Default::default()
        },
    );
    let user = authn
        .authenticate(Some(&chain), &HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(user.name, user_name);
    assert_eq!(user.method, AuthMethod::X509);
    assert_eq!(user.groups, ["team-a", "team-b", "system:authenticated"]);
    Ok(())
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let scratch = Scratch::new();
    scratch.replace(
        "ca.crt",
        cluster_client_ca(&cluster.admin()?).await.as_bytes(),
    );
    let tls = ReloadingTls::new(TlsSettings {
        client_ca_file: Some(scratch.path("ca.crt")),
        node_name: NODE.into(),
        ..Default::default()
    })?;
    let (chain, key, _) = foreign_identity("system:admin");
    let result = handshake(
        &tls,
        client_config(tls.serving_certificate(), Some((chain, key))),
    )
    .await;
    assert!(
        result.is_err(),
        "a foreign certificate must fail: {result:?}"
    );
    // Without a certificate the same client connects (requested, not required).
    let anonymous = handshake(&tls, client_config(tls.serving_certificate(), None)).await;
    assert_eq!(anonymous, Ok(None));
    Ok(())
}

#[tokio::test]
async fn serving_cert_and_client_ca_rotate_by_atomic_rename() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let scratch = Scratch::new();
    let (cert_pem, key_pem, cert_der) = serving_cert(2040);
    let (foreign_chain, foreign_key, foreign_ca) = foreign_identity("someone");
    scratch.replace("tls.crt", cert_pem.as_bytes());
    scratch.replace("tls.key", key_pem.as_bytes());
    scratch.replace("ca.crt", foreign_ca.as_bytes());
    let tls = ReloadingTls::new(TlsSettings {
        cert_file: Some(scratch.path("tls.crt")),
        key_file: Some(scratch.path("tls.key")),
        client_ca_file: Some(scratch.path("ca.crt")),
        node_name: NODE.into(),
        ..Default::default()
    })?;
    let reloads = tokio::spawn(tls.clone().run_reload_loop(Duration::from_millis(50)));
    let first_expiry = tls.serving_cert_expiry().unwrap();

    let creds = cluster.user_credentials(&unique_name("bob"), &[]).await?;
    let bob = || identity_of(&creds.certificate_pem, &creds.key_pem);
    assert!(
        handshake(&tls, client_config(cert_der.clone(), Some(bob())))
            .await
            .is_err(),
        "the cluster's CA is not trusted yet"
    );

    // Client CA: the cluster's CA renamed in.
    scratch.replace(
        "ca.crt",
        cluster_client_ca(&cluster.admin()?).await.as_bytes(),
    );
    // Serving certificate renewed.
    let (new_cert, new_key, new_der) = serving_cert(2041);
    scratch.replace("tls.key", new_key.as_bytes());
    scratch.replace("tls.crt", new_cert.as_bytes());
    let tls2 = tls.clone();
    eventually("the renewed certificate", move || {
        tls2.serving_cert_expiry() != Some(first_expiry) && tls2.last_error().is_none()
    })
    .await;
    assert!(tls.serving_cert_expiry().unwrap() > first_expiry);
    let chain = handshake(&tls, client_config(new_der.clone(), Some(bob())))
        .await?
        .expect("bob's chain");
    assert_eq!(chain.len(), 1);
    assert!(
        handshake(
            &tls,
            client_config(new_der.clone(), Some((foreign_chain, foreign_key)))
        )
        .await
        .is_err(),
        "the old client CA is gone"
    );
    // A broken certificate keeps the renewed one in service.
    scratch.replace("tls.crt", b"-----BEGIN CERTIFICATE-----\nbroken\n");
    let tls3 = tls.clone();
    eventually("the reload error", move || tls3.last_error().is_some()).await;
    assert!(
        handshake(&tls, client_config(new_der, None)).await.is_ok(),
        "still serving the last good certificate"
    );
    reloads.abort();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// api config source

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The cluster with nodegate's CRDs installed (once per test process).
async fn cluster_with_crds() -> Result<Option<Cluster>, Box<dyn std::error::Error + Send + Sync>> {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(None);
    };
    cluster.install_crds().await?;
    Ok(Some(cluster))
}

/// Deletes the NodeAgentConfig when the test ends, also on panic.
struct Cleanup {
    name: String,
    config: kube::Config,
}
impl Drop for Cleanup {
    fn drop(&mut self) {
        let (name, config) = (self.name.clone(), self.config.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = kube::Client::try_from(config).unwrap();
                let api: Api<NodeAgentConfig> = Api::all(client);
                let _ = api.delete(&name, &DeleteParams::default()).await;
            });
        })
        .join();
    }
}

fn agent_config(name: &str, hash: &str, namespaces: &[&str]) -> Value {
    json!({
        "apiVersion": "nodegate.io/v1alpha1",
        "kind": "NodeAgentConfig",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "nodegate"}},
        "spec": {
            "policies": "team-a",
            "hash": hash,
            "subjects": [{"kind": "Group", "name": "team-a"}],
            "namespaceSets": [{"names": namespaces}],
            "rules": [{
                "policy": "team-a",
                "subjects": [0],
                "endpoints": ["pods", "cadvisor"],
                "namespaces": 0,
                "ports": ["Secure"],
            }],
        },
    })
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

async fn wait_status(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> DynamicObject {
    for _ in 0..200 {
        let obj = api.get(name).await.unwrap();
        if obj.data.get("status").is_some_and(&check) {
            return obj;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let obj = api.get(name).await.unwrap();
    panic!(
        "timed out waiting for status {what}: {:?}",
        obj.data.get("status")
    );
}

#[tokio::test]
async fn api_source_follows_this_nodes_config_keeps_the_last_good_one_and_writes_status()
-> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let node = unique_name("agent-node");
    let other = unique_name("agent-other");
    let _cleanup = [
        Cleanup {
            name: node.clone(),
            config: cluster.admin_config().clone(),
        },
        Cleanup {
            name: other.clone(),
            config: cluster.admin_config().clone(),
        },
    ];
    let client = cluster.admin()?;
    let api: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<NodeAgentConfig>(&()));
    let store = ConfigStore::new();
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let runner = tokio::spawn(config::run_api(
        client.clone(),
        store.clone(),
        ApiSourceSettings {
            config_name: node.clone(),
            serving_cert_expiry: Some(Arc::new(move || Some(expiry))),
            status_interval: Duration::from_millis(200),
            components: None,
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!store.is_loaded(), "no config yet: not ready");

    // Another node's config is not ours.
    api.create(
        &PostParams::default(),
        &serde_json::from_value(agent_config(&other, "other", &["x"]))?,
    )
    .await?;
    // Ours, created.
    api.create(
        &PostParams::default(),
        &serde_json::from_value(agent_config(&node, "h1", &["team-b", "team-a"]))?,
    )
    .await?;
    let s = store.clone();
    eventually("h1 in force", move || {
        s.is_loaded() && s.current().spec.hash == "h1"
    })
    .await;
    assert_eq!(
        store.current().spec.unpack(0).unwrap().namespaces.names,
        ["team-a", "team-b"]
    );
    let obj = wait_status(&api, &node, "in sync with h1", |s| {
        s["observedHash"] == "h1" && condition(s, "InSync").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let status = &obj.data["status"];
    assert_eq!(condition(status, "Ready").unwrap()["status"], "True");
    assert_eq!(status["servingCertExpiry"], "2033-05-18T03:33:20Z");
    let managers: Vec<(String, Option<String>)> = obj
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.manager.unwrap_or_default(), m.subresource))
        .collect();
    assert!(
        managers.contains(&("nodegate-agent".to_string(), Some("status".to_string()))),
        "{managers:?}"
    );
    assert!(
        api.get(&other).await?.data.get("status").is_none(),
        "the agent writes only its own node's status"
    );

    // Quiet when nothing changes: several status ticks, no write.
    let rv = obj.metadata.resource_version.clone();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(api.get(&node).await?.metadata.resource_version, rv);

    // An invalid update (the CRD has no CEL: a bad namespace name is admitted).
    let bad = json!({"spec": {"hash": "h2", "namespaceSets": [{"names": ["Not_A_Namespace"]}]}});
    api.patch(&node, &PatchParams::default(), &Patch::Merge(&bad))
        .await?;
    let obj = wait_status(&api, &node, "InvalidConfig", |s| {
        condition(s, "InSync").is_some_and(|c| c["reason"] == "InvalidConfig")
    })
    .await;
    let status = &obj.data["status"];
    assert_eq!(status["observedHash"], "h1", "still enforcing h1");
    assert!(
        status["lastError"].as_str().unwrap().contains("DNS-1123"),
        "{status}"
    );
    assert_eq!(store.current().spec.hash, "h1");
    assert!(store.last_error().is_some());

    // A valid update again.
    api.replace(&node, &PostParams::default(), &{
        let mut obj: DynamicObject =
            serde_json::from_value(agent_config(&node, "h3", &["team-c"]))?;
        obj.metadata.resource_version = api.get(&node).await?.metadata.resource_version;
        obj
    })
    .await?;
    let s = store.clone();
    eventually("h3 in force", move || s.current().spec.hash == "h3").await;
    let obj = wait_status(&api, &node, "in sync with h3", |s| {
        s["observedHash"] == "h3" && condition(s, "InSync").is_some_and(|c| c["status"] == "True")
    })
    .await;
    assert!(obj.data["status"].get("lastError").is_none());

    // Deleted: back to deny-all.
    api.delete(&node, &DeleteParams::default()).await?;
    let s = store.clone();
    eventually("deny-all after deletion", move || !s.is_loaded()).await;
    runner.abort();
    Ok(())
}

/// A rule set as the operator writes it (`agent_config`'s spec under another kind), or
/// without nodegate's label when `owned` is false.
fn rule_set(name: &str, hash: &str, namespaces: &[&str], owned: bool) -> Value {
    let mut set = agent_config(name, hash, namespaces);
    set["kind"] = json!("NodeAgentRuleSet");
    if !owned {
        set["metadata"]["labels"] = json!({});
    }
    set
}

/// A NodeAgentConfig that names a NodeAgentRuleSet: the agent enforces the rule set, follows
/// its updates (the config itself unchanged) and the config's move to another, and refuses
/// everything when the rule set it names is not nodegate's or does not exist.
#[tokio::test]
async fn api_source_enforces_the_rule_set_its_config_names() -> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let node = unique_name("agent-sets");
    let _cleanup = Cleanup {
        name: node.clone(),
        config: cluster.admin_config().clone(),
    };
    let client = cluster.admin()?;
    let api: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<NodeAgentConfig>(&()));
    let sets: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<NodeAgentRuleSet>(&()));
    let (a, b, theirs) = (
        unique_name("nodegate-rules-a"),
        unique_name("nodegate-rules-b"),
        unique_name("nodegate-rules-theirs"),
    );
    for set in [
        rule_set(&a, "a1", &["team-a"], true),
        rule_set(&b, "b1", &["team-b"], true),
        rule_set(&theirs, "t1", &["team-c"], false),
    ] {
        sets.create(&PostParams::default(), &serde_json::from_value(set)?)
            .await?;
    }
    let store = ConfigStore::new();
    let runner = tokio::spawn(config::run_api(
        client.clone(),
        store.clone(),
        ApiSourceSettings {
            config_name: node.clone(),
            serving_cert_expiry: None,
            status_interval: Duration::from_millis(200),
            components: None,
        },
    ));
    let names = |set: &str| -> Value {
        json!({
            "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeAgentConfig",
            "metadata": {"name": node, "labels": {"app.kubernetes.io/managed-by": "nodegate"}},
            "spec": {"ruleSet": set},
        })
    };
    let point = |set: String| {
        let api = api.clone();
        let body = names(&set);
        let node = node.clone();
        async move {
            api.patch(
                &node,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&body),
            )
            .await
        }
    };
    point(a.clone()).await?;
    let s = store.clone();
    eventually("a1 in force", move || {
        s.is_loaded() && s.current().spec.hash == "a1"
    })
    .await;
    assert_eq!(
        store.current().spec.unpack(0).unwrap().namespaces.names,
        ["team-a"]
    );
    wait_status(&api, &node, "in sync with a1", |s| {
        s["observedHash"] == "a1" && condition(s, "InSync").is_some_and(|c| c["status"] == "True")
    })
    .await;

    // The rule set changes, the config does not: the agent follows the rule set.
    let config_rv = api.get(&node).await?.metadata.resource_version;
    sets.patch(
        &a,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&rule_set(&a, "a2", &["team-a", "team-z"], true)),
    )
    .await?;
    let s = store.clone();
    eventually("a2 in force", move || s.current().spec.hash == "a2").await;
    let obj = wait_status(&api, &node, "in sync with a2", |s| {
        s["observedHash"] == "a2" && condition(s, "InSync").is_some_and(|c| c["status"] == "True")
    })
    .await;
    assert_ne!(
        obj.metadata.resource_version, config_rv,
        "only status was written"
    );
    assert_eq!(obj.data["spec"]["ruleSet"], json!(a));

    // The config names another rule set.
    point(b.clone()).await?;
    let s = store.clone();
    eventually("b1 in force", move || s.current().spec.hash == "b1").await;

    // A rule set nodegate does not own: deny-all, and status says why.
    point(theirs.clone()).await?;
    let s = store.clone();
    eventually("deny-all for a foreign rule set", move || !s.is_loaded()).await;
    let obj = wait_status(&api, &node, "the foreign rule set refused", |s| {
        s["lastError"].as_str().is_some_and(|e| {
            e.contains("NodeAgentRuleSet") && e.contains("not managed by nodegate")
        })
    })
    .await;
    assert_eq!(
        condition(&obj.data["status"], "Ready").unwrap()["status"],
        "False"
    );

    // Back to an owned one, then to one that does not exist: deny-all again.
    point(a.clone()).await?;
    let s = store.clone();
    eventually("a2 in force again", move || {
        s.is_loaded() && s.current().spec.hash == "a2"
    })
    .await;
    point(unique_name("nodegate-rules-missing")).await?;
    let s = store.clone();
    eventually("deny-all for a missing rule set", move || !s.is_loaded()).await;
    wait_status(&api, &node, "the missing rule set reported", |s| {
        s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("does not exist"))
    })
    .await;

    // The named rule set deleted while in force: deny-all.
    point(b.clone()).await?;
    let s = store.clone();
    eventually("b1 in force again", move || {
        s.is_loaded() && s.current().spec.hash == "b1"
    })
    .await;
    sets.delete(&b, &DeleteParams::default()).await?;
    let s = store.clone();
    eventually("deny-all once the rule set is deleted", move || {
        !s.is_loaded()
    })
    .await;

    runner.abort();
    for set in [&a, &theirs] {
        let _ = sets.delete(set, &DeleteParams::default()).await;
    }
    Ok(())
}

/// A NodeAgentConfig of this node's name that nodegate did not write (no
/// `app.kubernetes.io/managed-by: nodegate`) is not enforced: deny-all, the reason in its
/// status; a config that loses the label drops the configuration in force.
#[tokio::test]
async fn api_source_refuses_a_config_nodegate_does_not_own() -> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let node = unique_name("agent-node");
    let _cleanup = Cleanup {
        name: node.clone(),
        config: cluster.admin_config().clone(),
    };
    let client = cluster.admin()?;
    let api: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<NodeAgentConfig>(&()));
    let store = ConfigStore::new();
    let runner = tokio::spawn(config::run_api(
        client.clone(),
        store.clone(),
        ApiSourceSettings {
            config_name: node.clone(),
            serving_cert_expiry: None,
            status_interval: Duration::from_millis(200),
            components: None,
        },
    ));
    // Valid in every other way, but written by someone else.
    let mut foreign = agent_config(&node, "h1", &["team-a"]);
    foreign["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("labels");
    api.create(&PostParams::default(), &serde_json::from_value(foreign)?)
        .await?;
    let obj = wait_status(&api, &node, "lastError: not managed", |s| {
        s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("not managed by nodegate"))
    })
    .await;
    assert!(
        obj.data["status"].get("observedHash").is_none(),
        "{:?}",
        obj.data["status"]
    );
    assert!(!store.is_loaded(), "deny-all: nothing in force");
    assert!(store.current().spec.rules.is_empty());

    // Labelled as nodegate's: enforced.
    let label = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "nodegate"}}});
    api.patch(&node, &PatchParams::default(), &Patch::Merge(&label))
        .await?;
    let s = store.clone();
    eventually("h1 in force", move || {
        s.is_loaded() && s.current().spec.hash == "h1"
    })
    .await;
    wait_status(&api, &node, "lastError cleared", |s| {
        s.get("lastError").is_none() && s["observedHash"] == "h1"
    })
    .await;

    // Someone relabels it: the configuration in force is dropped, not kept.
    let relabel = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "helm"}}});
    api.patch(&node, &PatchParams::default(), &Patch::Merge(&relabel))
        .await?;
    let s = store.clone();
    eventually("deny-all after relabelling", move || !s.is_loaded()).await;
    wait_status(&api, &node, "lastError: not managed", |s| {
        s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("not managed by nodegate"))
    })
    .await;
    runner.abort();
    Ok(())
}

#[tokio::test]
async fn api_source_resumes_after_the_api_server_goes_away() -> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let node = unique_name("agent-node");
    let _cleanup = Cleanup {
        name: node.clone(),
        config: cluster.admin_config().clone(),
    };
    let admin = cluster.admin()?;
    let api: Api<DynamicObject> =
        Api::all_with(admin.clone(), &ApiResource::erase::<NodeAgentConfig>(&()));
    let url = cluster.admin_config().cluster_url.clone();
    let upstream = format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap_or(443));
    let proxy = nodegate_tests::cluster::FlakyProxy::start(upstream).await?;
    let proxied = proxy.config_through(cluster.admin_config());
    let store = ConfigStore::new();
    let runner = tokio::spawn(config::run_api(
        kube::Client::try_from(proxied)?,
        store.clone(),
        ApiSourceSettings {
            config_name: node.clone(),
            serving_cert_expiry: None,
            status_interval: Duration::from_millis(200),
            components: None,
        },
    ));
    api.create(
        &PostParams::default(),
        &serde_json::from_value(agent_config(&node, "h1", &["team-a"]))?,
    )
    .await?;
    let s = store.clone();
    eventually("h1 in force", move || s.current().spec.hash == "h1").await;

    // The API server "restarts": connections cut, new ones refused for a while; meanwhile
    // the config changes.
    proxy.outage(true);
    let update = json!({"spec": {"hash": "h2"}});
    api.patch(&node, &PatchParams::default(), &Patch::Merge(&update))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        store.current().spec.hash,
        "h1",
        "the last good config is kept"
    );
    assert!(
        store.is_loaded(),
        "an API outage does not unload the config"
    );
    proxy.outage(false);

    let s = store.clone();
    let mut resumed = false;
    for _ in 0..600 {
        if s.current().spec.hash == "h2" {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "the watch did not resume after the outage");
    wait_status(&api, &node, "in sync with h2", |s| {
        s["observedHash"] == "h2"
    })
    .await;
    runner.abort();
    Ok(())
}

#[tokio::test]
async fn policy_file_compiles_for_the_labels_the_api_server_has() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let nodes = cluster
        .fake_nodes("agent-ident", 2, &[("pool", "gpu")])
        .await?;
    let node = config::NodeIdentity::fetch(&cluster.admin()?, &nodes.names()[0]).await?;
    assert_eq!(node.labels.get("pool").map(String::as_str), Some("gpu"));
    assert!(!node.uid.is_empty());
    let text = std::fs::read_to_string(repo("config/samples/gpu-pool-metrics.yaml"))?;
    let spec = config::parse_config_file(&text, &node)?;
    let policies: Vec<&str> = spec.rules.iter().map(|r| r.policy.as_str()).collect();
    assert_eq!(policies, ["team-a-gpu-metrics"]);
    let unlabelled = config::NodeIdentity {
        labels: Default::default(),
        ..node
    };
    assert!(
        config::parse_config_file(&text, &unlabelled)?
            .rules
            .is_empty()
    );
    Ok(())
}

/// Deletes a ClusterRole and ClusterRoleBinding of one name when the test ends.
struct RbacCleanup {
    name: String,
    config: kube::Config,
}
impl Drop for RbacCleanup {
    fn drop(&mut self) {
        use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
        let (name, config) = (self.name.clone(), self.config.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = kube::Client::try_from(config).unwrap();
                let _ = Api::<ClusterRoleBinding>::all(client.clone())
                    .delete(&name, &DeleteParams::default())
                    .await;
                let _ = Api::<ClusterRole>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            });
        })
        .join();
    }
}

/// The permissions the module docs name are enough, and the agent only ever asks for its own
/// node's NodeAgentConfig (the role is limited to that name).
#[tokio::test]
async fn documented_permissions_suffice_and_only_this_nodes_config_is_read() -> TestResult {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let admin = cluster.admin()?;
    let ns = cluster.namespace("agent-rbac").await?;
    let nodes = cluster
        .fake_nodes("agent-rbac", 1, &[("pool", "gpu")])
        .await?;
    let node = nodes.names()[0].clone();
    let _config_cleanup = Cleanup {
        name: node.clone(),
        config: cluster.admin_config().clone(),
    };
    service_account_token(&admin, ns.name(), "agent").await?;
    let role_name = unique_name("nodegate-agent-test");
    let _rbac_cleanup = RbacCleanup {
        name: role_name.clone(),
        config: cluster.admin_config().clone(),
    };
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": role_name},
        "rules": [
            {"apiGroups": ["nodegate.io"], "resources": ["nodeagentconfigs"],
             "resourceNames": [node], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["nodegate.io"], "resources": ["nodeagentconfigs/status"],
             "resourceNames": [node], "verbs": ["patch"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
             "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["nodes"], "resourceNames": [node],
             "verbs": ["get", "list", "watch"]},
        ],
    }))?;
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns.name()}],
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    let agent = cluster.service_account(ns.name(), "agent").await?;

    // Node identity and token reviews with the agent's own credentials.
    let identity = config::NodeIdentity::fetch(&agent, &node).await?;
    assert_eq!(identity.labels.get("pool").map(String::as_str), Some("gpu"));
    // The file source's watch of its Node: one object, by field selector, which RBAC
    // authorizes against the node's name.
    let mut watched = config::watch_node(agent.clone(), node.clone());
    tokio::time::timeout(
        Duration::from_secs(20),
        watched.wait_for(|n| n.as_ref() == Some(&identity)),
    )
    .await?
    .map(|_| ())?;
    let caller = service_account_token(&admin, ns.name(), "caller").await?;
    let authn = Authenticator::with_client(agent.clone(), AuthnSettings::default());
    let user = authn.authenticate(None, &bearer(&caller)).await.unwrap();
    assert_eq!(
        user.name,
        format!("system:serviceaccount:{}:caller", ns.name())
    );

    // The config source: watch of its own object, status written.
    let store = ConfigStore::new();
    let runner = tokio::spawn(config::run_api(
        agent.clone(),
        store.clone(),
        ApiSourceSettings {
            config_name: node.clone(),
            serving_cert_expiry: None,
            status_interval: Duration::from_millis(200),
            components: None,
        },
    ));
    let api: Api<DynamicObject> =
        Api::all_with(admin.clone(), &ApiResource::erase::<NodeAgentConfig>(&()));
    api.create(
        &PostParams::default(),
        &serde_json::from_value(agent_config(&node, "h1", &["team-a"]))?,
    )
    .await?;
    let s = store.clone();
    eventually("h1 in force", move || s.current().spec.hash == "h1").await;
    wait_status(&api, &node, "in sync with h1", |s| {
        s["observedHash"] == "h1"
    })
    .await;
    runner.abort();
    Ok(())
}
