//! The operator's own memory against its container's limit: exported as metrics, and a warning
//! in the log when it comes near the limit, before the kernel kills it (an OOM kill leaves no
//! line of its own in the operator's log).
//!
//! Read from the container's cgroup (v2 `memory.current`/`memory.peak`/`memory.max`, v1
//! `memory.usage_in_bytes`/`memory.max_usage_in_bytes`/`memory.limit_in_bytes`), which is what
//! the kernel compares with the limit; outside a limited cgroup the process's VmRSS/VmHWM.

use super::Metrics;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Usage above this fraction of the limit is logged as a warning.
pub const WARN_FRACTION: f64 = 0.8;

/// One reading, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub current: u64,
    /// The highest usage since the container (or process) started, when known.
    pub peak: Option<u64>,
    /// The cgroup's limit; None when unlimited.
    pub limit: Option<u64>,
}

impl Reading {
    /// Whether usage is at or above `fraction` of the limit.
    pub fn near_limit(&self, fraction: f64) -> bool {
        self.limit
            .is_some_and(|limit| self.current as f64 >= limit as f64 * fraction)
    }
}

/// Reads the container's memory from `/sys/fs/cgroup`, else the process's from `/proc`.
pub fn read() -> Option<Reading> {
    cgroup(Path::new("/sys/fs/cgroup")).or_else(process)
}

fn number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// v2 (`memory.current` at the root of the container's cgroup namespace), else v1 (the
/// memory controller's directory, which the runtime mounts as the container's own cgroup).
/// A v1 limit near `u64::MAX` (rounded to pages) means none.
fn cgroup(root: &Path) -> Option<Reading> {
    if let Some(current) = number(&root.join("memory.current")) {
        let limit = std::fs::read_to_string(root.join("memory.max"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        return Some(Reading {
            current,
            peak: number(&root.join("memory.peak")),
            limit,
        });
    }
    let v1 = root.join("memory");
    let current = number(&v1.join("memory.usage_in_bytes"))?;
    let limit = number(&v1.join("memory.limit_in_bytes")).filter(|l| *l < (1 << 62));
    Some(Reading {
        current,
        peak: number(&v1.join("memory.max_usage_in_bytes")),
        limit,
    })
}

fn process() -> Option<Reading> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some(Reading {
        current: field("VmRSS:")?,
        peak: field("VmHWM:"),
        limit: None,
    })
}

/// Every `period`: updates the memory metrics, and warns (once per crossing, then once a
/// minute while it stays there) when usage is near the limit.
pub async fn watch(metrics: Metrics, period: Duration, stop: CancellationToken) {
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        if let Some(reading) = read() {
            metrics.memory(&reading);
            if reading.near_limit(WARN_FRACTION) {
                let due = warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                if due {
                    warned_at = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        current_bytes = reading.current,
                        limit_bytes = reading.limit.unwrap_or_default(),
                        peak_bytes = reading.peak.unwrap_or_default(),
                        "memory near the container's limit: the kernel kills the operator at \
                         the limit; raise operator.resources.limits.memory (docs/operations.md \
                         has a table by cluster size)"
                    );
                }
            } else {
                warned_at = None;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "nodegate-mem-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_cgroup_v2() {
        let d = dir();
        std::fs::write(d.join("memory.current"), "1000\n").unwrap();
        std::fs::write(d.join("memory.peak"), "1500\n").unwrap();
        std::fs::write(d.join("memory.max"), "2000\n").unwrap();
        let r = cgroup(&d).unwrap();
        assert_eq!(
            r,
            Reading {
                current: 1000,
                peak: Some(1500),
                limit: Some(2000)
            }
        );
        std::fs::write(d.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup(&d).unwrap().limit, None);
    }

    #[test]
    fn reads_cgroup_v1() {
        let d = dir();
        let m = d.join("memory");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("memory.usage_in_bytes"), "100\n").unwrap();
        std::fs::write(m.join("memory.max_usage_in_bytes"), "150\n").unwrap();
        std::fs::write(m.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        let r = cgroup(&d).unwrap();
        assert_eq!(
            r,
            Reading {
                current: 100,
                peak: Some(150),
                limit: None
            }
        );
        std::fs::write(m.join("memory.limit_in_bytes"), "268435456\n").unwrap();
        assert_eq!(cgroup(&d).unwrap().limit, Some(268435456));
    }

    #[test]
    fn near_limit_needs_a_limit() {
        let r = |current, limit| Reading {
            current,
            peak: None,
            limit,
        };
        assert!(r(80, Some(100)).near_limit(0.8));
        assert!(!r(79, Some(100)).near_limit(0.8));
        assert!(!r(u64::MAX, None).near_limit(0.8));
    }

    #[test]
    fn reads_this_process() {
        let r = read().unwrap();
        assert!(r.current > 0);
    }
}
