//! nodegate's grants on the real API server: `render`'s RBAC for the sample policies, applied
//! to kube-apiserver, answers every SubjectAccessReview exactly as the agent decides with the
//! NodeAgentConfigs (issue 6's invariant, checked by the real RBAC authorizer against the
//! agent's own decision function, `nodegate_crds::decision`, rather than models of either), and
//! `kubectl auth can-i` tells the truth per namespace and says no to core `nodes/*`.
//!
//! Run with `cargo xtask test`, or after `eval "$(cargo xtask cluster env)"` with
//! `cargo test -p nodegate-tests --test grants`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use futures::StreamExt;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nodegate_compiler::{self as compiler, NamespaceInfo, NodeInfo};
use nodegate_crds::catalogue::AGENT_API_GROUP;
use nodegate_crds::decision::{Requester, RuleSet, rbac_answer};
use nodegate_crds::selector::LabelSelector;
use nodegate_crds::{Endpoint, NodeApiPolicy, Subject, SubjectKind, Verb};
use nodegate_operator::render;
use nodegate_tests::cluster::{NODE_NAME, unique_name};
use nodegate_tests::{Cluster, TestNamespace};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples")
}

/// The sample policies, made unique to this test run: names suffixed, namespaces mapped to
/// this test's namespaces, label values in selectors suffixed.
fn sample_policies(suffix: &str, namespace_for: &BTreeMap<String, String>) -> Vec<NodeApiPolicy> {
    let map_ns = |n: &String| namespace_for.get(n).cloned().unwrap_or_else(|| n.clone());
    let suffix_selector = |s: &mut LabelSelector| {
        for v in s.match_labels.values_mut() {
            *v = format!("{v}-{suffix}");
        }
        for e in &mut s.match_expressions {
            for v in &mut e.values {
                *v = format!("{v}-{suffix}");
            }
        }
    };
    let mut policies = Vec::new();
    for entry in std::fs::read_dir(samples()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        for mut p in render::read_policies(&path).unwrap() {
            p.metadata.name = Some(format!("{}-{suffix}", p.metadata.name.unwrap()));
            let spec = &mut p.spec;
            if let Some(names) = &mut spec.namespaces.names {
                *names = names.iter().map(map_ns).collect();
            }
            if let Some(s) = &mut spec.namespaces.selector {
                suffix_selector(s);
            }
            if let Some(s) = &mut spec.node_selector {
                suffix_selector(s);
            }
            for sa in &mut spec.service_accounts {
                sa.namespace = map_ns(&sa.namespace);
            }
            for s in &mut spec.subjects {
                if let Some(ns) = &s.namespace {
                    s.namespace = Some(map_ns(ns));
                }
            }
            policies.push(p);
        }
    }
    policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    policies
}

/// Deletes this run's cluster-scoped RBAC when dropped (namespaced objects go with their
/// namespaces).
struct ClusterRbac<'a> {
    cluster: &'a Cluster,
    selector: String,
}

impl Drop for ClusterRbac<'_> {
    fn drop(&mut self) {
        let out = self
            .cluster
            .kubectl()
            .args([
                "delete",
                "clusterrole,clusterrolebinding",
                "-l",
                &self.selector,
            ])
            .output();
        if let Err(e) = out {
            eprintln!("warning: cleanup of {} failed: {e}", self.selector);
        }
    }
}

