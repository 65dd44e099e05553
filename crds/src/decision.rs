//! The agent's authorization decision: a pure function of who asks, on which port, for what,
//! and the rules of one node's `NodeAgentConfig`.
//!
//! It lives in the API crate, not in the agent, because two parties must agree on it: the agent
//! decides every request with [`authorize`], and the operator's RBAC on nodegate's resource must
//! answer every SubjectAccessReview as it would ([`rbac_answer`]; the compiler's property tests
//! and the grid against a real API server compare RBAC with this very function, not a model).
//!
//! Deny by default: a request no catalogue route serves, or whose method has no verb, is refused
//! here and never reaches the kubelet. For endpoints whose data can be split by namespace the
//! decision carries the scope the response filter must apply, so an allowed request can still
//! return less than the kubelet would.

use crate::attributes::{RequestAttributes, request_attributes};
use crate::catalogue::{Scope, Verb};
use crate::policy::{MetricsTransform, Port, SubjectKind};
use crate::{AgentRule, Endpoint, NodeAgentConfigSpec, ResolvedNamespaces, Subject};
use serde::Serialize;
use std::collections::HashMap;

/// Who is asking, as authorization needs it (the authenticator's user, without the method).
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    pub name: &'a str,
    pub groups: &'a [String],
}

/// One rule's contribution to what a filtered response may contain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub namespaces: ResolvedNamespaces,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsTransform>,
}

/// What the response filter must keep: the union of the applying rules' grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct FilterScope {
    pub grants: Vec<Grant>,
}

impl FilterScope {
    /// Whether data of `namespace` may be returned by any grant.
    pub fn allows(&self, namespace: &str) -> bool {
        self.grants.iter().any(|g| g.namespaces.allows(namespace))
    }

    /// Whether some grant covers every namespace and node-level data.
    pub fn all(&self) -> bool {
        self.grants.iter().any(|g| g.namespaces.all)
    }

    /// Whether the response may be passed through unchanged: some grant covers everything and
    /// changes no metric.
    pub fn unrestricted(&self) -> bool {
        self.grants
            .iter()
            .any(|g| g.namespaces.all && g.metrics.as_ref().is_none_or(is_identity))
    }
}

fn is_identity(m: &MetricsTransform) -> bool {
    m.drop.is_empty() && m.keep.is_empty() && m.add_labels.is_empty()
}

/// Allowed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// Why a request was refused (or what allowed it), for `explain` and the audit line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub verdict: Verdict,
    /// The policy (NodeApiPolicy name) whose rule decided; the first one for filtered
    /// endpoints, where every applying rule contributes to the scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Every policy whose rule applied.
    pub policies: Vec<String>,
    pub reason: String,
    /// For filtered endpoints (JSON items, metrics): what the response is filtered to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterScope>,
}

impl Decision {
    fn deny(reason: impl Into<String>, policies: Vec<String>) -> Self {
        Decision {
            verdict: Verdict::Deny,
            policy: None,
            policies,
            reason: reason.into(),
            filter: None,
        }
    }

    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// Whether `subject` names the requester.
pub fn subject_matches(subject: &Subject, who: Requester<'_>) -> bool {
    match subject.kind {
        SubjectKind::User => subject.name == who.name,
        SubjectKind::Group => who.groups.contains(&subject.name),
        SubjectKind::ServiceAccount => subject.namespace.as_deref().is_some_and(|ns| {
            who.name
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split_once(':'))
                .is_some_and(|(n, name)| n == ns && name == subject.name)
        }),
    }
}

/// A node's rules as decisions read them: the NodeAgentConfig spec, every namespace list
/// sorted (so [`ResolvedNamespaces::allows`] can search it), and the rules indexed by the
/// subjects they name, so a request looks only at the rules that name its caller, not at every
/// rule of the node (a node may hold a thousand).
///
/// A rule whose namespace index names nothing grants nothing, and a subject index that names
/// nothing matches nobody: the agent refuses such a spec before it gets here
/// (`nodegate-compiler`'s validation), and this keeps a decision fail-closed if one did.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    spec: NodeAgentConfigSpec,
    /// User names, service accounts as `system:serviceaccount:<namespace>:<name>` → positions
    /// of the rules that name them, ascending.
    by_user: HashMap<String, Vec<u32>>,
    /// Group names → positions of the rules that name them, ascending.
    by_group: HashMap<String, Vec<u32>>,
}

