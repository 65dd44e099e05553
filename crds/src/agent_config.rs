//! `NodeAgentConfig`: the compiled rules one node's agent enforces, written by the operator.
//!
//! The operator resolves node and namespace selectors, so an agent watches only its own object
//! and never needs to list nodes or namespaces.
//!
//! **Size.** The object is bounded by what etcd stores, not by a count of policies: every
//! subject and every namespace scope is written once, in `spec.subjects` and
//! `spec.namespaceSets`, and the rules name them by index. A cluster's policies share their
//! subjects (a team's Prometheus) and, through selectors, their namespace lists, so a rule costs
//! its policy name, its endpoints and a few indices: 1,000 policies that each name one of 50
//! service accounts, 1–5 of 200 namespaces and two endpoints take about 130 KB (the compiler's
//! `thousand_policies_fit_every_node` test). Every list bound of the schema is derived from
//! [`MAX_AGENT_CONFIG_BYTES`] and the smallest JSON one entry can have, so a list reaches its
//! `maxItems` only in an object that is already too large to write: the byte limit is the one
//! bound a real cluster meets, and the compiler checks it with the others.

use crate::catalogue::Endpoint;
use crate::policy::{MetricsTransform, Port, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Largest NodeAgentConfig the operator writes, in bytes of JSON. The API server refuses
/// objects over 1.5 MiB (etcd's request limit); this leaves room for metadata, status and the
/// managed-fields record of server-side apply.
pub const MAX_AGENT_CONFIG_BYTES: usize = 1024 * 1024;

/// The most entries of one list that fit in [`MAX_AGENT_CONFIG_BYTES`] when each entry takes at
/// least `min_entry_bytes` of JSON (plus its separating comma).
const fn max_entries(min_entry_bytes: usize) -> usize {
    MAX_AGENT_CONFIG_BYTES / (min_entry_bytes + 1)
}

/// The smallest JSON of a subject: `{"kind":"User","name":"a"}`.
pub const MIN_SUBJECT_BYTES: usize = 26;
/// The smallest JSON of a namespace scope: `{}` (no namespace).
pub const MIN_NAMESPACE_SET_BYTES: usize = 2;
/// The smallest JSON of a namespace name: `"a"`.
pub const MIN_NAMESPACE_NAME_BYTES: usize = 3;
/// The smallest JSON of a rule:
/// `{"policy":"a","subjects":[],"endpoints":[],"namespaces":0,"ports":[]}`.
pub const MIN_RULE_BYTES: usize = 69;

/// `maxItems` of `spec.subjects`.
pub const MAX_SUBJECTS: usize = max_entries(MIN_SUBJECT_BYTES);
/// `maxItems` of `spec.namespaceSets`.
pub const MAX_NAMESPACE_SETS: usize = max_entries(MIN_NAMESPACE_SET_BYTES);
/// `maxItems` of `spec.namespaceSets[].names`.
pub const MAX_NAMESPACE_NAMES: usize = max_entries(MIN_NAMESPACE_NAME_BYTES);
/// `maxItems` of `spec.rules`.
pub const MAX_RULES: usize = max_entries(MIN_RULE_BYTES);
/// `maxLength` of `spec.policies` (the whole object's byte limit).
pub const MAX_POLICIES_LENGTH: usize = MAX_AGENT_CONFIG_BYTES;
/// Subjects one rule may name: a policy's subjects (32) and the service accounts it creates (16).
pub const MAX_RULE_SUBJECTS: usize = 48;

/// What the agent on one node enforces, compiled by the operator from every NodeApiPolicy
/// that selects the node: the NodeAgentRuleSet it names, or (in a file given to the agent) its
/// own rules. Named after the node (`<instance>.<node>` for a named operator instance) and
/// owned by it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "nodegate.io",
    version = "v1alpha1",
    kind = "NodeAgentConfig",
    plural = "nodeagentconfigs",
    shortname = "nac",
    category = "nodegate",
    status = "NodeAgentConfigStatus",
    doc = "The compiled access rules one node's nodegate agent enforces. Written by nodegate-operator; do not edit.",
    printcolumn = r#"{"name":"Rule-Set","type":"string","description":"The NodeAgentRuleSet this node enforces","jsonPath":".spec.ruleSet"}"#,
    printcolumn = r#"{"name":"In-Sync","type":"string","description":"Whether the node's agent enforces this version","jsonPath":".status.conditions[?(@.type==\"InSync\")].status"}"#,
    printcolumn = r#"{"name":"Components","type":"string","description":"The node's components (kube-proxy, kube-controller-manager, kube-scheduler, etcd) its agent found listening and serves","jsonPath":".status.components"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = indices_resolve(), validation = rule_set_alone())]
pub struct NodeAgentConfigSpec {
    /// The NodeAgentRuleSet whose rules this node enforces: the operator writes the rules of
    /// the nodes the same policies select once, in one rule set, so a change to a policy on
    /// every node is one write, not one per node. A spec that names a rule set holds no rules
    /// of its own; one that does not (a file given to the agent) holds them below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub rule_set: Option<String>,
    /// The names of the policies in `rules`, comma-separated, for `kubectl get` (a printer
    /// column shows only the first value of a list).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = MAX_POLICIES_LENGTH))]
    pub policies: String,
    /// SHA-256 of the subjects, namespace sets and rules; the agent reports the hash it
    /// enforces in status.observedHash.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 64))]
    pub hash: String,
    /// Every subject the rules grant, each once, sorted; `rules[].subjects` are indices into
    /// this list.
    #[serde(default)]
    #[schemars(length(max = MAX_SUBJECTS))]
    pub subjects: Vec<Subject>,
    /// Every namespace scope the rules grant, each once, sorted; `rules[].namespaces` is an
    /// index into this list.
    #[serde(default)]
    #[schemars(length(max = MAX_NAMESPACE_SETS))]
    pub namespace_sets: Vec<ResolvedNamespaces>,
    /// One rule per policy that selects this node, ordered by policy name.
    #[serde(default)]
    #[schemars(length(max = MAX_RULES))]
    pub rules: Vec<PackedRule>,
}

/// The CEL rule of the spec: every index a rule holds names an entry of its table, so the API
/// server refuses an object whose rules point nowhere (the agent refuses it too).
pub fn indices_resolve() -> kube::core::Rule {
    kube::core::Rule::new(
        "!has(self.rules) || self.rules.all(r, \
         has(self.namespaceSets) && r.namespaces < size(self.namespaceSets) && \
         r.subjects.all(s, has(self.subjects) && s < size(self.subjects)))",
    )
    .message("every rules[].subjects and rules[].namespaces index must name an entry of spec.subjects and spec.namespaceSets")
}

/// The CEL rule that keeps the two forms apart: a spec that names a rule set holds no rules,
/// subjects or namespace sets of its own (the agent would not know which to enforce).
pub fn rule_set_alone() -> kube::core::Rule {
    kube::core::Rule::new(
        "!has(self.ruleSet) || ((!has(self.rules) || size(self.rules) == 0) && \
         (!has(self.subjects) || size(self.subjects) == 0) && \
         (!has(self.namespaceSets) || size(self.namespaceSets) == 0))",
    )
    .message("a spec that names a ruleSet holds no rules, subjects or namespaceSets of its own")
}

/// The rules of every node that the same policies select, written once and named by each of
/// those nodes' NodeAgentConfig (`spec.ruleSet`). Its spec is a NodeAgentConfig's spec with
/// the rules in it (never a `ruleSet` of its own).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "nodegate.io",
    version = "v1alpha1",
    kind = "NodeAgentRuleSet",
    plural = "nodeagentrulesets",
    shortname = "nars",
    category = "nodegate",
    doc = "Compiled access rules shared by the nodes the same NodeApiPolicies select; each such node's NodeAgentConfig names it in spec.ruleSet. Written by nodegate-operator; do not edit.",
    printcolumn = r#"{"name":"Policies","type":"string","description":"Policies whose rules this set holds","jsonPath":".spec.policies"}"#,
    printcolumn = r#"{"name":"Hash","type":"string","description":"SHA-256 of the rules","jsonPath":".spec.hash"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct NodeAgentRuleSetSpec(pub NodeAgentConfigSpec);

impl schemars::JsonSchema for NodeAgentRuleSetSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "NodeAgentRuleSetSpec".into()
    }

    /// A NodeAgentConfig's spec without `ruleSet` (a rule set never names another) and
    /// without the CEL rule that only concerns that field.
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut schema = NodeAgentConfigSpec::json_schema(generator);
        if let Some(properties) = schema
            .get_mut("properties")
            .and_then(serde_json::Value::as_object_mut)
        {
            properties.remove("ruleSet");
        }
        schema.insert(
            "description".into(),
            "The rules of every node the same policies select: subjects and namespace scopes \
             each once, and one rule per policy, ordered by policy name."
                .into(),
        );
        let alone = rule_set_alone().rule;
        if let Some(rules) = schema
            .get_mut("x-kubernetes-validations")
            .and_then(serde_json::Value::as_array_mut)
        {
            rules.retain(|r| r.get("rule").and_then(serde_json::Value::as_str) != Some(&alone));
        }
        schema
    }
}

