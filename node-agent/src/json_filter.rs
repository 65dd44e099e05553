//! Namespace filters for the kubelet's JSON documents (`/pods`, `/runningpods/`,
//! `/stats/summary`): items outside the caller's scope are removed, node-level sections kept only
//! for callers with every namespace.
//!
//! Pure: bytes in, bytes out. Fails closed: a document that does not parse, or lacks the list the
//! filter expects, is an error, never passed through. The kubelet always writes its list: an
//! empty pod list is `"items":null` (a nil Go slice) or `[]`, a node without pods has
//! `"pods":[]` (or `null`) in its summary; a document without the key is not a kubelet answer.
//! (The local cluster's kubelet with no pods answers `/pods` and `/runningpods/` with
//! `"items":null` and `/stats/summary` with `"pods":[]`.)
//!
//! The list is filtered while it is parsed, one item at a time: only the kept items are written
//! out (to a [`ListSink`], which may refuse to grow: the agent's memory budget), and the
//! document is never held as a `serde_json::Value` whole. Memory in flight is the input, the
//! kept items' bytes and one item's `Value`, instead of the 5-7 times the document a whole
//! `Value` and its re-serialisation took.

use crate::authz::FilterScope;
use nodegate_crds::Endpoint;
use nodegate_crds::catalogue::Scope;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

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
    /// The sink refused to hold more: the memory budget is spent.
    #[error("the memory budget for filtering is spent")]
    Budget,
}

/// Where the filtered list is written. `write` fails when the sink may not grow (the memory
/// budget is spent); `clear` forgets what was written (a later duplicate of the list key
/// replaces the earlier one, as in `serde_json::Value`).
pub trait ListSink: std::io::Write {
    fn clear(&mut self);
}

impl ListSink for Vec<u8> {
    fn clear(&mut self) {
        Vec::clear(self);
    }
}

/// A filtered document in three parts: `head`, then the bytes written to the sink, then
/// `tail`. Together they are the canonical JSON (keys sorted, no whitespace) of the filtered
/// document, exactly what `serde_json::to_vec` of its `Value` would give.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
}

/// Filters `body` (the kubelet's answer for `endpoint`) to `scope`, as the catalogue describes
/// the endpoint's document: items whose namespace is out of scope removed, node-level
/// top-level sections removed unless `all`.
pub fn filter(
    endpoint: Endpoint,
    body: &[u8],
    scope: &FilterScope,
) -> Result<Vec<u8>, FilterError> {
    let mut list = Vec::new();
    let parts = filter_into(endpoint, body, scope, &mut list)?;
    let mut out = parts.head;
    out.extend_from_slice(&list);
    out.extend_from_slice(&parts.tail);
    Ok(out)
}

