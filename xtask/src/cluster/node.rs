//! The real nodes. `node-1`: Debian's containerd (own config, root, state and socket under the
//! state dir, so a system containerd is never touched), runc, Debian's CNI plugins, our kubelet,
//! and kube-proxy (iptables mode), so pods reach Services, the API server's included. `node-2`:
//! the same with an older kubelet and kube-proxy (1.35), in its own network namespace
//! ([`super::netns`]) with its own address, containerd, CNI bridge, pod subnet and cgroup root, so
//! the API server, pods and agents see a second host.
//!
//! This VM is cgroup v1 and containerd 1.6 lacks the CRI RuntimeConfig RPC, hence cgroupfs on both
//! sides and `failCgroupV1: false`.

use super::images;
use super::kubeconfig::kubectl;
use super::layout::{
    CLUSTER_POD_CIDR, Layout, NODE_NAME, NODE2_NAME, PAUSE_IMAGE, POD_BRIDGE, POD_GATEWAY,
    POD_PREFIX_LEN, POD_SUBNET, ports,
};
use super::netns::{self, Netns};
use super::process::{self, kill_trees, pids_with_cmdline};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// One real node: where its files live, what its processes are called, its network.
#[derive(Clone, Copy, Debug)]
pub struct NodeDef {
    pub name: &'static str,
    /// Subdir of the state dir with its containerd, kubelet, kube-proxy and CNI files; node-1's
    /// are in the state dir itself (its layout predates node-2, and a running cluster keeps it).
    subdir: Option<&'static str>,
    /// Prefix of its components' names (pid and log files): none for node-1.
    prefix: &'static str,
    /// Its pods' subnet (the CNI bridge's host-local range).
    pub pod_subnet: &'static str,
    bridge: &'static str,
    /// kube-proxy's `clusterCIDR` (what counts as pod traffic).
    proxy_cluster_cidr: &'static str,
    /// Its own network namespace and link to the host; node-1 is the host itself.
    pub netns: Option<Netns>,
    /// Runs node-2's older release (the binaries in `Layout::node2_cache`).
    pub older: bool,
    /// Its kubelet's `cgroupRoot`: two kubelets under one `/kubepods` would each delete the
    /// other's pod cgroups as orphans.
    pub cgroup_root: Option<&'static str>,
}

pub const NODE1: NodeDef = NodeDef {
    name: NODE_NAME,
    subdir: None,
    prefix: "",
    pod_subnet: POD_SUBNET,
    bridge: POD_BRIDGE,
    proxy_cluster_cidr: POD_SUBNET,
    netns: None,
    older: false,
    cgroup_root: None,
};

pub const NODE2: NodeDef = NodeDef {
    name: NODE2_NAME,
    subdir: Some("node-2"),
    prefix: "node-2-",
    pod_subnet: "10.90.0.0/16",
    bridge: "nodegate2",
    proxy_cluster_cidr: CLUSTER_POD_CIDR,
    netns: Some(Netns {
        name: "nodegate-node-2",
        host_link: "ng-node-2",
        host_ip: "10.87.0.1",
        node_ip: "10.87.0.2",
        prefix_len: 30,
    }),
    older: true,
    cgroup_root: Some("/nodegate-node-2"),
};

/// The nodes `up --nodes N` starts, in order.
pub const NODES: [NodeDef; 2] = [NODE1, NODE2];

