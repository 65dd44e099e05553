//! Never adopt: an object of a generated name that nodegate does not own stays as it is, and
//! the policies that wanted the name say so in a condition.

use super::objects::{Key, Kind, for_each_meta, policies_of, rule_set_policies};
use crate::compiler::Desired;
use std::collections::{BTreeMap, BTreeSet};

/// A desired object left out because a foreign object holds its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub key: Key,
    /// The policies that wanted it.
    pub policies: BTreeSet<String>,
    /// Why: the foreign object itself, or the foreign ClusterRole a binding would refer to.
    pub because_of: Key,
}

/// Removes from `desired` every object whose key is in `foreign`, and every binding whose
/// roleRef names a foreign ClusterRole: binding the policy's subjects to a role someone else
/// wrote would grant whatever that role grants. Returns what was left out. A foreign
/// NodeAgentConfig belongs to every policy that selects its node: the agent enforces
/// whatever that object says (or refuses it), not what those policies say.
pub fn exclude_foreign(desired: &mut Desired, foreign: &BTreeSet<Key>) -> Vec<Skipped> {
    let mut skipped = Vec::new();
    if foreign.is_empty() {
        return skipped;
    }
    let foreign_role = |name: &str| foreign.contains(&Key::new(Kind::ClusterRole, None, name));
    let mut verdicts: BTreeMap<Key, Key> = BTreeMap::new();
    for crb in &desired.cluster_role_bindings {
        if crb.role_ref.kind == "ClusterRole" && foreign_role(&crb.role_ref.name) {
            let key = Key::new(
                Kind::ClusterRoleBinding,
                None,
                crb.metadata.name.as_deref().unwrap_or_default(),
            );
            verdicts.insert(key, Key::new(Kind::ClusterRole, None, &crb.role_ref.name));
        }
    }
    for rb in &desired.role_bindings {
        if rb.role_ref.kind == "ClusterRole" && foreign_role(&rb.role_ref.name) {
            let key = Key::new(
                Kind::RoleBinding,
                rb.metadata.namespace.as_deref(),
                rb.metadata.name.as_deref().unwrap_or_default(),
            );
            verdicts.insert(key, Key::new(Kind::ClusterRole, None, &rb.role_ref.name));
        }
    }
    let mut by_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for outcome in &desired.outcomes {
        for node in &outcome.nodes {
            by_node
                .entry(node.clone())
                .or_default()
                .insert(outcome.policy.clone());
        }
    }
    let mut by_rule_set: BTreeMap<String, BTreeSet<String>> = desired
        .node_agent_rule_sets
        .iter()
        .map(|r| {
            (
                r.metadata.name.clone().unwrap_or_default(),
                rule_set_policies(r),
            )
        })
        .collect();
    for_each_meta(desired, |kind, meta| {
        let key = Key::new(
            kind,
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or_default(),
        );
        let because_of = if foreign.contains(&key) {
            Some(key.clone())
        } else {
            verdicts.get(&key).cloned()
        };
        if let Some(because_of) = because_of {
            let policies = match kind {
                Kind::NodeAgentConfig => crate::compiler::config_node(meta)
                    .and_then(|node| by_node.remove(node))
                    .unwrap_or_default(),
                Kind::NodeAgentRuleSet => by_rule_set.remove(&key.name).unwrap_or_default(),
                _ => policies_of(meta),
            };
            skipped.push(Skipped {
                key,
                policies,
                because_of,
            });
        }
    });
    let drop: BTreeSet<&Key> = skipped.iter().map(|s| &s.key).collect();
    let keep = |kind: Kind, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        !drop.contains(&Key::new(
            kind,
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or_default(),
        ))
    };
    desired
        .cluster_roles
        .retain(|o| keep(Kind::ClusterRole, &o.metadata));
    desired
        .cluster_role_bindings
        .retain(|o| keep(Kind::ClusterRoleBinding, &o.metadata));
    desired
        .role_bindings
        .retain(|o| keep(Kind::RoleBinding, &o.metadata));
    desired
        .service_accounts
        .retain(|o| keep(Kind::ServiceAccount, &o.metadata));
    desired
        .node_agent_rule_sets
        .retain(|o| keep(Kind::NodeAgentRuleSet, &o.metadata));
    desired
        .node_agent_configs
        .retain(|o| keep(Kind::NodeAgentConfig, &o.metadata));
    skipped
}

