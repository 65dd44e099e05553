//! What the agent's logs may hold: one JSON audit line per request naming the caller, and never
//! a token, plain or base64url (as the WebSocket bearer subprotocol carries it).
//!
//! Its own test binary: the test installs a thread-local tracing subscriber, and tracing's
//! callsite interest cache is shared process-wide, so agents of other tests running at the same
//! time in one binary made its audit lines vanish now and then.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use base64::Engine;
use std::sync::{Arc, Mutex};
use support::*;

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

// One thread, so the subscriber set for this test sees the agent's spawned tasks too.
#[tokio::test(flavor = "current_thread")]
async fn audit_lines_name_the_caller_and_never_hold_a_token() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = sim().await;
    let pki = Pki::new("audit");
    let agent = start_agent(NODE, upstream_of(&sim), &pki, tokens(), rules()).await;
    let addr = agent.running.secure_addr;
    let secret_tokens = [
        "tok-alice-1234567890",
        "tok-bob-1234567890",
        "never-valid-token-42",
    ];
    for token in secret_tokens {
        for target in ["/pods", "/configz", "/exec/team-a/web-0/app?command=ls"] {
            let _ = request(addr, true, &Cred::Token(token.into()), "GET", target, &[]).await;
        }
        let proto = format!(
            "base64url.bearer.authorization.k8s.io.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
        );
        let _ = request(
            addr,
            true,
            &Cred::None,
            "GET",
            "/exec/team-a/web-0/app?command=ls",
            &[
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-protocol", &proto),
            ],
        )
        .await;
    }
    drop(agent);
    // Connection tasks end on their own; give them a moment to write their last lines.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    for token in secret_tokens {
        assert!(!logs.contains(token), "token {token} in the logs");
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
        assert!(!logs.contains(&encoded), "encoded token in the logs");
    }
    let audit: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "audit")
        .collect();
    assert_eq!(audit.len(), 12, "{logs}");
    let alice_pods = audit
        .iter()
        .find(|v| v["user"] == "alice" && v["path"] == "/pods")
        .expect("audit line of alice's /pods");
    assert_eq!(alice_pods["decision"], "allow");
    assert_eq!(alice_pods["policy"], "team-a");
    assert_eq!(alice_pods["status"], 200);
    assert_eq!(alice_pods["auth_method"], "token");
    assert!(alice_pods["bytes"].as_u64().unwrap() > 0);
    let bob_configz = audit
        .iter()
        .find(|v| v["user"] == "bob" && v["path"] == "/configz")
        .unwrap();
    assert_eq!(
        (
            bob_configz["decision"].as_str(),
            bob_configz["status"].as_u64()
        ),
        (Some("deny"), Some(403))
    );
    assert!(
        audit
            .iter()
            .any(|v| v["decision"] == "unauthenticated" && v["status"] == 401)
    );
}
