//! What to write: desired objects compared with the cached ones on the fields nodegate owns,
//! so a resync with nothing changed sends no request at all, whatever other managers added.

use super::objects::{Key, Output};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// An object nodegate owns, as the watch cache holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Existing {
    /// uid and resourceVersion: the preconditions of every write to it.
    pub version: Version,
    /// The object as JSON, managedFields removed (shared with the reconciler's cache).
    pub body: std::sync::Arc<Value>,
    /// The fields nodegate's field manager owns by apply (its `fieldsV1`), None when it has
    /// no Apply entry (then nodegate applies once, which records its fields).
    pub owned: Option<std::sync::Arc<Value>>,
}

/// The uid and resourceVersion a write was planned against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Version {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// The writes that bring the cluster to the desired state.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Missing or different objects: created when missing, applied when the cache holds them.
    pub apply: Vec<Output>,
    /// Owned objects nothing asks for any more, with their version (delete preconditions).
    pub delete: Vec<(Key, Version)>,
    /// Objects already as desired.
    pub unchanged: usize,
}

/// Compares `desired` with the owned objects in `existing`.
pub fn plan(desired: Vec<Output>, existing: &BTreeMap<Key, Existing>) -> Plan {
    let mut plan = Plan::default();
    let mut wanted = std::collections::BTreeSet::new();
    for output in desired {
        wanted.insert(output.key.clone());
        match existing.get(&output.key) {
            Some(current) if !differs(&output.body, &current.body, current.owned.as_deref()) => {
                plan.unchanged += 1
            }
            _ => plan.apply.push(output),
        }
    }
    plan.delete = existing
        .iter()
        .filter(|(key, _)| !wanted.contains(*key))
        .map(|(key, e)| (key.clone(), e.version.clone()))
        .collect();
    plan
}

/// Whether applying `desired` would change what nodegate owns in `existing`. nodegate writes
/// by server-side apply, so the fields of the desired body are exactly the fields it owns:
/// those must be equal on the server; a field nodegate owns (`owned`, its managedFields
/// entry) that the desired body no longer has must be absent (the apply removes it);
/// anything else on the server belongs to another manager and is no reason to write
/// (kubernetes aggregation, `imagePullSecrets`, someone's label).
///
/// Lists follow their schema's list type: atomic lists (RBAC `rules` and `subjects`, every
/// list of the NodeAgentConfig CRD, `imagePullSecrets`) are owned whole and compared whole;
/// `metadata.ownerReferences` is a map list keyed by `uid` (other owners may add theirs).
/// A list of unknown type is compared whole, which can only cause a write, never miss one.
///
/// Both sides must have gone through [`strip_empty`](super::objects::strip_empty) (the
/// outputs and the reconciler's cache do it once per object), so absent and empty compare
/// equal without copying anything here: on a quiet round of a large cluster this is most of
/// the work.
pub fn differs(desired: &Value, existing: &Value, owned: Option<&Value>) -> bool {
    // Without an Apply entry nodegate cannot tell which fields it would remove: apply once.
    owned.is_none() || walk(desired, Some(existing), owned, "")
}

fn walk(desired: &Value, existing: Option<&Value>, owned: Option<&Value>, field: &str) -> bool {
    match desired {
        Value::Object(d) => {
            let Some(e) = existing.and_then(Value::as_object) else {
                return true;
            };
            d.iter().any(|(k, v)| {
                let owned_child = owned.and_then(|o| o.get(format!("f:{k}")));
                walk(v, e.get(k), owned_child, k)
            }) || owned_fields(owned).any(|k| !d.contains_key(k) && e.contains_key(k))
        }
        Value::Array(items) if field == "ownerReferences" => keyed(items, existing, owned, "uid"),
        _ => existing != Some(desired),
    }
}

/// The names of the fields `owned` (a fieldsV1 map) lists at this level.
fn owned_fields(owned: Option<&Value>) -> impl Iterator<Item = &str> {
    owned
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(Map::keys)
        .filter_map(|k| k.strip_prefix("f:"))
}

