use super::*;
use nodegate_crds::decision::{Requester, RuleSet, rbac_answer};
use nodegate_crds::policy::{MetricsTransform, NamespaceScope, NodeApiPolicySpec};
use nodegate_crds::selector::{LabelSelector, LabelSelectorRequirement, SelectorOperator};
use proptest::prelude::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn node(name: &str, pairs: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        uid: format!("uid-{name}"),
        labels: labels(pairs),
    }
}

fn ns(name: &str, pairs: &[(&str, &str)]) -> NamespaceInfo {
    NamespaceInfo {
        name: name.into(),
        labels: labels(pairs),
    }
}

fn policy(name: &str, spec: NodeApiPolicySpec) -> NodeApiPolicy {
    let mut p = NodeApiPolicy::new(name, spec);
    p.metadata.uid = Some(format!("uid-{name}"));
    p
}

fn sample(file: &str) -> NodeApiPolicy {
    let path = format!("{}/../config/samples/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut p: NodeApiPolicy =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    p.metadata.uid = Some("uid-sample".into());
    p
}

fn group(name: &str) -> Subject {
    Subject {
        kind: SubjectKind::Group,
        name: name.into(),
        namespace: None,
    }
}

fn spec(access: &[Endpoint], namespaces: NamespaceScope) -> NodeApiPolicySpec {
    NodeApiPolicySpec {
        subjects: vec![group("g")],
        service_accounts: vec![],
        node_selector: None,
        access: access.to_vec(),
        namespaces,
        ports: vec![Port::Secure],
        metrics: None,
        direct_kubelet_access: None,
    }
}

fn names(list: &[&str]) -> NamespaceScope {
    NamespaceScope {
        names: Some(list.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

fn all() -> NamespaceScope {
    NamespaceScope {
        all: Some(true),
        ..Default::default()
    }
}

fn select(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        ..Default::default()
    }
}

fn rule_tuples(role: &ClusterRole) -> Vec<(String, Vec<String>, Option<Vec<String>>)> {
    role.rules
        .as_ref()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.resources.as_ref().unwrap().join(","),
                r.verbs.clone(),
                r.resource_names.clone(),
            )
        })
        .collect()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn monitoring_sample_compiles_to_least_privilege() {
    let p = sample("monitoring-team-a.yaml");
    let nodes = [node("n2", &[]), node("n1", &[])];
    let d = compile(&[p], &nodes, &[ns("team-a", &[]), ns("team-b", &[])]);

    assert_eq!(d.cluster_roles.len(), 1);
    let role = &d.cluster_roles[0];
    assert_eq!(
        role.metadata.name.as_deref(),
        Some("nodegate:team-a-monitoring")
    );
    // Grants on nodegate's own resource, which the kubelet never consults: no core nodes/* rule.
    assert_eq!(
        rule_tuples(role),
        vec![(
            "nodeagentconfigs/pods,nodeagentconfigs/cadvisor,nodeagentconfigs/resource".into(),
            s(&["get"]),
            None
        )]
    );
    assert_eq!(
        role.rules.as_ref().unwrap()[0].api_groups,
        Some(s(&["nodegate.io"]))
    );
    let owner = &role.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("NodeApiPolicy", "uid-sample")
    );
    assert_eq!(owner.controller, Some(true));

    // Bound in team-a only, so RBAC answers per namespace; no cluster-wide binding.
    assert!(d.cluster_role_bindings.is_empty());
    assert_eq!(d.role_bindings.len(), 1);
    let binding = &d.role_bindings[0];
    assert_eq!(binding.metadata.namespace.as_deref(), Some("team-a"));
    assert_eq!(binding.role_ref.name, "nodegate:team-a-monitoring");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    let subjects = binding.subjects.as_ref().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (
            subjects[0].kind.as_str(),
            subjects[0].name.as_str(),
            subjects[0].namespace.as_deref()
        ),
        ("ServiceAccount", "mymonitoring", Some("monitoring"))
    );

    assert_eq!(d.service_accounts.len(), 1);
    let sa = &d.service_accounts[0].metadata;
    assert_eq!(
        (sa.namespace.as_deref(), sa.name.as_deref()),
        (Some("monitoring"), Some("mymonitoring"))
    );
    assert_eq!(
        sa.labels.as_ref().unwrap()[POLICY_LABEL],
        "team-a-monitoring"
    );

    let configs: Vec<_> = d
        .node_agent_configs
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(configs, vec!["n1", "n2"]);
    assert_eq!(d.node_agent_configs[0].spec.policies, "team-a-monitoring");
    for config in &d.node_agent_configs {
        assert_eq!(config.spec.rules.len(), 1);
        let rule = &config.spec.unpack(0).unwrap();
        assert_eq!(
            rule.endpoints,
            vec![Endpoint::Pods, Endpoint::Cadvisor, Endpoint::Resource]
        );
        assert_eq!(
            rule.namespaces,
            ResolvedNamespaces {
                all: false,
                names: s(&["team-a"])
            }
        );
        assert_eq!(
            config.metadata.owner_references.as_ref().unwrap()[0].kind,
            "Node"
        );
        assert_eq!(config.spec.hash, spec_hash(&config.spec));
    }
}

#[test]
fn node_selector_names_nodes_and_configures_only_them() {
    let mut sp = spec(&[Endpoint::Cadvisor], names(&["a"]));
    sp.node_selector = Some(select(&[("pool", "gpu")]));
    let nodes = [
        node("gpu-2", &[("pool", "gpu")]),
        node("cpu-1", &[("pool", "cpu")]),
        node("gpu-1", &[("pool", "gpu")]),
    ];
    let d = compile(&[policy("p", sp)], &nodes, &[]);
    assert_eq!(
        rule_tuples(&d.cluster_roles[0]),
        vec![(
            "nodeagentconfigs/cadvisor".into(),
            s(&["get"]),
            Some(s(&["gpu-1", "gpu-2"]))
        )]
    );
    let rules: BTreeMap<_, _> = d
        .node_agent_configs
        .iter()
        .map(|c| (c.metadata.name.clone().unwrap(), c.spec.rules.len()))
        .collect();
    assert_eq!(
        rules,
        BTreeMap::from([
            ("cpu-1".into(), 0),
            ("gpu-1".into(), 1),
            ("gpu-2".into(), 1)
        ])
    );
    assert_eq!(d.outcomes[0].nodes, s(&["gpu-1", "gpu-2"]));
    assert!(!d.outcomes[0].all_nodes);
}

#[test]
fn a_selector_matching_no_node_grants_nothing_rather_than_every_node() {
    let mut sp = spec(&[Endpoint::Pods], names(&["a"]));
    sp.node_selector = Some(select(&[("pool", "none")]));
    let d = compile(&[policy("p", sp)], &[node("n1", &[])], &[]);
    assert_eq!(d.cluster_roles[0].rules, Some(vec![]));
    assert!(d.node_agent_configs[0].spec.rules.is_empty());
}