impl NodeDef {
    fn base(&self, layout: &Layout) -> PathBuf {
        match self.subdir {
            Some(dir) => layout.state.join(dir),
            None => layout.state.clone(),
        }
    }
    /// The name of one of its components (pid file, log file, `status`).
    pub fn component(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    pub fn containerd_dir(&self, layout: &Layout) -> PathBuf {
        self.base(layout).join("containerd")
    }
    pub fn containerd_socket(&self, layout: &Layout) -> PathBuf {
        self.containerd_dir(layout).join("containerd.sock")
    }
    fn cni_conf_dir(&self, layout: &Layout) -> PathBuf {
        self.base(layout).join("cni/net.d")
    }
    fn kubelet_dir(&self, layout: &Layout) -> PathBuf {
        self.base(layout).join("kubelet")
    }
    fn kube_proxy_dir(&self, layout: &Layout) -> PathBuf {
        self.base(layout).join("kube-proxy")
    }
    /// The kubeconfig of its kubelet (`kubelet`, `kubelet-node-2`) or kube-proxy.
    fn kubeconfig(&self, layout: &Layout, component: &str) -> PathBuf {
        match self.subdir {
            Some(_) => layout.kubeconfig(&format!("{component}-{}", self.name)),
            None => layout.kubeconfig(component),
        }
    }
    fn bin(&self, layout: &Layout, name: &str) -> PathBuf {
        if self.older {
            layout.node2_bin(name)
        } else {
            layout.bin(name)
        }
    }
    /// Its InternalIP: node-2's own address, node-1's the default route interface's.
    pub fn node_ip(&self) -> Option<String> {
        match self.netns {
            Some(ns) => Some(ns.node_ip.to_string()),
            None => node_ip(),
        }
    }
    /// Where kube-proxy's healthz and metrics listen: loopback on node-1, node-2's address on
    /// node-2 (so `up` can reach them from the host).
    pub fn proxy_bind(&self) -> Ipv4Addr {
        self.netns
            .and_then(|ns| ns.node_ip.parse().ok())
            .unwrap_or(Ipv4Addr::LOCALHOST)
    }
    fn netns_name(&self) -> Option<&'static str> {
        self.netns.map(|ns| ns.name)
    }
}

/// The node named `name`.
pub fn by_name(name: &str) -> Result<NodeDef> {
    NODES
        .into_iter()
        .find(|n| n.name == name)
        .with_context(|| format!("no node {name}; the nodes are node-1 and node-2"))
}

pub fn start(layout: &Layout, node: &NodeDef) -> Result<()> {
    if let Some(ns) = node.netns {
        netns::ensure(&ns, node.pod_subnet)?;
    }
    if let Some(root) = node.cgroup_root {
        netns::ensure_cgroup_root(root)?;
    }
    start_containerd(layout, node)?;
    images::ensure_imported(layout, &node.containerd_socket(layout))?;
    start_kubelet(layout, node)?;
    start_kube_proxy(layout, node)?;
    Ok(())
}

/// Creates the CNI bridge with the pods' gateway address, unless it is already there (it stays
/// after `down`). The API server advertises that address, so it must exist before the API server
/// starts, not only once the bridge plugin wires the first pod; the plugin takes a bridge that
/// already has its gateway address as it is.
pub fn ensure_pod_bridge() -> Result<()> {
    let link = ip(&["-o", "-d", "link", "show", "dev", POD_BRIDGE]);
    match link {
        Ok(text) if !text.split_whitespace().any(|w| w == "bridge") => {
            bail!("{POD_BRIDGE} exists but is not a bridge: {}", text.trim())
        }
        Ok(_) => {}
        Err(_) => {
            ip(&["link", "add", "name", POD_BRIDGE, "type", "bridge"])?;
        }
    }
    let address = format!("{POD_GATEWAY}/{POD_PREFIX_LEN}");
    let addresses = ip(&["-o", "-4", "addr", "show", "dev", POD_BRIDGE])?;
    if !addresses.split_whitespace().any(|w| w == address) {
        ip(&["addr", "add", &address, "dev", POD_BRIDGE])?;
    }
    ip(&["link", "set", POD_BRIDGE, "up"])?;
    Ok(())
}

