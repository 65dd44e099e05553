//! What the operator owns, against the real local API server: fields other managers set on
//! nodegate's objects cause no write (only what nodegate's field manager owns is compared); a
//! name taken between the ownership check and the write is never adopted; a NodeAgentConfig
//! nodegate does not own is reported on the policies of its node.
//!
//! Run with `cargo test -p nodegate-tests --test operator_ownership` after
//! `eval "$(cargo xtask cluster env)"`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "operator_support.rs"]
mod support;

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use nodegate_crds::NodeAgentConfig;
use nodegate_tests::cluster::unique_name;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::*;

/// Another field manager adds `imagePullSecrets` and `automountServiceAccountToken: false` to
/// nodegate's ServiceAccount and labels to its ClusterRole and binding: three resyncs write
/// nothing and move no resourceVersion. An edit of a field nodegate owns (the role's rules) is
/// still put back, and the other manager's fields stay.
#[tokio::test]
async fn fields_of_other_managers_cause_no_writes() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("owned").await?;
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let mut settings = w.settings();
    settings.resync = Duration::from_secs(1);
    let client = w.client.clone();
    let metrics = w.start_with(settings, None, client.clone());
    let name = unique_name("owned");
    let role_name = format!("nodegate:{name}");
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "Group", "name": "owners"}],
            "serviceAccounts": [{"name": "owned-sa", "namespace": ns.name()}],
            "access": ["pods", "stats"],
            "namespaces": {"all": true},
        }),
    ))
    .await?;
    eventually("RBACApplied", WAIT, || async {
        w.condition(&name, "RBACApplied")
            .await
            .filter(|c| c.0 == "True")
    })
    .await?;
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let created = roles.get(&role_name).await?;
    let original_rules = created.rules.clone();
    // Created (never applied over a name), then owned by apply, so a later apply without a
    // field removes it: nodegate has exactly one entry, an Apply one.
    let entries: Vec<(String, String)> = created
        .managed_fields()
        .iter()
        .filter(|m| m.manager.as_deref() == Some(nodegate_crds::FIELD_MANAGER))
        .map(|m| (m.manager.clone().unwrap(), m.operation.clone().unwrap()))
        .collect();
    assert_eq!(
        entries,
        [(
            nodegate_crds::FIELD_MANAGER.to_string(),
            "Apply".to_string()
        )]
    );

    // Another manager, by server-side apply and by a plain patch.
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "owned-sa", "namespace": ns.name()},
        "imagePullSecrets": [{"name": "registry"}],
        "automountServiceAccountToken": false});
    Api::<ServiceAccount>::namespaced(client.clone(), ns.name())
        .patch("owned-sa", &PatchParams::apply("other"), &Patch::Apply(&sa))
        .await?;
    let label = json!({"metadata": {"labels": {"team": "platform"},
                                    "annotations": {"reviewed": "yes"}}});
    roles
        .patch(&role_name, &PatchParams::default(), &Patch::Merge(&label))
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(&role_name, &PatchParams::default(), &Patch::Merge(&label))
        .await?;

    // Let the caches see those writes (and nodegate answer them, which it must not).
    w.rounds(&metrics, 3).await?;
    let versions = owned_versions(&client, &w.run).await;
    let writes = metrics.writes();
    w.rounds(&metrics, 3).await?;
    assert_eq!(
        metrics.writes(),
        writes,
        "fields of another manager are no reason to write"
    );
    assert_eq!(owned_versions(&client, &w.run).await, versions);
    let sa_now = Api::<ServiceAccount>::namespaced(client.clone(), ns.name())
        .get("owned-sa")
        .await?;
    assert_eq!(sa_now.automount_service_account_token, Some(false));
    assert_eq!(sa_now.image_pull_secrets.unwrap()[0].name, "registry");

    // A field nodegate owns, edited by someone else: restored, their label kept.
    let widened = json!({"rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]});
    roles
        .patch(&role_name, &PatchParams::default(), &Patch::Merge(&widened))
        .await?;
    let restored = eventually("rules restored", WAIT, || async {
        w.cluster_role(&role_name)
            .await
            .filter(|r| r.rules == original_rules)
    })
    .await?;
    assert_eq!(
        restored.labels().get("team").map(String::as_str),
        Some("platform")
    );

    // The binding was created and never applied (its create's fields are those an apply
    // replaces): nodegate's one entry is the create's. Its subjects, an atomic list, still
    // narrow exactly when the policy's do: the forced apply replaces the whole list.
    let bindings = Api::<ClusterRoleBinding>::all(client.clone());
    let binding = bindings.get(&role_name).await?;
    let entries: Vec<String> = binding
        .managed_fields()
        .iter()
        .filter(|m| m.manager.as_deref() == Some(nodegate_crds::FIELD_MANAGER))
        .filter_map(|m| m.operation.clone())
        .collect();
    assert_eq!(entries, ["Update"]);
    let mut policy = w.policies().get(&name).await?;
    policy.spec.subjects = serde_json::from_value(json!([{"kind": "Group", "name": "others"}]))?;
    policy.spec.service_accounts.clear();
    w.policies()
        .replace(&name, &PostParams::default(), &policy)
        .await?;
    let narrowed = eventually("the binding's subjects narrowed", WAIT, || async {
        let b = bindings.get(&role_name).await.ok()?;
        let names: Vec<String> = b
            .subjects
            .iter()
            .flatten()
            .map(|s| s.name.clone())
            .collect();
        (names == ["others"]).then_some(b)
    })
    .await?;
    assert_eq!(narrowed.subjects.map(|s| s.len()), Some(1));
    w.cleanup().await;
    Ok(())
}

/// When an [`interposing_client`] acts.
#[derive(Clone, Copy, PartialEq)]
enum When {
    /// After the API server answered 404 (the name is free), before the controller hears it.
    AfterNotFound,
    /// Before the request reaches the API server.
    Before,
}

type Action = Arc<dyn Fn(kube::Client) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// The controller's client, wrapped: the first `method` request for `path` runs `action`
/// (with the admin client) at `when`. This makes a race deterministic: someone else acts
/// exactly between the controller's read and its write.
fn interposing_client(
    admin: kube::Client,
    method: Method,
    path: String,
    when: When,
    action: Action,
    fired: Arc<AtomicUsize>,
) -> kube::Client {
    let inner = admin.clone();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let inner = inner.clone();
        let admin = admin.clone();
        let action = action.clone();
        let fired = fired.clone();
        // A PATCH counts only as a server-side apply (not the merge patch that records a
        // created object's fields as applied).
        let is_apply = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/apply-patch"));
        let matches = request.method() == method
            && (method != Method::PATCH || is_apply)
            && percent_encoding::percent_decode_str(request.uri().path()).decode_utf8_lossy()
                == path;
        async move {
            if matches && when == When::Before && fired.fetch_add(1, Ordering::SeqCst) == 0 {
                action(admin.clone()).await;
            }
            let response = inner.send(request).await?;
            if matches
                && when == When::AfterNotFound
                && response.status() == StatusCode::NOT_FOUND
                && fired.fetch_add(1, Ordering::SeqCst) == 0
            {
                action(admin).await;
            }
            Ok::<_, kube::Error>(response)
        }
    });
    kube::Client::new(service, "default")
}