#[test]
fn an_invalid_selector_fails_closed_and_is_reported() {
    let mut sp = spec(&[Endpoint::Pods], names(&["a"]));
    sp.node_selector = Some(LabelSelector {
        match_expressions: vec![LabelSelectorRequirement {
            key: "pool".into(),
            operator: SelectorOperator::NotIn,
            values: vec![],
        }],
        ..Default::default()
    });
    let d = compile(&[policy("p", sp)], &[node("n1", &[("pool", "x")])], &[]);
    assert_eq!(d.cluster_roles[0].rules, Some(vec![]));
    assert!(d.node_agent_configs[0].spec.rules.is_empty());
    assert!(!d.outcomes[0].all_nodes);
    assert!(
        d.outcomes[0].problems[0].contains("nodeSelector"),
        "{:?}",
        d.outcomes[0].problems
    );

    let mut sp = spec(&[Endpoint::Pods], NamespaceScope::default());
    sp.namespaces.all = Some(false);
    let d = compile(&[policy("p", sp)], &[node("n1", &[])], &[ns("a", &[])]);
    assert_eq!(d.outcomes[0].namespaces, ResolvedNamespaces::default());
    assert_eq!(d.outcomes[0].problems.len(), 1);
}

#[test]
fn namespace_selector_resolves_to_sorted_names() {
    let sp = spec(
        &[Endpoint::Pods],
        NamespaceScope {
            selector: Some(select(&[("team", "payments")])),
            ..Default::default()
        },
    );
    let namespaces = [
        ns("pay-b", &[("team", "payments")]),
        ns("other", &[]),
        ns("pay-a", &[("team", "payments")]),
    ];
    let d = compile(&[policy("p", sp)], &[node("n1", &[])], &namespaces);
    assert_eq!(
        d.node_agent_configs[0].spec.unpack(0).unwrap().namespaces,
        ResolvedNamespaces {
            all: false,
            names: s(&["pay-a", "pay-b"])
        }
    );
}

#[test]
fn streaming_is_create_and_logs_are_get_on_proxy() {
    let d = compile(
        &[policy(
            "p",
            spec(
                &[
                    Endpoint::Exec,
                    Endpoint::PortForward,
                    Endpoint::ContainerLogs,
                ],
                names(&["a"]),
            ),
        )],
        &[],
        &[],
    );
    assert_eq!(
        rule_tuples(&d.cluster_roles[0]),
        vec![
            ("nodeagentconfigs/containerLogs".into(), s(&["get"]), None),
            (
                "nodeagentconfigs/exec,nodeagentconfigs/portForward".into(),
                s(&["create"]),
                None
            )
        ]
    );
    let d = compile(
        &[policy("p", spec(&[Endpoint::Exec], names(&["a"])))],
        &[],
        &[],
    );
    assert_eq!(
        rule_tuples(&d.cluster_roles[0]),
        vec![("nodeagentconfigs/exec".into(), s(&["create"]), None)]
    );
    let d = compile(
        &[policy("p", spec(&[Endpoint::Stats, Endpoint::Logs], all()))],
        &[],
        &[],
    );
    assert_eq!(
        rule_tuples(&d.cluster_roles[0]),
        vec![
            ("nodeagentconfigs/logs".into(), s(&["get"]), None),
            ("nodeagentconfigs/stats".into(), s(&["get", "create"]), None),
        ]
    );
}

#[test]
fn read_only_port_grants_make_no_rbac() {
    let p = sample("anonymous-read-only.yaml");
    let d = compile(&[p], &[node("n1", &[])], &[]);
    assert!(d.cluster_roles.is_empty() && d.cluster_role_bindings.is_empty());
    assert_eq!(
        d.node_agent_configs[0].spec.rules[0].ports,
        vec![Port::ReadOnly]
    );
    assert_eq!(d.outcomes[0].rbac_name, None);
}