impl PartialEq for RuleSet {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl std::ops::Deref for RuleSet {
    type Target = NodeAgentConfigSpec;

    fn deref(&self) -> &NodeAgentConfigSpec {
        &self.spec
    }
}

impl From<NodeAgentConfigSpec> for RuleSet {
    fn from(spec: NodeAgentConfigSpec) -> Self {
        RuleSet::new(spec)
    }
}

/// One rule as a decision reads it, its namespace scope looked up.
struct RuleView<'r> {
    policy: &'r str,
    endpoints: &'r [Endpoint],
    namespaces: &'r ResolvedNamespaces,
    ports: &'r [Port],
    metrics: Option<&'r MetricsTransform>,
}

impl RuleSet {
    pub fn new(mut spec: NodeAgentConfigSpec) -> Self {
        for set in &mut spec.namespace_sets {
            set.names.sort();
        }
        let mut by_user: HashMap<String, Vec<u32>> = HashMap::new();
        let mut by_group: HashMap<String, Vec<u32>> = HashMap::new();
        for (position, rule) in spec.rules.iter().enumerate() {
            let Ok(position) = u32::try_from(position) else {
                break;
            };
            for subject in rule.subjects.iter().filter_map(|&s| spec.subject(s)) {
                let (map, key) = match (subject.kind, &subject.namespace) {
                    (SubjectKind::User, _) => (&mut by_user, subject.name.clone()),
                    (SubjectKind::Group, _) => (&mut by_group, subject.name.clone()),
                    // The user name of a service account; a namespace with a colon could
                    // never be split back out of one ([`subject_matches`]), so it names nobody.
                    (SubjectKind::ServiceAccount, Some(ns)) if !ns.contains(':') => (
                        &mut by_user,
                        format!("system:serviceaccount:{ns}:{}", subject.name),
                    ),
                    (SubjectKind::ServiceAccount, _) => continue,
                };
                let positions = map.entry(key).or_default();
                if positions.last() != Some(&position) {
                    positions.push(position);
                }
            }
        }
        RuleSet {
            spec,
            by_user,
            by_group,
        }
    }

    /// A rule set of rules spelled out (tests, tools): packed as the compiler packs them.
    pub fn from_rules(rules: &[AgentRule]) -> Self {
        RuleSet::new(NodeAgentConfigSpec::pack(rules))
    }

    /// The spec, namespace lists sorted.
    pub fn spec(&self) -> &NodeAgentConfigSpec {
        &self.spec
    }

    /// Positions of the rules that name the requester (as a user, a service account or by one
    /// of its groups), ascending: the order of the rules, which decides which policy is named.
    fn positions_of(&self, who: Requester<'_>) -> Vec<u32> {
        let mut positions: Vec<u32> = self.by_user.get(who.name).cloned().unwrap_or_default();
        for group in who.groups {
            if let Some(more) = self.by_group.get(group) {
                positions.extend_from_slice(more);
            }
        }
        positions.sort_unstable();
        positions.dedup();
        positions
    }

    fn view(&self, position: u32) -> Option<RuleView<'_>> {
        let rule = self.spec.rules.get(usize::try_from(position).ok()?)?;
        Some(RuleView {
            policy: &rule.policy,
            endpoints: &rule.endpoints,
            namespaces: self.spec.namespace_set(rule.namespaces)?,
            ports: &rule.ports,
            metrics: rule.metrics.as_ref(),
        })
    }
}

