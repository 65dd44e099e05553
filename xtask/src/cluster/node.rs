//! The real node `node-1`: Debian's containerd (own config, root, state and socket under the state
//! dir, so a system containerd is never touched), runc, Debian's CNI plugins, and our kubelet.
//!
//! This VM is cgroup v1 and containerd 1.6 lacks the CRI RuntimeConfig RPC, hence cgroupfs on both
//! sides and `failCgroupV1: false`.

use super::images;
use super::kubeconfig::kubectl;
use super::layout::{Layout, NODE_NAME, PAUSE_IMAGE, POD_SUBNET, ports};
use super::process::{self, kill_trees, pids_with_cmdline};
use anyhow::{Context, Result};
use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

const CNI_BIN_DIR: &str = "/usr/lib/cni";

pub fn start(layout: &Layout) -> Result<()> {
    start_containerd(layout)?;
    images::ensure_imported(layout)?;
    start_kubelet(layout)?;
    Ok(())
}

fn start_containerd(layout: &Layout) -> Result<()> {
    let dir = layout.containerd();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_cni_config(layout)?;
    let config = dir.join("config.toml");
    std::fs::write(&config, containerd_config(layout))
        .context("cannot write containerd's config")?;
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
        r#"# Written by `cargo xtask cluster up`; rewritten on every start.
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
                "bridge": "nodegate0",
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
    std::fs::write(&config, kubelet_config(layout)).context("cannot write the kubelet config")?;
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

fn kubelet_config(layout: &Layout) -> String {
    let dir = layout.kubelet();
    format!(
        r#"# Written by `cargo xtask cluster up`; rewritten on every start.
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

/// Stops the node and everything it started: kubelet, the containers (children of containerd's
/// shims, which daemonize out of containerd's process group), containerd, then the mounts the
/// kubelet and containerd left under the state dir (pod volumes, rootfs, netns, shm).
pub fn stop(layout: &Layout) -> Result<()> {
    if process::stop(layout, "kubelet", Duration::from_secs(10))? {
        println!("stopped kubelet");
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