/// Runs `ip` (iproute2); returns stdout, or an error with its stderr.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip`; install iproute2 (bash .ci/install-deps)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn start_containerd(layout: &Layout, node: &NodeDef) -> Result<()> {
    let dir = node.containerd_dir(layout);
    let name = node.component("containerd");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_cni_config(layout, node)?;
    let config = dir.join("config.toml");
    process::write_config(layout, &name, &config, &containerd_config(layout, node))?;
    let args = vec!["--config".to_string(), config.display().to_string()];
    process::start_in(
        layout,
        &name,
        node.netns_name(),
        Path::new("/usr/bin/containerd"),
        &args,
    )
    .context("cannot start containerd; install it (bash .ci/install-deps)")?;
    let socket = node.containerd_socket(layout);
    process::wait_ready(
        layout,
        &name,
        "its socket answers",
        Duration::from_secs(30),
        || socket.exists() && images::ctr_at(&socket, &["version"]).is_ok(),
    )
}

fn containerd_config(layout: &Layout, node: &NodeDef) -> String {
    let dir = node.containerd_dir(layout);
    // node-2's runc keeps its state under its own dir, not in runc's default /run/containerd/runc
    // that node-1's shares with any system containerd. (node-1's config stays as it was: a
    // changed config restarts containerd.)
    let runc_root = match node.subdir {
        Some(_) => format!("\n        Root = \"{}\"", dir.join("runc").display()),
        None => String::new(),
    };
    format!(
        r#"# Written by `cargo xtask cluster up`; a change restarts the component.
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Keep pod network namespaces under our state dir (default /var/run/netns), so `down` finds them.
  netns_mounts_under_state_dir = true
  enable_cdi = false
  # Lowering a process's oom_score_adj needs CAP_SYS_RESOURCE, which this VM does not grant even
  # to root: runc's nsexec then dies ("failed to update /proc/self/oom_score_adj: Permission
  # denied"). Clamp pods' oom_score_adj to containerd's own instead (the rootless setting).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false{runc_root}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = node.containerd_socket(layout).display(),
        dir = dir.display(),
        pause = PAUSE_IMAGE,
        cni_bin = CNI_BIN_DIR,
        cni_conf = node.cni_conf_dir(layout).display(),
    )
}

fn write_cni_config(layout: &Layout, node: &NodeDef) -> Result<()> {
    let dir = node.cni_conf_dir(layout);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "nodegate",
        "plugins": [
            {
                "type": "bridge",
                "bridge": node.bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": node.pod_subnet }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": node.base(layout).join("cni/ipam").display().to_string(),
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
        ],
    });
    std::fs::write(
        dir.join("10-nodegate.conflist"),
        serde_json::to_vec_pretty(&conflist)?,
    )
    .context("cannot write the CNI config")
}

