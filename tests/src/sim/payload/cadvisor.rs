//! `/metrics/cadvisor`: cAdvisor's container series, shaped like kubelet 1.35 captures.
//!
//! Label sets are the modern ones (`container, id, image, name, namespace, pod`, plus a
//! family's own labels such as `cpu`, `interface`, `device`, `state`), every sample carries a
//! millisecond timestamp, and besides the pods' series there are the node-level ones real
//! kubelets serve with `namespace=""` (root and QoS cgroups, system services) and the
//! `machine_*` families that have no `namespace` label at all.

use super::super::prom::{family, sample};
use super::super::world::{Rng, World};

/// Which cgroups a family has series for, and the extra label combinations per series.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Every cgroup (root, QoS, pod, pause and app containers).
    All,
    /// Every cgroup, with `cpu="total"` (only `container_cpu_usage_seconds_total` has it).
    Cpu,
    /// The pod sandbox (pause) and the root, once per network interface.
    Network,
    /// App containers and the root, with `device`.
    Fs,
    /// Root, QoS and pod cgroups, per device and operation.
    Blkio,
    /// Every cgroup, per task state.
    Tasks,
    /// Every cgroup, per failure type and scope.
    MemFailures,
    /// Containers (pause and app), with `ulimit`.
    Ulimit,
    /// App containers of pods with CPU limits.
    CpuLimited,
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind_text: &'static str,
    kind: Kind,
    /// Typical magnitude of a value.
    magnitude: f64,
    integer: bool,
}

const fn f(
    name: &'static str,
    kind_text: &'static str,
    kind: Kind,
    magnitude: f64,
    integer: bool,
    help: &'static str,
) -> Family {
    Family {
        name,
        help,
        kind_text,
        kind,
        magnitude,
        integer,
    }
}

