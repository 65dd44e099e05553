//! The compile at the scale test's shape (tests/tests/operator_scale.rs): policies on every
//! node or on one of ten pools, one to five namespaces each, half of them pods/stats and half
//! cadvisor/resource. The operator compiles on every change to a policy, node label or
//! namespace, so this is the floor of a round at scale.
//!
//! `cargo bench -p nodegate-compiler --bench compile` (results in docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use nodegate_compiler::{NamespaceInfo, NodeInfo, compile_shared};
use nodegate_crds::NodeApiPolicy;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;

struct Shape {
    policies: usize,
    nodes: usize,
    namespaces: usize,
}

impl Shape {
    fn inputs(&self) -> (Vec<NodeApiPolicy>, Vec<NodeInfo>, Vec<NamespaceInfo>) {
        let namespaces: Vec<NamespaceInfo> = (0..self.namespaces)
            .map(|i| NamespaceInfo {
                name: format!("ns{i}"),
                labels: BTreeMap::from([("team".to_string(), format!("t{}", i % 20))]),
            })
            .collect();
        let nodes: Vec<NodeInfo> = (0..self.nodes)
            .map(|i| NodeInfo {
                name: format!("n{i}"),
                uid: format!("uid-{i}"),
                labels: BTreeMap::from([
                    ("pool".to_string(), format!("p{}", i % 10)),
                    ("kubernetes.io/hostname".to_string(), format!("n{i}")),
                ]),
            })
            .collect();
        let policies = (0..self.policies)
            .map(|i| {
                let names: Vec<String> = (0..1 + i % 5)
                    .map(|k| (i * 7 + k * 13) % self.namespaces)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .map(|k| format!("ns{k}"))
                    .collect();
                let sa = i % 50;
                let mut spec = json!({
                    "subjects": [{"kind": "Group", "name": format!("g{i}")}],
                    "serviceAccounts": [{"namespace": format!("ns{}", sa % self.namespaces), "name": format!("sa{sa}")}],
                    "access": if i % 2 == 0 { json!(["pods", "stats"]) } else { json!(["cadvisor", "resource"]) },
                    "namespaces": {"names": names},
                });
                if i % 4 == 3 {
                    spec["nodeSelector"] = json!({"matchLabels": {"pool": format!("p{}", i % 10)}});
                }
                let mut policy =
                    NodeApiPolicy::new(&format!("p{i}"), serde_json::from_value(spec).unwrap());
                policy.metadata.uid = Some(format!("policy-uid-{i}"));
                policy
            })
            .collect();
        (policies, nodes, namespaces)
    }
}

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile_shared");
    group.sample_size(10);
    for shape in [
        Shape {
            policies: 200,
            nodes: 100,
            namespaces: 40,
        },
        Shape {
            policies: 1000,
            nodes: 500,
            namespaces: 200,
        },
    ] {
        let (policies, nodes, namespaces) = shape.inputs();
        let id = format!("{}x{}x{}", shape.policies, shape.nodes, shape.namespaces);
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| {
                black_box(compile_shared(
                    black_box(&policies),
                    &nodes,
                    &namespaces,
                    Some("bench"),
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, compile);
criterion_main!(benches);