fn start_kubelet(layout: &Layout, node: &NodeDef) -> Result<()> {
    let dir = node.kubelet_dir(layout);
    let name = node.component("kubelet");
    std::fs::create_dir_all(dir.join("root"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("config.yaml");
    process::write_config(layout, &name, &config, &kubelet_config(layout, node))?;
    let mut args = vec![
        format!("--config={}", config.display()),
        format!(
            "--kubeconfig={}",
            node.kubeconfig(layout, "kubelet").display()
        ),
        format!("--hostname-override={}", node.name),
        format!("--root-dir={}", dir.join("root").display()),
        format!("--cert-dir={}", dir.join("pki").display()),
    ];
    // The kubelet rejects a loopback node IP; node-1 uses the address of the default route's
    // interface, node-2 its own. The API server reaches the kubelet there (InternalIP).
    if let Some(ip) = node.node_ip() {
        args.push(format!("--node-ip={ip}"));
    }
    // A Node object left from an earlier run still says Ready for a while: wait for a heartbeat
    // newer than the one seen before this kubelet started.
    let stale_heartbeat = if process::find(layout, &name).is_none() {
        ready_heartbeat(layout, node.name)
    } else {
        None
    };
    process::start_in(
        layout,
        &name,
        node.netns_name(),
        &node.bin(layout, "kubelet"),
        &args,
    )?;
    process::wait_ready(
        layout,
        &name,
        &format!("node {} is Ready", node.name),
        Duration::from_secs(120),
        || {
            ready_heartbeat(layout, node.name)
                .is_some_and(|beat| Some(&beat) != stale_heartbeat.as_ref())
        },
    )
}

/// kube-proxy as a host process (node-2's in its namespace) with its own identity
/// (`system:kube-proxy`, which the default `system:node-proxier` ClusterRoleBinding grants what
/// it needs). Started after the kubelet: it reads its node's addresses from its Node object.
fn start_kube_proxy(layout: &Layout, node: &NodeDef) -> Result<()> {
    let dir = node.kube_proxy_dir(layout);
    let name = node.component("kube-proxy");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("config.yaml");
    process::write_config(layout, &name, &config, &kube_proxy_config(layout, node))?;
    let args = vec![format!("--config={}", config.display())];
    process::start_in(
        layout,
        &name,
        node.netns_name(),
        &node.bin(layout, "kube-proxy"),
        &args,
    )
    .context("cannot start kube-proxy; it needs iptables and conntrack (bash .ci/install-deps)")?;
    // /healthz says ok while kube-proxy is still starting; its last-sync metric says the rules
    // (the `kubernetes` Service's among them) are in place.
    let at = IpAddr::V4(node.proxy_bind());
    process::wait_ready(
        layout,
        &name,
        "/healthz says ok and its first iptables sync is done",
        Duration::from_secs(60),
        || {
            http_get_at(at, ports::KUBE_PROXY_HEALTHZ, "/healthz")
                .is_some_and(|(code, _)| code == 200)
                && http_get_at(at, ports::KUBE_PROXY_METRICS, "/metrics")
                    .is_some_and(|(_, body)| synced(&body))
        },
    )
}

/// Whether kube-proxy's metrics show a finished sync of its rules (a non-zero timestamp).
fn synced(metrics: &str) -> bool {
    metrics
        .lines()
        .filter(|l| l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .any(|t| t > 0.0)
}

fn kube_proxy_config(layout: &Layout, node: &NodeDef) -> String {
    format!(
        r#"# Written by `cargo xtask cluster up`; a change restarts the component.
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {node}
mode: iptables
clusterCIDR: {cluster_cidr}
detectLocalMode: ClusterCIDR
healthzBindAddress: {bind}:{healthz}
metricsBindAddress: {bind}:{metrics}
# NodePorts on the node IP only, not on every local address (the pod bridge's included).
nodePortAddresses: ["primary"]
# Leave the machine's settings alone where kube-proxy offers to: the conntrack table's size and
# timeouts (0 = do not touch; /proc/sys/net/netfilter may be read-only), route_localnet (only
# needed for NodePorts on 127.0.0.1), and the OOM score (root here may not lower it).
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
oomScoreAdj: 0
"#,
        kubeconfig = node.kubeconfig(layout, "kube-proxy").display(),
        node = node.name,
        cluster_cidr = node.proxy_cluster_cidr,
        bind = node.proxy_bind(),
        healthz = ports::KUBE_PROXY_HEALTHZ,
        metrics = ports::KUBE_PROXY_METRICS,
    )
}

/// A plain HTTP GET to `ip:port`: (status code, body), or `None` if nothing answers.
pub fn http_get_at(ip: IpAddr, port: u16, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream =
        TcpStream::connect_timeout(&(ip, port).into(), Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

fn kubelet_config(layout: &Layout, node: &NodeDef) -> String {
    let dir = node.kubelet_dir(layout);
    let cgroup_root = node
        .cgroup_root
        .map(|root| {
            format!(
                "# Its own cgroup root: one kubelet removes pod cgroups it does not know under its root.\n\
                 cgroupRoot: {root}\n"
            )
        })
        .unwrap_or_default();
    format!(
        r#"# Written by `cargo xtask cluster up`; a change restarts the component.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{socket}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
port: {port}
readOnlyPort: {ro_port}
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
# cgroup v1 VM, containerd 1.6 without the RuntimeConfig RPC.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
podLogsDir: {pod_logs}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
rotateCertificates: false
serializeImagePulls: false
# The images are imported, not pulled: never garbage-collect them, and do not evict on a nearly
# full disk of a dev machine or CI runner.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
{cgroup_root}"#,
        socket = node.containerd_socket(layout).display(),
        ca = layout.pki_file("ca.crt").display(),
        port = ports::KUBELET,
        ro_port = ports::KUBELET_READ_ONLY,
        healthz = ports::KUBELET_HEALTHZ,
        pod_logs = dir.join("pod-logs").display(),
    )
}

/// The Ready condition's last heartbeat, if the node is Ready.
fn ready_heartbeat(layout: &Layout, name: &str) -> Option<String> {
    let out = kubectl(
        layout,
        &[
            "get",
            "node",
            name,
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}"#,
        ],
    )
    .ok()?;
    let (status, heartbeat) = out.trim().split_once(' ')?;
    (status == "True").then(|| heartbeat.to_string())
}

/// The local address the kernel would use towards the outside (no packet is sent).
pub fn node_ip() -> Option<String> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.254:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then(|| ip.to_string())
}

/// Stops the node and everything it started: kube-proxy (node-1's iptables rules stay, like the
/// bridge's, and are rewritten by the next one), kubelet, the containers (children of containerd's
/// shims, which daemonize out of containerd's process group), containerd, then the mounts the
/// kubelet and containerd left under its dir (pod volumes, rootfs, netns, shm). node-2's network
/// namespace (with its bridge, veth pair, route and rules) and cgroup root are removed too.
pub fn stop(layout: &Layout, node: &NodeDef) -> Result<()> {
    for name in ["kube-proxy", "kubelet"].map(|c| node.component(c)) {
        if process::stop(layout, &name, Duration::from_secs(10))? {
            println!("stopped {name}");
        }
    }
    let socket = node.containerd_socket(layout).display().to_string();
    let shims = pids_with_cmdline(&socket)
        .into_iter()
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("containerd-shim"))
        })
        .collect::<Vec<_>>();
    if !shims.is_empty() {
        println!(
            "stopped {} containerd shims and their containers ({})",
            shims.len(),
            node.name
        );
    }
    kill_trees(&shims)?;
    let containerd = node.component("containerd");
    if process::stop(layout, &containerd, Duration::from_secs(10))? {
        println!("stopped {containerd}");
    }
    unmount_under(&node.base(layout))?;
    if let Some(ns) = node.netns {
        netns::remove(&ns, node.pod_subnet)?;
    }
    if let Some(root) = node.cgroup_root {
        netns::remove_cgroup_root(root);
    }
    Ok(())
}

