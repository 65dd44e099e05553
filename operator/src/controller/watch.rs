//! What the controller's watch caches keep of each object, and which watch events start a
//! round.
//!
//! A round compiles every policy, so an event that cannot change what a round decides must not
//! start one: at 500 nodes, kubelet heartbeats alone (a status write every 10 s per node) are
//! 50 events a second, and agents write their NodeAgentConfig's status whenever they load it.
//! Each watched kind names what a round reads of it ([`Watched::relevant`]); an event that
//! leaves that as it was still updates the cache, but starts nothing. The caches keep only what a
//! round reads ([`Watched::slim`]): above all, a NodeAgentRuleSet is kept without its rules (a
//! round compares rule sets by their hash), which is most of what the operator held at scale.

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher::Event;
use nodegate_crds::{
    FIELD_MANAGER, NodeAgentConfig, NodeAgentConfigSpec, NodeAgentRuleSet, NodeApiPolicy,
};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};

/// A kind the controller watches: what its cache keeps, and what of it a round reads.
pub(crate) trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    /// Objects per page of a (re)list. A page is held whole while it is decoded, so kinds with
    /// large objects list in small pages.
    const PAGE_SIZE: u32 = 500;

    /// Drops, before the cache stores the object, what no round reads.
    fn slim(&mut self) {}

    /// A digest of what a round reads of the object: an update that leaves it unchanged starts
    /// no round.
    fn relevant(&self) -> u64;
}

/// Decides, event by event, whether a watch stream's event may change a round's outcome.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// The digest of every object in the cache, by namespace and name.
    seen: HashMap<(Option<String>, String), u64>,
    /// The digests of a relist in progress.
    relist: Option<HashMap<(Option<String>, String), u64>>,
}

impl Gate {
    /// Whether `event` starts a round: an object added, deleted, or changed in what a round
    /// reads; a relist that found anything different from before.
    pub fn admit<K: Watched>(&mut self, event: &Event<K>) -> bool {
        match event {
            Event::Apply(object) => {
                let digest = object.relevant();
                self.seen.insert(key(object), digest) != Some(digest)
            }
            Event::Delete(object) => {
                self.seen.remove(&key(object));
                true
            }
            Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            Event::InitApply(object) => {
                if let Some(relist) = &mut self.relist {
                    relist.insert(key(object), object.relevant());
                }
                false
            }
            Event::InitDone => {
                let relist = self.relist.take().unwrap_or_default();
                let changed = relist != self.seen;
                self.seen = relist;
                changed
            }
        }
    }
}

