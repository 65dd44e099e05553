//! nodegate-agent's SubjectAccessReview modes (`Webhook`, `PolicyAndWebhook`) in front of the
//! kubelet simulator, with a stand-in reviewer that answers like nodegate's RBAC would, and
//! `explain` on a policy file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use nodegate_agent::authn::BoxFuture;
use nodegate_agent::server::AuthorizationMode;
use nodegate_agent::upstream::UpstreamSettings;
use nodegate_agent::webhook::{AccessQuestion, AccessReviewer, CachedReviewer};
use nodegate_crds::{Endpoint, Port};
use nodegate_tests::sim::{Sim, SimOptions};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use support::*;

const NODE: &str = "sim-node";

/// RBAC as the operator would bind it: alice has containerLogs and pods in team-a
/// (RoleBinding), root everything at cluster scope (ClusterRoleBinding). Records questions.
#[derive(Default)]
struct Rbac {
    asked: Mutex<Vec<AccessQuestion>>,
    broken: bool,
}

impl AccessReviewer for Rbac {
    fn allowed<'a>(&'a self, q: &'a AccessQuestion) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            self.asked.lock().unwrap().push(q.clone());
            if self.broken {
                return Err("API server unreachable".into());
            }
            assert_eq!(q.node, NODE);
            Ok(match q.user.as_str() {
                "root" => true,
                "alice" => {
                    q.namespace == "team-a"
                        && ["containerLogs", "pods"].contains(&q.endpoint.as_str())
                        && q.verb == "get"
                }
                _ => false,
            })
        })
    }
}

fn tokens() -> BTreeMap<String, (String, Vec<String>)> {
    let mut t = BTreeMap::new();
    t.insert(
        "alice-token".into(),
        ("alice".into(), vec!["team-a".into()]),
    );
    t.insert("root-token".into(), ("root".into(), vec![]));
    t
}

