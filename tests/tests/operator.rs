//! The operator's controller against the real local API server: objects follow policies,
//! nodes and namespaces; generated objects are restored; foreign objects are left alone and
//! reported; resyncs and restarts write nothing; leader failover.
//!
//! Each test runs its own controller in-process, restricted to its own policies (label
//! selector), its own fake nodes (label selector) and its own outputs (instance label), so
//! tests run in parallel without fighting.
//!
//! Run with `cargo test -p nodegate-tests --test operator` after
//! `eval "$(cargo xtask cluster env)"`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use nodegate_crds::{NodeAgentConfig, NodeAgentRuleSet};
use nodegate_operator::controller::LeaderSettings;
use nodegate_tests::Cluster;
use nodegate_tests::cluster::unique_name;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

#[path = "operator_support.rs"]
mod support;

use support::*;

#[tokio::test]
async fn policy_lifecycle_objects_follow() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let pool = unique_name("pool");
    let mut w = World::new(cluster.clone(), 3, &[("pool", &pool)]).await?;
    let ns = cluster.namespace("opns").await?;
    let metrics = w.start();
    let name = unique_name("life");
    let role_name = format!("nodegate:{name}");
    let spec = json!({
        "subjects": [{"kind": "User", "name": "alice"}],
        "serviceAccounts": [{"name": "scraper", "namespace": ns.name()}],
        "nodeSelector": {"matchLabels": {"pool": pool}},
        "access": ["pods", "cadvisor"],
        "namespaces": {"names": [ns.name()]},
    });
    w.create(&w.policy(&name, spec)).await?;
    let nodes = w.node_names();

    // RBAC on the three nodes, the service account, a config per node naming the policy.
    let role = eventually("ClusterRole", WAIT, || async {
        w.cluster_role(&role_name).await
    })
    .await?;
    assert_eq!(
        rule_names(&role),
        nodes,
        "resourceNames = the selected nodes"
    );
    let labels = role.labels();
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("nodegate")
    );
    assert_eq!(labels.get("nodegate.io/policy"), Some(&name));
    let owner = &role.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("NodeApiPolicy", name.as_str())
    );
    let sa_api: Api<ServiceAccount> = Api::namespaced(w.client.clone(), ns.name());
    eventually("service account", WAIT, || async {
        sa_api.get_opt("scraper").await.ok().flatten()
    })
    .await?;
    for node in &nodes {
        let config = eventually("NodeAgentConfig", WAIT, || async {
            w.config(node)
                .await
                .filter(|c| config_policies(c) == [name.clone()])
        })
        .await?;
        assert_eq!(config.owner_references()[0].kind, "Node");
    }

    // No agent runs on fake nodes: AgentsSynced is False until each config's status echoes
    // its hash, as an agent would write it.
    let (status, reason, _) = eventually("AgentsSynced", WAIT, || async {
        w.condition(&name, "AgentsSynced").await
    })
    .await?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Pending"));
    let configs: Api<NodeAgentConfig> = Api::all(w.client.clone());
    for node in &nodes {
        let hash = w.config(node).await.unwrap().spec.hash;
        configs
            .patch_status(
                &w.config_name(node),
                &PatchParams::default(),
                &Patch::Merge(&agent_confirms(&hash)),
            )
            .await?;
    }
    eventually("Ready", WAIT, || async {
        let p = w.policies().get(&name).await.ok()?;
        let s = p.status?;
        let ready = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && s.agents_in_sync.as_deref() == Some("3/3") && s.matched_nodes == Some(3))
            .then_some(())
    })
    .await?;
    let p = w.policies().get(&name).await?;
    let status = p.status.unwrap();
    assert_eq!(status.observed_generation, p.metadata.generation);
    assert_eq!(status.subject_count, Some(2));
    let generated = status.generated.unwrap();
    assert_eq!(generated.cluster_role.as_deref(), Some(role_name.as_str()));
    assert_eq!(
        generated.service_accounts,
        [format!("{}/scraper", ns.name())]
    );

    eventually("an Applied event", WAIT, || async {
        event_reasons(&w.client, &name)
            .await
            .contains(&"Applied".to_string())
            .then_some(())
    })
    .await?;

    // Update: a new endpoint changes the role and every config's hash; generation observed.
    let old_hash = w.config(&nodes[0]).await.unwrap().spec.hash;
    let spec = json!({
        "subjects": [{"kind": "User", "name": "alice"}, {"kind": "Group", "name": "team-b"}],
        "serviceAccounts": [{"name": "scraper", "namespace": ns.name()}],
        "nodeSelector": {"matchLabels": {"pool": pool}},
        "access": ["pods", "cadvisor", "stats"],
        "namespaces": {"names": [ns.name()]},
    });
    w.replace_spec(&name, spec).await?;
    eventually("config with the new rule", WAIT, || async {
        w.config(&nodes[0])
            .await
            .filter(|c| c.spec.hash != old_hash)
    })
    .await?;
    eventually("AgentsSynced False after the change", WAIT, || async {
        let (s, _, m) = w.condition(&name, "AgentsSynced").await?;
        (s == "False" && m.contains("0/3")).then_some(())
    })
    .await?;
    eventually("observedGeneration 2", WAIT, || async {
        let p = w.policies().get(&name).await.ok()?;
        (p.status?.observed_generation == Some(2)).then_some(())
    })
    .await?;

    // Delete: role, binding, service account gone; configs keep existing without the rule.
    w.policies().delete(&name, &DeleteParams::default()).await?;
    eventually("ClusterRole deleted", WAIT, || async {
        w.cluster_role(&role_name).await.is_none().then_some(())
    })
    .await?;
    eventually("service account deleted", WAIT, || async {
        sa_api
            .get_opt("scraper")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    for node in &nodes {
        eventually("config without the policy", WAIT, || async {
            w.config(node).await.filter(|c| c.spec.rules.is_empty())
        })
        .await?;
    }
    assert_eq!(metrics.errors(), 0, "no failed request");
    w.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn node_relabel_moves_resource_names_and_config() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let pool = unique_name("pool");
    let mut w = World::new(cluster.clone(), 3, &[]).await?;
    let nodes = w.node_names();
    let node_api: Api<Node> = Api::all(w.client.clone());
    let label = |node: &str, value: Option<&str>| {
        let node_api = node_api.clone();
        let node = node.to_string();
        let patch = json!({"metadata": {"labels": {"pool": value}}});
        async move {
            node_api
                .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    label(&nodes[0], Some(&pool)).await?;
    label(&nodes[1], Some(&pool)).await?;
    w.start();
    let name = unique_name("relabel");
    let role_name = format!("nodegate:{name}");
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "bob"}],
            "nodeSelector": {"matchLabels": {"pool": pool}},
            "access": ["pods"],
            "namespaces": {"names": ["default"]},
        }),
    ))
    .await?;
    let mut want = vec![nodes[0].clone(), nodes[1].clone()];
    want.sort();
    eventually("two nodes", WAIT, || async {
        w.cluster_role(&role_name)
            .await
            .filter(|r| rule_names(r) == want)
    })
    .await?;
    eventually("no rule on the third node", WAIT, || async {
        w.config(&nodes[2])
            .await
            .filter(|c| c.spec.rules.is_empty())
    })
    .await?;

    // Third node joins the pool, first one leaves.
    label(&nodes[2], Some(&pool)).await?;
    label(&nodes[0], None).await?;
    let mut want = vec![nodes[1].clone(), nodes[2].clone()];
    want.sort();
    eventually("resourceNames follow the labels", WAIT, || async {
        w.cluster_role(&role_name)
            .await
            .filter(|r| rule_names(r) == want)
    })
    .await?;
    eventually("third node's config has the rule", WAIT, || async {
        w.config(&nodes[2])
            .await
            .filter(|c| config_policies(c) == [name.clone()])
    })
    .await?;
    eventually("first node's config lost it", WAIT, || async {
        w.config(&nodes[0])
            .await
            .filter(|c| c.spec.rules.is_empty())
    })
    .await?;
    eventually("status counts 2 nodes", WAIT, || async {
        let s = w.policies().get(&name).await.ok()?.status?;
        (s.matched_nodes == Some(2)).then_some(())
    })
    .await?;
    w.cleanup().await;
    Ok(())
}

