//! The kubelet's other Prometheus endpoints: `/metrics` (its own, node-level), and the
//! namespaced `/metrics/resource` and `/metrics/probes`, and `/metrics/slis`.

use super::super::prom::{family, sample};
use super::super::world::{Rng, World};

const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    label_sets: &[Vec<(&str, &str)>],
    rng: &mut Rng,
) {
    family(out, name, help, "histogram");
    for labels in label_sets {
        let total = 100 + rng.below(100_000);
        let mut cumulative = 0u64;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += (total - cumulative) / (BUCKETS.len() - i + 1) as u64;
            let le = super::super::prom::go_float(*le);
            let mut l = labels.clone();
            l.push(("le", &le));
            sample(out, &format!("{name}_bucket"), &l, cumulative as f64, None);
        }
        let mut l = labels.clone();
        l.push(("le", "+Inf"));
        sample(out, &format!("{name}_bucket"), &l, total as f64, None);
        let sum = (total as f64 * 0.02 * (0.5 + rng.next_f64()) * 1e6).round() / 1e6;
        sample(out, &format!("{name}_sum"), labels, sum, None);
        sample(out, &format!("{name}_count"), labels, total as f64, None);
    }
}

/// `/metrics`: the kubelet's own metrics. Node-level only: no `namespace` labels (real kubelets
/// have a few namespaced families here, which is why the endpoint is node-wide in nodegate).
/// `scale` repeats the per-operation families over more operation types.
pub fn kubelet(world: &World, scale: usize) -> String {
    let mut rng = Rng::new(0x6b75_6265);
    let mut out = String::with_capacity(64 * 1024 * scale.max(1));
    let gauges: &[(&str, &str, f64)] = &[
        (
            "go_goroutines",
            "Number of goroutines that currently exist.",
            412.0,
        ),
        (
            "go_memstats_alloc_bytes",
            "Number of bytes allocated in heap and currently in use. Equals to /memory/classes/heap/objects:bytes.",
            4.1234567e7,
        ),
        (
            "go_memstats_heap_inuse_bytes",
            "Number of heap bytes that are in use. Equals to /memory/classes/heap/objects:bytes + /memory/classes/heap/unused:bytes",
            5.2e7,
        ),
        ("go_threads", "Number of OS threads created.", 24.0),
    ];
    for (name, help, v) in gauges {
        family(&mut out, name, help, "gauge");
        sample(&mut out, name, &[], *v, None);
    }
    let version = "v1.37.0";
    family(
        &mut out,
        "kubelet_node_name",
        "[ALPHA] The node's name. The count is always 1.",
        "gauge",
    );
    sample(
        &mut out,
        "kubelet_node_name",
        &[("node", &world.node_name)],
        1.0,
        None,
    );
    family(
        &mut out,
        "kubelet_running_pods",
        "[ALPHA] Number of pods that have a running pod sandbox",
        "gauge",
    );
    sample(
        &mut out,
        "kubelet_running_pods",
        &[],
        world.pods.len() as f64,
        None,
    );
    family(
        &mut out,
        "kubelet_running_containers",
        "[ALPHA] Number of containers currently running",
        "gauge",
    );
    let containers: usize = world.pods.iter().map(|p| p.containers.len()).sum();
    for (state, n) in [
        ("created", 0),
        ("exited", world.pods.len() / 10),
        ("running", containers),
        ("unknown", 0),
    ] {
        sample(
            &mut out,
            "kubelet_running_containers",
            &[("container_state", state)],
            n as f64,
            None,
        );
    }
    family(
        &mut out,
        "kubelet_http_requests_total",
        "[ALPHA] Number of the http requests received since the server started",
        "counter",
    );
    for path in [
        "healthz",
        "metrics",
        "metrics/cadvisor",
        "metrics/probes",
        "metrics/resource",
        "pods",
        "stats",
    ] {
        sample(
            &mut out,
            "kubelet_http_requests_total",
            &[
                ("long_running", "false"),
                ("method", "GET"),
                ("path", path),
                ("server_type", "readwrite"),
            ],
            (rng.below(100_000) + 1000) as f64,
            None,
        );
    }
    let operations: Vec<String> = [
        "container_status",
        "create_container",
        "exec_sync",
        "image_status",
        "list_containers",
        "list_images",
        "list_podsandbox",
        "podsandbox_status",
        "remove_container",
        "start_container",
        "status",
        "stop_container",
        "version",
    ]
    .iter()
    .flat_map(|op| {
        (0..scale.max(1)).map(move |i| {
            if i == 0 {
                op.to_string()
            } else {
                format!("{op}_{i}")
            }
        })
    })
    .collect();
    let op_labels: Vec<Vec<(&str, &str)>> = operations
        .iter()
        .map(|op| vec![("operation_type", op.as_str())])
        .collect();
    histogram(
        &mut out,
        "kubelet_runtime_operations_duration_seconds",
        "[ALPHA] Duration in seconds of runtime operations. Broken down by operation type.",
        &op_labels,
        &mut rng,
    );
    family(
        &mut out,
        "kubelet_runtime_operations_total",
        "[ALPHA] Cumulative number of runtime operations by operation type.",
        "counter",
    );
    for labels in &op_labels {
        sample(
            &mut out,
            "kubelet_runtime_operations_total",
            labels,
            rng.below(1_000_000) as f64,
            None,
        );
    }
    histogram(
        &mut out,
        "kubelet_pleg_relist_duration_seconds",
        "[ALPHA] Duration in seconds for relisting pods in PLEG.",
        &[vec![]],
        &mut rng,
    );
    family(
        &mut out,
        "kubernetes_build_info",
        "[BETA] A metric with a constant '1' value labeled by major, minor, git version, git commit, git tree state, build date, Go version, and compiler from which Kubernetes was built, and platform on which it is running.",
        "gauge",
    );
    sample(
        &mut out,
        "kubernetes_build_info",
        &[
            ("build_date", "2026-08-20T00:00:00Z"),
            ("compiler", "gc"),
            ("git_commit", "0000000000000000000000000000000000000000"),
            ("git_tree_state", "clean"),
            ("git_version", version),
            ("go_version", "go1.25.0"),
            ("major", "1"),
            ("minor", "37"),
            ("platform", "linux/amd64"),
        ],
        1.0,
        None,
    );
    family(
        &mut out,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        "gauge",
    );
    sample(
        &mut out,
        "process_start_time_seconds",
        &[],
        world.boot_time as f64 + 30.0,
        None,
    );
    family(
        &mut out,
        "rest_client_requests_total",
        "[ALPHA] Number of HTTP requests, partitioned by status code, method, and host.",
        "counter",
    );
    for (code, method) in [
        ("200", "GET"),
        ("200", "PATCH"),
        ("201", "POST"),
        ("404", "GET"),
    ] {
        sample(
            &mut out,
            "rest_client_requests_total",
            &[
                ("code", code),
                ("host", "10.0.0.1:6443"),
                ("method", method),
            ],
            rng.below(50_000) as f64,
            None,
        );
    }
    out
}

