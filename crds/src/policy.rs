//! `NodeApiPolicy`: who may call which kubelet endpoints, on which nodes, for which namespaces.
//!
//! Everything checkable at admission is a CEL rule in the schema (see [`crate::rules`]), so
//! `kubectl apply` refuses a bad policy with a message that says what to change.

use crate::catalogue::Endpoint;
use crate::rules;
use crate::selector::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Grants subjects access to named kubelet API endpoints on the selected nodes, scoped to the
/// listed namespaces' data.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "nodegate.io",
    version = "v1alpha1",
    kind = "NodeApiPolicy",
    plural = "nodeapipolicies",
    shortname = "nap",
    category = "nodegate",
    status = "NodeApiPolicyStatus",
    doc = "Grants subjects access to named kubelet API endpoints on the selected nodes, with responses scoped to the namespaces the policy lists.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","description":"Nodes the policy selects","jsonPath":".status.matchedNodes"}"#,
    printcolumn = r#"{"name":"Subjects","type":"integer","description":"Subjects the policy binds","jsonPath":".status.subjectCount"}"#,
    printcolumn = r#"{"name":"Agents","type":"string","description":"Agents that enforce the current version of the policy","jsonPath":".status.agentsInSync","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::has_subject())]
#[x_kube(validation = rules::node_wide_needs_all())]
#[x_kube(validation = rules::components_need_all())]
#[x_kube(validation = rules::no_streaming_on_read_only_port())]
#[x_kube(validation = rules::read_only_port_serves_reads_only())]
#[x_kube(validation = rules::read_only_port_is_anonymous())]
#[x_kube(validation = rules::anonymous_only_on_read_only_port())]
#[x_kube(validation = rules::direct_access_needs_all())]
#[x_kube(validation = rules::direct_proxy_lists_streaming())]
pub struct NodeApiPolicySpec {
    /// Who the policy grants access to: users, groups and service accounts, as in an RBAC
    /// binding. The anonymous user (`system:anonymous`) and group (`system:unauthenticated`)
    /// belong to the read-only port only, and are the only subjects allowed there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub subjects: Vec<Subject>,

    /// Service accounts nodegate creates for this policy and binds as subjects, e.g. the
    /// account a team's Prometheus runs as. Deleted with the policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub service_accounts: Vec<ServiceAccountRef>,

    /// The nodes the policy applies to, by label. Absent or empty selects every node,
    /// including nodes that join later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// The kubelet endpoints granted, by name: healthz, pods, runningPods, stats, metrics,
    /// cadvisor, resource, probes, slis, configz, statusz, flagz, logs, containerLogs, exec,
    /// attach, portForward, run, checkpoint, pprof, debugFlags, spec. Each maps to the kubelet's
    /// authorization subresource and verbs; exec, attach, portForward and run are authorized as
    /// `create`. The node's other components (served by the agent under `/components/…`, and
    /// needing `all: true`): kubeProxyMetrics, kubeProxySlis, kubeProxyHealth,
    /// controllerManagerMetrics, controllerManagerSlis, controllerManagerHealth,
    /// schedulerMetrics, schedulerSlis, schedulerHealth, etcdMetrics, etcdHealth.
    #[schemars(length(min = 1, max = 48), extend("x-kubernetes-list-type" = "set"))]
    pub access: Vec<Endpoint>,

    /// Whose data the granted endpoints may return: exactly one of `names`, `selector` or
    /// `all: true`. Node-wide endpoints (metrics, logs, configz, statusz, flagz, pprof,
    /// debugFlags) need `all: true`.
    pub namespaces: NamespaceScope,

    /// The agent ports the grant applies to: `Secure` (TLS, authenticated; the default) and/or
    /// `ReadOnly` (plain HTTP, anonymous, read endpoints only).
    #[serde(default = "default_ports")]
    #[schemars(length(min = 1, max = 2), extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<Port>,

    /// Optional changes to Prometheus metrics returned through this grant: drop or keep
    /// series by metric name, add labels. Applied on every Prometheus endpoint granted
    /// (metrics, cadvisor, resource, probes, slis), in every authorization mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsTransform>,

