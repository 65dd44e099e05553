//! The cost of one authorization decision as a node's rules grow: one rule, and issue 20's node
//! of 1,000 policies (each one of 50 service accounts, 1–5 of 200 namespaces, two endpoints),
//! asked by the subject of the last rule and by a caller no rule names. The decision reads the
//! rules through `RuleSet`'s index by subject, so its cost should not grow with the rules the
//! caller is not named in.
//!
//! `cargo bench -p nodegate-agent --bench authorize`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use nodegate_agent::authz::{Requester, RuleSet, authorize};
use nodegate_crds::attributes::request_attributes;
use nodegate_crds::{AgentRule, Endpoint, Port, ResolvedNamespaces, Subject, SubjectKind};
use std::hint::black_box;

fn service_account(i: usize) -> Subject {
    Subject {
        kind: SubjectKind::ServiceAccount,
        name: format!("prometheus-{:02}", i % 50),
        namespace: Some(format!("monitoring-{:02}", i % 50)),
    }
}

/// Rule `i` of issue 20's node; rule 999 alone names `special` (so exactly one rule applies).
fn rule(i: usize, special: &Subject) -> AgentRule {
    let endpoints = [
        Endpoint::Cadvisor,
        Endpoint::Resource,
        Endpoint::Pods,
        Endpoint::Stats,
    ];
    let mut names: Vec<String> = (0..1 + i % 5)
        .map(|k| format!("team-{:03}", (i * 7 + k * 13) % 200))
        .collect();
    names.sort();
    names.dedup();
    AgentRule {
        policy: format!("team-policy-{i:04}"),
        subjects: vec![if i == 999 {
            special.clone()
        } else {
            service_account(i)
        }],
        endpoints: vec![endpoints[i % 4], endpoints[(i + 1) % 4], Endpoint::Pods],
        namespaces: ResolvedNamespaces { all: false, names },
        ports: vec![Port::Secure],
        metrics: None,
    }
}

fn bench(c: &mut Criterion) {
    let special = Subject {
        kind: SubjectKind::User,
        name: "last".into(),
        namespace: None,
    };
    let one = RuleSet::from_rules(&[rule(999, &special)]);
    let thousand = RuleSet::from_rules(&(0..1000).map(|i| rule(i, &special)).collect::<Vec<_>>());
    let attrs = request_attributes("GET", "/pods", None).unwrap();
    let groups = vec!["system:authenticated".to_string()];
    let last = Requester {
        name: "last",
        groups: &groups,
    };
    let nobody = Requester {
        name: "nobody",
        groups: &groups,
    };
    assert!(authorize(last, Port::Secure, &attrs, &one).allowed());
    assert!(authorize(last, Port::Secure, &attrs, &thousand).allowed());
    assert!(!authorize(nobody, Port::Secure, &attrs, &thousand).allowed());
    let mut group = c.benchmark_group("authorize");
    group.bench_function("1 rule, its subject", |b| {
        b.iter(|| black_box(authorize(last, Port::Secure, &attrs, black_box(&one))))
    });
    group.bench_function("1,000 rules, the last rule's subject", |b| {
        b.iter(|| black_box(authorize(last, Port::Secure, &attrs, black_box(&thousand))))
    });
    group.bench_function("1,000 rules, a caller no rule names", |b| {
        b.iter(|| {
            black_box(authorize(
                nobody,
                Port::Secure,
                &attrs,
                black_box(&thousand),
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