/// cAdvisor's container families, most used first: payload scale 1 serves the first
/// [`CORE_FAMILIES`], higher scales more of the list.
#[rustfmt::skip]
const FAMILIES: &[Family] = &[
    f("container_cpu_usage_seconds_total", "counter", Kind::Cpu, 500.0, false, "Cumulative cpu time consumed in seconds."),
    f("container_memory_working_set_bytes", "gauge", Kind::All, 2e8, true, "Current working set in bytes."),
    f("container_memory_usage_bytes", "gauge", Kind::All, 3e8, true, "Current memory usage in bytes, including all memory regardless of when it was accessed"),
    f("container_network_receive_bytes_total", "counter", Kind::Network, 1e9, true, "Cumulative count of bytes received"),
    f("container_network_transmit_bytes_total", "counter", Kind::Network, 1e8, true, "Cumulative count of bytes transmitted"),
    f("container_start_time_seconds", "gauge", Kind::All, 0.0, false, "Start time of the container since unix epoch in seconds."),
    f("container_memory_rss", "gauge", Kind::All, 1e8, true, "Size of RSS in bytes."),
    f("container_memory_cache", "gauge", Kind::All, 1e8, true, "Number of bytes of page cache memory."),
    f("container_fs_usage_bytes", "gauge", Kind::Fs, 1e7, true, "Number of bytes that are consumed by the container on this filesystem."),
    f("container_fs_limit_bytes", "gauge", Kind::Fs, 1e11, true, "Number of bytes that can be consumed by the container on this filesystem."),
    f("container_spec_memory_limit_bytes", "gauge", Kind::All, 1e9, true, "Memory limit for the container."),
    f("container_spec_cpu_shares", "gauge", Kind::All, 1024.0, true, "CPU share of the container."),
    f("container_cpu_cfs_periods_total", "counter", Kind::CpuLimited, 1e5, true, "Number of elapsed enforcement period intervals."),
    f("container_cpu_cfs_throttled_periods_total", "counter", Kind::CpuLimited, 1e3, true, "Number of throttled period intervals."),
    f("container_cpu_cfs_throttled_seconds_total", "counter", Kind::CpuLimited, 50.0, false, "Total time duration the container has been throttled."),
    f("container_cpu_system_seconds_total", "counter", Kind::All, 100.0, false, "Cumulative system cpu time consumed in seconds."),
    f("container_cpu_user_seconds_total", "counter", Kind::All, 400.0, false, "Cumulative user cpu time consumed in seconds."),
    f("container_cpu_load_average_10s", "gauge", Kind::All, 0.0, true, "Value of container cpu load average over the last 10 seconds."),
    f("container_cpu_load_d_average_10s", "gauge", Kind::All, 0.0, true, "Value of container cpu load.d average over the last 10 seconds."),
    f("container_file_descriptors", "gauge", Kind::All, 200.0, true, "Number of open file descriptors for the container."),
    f("container_last_seen", "gauge", Kind::All, 0.0, false, "Last time a container was seen by the exporter"),
    f("container_memory_failcnt", "counter", Kind::All, 0.0, true, "Number of memory usage hits limits"),
    f("container_memory_failures_total", "counter", Kind::MemFailures, 1e5, true, "Cumulative count of memory allocation failures."),
    f("container_memory_kernel_usage", "gauge", Kind::All, 1e7, true, "Size of kernel memory allocated in bytes."),
    f("container_memory_mapped_file", "gauge", Kind::All, 1e7, true, "Size of memory mapped files in bytes."),
    f("container_memory_max_usage_bytes", "gauge", Kind::All, 4e8, true, "Maximum memory usage recorded in bytes"),
    f("container_memory_swap", "gauge", Kind::All, 0.0, true, "Container swap usage in bytes."),
    f("container_memory_total_active_file_bytes", "gauge", Kind::All, 1e7, true, "Current total active file in bytes."),
    f("container_memory_total_inactive_file_bytes", "gauge", Kind::All, 1e7, true, "Current total inactive file in bytes."),
    f("container_network_receive_errors_total", "counter", Kind::Network, 0.0, true, "Cumulative count of errors encountered while receiving"),
    f("container_network_receive_packets_dropped_total", "counter", Kind::Network, 10.0, true, "Cumulative count of packets dropped while receiving"),
    f("container_network_receive_packets_total", "counter", Kind::Network, 1e6, true, "Cumulative count of packets received"),
    f("container_network_transmit_errors_total", "counter", Kind::Network, 0.0, true, "Cumulative count of errors encountered while transmitting"),
    f("container_network_transmit_packets_dropped_total", "counter", Kind::Network, 10.0, true, "Cumulative count of packets dropped while transmitting"),
    f("container_network_transmit_packets_total", "counter", Kind::Network, 1e6, true, "Cumulative count of packets transmitted"),
    f("container_oom_events_total", "counter", Kind::All, 0.0, true, "Count of out of memory events observed for the container"),
    f("container_pressure_cpu_stalled_seconds_total", "counter", Kind::All, 10.0, false, "Total time duration no tasks in the container could make progress due to CPU congestion."),
    f("container_pressure_cpu_waiting_seconds_total", "counter", Kind::All, 10.0, false, "Total time duration tasks in the container have waited due to CPU congestion."),
    f("container_pressure_io_stalled_seconds_total", "counter", Kind::All, 1.0, false, "Total time duration no tasks in the container could make progress due to IO congestion."),
    f("container_pressure_io_waiting_seconds_total", "counter", Kind::All, 1.0, false, "Total time duration tasks in the container have waited due to IO congestion."),
    f("container_pressure_memory_stalled_seconds_total", "counter", Kind::All, 0.0, false, "Total time duration no tasks in the container could make progress due to memory congestion."),
    f("container_pressure_memory_waiting_seconds_total", "counter", Kind::All, 0.0, false, "Total time duration tasks in the container have waited due to memory congestion."),
    f("container_processes", "gauge", Kind::All, 20.0, true, "Number of processes running inside the container."),
    f("container_sockets", "gauge", Kind::All, 50.0, true, "Number of open sockets for the container."),
    f("container_spec_cpu_period", "gauge", Kind::All, 0.0, true, "CPU period of the container."),
    f("container_spec_cpu_quota", "gauge", Kind::CpuLimited, 2e5, true, "CPU quota of the container."),
    f("container_spec_memory_reservation_limit_bytes", "gauge", Kind::All, 0.0, true, "Memory reservation limit for the container."),
    f("container_spec_memory_swap_limit_bytes", "gauge", Kind::All, 0.0, true, "Memory swap limit for the container."),
    f("container_tasks_state", "gauge", Kind::Tasks, 10.0, true, "Number of tasks in given state"),
    f("container_threads", "gauge", Kind::All, 50.0, true, "Number of threads running inside the container"),
    f("container_threads_max", "gauge", Kind::All, 0.0, true, "Maximum number of threads allowed inside the container, infinity if value is zero"),
    f("container_ulimits_soft", "gauge", Kind::Ulimit, 0.0, true, "Soft ulimit values for the container root process. Unlimited if -1, except priority and nice"),
    f("container_blkio_device_usage_total", "counter", Kind::Blkio, 1e8, true, "Blkio Device bytes usage"),
    f("container_fs_inodes_free", "gauge", Kind::Fs, 5e7, true, "Number of available Inodes"),
    f("container_fs_inodes_total", "gauge", Kind::Fs, 6e7, true, "Number of Inodes"),
    f("container_fs_io_current", "gauge", Kind::Fs, 0.0, true, "Number of I/Os currently in progress"),
    f("container_fs_io_time_seconds_total", "counter", Kind::Fs, 100.0, false, "Cumulative count of seconds spent doing I/Os"),
    f("container_fs_io_time_weighted_seconds_total", "counter", Kind::Fs, 100.0, false, "Cumulative weighted I/O time in seconds"),
    f("container_fs_read_seconds_total", "counter", Kind::Fs, 10.0, false, "Cumulative count of seconds spent reading"),
    f("container_fs_reads_bytes_total", "counter", Kind::Fs, 1e8, true, "Cumulative count of bytes read"),
    f("container_fs_reads_merged_total", "counter", Kind::Fs, 1e3, true, "Cumulative count of reads merged"),
    f("container_fs_reads_total", "counter", Kind::Fs, 1e5, true, "Cumulative count of reads completed"),
    f("container_fs_sector_reads_total", "counter", Kind::Fs, 1e6, true, "Cumulative count of sector reads completed"),
    f("container_fs_sector_writes_total", "counter", Kind::Fs, 1e6, true, "Cumulative count of sector writes completed"),
    f("container_fs_write_seconds_total", "counter", Kind::Fs, 10.0, false, "Cumulative count of seconds spent writing"),
    f("container_fs_writes_bytes_total", "counter", Kind::Fs, 1e8, true, "Cumulative count of bytes written"),
    f("container_fs_writes_merged_total", "counter", Kind::Fs, 1e3, true, "Cumulative count of writes merged"),
    f("container_fs_writes_total", "counter", Kind::Fs, 1e5, true, "Cumulative count of writes completed"),
];

