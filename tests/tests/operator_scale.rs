//! The operator at scale, as installed: `helm upgrade --install` of the chart with the image
//! `cargo xtask image` built and the chart's own resources (two replicas, leader election, the
//! memory limit of values.yaml), against nodes that heartbeat like kubelets.
//!
//! The shape of issue 20: policies three in four without a `nodeSelector` (the fourth selects a
//! pool of nodes), each naming 1–5 namespaces and two endpoints, 50 service accounts shared
//! among them; Node objects tainted `NoSchedule` (no pod lands on them) that write their status
//! and renew their Lease in `kube-node-lease` every 10 s, and a simulated agent per node that
//! reports in its NodeAgentConfig's status the hash it enforces. What it must show:
//!
//! - every policy's RBAC and every node's NodeAgentConfig written, every policy Ready;
//! - zero container restarts of the operator;
//! - the leader's peak memory (its cgroup's, from its own metric) below its limit with at least
//!   30 % headroom;
//! - with heartbeats only, for 60 s: at most one reconcile round and zero writes;
//! - churn (issue 16): one policy without a `nodeSelector` changed per second (a different one
//!   each time, its namespace list moved on by one), for 300 s at the full shape and 20 s
//!   otherwise (`NODEGATE_SCALE_CHURN_SECONDS`): the time from each change (its update
//!   accepted) until every node's NodeAgentConfig names a NodeAgentRuleSet that holds it, read
//!   from their content through one watch on the instance's configs and one on its rule sets;
//!   the p99 must be at most 5 s at the full shape, and every change must land.
//!
//! `cargo xtask test` runs the reduced shape (200 policies × 100 nodes × 40 namespaces);
//! `cargo xtask scale` the full one (1,000 × 500 × 200, `NODEGATE_SCALE=full`). Everything the
//! test creates (release, nodes, leases, namespaces, policies) is deleted when it ends, also
//! when it fails.
//!
//! Images: `$NODEGATE_OPERATOR_IMAGE` (`cargo xtask test` exports it); helm: `$NODEGATE_HELM`.
//! `NODEGATE_SCALE_SET`: extra chart values (`--set`), whitespace-separated, e.g.
//! `operator.log.level=info\,nodegate_operator::controller::reconcile=debug` for each round's
//! phase timings in the operator's log.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use nodegate_crds::{NodeAgentConfig, NodeAgentConfigSpec, NodeAgentRuleSet, NodeApiPolicy};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{TEST_LABEL, unique_name};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The taint of the fake nodes: no pod is scheduled to them.
const FAKE_TAINT: &str = "nodegate.io/fake-node";
/// A kubelet's heartbeat period (node status and Lease).
const HEARTBEAT: Duration = Duration::from_secs(10);
/// The quiet period measured, heartbeats only.
const QUIET: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
struct Shape {
    policies: usize,
    nodes: usize,
    namespaces: usize,
}

impl Shape {
    /// `NODEGATE_SCALE=full`: the scale; `PxNxS` (e.g. `500x250x100`): that many
    /// policies, nodes and namespaces; unset: the reduced shape.
    fn from_env() -> Self {
        let value = std::env::var("NODEGATE_SCALE").unwrap_or_default();
        let sizes: Vec<usize> = value.split('x').filter_map(|v| v.parse().ok()).collect();
        match (value.as_str(), &sizes[..]) {
            ("full", _) => Shape {
                policies: 1000,
                nodes: 500,
                namespaces: 200,
            },
            (_, &[policies, nodes, namespaces]) => Shape {
                policies,
                nodes,
                namespaces,
            },
            ("", _) => Shape {
                policies: 200,
                nodes: 100,
                namespaces: 40,
            },
            _ => panic!("NODEGATE_SCALE={value}: full, PxNxS or unset"),
        }
    }

