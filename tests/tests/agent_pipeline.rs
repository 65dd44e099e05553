//! nodegate-agent end to end, in-process, in front of the kubelet simulator: the authorization
//! matrix (every catalogue route × method × port × kind of caller), filtering, streaming
//! upgrades, upstream failures, and what the logs may contain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use base64::Engine;
use futures::StreamExt;
use nodegate_crds::catalogue::Scope;
use nodegate_crds::{Endpoint, Port};
use std::collections::BTreeMap;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    /// Client certificate CN=alice O=team-a.
    AliceCert,
    /// Token of alice (group team-a).
    AliceToken,
    Root,
    /// Authenticated, no rule.
    Bob,
    Anonymous,
    BadToken,
    ExpiredCert,
    ForeignCert,
}

const CALLERS: &[Caller] = &[
    Caller::AliceCert,
    Caller::AliceToken,
    Caller::Root,
    Caller::Bob,
    Caller::Anonymous,
    Caller::BadToken,
    Caller::ExpiredCert,
    Caller::ForeignCert,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Passed to the kubelet (exactly one request reaches it), whatever it answers.
    Upstream,
    /// Refused with this status, nothing upstream.
    Refused(u16),
    /// TLS handshake refused.
    Handshake,
}

/// The expected outcome, from the catalogue's rules as docs/agent.md states them (not from the
/// agent's code): authentication first, then method, then the read-only port's limits, then
/// the rules by scope.
fn expect(caller: Caller, port: Port, endpoint: Endpoint, other_ns: bool, method: &str) -> Expect {
    let spec = endpoint.spec();
    if port == Port::Secure {
        match caller {
            Caller::ExpiredCert | Caller::ForeignCert => return Expect::Handshake,
            Caller::BadToken => return Expect::Refused(401),
            _ => {}
        }
    }
    let reach = Expect::Upstream;
    if port == Port::ReadOnly {
        let disabled = matches!(
            endpoint,
            Endpoint::Exec
                | Endpoint::Attach
                | Endpoint::PortForward
                | Endpoint::Run
                | Endpoint::ContainerLogs
                | Endpoint::RunningPods
                | Endpoint::Logs
                | Endpoint::Pprof
                | Endpoint::DebugFlags
                | Endpoint::Checkpoint
        );
        if disabled || method != "GET" {
            return Expect::Refused(405);
        }
        if !spec.methods.contains(&method) {
            return Expect::Refused(405);
        }
        let granted = matches!(
            endpoint,
            Endpoint::Pods | Endpoint::Stats | Endpoint::Cadvisor | Endpoint::Healthz
        );
        return if granted { reach } else { Expect::Refused(403) };
    }
    if !spec.methods.contains(&method) {
        return Expect::Refused(405);
    }
    match caller {
        // Allowed, but this agent serves no component (none enabled): 404, and a component's
        // request never goes to the kubelet.
        Caller::Root if endpoint.component().is_some() => Expect::Refused(404),
        Caller::Root => reach,
        Caller::AliceCert | Caller::AliceToken => match spec.scope {
            Scope::Unscoped => reach,
            Scope::NodeWide => Expect::Refused(403),
            Scope::Path if other_ns => Expect::Refused(403),
            _ => reach,
        },
        _ => Expect::Refused(403),
    }
}

