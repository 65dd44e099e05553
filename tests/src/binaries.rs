//! The workspace's own binaries, for tests that run them as processes (to kill them with
//! SIGKILL, or to measure them apart from the test).
//!
//! Cargo builds a package's binaries for its own integration tests only, so the operator's and
//! the agent's are built by `cargo xtask test` before the tests run (`cargo build --bins`). A
//! test run by hand needs the same: `cargo build -p nodegate-operator -p nodegate-agent`.

use std::path::PathBuf;

/// Why a binary cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path} is missing: run `cargo build -p {package}` first ({source})")]
pub struct Missing {
    pub path: PathBuf,
    pub package: &'static str,
    source: std::io::Error,
}

/// The path of binary `name` of package `package`, in the target directory (and profile) of
/// the running test: `target/<profile>/deps/<test>-<hash>` → `target/<profile>/<name>`.
pub fn path(package: &'static str, name: &str) -> Result<PathBuf, Missing> {
    let exe = std::env::current_exe().map_err(|source| Missing {
        path: PathBuf::from(name),
        package,
        source,
    })?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = dir.join(name);
    match std::fs::metadata(&path) {
        Ok(_) => Ok(path),
        Err(source) => Err(Missing {
            path,
            package,
            source,
        }),
    }
}
