//! Kubeconfig files for the admin and each component, and a thin wrapper around the cached
//! kubectl (the one built with the cluster, never whatever kubectl happens to be on PATH).

use super::layout::{Layout, ports};
use anyhow::{Context, Result, bail};
use std::process::Command;

/// (kubeconfig name, client cert stem in pki/).
const USERS: [(&str, &str); 5] = [
    ("admin", "admin"),
    ("controller-manager", "controller-manager"),
    ("scheduler", "scheduler"),
    ("kubelet", "kubelet"),
    ("kube-proxy", "kube-proxy"),
];

pub fn server_url() -> String {
    format!("https://127.0.0.1:{}", ports::APISERVER)
}

pub fn ensure(layout: &Layout) -> Result<()> {
    for (name, stem) in USERS {
        let path = layout.kubeconfig(name);
        let text = render(layout, name, stem);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn render(layout: &Layout, user: &str, stem: &str) -> String {
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
        server = server_url(),
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
