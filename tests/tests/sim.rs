//! kubelet-sim: every route answers with the kubelet's shapes, metrics are valid exposition
//! with the configured namespaces, gzip, streaming (WebSocket echo, SPDY 101), TLS, request
//! records, and kubelet-style authentication against the test cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nodegate_tests::sim::{Sim, SimAuth, SimOptions};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn namespaces(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn start(options: SimOptions) -> Sim {
    Sim::start(options).await.expect("simulator starts")
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

/// One HTTP/1.1 request on a fresh connection (plain, or TLS trusting `ca_pem`).
async fn call(
    sim: &Sim,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    call_with(sim, method, target, headers, body, None).await
}

async fn call_with(
    sim: &Sim,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
    client_cert: Option<(&[u8], &[u8])>,
) -> Reply {
    let tcp = tokio::net::TcpStream::connect(sim.addr).await.unwrap();
    let mut builder = Request::builder()
        .method(method)
        .uri(target)
        .header("host", "sim");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = match &sim.ca_pem {
        None => send(TokioIo::new(tcp), req).await,
        Some(ca) => {
            let tls = tls_connect(tcp, ca.as_bytes(), client_cert).await;
            send(TokioIo::new(tls), req).await
        }
    };
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn send<I>(io: I, req: Request<Full<Bytes>>) -> http::Response<hyper::body::Incoming>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

fn tls_config(ca_pem: &[u8], client_cert: Option<(&[u8], &[u8])>) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(der.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    match client_cert {
        Some((cert, key)) => {
            let chain: Vec<_> = CertificateDer::pem_slice_iter(cert)
                .map(|c| c.unwrap())
                .collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    }
}

async fn tls_connect(
    tcp: tokio::net::TcpStream,
    ca_pem: &[u8],
    client_cert: Option<(&[u8], &[u8])>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(ca_pem, client_cert)));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// A sample line of Prometheus text: (name, labels, value).
fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i..]),
        None => {
            let (n, r) = line.split_once(' ').expect("name and value");
            (n, r)
        }
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let mut end = None;
        'outer: while let Some((_, c)) = chars.next() {
            match c {
                '}' => {
                    end = chars.next().map(|(i, _)| i);
                    break;
                }
                ',' => {}
                '=' => {
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                    let mut value = String::new();
                    while let Some((_, c)) = chars.next() {
                        match c {
                            '\\' => value.push(chars.next().unwrap().1),
                            '"' => {
                                assert!(
                                    labels.insert(std::mem::take(&mut key), value).is_none(),
                                    "duplicate label: {line}"
                                );
                                continue 'outer;
                            }
                            c => value.push(c),
                        }
                    }
                    panic!("unterminated value: {line}");
                }
                c => key.push(c),
            }
        }
        rest = &body[end.expect("closing brace")..];
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().expect("value");
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value {v:?}: {line}")),
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .unwrap_or_else(|_| panic!("bad timestamp: {line}"));
    }
    assert!(fields.next().is_none(), "trailing fields: {line}");
    assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "{line}"
    );
    (name.to_string(), labels, value)
}

/// Families of an exposition, checked line by line: HELP and TYPE once and before the
/// family's samples, samples of a family contiguous. Returns (family → samples' labels).
fn parse_exposition(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut families: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut finished: BTreeSet<String> = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap().to_string();
            if let Some(prev) = current.replace(name.clone()) {
                finished.insert(prev);
            }
            assert!(!finished.contains(&name), "family {name} split");
            assert!(!families.contains_key(&name), "HELP twice for {name}");
            families.insert(name, Vec::new());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert_eq!(current.as_deref(), Some(name), "TYPE after HELP: {line}");
            assert!(types.insert(name.to_string(), kind.into()).is_none());
        } else if line.is_empty() || line.starts_with('#') {
            panic!("unexpected line {line:?}");
        } else {
            let (name, labels, _) = parse_sample(line);
            let family = current.clone().expect("sample after HELP");
            let base_ok = name == family
                || (types
                    .get(&family)
                    .is_some_and(|t| t == "histogram" || t == "summary")
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name == format!("{family}{s}")));
            assert!(base_ok, "sample {name} inside family {family}");
            families.get_mut(&family).unwrap().push(labels);
        }
    }
    families
}

fn namespaces_of(families: &BTreeMap<String, Vec<BTreeMap<String, String>>>) -> BTreeSet<String> {
    families
        .values()
        .flatten()
        .filter_map(|l| l.get("namespace").cloned())
        .collect()
}