/// A node a policy stops selecting may still enforce it: its agent has not confirmed the
/// config without the policy's rules. Until it does, the policy is not Ready and names the
/// node; once it does, the policy is Ready again.
#[tokio::test]
async fn a_dropped_node_keeps_the_policy_pending_until_its_agent_confirms() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let pool = unique_name("pool");
    let mut w = World::new(cluster.clone(), 2, &[("pool", &pool)]).await?;
    let nodes = w.node_names();
    w.start();
    let name = unique_name("dropped");
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "carol"}],
            "nodeSelector": {"matchLabels": {"pool": pool}},
            "access": ["pods"],
            "namespaces": {"names": ["default"]},
        }),
    ))
    .await?;
    let configs: Api<NodeAgentConfig> = Api::all(w.client.clone());
    // The fake agents confirm what is written now.
    let confirm = |node: String| {
        let (configs, w) = (configs.clone(), &w);
        async move {
            let hash = w.config(&node).await.ok_or("no config")?.spec.hash;
            configs
                .patch_status(
                    &w.config_name(&node),
                    &PatchParams::default(),
                    &Patch::Merge(&agent_confirms(&hash)),
                )
                .await?;
            Ok::<_, BoxError>(())
        }
    };
    for node in &nodes {
        eventually("the policy's rules", WAIT, || async {
            w.config(node)
                .await
                .filter(|c| config_policies(c) == [name.clone()])
        })
        .await?;
        confirm(node.clone()).await?;
    }
    eventually("Ready", WAIT, || async {
        let (s, _, _) = w.condition(&name, "Ready").await?;
        (s == "True").then_some(())
    })
    .await?;

    // The first node leaves the pool: its config loses the rule, its agent does not confirm.
    Api::<Node>::all(w.client.clone())
        .patch(
            &nodes[0],
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"pool": null}}})),
        )
        .await?;
    eventually("the first node's config without the rule", WAIT, || async {
        w.config(&nodes[0])
            .await
            .filter(|c| c.spec.rules.is_empty())
    })
    .await?;
    let (status, reason, message) = eventually("RevocationPending", WAIT, || async {
        w.condition(&name, "AgentsSynced")
            .await
            .filter(|(_, r, _)| r != "InSync")
    })
    .await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "RevocationPending"),
        "{message}"
    );
    assert!(message.contains(&nodes[0]), "{message}");
    let (ready, _, _) = w.condition(&name, "Ready").await.ok_or("no Ready")?;
    assert_eq!(ready, "False");
    // Still so a while later (every round says the same).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, reason, _) = w.condition(&name, "AgentsSynced").await.ok_or("gone")?;
    assert_eq!(reason, "RevocationPending");

    // The agent confirms: Ready, one node matched.
    confirm(nodes[0].clone()).await?;
    eventually("Ready after the revocation", WAIT, || async {
        let p = w.policies().get(&name).await.ok()?;
        let s = p.status?;
        let ready = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && s.matched_nodes == Some(1)).then_some(())
    })
    .await?;
    w.cleanup().await;
    Ok(())
}