/// `/metrics/resource`: the metrics-server feed (container, pod and node usage).
pub fn resource(world: &World) -> String {
    let mut rng = Rng::new(0x7265_736f);
    let mut out = String::new();
    let ts = world.now_ms - 2000;
    let per_container: &[(&str, &str, &str, f64)] = &[
        (
            "container_cpu_usage_seconds_total",
            "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
            "counter",
            500.0,
        ),
        (
            "container_memory_working_set_bytes",
            "[STABLE] Current working set of the container in bytes",
            "gauge",
            2e8,
        ),
        (
            "container_start_time_seconds",
            "[STABLE] Start time of the container since unix epoch in seconds",
            "gauge",
            0.0,
        ),
    ];
    for (name, help, kind, magnitude) in per_container {
        family(&mut out, name, help, kind);
        for pod in &world.pods {
            for c in &pod.containers {
                let v = if *magnitude == 0.0 {
                    (pod.start_time + 3) as f64
                } else {
                    (magnitude * rng.next_f64() * 1e6).round() / 1e6
                };
                sample(
                    &mut out,
                    name,
                    &[
                        ("container", &c.name),
                        ("namespace", &pod.namespace),
                        ("pod", &pod.name),
                    ],
                    v,
                    Some(ts),
                );
            }
        }
    }
    let node: &[(&str, &str, &str, f64)] = &[
        (
            "node_cpu_usage_seconds_total",
            "[STABLE] Cumulative cpu time consumed by the node in core-seconds",
            "counter",
            35_735.491,
        ),
        (
            "node_memory_working_set_bytes",
            "[STABLE] Current working set of the node in bytes",
            "gauge",
            1_616_273_408.0,
        ),
        (
            "node_swap_usage_bytes",
            "[ALPHA] Current swap usage of the node in bytes. Reported only on non-windows systems",
            "gauge",
            0.0,
        ),
    ];
    for (name, help, kind, v) in node {
        family(&mut out, name, help, kind);
        sample(&mut out, name, &[], *v, Some(ts));
    }
    let per_pod: &[(&str, &str, &str, f64)] = &[
        (
            "pod_cpu_usage_seconds_total",
            "[STABLE] Cumulative cpu time consumed by the pod in core-seconds",
            "counter",
            600.0,
        ),
        (
            "pod_memory_working_set_bytes",
            "[STABLE] Current working set of the pod in bytes",
            "gauge",
            3e8,
        ),
        (
            "pod_swap_usage_bytes",
            "[ALPHA] Current amount of the pod swap usage in bytes. Reported only on non-windows systems",
            "gauge",
            0.0,
        ),
    ];
    for (name, help, kind, magnitude) in per_pod {
        family(&mut out, name, help, kind);
        for pod in &world.pods {
            sample(
                &mut out,
                name,
                &[("namespace", &pod.namespace), ("pod", &pod.name)],
                (magnitude * rng.next_f64()).round(),
                Some(ts),
            );
        }
    }
    family(
        &mut out,
        "resource_scrape_error",
        "[STABLE] 1 if there was an error while getting container metrics, 0 otherwise",
        "gauge",
    );
    sample(&mut out, "resource_scrape_error", &[], 0.0, None);
    out
}