#[test]
fn shared_service_accounts_are_owned_by_every_policy() {
    let sa = ServiceAccountRef {
        name: "prom".into(),
        namespace: "mon".into(),
    };
    let mut a = spec(&[Endpoint::Pods], names(&["a"]));
    a.service_accounts = vec![sa.clone()];
    let mut b = spec(&[Endpoint::Cadvisor], names(&["b"]));
    b.service_accounts = vec![sa];
    let d = compile(&[policy("b", b.clone()), policy("a", a)], &[], &[]);
    assert_eq!(d.service_accounts.len(), 1);
    let owners: Vec<_> = d.service_accounts[0]
        .metadata
        .owner_references
        .as_ref()
        .unwrap()
        .iter()
        .map(|o| o.name.clone())
        .collect();
    assert_eq!(owners, s(&["a", "b"]));
    assert!(
        d.service_accounts[0]
            .metadata
            .owner_references
            .as_ref()
            .unwrap()
            .iter()
            .all(|o| o.controller.is_none())
    );
    let d = compile(&[policy("b", b)], &[], &[]);
    assert_eq!(
        d.service_accounts[0]
            .metadata
            .owner_references
            .as_ref()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn hash_follows_the_rules() {
    let mut sp = spec(&[Endpoint::Cadvisor], names(&["a"]));
    let one = compile(&[policy("p", sp.clone())], &[node("n", &[])], &[]);
    sp.metrics = Some(MetricsTransform {
        drop: s(&["x"]),
        ..Default::default()
    });
    let two = compile(&[policy("p", sp)], &[node("n", &[])], &[]);
    assert_ne!(
        one.node_agent_configs[0].spec.hash,
        two.node_agent_configs[0].spec.hash
    );
    let empty = compile(&[], &[node("n", &[])], &[]);
    assert_eq!(empty.node_agent_configs[0].spec.hash, agent_spec(&[]).hash);
    assert_eq!(empty.node_agent_configs[0].spec.hash.len(), 64);
}

#[test]
fn endpoints_without_namespaced_data_are_bound_at_cluster_scope() {
    let d = compile(
        &[policy(
            "p",
            spec(
                &[Endpoint::Healthz, Endpoint::Cadvisor],
                names(&["a", "gone"]),
            ),
        )],
        &[node("n1", &[])],
        &[ns("a", &[]), ns("b", &[])],
    );
    let roles: Vec<_> = d
        .cluster_roles
        .iter()
        .map(|r| (r.metadata.name.clone().unwrap(), rule_tuples(r)))
        .collect();
    assert_eq!(
        roles,
        vec![
            (
                "nodegate:p".into(),
                vec![("nodeagentconfigs/cadvisor".into(), s(&["get"]), None)]
            ),
            (
                "nodegate:p:unscoped".into(),
                vec![("nodeagentconfigs/healthz".into(), s(&["get"]), None)]
            ),
        ]
    );
    assert_eq!(d.cluster_role_bindings.len(), 1);
    assert_eq!(
        d.cluster_role_bindings[0].role_ref.name,
        "nodegate:p:unscoped"
    );
    // Only existing namespaces get a binding; `gone` gets one once it exists.
    let bound: Vec<_> = d
        .role_bindings
        .iter()
        .map(|b| b.metadata.namespace.clone().unwrap())
        .collect();
    assert_eq!(bound, s(&["a"]));
    assert_eq!(
        d.outcomes[0].rbac_objects,
        s(&[
            "ClusterRole/nodegate:p",
            "RoleBinding/a/nodegate:p",
            "ClusterRole/nodegate:p:unscoped",
            "ClusterRoleBinding/nodegate:p:unscoped"
        ])
    );
}

#[test]
fn direct_kubelet_access_writes_core_rules_only_with_all() {
    let d = compile(&[sample("metrics-server.yaml")], &[node("n1", &[])], &[]);
    let role = &d.cluster_roles[0];
    assert_eq!(
        rule_tuples(role),
        vec![
            ("nodeagentconfigs/resource".into(), s(&["get"]), None),
            ("nodeagentconfigs/stats".into(), s(&["get", "create"]), None),
            ("nodes/stats".into(), s(&["get", "create"]), None),
            ("nodes/metrics".into(), s(&["get"]), None),
        ]
    );
    assert_eq!(d.cluster_role_bindings.len(), 1);
    assert!(d.outcomes[0].problems.is_empty());

    // Without `all` (the CRD refuses it) no core rule is written, and the outcome says why.
    let mut sp = spec(&[Endpoint::Cadvisor], names(&["a"]));
    sp.direct_kubelet_access = Some(true);
    let d = compile(&[policy("p", sp)], &[], &[ns("a", &[])]);
    assert!(
        d.cluster_roles
            .iter()
            .flat_map(|r| r.rules.as_ref().unwrap())
            .all(|r| r.api_groups == Some(s(&["nodegate.io"])))
    );
    assert!(d.outcomes[0].problems[0].contains("namespaces.all"));

    // A nodes/proxy grant without exec, attach and portForward would hide an exec grant.
    let mut sp = spec(&[Endpoint::ContainerLogs], all());
    sp.direct_kubelet_access = Some(true);
    let d = compile(&[policy("p", sp)], &[], &[]);
    assert_eq!(
        rule_tuples(&d.cluster_roles[0]),
        vec![("nodeagentconfigs/containerLogs".into(), s(&["get"]), None)]
    );
    assert!(d.outcomes[0].problems[0].contains("exec, attach and portForward"));
    let mut sp = spec(
        &[
            Endpoint::ContainerLogs,
            Endpoint::Exec,
            Endpoint::Attach,
            Endpoint::PortForward,
        ],
        all(),
    );
    sp.direct_kubelet_access = Some(true);
    let d = compile(&[policy("p", sp)], &[], &[]);
    assert!(rule_tuples(&d.cluster_roles[0]).contains(&(
        "nodes/proxy".into(),
        s(&["get", "create"]),
        None
    )));
}

#[test]
fn anonymous_subjects_on_the_secure_port_compile_to_nothing() {
    let mut sp = spec(&[Endpoint::Healthz], names(&["a"]));
    sp.subjects.push(group("system:unauthenticated"));
    sp.ports = vec![Port::ReadOnly, Port::Secure];
    sp.service_accounts = vec![ServiceAccountRef {
        name: "x".into(),
        namespace: "a".into(),
    }];
    let d = compile(&[policy("p", sp)], &[node("n1", &[])], &[ns("a", &[])]);
    assert!(d.cluster_roles.is_empty());
    assert!(d.cluster_role_bindings.is_empty() && d.role_bindings.is_empty());
    assert!(d.service_accounts.is_empty());
    assert!(d.node_agent_configs[0].spec.rules.is_empty());
    assert!(d.outcomes[0].problems[0].starts_with("policy refused"));
}

#[test]
fn long_policy_names_get_label_values_that_fit() {
    let long = format!("team-{}", "a".repeat(240));
    let value = policy_label_value(&long);
    assert!(value.len() <= 63, "{value}");
    assert!(value.chars().next().unwrap().is_ascii_alphanumeric());
    assert!(value.chars().last().unwrap().is_ascii_alphanumeric());
    assert_ne!(value, policy_label_value(&format!("{long}b")));
    assert_eq!(policy_label_value("short"), "short");
    // A prefix that ends in a dot or dash at the cut is trimmed so the value stays valid.
    let dotted = format!("{}.{}", "b".repeat(49), "c".repeat(100));
    assert!(!policy_label_value(&dotted).contains(".-"));
    let d = compile(&[policy(&long, spec(&[Endpoint::Pods], all()))], &[], &[]);
    let labels = d.cluster_roles[0].metadata.labels.as_ref().unwrap();
    assert_eq!(labels[POLICY_LABEL], value);
}

#[test]
fn same_named_inputs_reduce_to_one_whatever_their_order() {
    let a = policy("p", spec(&[Endpoint::Pods], names(&["a"])));
    let b = policy("p", spec(&[Endpoint::Cadvisor], names(&["b"])));
    let one = compile(&[a.clone(), b.clone()], &[node("n", &[])], &[]);
    let two = compile(&[b, a], &[node("n", &[])], &[]);
    assert_eq!(bytes(&one), bytes(&two));
    assert_eq!(one.outcomes.len(), 1);
    let n1 = node("n", &[("pool", "x")]);
    let n2 = node("n", &[("pool", "y")]);
    assert_eq!(
        bytes(&compile(&[], &[n1.clone(), n2.clone()], &[])),
        bytes(&compile(&[], &[n2, n1], &[]))
    );
}

#[test]
fn an_agent_config_over_the_size_limit_is_written_empty_and_reported() {
    // 20 policies × 1,000 namespaces of 60 characters, distinct per policy (identical lists
    // would be written once): about 1.2 MB of names for one node.
    let policies: Vec<NodeApiPolicy> = (0..20)
        .map(|i| {
            let mut sp = spec(&[Endpoint::Cadvisor], names(&[]));
            sp.namespaces.names = Some((0..1000).map(|j| format!("{i:02}{j:0>58}")).collect());
            sp.node_selector = Some(select(&[("pool", "big")]));
            sp.subjects = vec![group(&format!("g{i}"))];
            policy(&format!("p{i:02}"), sp)
        })
        .collect();
    let small = node("small", &[("pool", "small")]);
    let mut narrow = spec(&[Endpoint::Pods], names(&["a"]));
    narrow.node_selector = Some(select(&[("pool", "small")]));
    let mut all_policies = policies;
    all_policies.push(policy("narrow", narrow));
    let d = compile(
        &all_policies,
        &[node("big", &[("pool", "big")]), small],
        &[],
    );
    let big = &d.node_agent_configs[0];
    assert_eq!(big.metadata.name.as_deref(), Some("big"));
    assert!(big.spec.rules.is_empty(), "fail closed: no rules");
    assert_eq!(big.spec.hash, agent_spec(&[]).hash);
    assert!(serde_json::to_vec(big).unwrap().len() < MAX_AGENT_CONFIG_BYTES);
    for i in 0..20 {
        let outcome = d
            .outcomes
            .iter()
            .find(|o| o.policy == format!("p{i:02}"))
            .unwrap();
        let problem = outcome.problems.join("; ");
        assert!(problem.contains("node big"), "{problem}");
        assert!(problem.contains("over the 1048576-byte limit"), "{problem}");
    }
    // The other node is unaffected.
    let small = &d.node_agent_configs[1];
    assert!(!small.spec.rules.is_empty());
    let narrow = d.outcomes.iter().find(|o| o.policy == "narrow").unwrap();
    assert!(narrow.problems.is_empty());
}

/// The shape of issue 20's cluster: 1,000 policies, three in four on every node, each naming
/// 1–5 of 200 namespaces, two endpoints and one of 50 shared service accounts. The node every
/// policy selects holds them all, within every bound of the CRD, with room to spare (the old
/// format capped a node at 512 rules).
#[test]
fn thousand_policies_fit_every_node() {
    let endpoints = [
        Endpoint::Cadvisor,
        Endpoint::Resource,
        Endpoint::Pods,
        Endpoint::Stats,
    ];
    let policies: Vec<NodeApiPolicy> = (0..1000usize)
        .map(|i| {
            let count = 1 + i % 5;
            let list: Vec<String> = (0..count)
                .map(|k| format!("team-{:03}", (i * 7 + k * 13) % 200))
                .collect();
            let mut sp = spec(&[endpoints[i % 4], endpoints[(i + 1) % 4]], names(&[]));
            sp.namespaces.names = Some(list);
            sp.subjects = vec![Subject {
                kind: SubjectKind::ServiceAccount,
                name: format!("prometheus-{:02}", i % 50),
                namespace: Some(format!("monitoring-{:02}", i % 50)),
            }];
            if i % 4 == 3 {
                sp.node_selector = Some(select(&[("gpu", "true")]));
            }
            policy(&format!("team-policy-{i:04}"), sp)
        })
        .collect();
    let nodes = [node("every", &[("gpu", "true")]), node("other", &[])];
    let d = compile(&policies, &nodes, &[]);
    assert!(d.outcomes.iter().all(|o| o.problems.is_empty()));
    let every = &d.node_agent_configs[0];
    assert_eq!(every.spec.rules.len(), 1000);
    assert_eq!(d.node_agent_configs[1].spec.rules.len(), 750);
    assert_eq!(
        every.spec.subjects.len(),
        50,
        "each service account written once"
    );
    let size = serde_json::to_vec(every).unwrap().len();
    assert!(size < MAX_AGENT_CONFIG_BYTES / 4, "{size} bytes");
    assert!(validation::agent_spec_bound_violations(&every.spec).is_empty());
    let unpacked = serde_json::to_vec(&every.spec.unpack_all().unwrap())
        .unwrap()
        .len();
    eprintln!("1,000 rules: {size} bytes of JSON ({unpacked} bytes of rules spelled out)");
}

/// A bound of the schema other than bytes (here `rules[].subjects` at most 48) fails closed
/// like the byte limit, and the message names the bound as the schema has it.
#[test]
fn every_schema_bound_fails_closed_and_names_the_limit() {
    let mut sp = spec(&[Endpoint::Pods], names(&["a"]));
    sp.subjects = (0..60).map(|i| group(&format!("g{i}"))).collect();
    let mut other = spec(&[Endpoint::Pods], names(&["a"]));
    other.node_selector = Some(select(&[("pool", "x")]));
    let d = compile(
        &[policy("wide", sp.clone()), policy("elsewhere", other)],
        &[node("n", &[]), node("x", &[("pool", "x")])],
        &[],
    );
    let n = &d.node_agent_configs[0];
    assert!(n.spec.rules.is_empty() && n.spec.subjects.is_empty());
    let wide = d.outcomes.iter().find(|o| o.policy == "wide").unwrap();
    let problem = wide.problems.join("; ");
    assert!(problem.contains("node n"), "{problem}");
    assert!(
        problem.contains("spec.rules[0].subjects: Too many: 60 (at most 48)"),
        "{problem}"
    );
    // Node x holds only `elsewhere`... and `wide`, which selects every node: refused there too.
    assert!(d.node_agent_configs[1].spec.rules.is_empty());
    let elsewhere = d.outcomes.iter().find(|o| o.policy == "elsewhere").unwrap();
    assert!(elsewhere.problems.join("; ").contains("node x"));
    // Within the bound, it compiles.
    sp.subjects.truncate(48);
    let d = compile(&[policy("wide", sp)], &[node("n", &[])], &[]);
    assert_eq!(d.node_agent_configs[0].spec.rules.len(), 1);
    assert!(d.outcomes[0].problems.is_empty());
}

/// The CRD's CEL rules are decided: an index that names no entry, or rules beside a
/// `ruleSet`, is refused with the rule's message, as the API server (and kube's client-side
/// evaluator) would refuse it.
#[test]
fn the_cel_rules_of_the_crd_are_checked() {
    let d = compile(
        &[policy("p", spec(&[Endpoint::Pods], names(&["a"])))],
        &[node("n", &[])],
        &[],
    );
    let good = d.node_agent_configs[0].spec.clone();
    assert!(validation::agent_spec_bound_violations(&good).is_empty());
    assert!(validation::agent_spec_cel_violations(&good).is_empty());

    let mut bad_index = good.clone();
    bad_index.rules[0].namespaces = 1;
    let mut beside = good.clone();
    beside.rule_set = Some("nodegate-rules-x".into());
    for (spec, message) in [
        (
            bad_index,
            "every rules[].subjects and rules[].namespaces index must name an entry",
        ),
        (beside, "a spec that names a ruleSet holds no rules"),
    ] {
        let errors = validation::agent_spec_bound_violations(&spec).join("; ");
        assert!(errors.contains(message), "{errors}");
        assert_eq!(
            validation::spec_rule_violations(&spec),
            validation::agent_spec_cel_violations(&spec)
        );
    }
}

/// `spec_rule_violations` decides every CEL rule the generated CRD puts anywhere in a
/// NodeAgentConfig's spec: a rule added to the CRD fails this test until it is decided there
/// too (the evaluator is too slow for a compile, so the compiler cannot simply call it).
#[test]
fn every_cel_rule_of_the_crd_is_decided_natively() {
    fn collect(schema: &serde_json::Value, found: &mut BTreeSet<String>) {
        match schema {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    if key == "x-kubernetes-validations" {
                        for rule in value.as_array().into_iter().flatten() {
                            if let Some(rule) = rule.get("rule").and_then(|r| r.as_str()) {
                                found.insert(rule.to_string());
                            }
                        }
                    } else {
                        collect(value, found);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, found)),
            _ => {}
        }
    }
    let crd = serde_json::to_value(nodegate_crds::crd::node_agent_config()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut found = BTreeSet::new();
    collect(spec, &mut found);
    let decided: BTreeSet<String> = validation::NODE_AGENT_CONFIG_RULES
        .iter()
        .map(|rule| rule().rule)
        .collect();
    assert!(!found.is_empty(), "no CEL rule found: the walk is wrong");
    assert_eq!(found, decided);
}

// ---- properties ----

const LABEL_KEYS: &[&str] = &["pool", "zone", "team"];
const LABEL_VALUES: &[&str] = &["a", "b", "c"];
const NAMESPACES: &[&str] = &["ns-a", "ns-b", "ns-c", "ns-d"];

fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(LABEL_KEYS).prop_map(String::from),
        prop::sample::select(LABEL_VALUES).prop_map(String::from),
        0..3,
    )
}

