//! `NodeAgentConfig`: the compiled rules one node's agent enforces, written by the operator.
//!
//! The operator resolves node and namespace selectors, so an agent watches only its own object
//! and never needs to list nodes or namespaces.

use crate::catalogue::Endpoint;
use crate::policy::{MetricsTransform, Port, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// The rules the agent on one node enforces, compiled by the operator from every
/// NodeApiPolicy that selects the node. Named after the node and owned by it.
#[derive(CustomResource, schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "nodegate.io",
    version = "v1alpha1",
    kind = "NodeAgentConfig",
    plural = "nodeagentconfigs",
    shortname = "nac",
    category = "nodegate",
    status = "NodeAgentConfigStatus",
    doc = "The compiled access rules one node's nodegate agent enforces. Written by nodegate-operator; do not edit.",
    printcolumn = r#"{"name":"Policies","type":"string","description":"Policies that apply to this node","jsonPath":".spec.policies"}"#,
    printcolumn = r#"{"name":"In-Sync","type":"string","description":"Whether the node's agent enforces this version","jsonPath":".status.conditions[?(@.type==\"InSync\")].status"}"#,
    printcolumn = r#"{"name":"Components","type":"string","description":"The node's components (kube-proxy, kube-controller-manager, kube-scheduler, etcd) its agent found listening and serves","jsonPath":".status.components"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentConfigSpec {
    /// The names of the policies in `rules`, comma-separated, for `kubectl get` (a printer
    /// column shows only the first value of a list).
    #[serde(default)]
    pub policies: String,
    /// SHA-256 of the rules; the agent reports the hash it enforces in status.observedHash.
    #[schemars(length(max = 64))]
    pub hash: String,
    /// One rule per policy that selects this node, ordered by policy name.
    #[serde(default)]
    #[schemars(length(max = 512))]
    pub rules: Vec<AgentRule>,
}

/// What one policy grants on this node.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentRule {
    /// The NodeApiPolicy this rule comes from.
    #[schemars(length(max = 253))]
    pub policy: String,
    /// Who the rule grants access to, created service accounts included.
    #[schemars(length(max = 48))]
    pub subjects: Vec<Subject>,
    /// The granted endpoints.
    #[schemars(length(max = 48))]
    pub endpoints: Vec<Endpoint>,
    /// Whose data the endpoints may return, selectors resolved.
    pub namespaces: ResolvedNamespaces,
    /// The agent ports the rule applies to.
    #[schemars(length(max = 2))]
    pub ports: Vec<Port>,
    /// Changes to Prometheus metrics returned through this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsTransform>,
}

/// A namespace scope with selectors resolved to names.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedNamespaces {
    /// Every namespace and node-level data.
    #[serde(default)]
    pub all: bool,
    /// These namespaces (sorted), when not `all`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000), inner(length(max = 63)))]
    pub names: Vec<String>,
}

impl ResolvedNamespaces {
    /// Whether data of `namespace` may be returned.
    pub fn allows(&self, namespace: &str) -> bool {
        self.all
            || self
                .names
                .binary_search_by(|n| n.as_str().cmp(namespace))
                .is_ok()
    }
}

/// What the node's agent reports.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentConfigStatus {
    /// The spec.hash the agent enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_hash: Option<String>,
    /// `InSync` (observedHash equals spec.hash) and `Ready` (the agent serves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"])
    )]
    pub conditions: Vec<Condition>,
    /// When the agent's serving certificate expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_cert_expiry: Option<Time>,
    /// The agent's last error loading or serving this configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The node's components besides the kubelet that the agent is configured to serve and
    /// found listening (probed at start and every 30 s), comma-separated: kube-proxy,
    /// kube-controller-manager, kube-scheduler, etcd. Absent when none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub components: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_listed_namespaces_or_all() {
        let some = ResolvedNamespaces {
            all: false,
            names: vec!["a".into(), "c".into()],
        };
        assert!(some.allows("a") && some.allows("c"));
        assert!(!some.allows("b") && !some.allows("") && !some.allows("ab"));
        let all = ResolvedNamespaces {
            all: true,
            names: vec![],
        };
        assert!(all.allows("anything") && all.allows(""));
    }
}
