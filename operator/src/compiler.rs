//! The policy compiler: (policies, nodes, namespaces) → the objects the cluster should hold.
//!
//! A pure function with no I/O, so every decision about what nodegate grants is unit- and
//! property-tested here, and the controller around it only reads state and applies results.
//! Output is deterministic (sorted, byte-identical for the same input in any order) so the
//! controller can skip writes when nothing changed.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::Subject as RbacSubject;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, RoleBinding, RoleRef,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use nodegate_crds::policy::ServiceAccountRef;
use nodegate_crds::{
    AgentRule, Endpoint, MANAGED_BY, NodeAgentConfig, NodeAgentConfigSpec, NodeApiPolicy,
    POLICY_LABEL, Port, ResolvedNamespaces, Subject, SubjectKind, Subresource, Verb,
};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// What the compiler needs to know of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
}

/// What the compiler needs to know of a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Everything the cluster should hold for a set of policies.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Desired {
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    /// Per-namespace bindings of a policy's ClusterRole, so RBAC answers per namespace.
    pub role_bindings: Vec<RoleBinding>,
    pub service_accounts: Vec<ServiceAccount>,
    /// One per node, policies or not, so every agent knows it is configured.
    pub node_agent_configs: Vec<NodeAgentConfig>,
    /// Per policy, what it resolved to (for its status).
    pub outcomes: Vec<PolicyOutcome>,
}

/// What one policy resolved to.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyOutcome {
    pub policy: String,
    /// Matched node names, sorted.
    pub nodes: Vec<String>,
    /// Whether the policy selects every node (present and future).
    pub all_nodes: bool,
    pub namespaces: ResolvedNamespaces,
    /// Bound subjects, created service accounts included, sorted.
    pub subjects: Vec<Subject>,
    /// Names of the generated RBAC objects; `None` when the policy grants nothing on the secure
    /// port (the read-only port has no authorization to grant).
    pub rbac_name: Option<String>,
    /// Inputs that could not be honoured (an invalid selector matches nothing).
    pub problems: Vec<String>,
}

/// Name of the ClusterRole and ClusterRoleBinding generated for a policy.
pub fn rbac_name(policy: &str) -> String {
    format!("nodegate:{policy}")
}

/// Compiles policies against the cluster's nodes and namespaces.
pub fn compile(
    policies: &[NodeApiPolicy],
    nodes: &[NodeInfo],
    namespaces: &[NamespaceInfo],
) -> Desired {
    let mut policies: Vec<&NodeApiPolicy> = policies
        .iter()
        .filter(|p| p.metadata.name.is_some())
        .collect();
    policies.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    policies.dedup_by(|a, b| a.metadata.name == b.metadata.name);
    let mut nodes: Vec<&NodeInfo> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes.dedup_by(|a, b| a.name == b.name);
    let mut namespaces: Vec<&NamespaceInfo> = namespaces.iter().collect();
    namespaces.sort_by(|a, b| a.name.cmp(&b.name));

    let mut desired = Desired::default();
    let mut service_accounts: BTreeMap<(String, String), Vec<OwnerReference>> = BTreeMap::new();
    for policy in &policies {
        let outcome = resolve(policy, &nodes, &namespaces);
        if let Some(name) = &outcome.rbac_name {
            desired
                .cluster_roles
                .push(cluster_role(policy, name, &outcome));
            desired
                .cluster_role_bindings
                .push(cluster_role_binding(policy, name, &outcome));
        }
        for sa in &policy.spec.service_accounts {
            service_accounts
                .entry((sa.namespace.clone(), sa.name.clone()))
                .or_default()
                .push(owner_reference(policy, false));
        }
        desired.outcomes.push(outcome);
    }
    desired.service_accounts = service_accounts
        .into_iter()
        .map(|((namespace, name), owners)| service_account(namespace, name, owners))
        .collect();
    desired.node_agent_configs = nodes
        .iter()
        .map(|node| node_agent_config(node, &policies, &desired.outcomes))
        .collect();
    desired
}