fn key<K: Resource>(object: &K) -> (Option<String>, String) {
    let meta = object.meta();
    (
        meta.namespace.clone(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn digest(value: impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Identity, labels and deletion: all a round reads of a node or a namespace.
fn identity(meta: &ObjectMeta) -> u64 {
    digest((&meta.uid, &meta.labels, meta.deletion_timestamp.is_some()))
}

/// Keeps only nodegate's own managedFields entry (the diff reads which fields it owns).
fn own_managed_fields(meta: &mut ObjectMeta) {
    if let Some(entries) = &mut meta.managed_fields {
        entries.retain(|m| m.manager.as_deref() == Some(FIELD_MANAGER));
    }
}

/// The object as JSON without what changes on every write whatever it says (resourceVersion,
/// the times of managedFields entries): the content a round compares.
fn content<K: serde::Serialize + Resource + Clone>(object: &K) -> u64 {
    let mut object = object.clone();
    let meta = object.meta_mut();
    meta.resource_version = None;
    for entry in meta.managed_fields.iter_mut().flatten() {
        entry.time = None;
    }
    digest(serde_json::to_vec(&object).unwrap_or_default())
}

impl Watched for PartialObjectMeta<Node> {
    /// Annotations and managedFields of a node are large and change with every heartbeat.
    fn slim(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.annotations = None;
    }

    /// Labels only: heartbeats (status), leases and annotations start no round.
    fn relevant(&self) -> u64 {
        identity(&self.metadata)
    }
}

impl Watched for PartialObjectMeta<Namespace> {
    fn slim(&mut self) {
        self.metadata.managed_fields = None;
        self.metadata.annotations = None;
    }

    /// Labels, and deletion (a terminating namespace gets no new bindings).
    fn relevant(&self) -> u64 {
        identity(&self.metadata)
    }
}

impl Watched for NodeApiPolicy {
    fn slim(&mut self) {
        self.metadata.managed_fields = None;
    }

    /// The spec (its generation), identity, labels and deletion; not its status, which the
    /// operator writes itself.
    fn relevant(&self) -> u64 {
        let meta = &self.metadata;
        let spec = match meta.generation {
            Some(_) => Vec::new(),
            // Without a generation (never on a real API server) the spec itself.
            None => serde_json::to_vec(&self.spec).unwrap_or_default(),
        };
        digest((
            &meta.uid,
            meta.generation,
            &meta.labels,
            meta.deletion_timestamp.is_some(),
            spec,
        ))
    }
}

macro_rules! owned_kind {
    ($($kind:ty),*) => {$(
        impl Watched for $kind {
            fn slim(&mut self) {
                own_managed_fields(&mut self.metadata);
            }

            /// Its content: what nodegate compares and writes.
            fn relevant(&self) -> u64 {
                content(self)
            }
        }
    )*};
}

owned_kind!(ClusterRole, ClusterRoleBinding, RoleBinding, ServiceAccount);

impl Watched for NodeAgentRuleSet {
    /// Each rule set is up to a few hundred KB: a page of 500 would be held whole.
    const PAGE_SIZE: u32 = 25;

    /// The rules go; their hash stays, and is what a round compares. A rule set whose rules
    /// do not hash to its `spec.hash` (edited by hand) keeps a hash no compiler output has, so
    /// the round writes it back.
    fn slim(&mut self) {
        own_managed_fields(&mut self.metadata);
        hash_only(&mut self.spec.0);
    }

    fn relevant(&self) -> u64 {
        let meta = &self.metadata;
        digest((
            &meta.uid,
            &meta.labels,
            serde_json::to_vec(&meta.owner_references).unwrap_or_default(),
            meta.deletion_timestamp.is_some(),
            &self.spec.0.hash,
            serde_json::to_vec(&meta.managed_fields).unwrap_or_default(),
        ))
    }
}

/// Keeps only `spec.hash` of a spec that holds rules, marked when the rules do not hash to
/// it. Everything else goes (and whatever the format adds later: it is not kept).
fn hash_only(spec: &mut NodeAgentConfigSpec) {
    if crate::compiler::spec_hash(spec) != spec.hash {
        spec.hash = format!("{} (rules edited)", spec.hash);
    }
    *spec = NodeAgentConfigSpec {
        hash: std::mem::take(&mut spec.hash),
        ..NodeAgentConfigSpec::default()
    };
}

impl Watched for NodeAgentConfig {
    /// Small since they name a rule set, but one written by an earlier version holds its
    /// rules (up to a few hundred KB), and a page is held whole while it is decoded.
    const PAGE_SIZE: u32 = 25;

    /// A config that names a rule set is kept whole (it is small). One written by an earlier
    /// version, with its rules inline, keeps only their hash: nodegate owns that field and
    /// no longer wants it, so the round rewrites the config.
    fn slim(&mut self) {
        own_managed_fields(&mut self.metadata);
        if self.spec.rule_set.is_none() {
            hash_only(&mut self.spec);
        }
    }

    /// Identity, labels, owners, the rule set it names (or an inline hash), whether its agent
    /// says it enforces what the config asks (its `InSync` condition: the config no longer
    /// holds the hash to compare with) and, if so, which hash; not the rest of what its agent
    /// writes in status (an agent still loading may write its status many times).
    fn relevant(&self) -> u64 {
        let meta = &self.metadata;
        let status = self.status.as_ref();
        let in_sync = status
            .into_iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.type_ == "InSync" && c.status == "True");
        let confirmed = status
            .and_then(|s| s.observed_hash.as_deref())
            .filter(|_| in_sync);
        digest((
            &meta.uid,
            &meta.labels,
            serde_json::to_vec(&meta.owner_references).unwrap_or_default(),
            meta.deletion_timestamp.is_some(),
            &self.spec.rule_set,
            &self.spec.hash,
            in_sync,
            confirmed,
            serde_json::to_vec(&meta.managed_fields).unwrap_or_default(),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(
        labels: serde_json::Value,
        rv: &str,
        annotations: serde_json::Value,
    ) -> PartialObjectMeta<Node> {
        let mut n: PartialObjectMeta<Node> = serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "n1", "uid": "u1", "resourceVersion": rv,
                         "labels": labels, "annotations": annotations,
                         "managedFields": [{"manager": "kubelet", "operation": "Update",
                                            "time": format!("2026-01-01T00:00:{rv:0>2}Z")}]},
        }))
        .unwrap();
        n.slim();
        n
    }

    #[test]
    fn node_heartbeats_start_no_round_label_changes_do() {
        let mut gate = Gate::default();
        assert!(gate.admit(&Event::Apply(node(json!({"pool": "a"}), "1", json!({})))));
        // Status heartbeats change resourceVersion and managedFields; annotations change too.
        for rv in 2..20 {
            let n = node(
                json!({"pool": "a"}),
                &rv.to_string(),
                json!({"note": rv.to_string()}),
            );
            assert!(!gate.admit(&Event::Apply(n)), "heartbeat {rv}");
        }
        assert!(gate.admit(&Event::Apply(node(json!({"pool": "b"}), "21", json!({})))));
        assert!(gate.admit(&Event::Delete(node(json!({"pool": "b"}), "22", json!({})))));
    }

    #[test]
    fn a_relist_starts_a_round_only_when_something_changed() {
        let mut gate = Gate::default();
        let a = node(json!({"pool": "a"}), "1", json!({}));
        for event in [Event::Init, Event::InitApply(a.clone())] {
            assert!(!gate.admit(&event));
        }
        assert!(
            gate.admit(&Event::<PartialObjectMeta<Node>>::InitDone),
            "first list"
        );
        // The same objects again (a watch that expired and relisted).
        let again = node(json!({"pool": "a"}), "7", json!({}));
        for event in [Event::Init, Event::InitApply(again)] {
            assert!(!gate.admit(&event));
        }
        assert!(!gate.admit(&Event::<PartialObjectMeta<Node>>::InitDone));
        // Deleted while the watch was down.
        assert!(!gate.admit(&Event::<PartialObjectMeta<Node>>::Init));
        assert!(gate.admit(&Event::<PartialObjectMeta<Node>>::InitDone));
    }

    fn rule_set(hash: &str) -> NodeAgentRuleSet {
        let rules: Vec<nodegate_crds::AgentRule> = vec![
            serde_json::from_value(json!({
            "policy": "p", "subjects": [{"kind": "Group", "name": "g"}],
            "endpoints": ["pods"], "namespaces": {"names": ["a"]}, "ports": ["Secure"]}))
            .unwrap(),
        ];
        let spec = crate::compiler::agent_spec(&rules);
        let real = spec.hash.clone();
        let mut r: NodeAgentRuleSet = serde_json::from_value(json!({
            "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeAgentRuleSet",
            "metadata": {"name": "nodegate-rules-1", "uid": "u1",
                         "labels": {"app.kubernetes.io/managed-by": "nodegate"}},
            "spec": {"policies": "p", "hash": if hash == "real" { real } else { hash.into() },
                     "subjects": spec.subjects, "namespaceSets": spec.namespace_sets,
                     "rules": spec.rules},
        }))
        .unwrap();
        r.slim();
        r
    }

    fn config(observed: Option<&str>, in_sync: bool, expiry: &str) -> NodeAgentConfig {
        let in_sync = if in_sync { "True" } else { "False" };
        let mut c: NodeAgentConfig = serde_json::from_value(json!({
            "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeAgentConfig",
            "metadata": {"name": "n1", "uid": "u1", "resourceVersion": expiry,
                         "labels": {"app.kubernetes.io/managed-by": "nodegate"}},
            "spec": {"ruleSet": "nodegate-rules-1"},
            "status": {"observedHash": observed,
                       "conditions": [{"type": "InSync", "status": in_sync, "reason": "R",
                                       "message": "", "lastTransitionTime": "2027-01-01T00:00:00Z"}],
                       "servingCertExpiry": format!("2027-01-01T00:00:{expiry:0>2}Z")},
        }))
        .unwrap();
        c.slim();
        c
    }

    #[test]
    fn a_rule_set_is_cached_without_rules() {
        let r = rule_set("real");
        assert!(r.spec.0.rules.is_empty() && r.spec.0.policies.is_empty());
        assert!(r.spec.0.subjects.is_empty() && r.spec.0.namespace_sets.is_empty());
        assert_eq!(r.spec.0.hash.len(), 64, "the hash of its rules stays");
    }

    #[test]
    fn a_config_matters_when_its_agent_confirms_a_version() {
        let c = config(None, false, "1");
        assert_eq!(c.spec.rule_set.as_deref(), Some("nodegate-rules-1"));
        let mut gate = Gate::default();
        assert!(gate.admit(&Event::Apply(c)));
        // The agent writes other status (certificate expiry), or loads versions it does not
        // say it is in sync with: nothing.
        assert!(!gate.admit(&Event::Apply(config(None, false, "2"))));
        assert!(!gate.admit(&Event::Apply(config(Some("old"), false, "3"))));
        // The agent confirms a version: its policies' status may change.
        assert!(gate.admit(&Event::Apply(config(Some("h1"), true, "4"))));
        assert!(!gate.admit(&Event::Apply(config(Some("h1"), true, "5"))));
        // And the next one, in sync all along (it loaded the new rules between two writes).
        assert!(gate.admit(&Event::Apply(config(Some("h2"), true, "6"))));
    }

    #[test]
    fn a_config_of_an_earlier_version_is_cached_with_only_its_hash() {
        let mut c: NodeAgentConfig = serde_json::from_value(json!({
            "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeAgentConfig",
            "metadata": {"name": "n1"},
            "spec": {"policies": "p", "hash": "h", "rules": [], "subjects": [{"kind": "Group", "name": "g"}]},
        }))
        .unwrap();
        c.slim();
        assert!(c.spec.subjects.is_empty() && c.spec.policies.is_empty());
        assert!(c.spec.hash.starts_with('h'));
    }

    #[test]
    fn a_rule_set_whose_rules_were_edited_keeps_a_hash_no_compile_gives() {
        let r = rule_set("0000");
        assert_ne!(r.spec.0.hash, "0000");
        assert!(r.spec.0.hash.starts_with("0000"));
    }

    #[test]
    fn owned_objects_matter_by_content() {
        let role = |rv: &str, verbs: serde_json::Value| -> ClusterRole {
            let mut r: ClusterRole = serde_json::from_value(json!({
                "metadata": {"name": "nodegate:p", "resourceVersion": rv,
                             "managedFields": [
                                 {"manager": FIELD_MANAGER, "operation": "Apply", "time": format!("2026-01-01T00:00:{rv:0>2}Z"),
                                  "fieldsType": "FieldsV1", "fieldsV1": {"f:rules": {}}},
                                 {"manager": "someone", "operation": "Update", "time": "2026-01-01T00:00:00Z"}]},
                "rules": [{"apiGroups": ["nodegate.io"], "resources": ["nodeagentconfigs/pods"], "verbs": verbs}],
            }))
            .unwrap();
            r.slim();
            r
        };
        let r = role("1", json!(["get"]));
        assert_eq!(
            r.metadata.managed_fields.as_ref().unwrap().len(),
            1,
            "only nodegate's entry"
        );
        let mut gate = Gate::default();
        assert!(gate.admit(&Event::Apply(r)));
        assert!(!gate.admit(&Event::Apply(role("2", json!(["get"])))));
        assert!(gate.admit(&Event::Apply(role("3", json!(["get", "create"])))));
    }

    #[test]
    fn policies_matter_by_generation_not_status() {
        let policy = |generation: i64, status: serde_json::Value| -> NodeApiPolicy {
            let mut p: NodeApiPolicy = serde_json::from_value(json!({
                "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeApiPolicy",
                "metadata": {"name": "p", "uid": "u", "generation": generation},
                "spec": {"subjects": [{"kind": "Group", "name": "g"}], "access": ["pods"],
                         "namespaces": {"names": ["a"]}},
                "status": status,
            }))
            .unwrap();
            p.slim();
            p
        };
        let mut gate = Gate::default();
        assert!(gate.admit(&Event::Apply(policy(1, json!({})))));
        assert!(!gate.admit(&Event::Apply(policy(1, json!({"matchedNodes": 3})))));
        assert!(gate.admit(&Event::Apply(policy(2, json!({"matchedNodes": 3})))));
    }
}
