//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback, all TLS.

use super::kubeconfig::kubectl;
use super::layout::{Layout, POD_GATEWAY, SERVICE_SUBNET, ports};
use super::node;
use super::process;
use anyhow::Result;
use std::net::TcpStream;
use std::time::Duration;

pub const COMPONENTS: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

pub fn start(layout: &Layout) -> Result<()> {
    start_etcd(layout)?;
    node::ensure_pod_bridge()?;
    start_apiserver(layout)?;
    start_controller_manager(layout)?;
    start_scheduler(layout)?;
    Ok(())
}

fn start_etcd(layout: &Layout) -> Result<()> {
    let pki = |f: &str| layout.pki_file(f).display().to_string();
    let client = format!("https://127.0.0.1:{}", ports::ETCD_CLIENT);
    let peer = format!("https://127.0.0.1:{}", ports::ETCD_PEER);
    let args = [
        "--name=default".to_string(),
        format!("--data-dir={}", layout.etcd_data().display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=default={peer}"),
        format!(
            "--listen-metrics-urls=http://127.0.0.1:{}",
            ports::ETCD_METRICS
        ),
        format!("--cert-file={}", pki("etcd.crt")),
        format!("--key-file={}", pki("etcd.key")),
        format!("--trusted-ca-file={}", pki("ca.crt")),
        "--client-cert-auth=true".to_string(),
        format!("--peer-cert-file={}", pki("etcd.crt")),
        format!("--peer-key-file={}", pki("etcd.key")),
        format!("--peer-trusted-ca-file={}", pki("ca.crt")),
        "--peer-client-cert-auth=true".to_string(),
        // Test data: speed over durability.
        "--unsafe-no-fsync=true".to_string(),
        "--quota-backend-bytes=2147483648".to_string(),
    ];
    process::start(layout, "etcd", &layout.bin("etcd"), &args)?;
    process::wait_ready(
        layout,
        "etcd",
        "its client port accepts connections",
        Duration::from_secs(30),
        || port_open(ports::ETCD_CLIENT),
    )
}

fn start_apiserver(layout: &Layout) -> Result<()> {
    let pki = |f: &str| layout.pki_file(f).display().to_string();
    let args = [
        // One bind address only: all of them, so both the kubeconfigs' 127.0.0.1 and the
        // advertised pod gateway (where kube-proxy sends pods' traffic to the `kubernetes`
        // Service) reach it. Like the kubelet's port, it is TLS with client auth only.
        "--bind-address=0.0.0.0".to_string(),
        // The `kubernetes` Service's endpoint. Loopback is refused by the endpoint reconciler
        // and unreachable from pods; the bridge's address is reachable from pods and from
        // hostNetwork pods and never leaves the machine.
        format!("--advertise-address={POD_GATEWAY}"),
        format!("--secure-port={}", ports::APISERVER),
        format!("--etcd-servers=https://127.0.0.1:{}", ports::ETCD_CLIENT),
        format!("--etcd-cafile={}", pki("ca.crt")),
        format!("--etcd-certfile={}", pki("apiserver-etcd-client.crt")),
        format!("--etcd-keyfile={}", pki("apiserver-etcd-client.key")),
        format!("--tls-cert-file={}", pki("apiserver.crt")),
        format!("--tls-private-key-file={}", pki("apiserver.key")),
        format!("--client-ca-file={}", pki("ca.crt")),
        "--authorization-mode=Node,RBAC".to_string(),
        "--enable-admission-plugins=NodeRestriction".to_string(),
        "--anonymous-auth=false".to_string(),
        "--allow-privileged=true".to_string(),
        format!("--service-cluster-ip-range={SERVICE_SUBNET}"),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
        format!("--service-account-key-file={}", pki("sa.pub")),
        format!("--service-account-signing-key-file={}", pki("sa.key")),
        format!(
            "--kubelet-client-certificate={}",
            pki("apiserver-kubelet-client.crt")
        ),
        format!(
            "--kubelet-client-key={}",
            pki("apiserver-kubelet-client.key")
        ),
        "--kubelet-preferred-address-types=InternalIP,Hostname".to_string(),
        "--profiling=false".to_string(),
        // The aggregation layer's front proxy, as kubeadm sets it up (one CA here rather than a
        // front-proxy CA of its own: `--requestheader-allowed-names` admits only the
        // front-proxy-client certificate, whatever else the CA signed).
        format!("--requestheader-client-ca-file={}", pki("ca.crt")),
        "--requestheader-allowed-names=front-proxy-client".to_string(),
        "--requestheader-username-headers=X-Remote-User".to_string(),
        "--requestheader-group-headers=X-Remote-Group".to_string(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".to_string(),
        format!("--proxy-client-cert-file={}", pki("front-proxy-client.crt")),
        format!("--proxy-client-key-file={}", pki("front-proxy-client.key")),
    ];
    process::start(
        layout,
        "kube-apiserver",
        &layout.bin("kube-apiserver"),
        &args,
    )?;
    process::wait_ready(
        layout,
        "kube-apiserver",
        "/readyz says ok",
        Duration::from_secs(120),
        || kubectl(layout, &["get", "--raw", "/readyz"]).is_ok_and(|out| out.trim() == "ok"),
    )
}

fn start_controller_manager(layout: &Layout) -> Result<()> {
    let pki = |f: &str| layout.pki_file(f).display().to_string();
    let kubeconfig = layout
        .kubeconfig("controller-manager")
        .display()
        .to_string();
    let args = [
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".to_string(),
        format!("--secure-port={}", ports::CONTROLLER_MANAGER),
        // Every default controller: garbagecollector, namespace, serviceaccount,
        // serviceaccount-token, csrsigning, csrapproving, nodelifecycle, replicaset, …
        "--controllers=*".to_string(),
        format!("--cluster-signing-cert-file={}", pki("ca.crt")),
        format!("--cluster-signing-key-file={}", pki("ca.key")),
        format!("--root-ca-file={}", pki("ca.crt")),
        format!("--service-account-private-key-file={}", pki("sa.key")),
        "--use-service-account-credentials=true".to_string(),
        "--leader-elect=false".to_string(),
        "--profiling=false".to_string(),
    ];
    process::start(
        layout,
        "kube-controller-manager",
        &layout.bin("kube-controller-manager"),
        &args,
    )?;
    process::wait_ready(
        layout,
        "kube-controller-manager",
        "its secure port accepts connections",
        Duration::from_secs(60),
        || port_open(ports::CONTROLLER_MANAGER),
    )
}

fn start_scheduler(layout: &Layout) -> Result<()> {
    let kubeconfig = layout.kubeconfig("scheduler").display().to_string();
    let args = [
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".to_string(),
        format!("--secure-port={}", ports::SCHEDULER),
        "--leader-elect=false".to_string(),
        "--profiling=false".to_string(),
    ];
    process::start(
        layout,
        "kube-scheduler",
        &layout.bin("kube-scheduler"),
        &args,
    )?;
    process::wait_ready(
        layout,
        "kube-scheduler",
        "its secure port accepts connections",
        Duration::from_secs(60),
        || port_open(ports::SCHEDULER),
    )
}

pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).is_ok()
}