/// Writes [`Layout::kubelets_ca`]: the serving certificates (with their self-made CAs) of the
/// kubelets of `nodes`, which made them at their first start.
pub fn write_kubelets_ca(layout: &Layout, nodes: &[NodeDef]) -> Result<()> {
    let mut bundle = String::new();
    for node in nodes {
        let crt = node.kubelet_dir(layout).join("pki/kubelet.crt");
        let pem = std::fs::read_to_string(&crt).with_context(|| {
            format!(
                "cannot read {}'s kubelet certificate {}",
                node.name,
                crt.display()
            )
        })?;
        bundle.push_str(&pem);
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
    }
    let path = layout.kubelets_ca();
    if std::fs::read_to_string(&path).ok().as_deref() != Some(bundle.as_str()) {
        std::fs::write(&path, bundle)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The sockets of the nodes' containerds that run, with the node's name.
pub fn containerd_sockets(layout: &Layout) -> Vec<(&'static str, PathBuf)> {
    NODES
        .iter()
        .filter(|n| process::find(layout, &n.component("containerd")).is_some())
        .map(|n| (n.name, n.containerd_socket(layout)))
        .collect()
}

/// Unmounts every mount point under `dir`, deepest first.
fn unmount_under(dir: &Path) -> Result<()> {
    let prefix = format!("{}/", dir.display());
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        let status = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&point)
            .status()
            .context("cannot run umount")?;
        if !status.success() {
            eprintln!("warning: could not unmount {point}");
        }
    }
    Ok(())
}

/// mountinfo escapes spaces and such as octal (`\040`).
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(v) = u8::from_str_radix(&code, 8) {
                out.push(v as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}
