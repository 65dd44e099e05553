//! Bolero target for the JSON filter (`/pods`, `/runningpods/`, `/stats/summary`).
//!
//! Runs as an ordinary bounded test under `cargo test` (2000 random inputs). For long runs under
//! libFuzzer, see `docs/fuzzing.md`:
//!
//! ```text
//! nice -n 19 cargo +nightly bolero test -p nodegate-agent fuzz_json_filter -T 480s
//! ```
//!
//! Each input is used twice: as raw bytes, and as choices that build a pod list or stats summary
//! (namespaces in and out of scope, empty, missing or not strings; items and `metadata` that are
//! not objects; node-level sections; `null`, missing or malformed lists). Properties, for every
//! input, endpoint and scope: no panic; the result is an error exactly when the document does not
//! parse, is not an object, or lacks its list (missing, or neither an array nor `null`: `{}` is
//! refused, never relayed with only `node` removed); otherwise the output parses, is canonical
//! JSON (no duplicate keys), keeps every other top-level field unchanged, drops the node-level sections unless the scope
//! has `all`, and its list is exactly the input items that are in scope, unchanged and in order:
//! no item of a namespace outside the scope survives, and an item without a (string, non-empty)
//! namespace survives only for `all`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nodegate_agent::authz::{FilterScope, Grant};
use nodegate_agent::json_filter::{FilterError, filter};
use nodegate_crds::catalogue::Scope;
use nodegate_crds::{Endpoint, ResolvedNamespaces};
use serde_json::{Map, Value, json};
use std::sync::LazyLock;

/// A scope written as (all, namespaces) per grant, so the test reads it without `FilterScope`.
type Grants = &'static [(bool, &'static [&'static str])];

const SCOPES: &[Grants] = &[
    &[(false, &["a"])],
    &[(false, &["a", "b"])],
    &[(false, &[])],
    &[(true, &[])],
    &[(false, &["c"]), (false, &["a"])],
    &[],
    &[(false, &["a"]), (true, &[])],
];

static FILTER_SCOPES: LazyLock<Vec<FilterScope>> = LazyLock::new(|| {
    SCOPES
        .iter()
        .map(|grants| FilterScope {
            grants: grants
                .iter()
                .map(|(all, names)| Grant {
                    namespaces: ResolvedNamespaces {
                        all: *all,
                        names: names.iter().map(|s| s.to_string()).collect(),
                    },
                    metrics: None,
                })
                .collect(),
        })
        .collect()
});

/// What the test expects of each filtered endpoint, written out independently of the catalogue.
struct Shape {
    endpoint: Endpoint,
    list: &'static str,
    namespace_at: &'static str,
    node_level: &'static [&'static str],
}

const SHAPES: &[Shape] = &[
    Shape {
        endpoint: Endpoint::Pods,
        list: "items",
        namespace_at: "/metadata/namespace",
        node_level: &[],
    },
    Shape {
        endpoint: Endpoint::RunningPods,
        list: "items",
        namespace_at: "/metadata/namespace",
        node_level: &[],
    },
    Shape {
        endpoint: Endpoint::Stats,
        list: "pods",
        namespace_at: "/podRef/namespace",
        node_level: &["node", "systemContainers"],
    },
];

fn keeps(grants: Grants, item: &Value, namespace_at: &str) -> bool {
    let all = grants.iter().any(|(all, _)| *all);
    match item.pointer(namespace_at).and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() => all || grants.iter().any(|(_, names)| names.contains(&ns)),
        _ => all,
    }
}