/// Two policies on the same nodes share their rule set. A change to one leaves the other
/// Ready while the agents still enforce the earlier version (it holds the other's rule
/// unchanged), and the changed one is not Ready until they confirm the new version.
#[tokio::test]
async fn a_change_to_one_policy_leaves_the_others_on_its_nodes_ready() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("shared").await?;
    let mut w = World::new(cluster.clone(), 2, &[]).await?;
    let nodes = w.node_names();
    w.start();
    let (changed, kept) = (unique_name("changed"), unique_name("kept"));
    for (name, user) in [(&changed, "ivan"), (&kept, "judy")] {
        w.create(&w.policy(
            name,
            json!({
                "subjects": [{"kind": "User", "name": user}],
                "access": ["pods"],
                "namespaces": {"names": ["default"]},
            }),
        ))
        .await?;
    }
    let configs: Api<NodeAgentConfig> = Api::all(w.client.clone());
    let confirm_all = || async {
        for node in &nodes {
            let hash = w.config(node).await.ok_or("no config")?.spec.hash;
            configs
                .patch_status(
                    &w.config_name(node),
                    &PatchParams::default(),
                    &Patch::Merge(&agent_confirms(&hash)),
                )
                .await?;
        }
        Ok::<_, BoxError>(())
    };
    let ready = |name: &String| {
        let name = name.clone();
        let w = &w;
        async move { w.condition(&name, "Ready").await.map(|(s, r, _)| (s, r)) }
    };
    eventually("both Ready", WAIT, || async {
        confirm_all().await.ok()?;
        let both = ready(&changed).await? == ("True".into(), "Ready".into())
            && ready(&kept).await? == ("True".into(), "Ready".into());
        both.then_some(())
    })
    .await?;
    let before = w.config(&nodes[0]).await.ok_or("no config")?.spec.hash;
    let kept_events = event_reasons(&w.client, &kept).await.len();

    // One policy changes; the agents do not confirm.
    w.policies()
        .patch(
            &changed,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"namespaces": {"names": [ns.name()]}}})),
        )
        .await?;
    eventually("the changed policy waits for the agents", WAIT, || async {
        let (s, r, _) = w.condition(&changed, "AgentsSynced").await?;
        (s == "False" && r == "Pending").then_some(())
    })
    .await?;
    let after = w.config(&nodes[0]).await.ok_or("no config")?.spec.hash;
    assert_ne!(before, after, "the shared rule set changed");
    // A few rounds later the other is still Ready: its rule is the same in both versions.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ready(&kept).await, Some(("True".into(), "Ready".into())));
    let (s, _, _) = w
        .condition(&kept, "AgentsSynced")
        .await
        .ok_or("no AgentsSynced")?;
    assert_eq!(s, "True");
    // Nor is it told about the shared rule set's rewrite (an Event per policy of a rule set
    // was a thousand Events per change at scale).
    assert_eq!(
        event_reasons(&w.client, &kept).await.len(),
        kept_events,
        "{:?}",
        event_reasons(&w.client, &kept).await
    );

    // The agents confirm: both Ready.
    eventually("both Ready again", WAIT, || async {
        confirm_all().await.ok()?;
        (ready(&changed).await? == ("True".into(), "Ready".into())).then_some(())
    })
    .await?;
    w.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn namespace_created_later_is_resolved() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let team = unique_name("team");
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    w.start();
    let name = unique_name("nssel");
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "carol"}],
            "access": ["pods"],
            "namespaces": {"selector": {"matchLabels": {"team": team}}},
        }),
    ))
    .await?;
    let node = w.node_names()[0].clone();
    eventually("config with the policy", WAIT, || async {
        w.config(&node)
            .await
            .filter(|c| config_policies(c) == [name.clone()])
    })
    .await?;

    // A namespace created afterwards with the label is in scope promptly.
    let ns = cluster.namespace("later").await?;
    let ns_api: Api<Namespace> = Api::all(w.client.clone());
    ns_api
        .patch(
            ns.name(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"team": team}}})),
        )
        .await?;
    let scoped = |c: &NodeAgentConfig, ns: &str| {
        c.spec
            .unpack(0)
            .is_some_and(|r| r.namespaces.names.iter().any(|n| n == ns))
    };
    eventually("namespace in the rule", Duration::from_secs(10), || async {
        w.config(&node).await.filter(|c| scoped(c, ns.name()))
    })
    .await?;
    // ... and RBAC answers for it: the policy's RoleBinding is written into it.
    let role_bindings: Api<RoleBinding> = Api::namespaced(w.client.clone(), ns.name());
    let binding_name = format!("nodegate:{name}");
    let binding = eventually(
        "RoleBinding in the new namespace",
        Duration::from_secs(10),
        || async { role_bindings.get_opt(&binding_name).await.ok().flatten() },
    )
    .await?;
    assert_eq!(binding.role_ref.name, binding_name);
    assert!(binding.subjects.unwrap().iter().any(|s| s.name == "carol"));
    // Relabelled away, it leaves the scope.
    ns_api
        .patch(
            ns.name(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"team": null}}})),
        )
        .await?;
    eventually(
        "namespace out of the rule",
        Duration::from_secs(10),
        || async { w.config(&node).await.filter(|c| !scoped(c, ns.name())) },
    )
    .await?;
    w.cleanup().await;
    Ok(())
}

