//! Chaos for the operator against the real API server: a seeded random sequence of policy
//! creates, updates and deletes, namespace creates and deletes, node label changes, SIGKILLs
//! and restarts of the operator process, API server outages as the operator sees them (every
//! connection cut, new ones refused, for a few seconds: the watches break and relist), and real
//! restarts of the local cluster's API server (SIGKILL, then started again with the same flags,
//! `cargo xtask cluster restart kube-apiserver`; the test's own requests fail meanwhile too).
//!
//! An independent checker samples all along: it reads the policies, nodes and namespaces as
//! they are now, computes by its own simple model what they allow (not with the compiler), and
//! asks the API server's authorizer (SubjectAccessReview on nodegate's resource) and each node's
//! NodeAgentConfig (through the agent's decision function) for every user, endpoint, node and
//! namespace. A grant wider than the current policies that stays wider for longer than the
//! convergence window fails the test; so does any object left when the policies are gone.
//! The window counts the time the operator can reach the API server: cut off, no controller
//! can revoke anything (outages may follow each other closely enough that its watches never
//! reconnect in between), so what is checked is that it revokes within the window once it can.
//!
//! The seed is printed; `NODEGATE_CHAOS_SEED=<seed>` replays a run's sequence (the operator's
//! timing still varies). `NODEGATE_CHAOS_SECONDS` sets the length of the random phase
//! (default 100 s: the whole test stays under 3 minutes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "operator_support.rs"]
mod support;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use nodegate_crds::decision::{Requester, RuleSet, rbac_answer};
use nodegate_crds::{Endpoint, NodeAgentConfig, NodeAgentRuleSet, NodeApiPolicy, Verb};
use nodegate_tests::cluster::{FlakyProxy, TEST_LABEL};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, IteratorRandom};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

/// How long a grant may stay wider than the current policies.
const CONVERGENCE: Duration = Duration::from_secs(15);
const NODES: usize = 3;
const USERS: usize = 3;
const ENDPOINTS: [Endpoint; 2] = [Endpoint::Pods, Endpoint::Stats];
const POOL_LABEL: &str = "chaos.nodegate.io/pool";
const TEAM_LABEL: &str = "chaos.nodegate.io/team";
const RUN_LABEL: &str = "chaos.nodegate.io/run";