fn resolve(
    policy: &NodeApiPolicy,
    nodes: &[&NodeInfo],
    namespaces: &[&NamespaceInfo],
) -> PolicyOutcome {
    let spec = &policy.spec;
    let name = policy.metadata.name.clone().unwrap_or_default();
    let mut problems = Vec::new();

    // An invalid selector matches no node (`LabelSelector::matches` fails closed); say why.
    if let Some(Err(e)) = spec.node_selector.as_ref().map(|s| s.to_selector()) {
        problems.push(format!("nodeSelector matches no node: {}", e.0));
    }
    let all_nodes = spec.node_selector.as_ref().is_none_or(|s| s.selects_all());
    let matched_nodes = nodes
        .iter()
        .filter(|n| {
            spec.node_selector
                .as_ref()
                .is_none_or(|s| s.matches(&n.labels))
        })
        .map(|n| n.name.clone())
        .collect();

    let scope = &spec.namespaces;
    let namespaces = if scope.all == Some(true) && scope.names.is_none() && scope.selector.is_none()
    {
        ResolvedNamespaces {
            all: true,
            names: vec![],
        }
    } else if let (Some(names), None) = (&scope.names, &scope.selector) {
        let names: BTreeSet<String> = names.iter().cloned().collect();
        ResolvedNamespaces {
            all: false,
            names: names.into_iter().collect(),
        }
    } else if let (None, Some(selector)) = (&scope.names, &scope.selector) {
        if let Err(e) = selector.to_selector() {
            problems.push(format!("namespaces.selector matches no namespace: {}", e.0));
        }
        let names = namespaces
            .iter()
            .filter(|ns| selector.matches(&ns.labels))
            .map(|ns| ns.name.clone())
            .collect();
        ResolvedNamespaces { all: false, names }
    } else {
        // The CRD's CEL rule refuses this; should one slip through, it grants no namespace.
        problems.push("namespaces must set exactly one of names, selector or all: true".into());
        ResolvedNamespaces::default()
    };

    let subjects: BTreeSet<Subject> = spec
        .subjects
        .iter()
        .cloned()
        .chain(spec.service_accounts.iter().map(service_account_subject))
        .collect();
    PolicyOutcome {
        rbac_name: spec.ports.contains(&Port::Secure).then(|| rbac_name(&name)),
        policy: name,
        nodes: matched_nodes,
        all_nodes,
        namespaces,
        subjects: subjects.into_iter().collect(),
        problems,
    }
}

fn service_account_subject(sa: &ServiceAccountRef) -> Subject {
    Subject {
        kind: SubjectKind::ServiceAccount,
        name: sa.name.clone(),
        namespace: Some(sa.namespace.clone()),
    }
}

/// The RBAC a policy needs: per subresource, the verbs of the endpoints that use it, on the
/// matched nodes. A selector that matches no node yields no rule at all: an empty
/// `resourceNames` would mean every node.
fn cluster_role(policy: &NodeApiPolicy, name: &str, outcome: &PolicyOutcome) -> ClusterRole {
    let mut grants: BTreeMap<Subresource, BTreeSet<Verb>> = BTreeMap::new();
    for endpoint in &policy.spec.access {
        grants
            .entry(endpoint.rbac_subresource())
            .or_default()
            .extend(endpoint.verbs());
    }
    let rules = if !outcome.all_nodes && outcome.nodes.is_empty() {
        vec![]
    } else {
        grants
            .into_iter()
            .map(|(subresource, verbs)| PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec![format!("nodes/{subresource}")]),
                verbs: verbs.iter().map(|v| v.as_str().to_string()).collect(),
                resource_names: (!outcome.all_nodes).then(|| outcome.nodes.clone()),
                non_resource_urls: None,
            })
            .collect()
    };
    ClusterRole {
        metadata: metadata(policy, name, None),
        rules: Some(rules),
        aggregation_rule: None,
    }
}

