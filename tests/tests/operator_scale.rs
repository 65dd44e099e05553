//! Scale: 1,000 policies over 500 (fake) nodes and 200 namespaces converge; a resync writes
//! nothing; relabelling one node writes only that node's config and the roles (and status) of
//! the policies whose selection changed. Prints convergence time, requests, peak RSS and the
//! largest NodeAgentConfig.
//!
//! Takes minutes, so it is ignored by default:
//! `cargo test -p nodegate-tests --test operator_scale -- --ignored --nocapture`

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use nodegate_crds::{NodeAgentConfig, NodeApiPolicy};
use nodegate_operator::controller::{self, CancellationToken, Metrics, Settings};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{TEST_LABEL, unique_name};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const POLICIES: usize = 1000;
const NODES: usize = 500;
const NAMESPACES: usize = 200;

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Write requests by kind and operation, from the metrics text.
fn writes_by_kind(metrics: &Metrics) -> BTreeMap<String, u64> {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("nodegate_operator_write_requests_total{"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            Some((labels.to_string(), value.parse::<f64>().ok()? as u64))
        })
        .collect()
}

fn metric(metrics: &Metrics, name: &str) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until a round ran with no write and every policy has a status for its generation.
async fn converged(metrics: &Metrics, policies: &Api<NodeApiPolicy>, lp: &ListParams) -> Duration {
    let start = Instant::now();
    let mut last_writes = metrics.writes();
    let mut last_change = Instant::now();
    let mut rounds_at_change = metrics.reconciles();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let writes = metrics.writes();
        if writes != last_writes {
            last_writes = writes;
            last_change = Instant::now();
            rounds_at_change = metrics.reconciles();
            continue;
        }
        // Two full rounds without a write.
        if metrics.reconciles() >= rounds_at_change + 2 {
            let list = policies.list(lp).await.unwrap();
            let done = list.items.iter().all(|p| {
                p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
            });
            if done {
                return last_change - start;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no convergence in 10 minutes"
        );
    }
}

