//! A policy's `metrics` transforms (keep, drop, addLabels) are enforced on every Prometheus
//! endpoint (cadvisor, resource, probes, and the node-wide metrics and slis) in every
//! authorization mode: the agent in-process in front of the kubelet simulator, Webhook modes
//! asking the local cluster's real API server (SubjectAccessReview against RBAC this test
//! binds).
//!
//! Run after `eval "$(cargo xtask cluster env)"` with
//! `cargo test -p nodegate-tests --test agent_metric_transforms`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject as RbacSubject,
};
use kube::api::{Api, DeleteParams, PostParams};
use nodegate_agent::server::AuthorizationMode;
use nodegate_agent::webhook::{CachedReviewer, KubeAccessReviewer};
use nodegate_crds::catalogue::AGENT_API_GROUP;
use nodegate_crds::policy::MetricsTransform;
use nodegate_crds::{Endpoint, Port};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::unique_name;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use support::*;

const PROMETHEUS: [Endpoint; 5] = [
    Endpoint::Cadvisor,
    Endpoint::Resource,
    Endpoint::Probes,
    Endpoint::Metrics,
    Endpoint::Slis,
];

const ADDED: (&str, &str) = ("nodegate_test", "transformed");

fn path(endpoint: Endpoint) -> &'static str {
    endpoint.spec().patterns[0]
}

/// Sample lines of a body: (metric name, line).
fn samples(body: &str) -> Vec<(&str, &str)> {
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| (l.split(['{', ' ']).next().unwrap_or(""), l))
        .collect()
}

/// Gauge and counter families with samples, in order of appearance (their samples carry the
/// family's own name in text 0.0.4).
fn simple_families(body: &str) -> Vec<String> {
    let typed: BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, t)| *t == "gauge" || *t == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out: Vec<String> = Vec::new();
    for (name, _) in samples(body) {
        if typed.contains(name) && !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// RBAC granting `users` every Prometheus endpoint of nodegate's resource at cluster scope
/// (as a policy with `namespaces.all` is bound); deleted when dropped.
struct Rbac {
    client: kube::Client,
    name: String,
}

impl Rbac {
    async fn bind(client: kube::Client, users: &[String]) -> Rbac {
        let name = unique_name("nodegate-test-transforms");
        let role = ClusterRole {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![AGENT_API_GROUP.into()]),
                resources: Some(PROMETHEUS.iter().map(|e| e.agent_resource()).collect()),
                verbs: vec!["get".into()],
                ..Default::default()
            }]),
            ..Default::default()
        };
        let binding = ClusterRoleBinding {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: name.clone(),
            },
            subjects: Some(
                users
                    .iter()
                    .map(|u| RbacSubject {
                        api_group: Some("rbac.authorization.k8s.io".into()),
                        kind: "User".into(),
                        name: u.clone(),
                        namespace: None,
                    })
                    .collect(),
            ),
        };
        Api::<ClusterRole>::all(client.clone())
            .create(&PostParams::default(), &role)
            .await
            .unwrap();
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
        Rbac { client, name }
    }

    async fn delete(self) {
        let dp = DeleteParams::default();
        let _ = Api::<ClusterRoleBinding>::all(self.client.clone())
            .delete(&self.name, &dp)
            .await;
        let _ = Api::<ClusterRole>::all(self.client.clone())
            .delete(&self.name, &dp)
            .await;
    }
}