fn arb_selector() -> impl Strategy<Value = LabelSelector> {
    let requirement = (
        prop::sample::select(LABEL_KEYS),
        prop::sample::select(vec![
            SelectorOperator::In,
            SelectorOperator::NotIn,
            SelectorOperator::Exists,
            SelectorOperator::DoesNotExist,
        ]),
        prop::collection::vec(
            prop::sample::select(LABEL_VALUES).prop_map(String::from),
            0..3,
        ),
    )
        .prop_map(|(key, operator, values)| LabelSelectorRequirement {
            key: key.into(),
            operator,
            values,
        });
    (arb_labels(), prop::collection::vec(requirement, 0..2)).prop_map(
        |(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        },
    )
}

fn arb_scope() -> impl Strategy<Value = NamespaceScope> {
    prop_oneof![
        prop::collection::vec(
            prop::sample::select(NAMESPACES).prop_map(String::from),
            1..3
        )
        .prop_map(|n| NamespaceScope {
            names: Some(n),
            ..Default::default()
        }),
        arb_selector().prop_map(|s| NamespaceScope {
            selector: Some(s),
            ..Default::default()
        }),
        Just(all()),
    ]
}

fn arb_subject() -> impl Strategy<Value = Subject> {
    prop_oneof![
        3 => prop::sample::select(vec!["alice", "bob"]).prop_map(|n| Subject {
            kind: SubjectKind::User,
            name: n.into(),
            namespace: None
        }),
        3 => prop::sample::select(vec!["ops", "dev"]).prop_map(group),
        3 => prop::sample::select(vec!["prom", "agent"]).prop_map(|n| Subject {
            kind: SubjectKind::ServiceAccount,
            name: n.into(),
            namespace: Some("mon".into())
        }),
        // Refused by the CRD with the Secure port; the compiler must still never bind them.
        1 => Just(Subject {
            kind: SubjectKind::User,
            name: "system:anonymous".into(),
            namespace: None
        }),
        1 => Just(group("system:unauthenticated")),
    ]
}

