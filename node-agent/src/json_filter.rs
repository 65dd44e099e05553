//! Namespace filters for the kubelet's JSON documents (`/pods`, `/runningpods/`,
//! `/stats/summary`): items outside the caller's scope are removed, node-level sections kept only
//! for callers with every namespace.
//!
//! Pure: bytes in, bytes out. Fails closed: a document that does not parse, or lacks the list the
//! filter expects, is an error, never passed through.

use crate::authz::FilterScope;
use nodegate_crds::Endpoint;
use nodegate_crds::catalogue::Scope;
use serde_json::Value;

/// Largest upstream JSON document the agent parses; a larger one is refused (502), since it
/// cannot be filtered without holding it whole.
pub const DEFAULT_MAX_JSON_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("upstream JSON document exceeds {0} bytes")]
    TooLarge(usize),
    #[error("upstream JSON document does not parse: {0}")]
    Parse(String),
    #[error("upstream JSON document has no {0} list")]
    Shape(&'static str),
    #[error("{0} has no JSON filter")]
    NotFiltered(Endpoint),
}

/// Filters `body` (the kubelet's answer for `endpoint`) to `scope`, as the catalogue describes
/// the endpoint's document: items whose namespace is out of scope removed, node-level
/// top-level sections removed unless `all`.
pub fn filter(
    endpoint: Endpoint,
    body: &[u8],
    scope: &FilterScope,
) -> Result<Vec<u8>, FilterError> {
    let Scope::JsonItems { items, node_level } = endpoint.spec().scope else {
        return Err(FilterError::NotFiltered(endpoint));
    };
    let (list, namespace_at) = parse_items_path(items).ok_or(FilterError::NotFiltered(endpoint))?;
    let mut doc: Value =
        serde_json::from_slice(body).map_err(|e| FilterError::Parse(e.to_string()))?;
    retain(&mut doc, list, &namespace_at, scope)?;
    if !scope.all()
        && let Some(object) = doc.as_object_mut()
    {
        for section in node_level {
            object.remove(*section);
        }
    }
    serde_json::to_vec(&doc).map_err(|e| FilterError::Parse(e.to_string()))
}

/// `items[].metadata.namespace` → (`items`, [`metadata`, `namespace`]).
fn parse_items_path(path: &'static str) -> Option<(&'static str, Vec<&'static str>)> {
    let (list, rest) = path.split_once("[].")?;
    Some((list, rest.split('.').collect()))
}

fn retain(
    doc: &mut Value,
    list: &'static str,
    namespace_at: &[&str],
    scope: &FilterScope,
) -> Result<(), FilterError> {
    let field = doc
        .as_object_mut()
        .ok_or(FilterError::Shape(list))?
        .get_mut(list);
    match field {
        // The kubelet writes `"items": null` for an empty pod list.
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(items)) => {
            items.retain(|item| {
                let ns = namespace_at
                    .iter()
                    .try_fold(item, |v, key| v.get(key))
                    .and_then(Value::as_str);
                match ns {
                    Some(ns) if !ns.is_empty() => scope.allows(ns),
                    // An item without a namespace is node-level data.
                    _ => scope.all(),
                }
            });
            Ok(())
        }
        Some(_) => Err(FilterError::Shape(list)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::authz::Grant;
    use nodegate_crds::ResolvedNamespaces;
    use serde_json::json;

    fn scope(all: bool, names: &[&str]) -> FilterScope {
        FilterScope {
            grants: vec![Grant {
                namespaces: ResolvedNamespaces {
                    all,
                    names: names.iter().map(|s| s.to_string()).collect(),
                },
                metrics: None,
            }],
        }
    }

    fn pods() -> Vec<u8> {
        serde_json::to_vec(&json!({
            "kind": "PodList", "apiVersion": "v1", "metadata": {},
            "items": [
                {"metadata": {"name": "a1", "namespace": "a"}},
                {"metadata": {"name": "b1", "namespace": "b"}},
                {"metadata": {"name": "odd"}},
                {"metadata": {"name": "a2", "namespace": "a"}},
            ]
        }))
        .unwrap()
    }

    fn names(doc: &Value, list: &str, at: &[&str]) -> Vec<String> {
        doc[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                at.iter()
                    .fold(i, |v, k| &v[*k])
                    .as_str()
                    .unwrap_or("-")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn pods_keep_only_scoped_namespaces() {
        let out = filter(Endpoint::Pods, &pods(), &scope(false, &["a"])).unwrap();
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            names(&doc, "items", &["metadata", "name"]),
            vec!["a1", "a2"]
        );
        assert_eq!(doc["kind"], "PodList");
        let out = filter(Endpoint::RunningPods, &pods(), &scope(true, &[])).unwrap();
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["items"].as_array().unwrap().len(), 4);
        let out = filter(Endpoint::Pods, &pods(), &scope(false, &[])).unwrap();
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert!(doc["items"].as_array().unwrap().is_empty());
    }

    #[test]
    fn stats_drop_node_sections_unless_all() {
        let body = serde_json::to_vec(&json!({
            "node": {"nodeName": "n", "cpu": {"usageNanoCores": 1}, "systemContainers": [{"name": "kubelet"}]},
            "pods": [
                {"podRef": {"name": "a1", "namespace": "a"}},
                {"podRef": {"name": "b1", "namespace": "b"}}
            ]
        }))
        .unwrap();
        let out = filter(Endpoint::Stats, &body, &scope(false, &["b"])).unwrap();
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(names(&doc, "pods", &["podRef", "name"]), vec!["b1"]);
        assert!(doc.get("node").is_none());
        let out = filter(Endpoint::Stats, &body, &scope(true, &[])).unwrap();
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["node"]["systemContainers"][0]["name"], "kubelet");
        assert_eq!(doc["pods"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn fails_closed_on_bad_documents() {
        let s = scope(false, &["a"]);
        assert!(matches!(
            filter(Endpoint::Pods, b"{\"items\": [", &s),
            Err(FilterError::Parse(_))
        ));
        assert_eq!(
            filter(Endpoint::Pods, b"{\"items\": {}}", &s),
            Err(FilterError::Shape("items"))
        );
        assert_eq!(
            filter(Endpoint::Pods, b"[]", &s),
            Err(FilterError::Shape("items"))
        );
        assert_eq!(
            filter(Endpoint::Cadvisor, b"{}", &s),
            Err(FilterError::NotFiltered(Endpoint::Cadvisor))
        );
        // An empty list written as null stays null.
        assert_eq!(
            filter(Endpoint::Pods, b"{\"items\":null}", &s).unwrap(),
            b"{\"items\":null}"
        );
    }

    #[test]
    fn namespace_must_be_a_string() {
        let body =
            br#"{"items":[{"metadata":{"namespace":["a"]}},{"metadata":{"namespace":"a"}}]}"#;
        let out = filter(Endpoint::Pods, body, &scope(false, &["a"])).unwrap();
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["items"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn real_kubelet_pod_list_fixture_if_present() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/kubelet");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            eprintln!("skipped: {} is absent", dir.display());
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.ends_with(".json") || !name.contains("pods") {
                continue;
            }
            let body = std::fs::read(entry.path()).unwrap();
            let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
                continue;
            };
            if !doc.get("items").is_some_and(Value::is_array) {
                continue;
            }
            let out = filter(Endpoint::Pods, &body, &scope(false, &["kube-system"])).unwrap();
            let out: Value = serde_json::from_slice(&out).unwrap();
            for item in out["items"].as_array().unwrap() {
                assert_eq!(item["metadata"]["namespace"], "kube-system", "{name}");
            }
        }
    }
}
