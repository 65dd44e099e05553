//! Shared by the operator's tests against the real API server (included with `#[path]`): the
//! CRDs installed once, a test's world (its fake nodes, its policies, in-process controllers
//! scoped to them) and what the tests read back.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use nodegate_crds::{NodeAgentConfig, NodeAgentRuleSet, NodeApiPolicy};
use nodegate_operator::controller::CancellationToken;
use nodegate_operator::controller::{self, LeaderSettings, Metrics, Settings};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{FakeNodes, TEST_LABEL, unique_name};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::task::JoinHandle;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const WAIT: Duration = Duration::from_secs(30);

pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The cluster with the CRDs installed (once per test process).
pub async fn cluster() -> Result<Option<Cluster>, BoxError> {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(None);
    };
    cluster.install_crds().await?;
    Ok(Some(cluster))
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<T, BoxError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(
                format!("timed out after {}s waiting for {what}", timeout.as_secs()).into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One test's world: a run label for its policies and an in-process controller.
pub struct World {
    pub cluster: Cluster,
    pub client: kube::Client,
    pub run: String,
    pub nodes: Option<FakeNodes>,
    pub controllers: Vec<Running>,
}

pub struct Running {
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), controller::Error>>,
}

impl Running {
    pub async fn stop(self) {
        self.stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("controller stops within 20 s")
            .expect("controller task");
        result.expect("controller ends cleanly");
    }
}

impl World {
    pub async fn new(
        cluster: Cluster,
        nodes: usize,
        labels: &[(&str, &str)],
    ) -> Result<Self, BoxError> {
        let client = cluster.admin()?;
        let nodes = if nodes > 0 {
            Some(cluster.fake_nodes("opnode", nodes, labels).await?)
        } else {
            None
        };
        Ok(Self {
            cluster,
            client,
            run: unique_name("op"),
            nodes,
            controllers: Vec::new(),
        })
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes
            .as_ref()
            .map(|n| n.names().to_vec())
            .unwrap_or_default()
    }

    pub fn settings(&self) -> Settings {
        Settings {
            policy_selector: Some(format!("{TEST_LABEL}={}", self.run)),
            node_selector: Some(
                self.nodes
                    .as_ref()
                    .map(|n| n.selector())
                    .unwrap_or_else(|| format!("{TEST_LABEL}={}-none", self.run)),
            ),
            instance: Some(self.run.clone()),
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(3600),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            reporter_instance: Some(self.run.clone()),
            ..Settings::default()
        }
    }

    pub fn start_with(
        &mut self,
        settings: Settings,
        leader: Option<LeaderSettings>,
        client: kube::Client,
    ) -> Metrics {
        let metrics = Metrics::new().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(controller::run(
            client,
            settings,
            leader,
            metrics.clone(),
            stop.clone(),
        ));
        self.controllers.push(Running { stop, task });
        metrics
    }

    pub fn start(&mut self) -> Metrics {
        let settings = self.settings();
        let client = self.client.clone();
        self.start_with(settings, None, client)
    }

    pub async fn stop_all(&mut self) {
        for c in self.controllers.drain(..) {
            c.stop().await;
        }
    }

    pub fn policy(&self, name: &str, spec: serde_json::Value) -> NodeApiPolicy {
        let mut policy = NodeApiPolicy::new(name, serde_json::from_value(spec).unwrap());
        policy.metadata.labels = Some(BTreeMap::from([(TEST_LABEL.to_string(), self.run.clone())]));
        policy
    }

    pub fn policies(&self) -> Api<NodeApiPolicy> {
        Api::all(self.client.clone())
    }

    pub async fn create(&self, policy: &NodeApiPolicy) -> Result<NodeApiPolicy, BoxError> {
        Ok(self
            .policies()
            .create(&PostParams::default(), policy)
            .await?)
    }

    pub async fn replace_spec(&self, name: &str, spec: serde_json::Value) -> Result<(), BoxError> {
        let patch = json!({"spec": spec});
        // A merge patch on spec replaces lists wholesale, as an edit would.
        self.policies()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    pub async fn cluster_role(&self, name: &str) -> Option<ClusterRole> {
        Api::<ClusterRole>::all(self.client.clone())
            .get_opt(name)
            .await
            .ok()
            .flatten()
    }

    /// The name of `node`'s NodeAgentConfig under this test's instance.
    pub fn config_name(&self, node: &str) -> String {
        nodegate_compiler::config_name(node, Some(&self.run))
    }

    /// The node's NodeAgentConfig as its agent sees it: with the rules (and hash) of the
    /// rule set it names in its spec. None while either is missing.
    pub async fn config(&self, node: &str) -> Option<NodeAgentConfig> {
        effective_config(&self.client, node, Some(&self.run))
            .await
            .ok()
            .flatten()
    }

    /// The NodeAgentRuleSet `name`, if it exists.
    pub async fn rule_set(&self, name: &str) -> Option<NodeAgentRuleSet> {
        Api::<NodeAgentRuleSet>::all(self.client.clone())
            .get_opt(name)
            .await
            .ok()
            .flatten()
    }

    pub async fn condition(&self, policy: &str, type_: &str) -> Option<(String, String, String)> {
        let p = self.policies().get_opt(policy).await.ok().flatten()?;
        let c = p
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)?;
        Some((c.status, c.reason, c.message))
    }