#[tokio::test]
async fn authorization_matrix_against_the_simulator() {
    let sim = sim().await;
    let pki = Pki::new("matrix");
    let agent = start_agent(NODE, upstream_of(&sim), &pki, tokens(), rules()).await;
    let alice_cert = pki.client("alice", &["team-a"]);
    let expired = pki.expired_client("alice", &["team-a"]);
    let foreign = foreign_client("alice", &["team-a"]);
    let cred = |c: Caller| match c {
        Caller::AliceCert => Cred::Cert(alice_cert.clone()),
        Caller::AliceToken => Cred::Token("tok-alice-1234567890".into()),
        Caller::Root => Cred::Token("tok-root-1234567890".into()),
        Caller::Bob => Cred::Token("tok-bob-1234567890".into()),
        Caller::Anonymous => Cred::None,
        Caller::BadToken => Cred::Token("not-a-known-token".into()),
        Caller::ExpiredCert => Cred::Cert(expired.clone()),
        Caller::ForeignCert => Cred::Cert(foreign.clone()),
    };
    let read_only = agent.running.read_only_addr.unwrap();
    let mut failures = Vec::new();
    let mut cases = 0;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for endpoint in Endpoint::all() {
        let spec = endpoint.spec();
        let mut methods: Vec<&str> = spec.methods.to_vec();
        for extra in ["DELETE", "HEAD", "GET", "POST"] {
            if !methods.contains(&extra) {
                methods.push(extra);
            }
        }
        let namespaced = spec.scope == Scope::Path;
        for other_ns in if namespaced {
            vec![false, true]
        } else {
            vec![false]
        } {
            let tgt = endpoint_target(
                endpoint,
                if other_ns { OTHER } else { TEAM },
                "web-0",
                "app",
                "ls",
            );
            for port in [Port::Secure, Port::ReadOnly] {
                // The read-only port has no authentication: one anonymous caller suffices.
                let callers: &[Caller] = if port == Port::ReadOnly {
                    &[Caller::Anonymous, Caller::Root]
                } else {
                    CALLERS
                };
                for &caller in callers {
                    for method in &methods {
                        cases += 1;
                        let want = expect(caller, port, endpoint, other_ns, method);
                        let before = sim.request_count();
                        let (addr, tls) = match port {
                            Port::Secure => (agent.running.secure_addr, true),
                            Port::ReadOnly => (read_only, false),
                        };
                        let got = request(addr, tls, &cred(caller), method, &tgt, &[]).await;
                        let reached = sim.request_count() - before;
                        let ok = match (&want, &got) {
                            (Expect::Handshake, Err(_)) => true,
                            // TLS 1.3 reports a refused client certificate on the first read.
                            (Expect::Handshake, Ok(r)) => r.status == 0,
                            (Expect::Refused(s), Ok(r)) => r.status == *s && reached == 0,
                            (Expect::Upstream, Ok(r)) => {
                                reached == 1
                                    && ![401, 403, 405].contains(&r.status)
                                    && r.status != 502
                            }
                            _ => false,
                        };
                        *counts.entry(format!("{want:?}")).or_default() += 1;
                        if !ok {
                            failures.push(format!(
                                "{caller:?} {port:?} {method} {tgt}: want {want:?}, got {:?} (reached upstream {reached}x)",
                                got.as_ref().map(|r| (r.status, r.text().chars().take(120).collect::<String>()))
                            ));
                        }
                    }
                }
            }
        }
    }
    eprintln!("{cases} cases: {counts:?}");
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every outcome kind occurred, so the matrix cannot pass vacuously.
    for kind in [
        "Upstream",
        "Refused(401)",
        "Refused(403)",
        "Refused(405)",
        "Handshake",
    ] {
        assert!(counts.get(kind).copied().unwrap_or(0) > 0, "no {kind} case");
    }
    // The agent used its own (absent) credentials upstream: no caller token ever reached it.
    for r in sim.requests() {
        assert!(r.authorization.is_none(), "{r:?}");
    }
}