    /// The namespaces policy `i` names: 1–5 of them.
    fn policy_namespaces(&self, i: usize) -> Vec<usize> {
        let count = 1 + i % 5;
        (0..count)
            .map(|k| (i * 7 + k * 13) % self.namespaces)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn helm() -> PathBuf {
    match std::env::var("NODEGATE_HELM") {
        Ok(path) if !path.is_empty() => PathBuf::from(path),
        _ => {
            let out = Command::new(env!("CARGO"))
                .args(["xtask", "helm", "--path"])
                .current_dir(repo(""))
                .output()
                .expect("cargo xtask helm --path");
            assert!(
                out.status.success(),
                "NODEGATE_HELM is unset and `cargo xtask helm --path` failed"
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    }
}

/// `repository:tag` of an image reference.
fn split_image(reference: &str) -> (String, String) {
    let slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[slash..].rfind(':') {
        Some(i) => (
            reference[..slash + i].to_string(),
            reference[slash + i + 1..].to_string(),
        ),
        None => (reference.to_string(), "latest".to_string()),
    }
}

/// Removes everything of the run when dropped, whether the test passed or not: the release,
/// then the policies (their outputs are garbage collected with them), the nodes (their
/// NodeAgentConfigs and Leases with them), the Leases and namespaces by label.
struct Cleanup {
    helm: PathBuf,
    cluster: Cluster,
    release: String,
    namespace: String,
    run: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(&self.helm)
            .env("KUBECONFIG", &self.cluster.location().kubeconfig)
            .args(["uninstall", &self.release, "--namespace", &self.namespace])
            .args(["--wait=false"])
            .output();
        let selector = format!("{TEST_LABEL}={}", self.run);
        let instance = format!("nodegate.io/instance={}", self.release);
        for args in [
            vec!["delete", "nodeapipolicies", "-l", &selector],
            vec!["delete", "nodes", "-l", &selector],
            vec!["delete", "leases", "-n", "kube-node-lease", "-l", &selector],
            vec![
                "delete",
                "nodeagentconfigs,nodeagentrulesets,clusterroles,clusterrolebindings",
                "-l",
                &instance,
            ],
            vec!["delete", "namespaces", "-l", &selector],
            vec!["delete", "namespace", &self.namespace],
        ] {
            let out = self
                .cluster
                .kubectl()
                .args(&args)
                .args(["--ignore-not-found", "--wait=false"])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "warning: cleanup `kubectl {}`: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("warning: cleanup `kubectl {}`: {e}", args.join(" ")),
            }
        }
    }
}

/// The change of every `nodegate_operator_write_requests_total` series from `before` to
/// `after`, as `kind/op +n` (those that changed).
fn write_deltas(before: &str, after: &str) -> String {
    let series = |text: &str| -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| l.starts_with("nodegate_operator_write_requests_total{"))
            .filter_map(|l| {
                let (labels, value) = l.rsplit_once(' ')?;
                Some((labels.to_string(), value.parse().ok()?))
            })
            .collect()
    };
    let before = series(before);
    series(after)
        .into_iter()
        .filter_map(|(labels, n)| {
            let d = n - before.get(&labels).copied().unwrap_or(0.0);
            (d > 0.0).then(|| format!("{labels} +{d}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sums the samples of `name` (every label set) in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The sample of `name` with the label `label` (`key="value"`).
fn sample(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The operator pods' metrics, by pod name (their pod IPs are routed from this host).
async fn scrape(pods: &Api<Pod>, selector: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pod in pods
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
    {
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        let got = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(format!("http://{ip}:8080/metrics"))
            .output();
        if let Ok(o) = got
            && o.status.success()
        {
            out.insert(
                pod.metadata.name.unwrap_or_default(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
            );
        }
    }
    out
}

/// The leader's metrics: the one replica whose `nodegate_operator_leader` is 1.
async fn leader_metrics(pods: &Api<Pod>, selector: &str) -> (String, String) {
    let started = Instant::now();
    loop {
        let all = scrape(pods, selector).await;
        let leaders: Vec<_> = all
            .into_iter()
            .filter(|(_, m)| metric(m, "nodegate_operator_leader") == 1.0)
            .collect();
        if let [(name, text)] = &leaders[..] {
            return (name.clone(), text.clone());
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not exactly one leader among the operator replicas: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Kubelet-like heartbeats: every node's Ready condition and its Lease renewed every
/// [`HEARTBEAT`], spread evenly over the period, until the task is aborted.
fn heartbeat(
    client: kube::Client,
    nodes: Vec<(String, String)>,
    run: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let node_api: Api<Node> = Api::all(client.clone());
        let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
        let step = HEARTBEAT / nodes.len().max(1) as u32;
        let mut tick = tokio::time::interval(step);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for (name, uid) in nodes.iter().cycle() {
            tick.tick().await;
            let now = k8s_openapi::jiff::Timestamp::now();
            let status = json!({"status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "fake kubelet is posting ready status",
                "lastHeartbeatTime": now.round(k8s_openapi::jiff::Unit::Second).unwrap(),
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }]}});
            let _ = node_api
                .patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
                .await;
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease",
                    "labels": {TEST_LABEL: run},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                         "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now)},
            });
            let _ = leases
                .patch(
                    name,
                    &PatchParams::apply("fake-kubelet").force(),
                    &Patch::Apply(&lease),
                )
                .await;
        }
    })
}

/// What every node's simulated agent does once it has loaded its config: report the hash of
/// the rule set it names in status. Returns how many it wrote.
async fn agents_report(configs: &Api<NodeAgentConfig>, instance: &str) -> usize {
    let lp = ListParams::default().labels(&format!("nodegate.io/instance={instance}"));
    let list = configs.list(&lp).await.unwrap();
    let sets: BTreeMap<String, String> =
        Api::<NodeAgentRuleSet>::all(configs.clone().into_client())
            .list(&lp)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|r| (r.metadata.name.unwrap_or_default(), r.spec.0.hash))
            .collect();
    let behind: Vec<(String, String)> = list
        .items
        .into_iter()
        .filter_map(|c| {
            let hash = sets.get(c.spec.rule_set.as_deref()?)?.clone();
            let observed = c.status.as_ref().and_then(|s| s.observed_hash.as_deref());
            (observed != Some(hash.as_str())).then(|| (c.metadata.name.unwrap_or_default(), hash))
        })
        .collect();
    let n = behind.len();
    futures::stream::iter(behind)
        .for_each_concurrent(16, |(name, hash)| async move {
            let status = nodegate_tests::configs::agent_confirms(&hash);
            let _ = configs
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
        })
        .await;
    n
}

fn ready(policy: &NodeApiPolicy) -> bool {
    policy.status.as_ref().is_some_and(|s| {
        s.observed_generation == policy.metadata.generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// One change of the churn phase and when every node's configuration held it.
struct Change {
    policy: String,
    names: Vec<String>,
    at: Instant,
    landed: Option<Instant>,
}

/// Whether `spec` holds `names` as the namespaces of `policy`'s rule.
fn holds(spec: &NodeAgentConfigSpec, policy: &str, names: &[String]) -> bool {
    spec.rules
        .iter()
        .find(|r| r.policy == policy)
        .and_then(|r| spec.namespace_sets.get(r.namespaces as usize))
        .is_some_and(|set| set.names == names)
}

/// Which rule set each node's config names, and what each rule set holds, as two watches
/// (the instance's configs and rule sets) report them.
#[derive(Default)]
struct Written {
    named: BTreeMap<String, String>,
    sets: BTreeMap<String, NodeAgentConfigSpec>,
}

impl Written {
    /// Marks the changes that every one of `nodes` now holds.
    fn mark(&self, nodes: usize, changes: &mut [Change], now: Instant) {
        if self.named.len() < nodes {
            return;
        }
        for change in changes.iter_mut().filter(|c| c.landed.is_none()) {
            let holding: BTreeSet<&String> = self
                .sets
                .iter()
                .filter(|(_, spec)| holds(spec, &change.policy, &change.names))
                .map(|(name, _)| name)
                .collect();
            if self.named.values().all(|set| holding.contains(set)) {
                change.landed = Some(now);
            }
        }
    }
}

/// Watches the instance's configs and rule sets and marks each change once every node's
/// configuration holds it.
fn watch_written(
    client: kube::Client,
    instance: String,
    nodes: usize,
    written: std::sync::Arc<std::sync::Mutex<Written>>,
    changes: std::sync::Arc<std::sync::Mutex<Vec<Change>>>,
) -> tokio::task::JoinHandle<()> {
    use kube::runtime::watcher::{Config, Event, watcher};
    enum Update {
        Config(NodeAgentConfig),
        Set(NodeAgentRuleSet),
    }
    tokio::spawn(async move {
        let cfg = Config::default().labels(&format!("nodegate.io/instance={instance}"));
        let configs = watcher(Api::<NodeAgentConfig>::all(client.clone()), cfg.clone())
            .filter_map(|e| async move {
                match e {
                    Ok(Event::Apply(o) | Event::InitApply(o)) => Some(Update::Config(o)),
                    _ => None,
                }
            })
            .boxed();
        let sets = watcher(Api::<NodeAgentRuleSet>::all(client), cfg)
            .filter_map(|e| async move {
                match e {
                    Ok(Event::Apply(o) | Event::InitApply(o)) => Some(Update::Set(o)),
                    _ => None,
                }
            })
            .boxed();
        let mut updates = futures::stream::select(configs, sets);
        while let Some(update) = updates.next().await {
            let mut written = written.lock().unwrap();
            match update {
                Update::Config(c) => {
                    if let (Some(node), Some(set)) = (c.metadata.name, c.spec.rule_set) {
                        written.named.insert(node, set);
                    }
                }
                Update::Set(r) => {
                    if let Some(name) = r.metadata.name {
                        written.sets.insert(name, r.spec.0);
                    }
                }
            }
            written.mark(nodes, &mut changes.lock().unwrap(), Instant::now());
        }
    })
}

/// The `q` quantile (0..=1) of sorted `values`.
fn quantile(values: &[Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let i = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[i.min(values.len() - 1)]
}

#[tokio::test]
async fn installed_operator_at_scale() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let shape = Shape::from_env();
    let Some(image) = std::env::var("NODEGATE_OPERATOR_IMAGE")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        panic!(
            "NODEGATE_OPERATOR_IMAGE is not set: run `cargo xtask test` (it builds the images \
             and imports them into the node), or `cargo xtask image` and export what it prints; \
             NODEGATE_SKIP_CLUSTER=1 skips the cluster tests"
        );
    };
    let agent_image = std::env::var("NODEGATE_AGENT_IMAGE").unwrap_or_else(|_| image.clone());
    cluster.install_crds().await?;
    let admin = cluster.admin()?;
    let helm = helm();
    let run = unique_name("scale");
    let release = run.clone();
    let namespace = format!("{run}-op");
    let _cleanup = Cleanup {
        helm: helm.clone(),
        cluster: cluster.clone(),
        release: release.clone(),
        namespace: namespace.clone(),
        run: run.clone(),
    };
    eprintln!("scale run {run}: {shape:?}");
    let t = Instant::now();
    let labels = |extra: Value| {
        let mut l = json!({TEST_LABEL: run});
        l.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        l
    };

    // The release's namespace.
    let ns_api: Api<Namespace> = Api::all(admin.clone());
    ns_api
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": namespace, "labels": labels(json!({}))}}),
            )?,
        )
        .await?;

    // Namespaces the policies name; teams for selectors.
    let ns_names: Vec<String> = (0..shape.namespaces)
        .map(|i| format!("{run}-ns{i}"))
        .collect();
    futures::stream::iter(ns_names.iter().enumerate())
        .map(|(i, name)| {
            let ns_api = ns_api.clone();
            let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name,
                "labels": labels(json!({"team": format!("t{}", i % 20)}))}}))
            .unwrap();
            async move { ns_api.create(&PostParams::default(), &ns).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;

    // Nodes: tainted, in pools p0..p9, Ready.
    let node_api: Api<Node> = Api::all(admin.clone());
    let nodes: Vec<(String, String)> = futures::stream::iter(0..shape.nodes)
        .map(|i| {
            let node_api = node_api.clone();
            let name = format!("{run}-n{i}");
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels(json!({
                    "pool": format!("p{}", i % 10), "kubernetes.io/hostname": name}))},
                "spec": {"taints": [{"key": FAKE_TAINT, "value": "true", "effect": "NoSchedule"}]},
            }))
            .unwrap();
            async move {
                let created = node_api.create(&PostParams::default(), &node).await?;
                Ok::<_, kube::Error>((name, created.metadata.uid.unwrap_or_default()))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let beats = heartbeat(admin.clone(), nodes.clone(), run.clone());

    // Policies.
    let policies: Api<NodeApiPolicy> = Api::all(admin.clone());
    let specs: Vec<(String, Value)> = (0..shape.policies)
        .map(|i| {
            let names: Vec<&String> = shape
                .policy_namespaces(i)
                .into_iter()
                .map(|k| &ns_names[k])
                .collect();
            let sa = i % 50;
            let mut spec = json!({
                "subjects": [{"kind": "Group", "name": format!("g{i}")}],
                "serviceAccounts": [{"namespace": ns_names[sa % shape.namespaces], "name": format!("sa{sa}")}],
                "access": if i % 2 == 0 { json!(["pods", "stats"]) } else { json!(["cadvisor", "resource"]) },
                "namespaces": {"names": names},
            });
            if i % 4 == 3 {
                spec["nodeSelector"] = json!({"matchLabels": {"pool": format!("p{}", i % 10)}});
            }
            (format!("{run}-p{i}"), spec)
        })
        .collect();
    futures::stream::iter(specs.iter())
        .map(|(name, spec)| {
            let policies = policies.clone();
            let mut policy =
                NodeApiPolicy::new(name, serde_json::from_value(spec.clone()).unwrap());
            policy.metadata.labels = Some(BTreeMap::from([(TEST_LABEL.to_string(), run.clone())]));
            async move { policies.create(&PostParams::default(), &policy).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    eprintln!("inputs created in {:.1?}", t.elapsed());

    // The chart, with its own resources; this run's policies and nodes only; no agent pods
    // (the fake nodes have no kubelet; node-1 is not this run's).
    let (repo_, tag) = split_image(&image);
    let (agent_repo, agent_tag) = split_image(&agent_image);
    let selector = format!("{TEST_LABEL}={run}");
    let sets = [
        format!("operator.image.repository={repo_}"),
        format!("operator.image.tag={tag}"),
        "operator.image.pullPolicy=Never".to_string(),
        format!("agent.image.repository={agent_repo}"),
        format!("agent.image.tag={agent_tag}"),
        "agent.image.pullPolicy=Never".to_string(),
        format!("operator.instance={release}"),
        format!("operator.policySelector={selector}"),
        format!("operator.nodeLabelSelector={selector}"),
        "agent.nodeSelector.nodegate\\.io/no-such-node=none".to_string(),
    ];
    // Extra chart values for a measurement (e.g. the rounds' phase timings at debug level):
    // one `--set` per whitespace-separated item of `NODEGATE_SCALE_SET`.
    let extra = std::env::var("NODEGATE_SCALE_SET").unwrap_or_default();
    let sets: Vec<String> = sets
        .into_iter()
        .chain(extra.split_whitespace().map(str::to_string))
        .collect();
    let mut install = Command::new(&helm);
    install
        .env("KUBECONFIG", &cluster.location().kubeconfig)
        .args(["upgrade", "--install", &release])
        .arg(repo("charts/nodegate"))
        .args(["--namespace", &namespace]);
    for s in &sets {
        install.args(["--set", s]);
    }
    let out = install.output()?;
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = Instant::now();
    cluster
        .run_kubectl(&[
            "wait",
            "--for=condition=Available",
            "--timeout=300s",
            "-n",
            &namespace,
            &format!("deployment/{release}-nodegate-operator"),
        ])
        .await?;

    // Convergence: every node's config written and reported by its agent, every policy Ready.
    let configs: Api<NodeAgentConfig> = Api::all(admin.clone());
    let lp = ListParams::default().labels(&selector);
    let limit = if shape.policies >= 1000 { 900 } else { 300 };
    let converged = loop {
        agents_report(&configs, &release).await;
        let list = policies.list(&lp).await?;
        let ready_count = list.items.iter().filter(|p| ready(p)).count();
        if ready_count == shape.policies {
            break installed.elapsed();
        }
        assert!(
            installed.elapsed() < Duration::from_secs(limit),
            "{ready_count}/{} policies Ready after {limit} s",
            shape.policies
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    eprintln!("converged {converged:.1?} after helm install");

    // Every node's config, every policy's ClusterRole and RoleBindings.
    let instance = ListParams::default().labels(&format!("nodegate.io/instance={release}"));
    let written: BTreeSet<String> = configs
        .list_metadata(&instance)
        .await?
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    let want: BTreeSet<String> = nodes
        .iter()
        .map(|(n, _)| nodegate_compiler::config_name(n, Some(&release)))
        .collect();
    // The difference only: a whole set of 500 names buries the answer.
    let missing: Vec<&String> = want.difference(&written).collect();
    let extra: Vec<&String> = written.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "every node's NodeAgentConfig: missing {missing:?}, unexpected {extra:?}"
    );
    let roles: BTreeSet<String> = Api::<ClusterRole>::all(admin.clone())
        .list_metadata(&instance)
        .await?
        .items
        .into_iter()
        .filter_map(|r| r.metadata.name)
        .collect();
    let bindings: BTreeSet<(String, String)> = Api::<RoleBinding>::all(admin.clone())
        .list_metadata(&instance)
        .await?
        .items
        .into_iter()
        .map(|b| {
            (
                b.metadata.namespace.unwrap_or_default(),
                b.metadata.name.unwrap_or_default(),
            )
        })
        .collect();
    for (i, (name, _)) in specs.iter().enumerate() {
        let role = format!("nodegate:{name}");
        assert!(roles.contains(&role), "{role} missing");
        for k in shape.policy_namespaces(i) {
            assert!(
                bindings.contains(&(ns_names[k].clone(), role.clone())),
                "RoleBinding {}/{role} missing",
                ns_names[k]
            );
        }
    }

    // Heartbeats only, for 60 s: at most one round (a heartbeat may coincide with the last
    // write's event) and no write.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &namespace);
    let operator_pods = "app.kubernetes.io/component=operator";
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (leader, before) = leader_metrics(&pods, operator_pods).await;
    tokio::time::sleep(QUIET).await;
    let (leader_after, after) = leader_metrics(&pods, operator_pods).await;
    assert_eq!(
        leader, leader_after,
        "the leader changed during the quiet period"
    );
    let rounds = metric(&after, "nodegate_operator_reconciles_total")
        - metric(&before, "nodegate_operator_reconciles_total");
    let writes = metric(&after, "nodegate_operator_write_requests_total")
        - metric(&before, "nodegate_operator_write_requests_total");
    let compiles = metric(&after, "nodegate_operator_compiles_total")
        - metric(&before, "nodegate_operator_compiles_total");
    eprintln!("{QUIET:?} of heartbeats: {rounds} rounds, {compiles} compiles, {writes} writes");

    // Churn: a policy on every node changed per second; when does every node's configuration
    // hold it?
    let churn_for = Duration::from_secs(
        std::env::var("NODEGATE_SCALE_CHURN_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if shape.policies >= 1000 { 300 } else { 20 }),
    );
    let changes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Change>::new()));
    let written = std::sync::Arc::new(std::sync::Mutex::new(Written::default()));
    let watch = watch_written(
        admin.clone(),
        release.clone(),
        nodes.len(),
        written.clone(),
        changes.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // the watches' first lists
    let everywhere: Vec<usize> = (0..shape.policies).filter(|i| i % 4 != 3).collect();
    let churn_started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0usize;
    while churn_started.elapsed() < churn_for {
        tick.tick().await;
        let i = everywhere[sent % everywhere.len()];
        // Its namespaces, each moved on by one (a new RoleBinding, one gone, a new rule).
        let names: Vec<String> = shape
            .policy_namespaces(i)
            .into_iter()
            .map(|k| ns_names[(k + 1 + sent / everywhere.len()) % shape.namespaces].clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let policy = specs[i].0.clone();
        policies
            .patch(
                &policy,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"namespaces": {"names": names}}})),
            )
            .await?;
        changes.lock().unwrap().push(Change {
            policy,
            names,
            at: Instant::now(),
            landed: None,
        });
        // Already written before it was recorded (the watch saw it first)?
        written
            .lock()
            .unwrap()
            .mark(nodes.len(), &mut changes.lock().unwrap(), Instant::now());
        sent += 1;
    }
    let grace = Instant::now();
    while grace.elapsed() < Duration::from_secs(60)
        && changes.lock().unwrap().iter().any(|c| c.landed.is_none())
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    watch.abort();
    let (mut latencies, unlanded): (Vec<Duration>, usize) = {
        let changes = changes.lock().unwrap();
        (
            changes
                .iter()
                .filter_map(|c| Some(c.landed? - c.at))
                .collect(),
            changes.iter().filter(|c| c.landed.is_none()).count(),
        )
    };
    latencies.sort();
    let p99 = quantile(&latencies, 0.99);
    eprintln!(
        "churn: {sent} changes in {churn_for:?}; change to every node's configuration: p50 {:.2?}, \
         p99 {p99:.2?}, max {:.2?}; {unlanded} not landed within 60 s",
        quantile(&latencies, 0.5),
        latencies.last().copied().unwrap_or_default(),
    );
    beats.abort();
    let (churn_leader, churned) = leader_metrics(&pods, operator_pods).await;
    // Where the churn's time went: its rounds, their duration, its writes by kind.
    if churn_leader == leader {
        let delta = |name: &str| metric(&churned, name) - metric(&after, name);
        eprintln!(
            "churn: {} rounds taking {:.1} s in all, {} compiles; writes by kind and op: {}",
            delta("nodegate_operator_reconciles_total"),
            delta("nodegate_operator_reconcile_duration_seconds_sum"),
            delta("nodegate_operator_compiles_total"),
            write_deltas(&after, &churned)
        );
    }
    let events = {
        let series = |text: &str| {
            sample(
                text,
                "nodegate_operator_write_requests_total",
                "kind=\"Event\"",
            )
        };
        series(&churned) - series(&after)
    };
    let after = churned;

    // Restarts and memory.
    let restarts: i32 = pods
        .list(&ListParams::default().labels(operator_pods))
        .await?
        .items
        .iter()
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .map(|c| c.restart_count)
        .sum();
    let peak = sample(&after, "nodegate_operator_memory_bytes", "state=\"peak\"");
    let limit_bytes = sample(&after, "nodegate_operator_memory_bytes", "state=\"limit\"");
    eprintln!(
        "leader {leader}: peak {:.0} MiB of a {:.0} MiB limit ({:.0} %); {restarts} restarts; \
         {} rounds and {} writes in all",
        peak / 1048576.0,
        limit_bytes / 1048576.0,
        100.0 * peak / limit_bytes.max(1.0),
        metric(&after, "nodegate_operator_reconciles_total"),
        metric(&after, "nodegate_operator_write_requests_total"),
    );
    assert_eq!(restarts, 0, "operator container restarts");
    assert!(
        peak > 0.0 && limit_bytes > 0.0,
        "the leader exports its memory and its limit"
    );
    assert!(
        peak <= 0.7 * limit_bytes,
        "peak {peak} bytes leaves less than 30 % of the {limit_bytes}-byte limit"
    );
    assert!(rounds <= 1.0, "{rounds} rounds with heartbeats only");
    assert_eq!(writes, 0.0, "writes with heartbeats only");
    assert_eq!(
        unlanded, 0,
        "churn changes some node's configuration never held"
    );
    // Events tell about the changed policy, not about every policy its rule sets hold.
    assert!(
        events <= 3.0 * sent as f64,
        "{events} Events for {sent} changes to one policy each"
    );
    if shape.policies >= 1000 {
        assert!(
            p99 <= Duration::from_secs(5),
            "churn: p99 from change to written {p99:?}, over 5 s"
        );
    }
    Ok(())
}
