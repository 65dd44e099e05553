//! The policy compiler: (policies, nodes, namespaces) → the objects the cluster should hold.
//!
//! A pure function with no I/O, so every decision about what nodegate grants is unit- and
//! property-tested here, and the controller around it only reads state and applies results.
//! Output is deterministic (sorted, byte-identical for the same input in any order) so the
//! controller can skip writes when nothing changed.
//!
//! The invariant everything here serves: **for every subject, endpoint, node and (existing)
//! namespace, what the generated RBAC on nodegate's resource allows equals what that node's
//! NodeAgentConfig allows** (property `rbac_and_agent_configs_agree`). Through-agent grants
//! are rules on `nodegate.io` `nodeagentconfigs/<endpoint>`, which the kubelet and the API
//! server's node proxy never consult, bound per namespace so that `kubectl auth can-i … -n ns`
//! and any RBAC audit tool tell the truth. Core `nodes/*` RBAC (honoured by the kubelet,
//! unfiltered) is written only for policies that opt into `directKubeletAccess` with
//! `namespaces.all`.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::Subject as RbacSubject;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, RoleBinding, RoleRef,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use nodegate_crds::catalogue::{AGENT_API_GROUP, Scope};
use nodegate_crds::policy::ServiceAccountRef;
use nodegate_crds::{
    AgentRule, Endpoint, MANAGED_BY, NodeAgentConfig, NodeAgentConfigSpec, NodeAgentRuleSet,
    NodeAgentRuleSetSpec, NodeApiPolicy, POLICY_LABEL, Port, ResolvedNamespaces, Subject,
    SubjectKind, Subresource, Verb,
};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

pub mod validation;

/// What the compiler needs to know of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
}

/// What the compiler needs to know of a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Everything the cluster should hold for a set of policies.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Desired {
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    /// Per-namespace bindings of a policy's ClusterRole, so RBAC answers per namespace.
    pub role_bindings: Vec<RoleBinding>,
    pub service_accounts: Vec<ServiceAccount>,
    /// One per node, policies or not, so every agent knows it is configured. From
    /// [`compile_shared`] each names its node's rule set (`spec.ruleSet`); from [`compile`]
    /// each holds its rules.
    pub node_agent_configs: Vec<NodeAgentConfig>,
    /// From [`compile_shared`]: one per distinct selection of policies, holding only
    /// `spec.hash` until it is written (its rules are the [`RuleSets`] entry of that hash).
    pub node_agent_rule_sets: Vec<NodeAgentRuleSet>,
    /// Per policy, what it resolved to (for its status).
    pub outcomes: Vec<PolicyOutcome>,
}

/// What one policy resolved to.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyOutcome {
    pub policy: String,
    /// Matched node names, sorted.
    pub nodes: Vec<String>,
    /// Whether the policy selects every node (present and future).
    pub all_nodes: bool,
    pub namespaces: ResolvedNamespaces,
    /// Bound subjects, created service accounts included, sorted.
    pub subjects: Vec<Subject>,
    /// Name of the policy's main ClusterRole and of its bindings; `None` when the policy
    /// grants nothing on the secure port (the read-only port has no authorization to grant)
    /// or was refused.
    pub rbac_name: Option<String>,
    /// Every RBAC object generated for the policy, as `Kind/name` or `Kind/namespace/name`.
    pub rbac_objects: Vec<String>,
    /// Inputs that could not be honoured (an invalid selector matches nothing; a combination
    /// the CRD's rules refuse is compiled to nothing rather than to a guess).
    pub problems: Vec<String>,
}

/// Name of the ClusterRole generated for a policy's grants of namespaced data, and of the
/// bindings (one per namespace, or one ClusterRoleBinding for `namespaces.all`).
pub fn rbac_name(policy: &str) -> String {
    format!("nodegate:{policy}")
}

/// Name of the ClusterRole and ClusterRoleBinding for a namespace-scoped policy's endpoints
/// that hold no namespaced data (healthz, spec): RBAC answers for them at cluster scope.
pub fn unscoped_rbac_name(policy: &str) -> String {
    format!("nodegate:{policy}:unscoped")
}