#[tokio::test]
async fn grants_never_outlive_the_convergence_window() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let seed: u64 = std::env::var("NODEGATE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let chaos_for = Duration::from_secs(
        std::env::var("NODEGATE_CHAOS_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100),
    );
    println!("chaos seed {seed} (replay: NODEGATE_CHAOS_SEED={seed})");
    let rng = StdRng::seed_from_u64(seed);

    let w = World::new(cluster.clone(), NODES, &[]).await?;
    let client = w.client.clone();
    let run = w.run.clone();
    let users: Vec<String> = (0..USERS).map(|i| format!("{run}-u{i}")).collect();
    let nodes = w.node_names();
    let mut fixed = Vec::new();
    for _ in 0..3 {
        let ns = cluster.namespace("chaos").await?;
        label_namespace(&client, ns.name(), &run, Some("red")).await?;
        fixed.push(ns);
    }
    let names: Vec<String> = fixed.iter().map(|n| n.name().to_string()).collect();
    let _sweep = NamespaceSweep {
        cluster: cluster.clone(),
        run: run.clone(),
    };

    // The operator as a process, its API traffic through a forwarder the test can cut.
    let url = cluster.admin_config().cluster_url.clone();
    let apiserver = format!(
        "{}:{}",
        url.host().unwrap_or("127.0.0.1"),
        url.port_u16().unwrap_or(443)
    );
    let proxy = FlakyProxy::start(apiserver).await?;
    let dir = std::env::temp_dir().join(format!("nodegate-{run}"));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = kubeconfig_through(&cluster.location().kubeconfig, &proxy, &dir)?;
    let binary = nodegate_tests::binaries::path("nodegate-operator", "nodegate-operator")?;
    let log = dir.join("operator.log");
    let args = operator_args(&w);
    let mut operator = Some(spawn_operator(&binary, &kubeconfig, &args, &log)?);
    println!("operator log: {}", log.display());

    let reachable = Reachable::default();
    let mut checker = Checker::new(users.clone(), nodes.clone());
    let mut world = Chaos {
        rng,
        run: run.clone(),
        client: client.clone(),
        users: users.clone(),
        nodes: nodes.clone(),
        names,
        dynamic: Vec::new(),
        policies: Vec::new(),
        counter: 0,
    };
    let started = Instant::now();
    let mut ops: BTreeMap<&'static str, usize> = BTreeMap::new();
    let done = std::sync::atomic::AtomicBool::new(false);
    // The checker samples on its own clock, also while the operator is dead or cut off.
    // A sample fails while the API server restarts; many in a row fail the test.
    let sampling = async {
        let mut failed_in_a_row = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            match checker.sample(&client, &run, &reachable).await {
                Ok(_) => failed_in_a_row = 0,
                Err(error) if failed_in_a_row < 60 => {
                    failed_in_a_row += 1;
                    println!("sample failed ({failed_in_a_row} in a row): {error}");
                }
                Err(error) => return Err(error),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok::<(), BoxError>(())
    };
    let chaos = async {
        let result: Result<(), BoxError> = async {
            while started.elapsed() < chaos_for {
                let op = match world.rng.random_range(0..100) {
                    0..30 => "create policy",
                    30..55 => "update policy",
                    55..65 => "delete policy",
                    65..72 => "create namespace",
                    72..78 => "delete namespace",
                    78..88 => "relabel node",
                    88..94 => "kill operator",
                    94..97 => "cut the API server",
                    _ => "restart the API server",
                };
                *ops.entry(op).or_default() += 1;
                // The timeline, shown with the failure (libtest prints a failed test's output).
                println!("{:>6.1}s {op}", started.elapsed().as_secs_f64());
                match op {
                    // A change made while the operator is dead (then restarted) or cut off
                    // from the API server: it must land after it recovers.
                    "kill operator" => {
                        if let Some(mut child) = operator.take() {
                            child.start_kill()?; // SIGKILL
                            let _ = child.wait().await;
                        }
                        world.change(&w, "update policy").await?;
                        let pause = world.rng.random_range(200..2000);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        operator = Some(spawn_operator(&binary, &kubeconfig, &args, &log)?);
                    }
                    "cut the API server" => {
                        proxy.outage(true);
                        reachable.cut();
                        world.change(&w, "update policy").await?;
                        let pause = world.rng.random_range(1000..5000);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        proxy.outage(false);
                        reachable.restore();
                    }
                    // The real one (SIGKILL, then started again with the same flags): every
                    // client's connections and watches break, also the test's own.
                    "restart the API server" => {
                        world.change(&w, "update policy").await?;
                        reachable.cut();
                        let restarted = tokio::task::spawn_blocking(restart_api_server).await?;
                        restarted?;
                        // The test's own pooled connections died with it: the next request
                        // may fail once before a new connection is made.
                        eventually("the API server answers this test again", WAIT, || async {
                            Api::<Namespace>::all(client.clone())
                                .list_metadata(&ListParams::default().limit(1))
                                .await
                                .ok()
                        })
                        .await?;
                        reachable.restore();
                    }
                    op => world.change(&w, op).await?,
                }
                let pause = world.rng.random_range(100..1500);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Ok(())
        }
        .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        result
    };
    let (chaos, sampling) = tokio::join!(chaos, sampling);
    chaos?;
    sampling?;
    let policies = world.policies;
    println!("chaos operations: {ops:?}");

    // Quiet: whatever the last operation was, within the window every grant is as the policies
    // say, exactly (none wider, none missing).
    let quiet = Instant::now();
    let settled = loop {
        let report = checker.sample(&client, &run, &reachable).await?;
        if report.wider == 0 && report.missing == 0 {
            break true;
        }
        if quiet.elapsed() > CONVERGENCE {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        settled,
        "not converged {CONVERGENCE:?} after the last operation (seed {seed}): {:?}; operator \
         log {}",
        checker.last,
        log.display()
    );
    checker.assert_no_lasting_violation(seed, &log);
    println!(
        "samples: {}, the longest a grant stayed wider than the policies: {:?} ({})",
        checker.samples, checker.longest, checker.longest_what
    );

    // Everything deleted: no RBAC object or service account of this instance outlives it.
    for name in &policies {
        w.policies().delete(name, &DeleteParams::default()).await?;
    }
    let owned = ListParams::default().labels(&format!("nodegate.io/instance={run}"));
    eventually("no orphans", Duration::from_secs(30), || async {
        let roles = Api::<ClusterRole>::all(client.clone())
            .list(&owned)
            .await
            .ok()?;
        let crbs = Api::<ClusterRoleBinding>::all(client.clone())
            .list(&owned)
            .await
            .ok()?;
        let rbs = Api::<RoleBinding>::all(client.clone())
            .list(&owned)
            .await
            .ok()?;
        let sas = Api::<ServiceAccount>::all(client.clone())
            .list(&owned)
            .await
            .ok()?;
        let left = roles.items.len() + crbs.items.len() + rbs.items.len() + sas.items.len();
        (left == 0).then_some(())
    })
    .await?;
    // Every node keeps a NodeAgentConfig, with no rule (the operator's round, after the garbage
    // collector's deletes).
    for node in &nodes {
        eventually("a NodeAgentConfig without rules", WAIT, || async {
            w.config(node).await.filter(|c| c.spec.rules.is_empty())
        })
        .await?;
    }
    // And one rule set is left, the empty selection's, which they all name: the rule sets of
    // the selections that went were deleted once no config named them.
    let empty = nodegate_compiler::rule_set_name(&[], Some(&run));
    eventually("only the empty rule set", WAIT, || async {
        let sets = Api::<NodeAgentRuleSet>::all(client.clone())
            .list(&owned)
            .await
            .ok()?;
        let names: Vec<String> = sets.items.iter().map(|s| s.name_any()).collect();
        (names == [empty.clone()]).then_some(())
    })
    .await?;
    for node in &nodes {
        let config = Api::<NodeAgentConfig>::all(client.clone())
            .get(&nodegate_compiler::config_name(node, Some(&run)))
            .await?;
        assert_eq!(config.spec.rule_set.as_deref(), Some(empty.as_str()));
    }

    if let Some(mut child) = operator.take() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The test's side of the world and its random source.
struct Chaos {
    rng: StdRng,
    run: String,
    client: kube::Client,
    users: Vec<String>,
    nodes: Vec<String>,
    /// Namespace names policies may name (deleted ones included).
    names: Vec<String>,
    /// Namespaces created during the run.
    dynamic: Vec<String>,
    /// Policies that exist.
    policies: Vec<String>,
    counter: usize,
}

impl Chaos {
    /// One change to policies, namespaces or node labels.
    async fn change(&mut self, w: &World, op: &str) -> TestResult {
        let client = &self.client;
        match op {
            "create policy" if self.policies.len() < 6 => {
                self.counter += 1;
                let name = format!("{}-p{}", self.run, self.counter);
                let spec = random_spec(&mut self.rng, &self.users, &self.names);
                w.create(&w.policy(&name, spec)).await?;
                self.policies.push(name);
            }
            "update policy" | "create policy" => {
                if let Some(name) = self.policies.choose(&mut self.rng).cloned() {
                    let spec = random_spec(&mut self.rng, &self.users, &self.names);
                    replace_spec(&w.policies(), &name, spec).await?;
                }
            }
            "delete policy" => {
                if !self.policies.is_empty() {
                    let i = self.rng.random_range(0..self.policies.len());
                    let name = self.policies.remove(i);
                    w.policies().delete(&name, &DeleteParams::default()).await?;
                }
            }
            "create namespace" => {
                let name = format!("{}-d{}", self.run, self.dynamic.len());
                let team = ["red", "blue"].choose(&mut self.rng).copied();
                create_namespace(client, &name, &self.run, team).await?;
                self.dynamic.push(name.clone());
                self.names.push(name);
            }
            "delete namespace" => {
                // Deleted namespaces stay in `names`: policies may still name them.
                if let Some(name) = self.dynamic.iter().choose(&mut self.rng).cloned() {
                    let _ = Api::<Namespace>::all(client.clone())
                        .delete(&name, &DeleteParams::default())
                        .await;
                }
            }
            "relabel node" => {
                let node = self.nodes.choose(&mut self.rng).ok_or("no node")?;
                let pool = [Some("a"), Some("b"), None]
                    .choose(&mut self.rng)
                    .copied()
                    .flatten();
                Api::<Node>::all(client.clone())
                    .patch(
                        node,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"metadata": {"labels": {POOL_LABEL: pool}}})),
                    )
                    .await?;
            }
            other => return Err(format!("unknown change {other}").into()),
        }
        Ok(())
    }
}

/// Deletes every namespace the test made, also when it fails.
struct NamespaceSweep {
    cluster: nodegate_tests::Cluster,
    run: String,
}

impl Drop for NamespaceSweep {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl()
            .args(["delete", "namespaces", "-l"])
            .arg(format!("{RUN_LABEL}={}", self.run))
            .args(["--ignore-not-found", "--wait=false"])
            .output();
    }
}