/// Checks every property for one body, endpoint and scope; panics with a message on a violation.
fn check_one(shape: &Shape, grants: Grants, scope: &FilterScope, body: &[u8]) {
    let result = filter(shape.endpoint, body, scope);
    let ctx = || {
        let result = result.as_ref().map(|out| String::from_utf8_lossy(out));
        format!(
            "{} {grants:?} {:?} -> {result:?}",
            shape.endpoint,
            String::from_utf8_lossy(body)
        )
    };
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        assert!(matches!(result, Err(FilterError::Parse(_))), "{}", ctx());
        return;
    };
    let Some(input) = doc.as_object() else {
        assert_eq!(result, Err(FilterError::Shape(shape.list)), "{}", ctx());
        return;
    };
    let input_list = input.get(shape.list);
    // A document without its list is no kubelet answer (fail closed, whatever the scope).
    if !matches!(input_list, Some(Value::Null | Value::Array(_))) {
        assert_eq!(result, Err(FilterError::Shape(shape.list)), "{}", ctx());
        return;
    }
    let out = result
        .as_ref()
        .unwrap_or_else(|e| panic!("refused a good document ({e}): {}", ctx()));
    let out_doc: Value = serde_json::from_slice(out)
        .unwrap_or_else(|e| panic!("output does not parse ({e}): {}", ctx()));
    assert_eq!(
        &serde_json::to_vec(&out_doc).unwrap(),
        out,
        "output is not canonical: {}",
        ctx()
    );
    let output: &Map<String, Value> = out_doc
        .as_object()
        .unwrap_or_else(|| panic!("output is not an object: {}", ctx()));

    let all = grants.iter().any(|(all, _)| *all);
    for (key, value) in input {
        if key == shape.list {
            continue;
        }
        if !all && shape.node_level.contains(&key.as_str()) {
            assert!(
                output.get(key).is_none(),
                "node-level {key} kept: {}",
                ctx()
            );
        } else {
            assert_eq!(output.get(key), Some(value), "{key} changed: {}", ctx());
        }
    }
    for key in output.keys() {
        assert!(input.contains_key(key), "{key} added: {}", ctx());
    }

    let output_list = output.get(shape.list);
    let items = match input_list {
        Some(Value::Array(items)) => items,
        other => {
            assert_eq!(output_list, other, "{}", ctx());
            return;
        }
    };
    let Some(Value::Array(kept)) = output_list else {
        panic!("list lost: {}", ctx());
    };
    for item in kept {
        assert!(
            keeps(grants, item, shape.namespace_at),
            "out-of-scope item {item} kept: {}",
            ctx()
        );
    }
    let want: Vec<&Value> = items
        .iter()
        .filter(|item| keeps(grants, item, shape.namespace_at))
        .collect();
    let kept: Vec<&Value> = kept.iter().collect();
    assert_eq!(
        kept,
        want,
        "kept items are not the in-scope input items: {}",
        ctx()
    );
}

fn check_body(body: &[u8]) {
    for shape in SHAPES {
        for (grants, scope) in SCOPES.iter().zip(FILTER_SCOPES.iter()) {
            check_one(shape, grants, scope, body);
        }
    }
}

/// Reads choices from the fuzz input; zeros once it runs out, so generation always ends.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn next(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn pick<T: Clone>(&mut self, options: &[T]) -> T {
        options[self.next() as usize % options.len()].clone()
    }
}

fn namespace(c: &mut Choices) -> Option<Value> {
    c.pick(&[
        Some(json!("a")),
        Some(json!("b")),
        Some(json!("c")),
        Some(json!("a")),
        Some(json!("c")),
        Some(json!("")),
        None,
        Some(json!("A")),
        Some(json!("a ")),
        Some(json!("kube-system")),
        Some(json!(null)),
        Some(json!(1)),
        Some(json!(["a"])),
        Some(json!({"a": "a"})),
        Some(json!(true)),
    ])
}