/// The `nodegate.io/policy` label value for a policy name. Policy names may be 253 characters,
/// label values only 63: a longer name becomes its first 50 characters and 12 hex digits of
/// its SHA-256, so every write succeeds and distinct names keep distinct values.
pub fn policy_label_value(policy: &str) -> String {
    if policy.len() <= 63 {
        return policy.to_string();
    }
    let digest: String = Sha256::digest(policy.as_bytes())
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    // Names are DNS subdomains (ASCII); a label value must start and end alphanumeric.
    let prefix = policy[..50].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{prefix}-{digest}")
}

/// The anonymous user and the unauthenticated group: bound in RBAC they would mean everyone.
pub fn is_anonymous(subject: &Subject) -> bool {
    matches!(
        (subject.kind, subject.name.as_str()),
        (SubjectKind::User, "system:anonymous") | (SubjectKind::Group, "system:unauthenticated")
    )
}

/// Compiles policies against the cluster's nodes and namespaces, every NodeAgentConfig whole
/// (its rules in it, no rule set objects): what an agent reads from a file.
///
/// For `render`, tests and small inputs; the controller uses [`compile_shared`], which holds
/// one rule set per distinct selection instead of one per node.
pub fn compile(
    policies: &[NodeApiPolicy],
    nodes: &[NodeInfo],
    namespaces: &[NamespaceInfo],
) -> Desired {
    let (mut desired, rule_sets) = compile_shared(policies, nodes, namespaces, None);
    let hashes: BTreeMap<String, String> = std::mem::take(&mut desired.node_agent_rule_sets)
        .into_iter()
        .filter_map(|r| Some((r.metadata.name?, r.spec.0.hash)))
        .collect();
    for config in &mut desired.node_agent_configs {
        let hash = config.spec.rule_set.as_ref().and_then(|n| hashes.get(n));
        if let Some(spec) = hash.and_then(|h| rule_sets.get(h)) {
            config.spec = spec.clone();
        }
    }
    desired
}

/// The rule sets of a compile, by `spec.hash`.
pub type RuleSets = BTreeMap<String, NodeAgentConfigSpec>;

/// Compiles policies against the cluster's nodes and namespaces. Each NodeAgentConfig in the
/// result names its node's NodeAgentRuleSet; each rule set holds only its metadata and
/// `spec.hash`, its rules are the [`RuleSets`] entry of that hash. `instance` (the operator's
/// `--instance`) goes into the names of the rule sets and the configs ([`config_name`]), so
/// instances never share one.
///
/// Nodes fall into few distinct selections (every node, a pool, a zone): the rules of each
/// selection are built, checked against the CRD's bounds and written once, so the memory and
/// time of a compile, and the writes of a change, grow with the selections, not with
/// nodes × policies (1,000 policies on 500 nodes made 500 copies of a 150 KB rule set: the
/// operator was OOM-killed, and a change to one policy was 73 MB of writes).
pub fn compile_shared(
    policies: &[NodeApiPolicy],
    nodes: &[NodeInfo],
    namespaces: &[NamespaceInfo],
    instance: Option<&str>,
) -> (Desired, RuleSets) {
    // Same-named inputs (never from one cluster, but possible in files given to `render`) are
    // reduced to one by a total order on their content, so the result never depends on the
    // order they came in.
    let mut policies: Vec<(&NodeApiPolicy, Vec<u8>)> = policies
        .iter()
        .filter(|p| p.metadata.name.is_some())
        .map(|p| (p, serde_json::to_vec(p).unwrap_or_default()))
        .collect();
    policies.sort_by(|(a, a_bytes), (b, b_bytes)| {
        (&a.metadata.name, a_bytes).cmp(&(&b.metadata.name, b_bytes))
    });
    policies.dedup_by(|(a, _), (b, _)| a.metadata.name == b.metadata.name);
    let policies: Vec<&NodeApiPolicy> = policies.into_iter().map(|(p, _)| p).collect();
    let mut nodes: Vec<&NodeInfo> = nodes.iter().collect();
    nodes.sort_by(|a, b| (&a.name, &a.uid, &a.labels).cmp(&(&b.name, &b.uid, &b.labels)));
    nodes.dedup_by(|a, b| a.name == b.name);
    let mut namespaces: Vec<&NamespaceInfo> = namespaces.iter().collect();
    namespaces.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
    namespaces.dedup_by(|a, b| a.name == b.name);

    let mut desired = Desired::default();
    let mut service_accounts: BTreeMap<(String, String), Vec<OwnerReference>> = BTreeMap::new();
    for policy in &policies {
        let mut outcome = resolve(policy, &nodes, &namespaces);
        rbac(policy, &mut outcome, &namespaces, &mut desired);
        if outcome_refused(&outcome) {
            desired.outcomes.push(outcome);
            continue;
        }
        for sa in &policy.spec.service_accounts {
            service_accounts
                .entry((sa.namespace.clone(), sa.name.clone()))
                .or_default()
                .push(owner_reference(policy, false));
        }
        desired.outcomes.push(outcome);
    }
    desired.service_accounts = service_accounts
        .into_iter()
        .map(|((namespace, name), owners)| service_account(namespace, name, owners))
        .collect();
    let (configs, sets, rule_sets) =
        node_agent_configs(&nodes, &policies, &mut desired.outcomes, instance);
    desired.node_agent_configs = configs;
    desired.node_agent_rule_sets = sets;
    (desired, rule_sets)
}

