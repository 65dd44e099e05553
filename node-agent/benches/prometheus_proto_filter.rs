//! Throughput of the protobuf metrics filter (`ProtoFilter`) on node-1's real protobuf answers
//! (`node-agent/tests/captures/`, captured with Prometheus' Accept header) and on a larger
//! synthetic cAdvisor answer generated from the real one at bench time (a full node: 110 pods in
//! 10 namespaces, every namespaced series of the capture repeated per pod; never written to the
//! repo). Each body is repeated to about 8 MiB and fed in 64 KiB chunks like an HTTP body:
//! filtered to one namespace, and with `all` (through the filter; the agent bypasses it only for
//! `all` without metric transforms). Throughput is input bytes per second, one thread.
//!
//! `cargo bench -p nodegate-agent --bench prometheus_proto_filter`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/metrics_proto.rs"]
mod pb;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nodegate_agent::prometheus::{FilterConfig, FilterRules, Grant, ProtoFilter};
use nodegate_crds::ResolvedNamespaces;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const TARGET_SIZE: usize = 8 << 20;
const CHUNK: usize = 64 << 10;

fn rules(namespaces: ResolvedNamespaces) -> Arc<FilterRules> {
    let config = FilterConfig {
        grants: vec![Grant {
            namespaces,
            metrics: None,
        }],
    };
    Arc::new(FilterRules::new(&config).unwrap())
}

fn run(rules: &Arc<FilterRules>, data: &[u8], out: &mut Vec<u8>) -> usize {
    let mut filter = ProtoFilter::new(rules.clone());
    out.clear();
    for chunk in data.chunks(CHUNK) {
        filter.push(chunk, out).unwrap();
    }
    filter.finish().unwrap();
    out.len()
}

fn busiest_namespace(families: &[pb::MetricFamily]) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for m in families.iter().flat_map(|f| &f.metric) {
        if let Some(ns) = m.label_value("namespace").filter(|n| !n.is_empty()) {
            *counts.entry(ns).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(n, _)| n.to_string())
}

/// A full node from the capture: each namespaced metric once per pod of 110, in 10 namespaces,
/// with the pod's name, namespace and uid in its labels; node-level series once.
fn synthetic_node(capture: &[pb::MetricFamily]) -> Vec<pb::MetricFamily> {
    let mut out = Vec::new();
    for family in capture {
        // The series of the family's first pod are the template of every pod.
        let first_pod = family
            .metric
            .iter()
            .find(|m| m.label_value("namespace").is_some_and(|n| !n.is_empty()))
            .map(|m| (m.label_value("namespace"), m.label_value("pod")));
        let mut metrics = Vec::new();
        let mut templates: Vec<&pb::Metric> = Vec::new();
        for m in &family.metric {
            match m.label_value("namespace") {
                Some(ns) if !ns.is_empty() => {
                    if Some((Some(ns), m.label_value("pod"))) == first_pod {
                        templates.push(m);
                    }
                }
                _ => metrics.push(m.clone()),
            }
        }
        for pod in 0..110 {
            for t in &templates {
                let mut m = (*t).clone();
                for l in &mut m.label {
                    let value = match l.name.as_deref() {
                        Some("namespace") => format!("namespace-{:02}", pod % 10),
                        Some("pod") => format!("workload-{pod:03}-7d9f8b6c5d-x2k4q"),
                        Some("id") => format!(
                            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod:08x}_1b2c_4d5e_8f90_a1b2c3d4e5f6.slice"
                        ),
                        _ => continue,
                    };
                    l.value = Some(value);
                }
                metrics.push(m);
            }
        }
        out.push(pb::MetricFamily {
            metric: metrics,
            ..family.clone()
        });
    }
    out
}

fn bench(c: &mut Criterion) {
    let captures: [(&str, &[u8]); 3] = [
        (
            "cadvisor",
            include_bytes!("../tests/captures/node-1-cadvisor.pb"),
        ),
        (
            "metrics",
            include_bytes!("../tests/captures/node-1-metrics.pb"),
        ),
        (
            "resource",
            include_bytes!("../tests/captures/node-1-resource.pb"),
        ),
    ];
    let mut bodies: Vec<(String, Vec<u8>)> = captures
        .iter()
        .map(|(n, b)| (format!("proto {n} node-1"), b.to_vec()))
        .collect();
    let cadvisor = pb::decode_stream(captures[0].1).unwrap();
    bodies.push((
        "proto cadvisor synthetic 110 pods".into(),
        pb::encode_stream(&synthetic_node(&cadvisor)),
    ));
    for (name, body) in bodies {
        let families = pb::decode_stream(&body).unwrap();
        let data = body.repeat(TARGET_SIZE.div_ceil(body.len()));
        eprintln!(
            "{name}: {} bytes, repeated to {} bytes",
            body.len(),
            data.len()
        );
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));
        let mut out = Vec::with_capacity(data.len());
        if let Some(ns) = busiest_namespace(&families) {
            let one = rules(ResolvedNamespaces {
                all: false,
                names: vec![ns],
            });
            group.bench_function("one-namespace", |b| {
                b.iter(|| black_box(run(&one, &data, &mut out)))
            });
        }
        let all = rules(ResolvedNamespaces {
            all: true,
            names: vec![],
        });
        group.bench_function("all", |b| b.iter(|| black_box(run(&all, &data, &mut out))));
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
