//! What to write: desired objects compared with the cached ones on the fields nodegate sets,
//! so a resync with nothing changed sends no request at all.

use super::objects::{Key, Output};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// An object nodegate owns, as the watch cache holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Existing {
    pub uid: Option<String>,
    /// The object as JSON (shared with the reconciler's cache).
    pub body: std::sync::Arc<Value>,
}

/// The writes that bring the cluster to the desired state.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Missing or different objects, to apply.
    pub apply: Vec<Output>,
    /// Owned objects nothing asks for any more, with their uid (delete precondition).
    pub delete: Vec<(Key, Option<String>)>,
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
            Some(current) if !differs(&output.body, &current.body) => plan.unchanged += 1,
            _ => plan.apply.push(output),
        }
    }
    plan.delete = existing
        .iter()
        .filter(|(key, _)| !wanted.contains(*key))
        .map(|(key, e)| (key.clone(), e.uid.clone()))
        .collect();
    plan
}

/// Whether applying `desired` would change `existing`: content fields (everything but
/// apiVersion, kind, metadata and status, on either side) must be equal, empty and absent
/// being the same; the desired labels and annotations must be present with the same values
/// (others may add their own); owner references must be equal.
///
/// Both sides must have gone through [`strip_empty`] (the outputs and the reconciler's cache
/// do it once per object), so absent and empty compare equal without copying anything here:
/// on a quiet round of a large cluster this comparison is most of the work.
pub fn differs(desired: &Value, existing: &Value) -> bool {
    let (Some(d), Some(e)) = (desired.as_object(), existing.as_object()) else {
        return true;
    };
    let content =
        |k: &&String| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status");
    if d.keys()
        .chain(e.keys())
        .filter(content)
        .any(|k| d.get(k) != e.get(k))
    {
        return true;
    }
    let empty = Map::new();
    let dm = d
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let em = e
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for map in ["labels", "annotations"] {
        let want = dm.get(map).and_then(Value::as_object).unwrap_or(&empty);
        let have = em.get(map).and_then(Value::as_object).unwrap_or(&empty);
        if want.iter().any(|(k, v)| have.get(k) != Some(v)) {
            return true;
        }
    }
    dm.get("ownerReferences") != em.get("ownerReferences")
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

    /// What the cache holds: the server's copy, stripped like the desired side.
    fn server_copy(mut v: Value) -> Value {
        let m = v["metadata"].as_object_mut().unwrap();
        m.insert("resourceVersion".into(), json!("42"));
        m.insert("uid".into(), json!("abc"));
        m.insert("managedFields".into(), json!([{"manager": "nodegate"}]));
        m.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
        strip_empty(v)
    }

    fn differs(desired: &Value, existing: &Value) -> bool {
        super::differs(&strip_empty(desired.clone()), existing)
    }

    #[test]
    fn server_fields_and_extra_labels_are_not_differences() {
        let rules = json!([{"apiGroups": ["nodegate.io"], "resources": ["nodeagentconfigs/pods"],
                            "verbs": ["get"], "resourceNames": ["n1"]}]);
        let desired = role(
            json!({"app.kubernetes.io/managed-by": "nodegate"}),
            rules.clone(),
        );
        let mut existing = server_copy(desired.clone());
        existing["metadata"]["labels"]["team"] = json!("a");
        assert!(!differs(&desired, &existing));
    }

    #[test]
    fn changed_content_labels_or_owners_are_differences() {
        let rules = json!([{"apiGroups": [""], "resources": ["nodes/stats"], "verbs": ["get"]}]);
        let desired = role(json!({"a": "1"}), rules.clone());
        let mut e = server_copy(desired.clone());
        e["rules"][0]["verbs"] = json!(["get", "create"]);
        assert!(differs(&desired, &e), "edited rule");
        let mut e = server_copy(desired.clone());
        e["metadata"]["labels"]["a"] = json!("2");
        assert!(differs(&desired, &e), "edited label");
        let mut e = server_copy(desired.clone());
        e["metadata"]["ownerReferences"] = json!([]);
        assert!(differs(&desired, &e), "owner removed");
        let mut e = server_copy(desired.clone());
        e["aggregationRule"] = json!({"clusterRoleSelectors": [{"matchLabels": {"x": "y"}}]});
        assert!(differs(&desired, &e), "field only the cluster has");
        // A field nodegate no longer sets (resourceNames) must be removed, so it differs.
        let narrowed = json!([{"apiGroups": [""], "resources": ["nodes/stats"], "verbs": ["get"],
                               "resourceNames": ["n1"]}]);
        assert!(differs(
            &desired,
            &server_copy(role(json!({"a": "1"}), narrowed))
        ));
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
            body: v,
        };
        let same = role(json!({}), json!([{"verbs": ["get"]}]));
        let changed = role(json!({}), json!([{"verbs": ["create"]}]));
        let existing = BTreeMap::from([
            (
                k("same"),
                Existing {
                    uid: Some("1".into()),
                    body: server_copy(same.clone()).into(),
                },
            ),
            (
                k("changed"),
                Existing {
                    uid: Some("2".into()),
                    body: server_copy(same.clone()).into(),
                },
            ),
            (
                k("stale"),
                Existing {
                    uid: Some("3".into()),
                    body: server_copy(same.clone()).into(),
                },
            ),
        ]);
        let p = plan(
            vec![
                out("same", same),
                out("changed", changed),
                out("new", role(json!({}), json!([]))),
            ],
            &existing,
        );
        assert_eq!(p.unchanged, 1);
        let applied: Vec<_> = p.apply.iter().map(|o| o.key.name.as_str()).collect();
        assert_eq!(applied, ["changed", "new"]);
        assert_eq!(p.delete, vec![(k("stale"), Some("3".into()))]);
    }
}