/// The name of the rule set of the nodes that exactly `policies` (sorted) select. Stable
/// while the selection is: a change to what those policies grant rewrites the rule set, not
/// the nodes' NodeAgentConfigs.
pub fn rule_set_name(policies: &[&str], instance: Option<&str>) -> String {
    let mut digest = Sha256::new();
    if let Some(instance) = instance {
        digest.update(instance.as_bytes());
    }
    for policy in policies {
        // Names never hold a NUL: the separator keeps ["ab"] and ["a", "b"] apart.
        digest.update(b"\0");
        digest.update(policy.as_bytes());
    }
    let hex: String = digest
        .finalize()
        .iter()
        .take(10)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("nodegate-rules-{hex}")
}

/// The name of `node`'s NodeAgentConfig: the node's own name, or for a named instance
/// (`--instance`, a DNS label) `<instance>.<node>`, so two instances on the same nodes never
/// write or read each other's. The agent computes the same name from its node and instance,
/// and the chart's admission policy lets it write the status of that name only. A node whose
/// name leaves no room for the prefix (over 253 characters with it) gets no config from a
/// named instance: the API server refuses the name (the operator logs it and counts a write
/// error), and the policies selecting the node list it among their agents not in sync.
pub fn config_name(node: &str, instance: Option<&str>) -> String {
    match instance {
        None => node.to_string(),
        Some(instance) => format!("{instance}.{node}"),
    }
}

/// `--instance` of the operator and the agent, checked: it is part of object names
/// (`<instance>.<node>`, see [`config_name`]) and a label value, so a DNS label.
pub fn parse_instance(s: &str) -> Result<String, String> {
    if validation::is_dns_label(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a DNS label (at most 63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit)"
        ))
    }
}

/// The node a NodeAgentConfig the compiler wrote is for: its controller, the Node (the name
/// alone does not say, see [`config_name`]).
pub fn config_node(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Node" && o.api_version == "v1")
        .map(|o| o.name.as_str())
}