fn arb_policy(name: String) -> impl Strategy<Value = NodeApiPolicy> {
    let endpoints: Vec<Endpoint> = Endpoint::all().collect();
    (
        prop::collection::vec(arb_subject(), 0..3),
        prop::collection::vec(
            prop::sample::select(vec!["prom", "scraper"]).prop_map(|n| ServiceAccountRef {
                name: n.into(),
                namespace: "mon".into(),
            }),
            0..3,
        ),
        prop::option::of(arb_selector()),
        prop::sample::subsequence(endpoints, 1..5),
        arb_scope(),
        prop::sample::subsequence(vec![Port::Secure, Port::ReadOnly], 1..=2),
        prop::option::of(any::<bool>()),
    )
        .prop_map(
            move |(
                subjects,
                service_accounts,
                node_selector,
                access,
                namespaces,
                ports,
                direct,
            )| {
                policy(
                    &name,
                    NodeApiPolicySpec {
                        subjects,
                        service_accounts,
                        node_selector,
                        access,
                        namespaces,
                        ports,
                        metrics: None,
                        direct_kubelet_access: direct,
                    },
                )
            },
        )
}

fn arb_world() -> impl Strategy<Value = (Vec<NodeApiPolicy>, Vec<NodeInfo>, Vec<NamespaceInfo>)> {
    let policies = prop::collection::btree_set("[a-e]{1,2}", 0..5)
        .prop_flat_map(|names| names.into_iter().map(arb_policy).collect::<Vec<_>>());
    let nodes = prop::collection::btree_map("n[0-9]", arb_labels(), 0..6).prop_map(|m| {
        m.into_iter()
            .map(|(name, labels)| NodeInfo {
                uid: format!("uid-{name}"),
                name,
                labels,
            })
            .collect::<Vec<_>>()
    });
    let namespaces = prop::collection::vec(arb_labels(), NAMESPACES.len()).prop_map(|ls| {
        NAMESPACES
            .iter()
            .zip(ls)
            .map(|(n, labels)| NamespaceInfo {
                name: n.to_string(),
                labels,
            })
            .collect::<Vec<_>>()
    });
    (policies, nodes, namespaces)
}

/// Whether the compiler must refuse the policy whole: anonymous subjects on the secure port.
fn refused(p: &NodeApiPolicy) -> bool {
    p.spec.ports.contains(&Port::Secure) && p.spec.subjects.iter().any(is_anonymous)
}

fn bytes(d: &Desired) -> Vec<u8> {
    serde_json::to_vec(d).unwrap()
}

/// What a policy's selector selects, computed independently of the compiler.
fn selected(p: &NodeApiPolicy, n: &NodeInfo) -> bool {
    match &p.spec.node_selector {
        None => true,
        Some(s) => s.to_selector().is_ok() && s.matches(&n.labels),
    }
}

fn allowed_namespaces(p: &NodeApiPolicy, namespaces: &[NamespaceInfo]) -> Option<BTreeSet<String>> {
    let scope = &p.spec.namespaces;
    if scope.all == Some(true) {
        return None;
    }
    let mut set: BTreeSet<String> = scope
        .names
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    if let Some(sel) = &scope.selector {
        set.extend(
            namespaces
                .iter()
                .filter(|n| sel.matches(&n.labels))
                .map(|n| n.name.clone()),
        );
    }
    Some(set)
}

/// Whether an object was generated for policy `name` (by its policy label).
fn of_policy(meta: &ObjectMeta, name: &str) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(POLICY_LABEL))
        .is_some_and(|v| *v == policy_label_value(name))
}

