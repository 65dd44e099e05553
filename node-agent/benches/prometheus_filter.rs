//! Throughput of the Prometheus text filter on the real kubelet captures in
//! `../shared/fixtures/kubelet/` (read in place), each repeated to about 8 MiB and fed in 64 KiB
//! chunks like an HTTP body: for the capture's most frequent namespace, and for `all`.
//!
//! `cargo bench -p nodegate-agent --bench prometheus_filter`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nodegate_agent::prometheus::{Filter, FilterConfig, FilterRules, Format, Grant};
use nodegate_crds::ResolvedNamespaces;
use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
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

/// The most frequent `namespace="…"` value (a plain substring count is enough to pick one).
fn busiest_namespace(text: &str) -> Option<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in text.lines() {
        if let Some(at) = line.find("namespace=\"") {
            let rest = &line[at + 11..];
            if let Some(end) = rest.find('"')
                && end > 0
            {
                *counts.entry(&rest[..end]).or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(n, _)| n.to_string())
}

fn run(rules: &Arc<FilterRules>, data: &[u8], out: &mut Vec<u8>) -> usize {
    let mut filter = Filter::new(rules.clone(), Format::Text);
    out.clear();
    for chunk in data.chunks(CHUNK) {
        filter.push(chunk, out);
    }
    filter.finish(out);
    out.len()
}

fn bench(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/kubelet");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("SKIPPED: no kubelet captures at {}", dir.display());
        return;
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    paths.sort();
    for path in paths {
        let capture = std::fs::read(&path).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let data = capture.repeat(TARGET_SIZE.div_ceil(capture.len()));
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));
        let mut out = Vec::with_capacity(data.len());
        if let Some(ns) = busiest_namespace(&String::from_utf8_lossy(&capture)) {
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