    /// Also grant the core `nodes/<subresource>` RBAC that the real kubelet and the API
    /// server's node proxy honour, for clients that must call the kubelet themselves (e.g.
    /// metrics-server). Those grants bypass the agent: nothing is filtered, so this needs
    /// `namespaces.all: true`; a grant that becomes `nodes/proxy` must also list exec, attach
    /// and portForward, which the kubelet allows with it anyway. Off by default: through-agent
    /// grants never touch core RBAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_kubelet_access: Option<bool>,
}

impl NodeApiPolicySpec {
    /// Whether the policy opted into core `nodes/*` RBAC.
    pub fn direct(&self) -> bool {
        self.direct_kubelet_access == Some(true)
    }
}

fn default_ports() -> Vec<Port> {
    vec![Port::Secure]
}

/// A user, group or service account, as in an RBAC binding.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[x_kube(validation = rules::subject_namespace())]
#[x_kube(validation = rules::service_account_subject_name())]
pub struct Subject {
    /// `User`, `Group` or `ServiceAccount`.
    pub kind: SubjectKind,
    /// The user, group or service account name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The service account's namespace; required for `ServiceAccount`, not allowed otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// The kind of an RBAC subject.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
)]
pub enum SubjectKind {
    User,
    Group,
    ServiceAccount,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::User => "User",
            SubjectKind::Group => "Group",
            SubjectKind::ServiceAccount => "ServiceAccount",
        }
    }
}

/// A service account nodegate creates and binds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[x_kube(validation = rules::service_account_names())]
pub struct ServiceAccountRef {
    /// The service account's name (a DNS-1123 subdomain).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The namespace to create it in (must exist).
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
}

/// Whose data a grant may return.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = rules::exactly_one_namespace_scope())]
#[x_kube(validation = rules::namespace_names_valid())]
pub struct NamespaceScope {
    /// These namespaces, by name; they need not exist yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), extend("x-kubernetes-list-type" = "set"), inner(length(max = 63)))]
    pub names: Option<Vec<String>>,
    /// The namespaces whose labels match, resolved by the operator as namespaces change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Every namespace, and node-level data that belongs to none. Must be stated explicitly;
    /// nodegate never defaults to everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
}

/// An agent listener a grant applies to.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
)]
pub enum Port {
    /// The TLS port (kubelet 10250, agent 10350): callers authenticate.
    Secure,
    /// The plain-HTTP port (kubelet 10255, agent 10355): anonymous, read endpoints only.
    ReadOnly,
}

/// Changes to Prometheus metrics returned through a grant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::add_labels_valid())]
#[x_kube(validation = rules::metric_names_valid())]
pub struct MetricsTransform {
    /// Metric names to drop (applied after `keep`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 200)))]
    pub drop: Vec<String>,
    /// When set, only these metric names are kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 200)))]
    pub keep: Vec<String>,
    /// Labels added to every kept sample (a sample's own label of the same name wins).
    /// `namespace` cannot be set: responses are scoped by it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub add_labels: BTreeMap<String, String>,
}

/// What the operator observed and did for a policy.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeApiPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (everything below is true), `RBACApplied` (ClusterRole, binding and service
    /// accounts are in place), `AgentsSynced` (every selected node's agent enforces it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"])
    )]
    pub conditions: Vec<Condition>,
    /// How many nodes the node selector matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_nodes: Option<i32>,
    /// How many subjects the policy binds, created service accounts included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_count: Option<i32>,
    /// Agents enforcing the current version of the policy, as `in-sync/selected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents_in_sync: Option<String>,
    /// Names of the objects the operator generated for this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<GeneratedObjects>,
}

/// The objects generated for a policy.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GeneratedObjects {
    /// The ClusterRole's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_role: Option<String>,
    /// The ClusterRoleBinding's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_role_binding: Option<String>,
    /// The created service accounts, as `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub service_accounts: Vec<String>,
}