/// [`filter`], with the kept items written to `sink` as they are found: the output is
/// `head`, the sink's bytes, `tail`.
pub fn filter_into<S: ListSink>(
    endpoint: Endpoint,
    body: &[u8],
    scope: &FilterScope,
    sink: &mut S,
) -> Result<Filtered, FilterError> {
    let Scope::JsonItems { items, node_level } = endpoint.spec().scope else {
        return Err(FilterError::NotFiltered(endpoint));
    };
    let (list, namespace_at) = parse_items_path(items).ok_or(FilterError::NotFiltered(endpoint))?;
    let mut state = State {
        others: BTreeMap::new(),
        list: ListState::Missing,
        not_object: false,
        exhausted: false,
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = DocSeed {
        list,
        namespace_at: &namespace_at,
        scope,
        sink: &mut *sink,
        state: &mut state,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    if let Err(e) = parsed {
        return Err(if state.exhausted {
            FilterError::Budget
        } else {
            FilterError::Parse(e.to_string())
        });
    }
    if state.not_object {
        return Err(FilterError::Shape(list));
    }
    match state.list {
        // A document without its list is not a kubelet answer: never relay it.
        ListState::Missing | ListState::Wrong => return Err(FilterError::Shape(list)),
        ListState::Null | ListState::Array => {}
    }
    if !scope.all() {
        for section in node_level {
            state.others.remove(*section);
        }
    }
    let mut out = Filtered::default();
    out.head.push(b'{');
    let mut before = true;
    let mut first = true;
    for (key, value) in &state.others {
        if before && key.as_str() > list {
            write_key(&mut out.head, list, &mut first)?;
            if state.list == ListState::Null {
                out.head.extend_from_slice(b"null");
            }
            before = false;
        }
        let part = if before { &mut out.head } else { &mut out.tail };
        write_key(part, key, &mut first)?;
        serde_json::to_writer(&mut *part, value).map_err(|e| FilterError::Parse(e.to_string()))?;
    }
    if before {
        write_key(&mut out.head, list, &mut first)?;
        if state.list == ListState::Null {
            out.head.extend_from_slice(b"null");
        }
    }
    out.tail.push(b'}');
    if state.list == ListState::Null {
        sink.clear();
    }
    Ok(out)
}

/// `,"key":` (no comma before the first).
fn write_key(out: &mut Vec<u8>, key: &str, first: &mut bool) -> Result<(), FilterError> {
    if !*first {
        out.push(b',');
    }
    *first = false;
    serde_json::to_writer(&mut *out, key).map_err(|e| FilterError::Parse(e.to_string()))?;
    out.push(b':');
    Ok(())
}

/// `items[].metadata.namespace` → (`items`, [`metadata`, `namespace`]).
fn parse_items_path(path: &'static str) -> Option<(&'static str, Vec<&'static str>)> {
    let (list, rest) = path.split_once("[].")?;
    Some((list, rest.split('.').collect()))
}

/// Whether an item is kept: its namespace (a non-empty string) is in scope; an item without
/// one is node-level data, kept only for `all`.
fn keeps(item: &Value, namespace_at: &[&str], scope: &FilterScope) -> bool {
    let ns = namespace_at
        .iter()
        .try_fold(item, |v, key| v.get(key))
        .and_then(Value::as_str);
    match ns {
        Some(ns) if !ns.is_empty() => scope.allows(ns),
        _ => scope.all(),
    }
}

/// What the last occurrence of the list key held (a later duplicate wins, as in `Value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListState {
    Missing,
    Null,
    /// Written to the sink.
    Array,
    /// Neither an array nor null.
    Wrong,
}

struct State {
    /// Every other top-level field (small: kind, metadata, the stats `node` section).
    others: BTreeMap<String, Value>,
    list: ListState,
    /// The document is valid JSON but not an object. Recorded, not returned at once, so a
    /// syntax error later in the document still reads as one.
    not_object: bool,
    /// The sink refused to grow.
    exhausted: bool,
}

struct DocSeed<'a, S> {
    list: &'static str,
    namespace_at: &'a [&'static str],
    scope: &'a FilterScope,
    sink: &'a mut S,
    state: &'a mut State,
}

impl<'de, S: ListSink> DeserializeSeed<'de> for DocSeed<'_, S> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// Consumes any value, recording only that it was not what was wanted.
macro_rules! not_wanted {
    ($ret:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($ret(self))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($ret(self))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($ret(self))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($ret(self))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($ret(self))
        }
    };
}

impl<'de, S: ListSink> Visitor<'de> for DocSeed<'_, S> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    not_wanted!(|v: Self| v.state.not_object = true);

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.state.not_object = true;
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.state.not_object = true;
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == self.list {
                self.sink.clear();
                self.state.list = map.next_value_seed(ListSeed {
                    namespace_at: self.namespace_at,
                    scope: self.scope,
                    sink: &mut *self.sink,
                    exhausted: &mut self.state.exhausted,
                })?;
            } else {
                let value: Value = map.next_value()?;
                self.state.others.insert(key, value);
            }
        }
        Ok(())
    }
}

struct ListSeed<'a, S> {
    namespace_at: &'a [&'static str],
    scope: &'a FilterScope,
    sink: &'a mut S,
    exhausted: &'a mut bool,
}

impl<'de, S: ListSink> DeserializeSeed<'de> for ListSeed<'_, S> {
    type Value = ListState;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ListState, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, S: ListSink> Visitor<'de> for ListSeed<'_, S> {
    type Value = ListState;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array or null")
    }

    not_wanted!(|_: Self| ListState::Wrong);

    fn visit_unit<E: de::Error>(self) -> Result<ListState, E> {
        Ok(ListState::Null)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ListState, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(ListState::Wrong)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<ListState, A::Error> {
        let mut first = true;
        self.write(b"[")?;
        // One item at a time: its Value is dropped before the next is parsed.
        while let Some(item) = seq.next_element::<Value>()? {
            if !keeps(&item, self.namespace_at, self.scope) {
                continue;
            }
            if !first {
                self.write(b",")?;
            }
            first = false;
            if serde_json::to_writer(&mut *self.sink, &item).is_err() {
                *self.exhausted = true;
                return Err(de::Error::custom("memory budget spent"));
            }
        }
        self.write(b"]")?;
        Ok(ListState::Array)
    }
}

