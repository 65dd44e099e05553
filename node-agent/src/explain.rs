//! `nodegate-agent explain`: what the agent would decide for a request, without serving it.
//! The same functions as the pipeline (attributes, then policy authorization), so the answer is
//! the agent's, not a re-implementation.

use crate::authn::{ANONYMOUS_USER, AUTHENTICATED_GROUP, UNAUTHENTICATED_GROUP};
use crate::authz::{self, Requester};
use nodegate_crds::attributes::request_attributes;
use nodegate_crds::{NodeAgentConfigSpec, Port};
use serde_json::{Value, json};

/// A request to explain.
#[derive(Debug, Clone)]
pub struct Question {
    pub user: String,
    pub groups: Vec<String>,
    pub method: String,
    pub port: Port,
    /// The request target (path and query), as a client would send it.
    pub target: String,
    /// The WebSocket or SPDY upgrade asked for, if any.
    pub upgrade: Option<String>,
}

/// Explains `question` against a node's rules, as JSON.
pub fn explain(spec: &NodeAgentConfigSpec, question: &Question) -> Value {
    // As the authenticator: the read-only port is anonymous; authenticated users get
    // system:authenticated.
    let (user, mut groups) = match question.port {
        Port::ReadOnly => (
            ANONYMOUS_USER.to_string(),
            vec![UNAUTHENTICATED_GROUP.to_string()],
        ),
        Port::Secure => (question.user.clone(), question.groups.clone()),
    };
    if question.port == Port::Secure && !groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
        groups.push(AUTHENTICATED_GROUP.into());
    }
    let attrs = match request_attributes(
        &question.method,
        &question.target,
        question.upgrade.as_deref(),
    ) {
        Ok(a) => a,
        Err(rejection) => {
            return json!({
                "user": user,
                "groups": groups,
                "rejected": rejection.to_string(),
                "status": rejection.status(),
            });
        }
    };
    let decision = authz::authorize(
        Requester {
            name: &user,
            groups: &groups,
        },
        question.port,
        &attrs,
        &authz::RuleSet::new(spec.clone()),
    );
    let route = attrs.route.as_ref();
    let filtered_to = decision.filter.as_ref().map(|f| {
        if f.all() {
            json!({"all": true})
        } else {
            let mut names: Vec<&str> = f
                .grants
                .iter()
                .flat_map(|g| g.namespaces.names.iter().map(String::as_str))
                .collect();
            names.sort_unstable();
            names.dedup();
            json!({"all": false, "names": names})
        }
    });
    json!({
        "user": user,
        "groups": groups,
        "port": question.port,
        "attributes": {
            "method": attrs.method,
            "path": attrs.path,
            "query": attrs.query,
            "verb": attrs.verb.map(|v| v.as_str()),
            "subresources": attrs.subresources.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "endpoint": route.map(|r| r.endpoint.name()),
            "namespace": route.and_then(|r| r.namespace.clone()),
            "upgrade": attrs.upgrade.map(|u| format!("{u:?}")),
        },
        "decision": decision.verdict,
        "status": if decision.allowed() { 200 } else { 403 },
        "policy": decision.policy,
        "policies": decision.policies,
        "reason": decision.reason,
        "filteredTo": filtered_to,
        "grants": decision.filter.map(|f| f.grants),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nodegate_crds::policy::SubjectKind;
    use nodegate_crds::{AgentRule, Endpoint, ResolvedNamespaces, Subject};

    fn spec() -> NodeAgentConfigSpec {
        NodeAgentConfigSpec::pack(&[AgentRule {
            policy: "team-a".into(),
            subjects: vec![Subject {
                kind: SubjectKind::Group,
                name: "team-a".into(),
                namespace: None,
            }],
            endpoints: vec![Endpoint::Pods, Endpoint::ContainerLogs],
            namespaces: ResolvedNamespaces {
                all: false,
                names: vec!["a".into()],
            },
            ports: vec![Port::Secure],
            metrics: None,
        }])
    }

    fn question(target: &str) -> Question {
        Question {
            user: "alice".into(),
            groups: vec!["team-a".into()],
            method: "GET".into(),
            port: Port::Secure,
            target: target.into(),
            upgrade: None,
        }
    }

    #[test]
    fn explains_allow_deny_and_filter() {
        let out = explain(&spec(), &question("/pods"));
        assert_eq!(out["decision"], "allow");
        assert_eq!(out["policy"], "team-a");
        assert_eq!(out["filteredTo"]["names"], json!(["a"]));
        assert_eq!(out["attributes"]["subresources"], json!(["pods", "proxy"]));
        let out = explain(&spec(), &question("/containerLogs/b/p/c"));
        assert_eq!(out["decision"], "deny");
        assert_eq!(out["status"], 403);
        let mut q = question("/pods");
        q.port = Port::ReadOnly;
        let out = explain(&spec(), &q);
        assert_eq!(out["user"], "system:anonymous");
        assert_eq!(out["decision"], "deny");
        let out = explain(&spec(), &question("/a/../../x"));
        assert_eq!(out["status"], 400);
    }
}