/// compile(P) minus everything policy `name` contributed.
fn without(mut d: Desired, name: &str) -> Desired {
    d.cluster_roles.retain(|r| !of_policy(&r.metadata, name));
    d.cluster_role_bindings
        .retain(|r| !of_policy(&r.metadata, name));
    d.role_bindings.retain(|r| !of_policy(&r.metadata, name));
    d.outcomes.retain(|o| o.policy != name);
    for sa in &mut d.service_accounts {
        let owners = sa.metadata.owner_references.as_mut().unwrap();
        owners.retain(|o| o.name != name);
        let first = owners.first().map(|o| o.name.clone());
        sa.metadata.labels = Some(object_labels(first.as_deref()));
    }
    d.service_accounts
        .retain(|sa| !sa.metadata.owner_references.as_ref().unwrap().is_empty());
    for c in &mut d.node_agent_configs {
        let mut rules = c.spec.unpack_all().unwrap();
        rules.retain(|r| r.policy != name);
        c.spec = agent_spec(&rules);
    }
    d
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn deterministic_under_input_reordering(
        (policies, nodes, namespaces) in arb_world(),
        seed in any::<u64>(),
    ) {
        let want = bytes(&compile(&policies, &nodes, &namespaces));
        let shuffle = |len: usize| {
            let mut idx: Vec<usize> = (0..len).collect();
            idx.sort_by_key(|i| (*i as u64).wrapping_mul(seed | 1).rotate_left(17) ^ seed);
            idx
        };
        let p: Vec<_> = shuffle(policies.len()).into_iter().map(|i| policies[i].clone()).collect();
        let n: Vec<_> = shuffle(nodes.len()).into_iter().map(|i| nodes[i].clone()).collect();
        let ns: Vec<_> = namespaces.iter().rev().cloned().collect();
        prop_assert_eq!(bytes(&compile(&p, &n, &ns)), want);
    }

    #[test]
    fn never_grants_what_no_policy_asked_for((policies, nodes, namespaces) in arb_world()) {
        let d = compile(&policies, &nodes, &namespaces);
        let by_name: BTreeMap<String, &NodeApiPolicy> =
            policies.iter().map(|p| (p.metadata.name.clone().unwrap(), p)).collect();
        for role in &d.cluster_roles {
            let name = role.metadata.labels.as_ref().unwrap()[POLICY_LABEL].clone();
            let p = by_name[&name];
            prop_assert!(p.spec.ports.contains(&Port::Secure));
            for rule in role.rules.as_ref().unwrap() {
                let group = rule.api_groups.as_ref().unwrap();
                prop_assert_eq!(group.len(), 1);
                let core = group[0].is_empty();
                if core {
                    // Core nodes/* RBAC only for an explicit opt-in with all namespaces.
                    prop_assert!(p.spec.direct() && p.spec.namespaces.all == Some(true), "{} has core RBAC", name);
                } else {
                    prop_assert_eq!(group[0].as_str(), "nodegate.io");
                }
                for resource in rule.resources.as_ref().unwrap() {
                    for verb in &rule.verbs {
                        let asked = p.spec.access.iter().any(|e| {
                            let r = if core { e.rbac_subresource().map(|s| format!("nodes/{s}")).unwrap_or_default() } else { e.agent_resource() };
                            r == *resource && e.verbs().iter().any(|v| v.as_str() == verb)
                        });
                        prop_assert!(asked, "{} grants {} {} unasked", name, verb, resource);
                    }
                }
                match &rule.resource_names {
                    None => prop_assert!(p.spec.node_selector.as_ref().is_none_or(|s| s.selects_all())),
                    Some(names) => {
                        prop_assert!(!names.is_empty(), "empty resourceNames would mean every node");
                        for n in names {
                            let node = nodes.iter().find(|x| &x.name == n).unwrap();
                            prop_assert!(selected(p, node));
                        }
                    }
                }
            }
        }
        let bindings = d.cluster_role_bindings.iter().map(|b| (&b.metadata, b.subjects.as_ref().unwrap()))
            .chain(d.role_bindings.iter().map(|b| (&b.metadata, b.subjects.as_ref().unwrap())));
        for (meta, subjects) in bindings {
            let name = meta.labels.as_ref().unwrap()[POLICY_LABEL].clone();
            let p = by_name[&name];
            prop_assert!(!subjects.is_empty(), "an empty subject list is never written");
            if let Some(ns) = &meta.namespace {
                // RoleBindings only in namespaces the policy scopes to, never for `all`.
                let allowed = allowed_namespaces(p, &namespaces);
                prop_assert!(allowed.is_some_and(|a| a.contains(ns)));
            }
            for s in subjects {
                prop_assert!(!((s.kind == "User" && s.name == "system:anonymous") || (s.kind == "Group" && s.name == "system:unauthenticated")),
                    "{} binds {} in RBAC", name, s.name);
                let asked = p.spec.subjects.iter().any(|x| x.kind.as_str() == s.kind && x.name == s.name && x.namespace == s.namespace)
                    || p.spec.service_accounts.iter().any(|x| s.kind == "ServiceAccount" && x.name == s.name && Some(&x.namespace) == s.namespace.as_ref());
                prop_assert!(asked);
            }
        }
        for sa in &d.service_accounts {
            for owner in sa.metadata.owner_references.as_ref().unwrap() {
                let p = by_name[&owner.name];
                prop_assert!(p.spec.service_accounts.iter().any(|x| Some(&x.name) == sa.metadata.name.as_ref()
                    && Some(&x.namespace) == sa.metadata.namespace.as_ref()));
            }
        }
        for config in &d.node_agent_configs {
            let node = nodes.iter().find(|n| n.metadata_name() == config.metadata.name.as_deref()).unwrap();
            for rule in &config.spec.unpack_all().unwrap() {
                let p = by_name[&rule.policy];
                prop_assert!(selected(p, node));
                prop_assert!(rule.endpoints.iter().all(|e| p.spec.access.contains(e)));
                prop_assert!(rule.ports.iter().all(|x| p.spec.ports.contains(x)));
                match allowed_namespaces(p, &namespaces) {
                    None => prop_assert!(rule.namespaces.all),
                    Some(allowed) => {
                        prop_assert!(!rule.namespaces.all);
                        prop_assert!(rule.namespaces.names.iter().all(|n| allowed.contains(n)));
                    }
                }
            }
        }
    }

    #[test]
    fn grants_everything_each_policy_asked_for((policies, nodes, namespaces) in arb_world()) {
        let d = compile(&policies, &nodes, &namespaces);
        for p in &policies {
            let name = p.metadata.name.clone().unwrap();
            // A refused policy (anonymous subjects on the secure port) creates nothing at all.
            for sa in p.spec.service_accounts.iter().filter(|_| !refused(p)) {
                let found = d.service_accounts.iter().find(|x| x.metadata.name.as_ref() == Some(&sa.name)
                    && x.metadata.namespace.as_ref() == Some(&sa.namespace));
                prop_assert!(found.is_some_and(|x| x.metadata.owner_references.as_ref().unwrap().iter().any(|o| o.name == name)));
            }
            let any_node = nodes.iter().any(|n| selected(p, n));
            let all = p.spec.namespaces.all == Some(true);
            let wanted: BTreeSet<Subject> = p.spec.subjects.iter().cloned()
                .chain(p.spec.service_accounts.iter().map(service_account_subject)).collect();
            let refused = p.spec.ports.contains(&Port::Secure) && wanted.iter().any(is_anonymous);
            // No subject (refused by the CRD) means no RBAC at all: a binding never has empty subjects.
            let secure = p.spec.ports.contains(&Port::Secure) && !refused && !wanted.is_empty();
            let roles: Vec<&ClusterRole> = d.cluster_roles.iter().filter(|r| of_policy(&r.metadata, &name)).collect();
            prop_assert_eq!(!roles.is_empty(), secure && p.spec.access.iter().any(|e| all || e.spec().scope != nodegate_crds::catalogue::Scope::NodeWide));
            let all_nodes = p.spec.node_selector.as_ref().is_none_or(|s| s.selects_all());
            for e in &p.spec.access {
                if !secure || (!all && e.spec().scope == nodegate_crds::catalogue::Scope::NodeWide) {
                    continue;
                }
                let granted = roles.iter().flat_map(|r| r.rules.as_ref().unwrap()).any(|r| {
                    r.api_groups.as_ref().unwrap()[0] == "nodegate.io"
                        && r.resources.as_ref().unwrap().contains(&e.agent_resource())
                        && e.verbs().iter().all(|v| r.verbs.iter().any(|x| x == v.as_str()))
                });
                prop_assert_eq!(granted, all_nodes || any_node, "{} {}", name, e);
            }
            for role in &roles {
                let bound: Vec<_> = d.cluster_role_bindings.iter().filter(|b| b.role_ref.name == *role.metadata.name.as_ref().unwrap()).map(|b| b.subjects.as_ref().unwrap())
                    .chain(d.role_bindings.iter().filter(|b| b.role_ref.name == *role.metadata.name.as_ref().unwrap()).map(|b| b.subjects.as_ref().unwrap()))
                    .collect();
                for subjects in bound {
                    prop_assert_eq!(subjects.len(), wanted.len());
                }
            }
            if secure && !all && p.spec.access.iter().any(|e| e.spec().scope.is_namespaced()) {
                let bound_in: BTreeSet<String> = d.role_bindings.iter().filter(|b| of_policy(&b.metadata, &name))
                    .map(|b| b.metadata.namespace.clone().unwrap()).collect();
                let want: BTreeSet<String> = allowed_namespaces(p, &namespaces).unwrap().into_iter()
                    .filter(|n| namespaces.iter().any(|x| &x.name == n)).collect();
                prop_assert_eq!(bound_in, want, "{} binds in every existing namespace in scope", name);
            }
            for config in &d.node_agent_configs {
                let node = nodes.iter().find(|n| n.metadata_name() == config.metadata.name.as_deref()).unwrap();
                prop_assert_eq!(config.spec.rules.iter().any(|r| r.policy == name), selected(p, node) && !refused);
                if let Some(rule) = config.spec.unpack_all().unwrap().iter().find(|r| r.policy == name) {
                    prop_assert!(p.spec.access.iter().all(|e| rule.endpoints.contains(e)));
                    prop_assert!(p.spec.ports.iter().all(|x| rule.ports.contains(x)));
                    if let Some(allowed) = allowed_namespaces(p, &namespaces) {
                        prop_assert_eq!(rule.namespaces.names.iter().cloned().collect::<BTreeSet<_>>(), allowed);
                    }
                }
            }
        }
    }

    #[test]
    fn each_node_gets_exactly_the_matching_rules((policies, nodes, namespaces) in arb_world()) {
        let d = compile(&policies, &nodes, &namespaces);
        prop_assert_eq!(d.node_agent_configs.len(), nodes.len());
        for config in &d.node_agent_configs {
            let node = nodes.iter().find(|n| n.metadata_name() == config.metadata.name.as_deref()).unwrap();
            let got: Vec<&str> = config.spec.rules.iter().map(|r| r.policy.as_str()).collect();
            let mut want: Vec<&str> = policies.iter().filter(|p| selected(p, node) && !refused(p)).map(|p| p.metadata.name.as_deref().unwrap()).collect();
            want.sort();
            prop_assert_eq!(&config.spec.policies, &want.join(","));
            prop_assert_eq!(got, want);
            prop_assert_eq!(&config.spec.hash, &spec_hash(&config.spec));
        }
    }

    /// Every NodeAgentConfig the compiler emits is one the API server stores (the CRD's
    /// schema bounds and CEL rule, and the byte limit), whatever the policies; and when the
    /// API server would have admitted every policy, one the agent enforces.
    #[test]
    fn every_emitted_config_validates_against_the_crd((policies, nodes, namespaces) in arb_world()) {
        let d = compile(&policies, &nodes, &namespaces);
        let admitted = policies.iter().all(|p| {
            let mut doc = serde_json::to_value(p).unwrap();
            doc["apiVersion"] = "nodegate.io/v1alpha1".into();
            doc["kind"] = "NodeApiPolicy".into();
            nodegate_crds::validation::validate_policy(&doc).is_ok()
        });
        for config in &d.node_agent_configs {
            prop_assert_eq!(validation::agent_spec_bound_violations(&config.spec), Vec::<String>::new());
            prop_assert_eq!(validation::agent_spec_cel_violations(&config.spec), Vec::<String>::new());
            prop_assert_eq!(validation::agent_config_size_violation(config), None);
            if admitted {
                let value = serde_json::to_value(&config.spec).unwrap();
                let accepted = validation::validate_agent_spec("t", &value);
                prop_assert!(accepted.is_ok(), "{:?}", accepted);
            }
        }
    }

    /// The native decision of the CRD's CEL rules answers as kube's evaluator does, on
    /// compiled specs whose indices and `ruleSet` are then corrupted at random.
    #[test]
    fn the_native_cel_decision_matches_the_evaluator(
        (policies, nodes, namespaces) in arb_world(),
        pick in any::<prop::sample::Index>(),
        namespace_index in 0u32..6,
        subject_index in prop::option::of(0u32..6),
        rule_set in prop::option::of("[a-z]{0,3}"),
    ) {
        let d = compile(&policies, &nodes, &namespaces);
        for config in &d.node_agent_configs {
            let mut spec = config.spec.clone();
            if !spec.rules.is_empty() {
                let rule = pick.index(spec.rules.len());
                spec.rules[rule].namespaces = namespace_index;
                spec.rules[rule].subjects.extend(subject_index);
            }
            spec.rule_set = rule_set.clone();
            prop_assert_eq!(
                validation::spec_rule_violations(&spec),
                validation::agent_spec_cel_violations(&spec)
            );
        }
    }

    #[test]
    fn removing_a_policy_removes_exactly_its_outputs(
        (policies, nodes, namespaces) in arb_world(),
        pick in any::<prop::sample::Index>(),
    ) {
        prop_assume!(!policies.is_empty());
        let removed = pick.get(&policies).metadata.name.clone().unwrap();
        let rest: Vec<_> = policies.iter().filter(|p| p.metadata.name.as_deref() != Some(removed.as_str())).cloned().collect();
        let after = compile(&rest, &nodes, &namespaces);
        let expected = without(compile(&policies, &nodes, &namespaces), &removed);
        prop_assert_eq!(bytes(&after), bytes(&expected));
    }
}

