//! The cluster the integration tests run against, and test objects that clean up after
//! themselves.
//!
//! Every test makes its own namespace and node names (random suffix), so tests run in parallel
//! and never see each other's objects. Guards delete what they created when dropped, also when
//! the test panics. Clients are made per test: a kube `Client` is tied to the tokio runtime it
//! was made on, and every `#[tokio::test]` has its own runtime.

mod discovery;
mod error;
mod identity;
mod objects;
mod outage;

pub use discovery::Location;
pub use error::{Error, Result};
pub use identity::UserCredentials;
pub use objects::{FakeNodes, TestNamespace, busybox_pod, busybox_pod_on};
pub use outage::FlakyProxy;

use crate::skip;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// Name of the first real node of `cargo xtask cluster` (kubelet 1.37, on the host).
pub const NODE_NAME: &str = "node-1";
/// Name of the second real node (kubelet 1.35, its own network namespace).
pub const NODE2_NAME: &str = "node-2";
/// The real nodes of `cargo xtask cluster`, for tests run against each kubelet.
pub const REAL_NODES: [&str; 2] = [NODE_NAME, NODE2_NAME];
/// The test image imported into the local node's containerd.
pub const BUSYBOX_IMAGE: &str = "nodegate.local/busybox:1";
/// Label put on every object the harness creates, valued with the creating test's run id.
pub const TEST_LABEL: &str = "nodegate.io/test-run";

/// A handle on the test cluster: cheap to clone, makes clients on demand.
#[derive(Clone, Debug)]
pub struct Cluster {
    location: Location,
    admin_config: Config,
}