#[tokio::test]
async fn json_routes_have_the_kubelets_shapes() -> TestResult {
    let sim = start(SimOptions {
        pods: 12,
        namespaces: namespaces(&["alpha", "beta", "gamma"]),
        ..SimOptions::default()
    })
    .await;

    let r = call(&sim, "GET", "/healthz", &[], "").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    assert_eq!(
        call(&sim, "GET", "/healthz/syncloop", &[], "").await.text(),
        "ok"
    );

    let pods = call(&sim, "GET", "/pods", &[], "").await;
    assert_eq!(pods.status, 200);
    assert_eq!(pods.headers["content-type"], "application/json");
    let pods = pods.json();
    assert_eq!(pods["kind"], "PodList");
    assert_eq!(pods["apiVersion"], "v1");
    let items = pods["items"].as_array().unwrap();
    assert_eq!(items.len(), 12);
    let ns: BTreeSet<&str> = items
        .iter()
        .map(|p| p["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(ns, BTreeSet::from(["alpha", "beta", "gamma"]));
    for p in items {
        assert_eq!(p["spec"]["nodeName"], "sim-node");
        assert_eq!(p["status"]["phase"], "Running");
        let id = p["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .unwrap();
        assert!(id.starts_with("containerd://"), "{id}");
        // Typed parse: the document is a valid PodList.
    }
    let typed: k8s_openapi::List<k8s_openapi::api::core::v1::Pod> =
        serde_json::from_value(pods.clone())?;
    assert_eq!(typed.items.len(), 12);

    let running = call(&sim, "GET", "/runningpods/", &[], "").await.json();
    assert_eq!(running["kind"], "PodList");
    assert_eq!(running["items"].as_array().unwrap().len(), 12);
    assert_eq!(running["items"][0]["metadata"]["namespace"], "alpha");

    let stats = call(&sim, "GET", "/stats/summary", &[], "").await.json();
    assert_eq!(stats["node"]["nodeName"], "sim-node");
    let system: Vec<&str> = stats["node"]["systemContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(system, ["kubelet", "runtime", "pods"]);
    assert!(stats["node"]["fs"]["capacityBytes"].as_u64().unwrap() > 0);
    let stat_pods = stats["pods"].as_array().unwrap();
    assert_eq!(stat_pods.len(), 12);
    let ns: BTreeSet<&str> = stat_pods
        .iter()
        .map(|p| p["podRef"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(ns, BTreeSet::from(["alpha", "beta", "gamma"]));
    // The same pods as /pods.
    assert_eq!(stat_pods[3]["podRef"]["uid"], items[3]["metadata"]["uid"]);
    assert!(stat_pods[0]["network"].is_object());

    let light = call(
        &sim,
        "POST",
        "/stats/summary?only_cpu_and_memory=true",
        &[],
        "",
    )
    .await
    .json();
    assert!(light["pods"][0]["cpu"].is_object());
    assert!(light["pods"][0]["network"].is_null());
    assert!(light["node"]["fs"].is_null());

    let configz = call(&sim, "GET", "/configz", &[], "").await.json();
    assert_eq!(configz["kubeletconfig"]["nodeName"], "sim-node");

    let checkpoint = call(&sim, "POST", "/checkpoint/alpha/p/c", &[], "").await;
    assert_eq!(checkpoint.status, 200);
    assert!(
        checkpoint.json()["items"][0]
            .as_str()
            .unwrap()
            .starts_with("/var/lib/kubelet/checkpoints/checkpoint-p_alpha-c-")
    );
    Ok(())
}

#[tokio::test]
async fn text_routes_and_kubelet_errors() -> TestResult {
    let sim = start(SimOptions {
        log_lines: 50,
        ..SimOptions::default()
    })
    .await;
    let status = |r: &Reply| r.status.as_u16();

    let statusz = call(&sim, "GET", "/statusz", &[], "").await;
    assert_eq!(status(&statusz), 200);
    assert!(statusz.text().contains("kubelet statusz"));
    let json_only = call(
        &sim,
        "GET",
        "/statusz",
        &[("accept", "application/json")],
        "",
    )
    .await;
    assert_eq!(status(&json_only), 406);
    assert_eq!(json_only.json()["reason"], "NotAcceptable");
    assert!(
        call(&sim, "GET", "/flagz", &[], "")
            .await
            .text()
            .contains("kubelet flagz")
    );

    let listing = call(&sim, "GET", "/logs/", &[], "").await;
    assert!(listing.text().contains("<a href=\"syslog\">syslog</a>"));
    let syslog = call(&sim, "GET", "/logs/syslog", &[], "").await;
    assert_eq!(syslog.text().lines().count(), 50);
    assert_eq!(status(&call(&sim, "GET", "/logs/nope", &[], "").await), 404);

    let log = call(&sim, "GET", "/containerLogs/team-a/web-0/web", &[], "").await;
    assert_eq!(log.text().lines().count(), 50);
    let tail = call(
        &sim,
        "GET",
        "/containerLogs/team-a/web-0/web?tailLines=5&timestamps=true&follow=true",
        &[],
        "",
    )
    .await;
    let lines: Vec<String> = tail.text().lines().map(String::from).collect();
    assert_eq!(lines.len(), 5);
    assert!(lines[0].contains("namespace=team-a pod=web-0 container=web"));
    assert!(lines[0].starts_with("20"), "timestamps: {}", lines[0]);
    let limited = call(&sim, "GET", "/containerLogs/a/b/c?limitBytes=10", &[], "").await;
    assert_eq!(limited.body.len(), 10);

    let run = call(
        &sim,
        "POST",
        "/run/team-a/web-0/web?cmd=echo%20hello",
        &[],
        "",
    )
    .await;
    assert_eq!((status(&run), run.text().as_str()), (200, "hello\n"));

    assert!(
        call(&sim, "GET", "/debug/pprof/", &[], "")
            .await
            .text()
            .contains("heap")
    );
    assert_eq!(
        status(&call(&sim, "GET", "/debug/pprof/heap", &[], "").await),
        200
    );
    let flags = call(&sim, "PUT", "/debug/flags/v", &[], "4").await;
    assert_eq!(flags.text(), "successfully set klog.logging.verbosity to 4");

    // What a kubelet 1.37 answers that nodegate may serve differently.
    for path in [
        "/spec/",
        "/spec",
        "/metrics/resource/v1alpha1",
        "/podsx",
        "/",
    ] {
        let r = call(&sim, "GET", path, &[], "").await;
        assert_eq!(
            (status(&r), r.text().as_str()),
            (404, "404 page not found\n"),
            "{path}"
        );
    }
    assert_eq!(status(&call(&sim, "POST", "/pods", &[], "").await), 405);
    assert_eq!(status(&call(&sim, "GET", "/run/a/b/c", &[], "").await), 405);
    let redirect = call(&sim, "GET", "/metrics/../exec/ns/pod/ctr", &[], "").await;
    assert_eq!(status(&redirect), 307);
    assert_eq!(redirect.headers["location"], "/exec/ns/pod/ctr");
    // exec without an upgrade is refused (kubelet 1.37: 500).
    let r = call(&sim, "POST", "/exec/a/b/c?command=ls", &[], "").await;
    assert_eq!(
        (status(&r), r.text().as_str()),
        (500, "Upgrade request required\n")
    );
    Ok(())
}

#[tokio::test]
async fn metrics_are_valid_exposition_with_the_configured_namespaces() -> TestResult {
    let sim = start(SimOptions {
        pods: 9,
        namespaces: namespaces(&["ns-a", "ns-b", "ns-c"]),
        ..SimOptions::default()
    })
    .await;
    let want: BTreeSet<String> = ["ns-a", "ns-b", "ns-c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let pods: BTreeSet<String> = sim.world().pods.iter().map(|p| p.name.clone()).collect();

    for path in [
        "/metrics",
        "/metrics/cadvisor",
        "/metrics/resource",
        "/metrics/probes",
        "/metrics/slis",
    ] {
        let r = call(&sim, "GET", path, &[], "").await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8; escaping=underscores",
            "{path}"
        );
        let families = parse_exposition(&r.text());
        assert!(!families.is_empty(), "{path}");
        let mut found = namespaces_of(&families);
        let node_level = found.remove("");
        match path {
            "/metrics" | "/metrics/slis" => {
                assert!(found.is_empty(), "{path} has no namespaces: {found:?}");
            }
            _ => assert_eq!(found, want, "{path}"),
        }
        if path == "/metrics/cadvisor" {
            assert!(node_level, "cadvisor has namespace=\"\" series");
            for (name, samples) in &families {
                for labels in samples {
                    if name.starts_with("container_") && name != "container_scrape_error" {
                        let keys: BTreeSet<&str> = labels.keys().map(String::as_str).collect();
                        for k in ["container", "id", "image", "name", "namespace", "pod"] {
                            assert!(keys.contains(k), "{name} {labels:?}");
                        }
                        if !labels["pod"].is_empty() {
                            assert!(pods.contains(&labels["pod"]), "{labels:?}");
                        }
                    }
                }
            }
            // Node-level series without any namespace label (machine_*).
            assert!(!families["machine_cpu_cores"][0].contains_key("namespace"));
            assert!(families.contains_key("container_cpu_usage_seconds_total"));
            let root = families["container_cpu_usage_seconds_total"]
                .iter()
                .any(|l| l["id"] == "/" && l["namespace"].is_empty());
            assert!(root, "root cgroup series");
        }
        if path == "/metrics/probes" || path == "/metrics/resource" {
            // Also node-level series (process start time, node usage) without namespace.
            assert!(
                families
                    .values()
                    .flatten()
                    .any(|l| !l.contains_key("namespace")),
                "{path}"
            );
        }
    }
    Ok(())
}

/// The generated cAdvisor text uses the names, HELP texts and label sets of a real kubelet
/// 1.35 capture (read from ../shared at test time).
#[tokio::test]
async fn cadvisor_is_shaped_like_the_capture() -> TestResult {
    let capture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/kubelet/cadvisor-nri-kubernetes-minikube-k8s1.35.txt");
    let Ok(real) = std::fs::read_to_string(&capture) else {
        nodegate_tests::skip::skip_or_fail(
            nodegate_tests::skip::Class::ProvidedByCi,
            &format!("the kubelet capture {} is absent", capture.display()),
            "check out the shared fixtures next to the repository (../shared/fixtures/kubelet/)",
        );
        return Ok(());
    };
    // Scale 12 serves every family.
    let sim = start(SimOptions {
        payload_scale: 12,
        ..SimOptions::default()
    })
    .await;
    let ours = String::from_utf8(sim.payloads().cadvisor.body.to_vec())?;
    let real_families = parse_exposition(&real);
    let our_families = parse_exposition(&ours);
    let help = |text: &str| -> BTreeMap<String, String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# HELP "))
            .map(|l| {
                let (n, h) = l.split_once(' ').unwrap();
                (n.to_string(), h.to_string())
            })
            .collect()
    };
    let (real_help, our_help) = (help(&real), help(&ours));
    for (name, samples) in &our_families {
        let real_samples = real_families
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in the capture"));
        assert_eq!(our_help[name], real_help[name], "HELP of {name}");
        let key_sets = |s: &Vec<BTreeMap<String, String>>| -> BTreeSet<Vec<String>> {
            s.iter().map(|l| l.keys().cloned().collect()).collect()
        };
        let ours_keys = key_sets(samples);
        let real_keys = key_sets(real_samples);
        for keys in &ours_keys {
            assert!(
                real_keys.contains(keys),
                "{name}: label set {keys:?} not in the capture {real_keys:?}"
            );
        }
    }
    // At the highest scale every container family of the capture is there.
    for name in real_families.keys().filter(|n| n.starts_with("container_")) {
        assert!(our_families.contains_key(name), "{name} missing");
    }
    Ok(())
}

#[tokio::test]
async fn payload_scale_sizes_cadvisor() -> TestResult {
    let small = start(SimOptions::default()).await;
    let small_len = small.payloads().cadvisor.body.len();
    assert!(
        (50_000..400_000).contains(&small_len),
        "scale 1, 30 pods: {small_len} bytes"
    );
    let started = std::time::Instant::now();
    let big = start(SimOptions {
        payload_scale: 40,
        ..SimOptions::default()
    })
    .await;
    let big_len = big.payloads().cadvisor.body.len();
    eprintln!(
        "cadvisor, 30 pods: scale 1 {small_len} bytes; scale 40 {big_len} bytes (generated and gzipped in {:?})",
        started.elapsed()
    );
    assert!(
        (5_000_000..12_000_000).contains(&big_len),
        "scale 40: {big_len} bytes"
    );
    // Served whole, in chunks.
    let r = call(&big, "GET", "/metrics/cadvisor", &[], "").await;
    assert_eq!(r.body.len(), big_len);
    Ok(())
}

#[tokio::test]
async fn gzip_when_accepted_and_protobuf_when_asked() -> TestResult {
    let sim = start(SimOptions::default()).await;
    let plain = call(&sim, "GET", "/metrics/cadvisor", &[], "").await;
    assert!(plain.headers.get("content-encoding").is_none());
    let gz = call(
        &sim,
        "GET",
        "/metrics/cadvisor",
        &[("accept-encoding", "gzip, deflate")],
        "",
    )
    .await;
    assert_eq!(gz.headers["content-encoding"], "gzip");
    assert!(gz.body.len() < plain.body.len() / 3);
    let mut decoded = Vec::new();
    async_compression::tokio::bufread::GzipDecoder::new(&gz.body[..])
        .read_to_end(&mut decoded)
        .await?;
    assert_eq!(decoded, plain.body);
    // JSON is never gzipped.
    let pods = call(&sim, "GET", "/pods", &[("accept-encoding", "gzip")], "").await;
    assert!(pods.headers.get("content-encoding").is_none());

    let no_gzip = start(SimOptions {
        gzip: false,
        ..SimOptions::default()
    })
    .await;
    let r = call(
        &no_gzip,
        "GET",
        "/metrics",
        &[("accept-encoding", "gzip")],
        "",
    )
    .await;
    assert!(r.headers.get("content-encoding").is_none());
    parse_exposition(&r.text());

    // Protobuf when the client prefers it, like the kubelet.
    let r = call(
        &sim,
        "GET",
        "/metrics",
        &[(
            "accept",
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3",
        )],
        "",
    )
    .await;
    assert!(
        r.headers["content-type"]
            .to_str()?
            .starts_with("application/vnd.google.protobuf")
    );
    let r = call(
        &sim,
        "GET",
        "/metrics",
        &[("accept", "text/plain;version=0.0.4")],
        "",
    )
    .await;
    assert!(
        r.headers["content-type"]
            .to_str()?
            .starts_with("text/plain")
    );

    let proto = start(SimOptions {
        metrics_protobuf: true,
        ..SimOptions::default()
    })
    .await;
    let r = call(&proto, "GET", "/metrics/cadvisor", &[], "").await;
    assert!(
        r.headers["content-type"]
            .to_str()?
            .starts_with("application/vnd.google.protobuf"),
    );
    Ok(())
}

#[tokio::test]
async fn requests_are_recorded() -> TestResult {
    let sim = start(SimOptions::default()).await;
    assert_eq!(sim.request_count(), 0);
    assert_eq!(sim.last_authorization(), None);
    call(
        &sim,
        "GET",
        "/pods",
        &[("authorization", "Bearer agent-token")],
        "",
    )
    .await;
    call(&sim, "GET", "/metrics/cadvisor?x=1", &[], "").await;
    let records = sim.requests();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].method, "GET");
    assert_eq!(records[0].path, "/pods");
    assert_eq!(
        records[0].authorization.as_deref(),
        Some("Bearer agent-token")
    );
    assert_eq!(records[0].status, 200);
    assert_eq!(records[1].target(), "/metrics/cadvisor?x=1");
    assert_eq!(records[1].authorization, None);
    assert_eq!(records[1].user, None, "AllowAll authenticates no one");
    assert_eq!(sim.last_authorization(), None);
    sim.clear_requests();
    assert_eq!(sim.request_count(), 0);
    Ok(())
}

async fn ws_connect(
    sim: &Sim,
    target: &str,
    protocol: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = format!("ws://{}{target}", sim.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], protocol);
    ws
}

#[tokio::test]
async fn websocket_exec_echo_and_attach() -> TestResult {
    let sim = start(SimOptions::default()).await;

    // exec echo hi: stdout "hi\n", then the status, then close.
    let mut ws = ws_connect(
        &sim,
        "/exec/team-a/web-0/web?command=echo&command=hi&output=1",
        "v5.channel.k8s.io",
    )
    .await;
    let mut frames = Vec::new();
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Binary(b) => frames.push(b),
            Message::Close(_) => break,
            _ => {}
        }
    }
    // An empty frame opens stdout (output=1), as the kubelet does.
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(&frames[0][..], b"\x01");
    assert_eq!(&frames[1][..], b"\x01hi\n");
    assert_eq!(frames[2][0], 3);
    let status: Value = serde_json::from_slice(&frames[2][1..])?;
    assert_eq!(status["status"], "Success");

    // exec of anything else (and attach): stdin echoed to stdout.
    for target in [
        "/exec/team-a/web-0/web?command=cat&stdin=1",
        "/attach/team-a/web-0/web?stdin=1",
    ] {
        let mut ws = ws_connect(&sim, target, "v4.channel.k8s.io").await;
        ws.send(Message::Binary(Bytes::from_static(b"\x00ping")))
            .await?;
        let reply = ws.next().await.unwrap()?;
        assert_eq!(
            reply,
            Message::Binary(Bytes::from_static(b"\x01ping")),
            "{target}"
        );
        ws.close(None).await?;
    }

    // v5 close of stdin ends the session with a status.
    let mut ws = ws_connect(&sim, "/exec/a/b/c?command=sh", "v5.channel.k8s.io").await;
    ws.send(Message::Binary(Bytes::from_static(b"\xff\x00")))
        .await?;
    let reply = ws.next().await.unwrap()?;
    assert_eq!(reply.into_data()[0], 3);

    // portForward announces the port on its channels and echoes data.
    let mut ws = ws_connect(&sim, "/portForward/a/b?port=8080", "v4.channel.k8s.io").await;
    let port = 8080u16.to_le_bytes();
    assert_eq!(
        ws.next().await.unwrap()?.into_data()[..],
        [0, port[0], port[1]]
    );
    assert_eq!(
        ws.next().await.unwrap()?.into_data()[..],
        [1, port[0], port[1]]
    );
    ws.send(Message::Binary(Bytes::from_static(b"\x00GET /")))
        .await?;
    assert_eq!(&ws.next().await.unwrap()?.into_data()[..], b"\x00GET /");

    let records = sim.requests();
    assert_eq!(records[0].upgrade.as_deref(), Some("websocket"));
    assert_eq!(
        records[0].stream_protocols.as_deref(),
        Some("v5.channel.k8s.io")
    );
    assert_eq!(records[0].status, 101);
    assert_eq!(
        records[0].query.as_deref(),
        Some("command=echo&command=hi&output=1")
    );
    Ok(())
}

