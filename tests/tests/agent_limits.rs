//! What a caller's connections may hold (issue 15 §3): an idle HTTP/2 connection is closed
//! after the idle timeout; slowloris clients on HTTP/1.1 (headers trickled byte by byte) and
//! on HTTP/2 (no preface, or a stream whose headers never end) hold a slot only until the idle
//! timeout, past the connection limit new connections are refused, and afterwards a normal
//! client is answered; a request in flight (a slow upstream body) is never cut by the idle
//! timeout, on HTTP/1.1 or HTTP/2, nor is a quiet WebSocket attach. And the JSON filter fails closed on a kubelet answer that
//! lacks its list (issue 15 §2).
//!
//! The agent runs in-process with short timeouts, in front of a plain-HTTP fake kubelet;
//! HTTP/2 is spoken by hyper's client over TLS with ALPN `h2`, HTTP/1.1 by curl where a real
//! client fits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use nodegate_agent::authn::{Authenticator, AuthnSettings};
use nodegate_agent::config::ConfigStore;
use nodegate_agent::connection::ConnectionSettings;
use nodegate_agent::metrics::Metrics;
use nodegate_agent::server::{self, Components, Running, Settings};
use nodegate_agent::tls::{ReloadingTls, TlsSettings};
use nodegate_agent::upstream::Upstream;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROOT: &str = "tok-root-1234567890";
/// Short, so the tests wait seconds, not minutes.
const IDLE: Duration = Duration::from_millis(1500);
/// Long enough that a connection seen closed before it was closed by the idle timeout.
const PATIENCE: Duration = Duration::from_secs(15);

/// A fake kubelet: `/containerLogs/...` streams 8 lines (or `tailLines`) 400 ms apart (3.2 s,
/// longer than the idle timeout), everything else answers `ok` at once.
async fn slow_kubelet() -> SocketAddr {
    fake_kubelet(|req: http::Request<hyper::body::Incoming>| {
        let slow = req.uri().path().starts_with("/containerLogs/");
        // `tailLines=N` asks for N lines instead of 8.
        let lines = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("tailLines=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or(8);
        let chunks = if slow { lines } else { 1 };
        let body = futures::stream::unfold(0u32, move |i| async move {
            if i >= chunks {
                return None;
            }
            if slow {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            let line = if slow {
                format!("line {i}\n")
            } else {
                "ok".to_string()
            };
            Some((
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(line))),
                i + 1,
            ))
        });
        http::Response::builder()
            .header("content-type", "text/plain")
            .body(StreamBody::new(body))
            .unwrap()
    })
    .await
}

struct Agent {
    running: Running,
    _pki: Pki,
}

async fn agent(upstream: SocketAddr, max_connections: usize) -> Agent {
    agent_before(http_upstream(upstream), max_connections).await
}

async fn agent_before(
    upstream: nodegate_agent::upstream::UpstreamSettings,
    max_connections: usize,
) -> Agent {
    agent_with(
        upstream,
        ConnectionSettings {
            max_connections,
            idle_timeout: IDLE,
            ..Default::default()
        },
    )
    .await
}

