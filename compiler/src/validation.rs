//! Validation of the documents an agent enforces without an API server to validate them: a
//! NodeAgentConfig `spec` (the CRD carries only the CEL rule that its indices resolve, so a
//! hand-written object could hold anything else) and NodeApiPolicy documents given to the
//! agent's file source or `render`; and the compiler's own check that a NodeAgentConfig it
//! emits is within every bound of the CRD, read from the generated schema.
//!
//! It lives beside the compiler because it checks the compiler's output format: one crate holds
//! what a NodeAgentConfig may contain, and both the operator and the agent depend on it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use nodegate_crds::agent_config::{MAX_AGENT_CONFIG_BYTES, indices_resolve, rule_set_alone};
use nodegate_crds::rules::RuleFn;
use nodegate_crds::{
    Endpoint, NodeAgentConfig, NodeAgentConfigSpec, NodeApiPolicy, PackedRule, Port, Subject,
    SubjectKind, rules,
};
use serde_json::Value;
use std::collections::BTreeSet;

/// Why a document was refused: every error found, each naming its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object} is invalid: {}", .errors.join("; "))]
pub struct Invalid {
    pub object: String,
    pub errors: Vec<String>,
}

fn invalid(object: impl Into<String>, errors: Vec<String>) -> Invalid {
    Invalid {
        object: object.into(),
        errors,
    }
}

/// Checks `value` against a structural schema the way the API server does: unknown fields,
/// enum values, list and string bounds. Errors name the field path.
pub fn schema_errors(
    schema: &JSONSchemaProps,
    value: &Value,
    path: &str,
    errors: &mut Vec<String>,
) {
    if value.is_null() {
        return;
    }
    let kind = match value {
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::Null => "null",
    };
    if let Some(want) = schema.type_.as_deref()
        && want != kind
        && !(want == "number" && kind == "integer")
    {
        errors.push(format!(
            "{path}: Invalid value: \"{kind}\": must be of type {want}"
        ));
        return;
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        errors.push(format!("{path}: Unsupported value: {value}"));
    }
    match value {
        Value::Object(map) => {
            if let Some(max) = schema.max_properties
                && map.len() as i64 > max
            {
                errors.push(format!("{path}: Too many: {} (at most {max})", map.len()));
            }
            for required in schema.required.iter().flatten() {
                if !map.contains_key(required) {
                    errors.push(format!("{path}.{required}: Required value"));
                }
            }
            let preserve = schema.x_kubernetes_preserve_unknown_fields == Some(true);
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                if let Some(props) = schema.properties.as_ref().and_then(|p| p.get(key)) {
                    schema_errors(props, child, &child_path, errors);
                } else {
                    match &schema.additional_properties {
                        Some(JSONSchemaPropsOrBool::Schema(values)) => {
                            schema_errors(values, child, &child_path, errors)
                        }
                        Some(JSONSchemaPropsOrBool::Bool(true)) => {}
                        _ if preserve => {}
                        _ => errors.push(format!("{path}: unknown field \"{key}\"")),
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.max_items
                && items.len() as i64 > max
            {
                errors.push(format!("{path}: Too many: {} (at most {max})", items.len()));
            }
            if let Some(min) = schema.min_items
                && (items.len() as i64) < min
            {
                errors.push(format!("{path}: at least {min} item(s) required"));
            }
            if let Some(JSONSchemaPropsOrArray::Schema(item)) = &schema.items {
                for (i, child) in items.iter().enumerate() {
                    schema_errors(item, child, &format!("{path}[{i}]"), errors);
                }
            }
            if schema.x_kubernetes_list_type.as_deref() == Some("set") {
                let mut seen = BTreeSet::new();
                for item in items {
                    if !seen.insert(item.to_string()) {
                        errors.push(format!("{path}: Duplicate value: {item}"));
                    }
                }
            }
        }
        Value::Number(n) => {
            // JSON numbers are finite; one that is not a number is out of every range.
            let v = n.as_f64().unwrap_or(f64::INFINITY);
            if let Some(max) = schema.maximum
                && v > max
            {
                errors.push(format!(
                    "{path}: Invalid value: {n}: should be less than or equal to {max}"
                ));
            }
            if let Some(min) = schema.minimum
                && v < min
            {
                errors.push(format!(
                    "{path}: Invalid value: {n}: should be greater than or equal to {min}"
                ));
            }
        }
        Value::String(s) => {
            let chars = s.chars().count() as i64;
            if let Some(max) = schema.max_length
                && chars > max
            {
                errors.push(format!(
                    "{path}: Too long: may not be more than {max} characters"
                ));
            }
            if let Some(min) = schema.min_length
                && chars < min
            {
                errors.push(format!("{path}: at least {min} character(s) required"));
            }
        }
        _ => {}
    }
}

/// The schema of `spec` in a CRD.
fn spec_schema(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Option<JSONSchemaProps> {
    crd.spec
        .versions
        .first()?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()?
        .properties
        .as_ref()?
        .get("spec")
        .cloned()
}

fn node_agent_config_schema() -> &'static Option<JSONSchemaProps> {
    static SCHEMA: std::sync::OnceLock<Option<JSONSchemaProps>> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| spec_schema(&nodegate_crds::crd::node_agent_config()))
}

fn node_api_policy_schema() -> &'static Option<JSONSchemaProps> {
    static SCHEMA: std::sync::OnceLock<Option<JSONSchemaProps>> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| spec_schema(&nodegate_crds::crd::node_api_policy()))
}