#[tokio::test]
async fn spdy_upgrade_is_answered_101_and_echoes() -> TestResult {
    let sim = start(SimOptions::default()).await;
    let mut tcp = tokio::net::TcpStream::connect(sim.addr).await?;
    tcp.write_all(
        b"POST /exec/team-a/web-0/web?command=sh&stdin=1&stdout=1 HTTP/1.1\r\nHost: sim\r\n\
          Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\
          X-Stream-Protocol-Version: v3.channel.k8s.io\r\nContent-Length: 0\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    let head = String::from_utf8(head)?.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: spdy/3.1"), "{head}");
    assert!(
        head.contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );
    tcp.write_all(b"\x80\x03\x00\x01raw").await?;
    let mut echo = [0u8; 7];
    tcp.read_exact(&mut echo).await?;
    assert_eq!(&echo, b"\x80\x03\x00\x01raw");
    let r = &sim.requests()[0];
    assert_eq!(r.upgrade.as_deref(), Some("SPDY/3.1"));
    assert_eq!(
        r.stream_protocols.as_deref(),
        Some("v4.channel.k8s.io, v3.channel.k8s.io")
    );
    Ok(())
}

#[tokio::test]
async fn tls_with_a_self_signed_ca() -> TestResult {
    let sim = start(SimOptions {
        tls: true,
        ..SimOptions::default()
    })
    .await;
    assert!(sim.url().starts_with("https://127.0.0.1:"));
    let r = call(&sim, "GET", "/healthz", &[], "").await;
    assert_eq!(r.text(), "ok");
    // Without the CA the handshake fails.
    let tcp = tokio::net::TcpStream::connect(sim.addr).await?;
    let other = nodegate_tests::sim::tls::serving_cert("x", &["localhost".into()])?;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(tls_config(other.ca_pem.as_bytes(), None)));
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    assert!(connector.connect(name, tcp).await.is_err());
    Ok(())
}

