//! The protobuf metrics filter (`prometheus::ProtoFilter`): behaviour on hand-made and real
//! kubelet bodies, decoded with prost (an independent reader), and its properties by proptest and
//! bolero.
//!
//! The bolero target runs as an ordinary bounded test under `cargo test` (3000 inputs). For long
//! runs under libFuzzer see `docs/fuzzing.md`:
//!
//! ```text
//! nice -n 19 cargo +nightly bolero test -p nodegate-agent fuzz_proto_filter_properties -T 480s
//! ```
//!
//! Properties, for every input: no panic; the output and the error (or its absence) do not
//! depend on how the input is split into chunks; the output is a delimited `MetricFamily` stream
//! prost decodes; no output metric has a namespace outside the grant, none has two, none lacks
//! one without `all`. For a well-formed body: no error, and the output is exactly the input's
//! metrics in scope, in order, in their families (with the added labels), nothing else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/metrics_proto.rs"]
mod pb;

use bytes::Bytes;
use futures::StreamExt;
use nodegate_agent::prometheus::{
    Decoding, FilterConfig, FilterRules, Grant, ProtoError, ProtoFilter, filter_body,
};
use nodegate_crds::ResolvedNamespaces;
use nodegate_crds::policy::MetricsTransform;
use pb::*;
use proptest::prelude::*;
use prost::Message;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

fn grant(names: &[&str], all: bool, metrics: Option<MetricsTransform>) -> Grant {
    Grant {
        namespaces: ResolvedNamespaces {
            all,
            names: names.iter().map(|s| s.to_string()).collect(),
        },
        metrics,
    }
}

fn rules(grants: Vec<Grant>) -> Arc<FilterRules> {
    Arc::new(FilterRules::new(&FilterConfig { grants }).unwrap())
}

fn add_cluster() -> Option<MetricsTransform> {
    Some(MetricsTransform {
        add_labels: BTreeMap::from([("cluster".to_string(), "c".to_string())]),
        ..Default::default()
    })
}

/// Filters `input` split at `cuts` (offsets, taken modulo the length).
fn run(
    rules: &Arc<FilterRules>,
    input: &[u8],
    cuts: &[usize],
) -> (Vec<u8>, Result<(), ProtoError>) {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| if input.is_empty() { 0 } else { c % input.len() })
        .collect();
    at.push(0);
    at.push(input.len());
    at.sort_unstable();
    let mut filter = ProtoFilter::new(rules.clone());
    let mut out = Vec::new();
    let mut result = Ok(());
    for w in at.windows(2) {
        result = filter.push(&input[w[0]..w[1]], &mut out);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = filter.finish();
    }
    (out, result)
}

fn label(name: &str, value: &str) -> LabelPair {
    LabelPair {
        name: Some(name.into()),
        value: Some(value.into()),
    }
}

