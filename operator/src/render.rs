//! `nodegate-operator render`: every object the operator would write for some policies,
//! computed offline, as YAML.
//!
//! GitOps users review a policy's effect in a pull request with it: the same compiler as the
//! controller, the same CEL rules as the API server (client-side), nodes and namespaces from
//! files (`kubectl get nodes -o yaml`) or read from a cluster. Nothing is written anywhere.

use crate::compiler::{self, Desired, NamespaceInfo, NodeInfo};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, ListParams};
use nodegate_crds::NodeApiPolicy;
use nodegate_crds::validation::{Invalid, validate_policy};
use serde::Deserialize as _;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Print every object the operator would write for the given policies, without a cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct RenderArgs {
    /// NodeApiPolicy YAML (one or more documents, or a `kind: List`); `-` reads standard
    /// input. Repeat for several files.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Nodes to compile against, as `kubectl get nodes -o yaml` prints them. Without it (and
    /// without --kubeconfig) no node is known: no NodeAgentConfig is rendered and node
    /// selectors match nothing.
    #[arg(long)]
    pub nodes: Option<PathBuf>,
    /// Namespaces to compile against (`kubectl get namespaces -o yaml`): namespace selectors
    /// resolve, and RoleBindings are rendered only in namespaces that exist.
    #[arg(long)]
    pub namespaces: Option<PathBuf>,
    /// Read nodes and namespaces from this cluster (files given with --nodes/--namespaces
    /// take precedence). Only get/list is used.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Also print each policy's outcome (matched nodes, namespaces, problems) as a leading
    /// YAML comment block.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub outcomes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: document {index}: not YAML: {source}")]
    Yaml {
        path: String,
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("{path}: document {index} ({name}): {source}")]
    Policy {
        path: String,
        index: usize,
        name: String,
        source: Invalid,
    },
    #[error("{path}: document {index}: expected kind {expected}, found {found}")]
    Kind {
        path: String,
        index: usize,
        expected: &'static str,
        found: String,
    },
    #[error("reading the cluster: {0}")]
    Cluster(#[from] kube::Error),
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("serializing the output: {0}")]
    Output(String),
}

/// Renders the objects, as a YAML stream.
pub async fn render(args: RenderArgs) -> Result<String, Error> {
    let mut policies = Vec::new();
    for path in &args.files {
        policies.extend(read_policies(path)?);
    }
    let client = match &args.kubeconfig {
        Some(path) => Some(client(path).await?),
        None => None,
    };
    let nodes = match (&args.nodes, &client) {
        (Some(path), _) => read_objects::<Node>(path, "Node")?
            .into_iter()
            .map(node_info)
            .collect(),
        (None, Some(client)) => Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(node_info)
            .collect(),
        (None, None) => vec![],
    };
    let namespaces = match (&args.namespaces, &client) {
        (Some(path), _) => read_objects::<Namespace>(path, "Namespace")?
            .into_iter()
            .map(namespace_info)
            .collect(),
        (None, Some(client)) => Api::<Namespace>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(namespace_info)
            .collect(),
        // Offline with no namespace list: the namespaces policies name are taken to exist, so
        // their RoleBindings show; selectors match none.
        (None, None) => named_namespaces(&policies),
    };
    let desired = compiler::compile(&policies, &nodes, &namespaces);
    let mut out = String::new();
    if args.outcomes {
        out.push_str(&outcome_comments(&desired, nodes.len(), namespaces.len()));
        if args.namespaces.is_none() && client.is_none() {
            out.push_str(
                "# no --namespaces or --kubeconfig: namespaces named in policies are assumed to \
                 exist; namespace selectors match none\n",
            );
        }
        if args.nodes.is_none() && client.is_none() {
            out.push_str(
                "# no --nodes or --kubeconfig: no node is known, so no NodeAgentConfig is \
                 rendered and node selectors match none\n",
            );
        }
    }
    out.push_str(&to_yaml(&desired)?);
    Ok(out)
}

/// Policies from one file, each checked by the CRD's own rules.
pub fn read_policies(path: &Path) -> Result<Vec<NodeApiPolicy>, Error> {
    let display = path.display().to_string();
    documents(path)?
        .into_iter()
        .enumerate()
        .map(|(index, doc)| {
            let name = doc
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("(unnamed)")
                .to_string();
            validate_policy(&doc).map_err(|source| Error::Policy {
                path: display.clone(),
                index: index + 1,
                name,
                source,
            })
        })
        .collect()
}