/// A NodeAgentConfig `spec` as JSON → validated spec, ready to enforce. Refuses what the
/// schema refuses (unknown fields or endpoints, bounds, duplicates in sets), an index that
/// names no entry of its table, and what the policy rules would have refused (the
/// NodeAgentConfig CRD carries none of them, so a hand-written object could hold anything).
pub fn validate_agent_spec(object: &str, spec: &Value) -> Result<NodeAgentConfigSpec, Invalid> {
    let mut errors = Vec::new();
    if let Some(schema) = node_agent_config_schema() {
        schema_errors(schema, spec, "spec", &mut errors);
    }
    if !errors.is_empty() {
        return Err(invalid(object, errors));
    }
    let mut parsed: NodeAgentConfigSpec = serde_json::from_value(spec.clone())
        .map_err(|e| invalid(object, vec![format!("spec: {e}")]))?;
    let errors = agent_spec_violations(&parsed);
    if !errors.is_empty() {
        return Err(invalid(object, errors));
    }
    for set in &mut parsed.namespace_sets {
        set.names.sort();
    }
    Ok(parsed)
}

/// The message of one of the CRD's CEL rules, as the API server would print it.
pub fn message(rule: rules::RuleFn) -> String {
    match rule().message {
        Some(kube::core::Message::Message(m)) => m,
        Some(kube::core::Message::Expression(e)) => e,
        None => rule().rule,
    }
}

/// A DNS-1123 label (namespace names).
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain (service account names).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| !l.is_empty() && is_dns_label(l))
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_anonymous_subject(s: &nodegate_crds::Subject) -> bool {
    crate::is_anonymous(s)
}

/// The rules shared by policies and compiled agent rules, given their parts.
struct GrantParts<'a> {
    subjects: &'a [&'a Subject],
    creates_service_accounts: bool,
    endpoints: &'a [Endpoint],
    all_namespaces: bool,
    ports: &'a [Port],
    metrics: Option<&'a nodegate_crds::policy::MetricsTransform>,
}

fn grant_violations(g: &GrantParts<'_>, errors: &mut Vec<String>) {
    let node_wide: BTreeSet<Endpoint> = Endpoint::node_wide().collect();
    let streaming: BTreeSet<Endpoint> = Endpoint::streaming().collect();
    let read_only: BTreeSet<Endpoint> = Endpoint::read_only().collect();
    if g.endpoints
        .iter()
        .any(|e| node_wide.contains(e) && e.component().is_none())
        && !g.all_namespaces
    {
        errors.push(message(rules::node_wide_needs_all));
    }
    if g.endpoints.iter().any(|e| e.component().is_some()) && !g.all_namespaces {
        errors.push(message(rules::components_need_all));
    }
    if g.ports.contains(&Port::ReadOnly) {
        if g.endpoints.iter().any(|e| streaming.contains(e)) {
            errors.push(message(rules::no_streaming_on_read_only_port));
        }
        if !g
            .endpoints
            .iter()
            .all(|e| read_only.contains(e) || streaming.contains(e))
        {
            errors.push(message(rules::read_only_port_serves_reads_only));
        }
        if !g.subjects.iter().all(|s| is_anonymous_subject(s)) || g.creates_service_accounts {
            errors.push(message(rules::read_only_port_is_anonymous));
        }
    }
    if g.ports.contains(&Port::Secure) && g.subjects.iter().any(|s| is_anonymous_subject(s)) {
        errors.push(message(rules::anonymous_only_on_read_only_port));
    }
    for s in g.subjects.iter().copied() {
        if (s.kind == SubjectKind::ServiceAccount) != s.namespace.is_some() {
            errors.push(message(rules::subject_namespace));
        }
        if s.kind == SubjectKind::ServiceAccount
            && (!is_dns_subdomain(&s.name)
                || s.namespace.as_deref().is_some_and(|n| !is_dns_label(n)))
        {
            errors.push(message(rules::service_account_subject_name));
        }
    }
    if let Some(m) = g.metrics {
        if m.add_labels
            .keys()
            .any(|k| k == "namespace" || !is_label_name(k) || k.starts_with("__"))
        {
            errors.push(message(rules::add_labels_valid));
        }
        if !m.drop.iter().chain(&m.keep).all(|n| is_metric_name(n)) {
            errors.push(message(rules::metric_names_valid));
        }
    }
}