/// A random valid policy: one or two users, a non-empty subset of the endpoints, namespaces by
/// `all`, by one or two names (maybe of deleted namespaces), or by team label, and maybe a node
/// pool.
fn random_spec(rng: &mut StdRng, users: &[String], names: &[String]) -> Value {
    let n = rng.random_range(1..=2);
    let subjects: Vec<Value> = users
        .choose_multiple(rng, n)
        .map(|u| json!({"kind": "User", "name": u}))
        .collect();
    let mut access: Vec<&str> = ENDPOINTS
        .iter()
        .filter(|_| rng.random_bool(0.6))
        .map(|e| e.name())
        .collect();
    if access.is_empty() {
        access.push(ENDPOINTS[0].name());
    }
    let namespaces = match rng.random_range(0..3) {
        0 => json!({"all": true}),
        1 => {
            let n = rng.random_range(1..=2);
            json!({"names": names.choose_multiple(rng, n).collect::<Vec<_>>()})
        }
        _ => {
            let team = ["red", "blue"].choose(rng);
            json!({"selector": {"matchLabels": {TEAM_LABEL: team}}})
        }
    };
    let mut spec = json!({"subjects": subjects, "access": access, "namespaces": namespaces});
    if rng.random_bool(0.5) {
        let pool = ["a", "b"].choose(rng);
        spec["nodeSelector"] = json!({"matchLabels": {POOL_LABEL: pool}});
    }
    spec
}