/// What one policy grants on this node, as written: its subjects and namespace scope are
/// indices into the spec's `subjects` and `namespaceSets`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PackedRule {
    /// The NodeApiPolicy this rule comes from.
    #[schemars(length(max = 253))]
    pub policy: String,
    /// Who the rule grants access to, created service accounts included: indices into
    /// `spec.subjects`.
    #[schemars(length(max = MAX_RULE_SUBJECTS), inner(range(max = MAX_SUBJECTS - 1)))]
    pub subjects: Vec<u32>,
    /// The granted endpoints.
    #[schemars(length(max = 48))]
    pub endpoints: Vec<Endpoint>,
    /// Whose data the endpoints may return, selectors resolved: an index into
    /// `spec.namespaceSets`.
    #[schemars(range(max = MAX_NAMESPACE_SETS - 1))]
    pub namespaces: u32,
    /// The agent ports the rule applies to.
    #[schemars(length(max = 2))]
    pub ports: Vec<Port>,
    /// Changes to Prometheus metrics returned through this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsTransform>,
}

/// What one policy grants on this node, with its subjects and namespace scope spelled out: what
/// the compiler produces and tests write, packed into a [`NodeAgentConfigSpec`] by
/// [`NodeAgentConfigSpec::pack`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentRule {
    /// The NodeApiPolicy this rule comes from.
    pub policy: String,
    /// Who the rule grants access to, created service accounts included.
    pub subjects: Vec<Subject>,
    /// The granted endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Whose data the endpoints may return, selectors resolved.
    pub namespaces: ResolvedNamespaces,
    /// The agent ports the rule applies to.
    pub ports: Vec<Port>,
    /// Changes to Prometheus metrics returned through this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsTransform>,
}

