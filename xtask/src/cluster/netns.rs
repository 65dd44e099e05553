//! node-2's own network: a network namespace with a veth pair to the host, a small point-to-point
//! subnet (host 10.87.0.1, node 10.87.0.2), routes both ways (its pod subnet via its address on
//! the host, a default route via the host in the namespace), and the sysctls a node needs. Plus
//! the cgroup root of its kubelet. Everything stays on this machine: nothing is routed to any
//! address the cluster did not make.
//!
//! Pod-to-pod traffic between the nodes is not masqueraded: the CNI bridge plugin's `ipMasq`
//! masquerades whatever leaves its own subnet, so a rule in front of it (on the host and in the
//! namespace) accepts, un-NATed, traffic from a pod address to a pod address. It leaves alone the
//! packets kube-proxy marked for masquerading (hairpin traffic through a Service), which its own
//! `KUBE-POSTROUTING` chain must still see.

use super::layout::CLUSTER_POD_CIDR;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

/// A node's network namespace and its link to the host.
#[derive(Clone, Copy, Debug)]
pub struct Netns {
    /// Name under /run/netns.
    pub name: &'static str,
    /// The host end of the veth pair (the other end is `eth0` in the namespace).
    pub host_link: &'static str,
    pub host_ip: &'static str,
    pub node_ip: &'static str,
    pub prefix_len: u8,
}

/// kube-proxy's masquerade mark (its default `masqueradeBit: 14`).
const KUBE_PROXY_MASQ_MARK: &str = "0x4000/0x4000";

/// The rule that keeps pod-to-pod traffic un-NATed (see the module doc), for `iptables -t nat`.
fn no_nat_rule() -> Vec<&'static str> {
    vec![
        "POSTROUTING",
        "-s",
        CLUSTER_POD_CIDR,
        "-d",
        CLUSTER_POD_CIDR,
        "-m",
        "mark",
        "!",
        "--mark",
        KUBE_PROXY_MASQ_MARK,
        "-m",
        "comment",
        "--comment",
        "nodegate: pod to pod without NAT",
        "-j",
        "ACCEPT",
    ]
}

/// Creates whatever of the namespace, the veth pair, the addresses, routes, sysctls and rules is
/// missing (idempotent; nothing is changed that is already right).
pub fn ensure(ns: &Netns, pod_subnet: &str) -> Result<()> {
    if !Path::new("/run/netns").join(ns.name).exists() {
        ip(&["netns", "add", ns.name])?;
    }
    if ip(&["link", "show", "dev", ns.host_link]).is_err() {
        ip(&[
            "link",
            "add",
            ns.host_link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name,
        ])?;
    }
    let host_address = format!("{}/{}", ns.host_ip, ns.prefix_len);
    if !has_address(None, ns.host_link, &host_address)? {
        ip(&["addr", "add", &host_address, "dev", ns.host_link])?;
    }
    ip(&["link", "set", ns.host_link, "up"])?;
    let node_address = format!("{}/{}", ns.node_ip, ns.prefix_len);
    if !has_address(Some(ns.name), "eth0", &node_address)? {
        ip(&["-n", ns.name, "addr", "add", &node_address, "dev", "eth0"])?;
    }
    ip(&["-n", ns.name, "link", "set", "lo", "up"])?;
    ip(&["-n", ns.name, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n", ns.name, "route", "replace", "default", "via", ns.host_ip,
    ])?;
    ip(&[
        "route",
        "replace",
        pod_subnet,
        "via",
        ns.node_ip,
        "dev",
        ns.host_link,
    ])?;
    // A new namespace starts with forwarding off and the bridge netfilter hooks off (per
    // namespace since Linux 5.3): kube-proxy's rules must see bridged pod traffic.
    in_netns(
        ns.name,
        &[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
            "net.bridge.bridge-nf-call-iptables=1",
        ],
    )?;
    ensure_no_nat_rule(None)?;
    ensure_no_nat_rule(Some(ns.name))?;
    Ok(())
}