impl<S: ListSink> ListSeed<'_, S> {
    fn write<E: de::Error>(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.sink.write_all(bytes).map_err(|_| {
            *self.exhausted = true;
            E::custom("memory budget spent")
        })
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

    /// A document without its list is no kubelet answer: refused, whatever the scope, so
    /// nothing of it is relayed (it passed with only `node` removed before).
    #[test]
    fn a_document_without_its_list_is_refused() {
        for s in [scope(false, &["a"]), scope(false, &[]), scope(true, &[])] {
            for (endpoint, body, list) in [
                (Endpoint::Pods, &b"{}"[..], "items"),
                (
                    Endpoint::Pods,
                    br#"{"kind":"PodList","apiVersion":"v1","metadata":{}}"#,
                    "items",
                ),
                (
                    Endpoint::RunningPods,
                    br#"{"kind":"PodList","pods":[]}"#,
                    "items",
                ),
                (Endpoint::Stats, b"{}", "pods"),
                (Endpoint::Stats, br#"{"node":{"nodeName":"n"}}"#, "pods"),
                (Endpoint::Stats, br#"{"node":{},"items":[]}"#, "pods"),
            ] {
                assert_eq!(
                    filter(endpoint, body, &s),
                    Err(FilterError::Shape(list)),
                    "{endpoint} {}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    /// What a real kubelet sends for an empty node still passes: `items` null (a nil Go
    /// slice) or `[]`, `pods` null or `[]`.
    #[test]
    fn legitimate_empty_answers_pass() {
        let s = scope(false, &["a"]);
        for (endpoint, body, want) in [
            (
                Endpoint::Pods,
                &br#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[]}"#[..],
                &br#"{"apiVersion":"v1","items":[],"kind":"PodList","metadata":{}}"#[..],
            ),
            (
                Endpoint::Pods,
                br#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":null}"#,
                br#"{"apiVersion":"v1","items":null,"kind":"PodList","metadata":{}}"#,
            ),
            (
                Endpoint::RunningPods,
                br#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":null}"#,
                br#"{"apiVersion":"v1","items":null,"kind":"PodList","metadata":{}}"#,
            ),
            (
                Endpoint::Stats,
                br#"{"node":{"nodeName":"n"},"pods":[]}"#,
                br#"{"pods":[]}"#,
            ),
            (
                Endpoint::Stats,
                br#"{"node":{"nodeName":"n"},"pods":null}"#,
                br#"{"pods":null}"#,
            ),
        ] {
            assert_eq!(
                String::from_utf8(filter(endpoint, body, &s).unwrap()).unwrap(),
                String::from_utf8(want.to_vec()).unwrap()
            );
        }
    }

    /// The sink's refusal (the memory budget) stops the filter with its own error.
    #[test]
    fn a_sink_that_cannot_grow_stops_the_filter() {
        struct Capped(Vec<u8>, usize);
        impl std::io::Write for Capped {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if self.0.len() + b.len() > self.1 {
                    return Err(std::io::Error::other("budget"));
                }
                self.0.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl ListSink for Capped {
            fn clear(&mut self) {
                self.0.clear();
            }
        }
        let mut sink = Capped(Vec::new(), 20);
        assert_eq!(
            filter_into(Endpoint::Pods, &pods(), &scope(true, &[]), &mut sink),
            Err(FilterError::Budget)
        );
        let mut sink = Capped(Vec::new(), 1 << 20);
        let parts = filter_into(Endpoint::Pods, &pods(), &scope(false, &["b"]), &mut sink).unwrap();
        let mut whole = parts.head.clone();
        whole.extend_from_slice(&sink.0);
        whole.extend_from_slice(&parts.tail);
        assert_eq!(
            whole,
            filter(Endpoint::Pods, &pods(), &scope(false, &["b"])).unwrap()
        );
    }

    /// The output is byte for byte what re-serialising the filtered `Value` gives (as the
    /// filter did before it streamed the list), pretty-printed input included.
    #[test]
    fn output_is_the_canonical_serialisation() {
        let doc: Value = serde_json::from_slice(&pods()).unwrap();
        let pretty = serde_json::to_vec_pretty(&doc).unwrap();
        let out = filter(Endpoint::Pods, &pretty, &scope(false, &["a"])).unwrap();
        let mut want = doc.clone();
        want["items"]
            .as_array_mut()
            .unwrap()
            .retain(|i| i["metadata"]["namespace"] == "a");
        assert_eq!(out, serde_json::to_vec(&want).unwrap());
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
            crate::test_skip::skip_or_fail(
                crate::test_skip::Class::ProvidedByCi,
                &format!("{} is absent", dir.display()),
                "check out the shared fixtures next to the repository (../shared/fixtures/kubelet/)",
            );
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
