//! The operator when the API server refuses its writes: a refused role, a refused delete and a
//! refused NodeAgentConfig are reported on the policy (condition with the API server's message, an Event), retried with
//! backoff instead of a tight loop, and a narrowing is not Ready until the stale binding is
//! really gone.
//!
//! A test binary of its own, its tests one at a time: the round counts below would otherwise
//! include rounds that other tests' namespaces and nodes start (every controller watches all
//! namespaces and nodes).
//!
//! Run with `cargo test -p nodegate-tests --test operator_refusals` after
//! `eval "$(cargo xtask cluster env)"`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "operator_support.rs"]
mod support;

use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, ListParams, Patch, PatchParams};
use nodegate_crds::NodeAgentConfig;
use nodegate_operator::controller::RoundCause;
use nodegate_tests::Cluster;
use nodegate_tests::cluster::unique_name;
use serde_json::json;
use std::time::Duration;
use support::*;

const RBAC: &str = "rbac.authorization.k8s.io";

/// One test at a time (see the module doc).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A ValidatingAdmissionPolicy and its binding that refuse what `expression` (CEL, true =
/// allowed) refuses, on `operations` of `resource` (`group`, every version); deleted on drop. Returns once the API server enforces it (a dry-run of `probe` is refused).
struct Refusal {
    cluster: Cluster,
    name: String,
}