/// A namespace scope with selectors resolved to names.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedNamespaces {
    /// Every namespace and node-level data.
    #[serde(default)]
    pub all: bool,
    /// These namespaces (sorted), when not `all`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_NAMESPACE_NAMES), inner(length(max = 63)))]
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

impl NodeAgentConfigSpec {
    /// Packs rules into a spec: each distinct subject and namespace scope once, sorted, and
    /// the rules pointing at them, in the order given. `hash` is left empty for the caller
    /// (the compiler's `spec_hash`).
    pub fn pack(rules: &[AgentRule]) -> NodeAgentConfigSpec {
        let mut subjects: BTreeMap<&Subject, u32> = BTreeMap::new();
        let mut namespace_sets: BTreeMap<&ResolvedNamespaces, u32> = BTreeMap::new();
        for rule in rules {
            for subject in &rule.subjects {
                subjects.insert(subject, 0);
            }
            namespace_sets.insert(&rule.namespaces, 0);
        }
        // Positions in sorted order; the tables are far below u32::MAX entries (bounded by
        // the rules, each at most MAX_RULE_SUBJECTS subjects).
        for (i, index) in subjects.values_mut().enumerate() {
            *index = u32::try_from(i).unwrap_or(u32::MAX);
        }
        for (i, index) in namespace_sets.values_mut().enumerate() {
            *index = u32::try_from(i).unwrap_or(u32::MAX);
        }
        let packed = rules
            .iter()
            .map(|rule| PackedRule {
                policy: rule.policy.clone(),
                subjects: rule
                    .subjects
                    .iter()
                    .map(|s| subjects.get(s).copied().unwrap_or(u32::MAX))
                    .collect(),
                endpoints: rule.endpoints.clone(),
                namespaces: namespace_sets
                    .get(&rule.namespaces)
                    .copied()
                    .unwrap_or(u32::MAX),
                ports: rule.ports.clone(),
                metrics: rule.metrics.clone(),
            })
            .collect();
        NodeAgentConfigSpec {
            rule_set: None,
            policies: rules
                .iter()
                .map(|r| r.policy.as_str())
                .collect::<Vec<_>>()
                .join(","),
            hash: String::new(),
            subjects: subjects.into_keys().cloned().collect(),
            namespace_sets: namespace_sets.into_keys().cloned().collect(),
            rules: packed,
        }
    }

    /// The subject at `index`, if the table has one.
    pub fn subject(&self, index: u32) -> Option<&Subject> {
        self.subjects.get(usize::try_from(index).ok()?)
    }

    /// The namespace scope at `index`, if the table has one.
    pub fn namespace_set(&self, index: u32) -> Option<&ResolvedNamespaces> {
        self.namespace_sets.get(usize::try_from(index).ok()?)
    }

