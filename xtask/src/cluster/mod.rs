//! `cargo xtask cluster up|down|status|env`: a real Kubernetes cluster on this machine, for the
//! integration tests and the demo (see docs/local-cluster.md).
//!
//! `up` builds the components once (cached per version), makes the PKI once per state dir, then
//! starts whatever is not running yet, in dependency order, waiting for each to be ready; so it
//! is idempotent and also repairs a half-dead cluster. It starts two nodes: `node-1` (the host,
//! kubelet 1.37) and `node-2` (its own network namespace, kubelet 1.35). `down` stops everything
//! it started.

pub(crate) mod build;
mod control_plane;
pub(crate) mod images;
mod kubeconfig;
pub(crate) mod layout;
mod netns;
mod node;
mod pki;
mod process;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use layout::{Layout, ports};
use nix::fcntl::{Flock, FlockArg};
use node::{NODE2, NODES, NodeDef};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
pub struct Args {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Build the binaries if needed and start the cluster (idempotent).
    Up {
        /// Only the control plane (etcd, API server, controller manager, scheduler): no node.
        #[arg(long)]
        no_node: bool,
        /// How many real nodes: 2 is node-1 (kubelet 1.37, on the host) and node-2 (kubelet
        /// 1.35, its own network namespace); 1 is node-1 alone (a running node-2 is stopped and
        /// its Node object deleted).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
        nodes: u8,
    },
    /// Stop every process of the cluster (idempotent). The state (PKI, etcd data) is kept.
    Down {
        /// Also delete the state dir (PKI, etcd data, images, logs).
        #[arg(long)]
        purge: bool,
        /// Stop this node only (`node-2`), leaving the control plane and node-1 running.
        #[arg(long, conflicts_with = "purge")]
        node: Option<String>,
    },
    /// Kill one control-plane component (`kube-apiserver`, `etcd`, `kube-controller-manager`,
    /// `kube-scheduler`) as a crash would (SIGKILL, no shutdown), then start it again with the
    /// same flags and wait until it is ready (the chaos test restarts the API server this way).
    Restart { component: String },
    /// Say what runs where.
    Status,
    /// Print the shell exports (KUBECONFIG, …) for the running cluster:
    /// `eval "$(cargo xtask cluster env)"`.
    Env,
}

pub fn run(args: Args) -> Result<()> {
    let layout = Layout::from_env()?;
    match args.command {
        ClusterCommand::Up { no_node, nodes } => {
            up(&layout, if no_node { 0 } else { usize::from(nodes) })?;
            println!("cluster is up; use it with: eval \"$(cargo xtask cluster env)\"");
            Ok(())
        }
        ClusterCommand::Down {
            purge: _,
            node: Some(name),
        } => down_node(&layout, &name),
        ClusterCommand::Down { purge, node: None } => down(&layout, purge),
        ClusterCommand::Restart { component } => restart(&layout, &component),
        ClusterCommand::Status => status(&layout),
        ClusterCommand::Env => {
            for (key, value) in env_vars(&layout) {
                println!("export {key}={}", shell_quote(&value));
            }
            Ok(())
        }
    }
}

/// Kills `component` (SIGKILL to its process group) and starts the control plane again, which
/// starts only what is not running.
fn restart(layout: &Layout, component: &str) -> Result<()> {
    const COMPONENTS: [&str; 4] = [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ];
    if !COMPONENTS.contains(&component) {
        bail!(
            "restart: {component} is not one of {}",
            COMPONENTS.join(", ")
        );
    }
    let started = Instant::now();
    let _lock = lock(layout)?;
    if !process::stop(layout, component, Duration::ZERO)? {
        bail!("restart: {component} is not running (cargo xtask cluster up)");
    }
    step("control plane", || control_plane::start(layout))?;
    println!(
        "{component} restarted in {}",
        build::human(started.elapsed())
    );
    Ok(())
}