fn read_objects<K: serde::de::DeserializeOwned>(
    path: &Path,
    expected: &'static str,
) -> Result<Vec<K>, Error> {
    let display = path.display().to_string();
    documents(path)?
        .into_iter()
        .enumerate()
        .map(|(index, doc)| {
            let found = doc.get("kind").and_then(Value::as_str).unwrap_or("(none)");
            if found != expected {
                return Err(Error::Kind {
                    path: display.clone(),
                    index: index + 1,
                    expected,
                    found: found.to_string(),
                });
            }
            serde_json::from_value(doc).map_err(|e| Error::Kind {
                path: display.clone(),
                index: index + 1,
                expected,
                found: format!("an invalid {expected}: {e}"),
            })
        })
        .collect()
}

/// The non-empty YAML documents of a file (or stdin), with `kind: List` items flattened.
fn documents(path: &Path) -> Result<Vec<Value>, Error> {
    let display = path.display().to_string();
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    }
    .map_err(|source| Error::Read {
        path: display.clone(),
        source,
    })?;
    let mut docs = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = Value::deserialize(doc).map_err(|source| Error::Yaml {
            path: display.clone(),
            index: index + 1,
            source,
        })?;
        match value {
            Value::Null => {}
            Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                if let Some(Value::Array(items)) = map.get("items") {
                    docs.extend(items.iter().cloned());
                }
            }
            other => docs.push(other),
        }
    }
    Ok(docs)
}

fn named_namespaces(policies: &[NodeApiPolicy]) -> Vec<NamespaceInfo> {
    let names: std::collections::BTreeSet<&String> = policies
        .iter()
        .flat_map(|p| p.spec.namespaces.names.iter().flatten())
        .collect();
    names
        .into_iter()
        .map(|name| NamespaceInfo {
            name: name.clone(),
            labels: Default::default(),
        })
        .collect()
}

fn node_info(node: Node) -> NodeInfo {
    NodeInfo {
        name: node.metadata.name.unwrap_or_default(),
        uid: node.metadata.uid.unwrap_or_default(),
        labels: node.metadata.labels.unwrap_or_default(),
    }
}

fn namespace_info(namespace: Namespace) -> NamespaceInfo {
    NamespaceInfo {
        name: namespace.metadata.name.unwrap_or_default(),
        labels: namespace.metadata.labels.unwrap_or_default(),
    }
}

async fn client(path: &Path) -> Result<kube::Client, Error> {
    let fail = |message: String| Error::Kubeconfig {
        path: path.display().to_string(),
        message,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| fail(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| fail(e.to_string()))
}

/// Each policy's outcome as YAML comments, so a reviewer sees what a selector matched and
/// what could not be honoured next to the objects.
fn outcome_comments(desired: &Desired, nodes: usize, namespaces: usize) -> String {
    let mut out = format!(
        "# nodegate-operator render: {} policies against {nodes} nodes and {namespaces} namespaces\n",
        desired.outcomes.len()
    );
    for o in &desired.outcomes {
        let scope = if o.namespaces.all {
            "all namespaces".to_string()
        } else {
            format!("namespaces [{}]", o.namespaces.names.join(", "))
        };
        let nodes = if o.all_nodes {
            format!("every node ({} now)", o.nodes.len())
        } else {
            format!("nodes [{}]", o.nodes.join(", "))
        };
        out.push_str(&format!("# policy {}: {nodes}; {scope}\n", o.policy));
        for problem in &o.problems {
            out.push_str(&format!("#   problem: {problem}\n"));
        }
    }
    out
}

/// The objects as a YAML stream, in apply order (ServiceAccounts and roles before bindings).
/// Owner references without a uid (policies read from files have none) are left out: the API
/// server would refuse them, and the controller sets them from the live objects.
pub fn to_yaml(desired: &Desired) -> Result<String, Error> {
    let mut docs: Vec<Value> = Vec::new();
    let mut push = |object: &dyn erased::Serialize| -> Result<(), Error> {
        let mut value = object.to_value().map_err(Error::Output)?;
        if let Some(Value::Array(owners)) = value.pointer_mut("/metadata/ownerReferences") {
            owners.retain(|o| {
                o.get("uid")
                    .and_then(Value::as_str)
                    .is_some_and(|u| !u.is_empty())
            });
            if owners.is_empty()
                && let Some(Value::Object(meta)) = value.get_mut("metadata")
            {
                meta.remove("ownerReferences");
            }
        }
        docs.push(value);
        Ok(())
    };
    for o in &desired.service_accounts {
        push(o)?;
    }
    for o in &desired.cluster_roles {
        push(o)?;
    }
    for o in &desired.cluster_role_bindings {
        push(o)?;
    }
    for o in &desired.role_bindings {
        push(o)?;
    }
    for o in &desired.node_agent_configs {
        push(o)?;
    }
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&doc).map_err(|e| Error::Output(e.to_string()))?);
    }
    Ok(out)
}

