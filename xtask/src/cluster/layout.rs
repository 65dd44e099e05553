//! Where everything lives: the build cache (shared by all state dirs, keyed on the Kubernetes
//! version) and the state dir of one cluster (PKI, configs, data, logs, pids).
//!
//! The state dir is outside the repo so `git status` stays clean and a `cargo clean` does not wipe
//! a running cluster; `NODEGATE_CLUSTER_DIR` overrides it (e.g. one cluster per CI job).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Kubernetes release the binaries are built from (must match `xtask/k8s/go.mod`).
pub const K8S_VERSION: &str = "v1.37.1";
/// Kubernetes release of node-2's kubelet and kube-proxy (must match `xtask/k8s-v1.35/go.mod`):
/// the oldest minor the 1.37 API server supports (three older) that the Go module proxy serves,
/// so the cluster has the version skew every real cluster has during an upgrade.
pub const K8S_NODE2_VERSION: &str = "v1.35.4";
/// etcd release pinned in `xtask/k8s/go.mod` (the one Kubernetes 1.37 is tested with).
pub const ETCD_VERSION: &str = "v3.7.0";

/// Name the real node registers as.
pub const NODE_NAME: &str = "node-1";
/// Name the second real node (older kubelet, own network namespace) registers as.
pub const NODE2_NAME: &str = "node-2";

/// Loopback ports. Upstream defaults where they exist; none collides with the nodegate agent's
/// defaults (10350, 10355, 10348).
pub mod ports {
    pub const ETCD_CLIENT: u16 = 2379;
    pub const ETCD_PEER: u16 = 2380;
    pub const ETCD_METRICS: u16 = 2381;
    pub const APISERVER: u16 = 6443;
    pub const CONTROLLER_MANAGER: u16 = 10257;
    pub const SCHEDULER: u16 = 10259;
    pub const KUBELET: u16 = 10250;
    pub const KUBELET_READ_ONLY: u16 = 10255;
    pub const KUBELET_HEALTHZ: u16 = 10248;
    pub const KUBE_PROXY_METRICS: u16 = 10249;
    pub const KUBE_PROXY_HEALTHZ: u16 = 10256;
}

/// Image names imported into containerd (no registry: they are built locally).
pub const PAUSE_IMAGE: &str = "nodegate.local/pause:1";
pub const BUSYBOX_IMAGE: &str = "nodegate.local/busybox:1";

/// Pod network of the node's CNI bridge (not containerd's default 10.88/16, so a system
/// containerd on a developer machine does not clash).
pub const POD_SUBNET: &str = "10.89.0.0/16";
/// The CNI bridge and its address, the pods' gateway. xtask creates the bridge before the API
/// server starts and the API server advertises this address: the `kubernetes` Service's endpoint
/// must be an address pods can reach (not loopback, which the API server refuses), and this one
/// keeps their traffic on the machine.
pub const POD_BRIDGE: &str = "nodegate0";
pub const POD_GATEWAY: &str = "10.89.0.1";
/// Prefix length of `POD_SUBNET`, for the gateway's address on the bridge.
pub const POD_PREFIX_LEN: u8 = 16;
/// Every pod address of the cluster: node-1's 10.89.0.0/16 and node-2's 10.90.0.0/16. Traffic
/// between two pods is never masqueraded (the CNI bridge's `ipMasq` would, for a destination
/// outside its own node's subnet).
pub const CLUSTER_POD_CIDR: &str = "10.88.0.0/14";
pub const SERVICE_SUBNET: &str = "10.0.0.0/24";
pub const SERVICE_IP_KUBERNETES: &str = "10.0.0.1";

#[derive(Clone, Debug)]
pub struct Layout {
    /// `~/.cache/nodegate/k8s-<version>`: the Go build output, shared by all clusters.
    pub cache: PathBuf,
    /// `~/.cache/nodegate/k8s-v1.35.4`: node-2's kubelet and kube-proxy.
    pub node2_cache: PathBuf,
    /// The state dir of this cluster.
    pub state: PathBuf,
}

impl Layout {
    pub fn from_env() -> Result<Self> {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .context("HOME is not set; set NODEGATE_CLUSTER_DIR and XDG_CACHE_HOME instead")?;
        let state = match std::env::var_os("NODEGATE_CLUSTER_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".local/state"))
                .join("nodegate/cluster"),
        };
        let caches = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".cache"))
            .join("nodegate");
        let cache = caches.join(format!("k8s-{K8S_VERSION}"));
        let node2_cache = caches.join(format!("k8s-{K8S_NODE2_VERSION}"));
        let state = absolute(&state)?;
        Ok(Self {
            cache,
            node2_cache,
            state,
        })
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.cache.join("bin")
    }
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir().join(name)
    }
    /// A binary of node-2's (older) Kubernetes release.
    pub fn node2_bin(&self, name: &str) -> PathBuf {
        self.node2_cache.join("bin").join(name)
    }
    pub fn pki(&self) -> PathBuf {
        self.state.join("pki")
    }
    pub fn pki_file(&self, name: &str) -> PathBuf {
        self.pki().join(name)
    }
    pub fn logs(&self) -> PathBuf {
        self.state.join("logs")
    }
    pub fn log(&self, component: &str) -> PathBuf {
        self.logs().join(format!("{component}.log"))
    }
    pub fn run(&self) -> PathBuf {
        self.state.join("run")
    }
    pub fn kubeconfig(&self, who: &str) -> PathBuf {
        self.state.join(format!("{who}.kubeconfig"))
    }
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.kubeconfig("admin")
    }
    pub fn etcd_data(&self) -> PathBuf {
        self.state.join("etcd")
    }
    pub fn containerd(&self) -> PathBuf {
        self.state.join("containerd")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.containerd().join("containerd.sock")
    }
    pub fn images(&self) -> PathBuf {
        self.state.join("images")
    }
    /// The serving certificates of the running nodes' kubelets (each self-signed, with its own
    /// CA), one PEM file: what an agent DaemonSet on every node verifies its kubelet with (the
    /// chart's `agent.upstream.ca.bundle`, with `agent.upstream.serverName=$(NODE_NAME)`).
    pub fn kubelets_ca(&self) -> PathBuf {
        self.state.join("kubelets-ca.crt")
    }
    /// A link to the cached kubectl inside the state dir, so tools that only know the state dir
    /// (the tests' harness) find the right kubectl without a PATH change.
    pub fn kubectl_link(&self) -> PathBuf {
        self.state.join("kubectl")
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("cannot read the current directory")?
        .join(path))
}
