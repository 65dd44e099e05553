//! Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl and
//! etcd from the Go module proxy through the wrapper module in `xtask/k8s`, once per version; and
//! node-2's older kubelet and kube-proxy through `xtask/k8s-v1.35`, cached beside them.
//!
//! The flags are upstream's release flags (static, trimmed paths, `selinux,notest` tags, version
//! stamped with `-X`), so `/version` reports a real semver and the Go build cache is reused by
//! every later build with the same flags. Only the binaries missing from `bin/` are built, so a
//! binary added to the list later (kube-proxy was) costs a few minutes on a machine whose cache
//! has the others, not a cold build. The output goes to a temporary dir and each binary is moved
//! into `bin/` only once the whole build succeeded, so a killed build is never mistaken for a
//! finished one.

use super::layout::{K8S_NODE2_VERSION, K8S_VERSION, Layout};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Binary names in `bin/`, with the Go package each comes from.
pub const BINARIES: [(&str, &str); 7] = [
    ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    (
        "kube-controller-manager",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
    ("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
    ("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
    ("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
    ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
    // `go build -o dir/` names this one `server` (the path minus its major-version suffix);
    // renamed below.
    ("etcd", "go.etcd.io/etcd/server/v3"),
];

/// node-2's binaries (Kubernetes 1.35): the node components only.
pub const NODE2_BINARIES: [(&str, &str); 2] = [
    ("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
    ("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
];

/// Oldest Go that builds Kubernetes 1.37 (its go.mod says `go 1.26.0`).
const MIN_GO_MINOR: u32 = 26;

/// One Kubernetes release built from its wrapper module into its own cache dir.
struct Release<'a> {
    version: &'static str,
    /// The wrapper module, relative to the workspace root.
    wrapper: &'static str,
    cache: &'a Path,
    binaries: &'static [(&'static str, &'static str)],
    /// What a cold build of all of them costs here, for the message before it starts.
    cold: &'static str,
}

fn main_release(layout: &Layout) -> Release<'_> {
    Release {
        version: K8S_VERSION,
        wrapper: "xtask/k8s",
        cache: &layout.cache,
        binaries: &BINARIES,
        cold: "a cold build takes 12 to 17 minutes on 2 cores, module download included",
    }
}

fn node2_release(layout: &Layout) -> Release<'_> {
    Release {
        version: K8S_NODE2_VERSION,
        wrapper: "xtask/k8s-v1.35",
        cache: &layout.node2_cache,
        binaries: &NODE2_BINARIES,
        cold: "a cold build took 15 minutes on 2 cores shared with other builds, module download included",
    }
}

pub fn is_built(layout: &Layout) -> bool {
    missing(&main_release(layout)).is_empty()
}

pub fn is_node2_built(layout: &Layout) -> bool {
    missing(&node2_release(layout)).is_empty()
}

/// The binaries not in `bin/` yet, with their packages.
fn missing(release: &Release<'_>) -> Vec<(&'static str, &'static str)> {
    release
        .binaries
        .iter()
        .copied()
        .filter(|(name, _)| !release.cache.join("bin").join(name).is_file())
        .collect()
}

/// Builds the binaries the cache does not have yet (all of them the first time).
pub fn ensure_built(layout: &Layout) -> Result<()> {
    build_release(&main_release(layout))
}

/// Builds node-2's kubelet and kube-proxy (Kubernetes 1.35) unless cached.
pub fn ensure_node2_built(layout: &Layout) -> Result<()> {
    build_release(&node2_release(layout))
}

fn build_release(release: &Release<'_>) -> Result<()> {
    let version = release.version;
    let missing = missing(release);
    if missing.is_empty() {
        return Ok(());
    }
    check_go()?;
    let wrapper = crate::workspace_root().join(release.wrapper);
    let cache = release.cache;
    let tmp = cache.join("bin.partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let log_path = cache.join("build.log");

    let names: Vec<&str> = missing.iter().map(|(name, _)| *name).collect();
    if missing.len() == release.binaries.len() {
        println!(
            "building {} (Kubernetes {version}) from the Go module proxy (once; cached in {})",
            names.join(", "),
            cache.display()
        );
        println!("  {}; full log: {}", release.cold, log_path.display());
    } else {
        println!(
            "building {} (Kubernetes {version}; the other binaries are cached in {})",
            names.join(", "),
            cache.display()
        );
        println!(
            "  one more binary takes 1 to 5 minutes with a warm Go build cache; full log: {}",
            log_path.display()
        );
    }
    let started = Instant::now();
    let packages: Vec<&str> = missing.iter().map(|(_, pkg)| *pkg).collect();
    go_build(&wrapper, version, &tmp, &packages, &log_path)?;
    if names.contains(&"etcd") {
        let etcd = ["server", "v3"]
            .map(|n| tmp.join(n))
            .into_iter()
            .find(|p| p.is_file());
        let etcd = etcd.with_context(|| {
            format!(
                "the etcd build produced no binary; see {}",
                log_path.display()
            )
        })?;
        std::fs::rename(etcd, tmp.join("etcd")).context("cannot rename the etcd binary")?;
    }
    for name in &names {
        if !tmp.join(name).is_file() {
            bail!(
                "the build finished but {name} is missing; see {}",
                log_path.display()
            );
        }
    }
    let bin = cache.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    for name in &names {
        std::fs::rename(tmp.join(name), bin.join(name))
            .with_context(|| format!("cannot move {name} to {}", bin.display()))?;
    }
    std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    println!("built in {}", human(started.elapsed()));
    Ok(())
}

/// Runs `go build -v`, counting the packages it compiles to show progress, and keeps the output
/// in a log so a failure can be read in full.
fn go_build(
    wrapper: &Path,
    version: &str,
    out: &Path,
    packages: &[&str],
    log_path: &Path,
) -> Result<()> {
    let mut cmd = Command::new("go");
    cmd.current_dir(wrapper)
        .env("CGO_ENABLED", "0")
        .args([
            "build",
            "-v",
            "-trimpath",
            "-tags",
            "selinux,notest",
            "-ldflags",
        ])
        .arg(ldflags(version))
        .arg("-o")
        .arg(format!("{}/", out.display()))
        .args(packages);
    run_with_progress(&mut cmd, "go build", log_path)
}

/// Runs a `go build -v` / `go install -v` command (stdout and stderr are set here), counting the
/// packages it compiles to show progress every 15 s, and keeps the output in `log_path` so a
/// failure can be read in full.
pub(crate) fn run_with_progress(cmd: &mut Command, what: &str, log_path: &Path) -> Result<()> {
    let mut log = std::fs::File::create(log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `go`; install Go >= 1.26 (https://go.dev/dl)")?;
    let stderr = child.stderr.take().context("no stderr from go")?;
    let mut packages = 0usize;
    let mut last_report = Instant::now();
    let started = Instant::now();
    for line in BufReader::new(stderr).lines() {
        let line = line.with_context(|| format!("cannot read {what}'s output"))?;
        writeln!(log, "{line}").context("cannot write the build log")?;
        packages += 1;
        if last_report.elapsed() >= Duration::from_secs(15) {
            println!(
                "  [{}] {packages} packages built, now {line}",
                human(started.elapsed())
            );
            last_report = Instant::now();
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("{what} did not finish"))?;
    if !status.success() {
        bail!("{what} failed ({status}); see {}", log_path.display());
    }
    Ok(())
}

/// Version stamps: without them `/version` says v0.0.0-master and clients warn about skew.
/// Commit and date are fixed (not the build's), so every build of a version is the same.
fn ldflags(version: &str) -> String {
    let minor = version.split('.').nth(1).unwrap_or("0");
    let mut flags = String::from("-s -w");
    for pkg in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (key, value) in [
            ("gitVersion", version),
            ("gitMajor", "1"),
            ("gitMinor", minor),
            ("gitCommit", "0000000000000000000000000000000000000000"),
            ("gitTreeState", "clean"),
            ("buildDate", "1970-01-01T00:00:00Z"),
        ] {
            flags.push_str(&format!(" -X {pkg}.{key}={value}"));
        }
    }
    flags
}

fn check_go() -> Result<()> {
    let out = Command::new("go")
        .arg("env")
        .arg("GOVERSION")
        .output()
        .context(
            "`go` is not on PATH; install Go >= 1.26 (https://go.dev/dl) to build Kubernetes",
        )?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let minor = version
        .strip_prefix("go1.")
        .and_then(|rest| rest.split(['.', 'r', 'b']).next())
        .and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(m) if m >= MIN_GO_MINOR => Ok(()),
        _ => bail!(
            "{version:?} is too old to build Kubernetes {K8S_VERSION}: install Go >= 1.{MIN_GO_MINOR}"
        ),
    }
}

pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