/// What makes compiled rules unsafe or ambiguous to enforce.
pub fn agent_spec_violations(spec: &NodeAgentConfigSpec) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, set) in spec.namespace_sets.iter().enumerate() {
        let names = &set.names;
        let at = |what: String| format!("spec.namespaceSets[{i}]: {what}");
        if names.iter().any(|n| !is_dns_label(n)) {
            errors.push(at(message(rules::namespace_names_valid)));
        }
        if names.iter().collect::<BTreeSet<_>>().len() != names.len() {
            errors.push(at("duplicate namespace".into()));
        }
        if set.all && !names.is_empty() {
            errors.push(at(message(rules::exactly_one_namespace_scope)));
        }
    }
    let mut policies = BTreeSet::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = |what: &str| format!("spec.rules[{i}] ({}): {what}", rule.policy);
        if !policies.insert(rule.policy.as_str()) {
            errors.push(at("duplicate policy"));
        }
        let mut rule_errors = Vec::new();
        check_rule(spec, rule, &mut rule_errors);
        errors.extend(rule_errors.iter().map(|e| at(e)));
    }
    errors
}

fn check_rule(spec: &NodeAgentConfigSpec, rule: &PackedRule, errors: &mut Vec<String>) {
    let mut subjects = Vec::with_capacity(rule.subjects.len());
    for &index in &rule.subjects {
        match spec.subject(index) {
            Some(subject) => subjects.push(subject),
            None => errors.push(format!(
                "subject index {index} names no entry of spec.subjects ({} entries)",
                spec.subjects.len()
            )),
        }
    }
    let Some(namespaces) = spec.namespace_set(rule.namespaces) else {
        errors.push(format!(
            "namespace index {} names no entry of spec.namespaceSets ({} entries)",
            rule.namespaces,
            spec.namespace_sets.len()
        ));
        return;
    };
    if rule.subjects.is_empty() {
        errors.push(message(rules::has_subject));
    }
    if rule.endpoints.is_empty() {
        errors.push("no endpoints".into());
    }
    if rule.ports.is_empty() {
        errors.push("no ports".into());
    }
    let unique = |n: usize, m: usize| n == m;
    if !unique(
        rule.endpoints.iter().collect::<BTreeSet<_>>().len(),
        rule.endpoints.len(),
    ) {
        errors.push("duplicate endpoint".into());
    }
    if !unique(
        rule.ports.iter().collect::<BTreeSet<_>>().len(),
        rule.ports.len(),
    ) {
        errors.push("duplicate port".into());
    }
    if !unique(
        subjects.iter().collect::<BTreeSet<_>>().len(),
        subjects.len(),
    ) {
        errors.push("duplicate subject".into());
    }
    grant_violations(
        &GrantParts {
            subjects: &subjects,
            creates_service_accounts: false,
            endpoints: &rule.endpoints,
            all_namespaces: namespaces.all,
            ports: &rule.ports,
            metrics: rule.metrics.as_ref(),
        },
        errors,
    );
}

/// Every bound of the NodeAgentConfig CRD a spec exceeds, as the API server would name it:
/// the structural schema's (`maxItems`, `maxLength`, `maximum`, enums, read from the generated
/// CRD, so no limit is copied here) and its CEL rules ([`spec_rule_violations`]). Empty when
/// the API server would store the spec.
pub fn agent_spec_bound_violations(spec: &NodeAgentConfigSpec) -> Vec<String> {
    let mut errors = Vec::new();
    let value = match serde_json::to_value(spec) {
        Ok(value) => value,
        Err(e) => return vec![format!("spec: {e}")],
    };
    let Some(schema) = node_agent_config_schema() else {
        return vec!["the generated NodeAgentConfig CRD has no spec schema".into()];
    };
    schema_errors(schema, &value, "spec", &mut errors);
    errors.extend(spec_rule_violations(spec));
    errors
}

