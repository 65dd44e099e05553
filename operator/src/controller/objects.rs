//! The compiler's output as generic objects: kind, namespace, name, owning policies and the
//! JSON body nodegate applies. Everything downstream (ownership, diff, apply, status) works on
//! these, so an output the compiler adds later needs no new code as long as it has one of the
//! kinds below.

use crate::compiler::Desired;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::api::ApiResource;
use nodegate_crds::{
    MANAGED_BY, NodeAgentConfig, NodeAgentConfigSpec, NodeAgentRuleSet, NodeApiPolicy, POLICY_LABEL,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// `app.kubernetes.io/managed-by`.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Set on every output when the controller runs as a named instance (tests, canaries), so
/// instances never see, update or delete each other's objects.
pub const INSTANCE_LABEL: &str = "nodegate.io/instance";

/// The kinds of object nodegate writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ClusterRole,
    ClusterRoleBinding,
    RoleBinding,
    ServiceAccount,
    NodeAgentRuleSet,
    NodeAgentConfig,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::ClusterRole,
        Kind::ClusterRoleBinding,
        Kind::RoleBinding,
        Kind::ServiceAccount,
        Kind::NodeAgentRuleSet,
        Kind::NodeAgentConfig,
    ];

    /// Whether the fields a create records (under nodegate's Update entry) are exactly those
    /// a later forced apply replaces, so the create needs no second write to move them to an
    /// Apply entry (see `own_by_apply`): a binding's `roleRef` is immutable, its `subjects` an
    /// atomic list, and its labels and owner are fixed by its name (its policy's). At scale
    /// that second write was half of the writes of a first install (3,000 RoleBindings).
    pub fn owned_by_create(self) -> bool {
        matches!(self, Kind::RoleBinding | Kind::ClusterRoleBinding)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ClusterRole => "ClusterRole",
            Kind::ClusterRoleBinding => "ClusterRoleBinding",
            Kind::RoleBinding => "RoleBinding",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::NodeAgentRuleSet => "NodeAgentRuleSet",
            Kind::NodeAgentConfig => "NodeAgentConfig",
        }
    }

    /// The API resource, for dynamic requests.
    pub fn api_resource(self) -> ApiResource {
        match self {
            Kind::ClusterRole => ApiResource::erase::<ClusterRole>(&()),
            Kind::ClusterRoleBinding => ApiResource::erase::<ClusterRoleBinding>(&()),
            Kind::RoleBinding => ApiResource::erase::<RoleBinding>(&()),
            Kind::ServiceAccount => ApiResource::erase::<ServiceAccount>(&()),
            Kind::NodeAgentRuleSet => ApiResource::erase::<NodeAgentRuleSet>(&()),
            Kind::NodeAgentConfig => ApiResource::erase::<NodeAgentConfig>(&()),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of an output object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    fn of(kind: Kind, meta: &ObjectMeta) -> Self {
        Self {
            kind,
            namespace: meta.namespace.clone(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// One object the cluster should hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub key: Key,
    /// Policies the object belongs to: its policy label and every NodeApiPolicy owner.
    pub policies: BTreeSet<String>,
    /// The apply body (apiVersion, kind, metadata, content), empty lists removed.
    pub body: Value,
    /// Whether a successful apply is announced on `policies` (an `Applied` Event each). Not
    /// for a rule set: it holds every policy of its nodes, so one change would be an Event on
    /// each of a thousand policies. A failure is reported on all of them either way.
    pub announce: bool,
}

/// The policies an object belongs to: its NodeApiPolicy owners (a shared service account has
/// several), else its policy label (which is the policy's name unless that is too long for a
/// label value, hence owners first).
pub fn policies_of(meta: &ObjectMeta) -> BTreeSet<String> {
    let policy_kind = NodeApiPolicy::kind(&());
    let policies: BTreeSet<String> = meta
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.kind == policy_kind)
        .map(|o: &OwnerReference| o.name.clone())
        .collect();
    if !policies.is_empty() {
        return policies;
    }
    meta.labels
        .as_ref()
        .and_then(|l| l.get(POLICY_LABEL))
        .into_iter()
        .cloned()
        .collect()
}

/// Visits the metadata of every object in `desired`, with its kind.
pub fn for_each_meta(desired: &mut Desired, mut f: impl FnMut(Kind, &mut ObjectMeta)) {
    desired
        .cluster_roles
        .iter_mut()
        .for_each(|o| f(Kind::ClusterRole, &mut o.metadata));
    desired
        .cluster_role_bindings
        .iter_mut()
        .for_each(|o| f(Kind::ClusterRoleBinding, &mut o.metadata));
    desired
        .role_bindings
        .iter_mut()
        .for_each(|o| f(Kind::RoleBinding, &mut o.metadata));
    desired
        .service_accounts
        .iter_mut()
        .for_each(|o| f(Kind::ServiceAccount, &mut o.metadata));
    desired
        .node_agent_rule_sets
        .iter_mut()
        .for_each(|o| f(Kind::NodeAgentRuleSet, &mut o.metadata));
    desired
        .node_agent_configs
        .iter_mut()
        .for_each(|o| f(Kind::NodeAgentConfig, &mut o.metadata));
}

/// Visits the key of every object in `desired`.
pub fn for_each_key(desired: &Desired, mut f: impl FnMut(Key)) {
    let mut visit = |kind: Kind, meta: &ObjectMeta| f(Key::of(kind, meta));
    desired
        .cluster_roles
        .iter()
        .for_each(|o| visit(Kind::ClusterRole, &o.metadata));
    desired
        .cluster_role_bindings
        .iter()
        .for_each(|o| visit(Kind::ClusterRoleBinding, &o.metadata));
    desired
        .role_bindings
        .iter()
        .for_each(|o| visit(Kind::RoleBinding, &o.metadata));
    desired
        .service_accounts
        .iter()
        .for_each(|o| visit(Kind::ServiceAccount, &o.metadata));
    desired
        .node_agent_rule_sets
        .iter()
        .for_each(|o| visit(Kind::NodeAgentRuleSet, &o.metadata));
    desired
        .node_agent_configs
        .iter()
        .for_each(|o| visit(Kind::NodeAgentConfig, &o.metadata));
}

/// Adds `key=value` to the labels of every desired object.
pub fn label_all(desired: &mut Desired, key: &str, value: &str) {
    for_each_meta(desired, |_, meta| {
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_string(), value.to_string());
    });
}

/// Whether labels mark an object as nodegate's (and this instance's, when `instance` is set).
pub fn is_owned(labels: Option<&BTreeMap<String, String>>, instance: Option<&str>) -> bool {
    let Some(labels) = labels else {
        return false;
    };
    labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
        && labels.get(INSTANCE_LABEL).map(String::as_str) == instance
}

/// The label selector of the objects an instance owns.
pub fn owned_selector(instance: Option<&str>) -> String {
    match instance {
        Some(i) => format!("{MANAGED_BY_LABEL}={MANAGED_BY},{INSTANCE_LABEL}={i}"),
        None => format!("{MANAGED_BY_LABEL}={MANAGED_BY},!{INSTANCE_LABEL}"),
    }
}

/// Every desired object as an [`Output`], in a stable order.
pub fn outputs(desired: &Desired) -> Vec<Output> {
    let mut out = Vec::new();
    push_all(&mut out, Kind::ClusterRole, &desired.cluster_roles);
    push_all(
        &mut out,
        Kind::ClusterRoleBinding,
        &desired.cluster_role_bindings,
    );
    push_all(&mut out, Kind::RoleBinding, &desired.role_bindings);
    push_all(&mut out, Kind::ServiceAccount, &desired.service_accounts);
    for set in &desired.node_agent_rule_sets {
        out.push(Output {
            key: Key::of(Kind::NodeAgentRuleSet, &set.metadata),
            policies: rule_set_policies(set),
            body: rule_set_digest(set),
            announce: false,
        });
    }
    push_all(&mut out, Kind::NodeAgentConfig, &desired.node_agent_configs);
    out
}

/// The policies whose rules a rule set holds (`spec.policies`, which the compiler keeps on
/// the rule sets it returns).
pub fn rule_set_policies(set: &NodeAgentRuleSet) -> BTreeSet<String> {
    set.spec
        .0
        .policies
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// A rule set as a round compares it: its metadata and `spec.hash`, the digest of its rules.
/// The watch cache keeps no rules either (a rule set whose rules do not match its hash is
/// cached with a hash no compile gives, see `watch.rs`), so equal hashes mean equal rules,
/// and a round never holds every rule set as JSON.
pub fn rule_set_digest(set: &NodeAgentRuleSet) -> Value {
    let metadata = serde_json::to_value(&set.metadata).unwrap_or(Value::Null);
    strip_empty(serde_json::json!({
        "apiVersion": NodeAgentRuleSet::api_version(&()),
        "kind": NodeAgentRuleSet::kind(&()),
        "metadata": metadata,
        "spec": {"hash": set.spec.0.hash},
    }))
}

/// The whole apply body of a rule set (`set`'s metadata, `spec` its rules), made when it is
/// written.
pub fn rule_set_body(set: &NodeAgentRuleSet, spec: &NodeAgentConfigSpec) -> Option<Value> {
    Some(strip_empty(serde_json::json!({
        "apiVersion": NodeAgentRuleSet::api_version(&()),
        "kind": NodeAgentRuleSet::kind(&()),
        "metadata": serde_json::to_value(&set.metadata).ok()?,
        "spec": serde_json::to_value(spec).ok()?,
    })))
}

fn push_all<K>(out: &mut Vec<Output>, kind: Kind, objects: &[K])
where
    K: Resource<DynamicType = ()> + serde::Serialize,
{
    for object in objects {
        let meta = object.meta();
        // Serializing plain API structs cannot fail; an object that somehow did would be
        // skipped rather than applied half-formed.
        let Ok(mut body) = serde_json::to_value(object) else {
            continue;
        };
        if let Value::Object(map) = &mut body {
            map.insert("apiVersion".into(), K::api_version(&()).into());
            map.insert("kind".into(), K::kind(&()).into());
        }
        out.push(Output {
            key: Key::of(kind, meta),
            policies: policies_of(meta),
            body: strip_empty(body),
            announce: true,
        });
    }
}

/// Removes nulls, empty lists and maps, and empty-string map values, recursively. The API
/// server drops or rewrites them (an applied `subjects: []` bumps resourceVersion on every
/// apply, kubernetes#131175; `apiGroup: ""` of a ServiceAccount subject comes back absent), so
/// neither the apply body nor a comparison may contain them; absent and empty mean the same for
/// every field nodegate sets. Empty strings inside lists (`apiGroups: [""]`) are kept.
pub fn strip_empty(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, strip_empty(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_empty).collect()),
        other => other,
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strip_empty_removes_empty_values_but_not_list_items() {
        let v = json!({"a": [], "b": {}, "c": null, "d": "", "e": false, "f": [{"x": []}],
                       "g": {"h": {"i": []}}, "j": [""]});
        assert_eq!(strip_empty(v), json!({"e": false, "f": [{}], "j": [""]}));
    }

    #[test]
    fn ownership_needs_managed_by_and_the_same_instance() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ours = labels(&[(MANAGED_BY_LABEL, MANAGED_BY)]);
        assert!(is_owned(Some(&ours), None));
        assert!(!is_owned(Some(&ours), Some("t1")));
        assert!(!is_owned(None, None));
        assert!(!is_owned(
            Some(&labels(&[(MANAGED_BY_LABEL, "helm")])),
            None
        ));
        let t1 = labels(&[(MANAGED_BY_LABEL, MANAGED_BY), (INSTANCE_LABEL, "t1")]);
        assert!(is_owned(Some(&t1), Some("t1")));
        assert!(!is_owned(Some(&t1), Some("t2")));
        assert!(!is_owned(Some(&t1), None));
    }

    #[test]
    fn outputs_carry_kind_key_and_policies() {
        let mut desired = Desired::default();
        desired.cluster_roles.push(ClusterRole {
            metadata: ObjectMeta {
                name: Some("nodegate:p".into()),
                labels: Some(BTreeMap::from([(POLICY_LABEL.into(), "p".into())])),
                ..Default::default()
            },
            rules: Some(vec![]),
            aggregation_rule: None,
        });
        label_all(&mut desired, INSTANCE_LABEL, "x");
        let out = outputs(&desired);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key, Key::new(Kind::ClusterRole, None, "nodegate:p"));
        assert_eq!(out[0].policies, BTreeSet::from(["p".to_string()]));
        assert_eq!(out[0].body["kind"], "ClusterRole");
        assert_eq!(out[0].body["apiVersion"], "rbac.authorization.k8s.io/v1");
        assert!(out[0].body.get("rules").is_none(), "empty rules not sent");
        assert_eq!(out[0].body["metadata"]["labels"][INSTANCE_LABEL], "x");
    }
}
