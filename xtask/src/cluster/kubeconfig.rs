//! Kubeconfig files for the admin and each component, and a thin wrapper around the cached
//! kubectl (the one built with the cluster, never whatever kubectl happens to be on PATH).

use super::layout::{Layout, POD_GATEWAY, ports};
use anyhow::{Context, Result, bail};
use std::process::Command;

/// (kubeconfig name, client cert stem in pki/, whether it is used from node-2's network
/// namespace, where 127.0.0.1 is node-2's own loopback).
const USERS: [(&str, &str, bool); 7] = [
    ("admin", "admin", false),
    ("controller-manager", "controller-manager", false),
    ("scheduler", "scheduler", false),
    ("kubelet", "kubelet", false),
    ("kube-proxy", "kube-proxy", false),
    ("kubelet-node-2", "kubelet-node-2", true),
    ("kube-proxy-node-2", "kube-proxy", true),
];

pub fn server_url() -> String {
    format!("https://127.0.0.1:{}", ports::APISERVER)
}

/// The API server as node-2 reaches it: the advertised address (the pod bridge's, on the host,
/// named by the API server's certificate), through node-2's default route.
pub fn node2_server_url() -> String {
    format!("https://{POD_GATEWAY}:{}", ports::APISERVER)
}

pub fn ensure(layout: &Layout) -> Result<()> {
    for (name, stem, from_node2) in USERS {
        let path = layout.kubeconfig(name);
        let server = if from_node2 {
            node2_server_url()
        } else {
            server_url()
        };
        let text = render(layout, &server, name, stem);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn render(layout: &Layout, server: &str, user: &str, stem: &str) -> String {
    let pki = layout.pki();
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: nodegate
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {crt}
    client-key: {key}
contexts:
- name: {user}@nodegate
  context:
    cluster: nodegate
    user: {user}
current-context: {user}@nodegate
",
        ca = pki.join("ca.crt").display(),
        crt = pki.join(format!("{stem}.crt")).display(),
        key = pki.join(format!("{stem}.key")).display(),
    )
}

/// Runs the cached kubectl as admin; returns stdout, or an error with kubectl's stderr.
pub fn kubectl(layout: &Layout, args: &[&str]) -> Result<String> {
    let out = Command::new(layout.bin("kubectl"))
        .arg("--kubeconfig")
        .arg(layout.admin_kubeconfig())
        .args(args)
        .output()
        .context("cannot run the cached kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