/// Whether an RBAC binding subject names the user, as the RBAC authorizer matches them.
fn rbac_subject_matches(s: &RbacSubject, user: &str, groups: &[String]) -> bool {
    match s.kind.as_str() {
        "User" => s.name == user,
        "Group" => groups.contains(&s.name),
        "ServiceAccount" => s
            .namespace
            .as_deref()
            .is_some_and(|ns| user == format!("system:serviceaccount:{ns}:{}", s.name)),
        _ => false,
    }
}

/// A small RBAC evaluator over the compiled objects: would a SubjectAccessReview for this user
/// and groups, on nodegate's resource for `endpoint`, node `node`, in `namespace` (`None`:
/// cluster scope), with `verb`, be allowed? ClusterRoleBindings answer in every namespace,
/// RoleBindings only in their own — exactly the RBAC authorizer's rule.
fn rbac_allows(
    d: &Desired,
    (user, groups): (&str, &[String]),
    endpoint: Endpoint,
    verb: Verb,
    node: &str,
    namespace: Option<&str>,
) -> bool {
    let role_allows = |role_name: &str| {
        d.cluster_roles
            .iter()
            .filter(|r| r.metadata.name.as_deref() == Some(role_name))
            .flat_map(|r| r.rules.iter().flatten())
            .any(|rule| {
                rule.api_groups
                    .as_ref()
                    .is_some_and(|g| g.iter().any(|g| g == "nodegate.io"))
                    && rule
                        .resources
                        .as_ref()
                        .is_some_and(|r| r.contains(&endpoint.agent_resource()))
                    && rule.verbs.iter().any(|v| v == verb.as_str())
                    && rule
                        .resource_names
                        .as_ref()
                        .is_none_or(|names| names.iter().any(|n| n == node))
            })
    };
    let cluster = d.cluster_role_bindings.iter().any(|b| {
        b.subjects
            .iter()
            .flatten()
            .any(|s| rbac_subject_matches(s, user, groups))
            && role_allows(&b.role_ref.name)
    });
    let namespaced = namespace.is_some_and(|ns| {
        d.role_bindings.iter().any(|b| {
            b.metadata.namespace.as_deref() == Some(ns)
                && b.subjects
                    .iter()
                    .flatten()
                    .any(|s| rbac_subject_matches(s, user, groups))
                && role_allows(&b.role_ref.name)
        })
    });
    cluster || namespaced
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The invariant of the compiler: for every subject, endpoint, verb, node and existing
    /// namespace (and cluster scope), RBAC on nodegate's resource answers exactly as the agent
    /// decides with the node's NodeAgentConfig — the agent's own decision function
    /// (`nodegate_crds::decision::authorize`, through `rbac_answer`), not a model of it. So
    /// `kubectl auth can-i` and RBAC audit tools tell the truth.
    #[test]
    fn rbac_and_agent_configs_agree((policies, nodes, namespaces) in arb_world()) {
        let d = compile(&policies, &nodes, &namespaces);
        let mut subjects: BTreeSet<Subject> = policies.iter().flat_map(|p| p.spec.subjects.iter().cloned()
            .chain(p.spec.service_accounts.iter().map(service_account_subject))).collect();
        subjects.insert(group("stranger"));
        let verbs = [Verb::Get, Verb::Create, Verb::Update, Verb::Patch, Verb::Delete];
        let scopes: Vec<Option<&str>> = std::iter::once(None).chain(namespaces.iter().map(|n| Some(n.name.as_str()))).collect();
        for config in &d.node_agent_configs {
            let node = config.metadata.name.as_deref().unwrap();
            let rules = RuleSet::new(config.spec.clone());
            for subject in &subjects {
                let (user, groups) = nodegate_crds::decision::review_identity(subject);
                let who = Requester { name: &user, groups: &groups };
                for endpoint in Endpoint::all() {
                    for verb in verbs {
                        for namespace in &scopes {
                            let rbac = rbac_allows(&d, (&user, &groups), endpoint, verb, node, *namespace);
                            let agent = rbac_answer(&rules, who, endpoint, verb, *namespace);
                            prop_assert_eq!(rbac, agent, "{:?} {} {} on {} in {:?}", subject, verb, endpoint, node, namespace);
                        }
                    }
                }
            }
        }
    }
}