/// Object-safe serialization to a JSON value, so one loop handles every kind.
mod erased {
    pub trait Serialize {
        fn to_value(&self) -> Result<serde_json::Value, String>;
    }
    impl<T: serde::Serialize> Serialize for T {
        fn to_value(&self) -> Result<serde_json::Value, String> {
            serde_json::to_value(self).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn samples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples")
    }

    fn args(file: &str) -> RenderArgs {
        RenderArgs {
            files: vec![samples().join(file)],
            nodes: None,
            namespaces: None,
            kubeconfig: None,
            outcomes: true,
        }
    }

    #[tokio::test]
    async fn monitoring_sample_renders_no_core_rule_and_a_team_a_binding() {
        let dir = std::env::temp_dir().join(format!("nodegate-render-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let namespaces = dir.join("namespaces.yaml");
        std::fs::write(
            &namespaces,
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: team-a}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: team-b}}\n",
        )
        .unwrap();
        let nodes = dir.join("nodes.yaml");
        std::fs::write(
            &nodes,
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-1, uid: u1}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-2, uid: u2}\n",
        )
        .unwrap();
        let mut a = args("monitoring-team-a.yaml");
        a.nodes = Some(nodes);
        a.namespaces = Some(namespaces);
        let out = render(a).await.unwrap();
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&out)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        let kinds: Vec<(&str, &str)> = docs
            .iter()
            .map(|d| {
                (
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["name"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("ServiceAccount", "mymonitoring"),
                ("ClusterRole", "nodegate:team-a-monitoring"),
                ("RoleBinding", "nodegate:team-a-monitoring"),
                ("NodeAgentConfig", "node-1"),
                ("NodeAgentConfig", "node-2"),
            ]
        );
        assert_eq!(docs[2]["metadata"]["namespace"], "team-a");
        assert!(!out.contains("nodes/"), "no core nodes/* rule:\n{out}");
        // Policies from files have no uid: no owner reference the API server would refuse;
        // nodes from files do, so NodeAgentConfigs keep theirs.
        assert!(docs[1]["metadata"].get("ownerReferences").is_none());
        assert_eq!(docs[3]["metadata"]["ownerReferences"][0]["uid"], "u1");
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn offline_the_named_namespaces_get_their_bindings() {
        let out = render(args("monitoring-team-a.yaml")).await.unwrap();
        assert!(out.contains("kind: RoleBinding\n"), "{out}");
        assert!(out.contains("namespace: team-a\n"), "{out}");
        assert!(out.contains("assumed to exist"), "{out}");
        assert!(!out.contains("nodes/"), "{out}");
    }

    #[tokio::test]
    async fn invalid_policies_are_refused_with_the_crd_message() {
        let err = render(args("invalid/direct-access-needs-all.yaml"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("directKubeletAccess grants core nodes/*"),
            "{err}"
        );
        assert!(err.contains("invalid-direct-access-needs-all"), "{err}");
        let err = read_policies(&samples().join("../crd/nodeagentconfigs.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected apiVersion nodegate.io/v1alpha1"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn every_sample_renders_and_only_read_only_grants_lack_rbac() {
        for entry in std::fs::read_dir(samples()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let out = render(RenderArgs {
                files: vec![path.clone()],
                ..args("x")
            })
            .await
            .unwrap();
            let read_only = path.ends_with("anonymous-read-only.yaml");
            assert_eq!(
                !out.contains("kind: ClusterRole\n"),
                read_only,
                "{}:\n{out}",
                path.display()
            );
            assert!(!out.contains("problem:"), "{}:\n{out}", path.display());
        }
    }
}