impl Cluster {
    /// The test cluster, or `None` only when the run asked to skip cluster tests
    /// (`NODEGATE_SKIP_CLUSTER=1`); the skip is then recorded for the running test (see
    /// [`crate::skip`]), so call this from the test body. No cluster otherwise is an error that
    /// says how to get one.
    pub async fn get() -> Result<Option<Self>> {
        let Some(location) = tokio::task::spawn_blocking(discovery::locate)
            .await
            .map_err(|e| Error::Unexpected(format!("cluster discovery panicked: {e}")))??
        else {
            skip::record(
                skip::Class::Cluster,
                "NODEGATE_SKIP_CLUSTER=1: the cluster tests are skipped",
            );
            return Ok(None);
        };
        let kubeconfig =
            Kubeconfig::read_from(&location.kubeconfig).map_err(|source| Error::Kubeconfig {
                path: location.kubeconfig.clone(),
                source,
            })?;
        let admin_config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: location.kubeconfig.clone(),
                    source,
                })?;
        Ok(Some(Self {
            location,
            admin_config,
        }))
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The state dir of the local cluster of `cargo xtask cluster` (its PKI, its kubelet's
    /// certificates), for tests that need more than API access. `Ok(None)` only when the run asked
    /// to skip such tests (the skip is recorded); against another cluster (`KUBECONFIG`) it is
    /// an error otherwise.
    pub fn local_state_dir(&self) -> Result<Option<PathBuf>> {
        if let Some(dir) = &self.location.state_dir {
            return Ok(Some(dir.clone()));
        }
        skip::skip_or_error(
            skip::Class::LocalCluster,
            &format!(
                "this test needs the local cluster of `cargo xtask cluster` (its PKI), not the \
                 KUBECONFIG cluster {}",
                self.location.kubeconfig.display()
            ),
            "run `cargo xtask test`, or `cargo xtask cluster up` and \
             `eval \"$(cargo xtask cluster env)\"`",
        )
        .map_err(Error::Missing)?;
        Ok(None)
    }

    /// The admin's connection settings (system:masters on the local cluster).
    pub fn admin_config(&self) -> &Config {
        &self.admin_config
    }

    pub fn admin(&self) -> Result<Client> {
        Client::try_from(self.admin_config.clone()).map_err(Error::Client)
    }

    /// A client authenticated as user `name` in `groups` by a client certificate from the
    /// cluster's client CA.
    pub async fn user(&self, name: &str, groups: &[&str]) -> Result<Client> {
        let auth = identity::user_auth(&self.admin()?, name, groups).await?;
        identity::client_with(&self.admin_config, auth)
    }

    /// The key and certificate of user `name` in `groups`, for clients other than kube (curl
    /// straight to a kubelet, which trusts the same client CA).
    pub async fn user_credentials(&self, name: &str, groups: &[&str]) -> Result<UserCredentials> {
        identity::user_credentials(&self.admin()?, name, groups).await
    }

    /// A client that presents bearer `token` (an identity made elsewhere, e.g. a pod-bound
    /// token).
    pub fn with_token(&self, token: &str) -> Result<Client> {
        let mut config = self.admin_config.clone();
        config.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))
            .map_err(|e| Error::Unexpected(format!("a kubeconfig user with a token: {e}")))?;
        Client::try_from(config).map_err(Error::Client)
    }

    /// A client authenticated as service account `namespace/name` by a TokenRequest token.
    pub async fn service_account(&self, namespace: &str, name: &str) -> Result<Client> {
        let auth = identity::service_account_auth(&self.admin()?, namespace, name).await?;
        identity::client_with(&self.admin_config, auth)
    }

    /// A fresh namespace `<prefix>-<random>`, deleted when the guard drops.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        TestNamespace::create(self.admin()?, self.admin_config.clone(), prefix).await
    }

    /// `count` Node objects without a kubelet (for scale tests), labelled with `labels` and
    /// [`TEST_LABEL`], deleted when the guard drops.
    pub async fn fake_nodes(
        &self,
        prefix: &str,
        count: usize,
        labels: &[(&str, &str)],
    ) -> Result<FakeNodes> {
        FakeNodes::create(
            self.admin()?,
            self.admin_config.clone(),
            prefix,
            count,
            labels,
        )
        .await
    }

    /// kubectl as admin: the one built with the local cluster when there is one (its version
    /// matches the server), else `kubectl` from PATH.
    pub fn kubectl(&self) -> Command {
        let program = self
            .location
            .state_dir
            .as_ref()
            .map(|d| d.join("kubectl"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("kubectl"));
        let mut cmd = Command::new(program);
        cmd.arg("--kubeconfig").arg(&self.location.kubeconfig);
        cmd
    }

    /// Installs nodegate's generated CRDs (server-side apply, so a newer copy wins) and waits
    /// until they are served; once per test process.
    pub async fn install_crds(&self) -> Result<()> {
        static INSTALLED: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);
        let mut installed = INSTALLED.lock().await;
        if *installed {
            return Ok(());
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let policies = root.join("crds/nodeapipolicies.yaml");
        let configs = root.join("crds/nodeagentconfigs.yaml");
        let rule_sets = root.join("crds/nodeagentrulesets.yaml");
        let (policies, configs, rule_sets) = (
            policies.to_string_lossy().into_owned(),
            configs.to_string_lossy().into_owned(),
            rule_sets.to_string_lossy().into_owned(),
        );
        self.run_kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &policies,
            "-f",
            &configs,
            "-f",
            &rule_sets,
        ])
        .await?;
        self.run_kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/nodeapipolicies.nodegate.io",
            "crd/nodeagentconfigs.nodegate.io",
            "crd/nodeagentrulesets.nodegate.io",
        ])
        .await?;
        *installed = true;
        Ok(())
    }

    /// Runs kubectl with `args`; stdout on success, an error with stderr otherwise.
    pub async fn run_kubectl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::from(self.kubectl());
        let out = cmd.args(args).output().await?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("kubectl {}", args.join(" ")),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// `<prefix>-<10 hex digits>`: unique across parallel tests and test processes.
pub fn unique_name(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    format!("{prefix}-{:010x}", hasher.finish() & 0xff_ffff_ffff)
}