fn review(
    subject: &Subject,
    endpoint: Endpoint,
    verb: Verb,
    node: &str,
    namespace: Option<&str>,
) -> SubjectAccessReview {
    let (user, groups) = nodegate_crds::decision::review_identity(subject);
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user),
            groups: Some(groups),
            resource_attributes: Some(ResourceAttributes {
                group: Some(AGENT_API_GROUP.into()),
                resource: Some("nodeagentconfigs".into()),
                subresource: Some(endpoint.name().into()),
                name: Some(node.into()),
                namespace: namespace.map(str::to_string),
                verb: Some(verb.as_str().into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn rbac_on_nodegates_resource_answers_like_the_agent_configs() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    cluster.install_crds().await?;
    let admin = cluster.admin()?;
    let suffix = unique_name("g").trim_start_matches("g-").to_string();

    // This run's namespaces stand in for the samples' ones; one is labelled for the
    // payments-oncall selector.
    let mut guards: Vec<TestNamespace> = Vec::new();
    let mut namespace_for = BTreeMap::new();
    for sample_ns in [
        "team-a",
        "team-b",
        "monitoring",
        "finops",
        "public-dashboards",
    ] {
        let ns = cluster.namespace(sample_ns).await?;
        namespace_for.insert(sample_ns.to_string(), ns.name().to_string());
        guards.push(ns);
    }
    let payments = cluster.namespace("payments").await?;
    let label = serde_json::json!({"metadata": {"labels": {"team": format!("payments-{suffix}")}}});
    Api::<Namespace>::all(admin.clone())
        .patch(
            payments.name(),
            &PatchParams::default(),
            &Patch::Merge(&label),
        )
        .await?;
    guards.push(payments);

    let gpu = cluster
        .fake_nodes("gpu", 2, &[("pool", &format!("gpu-{suffix}"))])
        .await?;
    let system = cluster
        .fake_nodes("sys", 1, &[("pool", &format!("system-{suffix}"))])
        .await?;
    let mut nodes = vec![NodeInfo {
        name: NODE_NAME.into(),
        uid: String::new(),
        labels: BTreeMap::new(),
    }];
    for (fake, pool) in [(&gpu, "gpu"), (&system, "system")] {
        for name in fake.names() {
            nodes.push(NodeInfo {
                name: name.clone(),
                uid: String::new(),
                labels: BTreeMap::from([("pool".to_string(), format!("{pool}-{suffix}"))]),
            });
        }
    }
    let namespaces: Vec<NamespaceInfo> = Api::<Namespace>::all(admin.clone())
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .map(|n| NamespaceInfo {
            name: n.metadata.name.unwrap_or_default(),
            labels: n.metadata.labels.unwrap_or_default(),
        })
        .collect();

    let policies = sample_policies(&suffix, &namespace_for);
    assert!(policies.len() >= 7, "{} sample policies", policies.len());
    let desired = compiler::compile(&policies, &nodes, &namespaces);
    for o in &desired.outcomes {
        assert!(o.problems.is_empty(), "{}: {:?}", o.policy, o.problems);
    }
    let configs = desired.node_agent_configs.clone();

    // Apply what `render` prints (RBAC and service accounts; NodeAgentConfigs are checked in
    // memory so other tests' agents are not disturbed).
    let _rbac = ClusterRbac {
        cluster: &cluster,
        selector: format!(
            "nodegate.io/policy in ({})",
            policies
                .iter()
                .map(|p| compiler::policy_label_value(p.metadata.name.as_deref().unwrap()))
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    let mut to_apply = desired.clone();
    to_apply.node_agent_configs.clear();
    let yaml = render::to_yaml(&to_apply)?;
    let file = std::env::temp_dir().join(format!("nodegate-grants-{suffix}.yaml"));
    std::fs::write(&file, &yaml)?;
    cluster
        .run_kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=nodegate",
            "-f",
            &file.to_string_lossy(),
        ])
        .await?;
    std::fs::remove_file(&file).ok();
    assert!(
        !yaml.contains("\n  - nodes/") || yaml.contains("metrics-server"),
        "core nodes/* only for the opt-in sample"
    );

    // The grid: every subject of the samples and a stranger × endpoint × verb × node ×
    // (cluster scope and each of this run's namespaces).
    let mut subjects: BTreeSet<Subject> = desired
        .outcomes
        .iter()
        .flat_map(|o| o.subjects.iter().cloned())
        .collect();
    subjects.retain(|s| !compiler::is_anonymous(s));
    subjects.insert(Subject {
        kind: SubjectKind::Group,
        name: format!("stranger-{suffix}"),
        namespace: None,
    });
    let scopes: Vec<Option<String>> = std::iter::once(None)
        .chain(guards.iter().map(|g| Some(g.name().to_string())))
        .collect();
    let mut cases = Vec::new();
    for config in &configs {
        let node = config.metadata.name.clone().unwrap_or_default();
        let rules = RuleSet::new(config.spec.clone());
        for subject in &subjects {
            for endpoint in Endpoint::all() {
                for verb in [Verb::Get, Verb::Create] {
                    for namespace in &scopes {
                        // The agent's own decision function, as RBAC must answer it.
                        let (user, groups) = nodegate_crds::decision::review_identity(subject);
                        let who = Requester {
                            name: &user,
                            groups: &groups,
                        };
                        let want = rbac_answer(&rules, who, endpoint, verb, namespace.as_deref());
                        cases.push((
                            review(subject, endpoint, verb, &node, namespace.as_deref()),
                            want,
                            format!("{subject:?} {verb} {endpoint} on {node} in {namespace:?}"),
                        ));
                    }
                }
            }
        }
    }
    let api: Api<SubjectAccessReview> = Api::all(admin.clone());
    let total = cases.len();
    let allowed_somewhere = cases.iter().filter(|(_, want, _)| *want).count();
    assert!(
        allowed_somewhere > 50,
        "the grid must contain allowed cases too ({allowed_somewhere})"
    );
    let mismatches: Vec<String> = futures::stream::iter(cases)
        .map(|(sar, want, what)| {
            let api = api.clone();
            async move {
                match api.create(&PostParams::default(), &sar).await {
                    Ok(answer) => {
                        let got = answer.status.is_some_and(|s| s.allowed);
                        (got != want).then(|| format!("{what}: RBAC {got}, agent config {want}"))
                    }
                    Err(e) => Some(format!("{what}: review failed: {e}")),
                }
            }
        })
        .buffer_unordered(32)
        .filter_map(|m| async move { m })
        .collect()
        .await;
    assert!(
        mismatches.is_empty(),
        "{} of {total} reviews disagree, e.g. {:#?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );

    // kubectl tells the truth per namespace, and knows nothing of core nodes/* for this grant.
    let monitoring = format!(
        "system:serviceaccount:{}:mymonitoring",
        namespace_for["monitoring"]
    );
    let can_i = |args: Vec<String>| {
        let out = cluster
            .kubectl()
            .args(["auth", "can-i"])
            .args(&args)
            .arg(format!("--as={monitoring}"))
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let node_resource = format!("nodeagentconfigs/{NODE_NAME}");
    assert_eq!(
        can_i(vec![
            "get".into(),
            node_resource.clone(),
            "--subresource=cadvisor".into(),
            "-n".into(),
            namespace_for["team-a"].clone()
        ])?,
        "yes"
    );
    assert_eq!(
        can_i(vec![
            "get".into(),
            node_resource.clone(),
            "--subresource=cadvisor".into(),
            "-n".into(),
            namespace_for["team-b"].clone()
        ])?,
        "no"
    );
    assert_eq!(
        can_i(vec![
            "create".into(),
            node_resource,
            "--subresource=exec".into(),
            "-n".into(),
            namespace_for["team-a"].clone()
        ])?,
        "no"
    );
    assert_eq!(can_i(vec!["get".into(), "nodes/metrics".into()])?, "no");
    assert_eq!(
        can_i(vec![
            "get".into(),
            "nodes".into(),
            "--subresource=metrics".into()
        ])?,
        "no"
    );
    assert_eq!(
        can_i(vec![
            "get".into(),
            "nodes".into(),
            "--subresource=proxy".into()
        ])?,
        "no"
    );
    drop(gpu);
    drop(system);
    Ok(())
}