    /// Waits until every controller has run at least `rounds` more rounds than now.
    pub async fn rounds(&self, metrics: &Metrics, rounds: u64) -> Result<(), BoxError> {
        let target = metrics.reconciles() + rounds;
        eventually("reconcile rounds", WAIT, || async {
            (metrics.reconciles() >= target).then_some(())
        })
        .await
    }

    /// Deletes this test's policies (their outputs go with them) and its instance's rule sets
    /// (which a stopped operator no longer removes: they have no owner to collect them).
    pub async fn cleanup(&mut self) {
        self.stop_all().await;
        let lp = kube::api::ListParams::default().labels(&format!("{TEST_LABEL}={}", self.run));
        let _ = self
            .policies()
            .delete_collection(&DeleteParams::default(), &lp)
            .await;
        let instance =
            kube::api::ListParams::default().labels(&format!("nodegate.io/instance={}", self.run));
        let _ = Api::<NodeAgentRuleSet>::all(self.client.clone())
            .delete_collection(&DeleteParams::default(), &instance)
            .await;
    }
}

/// A test that fails before its `cleanup` still deletes its policies (their outputs go with
/// them), so no later operator without a policy selector (the demo's) enforces them.
impl Drop for World {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl()
            .args(["delete", "nodeapipolicies", "-l"])
            .arg(format!("{TEST_LABEL}={}", self.run))
            .args(["--ignore-not-found", "--wait=false"])
            .output();
    }
}

/// Reasons of the Events about policy `name` (cluster-scoped: in namespace default).
pub async fn event_reasons(client: &kube::Client, name: &str) -> Vec<String> {
    let lp = kube::api::ListParams::default().fields(&format!("involvedObject.name={name}"));
    Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), "default")
        .list(&lp)
        .await
        .map(|l| l.items.into_iter().filter_map(|e| e.reason).collect())
        .unwrap_or_default()
}

pub fn rule_names(role: &ClusterRole) -> Vec<String> {
    let mut names: Vec<String> = role
        .rules
        .iter()
        .flatten()
        .flat_map(|r: &PolicyRule| r.resource_names.clone().unwrap_or_default())
        .collect();
    names.sort();
    names.dedup();
    names
}

// Not every test that includes this file plays agents or reads configs.
#[allow(unused_imports)]
pub use nodegate_tests::configs::{agent_confirms, config_policies, effective_config};

/// Resource versions of every object the test's instance owns.
pub async fn owned_versions(client: &kube::Client, run: &str) -> BTreeMap<String, String> {
    let lp = kube::api::ListParams::default().labels(&format!(
        "app.kubernetes.io/managed-by=nodegate,nodegate.io/instance={run}"
    ));
    let mut versions = BTreeMap::new();
    macro_rules! collect {
        ($k:ty, $kind:literal) => {
            for o in Api::<$k>::all(client.clone()).list(&lp).await.unwrap() {
                versions.insert(
                    format!(
                        "{} {}/{}",
                        $kind,
                        o.namespace().unwrap_or_default(),
                        o.name_any()
                    ),
                    o.resource_version().unwrap_or_default(),
                );
            }
        };
    }
    collect!(ClusterRole, "ClusterRole");
    collect!(ClusterRoleBinding, "ClusterRoleBinding");
    collect!(RoleBinding, "RoleBinding");
    collect!(ServiceAccount, "ServiceAccount");
    collect!(NodeAgentRuleSet, "NodeAgentRuleSet");
    collect!(NodeAgentConfig, "NodeAgentConfig");
    versions
}

/// Whether `user` may `verb` the `subresource` of node `node`'s NodeAgentConfig with data of
/// `namespace`, as the API server's authorizer answers (what the agent's SubjectAccessReview
/// mode asks).
pub async fn allowed(
    client: &kube::Client,
    user: &str,
    verb: &str,
    subresource: &str,
    node: &str,
    namespace: &str,
) -> bool {
    try_allowed(client, user, verb, subresource, node, namespace)
        .await
        .unwrap()
}

/// [`allowed`], with the API server's error when it cannot answer (it may be restarting).
pub async fn try_allowed(
    client: &kube::Client,
    user: &str,
    verb: &str,
    subresource: &str,
    node: &str,
    namespace: &str,
) -> Result<bool, kube::Error> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(vec!["system:authenticated".into()]),
            resource_attributes: Some(ResourceAttributes {
                group: Some("nodegate.io".into()),
                resource: Some("nodeagentconfigs".into()),
                subresource: Some(subresource.into()),
                name: Some(node.into()),
                namespace: Some(namespace.into()),
                verb: Some(verb.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}
