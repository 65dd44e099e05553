//! Client-side validation of NodeApiPolicy documents by the CRD's own schema rules.
//!
//! The API server is the validator for policies applied to a cluster. Where nodegate reads
//! policies *without* one (`nodegate-operator render`, the agent's `--config-source=file:`), it
//! runs the very same CEL rules (kube's client-side evaluator over the generated schema), so a
//! policy the API server would refuse is refused here too, with the same message, and no second
//! implementation of the rules can drift from the first.

use crate::NodeApiPolicy;
use kube::core::cel::Validator;
use serde_json::Value;

/// Why a policy document was refused.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("not a NodeApiPolicy: {0}")]
    Shape(String),
    #[error("{}", .0.join("; "))]
    Rules(Vec<String>),
}

/// Checks one NodeApiPolicy document (as parsed from YAML or JSON) against the CRD's schema
/// rules and returns the typed policy.
pub fn validate_policy(object: &Value) -> Result<NodeApiPolicy, Invalid> {
    let kind = object.get("kind").and_then(Value::as_str);
    let api_version = object.get("apiVersion").and_then(Value::as_str);
    if kind != Some("NodeApiPolicy") || api_version != Some("nodegate.io/v1alpha1") {
        return Err(Invalid::Shape(format!(
            "expected apiVersion nodegate.io/v1alpha1, kind NodeApiPolicy; found {} {}",
            api_version.unwrap_or("(no apiVersion)"),
            kind.unwrap_or("(no kind)")
        )));
    }
    let policy: NodeApiPolicy =
        serde_json::from_value(object.clone()).map_err(|e| Invalid::Shape(e.to_string()))?;
    if policy.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(Invalid::Shape("metadata.name is required".into()));
    }
    let schema = policy_schema().map_err(Invalid::Shape)?;
    Validator::new()
        .validate(&schema, object, None)
        .map_err(|errors| {
            Invalid::Rules(
                errors
                    .into_vec()
                    .into_iter()
                    .map(|e| {
                        if e.field_path.is_empty() {
                            e.message
                        } else {
                            format!("{}: {}", e.field_path, e.message)
                        }
                    })
                    .collect(),
            )
        })?;
    Ok(policy)
}

fn policy_schema() -> Result<Value, String> {
    let crd = crate::crd::node_api_policy();
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .ok_or("the generated CRD has no schema")?;
    serde_json::to_value(schema).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn policy(spec: Value) -> Value {
        json!({"apiVersion": "nodegate.io/v1alpha1", "kind": "NodeApiPolicy",
               "metadata": {"name": "p"}, "spec": spec})
    }

    #[test]
    fn accepts_a_valid_policy_and_refuses_with_the_rules_message() {
        let ok = policy(json!({"subjects": [{"kind": "Group", "name": "g"}],
                               "access": ["cadvisor"], "namespaces": {"names": ["a"]}}));
        assert_eq!(
            validate_policy(&ok).unwrap().metadata.name.as_deref(),
            Some("p")
        );
        let bad = policy(json!({"subjects": [{"kind": "Group", "name": "g"}],
                                "access": ["metrics"], "namespaces": {"names": ["a"]}}));
        let err = validate_policy(&bad).unwrap_err().to_string();
        assert!(err.contains("need namespaces.all: true"), "{err}");
    }

    #[test]
    fn refuses_other_kinds_and_unknown_endpoints() {
        let mut other = policy(json!({}));
        other["kind"] = json!("ConfigMap");
        assert!(matches!(validate_policy(&other), Err(Invalid::Shape(_))));
        let unknown = policy(json!({"subjects": [{"kind": "Group", "name": "g"}],
                                    "access": ["shell"], "namespaces": {"all": true}}));
        assert!(matches!(validate_policy(&unknown), Err(Invalid::Shape(_))));
    }
}