fn filler(c: &mut Choices) -> Value {
    c.pick(&[
        json!(1),
        json!(-0.5),
        json!(1e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!("namespace"),
        json!("\u{e9}\"\\\n"),
        json!(null),
        json!([]),
        json!({}),
        json!({"namespace": "c"}),
        json!([{"metadata": {"namespace": "c"}}]),
    ])
}

fn item(c: &mut Choices, shape: &Shape, i: usize) -> Value {
    let reference_key = if shape.list == "pods" {
        "podRef"
    } else {
        "metadata"
    };
    match c.next() % 10 {
        // Not an object, or a reference that is not one.
        0 => filler(c),
        1 => json!({ reference_key: filler(c), "namespace": "a" }),
        _ => {
            let mut reference = Map::new();
            reference.insert("name".into(), json!(format!("p{i}")));
            if let Some(ns) = namespace(c) {
                reference.insert("namespace".into(), ns);
            }
            if c.next().is_multiple_of(3) {
                reference.insert("uid".into(), filler(c));
            }
            let mut item = Map::new();
            item.insert(reference_key.into(), Value::Object(reference));
            if c.next().is_multiple_of(2) {
                item.insert("spec".into(), json!({"containers": [{"name": "c"}]}));
            }
            if c.next().is_multiple_of(3) {
                item.insert("extra".into(), filler(c));
            }
            Value::Object(item)
        }
    }
}

/// Builds a document of the endpoint's shape (mostly) from the choices.
fn document(c: &mut Choices, shape: &Shape) -> Value {
    let n = c.next() as usize % 9;
    let items: Vec<Value> = (0..n).map(|i| item(c, shape, i)).collect();
    let list = match c.next() % 12 {
        0 => Value::Null,
        1 => filler(c),
        2 => return Value::Array(items),
        _ => Value::Array(items),
    };
    let mut doc = Map::new();
    if !c.next().is_multiple_of(8) {
        doc.insert(shape.list.into(), list);
    }
    for (key, value) in [
        ("kind", json!("PodList")),
        ("apiVersion", json!("v1")),
        ("metadata", json!({"resourceVersion": "1"})),
        (
            "node",
            json!({"nodeName": "n", "cpu": {"usageNanoCores": 1}, "systemContainers": [{"name": "kubelet"}]}),
        ),
        ("systemContainers", json!([{"name": "runtime"}])),
        ("items", json!([{"metadata": {"namespace": "c"}}])),
        ("pods", json!([{"podRef": {"namespace": "c"}}])),
    ] {
        if key != shape.list && c.next().is_multiple_of(3) {
            doc.insert(key.into(), value);
        }
    }
    Value::Object(doc)
}

#[test]
fn fuzz_json_filter() {
    bolero::check!()
        .with_iterations(2000)
        .for_each(|data: &[u8]| {
            check_body(data);
            let mut c = Choices(data);
            let shape = &SHAPES[c.next() as usize % SHAPES.len()];
            let doc = document(&mut c, shape);
            let body = if c.next().is_multiple_of(2) {
                serde_json::to_vec(&doc).unwrap()
            } else {
                serde_json::to_vec_pretty(&doc).unwrap()
            };
            check_body(&body);
        });
}

/// Every other endpoint has no JSON filter, whatever the body.
#[test]
fn other_endpoints_are_not_filtered() {
    for endpoint in Endpoint::all() {
        if matches!(endpoint.spec().scope, Scope::JsonItems { .. }) {
            assert!(SHAPES.iter().any(|s| s.endpoint == endpoint), "{endpoint}");
            continue;
        }
        assert_eq!(
            filter(endpoint, b"{\"items\":[]}", &FILTER_SCOPES[3]),
            Err(FilterError::NotFiltered(endpoint))
        );
    }
}

/// Inputs a long run or a break-check found, kept as regression tests.
#[test]
fn regressions() {
    for body in [
        &br#"{"items":[{"metadata":{"namespace":"c"}}],"items":null}"#[..],
        br#"{"items":null,"items":[{"metadata":{"namespace":"c"}}]}"#,
        br#"{"pods":[{"podRef":{"namespace":"c"}},{"podRef":"a","namespace":"a"}],"node":{}}"#,
        br#"{"items":[{"metadata":{"namespace":"a"}},1,null,{"metadata":{"namespace":["a"]}}]}"#,
        b"{\"items\":[{\"metadata\":{\"namespace\":\"a\\u0000\"}}]}",
        // No list at all: refused (they passed with only `node` removed before).
        b"{}",
        br#"{"kind":"PodList","apiVersion":"v1","metadata":{}}"#,
        br#"{"node":{"nodeName":"n"},"systemContainers":[]}"#,
    ] {
        check_body(body);
    }
}
