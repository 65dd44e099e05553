//! The NodeAgentConfig's bounds against the real local API server (issues 20 and 16): a node
//! that more policies select than the old 512-rule cap gets them all, and a real agent
//! enforces them; a node whose config would exceed what the API server stores gets a deny-all
//! config, and every policy that selects it says so, naming the node and the limit.
//!
//! Each test runs its own controller in-process, scoped to its own policies, fake nodes and
//! outputs (`--instance`), as `operator.rs` does.
//!
//! Run with `cargo test -p nodegate-tests --test operator_bounds` after
//! `eval "$(cargo xtask cluster env)"`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "operator_support.rs"]
mod support;

#[path = "agent_support.rs"]
mod agent;

use futures::{StreamExt, TryStreamExt};
use nodegate_agent::config::{self, ApiSourceSettings};
use nodegate_crds::NodeAgentConfig;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;

/// Creates `policies`, 16 at a time.
async fn create_all(w: &World, policies: Vec<nodegate_crds::NodeApiPolicy>) -> TestResult {
    futures::stream::iter(policies)
        .map(|p| async move { w.create(&p).await })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// 600 policies without a `nodeSelector` (the old schema held at most 512 rules per node, so
/// the API server refused the node's config and its agent kept older rules): the node's
/// NodeAgentConfig holds all 600, and a real agent watching it allows the 600th policy's
/// subject, and still refuses a caller no policy names.
#[tokio::test]
async fn six_hundred_policies_on_one_node_are_all_enforced() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster, 1, &[]).await?;
    let node = w.node_names()[0].clone();
    w.start();
    let user = |i: usize| format!("{}-user-{i:03}", w.run);
    let policies = (0..600)
        .map(|i| {
            w.policy(
                &format!("{}-{i:03}", w.run),
                json!({
                    "subjects": [{"kind": "User", "name": user(i)}],
                    "access": ["pods", "cadvisor"],
                    "namespaces": {"names": [agent::TEAM]},
                }),
            )
        })
        .collect();
    create_all(&w, policies).await?;
    let config: NodeAgentConfig = eventually(
        "600 rules in the node's NodeAgentConfig",
        Duration::from_secs(240),
        || async { w.config(&node).await.filter(|c| c.spec.rules.len() == 600) },
    )
    .await?;
    assert_eq!(
        config_policies(&config).last(),
        Some(&format!("{}-599", w.run))
    );
    let size = serde_json::to_vec(&config)?.len();
    eprintln!("NodeAgentConfig with 600 rules: {size} bytes");

    // A real agent, watching this node's NodeAgentConfig through the API server.
    let sim = agent::sim().await;
    let pki = agent::Pki::new("bounds");
    let mut tokens = BTreeMap::new();
    tokens.insert(
        "tok-600th-1234567890".to_string(),
        (user(599), vec!["system:authenticated".to_string()]),
    );
    tokens.insert(
        "tok-nobody-1234567890".to_string(),
        (
            format!("{}-nobody", w.run),
            vec!["system:authenticated".to_string()],
        ),
    );
    let agent = agent::start_agent(&node, agent::upstream_of(&sim), &pki, tokens, vec![]).await;
    let source = tokio::spawn(config::run_api(
        w.client.clone(),
        agent.config.clone(),
        ApiSourceSettings {
            config_name: nodegate_compiler::config_name(&node, Some(&w.run)),
            serving_cert_expiry: None,
            status_interval: Duration::from_millis(500),
            components: None,
        },
    ));
    let store = agent.config.clone();
    let hash = config.spec.hash.clone();
    eventually("the agent enforces the 600 rules", WAIT, || async {
        (store.current().spec.hash == hash).then_some(())
    })
    .await?;
    let addr = agent.running.secure_addr;
    let ask = |token: &'static str| async move {
        agent::request(
            addr,
            true,
            &agent::Cred::Token(token.into()),
            "GET",
            "/pods",
            &[],
        )
        .await
        .unwrap()
    };
    let allowed = ask("tok-600th-1234567890").await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert!(allowed.text().contains(agent::TEAM), "{}", allowed.text());
    assert!(
        !allowed.text().contains(agent::OTHER),
        "filtered to the policy's namespace"
    );
    let refused = ask("tok-nobody-1234567890").await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    source.abort();
    w.cleanup().await;
    Ok(())
}

/// Policies whose rules on one node exceed what the API server stores (each of 100 policies
/// names 32 users with long names and 64 namespaces of its own: about 1.2 MB of distinct
/// subjects and namespace lists): the node's NodeAgentConfig names the empty rule set (its
/// agent refuses everything), and every one of those policies is not Ready, with a message
/// that names the node and the limit.
#[tokio::test]
async fn a_node_beyond_the_size_bound_gets_a_deny_all_config_and_every_policy_says_so() -> TestResult
{
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster, 1, &[]).await?;
    let node = w.node_names()[0].clone();
    w.start();
    let names: Vec<String> = (0..100).map(|i| format!("{}-{i:03}", w.run)).collect();
    let policies = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let users: Vec<serde_json::Value> = (0..32)
                .map(|u| json!({"kind": "User", "name": format!("{i:03}-{u:02}-{}", "u".repeat(200))}))
                .collect();
            let namespaces: Vec<String> =
                (0..64).map(|n| format!("{i:03}-{n:02}-{}", "n".repeat(56))).collect();
            w.policy(
                name,
                json!({"subjects": users, "access": ["pods"], "namespaces": {"names": namespaces}}),
            )
        })
        .collect();
    create_all(&w, policies).await?;
    let empty = nodegate_compiler::agent_spec(&[]).hash;
    eventually(
        "a deny-all NodeAgentConfig",
        Duration::from_secs(240),
        || async {
            w.config(&node)
                .await
                .filter(|c| c.spec.hash == empty && c.metadata.resource_version.is_some())
        },
    )
    .await?;
    // Every policy's status: one list per poll (the operator patches a hundred statuses).
    let lp = kube::api::ListParams::default().labels(&format!(
        "{}={}",
        nodegate_tests::cluster::TEST_LABEL,
        w.run
    ));
    let ready_message = |p: &nodegate_crds::NodeApiPolicy| {
        p.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "InvalidSpec")
                .map(|c| c.message.clone())
        })
    };
    let reported = eventually(
        "every policy reports the node's refused config",
        Duration::from_secs(300),
        || async {
            let list = w.policies().list(&lp).await.ok()?;
            let messages: BTreeMap<String, String> = list
                .items
                .iter()
                .filter_map(|p| Some((p.metadata.name.clone()?, ready_message(p)?)))
                .filter(|(_, m)| m.contains("NodeAgentRuleSet"))
                .collect();
            (messages.len() == names.len()).then_some(messages)
        },
    )
    .await?;
    for name in &names {
        let message = &reported[name];
        assert!(message.contains(&format!("node {node}")), "{message}");
        assert!(message.contains("over the 1048576-byte limit"), "{message}");
    }
    let config = w.config(&node).await.expect("the node's NodeAgentConfig");
    assert!(config.spec.rules.is_empty(), "deny-all: no rules");
    assert_eq!(config.spec.hash, empty);
    w.cleanup().await;
    Ok(())
}