/// One NodeAgentConfig per node, naming the rule set of its selection, and that rule set
/// (metadata and `spec.hash`; its rules are returned by hash). A selection whose rule set
/// would be refused by the API server (a bound of the CRD's schema, its CEL rule, or the byte
/// limit) gets the empty rule set instead, see [`refuse_unwritable`].
fn node_agent_configs(
    nodes: &[&NodeInfo],
    policies: &[&NodeApiPolicy],
    outcomes: &mut [PolicyOutcome],
    instance: Option<&str>,
) -> (Vec<NodeAgentConfig>, Vec<NodeAgentRuleSet>, RuleSets) {
    // The policies (indices into `policies` and `outcomes`, ascending) selecting each node.
    let position: BTreeMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut selected: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (p, outcome) in outcomes.iter().enumerate() {
        for name in &outcome.nodes {
            if let Some(&n) = position.get(name.as_str()) {
                selected[n].push(p);
            }
        }
    }
    let mut groups: BTreeMap<&[usize], Vec<usize>> = BTreeMap::new();
    for (n, policies) in selected.iter().enumerate() {
        groups.entry(policies.as_slice()).or_default().push(n);
    }

    let mut rule_sets = RuleSets::new();
    let mut sets: BTreeMap<String, NodeAgentRuleSet> = BTreeMap::new();
    let mut configs: Vec<Option<NodeAgentConfig>> = vec![None; nodes.len()];
    // The empty selection's rule set: what a refused selection's nodes enforce instead.
    let empty_name = rule_set_name(&[], instance);
    for (selection, members) in groups {
        let names: Vec<&str> = selection
            .iter()
            .map(|&p| outcomes[p].policy.as_str())
            .collect();
        let mut name = rule_set_name(&names, instance);
        drop(names);
        let rules: Vec<AgentRule> = selection
            .iter()
            .map(|&p| agent_rule(policies[p], &outcomes[p]))
            .collect();
        let mut spec = agent_spec(&rules);
        drop(rules);
        let set = rule_set(&name, &spec.hash, &spec.policies);
        let spec_bytes = serde_json::to_vec(&spec).map_or(usize::MAX, |b| b.len());
        let mut violations = validation::agent_spec_bound_violations(&spec);
        violations.extend(size_violation(&set, spec_bytes));
        if violations.is_empty() {
            sets.insert(name.clone(), set);
        } else {
            let member_names: Vec<&str> = members.iter().map(|&n| nodes[n].name.as_str()).collect();
            spec = refuse_unwritable(&name, &violations, &member_names, selection, outcomes);
            name = empty_name.clone();
            sets.insert(name.clone(), rule_set(&name, &spec.hash, ""));
        }
        for n in members {
            configs[n] = Some(node_agent_config(nodes[n], &name, instance));
        }
        rule_sets.insert(spec.hash.clone(), spec);
    }
    // Every node got its config above; the Option only let groups fill them in any order.
    let configs: Vec<NodeAgentConfig> = configs.into_iter().flatten().collect();
    (configs, sets.into_values().collect(), rule_sets)
}

/// The byte-limit violation of `set` (metadata and `spec.hash` only) once it holds a rule set
/// of `spec_bytes` bytes of JSON: the JSON of a struct is the concatenation of its fields', so
/// the whole object is measured without building it.
fn size_violation(set: &NodeAgentRuleSet, spec_bytes: usize) -> Option<String> {
    let size = rule_set_bytes(set, spec_bytes);
    (size > MAX_AGENT_CONFIG_BYTES)
        .then(|| format!("{size} bytes of JSON, over the {MAX_AGENT_CONFIG_BYTES}-byte limit"))
}

pub use nodegate_crds::agent_config::MAX_AGENT_CONFIG_BYTES;

/// A NodeAgentConfig the API server would refuse (over a bound of the CRD's schema, its CEL
/// rule, or the byte limit) is written with no rules instead: its agent refuses everything
/// (fail closed, where the API server's refusal would leave the agent enforcing its last,
/// possibly wider, rules and the operator retrying forever), and every policy that selects the
/// node says so, naming the node and the limit.
fn refuse_unwritable(
    name: &str,
    violations: &[String],
    nodes: &[&str],
    selection: &[usize],
    outcomes: &mut [PolicyOutcome],
) -> NodeAgentConfigSpec {
    let why = violations.join("; ");
    let which = match nodes {
        [one] => format!("node {one}"),
        [first, second, third] => format!("nodes {first}, {second} and {third}"),
        [first, second, rest @ ..] => {
            format!("nodes {first}, {second} and {} more", rest.len())
        }
        [] => "no node".to_string(),
    };
    for &p in selection {
        outcomes[p].problems.push(format!(
            "the rules of {which} (NodeAgentRuleSet {name}) exceed a limit of its CRD ({why}): \
             those nodes are given no rules, so their agents refuse every request; narrow the \
             policies' namespace lists, subjects or node selectors"
        ));
    }
    agent_spec(&[])
}