/// A narrowing removes the RBAC that granted the wider scope, not only the NodeAgentConfig's
/// rule: `all` → `names: [a, b]` deletes the ClusterRoleBinding (RoleBindings in a and b
/// replace it), `[a, b]` → `[a]` deletes b's RoleBinding; at each step the API server's own
/// authorizer (SubjectAccessReview) and the node's config answer for exactly the new scope.
#[tokio::test]
async fn narrowing_removes_the_bindings_of_the_wider_scope() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    w.start();
    let (a, b) = (
        cluster.namespace("narrow-a").await?,
        cluster.namespace("narrow-b").await?,
    );
    let other = cluster.namespace("narrow-c").await?;
    let node = w.node_names()[0].clone();
    let name = unique_name("narrowing");
    let binding = format!("nodegate:{name}");
    let user = unique_name("nora");
    let spec = |namespaces: serde_json::Value| {
        json!({
            "subjects": [{"kind": "User", "name": user}],
            "access": ["pods"],
            "namespaces": namespaces,
        })
    };
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(w.client.clone());
    let role_bindings = |ns: &str| Api::<RoleBinding>::namespaced(w.client.clone(), ns);
    let may = |ns: String| {
        let (client, user, node) = (w.client.clone(), user.clone(), node.clone());
        async move { allowed(&client, &user, "get", "pods", &node, &ns).await }
    };
    let config_names = |c: &NodeAgentConfig| -> Option<(bool, Vec<String>)> {
        let rule = c.spec.unpack(0)?;
        Some((rule.namespaces.all, rule.namespaces.names.clone()))
    };

    w.create(&w.policy(&name, spec(json!({"all": true}))))
        .await?;
    eventually("ClusterRoleBinding for all", WAIT, || async {
        cluster_bindings.get_opt(&binding).await.ok()?
    })
    .await?;
    eventually("SubjectAccessReview allows any namespace", WAIT, || async {
        may(other.name().to_string()).await.then_some(())
    })
    .await?;

    // all → [a, b]: the cluster-wide binding goes, one RoleBinding per namespace comes.
    // (A merge patch: `all` must be removed explicitly.)
    w.replace_spec(
        &name,
        spec(json!({"all": null, "names": [a.name(), b.name()]})),
    )
    .await?;
    eventually("ClusterRoleBinding deleted", WAIT, || async {
        cluster_bindings
            .get_opt(&binding)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    for ns in [&a, &b] {
        eventually("RoleBinding per namespace", WAIT, || async {
            role_bindings(ns.name()).get_opt(&binding).await.ok()?
        })
        .await?;
    }
    eventually("config holds a and b", WAIT, || async {
        let c = w.config(&node).await?;
        let mut want = vec![a.name().to_string(), b.name().to_string()];
        want.sort();
        (config_names(&c)? == (false, want)).then_some(())
    })
    .await?;
    assert!(!may(other.name().to_string()).await, "c is out of scope");
    assert!(may(a.name().to_string()).await && may(b.name().to_string()).await);

    // [a, b] → [a]: b's RoleBinding goes.
    w.replace_spec(&name, spec(json!({"names": [a.name()]})))
        .await?;
    eventually("b's RoleBinding deleted", WAIT, || async {
        role_bindings(b.name())
            .get_opt(&binding)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    eventually("config holds a only", WAIT, || async {
        let c = w.config(&node).await?;
        (config_names(&c)? == (false, vec![a.name().to_string()])).then_some(())
    })
    .await?;
    assert!(
        role_bindings(a.name()).get_opt(&binding).await?.is_some(),
        "a keeps its binding"
    );
    assert!(!may(b.name().to_string()).await, "b is out of scope");
    assert!(may(a.name().to_string()).await, "a stays in scope");
    w.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn generated_objects_are_restored() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    w.start();
    let name = unique_name("restore");
    let role_name = format!("nodegate:{name}");
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "dave"}],
            "access": ["pods", "stats"],
            "namespaces": {"all": true},
        }),
    ))
    .await?;
    let original = eventually("ClusterRole", WAIT, || async {
        w.cluster_role(&role_name).await
    })
    .await?;
    let roles: Api<ClusterRole> = Api::all(w.client.clone());

    // Hand edit (another field manager widens the verbs): put back. Read-modify-write, again
    // on a conflict, as `kubectl edit` does (the operator may still be writing the role).
    loop {
        let mut edited = roles.get(&role_name).await?;
        edited.metadata.managed_fields = None;
        if let Some(rules) = edited.rules.as_mut() {
            rules[0].verbs.push("delete".into());
        }
        match roles
            .replace(&role_name, &PostParams::default(), &edited)
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            result => {
                result?;
                break;
            }
        }
    }
    eventually("rules restored", WAIT, || async {
        w.cluster_role(&role_name)
            .await
            .filter(|r| r.rules == original.rules)
    })
    .await?;

    // Deleted: recreated.
    roles.delete(&role_name, &DeleteParams::default()).await?;
    eventually("role recreated", WAIT, || async {
        w.cluster_role(&role_name)
            .await
            .filter(|r| r.uid() != original.uid() && r.rules == original.rules)
    })
    .await?;

    // The binding's subjects edited away: restored.
    // The binding must exist first: a check that skips a missing binding would pass when the
    // binding is never written at all.
    let bindings: Api<ClusterRoleBinding> = Api::all(w.client.clone());
    let original_binding = eventually("ClusterRoleBinding", WAIT, || async {
        bindings.get_opt(&role_name).await.ok()?
    })
    .await?;
    let subjects_of = |b: &ClusterRoleBinding| -> Vec<(String, String)> {
        b.subjects
            .iter()
            .flatten()
            .map(|s| (s.kind.clone(), s.name.clone()))
            .collect()
    };
    assert_eq!(
        subjects_of(&original_binding),
        [("User".to_string(), "dave".to_string())]
    );
    bindings
        .patch(&role_name, &PatchParams::default(), &Patch::Merge(&json!({"subjects": [{"kind": "User", "name": "mallory", "apiGroup": "rbac.authorization.k8s.io"}]})))
        .await?;
    eventually("binding restored", WAIT, || async {
        let b = bindings.get_opt(&role_name).await.ok()??;
        (subjects_of(&b) == subjects_of(&original_binding)).then_some(())
    })
    .await?;

    // A NodeAgentRuleSet edited by hand is rewritten, and so is a NodeAgentConfig pointed
    // at another rule set.
    let node = w.node_names()[0].clone();
    let configs: Api<NodeAgentConfig> = Api::all(w.client.clone());
    let before = eventually("config", WAIT, || async {
        w.config(&node).await.filter(|c| !c.spec.rules.is_empty())
    })
    .await?;
    let set = before
        .spec
        .rule_set
        .clone()
        .ok_or("the config names no rule set")?;
    Api::<NodeAgentRuleSet>::all(w.client.clone())
        .patch(
            &set,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"rules": [], "hash": "tampered"}})),
        )
        .await?;
    eventually("rule set restored", WAIT, || async {
        w.config(&node).await.filter(|c| c.spec == before.spec)
    })
    .await?;
    configs
        .patch(
            &w.config_name(&node),
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"ruleSet": "nodegate-rules-elsewhere"}})),
        )
        .await?;
    eventually("config restored", WAIT, || async {
        let raw = configs.get_opt(&w.config_name(&node)).await.ok()??;
        (raw.spec.rule_set.as_deref() == Some(set.as_str())).then_some(())
    })
    .await?;
    w.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn foreign_objects_are_left_alone_and_reported() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("foreign").await?;
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let name = unique_name("foreign");
    let role_name = format!("nodegate:{name}");
    // Someone else's ClusterRole and ServiceAccount of the names nodegate would generate.
    let roles: Api<ClusterRole> = Api::all(w.client.clone());
    let theirs = roles
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: ObjectMeta {
                    name: Some(role_name.clone()),
                    labels: Some(BTreeMap::from([("owner".into(), "someone-else".into())])),
                    ..Default::default()
                },
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["configmaps".into()]),
                    verbs: vec!["list".into()],
                    ..Default::default()
                }]),
                aggregation_rule: None,
            },
        )
        .await?;
    let sa_api: Api<ServiceAccount> = Api::namespaced(w.client.clone(), ns.name());
    let their_sa = sa_api
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("shared".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    w.start();
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "erin"}],
            "serviceAccounts": [{"name": "shared", "namespace": ns.name()}],
            "access": ["pods"],
            "namespaces": {"all": true},
        }),
    ))
    .await?;
    let (status, _, message) = eventually("RBACApplied", WAIT, || async {
        w.condition(&name, "RBACApplied")
            .await
            .filter(|c| c.1 == "ForeignObject")
    })
    .await?;
    assert_eq!(status, "False");
    assert!(
        message.contains(&format!("ClusterRole {role_name}")),
        "{message}"
    );
    assert!(
        message.contains(&format!("ServiceAccount {}/shared", ns.name())),
        "{message}"
    );
    assert_eq!(
        w.condition(&name, "Ready").await.unwrap().1,
        "ForeignObject"
    );
    eventually("a ForeignObject event", WAIT, || async {
        event_reasons(&w.client, &name)
            .await
            .contains(&"ForeignObject".to_string())
            .then_some(())
    })
    .await?;

    // Left exactly as they were; no binding to the foreign role was written.
    let now = roles.get(&role_name).await?;
    assert_eq!(now.resource_version(), theirs.resource_version());
    assert!(now.owner_references().is_empty());
    assert_eq!(
        sa_api.get("shared").await?.resource_version(),
        their_sa.resource_version()
    );
    let bindings: Api<ClusterRoleBinding> = Api::all(w.client.clone());
    assert!(
        bindings.get_opt(&role_name).await?.is_none(),
        "no binding may point at a role nodegate does not own"
    );
    // The node config is unaffected (the agent still enforces the policy by itself).
    let node = w.node_names()[0].clone();
    eventually("config", WAIT, || async {
        w.config(&node)
            .await
            .filter(|c| config_policies(c) == [name.clone()])
    })
    .await?;

    // The foreign role goes away: nodegate writes its own and the condition clears once the
    // service account is gone too.
    roles.delete(&role_name, &DeleteParams::default()).await?;
    sa_api.delete("shared", &DeleteParams::default()).await?;
    // Unowned names are not watched: the next round (any event) looks again.
    w.replace_spec(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "erin"}, {"kind": "User", "name": "frank"}],
            "serviceAccounts": [{"name": "shared", "namespace": ns.name()}],
            "access": ["pods"],
            "namespaces": {"all": true},
        }),
    )
    .await?;
    eventually("RBACApplied True", WAIT, || async {
        w.condition(&name, "RBACApplied")
            .await
            .filter(|c| c.0 == "True")
    })
    .await?;
    let ours = roles.get(&role_name).await?;
    assert_eq!(
        ours.labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("nodegate")
    );
    w.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn resync_and_restart_write_nothing() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("quiet").await?;
    let mut w = World::new(cluster.clone(), 3, &[]).await?;
    let mut settings = w.settings();
    settings.resync = Duration::from_secs(1);
    let client = w.client.clone();
    let metrics = w.start_with(settings.clone(), None, client.clone());
    let names: Vec<String> = (0..3).map(|i| unique_name(&format!("quiet{i}"))).collect();
    for (i, name) in names.iter().enumerate() {
        let namespaces = if i == 0 {
            json!({"all": true})
        } else {
            json!({"names": [ns.name()]})
        };
        w.create(&w.policy(
            name,
            json!({
                "subjects": [{"kind": "Group", "name": format!("g{i}")}],
                "serviceAccounts": [{"name": "quiet-sa", "namespace": ns.name()}],
                "access": ["pods", "stats", "healthz"],
                "namespaces": namespaces,
            }),
        ))
        .await?;
    }
    eventually("all Ready but agents", WAIT, || async {
        for name in &names {
            let (s, _, _) = w.condition(name, "RBACApplied").await?;
            if s != "True" {
                return None;
            }
        }
        Some(())
    })
    .await?;
    // Let the watch caches catch up with the last writes.
    w.rounds(&metrics, 3).await?;
    let versions = owned_versions(&client, &w.run).await;
    // 3 roles, 3 or more bindings, 1 shared service account, 3 node configs.
    assert!(versions.len() >= 10, "{versions:?}");
    let writes = metrics.writes();
    let policy_versions: Vec<String> = {
        let mut v = Vec::new();
        for name in &names {
            v.push(w.policies().get(name).await?.resource_version().unwrap());
        }
        v
    };
    // Several resyncs: no request, no resourceVersion moves.
    w.rounds(&metrics, 3).await?;
    assert_eq!(
        metrics.writes(),
        writes,
        "a resync with nothing changed writes nothing"
    );
    assert_eq!(owned_versions(&client, &w.run).await, versions);

    // Restart: a fresh controller converges with zero writes.
    w.stop_all().await;
    let restarted = w.start_with(settings, None, client.clone());
    w.rounds(&restarted, 3).await?;
    assert_eq!(
        restarted.writes(),
        0,
        "a restart of a converged operator writes nothing"
    );
    assert_eq!(owned_versions(&client, &w.run).await, versions);
    for (name, rv) in names.iter().zip(&policy_versions) {
        assert_eq!(
            &w.policies().get(name).await?.resource_version().unwrap(),
            rv,
            "status untouched"
        );
    }
    w.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn leader_failover() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("lease").await?;
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let lease = unique_name("lease");
    let leader = |id: &str| LeaderSettings {
        lease_name: lease.clone(),
        lease_namespace: ns.name().to_string(),
        identity: id.into(),
        lease_duration: Duration::from_secs(4),
        renew_deadline: Duration::from_secs(3),
        retry_period: Duration::from_secs(1),
    };
    let settings = w.settings();
    let client = w.client.clone();
    let a = w.start_with(settings.clone(), Some(leader("a")), client.clone());
    let b = w.start_with(settings, Some(leader("b")), client.clone());
    let first = eventually("a leader", WAIT, || async {
        (a.is_leader() || b.is_leader()).then_some(())
    })
    .await;
    first?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(a.is_leader() ^ b.is_leader(), "exactly one leads");
    let name = unique_name("lead");
    let role_name = format!("nodegate:{name}");
    w.create(&w.policy(
        &name,
        json!({"subjects": [{"kind": "User", "name": "gina"}], "access": ["pods"], "namespaces": {"all": true}}),
    ))
    .await?;
    eventually("the leader reconciles", WAIT, || async {
        w.cluster_role(&role_name).await
    })
    .await?;

    // Stop the leader: the other takes over within the lease duration and reconciles.
    let (leader_idx, standby) = if a.is_leader() {
        (0, b.clone())
    } else {
        (1, a.clone())
    };
    let stopped = w.controllers.remove(leader_idx);
    let t0 = std::time::Instant::now();
    stopped.stop().await;
    eventually("failover", Duration::from_secs(10), || async {
        standby.is_leader().then_some(())
    })
    .await?;
    let failover = t0.elapsed();
    assert!(
        failover < Duration::from_secs(6),
        "failover took {failover:?}"
    );
    Api::<ClusterRole>::all(client.clone())
        .delete(&role_name, &DeleteParams::default())
        .await?;
    eventually("the new leader restores", WAIT, || async {
        w.cluster_role(&role_name).await
    })
    .await?;
    eprintln!("failover after graceful stop: {failover:?}");
    w.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn rbac_answers_per_namespace_as_the_policy_says() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let granted = cluster.namespace("cani-yes").await?;
    let other = cluster.namespace("cani-no").await?;
    let pool = unique_name("pool");
    let mut w = World::new(cluster.clone(), 2, &[]).await?;
    let nodes = w.node_names();
    Api::<Node>::all(w.client.clone())
        .patch(
            &nodes[0],
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"pool": pool}}})),
        )
        .await?;
    w.start();
    let name = unique_name("cani");
    let user = unique_name("ivy");
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": user}],
            "nodeSelector": {"matchLabels": {"pool": pool}},
            "access": ["pods", "cadvisor"],
            "namespaces": {"names": [granted.name()]},
        }),
    ))
    .await?;
    let (yes, no) = (granted.name(), other.name());
    eventually("the grant", WAIT, || async {
        allowed(&w.client, &user, "get", "pods", &nodes[0], yes)
            .await
            .then_some(())
    })
    .await?;
    let c = &w.client;
    assert!(allowed(c, &user, "get", "cadvisor", &nodes[0], yes).await);
    assert!(
        !allowed(c, &user, "get", "pods", &nodes[0], no).await,
        "other namespace"
    );
    assert!(
        !allowed(c, &user, "get", "pods", &nodes[1], yes).await,
        "unselected node"
    );
    assert!(
        !allowed(c, &user, "get", "stats", &nodes[0], yes).await,
        "endpoint not granted"
    );
    assert!(
        !allowed(c, &user, "create", "exec", &nodes[0], yes).await,
        "exec not granted"
    );
    assert!(
        !allowed(c, "someone-else", "get", "pods", &nodes[0], yes).await,
        "not a subject"
    );
    // No core nodes/* grant without directKubeletAccess: the kubelet would not filter.
    let review = |sub: &str| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.clone()),
            resource_attributes: Some(ResourceAttributes {
                resource: Some("nodes".into()),
                subresource: Some(sub.into()),
                name: Some(nodes[0].clone()),
                verb: Some("get".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    for sub in ["proxy", "pods", "metrics"] {
        let answer = Api::<SubjectAccessReview>::all(c.clone())
            .create(&PostParams::default(), &review(sub))
            .await?;
        assert!(!answer.status.unwrap().allowed, "nodes/{sub}");
    }

    // kubectl auth can-i gives the same answers.
    let can_i = |ns: &str| {
        let out = w_kubectl(
            &cluster,
            &[
                "auth",
                "can-i",
                "get",
                &format!("nodeagentconfigs.nodegate.io/{}", nodes[0]),
                "--subresource=pods",
                "-n",
                ns,
                "--as",
                &user,
            ],
        );
        out.trim().to_string()
    };
    assert_eq!(can_i(yes), "yes");
    assert_eq!(can_i(no), "no");

    // Relabel the second node into the pool: it is granted too.
    Api::<Node>::all(w.client.clone())
        .patch(
            &nodes[1],
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"pool": pool}}})),
        )
        .await?;
    eventually("the second node granted", WAIT, || async {
        allowed(&w.client, &user, "get", "pods", &nodes[1], yes)
            .await
            .then_some(())
    })
    .await?;
    w.cleanup().await;
    Ok(())
}

