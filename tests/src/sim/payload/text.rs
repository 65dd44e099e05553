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

/// `/statusz` as kubelet 1.37 writes it (times in Go's `UnixDate` format). The kubelet picks
/// the field delimiter at random (`:`, `: `, `=`, two spaces, …) so nobody parses the page;
/// the simulator picks it from `now_s`, so it varies too.
pub fn statusz(world: &World, now_s: i64) -> String {
    const DELIMITERS: [&str; 4] = [":", ": ", "= ", "  "];
    let d = DELIMITERS[now_s.rem_euclid(DELIMITERS.len() as i64) as usize];
    let started = world.boot_time + 30;
    let up = (now_s - started).max(0);
    format!(
        "\nkubelet statusz\n{WARNING}\n\nStarted{d}{}\nUp{d}{} hr {:02} min {:02} sec\nGo version{d}go1.26.8\nBinary version{d}1.37.1\nEmulation version{d}1.37\nPaths{d}/configz /debug /flagz /healthz /metrics\n",
        unix_date(started),
        up / 3600,
        (up / 60) % 60,
        up % 60,
    )
}

/// Go's `time.UnixDate` in UTC: `Sat Nov 21 23:42:17 UTC 2026`.
fn unix_date(unix_secs: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let iso = rfc3339(unix_secs);
    let (year, month, day) = (&iso[0..4], &iso[5..7], &iso[8..10]);
    let month = MONTHS[month.parse::<usize>().unwrap_or(1).clamp(1, 12) - 1];
    let day: u32 = day.parse().unwrap_or(1);
    let weekday = DAYS[unix_secs.div_euclid(86_400).rem_euclid(7) as usize];
    format!("{weekday} {month} {day:>2} {} UTC {year}", &iso[11..19])
}

/// `/flagz` as kubelet 1.37 writes it: `name value`, sorted.
pub fn flagz(world: &World) -> String {
    let flags = [
        ("address", "0.0.0.0".to_string()),
        ("anonymous-auth", "false".into()),
        ("authentication-token-webhook", "true".into()),
        ("authorization-mode", "Webhook".into()),
        ("cgroup-driver", "cgroupfs".into()),
        ("client-ca-file", "/etc/kubernetes/pki/ca.crt".into()),
        ("config", "/var/lib/kubelet/config.yaml".into()),
        (
            "container-runtime-endpoint",
            "unix:///run/containerd/containerd.sock".into(),
        ),
        ("hostname-override", world.node_name.clone()),
        ("kubeconfig", "/etc/kubernetes/kubelet.conf".into()),
        ("node-ip", world.node_ip.clone()),
        ("v", "2".into()),
    ];
    let mut s = format!("\nkubelet flagz\n{WARNING}\n");
    for (name, value) in flags {
        s.push_str(&format!("{name} {value}\n"));
    }
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_date_like_go() {
        assert_eq!(unix_date(1_795_304_537), "Sat Nov 21 23:42:17 UTC 2026");
        assert_eq!(unix_date(0), "Thu Jan  1 00:00:00 UTC 1970");
    }
}