/// Starts the cluster unless it already runs, and returns the environment variables that point
/// tests and tools at it (KUBECONFIG, NODEGATE_CLUSTER_DIR, …).
pub fn ensure_up() -> Result<Vec<(String, String)>> {
    let layout = Layout::from_env()?;
    up(&layout, NODES.len())?;
    Ok(env_vars(&layout))
}

/// Starts the control plane and the first `nodes` nodes.
fn up(layout: &Layout, nodes: usize) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&layout.state)
        .with_context(|| format!("cannot create the state dir {}", layout.state.display()))?;
    let _lock = lock(layout)?;
    build::ensure_built(layout)?;
    if nodes > 1 {
        build::ensure_node2_built(layout)?;
    }
    link_kubectl(layout)?;
    pki::ensure(layout)?;
    kubeconfig::ensure(layout)?;
    step("control plane", || control_plane::start(layout))?;
    for node in NODES.iter().take(nodes) {
        step(&format!("node {}", node.name), || node::start(layout, node))?;
    }
    if nodes > 0 {
        node::write_kubelets_ca(layout, &NODES[..nodes])?;
    }
    // `--nodes 1` means one node: a node-2 left running by an earlier `up` is stopped, and its
    // Node object deleted so the scheduler and DaemonSets count one node.
    if nodes == 1 && node_runs(layout, &NODE2) {
        node::stop(layout, &NODE2)?;
        kubeconfig::kubectl(
            layout,
            &["delete", "node", NODE2.name, "--ignore-not-found"],
        )?;
        println!("stopped {} (--nodes 1)", NODE2.name);
    }
    println!(
        "up in {} (state: {})",
        build::human(started.elapsed()),
        layout.state.display()
    );
    Ok(())
}

fn step(what: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let started = Instant::now();
    f().with_context(|| format!("starting the {what} failed"))?;
    println!("{what} ready ({})", build::human(started.elapsed()));
    Ok(())
}

fn node_runs(layout: &Layout, node: &NodeDef) -> bool {
    ["containerd", "kubelet", "kube-proxy"]
        .iter()
        .any(|c| process::find(layout, &node.component(c)).is_some())
}

fn down(layout: &Layout, purge: bool) -> Result<()> {
    let _lock = layout.state.exists().then(|| lock(layout)).transpose()?;
    // node-2 first: node-1's unmount sweeps the whole state dir, node-2's dir included.
    for node in NODES.iter().rev() {
        node::stop(layout, node)?;
    }
    for name in control_plane::COMPONENTS.iter().rev() {
        if process::stop(layout, name, Duration::from_secs(15))? {
            println!("stopped {name}");
        }
    }
    if purge && layout.state.exists() {
        std::fs::remove_dir_all(&layout.state)
            .with_context(|| format!("cannot delete {}", layout.state.display()))?;
        println!("deleted {}", layout.state.display());
    }
    println!("cluster is down");
    Ok(())
}

/// `down --node node-2`: that node only (its Node object stays, NotReady, like node-1's after
/// `down`).
fn down_node(layout: &Layout, name: &str) -> Result<()> {
    let node = node::by_name(name)?;
    if node.name != NODE2.name {
        anyhow::bail!("only node-2 can be stopped alone (`down` stops node-1 with the cluster)");
    }
    let _lock = lock(layout)?;
    node::stop(layout, &node)?;
    println!("{} is down", node.name);
    Ok(())
}

/// The sockets of the nodes' running containerds, with the node's name (images are imported
/// into each).
pub fn containerd_sockets(layout: &Layout) -> Vec<(&'static str, PathBuf)> {
    node::containerd_sockets(layout)
}

