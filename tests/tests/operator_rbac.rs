//! The operator's own RBAC (config/rbac): it covers every grant a policy can compile to, holds
//! no wildcard, `escalate` or `bind`, and is enough to run the controller on a real API server
//! (RBAC's escalation check passes because the operator holds what it grants).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use nodegate_crds::{Endpoint, NodeApiPolicy};
use nodegate_operator::controller::{self, CancellationToken, LeaderSettings, Metrics, Settings};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{TEST_LABEL, unique_name};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// config/rbac is applied as an admin would, renamed by a kustomize overlay (`namePrefix`,
/// `namespace`) so the test never touches a real installation (the demo's or the chart's
/// `nodegate-operator` objects in `nodegate-system`).
const NAMESPACE: &str = "nodegate-rbac-test";
const PREFIX: &str = "rbac-test-";
const ACCOUNT: &str = "rbac-test-nodegate-operator";

/// A kustomize overlay of config/rbac with the test's prefix and namespace. Kustomize takes
/// bases only by relative path, so the overlay names config/rbac relative to its own dir.
fn rbac_overlay() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("operator-rbac-overlay");
    std::fs::create_dir_all(&dir).unwrap();
    let base = repo("config/rbac").canonicalize().unwrap();
    let here = dir.canonicalize().unwrap();
    let ups = here.components().count() - 1;
    let relative = format!(
        "{}{}",
        "../".repeat(ups),
        base.strip_prefix("/").unwrap().display()
    );
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!("namespace: {NAMESPACE}\nnamePrefix: {PREFIX}\nresources:\n  - {relative}\n"),
    )
    .unwrap();
    dir
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn operator_role() -> ClusterRole {
    let text = std::fs::read_to_string(repo("config/rbac/cluster_role.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn holds(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
            && r.resource_names.as_ref().is_none_or(|n| n.is_empty())
    })
}

#[test]
fn holds_every_grant_a_policy_can_compile_to() {
    let role = operator_role();
    let rules = role.rules.unwrap();
    for endpoint in Endpoint::all() {
        for verb in endpoint.verbs() {
            let resource = endpoint.agent_resource();
            assert!(
                holds(&rules, "nodegate.io", &resource, verb.as_str()),
                "config/rbac misses {verb:?} {resource}: the operator could not create a ClusterRole granting {}",
                endpoint.name()
            );
            // Component endpoints have no core grant: only the agent serves them.
            let Some(subresource) = endpoint.rbac_subresource() else {
                continue;
            };
            let core = format!("nodes/{}", subresource.as_str());
            assert!(
                holds(&rules, "", &core, verb.as_str()),
                "config/rbac misses {verb:?} {core} (directKubeletAccess of {})",
                endpoint.name()
            );
        }
    }
    // get nodes/proxy, which a direct grant of exec/attach/portForward implies on a kubelet.
    assert!(holds(&rules, "", "nodes/proxy", "get"));
}

#[test]
fn holds_no_wildcard_escalate_or_bind() {
    let text = std::fs::read_to_string(repo("config/rbac/cluster_role.yaml")).unwrap();
    let role: ClusterRole = serde_yaml::from_str(&text).unwrap();
    for rule in role.rules.unwrap() {
        let all: Vec<&String> = rule
            .api_groups
            .iter()
            .flatten()
            .chain(rule.resources.iter().flatten())
            .chain(rule.verbs.iter())
            .collect();
        assert!(!all.iter().any(|x| x.contains('*')), "wildcard in {rule:?}");
        assert!(
            !rule
                .verbs
                .iter()
                .any(|v| v == "escalate" || v == "bind" || v == "impersonate"),
            "{rule:?}"
        );
        // Core resources: only the named inputs, outputs and kubelet subresources.
        if rule.api_groups.iter().flatten().any(|g| g.is_empty()) {
            for r in rule.resources.iter().flatten() {
                assert!(
                    ["nodes", "namespaces", "serviceaccounts"].contains(&r.as_str())
                        || r.starts_with("nodes/"),
                    "unexpected core resource {r}"
                );
            }
        }
    }
}

