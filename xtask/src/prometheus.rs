//! Prometheus 3, built from its Go module once per version and cached like helm, for the test
//! that discovers the cluster's nodes with `kubernetes_sd_configs`: Debian's Prometheus (2.42,
//! `+ds`) is built without the Kubernetes service discovery ("field kubernetes_sd_configs not
//! found in type config.ScrapeConfig"). The other Prometheus tests keep Debian's.
//!
//! `go install <pkg>@<version>` with `-mod=mod` builds the release's own dependency versions
//! (the module has no `replace` that matters to the server). No web UI assets are embedded (they
//! need a Node.js build); the API, service discovery and scraping are all there.

use crate::cluster::build::human;
use anyhow::{Context, Result, bail};
use clap::Parser;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// The Prometheus 3 module release the Go module proxy serves here (Prometheus 3.16.0; the module
/// is versioned v0.3MM.P for Prometheus 3.MM.P).
pub const PROMETHEUS_MODULE_VERSION: &str = "v0.316.0";

const MODULE: &str = "github.com/prometheus/prometheus";

#[derive(Parser)]
pub struct Args {
    /// Print the path of the cached prometheus binary (building it if needed).
    #[arg(long)]
    pub path: bool,
}

pub fn run(args: Args) -> Result<()> {
    let prometheus = ensure()?;
    if args.path {
        println!("{}", prometheus.display());
    } else {
        let status = Command::new(&prometheus)
            .arg("--version")
            .status()
            .with_context(|| format!("cannot run {}", prometheus.display()))?;
        if !status.success() {
            bail!("{} --version failed", prometheus.display());
        }
    }
    Ok(())
}

/// `~/.cache/nodegate/prometheus-<version>` (`$XDG_CACHE_HOME` respected).
pub fn cache_dir() -> Result<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cache"))
            .context("neither XDG_CACHE_HOME nor HOME is set; cannot place the cache")?,
    };
    Ok(cache.join(format!("nodegate/prometheus-{PROMETHEUS_MODULE_VERSION}")))
}

/// The path of the cached prometheus, building it first if the cache does not have it.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let prometheus = dir.join("prometheus");
    if prometheus.is_file() {
        return Ok(prometheus);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join("build.log");
    println!(
        "building prometheus ({MODULE} {PROMETHEUS_MODULE_VERSION}) from the Go module proxy \
         (once; cached in {})",
        dir.display()
    );
    println!("  full log: {}", log_path.display());
    let started = Instant::now();
    // Its own dir per process, renamed into place when done: a concurrent first run never sees
    // a half-written binary.
    let partial = dir.join(format!("bin.partial-{}", std::process::id()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut cmd = Command::new("go");
    cmd.current_dir(&dir)
        .env("GOWORK", "off")
        .env("GO111MODULE", "on")
        .env("GOFLAGS", "-mod=mod")
        .env("CGO_ENABLED", "0")
        .env("GOBIN", &partial)
        // Only the service discovery the tests use (Prometheus' own build tags): the other
        // mechanisms pull in the AWS, Azure, GCE, … SDKs, most of a cold build's time.
        .args([
            "install",
            "-v",
            "-trimpath",
            "-tags",
            "remove_all_sd,enable_kubernetes_sd",
            "-ldflags",
        ])
        .arg(ldflags())
        .arg(format!(
            "{MODULE}/cmd/prometheus@{PROMETHEUS_MODULE_VERSION}"
        ));
    crate::cluster::build::run_with_progress(&mut cmd, "go install", &log_path)?;
    let built = partial.join("prometheus");
    if !built.is_file() {
        bail!(
            "go install finished but {} is missing; see {}",
            built.display(),
            log_path.display()
        );
    }
    std::fs::rename(&built, &prometheus)
        .with_context(|| format!("cannot move the build to {}", prometheus.display()))?;
    let _ = std::fs::remove_dir_all(&partial);
    println!(
        "built prometheus in {}: {}",
        human(started.elapsed()),
        prometheus.display()
    );
    Ok(prometheus)
}

/// Static, stripped, and `--version` names the release (v0.316.0 is Prometheus 3.16.0).
fn ldflags() -> String {
    let release = PROMETHEUS_MODULE_VERSION
        .strip_prefix("v0.3")
        .map(|rest| {
            let (minor, patch) = rest.split_once('.').unwrap_or((rest, "0"));
            format!("3.{}.{patch}", minor.trim_start_matches('0'))
        })
        .unwrap_or_else(|| PROMETHEUS_MODULE_VERSION.to_string());
    format!("-s -w -X github.com/prometheus/common/version.Version={release}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldflags_name_the_prometheus_release() {
        assert!(
            ldflags().ends_with("version.Version=3.16.0"),
            "{}",
            ldflags()
        );
    }

    #[test]
    fn cache_dir_is_per_version() {
        let dir = cache_dir().unwrap();
        assert!(dir.ends_with(format!("nodegate/prometheus-{PROMETHEUS_MODULE_VERSION}")));
    }
}
