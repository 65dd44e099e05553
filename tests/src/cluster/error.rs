use std::path::PathBuf;

/// What can go wrong while setting up or using the test cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a client: {0}")]
    Client(#[source] kube::Error),
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("timed out after {secs}s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("no test cluster: {0}")]
    NoCluster(String),
    /// The test needs something this run lacks, and the run did not ask to skip it.
    #[error("{0}")]
    Missing(String),
    #[error("unexpected data: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
