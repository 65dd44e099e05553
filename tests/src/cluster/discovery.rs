//! Which cluster the tests run against.
//!
//! 0. `NODEGATE_SKIP_CLUSTER=1` (`cargo xtask test --no-cluster`): skip, as asked (each test's
//!    skip is recorded and counted, see [`crate::skip`]).
//! 1. `NODEGATE_CLUSTER_DIR` set (by `cargo xtask test` or `eval "$(cargo xtask cluster env)"`):
//!    the local cluster in that state dir, admin kubeconfig and kubectl from there.
//! 2. Else `KUBECONFIG` set: that cluster (a real one, e.g. a CI cluster), kubectl from PATH.
//! 3. Else: start the local cluster with `cargo xtask cluster up` (cached build; a no-op when it
//!    already runs); without Go to build it (outside CI), an error saying how to get a cluster.
//!
//! A cluster that is configured but missing (no kubeconfig at the path) is an error, and so is
//! one that does not answer (the test's first API call fails): never a skip.

use super::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Where the cluster is: the admin kubeconfig, and the local state dir when it is ours.
#[derive(Clone, Debug)]
pub struct Location {
    pub kubeconfig: PathBuf,
    pub state_dir: Option<PathBuf>,
}

/// `Ok(None)` means: skip, as the run asked (`NODEGATE_SKIP_CLUSTER=1`).
pub fn locate() -> Result<Option<Location>> {
    static FOUND: OnceLock<Result<Option<Location>, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| locate_uncached().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::NoCluster)
}

fn locate_uncached() -> Result<Option<Location>> {
    if crate::skip::Class::Cluster.may_skip(|key| std::env::var(key).ok()) {
        return Ok(None);
    }
    if let Some(dir) = env_path("NODEGATE_CLUSTER_DIR") {
        let location = local(dir);
        return existing(location, "NODEGATE_CLUSTER_DIR").map(Some);
    }
    if let Some(kubeconfig) = env_path("KUBECONFIG") {
        // Like kubectl, a list of files; the first one is taken here.
        let first = kubeconfig
            .to_string_lossy()
            .split(':')
            .next()
            .map(PathBuf::from);
        let kubeconfig = first.unwrap_or(kubeconfig);
        let location = Location {
            kubeconfig,
            state_dir: None,
        };
        return existing(location, "KUBECONFIG").map(Some);
    }
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    if !in_ci && Command::new("go").arg("version").output().is_err() {
        return Err(Error::NoCluster(format!(
            "NODEGATE_CLUSTER_DIR and KUBECONFIG are unset and there is no Go to build the local \
             cluster. {HOW}"
        )));
    }
    start_local().map(Some)
}

/// How to get a cluster, or skip the tests that need one.
const HOW: &str = "Run `cargo xtask test`, or `cargo xtask cluster up` and \
                   `eval \"$(cargo xtask cluster env)\"`, or point KUBECONFIG at a cluster; or set \
                   NODEGATE_SKIP_CLUSTER=1 (`cargo xtask test --no-cluster`) to skip the cluster tests.";

/// `location` if its kubeconfig exists; else an error naming the variable that pointed there.
fn existing(location: Location, from: &str) -> Result<Location> {
    if location.kubeconfig.is_file() {
        return Ok(location);
    }
    Err(Error::NoCluster(format!(
        "{from} points at {}, which does not exist (is the cluster up?). {HOW}",
        location.kubeconfig.display()
    )))
}

fn local(dir: PathBuf) -> Location {
    Location {
        kubeconfig: dir.join("admin.kubeconfig"),
        state_dir: Some(dir),
    }
}

/// Runs `cargo xtask cluster up`, then reads the state dir from `cargo xtask cluster env`.
fn start_local() -> Result<Location> {
    eprintln!("starting the local cluster with `cargo xtask cluster up` …");
    xtask(&["cluster", "up"])?;
    let env = xtask(&["cluster", "env"])?;
    let dir = env
        .lines()
        .find_map(|l| l.strip_prefix("export NODEGATE_CLUSTER_DIR="))
        .map(|v| PathBuf::from(v.trim_matches('\'')))
        .ok_or_else(|| {
            Error::Unexpected(format!(
                "`cargo xtask cluster env` printed no state dir:\n{env}"
            ))
        })?;
    Ok(local(dir))
}

fn xtask(args: &[&str]) -> Result<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // A target dir of its own: the outer `cargo test` may hold the workspace's build lock.
    let out = Command::new(cargo)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", root.join("target/xtask-from-tests"))
        .args(["xtask"])
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("cargo xtask {}", args.join(" ")),
            detail: format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}
