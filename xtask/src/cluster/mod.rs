//! `cargo xtask cluster up|down|status|env`: a real Kubernetes cluster on this machine, for the
//! integration tests and the demo (see docs/local-cluster.md).
//!
//! `up` builds the components once (cached per version), makes the PKI once per state dir, then
//! starts whatever is not running yet, in dependency order, waiting for each to be ready; so it
//! is idempotent and also repairs a half-dead cluster. `down` stops everything it started.

pub(crate) mod build;
mod control_plane;
pub(crate) mod images;
mod kubeconfig;
pub(crate) mod layout;
mod node;
mod pki;
mod process;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use layout::{Layout, NODE_NAME, ports};
use nix::fcntl::{Flock, FlockArg};
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
    },
    /// Stop every process of the cluster (idempotent). The state (PKI, etcd data) is kept.
    Down {
        /// Also delete the state dir (PKI, etcd data, images, logs).
        #[arg(long)]
        purge: bool,
    },
    /// Say what runs where.
    Status,
    /// Print the shell exports (KUBECONFIG, …) for the running cluster:
    /// `eval "$(cargo xtask cluster env)"`.
    Env,
}

pub fn run(args: Args) -> Result<()> {
    let layout = Layout::from_env()?;
    match args.command {
        ClusterCommand::Up { no_node } => {
            up(&layout, !no_node)?;
            println!("cluster is up; use it with: eval \"$(cargo xtask cluster env)\"");
            Ok(())
        }
        ClusterCommand::Down { purge } => down(&layout, purge),
        ClusterCommand::Status => status(&layout),
        ClusterCommand::Env => {
            for (key, value) in env_vars(&layout) {
                println!("export {key}={}", shell_quote(&value));
            }
            Ok(())
        }
    }
}

/// Starts the cluster unless it already runs, and returns the environment variables that point
/// tests and tools at it (KUBECONFIG, NODEGATE_CLUSTER_DIR, …).
pub fn ensure_up() -> Result<Vec<(String, String)>> {
    let layout = Layout::from_env()?;
    up(&layout, true)?;
    Ok(env_vars(&layout))
}

fn up(layout: &Layout, with_node: bool) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&layout.state)
        .with_context(|| format!("cannot create the state dir {}", layout.state.display()))?;
    let _lock = lock(layout)?;
    build::ensure_built(layout)?;
    link_kubectl(layout)?;
    pki::ensure(layout)?;
    kubeconfig::ensure(layout)?;
    step("control plane", || control_plane::start(layout))?;
    if with_node {
        step(&format!("node {NODE_NAME}"), || node::start(layout))?;
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

fn down(layout: &Layout, purge: bool) -> Result<()> {
    let _lock = layout.state.exists().then(|| lock(layout)).transpose()?;
    node::stop(layout)?;
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

fn status(layout: &Layout) -> Result<()> {
    let where_ = [
        (
            "etcd",
            format!(
                "https://127.0.0.1:{} (metrics http://127.0.0.1:{})",
                ports::ETCD_CLIENT,
                ports::ETCD_METRICS
            ),
        ),
        (
            "kube-apiserver",
            format!(
                "{} (all interfaces; advertised {}:{}, the `kubernetes` Service {}:443)",
                kubeconfig::server_url(),
                layout::POD_GATEWAY,
                ports::APISERVER,
                layout::SERVICE_IP_KUBERNETES
            ),
        ),
        (
            "kube-controller-manager",
            format!("https://127.0.0.1:{}", ports::CONTROLLER_MANAGER),
        ),
        (
            "kube-scheduler",
            format!("https://127.0.0.1:{}", ports::SCHEDULER),
        ),
        (
            "containerd",
            format!("unix://{}", layout.containerd_socket().display()),
        ),
        (
            "kubelet",
            format!(
                "node {NODE_NAME} at {}: https :{}, read-only http :{}, healthz 127.0.0.1:{}",
                node::node_ip().unwrap_or_else(|| "?".into()),
                ports::KUBELET,
                ports::KUBELET_READ_ONLY,
                ports::KUBELET_HEALTHZ
            ),
        ),
        (
            "kube-proxy",
            format!(
                "iptables mode, healthz http://127.0.0.1:{}/healthz, metrics http://127.0.0.1:{}",
                ports::KUBE_PROXY_HEALTHZ,
                ports::KUBE_PROXY_METRICS
            ),
        ),
    ];
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
    for (name, at) in where_ {
        match process::find(layout, name) {
            Some(running) => println!("  {name:<24} running  pid {:<7} {at}", running.pid),
            None => println!("  {name:<24} stopped"),
        }
        println!("  {:<24}          log {}", "", layout.log(name).display());
    }
    Ok(())
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
