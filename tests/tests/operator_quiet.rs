//! What starts a reconcile round, on the real API server: node heartbeats (status and Lease),
//! agents' status writes that do not change whether they are in sync, and the operator's own
//! status patches start none; an agent catching up starts a round that compiles nothing; the
//! policy's status is patched once when the last agent is in sync, not once per agent; a label
//! change still starts a round and a compile.
//!
//! `cargo test -p nodegate-tests --test operator_quiet` (after `eval "$(cargo xtask cluster env)"`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "operator_support.rs"]
mod support;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use nodegate_crds::NodeAgentConfig;
use nodegate_operator::controller::{Metrics, RoundCause};
use nodegate_tests::cluster::{TEST_LABEL, unique_name};
use serde_json::json;
use std::time::Duration;
use support::*;

/// Waits until the controller has been quiet for `quiet`: no round ended in it and the loop
/// is idle at its end (the counter moves only when a round ends, so a long round still in
/// flight would otherwise land in the window measured next).
async fn settled(metrics: &Metrics, quiet: Duration) -> Result<(), BoxError> {
    eventually("a quiet controller", Duration::from_secs(60), || async {
        let before = metrics.reconciles();
        tokio::time::sleep(quiet).await;
        (metrics.reconciles() == before && !metrics.is_busy()).then_some(())
    })
    .await
}

/// (compiles, writes, events that start a round about nodes, configs and policies) so far.
/// Not rounds: namespaces are watched cluster-wide, and other tests' namespaces come and go
/// (each such round compiles nothing and writes nothing, which this counts).
fn counts(m: &Metrics) -> (u64, u64, u64) {
    let admitted = ["Node", "NodeAgentConfig", "NodeApiPolicy"]
        .iter()
        .map(|k| m.events_admitted(k))
        .sum();
    (m.compiles(), m.writes(), admitted)
}

