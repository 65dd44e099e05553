//! What an agent enforces, read back from the API server: a node's NodeAgentConfig names a
//! NodeAgentRuleSet that holds its rules.

use kube::api::Api;
use nodegate_crds::{NodeAgentConfig, NodeAgentRuleSet};

/// Node `node`'s NodeAgentConfig of operator instance `instance` as its agent sees it: with
/// the rules (and hash) of the rule set it names in its spec (`spec.ruleSet` kept). None while
/// either is missing.
pub async fn effective_config(
    client: &kube::Client,
    node: &str,
    instance: Option<&str>,
) -> Result<Option<NodeAgentConfig>, kube::Error> {
    let Some(mut config) = Api::<NodeAgentConfig>::all(client.clone())
        .get_opt(&nodegate_compiler::config_name(node, instance))
        .await?
    else {
        return Ok(None);
    };
    if let Some(name) = config.spec.rule_set.clone() {
        let Some(set) = Api::<NodeAgentRuleSet>::all(client.clone())
            .get_opt(&name)
            .await?
        else {
            return Ok(None);
        };
        config.spec = set.spec.0;
        config.spec.rule_set = Some(name);
    }
    Ok(Some(config))
}

/// The status a node's agent writes once it enforces the rules of hash `hash` (a merge patch):
/// what the operator waits for. Tests that play agents write it.
pub fn agent_confirms(hash: &str) -> serde_json::Value {
    serde_json::json!({"status": {
        "observedHash": hash,
        "conditions": [{"type": "InSync", "status": "True", "reason": "Enforced",
                        "message": "the agent enforces this version",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }})
}

/// The policies a config's rules come from, in its order (by policy name).
pub fn config_policies(config: &NodeAgentConfig) -> Vec<String> {
    config.spec.rules.iter().map(|r| r.policy.clone()).collect()
}