fn counter(labels: &[(&str, &str)], value: f64) -> Metric {
    Metric {
        label: labels.iter().map(|(n, v)| label(n, v)).collect(),
        counter: Some(Counter {
            value: Some(value),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn family(name: &str, kind: i32, metric: Vec<Metric>) -> MetricFamily {
    MetricFamily {
        name: Some(name.into()),
        help: Some(format!("help of {name}")),
        r#type: Some(kind),
        metric,
        unit: None,
    }
}

const COUNTER: i32 = 0;
const GAUGE: i32 = 1;
const HISTOGRAM: i32 = 4;

/// A cAdvisor-like body: two counters and a histogram over namespaces a, b and node level.
fn sample_families() -> Vec<MetricFamily> {
    let histogram = |ns: &str| Metric {
        label: vec![label("namespace", ns), label("pod", "p")],
        histogram: Some(Histogram {
            sample_count: Some(3),
            sample_sum: Some(1.5),
            schema: Some(3),
            zero_threshold: Some(1e-128),
            positive_span: vec![BucketSpan {
                offset: Some(0),
                length: Some(2),
            }],
            positive_delta: vec![1, 1],
            bucket: vec![Bucket {
                cumulative_count: Some(3),
                upper_bound: Some(1.0),
                exemplar: None,
                cumulative_count_float: None,
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        family(
            "container_cpu_usage_seconds_total",
            COUNTER,
            vec![
                counter(&[("container", "c"), ("namespace", "a"), ("pod", "p")], 1.0),
                counter(&[("container", "c"), ("namespace", "b"), ("pod", "q")], 2.0),
                counter(&[("id", "/")], 3.0),
                counter(&[("namespace", "a"), ("pod", "r")], 4.0),
            ],
        ),
        family("machine_cpu_cores", GAUGE, vec![counter(&[], 2.0)]),
        family(
            "request_duration_seconds",
            HISTOGRAM,
            vec![histogram("b"), histogram("a")],
        ),
    ]
}

fn namespaces_of(families: &[MetricFamily]) -> Vec<(String, Option<String>)> {
    families
        .iter()
        .flat_map(|f| {
            f.metric.iter().map(|m| {
                (
                    f.name.clone().unwrap_or_default(),
                    m.label_value("namespace").map(str::to_string),
                )
            })
        })
        .collect()
}

#[test]
fn keeps_only_the_granted_namespaces_with_their_metadata() {
    let input = encode_stream(&sample_families());
    let (out, result) = run(&rules(vec![grant(&["a"], false, None)]), &input, &[]);
    result.unwrap();
    let families = decode_stream(&out).unwrap();
    let a = Some("a".to_string());
    assert_eq!(
        namespaces_of(&families),
        vec![
            ("container_cpu_usage_seconds_total".into(), a.clone()),
            ("container_cpu_usage_seconds_total".into(), a.clone()),
            ("request_duration_seconds".into(), a.clone()),
        ]
    );
    // Metadata and values go through as they were.
    let input_families = sample_families();
    assert_eq!(families[0].help, input_families[0].help);
    assert_eq!(families[0].r#type, Some(COUNTER));
    assert_eq!(families[0].metric[1], input_families[0].metric[3]);
    assert_eq!(families[1].metric[0], input_families[2].metric[1]);

    // `all`: everything, byte for byte (families are copied field by field, and prost writes
    // the header fields first, as the filter does).
    let (out, result) = run(&rules(vec![grant(&[], true, None)]), &input, &[]);
    result.unwrap();
    assert_eq!(out, input);

    // Two grants: the union.
    let (out, _) = run(
        &rules(vec![grant(&["a"], false, None), grant(&["b"], false, None)]),
        &input,
        &[],
    );
    let got = namespaces_of(&decode_stream(&out).unwrap());
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|(_, ns)| ns.is_some()));

    // No namespace granted: nothing.
    let (out, result) = run(&rules(vec![grant(&["z"], false, None)]), &input, &[]);
    result.unwrap();
    assert!(out.is_empty());
}

#[test]
fn metric_transforms_apply() {
    let input = encode_stream(&sample_families());
    let transform = |keep: &[&str], drop: &[&str]| {
        Some(MetricsTransform {
            keep: keep.iter().map(|s| s.to_string()).collect(),
            drop: drop.iter().map(|s| s.to_string()).collect(),
            add_labels: BTreeMap::from([
                ("cluster".to_string(), "c1".to_string()),
                ("pod".to_string(), "not-added".to_string()),
            ]),
        })
    };
    let names = |keep: &[&str], drop: &[&str]| {
        let (out, result) = run(
            &rules(vec![grant(&["a"], false, transform(keep, drop))]),
            &input,
            &[7, 100],
        );
        result.unwrap();
        let families = decode_stream(&out).unwrap();
        for m in families.iter().flat_map(|f| &f.metric) {
            assert_eq!(m.label_value("cluster"), Some("c1"));
            // A metric's own label wins.
            assert_ne!(m.label_value("pod"), Some("not-added"));
            assert_eq!(
                m.label
                    .iter()
                    .filter(|l| l.name.as_deref() == Some("pod"))
                    .count(),
                1
            );
        }
        families
            .into_iter()
            .map(|f| f.name.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&[], &[]),
        [
            "container_cpu_usage_seconds_total",
            "request_duration_seconds"
        ]
    );
    assert_eq!(
        names(&["request_duration_seconds"], &[]),
        ["request_duration_seconds"]
    );
    assert_eq!(
        names(&[], &["container_cpu_usage_seconds_total"]),
        ["request_duration_seconds"]
    );
    // A series name of the text format drops the whole protobuf family (never wider).
    assert_eq!(
        names(&[], &["request_duration_seconds_bucket"]),
        ["container_cpu_usage_seconds_total"]
    );
    // Values are untouched by the added labels.
    let (out, _) = run(
        &rules(vec![grant(&["a"], false, add_cluster())]),
        &input,
        &[],
    );
    let families = decode_stream(&out).unwrap();
    let mut expected = sample_families()[2].metric[1].clone();
    expected.label.push(label("cluster", "c"));
    assert_eq!(families[1].metric[0], expected);
}

#[test]
fn exemplars_of_another_namespace_and_a_second_namespace_drop_the_metric() {
    let with_exemplar = |ns: &str, exemplar_ns: &str| Metric {
        label: vec![label("namespace", ns)],
        counter: Some(Counter {
            value: Some(1.0),
            exemplar: Some(Exemplar {
                label: vec![label("trace_id", "t"), label("namespace", exemplar_ns)],
                value: Some(1.0),
                timestamp: None,
            }),
            created_timestamp: None,
        }),
        ..Default::default()
    };
    let bucket_exemplar = |ns: &str, exemplar_ns: &str| Metric {
        label: vec![label("namespace", ns)],
        histogram: Some(Histogram {
            bucket: vec![Bucket {
                cumulative_count: Some(1),
                upper_bound: Some(1.0),
                exemplar: Some(Exemplar {
                    label: vec![label("namespace", exemplar_ns)],
                    value: Some(0.5),
                    timestamp: None,
                }),
                cumulative_count_float: None,
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let native_exemplar = |ns: &str, exemplar_ns: &str| Metric {
        label: vec![label("namespace", ns)],
        histogram: Some(Histogram {
            schema: Some(0),
            exemplars: vec![Exemplar {
                label: vec![label("namespace", exemplar_ns)],
                value: Some(0.5),
                timestamp: None,
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let twice = Metric {
        label: vec![label("namespace", "a"), label("namespace", "b")],
        gauge: Some(Gauge { value: Some(1.0) }),
        ..Default::default()
    };
    let twice_reversed = Metric {
        label: vec![label("namespace", "b"), label("namespace", "a")],
        gauge: Some(Gauge { value: Some(1.0) }),
        ..Default::default()
    };
    let input = encode_stream(&[
        family(
            "c_total",
            COUNTER,
            vec![with_exemplar("a", "a"), with_exemplar("a", "b")],
        ),
        family(
            "h",
            HISTOGRAM,
            vec![bucket_exemplar("a", "b"), bucket_exemplar("a", "a")],
        ),
        family(
            "n",
            HISTOGRAM,
            vec![native_exemplar("a", "b"), native_exemplar("a", "a")],
        ),
        family("g", GAUGE, vec![twice, twice_reversed]),
    ]);
    for scope in [grant(&["a"], false, None), grant(&["a", "b"], false, None)] {
        let (out, result) = run(&rules(vec![scope]), &input, &[]);
        result.unwrap();
        let families = decode_stream(&out).unwrap();
        let names: Vec<_> = families
            .iter()
            .map(|f| (f.name.clone().unwrap(), f.metric.len()))
            .collect();
        assert_eq!(
            names,
            [
                ("c_total".to_string(), 1),
                ("h".to_string(), 1),
                ("n".to_string(), 1)
            ]
        );
    }
}

#[test]
fn anything_it_cannot_read_ends_the_answer_with_an_error() {
    let good = encode_stream(&sample_families()[..1]);
    let scope = rules(vec![grant(&["a"], false, None)]);
    let (kept, result) = run(&scope, &good, &[]);
    result.unwrap();
    assert!(!kept.is_empty());
    let fails = |tail: &[u8], what: &str| {
        let mut body = good.clone();
        body.extend_from_slice(tail);
        for cuts in [
            vec![],
            vec![good.len() + 1],
            vec![1, good.len() + 2, good.len() + 3],
        ] {
            let (out, result) = run(&scope, &body, &cuts);
            let err = result.expect_err(what);
            assert_eq!(err.offset, good.len() as u64, "{what}: {err}");
            // What was kept before the failure is whole families only.
            assert_eq!(out, kept, "{what}");
        }
    };
    // A family of 5 bytes, then the body ends.
    fails(&[0x05, 0x0a, 0x01], "truncated family");
    fails(&[0x85], "truncated length prefix");
    fails(&[0xff; 11], "overlong length prefix");
    // metric (field 4) as a varint: the wrong wire type.
    fails(&[0x02, 0x20, 0x01], "wrong wire type");
    // An unknown field in a Metric (field 9, varint), beside a namespace label.
    let mut metric = Vec::new();
    counter(&[("namespace", "a")], 1.0)
        .encode(&mut metric)
        .unwrap();
    metric.extend_from_slice(&[0x48, 0x01]);
    let mut fam = vec![0x22, metric.len() as u8];
    fam.extend_from_slice(&metric);
    let mut tail = vec![fam.len() as u8];
    tail.extend_from_slice(&fam);
    fails(&tail, "unknown field in Metric");
    // A label whose length runs past its metric.
    fails(
        &[0x06, 0x22, 0x04, 0x0a, 0x09, 0x0a, 0x07],
        "length past its message",
    );
    // A group wire type.
    fails(&[0x02, 0x23, 0x24], "group");
    // A repeated name in a LabelPair.
    fails(
        &[
            0x0b, 0x22, 0x09, 0x0a, 0x07, 0x0a, 0x01, b'x', 0x0a, 0x01, b'y', 0x12,
        ],
        "truncated repeated",
    );

    // Over the cap.
    let mut filter = ProtoFilter::new(scope.clone()).with_max_family(10);
    let mut out = Vec::new();
    let err = filter.push(&good, &mut out).unwrap_err();
    assert_eq!(err.reason, "metric family over the size cap");
    assert!(out.is_empty());
    assert_eq!(filter.push(b"", &mut out), Err(err.clone()));
    assert_eq!(filter.finish(), Err(err));
}

/// Real protobuf answers of the local cluster's kubelet (node-1, Kubernetes 1.3x), captured with
/// Prometheus' Accept header through the API server's node proxy (docs/BENCHMARKS.md).
const CAPTURES: &[(&str, &[u8])] = &[
    ("cadvisor", include_bytes!("captures/node-1-cadvisor.pb")),
    ("metrics", include_bytes!("captures/node-1-metrics.pb")),
    ("resource", include_bytes!("captures/node-1-resource.pb")),
];

#[test]
fn real_kubelet_answers_are_scoped_exactly() {
    for (name, capture) in CAPTURES {
        let families = decode_stream(capture).unwrap();
        let mut counts: BTreeMap<Option<String>, usize> = BTreeMap::new();
        for (_, ns) in namespaces_of(&families) {
            *counts.entry(ns.filter(|n| !n.is_empty())).or_default() += 1;
        }
        let (out, result) = run(&rules(vec![grant(&[], true, None)]), capture, &[4096, 8192]);
        result.unwrap();
        assert_eq!(decode_stream(&out).unwrap(), families, "{name}, all");
        for (ns, count) in &counts {
            let Some(ns) = ns else { continue };
            let (out, result) = run(
                &rules(vec![grant(&[ns], false, None)]),
                capture,
                &[1000, 1001],
            );
            result.unwrap();
            let got = namespaces_of(&decode_stream(&out).unwrap());
            assert_eq!(got.len(), *count, "{name}, {ns}");
            assert!(
                got.iter().all(|(_, n)| n.as_deref() == Some(ns.as_str())),
                "{name}, {ns}"
            );
        }
        if *name == "cadvisor" {
            assert!(
                counts.keys().filter(|k| k.is_some()).count() >= 1,
                "{counts:?}"
            );
        }
    }
}

async fn collect(
    body: futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut body = body;
    while let Some(item) = body.next().await {
        match item {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

fn chunked(
    data: &[u8],
    size: usize,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(size.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(chunks)
}

#[tokio::test]
async fn gzip_both_ways_and_an_unreadable_body_ends_with_an_error() {
    use async_compression::tokio::bufread::{GzipDecoder, GzipEncoder};
    use tokio::io::AsyncReadExt;
    let input = encode_stream(&sample_families());
    let scope = rules(vec![grant(&["a"], false, None)]);
    let (expected, _) = run(&scope, &input, &[]);
    let mut gz = Vec::new();
    GzipEncoder::new(&input[..])
        .read_to_end(&mut gz)
        .await
        .unwrap();
    for size in [1, 13, 8192] {
        let (body, stats) = filter_body(
            chunked(&input, size),
            Decoding::Identity,
            ProtoFilter::new(scope.clone()),
            false,
        );
        let (out, err) = collect(body).await;
        assert!(err.is_none());
        assert_eq!(out, expected);
        assert!(stats.is_complete());
        assert_eq!(stats.snapshot().samples_kept, 3);
        let (body, _) = filter_body(
            chunked(&gz, size),
            Decoding::Gzip,
            ProtoFilter::new(scope.clone()),
            true,
        );
        let (out, err) = collect(body).await;
        assert!(err.is_none());
        let mut plain = Vec::new();
        GzipDecoder::new(&out[..])
            .read_to_end(&mut plain)
            .await
            .unwrap();
        assert_eq!(plain, expected);
    }
    let mut broken = input.clone();
    broken.extend_from_slice(&[0x05, 0x0a]);
    let (body, stats) = filter_body(
        chunked(&broken, 64),
        Decoding::Identity,
        ProtoFilter::new(scope.clone()),
        false,
    );
    let (out, err) = collect(body).await;
    assert_eq!(err.unwrap().kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(out, expected);
    assert!(!stats.is_complete());
}

// ---- Properties ----

static SCOPE_A: LazyLock<Arc<FilterRules>> =
    LazyLock::new(|| rules(vec![grant(&["a"], false, None)]));
static SCOPE_AB_LABELS: LazyLock<Arc<FilterRules>> =
    LazyLock::new(|| rules(vec![grant(&["a", "b"], false, add_cluster())]));
static ALL: LazyLock<Arc<FilterRules>> = LazyLock::new(|| rules(vec![grant(&[], true, None)]));

/// Builds families from choice bytes, so random bytes make likely bodies: namespaces a, b, c,
/// empty, absent or twice; other labels (some named like `namespace`); counters with exemplars,
/// gauges, classic and native histograms with exemplars.
fn build(data: &[u8]) -> Vec<MetricFamily> {
    let mut it = data.iter().copied();
    let mut next = move || it.next();
    let values = ["a", "b", "c", "", "namespace", "x\u{e9}"];
    let mut families = Vec::new();
    while let Some(f) = next() {
        let kind = i32::from(f % 6);
        let mut metrics = Vec::new();
        let n = next().unwrap_or(0) % 5;
        for _ in 0..n {
            let c = next().unwrap_or(0);
            let mut labels = Vec::new();
            for _ in 0..(c % 4) {
                let v = next().unwrap_or(0) as usize;
                let name = ["pod", "container", "namespace_x", "cluster", "xnamespace"][v % 5];
                labels.push(label(name, values[(v / 5) % values.len()]));
            }
            match c / 4 % 4 {
                0 => {}
                1 => labels.insert(
                    0,
                    label("namespace", values[next().unwrap_or(0) as usize % 4]),
                ),
                2 => labels.push(label("namespace", values[next().unwrap_or(0) as usize % 4])),
                _ => {
                    labels.push(label("namespace", values[next().unwrap_or(0) as usize % 4]));
                    labels.push(label("namespace", values[next().unwrap_or(0) as usize % 4]));
                }
            }
            let e = next().unwrap_or(0);
            let exemplar = (e % 3 != 0).then(|| Exemplar {
                label: vec![label(
                    if e % 3 == 1 { "namespace" } else { "trace_id" },
                    values[(e / 3) as usize % 4],
                )],
                value: Some(1.0),
                timestamp: None,
            });
            let mut m = Metric {
                label: labels,
                timestamp_ms: (c & 0x80 != 0).then_some(1_700_000_000_000),
                ..Default::default()
            };
            match kind {
                0 => {
                    m.counter = Some(Counter {
                        value: Some(1.0),
                        exemplar,
                        created_timestamp: None,
                    })
                }
                1 => m.gauge = Some(Gauge { value: Some(2.0) }),
                2 => {
                    m.summary = Some(Summary {
                        sample_count: Some(1),
                        sample_sum: Some(1.0),
                        quantile: vec![Quantile {
                            quantile: Some(0.5),
                            value: Some(1.0),
                        }],
                        created_timestamp: None,
                    })
                }
                3 => m.untyped = Some(Untyped { value: Some(3.0) }),
                _ => {
                    let classic = e & 0x40 != 0;
                    m.histogram = Some(Histogram {
                        sample_count: Some(2),
                        sample_sum: Some(1.0),
                        bucket: if classic {
                            vec![Bucket {
                                cumulative_count: Some(2),
                                upper_bound: Some(1.0),
                                exemplar: exemplar.clone(),
                                cumulative_count_float: None,
                            }]
                        } else {
                            vec![]
                        },
                        schema: (!classic).then_some(2),
                        positive_span: vec![BucketSpan {
                            offset: Some(-1),
                            length: Some(1),
                        }],
                        positive_delta: vec![2],
                        exemplars: if classic {
                            vec![]
                        } else {
                            exemplar.into_iter().collect()
                        },
                        ..Default::default()
                    })
                }
            }
            metrics.push(m);
        }
        families.push(MetricFamily {
            name: Some(["c_total", "g", "s", "u", "h", "gh"][kind as usize].to_string()),
            help: (f & 0x40 != 0).then(|| "help".to_string()),
            r#type: Some(kind),
            metric: metrics,
            unit: (f & 0x80 != 0).then(|| "seconds".to_string()),
        });
    }
    families
}

/// What the filter must give for well-formed `families` (independent of its code).
fn model(families: &[MetricFamily], scope: &[&str], all: bool, add: bool) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    for f in families {
        let mut kept = Vec::new();
        for m in &f.metric {
            let ns: Vec<&str> = m
                .label
                .iter()
                .filter(|l| l.name.as_deref() == Some("namespace"))
                .map(|l| l.value.as_deref().unwrap_or(""))
                .collect();
            if ns.len() > 1 {
                continue;
            }
            let ns = ns.first().copied().filter(|n| !n.is_empty());
            let in_scope = all || ns.is_some_and(|n| scope.contains(&n));
            if !in_scope {
                continue;
            }
            let exemplars = m.counter.iter().filter_map(|c| c.exemplar.as_ref()).chain(
                m.histogram.iter().flat_map(|h| {
                    h.bucket
                        .iter()
                        .filter_map(|b| b.exemplar.as_ref())
                        .chain(h.exemplars.iter())
                }),
            );
            let foreign = exemplars.flat_map(|e| &e.label).any(|l| {
                l.name.as_deref() == Some("namespace")
                    && ns != Some(l.value.as_deref().unwrap_or(""))
            });
            if foreign {
                continue;
            }
            let mut m = m.clone();
            if add && m.label_value("cluster").is_none() {
                m.label.push(label("cluster", "c"));
            }
            kept.push(m);
        }
        if !kept.is_empty() {
            out.push(MetricFamily {
                metric: kept,
                ..f.clone()
            });
        }
    }
    out
}

fn check_properties(input: &[u8], cuts: &[usize], expected: Option<&[MetricFamily]>) {
    for (scope, names, all, add) in [
        (&*SCOPE_A, &["a"][..], false, false),
        (&*SCOPE_AB_LABELS, &["a", "b"][..], false, true),
        (&*ALL, &[][..], true, false),
    ] {
        let whole = run(scope, input, &[]);
        let split = run(scope, input, cuts);
        assert_eq!(whole, split, "chunking changed the output");
        let (out, result) = whole;
        let families = decode_stream(&out).expect("the output is a delimited MetricFamily stream");
        for m in families.iter().flat_map(|f| &f.metric) {
            let ns: Vec<&str> = m
                .label
                .iter()
                .filter(|l| l.name.as_deref() == Some("namespace"))
                .map(|l| l.value.as_deref().unwrap_or(""))
                .collect();
            assert!(ns.len() <= 1, "namespace twice: {m:?}");
            if !all {
                let ns = ns.first().unwrap_or_else(|| panic!("no namespace: {m:?}"));
                assert!(names.contains(ns), "foreign namespace: {m:?}");
            }
        }
        if let Some(expected) = expected {
            result.expect("a well-formed body is filtered without error");
            assert_eq!(families, model(expected, names, all, add));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn properties_hold_on_well_formed_bodies(
        choices in prop::collection::vec(any::<u8>(), 0..300),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let families = build(&choices);
        check_properties(&encode_stream(&families), &cuts, Some(&families));
    }

    #[test]
    fn properties_hold_on_damaged_bodies(
        choices in prop::collection::vec(any::<u8>(), 0..300),
        damage in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut_at in any::<usize>(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let mut body = encode_stream(&build(&choices));
        if !body.is_empty() {
            for (at, byte) in damage {
                let i = at % body.len();
                body[i] = byte;
            }
            body.truncate(cut_at % (body.len() + 1));
        }
        check_properties(&body, &cuts, None);
    }

    #[test]
    fn no_panic_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..2000),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        check_properties(&bytes, &cuts, None);
    }
}

#[test]
fn fuzz_proto_filter_properties() {
    bolero::check!()
        .with_iterations(3000)
        .for_each(|data: &[u8]| {
            // The first bytes choose chunk boundaries; the rest is used raw, as choices that
            // build a well-formed body, and as that body damaged at one byte.
            let cuts: Vec<usize> = data.iter().take(4).map(|b| *b as usize * 7).collect();
            let rest = data.get(4..).unwrap_or_default();
            check_properties(rest, &cuts, None);
            let families = build(rest);
            let mut body = encode_stream(&families);
            check_properties(&body, &cuts, Some(&families));
            if let (Some(first), false) = (data.first(), body.is_empty()) {
                let at = (*first as usize * 31) % body.len();
                body[at] ^= data.get(1).copied().unwrap_or(0xff) | 1;
                check_properties(&body, &cuts, None);
            }
        });
}