/// Deletes the namespace (its end of the veth pair goes with it, the host end and the route
/// with that) and the host's pod-to-pod rule. Missing pieces are not an error.
pub fn remove(ns: &Netns, pod_subnet: &str) -> Result<()> {
    let _ = ip(&["route", "del", pod_subnet]);
    let _ = ip(&["link", "del", ns.host_link]);
    if Path::new("/run/netns").join(ns.name).exists() {
        ip(&["netns", "del", ns.name])?;
        println!("deleted the network namespace {}", ns.name);
    }
    let mut delete = vec!["iptables", "-w", "-t", "nat", "-D"];
    delete.extend(no_nat_rule());
    while run(&delete).is_ok() {}
    Ok(())
}

fn ensure_no_nat_rule(netns: Option<&str>) -> Result<()> {
    let mut check = vec!["iptables", "-w", "-t", "nat", "-C"];
    check.extend(no_nat_rule());
    let present = match netns {
        Some(ns) => in_netns(ns, &check).is_ok(),
        None => run(&check).is_ok(),
    };
    if present {
        return Ok(());
    }
    let mut insert = vec!["iptables", "-w", "-t", "nat", "-I"];
    insert.extend(no_nat_rule());
    match netns {
        Some(ns) => in_netns(ns, &insert),
        None => run(&insert),
    }
    .map(|_| ())
    .context("cannot add the pod-to-pod rule (iptables; bash .ci/install-deps)")
}

/// Makes the kubelet's cgroup root in every cgroup v1 hierarchy (the kubelet refuses a root that
/// does not exist), with the cpuset of the machine's root (a new cpuset cgroup has none).
pub fn ensure_cgroup_root(root: &str) -> Result<()> {
    let base = Path::new("/sys/fs/cgroup");
    let rel = root.trim_start_matches('/');
    for entry in std::fs::read_dir(base).context("cannot read /sys/fs/cgroup")? {
        let hierarchy = entry.context("cannot read /sys/fs/cgroup")?.path();
        if !hierarchy.is_dir() {
            continue;
        }
        let dir = hierarchy.join(rel);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the cgroup {}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let own = dir.join(file);
            if own.exists() && std::fs::read_to_string(&own)?.trim().is_empty() {
                let parent = std::fs::read_to_string(hierarchy.join(file))?;
                std::fs::write(&own, parent.trim())
                    .with_context(|| format!("cannot write {}", own.display()))?;
            }
        }
    }
    Ok(())
}

/// Removes the cgroup root's tree where it is empty (best effort: a cgroup with a process left
/// in it stays, and says so).
pub fn remove_cgroup_root(root: &str) {
    let rel = root.trim_start_matches('/');
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let dir = hierarchy.path().join(rel);
        if dir.is_dir() {
            remove_tree(&dir);
        }
    }
}

/// rmdir, deepest first (cgroupfs removes a cgroup with rmdir, its files with it).
fn remove_tree(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten() {
            let path = child.path();
            if path.is_dir() && !path.is_symlink() {
                remove_tree(&path);
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        eprintln!(
            "warning: could not remove the cgroup {}: {e}",
            dir.display()
        );
    }
}

fn has_address(netns: Option<&str>, dev: &str, address: &str) -> Result<bool> {
    let mut args = vec![];
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-o", "-4", "addr", "show", "dev", dev]);
    let out = ip(&args)?;
    Ok(out.split_whitespace().any(|w| w == address))
}

/// Runs `ip` (iproute2); stdout, or an error with its stderr.
fn ip(args: &[&str]) -> Result<String> {
    let mut all = vec!["ip"];
    all.extend(args);
    run(&all)
}

/// Runs a command in the namespace (`ip netns exec`: short-lived tools only; it gives them a
/// private mount namespace, see `process::start_in`).
fn in_netns(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["ip", "netns", "exec", netns];
    all.extend(args);
    run(&all)
}

fn run(args: &[&str]) -> Result<String> {
    let (program, rest) = args.split_first().context("no command")?;
    let out = Command::new(program)
        .args(rest)
        .output()
        .with_context(|| format!("cannot run `{program}` (bash .ci/install-deps)"))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