/// Families served at payload scale 1.
pub const CORE_FAMILIES: usize = 6;

/// How many of the families a payload scale serves.
pub fn families_for_scale(scale: usize) -> usize {
    (CORE_FAMILIES * scale.max(1)).min(FAMILIES.len())
}

/// One cgroup cAdvisor reports on.
struct Cgroup<'a> {
    container: &'a str,
    id: String,
    image: &'a str,
    name: &'a str,
    namespace: &'a str,
    pod: &'a str,
    role: Role,
    start_time: i64,
    cpu_limited: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Root,
    /// QoS classes and system services: node-level, not the root.
    NodeLevel,
    Pod,
    Pause,
    App,
}

const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.1";
const NODE_LEVEL: &[&str] = &[
    "/kubepods",
    "/kubepods/besteffort",
    "/kubepods/burstable",
    "/system.slice",
    "/system.slice/containerd.service",
    "/system.slice/kubelet.service",
];

fn cgroups(world: &World) -> Vec<Cgroup<'_>> {
    let mut out = vec![Cgroup {
        container: "",
        id: "/".into(),
        image: "",
        name: "",
        namespace: "",
        pod: "",
        role: Role::Root,
        start_time: world.boot_time,
        cpu_limited: false,
    }];
    for id in NODE_LEVEL {
        out.push(Cgroup {
            container: "",
            id: (*id).into(),
            image: "",
            name: "",
            namespace: "",
            pod: "",
            role: Role::NodeLevel,
            start_time: world.boot_time + 5,
            cpu_limited: false,
        });
    }
    for pod in &world.pods {
        let cgroup = pod.cgroup();
        let limited = pod.qos == super::super::world::Qos::Guaranteed;
        out.push(Cgroup {
            container: "",
            id: cgroup.clone(),
            image: "",
            name: "",
            namespace: &pod.namespace,
            pod: &pod.name,
            role: Role::Pod,
            start_time: pod.start_time,
            cpu_limited: false,
        });
        out.push(Cgroup {
            container: "",
            id: format!("{cgroup}/{}", pod.sandbox_id),
            image: PAUSE_IMAGE,
            name: &pod.sandbox_id,
            namespace: &pod.namespace,
            pod: &pod.name,
            role: Role::Pause,
            start_time: pod.start_time,
            cpu_limited: false,
        });
        for c in &pod.containers {
            out.push(Cgroup {
                container: &c.name,
                id: format!("{cgroup}/{}", c.id),
                image: &c.image,
                name: &c.id,
                namespace: &pod.namespace,
                pod: &pod.name,
                role: Role::App,
                start_time: pod.start_time + 3,
                cpu_limited: limited,
            });
        }
    }
    out
}

