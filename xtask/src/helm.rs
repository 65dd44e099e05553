//! Helm, built from its Go module once per version and cached like the Kubernetes binaries, so
//! the chart tests and the demo never depend on a helm found on PATH (or on GitHub downloads,
//! which CI machines without internet cannot reach; the Go module proxy they can).
//!
//! `helm.sh/helm/v3` has no `replace` directives, so unlike Kubernetes it needs no wrapper
//! module: `go install <pkg>@<version>` builds it with exactly the dependency versions of the
//! release. The flags are the release Makefile's (static, trimmed paths, version stamped with
//! `-X`), so `helm version` says the release and not `v3.21+unreleased`.

use crate::cluster::build::human;
use anyhow::{Context, Result, bail};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The newest approved Helm 3 release the Go module proxy serves (v3.22.0 is served but is not
/// an approved release: shared/LOCAL-CLUSTER.md). Bumping it only changes the cache dir: the
/// next `ensure` builds the new version.
pub const HELM_VERSION: &str = "v3.21.4";

const MODULE: &str = "helm.sh/helm/v3";

#[derive(Parser)]
pub struct Args {
    /// Print the path of the cached helm binary (building it if needed) instead of running it.
    #[arg(long)]
    pub path: bool,
    /// Arguments for helm, after `--`: `cargo xtask helm -- version`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// `cargo xtask helm [--path] -- <helm args>`: runs the cached helm with the caller's
/// environment (point it at the local cluster with `eval "$(cargo xtask cluster env)"`).
pub fn run(args: Args) -> Result<()> {
    let helm = ensure()?;
    if args.path {
        println!("{}", helm.display());
        return Ok(());
    }
    let status = Command::new(&helm)
        .args(&args.args)
        .status()
        .with_context(|| format!("cannot run {}", helm.display()))?;
    if !status.success() {
        // Exit with helm's own code, so scripts can tell its failures apart; helm printed why.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// `~/.cache/nodegate/helm-<version>` (`$XDG_CACHE_HOME` respected, as for Kubernetes).
pub fn cache_dir() -> Result<PathBuf> {
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cache"))
            .context("neither XDG_CACHE_HOME nor HOME is set; cannot place the helm cache")?,
    };
    Ok(cache.join(format!("nodegate/helm-{HELM_VERSION}")))
}

/// The path of the cached helm binary, building it first if the cache does not have it (a cold
/// build takes a few minutes on 2 cores; later calls return at once).
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let helm = dir.join("helm");
    if helm.is_file() {
        return Ok(helm);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log_path = dir.join("build.log");
    println!(
        "building helm {HELM_VERSION} from the Go module proxy (once; cached in {})",
        dir.display()
    );
    println!("  full log: {}", log_path.display());
    let started = Instant::now();
    let go_mod = download(&dir)?;
    // Each process builds into its own dir and renames the finished binary into place, so two
    // concurrent first runs (`cargo xtask test` and a test binary) never see a half-written helm.
    let partial = dir.join(format!("bin.partial-{}", std::process::id()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    go_install(&dir, &partial, &log_path, &ldflags(&go_mod))?;
    let built = partial.join("helm");
    if !built.is_file() {
        bail!(
            "go install finished but {} is missing; see {}",
            built.display(),
            log_path.display()
        );
    }
    std::fs::rename(&built, &helm)
        .with_context(|| format!("cannot move the build to {}", helm.display()))?;
    // Best effort: an empty leftover dir costs nothing.
    let _ = std::fs::remove_dir_all(&partial);
    println!(
        "built helm {HELM_VERSION} in {}: {}",
        human(started.elapsed()),
        helm.display()
    );
    Ok(helm)
}

/// Downloads the module (so the build's progress is compilation only) and returns its go.mod,
/// which says which Kubernetes client libraries the release was built with.
fn download(dir: &Path) -> Result<String> {
    let out = go(dir)
        .args(["mod", "download", "-json"])
        .arg(format!("{MODULE}@{HELM_VERSION}"))
        .output()
        .context("cannot run `go`; install Go (https://go.dev/dl) to build helm")?;
    if !out.status.success() {
        bail!(
            "go mod download {MODULE}@{HELM_VERSION} failed: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("cannot parse the output of go mod download -json")?;
    let go_mod = info["GoMod"]
        .as_str()
        .context("go mod download -json named no go.mod")?;
    std::fs::read_to_string(go_mod).with_context(|| format!("cannot read {go_mod}"))
}

/// A `go` command that builds outside any module or workspace of this repo.
fn go(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(dir)
        .env("GOWORK", "off")
        .env("GO111MODULE", "on")
        .env("CGO_ENABLED", "0");
    cmd
}

/// Runs `go install -v`, reporting progress every 15 s and keeping the full output in a log.
fn go_install(dir: &Path, bin: &Path, log_path: &Path, ldflags: &str) -> Result<()> {
    let mut cmd = go(dir);
    cmd.env("GOBIN", bin)
        .args(["install", "-v", "-trimpath", "-ldflags", ldflags])
        .arg(format!("{MODULE}/cmd/helm@{HELM_VERSION}"));
    crate::cluster::build::run_with_progress(&mut cmd, "go install", log_path)
}

/// The release Makefile's stamps: the version (else `helm version` says `v3.21+unreleased`) and
/// the Kubernetes version `helm template`/`lint` assume without a cluster, taken like the
/// Makefile from the client-go the release requires (v0.N.x is Kubernetes 1.N).
fn ldflags(go_mod: &str) -> String {
    let mut flags = format!(
        "-s -w -X {MODULE}/internal/version.version={HELM_VERSION} \
         -X {MODULE}/internal/version.gitTreeState=clean"
    );
    if let Some(minor) = client_go_minor(go_mod) {
        for pkg in ["pkg/lint/rules", "pkg/chartutil"] {
            flags.push_str(&format!(
                " -X {MODULE}/{pkg}.k8sVersionMajor=1 -X {MODULE}/{pkg}.k8sVersionMinor={minor}"
            ));
        }
    }
    flags
}

/// The minor of `k8s.io/client-go v0.<minor>.<patch>` in a go.mod.
fn client_go_minor(go_mod: &str) -> Option<u32> {
    go_mod.lines().find_map(|line| {
        let version = line.trim().strip_prefix("k8s.io/client-go ")?;
        version
            .trim()
            .strip_prefix("v0.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldflags_stamp_the_release_and_the_kubernetes_version() {
        let go_mod = "module helm.sh/helm/v3\n\nrequire (\n\tk8s.io/api v0.37.0\n\tk8s.io/client-go v0.37.0\n)\n";
        let flags = ldflags(go_mod);
        assert!(flags.contains(&format!(
            "-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"
        )));
        assert!(flags.contains("-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37"));
        assert!(flags.contains("-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"));
        // Without client-go in go.mod the Kubernetes stamps are left at helm's defaults.
        assert!(!ldflags("module x\n").contains("k8sVersion"));
    }

    #[test]
    fn cache_dir_is_per_version() {
        let dir = cache_dir().unwrap();
        assert!(dir.ends_with(format!("nodegate/helm-{HELM_VERSION}")));
    }
}
