//! Request attributes against the real kubelets: node-1 of the local cluster (v1.37) and node-2
//! (v1.35), each test once per node.
//!
//! A user with no grants calls the kubelet directly with curl and a client certificate; the
//! kubelet's 403 names the verb and the subresources it checked. They must be what
//! `kubelet_subresources` and `Verb::from_method` derive for the same request, and nodegate's
//! own attributes must differ only where it means to: streaming endpoints are `create`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use nodegate_crds::Verb;
use nodegate_crds::attributes::{Rejection, kubelet_subresources, match_route, request_attributes};
use nodegate_crds::catalogue::{KUBELET_ALIASES, kubelet_minor, kubelet_path};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{NODE_NAME, NODE2_NAME, unique_name};
use std::path::PathBuf;
use std::process::Command;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Requests covering every catalogue endpoint and method the kubelet serves, and the kubelet's
/// subpath rules (`/pods/`, `/healthz/ping`, `/exec` with a pod uid).
const REQUESTS: &[(&str, &str)] = &[
    ("GET", "/pods"),
    ("GET", "/pods/"),
    ("POST", "/pods"),
    ("DELETE", "/pods"),
    ("GET", "/runningpods/"),
    ("GET", "/healthz"),
    ("GET", "/healthz/ping"),
    ("GET", "/configz"),
    ("GET", "/statusz"),
    ("GET", "/flagz"),
    ("GET", "/stats/summary"),
    ("POST", "/stats/summary"),
    ("GET", "/metrics"),
    ("GET", "/metrics/cadvisor"),
    ("GET", "/metrics/resource"),
    ("GET", "/metrics/probes"),
    ("GET", "/metrics/slis"),
    ("GET", "/logs/"),
    ("GET", "/logs/syslog"),
    ("GET", "/containerLogs/ns/pod/ctr"),
    ("GET", "/exec/ns/pod/ctr"),
    ("POST", "/exec/ns/pod/ctr"),
    ("GET", "/exec/ns/pod/uid/ctr"),
    ("GET", "/attach/ns/pod/ctr"),
    ("POST", "/attach/ns/pod/ctr"),
    ("GET", "/portForward/ns/pod"),
    ("POST", "/portForward/ns/pod/uid"),
    ("POST", "/run/ns/pod/ctr"),
    ("POST", "/checkpoint/ns/pod/ctr"),
    ("GET", "/debug/pprof/"),
    ("GET", "/debug/pprof/heap"),
    ("PUT", "/debug/flags/v"),
];

struct Kubelet {
    url: String,
    dir: PathBuf,
    /// Its `kubeletVersion` (v1.37.x on node-1, v1.35.x on node-2).
    version: String,
}

impl Kubelet {
    /// The kubelet of `node`, and the credentials of a fresh user with no grants.
    async fn with_ungranted_user(
        cluster: &Cluster,
        node: &str,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let node = Api::<Node>::all(cluster.admin()?).get(node).await?;
        let status = node.status.unwrap();
        let version = status.node_info.as_ref().unwrap().kubelet_version.clone();
        let ip = status
            .addresses
            .unwrap()
            .into_iter()
            .find(|a| a.type_ == "InternalIP")
            .unwrap()
            .address;
        let port = status
            .daemon_endpoints
            .unwrap()
            .kubelet_endpoint
            .unwrap()
            .port;
        let user = unique_name("e2e-no-grants");
        let credentials = cluster.user_credentials(&user, &["nodegate-e2e"]).await?;
        let dir = std::env::temp_dir().join(&user);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("tls.crt"), &credentials.certificate_pem)?;
        std::fs::write(dir.join("tls.key"), &credentials.key_pem)?;
        Ok(Self {
            url: format!("https://{ip}:{port}"),
            dir,
            version,
        })
    }

    /// (HTTP status, body). `-k`: the kubelet's serving certificate is self-signed; what is under
    /// test is its authorization, not its certificate.
    fn call(&self, method: &str, path: &str) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sk",
            "--path-as-is",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cert")
        .arg(self.dir.join("tls.crt"))
        .arg("--key")
        .arg(self.dir.join("tls.key"));
        if method == "HEAD" {
            cmd.arg("--head");
        } else {
            cmd.args(["-X", method]);
        }
        let out = cmd.arg(format!("{}{path}", self.url)).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `Forbidden (user=u, verb=get, resource=nodes, subresource(s)=[pods proxy])` → (verb, subresources).