fn cluster_role_binding(
    policy: &NodeApiPolicy,
    name: &str,
    outcome: &PolicyOutcome,
) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: metadata(policy, name, None),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: name.into(),
        },
        subjects: Some(outcome.subjects.iter().map(rbac_subject).collect()),
    }
}

fn rbac_subject(subject: &Subject) -> RbacSubject {
    let api_group = match subject.kind {
        SubjectKind::ServiceAccount => String::new(),
        SubjectKind::User | SubjectKind::Group => "rbac.authorization.k8s.io".into(),
    };
    RbacSubject {
        api_group: Some(api_group),
        kind: subject.kind.as_str().into(),
        name: subject.name.clone(),
        namespace: subject.namespace.clone(),
    }
}

fn metadata(policy: &NodeApiPolicy, name: &str, namespace: Option<String>) -> ObjectMeta {
    let policy_name = policy.metadata.name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(name.into()),
        namespace,
        labels: Some(object_labels(Some(&policy_name))),
        owner_references: Some(vec![owner_reference(policy, true)]),
        ..ObjectMeta::default()
    }
}

pub(crate) fn object_labels(policy: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_string(),
        MANAGED_BY.to_string(),
    )]);
    if let Some(policy) = policy {
        labels.insert(POLICY_LABEL.into(), policy.into());
    }
    labels
}

fn owner_reference(policy: &NodeApiPolicy, controller: bool) -> OwnerReference {
    OwnerReference {
        api_version: NodeApiPolicy::api_version(&()).into_owned(),
        kind: NodeApiPolicy::kind(&()).into_owned(),
        name: policy.metadata.name.clone().unwrap_or_default(),
        uid: policy.metadata.uid.clone().unwrap_or_default(),
        controller: controller.then_some(true),
        block_owner_deletion: None,
    }
}

/// A service account several policies may share: every one of them owns it, so it is garbage
/// collected only with the last; the policy label names the first owner by name.
fn service_account(namespace: String, name: String, owners: Vec<OwnerReference>) -> ServiceAccount {
    let first = owners.first().map(|o| o.name.clone());
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(object_labels(first.as_deref())),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    }
}

fn node_agent_config(
    node: &NodeInfo,
    policies: &[&NodeApiPolicy],
    outcomes: &[PolicyOutcome],
) -> NodeAgentConfig {
    let rules: Vec<AgentRule> = policies
        .iter()
        .zip(outcomes)
        .filter(|(_, outcome)| outcome.nodes.binary_search(&node.name).is_ok())
        .map(|(policy, outcome)| agent_rule(policy, outcome))
        .collect();
    let mut config = NodeAgentConfig::new(
        &node.name,
        NodeAgentConfigSpec {
            policies: policy_list(&rules),
            hash: rules_hash(&rules),
            rules,
        },
    );
    config.metadata.labels = Some(object_labels(None));
    config.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.name.clone(),
        uid: node.uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    config
}

fn agent_rule(policy: &NodeApiPolicy, outcome: &PolicyOutcome) -> AgentRule {
    let endpoints: BTreeSet<Endpoint> = policy.spec.access.iter().copied().collect();
    let ports: BTreeSet<Port> = policy.spec.ports.iter().copied().collect();
    AgentRule {
        policy: outcome.policy.clone(),
        subjects: outcome.subjects.clone(),
        endpoints: endpoints.into_iter().collect(),
        namespaces: outcome.namespaces.clone(),
        ports: ports.into_iter().collect(),
        metrics: policy.spec.metrics.clone(),
    }
}

/// The comma-separated policy names of the rules, for the `Policies` printer column.
pub fn policy_list(rules: &[AgentRule]) -> String {
    rules
        .iter()
        .map(|r| r.policy.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// SHA-256 (hex) of the rules' JSON, which the agent echoes in status once it enforces them.
pub fn rules_hash(rules: &[AgentRule]) -> String {
    // Serializing plain data structs cannot fail; an empty hash input is still a valid hash.
    let bytes = serde_json::to_vec(rules).unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests;