/// The extra label combinations a family has for a cgroup (empty: no series).
fn variants(kind: Kind, cg: &Cgroup<'_>) -> Vec<Vec<(&'static str, &'static str)>> {
    let node = matches!(cg.role, Role::Root);
    match kind {
        Kind::All => vec![vec![]],
        Kind::Cpu => vec![vec![("cpu", "total")]],
        Kind::Network => match cg.role {
            Role::Root => ["eth0", "tunl0", "gre0"]
                .iter()
                .map(|i| vec![("interface", *i)])
                .collect(),
            Role::Pause => vec![vec![("interface", "eth0")]],
            _ => vec![],
        },
        Kind::Fs => {
            if node || cg.role == Role::App {
                vec![vec![("device", "/dev/vda1")]]
            } else {
                vec![]
            }
        }
        Kind::Blkio => {
            if matches!(cg.role, Role::Root | Role::NodeLevel | Role::Pod) {
                ["Read", "Write"]
                    .iter()
                    .map(|op| {
                        vec![
                            ("device", "/dev/vda"),
                            ("major", "254"),
                            ("minor", "0"),
                            ("operation", *op),
                        ]
                    })
                    .collect()
            } else {
                vec![]
            }
        }
        Kind::Tasks => [
            "iowaiting",
            "running",
            "sleeping",
            "stopped",
            "uninterruptible",
        ]
        .iter()
        .map(|s| vec![("state", *s)])
        .collect(),
        Kind::MemFailures => {
            let mut v = Vec::new();
            for t in ["pgfault", "pgmajfault"] {
                for s in ["container", "hierarchy"] {
                    v.push(vec![("failure_type", t), ("scope", s)]);
                }
            }
            v
        }
        Kind::Ulimit => {
            if matches!(cg.role, Role::Pause | Role::App) {
                vec![vec![("ulimit", "max_open_files")]]
            } else {
                vec![]
            }
        }
        Kind::CpuLimited => {
            if cg.cpu_limited {
                vec![vec![]]
            } else {
                vec![]
            }
        }
    }
}

fn value(fam: &Family, cg: &Cgroup<'_>, now_s: i64, rng: &mut Rng) -> f64 {
    match fam.name {
        "container_start_time_seconds" => cg.start_time as f64,
        "container_last_seen" => now_s as f64,
        "container_spec_cpu_period" => 100_000.0,
        "container_ulimits_soft" => 1_048_576.0,
        _ => {
            let scale = match cg.role {
                Role::Root => 20.0,
                Role::NodeLevel => 5.0,
                Role::Pod | Role::App => 1.0,
                Role::Pause => 0.01,
            };
            let v = fam.magnitude * scale * (0.05 + rng.next_f64());
            if fam.integer {
                v.round()
            } else {
                (v * 1e6).round() / 1e6
            }
        }
    }
}