/// Decides a request against the node's rules.
pub fn authorize(
    who: Requester<'_>,
    port: Port,
    attrs: &RequestAttributes,
    rules: &RuleSet,
) -> Decision {
    let Some(route) = &attrs.route else {
        return Decision::deny("no catalogue endpoint serves this path", vec![]);
    };
    let endpoint = route.endpoint;
    let Some(verb) = attrs.verb else {
        return Decision::deny(
            format!("method {} has no authorization verb", attrs.method),
            vec![],
        );
    };
    if port == Port::ReadOnly && !endpoint.spec().read_only {
        return Decision::deny(
            format!("{endpoint} is not served on the read-only port"),
            vec![],
        );
    }
    let applying = applying_rules(who, port, endpoint, verb, rules);
    let policies: Vec<String> = applying.iter().map(|r| r.policy.to_string()).collect();
    if applying.is_empty() {
        return Decision::deny(
            format!("no rule grants {verb} on {endpoint} to this subject on this port"),
            policies,
        );
    }
    let allow = |rule: &RuleView<'_>, reason: String, filter: Option<FilterScope>| Decision {
        verdict: Verdict::Allow,
        policy: Some(rule.policy.to_string()),
        policies: policies.clone(),
        reason,
        filter,
    };
    match endpoint.spec().scope {
        Scope::Unscoped => allow(
            &applying[0],
            format!("{endpoint} holds no namespaced data"),
            None,
        ),
        Scope::NodeWide => match applying.iter().find(|r| r.namespaces.all) {
            Some(rule) => allow(
                rule,
                format!("{endpoint} is node-wide; rule grants all namespaces"),
                // Prometheus text (`/metrics`, `/metrics/slis`) gets the metric transforms of
                // every applying rule that could grant it: those with `all`.
                endpoint
                    .serves_prometheus()
                    .then(|| filter_scope(applying.iter().filter(|r| r.namespaces.all))),
            ),
            None => Decision::deny(
                format!("{endpoint} is node-wide and needs a rule with namespaces.all"),
                policies,
            ),
        },
        Scope::Path => {
            let namespace = route.namespace.as_deref().unwrap_or_default();
            match applying.iter().find(|r| r.namespaces.allows(namespace)) {
                Some(rule) => allow(rule, format!("namespace {namespace:?} is in scope"), None),
                None => Decision::deny(
                    format!("namespace {namespace:?} is not in the scope of any applying rule"),
                    policies,
                ),
            }
        }
        Scope::JsonItems { .. } | Scope::MetricsLabel => allow(
            &applying[0],
            format!("{endpoint} is filtered to the applying rules' namespaces"),
            Some(filter_scope(applying.iter())),
        ),
    }
}

/// The rules that grant `verb` on `endpoint` through `port` to the requester, whatever their
/// namespaces.
fn applying_rules<'r>(
    who: Requester<'_>,
    port: Port,
    endpoint: Endpoint,
    verb: Verb,
    rules: &'r RuleSet,
) -> Vec<RuleView<'r>> {
    if !endpoint.verbs().contains(&verb) {
        return vec![];
    }
    rules
        .positions_of(who)
        .into_iter()
        .filter_map(|position| rules.view(position))
        .filter(|r| r.ports.contains(&port) && r.endpoints.contains(&endpoint))
        .collect()
}

/// The union of the rules' grants (namespaces and metric transforms), without repeats.
fn filter_scope<'r: 'v, 'v>(rules: impl Iterator<Item = &'v RuleView<'r>>) -> FilterScope {
    let mut grants: Vec<Grant> = Vec::new();
    for rule in rules {
        let grant = Grant {
            namespaces: rule.namespaces.clone(),
            metrics: rule.metrics.cloned(),
        };
        if !grants.contains(&grant) {
            grants.push(grant);
        }
    }
    FilterScope { grants }
}