    /// The rule at `position` with its subjects and namespaces spelled out; `None` when it
    /// does not exist or an index of it names nothing. Copies: for tests, `explain` and
    /// tools, not for deciding requests ([`crate::decision::RuleSet`] reads the tables in
    /// place).
    pub fn unpack(&self, position: usize) -> Option<AgentRule> {
        let rule = self.rules.get(position)?;
        Some(AgentRule {
            policy: rule.policy.clone(),
            subjects: rule
                .subjects
                .iter()
                .map(|&s| self.subject(s).cloned())
                .collect::<Option<Vec<_>>>()?,
            endpoints: rule.endpoints.clone(),
            namespaces: self.namespace_set(rule.namespaces)?.clone(),
            ports: rule.ports.clone(),
            metrics: rule.metrics.clone(),
        })
    }

    /// Every rule spelled out (see [`Self::unpack`]); `None` if an index names nothing.
    pub fn unpack_all(&self) -> Option<Vec<AgentRule>> {
        (0..self.rules.len()).map(|i| self.unpack(i)).collect()
    }
}

/// What the node's agent reports.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentConfigStatus {
    /// The hash of the rules the agent enforces (`spec.hash`, or its rule set's).
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::SubjectKind;

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

    /// The list bounds are derived from the smallest JSON of an entry: these are those
    /// entries, so a change of the types that makes one smaller fails here.
    #[test]
    fn smallest_entries_are_what_the_bounds_assume() {
        let subject = Subject {
            kind: SubjectKind::User,
            name: "a".into(),
            namespace: None,
        };
        assert_eq!(
            serde_json::to_vec(&subject).unwrap().len(),
            MIN_SUBJECT_BYTES
        );
        // `all` and `names` may both be left out.
        let none: ResolvedNamespaces = serde_json::from_str("{}").unwrap();
        assert_eq!(none, ResolvedNamespaces::default());
        assert_eq!("{}".len(), MIN_NAMESPACE_SET_BYTES);
        assert_eq!(
            serde_json::to_vec("a").unwrap().len(),
            MIN_NAMESPACE_NAME_BYTES
        );
        let rule = PackedRule {
            policy: "a".into(),
            subjects: vec![],
            endpoints: vec![],
            namespaces: 0,
            ports: vec![],
            metrics: None,
        };
        assert_eq!(serde_json::to_vec(&rule).unwrap().len(), MIN_RULE_BYTES);
        // A list at its bound is already over the byte limit.
        for (max, min) in [
            (MAX_SUBJECTS, MIN_SUBJECT_BYTES),
            (MAX_NAMESPACE_SETS, MIN_NAMESPACE_SET_BYTES),
            (MAX_NAMESPACE_NAMES, MIN_NAMESPACE_NAME_BYTES),
            (MAX_RULES, MIN_RULE_BYTES),
        ] {
            assert!((max + 1) * (min + 1) > MAX_AGENT_CONFIG_BYTES);
        }
    }

    #[test]
    fn pack_writes_each_subject_and_scope_once_and_unpacks_to_the_rules() {
        let sa = |n: &str| Subject {
            kind: SubjectKind::ServiceAccount,
            name: n.into(),
            namespace: Some("mon".into()),
        };
        let ns = |names: &[&str]| ResolvedNamespaces {
            all: false,
            names: names.iter().map(|s| s.to_string()).collect(),
        };
        let rule = |p: &str, subjects: Vec<Subject>, n: ResolvedNamespaces| AgentRule {
            policy: p.into(),
            subjects,
            endpoints: vec![Endpoint::Cadvisor],
            namespaces: n,
            ports: vec![Port::Secure],
            metrics: None,
        };
        let rules = vec![
            rule("a", vec![sa("prom")], ns(&["x", "y"])),
            rule("b", vec![sa("prom"), sa("other")], ns(&["x", "y"])),
            rule("c", vec![sa("other")], ns(&["z"])),
        ];
        let spec = NodeAgentConfigSpec::pack(&rules);
        assert_eq!(spec.subjects, vec![sa("other"), sa("prom")]);
        assert_eq!(spec.namespace_sets, vec![ns(&["x", "y"]), ns(&["z"])]);
        assert_eq!(spec.rules[1].subjects, vec![1, 0]);
        assert_eq!(spec.policies, "a,b,c");
        assert_eq!(spec.unpack_all().unwrap(), rules);
        let mut dangling = spec.clone();
        dangling.rules[2].namespaces = 2;
        assert!(dangling.unpack(2).is_none() && dangling.unpack_all().is_none());
    }
}