#[tokio::test]
async fn heartbeats_and_agents_catching_up_cost_no_compile_and_no_status_patch() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("quiet-hb").await?;
    let mut w = World::new(cluster.clone(), 3, &[("pool", "hb")]).await?;
    let metrics = w.start();
    let name = unique_name("hb");
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "Group", "name": "g"}],
            "access": ["pods"],
            "namespaces": {"names": [ns.name()]},
        }),
    ))
    .await?;
    let nodes = w.node_names();
    let configs: Api<NodeAgentConfig> = Api::all(w.client.clone());
    eventually("every node's config", WAIT, || async {
        for node in &nodes {
            w.config(node).await?;
        }
        Some(())
    })
    .await?;
    eventually("RBAC applied, agents pending", WAIT, || async {
        let (s, reason, _) = w.condition(&name, "AgentsSynced").await?;
        let (rbac, _, _) = w.condition(&name, "RBACApplied").await?;
        (s == "False" && reason == "Pending" && rbac == "True").then_some(())
    })
    .await?;
    settled(&metrics, Duration::from_secs(2)).await?;

    // Kubelet heartbeats: node status, Lease, an annotation; the agents' other status.
    let node_api: Api<Node> = Api::all(w.client.clone());
    let leases: Api<Lease> = Api::namespaced(w.client.clone(), "kube-node-lease");
    let before = counts(&metrics);
    let rounds_before = metrics.reconciles();
    let event_rounds_before = metrics.reconciles_by(RoundCause::Event);
    let retries_before = metrics.reconciles_by(RoundCause::Retry);
    const OWNED: [&str; 4] = [
        "ClusterRole",
        "ClusterRoleBinding",
        "RoleBinding",
        "ServiceAccount",
    ];
    let owned_before = OWNED.map(|k| metrics.events_admitted(k));
    let namespaces_before = metrics.events_admitted("Namespace");
    for beat in 0..5 {
        for node in &nodes {
            let now = k8s_openapi::jiff::Timestamp::now();
            let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True",
                "reason": "KubeletReady", "message": format!("beat {beat}"),
                "lastHeartbeatTime": now.round(k8s_openapi::jiff::Unit::Second).unwrap(),
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
            node_api
                .patch_status(node, &PatchParams::default(), &Patch::Strategic(&status))
                .await?;
            let annotation = json!({"metadata": {"annotations": {"heartbeat": beat.to_string()}}});
            node_api
                .patch(node, &PatchParams::default(), &Patch::Merge(&annotation))
                .await?;
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node, "labels": {TEST_LABEL: w.run}},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 40,
                         "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now)}});
            leases
                .patch(
                    node,
                    &PatchParams::apply("fake-kubelet").force(),
                    &Patch::Apply(&lease),
                )
                .await?;
            // An agent writing its status without enforcing the config yet.
            let agent = json!({"status": {"observedHash": format!("old-{beat}"),
                "lastError": format!("still loading ({beat})")}});
            configs
                .patch_status(
                    &w.config_name(node),
                    &PatchParams::default(),
                    &Patch::Merge(&agent),
                )
                .await?;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = counts(&metrics);
    assert_eq!(
        after, before,
        "(compiles, writes, events admitted) after 15 heartbeats and 15 agent status writes"
    );
    // Rounds an event started: a heartbeat would start one. (A retry of an earlier round's
    // write, due during the window, is no heartbeat's doing; the counts above show it wrote
    // and compiled nothing.)
    let rounds = metrics.reconciles_by(RoundCause::Event) - event_rounds_before;
    let namespace_events = metrics.events_admitted("Namespace") - namespaces_before;
    assert!(
        rounds <= namespace_events,
        "{rounds} rounds started by an event, {namespace_events} of them for other tests' \
         namespaces; all rounds in the window: {} ({} retries); events admitted by kind: {:?}",
        metrics.reconciles() - rounds_before,
        metrics.reconciles_by(RoundCause::Retry) - retries_before,
        OWNED
            .map(|k| (k, metrics.events_admitted(k)))
            .iter()
            .zip(owned_before)
            .map(|((k, n), before)| (*k, n - before))
            .collect::<Vec<_>>()
    );
    assert!(
        metrics.events_ignored() >= 30,
        "the events came and were ignored"
    );

    // The agents catch up one by one: each may start a round (its sync changed), none
    // compiles, and the policy's status is patched once, when the last is in sync.
    let status_patches = |m: &Metrics| {
        m.render()
            .lines()
            .filter(|l| {
                l.starts_with("nodegate_operator_write_requests_total{")
                    && l.contains("kind=\"NodeApiPolicy\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let patches_before = status_patches(&metrics);
    let policy_rv = |w: &World| {
        let name = name.clone();
        let policies = w.policies();
        async move { policies.get(&name).await.unwrap().metadata.resource_version }
    };
    for (i, node) in nodes.iter().enumerate() {
        let hash = w.config(node).await.unwrap().spec.hash;
        let agent = agent_confirms(&hash);
        configs
            .patch_status(
                &w.config_name(node),
                &PatchParams::default(),
                &Patch::Merge(&agent),
            )
            .await?;
        settled(&metrics, Duration::from_secs(1)).await?;
        if i + 1 < nodes.len() {
            let rv = policy_rv(&w).await;
            assert_eq!(
                status_patches(&metrics),
                patches_before,
                "{} of {} agents in sync: no status patch",
                i + 1,
                nodes.len()
            );
            assert_eq!(policy_rv(&w).await, rv);
        }
    }
    eventually("Ready", WAIT, || async {
        let (s, _, _) = w.condition(&name, "Ready").await?;
        (s == "True").then_some(())
    })
    .await?;
    assert_eq!(
        status_patches(&metrics),
        patches_before + 1,
        "one status patch for three agents catching up"
    );
    assert_eq!(metrics.compiles(), after.0, "no compile for agents' sync");

    // A label change is an input: a round, a compile.
    let relabel = json!({"metadata": {"labels": {"team": "new"}}});
    node_api
        .patch(&nodes[0], &PatchParams::default(), &Patch::Merge(&relabel))
        .await?;
    let compiles = metrics.compiles();
    eventually("a compile after a label change", WAIT, || async {
        (metrics.compiles() > compiles).then_some(())
    })
    .await?;

    for node in &nodes {
        let _ = leases.delete(node, &Default::default()).await;
    }
    w.cleanup().await;
    Ok(())
}