#[tokio::test]
#[ignore = "scale measurement: minutes; run with --ignored --nocapture"]
async fn thousand_policies_over_500_nodes() -> TestResult {
    // RUST_LOG=nodegate_operator=debug prints each round's phase timings.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    cluster.install_crds().await?;
    let admin = cluster.admin()?;
    let run = unique_name("scale");
    let t = Instant::now();
    // Nodes: pool p0..p9, zone z0..z4.
    let node_api: Api<Node> = Api::all(admin.clone());
    let names: Vec<String> = (0..NODES).map(|i| format!("{run}-n{i}")).collect();
    futures::stream::iter(names.iter().enumerate())
        .map(|(i, name)| {
            let node_api = node_api.clone();
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {
                    TEST_LABEL: run, "pool": format!("p{}", i % 10), "zone": format!("z{}", i % 5)}},
            }))
            .unwrap();
            async move { node_api.create(&PostParams::default(), &node).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    // Namespaces: team t0..t19.
    let ns_api: Api<Namespace> = Api::all(admin.clone());
    let ns_names: Vec<String> = (0..NAMESPACES).map(|i| format!("{run}-ns{i}")).collect();
    futures::stream::iter(ns_names.iter().enumerate())
        .map(|(i, name)| {
            let ns_api = ns_api.clone();
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {TEST_LABEL: run, "team": format!("t{}", i % 20)}},
            }))
            .unwrap();
            async move { ns_api.create(&PostParams::default(), &ns).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    // Policies, four shapes: by pool for all namespaces; by zone for two namespaces; by pool
    // for a team's namespaces (selector); every node for one namespace.
    let policies: Api<NodeApiPolicy> = Api::all(admin.clone());
    let specs: Vec<(String, serde_json::Value)> = (0..POLICIES)
        .map(|i| {
            let name = format!("{run}-p{i}");
            let subjects = json!([{"kind": "Group", "name": format!("g{i}")},
                                  {"kind": "ServiceAccount", "name": "prom", "namespace": ns_names[i % NAMESPACES]}]);
            let spec = match i % 4 {
                0 => json!({"subjects": subjects, "access": ["pods", "cadvisor", "stats", "metrics"],
                            "nodeSelector": {"matchLabels": {"pool": format!("p{}", i % 10)}},
                            "namespaces": {"all": true}}),
                1 => json!({"subjects": subjects, "access": ["pods", "cadvisor"],
                            "nodeSelector": {"matchLabels": {"zone": format!("z{}", i % 5)}},
                            "namespaces": {"names": [ns_names[i % NAMESPACES], ns_names[(i + 1) % NAMESPACES]]}}),
                2 => json!({"subjects": subjects, "access": ["pods", "stats"],
                            "nodeSelector": {"matchLabels": {"pool": format!("p{}", i % 10)}},
                            "namespaces": {"selector": {"matchLabels": {"team": format!("t{}", i % 20)}}}}),
                _ => json!({"subjects": subjects, "access": ["cadvisor", "resource"],
                            "namespaces": {"names": [ns_names[i % NAMESPACES]]}}),
            };
            (name, spec)
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
    eprintln!("inputs created in {:?}", t.elapsed());

    let selector = format!("{TEST_LABEL}={run}");
    let settings = Settings {
        policy_selector: Some(selector.clone()),
        node_selector: Some(selector.clone()),
        instance: Some(run.clone()),
        resync: Duration::from_secs(5),
        events: false,
        ..Settings::default()
    };
    let rss_before = vm_hwm_kib();
    let metrics = Metrics::new()?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(controller::run(
        admin.clone(),
        settings,
        None,
        metrics.clone(),
        stop.clone(),
    ));
    let lp = ListParams::default().labels(&selector);
    let convergence = converged(&metrics, &policies, &lp).await;
    let first_writes = metrics.writes();
    let reads = metric(&metrics, "nodegate_operator_read_requests_total");
    let rounds = metrics.reconciles();
    eprintln!(
        "converged in {convergence:?} (since controller start {:?}): {first_writes} writes, {reads} ownership GETs, {rounds} rounds, {} errors",
        started.elapsed(),
        metrics.errors()
    );
    eprintln!("writes by kind: {:#?}", writes_by_kind(&metrics));
    assert_eq!(metrics.errors(), 0);

    // Resync: nothing.
    let before = metrics.writes();
    let r = metrics.reconciles();
    while metrics.reconciles() < r + 2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metrics.writes(), before, "a resync writes nothing");
    let round = metric(&metrics, "nodegate_operator_reconcile_duration_seconds_sum") as f64;
    eprintln!(
        "resync: 0 writes; {} rounds, mean round {:.3}s",
        metrics.reconciles(),
        round / metrics.reconciles() as f64
    );

    // Largest NodeAgentConfig.
    let configs: Api<NodeAgentConfig> = Api::all(admin.clone());
    // One GET per node: a paged list of this many large objects outlives its continue token
    // on a slow (debug) run.
    let mut largest = (0usize, 0usize);
    for name in &names {
        if let Some(c) = configs.get_opt(name).await? {
            largest = largest.max((serde_json::to_vec(&c)?.len(), c.spec.rules.len()));
        }
    }
    eprintln!(
        "largest NodeAgentConfig: {} bytes, {} rules",
        largest.0, largest.1
    );

    // Relabel one node from pool p0 to p1: its config, plus role and status of every pool
    // policy of p0 or p1 (their resourceNames change), nothing else.
    let node = &names[0];
    let changed = specs
        .iter()
        .enumerate()
        .filter(|(i, _)| (i % 4 == 0 || i % 4 == 2) && (i % 10 == 0 || i % 10 == 1))
        .count() as u64;
    let before = writes_by_kind(&metrics);
    let t = Instant::now();
    node_api
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"pool": "p1"}}})),
        )
        .await?;
    let relabel = converged(&metrics, &policies, &lp).await;
    let after = writes_by_kind(&metrics);
    let delta: BTreeMap<&String, u64> = after
        .iter()
        .map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    eprintln!(
        "relabel converged in {relabel:?} ({:?} wall): writes {delta:#?}; policies whose selection changed: {changed}",
        t.elapsed()
    );
    let get = |kind: &str, op: &str| {
        delta
            .iter()
            .find(|(k, _)| {
                k.contains(&format!("kind=\"{kind}\"")) && k.contains(&format!("op=\"{op}\""))
            })
            .map_or(0, |(_, v)| *v)
    };
    assert_eq!(
        get("NodeAgentConfig", "apply"),
        1,
        "only the relabelled node's config"
    );
    assert_eq!(
        get("ClusterRole", "apply"),
        changed,
        "only the roles whose nodes changed"
    );
    assert_eq!(
        get("NodeApiPolicy", "status"),
        changed,
        "only their status (matchedNodes)"
    );
    assert_eq!(
        delta.values().sum::<u64>(),
        1 + 2 * changed,
        "nothing else: {delta:?}"
    );
    eprintln!(
        "peak RSS of the test process (controller in-process): {} MiB before the controller, {} MiB after",
        rss_before / 1024,
        vm_hwm_kib() / 1024
    );

    stop.cancel();
    task.await??;
    // Clean up: policies (their outputs are garbage collected), nodes (configs too), namespaces.
    policies
        .delete_collection(&DeleteParams::default(), &lp)
        .await?;
    node_api
        .delete_collection(&DeleteParams::default(), &lp)
        .await?;
    for ns in &ns_names {
        let _ = ns_api.delete(ns, &DeleteParams::default()).await;
    }
    Ok(())
}