/// The JSON size of `set` holding a spec of `spec_bytes` bytes in place of its own.
fn rule_set_bytes(set: &NodeAgentRuleSet, spec_bytes: usize) -> usize {
    let shell = serde_json::to_vec(set).map_or(usize::MAX, |b| b.len());
    let own = serde_json::to_vec(&set.spec).map_or(0, |b| b.len());
    shell.saturating_sub(own).saturating_add(spec_bytes)
}

/// A spec with only its hash: what a rule set holds between compile and write.
fn hash_only(hash: &str) -> NodeAgentConfigSpec {
    NodeAgentConfigSpec {
        hash: hash.to_string(),
        ..NodeAgentConfigSpec::default()
    }
}

fn resolve(
    policy: &NodeApiPolicy,
    nodes: &[&NodeInfo],
    namespaces: &[&NamespaceInfo],
) -> PolicyOutcome {
    let spec = &policy.spec;
    let name = policy.metadata.name.clone().unwrap_or_default();
    let mut problems = Vec::new();

    // An invalid selector matches no node (`LabelSelector::matches` fails closed); say why.
    if let Some(Err(e)) = spec.node_selector.as_ref().map(|s| s.to_selector()) {
        problems.push(format!("nodeSelector matches no node: {}", e.0));
    }
    let all_nodes = spec.node_selector.as_ref().is_none_or(|s| s.selects_all());
    let matched_nodes = nodes
        .iter()
        .filter(|n| {
            spec.node_selector
                .as_ref()
                .is_none_or(|s| s.matches(&n.labels))
        })
        .map(|n| n.name.clone())
        .collect();

    let scope = &spec.namespaces;
    let namespaces = if scope.all == Some(true) && scope.names.is_none() && scope.selector.is_none()
    {
        ResolvedNamespaces {
            all: true,
            names: vec![],
        }
    } else if let (Some(names), None) = (&scope.names, &scope.selector) {
        let names: BTreeSet<String> = names.iter().cloned().collect();
        ResolvedNamespaces {
            all: false,
            names: names.into_iter().collect(),
        }
    } else if let (None, Some(selector)) = (&scope.names, &scope.selector) {
        if let Err(e) = selector.to_selector() {
            problems.push(format!("namespaces.selector matches no namespace: {}", e.0));
        }
        let names = namespaces
            .iter()
            .filter(|ns| selector.matches(&ns.labels))
            .map(|ns| ns.name.clone())
            .collect();
        ResolvedNamespaces { all: false, names }
    } else {
        // The CRD's CEL rule refuses this; should one slip through, it grants no namespace.
        problems.push("namespaces must set exactly one of names, selector or all: true".into());
        ResolvedNamespaces::default()
    };

    let subjects: BTreeSet<Subject> = spec
        .subjects
        .iter()
        .cloned()
        .chain(spec.service_accounts.iter().map(service_account_subject))
        .collect();
    let mut outcome = PolicyOutcome {
        rbac_name: spec.ports.contains(&Port::Secure).then(|| rbac_name(&name)),
        rbac_objects: vec![],
        policy: name,
        nodes: matched_nodes,
        all_nodes,
        namespaces,
        subjects: subjects.into_iter().collect(),
        problems,
    };
    // The CRD refuses anonymous subjects on the secure port; should such a policy reach the
    // compiler anyway, it grants nothing at all rather than bind RBAC to everyone.
    if spec.ports.contains(&Port::Secure) && outcome.subjects.iter().any(is_anonymous) {
        outcome.problems.push(format!("{REFUSED}: system:anonymous and system:unauthenticated may only be granted the ReadOnly port"));
        outcome.nodes.clear();
        outcome.all_nodes = false;
        outcome.rbac_name = None;
    }
    outcome
}

/// Prefix of the problem that makes a policy compile to nothing.
const REFUSED: &str = "policy refused";

fn outcome_refused(outcome: &PolicyOutcome) -> bool {
    outcome.problems.iter().any(|p| p.starts_with(REFUSED))
}

