//! The real node `node-1`: Debian's containerd (own config, root, state and socket under the state
//! dir, so a system containerd is never touched), runc, Debian's CNI plugins, our kubelet, and
//! kube-proxy (iptables mode), so pods reach Services, the API server's included.
//!
//! This VM is cgroup v1 and containerd 1.6 lacks the CRI RuntimeConfig RPC, hence cgroupfs on both
//! sides and `failCgroupV1: false`.

use super::images;
use super::kubeconfig::kubectl;
use super::layout::{
    Layout, NODE_NAME, PAUSE_IMAGE, POD_BRIDGE, POD_GATEWAY, POD_PREFIX_LEN, POD_SUBNET, ports,
};
use super::process::{self, kill_trees, pids_with_cmdline};
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const CNI_BIN_DIR: &str = "/usr/lib/cni";

pub fn start(layout: &Layout) -> Result<()> {
    start_containerd(layout)?;
    images::ensure_imported(layout)?;
    start_kubelet(layout)?;
    start_kube_proxy(layout)?;
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

fn start_containerd(layout: &Layout) -> Result<()> {
    let dir = layout.containerd();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_cni_config(layout)?;
    let config = dir.join("config.toml");
    process::write_config(layout, "containerd", &config, &containerd_config(layout))?;
    let args = vec!["--config".to_string(), config.display().to_string()];
    process::start(
        layout,
        "containerd",
        Path::new("/usr/bin/containerd"),
        &args,
    )
    .context("cannot start containerd; install it (bash .ci/install-deps)")?;
    let socket = layout.containerd_socket();
    process::wait_ready(
        layout,
        "containerd",
        "its socket answers",
        Duration::from_secs(30),
        || socket.exists() && images::ctr(layout, &["version"]).is_ok(),
    )
}

fn containerd_config(layout: &Layout) -> String {
    let dir = layout.containerd();
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
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = layout.containerd_socket().display(),
        dir = dir.display(),
        pause = PAUSE_IMAGE,
        cni_bin = CNI_BIN_DIR,
        cni_conf = layout.cni_conf_dir().display(),
    )
}

fn write_cni_config(layout: &Layout) -> Result<()> {
    let dir = layout.cni_conf_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "nodegate",
        "plugins": [
            {
                "type": "bridge",
                "bridge": POD_BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_SUBNET }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": layout.state.join("cni/ipam").display().to_string(),
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

fn start_kubelet(layout: &Layout) -> Result<()> {
    let dir = layout.kubelet();
    std::fs::create_dir_all(dir.join("root"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("config.yaml");
    process::write_config(layout, "kubelet", &config, &kubelet_config(layout))?;
    let mut args = vec![
        format!("--config={}", config.display()),
        format!("--kubeconfig={}", layout.kubeconfig("kubelet").display()),
        format!("--hostname-override={NODE_NAME}"),
        format!("--root-dir={}", dir.join("root").display()),
        format!("--cert-dir={}", dir.join("pki").display()),
    ];
    // The kubelet rejects a loopback node IP; use the address of the default route's interface,
    // which the API server reaches the kubelet on (InternalIP).
    if let Some(ip) = node_ip() {
        args.push(format!("--node-ip={ip}"));
    }
    // A Node object left from an earlier run still says Ready for a while: wait for a heartbeat
    // newer than the one seen before this kubelet started.
    let stale_heartbeat = if process::find(layout, "kubelet").is_none() {
        ready_heartbeat(layout)
    } else {
        None
    };
    process::start(layout, "kubelet", &layout.bin("kubelet"), &args)?;
    process::wait_ready(
        layout,
        "kubelet",
        &format!("node {NODE_NAME} is Ready"),
        Duration::from_secs(120),
        || ready_heartbeat(layout).is_some_and(|beat| Some(&beat) != stale_heartbeat.as_ref()),
    )
}

/// kube-proxy as a host process with its own identity (`system:kube-proxy`, which the default
/// `system:node-proxier` ClusterRoleBinding grants what it needs). Started after the kubelet:
/// it reads node-1's addresses from its Node object.
fn start_kube_proxy(layout: &Layout) -> Result<()> {
    let dir = layout.kube_proxy();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("config.yaml");
    process::write_config(layout, "kube-proxy", &config, &kube_proxy_config(layout))?;
    let args = vec![format!("--config={}", config.display())];
    process::start(layout, "kube-proxy", &layout.bin("kube-proxy"), &args).context(
        "cannot start kube-proxy; it needs iptables and conntrack (bash .ci/install-deps)",
    )?;
    // /healthz says ok while kube-proxy is still starting; its last-sync metric says the rules
    // (the `kubernetes` Service's among them) are in place.
    process::wait_ready(
        layout,
        "kube-proxy",
        "/healthz says ok and its first iptables sync is done",
        Duration::from_secs(60),
        || {
            http_get(ports::KUBE_PROXY_HEALTHZ, "/healthz").is_some_and(|(code, _)| code == 200)
                && http_get(ports::KUBE_PROXY_METRICS, "/metrics")
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

fn kube_proxy_config(layout: &Layout) -> String {
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
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
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
        kubeconfig = layout.kubeconfig("kube-proxy").display(),
        node = NODE_NAME,
        cluster_cidr = POD_SUBNET,
        healthz = ports::KUBE_PROXY_HEALTHZ,
        metrics = ports::KUBE_PROXY_METRICS,
    )
}

/// A plain HTTP GET on loopback: (status code, body), or `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300))
            .ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

fn kubelet_config(layout: &Layout) -> String {
    let dir = layout.kubelet();
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
"#,
        socket = layout.containerd_socket().display(),
        ca = layout.pki_file("ca.crt").display(),
        port = ports::KUBELET,
        ro_port = ports::KUBELET_READ_ONLY,
        healthz = ports::KUBELET_HEALTHZ,
        pod_logs = dir.join("pod-logs").display(),
    )
}

/// The Ready condition's last heartbeat, if the node is Ready.
fn ready_heartbeat(layout: &Layout) -> Option<String> {
    let out = kubectl(
        layout,
        &[
            "get",
            "node",
            NODE_NAME,
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

/// Stops the node and everything it started: kube-proxy (its iptables rules stay, like the
/// bridge's, and are rewritten by the next one), kubelet, the containers (children of containerd's
/// shims, which daemonize out of containerd's process group), containerd, then the mounts the
/// kubelet and containerd left under the state dir (pod volumes, rootfs, netns, shm).
pub fn stop(layout: &Layout) -> Result<()> {
    for name in ["kube-proxy", "kubelet"] {
        if process::stop(layout, name, Duration::from_secs(10))? {
            println!("stopped {name}");
        }
    }
    let socket = layout.containerd_socket().display().to_string();
    let shims = pids_with_cmdline(&socket)
        .into_iter()
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("containerd-shim"))
        })
        .collect::<Vec<_>>();
    if !shims.is_empty() {
        println!(
            "stopped {} containerd shims and their containers",
            shims.len()
        );
    }
    kill_trees(&shims)?;
    if process::stop(layout, "containerd", Duration::from_secs(10))? {
        println!("stopped containerd");
    }
    unmount_under(&layout.state)
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