/// A ClusterRole of the policy's name created by someone else after the ownership check
/// found the name free: the controller's create fails with AlreadyExists, and the foreign
/// role is reported, never taken over (no label, owner or rule of nodegate's, the same
/// resourceVersion), and no binding to it is written.
#[tokio::test]
async fn a_name_taken_after_the_ownership_check_is_not_adopted() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let name = unique_name("race");
    let role_name = format!("nodegate:{name}");
    let fired = Arc::new(AtomicUsize::new(0));
    let theirs_rv = Arc::new(std::sync::Mutex::new(None::<String>));
    let record = theirs_rv.clone();
    let foreign_name = role_name.clone();
    let create_foreign: Action = Arc::new(move |admin| {
        let name = foreign_name.clone();
        let record = record.clone();
        Box::pin(async move {
            let role = ClusterRole {
                metadata: ObjectMeta {
                    name: Some(name),
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
            };
            let created = Api::<ClusterRole>::all(admin)
                .create(&PostParams::default(), &role)
                .await
                .expect("the foreign role is created");
            *record.lock().unwrap() = created.resource_version();
        })
    });
    let client = interposing_client(
        w.client.clone(),
        Method::GET,
        format!("/apis/rbac.authorization.k8s.io/v1/clusterroles/{role_name}"),
        When::AfterNotFound,
        create_foreign,
        fired.clone(),
    );
    let settings = w.settings();
    w.start_with(settings, None, client);
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "ivan"}],
            "access": ["pods"],
            "namespaces": {"all": true},
        }),
    ))
    .await?;
    let (status, _, message) = eventually("RBACApplied ForeignObject", WAIT, || async {
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
    assert_eq!(
        fired.load(Ordering::SeqCst),
        1,
        "the race happened exactly once"
    );
    // A few more rounds: still not taken.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let role = Api::<ClusterRole>::all(w.client.clone())
        .get(&role_name)
        .await?;
    assert_eq!(
        role.resource_version(),
        theirs_rv.lock().unwrap().clone(),
        "the foreign role was written to: {:?}",
        role.metadata
    );
    assert!(role.owner_references().is_empty());
    assert!(!role.labels().contains_key("app.kubernetes.io/managed-by"));
    assert!(
        Api::<ClusterRoleBinding>::all(w.client.clone())
            .get_opt(&role_name)
            .await?
            .is_none(),
        "no binding to a role nodegate does not own"
    );
    w.cleanup().await;
    Api::<ClusterRole>::all(w.client.clone())
        .delete(&role_name, &DeleteParams::default())
        .await?;
    Ok(())
}

/// A NodeAgentConfig of a selected node's name that nodegate does not own (no labels) is left
/// alone and reported on the policy that selects the node, with a ForeignObject Event: the
/// agent would enforce (or refuse) that object, not the policy.
#[tokio::test]
async fn a_foreign_node_agent_config_is_reported_on_the_nodes_policies() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    // Foreign: an object at the name this instance's config of the node would have.
    let node = w.config_name(&w.node_names()[0]);
    let configs: Api<NodeAgentConfig> = Api::all(w.client.clone());
    let theirs: NodeAgentConfig = serde_json::from_value(json!({
        "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeAgentConfig",
        "metadata": {"name": node}, "spec": {"hash": "theirs"},
    }))?;
    let theirs = configs.create(&PostParams::default(), &theirs).await?;
    w.start();
    let name = unique_name("nac");
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "judy"}],
            "access": ["pods"],
            "namespaces": {"all": true},
        }),
    ))
    .await?;
    let (status, _, message) = eventually("ForeignObject", WAIT, || async {
        w.condition(&name, "RBACApplied")
            .await
            .filter(|c| c.1 == "ForeignObject")
    })
    .await?;
    assert_eq!(status, "False");
    assert!(
        message.contains(&format!("NodeAgentConfig {node}")),
        "{message}"
    );
    eventually("a ForeignObject event", WAIT, || async {
        event_reasons(&w.client, &name)
            .await
            .contains(&"ForeignObject".to_string())
            .then_some(())
    })
    .await?;
    assert_eq!(
        configs.get(&node).await?.resource_version(),
        theirs.resource_version(),
        "left as it was"
    );
    w.cleanup().await;
    configs.delete(&node, &DeleteParams::default()).await?;
    Ok(())
}