fn service_account_subject(sa: &ServiceAccountRef) -> Subject {
    Subject {
        kind: SubjectKind::ServiceAccount,
        name: sa.name.clone(),
        namespace: Some(sa.namespace.clone()),
    }
}

/// The RBAC of one policy, added to `desired`, its object names recorded in the outcome.
///
/// - `namespaces.all`: one ClusterRole (every granted endpoint, plus core `nodes/*` rules when
///   the policy opted into direct kubelet access) and one ClusterRoleBinding.
/// - otherwise: a ClusterRole for the endpoints whose data belongs to namespaces, bound by a
///   RoleBinding in every existing namespace in scope (a namespace created later gets its
///   binding when the controller compiles again), and, if the policy grants endpoints with no
///   namespaced data (healthz, spec), a second ClusterRole bound cluster-wide. Node-wide
///   endpoints without `all` (refused by the CRD) get no RBAC, as the agent refuses them too.
///
/// A node selector that matches no node yields roles with no rules at all: an empty
/// `resourceNames` would mean every node.
fn rbac(
    policy: &NodeApiPolicy,
    outcome: &mut PolicyOutcome,
    namespaces: &[&NamespaceInfo],
    desired: &mut Desired,
) {
    let Some(name) = outcome.rbac_name.clone() else {
        return;
    };
    let subjects: Vec<RbacSubject> = outcome
        .subjects
        .iter()
        .filter(|s| !is_anonymous(s))
        .map(rbac_subject)
        .collect();
    if subjects.is_empty() {
        outcome.rbac_name = None;
        return;
    }
    let endpoints: BTreeSet<Endpoint> = policy.spec.access.iter().copied().collect();
    let no_node = !outcome.all_nodes && outcome.nodes.is_empty();
    let resource_names = (!outcome.all_nodes).then(|| outcome.nodes.clone());
    let rules = |endpoints: &mut dyn Iterator<Item = Endpoint>, core: bool| -> Vec<PolicyRule> {
        if no_node {
            return vec![];
        }
        let endpoints: Vec<Endpoint> = endpoints.collect();
        let mut rules = agent_rules(&endpoints, &resource_names);
        if core {
            rules.extend(core_rules(&endpoints, &resource_names));
        }
        rules
    };

    if outcome.namespaces.all {
        let core = direct_grants_allowed(policy, outcome);
        let role = rules(&mut endpoints.iter().copied(), core);
        desired
            .cluster_roles
            .push(cluster_role(policy, &name, role));
        desired
            .cluster_role_bindings
            .push(cluster_role_binding(policy, &name, subjects));
        outcome.rbac_objects.push(format!("ClusterRole/{name}"));
        outcome
            .rbac_objects
            .push(format!("ClusterRoleBinding/{name}"));
        return;
    }
    if policy.spec.direct() {
        outcome.problems.push(
            "directKubeletAccess ignored: it needs namespaces.all: true (the kubelet cannot filter)"
                .into(),
        );
    }
    let namespaced: Vec<Endpoint> = endpoints
        .iter()
        .copied()
        .filter(|e| e.spec().scope.is_namespaced())
        .collect();
    let unscoped: Vec<Endpoint> = endpoints
        .iter()
        .copied()
        .filter(|e| e.spec().scope == Scope::Unscoped)
        .collect();
    if !namespaced.is_empty() {
        let role = rules(&mut namespaced.into_iter(), false);
        desired
            .cluster_roles
            .push(cluster_role(policy, &name, role));
        outcome.rbac_objects.push(format!("ClusterRole/{name}"));
        for ns in namespaces
            .iter()
            .filter(|ns| outcome.namespaces.allows(&ns.name))
        {
            desired
                .role_bindings
                .push(role_binding(policy, &name, &ns.name, subjects.clone()));
            outcome
                .rbac_objects
                .push(format!("RoleBinding/{}/{name}", ns.name));
        }
    }
    if !unscoped.is_empty() {
        let unscoped_name = unscoped_rbac_name(&outcome.policy);
        let role = rules(&mut unscoped.into_iter(), false);
        desired
            .cluster_roles
            .push(cluster_role(policy, &unscoped_name, role));
        desired
            .cluster_role_bindings
            .push(cluster_role_binding(policy, &unscoped_name, subjects));
        outcome
            .rbac_objects
            .push(format!("ClusterRole/{unscoped_name}"));
        outcome
            .rbac_objects
            .push(format!("ClusterRoleBinding/{unscoped_name}"));
    }
}