/// A client CA and a certificate it issued for `user` in `group` (PEM cert, PEM key).
fn client_ca_and_cert(user: &str, group: &str) -> (String, Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "test client CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, user);
    params
        .distinguished_name
        .push(DnType::OrganizationName, group);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.pem(),
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
    )
}

#[tokio::test]
async fn static_auth_answers_like_a_kubelet() -> TestResult {
    use nodegate_tests::sim::{Grant, Identity, StaticAuth};
    let (ca, cert, key) = client_ca_and_cert("bob", "team-b");
    let sim = start(SimOptions {
        tls: true,
        auth: SimAuth::Static(StaticAuth {
            tokens: vec![(
                "agent-token".into(),
                Identity {
                    user: "system:serviceaccount:nodegate:agent".into(),
                    ..Default::default()
                },
            )],
            client_ca_pem: Some(ca.into_bytes()),
            grants: vec![
                Grant::new("system:serviceaccount:nodegate:agent", "*", "*"),
                Grant::new("group:team-b", "get", "metrics"),
            ],
        }),
        ..SimOptions::default()
    })
    .await;
    let cert = Some((&cert[..], &key[..]));
    let r = call_with(&sim, "GET", "/metrics/cadvisor", &[], "", cert).await;
    assert_eq!(r.status, 200);
    let r = call_with(&sim, "GET", "/pods", &[], "", cert).await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (
            403,
            "Forbidden (user=bob, verb=get, resource=nodes, subresource(s)=[pods proxy])\n"
                .to_string()
        )
    );
    // HEAD gets no verb from the kubelet: refused even for a granted resource.
    let r = call_with(&sim, "HEAD", "/metrics", &[], "", cert).await;
    assert_eq!(r.status, 403);
    let r = call(&sim, "GET", "/pods", &[], "").await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (401, "Unauthorized")
    );
    let r = call(
        &sim,
        "GET",
        "/pods",
        &[("authorization", "Bearer nope")],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    let r = call(
        &sim,
        "GET",
        "/pods",
        &[("authorization", "Bearer agent-token")],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    // Unknown paths are 404 before authentication, like the kubelet's mux.
    assert_eq!(call(&sim, "GET", "/podsx", &[], "").await.status, 404);

    let records = sim.requests();
    assert_eq!(records[0].client_cert_user.as_deref(), Some("bob"));
    assert_eq!(records[0].user.as_deref(), Some("bob"));
    assert!(records[0].groups.contains(&"team-b".to_string()));
    assert_eq!(records[3].user, None);
    assert_eq!(records[3].status, 401);
    assert_eq!(
        records[5].user.as_deref(),
        Some("system:serviceaccount:nodegate:agent")
    );
    Ok(())
}

/// Cluster authentication, as a kubelet: a user without grants gets the kubelet's 403, with
/// `get nodes/metrics` 200; no or a bad credential 401; service-account tokens by TokenReview.
#[tokio::test]
async fn cluster_auth_like_a_kubelet() -> TestResult {
    use k8s_openapi::api::rbac::v1::{
        ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject,
    };
    use kube::api::{Api, DeleteParams, PostParams};
    let Some(cluster) = nodegate_tests::Cluster::get().await? else {
        return Ok(());
    };
    let admin = cluster.admin()?;
    let client_ca_pem: Vec<u8> = cluster
        .admin_config()
        .root_cert
        .as_ref()
        .map(|certs| {
            certs
                .iter()
                .map(|der| pem(der))
                .collect::<String>()
                .into_bytes()
        })
        .unwrap_or_default();
    let sim = start(SimOptions {
        tls: true,
        auth: SimAuth::Cluster {
            client: admin.clone(),
            client_ca_pem,
        },
        ..SimOptions::default()
    })
    .await;

    let user = nodegate_tests::cluster::unique_name("sim-user");
    let creds = cluster.user_credentials(&user, &["sim-group"]).await?;
    let cert = Some((&creds.certificate_pem[..], &creds.key_pem[..]));

    let r = call_with(&sim, "GET", "/metrics", &[], "", cert).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        r.text(),
        format!("Forbidden (user={user}, verb=get, resource=nodes, subresource(s)=[metrics])\n")
    );
    let r = call_with(&sim, "GET", "/pods", &[], "", cert).await;
    assert_eq!(
        r.text(),
        format!("Forbidden (user={user}, verb=get, resource=nodes, subresource(s)=[pods proxy])\n")
    );

    let role = ClusterRole {
        metadata: kube::api::ObjectMeta {
            name: Some(user.clone()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["nodes/metrics".into()]),
            verbs: vec!["get".into()],
            ..Default::default()
        }]),
        ..Default::default()
    };
    let binding = ClusterRoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some(user.clone()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: user.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: user.clone(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    };
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    roles.create(&PostParams::default(), &role).await?;
    bindings.create(&PostParams::default(), &binding).await?;
    let result = async {
        // RBAC caches are eventually consistent: retry briefly.
        let mut last = None;
        for _ in 0..50 {
            let r = call_with(&sim, "GET", "/metrics", &[], "", cert).await;
            if r.status == 200 {
                last = Some(r);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let r = last.expect("granted user gets 200");
        parse_exposition(&r.text());
        // Still forbidden elsewhere.
        let r = call_with(&sim, "GET", "/metrics/cadvisor", &[], "", cert).await;
        assert_eq!(r.status, 200, "nodes/metrics covers /metrics/*");
        let r = call_with(&sim, "GET", "/configz", &[], "", cert).await;
        assert_eq!(r.status, 403);

        // No credential, and a bad token: 401 Unauthorized.
        let r = call(&sim, "GET", "/metrics", &[], "").await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (401, "Unauthorized"));
        let r = call(&sim, "GET", "/metrics", &[("authorization", "Bearer not-a-token")], "").await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (401, "Unauthorized"));

        // A service account's token is reviewed; it has no grants: 403 naming it.
        let ns = cluster.namespace("sim-sa").await?;
        let sa = kube::api::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
            admin.clone(),
            ns.name(),
        );
        sa.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "scraper"}}))?,
        )
        .await?;
        let token = sa_token(&admin, ns.name(), "scraper").await?;
        let bearer = format!("Bearer {token}");
        let r = call(&sim, "GET", "/stats/summary", &[("authorization", &bearer)], "").await;
        assert_eq!(
            r.text(),
            format!(
                "Forbidden (user=system:serviceaccount:{}:scraper, verb=get, resource=nodes, subresource(s)=[stats])\n",
                ns.name()
            )
        );
        let records = sim.requests();
        let last = records.last().unwrap();
        assert_eq!(last.user.as_deref(), Some(format!("system:serviceaccount:{}:scraper", ns.name()).as_str()));
        assert!(last.groups.contains(&"system:authenticated".to_string()));
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    let _ = bindings.delete(&user, &DeleteParams::default()).await;
    let _ = roles.delete(&user, &DeleteParams::default()).await;
    result
}