#[tokio::test]
async fn forbidden_and_unauthorized_bodies_are_the_kubelets() {
    let sim = sim().await;
    let pki = Pki::new("bodies");
    let agent = start_agent(NODE, upstream_of(&sim), &pki, tokens(), rules()).await;
    let addr = agent.running.secure_addr;
    let r = request(
        addr,
        true,
        &Cred::Token("tok-bob-1234567890".into()),
        "GET",
        "/pods",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(
        r.text(),
        "Forbidden (user=bob, verb=get, resource=nodes, subresource(s)=[pods proxy])\n"
    );
    let r = request(addr, true, &Cred::Token("nope".into()), "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (401, "Unauthorized"));
    // Exec is `create`, also as a GET.
    let r = request(
        addr,
        true,
        &Cred::Token("tok-reader-1234567890".into()),
        "GET",
        "/exec/team-a/p/c?command=ls",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    assert!(r.text().contains("verb=create"), "{}", r.text());
    assert_eq!(sim.request_count(), 0);
}

fn items_namespaces(body: &[u8], list: &str, at: &[&str]) -> Vec<String> {
    let doc: serde_json::Value = serde_json::from_slice(body).unwrap();
    doc[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            at.iter()
                .fold(i, |v, k| &v[*k])
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn pods_stats_and_metrics_are_filtered_to_the_callers_namespaces() {
    let sim = sim().await;
    let pki = Pki::new("filter");
    let agent = start_agent(NODE, upstream_of(&sim), &pki, tokens(), rules()).await;
    let addr = agent.running.secure_addr;
    let alice = Cred::Cert(pki.client("alice", &["team-a"]));
    let root = Cred::Token("tok-root-1234567890".into());
    let team_pods = sim
        .world()
        .pods
        .iter()
        .filter(|p| p.namespace == TEAM)
        .count();
    assert!(team_pods > 0 && team_pods < sim.world().pods.len());

    let r = request(addr, true, &alice, "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let ns = items_namespaces(&r.body, "items", &["metadata", "namespace"]);
    assert_eq!(ns.len(), team_pods);
    assert!(ns.iter().all(|n| n == TEAM), "{ns:?}");
    let r = request(addr, true, &root, "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!(
        items_namespaces(&r.body, "items", &["metadata", "namespace"]).len(),
        sim.world().pods.len()
    );

    let r = request(addr, true, &alice, "GET", "/stats/summary", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(
        doc.get("node").is_none(),
        "node-level section kept for a scoped caller"
    );
    let ns = items_namespaces(&r.body, "pods", &["podRef", "namespace"]);
    assert!(!ns.is_empty() && ns.iter().all(|n| n == TEAM), "{ns:?}");
    let r = request(addr, true, &root, "GET", "/stats/summary", &[])
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(doc.get("node").is_some());

    // Metrics: every sample with a namespace label is team-a's; node-level samples are gone.
    let r = request(addr, true, &alice, "GET", "/metrics/cadvisor", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(!samples.is_empty());
    for line in &samples {
        assert!(line.contains("namespace=\"team-a\""), "{line}");
    }
    let all = request(addr, true, &root, "GET", "/metrics/cadvisor", &[])
        .await
        .unwrap();
    assert!(all.text().contains("namespace=\"team-b\""));
    assert!(all.text().lines().count() > text.lines().count());

    // The read-only port: anonymous, the same scoping.
    let r = request(
        agent.running.read_only_addr.unwrap(),
        false,
        &Cred::None,
        "GET",
        "/pods",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let ns = items_namespaces(&r.body, "items", &["metadata", "namespace"]);
    assert!(!ns.is_empty() && ns.iter().all(|n| n == TEAM));

    // /spec/ is gone, as from kubelets since 1.21: it handed machine, system and boot
    // identifiers to any caller. No rule can grant it (not even root's every endpoint with
    // every namespace), on either port, and it is never asked upstream.
    let before = sim.request_count();
    for path in ["/spec/", "/spec"] {
        let r = request(addr, true, &root, "GET", path, &[]).await.unwrap();
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        let r = request(
            agent.running.read_only_addr.unwrap(),
            false,
            &Cred::None,
            "GET",
            path,
            &[],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert!(!r.text().contains("machine_id"));
    }
    assert_eq!(sim.request_count(), before);
}

#[tokio::test]
async fn container_logs_of_another_namespace_never_reach_the_kubelet() {
    let sim = sim().await;
    let pki = Pki::new("logs");
    let agent = start_agent(NODE, upstream_of(&sim), &pki, tokens(), rules()).await;
    let alice = Cred::Cert(pki.client("alice", &["team-a"]));
    let addr = agent.running.secure_addr;
    // Path tricks normalise to team-b, and are refused as team-b.
    for target in [
        "/containerLogs/team-b/web-0/app",
        "/containerLogs/team-a/../team-b/web-0/app",
        "/containerLogs/./team-b/web-0/app",
        "/containerLogs/team-%62/web-0/app",
    ] {
        let r = request(addr, true, &alice, "GET", target, &[])
            .await
            .unwrap();
        assert!(r.status == 403 || r.status == 400, "{target}: {}", r.status);
    }
    assert_eq!(sim.request_count(), 0, "{:?}", sim.requests());
    let r = request(
        addr,
        true,
        &alice,
        "GET",
        "/containerLogs/team-a/web-0/app?tailLines=3",
        &[],
    )
    .await
    .unwrap();
    assert_ne!(r.status, 403);
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, "/containerLogs/team-a/web-0/app");
    assert_eq!(reqs[0].query.as_deref(), Some("tailLines=3"));
}

#[tokio::test]
async fn websocket_exec_works_with_create_and_is_refused_to_readers() {
    let sim = sim().await;
    let pki = Pki::new("ws");
    let agent = start_agent(NODE, upstream_of(&sim), &pki, tokens(), rules()).await;
    let addr = agent.running.secure_addr;
    let uri = format!("wss://agent/exec/{TEAM}/web-0/app?command=echo&command=hello&stdout=true");

    // Allowed: client certificate, v5 channel protocol; `echo hello` answers on stdout (1).
    let alice = Cred::Cert(pki.client("alice", &["team-a"]));
    let mut req = uri.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "v5.channel.k8s.io".parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls_stream(addr, &alice).await)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let mut stdout = Vec::new();
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Binary(b) = msg
            && b.first() == Some(&1)
        {
            stdout.extend_from_slice(&b[1..]);
        }
    }
    assert_eq!(String::from_utf8_lossy(&stdout), "hello\n");

    // Allowed: the token in the bearer subprotocol (browsers); the token never goes upstream.
    let token = "tok-alice-1234567890";
    let proto = format!(
        "base64url.bearer.authorization.k8s.io.{}, v4.channel.k8s.io",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
    );
    let mut req = uri.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", proto.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls_stream(addr, &Cred::None).await)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "v4.channel.k8s.io"
    );
    let _ = ws.close(None).await;
    for r in sim.requests() {
        let protocols = r.stream_protocols.unwrap_or_default();
        assert!(!protocols.contains("bearer"), "{protocols}");
        assert!(r.authorization.is_none());
    }

    // Refused: a reader (pods and logs only), the WebSocket GET included; nothing upstream.
    sim.clear_requests();
    let reader = Cred::Token("tok-reader-1234567890".into());
    for method in ["GET", "POST"] {
        let r = request(
            addr,
            true,
            &reader,
            method,
            &format!("/exec/{TEAM}/web-0/app?command=ls"),
            &[
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 403, "{method}");
    }
    // And alice in another namespace.
    let r = request(
        addr,
        true,
        &Cred::Token(token.into()),
        "GET",
        &format!("/exec/{OTHER}/web-0/app?command=ls"),
        &[("connection", "Upgrade"), ("upgrade", "websocket")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(sim.request_count(), 0);
}

#[tokio::test]
async fn spdy_exec_is_spliced_only_after_the_kubelet_switches() {
    let sim = sim().await;
    let pki = Pki::new("spdy");
    let agent = start_agent(NODE, upstream_of(&sim), &pki, tokens(), rules()).await;
    let alice = Cred::Cert(pki.client("alice", &["team-a"]));
    let mut s = tls_stream(agent.running.secure_addr, &alice).await;
    let head = format!(
        "POST /exec/{TEAM}/web-0/app?command=sh&stdin=true&stdout=true HTTP/1.1\r\nHost: agent\r\n\
         Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\
         Content-Length: 0\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response head");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: spdy/3.1"),
        "{head}"
    );
    // The simulator echoes raw bytes once switched.
    s.write_all(b"ping-through-the-tunnel").await.unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < 23 {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        echoed.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&echoed, b"ping-through-the-tunnel");

    // A refused upgrade (the kubelet cannot negotiate the protocol) is relayed and the
    // connection closed: no tunnel.
    let mut s = tls_stream(agent.running.secure_addr, &alice).await;
    let head = format!(
        "POST /exec/{TEAM}/web-0/app?command=sh HTTP/1.1\r\nHost: agent\r\nConnection: Upgrade\r\n\
         Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v99.unknown\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut all)).await;
    let text = String::from_utf8_lossy(&all);
    assert!(!text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
}

#[tokio::test]
async fn upstream_down_is_502_and_the_agent_stays_healthy() {
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let pki = Pki::new("down");
    let agent = start_agent(NODE, http_upstream(closed), &pki, tokens(), rules()).await;
    let root = Cred::Token("tok-root-1234567890".into());
    let r = request(agent.running.secure_addr, true, &root, "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert!(r.text().contains("kubelet"), "{}", r.text());
    let health = agent.running.healthz_addr.unwrap();
    let r = request(health, false, &Cred::None, "GET", "/healthz", &[])
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let r = request(health, false, &Cred::None, "GET", "/readyz", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert!(r.text().contains("kubelet not reachable"));
    let r = request(health, false, &Cred::None, "GET", "/metrics", &[])
        .await
        .unwrap();
    let m = r.text();
    assert!(
        m.contains("nodegate_agent_upstream_errors_total{kind=\"connect\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(
            "nodegate_agent_requests_total{code=\"502\",decision=\"allow\",endpoint=\"pods\"} 1"
        ),
        "{m}"
    );
}

/// What the fake kubelet of [`metrics_bodies_the_filter_cannot_read_never_reach_the_caller`]
/// answers on `/metrics/cadvisor`, whatever it was asked for.
#[derive(Clone, Copy)]
enum Answer {
    Gzip,
    Protobuf,
    Zstd,
}

const EXPOSITION: &str = "# HELP m A metric.\n# TYPE m gauge\nm{namespace=\"team-a\",pod=\"a\"} 1\nm{namespace=\"team-b\",pod=\"b\"} 2\nm 3\n";

/// A kubelet that ignores content negotiation: the agent asks for what the caller prefers that
/// its filters read (protobuf, then text) uncompressed, decodes a gzip answer anyway, refuses a
/// zstd answer (502, counted) and cuts a body labelled protobuf that is not, relaying not a byte
/// of either.
#[tokio::test]
async fn metrics_bodies_the_filter_cannot_read_never_reach_the_caller() {
    use async_compression::tokio::bufread::GzipEncoder;
    use http_body_util::Full;
    use std::sync::{Arc, Mutex};
    let mut gz = Vec::new();
    GzipEncoder::new(EXPOSITION.as_bytes())
        .read_to_end(&mut gz)
        .await
        .unwrap();
    let answer = Arc::new(Mutex::new(Answer::Gzip));
    let asked: Arc<Mutex<Vec<http::HeaderMap>>> = Arc::default();
    let (answer_k, asked_k) = (answer.clone(), asked.clone());
    let kubelet = fake_kubelet(move |req: http::Request<hyper::body::Incoming>| {
        asked_k.lock().unwrap().push(req.headers().clone());
        let (content_type, encoding, body): (&str, Option<&str>, Vec<u8>) =
            match *answer_k.lock().unwrap() {
                Answer::Gzip => ("text/plain; version=0.0.4", Some("gzip"), gz.clone()),
                Answer::Protobuf => (
                    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited",
                    None,
                    b"namespace=\"team-b\" secret".to_vec(),
                ),
                Answer::Zstd => (
                    "text/plain; version=0.0.4",
                    Some("zstd"),
                    b"namespace=\"team-b\" secret".to_vec(),
                ),
            };
        let mut resp = http::Response::new(Full::new(bytes::Bytes::from(body)));
        resp.headers_mut()
            .insert("content-type", content_type.parse().unwrap());
        if let Some(e) = encoding {
            resp.headers_mut()
                .insert("content-encoding", e.parse().unwrap());
        }
        resp
    })
    .await;
    let pki = Pki::new("negotiation");
    let agent = start_agent(NODE, http_upstream(kubelet), &pki, tokens(), rules()).await;
    let alice = Cred::Token("tok-alice-1234567890".into());
    // What Prometheus sends with native histograms on: protobuf first, and gzip.
    let prometheus = [
        (
            "accept",
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
        ),
        ("accept-encoding", "gzip, zstd"),
    ];
    let addr = agent.running.secure_addr;

    // gzip although identity was asked for: decoded, filtered, re-encoded for the caller.
    let r = request(addr, true, &alice, "GET", "/metrics/cadvisor", &prometheus)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["content-encoding"], "gzip");
    let mut text = String::new();
    async_compression::tokio::bufread::GzipDecoder::new(r.body.as_slice())
        .read_to_string(&mut text)
        .await
        .unwrap();
    assert_eq!(
        text,
        "# HELP m A metric.\n# TYPE m gauge\nm{namespace=\"team-a\",pod=\"a\"} 1\n"
    );
    let seen = asked.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["accept-encoding"], "identity", "{seen:?}");
    // The caller prefers protobuf: asked for first, text as the fallback the filter also reads.
    let accept = seen["accept"].to_str().unwrap();
    assert!(
        accept.starts_with("application/vnd.google.protobuf") && accept.contains("text/plain"),
        "{seen:?}"
    );
    assert!(!seen.contains_key("authorization"), "{seen:?}");

    // Without gzip from the caller: plain text.
    let r = request(addr, true, &alice, "GET", "/metrics/cadvisor", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("content-encoding"));
    assert_eq!(r.text().lines().count(), 3, "{}", r.text());

    // zstd (no decoder): 502 before anything is relayed.
    *answer.lock().unwrap() = Answer::Zstd;
    let r = request(addr, true, &alice, "GET", "/metrics/cadvisor", &prometheus)
        .await
        .unwrap();
    assert_eq!(r.status, 502, "zstd: {}", r.text());
    assert!(!r.text().contains("secret") && !r.text().contains("team-b"));
    // A body labelled protobuf that is not: the protobuf filter reads it as it streams, so the
    // answer has begun (200) when the first bad byte is found; it is cut there, and not one byte
    // of the body reaches the caller.
    *answer.lock().unwrap() = Answer::Protobuf;
    match request(addr, true, &alice, "GET", "/metrics/cadvisor", &prometheus).await {
        Err(_) => {} // cut: nothing relayed
        Ok(r) => assert!(
            r.status == 502 || (!r.text().contains("secret") && !r.text().contains("team-b")),
            "protobuf: {} {}",
            r.status,
            r.text()
        ),
    }
    let m = request(
        agent.running.healthz_addr.unwrap(),
        false,
        &Cred::None,
        "GET",
        "/metrics",
        &[],
    )
    .await
    .unwrap()
    .text();
    assert!(
        m.contains("nodegate_agent_upstream_errors_total{kind=\"unfilterable\"} 1"),
        "{m}"
    );
}