/// The CRD's CEL rules on a NodeAgentConfig spec ([`NODE_AGENT_CONFIG_RULES`]), decided here
/// rather than by kube's client-side evaluator: that evaluator copies the whole object at each
/// `self` inside `rules.all(..)`, so a rule set of 775 rules took a second and a compile at
/// 1,000 policies × 500 nodes 10 s, every round. A test holds this to the evaluator's answers
/// ([`agent_spec_cel_violations`]) and fails when the CRD gains a rule this does not decide.
pub fn spec_rule_violations(spec: &NodeAgentConfigSpec) -> Vec<String> {
    let mut errors = Vec::new();
    let resolves = spec.rules.iter().all(|rule| {
        spec.namespace_set(rule.namespaces).is_some()
            && rule.subjects.iter().all(|&s| spec.subject(s).is_some())
    });
    if !resolves {
        errors.push(format!("spec: {}", message(indices_resolve)));
    }
    let alone = spec.rules.is_empty() && spec.subjects.is_empty() && spec.namespace_sets.is_empty();
    if spec.rule_set.is_some() && !alone {
        errors.push(format!("spec: {}", message(rule_set_alone)));
    }
    errors
}

/// The CEL rules of the NodeAgentConfig spec that [`spec_rule_violations`] decides.
pub const NODE_AGENT_CONFIG_RULES: &[RuleFn] = &[indices_resolve, rule_set_alone];

/// The CRD's CEL rules on `spec` as kube's client-side evaluator answers them: the reference
/// [`spec_rule_violations`] is tested against (quadratic in the rules; not for a compile).
#[cfg(test)]
pub(crate) fn agent_spec_cel_violations(spec: &NodeAgentConfigSpec) -> Vec<String> {
    let (Ok(value), Some(schema)) = (serde_json::to_value(spec), node_agent_config_schema()) else {
        return vec!["spec: not serializable, or the CRD has no spec schema".into()];
    };
    let schema = match serde_json::to_value(schema) {
        Ok(schema) => schema,
        Err(e) => return vec![format!("spec schema: {e}")],
    };
    match kube::core::cel::Validator::new().validate(&schema, &value, None) {
        Ok(()) => Vec::new(),
        Err(cel) => cel
            .into_vec()
            .into_iter()
            .map(|e| {
                if e.field_path.is_empty() {
                    format!("spec: {}", e.message)
                } else {
                    format!("spec.{}: {}", e.field_path, e.message)
                }
            })
            .collect(),
    }
}

/// The byte limit of a whole NodeAgentConfig ([`MAX_AGENT_CONFIG_BYTES`]: etcd's request limit,
/// less room for metadata, status and managed fields), if `config` exceeds it.
pub fn agent_config_size_violation(config: &NodeAgentConfig) -> Option<String> {
    let size = serde_json::to_vec(config).map_or(usize::MAX, |b| b.len());
    (size > MAX_AGENT_CONFIG_BYTES)
        .then(|| format!("{size} bytes of JSON, over the {MAX_AGENT_CONFIG_BYTES}-byte limit"))
}

/// A NodeApiPolicy document (JSON) → the policy, or every schema and rule error: unknown
/// fields and bounds by the CRD's structural schema, then the CRD's CEL rules.
pub fn validate_policy(doc: &Value) -> Result<NodeApiPolicy, Invalid> {
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let object = format!("NodeApiPolicy {name:?}");
    if name.is_empty() {
        return Err(invalid(
            object,
            vec!["metadata.name: Required value".into()],
        ));
    }
    let mut errors = Vec::new();
    let spec = doc.get("spec").cloned().unwrap_or(Value::Null);
    if spec.is_null() {
        return Err(invalid(object, vec!["spec: Required value".into()]));
    }
    if let Some(schema) = node_api_policy_schema() {
        schema_errors(schema, &spec, "spec", &mut errors);
    }
    if !errors.is_empty() {
        return Err(invalid(object, errors));
    }
    // The CRD's own CEL rules, by kube's client-side evaluator: the same messages as
    // `kubectl apply`, and no second copy of the rules to drift.
    nodegate_crds::validation::validate_policy(doc).map_err(|e| match e {
        nodegate_crds::validation::Invalid::Rules(errors) => invalid(&object, errors),
        other => invalid(&object, vec![other.to_string()]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        for ok in ["a", "team-a", "a1", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("a.b-c.d"));
        assert!(!is_dns_subdomain("a..b") && !is_dns_subdomain(".a"));
    }
}