/// What a request RBAC allowed (the agent's Webhook mode) is filtered to: RBAC answers at
/// cluster scope for everything but path-scoped endpoints, so every namespace is served; the
/// metric transforms of the node's rules that grant the request to this caller (as in Policy
/// mode, whatever their namespaces) still apply to Prometheus endpoints. `None` (unchanged)
/// for other endpoints, and when no rule applies: RBAC alone carries no transform.
pub fn webhook_filter(
    who: Requester<'_>,
    port: Port,
    attrs: &RequestAttributes,
    rules: &RuleSet,
) -> Option<FilterScope> {
    let endpoint = attrs.route.as_ref()?.endpoint;
    let verb = attrs.verb?;
    if !endpoint.serves_prometheus() {
        return None;
    }
    let applying = applying_rules(who, port, endpoint, verb, rules);
    if applying.is_empty() {
        return None;
    }
    let mut grants: Vec<Grant> = Vec::new();
    for rule in applying {
        let grant = Grant {
            namespaces: ResolvedNamespaces {
                all: true,
                names: vec![],
            },
            metrics: rule.metrics.cloned(),
        };
        if !grants.contains(&grant) {
            grants.push(grant);
        }
    }
    Some(FilterScope { grants })
}

/// Stands for "any namespace" in a cluster-scope question about an endpoint whose path names a
/// namespace: not a DNS label, so no namespace has this name and only `namespaces.all` grants it.
const ANY_NAMESPACE: &str = "Any-Namespace";

/// The user and groups a SubjectAccessReview asks about for an RBAC binding subject, as the API
/// server authenticates such a caller: a user of that name, a member of that group (as a
/// stand-in user), or that service account with its groups; always `system:authenticated`.
/// The RBAC property of the compiler and the SubjectAccessReview grid on a real API server ask
/// the same question this way.
pub fn review_identity(subject: &Subject) -> (String, Vec<String>) {
    let mut groups = vec!["system:authenticated".to_string()];
    let user = match subject.kind {
        SubjectKind::User => subject.name.clone(),
        SubjectKind::Group => {
            groups.push(subject.name.clone());
            "nodegate-grid-user".to_string()
        }
        SubjectKind::ServiceAccount => {
            let ns = subject.namespace.clone().unwrap_or_default();
            groups.push("system:serviceaccounts".into());
            groups.push(format!("system:serviceaccounts:{ns}"));
            format!("system:serviceaccount:{ns}:{}", subject.name)
        }
    };
    (user, groups)
}

