//! What the controller's watch caches keep of each object, and which watch events start a
//! round.
//!
//! A round compiles every policy, so an event that cannot change what a round decides must not
//! start one: at 500 nodes, kubelet heartbeats alone (a status write every 10 s per node) are
//! 50 events a second, and agents write their NodeAgentConfig's status whenever they load it.
//! Each watched kind names what a round reads of it ([`Watched::relevant`]); an event that
//! leaves that as it was still updates the cache, but starts nothing. The caches keep only what a
//! round reads ([`Watched::slim`]): above all, a NodeAgentConfig is kept without its rules (a
//! round compares rule sets by their hash), which is most of what the operator held at scale.

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher::Event;
use nodegate_crds::{FIELD_MANAGER, NodeAgentConfig, NodeAgentConfigSpec, NodeApiPolicy};
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

impl Watched for NodeAgentConfig {
    /// Each NodeAgentConfig is up to a few hundred KB: a page of 500 would be held whole.
    const PAGE_SIZE: u32 = 25;

    /// The rules go; their hash stays, and is what a round compares. A config whose rules do
    /// not hash to its `spec.hash` (edited by hand) keeps a hash no compiler output has, so the
    /// round writes it back.
    fn slim(&mut self) {
        own_managed_fields(&mut self.metadata);
        let spec = &mut self.spec;
        if crate::compiler::spec_hash(spec) != spec.hash {
            spec.hash = format!("{} (rules edited)", spec.hash);
        }
        // Everything but the hash (and whatever the format adds later: it is not kept).
        *spec = NodeAgentConfigSpec {
            hash: std::mem::take(&mut spec.hash),
            ..NodeAgentConfigSpec::default()
        };
    }

    /// Identity, labels, owners, the rules' hash, and whether its agent enforces that hash;
    /// not the rest of what its agent writes in status.
    fn relevant(&self) -> u64 {
        let meta = &self.metadata;
        let in_sync = self
            .status
            .as_ref()
            .and_then(|s| s.observed_hash.as_deref())
            == Some(self.spec.hash.as_str());
        digest((
            &meta.uid,
            &meta.labels,
            serde_json::to_vec(&meta.owner_references).unwrap_or_default(),
            meta.deletion_timestamp.is_some(),
            &self.spec.hash,
            in_sync,
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

    fn config(hash: &str, observed: Option<&str>, expiry: &str) -> NodeAgentConfig {
        let rules: Vec<nodegate_crds::AgentRule> = vec![
            serde_json::from_value(json!({
            "policy": "p", "subjects": [{"kind": "Group", "name": "g"}],
            "endpoints": ["pods"], "namespaces": {"names": ["a"]}, "ports": ["Secure"]}))
            .unwrap(),
        ];
        let spec = crate::compiler::agent_spec(&rules);
        let real = spec.hash.clone();
        let mut c: NodeAgentConfig = serde_json::from_value(json!({
            "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeAgentConfig",
            "metadata": {"name": "n1", "uid": "u1", "resourceVersion": expiry,
                         "labels": {"app.kubernetes.io/managed-by": "nodegate"}},
            "spec": {"policies": "p", "hash": if hash == "real" { real.clone() } else { hash.into() },
                     "subjects": spec.subjects, "namespaceSets": spec.namespace_sets,
                     "rules": spec.rules},
            "status": {"observedHash": observed.map(|o| if o == "real" { real.clone() } else { o.into() }),
                       "servingCertExpiry": format!("2027-01-01T00:00:{expiry:0>2}Z")},
        }))
        .unwrap();
        c.slim();
        c
    }

    #[test]
    fn a_config_is_cached_without_rules_and_its_agent_matters_only_when_sync_changes() {
        let c = config("real", None, "1");
        assert!(c.spec.rules.is_empty() && c.spec.policies.is_empty());
        assert!(c.spec.subjects.is_empty() && c.spec.namespace_sets.is_empty());
        assert_eq!(c.spec.hash.len(), 64, "the hash of its rules stays");
        let mut gate = Gate::default();
        assert!(gate.admit(&Event::Apply(c)));
        // The agent writes other status (certificate expiry), still behind: nothing.
        assert!(!gate.admit(&Event::Apply(config("real", Some("old"), "2"))));
        // The agent catches up: its policies' status may change.
        assert!(gate.admit(&Event::Apply(config("real", Some("real"), "3"))));
        assert!(!gate.admit(&Event::Apply(config("real", Some("real"), "4"))));
    }

    #[test]
    fn a_config_whose_rules_were_edited_keeps_a_hash_no_compile_gives() {
        let c = config("0000", None, "1");
        assert_ne!(c.spec.hash, "0000");
        assert!(c.spec.hash.starts_with("0000"));
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