/// `/metrics/probes`: probe results per container, plus the node-level process start time.
pub fn probes(world: &World) -> String {
    let mut rng = Rng::new(0x7072_6f62);
    let mut out = String::new();
    family(
        &mut out,
        "process_start_time_seconds",
        "[ALPHA] Start time of the process since unix epoch in seconds.",
        "gauge",
    );
    sample(
        &mut out,
        "process_start_time_seconds",
        &[],
        world.boot_time as f64 + 30.0,
        None,
    );
    family(
        &mut out,
        "prober_probe_total",
        "[BETA] Cumulative number of a liveness, readiness or startup probe for a container by result.",
        "counter",
    );
    for pod in &world.pods {
        for c in &pod.containers {
            for (probe, result) in [
                ("Liveness", "successful"),
                ("Readiness", "successful"),
                ("Readiness", "failed"),
            ] {
                sample(
                    &mut out,
                    "prober_probe_total",
                    &[
                        ("container", &c.name),
                        ("namespace", &pod.namespace),
                        ("pod", &pod.name),
                        ("pod_uid", &pod.uid),
                        ("probe_type", probe),
                        ("result", result),
                    ],
                    if result == "failed" {
                        rng.below(5) as f64
                    } else {
                        (1000 + rng.below(2_000_000)) as f64
                    },
                    None,
                );
            }
        }
    }
    out
}

/// `/metrics/slis`: the kubelet's health check indicators and its process start time (no
/// namespaces; a kubelet 1.37 that has not served health checks yet has only the start time).
pub fn slis(world: &World) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "process_start_time_seconds",
        "[ALPHA] Start time of the process since unix epoch in seconds.",
        "gauge",
    );
    sample(
        &mut out,
        "process_start_time_seconds",
        &[],
        world.boot_time as f64 + 30.0,
        None,
    );
    let checks = ["log", "ping", "syncloop"];
    family(
        &mut out,
        "kubernetes_healthcheck",
        "[STABLE] This metric records the result of a single healthcheck.",
        "gauge",
    );
    for c in checks {
        sample(
            &mut out,
            "kubernetes_healthcheck",
            &[("name", c), ("type", "healthz")],
            1.0,
            None,
        );
    }
    family(
        &mut out,
        "kubernetes_healthchecks_total",
        "[STABLE] This metric records the results of all healthcheck.",
        "counter",
    );
    for c in checks {
        sample(
            &mut out,
            "kubernetes_healthchecks_total",
            &[("name", c), ("status", "success"), ("type", "healthz")],
            8640.0,
            None,
        );
    }
    out
}
