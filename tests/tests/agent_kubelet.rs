//! nodegate-agent in front of each real kubelet of the local cluster (`node-1`, kubelet 1.37, and
//! `node-2`, kubelet 1.35): the agent reaches it with the API server's kubelet client
//! certificate, verifying the kubelet's self-signed serving certificate by its own file; callers
//! are users certified by the cluster's CA. `/pods` arrives filtered, container logs and exec
//! work in scope and are refused out of it, on both kubelet versions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use futures::StreamExt;
use nodegate_crds::catalogue::{Scope, WEBSOCKET_V5_SINCE, kubelet_minor};
use nodegate_crds::{Endpoint, Port};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{NODE_NAME, NODE2_NAME};
use rustls_pki_types::ServerName;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn real_kubelet_through_the_agent_filters_pods_and_scopes_logs_and_exec() {
    through_the_agent(NODE_NAME).await;
}

/// The same against node-2's older kubelet (1.35).
#[tokio::test]
async fn older_kubelet_through_the_agent_filters_pods_and_scopes_logs_and_exec() {
    through_the_agent(NODE2_NAME).await;
}

async fn through_the_agent(node: &str) {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let Some(state) = cluster.local_state_dir().unwrap() else {
        return;
    };
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let cmd = ["sh", "-c", "echo line-one; echo line-two; sleep 3600"];
    let (ns_a, ns_b) =
        two_namespaces_running_on(&cluster, ("agent-a", "agent-b"), "web", node, &cmd).await;
    step("pods running");
    let (a, b) = (ns_a.name().to_string(), ns_b.name().to_string());

    let suffix = rand_suffix();
    let team_group = format!("agent-team-{suffix}");
    let every: Vec<Endpoint> = Endpoint::all().collect();
    let rules = vec![
        rule(
            "team",
            vec![group(&team_group)],
            &every,
            namespaces(&[&a]),
            &[Port::Secure],
        ),
        rule(
            "root",
            vec![user(&format!("root-{suffix}"))],
            &every,
            all_namespaces(),
            &[Port::Secure],
        ),
        rule(
            "reader",
            vec![user(&format!("reader-{suffix}"))],
            &[Endpoint::Pods, Endpoint::ContainerLogs],
            namespaces(&[&a]),
            &[Port::Secure],
        ),
    ];
    let ip = node_ip_of(&cluster, node).await;
    let version = kube::Api::<k8s_openapi::api::core::v1::Node>::all(cluster.admin().unwrap())
        .get(node)
        .await
        .unwrap()
        .status
        .unwrap()
        .node_info
        .unwrap()
        .kubelet_version;
    let minor = kubelet_minor(&version).unwrap();
    let agent = start_agent_with(
        node,
        kubelet_upstream_of(&state, node, &ip),
        state.join("pki/ca.crt"),
        Arc::new(FakeReviewer(BTreeMap::new())),
        rules,
    )
    .await;
    let addr = agent.running.secure_addr;
    step("agent started");
    let creds = cluster
        .user_credentials(&format!("member-{suffix}"), &[&team_group])
        .await
        .unwrap();
    let member = Cred::Cert(client_cert_from_pem(&creds.certificate_pem, &creds.key_pem));
    let creds = cluster
        .user_credentials(&format!("reader-{suffix}"), &[])
        .await
        .unwrap();
    let reader = Cred::Cert(client_cert_from_pem(&creds.certificate_pem, &creds.key_pem));

    step("credentials");
    // /pods from the real kubelet, filtered to namespace a.
    let r = request(addr, true, &member, "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let pods: Vec<(String, String)> = doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                p["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(pods, vec![(a.clone(), "web".to_string())]);

    // Logs in scope come from the kubelet; out of scope they are refused.
    let r = request(
        addr,
        true,
        &reader,
        "GET",
        &format!("/containerLogs/{a}/web/main"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "line-one\nline-two\n");
    let r = request(
        addr,
        true,
        &reader,
        "GET",
        &format!("/containerLogs/{b}/web/main"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    // Node-wide endpoints need `all`.
    let r = request(addr, true, &member, "GET", "/configz", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    // Metrics of the real kubelet, filtered: every namespaced sample is namespace a's.
    let r = request(
        addr,
        true,
        &member,
        "GET",
        "/metrics/cadvisor",
        &[("accept-encoding", "identity")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    for line in r
        .text()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("namespace="))
    {
        assert!(line.contains(&format!("namespace=\"{a}\"")), "{line}");
    }

    step("pods, logs, metrics");
    // exec over WebSocket: the member (create on exec) runs a command in namespace a. Offered
    // like kubectl does (v5, then v4): the agent forwards the list, and the kubelet picks v5
    // from 1.36 on, v4 before (its runtime's stream server speaks no v5).
    let uri = format!(
        "wss://agent/exec/{a}/web/main?command=echo&command=through-nodegate&output=1&stdout=true"
    );
    let websocket = |protocols: &'static str| {
        let mut req = uri.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().unwrap());
        let member = member.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let tls = client_tls(&member)
                .connect(ServerName::try_from("agent").unwrap(), tcp)
                .await
                .unwrap();
            tokio_tungstenite::client_async(req, tls).await
        }
    };
    let (mut ws, resp) = websocket("v5.channel.k8s.io, v4.channel.k8s.io")
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let expected = if minor >= WEBSOCKET_V5_SINCE {
        "v5.channel.k8s.io"
    } else {
        "v4.channel.k8s.io"
    };
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        expected,
        "the subprotocol kubelet {version} chose"
    );
    let mut stdout = Vec::new();
    let read = async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Binary(b) = msg
                && b.first() == Some(&1)
            {
                stdout.extend_from_slice(&b[1..]);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&stdout), "through-nodegate\n");
    // v5 alone: a newer kubelet speaks it, an older one refuses the handshake (a bare 403 from
    // its runtime's stream server, which the agent relays).
    match websocket("v5.channel.k8s.io").await {
        Ok((_, resp)) => {
            assert!(minor >= WEBSOCKET_V5_SINCE, "kubelet {version} took v5");
            assert_eq!(resp.status(), 101);
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert!(minor < WEBSOCKET_V5_SINCE, "kubelet {version}: {resp:?}");
            assert_eq!(resp.status(), 403);
        }
        Err(e) => panic!("v5 alone on kubelet {version}: {e}"),
    }

    step("exec");
    // The reader may read logs but not exec, also with a WebSocket GET.
    let r = request(
        addr,
        true,
        &reader,
        "GET",
        &format!("/exec/{a}/web/main?command=id&stdout=true"),
        &[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-protocol", "v5.channel.k8s.io"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    assert!(r.text().contains("verb=create"));

    // exec over SPDY/3.1 (what older kubectl speaks): the member's upgrade is answered by the
    // real kubelet's 101, relayed once it switched; the reader's is refused by the agent.
    let spdy = |cred: Cred| {
        let head = format!(
            "POST /exec/{a}/web/main?command=true&output=1 HTTP/1.1\r\nHost: agent\r\n\
             Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
        );
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tls_stream(addr, &cred).await;
            s.write_all(head.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => break,
                }
                if got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() > 150 {
                    break;
                }
            }
            String::from_utf8_lossy(&got).to_ascii_lowercase()
        }
    };
    let head = spdy(member.clone()).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );
    let head = spdy(reader.clone()).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    step("exec and refusals");

    // Every route and method, as the team member, root and an outsider: the refusals are the
    // agent's, and what is allowed is answered by the kubelet (never 401/403/405 from it: the
    // agent's own credential works for every subresource, and 502 never). Path routes name a
    // pod that does not exist, so nothing runs or is checkpointed.
    let creds = cluster
        .user_credentials(&format!("root-{suffix}"), &[])
        .await
        .unwrap();
    let root = Cred::Cert(client_cert_from_pem(&creds.certificate_pem, &creds.key_pem));
    let creds = cluster
        .user_credentials(&format!("outsider-{suffix}"), &[])
        .await
        .unwrap();
    let outsider = Cred::Cert(client_cert_from_pem(&creds.certificate_pem, &creds.key_pem));
    let mut failures = Vec::new();
    let mut cases = 0;
    for endpoint in Endpoint::all() {
        let spec = endpoint.spec();
        for ns in [a.as_str(), b.as_str()] {
            if spec.scope != Scope::Path && ns == b {
                continue;
            }
            let target = endpoint_target(endpoint, ns, "nopod", "main", "true");
            for method in spec.methods {
                for (who, cred) in [
                    ("member", &member),
                    ("root", &root),
                    ("outsider", &outsider),
                ] {
                    cases += 1;
                    let allowed = match who {
                        "root" => true,
                        "member" => match spec.scope {
                            Scope::NodeWide => false,
                            Scope::Path => ns == a,
                            _ => true,
                        },
                        _ => false,
                    };
                    let r = request(addr, true, cred, method, &target, &[])
                        .await
                        .unwrap();
                    let ok = if allowed {
                        ![401, 403, 405, 502].contains(&r.status)
                    } else {
                        r.status == 403
                    };
                    if !ok {
                        failures.push(format!(
                            "{who} {method} {target}: allowed={allowed}, got {} {}",
                            r.status,
                            r.text().chars().take(100).collect::<String>()
                        ));
                    }
                }
            }
        }
    }
    eprintln!("{cases} cases against the real kubelet of {node}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The alias kube-prometheus-stack scrapes, which kubelet 1.37 itself answers 404.
    let r = request(addr, true, &root, "GET", "/metrics/resource/v1alpha1", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("node_cpu_usage_seconds_total"),
        "{}",
        r.text()
    );
    step("done");
}
