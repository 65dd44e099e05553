//! The `nodegate-agent` binary knows its Node's labels: with `--config-source file:` a policy
//! whose `nodeSelector` matches a label is enforced once the label is set on the Node in the
//! real API server and no longer once it is removed (the agent watches its Node), and
//! `nodegate-agent explain --config` reads the labels from the cluster or `--node-labels`.
//!
//! Needs the binary: `cargo build -p nodegate-agent`, then after
//! `eval "$(cargo xtask cluster env)"`: `cargo test -p nodegate-tests --test agent_node_labels`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use nodegate_tests::Cluster;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// `target/<profile>/nodegate-agent`, next to this test's `deps/` directory.
fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NODEGATE_AGENT_BIN") {
        return std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(p);
    }
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("nodegate-agent");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p nodegate-agent` (or set NODEGATE_AGENT_BIN)",
        binary.display()
    );
    binary
}

/// The agent process and its files, gone on drop.
struct AgentProcess {
    child: Child,
    dir: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn policy_file(label: (&str, &str), user: &str) -> String {
    format!(
        "apiVersion: nodegate.io/v1alpha1\nkind: NodeApiPolicy\nmetadata:\n  name: labelled-nodes\n\
         spec:\n  subjects: [{{kind: User, name: {user}}}]\n  \
         nodeSelector: {{matchLabels: {{{}: {}}}}}\n  access: [pods]\n  namespaces: {{all: true}}\n",
        label.0, label.1
    )
}

/// Polls `/pods` as `cred` until it answers `want`, for at most 30 s; the last status.
async fn pods_until(addr: SocketAddr, cred: &Cred, want: u16) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = request(addr, true, cred, "GET", "/pods", &[])
            .await
            .map_or(0, |r| r.status);
        if status == want || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn explain(binary: &PathBuf, args: &[String]) -> serde_json::Value {
    let out = Command::new(binary)
        .arg("explain")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "explain {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn a_file_policys_node_selector_follows_the_nodes_labels() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let binary = agent_binary();
    let nodes = cluster.fake_nodes("agent-labels", 1, &[]).await.unwrap();
    let node = nodes.names()[0].clone();
    let suffix = rand_suffix();
    let label = ("nodegate-test/pool", format!("gpu-{suffix}"));
    let user = format!("alice-{suffix}");

    let sim = sim().await;
    let pki = Pki::new("node-labels");
    let alice = Cred::Cert(pki.client(&user, &[]));
    let dir = pki.dir.join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let config_file = dir.join("policy.yaml");
    std::fs::write(&config_file, policy_file((label.0, &label.1), &user)).unwrap();
    let (secure, healthz) = (free_port(), free_port());
    let child = Command::new(&binary)
        .args(["--node-name", &node, "--bind-address", "127.0.0.1"])
        .args([
            "--healthz-bind-address",
            "127.0.0.1",
            "--read-only-port",
            "0",
        ])
        .arg(format!("--config-source=file:{}", config_file.display()))
        .arg("--kubeconfig")
        .arg(&cluster.location().kubeconfig)
        .arg(format!("--upstream={}", sim.url()))
        .arg("--client-ca-file")
        .arg(&pki.ca_file)
        .arg(format!("--secure-port={secure}"))
        .arg(format!("--healthz-port={healthz}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _agent = AgentProcess { child, dir };
    let healthz_addr = SocketAddr::from(([127, 0, 0, 1], healthz));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = request(healthz_addr, false, &Cred::None, "GET", "/readyz", &[]).await
            && r.status == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "agent not ready in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], secure));
    let kubeconfig = cluster.location().kubeconfig.to_string_lossy().to_string();
    let file = config_file.to_string_lossy().to_string();
    let explain_pods = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "--config",
            &file,
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            &node,
            "--user",
            &user,
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        args.push("/pods".into());
        explain(&binary, &args)["decision"].clone()
    };

    // The Node lacks the label: the policy does not apply here.
    let r = request(addr, true, &alice, "GET", "/pods", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(explain_pods(&[]), "deny");

    // Labelled: enforced, without restarting the agent.
    let set = format!("{}={}", label.0, label.1);
    cluster
        .run_kubectl(&["label", "node", &node, &set])
        .await
        .unwrap();
    assert_eq!(pods_until(addr, &alice, 200).await, 200, "label set");
    assert_eq!(explain_pods(&[]), "allow");

    // Unlabelled again: no longer.
    cluster
        .run_kubectl(&["label", "node", &node, &format!("{}-", label.0)])
        .await
        .unwrap();
    assert_eq!(pods_until(addr, &alice, 403).await, 403, "label removed");
    assert_eq!(explain_pods(&[]), "deny");
    // --node-labels stands in for the cluster's labels.
    assert_eq!(explain_pods(&["--node-labels", &set]), "allow");
}

/// Without `--config`, `explain` reads the node's NodeAgentConfig from the cluster and decides
/// by the rules of the NodeAgentRuleSet it names, as the agent does.
#[tokio::test]
async fn explain_decides_by_the_rule_set_the_nodes_config_names() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    cluster.install_crds().await.unwrap();
    let binary = agent_binary();
    let suffix = rand_suffix();
    let (node, set, user) = (
        format!("explain-node-{suffix}"),
        format!("nodegate-rules-explain-{suffix}"),
        format!("erin-{suffix}"),
    );
    let manifest = format!(
        "apiVersion: nodegate.io/v1alpha1\nkind: NodeAgentRuleSet\nmetadata:\n  name: {set}\n  \
         labels: {{app.kubernetes.io/managed-by: nodegate}}\nspec:\n  hash: h\n  policies: p\n  \
         subjects: [{{kind: User, name: {user}}}]\n  namespaceSets: [{{all: true}}]\n  \
         rules: [{{policy: p, subjects: [0], endpoints: [pods], namespaces: 0, ports: [Secure]}}]\n\
         ---\napiVersion: nodegate.io/v1alpha1\nkind: NodeAgentConfig\nmetadata:\n  name: {node}\n  \
         labels: {{app.kubernetes.io/managed-by: nodegate}}\nspec:\n  ruleSet: {set}\n"
    );
    let file = std::env::temp_dir().join(format!("explain-{suffix}.yaml"));
    std::fs::write(&file, manifest).unwrap();
    let created = cluster
        .run_kubectl(&["create", "-f", &file.to_string_lossy()])
        .await;
    let kubeconfig = cluster.location().kubeconfig.to_string_lossy().to_string();
    let ask = |who: &str| {
        let args: Vec<String> = [
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            &node,
            "--user",
            who,
            "/pods",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        explain(&binary, &args)
    };
    // Both answers before the cleanup; the assertions after it.
    let answers = created.map(|_| (ask(&user), ask("someone-else")));
    let _ = cluster
        .run_kubectl(&["delete", "-f", &file.to_string_lossy(), "--wait=false"])
        .await;
    let _ = std::fs::remove_file(&file);
    let (allowed, other) = answers.unwrap();
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    assert_eq!(other["decision"], "deny", "{other}");
}