/// kubectl's stdout, whatever its exit code (`can-i` exits 1 for "no").
fn w_kubectl(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.kubectl().args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The API server goes away under a running controller (every connection cut, new ones
/// refused) while a policy changes; once it is back, the watches resume and the change is
/// applied. The outage is a TCP forwarder between this controller and the API server, so the
/// API server the other tests use keeps running.
#[tokio::test]
async fn watches_resume_after_an_api_server_outage() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let url = cluster.admin_config().cluster_url.clone();
    let apiserver = format!(
        "{}:{}",
        url.host().unwrap_or("127.0.0.1"),
        url.port_u16().unwrap_or(443)
    );
    let proxy = nodegate_tests::cluster::FlakyProxy::start(apiserver).await?;
    let proxied = kube::Client::try_from(proxy.config_through(cluster.admin_config()))?;
    let settings = w.settings();
    let metrics = w.start_with(settings, None, proxied);
    let name = unique_name("outage");
    let role_name = format!("nodegate:{name}");
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "bob"}],
            "access": ["pods"],
            "namespaces": {"all": true},
        }),
    ))
    .await?;
    eventually("role written", WAIT, || async {
        w.cluster_role(&role_name).await
    })
    .await?;

    let watch_errors_before = metrics.watch_errors();
    proxy.outage(true);
    w.replace_spec(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "bob"}],
            "access": ["pods", "cadvisor"],
            "namespaces": {"all": true},
        }),
    )
    .await?;
    // The controller must have lost its watches (else the forwarder cut nothing and the test
    // proves nothing), and the change cannot have been applied through the cut.
    eventually("the controller sees the outage", WAIT, || async {
        (metrics.watch_errors() > watch_errors_before).then_some(())
    })
    .await?;
    let during = w.cluster_role(&role_name).await.ok_or("role vanished")?;
    assert!(
        !format!("{:?}", during.rules).contains("nodeagentconfigs/cadvisor"),
        "the change was applied although every connection of the controller was cut"
    );
    proxy.outage(false);
    eventually(
        "the change made during the outage is applied",
        Duration::from_secs(90),
        || async {
            w.cluster_role(&role_name)
                .await
                .filter(|r| format!("{:?}", r.rules).contains("nodeagentconfigs/cadvisor"))
        },
    )
    .await?;
    w.cleanup().await;
    Ok(())
}
