//! The simulated node: its pods and containers, made once from a seed.
//!
//! Every payload (pods, stats, cAdvisor, probes, …) is generated from this one model, so the
//! endpoints agree with each other the way a real kubelet's do: the pod a test sees in `/pods`
//! is the one that has series in `/metrics/cadvisor` and a `podRef` in `/stats/summary`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Deterministic pseudo-random numbers (SplitMix64): the same options give the same node, so
/// benchmarks compare like with like and failures reproduce.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    pub fn hex(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len + 16);
        while s.len() < len {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(len);
        s
    }

    /// A lower-case alphanumeric suffix like the ones ReplicaSets and Pods get.
    pub fn suffix(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize] as char)
            .collect()
    }

    pub fn uuid(&mut self) -> String {
        let h = self.hex(32);
        format!(
            "{}-{}-4{}-a{}-{}",
            &h[0..8],
            &h[8..12],
            &h[13..16],
            &h[17..20],
            &h[20..32]
        )
    }
}

/// The QoS class of a pod, which decides its cgroup path (`/kubepods/<qos>/pod<uid>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimContainer {
    pub name: String,
    pub image: String,
    /// The runtime's 64-hex container id.
    pub id: String,
    pub restart_count: u32,
}

#[derive(Clone, Debug)]
pub struct SimPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The workload (Deployment) name the pod belongs to.
    pub app: String,
    pub qos: Qos,
    pub containers: Vec<SimContainer>,
    /// The pause container's id.
    pub sandbox_id: String,
    pub ip: String,
    /// Unix seconds.
    pub start_time: i64,
}

impl SimPod {
    /// The pod's cgroup, as cAdvisor names it in the `id` label.
    pub fn cgroup(&self) -> String {
        match self.qos {
            Qos::Guaranteed => format!("/kubepods/pod{}", self.uid),
            Qos::Burstable => format!("/kubepods/burstable/pod{}", self.uid),
            Qos::BestEffort => format!("/kubepods/besteffort/pod{}", self.uid),
        }
    }
}

/// The node and everything running on it.
#[derive(Clone, Debug)]
pub struct World {
    pub node_name: String,
    pub node_ip: String,
    pub pods: Vec<SimPod>,
    /// Unix seconds the node booted and the kubelet started.
    pub boot_time: i64,
    /// Unix milliseconds of the samples' timestamps ("now" when the world was made).
    pub now_ms: i64,
    pub boot_id: String,
    pub machine_id: String,
}

const APPS: &[(&str, &str)] = &[
    ("web", "registry.example.com/shop/web:2.14.1"),
    ("api", "registry.example.com/shop/api:1.9.0"),
    ("worker", "registry.example.com/batch/worker:0.33.2"),
    ("cache", "docker.io/library/redis:7.4"),
    ("db", "docker.io/library/postgres:17.2"),
    ("ingest", "registry.example.com/data/ingest:5.0.3"),
    ("exporter", "quay.io/prometheus/node-exporter:v1.9.1"),
    ("gateway", "docker.io/library/nginx:1.27"),
];

const SIDECARS: &[(&str, &str)] = &[
    ("istio-proxy", "docker.io/istio/proxyv2:1.25.0"),
    ("log-shipper", "cr.fluentbit.io/fluent/fluent-bit:3.2"),
    (
        "config-reloader",
        "quay.io/prometheus-operator/prometheus-config-reloader:v0.80.0",
    ),
];

impl World {
    /// `pods` pods spread round-robin over `namespaces`, each with `containers_per_pod` app
    /// containers (the first is the app, the others sidecars).
    pub fn generate(
        node_name: &str,
        namespaces: &[String],
        pods: usize,
        containers_per_pod: usize,
        seed: u64,
    ) -> World {
        let mut rng = Rng::new(seed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(1_750_000_000_000);
        let boot_time = now / 1000 - 86_400 - rng.below(86_400) as i64;
        let default_ns = ["default".to_string()];
        let namespaces = if namespaces.is_empty() {
            &default_ns[..]
        } else {
            namespaces
        };
        let containers_per_pod = containers_per_pod.max(1);
        let mut list = Vec::with_capacity(pods);
        for i in 0..pods {
            let namespace = namespaces[i % namespaces.len()].clone();
            let (app_base, image) = APPS[(i / namespaces.len()) % APPS.len()];
            let app = format!("{app_base}-{}", i / (namespaces.len() * APPS.len()));
            let name = format!("{app}-{}-{}", rng.suffix(10), rng.suffix(5));
            let qos = match rng.below(3) {
                0 => Qos::Guaranteed,
                1 => Qos::Burstable,
                _ => Qos::BestEffort,
            };
            let containers = (0..containers_per_pod)
                .map(|c| {
                    let (cname, cimage) = if c == 0 {
                        (app_base.to_string(), image)
                    } else {
                        let (s, img) = SIDECARS[(c - 1) % SIDECARS.len()];
                        let n = if c > SIDECARS.len() {
                            format!("{s}-{}", (c - 1) / SIDECARS.len())
                        } else {
                            s.to_string()
                        };
                        (n, img)
                    };
                    SimContainer {
                        name: cname,
                        image: cimage.to_string(),
                        id: rng.hex(64),
                        restart_count: (rng.below(10) / 8) as u32,
                    }
                })
                .collect();
            list.push(SimPod {
                namespace,
                name,
                uid: rng.uuid(),
                app,
                qos,
                containers,
                sandbox_id: rng.hex(64),
                ip: format!("10.244.{}.{}", 1 + i / 250, 2 + i % 250),
                start_time: boot_time + 60 + rng.below(80_000) as i64,
            });
        }
        World {
            node_name: node_name.to_string(),
            node_ip: "10.0.0.11".to_string(),
            pods: list,
            boot_time,
            now_ms: now,
            boot_id: rng.uuid(),
            machine_id: rng.hex(32),
        }
    }

    /// The distinct namespaces that have pods, in first-seen order.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for p in &self.pods {
            if !seen.contains(&p.namespace.as_str()) {
                seen.push(&p.namespace);
            }
        }
        seen
    }
}

/// RFC 3339 in UTC with second precision, as Kubernetes writes times.
pub fn rfc3339(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_782_468_875), "2026-06-26T10:14:35Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn pods_spread_over_namespaces_deterministically() {
        let ns = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let w1 = World::generate("n", &ns, 30, 2, 7);
        let w2 = World::generate("n", &ns, 30, 2, 7);
        assert_eq!(w1.pods.len(), 30);
        assert_eq!(w1.namespaces(), vec!["a", "b", "c"]);
        assert!(w1.pods.iter().all(|p| p.containers.len() == 2));
        let names1: Vec<_> = w1.pods.iter().map(|p| &p.name).collect();
        let names2: Vec<_> = w2.pods.iter().map(|p| &p.name).collect();
        assert_eq!(names1, names2);
        let mut unique = names1.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 30, "pod names are unique");
    }
}