/// A map list (`x-kubernetes-list-type: map`) keyed by `key`: each desired item must be
/// present and equal on its owned fields; an item nodegate owns but no longer wants must be
/// gone; items of other managers are theirs.
fn keyed(desired: &[Value], existing: Option<&Value>, owned: Option<&Value>, key: &str) -> bool {
    let items = existing
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let find = |id: &Value| items.iter().find(|i| i.get(key) == Some(id));
    // fieldsV1 names an item `k:{"uid":"…"}`.
    let owned_items: Vec<(Value, &Value)> = owned
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            let id: Value = serde_json::from_str(k.strip_prefix("k:")?).ok()?;
            Some((id.get(key)?.clone(), v))
        })
        .collect();
    let owned_item = |id: &Value| owned_items.iter().find(|(i, _)| i == id).map(|(_, v)| *v);
    desired.iter().any(|item| match item.get(key) {
        Some(id) => walk(item, find(id), owned_item(id), ""),
        None => true,
    }) || owned_items
        .iter()
        .any(|(id, _)| !desired.iter().any(|d| d.get(key) == Some(id)) && find(id).is_some())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::controller::objects::{Kind, strip_empty};
    use serde_json::json;

    fn role(labels: Value, rules: Value) -> Value {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "nodegate:p", "labels": labels,
                            "ownerReferences": [{"apiVersion": "nodegate.io/v1alpha1",
                              "kind": "NodeApiPolicy", "name": "p", "uid": "u1",
                              "controller": true}]},
               "rules": rules})
    }

    /// The fieldsV1 the API server records for an apply of `body` (names and namespaces are
    /// not fields; ownerReferences is a map list keyed by uid, the other lists nodegate sets
    /// are atomic: `kubectl apply --server-side --show-managed-fields` of a ClusterRole, a
    /// ClusterRoleBinding and a ServiceAccount shows `f:rules: {}`, `f:subjects: {}`,
    /// `f:imagePullSecrets: {}`, `f:secrets: {k:{"name":…}}`, `f:ownerReferences: {k:{"uid":…}: {}}`).
    fn fields_of(body: &Value, field: &str) -> Value {
        match body {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "name" | "namespace"))
                    .map(|(k, v)| (format!("f:{k}"), fields_of(v, k)))
                    .collect(),
            ),
            Value::Array(items) if field == "ownerReferences" => {
                let mut m = Map::new();
                // As the API server records it (measured): an owner reference is owned whole.
                for item in items {
                    m.insert(format!("k:{{\"uid\":{}}}", item["uid"]), json!({}));
                }
                Value::Object(m)
            }
            _ => json!({}),
        }
    }

    /// What the cache holds: the server's copy, stripped like the desired side, and the
    /// fields an apply of `applied` gave nodegate.
    fn server_copy(mut v: Value) -> Value {
        let m = v["metadata"].as_object_mut().unwrap();
        m.insert("resourceVersion".into(), json!("42"));
        m.insert("uid".into(), json!("abc"));
        m.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
        strip_empty(v)
    }

    /// `desired` against `existing`, nodegate owning what an apply of `applied` set.
    fn differs_after(desired: &Value, existing: &Value, applied: &Value) -> bool {
        let owned = fields_of(&strip_empty(applied.clone()), "");
        super::differs(&strip_empty(desired.clone()), existing, Some(&owned))
    }

    fn differs(desired: &Value, existing: &Value) -> bool {
        differs_after(desired, existing, desired)
    }

    #[test]
    fn server_fields_and_other_managers_fields_are_not_differences() {
        let rules = json!([{"apiGroups": ["nodegate.io"], "resources": ["nodeagentconfigs/pods"],
                            "verbs": ["get"], "resourceNames": ["n1"]}]);
        let desired = role(
            json!({"app.kubernetes.io/managed-by": "nodegate"}),
            rules.clone(),
        );
        let mut existing = server_copy(desired.clone());
        existing["metadata"]["labels"]["team"] = json!("a");
        existing["metadata"]["annotations"] = json!({"note": "x"});
        assert!(!differs(&desired, &existing), "someone's label");
        // The aggregation controller's field, or anyone's, that nodegate never set.
        existing["aggregationRule"] =
            json!({"clusterRoleSelectors": [{"matchLabels": {"x": "y"}}]});
        assert!(
            !differs(&desired, &existing),
            "a field nodegate does not own"
        );
        // Another owner reference (a map list keyed by uid): theirs.
        existing["metadata"]["ownerReferences"]
            .as_array_mut()
            .unwrap()
            .push(json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "u9"}));
        assert!(!differs(&desired, &existing), "another owner reference");
    }

    #[test]
    fn service_account_fields_of_other_managers_are_not_differences() {
        let desired = json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "sa", "namespace": "ns",
                         "labels": {"app.kubernetes.io/managed-by": "nodegate"}}});
        let mut existing = server_copy(desired.clone());
        existing["imagePullSecrets"] = json!([{"name": "registry"}]);
        existing["automountServiceAccountToken"] = json!(false);
        existing["secrets"] = json!([{"name": "token"}]);
        assert!(!differs(&desired, &existing));
    }

    #[test]
    fn changed_owned_fields_are_differences() {
        let rules = json!([{"apiGroups": [""], "resources": ["nodes/stats"], "verbs": ["get"]}]);
        let desired = role(json!({"a": "1"}), rules.clone());
        let mut e = server_copy(desired.clone());
        e["rules"][0]["verbs"] = json!(["get", "create"]);
        assert!(differs(&desired, &e), "edited rule");
        let mut e = server_copy(desired.clone());
        e["rules"]
            .as_array_mut()
            .unwrap()
            .push(json!({"verbs": ["*"]}));
        assert!(differs(&desired, &e), "a rule added to the atomic list");
        let mut e = server_copy(desired.clone());
        e["metadata"]["labels"]["a"] = json!("2");
        assert!(differs(&desired, &e), "edited label");
        let mut e = server_copy(desired.clone());
        e["metadata"]["ownerReferences"] = json!([]);
        let e = strip_empty(e);
        assert!(differs(&desired, &e), "owner removed");
        let mut e = server_copy(desired.clone());
        e["metadata"]["ownerReferences"][0]["controller"] = json!(false);
        assert!(differs(&desired, &e), "owner edited");
        // A field nodegate no longer sets (resourceNames) must be removed, so it differs.
        let narrowed = json!([{"apiGroups": [""], "resources": ["nodes/stats"], "verbs": ["get"],
                               "resourceNames": ["n1"]}]);
        assert!(differs(
            &desired,
            &server_copy(role(json!({"a": "1"}), narrowed))
        ));
    }

    #[test]
    fn owned_fields_no_longer_desired_are_differences() {
        let wide = role(json!({"a": "1", "b": "2"}), json!([{"verbs": ["get"]}]));
        let existing = server_copy(wide.clone());
        // Every rule revoked: the desired body has no rules at all, nodegate owns them.
        let revoked = role(json!({"a": "1", "b": "2"}), json!([]));
        assert!(differs_after(&revoked, &existing, &wide), "rules revoked");
        // A label nodegate set and dropped.
        let fewer = role(json!({"a": "1"}), json!([{"verbs": ["get"]}]));
        assert!(differs_after(&fewer, &existing, &wide), "label dropped");
        // An owner reference nodegate set and dropped.
        let mut two = wide.clone();
        two["metadata"]["ownerReferences"]
            .as_array_mut()
            .unwrap()
            .push(
                json!({"apiVersion": "nodegate.io/v1alpha1", "kind": "NodeApiPolicy",
                         "name": "q", "uid": "u2"}),
            );
        assert!(
            differs_after(&wide, &server_copy(two.clone()), &two),
            "owner dropped"
        );
        // The same fields, but another manager's: not nodegate's to remove.
        assert!(!differs_after(&fewer, &existing, &fewer));
        // No Apply entry at all: apply once.
        assert!(super::differs(&strip_empty(wide.clone()), &existing, None));
    }

    #[test]
    fn empty_and_absent_lists_are_equal() {
        let desired = strip_empty(role(json!({}), json!([])));
        let existing = server_copy(role(json!({}), Value::Null));
        assert!(!differs(&desired, &existing));
        let mut e2 = existing.clone();
        e2.as_object_mut().unwrap().remove("rules");
        assert!(!differs(&desired, &e2));
    }

    #[test]
    fn plan_applies_missing_and_changed_deletes_unwanted() {
        let k = |n: &str| Key::new(Kind::ClusterRole, None, n);
        let out = |n: &str, v: Value| Output {
            key: k(n),
            policies: Default::default(),
            body: strip_empty(v),
            announce: true,
        };
        let same = role(json!({}), json!([{"verbs": ["get"]}]));
        let changed = role(json!({}), json!([{"verbs": ["create"]}]));
        let cached = |uid: &str| Existing {
            version: Version {
                uid: Some(uid.into()),
                resource_version: Some(format!("rv{uid}")),
            },
            body: server_copy(same.clone()).into(),
            owned: Some(fields_of(&strip_empty(same.clone()), "").into()),
        };
        let existing = BTreeMap::from([
            (k("same"), cached("1")),
            (k("changed"), cached("2")),
            (k("stale"), cached("3")),
        ]);
        let p = plan(
            vec![
                out("same", same.clone()),
                out("changed", changed),
                out("new", role(json!({}), json!([]))),
            ],
            &existing,
        );
        assert_eq!(p.unchanged, 1);
        let applied: Vec<_> = p.apply.iter().map(|o| o.key.name.as_str()).collect();
        assert_eq!(applied, ["changed", "new"]);
        assert_eq!(p.delete, vec![(k("stale"), cached("3").version)]);
    }
}
