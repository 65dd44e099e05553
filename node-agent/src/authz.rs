//! Authorization by the node's compiled rules: a pure function of who asks, on which port, for
//! what, and the rules of this node's `NodeAgentConfig`.
//!
//! Deny by default: a request no catalogue route serves, or whose method has no verb, is refused
//! here and never reaches the kubelet. For endpoints whose data can be split by namespace the
//! decision carries the scope the response filter must apply, so an allowed request can still
//! return less than the kubelet would.

use nodegate_crds::attributes::RequestAttributes;
use nodegate_crds::catalogue::Scope;
use nodegate_crds::policy::{MetricsTransform, Port, SubjectKind};
use nodegate_crds::{AgentRule, Endpoint, ResolvedNamespaces, Subject};
use serde::Serialize;

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

/// Decides a request against the node's rules.
pub fn authorize(
    who: Requester<'_>,
    port: Port,
    attrs: &RequestAttributes,
    rules: &[AgentRule],
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
    let applying: Vec<&AgentRule> = rules
        .iter()
        .filter(|r| {
            r.subjects.iter().any(|s| subject_matches(s, who))
                && r.ports.contains(&port)
                && r.endpoints.contains(&endpoint)
                && endpoint.verbs().contains(&verb)
        })
        .collect();
    let policies: Vec<String> = applying.iter().map(|r| r.policy.clone()).collect();
    if applying.is_empty() {
        return Decision::deny(
            format!("no rule grants {verb} on {endpoint} to this subject on this port"),
            policies,
        );
    }
    let allow = |rule: &AgentRule, reason: String, filter: Option<FilterScope>| Decision {
        verdict: Verdict::Allow,
        policy: Some(rule.policy.clone()),
        policies: policies.clone(),
        reason,
        filter,
    };
    match endpoint.spec().scope {
        Scope::Unscoped => allow(
            applying[0],
            format!("{endpoint} holds no namespaced data"),
            None,
        ),
        Scope::NodeWide => match applying.iter().find(|r| r.namespaces.all) {
            Some(rule) => allow(
                rule,
                format!("{endpoint} is node-wide; rule grants all namespaces"),
                None,
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
        Scope::JsonItems { .. } | Scope::MetricsLabel => {
            let mut grants: Vec<Grant> = Vec::new();
            for rule in &applying {
                let grant = Grant {
                    namespaces: rule.namespaces.clone(),
                    metrics: rule.metrics.clone(),
                };
                if !grants.contains(&grant) {
                    grants.push(grant);
                }
            }
            allow(
                applying[0],
                format!("{endpoint} is filtered to the applying rules' namespaces"),
                Some(FilterScope { grants }),
            )
        }
    }
}

/// The kubelet's 403 body.
pub fn forbidden_body(user: &str, attrs: &RequestAttributes) -> String {
    let verb = attrs.verb.map_or("", |v| v.as_str());
    let subresources: Vec<&str> = attrs.subresources.iter().map(|s| s.as_str()).collect();
    format!(
        "Forbidden (user={user}, verb={verb}, resource=nodes, subresource(s)=[{}])\n",
        subresources.join(" ")
    )
}

/// The endpoint of a request, if any route matched.
pub fn endpoint_of(attrs: &RequestAttributes) -> Option<Endpoint> {
    attrs.route.as_ref().map(|r| r.endpoint)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nodegate_crds::attributes::request_attributes;

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

    #[test]
    fn forbidden_body_is_the_kubelets() {
        let a = attrs("GET", "/pods");
        assert_eq!(
            forbidden_body("bob", &a),
            "Forbidden (user=bob, verb=get, resource=nodes, subresource(s)=[pods proxy])\n"
        );
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
}