async fn setup(
    mode: AuthorizationMode,
    rbac: Arc<Rbac>,
    rules: Vec<nodegate_crds::AgentRule>,
) -> (Sim, Pki, TestAgent) {
    let sim = Sim::start(SimOptions {
        node_name: NODE.into(),
        pods: 6,
        namespaces: vec!["team-a".into(), "team-b".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let pki = Pki::new("webhook");
    let agent = start_agent_mode(
        NODE,
        UpstreamSettings::new(sim.url().parse().unwrap()),
        pki.ca_file.clone(),
        Arc::new(FakeReviewer(tokens())),
        rules,
        mode,
        // As the binary wires it: answers cached.
        Some(Arc::new(CachedReviewer::new(rbac))),
    )
    .await;
    (sim, pki, agent)
}

#[tokio::test]
async fn webhook_mode_asks_rbac_with_the_data_namespace() {
    let rbac = Arc::new(Rbac::default());
    let (sim, _pki, agent) = setup(AuthorizationMode::Webhook, rbac.clone(), vec![]).await;
    let addr = agent.running.secure_addr;
    let alice = Cred::Token("alice-token".into());
    let root = Cred::Token("root-token".into());
    // Path-scoped: asked with the path's namespace.
    let r = request(
        addr,
        true,
        &alice,
        "GET",
        "/containerLogs/team-a/web-0/app",
        &[],
    )
    .await
    .unwrap();
    assert_ne!(r.status, 403, "{}", r.text());
    let r = request(
        addr,
        true,
        &alice,
        "GET",
        "/containerLogs/team-b/web-0/app",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    // Filtered endpoints are asked at cluster scope: alice's namespaced grant does not give
    // her /pods in this mode; root gets it whole.
    let r = request(addr, true, &alice, "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = request(addr, true, &root, "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(doc["items"].as_array().unwrap().len(), 6);
    assert_eq!(sim.request_count(), 2);
    let asked = rbac.asked.lock().unwrap().clone();
    let logs_b = asked.iter().find(|q| q.namespace == "team-b").unwrap();
    assert_eq!(
        (logs_b.endpoint.as_str(), logs_b.verb.as_str()),
        ("containerLogs", "get")
    );
    assert!(
        asked
            .iter()
            .filter(|q| q.endpoint == "pods")
            .all(|q| q.namespace.is_empty())
    );
    // Answers are cached: asking again does not ask RBAC again.
    let n = asked.len();
    let _ = request(
        addr,
        true,
        &alice,
        "GET",
        "/containerLogs/team-b/web-0/app",
        &[],
    )
    .await
    .unwrap();
    let _ = request(addr, true, &root, "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!(rbac.asked.lock().unwrap().len(), n);
}

#[tokio::test]
async fn policy_and_webhook_need_both_and_a_failed_review_never_allows() {
    let rules = vec![rule(
        "alice-logs",
        vec![user("alice")],
        &[Endpoint::ContainerLogs, Endpoint::Exec],
        namespaces(&["team-a"]),
        &[Port::Secure],
    )];
    let rbac = Arc::new(Rbac::default());
    let (sim, _pki, agent) = setup(
        AuthorizationMode::PolicyAndWebhook,
        rbac.clone(),
        rules.clone(),
    )
    .await;
    let addr = agent.running.secure_addr;
    let alice = Cred::Token("alice-token".into());
    // Both allow.
    let r = request(
        addr,
        true,
        &alice,
        "GET",
        "/containerLogs/team-a/web-0/app",
        &[],
    )
    .await
    .unwrap();
    assert_ne!(r.status, 403);
    // Policy allows exec, RBAC does not.
    let r = request(
        addr,
        true,
        &alice,
        "POST",
        "/exec/team-a/web-0/app?command=ls",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    // RBAC allows root everything, the policy nothing: refused without asking RBAC.
    let before = rbac.asked.lock().unwrap().len();
    let r = request(
        addr,
        true,
        &Cred::Token("root-token".into()),
        "GET",
        "/pods",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(rbac.asked.lock().unwrap().len(), before);
    assert_eq!(sim.request_count(), 1);

    // A review that fails is an error, not an allow.
    let broken = Arc::new(Rbac {
        broken: true,
        ..Default::default()
    });
    let (sim, _pki, agent) = setup(AuthorizationMode::Webhook, broken, rules).await;
    let r = request(
        agent.running.secure_addr,
        true,
        &alice,
        "GET",
        "/containerLogs/team-a/web-0/app",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(sim.request_count(), 0);
}

#[test]
fn explain_a_policy_file() {
    let yaml = r#"
apiVersion: nodegate.io/v1alpha1
kind: NodeApiPolicy
metadata:
  name: team-a-logs
spec:
  subjects:
    - kind: Group
      name: team-a
  access: [containerLogs, pods]
  namespaces:
    names: [team-a]
"#;
    let node = nodegate_agent::config::NodeIdentity {
        name: "node-1".into(),
        ..Default::default()
    };
    let spec = nodegate_agent::config::parse_config_file(yaml, &node).unwrap();
    let q = |target: &str| nodegate_agent::explain::Question {
        user: "alice".into(),
        groups: vec!["team-a".into()],
        method: "GET".into(),
        port: Port::Secure,
        target: target.into(),
        upgrade: None,
    };
    let out = nodegate_agent::explain::explain(&spec, &q("/containerLogs/team-a/web/app"));
    assert_eq!(out["decision"], "allow", "{out}");
    assert_eq!(out["policy"], "team-a-logs");
    let out = nodegate_agent::explain::explain(&spec, &q("/containerLogs/team-b/web/app"));
    assert_eq!(out["decision"], "deny");
    let out = nodegate_agent::explain::explain(&spec, &q("/pods"));
    assert_eq!(out["filteredTo"]["names"], serde_json::json!(["team-a"]));
    let mut exec = q("/exec/team-a/web/app?command=sh");
    exec.upgrade = Some("websocket".into());
    let out = nodegate_agent::explain::explain(&spec, &exec);
    assert_eq!(out["attributes"]["verb"], "create");
    assert_eq!(out["decision"], "deny");
}