/// Whether the policy's direct kubelet access may be written, reporting why not. Mirrors the
/// CRD's rules, so a policy that slipped past them gets no core grant rather than a wide one.
fn direct_grants_allowed(policy: &NodeApiPolicy, outcome: &mut PolicyOutcome) -> bool {
    if !policy.spec.direct() {
        return false;
    }
    let access = &policy.spec.access;
    let proxy = access
        .iter()
        .any(|e| Endpoint::direct_proxy().any(|p| p == *e));
    if proxy && !Endpoint::PROXY_IMPLIES.iter().all(|e| access.contains(e)) {
        outcome.problems.push(
            "directKubeletAccess ignored: a nodes/proxy grant also allows exec, attach and \
             portForward, which the policy does not list"
                .into(),
        );
        return false;
    }
    true
}

/// Rules on nodegate's resource: one per set of verbs, naming the endpoints' subresources.
fn agent_rules(endpoints: &[Endpoint], resource_names: &Option<Vec<String>>) -> Vec<PolicyRule> {
    let mut by_verbs: BTreeMap<Vec<Verb>, Vec<String>> = BTreeMap::new();
    for endpoint in endpoints {
        by_verbs
            .entry(endpoint.verbs())
            .or_default()
            .push(endpoint.agent_resource());
    }
    by_verbs
        .into_iter()
        .map(|(verbs, resources)| PolicyRule {
            api_groups: Some(vec![AGENT_API_GROUP.to_string()]),
            resources: Some(resources),
            verbs: verbs.iter().map(|v| v.as_str().to_string()).collect(),
            resource_names: resource_names.clone(),
            non_resource_urls: None,
        })
        .collect()
}

/// Core `nodes/<subresource>` rules (direct kubelet access): per subresource, the verbs of the
/// endpoints that use it.
fn core_rules(endpoints: &[Endpoint], resource_names: &Option<Vec<String>>) -> Vec<PolicyRule> {
    let mut grants: BTreeMap<Subresource, BTreeSet<Verb>> = BTreeMap::new();
    // Component endpoints have no kubelet subresource: only the agent serves them, so a
    // direct grant has nothing to write for them.
    for endpoint in endpoints {
        if let Some(subresource) = endpoint.rbac_subresource() {
            grants
                .entry(subresource)
                .or_default()
                .extend(endpoint.verbs());
        }
    }
    grants
        .into_iter()
        .map(|(subresource, verbs)| PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec![format!("nodes/{subresource}")]),
            verbs: verbs.iter().map(|v| v.as_str().to_string()).collect(),
            resource_names: resource_names.clone(),
            non_resource_urls: None,
        })
        .collect()
}

fn cluster_role(policy: &NodeApiPolicy, name: &str, rules: Vec<PolicyRule>) -> ClusterRole {
    ClusterRole {
        metadata: metadata(policy, name, None),
        rules: Some(rules),
        aggregation_rule: None,
    }
}

fn role_ref(name: &str) -> RoleRef {
    RoleRef {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: "ClusterRole".into(),
        name: name.into(),
    }
}

fn cluster_role_binding(
    policy: &NodeApiPolicy,
    name: &str,
    subjects: Vec<RbacSubject>,
) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: metadata(policy, name, None),
        role_ref: role_ref(name),
        subjects: Some(subjects),
    }
}

fn role_binding(
    policy: &NodeApiPolicy,
    name: &str,
    namespace: &str,
    subjects: Vec<RbacSubject>,
) -> RoleBinding {
    RoleBinding {
        metadata: metadata(policy, name, Some(namespace.to_string())),
        role_ref: role_ref(name),
        subjects: Some(subjects),
    }
}