/// What RBAC on nodegate's resource must answer for `who` asking `verb` on
/// `nodeagentconfigs/<endpoint>` of this node, in `namespace` (`None`: cluster scope, which
/// stands for every namespace and data of none): the agent's own decision ([`authorize`], on the
/// secure port) for a request to that endpoint with that verb, allowed and with the namespace
/// in the scope it would be served with.
///
/// This is the question the agent's Webhook mode puts to the API server, so the operator's RBAC
/// and the agent's rules must agree on it everywhere; the compiler's properties and the
/// SubjectAccessReview grid against a real API server check that they do.
pub fn rbac_answer(
    rules: &RuleSet,
    who: Requester<'_>,
    endpoint: Endpoint,
    verb: Verb,
    namespace: Option<&str>,
) -> bool {
    let spec = endpoint.spec();
    let Some(pattern) = spec.patterns.first() else {
        return false;
    };
    let path: Vec<&str> = pattern
        .split('/')
        .map(|segment| match segment {
            "{namespace}" => namespace.unwrap_or(ANY_NAMESPACE),
            s if s.starts_with('{') => "x",
            s => s,
        })
        .collect();
    let path = path.join("/");
    // A request with a method the catalogue serves for the endpoint that is given this verb
    // (streaming endpoints are `create` whatever the method): none, no grant.
    let Some(attrs) = spec
        .methods
        .iter()
        .filter_map(|m| request_attributes(m, &path, None).ok())
        .find(|a| a.verb == Some(verb))
    else {
        return false;
    };
    let decision = authorize(who, Port::Secure, &attrs, rules);
    if !decision.allowed() {
        return false;
    }
    match spec.scope {
        Scope::Unscoped | Scope::NodeWide | Scope::Path => true,
        Scope::JsonItems { .. } | Scope::MetricsLabel => decision
            .filter
            .as_ref()
            .is_some_and(|f| namespace.map_or(f.all(), |ns| f.allows(ns))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The tests below write rules spelled out; these pack them as the compiler does, so every
    // decision here goes through the index of [`RuleSet`].
    fn authorize(
        who: Requester<'_>,
        port: Port,
        attrs: &RequestAttributes,
        rules: &[AgentRule],
    ) -> Decision {
        super::authorize(who, port, attrs, &RuleSet::from_rules(rules))
    }

    fn webhook_filter(
        who: Requester<'_>,
        port: Port,
        attrs: &RequestAttributes,
        rules: &[AgentRule],
    ) -> Option<FilterScope> {
        super::webhook_filter(who, port, attrs, &RuleSet::from_rules(rules))
    }

    fn rbac_answer(
        rules: &[AgentRule],
        who: Requester<'_>,
        endpoint: Endpoint,
        verb: Verb,
        namespace: Option<&str>,
    ) -> bool {
        super::rbac_answer(&RuleSet::from_rules(rules), who, endpoint, verb, namespace)
    }

    fn ns(names: &[&str]) -> ResolvedNamespaces {
        ResolvedNamespaces {
            all: false,
            names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn all() -> ResolvedNamespaces {
        ResolvedNamespaces {
            all: true,
            names: vec![],
        }
    }

    fn rule(
        policy: &str,
        subject: Subject,
        endpoints: &[Endpoint],
        namespaces: ResolvedNamespaces,
    ) -> AgentRule {
        AgentRule {
            policy: policy.into(),
            subjects: vec![subject],
            endpoints: endpoints.to_vec(),
            namespaces,
            ports: vec![Port::Secure],
            metrics: None,
        }
    }

    fn user(name: &str) -> Subject {
        Subject {
            kind: SubjectKind::User,
            name: name.into(),
            namespace: None,
        }
    }

    fn attrs(method: &str, target: &str) -> RequestAttributes {
        request_attributes(method, target, None).unwrap()
    }

    const NO_GROUPS: &[String] = &[];

    fn alice() -> Requester<'static> {
        Requester {
            name: "alice",
            groups: NO_GROUPS,
        }
    }

    #[test]
    fn subjects_match_by_user_group_and_service_account() {
        let groups = vec!["team-a".to_string(), "system:authenticated".to_string()];
        let sa_name = "system:serviceaccount:mon:prom";
        let who = Requester {
            name: sa_name,
            groups: &groups,
        };
        assert!(subject_matches(&user(sa_name), who));
        assert!(!subject_matches(&user("prom"), who));
        let group = Subject {
            kind: SubjectKind::Group,
            name: "team-a".into(),
            namespace: None,
        };
        assert!(subject_matches(&group, who));
        let sa = |ns: &str, name: &str| Subject {
            kind: SubjectKind::ServiceAccount,
            name: name.into(),
            namespace: Some(ns.into()),
        };
        assert!(subject_matches(&sa("mon", "prom"), who));
        assert!(!subject_matches(&sa("mon", "pro"), who));
        assert!(!subject_matches(&sa("mo", "prom"), who));
        // A user merely named like a group is not in it.
        let not_member = Requester {
            name: "team-a",
            groups: NO_GROUPS,
        };
        assert!(!subject_matches(&group, not_member));
    }

    #[test]
    fn path_scoped_endpoints_check_the_path_namespace() {
        let rules = vec![rule(
            "p",
            user("alice"),
            &[Endpoint::ContainerLogs, Endpoint::Exec],
            ns(&["a"]),
        )];
        let d = authorize(
            alice(),
            Port::Secure,
            &attrs("GET", "/containerLogs/a/p/c"),
            &rules,
        );
        assert!(d.allowed(), "{d:?}");
        assert_eq!(d.policy.as_deref(), Some("p"));
        let d = authorize(
            alice(),
            Port::Secure,
            &attrs("GET", "/containerLogs/b/p/c"),
            &rules,
        );
        assert!(!d.allowed());
        // exec is authorized as create whatever the method, and granted with the endpoint.
        let d = authorize(
            alice(),
            Port::Secure,
            &attrs("GET", "/exec/a/p/c?command=ls"),
            &rules,
        );
        assert!(d.allowed());
    }

    #[test]
    fn node_wide_endpoints_need_all() {
        let some = vec![rule(
            "p",
            user("alice"),
            &[Endpoint::Configz, Endpoint::Logs],
            ns(&["a"]),
        )];
        assert!(!authorize(alice(), Port::Secure, &attrs("GET", "/configz"), &some).allowed());
        let every = vec![rule("q", user("alice"), &[Endpoint::Configz], all())];
        assert!(authorize(alice(), Port::Secure, &attrs("GET", "/configz"), &every).allowed());
        // /logs is not granted by the configz rule.
        assert!(!authorize(alice(), Port::Secure, &attrs("GET", "/logs/syslog"), &every).allowed());
    }

    #[test]
    fn filtered_endpoints_carry_the_union_of_scopes() {
        let mut second = rule("q", user("alice"), &[Endpoint::Pods], ns(&["b"]));
        second.metrics = None;
        let rules = vec![
            rule("p", user("alice"), &[Endpoint::Pods], ns(&["a"])),
            second,
        ];
        let d = authorize(alice(), Port::Secure, &attrs("GET", "/pods"), &rules);
        assert!(d.allowed());
        let f = d.filter.unwrap();
        assert!(f.allows("a") && f.allows("b") && !f.allows("c") && !f.all());
        assert_eq!(d.policies, vec!["p", "q"]);
    }

    #[test]
    fn refuses_unknown_routes_other_ports_other_subjects_and_verbless_methods() {
        let rules = vec![rule(
            "p",
            user("alice"),
            &[Endpoint::Pods, Endpoint::Stats, Endpoint::Healthz],
            all(),
        )];
        // No route.
        assert!(!authorize(alice(), Port::Secure, &attrs("GET", "/nothing"), &rules).allowed());
        // Rule is for the secure port only.
        assert!(!authorize(alice(), Port::ReadOnly, &attrs("GET", "/pods"), &rules).allowed());
        // Another user.
        let bob = Requester {
            name: "bob",
            groups: NO_GROUPS,
        };
        assert!(!authorize(bob, Port::Secure, &attrs("GET", "/pods"), &rules).allowed());
        // No verb for a method (attributes of an unmatched path keep the method).
        let head = attrs("HEAD", "/unknown");
        assert!(head.verb.is_none());
        assert!(!authorize(alice(), Port::Secure, &head, &rules).allowed());
        // POST /stats/summary is create, which the stats endpoint grants.
        assert!(
            authorize(
                alice(),
                Port::Secure,
                &attrs("POST", "/stats/summary"),
                &rules
            )
            .allowed()
        );
        // Healthz holds no namespaced data.
        assert!(
            authorize(
                alice(),
                Port::Secure,
                &attrs("GET", "/healthz/ping"),
                &rules
            )
            .allowed()
        );
    }

    #[test]
    fn read_only_port_serves_only_read_only_endpoints() {
        let anon_groups = vec!["system:unauthenticated".to_string()];
        let anon = Requester {
            name: "system:anonymous",
            groups: &anon_groups,
        };
        let mut r = rule(
            "ro",
            Subject {
                kind: SubjectKind::Group,
                name: "system:unauthenticated".into(),
                namespace: None,
            },
            &[Endpoint::Pods, Endpoint::RunningPods],
            ns(&["a"]),
        );
        r.ports = vec![Port::ReadOnly];
        let rules = vec![r];
        assert!(authorize(anon, Port::ReadOnly, &attrs("GET", "/pods"), &rules).allowed());
        assert!(!authorize(anon, Port::ReadOnly, &attrs("GET", "/runningpods/"), &rules).allowed());
        assert!(!authorize(anon, Port::Secure, &attrs("GET", "/pods"), &rules).allowed());
    }

    fn keep(names: &[&str]) -> Option<MetricsTransform> {
        Some(MetricsTransform {
            keep: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn node_wide_prometheus_endpoints_carry_the_transforms_of_rules_with_all() {
        let mut with_all = rule(
            "p",
            user("alice"),
            &[Endpoint::Metrics, Endpoint::Slis, Endpoint::Configz],
            all(),
        );
        with_all.metrics = keep(&["kubelet_running_pods"]);
        let mut scoped = rule("q", user("alice"), &[Endpoint::Metrics], ns(&["a"]));
        scoped.metrics = keep(&["other"]);
        let rules = vec![with_all, scoped];
        for path in ["/metrics", "/metrics/slis"] {
            let d = authorize(alice(), Port::Secure, &attrs("GET", path), &rules);
            assert!(d.allowed(), "{path}");
            let f = d.filter.unwrap();
            assert_eq!(
                f.grants,
                vec![Grant {
                    namespaces: all(),
                    metrics: keep(&["kubelet_running_pods"])
                }],
                "{path}: only rules that can grant a node-wide endpoint contribute"
            );
            assert!(!f.unrestricted());
        }
        // Not Prometheus text: nothing to transform.
        let d = authorize(alice(), Port::Secure, &attrs("GET", "/configz"), &rules);
        assert!(d.allowed() && d.filter.is_none());
    }

    #[test]
    fn webhook_filter_applies_the_callers_rules_transforms_to_every_namespace() {
        let mut r = rule(
            "p",
            user("alice"),
            &[Endpoint::Cadvisor, Endpoint::Metrics, Endpoint::Pods],
            ns(&["a"]),
        );
        r.metrics = keep(&["x"]);
        let rules = vec![r];
        for path in ["/metrics/cadvisor", "/metrics"] {
            let f = webhook_filter(alice(), Port::Secure, &attrs("GET", path), &rules).unwrap();
            assert_eq!(
                f.grants,
                vec![Grant {
                    namespaces: all(),
                    metrics: keep(&["x"])
                }],
                "{path}"
            );
        }
        // JSON is not transformed; a caller no rule grants gets no transform.
        assert!(webhook_filter(alice(), Port::Secure, &attrs("GET", "/pods"), &rules).is_none());
        let bob = Requester {
            name: "bob",
            groups: NO_GROUPS,
        };
        assert!(webhook_filter(bob, Port::Secure, &attrs("GET", "/metrics"), &rules).is_none());
    }

    #[test]
    fn rbac_answer_is_the_decision_for_the_endpoint_verb_and_namespace() {
        let rules = vec![
            rule(
                "p",
                user("alice"),
                &[Endpoint::Pods, Endpoint::Exec],
                ns(&["a"]),
            ),
            rule("q", user("alice"), &[Endpoint::Configz], all()),
        ];
        let ask = |e, v, n| rbac_answer(&rules, alice(), e, v, n);
        assert!(ask(Endpoint::Pods, Verb::Get, Some("a")));
        assert!(!ask(Endpoint::Pods, Verb::Get, Some("b")));
        assert!(
            !ask(Endpoint::Pods, Verb::Get, None),
            "cluster scope needs all"
        );
        assert!(
            !ask(Endpoint::Pods, Verb::Create, Some("a")),
            "no POST /pods"
        );
        assert!(ask(Endpoint::Exec, Verb::Create, Some("a")));
        assert!(
            !ask(Endpoint::Exec, Verb::Get, Some("a")),
            "exec is create only"
        );
        assert!(!ask(Endpoint::Exec, Verb::Create, None));
        assert!(ask(Endpoint::Configz, Verb::Get, None));
        assert!(ask(Endpoint::Configz, Verb::Get, Some("b")));
    }

    #[test]
    fn unrestricted_only_for_all_without_transform() {
        let mut f = FilterScope {
            grants: vec![Grant {
                namespaces: all(),
                metrics: Some(MetricsTransform {
                    drop: vec!["x".into()],
                    ..Default::default()
                }),
            }],
        };
        assert!(f.all() && !f.unrestricted());
        f.grants.push(Grant {
            namespaces: all(),
            metrics: None,
        });
        assert!(f.unrestricted());
    }

    #[test]
    fn dangling_indices_grant_nothing() {
        let rules = vec![rule("p", user("alice"), &[Endpoint::Pods], all())];
        let mut spec = NodeAgentConfigSpec::pack(&rules);
        let pods = attrs("GET", "/pods");
        assert!(
            super::authorize(alice(), Port::Secure, &pods, &RuleSet::new(spec.clone())).allowed()
        );
        spec.rules[0].namespaces = 7;
        let d = super::authorize(alice(), Port::Secure, &pods, &RuleSet::new(spec.clone()));
        assert!(!d.allowed(), "{d:?}");
        spec.rules[0].namespaces = 0;
        spec.rules[0].subjects = vec![9];
        assert!(!super::authorize(alice(), Port::Secure, &pods, &RuleSet::new(spec)).allowed());
    }

    #[test]
    fn unsorted_namespace_lists_are_sorted_for_the_search() {
        let rules = vec![rule(
            "p",
            user("alice"),
            &[Endpoint::ContainerLogs],
            ns(&["a"]),
        )];
        let mut spec = NodeAgentConfigSpec::pack(&rules);
        spec.namespace_sets[0].names = vec!["z".into(), "c".into(), "m".into()];
        let set = RuleSet::new(spec);
        for n in ["c", "m", "z"] {
            let path = format!("/containerLogs/{n}/p/c");
            assert!(
                super::authorize(alice(), Port::Secure, &attrs("GET", &path), &set).allowed(),
                "{n}"
            );
        }
    }

    fn subject_strategy() -> impl Strategy<Value = Subject> {
        let names = prop::sample::select(vec!["a", "b", "a:b", "system:serviceaccount:x:a", "x"]);
        let namespaces = prop::option::of(prop::sample::select(vec!["x", "y", "x:a", ""]));
        (0..3u8, names, namespaces).prop_map(|(kind, name, namespace)| Subject {
            kind: match kind {
                0 => SubjectKind::User,
                1 => SubjectKind::Group,
                _ => SubjectKind::ServiceAccount,
            },
            name: name.to_string(),
            namespace: namespace.map(str::to_string),
        })
    }

    proptest! {
        /// The index finds exactly the rules a scan with [`subject_matches`] finds, in the
        /// same order, for any subjects (valid or not) and any caller.
        #[test]
        fn the_subject_index_finds_what_a_scan_finds(
            subjects in prop::collection::vec(prop::collection::vec(subject_strategy(), 0..4), 0..6),
            name in prop::sample::select(vec!["a", "b", "a:b", "x", "system:serviceaccount:x:a",
                "system:serviceaccount:y:b", "system:serviceaccount:x:a:b", "system:serviceaccount:x"]),
            groups in prop::collection::vec(prop::sample::select(vec!["a", "b", "x", "a:b"]), 0..3),
        ) {
            let rules: Vec<AgentRule> = subjects
                .iter()
                .enumerate()
                .map(|(i, s)| AgentRule {
                    policy: format!("p{i}"),
                    subjects: s.clone(),
                    endpoints: vec![Endpoint::Pods],
                    namespaces: all(),
                    ports: vec![Port::Secure],
                    metrics: None,
                })
                .collect();
            let groups: Vec<String> = groups.into_iter().map(str::to_string).collect();
            let who = Requester { name, groups: &groups };
            let scanned: Vec<u32> = (0u32..)
                .zip(&rules)
                .filter(|(_, r)| r.subjects.iter().any(|s| subject_matches(s, who)))
                .map(|(i, _)| i)
                .collect();
            prop_assert_eq!(RuleSet::from_rules(&rules).positions_of(who), scanned);
        }
    }
}