impl Refusal {
    async fn new(
        cluster: &Cluster,
        (group, resource): (&str, &str),
        operations: &[&str],
        expression: &str,
        message: &str,
        probe: &[&str],
    ) -> Self {
        let name = unique_name("nodegate-test-refuse");
        let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": name},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {"resourceRules": [{
                        "apiGroups": [group],
                        "apiVersions": ["*"],
                        "operations": operations,
                        "resources": [resource],
                    }]},
                    "validations": [{"expression": expression, "message": message}],
                },
            },
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": name},
                "spec": {"policyName": name, "validationActions": ["Deny"]},
            },
        ]});
        kubectl_stdin(cluster, &["apply", "-f", "-"], &objects.to_string());
        let refusal = Refusal {
            cluster: cluster.clone(),
            name,
        };
        // The API server loads admission policies from a watch: wait until it refuses.
        eventually("the admission policy enforced", WAIT, || async {
            let out = cluster
                .kubectl()
                .args(probe)
                .arg("--dry-run=server")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            (!out.status.success() && stderr.contains(message)).then_some(())
        })
        .await
        .unwrap();
        refusal
    }

    /// Lifts the refusal.
    fn lift(&self) {
        let out = self
            .cluster
            .kubectl()
            .arg("delete")
            .arg(format!("validatingadmissionpolicybinding/{}", self.name))
            .arg(format!("validatingadmissionpolicy/{}", self.name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Refusal {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl()
            .args([
                "delete",
                "validatingadmissionpolicybinding,validatingadmissionpolicy",
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

/// Plays the agents of the world's nodes: each NodeAgentConfig's status says its current hash
/// is enforced (what a real agent writes once it loaded the config).
async fn agents_catch_up(w: &World) {
    let configs = Api::<NodeAgentConfig>::all(w.client.clone());
    for node in w.node_names() {
        let Some(config) = w.config(&node).await else {
            continue;
        };
        let status = agent_confirms(&config.spec.hash);
        let _ = configs
            .patch_status(
                &w.config_name(&node),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await;
    }
}

/// Waits until policy `name` is Ready, its agents catching up meanwhile.
async fn ready(w: &World, name: &str) -> TestResult {
    eventually("the policy Ready", WAIT, || async {
        agents_catch_up(w).await;
        w.condition(name, "Ready")
            .await
            .filter(|(s, _, _)| s == "True")
    })
    .await?;
    Ok(())
}

/// A policy granting a new user `pods` of every namespace.
async fn create_pods_policy(w: &World, name: &str) -> TestResult {
    w.create(&w.policy(
        name,
        json!({
            "subjects": [{"kind": "User", "name": unique_name("u")}],
            "access": ["pods"],
            "namespaces": {"all": true},
        }),
    ))
    .await?;
    Ok(())
}

/// Waits until policy `name` is not Ready with `message` (the API server's) in its condition,
/// the agents catching up meanwhile, and has an ApplyFailed Event; returns the condition's
/// reason and text.
async fn refusal_reported(
    w: &World,
    name: &str,
    message: &str,
) -> Result<(String, String), BoxError> {
    let (_, reason, text) = eventually("the refusal reported", WAIT, || async {
        agents_catch_up(w).await;
        w.condition(name, "Ready")
            .await
            .filter(|(s, _, m)| s == "False" && m.contains(message))
    })
    .await?;
    eventually("an ApplyFailed event", WAIT, || async {
        event_reasons(&w.client, name)
            .await
            .iter()
            .any(|r| r == "ApplyFailed")
            .then_some(())
    })
    .await?;
    Ok((reason, text))
}

fn kubectl_stdin(cluster: &Cluster, args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = cluster
        .kubectl()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The policy's ClusterRole is refused by admission: the policy says so with the API server's
/// message and an Event, and the controller retries on its backoff (capped), not in a loop.
#[tokio::test]
async fn a_refused_role_is_reported_and_retried_with_backoff() -> TestResult {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let name = unique_name("refused");
    let role = format!("nodegate:{name}");
    let message = format!("test refuses ClusterRole {role}");
    let _refusal = Refusal::new(
        &cluster,
        (RBAC, "clusterroles"),
        &["CREATE", "UPDATE"],
        &format!("object.metadata.name != '{role}'"),
        &message,
        &[
            "create",
            "clusterrole",
            &role,
            "--verb=get",
            "--resource=pods",
        ],
    )
    .await;
    let mut settings = w.settings();
    settings.backoff_base = Duration::from_millis(500);
    settings.backoff_max = Duration::from_secs(15);
    let client = w.client.clone();
    let metrics = w.start_with(settings, None, client);
    create_pods_policy(&w, &name).await?;

    // Reported: not Ready, the API server's message in the condition, an Event.
    let (reason, text) = refusal_reported(&w, &name, &message).await?;
    assert_eq!(reason, "ApplyFailed");
    assert!(text.contains(&format!("ClusterRole {role}")), "{text}");
    let rbac = w.condition(&name, "RBACApplied").await.unwrap();
    assert_eq!(rbac.0, "False", "{rbac:?}");

    // Backoff: once the delay reached its cap (0.5 s doubling to 15 s: 15.5 s of retries),
    // a 30 s window holds at most two attempts and about as many rounds. Before, rounds ran
    // every 200 ms (about 150 in such a window) while the bindings waited for the role.
    // Rounds that watch events start (other tests' namespaces and nodes) are not counted:
    // they do not retry what is backing off.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let retries = || metrics.reconciles_by(RoundCause::Retry);
    let (errors, rounds, all) = (metrics.errors(), retries(), metrics.reconciles());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (errors, rounds, all) = (
        metrics.errors() - errors,
        retries() - rounds,
        metrics.reconciles() - all,
    );
    eprintln!(
        "in 30 s after the backoff cap: {errors} refused writes, {rounds} retry rounds, {all} rounds in all"
    );
    assert!((1..=2).contains(&errors), "{errors} refused writes");
    assert!((1..=2).contains(&rounds), "{rounds} retry rounds");
    w.cleanup().await;
    Ok(())
}

/// A narrowing whose stale RoleBinding cannot be deleted is not Ready and names it; once the
/// refusal is lifted, the binding goes within the backoff cap, RBAC stops answering yes for
/// the dropped namespace and the policy is Ready.
#[tokio::test]
async fn a_narrowing_is_not_ready_until_the_stale_binding_is_gone() -> TestResult {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let (a, b) = (
        cluster.namespace("narrow-a").await?,
        cluster.namespace("narrow-b").await?,
    );
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let node = w.node_names()[0].clone();
    w.start();
    let name = unique_name("narrow");
    let user = unique_name("nia");
    let spec = |namespaces: &[&str]| {
        json!({
            "subjects": [{"kind": "User", "name": user}],
            "access": ["pods"],
            "namespaces": {"names": namespaces},
        })
    };
    w.create(&w.policy(&name, spec(&[a.name(), b.name()])))
        .await?;
    ready(&w, &name).await?;
    assert!(allowed(&w.client, &user, "get", "pods", &node, b.name()).await);
    let bindings = Api::<RoleBinding>::namespaced(w.client.clone(), b.name());
    let selector = ListParams::default().labels(&format!("nodegate.io/instance={}", w.run));
    let stale = bindings.list(&selector).await?.items;
    assert_eq!(stale.len(), 1, "one RoleBinding in {}", b.name());
    let stale = stale[0].metadata.name.clone().unwrap();

    let message = format!("test refuses deleting RoleBindings in {}", b.name());
    let refusal = Refusal::new(
        &cluster,
        (RBAC, "rolebindings"),
        &["DELETE"],
        &format!("oldObject.metadata.namespace != '{}'", b.name()),
        &message,
        &["delete", "rolebinding", &stale, "-n", b.name()],
    )
    .await;
    w.replace_spec(&name, spec(&[a.name()])).await?;

    // Not Ready, naming the binding that still grants, with the API server's message (also
    // once the agents enforce the narrower config), and an Event.
    let (reason, text) = refusal_reported(&w, &name, &message).await?;
    assert_eq!(reason, "ApplyFailed");
    assert!(text.contains(&stale) && text.contains(b.name()), "{text}");
    assert!(bindings.get_opt(&stale).await?.is_some());

    // Lifted: gone within the backoff cap (5 s in the test world) plus a round, then Ready.
    refusal.lift();
    eventually(
        "the stale binding deleted",
        Duration::from_secs(15),
        || async { bindings.get_opt(&stale).await.ok()?.is_none().then_some(()) },
    )
    .await?;
    ready(&w, &name).await?;
    eventually("RBAC says no for the dropped namespace", WAIT, || async {
        (!allowed(&w.client, &user, "get", "pods", &node, b.name()).await).then_some(())
    })
    .await?;
    assert!(allowed(&w.client, &user, "get", "pods", &node, a.name()).await);
    w.cleanup().await;
    Ok(())
}

/// A node's NodeAgentConfig is refused by admission when a new policy changes the rule set it
/// names: its agent keeps the older rules, so the policies selecting the node say so with the
/// API server's message (a config belongs to no policy: its owner is the node), and an Event;
/// lifted, the config is written and the policy is Ready.
#[tokio::test]
async fn a_refused_node_agent_config_is_reported_on_the_policies_of_its_node() -> TestResult {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let node = w.node_names()[0].clone();
    let config = w.config_name(&node);
    w.start();
    // The node's config as it is with no policy: it names the empty rule set.
    let before = eventually("the node's first config", WAIT, || async {
        Api::<NodeAgentConfig>::all(w.client.clone())
            .get_opt(&config)
            .await
            .ok()
            .flatten()
    })
    .await?;
    let message = format!("test refuses updating NodeAgentConfig {config}");
    let refusal = Refusal::new(
        &cluster,
        ("nodegate.io", "nodeagentconfigs"),
        &["UPDATE"],
        &format!("object.metadata.name != '{config}'"),
        &message,
        &["label", "nodeagentconfig", &config, "probe=1"],
    )
    .await;
    let name = unique_name("refused-config");
    create_pods_policy(&w, &name).await?;

    let (reason, text) = refusal_reported(&w, &name, &message).await?;
    assert_eq!(reason, "ApplyFailed");
    assert!(
        text.contains(&format!("NodeAgentConfig {config}")),
        "{text}"
    );
    let now = Api::<NodeAgentConfig>::all(w.client.clone())
        .get(&config)
        .await?;
    assert_eq!(
        now.spec.rule_set, before.spec.rule_set,
        "the refused config still names the rule set it named before"
    );

    refusal.lift();
    ready(&w, &name).await?;
    let written = w.config(&node).await.expect("the node's config");
    assert!(
        written.spec.rules.iter().any(|r| r.policy == name),
        "the config holds the policy's rule once written"
    );
    w.cleanup().await;
    Ok(())
}
