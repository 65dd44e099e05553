//! The CEL validation rules of the API (`x-kubernetes-validations`), with their messages.
//!
//! Endpoint lists in the rules are generated from the catalogue, so a new endpoint can never
//! slip past the node-wide or read-only-port rules. Every rule has an invalid sample in
//! `config/samples/invalid/<rule name>.yaml` that must fail with exactly this message.

use crate::catalogue::Endpoint;
use kube::core::{Message, Rule};

// `namespace` is a CEL reserved word: Kubernetes exposes such fields as `__namespace__`.

/// A DNS-1123 label (namespace names).
const DNS_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 subdomain (service account names).
const DNS_SUBDOMAIN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Builds one rule.
pub type RuleFn = fn() -> Rule;

/// Every rule by the name its invalid sample carries.
pub const ALL: &[(&str, RuleFn)] = &[
    ("has-subject", has_subject),
    ("node-wide-needs-all", node_wide_needs_all),
    ("components-need-all", components_need_all),
    (
        "no-streaming-on-read-only-port",
        no_streaming_on_read_only_port,
    ),
    (
        "read-only-port-serves-reads-only",
        read_only_port_serves_reads_only,
    ),
    ("read-only-port-is-anonymous", read_only_port_is_anonymous),
    (
        "anonymous-only-on-read-only-port",
        anonymous_only_on_read_only_port,
    ),
    ("direct-access-needs-all", direct_access_needs_all),
    ("direct-proxy-lists-streaming", direct_proxy_lists_streaming),
    ("subject-namespace", subject_namespace),
    ("service-account-subject-name", service_account_subject_name),
    ("service-account-names", service_account_names),
    ("exactly-one-namespace-scope", exactly_one_namespace_scope),
    ("namespace-names-valid", namespace_names_valid),
    ("selector-values", selector_values),
    ("add-labels-valid", add_labels_valid),
    ("metric-names-valid", metric_names_valid),
];

/// A CEL list literal of endpoint names.
fn cel_list(endpoints: impl Iterator<Item = Endpoint>) -> String {
    let names: Vec<String> = endpoints.map(|e| format!("'{}'", e.name())).collect();
    format!("[{}]", names.join(", "))
}

fn names(endpoints: impl Iterator<Item = Endpoint>) -> String {
    endpoints.map(|e| e.name()).collect::<Vec<_>>().join(", ")
}

const READ_ONLY_PORT: &str = "has(self.ports) && 'ReadOnly' in self.ports";
/// `ports` defaults to `[Secure]` when absent.
const SECURE_PORT: &str = "(!has(self.ports) || 'Secure' in self.ports)";
const DIRECT: &str = "has(self.directKubeletAccess) && self.directKubeletAccess";
/// The subjects RBAC would bind to everyone: the anonymous user and the unauthenticated group.
const ANONYMOUS_SUBJECT: &str = "(s.kind == 'User' && s.name == 'system:anonymous') || \
                                 (s.kind == 'Group' && s.name == 'system:unauthenticated')";

pub fn has_subject() -> Rule {
    Rule::new(
        "(has(self.subjects) && size(self.subjects) > 0) || \
         (has(self.serviceAccounts) && size(self.serviceAccounts) > 0)",
    )
    .message("a policy needs at least one subject: list subjects, or serviceAccounts for nodegate to create")
}

/// The kubelet's node-wide endpoints (the components' have a rule of their own).
fn kubelet_node_wide() -> impl Iterator<Item = Endpoint> {
    Endpoint::node_wide().filter(|e| e.component().is_none())
}

pub fn node_wide_needs_all() -> Rule {
    Rule::new(format!(
        "!self.access.exists(a, a in {}) || (has(self.namespaces.all) && self.namespaces.all)",
        cel_list(kubelet_node_wide())
    ))
    .message(Message::Message(format!(
        "node-wide endpoints ({}) return every namespace's data and need namespaces.all: true",
        names(kubelet_node_wide())
    )))
}

pub fn components_need_all() -> Rule {
    Rule::new(format!(
        "!self.access.exists(a, a in {}) || (has(self.namespaces.all) && self.namespaces.all)",
        cel_list(Endpoint::components())
    ))
    .message(Message::Message(format!(
        "component endpoints ({}) serve cluster-level data of kube-proxy, the controller \
         manager, the scheduler and etcd, which belongs to no namespace: they need \
         namespaces.all: true",
        names(Endpoint::components())
    )))
}

pub fn no_streaming_on_read_only_port() -> Rule {
    Rule::new(format!(
        "!({READ_ONLY_PORT}) || !self.access.exists(a, a in {})",
        cel_list(Endpoint::streaming())
    ))
    .message(Message::Message(format!(
        "{} are never served on the read-only port",
        names(Endpoint::streaming())
    )))
}

pub fn read_only_port_serves_reads_only() -> Rule {
    Rule::new(format!(
        "!({READ_ONLY_PORT}) || self.access.all(a, a in {} || a in {})",
        cel_list(Endpoint::read_only()),
        // Streaming endpoints have a rule and a message of their own.
        cel_list(Endpoint::streaming())
    ))
    .message(Message::Message(format!(
        "the read-only port serves only {}",
        names(Endpoint::read_only())
    )))
}

