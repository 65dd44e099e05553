//! metrics-server, built from its Go module once per version and cached like helm and the
//! Kubernetes binaries (`~/.cache/nodegate/metrics-server-<version>/metrics-server`), for the
//! test that runs it against the agent (`tests/tests/agent_serving_cert.rs`).
//!
//! `sigs.k8s.io/metrics-server` has no `replace` directives, so `go install <pkg>@<version>`
//! builds it with exactly the dependency versions of the release. Measured (2026-12-06): about
//! 16 minutes cold, module download included, on the 2-core dev machine shared with four other
//! builds; 10.3 s with a warm Go build cache (`XDG_CACHE_HOME=<empty dir>
//! GOCACHE=~/.cache/go-build cargo xtask metrics-server`).

use crate::cluster::build::{human, run_with_progress};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

pub const METRICS_SERVER_VERSION: &str = "v0.8.0";
const PACKAGE: &str = "sigs.k8s.io/metrics-server/cmd/metrics-server";

/// `~/.cache/nodegate/metrics-server-<version>` (`$XDG_CACHE_HOME` respected).
pub fn cache_dir() -> Result<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cache"))
            .context("neither XDG_CACHE_HOME nor HOME is set; cannot place the cache")?,
    };
    Ok(cache.join(format!("nodegate/metrics-server-{METRICS_SERVER_VERSION}")))
}

/// The cached binary, built first when the cache does not have it.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let binary = dir.join("metrics-server");
    if binary.is_file() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join("build.log");
    println!(
        "building metrics-server {METRICS_SERVER_VERSION} from the Go module proxy (once; cached in {})",
        dir.display()
    );
    let started = Instant::now();
    // Its own dir per process, renamed into place when finished: a killed or concurrent build
    // never leaves a half-written binary where the tests look.
    let partial = dir.join(format!("bin.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut cmd = Command::new("go");
    cmd.current_dir(&dir)
        .env("GOWORK", "off")
        .env("GO111MODULE", "on")
        .env("CGO_ENABLED", "0")
        .env("GOBIN", &partial)
        .args(["install", "-v", "-trimpath", "-ldflags", "-s -w"])
        .arg(format!("{PACKAGE}@{METRICS_SERVER_VERSION}"));
    run_with_progress(&mut cmd, "go install metrics-server", &log_path)?;
    let built = partial.join("metrics-server");
    if !built.is_file() {
        bail!(
            "go install finished but {} is missing; see {}",
            built.display(),
            log_path.display()
        );
    }
    std::fs::rename(&built, &binary)
        .with_context(|| format!("cannot move the build to {}", binary.display()))?;
    let _ = std::fs::remove_dir_all(&partial);
    println!(
        "built metrics-server {METRICS_SERVER_VERSION} in {}: {}",
        human(started.elapsed()),
        binary.display()
    );
    Ok(binary)
}