/// A stale RoleBinding that someone else takes over (relabels as theirs) just before
/// nodegate's delete reaches the API server: the delete's resourceVersion precondition fails
/// (409), the re-read finds the same object still there, so it is not counted as deleted;
/// the next round no longer sees it as nodegate's and leaves it alone.
#[tokio::test]
async fn a_delete_is_not_sent_through_to_an_object_changed_since_it_was_read() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let (ns_a, ns_b) = (
        cluster.namespace("keep").await?,
        cluster.namespace("drop").await?,
    );
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let name = unique_name("del");
    let binding = format!("nodegate:{name}");
    let fired = Arc::new(AtomicUsize::new(0));
    let (ns, target) = (ns_b.name().to_string(), binding.clone());
    let take_over: Action = Arc::new(move |admin| {
        let (ns, target) = (ns.clone(), target.clone());
        Box::pin(async move {
            let theirs = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "helm"}}});
            Api::<RoleBinding>::namespaced(admin, &ns)
                .patch(&target, &PatchParams::default(), &Patch::Merge(&theirs))
                .await
                .expect("relabelled");
        })
    });
    let client = interposing_client(
        w.client.clone(),
        Method::DELETE,
        format!(
            "/apis/rbac.authorization.k8s.io/v1/namespaces/{}/rolebindings/{binding}",
            ns_b.name()
        ),
        When::Before,
        take_over,
        fired.clone(),
    );
    let mut settings = w.settings();
    // Resyncs, so "three more rounds" come whatever else happens in the cluster.
    settings.resync = Duration::from_secs(1);
    let metrics = w.start_with(settings, None, client);
    let spec = |names: Vec<&str>| {
        json!({
            "subjects": [{"kind": "User", "name": "kim"}],
            "access": ["pods"],
            "namespaces": {"names": names},
        })
    };
    w.create(&w.policy(&name, spec(vec![ns_a.name(), ns_b.name()])))
        .await?;
    let bindings_b: Api<RoleBinding> = Api::namespaced(w.client.clone(), ns_b.name());
    let before = eventually("binding in b", WAIT, || async {
        bindings_b.get_opt(&binding).await.ok().flatten()
    })
    .await?;
    w.replace_spec(&name, spec(vec![ns_a.name()])).await?;
    eventually("the delete attempted", WAIT, || async {
        (fired.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await?;
    w.rounds(&metrics, 3).await?;
    let after = bindings_b
        .get_opt(&binding)
        .await?
        .expect("an object changed since nodegate read it was deleted anyway");
    assert_eq!(after.uid(), before.uid());
    assert_eq!(
        after
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("helm")
    );
    assert_eq!(
        fired.load(Ordering::SeqCst),
        1,
        "one delete, not retried on a foreign object"
    );
    // It still names the policy as owner: the garbage collector takes it with the policy.
    w.cleanup().await;
    let _ = bindings_b.delete(&binding, &DeleteParams::default()).await;
    Ok(())
}

/// nodegate's ClusterRole is replaced by someone else's of the same name (deleted and created
/// again) just before nodegate's update reaches the API server: the apply carries the cached
/// resourceVersion, so it fails instead of taking the new object over, and the next round
/// reports it as foreign.
#[tokio::test]
async fn an_object_replaced_after_the_cache_read_is_not_adopted() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let name = unique_name("swap");
    let role_name = format!("nodegate:{name}");
    let fired = Arc::new(AtomicUsize::new(0));
    let theirs_rv = Arc::new(std::sync::Mutex::new(None::<String>));
    let (record, target) = (theirs_rv.clone(), role_name.clone());
    let replace: Action = Arc::new(move |admin| {
        let (record, target) = (record.clone(), target.clone());
        Box::pin(async move {
            let roles = Api::<ClusterRole>::all(admin);
            roles
                .delete(&target, &DeleteParams::default())
                .await
                .expect("nodegate's role deleted");
            let role = ClusterRole {
                metadata: ObjectMeta {
                    name: Some(target),
                    labels: Some(BTreeMap::from([("owner".into(), "someone-else".into())])),
                    ..Default::default()
                },
                rules: None,
                aggregation_rule: None,
            };
            let created = roles
                .create(&PostParams::default(), &role)
                .await
                .expect("the foreign role is created");
            *record.lock().unwrap() = created.resource_version();
        })
    });
    let client = interposing_client(
        w.client.clone(),
        Method::PATCH,
        format!("/apis/rbac.authorization.k8s.io/v1/clusterroles/{role_name}"),
        When::Before,
        replace,
        fired.clone(),
    );
    let settings = w.settings();
    w.start_with(settings, None, client);
    let spec = |access: Vec<&str>| {
        json!({
            "subjects": [{"kind": "User", "name": "lee"}],
            "access": access,
            "namespaces": {"all": true},
        })
    };
    w.create(&w.policy(&name, spec(vec!["pods"]))).await?;
    eventually("RBACApplied", WAIT, || async {
        w.condition(&name, "RBACApplied")
            .await
            .filter(|c| c.0 == "True")
    })
    .await?;
    assert_eq!(fired.load(Ordering::SeqCst), 0, "created, not patched");
    // Wider access: the role is updated, and replaced just before the update lands.
    w.replace_spec(&name, spec(vec!["pods", "stats"])).await?;
    let (_, _, message) = eventually("RBACApplied ForeignObject", WAIT, || async {
        w.condition(&name, "RBACApplied")
            .await
            .filter(|c| c.1 == "ForeignObject")
    })
    .await?;
    assert!(
        message.contains(&format!("ClusterRole {role_name}")),
        "{message}"
    );
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    let role = Api::<ClusterRole>::all(w.client.clone())
        .get(&role_name)
        .await?;
    assert_eq!(
        role.resource_version(),
        theirs_rv.lock().unwrap().clone(),
        "the replacement was written to: {:?}",
        role.metadata
    );
    assert!(role.rules.unwrap_or_default().is_empty());
    w.cleanup().await;
    let _ = Api::<ClusterRole>::all(w.client.clone())
        .delete(&role_name, &DeleteParams::default())
        .await;
    Ok(())
}

/// A role nodegate created (not applied) loses every rule when its policy selects no node
/// any more: nodegate's fields of a created object are its Apply entry, so an apply without
/// `rules` removes them (with the create's Update entry still owning them, the rules would
/// stay and keep granting), and the diff sees an owned field the desired body dropped.
#[tokio::test]
async fn rules_of_a_created_role_are_revoked_when_nothing_is_selected() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let pool = unique_name("pool");
    let mut w = World::new(cluster.clone(), 1, &[("pool", pool.as_str())]).await?;
    let node = w.node_names()[0].clone();
    w.start();
    let name = unique_name("revoke");
    let role_name = format!("nodegate:{name}");
    let spec = |pool: &str| {
        json!({
            "subjects": [{"kind": "User", "name": "mo"}],
            "access": ["pods"],
            "namespaces": {"all": true},
            "nodeSelector": {"matchLabels": {"pool": pool}},
        })
    };
    w.create(&w.policy(&name, spec(&pool))).await?;
    let role = eventually("the role grants the node", WAIT, || async {
        w.cluster_role(&role_name)
            .await
            .filter(|r| rule_names(r) == [node.clone()])
    })
    .await?;
    assert!(
        role.managed_fields().iter().all(|m| m.manager.as_deref()
            != Some(nodegate_crds::FIELD_MANAGER)
            || m.operation.as_deref() == Some("Apply")),
        "{:?}",
        role.managed_fields()
    );
    eventually("mo may read pods through the agent", WAIT, || async {
        allowed(&w.client, "mo", "get", "pods", &node, "default")
            .await
            .then_some(())
    })
    .await?;
    w.replace_spec(&name, spec("no-such-pool")).await?;
    eventually("every rule revoked", WAIT, || async {
        w.cluster_role(&role_name)
            .await
            .filter(|r| r.rules.as_ref().is_none_or(Vec::is_empty))
    })
    .await?;
    assert!(!allowed(&w.client, "mo", "get", "pods", &node, "default").await);
    w.cleanup().await;
    Ok(())
}