async fn agent_with(
    upstream: nodegate_agent::upstream::UpstreamSettings,
    connections: ConnectionSettings,
) -> Agent {
    let pki = Pki::new("limits");
    let tls = ReloadingTls::new(TlsSettings {
        cert_file: None,
        key_file: None,
        client_ca_file: Some(pki.ca_file.clone()),
        node_name: NODE.into(),
        node_ips: vec!["127.0.0.1".parse().unwrap()],
        alpn_protocols: TlsSettings::default_alpn(),
    })
    .unwrap();
    let authenticator = Authenticator::new(
        Arc::new(FakeReviewer(tokens())),
        AuthnSettings {
            x509_enabled: true,
            ..Default::default()
        },
    );
    let config = ConfigStore::new();
    config.publish(spec_of(rules()));
    let mut settings = Settings::loopback(NODE);
    settings.connections = connections;
    let running = server::start(
        settings,
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
    .unwrap();
    Agent { running, _pki: pki }
}

/// The metric once it reached `want` (the agent counts a closed connection just after the
/// client sees it close), or its value after 5 s.
async fn metric_reaches(running: &Running, line_start: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = metric(running, line_start);
        if value == want || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(running: &Running, line_start: &str) -> f64 {
    let text = String::from_utf8(running.metrics.render()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An HTTP/2 connection (TLS, ALPN h2 only) to the secure port.
async fn h2_connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = client_tls_alpn(&Cred::Token(ROOT.into()), &[b"h2"])
        .connect(
            rustls_pki_types::ServerName::try_from("agent").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (u16, String) {
    let req = http::Request::builder()
        .uri(format!("https://agent{path}"))
        .header("authorization", format!("Bearer {ROOT}"))
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

const LOGS: &str = "/containerLogs/team-a/web/app?follow=true";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let agent = agent(slow_kubelet().await, 64).await;
    let (mut sender, conn) = h2_connect(agent.running.secure_addr).await;
    let (status, body) = h2_get(&mut sender, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    // Within the timeout the connection stays open and serves.
    tokio::time::sleep(IDLE / 2).await;
    assert!(!sender.is_closed());
    let (status, _) = h2_get(&mut sender, "/healthz").await;
    assert_eq!(status, 200);
    let idle_since = Instant::now();
    // Then the agent closes it (GOAWAY, then the connection ends).
    let ended = tokio::time::timeout(PATIENCE, conn)
        .await
        .expect("the agent kept an idle HTTP/2 connection open");
    assert!(
        ended.unwrap().is_ok(),
        "the connection ended cleanly (GOAWAY)"
    );
    assert!(
        idle_since.elapsed() >= IDLE,
        "closed before the idle timeout"
    );
    assert!(sender.is_closed());
    assert_eq!(
        metric_reaches(
            &agent.running,
            "nodegate_agent_idle_connections_closed_total{listener=\"secure\"}",
            1.0
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_is_never_cut_by_the_idle_timeout() {
    let agent = agent(slow_kubelet().await, 64).await;
    let want: String = (0..8).map(|i| format!("line {i}\n")).collect();

    // HTTP/2: the followed log takes 3.2 s, twice the idle timeout.
    let (mut sender, conn) = h2_connect(agent.running.secure_addr).await;
    let started = Instant::now();
    let (status, body) = h2_get(&mut sender, LOGS).await;
    assert_eq!((status, body.as_str()), (200, want.as_str()));
    assert!(started.elapsed() > IDLE, "the upstream body was not slow");
    // Once it ended, the connection is idle and closed.
    tokio::time::timeout(PATIENCE, conn)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // HTTP/1.1, with curl over TLS.
    let addr = agent.running.secure_addr;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-k", "--http1.1", "-H"])
            .arg(format!("Authorization: Bearer {ROOT}"))
            .arg(format!("https://127.0.0.1:{}{LOGS}", addr.port()))
            .output()
            .expect("curl must be installed")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
}

/// A plain-HTTP slowloris: the request line and headers, one byte every 100 ms.
async fn trickle_headers(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"G").await.unwrap();
    tcp
}

/// Sends one more byte of a never-ending header every 100 ms until the agent closes the
/// connection; returns how long that took.
async fn trickle_until_closed(mut tcp: tokio::net::TcpStream) -> Duration {
    let started = Instant::now();
    let header = b"ET /healthz HTTP/1.1\r\nHost: agent\r\nX-Slow: ";
    let mut i = 0usize;
    let mut buf = [0u8; 512];
    loop {
        let byte = header.get(i).copied().unwrap_or(b'a');
        i += 1;
        if tcp.write_all(&[byte]).await.is_err() {
            return started.elapsed();
        }
        // A closed connection reads as EOF (or a reset).
        match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the slow client was never closed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_slowloris_holds_the_agent_only_until_the_idle_timeout() {
    const MAX: usize = 4;
    let agent = agent(slow_kubelet().await, MAX).await;
    let addr = agent.running.read_only_addr.unwrap();
    let mut slow = Vec::new();
    for _ in 0..MAX {
        slow.push(trickle_headers(addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Every slot is held: a normal client is refused at once (closed, no answer).
    let refused = request(addr, false, &Cred::None, "GET", "/healthz", &[]).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        metric(
            &agent.running,
            "nodegate_agent_connections_refused_total{listener=\"read-only\"}"
        ),
        1.0
    );
    // The slow clients are closed by the idle timeout, not left to trickle.
    let closed = futures::future::join_all(slow.into_iter().map(trickle_until_closed)).await;
    for took in closed {
        assert!(took < PATIENCE, "{took:?}");
    }
    // And a normal client (curl) is answered again.
    let port = addr.port();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-w", " %{http_code}"])
            .arg(format!("http://127.0.0.1:{port}/healthz"))
            .output()
            .expect("curl must be installed")
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok 200");
}

/// HTTP/2 frames written by hand: the client preface, an empty SETTINGS, and a HEADERS frame
/// for stream 1 without END_HEADERS (`:method GET`, `:path /`, `:scheme https`, HPACK
/// indexed), whose CONTINUATION never comes.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: &[u8] = &[0, 0, 0, 0x4, 0, 0, 0, 0, 0];
const UNFINISHED_HEADERS: &[u8] = &[0, 0, 3, 0x1, 0x1, 0, 0, 0, 1, 0x82, 0x84, 0x87];

/// Reads (discarding the agent's frames) until the agent closes the connection.
async fn read_until_closed(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the agent kept a stalled HTTP/2 connection open"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_slowloris_holds_the_agent_only_until_the_idle_timeout() {
    const MAX: usize = 2;
    let agent = agent(slow_kubelet().await, MAX).await;
    let addr = agent.running.secure_addr;
    let connect = || async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = client_tls_alpn(&Cred::None, &[b"h2"])
            .connect(
                rustls_pki_types::ServerName::try_from("agent").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls
    };
    // One never sends its preface; one sends a stream whose headers never end.
    let silent = connect().await;
    let mut unfinished = connect().await;
    unfinished.write_all(PREFACE).await.unwrap();
    unfinished.write_all(SETTINGS).await.unwrap();
    unfinished.write_all(UNFINISHED_HEADERS).await.unwrap();
    unfinished.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Both slots held: a new connection is closed at once.
    let refused = request(
        addr,
        true,
        &Cred::Token(ROOT.into()),
        "GET",
        "/healthz",
        &[],
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        metric(
            &agent.running,
            "nodegate_agent_connections_refused_total{listener=\"secure\"}"
        ),
        1.0
    );
    let (a, b) = tokio::join!(read_until_closed(silent), read_until_closed(unfinished));
    assert!(
        a >= IDLE / 2 && b >= IDLE / 2,
        "closed too early: {a:?} {b:?}"
    );
    // A normal HTTP/2 client is answered.
    let (mut sender, _conn) = h2_connect(addr).await;
    let (status, body) = h2_get(&mut sender, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(
        metric_reaches(
            &agent.running,
            "nodegate_agent_idle_connections_closed_total{listener=\"secure\"}",
            2.0
        )
        .await,
        2.0
    );
}

/// The JSON filter fails closed (issue 15 §2): a kubelet answer that lacks its list (`{}`, a
/// PodList without `items`, a summary without `pods`) is 502 for a namespace-scoped caller,
/// and nothing of it reaches the caller; what a real kubelet sends for an empty node
/// (`"items":null`, `"pods":[]`) still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_answer_without_its_list_is_refused() {
    let answers: &[(&str, &str, u16)] = &[
        ("/pods", r#"{}"#, 502),
        (
            "/pods",
            r#"{"kind":"PodList","apiVersion":"v1","metadata":{"leak":"x1"}}"#,
            502,
        ),
        ("/stats/summary", r#"{"node":{"nodeName":"leak-x2"}}"#, 502),
        ("/runningpods/", r#"{"kind":"PodList","leak":"x3"}"#, 502),
        (
            "/pods",
            r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":null}"#,
            200,
        ),
        (
            "/stats/summary",
            r#"{"node":{"nodeName":"n"},"pods":[]}"#,
            200,
        ),
    ];
    for (path, answer, want) in answers {
        let answer = answer.to_string();
        let kubelet = fake_kubelet(move |_req: http::Request<hyper::body::Incoming>| {
            http::Response::builder()
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(Bytes::from(answer.clone())))
                .unwrap()
        })
        .await;
        let agent = agent(kubelet, 64).await;
        let reply = request(
            agent.running.secure_addr,
            true,
            &Cred::Token("tok-alice-1234567890".into()),
            "GET",
            path,
            &[],
        )
        .await
        .unwrap();
        assert_eq!(reply.status, *want, "{path}: {}", reply.text());
        assert!(!reply.text().contains("leak"), "{}", reply.text());
        if *want == 200 {
            assert!(!reply.text().contains("node"), "{}", reply.text());
        }
    }
}

/// Request headers are capped at `--max-header-bytes` (64 KiB by default) on both protocols:
/// a 48 KiB header is served, an 80 KiB one refused (HTTP/1.1: 431; HTTP/2: the stream or
/// connection is refused). Before, HTTP/1.1 took ~400 KiB (hyper's buffer) and HTTP/2 16 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let agent = agent(slow_kubelet().await, 64).await;
    let addr = agent.running.secure_addr;
    for (size, want) in [(48 * 1024, "200"), (80 * 1024, "431")] {
        let big = "a".repeat(size);
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args([
                    "-sS",
                    "-k",
                    "--http1.1",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg("-H")
                .arg(format!("Authorization: Bearer {ROOT}"))
                .arg("-H")
                .arg(format!("X-Big: {big}"))
                .arg(format!("https://127.0.0.1:{}/healthz", addr.port()))
                .output()
                .expect("curl must be installed")
        })
        .await
        .unwrap();
        let code = String::from_utf8_lossy(&out.stdout);
        if want == "200" {
            assert_eq!(code, "200", "HTTP/1.1, {size} bytes");
        } else {
            // 431, or the connection reset under curl while it was still sending the header
            // (hyper answers and closes as soon as its buffer is full): refused either way.
            let reset = code == "000" && !out.status.success();
            assert!(
                code == want || reset,
                "HTTP/1.1, {size} bytes: {code} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let (mut sender, _conn) = h2_connect(addr).await;
        let req = http::Request::builder()
            .uri("https://agent/healthz")
            .header("authorization", format!("Bearer {ROOT}"))
            .header("x-big", "a".repeat(size))
            .body(Empty::new())
            .unwrap();
        let status = match sender.send_request(req).await {
            Ok(resp) => resp.status().as_u16().to_string(),
            Err(e) => format!("refused: {e}"),
        };
        if want == "200" {
            assert_eq!(status, "200", "HTTP/2, {size} bytes");
        } else {
            assert_ne!(status, "200", "HTTP/2, {size} bytes");
        }
    }
}

/// An upgraded connection (WebSocket attach through kubelet-sim, which echoes stdin to
/// stdout) is a stream of its own: quiet for twice the idle timeout, it still echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_websocket_attach_outlives_the_idle_timeout() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let sim = sim().await;
    let agent = agent_before(upstream_of(&sim), 64).await;
    let addr = agent.running.secure_addr;
    let mut req = format!("wss://agent/attach/{TEAM}/web-0/app?stdin=true&stdout=true")
        .into_client_request()
        .unwrap();
    let headers = req.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        "v4.channel.k8s.io".parse().unwrap(),
    );
    headers.insert("authorization", format!("Bearer {ROOT}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls_stream(addr, &Cred::None).await)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let mut echoed = Vec::new();
    for word in ["first", "second"] {
        let mut frame = vec![0u8];
        frame.extend_from_slice(word.as_bytes());
        ws.send(Message::Binary(frame.into())).await.unwrap();
        loop {
            let msg = tokio::time::timeout(PATIENCE, ws.next())
                .await
                .expect("no echo")
                .expect("the stream ended")
                .expect("the stream failed");
            // Channel 1 (stdout); an empty frame only announces the channel.
            if let Message::Binary(b) = msg
                && b.first() == Some(&1)
                && b.len() > 1
            {
                echoed.push(String::from_utf8_lossy(&b[1..]).into_owned());
                break;
            }
        }
        tokio::time::sleep(IDLE * 2).await;
    }
    assert_eq!(echoed, ["first", "second"]);
    let _ = ws.close(None).await;
}

/// HTTP/2 keep-alive: a client that stops answering PINGs is closed after the keep-alive
/// interval and timeout (1 s each here), even with a request in flight (a 12 s followed log),
/// which the idle timeout (60 s here) would never cut. The client is written by hand: hyper's
/// answers PINGs by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_answering_pings_is_closed() {
    let agent = agent_with(
        http_upstream(slow_kubelet().await),
        ConnectionSettings {
            idle_timeout: Duration::from_secs(60),
            keep_alive_interval: Duration::from_secs(1),
            keep_alive_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(agent.running.secure_addr)
        .await
        .unwrap();
    let mut tls = client_tls_alpn(&Cred::None, &[b"h2"])
        .connect(
            rustls_pki_types::ServerName::try_from("agent").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // HPACK by hand: :method GET, :scheme https (indexed); :path, :authority and
    // authorization as literals with their static name indexes (4, 1, 23).
    let literal = |index: u8, value: &str| {
        let mut b = vec![0x40 | index, u8::try_from(value.len()).unwrap()];
        b.extend_from_slice(value.as_bytes());
        b
    };
    let mut block = vec![0x82, 0x87];
    block.extend(literal(
        4,
        "/containerLogs/team-a/web-0/app?follow=true&tailLines=30",
    ));
    block.extend(literal(1, "agent"));
    block.extend(literal(23, &format!("Bearer {ROOT}")));
    let len = u32::try_from(block.len()).unwrap().to_be_bytes();
    // HEADERS, END_STREAM | END_HEADERS, stream 1.
    let mut headers = vec![len[1], len[2], len[3], 0x1, 0x5, 0, 0, 0, 1];
    headers.extend(block);
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(SETTINGS).await.unwrap();
    tls.write_all(&headers).await.unwrap();
    tls.flush().await.unwrap();
    // Read (never answering a PING) until the agent closes the connection.
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the agent kept a connection whose PINGs go unanswered"),
        }
    }
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&received);
    // The log had begun (the request was in flight) and was cut long before its 12 s.
    assert!(text.contains("line 0"), "no log line before the close");
    assert!(
        !text.contains("line 29"),
        "the whole log arrived: no keep-alive close"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// The HTTP/2 limits are announced in the agent's SETTINGS (read from a raw connection):
/// MAX_CONCURRENT_STREAMS (0x3) is `--http2-max-concurrent-streams` (100) and
/// MAX_HEADER_LIST_SIZE (0x6) is `--max-header-bytes` (65536); hyper's defaults were 200 and
/// 16384.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_announce_the_stream_and_header_limits() {
    let agent = agent_with(
        http_upstream(slow_kubelet().await),
        ConnectionSettings::default(),
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(agent.running.secure_addr)
        .await
        .unwrap();
    let mut tls = client_tls_alpn(&Cred::None, &[b"h2"])
        .connect(
            rustls_pki_types::ServerName::try_from("agent").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(SETTINGS).await.unwrap();
    tls.flush().await.unwrap();
    // The server's first frame is its SETTINGS.
    let mut head = [0u8; 9];
    tokio::time::timeout(PATIENCE, tls.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (head[3], head[4]),
        (0x4, 0),
        "not a SETTINGS frame: {head:?}"
    );
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    tls.read_exact(&mut payload).await.unwrap();
    let settings: std::collections::BTreeMap<u16, u32> = payload
        .chunks_exact(6)
        .map(|p| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
            )
        })
        .collect();
    assert_eq!(settings.get(&0x3), Some(&100), "{settings:?}");
    assert_eq!(settings.get(&0x6), Some(&65536), "{settings:?}");
}