fn parse_forbidden(body: &str) -> (String, Vec<String>) {
    let verb = body
        .split("verb=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let list = body
        .split("subresource(s)=[")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    (verb, list.split_whitespace().map(String::from).collect())
}

#[tokio::test]
async fn attributes_match_the_real_kubelet() -> TestResult {
    attributes_match(NODE_NAME).await
}

#[tokio::test]
async fn attributes_match_the_older_kubelet() -> TestResult {
    attributes_match(NODE2_NAME).await
}

async fn attributes_match(node: &str) -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let kubelet = Kubelet::with_ungranted_user(&cluster, node).await?;
    let minor = kubelet_minor(&kubelet.version).unwrap();
    for (method, path) in REQUESTS {
        let (status, body) = kubelet.call(method, path);
        // What this kubelet version serves is what the catalogue records (SERVED_SINCE): a
        // path it does not serve is 404 before any authorization.
        let served = match_route(path).is_none_or(|r| r.endpoint.served_by_kubelet(minor));
        if !served {
            assert_eq!(
                status, 404,
                "{method} {path} on {}: {body}",
                kubelet.version
            );
            continue;
        }
        assert_eq!(
            status, 403,
            "{method} {path} on {}: {body}",
            kubelet.version
        );
        let (kubelet_verb, kubelet_subs) = parse_forbidden(&body);
        let ours: Vec<String> = kubelet_subresources(path)
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(ours, kubelet_subs, "{method} {path}: subresources");
        let verb = Verb::from_method(method)
            .map(|v| v.to_string())
            .unwrap_or_default();
        assert_eq!(verb, kubelet_verb, "{method} {path}: verb");

        // nodegate serves fewer methods than the kubelet accepts (POST /pods is refused with
        // 405); where it serves the request, its attributes are the kubelet's.
        let attributes = match request_attributes(method, path, None) {
            Ok(attributes) => attributes,
            Err(Rejection::MethodNotAllowed { .. }) => continue,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        assert_eq!(attributes.subresources, kubelet_subresources(path));
        let streaming = attributes
            .route
            .as_ref()
            .is_some_and(|r| r.endpoint.spec().streaming);
        if streaming {
            // The deliberate difference: the kubelet says `get` for a GET exec (a WebSocket
            // upgrade), which would let a read grant exec.
            assert_eq!(attributes.verb, Some(Verb::Create), "{method} {path}");
        } else {
            assert_eq!(
                attributes.verb.map(|v| v.to_string()),
                Some(kubelet_verb),
                "{method} {path}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn methods_without_a_verb_are_refused_by_the_kubelet_too() -> TestResult {
    methods_without_a_verb(NODE_NAME).await
}

#[tokio::test]
async fn methods_without_a_verb_are_refused_by_the_older_kubelet_too() -> TestResult {
    methods_without_a_verb(NODE2_NAME).await
}

async fn methods_without_a_verb(node: &str) -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let kubelet = Kubelet::with_ungranted_user(&cluster, node).await?;
    let (status, _) = kubelet.call("HEAD", "/pods");
    assert_eq!(status, 403);
    assert_eq!(
        request_attributes("HEAD", "/pods", None).map(|a| a.verb),
        Err(nodegate_crds::attributes::Rejection::MethodNotAllowed {
            method: "HEAD".into(),
            endpoint: nodegate_crds::Endpoint::Pods
        })
    );
    Ok(())
}

#[tokio::test]
async fn paths_the_kubelet_does_not_serve() -> TestResult {
    paths_not_served(NODE_NAME).await
}

#[tokio::test]
async fn paths_the_older_kubelet_does_not_serve() -> TestResult {
    paths_not_served(NODE2_NAME).await
}

async fn paths_not_served(node: &str) -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let kubelet = Kubelet::with_ungranted_user(&cluster, node).await?;
    // Near misses: no kubelet route, and no catalogue route either.
    for path in ["/podsx", "/metricsx", "/"] {
        let (status, body) = kubelet.call("GET", path);
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(match_route(path), None, "{path}");
    }
    // Aliases the kubelet dropped: nodegate serves them by asking for the canonical path.
    for (alias, canonical) in KUBELET_ALIASES {
        assert_eq!(kubelet.call("GET", alias).0, 404, "{alias}");
        assert_eq!(kubelet_path(alias), *canonical);
        assert_eq!(kubelet.call("GET", canonical).0, 403, "{canonical}");
    }
    // Unclean paths are redirected by the kubelet, never authorized as what they start with;
    // nodegate normalises them before authorizing instead.
    let (status, body) = kubelet.call("GET", "/metrics/../exec/ns/pod/ctr");
    assert_eq!(status, 307, "{body}");
    let attributes = request_attributes("GET", "/metrics/../exec/ns/pod/ctr", None).unwrap();
    assert_eq!(attributes.path, "/exec/ns/pod/ctr");
    Ok(())
}