/// Per policy, one sentence per skipped object, for its condition.
pub fn messages_by_policy(skipped: &[Skipped]) -> BTreeMap<String, Vec<String>> {
    let mut by_policy: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in skipped {
        let message = if s.because_of == s.key {
            format!("{} exists and is not managed by nodegate", s.key)
        } else {
            format!(
                "{} not written: {} exists and is not managed by nodegate",
                s.key, s.because_of
            )
        };
        for policy in &s.policies {
            by_policy
                .entry(policy.clone())
                .or_default()
                .push(message.clone());
        }
    }
    by_policy
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding, RoleRef};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use nodegate_crds::POLICY_LABEL;

    fn meta(name: &str, ns: Option<&str>, policy: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: ns.map(str::to_string),
            labels: Some([(POLICY_LABEL.to_string(), policy.to_string())].into()),
            ..Default::default()
        }
    }

    fn role_ref(name: &str) -> RoleRef {
        RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: name.into(),
        }
    }

    fn desired() -> Desired {
        let mut d = Desired::default();
        for p in ["a", "b"] {
            let name = format!("nodegate:{p}");
            d.cluster_roles.push(ClusterRole {
                metadata: meta(&name, None, p),
                ..Default::default()
            });
            d.cluster_role_bindings.push(ClusterRoleBinding {
                metadata: meta(&name, None, p),
                role_ref: role_ref(&name),
                subjects: None,
            });
            d.role_bindings.push(RoleBinding {
                metadata: meta(&name, Some("team"), p),
                role_ref: role_ref(&name),
                subjects: None,
            });
        }
        let mut shared = meta("prom", Some("mon"), "a");
        shared.owner_references = Some(
            ["a", "b"]
                .iter()
                .map(|p| OwnerReference {
                    api_version: "nodegate.io/v1alpha1".into(),
                    kind: "NodeApiPolicy".into(),
                    name: p.to_string(),
                    uid: format!("uid-{p}"),
                    ..Default::default()
                })
                .collect(),
        );
        d.service_accounts.push(ServiceAccount {
            metadata: shared,
            ..Default::default()
        });
        d
    }

    #[test]
    fn nothing_foreign_changes_nothing() {
        let mut d = desired();
        assert!(exclude_foreign(&mut d, &BTreeSet::new()).is_empty());
        assert_eq!(d.cluster_roles.len(), 2);
        assert_eq!(d.role_bindings.len(), 2);
    }

    #[test]
    fn foreign_role_removes_it_and_every_binding_to_it() {
        let mut d = desired();
        let role = Key::new(Kind::ClusterRole, None, "nodegate:a");
        let skipped = exclude_foreign(&mut d, &BTreeSet::from([role.clone()]));
        let keys: Vec<String> = skipped.iter().map(|s| s.key.to_string()).collect();
        assert_eq!(
            keys,
            [
                "ClusterRole nodegate:a",
                "ClusterRoleBinding nodegate:a",
                "RoleBinding team/nodegate:a"
            ]
        );
        assert!(skipped.iter().all(|s| s.because_of == role));
        let names = |v: Vec<Option<String>>| v.into_iter().flatten().collect::<Vec<_>>();
        assert_eq!(
            names(
                d.cluster_roles
                    .iter()
                    .map(|o| o.metadata.name.clone())
                    .collect()
            ),
            ["nodegate:b"]
        );
        assert_eq!(
            names(
                d.role_bindings
                    .iter()
                    .map(|o| o.metadata.name.clone())
                    .collect()
            ),
            ["nodegate:b"]
        );
        let by_policy = messages_by_policy(&skipped);
        assert_eq!(by_policy.keys().collect::<Vec<_>>(), ["a"]);
        assert!(by_policy["a"][0].contains("ClusterRole nodegate:a exists and is not managed"));
    }

    #[test]
    fn foreign_shared_service_account_is_reported_to_every_owner() {
        let mut d = desired();
        let sa = Key::new(Kind::ServiceAccount, Some("mon"), "prom");
        let skipped = exclude_foreign(&mut d, &BTreeSet::from([sa]));
        assert_eq!(skipped.len(), 1);
        assert!(d.service_accounts.is_empty());
        assert_eq!(d.cluster_roles.len(), 2, "roles are unaffected");
        let by_policy = messages_by_policy(&skipped);
        assert_eq!(by_policy.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn foreign_node_agent_config_is_reported_to_every_policy_on_its_node() {
        use crate::compiler::PolicyOutcome;
        let mut d = desired();
        // A named instance's configs, as the compiler writes them: found by their Node owner.
        let nodes: Vec<crate::compiler::NodeInfo> = ["n1", "n2"]
            .iter()
            .map(|n| crate::compiler::NodeInfo {
                name: n.to_string(),
                uid: format!("uid-{n}"),
                labels: Default::default(),
            })
            .collect();
        d.node_agent_configs = crate::compiler::compile_shared(&[], &nodes, &[], Some("blue"))
            .0
            .node_agent_configs;
        for (policy, nodes) in [
            ("a", vec!["n1"]),
            ("b", vec!["n1", "n2"]),
            ("c", vec!["n2"]),
        ] {
            d.outcomes.push(PolicyOutcome {
                policy: policy.into(),
                nodes: nodes.into_iter().map(String::from).collect(),
                ..Default::default()
            });
        }
        let config = Key::new(Kind::NodeAgentConfig, None, "blue.n1");
        let skipped = exclude_foreign(&mut d, &BTreeSet::from([config]));
        assert_eq!(skipped.len(), 1);
        assert_eq!(d.node_agent_configs.len(), 1);
        let by_policy = messages_by_policy(&skipped);
        assert_eq!(by_policy.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(by_policy["a"][0].contains("NodeAgentConfig blue.n1 exists and is not managed"));
    }

    #[test]
    fn foreign_binding_alone_leaves_the_role() {
        let mut d = desired();
        let rb = Key::new(Kind::RoleBinding, Some("team"), "nodegate:b");
        let skipped = exclude_foreign(&mut d, &BTreeSet::from([rb]));
        assert_eq!(skipped.len(), 1);
        assert_eq!(d.role_bindings.len(), 1);
        assert_eq!(d.cluster_roles.len(), 2);
        assert_eq!(d.cluster_role_bindings.len(), 2);
    }
}