/// Replaces a policy's whole spec (read, then replace with its resourceVersion).
/// Reads, changes the spec and replaces, again on a conflict (the operator writes the
/// policy's status meanwhile, which moves its resourceVersion), as `kubectl edit` does.
async fn replace_spec(api: &Api<NodeApiPolicy>, name: &str, spec: Value) -> TestResult {
    let spec: nodegate_crds::NodeApiPolicySpec = serde_json::from_value(spec)?;
    for _ in 0..10 {
        let mut policy = api.get(name).await?;
        policy.spec = spec.clone();
        policy.metadata.managed_fields = None;
        match api.replace(name, &PostParams::default(), &policy).await {
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            other => {
                other?;
                return Ok(());
            }
        }
    }
    Err(format!("policy {name}: 10 conflicts in a row").into())
}

async fn create_namespace(
    client: &kube::Client,
    name: &str,
    run: &str,
    team: Option<&str>,
) -> TestResult {
    let mut labels = BTreeMap::from([(RUN_LABEL.to_string(), run.to_string())]);
    if let Some(team) = team {
        labels.insert(TEAM_LABEL.into(), team.into());
    }
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

async fn label_namespace(
    client: &kube::Client,
    name: &str,
    run: &str,
    team: Option<&str>,
) -> TestResult {
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {RUN_LABEL: run, TEAM_LABEL: team}}})),
        )
        .await?;
    Ok(())
}

/// The admin kubeconfig with every cluster's server replaced by the forwarder (the API server's
/// certificate names 127.0.0.1, where the forwarder listens).
fn kubeconfig_through(
    kubeconfig: &Path,
    proxy: &FlakyProxy,
    dir: &Path,
) -> Result<PathBuf, BoxError> {
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(kubeconfig)?)?;
    let server = serde_yaml::Value::String(format!("https://{}", proxy.addr));
    for cluster in config["clusters"]
        .as_sequence_mut()
        .ok_or("kubeconfig without clusters")?
    {
        cluster["cluster"]["server"] = server.clone();
    }
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config)?)?;
    Ok(path)
}

/// The flags of an operator scoped to this test's policies, nodes and outputs, without leader
/// election (one process, killed and started again).
fn operator_args(w: &World) -> Vec<String> {
    let settings = w.settings();
    vec![
        "--leader-elect=false".into(),
        "--metrics-bind-address=127.0.0.1:0".into(),
        "--log-format=text".into(),
        "--log=info".into(),
        format!("--policy-selector={TEST_LABEL}={}", w.run),
        format!(
            "--node-selector={}",
            settings.node_selector.unwrap_or_default()
        ),
        format!("--instance={}", w.run),
        "--debounce-ms=100".into(),
        "--backoff-base-ms=200".into(),
        "--backoff-max-seconds=5".into(),
        "--events=false".into(),
    ]
}

fn spawn_operator(
    binary: &Path,
    kubeconfig: &Path,
    args: &[String],
    log: &Path,
) -> Result<tokio::process::Child, BoxError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(tokio::process::Command::new(binary)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()?)
}

