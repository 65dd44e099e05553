//! nodegate's API: the `NodeApiPolicy`, `NodeAgentConfig` and `NodeAgentRuleSet` types, their CEL rules, and the
//! kubelet endpoint catalogue both binaries share.

pub mod agent_config;
pub mod attributes;
pub mod catalogue;
pub mod crd;
pub mod decision;
pub mod policy;
pub mod rules;
pub mod selector;
pub mod validation;

pub use agent_config::{
    AgentRule, NodeAgentConfig, NodeAgentConfigSpec, NodeAgentRuleSet, NodeAgentRuleSetSpec,
    PackedRule, ResolvedNamespaces,
};
pub use catalogue::{Endpoint, Subresource, Verb};
pub use policy::{NodeApiPolicy, NodeApiPolicySpec, Port, Subject, SubjectKind};

/// Field manager for every server-side apply nodegate makes.
pub const FIELD_MANAGER: &str = "nodegate";
/// `app.kubernetes.io/managed-by` value on every generated object.
pub const MANAGED_BY: &str = "nodegate";
/// Label naming the policy a generated object belongs to.
pub const POLICY_LABEL: &str = "nodegate.io/policy";