/// Applies config/rbac and runs the controller as its service account: every ClusterRole,
/// binding, service account and NodeAgentConfig is written, for a policy granting every
/// endpoint, and for one with directKubeletAccess (core nodes/* rules).
#[tokio::test]
async fn controller_runs_with_its_own_rbac() -> TestResult {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("nodegate_operator=warn")
        .with_test_writer()
        .try_init();
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let out = cluster
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(repo("crds/nodeapipolicies.yaml"))
        .arg("-f")
        .arg(repo("crds/nodeagentconfigs.yaml"))
        .arg("-f")
        .arg(repo("crds/nodeagentrulesets.yaml"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster
        .kubectl()
        .args(["wait", "--for=condition=Established", "--timeout=60s"])
        .args([
            "crd/nodeapipolicies.nodegate.io",
            "crd/nodeagentconfigs.nodegate.io",
            "crd/nodeagentrulesets.nodegate.io",
        ])
        .output()?;
    // Namespace first (ignore "exists"), then the RBAC, as a cluster admin would.
    let _ = cluster
        .kubectl()
        .args(["create", "namespace", NAMESPACE])
        .output()?;
    let overlay = rbac_overlay();
    let out = cluster
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-k"])
        .arg(&overlay)
        .output()?;
    assert!(
        out.status.success(),
        "applying config/rbac: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The operator may not escalate or bind on its own.
    let as_operator = format!("system:serviceaccount:{NAMESPACE}:{ACCOUNT}");
    for verb in ["escalate", "bind"] {
        let out = cluster
            .kubectl()
            .args(["auth", "can-i", verb, "clusterroles", "--as", &as_operator])
            .output()?;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no", "{verb}");
    }

    let admin = cluster.admin()?;
    let nodes = cluster.fake_nodes("rbacnode", 2, &[]).await?;
    let ns = cluster.namespace("rbac").await?;
    let run = unique_name("rbac");
    let operator = cluster.service_account(NAMESPACE, ACCOUNT).await?;
    let settings = Settings {
        policy_selector: Some(format!("{TEST_LABEL}={run}")),
        node_selector: Some(nodes.selector()),
        instance: Some(run.clone()),
        debounce: Duration::from_millis(100),
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        ..Settings::default()
    };
    let leader = LeaderSettings {
        lease_name: unique_name("rbac-lease"),
        lease_namespace: NAMESPACE.into(),
        identity: run.clone(),
        lease_duration: Duration::from_secs(4),
        renew_deadline: Duration::from_secs(3),
        retry_period: Duration::from_secs(1),
    };
    let metrics = Metrics::new()?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(controller::run(
        operator,
        settings,
        Some(leader),
        metrics.clone(),
        stop.clone(),
    ));

    let policies: Api<NodeApiPolicy> = Api::all(admin.clone());
    let every: Vec<&str> = Endpoint::all().map(|e| e.name()).collect();
    let direct: Vec<&str> = Endpoint::all().map(|e| e.name()).collect();
    let specs = [
        (
            unique_name("every"),
            json!({
                "subjects": [{"kind": "User", "name": "ops"}],
                "serviceAccounts": [{"name": "scraper", "namespace": ns.name()}],
                "access": every,
                "namespaces": {"all": true},
            }),
        ),
        (
            unique_name("scoped"),
            json!({
                "subjects": [{"kind": "Group", "name": "team"}],
                "access": ["pods", "cadvisor", "healthz", "exec"],
                "namespaces": {"names": [ns.name()]},
            }),
        ),
        (
            unique_name("direct"),
            json!({
                "subjects": [{"kind": "User", "name": "legacy-scraper"}],
                "access": direct,
                "namespaces": {"all": true},
                "directKubeletAccess": true,
            }),
        ),
    ];
    for (name, spec) in &specs {
        let mut policy = NodeApiPolicy::new(name, serde_json::from_value(spec.clone())?);
        policy.metadata.labels = Some(BTreeMap::from([(TEST_LABEL.to_string(), run.clone())]));
        policies.create(&PostParams::default(), &policy).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = 0;
        let mut last = String::new();
        for (name, _) in &specs {
            let p = policies.get(name).await?;
            let rbac = p
                .status
                .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "RBACApplied"));
            match rbac {
                Some(c) if c.status == "True" => done += 1,
                Some(c) => last = format!("{name}: {} {}", c.reason, c.message),
                None => last = format!("{name}: no status yet"),
            }
        }
        if done == specs.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "RBAC not applied as the operator's service account: {last}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let errors: Vec<String> = metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("nodegate_operator_errors_total"))
        .map(str::to_string)
        .collect();
    assert_eq!(metrics.errors(), 0, "no request was refused: {errors:?}");
    // The direct policy really wrote core nodes/* rules, so the escalation check ran on them.
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let lp = ListParams::default().labels(&format!("nodegate.io/instance={run}"));
    let core_rules = roles
        .list(&lp)
        .await?
        .into_iter()
        .flat_map(|r| r.rules.unwrap_or_default())
        .filter(|r| {
            r.resources
                .iter()
                .flatten()
                .any(|x| x.starts_with("nodes/"))
        })
        .count();
    assert!(core_rules > 0, "no nodes/* rule was generated");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), task).await???;
    let lp = ListParams::default().labels(&format!("{TEST_LABEL}={run}"));
    policies
        .delete_collection(&DeleteParams::default(), &lp)
        .await?;
    cluster
        .kubectl()
        .args(["delete", "--ignore-not-found", "--wait=false", "-k"])
        .arg(&overlay)
        .output()?;
    Ok(())
}