#[tokio::test]
async fn metric_transforms_apply_on_every_prometheus_endpoint_in_every_mode() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let admin = cluster.admin().unwrap();
    let suffix = rand_suffix();
    // alice: a policy rule with transforms; root: a rule without; carol: RBAC only, no rule.
    let alice = format!("alice-{suffix}");
    let root = format!("root-{suffix}");
    let carol = format!("carol-{suffix}");
    let mut tokens = BTreeMap::new();
    for name in [&alice, &root, &carol] {
        tokens.insert(format!("token-{name}"), (name.clone(), vec![]));
    }
    let rbac = Rbac::bind(admin.clone(), &[alice.clone(), root.clone(), carol.clone()]).await;
    let sim = sim().await;
    let result = async {
        let pki = Pki::new("transforms");
        // The families each endpoint serves, read through a Policy agent by root (no
        // transform, all namespaces: the kubelet's answer untouched).
        let reference = start_agent(
            NODE,
            upstream_of(&sim),
            &pki,
            tokens.clone(),
            vec![rule(
                "root",
                vec![user(&root)],
                &PROMETHEUS,
                all_namespaces(),
                &[Port::Secure],
            )],
        )
        .await;
        let root_cred = Cred::Token(format!("token-{root}"));
        let mut picks = Vec::new();
        for endpoint in PROMETHEUS {
            let r = request(
                reference.running.secure_addr,
                true,
                &root_cred,
                "GET",
                path(endpoint),
                &[],
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200, "{endpoint}: {}", r.text());
            let families = simple_families(&r.text());
            assert!(families.len() >= 2, "{endpoint}: {families:?}");
            picks.push((endpoint, families[0].clone(), families[1].clone(), r.text()));
        }
        drop(reference);

        // alice keeps the first two families, drops the second and adds a label; root's rule
        // has no transform. Both with `all`, as node-wide endpoints need.
        let mut rules = Vec::new();
        for (endpoint, kept, dropped, _) in &picks {
            let mut r = rule(
                &format!("alice-{endpoint}"),
                vec![user(&alice)],
                &[*endpoint],
                all_namespaces(),
                &[Port::Secure],
            );
            r.metrics = Some(MetricsTransform {
                keep: vec![kept.clone(), dropped.clone()],
                drop: vec![dropped.clone()],
                add_labels: BTreeMap::from([(ADDED.0.to_string(), ADDED.1.to_string())]),
            });
            rules.push(r);
        }
        rules.push(rule(
            "root",
            vec![user(&root)],
            &PROMETHEUS,
            all_namespaces(),
            &[Port::Secure],
        ));
        let alice_cred = Cred::Token(format!("token-{alice}"));
        let carol_cred = Cred::Token(format!("token-{carol}"));
        for mode in [
            AuthorizationMode::Policy,
            AuthorizationMode::Webhook,
            AuthorizationMode::PolicyAndWebhook,
        ] {
            let reviewer = (mode != AuthorizationMode::Policy).then(|| {
                Arc::new(CachedReviewer::new(Arc::new(KubeAccessReviewer::new(
                    admin.clone(),
                )))) as Arc<dyn nodegate_agent::webhook::AccessReviewer>
            });
            let agent = start_agent_mode(
                NODE,
                upstream_of(&sim),
                pki.ca_file.clone(),
                Arc::new(FakeReviewer(tokens.clone())),
                rules.clone(),
                mode,
                reviewer,
            )
            .await;
            let addr = agent.running.secure_addr;
            for (endpoint, kept, dropped, whole) in &picks {
                let what = format!("{mode:?} {endpoint}");
                let r = request(addr, true, &alice_cred, "GET", path(*endpoint), &[])
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "{what}: {}", r.text());
                let body = r.text();
                let got = samples(&body);
                assert!(!got.is_empty(), "{what}: nothing kept");
                for (name, line) in &got {
                    assert_eq!(name, kept, "{what}: only {kept} is kept, got {line}");
                    assert!(
                        line.contains(&format!("{}=\"{}\"", ADDED.0, ADDED.1)),
                        "{what}: label not added to {line}"
                    );
                }
                assert!(
                    !body.contains(&format!("# TYPE {dropped} ")),
                    "{what}: {dropped} not dropped"
                );
                let want = samples(whole).iter().filter(|(n, _)| n == kept).count();
                assert_eq!(got.len(), want, "{what}: every {kept} sample kept");

                // A rule without a transform: every family.
                let r = request(addr, true, &root_cred, "GET", path(*endpoint), &[])
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "{what}: {}", r.text());
                let families = simple_families(&r.text());
                assert!(
                    families.contains(kept) && families.contains(dropped),
                    "{what}: root gets every family"
                );

                // RBAC alone: allowed only where RBAC decides, and with no transform (none of
                // the node's rules grants carol anything).
                let r = request(addr, true, &carol_cred, "GET", path(*endpoint), &[])
                    .await
                    .unwrap();
                if mode == AuthorizationMode::Webhook {
                    assert_eq!(r.status, 200, "{what}: {}", r.text());
                    let families = simple_families(&r.text());
                    assert!(
                        families.contains(kept) && families.contains(dropped),
                        "{what}"
                    );
                    assert!(!r.text().contains(ADDED.0), "{what}");
                } else {
                    assert_eq!(r.status, 403, "{what}: carol has no rule");
                }
            }
        }
    }
    .await;
    rbac.delete().await;
    result
}
