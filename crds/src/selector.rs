//! A label selector with bounded lists.
//!
//! Kubernetes' own `LabelSelector` schema has unbounded lists, which CEL cost estimation counts
//! as huge; this one has the same shape and meaning with limits, and converts to kube's
//! [`kube::core::Selector`] for matching.

use crate::rules;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use kube::KubeSchema;
use kube::core::{Selector, SelectorExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Selects objects by label. An empty selector selects everything.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// A requirement on one label.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = rules::selector_values())]
pub struct LabelSelectorRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// The values for `In` and `NotIn` (at least one); empty for `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 63)))]
    pub values: Vec<String>,
}

/// A label selector operator.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl SelectorOperator {
    /// The operator as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SelectorOperator::In => "In",
            SelectorOperator::NotIn => "NotIn",
            SelectorOperator::Exists => "Exists",
            SelectorOperator::DoesNotExist => "DoesNotExist",
        }
    }
}

impl LabelSelector {
    /// Whether the selector selects every object (no requirement at all).
    pub fn selects_all(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Converts to kube's selector. Fails for requirements the API server would also refuse
    /// (`In` without values, `Exists` with values), which callers treat as matching nothing.
    pub fn to_selector(&self) -> Result<Selector, kube::core::ParseExpressionError> {
        let selector = meta::LabelSelector {
            match_labels: Some(self.match_labels.clone()),
            match_expressions: Some(
                self.match_expressions
                    .iter()
                    .map(|r| meta::LabelSelectorRequirement {
                        key: r.key.clone(),
                        operator: r.operator.as_str().to_string(),
                        values: Some(r.values.clone()),
                    })
                    .collect(),
            ),
        };
        for r in &self.match_expressions {
            let needs_values = matches!(r.operator, SelectorOperator::In | SelectorOperator::NotIn);
            if needs_values == r.values.is_empty() {
                return Err(kube::core::ParseExpressionError(format!(
                    "operator {} of key {:?} {} values",
                    r.operator.as_str(),
                    r.key,
                    if needs_values { "needs" } else { "takes no" }
                )));
            }
        }
        Selector::try_from(selector)
    }

    /// Whether labels match; an invalid selector matches nothing (fail closed).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.to_selector().is_ok_and(|s| s.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn matching() {
        let l = labels(&[("pool", "gpu"), ("zone", "a")]);
        let empty = LabelSelector::default();
        assert!(empty.selects_all() && empty.matches(&l) && empty.matches(&BTreeMap::new()));
        let by_label = LabelSelector {
            match_labels: labels(&[("pool", "gpu")]),
            ..Default::default()
        };
        assert!(by_label.matches(&l));
        assert!(!by_label.matches(&labels(&[("pool", "cpu")])));
        let exprs = |r| LabelSelector {
            match_expressions: vec![r],
            ..Default::default()
        };
        assert!(exprs(req("zone", SelectorOperator::In, &["a", "b"])).matches(&l));
        assert!(!exprs(req("zone", SelectorOperator::NotIn, &["a"])).matches(&l));
        assert!(exprs(req("zone", SelectorOperator::Exists, &[])).matches(&l));
        assert!(!exprs(req("zone", SelectorOperator::DoesNotExist, &[])).matches(&l));
        assert!(exprs(req("x", SelectorOperator::NotIn, &["a"])).matches(&l));
    }

    #[test]
    fn invalid_selectors_match_nothing() {
        let bad = LabelSelector {
            match_expressions: vec![req("zone", SelectorOperator::In, &[])],
            ..Default::default()
        };
        assert!(!bad.matches(&labels(&[("zone", "a")])));
        let bad = LabelSelector {
            match_expressions: vec![req("zone", SelectorOperator::Exists, &["a"])],
            ..Default::default()
        };
        assert!(!bad.matches(&labels(&[("zone", "a")])));
    }
}