/// Restarts the local cluster's API server as a crash would, with `cargo xtask cluster restart`
/// (the xtask binary `cargo xtask test` runs from; it returns once `/readyz` says ok).
fn restart_api_server() -> Result<(), BoxError> {
    let xtask = nodegate_tests::binaries::path("xtask", "xtask")?;
    let out = std::process::Command::new(xtask)
        .args(["cluster", "restart", "kube-apiserver"])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "cargo xtask cluster restart kube-apiserver: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// The clock of the convergence window: time the operator could reach the API server.
#[derive(Default)]
struct Reachable {
    /// Since when the API server is cut off (if it is), and the total of earlier cuts.
    cuts: std::sync::Mutex<(Option<Instant>, Duration)>,
}

impl Reachable {
    fn cut(&self) {
        let mut cuts = self.cuts.lock().unwrap();
        cuts.0.get_or_insert_with(Instant::now);
    }

    fn restore(&self) {
        let mut cuts = self.cuts.lock().unwrap();
        if let Some(since) = cuts.0.take() {
            cuts.1 += since.elapsed();
        }
    }

    /// Time since `start` less the time cut off.
    fn elapsed(&self, start: Instant) -> Duration {
        let cuts = self.cuts.lock().unwrap();
        let cut = cuts.1 + cuts.0.map_or(Duration::ZERO, |since| since.elapsed());
        start.elapsed().saturating_sub(cut)
    }
}

/// One (user, endpoint, node, namespace) question.
type Question = (String, Endpoint, String, String);

/// What one sample found.
#[derive(Debug, Default)]
struct Report {
    /// Answers (RBAC or NodeAgentConfig) that allow what no current policy allows.
    wider: usize,
    /// Answers that deny what a current policy allows (lag; not a failure while it lasts).
    missing: usize,
    examples: Vec<String>,
}

struct Checker {
    users: Vec<String>,
    nodes: Vec<String>,
    /// Since when each violation has been seen in every sample.
    /// On the [`Reachable`] clock, and when (for the failure's story).
    since: HashMap<(Question, &'static str), (Duration, Instant)>,
    longest: Duration,
    longest_what: String,
    lasting: Vec<String>,
    samples: usize,
    last: Report,
    /// When the checker started, to place a violation on the timeline and in the operator's
    /// log (which is stamped in UTC).
    started: Instant,
    started_unix: Duration,
}

impl Checker {
    fn new(users: Vec<String>, nodes: Vec<String>) -> Self {
        Self {
            users,
            nodes,
            since: HashMap::new(),
            longest: Duration::ZERO,
            longest_what: String::new(),
            lasting: Vec::new(),
            samples: 0,
            last: Report::default(),
            started: Instant::now(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// Reads the world as it is now, then every answer, and records what is wider.
    async fn sample(
        &mut self,
        client: &kube::Client,
        run: &str,
        reachable: &Reachable,
    ) -> Result<&Report, BoxError> {
        let policies = Api::<NodeApiPolicy>::all(client.clone())
            .list(&ListParams::default().labels(&format!("{TEST_LABEL}={run}")))
            .await?
            .items;
        let node_labels: BTreeMap<String, BTreeMap<String, String>> =
            Api::<Node>::all(client.clone())
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(|n| self.nodes.contains(&n.name_any()))
                .map(|n| (n.name_any(), n.labels().clone()))
                .collect();
        // Terminating namespaces are left out: their bindings go with them.
        let namespaces: BTreeMap<String, BTreeMap<String, String>> =
            Api::<Namespace>::all(client.clone())
                .list(&ListParams::default().labels(&format!("{RUN_LABEL}={run}")))
                .await?
                .items
                .into_iter()
                .filter(|n| n.metadata.deletion_timestamp.is_none())
                .map(|n| (n.name_any(), n.labels().clone()))
                .collect();
        // As each agent sees its config: with the rules of the rule set it names.
        let configs: BTreeMap<String, NodeAgentConfig> = {
            let mut map = BTreeMap::new();
            for node in &self.nodes {
                if let Some(c) = effective_config(client, node, Some(run)).await? {
                    map.insert(node.clone(), c);
                }
            }
            map
        };
        let mut questions = Vec::new();
        for user in &self.users {
            for endpoint in ENDPOINTS {
                for node in &self.nodes {
                    for ns in namespaces.keys() {
                        questions.push((user.clone(), endpoint, node.clone(), ns.clone()));
                    }
                }
            }
        }
        let rbac: Vec<bool> = futures::stream::iter(questions.iter())
            .map(|(user, endpoint, node, ns)| async move {
                try_allowed(client, user, "get", endpoint.name(), node, ns).await
            })
            .buffered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let now = Instant::now();
        let reachable_now = reachable.elapsed(self.started);
        let mut report = Report::default();
        let mut seen = BTreeSet::new();
        for (question, rbac) in questions.into_iter().zip(rbac) {
            let (user, endpoint, node, ns) = &question;
            let expected = policies
                .iter()
                .any(|p| allows(p, user, *endpoint, &node_labels[node], ns, &namespaces[ns]));
            let groups: Vec<String> = vec![];
            let agent = configs.get(node).is_some_and(|c| {
                rbac_answer(
                    &RuleSet::new(c.spec.clone()),
                    Requester {
                        name: user,
                        groups: &groups,
                    },
                    *endpoint,
                    Verb::Get,
                    Some(ns),
                )
            });
            for (answer, by) in [(rbac, "RBAC"), (agent, "NodeAgentConfig")] {
                if answer && !expected {
                    report.wider += 1;
                    if report.examples.len() < 5 {
                        report.examples.push(format!(
                            "{by} lets {user} get {} on {node} in {ns}",
                            endpoint.name()
                        ));
                    }
                    let key = (question.clone(), by);
                    let (since_reachable, since) = *self
                        .since
                        .entry(key.clone())
                        .or_insert((reachable_now, now));
                    let lasted = reachable_now.saturating_sub(since_reachable);
                    if lasted > self.longest {
                        self.longest = lasted;
                        self.longest_what =
                            format!("{by}: {user} get {} on {node} in {ns}", endpoint.name());
                    }
                    if lasted > CONVERGENCE {
                        if self.lasting.is_empty() {
                            // What the checker's model saw, once, for the failure's story.
                            println!(
                                "first lasting violation at {:.1}s: {by} lets {user} get {} on \
                                 {node} in {ns}; nodes {node_labels:?}; namespaces \
                                 {namespaces:?}; policies {}",
                                (now - self.started).as_secs_f64(),
                                endpoint.name(),
                                serde_json::to_string(
                                    &policies
                                        .iter()
                                        .map(|p| (p.name_any(), &p.spec))
                                        .collect::<Vec<_>>()
                                )
                                .unwrap_or_default()
                            );
                        }
                        let from = since - self.started;
                        self.lasting.push(format!(
                            "{by} let {user} get {} on {node} in {ns} for {lasted:?} of \
                             reachable time, from {:.1}s (unix time {:.1})",
                            endpoint.name(),
                            from.as_secs_f64(),
                            (self.started_unix + from).as_secs_f64(),
                        ));
                    }
                    seen.insert(key);
                } else if !answer && expected {
                    report.missing += 1;
                }
            }
        }
        // A violation not seen in this sample starts again from zero.
        self.since.retain(|k, _| seen.contains(k));
        self.samples += 1;
        self.last = report;
        Ok(&self.last)
    }

    fn assert_no_lasting_violation(&self, seed: u64, log: &Path) {
        assert!(
            self.lasting.is_empty(),
            "grants wider than the policies lasted longer than {CONVERGENCE:?} (seed {seed}, \
             operator log {}): {:?}",
            log.display(),
            &self.lasting[..self.lasting.len().min(10)]
        );
    }
}

/// The checker's own model of one policy (only what `random_spec` writes: users, endpoints,
/// `all` / names / a matchLabels selector, a matchLabels node selector).
fn allows(
    policy: &NodeApiPolicy,
    user: &str,
    endpoint: Endpoint,
    node_labels: &BTreeMap<String, String>,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> bool {
    let spec = serde_json::to_value(&policy.spec).unwrap_or(Value::Null);
    let subject = spec["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| s["kind"] == "User" && s["name"] == user);
    let access = spec["access"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| a == endpoint.name());
    let matches = |selector: &Value, labels: &BTreeMap<String, String>| {
        selector["matchLabels"]
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
    };
    let node = match spec.get("nodeSelector") {
        None | Some(Value::Null) => true,
        Some(selector) => matches(selector, node_labels),
    };
    let scope = &spec["namespaces"];
    let namespace = scope["all"] == true
        || scope["names"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n == namespace)
        || (scope["selector"].is_object() && matches(&scope["selector"], namespace_labels));
    subject && access && node && namespace
}