fn rbac_subject(subject: &Subject) -> RbacSubject {
    let api_group = match subject.kind {
        SubjectKind::ServiceAccount => String::new(),
        SubjectKind::User | SubjectKind::Group => "rbac.authorization.k8s.io".into(),
    };
    RbacSubject {
        api_group: Some(api_group),
        kind: subject.kind.as_str().into(),
        name: subject.name.clone(),
        namespace: subject.namespace.clone(),
    }
}

fn metadata(policy: &NodeApiPolicy, name: &str, namespace: Option<String>) -> ObjectMeta {
    let policy_name = policy.metadata.name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(name.into()),
        namespace,
        labels: Some(object_labels(Some(&policy_name))),
        owner_references: Some(vec![owner_reference(policy, true)]),
        ..ObjectMeta::default()
    }
}

pub(crate) fn object_labels(policy: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_string(),
        MANAGED_BY.to_string(),
    )]);
    if let Some(policy) = policy {
        labels.insert(POLICY_LABEL.into(), policy_label_value(policy));
    }
    labels
}

fn owner_reference(policy: &NodeApiPolicy, controller: bool) -> OwnerReference {
    OwnerReference {
        api_version: NodeApiPolicy::api_version(&()).into_owned(),
        kind: NodeApiPolicy::kind(&()).into_owned(),
        name: policy.metadata.name.clone().unwrap_or_default(),
        uid: policy.metadata.uid.clone().unwrap_or_default(),
        controller: controller.then_some(true),
        block_owner_deletion: None,
    }
}

/// A service account several policies may share: every one of them owns it, so it is garbage
/// collected only with the last; the policy label names the first owner by name.
fn service_account(namespace: String, name: String, owners: Vec<OwnerReference>) -> ServiceAccount {
    let first = owners.first().map(|o| o.name.clone());
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(object_labels(first.as_deref())),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    }
}

/// A rule set as a round holds it until it is written: metadata, `spec.hash`, and
/// `spec.policies` (so a failed write is reported on them).
fn rule_set(name: &str, hash: &str, policies: &str) -> NodeAgentRuleSet {
    let mut spec = hash_only(hash);
    spec.policies = policies.to_string();
    let mut set = NodeAgentRuleSet::new(name, NodeAgentRuleSetSpec(spec));
    set.metadata.labels = Some(object_labels(None));
    set
}

fn node_agent_config(node: &NodeInfo, rule_set: &str, instance: Option<&str>) -> NodeAgentConfig {
    let spec = NodeAgentConfigSpec {
        rule_set: Some(rule_set.to_string()),
        ..NodeAgentConfigSpec::default()
    };
    let mut config = NodeAgentConfig::new(&config_name(&node.name, instance), spec);
    config.metadata.labels = Some(object_labels(None));
    config.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.name.clone(),
        uid: node.uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    config
}

fn agent_rule(policy: &NodeApiPolicy, outcome: &PolicyOutcome) -> AgentRule {
    let endpoints: BTreeSet<Endpoint> = policy.spec.access.iter().copied().collect();
    let ports: BTreeSet<Port> = policy.spec.ports.iter().copied().collect();
    AgentRule {
        policy: outcome.policy.clone(),
        subjects: outcome.subjects.clone(),
        endpoints: endpoints.into_iter().collect(),
        namespaces: outcome.namespaces.clone(),
        ports: ports.into_iter().collect(),
        metrics: policy.spec.metrics.clone(),
    }
}

/// The NodeAgentConfig spec of `rules`: packed (each subject and namespace scope once, see
/// [`NodeAgentConfigSpec::pack`]) and hashed.
pub fn agent_spec(rules: &[AgentRule]) -> NodeAgentConfigSpec {
    let mut spec = NodeAgentConfigSpec::pack(rules);
    spec.hash = spec_hash(&spec);
    spec
}

/// SHA-256 (hex) of a spec's subjects, namespace sets and rules, which the agent echoes in
/// status once it enforces them.
pub fn spec_hash(spec: &NodeAgentConfigSpec) -> String {
    // Serializing plain data structs cannot fail; an empty hash input is still a valid hash.
    let bytes = serde_json::to_vec(&(&spec.subjects, &spec.namespace_sets, &spec.rules))
        .unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests;