fn status(layout: &Layout) -> Result<()> {
    let mut where_ = vec![
        (
            "etcd".to_string(),
            format!(
                "https://127.0.0.1:{} (metrics http://127.0.0.1:{})",
                ports::ETCD_CLIENT,
                ports::ETCD_METRICS
            ),
        ),
        (
            "kube-apiserver".to_string(),
            format!(
                "{} (all interfaces; advertised {}:{}, the `kubernetes` Service {}:443)",
                kubeconfig::server_url(),
                layout::POD_GATEWAY,
                ports::APISERVER,
                layout::SERVICE_IP_KUBERNETES
            ),
        ),
        (
            "kube-controller-manager".to_string(),
            format!("https://127.0.0.1:{}", ports::CONTROLLER_MANAGER),
        ),
        (
            "kube-scheduler".to_string(),
            format!("https://127.0.0.1:{}", ports::SCHEDULER),
        ),
    ];
    for node in NODES {
        where_.extend(node_status(layout, &node));
    }
    println!("state dir: {}", layout.state.display());
    println!(
        "binaries:  {} (Kubernetes {}, etcd {}){}",
        layout.bin_dir().display(),
        layout::K8S_VERSION,
        layout::ETCD_VERSION,
        if build::is_built(layout) {
            ""
        } else {
            " — not built yet"
        }
    );
    println!(
        "node-2:    {} (Kubernetes {}){}",
        layout.node2_cache.join("bin").display(),
        layout::K8S_NODE2_VERSION,
        if build::is_node2_built(layout) {
            ""
        } else {
            " — not built yet"
        }
    );
    for (name, at) in where_ {
        let name = name.as_str();
        match process::find(layout, name) {
            Some(running) => println!("  {name:<24} running  pid {:<7} {at}", running.pid),
            None => println!("  {name:<24} stopped"),
        }
        println!("  {:<24}          log {}", "", layout.log(name).display());
    }
    Ok(())
}

/// `status` lines of one node's components: (component name, where it listens).
fn node_status(layout: &Layout, node: &NodeDef) -> Vec<(String, String)> {
    let ip = node.node_ip().unwrap_or_else(|| "?".into());
    let netns = node
        .netns
        .map(|ns| {
            format!(
                ", network namespace {} (host end {} {})",
                ns.name, ns.host_link, ns.host_ip
            )
        })
        .unwrap_or_default();
    let version = if node.older {
        layout::K8S_NODE2_VERSION
    } else {
        layout::K8S_VERSION
    };
    let proxy = node.proxy_bind();
    vec![
        (
            node.component("containerd"),
            format!(
                "node {}: unix://{}",
                node.name,
                node.containerd_socket(layout).display()
            ),
        ),
        (
            node.component("kubelet"),
            format!(
                "node {} {version} at {ip}{netns}: https :{}, read-only http :{}, pods {}",
                node.name,
                ports::KUBELET,
                ports::KUBELET_READ_ONLY,
                node.pod_subnet,
            ),
        ),
        (
            node.component("kube-proxy"),
            format!(
                "node {}: iptables mode, healthz http://{proxy}:{}/healthz, metrics http://{proxy}:{}",
                node.name,
                ports::KUBE_PROXY_HEALTHZ,
                ports::KUBE_PROXY_METRICS
            ),
        ),
    ]
}

fn env_vars(layout: &Layout) -> Vec<(String, String)> {
    let path = std::env::var("PATH").unwrap_or_default();
    vec![
        (
            "NODEGATE_CLUSTER_DIR".into(),
            layout.state.display().to_string(),
        ),
        (
            "KUBECONFIG".into(),
            layout.admin_kubeconfig().display().to_string(),
        ),
        (
            "PATH".into(),
            format!("{}:{path}", layout.bin_dir().display()),
        ),
        (
            "CONTAINERD_ADDRESS".into(),
            layout.containerd_socket().display().to_string(),
        ),
        ("CONTAINERD_NAMESPACE".into(), "k8s.io".into()),
    ]
}

/// Serializes `up` and `down` on one state dir: test binaries running in parallel may each
/// start the cluster, and two `up`s must not both start etcd.
fn lock(layout: &Layout) -> Result<Flock<std::fs::File>> {
    let path = layout.state.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow::anyhow!("cannot lock {}: {errno}", path.display()))
}

fn link_kubectl(layout: &Layout) -> Result<()> {
    let link = layout.kubectl_link();
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(layout.bin("kubectl"), &link)
        .with_context(|| format!("cannot create {}", link.display()))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
