//! Self-cleaning test objects: namespaces (with their pods) and fake nodes.
//!
//! Cleanup runs in `Drop`, so it also happens when a test fails. Drop cannot await, and the
//! test's runtime may be shutting down, so the delete runs on a short-lived runtime of its own
//! in a helper thread, with a fresh client.

use super::error::{Error, Result};
use super::{BUSYBOX_IMAGE, NODE_NAME, TEST_LABEL, unique_name};
use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, NodeAddress, NodeStatus, Pod, PodSpec,
};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Config};
use std::collections::BTreeMap;
use std::time::Duration;

/// A namespace owned by one test; deleted (with everything in it) on drop.
pub struct TestNamespace {
    name: String,
    client: Client,
    config: Config,
}

impl TestNamespace {
    pub(super) async fn create(client: Client, config: Config, prefix: &str) -> Result<Self> {
        let name = unique_name(prefix);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(TEST_LABEL.to_string(), name.clone())])),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(Self {
            name,
            client,
            config,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Creates `pod` here and waits until it runs.
    pub async fn run_pod(&self, pod: &Pod, timeout: Duration) -> Result<Pod> {
        let pods: Api<Pod> = self.api();
        let created = pods.create(&PostParams::default(), pod).await?;
        let name = created.metadata.name.unwrap_or_default();
        wait_pod_running(&pods, &name, timeout).await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let (name, config) = (self.name.clone(), self.config.clone());
        in_helper_runtime(async move {
            let client = Client::try_from(config)?;
            match Api::<Namespace>::all(client)
                .delete(&name, &DeleteParams::default())
                .await
            {
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                other => other.map(|_| ()),
            }
        });
    }
}

/// Polls until the pod's phase is Running (fails fast on Failed/Succeeded).
pub async fn wait_pod_running(pods: &Api<Pod>, name: &str, timeout: Duration) -> Result<Pod> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pod = pods.get(name).await?;
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        match phase.as_str() {
            "Running" => return Ok(pod),
            "Failed" | "Succeeded" => {
                return Err(Error::Unexpected(format!(
                    "pod {name} ended ({phase}): {:?}",
                    pod.status
                )));
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("pod {name} to run (last status: {:?})", pod.status),
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A pod on the local real node running `command` in the busybox image (imported, never
/// pulled).
pub fn busybox_pod(name: &str, command: &[&str]) -> Pod {
    busybox_pod_on(name, NODE_NAME, command)
}

/// [`busybox_pod`] on the real node `node` (node-1 or node-2).
pub fn busybox_pod_on(name: &str, node: &str, command: &[&str]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            termination_grace_period_seconds: Some(0),
            containers: vec![Container {
                name: "main".into(),
                image: Some(BUSYBOX_IMAGE.into()),
                image_pull_policy: Some("Never".into()),
                command: Some(command.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// Node objects without a kubelet behind them; deleted on drop.
pub struct FakeNodes {
    names: Vec<String>,
    run: String,
    config: Config,
}

impl FakeNodes {
    pub(super) async fn create(
        client: Client,
        config: Config,
        prefix: &str,
        count: usize,
        labels: &[(&str, &str)],
    ) -> Result<Self> {
        let run = unique_name(prefix);
        let api: Api<Node> = Api::all(client);
        let mut guard = Self {
            names: Vec::with_capacity(count),
            run: run.clone(),
            config,
        };
        for i in 0..count {
            let name = format!("{run}-{i}");
            let mut node_labels: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            node_labels.insert(TEST_LABEL.into(), run.clone());
            node_labels.insert("kubernetes.io/hostname".into(), name.clone());
            let status = NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: fake_ip(i),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: name.clone(),
                    },
                ]),
                ..Default::default()
            };
            let node = Node {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(node_labels),
                    ..Default::default()
                },
                spec: None,
                status: Some(status.clone()),
            };
            api.create(&PostParams::default(), &node).await?;
            guard.names.push(name.clone());
            let patch = serde_json::json!({ "status": status });
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Ok(guard)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Label selector matching exactly these nodes.
    pub fn selector(&self) -> String {
        format!("{TEST_LABEL}={}", self.run)
    }
}

impl Drop for FakeNodes {
    fn drop(&mut self) {
        let (selector, config) = (self.selector(), self.config.clone());
        in_helper_runtime(async move {
            let client = Client::try_from(config)?;
            let lp = ListParams::default().labels(&selector);
            Api::<Node>::all(client)
                .delete_collection(&DeleteParams::default(), &lp)
                .await
                .map(|_| ())
        });
    }
}

/// TEST-NET-2 addresses: never routed, so nothing is ever reached by accident.
fn fake_ip(i: usize) -> String {
    format!("198.51.{}.{}", 100 + (i / 250) % 100, 1 + i % 250)
}

fn in_helper_runtime(work: impl std::future::Future<Output = kube::Result<()>> + Send + 'static) {
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(work).map_err(std::io::Error::other)
    })
    .join();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("warning: test cleanup failed: {e}"),
        Err(_) => eprintln!("warning: test cleanup panicked"),
    }
}