trait MetadataName {
    fn metadata_name(&self) -> Option<&str>;
}

impl MetadataName for NodeInfo {
    fn metadata_name(&self) -> Option<&str> {
        Some(&self.name)
    }
}

/// Nodes the same policies select share one rule set: `compile_shared` builds it once, each
/// node's config names it, and `compile` is that, filled in.
#[test]
fn nodes_selected_alike_share_one_rule_set() {
    let mut pooled = spec(&[Endpoint::Pods], names(&["a"]));
    pooled.node_selector = Some(select(&[("pool", "a")]));
    let policies = [
        policy("everywhere", spec(&[Endpoint::Stats], names(&["b"]))),
        policy("pooled", pooled),
    ];
    let nodes = [
        node("n1", &[("pool", "a")]),
        node("n2", &[("pool", "a")]),
        node("n3", &[]),
        node("n4", &[]),
    ];
    let (shared, sets) = compile_shared(&policies, &nodes, &[], None);
    assert_eq!(sets.len(), 2, "two selections, two rule sets");
    assert_eq!(shared.node_agent_rule_sets.len(), 2);
    let hash_of: BTreeMap<String, String> = shared
        .node_agent_rule_sets
        .iter()
        .map(|r| (r.metadata.name.clone().unwrap(), r.spec.0.hash.clone()))
        .collect();
    for set in &shared.node_agent_rule_sets {
        assert!(
            set.spec.0.rules.is_empty(),
            "rules are kept by hash until written"
        );
        assert_eq!(set.spec.0.policies, sets[&set.spec.0.hash].policies);
        assert!(sets.contains_key(&set.spec.0.hash));
    }
    for config in &shared.node_agent_configs {
        assert!(config.spec.rules.is_empty() && config.spec.hash.is_empty());
        assert!(hash_of.contains_key(config.spec.rule_set.as_deref().unwrap()));
    }
    let names: Vec<&str> = shared
        .node_agent_configs
        .iter()
        .map(|c| c.spec.rule_set.as_deref().unwrap())
        .collect();
    assert_eq!(names[0], names[1]);
    assert_eq!(names[2], names[3]);
    assert_ne!(names[0], names[2]);
    assert_eq!(names[0], rule_set_name(&["everywhere", "pooled"], None));
    assert_eq!(names[2], rule_set_name(&["everywhere"], None));

    let whole = compile(&policies, &nodes, &[]);
    assert_eq!(whole.node_agent_configs.len(), 4);
    assert!(
        whole.node_agent_rule_sets.is_empty(),
        "compile writes rules inline"
    );
    for (whole, shared) in whole
        .node_agent_configs
        .iter()
        .zip(&shared.node_agent_configs)
    {
        assert_eq!(whole.metadata, shared.metadata);
        let hash = &hash_of[shared.spec.rule_set.as_deref().unwrap()];
        assert_eq!(&whole.spec, &sets[hash]);
        assert_eq!(whole.spec.rule_set, None);
    }
    assert_eq!(whole.node_agent_configs[0].spec.rules.len(), 2);
    assert_eq!(whole.node_agent_configs[2].spec.rules.len(), 1);
}

/// A rule set's name follows the selection, not what the policies grant (a change to a policy
/// rewrites one rule set, no NodeAgentConfig), and instances never share one.
#[test]
fn a_rule_set_is_named_by_its_selection_and_instance() {
    let nodes = [node("n1", &[])];
    let one = compile_shared(
        &[policy("p", spec(&[Endpoint::Pods], names(&["a"])))],
        &nodes,
        &[],
        None,
    )
    .0;
    let changed = compile_shared(
        &[policy("p", spec(&[Endpoint::Stats], names(&["b"])))],
        &nodes,
        &[],
        None,
    )
    .0;
    let other = compile_shared(
        &[policy("p", spec(&[Endpoint::Pods], names(&["a"])))],
        &nodes,
        &[],
        Some("t1"),
    )
    .0;
    let name = |d: &Desired| d.node_agent_configs[0].spec.rule_set.clone().unwrap();
    let hash = |d: &Desired| d.node_agent_rule_sets[0].spec.0.hash.clone();
    assert_eq!(name(&one), name(&changed));
    assert_ne!(hash(&one), hash(&changed));
    assert_eq!(
        serde_json::to_value(&one.node_agent_configs).unwrap(),
        serde_json::to_value(&changed.node_agent_configs).unwrap(),
        "no config write"
    );
    assert_ne!(name(&one), name(&other));
    assert_ne!(
        rule_set_name(&["ab"], None),
        rule_set_name(&["a", "b"], None)
    );
}

/// Two instances on the same node write configs of different names, each owned by the node
/// (which is how the operator finds a config's node); without an instance, the node's name.
#[test]
fn instances_never_share_a_config_name() {
    let policies = [policy("p", spec(&[Endpoint::Pods], names(&["a"])))];
    let nodes = [node("n1", &[])];
    let names = |instance: Option<&str>| -> Vec<(String, Option<String>)> {
        compile_shared(&policies, &nodes, &[], instance)
            .0
            .node_agent_configs
            .iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap(),
                    config_node(&c.metadata).map(String::from),
                )
            })
            .collect()
    };
    assert_eq!(names(None), [("n1".to_string(), Some("n1".to_string()))]);
    assert_eq!(
        names(Some("blue")),
        [("blue.n1".to_string(), Some("n1".to_string()))]
    );
    assert_eq!(names(Some("green"))[0].0, "green.n1");
    assert_eq!(config_name("n1", Some("blue")), "blue.n1");

    assert_eq!(parse_instance("op-1"), Ok("op-1".to_string()));
    for bad in ["", "Blue", "a.b", "-a", "a-", &"x".repeat(64)] {
        let error = parse_instance(bad).unwrap_err();
        assert!(error.contains("not a DNS label"), "{bad:?}: {error}");
    }
}

/// The byte limit is checked without building each rule set's object: the size is computed
/// from its shell and its rules' JSON, and must be the size of the whole object.
#[test]
fn a_rule_set_is_measured_exactly_without_being_built() {
    let mut sp = spec(&[Endpoint::Pods, Endpoint::Stats], names(&["a", "b"]));
    sp.subjects = (0..5).map(|i| group(&format!("g{i}"))).collect();
    let policies = [policy("p", sp)];
    let nodes = [node("a-node-with-a-long-name.example.com", &[])];
    let (shared, sets) = compile_shared(&policies, &nodes, &[], Some("an-instance"));
    let set = &shared.node_agent_rule_sets[0];
    let spec = &sets[&set.spec.0.hash];
    let spec_bytes = serde_json::to_vec(spec).unwrap().len();
    let mut whole = set.clone();
    whole.spec.0 = spec.clone();
    assert_eq!(
        rule_set_bytes(set, spec_bytes),
        serde_json::to_vec(&whole).unwrap().len()
    );
}
