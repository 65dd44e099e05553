//! The kubelet's small node-wide documents: `/configz`, `/statusz`, `/flagz`, `/logs/`,
//! container logs and `/debug/pprof/`.

use super::super::world::{World, rfc3339};
use serde_json::json;

pub fn configz(world: &World) -> String {
    json!({"kubeletconfig": {
        "enableServer": true,
        "staticPodPath": "/etc/kubernetes/manifests",
        "podLogsDir": "/var/log/pods",
        "syncFrequency": "1m0s",
        "address": "0.0.0.0",
        "port": 10250,
        "readOnlyPort": 0,
        "rotateCertificates": true,
        "authentication": {"x509": {"clientCAFile": "/etc/kubernetes/pki/ca.crt"},
                           "webhook": {"enabled": true, "cacheTTL": "2m0s"},
                           "anonymous": {"enabled": false}},
        "authorization": {"mode": "Webhook", "webhook": {"cacheAuthorizedTTL": "5m0s",
                                                          "cacheUnauthorizedTTL": "30s"}},
        "healthzPort": 10248,
        "healthzBindAddress": "127.0.0.1",
        "clusterDomain": "cluster.local",
        "clusterDNS": ["10.96.0.10"],
        "maxPods": 110,
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "nodeName": world.node_name,
        "featureGates": {"KubeletFineGrainedAuthz": true}
    }})
    .to_string()
}

const WARNING: &str = "Warning: This endpoint is not meant to be machine parseable, has no formatting compatibility guarantees and is for debugging purposes only.";

pub fn statusz(world: &World, now_s: i64) -> String {
    let up = now_s - world.boot_time - 30;
    format!(
        "\nkubelet statusz\n{WARNING}\n\nStarted: {}\nUp: {} hr {} min {} sec\nGo version: go1.25.0\nBinary version: 1.37.0\nEmulation version: 1.37\nPaths: /configz /flagz /healthz /metrics /metrics/cadvisor /metrics/probes /metrics/resource /metrics/slis /pods /runningpods /stats /statusz\n",
        rfc3339(world.boot_time + 30),
        up / 3600,
        (up / 60) % 60,
        up % 60
    )
}

pub fn flagz(world: &World) -> String {
    format!(
        "\nkubelet flags\n{WARNING}\n\nconfig=/var/lib/kubelet/config.yaml\ncontainer-runtime-endpoint=unix:///run/containerd/containerd.sock\nhostname-override={}\nkubeconfig=/etc/kubernetes/kubelet.conf\nnode-ip={}\nv=2\n",
        world.node_name, world.node_ip
    )
}

/// The files of the simulated `/var/log` (`/logs/` lists them, `/logs/<name>` serves them).
pub const LOG_FILES: &[&str] = &["syslog", "kubelet.log", "containerd.log", "dpkg.log"];

/// `/logs/`: Go's `http.FileServer` directory listing.
pub fn log_listing() -> String {
    let mut s = String::from(
        "<!doctype html>\n<meta name=\"viewport\" content=\"width=device-width\">\n<pre>\n",
    );
    for dir in ["containers/", "pods/"] {
        s.push_str(&format!("<a href=\"{dir}\">{dir}</a>\n"));
    }
    for f in LOG_FILES {
        s.push_str(&format!("<a href=\"{f}\">{f}</a>\n"));
    }
    s.push_str("</pre>\n");
    s
}

pub fn log_file(world: &World, name: &str, lines: usize) -> String {
    let mut s = String::new();
    for i in 0..lines {
        s.push_str(&format!(
            "{} {} {name}[{}]: simulated log line {i}\n",
            rfc3339(world.now_ms / 1000 - (lines - i) as i64),
            world.node_name,
            1000 + i % 7
        ));
    }
    s
}

/// A container's log: `lines` lines (after `tailLines`), optionally with RFC 3339 timestamps.
pub fn container_log(
    world: &World,
    namespace: &str,
    pod: &str,
    container: &str,
    total: usize,
    tail: Option<usize>,
    timestamps: bool,
) -> String {
    let first = tail.map_or(0, |t| total.saturating_sub(t));
    let mut s = String::new();
    for i in first..total {
        if timestamps {
            s.push_str(&rfc3339(world.now_ms / 1000 - (total - i) as i64));
            s.push(' ');
        }
        s.push_str(&format!(
            "level=info msg=\"handled request {i}\" namespace={namespace} pod={pod} container={container}\n"
        ));
    }
    s
}

pub fn pprof_index() -> String {
    let mut s = String::from(
        "<html>\n<head>\n<title>/debug/pprof/</title>\n</head>\n<body>\n/debug/pprof/\n<br>\n<p>Set debug=1 as a query parameter to export in legacy text format</p>\n<br>\nTypes of profiles available:\n<table>\n",
    );
    for p in PPROF_PROFILES {
        s.push_str(&format!(
            "<tr><td>0</td><td><a href='{p}?debug=1'>{p}</a></td></tr>\n"
        ));
    }
    s.push_str("</table>\n</body>\n</html>\n");
    s
}

pub const PPROF_PROFILES: &[&str] = &[
    "allocs",
    "block",
    "cmdline",
    "goroutine",
    "heap",
    "mutex",
    "profile",
    "threadcreate",
    "trace",
];