/// (status, headers and body) of a curl call; `-k`: both serving certificates are self-signed,
/// what is compared is authentication, authorization and routing.
async fn curl(url: &str, method: &str, cert_dir: Option<&std::path::Path>) -> (u16, String) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-sk",
        "--path-as-is",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(dir) = cert_dir {
        cmd.arg("--cert")
            .arg(dir.join("tls.crt"))
            .arg("--key")
            .arg(dir.join("tls.key"));
    }
    if method == "HEAD" {
        cmd.arg("--head");
    } else {
        cmd.args(["-X", method]);
    }
    let out = cmd.arg(url).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap_or(0), body.to_string())
}

async fn curl_content_type(url: &str, cert_dir: &std::path::Path) -> String {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{content_type}",
        ])
        .arg("--cert")
        .arg(cert_dir.join("tls.crt"))
        .arg("--key")
        .arg(cert_dir.join("tls.key"))
        .arg(url)
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The simulator and node-1's real kubelet answer a caller without grants (and one without
/// credentials) with the same statuses and bodies, on every route.
#[tokio::test]
async fn refusals_match_the_real_kubelet() -> TestResult {
    use k8s_openapi::api::core::v1::Node;
    let Some(cluster) = nodegate_tests::Cluster::get().await? else {
        return Ok(());
    };
    let admin = cluster.admin()?;
    let node = kube::api::Api::<Node>::all(admin.clone())
        .get(nodegate_tests::cluster::NODE_NAME)
        .await?;
    let status = node.status.unwrap();
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
    let kubelet = format!("https://{ip}:{port}");
    let client_ca_pem = match cluster
        .location()
        .state_dir
        .as_ref()
        .map(|d| d.join("pki/ca.crt"))
    {
        Some(p) if p.exists() => std::fs::read(p)?,
        _ => cluster
            .admin_config()
            .root_cert
            .iter()
            .flatten()
            .map(|der| pem(der))
            .collect::<String>()
            .into_bytes(),
    };
    let sim = start(SimOptions {
        tls: true,
        node_name: nodegate_tests::cluster::NODE_NAME.into(),
        auth: SimAuth::Cluster {
            client: admin.clone(),
            client_ca_pem,
        },
        ..SimOptions::default()
    })
    .await;
    let user = nodegate_tests::cluster::unique_name("sim-conformance");
    let creds = cluster.user_credentials(&user, &["nodegate-e2e"]).await?;
    let dir = std::env::temp_dir().join(&user);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("tls.crt"), &creds.certificate_pem)?;
    std::fs::write(dir.join("tls.key"), &creds.key_pem)?;

    let requests: &[(&str, &str)] = &[
        ("GET", "/pods"),
        ("POST", "/pods"),
        ("HEAD", "/pods"),
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
        ("POST", "/exec/ns/pod/uid/ctr"),
        ("POST", "/attach/ns/pod/ctr"),
        ("GET", "/portForward/ns/pod"),
        ("POST", "/run/ns/pod/ctr"),
        ("POST", "/checkpoint/ns/pod/ctr"),
        ("GET", "/debug/pprof/"),
        ("GET", "/debug/pprof/heap"),
        ("PUT", "/debug/flags/v"),
        ("GET", "/spec/"),
        ("GET", "/metrics/resource/v1alpha1"),
        ("GET", "/podsx"),
        ("GET", "/"),
        ("GET", "/metrics/../exec/ns/pod/ctr"),
    ];
    let mut mismatches = Vec::new();
    for (method, path) in requests {
        for cert in [Some(dir.as_path()), None] {
            let real = curl(&format!("{kubelet}{path}"), method, cert).await;
            let ours = curl(&format!("{}{path}", sim.url()), method, cert).await;
            let comparable = |r: &(u16, String)| match r.0 {
                // Redirect bodies are Go's HTML; HEAD has no body.
                307 => (r.0, String::new()),
                _ if *method == "HEAD" => (r.0, String::new()),
                _ => r.clone(),
            };
            if comparable(&real) != comparable(&ours) {
                mismatches.push(format!(
                    "{method} {path} cert={}: kubelet {real:?}, sim {ours:?}",
                    cert.is_some()
                ));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    Ok(())
}

/// What a granted caller gets from node-1's kubelet and from the simulator has the same shape:
/// every metric family the simulator serves and the kubelet also has carries the same HELP,
/// TYPE and label names; the JSON documents' sections have the kubelet's field names.
#[tokio::test]
async fn payloads_are_shaped_like_the_real_kubelets() -> TestResult {
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::api::rbac::v1::{
        ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject,
    };
    use kube::api::{Api, DeleteParams, PostParams};
    let Some(cluster) = nodegate_tests::Cluster::get().await? else {
        return Ok(());
    };
    let admin = cluster.admin()?;
    let node = Api::<Node>::all(admin.clone())
        .get(nodegate_tests::cluster::NODE_NAME)
        .await?;
    let status = node.status.unwrap();
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
    let kubelet = format!("https://{ip}:{port}");
    // Scale 12: every cAdvisor family, to compare them all.
    let sim = start(SimOptions {
        pods: 6,
        payload_scale: 12,
        ..SimOptions::default()
    })
    .await;
    // A pod on node-1, so the kubelet has pod and container data to compare with.
    let ns = cluster.namespace("sim-shapes").await?;
    let mut pod = nodegate_tests::cluster::busybox_pod("sleeper", &["sleep", "3600"]);
    let probe: k8s_openapi::api::core::v1::Probe = serde_json::from_value(
        serde_json::json!({"exec": {"command": ["true"]}, "periodSeconds": 1}),
    )?;
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers[0].liveness_probe = Some(probe.clone());
        spec.containers[0].readiness_probe = Some(probe);
    }
    ns.run_pod(&pod, std::time::Duration::from_secs(120))
        .await?;

    let user = nodegate_tests::cluster::unique_name("sim-shapes");
    let creds = cluster.user_credentials(&user, &["nodegate-e2e"]).await?;
    let dir = std::env::temp_dir().join(&user);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("tls.crt"), &creds.certificate_pem)?;
    std::fs::write(dir.join("tls.key"), &creds.key_pem)?;
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    roles
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: kube::api::ObjectMeta {
                    name: Some(user.clone()),
                    ..Default::default()
                },
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(
                        ["metrics", "stats", "pods", "configz", "statusz", "healthz"]
                            .iter()
                            .map(|s| format!("nodes/{s}"))
                            .collect(),
                    ),
                    verbs: vec!["get".into()],
                    ..Default::default()
                }]),
                ..Default::default()
            },
        )
        .await?;
    bindings
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: kube::api::ObjectMeta {
                    name: Some(user.clone()),
                    ..Default::default()
                },
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name: user.clone(),
                },
                subjects: Some(vec![Subject {
                    kind: "User".into(),
                    name: user.clone(),
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    ..Default::default()
                }]),
            },
        )
        .await?;
    let result = async {
        let get = |path: &'static str| {
            let url = format!("{kubelet}{path}");
            let dir = dir.clone();
            async move {
                for _ in 0..50 {
                    let r = curl(&url, "GET", Some(&dir)).await;
                    if r.0 != 403 {
                        return r;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                panic!("{path}: still forbidden")
            }
        };
        let mut differences = Vec::new();
        for path in [
            "/metrics",
            "/metrics/cadvisor",
            "/metrics/resource",
            "/metrics/probes",
            "/metrics/slis",
        ] {
            let (code, real) = get(path).await;
            assert_eq!(code, 200, "{path}: {real}");
            let ours = call(&sim, "GET", path, &[], "").await;
            let real_type = curl_content_type(&format!("{kubelet}{path}"), &dir).await;
            if ours.headers["content-type"] != real_type.as_str() {
                differences.push(format!(
                    "{path}: content type {:?} vs kubelet {real_type:?}",
                    ours.headers["content-type"]
                ));
            }
            let ours = ours.text();
            let meta = |text: &str| -> BTreeMap<String, (String, String)> {
                let mut m: BTreeMap<String, (String, String)> = BTreeMap::new();
                for l in text.lines() {
                    if let Some(r) = l.strip_prefix("# HELP ") {
                        let (n, h) = r.split_once(' ').unwrap_or((r, ""));
                        m.entry(n.into()).or_default().0 = h.into();
                    } else if let Some(r) = l.strip_prefix("# TYPE ") {
                        let (n, t) = r.split_once(' ').unwrap();
                        m.entry(n.into()).or_default().1 = t.into();
                    }
                }
                m
            };
            let (real_meta, our_meta) = (meta(&real), meta(&ours));
            let real_families = parse_exposition(&real);
            let our_families = parse_exposition(&ours);
            let mut shared = 0;
            for (name, samples) in &our_families {
                let Some(real_samples) = real_families.get(name) else {
                    continue;
                };
                shared += 1;
                if real_meta[name] != our_meta[name] {
                    differences.push(format!(
                        "{path} {name}: HELP/TYPE {:?} vs kubelet {:?}",
                        our_meta[name], real_meta[name]
                    ));
                }
                let keys = |s: &Vec<BTreeMap<String, String>>| -> BTreeSet<Vec<String>> {
                    s.iter().map(|l| l.keys().cloned().collect()).collect()
                };
                let (ours_k, real_k) = (keys(samples), keys(real_samples));
                if !real_samples.is_empty() && !ours_k.is_subset(&real_k) {
                    differences.push(format!(
                        "{path} {name}: labels {ours_k:?} vs kubelet {real_k:?}"
                    ));
                }
            }
            let missing: Vec<&String> = our_families
                .keys()
                .filter(|n| !real_families.contains_key(*n))
                .collect();
            eprintln!(
                "{path}: {shared} families shared with node-1's kubelet; not served by it: {missing:?}"
            );
            assert!(shared > 0 || our_families.is_empty(), "{path}: no family in common");
        }

        let keys = |v: &Value| -> BTreeSet<String> {
            v.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let (code, real) = get("/stats/summary").await;
        assert_eq!(code, 200);
        let real: Value = serde_json::from_str(&real)?;
        let ours = call(&sim, "GET", "/stats/summary", &[], "").await.json();
        for (section, r, o) in [
            ("node", &real["node"], &ours["node"]),
            (
                "node.systemContainers[]",
                &real["node"]["systemContainers"][0],
                &ours["node"]["systemContainers"][0],
            ),
            ("node.cpu", &real["node"]["cpu"], &ours["node"]["cpu"]),
            ("node.memory", &real["node"]["memory"], &ours["node"]["memory"]),
            ("node.fs", &real["node"]["fs"], &ours["node"]["fs"]),
        ] {
            if !keys(o).is_subset(&keys(r)) {
                differences.push(format!(
                    "/stats/summary {section}: {:?} vs kubelet {:?}",
                    keys(o),
                    keys(r)
                ));
            }
        }
        if let Some(real_pod) = real["pods"].get(0) {
            let mut our_pod = ours["pods"][0].clone();
            // Sections a kubelet has only for some pods (pod network, volumes, and process
            // stats once cAdvisor saw them: kubelet 1.35 captures have them).
            for optional in ["network", "volume", "process_stats"] {
                if real_pod.get(optional).is_none()
                    && let Some(o) = our_pod.as_object_mut()
                {
                    o.remove(optional);
                }
            }
            let our_pod = &our_pod;
            for (section, r, o) in [
                ("pods[]", real_pod, our_pod),
                ("pods[].podRef", &real_pod["podRef"], &our_pod["podRef"]),
                (
                    "pods[].containers[]",
                    &real_pod["containers"][0],
                    &our_pod["containers"][0],
                ),
            ] {
                if !keys(o).is_subset(&keys(r)) {
                    differences.push(format!(
                        "/stats/summary {section}: {:?} vs kubelet {:?}",
                        keys(o),
                        keys(r)
                    ));
                }
            }
        }
        let (code, real) = get("/pods").await;
        assert_eq!(code, 200);
        let real: Value = serde_json::from_str(&real)?;
        assert_eq!(real["kind"], "PodList");
        if let Some(real_pod) = real["items"].get(0) {
            let ours = call(&sim, "GET", "/pods", &[], "").await.json();
            for section in ["metadata", "spec", "status"] {
                let (o, r) = (keys(&ours["items"][0][section]), keys(&real_pod[section]));
                let extra: Vec<&String> = o.difference(&r).collect();
                eprintln!("/pods items[].{section}: fields the kubelet's first pod lacks: {extra:?}");
            }
        }
        // statusz and flagz: the same header lines, the same statusz fields, well-formed flag lines.
        for path in ["/statusz", "/flagz"] {
            let (code, real) = get(path).await;
            assert_eq!(code, 200, "{path}");
            let ours = call(&sim, "GET", path, &[], "").await.text();
            let head = |t: &str| t.lines().take(3).map(String::from).collect::<Vec<_>>();
            if head(&real) != head(&ours) {
                differences.push(format!("{path}: {:?} vs kubelet {:?}", head(&ours), head(&real)));
            }
            let fields = |t: &str| -> BTreeSet<String> {
                t.lines()
                    .skip(3)
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        if path == "/statusz" {
                            // The kubelet picks the delimiter at random: `:`, `=`, spaces.
                            l.split([':', '=', '\t'])
                                .next()
                                .unwrap_or("")
                                .split("  ")
                                .next()
                                .unwrap_or("")
                                .trim()
                                .to_string()
                        } else {
                            // A flag line is a name, a delimiter and a value; like statusz, the
                            // kubelet picks the delimiter at random per process (`: `, `=`, spaces):
                            // keep the line's shape, not the name or the delimiter.
                            let (name, rest) = l.split_at(l.find([':', '=', ' ', '\t']).unwrap_or(l.len()));
                            let ok = !name.is_empty()
                                && !rest.is_empty()
                                && name.chars().all(|c| c.is_ascii_lowercase() || c == '-' || c.is_ascii_digit());
                            format!("well-formed={ok}")
                        }
                    })
                    .collect()
            };
            if fields(&real) != fields(&ours) {
                differences.push(format!("{path}: {:?} vs kubelet {:?}", fields(&ours), fields(&real)));
            }
        }
        assert!(differences.is_empty(), "{}", differences.join("\n"));
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    let _ = bindings.delete(&user, &DeleteParams::default()).await;
    let _ = roles.delete(&user, &DeleteParams::default()).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Every frame of a WebSocket session until the server closes it (or 5 s pass).
async fn ws_frames<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Vec<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, ws.next()).await {
        match msg {
            Ok(Message::Binary(b)) => frames.push(b.to_vec()),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    frames
}

/// Streaming against a busybox pod on node-1: the SPDY upgrade answers and refusals are the
/// kubelet's header for header; over WebSocket, every exec frame is the kubelet's, for `echo`
/// and for stdin echoed by `cat` until stdin is closed (v5).
#[tokio::test]
async fn streaming_matches_the_real_kubelet() -> TestResult {
    use k8s_openapi::api::core::v1::Node;
    let Some(cluster) = nodegate_tests::Cluster::get().await? else {
        return Ok(());
    };
    let Some(state) = cluster.local_state_dir()? else {
        return Ok(());
    };
    let admin = cluster.admin()?;
    let node = kube::api::Api::<Node>::all(admin.clone())
        .get(nodegate_tests::cluster::NODE_NAME)
        .await?;
    let status = node.status.unwrap();
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
    let ns = cluster.namespace("sim-exec").await?;
    ns.run_pod(
        &nodegate_tests::cluster::busybox_pod("sleeper", &["sleep", "3600"]),
        std::time::Duration::from_secs(120),
    )
    .await?;
    // An echo server on port 8080, for port forwarding.
    ns.run_pod(
        &nodegate_tests::cluster::busybox_pod(
            "echo",
            &["sh", "-c", "while true; do nc -l -p 8080 -e cat; done"],
        ),
        std::time::Duration::from_secs(120),
    )
    .await?;
    let sim = start(SimOptions::default()).await;

    // The kubelet's self-signed CA is the second certificate of its serving bundle.
    let kubelet_ca = std::fs::read(state.join("kubelet/pki/kubelet.crt"))?;
    let cert = std::fs::read(state.join("pki/admin.crt"))?;
    let key = std::fs::read(state.join("pki/admin.key"))?;
    let config = Arc::new(tls_config(&kubelet_ca, Some((&cert, &key))));

    let cases: &[(&str, &str, &[&[u8]])] = &[
        ("command=echo&command=hi&output=1", "v5.channel.k8s.io", &[]),
        ("command=echo&command=hi&output=1", "", &[]),
        ("command=echo&command=hi&output=1", "bogus.k8s.io", &[]),
        (
            "command=echo&command=a&command=b&output=1",
            "v4.channel.k8s.io",
            &[],
        ),
        (
            "command=cat&input=1&output=1",
            "v5.channel.k8s.io",
            &[b"\x00ping\n", b"\xff\x00"],
        ),
    ];
    // SPDY: the upgrade answers (and refusals) are the kubelet's, header for header.
    let spdy = "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n";
    let exec = format!(
        "/exec/{}/sleeper/main?command=sh&input=1&output=1",
        ns.name()
    );
    let spdy_cases = [
        (
            exec.clone(),
            format!("{spdy}X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"),
        ),
        (
            exec.clone(),
            format!(
                "{spdy}X-Stream-Protocol-Version: v5.channel.k8s.io\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
            ),
        ),
        (
            exec.clone(),
            format!("{spdy}X-Stream-Protocol-Version: bogus\r\n"),
        ),
        (exec.clone(), spdy.to_string()),
        (exec.clone(), String::new()),
        (
            format!("/attach/{}/sleeper/main?input=1&output=1", ns.name()),
            format!("{spdy}X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"),
        ),
        (
            format!("/portForward/{}/sleeper", ns.name()),
            format!("{spdy}X-Stream-Protocol-Version: portforward.k8s.io\r\n"),
        ),
        (
            format!("/portForward/{}/sleeper", ns.name()),
            format!("{spdy}X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"),
        ),
    ];
    for (target, headers) in &spdy_cases {
        let request =
            format!("POST {target} HTTP/1.1\r\nHost: node-1\r\n{headers}Content-Length: 0\r\n\r\n");
        let tcp = tokio::net::TcpStream::connect((ip.as_str(), port as u16)).await?;
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let mut tls = connector
            .connect(rustls_pki_types::ServerName::try_from("node-1")?, tcp)
            .await?;
        let real = raw_exchange(&mut tls, &request).await?;
        let mut tcp = tokio::net::TcpStream::connect(sim.addr).await?;
        let ours = raw_exchange(&mut tcp, &request).await?;
        assert_eq!(
            real, ours,
            "SPDY {target} {headers:?}: kubelet (left) vs simulator (right)"
        );
    }

    // portForward over WebSocket: the port announced on the data and error channels, data
    // echoed (by the pod's nc here, by the simulator itself there); `port` is required.
    for (query, protocol) in [
        ("port=8080", "v4.channel.k8s.io"),
        ("port=8080", "portforward.k8s.io"),
        ("", "v4.channel.k8s.io"),
    ] {
        let target = format!("/portForward/{}/echo?{query}", ns.name());
        let mut sessions = Vec::new();
        for real in [true, false] {
            let mut req = if real {
                format!("wss://node-1:{port}{target}")
            } else {
                format!("ws://{}{target}", sim.addr)
            }
            .into_client_request()?;
            req.headers_mut()
                .insert("sec-websocket-protocol", protocol.parse()?);
            let stream: Box<dyn AsyncStream> = if real {
                let tcp = tokio::net::TcpStream::connect((ip.as_str(), port as u16)).await?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                Box::new(
                    connector
                        .connect(rustls_pki_types::ServerName::try_from("node-1")?, tcp)
                        .await?,
                )
            } else {
                Box::new(tokio::net::TcpStream::connect(sim.addr).await?)
            };
            let mut ws = match tokio_tungstenite::client_async(req, stream).await {
                Ok((ws, _)) => ws,
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[]))
                        .into_owned();
                    sessions.push(vec![format!("{} {body}", response.status()).into_bytes()]);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mut frames = Vec::new();
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut sent = false;
            while frames.len() < 3 {
                if frames.len() == 2 && !sent {
                    ws.send(Message::Binary(Bytes::from_static(b"\x00hello\n")))
                        .await?;
                    sent = true;
                }
                match tokio::time::timeout_at(deadline, ws.next()).await {
                    Ok(Some(Ok(Message::Binary(b)))) => frames.push(b.to_vec()),
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
            sessions.push(frames);
        }
        assert_eq!(
            sessions[0], sessions[1],
            "portForward {query} {protocol}: kubelet (left) vs simulator (right)"
        );
    }

    for (query, protocol, send) in cases {
        let target = format!("/exec/{}/sleeper/main?{query}", ns.name());
        let mut sessions = Vec::new();
        for real in [true, false] {
            let mut req = if real {
                format!("wss://node-1:{port}{target}")
            } else {
                format!("ws://{}{target}", sim.addr)
            }
            .into_client_request()?;
            if !protocol.is_empty() {
                req.headers_mut()
                    .insert("sec-websocket-protocol", protocol.parse()?);
            }
            let tcp = if real {
                tokio::net::TcpStream::connect((ip.as_str(), port as u16)).await?
            } else {
                tokio::net::TcpStream::connect(sim.addr).await?
            };
            let stream: Box<dyn AsyncStream> = if real {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                Box::new(
                    connector
                        .connect(rustls_pki_types::ServerName::try_from("node-1")?, tcp)
                        .await?,
                )
            } else {
                Box::new(tcp)
            };
            let (mut ws, response) = match tokio_tungstenite::client_async(req, stream).await {
                Ok(x) => x,
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[]))
                        .into_owned();
                    sessions.push((Some(format!("{} {body}", response.status())), Vec::new()));
                    continue;
                }
                // e.g. a subprotocol answered though none was asked for: the same error from
                // both is the same answer.
                Err(e) => {
                    sessions.push((Some(e.to_string()), Vec::new()));
                    continue;
                }
            };
            let chosen = response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap_or("").to_string());
            for frame in *send {
                // Let the process start before its stdin arrives, as a user would.
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                ws.send(Message::Binary(Bytes::copy_from_slice(frame)))
                    .await?;
            }
            sessions.push((chosen, ws_frames(&mut ws).await));
        }
        assert_eq!(
            sessions[0], sessions[1],
            "{query} {protocol}: kubelet (left) vs simulator (right)"
        );
    }
    Ok(())
}

/// Sends a raw HTTP/1.1 request; returns the status line, the headers (lower-case, sorted,
/// without `date`) and the body (by `Content-Length`; none after a 101).
async fn raw_exchange<S>(
    stream: &mut S,
    request: &str,
) -> Result<(String, Vec<String>, String), Box<dyn std::error::Error + Send + Sync>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    let head = String::from_utf8(head)?;
    let mut lines = head.trim_end().split("\r\n");
    let status = lines.next().unwrap_or("").to_string();
    let mut headers: Vec<String> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            format!("{}: {}", k.to_ascii_lowercase(), v.trim())
        })
        .filter(|h| !h.starts_with("date:"))
        .collect();
    headers.sort();
    let length: usize = headers
        .iter()
        .find_map(|h| h.strip_prefix("content-length: "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    if !status.contains(" 101 ") {
        stream.read_exact(&mut body).await?;
    }
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

async fn sa_token(
    admin: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<String, kube::Error> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let api: kube::api::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::api::Api::namespaced(admin.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued: TokenRequest = api
        .create_subresource("token", name, &Default::default(), &request)
        .await?;
    Ok(issued.status.and_then(|s| s.token).unwrap_or_default())
}

fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}