pub fn read_only_port_is_anonymous() -> Rule {
    Rule::new(format!(
        "!({READ_ONLY_PORT}) || (\
         (!has(self.subjects) || self.subjects.all(s, \
            (s.kind == 'User' && s.name == 'system:anonymous') || \
            (s.kind == 'Group' && s.name == 'system:unauthenticated'))) && \
         (!has(self.serviceAccounts) || size(self.serviceAccounts) == 0))"
    ))
    .message(
        "the read-only port has no authentication: its subjects can only be the user \
         system:anonymous or the group system:unauthenticated",
    )
}

pub fn subject_namespace() -> Rule {
    Rule::new("self.kind == 'ServiceAccount' ? has(self.__namespace__) : !has(self.__namespace__)")
        .message("a ServiceAccount subject needs a namespace; User and Group subjects have none")
}

pub fn service_account_subject_name() -> Rule {
    Rule::new(format!(
        "self.kind != 'ServiceAccount' || (self.name.matches('{DNS_SUBDOMAIN}') && \
         (!has(self.__namespace__) || self.__namespace__.matches('{DNS_LABEL}')))"
    ))
    .message(
        "a ServiceAccount subject's name must be a DNS-1123 subdomain and its namespace a \
         DNS-1123 label (lower case letters, digits, '-')",
    )
}

pub fn service_account_names() -> Rule {
    Rule::new(format!(
        "self.name.matches('{DNS_SUBDOMAIN}') && self.__namespace__.matches('{DNS_LABEL}')"
    ))
    .message(
        "a service account's name must be a DNS-1123 subdomain and its namespace a DNS-1123 \
         label (lower case letters, digits, '-')",
    )
}

pub fn exactly_one_namespace_scope() -> Rule {
    Rule::new(
        "(has(self.names) ? 1 : 0) + (has(self.selector) ? 1 : 0) + \
         ((has(self.all) && self.all) ? 1 : 0) == 1",
    )
    .message("namespaces must set exactly one of names, selector or all: true")
}

pub fn namespace_names_valid() -> Rule {
    Rule::new(format!(
        "!has(self.names) || self.names.all(n, n.matches('{DNS_LABEL}'))"
    ))
    .message("namespaces.names must be namespace names (DNS-1123 labels: lower case letters, digits, '-')")
}

pub fn selector_values() -> Rule {
    Rule::new(
        "(self.operator == 'In' || self.operator == 'NotIn') ? \
         (has(self.values) && size(self.values) > 0) : \
         (!has(self.values) || size(self.values) == 0)",
    )
    .message("In and NotIn need at least one value; Exists and DoesNotExist take none")
}

pub fn add_labels_valid() -> Rule {
    Rule::new(
        "!has(self.addLabels) || self.addLabels.all(k, k != 'namespace' && \
         k.matches('^[a-zA-Z_][a-zA-Z0-9_]*$') && !k.startsWith('__'))",
    )
    .message(
        "metrics.addLabels keys must be Prometheus label names, not reserved (__*), and not \
         namespace, which scopes the response",
    )
}

pub fn metric_names_valid() -> Rule {
    Rule::new(
        "(!has(self.drop) || self.drop.all(n, n.matches('^[a-zA-Z_:][a-zA-Z0-9_:]*$'))) && \
         (!has(self.keep) || self.keep.all(n, n.matches('^[a-zA-Z_:][a-zA-Z0-9_:]*$')))",
    )
    .message("metrics.drop and metrics.keep must be Prometheus metric names")
}

pub fn anonymous_only_on_read_only_port() -> Rule {
    Rule::new(format!(
        "!({SECURE_PORT}) || !has(self.subjects) || !self.subjects.exists(s, {ANONYMOUS_SUBJECT})"
    ))
    .message(
        "system:anonymous and system:unauthenticated may only be granted the ReadOnly port: on \
         the Secure port they would be bound in RBAC to every caller",
    )
}

pub fn direct_access_needs_all() -> Rule {
    Rule::new(format!(
        "!({DIRECT}) || (has(self.namespaces.all) && self.namespaces.all)"
    ))
    .message(
        "directKubeletAccess grants core nodes/* RBAC, which the kubelet and the API server's \
         node proxy honour unfiltered: it needs namespaces.all: true",
    )
}

pub fn direct_proxy_lists_streaming() -> Rule {
    Rule::new(format!(
        "!({DIRECT}) || !self.access.exists(a, a in {}) || {}.all(e, e in self.access)",
        cel_list(Endpoint::direct_proxy()),
        cel_list(Endpoint::PROXY_IMPLIES.into_iter()),
    ))
    .message(Message::Message(format!(
        "with directKubeletAccess, {} become get nodes/proxy, which the kubelet also accepts for \
         {} over a WebSocket GET: list {} in access too, or drop directKubeletAccess",
        names(Endpoint::direct_proxy()),
        names(Endpoint::PROXY_IMPLIES.into_iter()),
        names(Endpoint::PROXY_IMPLIES.into_iter()),
    )))
}