/// The whole `/metrics/cadvisor` body for `world` at payload scale `scale`.
pub fn generate(world: &World, scale: usize) -> String {
    let groups = cgroups(world);
    let count = families_for_scale(scale);
    let mut families: Vec<&Family> = FAMILIES[..count].iter().collect();
    families.sort_by_key(|f| f.name);
    let now_s = world.now_ms / 1000;
    let mut rng = Rng::new(0xCAD0_1507);
    let mut out = String::with_capacity(groups.len() * count * 300 + 4096);

    family(
        &mut out,
        "cadvisor_version_info",
        "A metric with a constant '1' value labeled by kernel version, OS version, docker version, cadvisor version & cadvisor revision.",
        "gauge",
    );
    sample(
        &mut out,
        "cadvisor_version_info",
        &[
            ("cadvisorRevision", ""),
            ("cadvisorVersion", ""),
            ("dockerVersion", ""),
            ("kernelVersion", "6.12.0-sim"),
            ("osVersion", "Debian GNU/Linux 13 (trixie)"),
        ],
        1.0,
        None,
    );
    let mut scrape_error_written = false;
    for fam in families {
        if !scrape_error_written && fam.name > "container_scrape_error" {
            write_scrape_error(&mut out);
            scrape_error_written = true;
        }
        family(&mut out, fam.name, fam.help, fam.kind_text);
        for (i, cg) in groups.iter().enumerate() {
            for extra in variants(fam.kind, cg) {
                let mut labels: Vec<(&str, &str)> = vec![
                    ("container", cg.container),
                    ("id", &cg.id),
                    ("image", cg.image),
                    ("name", cg.name),
                    ("namespace", cg.namespace),
                    ("pod", cg.pod),
                ];
                labels.extend(extra);
                let v = value(fam, cg, now_s, &mut rng);
                let ts = world.now_ms - 1000 - (i as i64 * 37) % 9000;
                sample(&mut out, fam.name, &labels, v, Some(ts));
            }
        }
    }
    if !scrape_error_written {
        write_scrape_error(&mut out);
    }
    machine(&mut out, world);
    out
}

fn write_scrape_error(out: &mut String) {
    family(
        out,
        "container_scrape_error",
        "1 if there was an error while getting container metrics, 0 otherwise",
        "gauge",
    );
    sample(out, "container_scrape_error", &[], 0.0, None);
}

/// The `machine_*` families: node-level, labelled by machine identity, no `namespace`.
fn machine(out: &mut String, world: &World) {
    let id: [(&str, &str); 3] = [
        ("boot_id", &world.boot_id),
        ("machine_id", &world.machine_id),
        ("system_uuid", &world.machine_id),
    ];
    let simple: &[(&str, &str, f64)] = &[
        ("machine_cpu_cores", "Number of logical CPU cores.", 8.0),
        (
            "machine_cpu_physical_cores",
            "Number of physical CPU cores.",
            4.0,
        ),
        ("machine_cpu_sockets", "Number of CPU sockets.", 1.0),
        (
            "machine_memory_bytes",
            "Amount of memory installed on the machine.",
            33_554_432_000.0,
        ),
        (
            "machine_nvm_avg_power_budget_watts",
            "NVM power budget.",
            0.0,
        ),
    ];
    for (name, help, v) in simple {
        family(out, name, help, "gauge");
        sample(out, name, &id, *v, None);
    }
    family(
        out,
        "machine_nvm_capacity",
        "NVM capacity value labeled by NVM mode (memory mode or app direct mode).",
        "gauge",
    );
    for mode in ["app_direct_mode", "memory_mode"] {
        let mut labels = id.to_vec();
        labels.push(("mode", mode));
        sample(out, "machine_nvm_capacity", &labels, 0.0, None);
    }
    family(
        out,
        "machine_scrape_error",
        "1 if there was an error while getting machine metrics, 0 otherwise.",
        "gauge",
    );
    sample(out, "machine_scrape_error", &[], 0.0, None);
    family(
        out,
        "machine_swap_bytes",
        "Amount of swap memory available on the machine.",
        "gauge",
    );
    sample(out, "machine_swap_bytes", &id, 0.0, None);
}
