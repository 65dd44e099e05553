//! A policy's status from what the round found: pure, so every condition is unit-tested, and
//! the controller patches status only when this returns something different.

use crate::compiler::PolicyOutcome;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use nodegate_crds::policy::{GeneratedObjects, NodeApiPolicyStatus};

pub const READY: &str = "Ready";
pub const RBAC_APPLIED: &str = "RBACApplied";
pub const AGENTS_SYNCED: &str = "AgentsSynced";

/// What a round learnt about one policy.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub generation: Option<i64>,
    /// Objects not written because a foreign object holds the name (one sentence each).
    pub foreign: Vec<String>,
    /// Writes of this policy's objects that failed or wait for a retry (one sentence each).
    pub errors: Vec<String>,
    /// Selected nodes whose agent reports the hash nodegate last wrote.
    pub agents_in_sync: usize,
    /// Selected nodes that are not in sync, by name (for the message; sorted).
    pub agents_behind: Vec<String>,
    /// Nodes the policy no longer selects whose NodeAgentConfig, as written or as its agent
    /// enforces it, may still hold the policy's earlier rules (sorted).
    pub revoking: Vec<String>,
    pub generated: GeneratedObjects,
}

/// Sets the `Ready` condition of `status` to False with `reason` and `message`, keeping its
/// `lastTransitionTime` when it was False already (other conditions are left as they are).
pub fn mark_not_ready(status: &mut NodeApiPolicyStatus, reason: &str, message: &str, now: &Time) {
    let since = status
        .conditions
        .iter()
        .find(|c| c.type_ == READY && c.status == "False")
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    let observed_generation = status.observed_generation;
    status.conditions.retain(|c| c.type_ != READY);
    status.conditions.push(Condition {
        type_: READY.into(),
        status: "False".into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: since,
        observed_generation,
    });
}

/// The first five names, and "…" if there are more: a condition message stays short.
fn first_names(names: &[String]) -> String {
    let mut shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    if names.len() > 5 {
        shown.push("…");
    }
    shown.join(", ")
}

/// The status for `outcome` and `observed`, keeping each condition's `lastTransitionTime`
/// from `previous` unless its status changed.
pub fn compute(
    outcome: &PolicyOutcome,
    observed: &Observed,
    previous: Option<&NodeApiPolicyStatus>,
    now: &Time,
) -> NodeApiPolicyStatus {
    let selected = outcome.nodes.len();
    let (rbac_ok, rbac_reason, rbac_message) = if !observed.foreign.is_empty() {
        (false, "ForeignObject", observed.foreign.join("; "))
    } else if !observed.errors.is_empty() {
        (false, "ApplyFailed", observed.errors.join("; "))
    } else if outcome.rbac_name.is_none() && observed.generated.service_accounts.is_empty() {
        (
            true,
            "NothingToGrant",
            "the policy grants only the read-only port, which needs no RBAC".to_string(),
        )
    } else {
        (
            true,
            "Applied",
            "RBAC and service accounts are in place".to_string(),
        )
    };
    let (agents_ok, agents_reason, agents_message) = if !observed.revoking.is_empty() {
        (
            false,
            "RevocationPending",
            format!(
                "{} node(s) the policy no longer selects may still enforce its earlier rules \
                 (their NodeAgentConfig is not yet written, or their agent has not confirmed \
                 it): {}",
                observed.revoking.len(),
                first_names(&observed.revoking)
            ),
        )
    } else if selected == 0 {
        (
            true,
            "NoNodes",
            "no node matches the node selector".to_string(),
        )
    } else if observed.agents_in_sync >= selected {
        (
            true,
            "InSync",
            format!("{selected}/{selected} agents enforce the policy"),
        )
    } else {
        (
            false,
            "Pending",
            format!(
                "{}/{selected} agents enforce the policy; waiting for {}",
                observed.agents_in_sync,
                first_names(&observed.agents_behind)
            ),
        )
    };
    let (ready, ready_reason, ready_message) = if !outcome.problems.is_empty() {
        (false, "InvalidSpec", outcome.problems.join("; "))
    } else if !rbac_ok {
        (false, rbac_reason, rbac_message.clone())
    } else if !agents_ok {
        (false, "AgentsPending", agents_message.clone())
    } else {
        (true, "Ready", "the policy is enforced".to_string())
    };
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: observed.generation,
            last_transition_time: since,
        }
    };
    NodeApiPolicyStatus {
        observed_generation: observed.generation,
        conditions: vec![
            condition(READY, ready, ready_reason, ready_message),
            condition(RBAC_APPLIED, rbac_ok, rbac_reason, rbac_message),
            condition(AGENTS_SYNCED, agents_ok, agents_reason, agents_message),
        ],
        matched_nodes: Some(i32::try_from(selected).unwrap_or(i32::MAX)),
        subject_count: Some(i32::try_from(outcome.subjects.len()).unwrap_or(i32::MAX)),
        agents_in_sync: Some(format!("{}/{selected}", observed.agents_in_sync)),
        generated: Some(observed.generated.clone()),
    }
}

/// Whether `new` must be written over `previous`: a condition changed (status, reason, or a
/// message that does not merely count agents), or what the status says about the spec
/// (generation, matched nodes, subjects, generated objects). Agents catching up one by one
/// change only the count of agents in sync: that is written with the next real change (at the
/// latest when the last agent catches up and AgentsSynced turns True), not on every round,
/// else 1,000 policies would be patched on every round while 500 agents load their configs.
pub fn needs_write(previous: Option<&NodeApiPolicyStatus>, new: &NodeApiPolicyStatus) -> bool {
    let Some(previous) = previous else {
        return true;
    };
    /// A condition as far as it decides a write.
    type Essential = (String, String, String, Option<String>, Option<i64>);
    let conditions = |s: &NodeApiPolicyStatus| -> Vec<Essential> {
        s.conditions
            .iter()
            .map(|c| {
                // The messages of agents pending only count and name agents.
                let counts_agents =
                    c.type_ == AGENTS_SYNCED || (c.type_ == READY && c.reason == "AgentsPending");
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    (!counts_agents).then(|| c.message.clone()),
                    c.observed_generation,
                )
            })
            .collect()
    };
    conditions(previous) != conditions(new)
        || previous.observed_generation != new.observed_generation
        || previous.matched_nodes != new.matched_nodes
        || previous.subject_count != new.subject_count
        || json(&previous.generated) != json(&new.generated)
}

/// As the API server gives it back: empty values absent.
fn json(value: &impl serde::Serialize) -> serde_json::Value {
    crate::controller::objects::strip_empty(
        serde_json::to_value(value).unwrap_or(serde_json::Value::Null),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn outcome(nodes: &[&str]) -> PolicyOutcome {
        PolicyOutcome {
            policy: "p".into(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            all_nodes: false,
            rbac_name: Some("nodegate:p".into()),
            problems: vec![],
            ..PolicyOutcome::default()
        }
    }

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn get<'a>(s: &'a NodeApiPolicyStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn all_in_sync_is_ready() {
        let o = Observed {
            generation: Some(3),
            agents_in_sync: 2,
            ..Default::default()
        };
        let s = compute(&outcome(&["n1", "n2"]), &o, None, &at(10));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(get(&s, READY).status, "True");
        assert_eq!(get(&s, AGENTS_SYNCED).reason, "InSync");
        assert_eq!(s.agents_in_sync.as_deref(), Some("2/2"));
        assert_eq!(s.matched_nodes, Some(2));
        assert_eq!(get(&s, READY).observed_generation, Some(3));
    }

    #[test]
    fn agents_behind_are_named_and_block_ready() {
        let o = Observed {
            agents_in_sync: 1,
            agents_behind: vec!["n2".into()],
            ..Default::default()
        };
        let s = compute(&outcome(&["n1", "n2"]), &o, None, &at(10));
        let c = get(&s, AGENTS_SYNCED);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Pending"));
        assert!(c.message.contains("1/2") && c.message.contains("n2"));
        assert_eq!(get(&s, READY).reason, "AgentsPending");
    }

    /// Every selected agent in sync is not enough: a node the policy just dropped may still
    /// enforce its earlier rules, and the policy says so until it does not.
    #[test]
    fn a_dropped_node_still_enforcing_blocks_ready() {
        let o = Observed {
            agents_in_sync: 1,
            revoking: vec!["n0".into()],
            ..Default::default()
        };
        let s = compute(&outcome(&["n1"]), &o, None, &at(10));
        let c = get(&s, AGENTS_SYNCED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "RevocationPending")
        );
        assert!(c.message.contains("n0"), "{}", c.message);
        assert_eq!(get(&s, READY).status, "False");
        // Also when it selects no node at all any more.
        let s = compute(&outcome(&[]), &o, None, &at(10));
        assert_eq!(get(&s, AGENTS_SYNCED).reason, "RevocationPending");
        let done = Observed {
            agents_in_sync: 1,
            ..Default::default()
        };
        let s = compute(&outcome(&["n1"]), &done, Some(&s), &at(20));
        assert_eq!(get(&s, READY).status, "True");
    }

    #[test]
    fn foreign_objects_are_named_in_rbac_applied_and_ready() {
        let o = Observed {
            foreign: vec!["ClusterRole nodegate:p exists and is not managed by nodegate".into()],
            ..Default::default()
        };
        let s = compute(&outcome(&[]), &o, None, &at(10));
        let c = get(&s, RBAC_APPLIED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ForeignObject")
        );
        assert!(c.message.contains("ClusterRole nodegate:p"));
        assert_eq!(get(&s, READY).reason, "ForeignObject");
        assert_eq!(get(&s, AGENTS_SYNCED).reason, "NoNodes");
    }

    #[test]
    fn problems_make_it_not_ready() {
        let mut out = outcome(&[]);
        out.problems
            .push("nodeSelector matches no node: bad".into());
        let s = compute(&out, &Observed::default(), None, &at(10));
        assert_eq!(get(&s, READY).reason, "InvalidSpec");
        assert_eq!(get(&s, RBAC_APPLIED).status, "True");
    }

    #[test]
    fn transition_time_moves_only_on_a_transition() {
        let first = compute(&outcome(&["n1"]), &Observed::default(), None, &at(10));
        assert_eq!(get(&first, AGENTS_SYNCED).status, "False");
        // Same status later: times kept, so the whole status is equal and no patch is sent.
        let again = compute(
            &outcome(&["n1"]),
            &Observed::default(),
            Some(&first),
            &at(20),
        );
        assert_eq!(again, first);
        let synced = Observed {
            agents_in_sync: 1,
            ..Default::default()
        };
        let later = compute(&outcome(&["n1"]), &synced, Some(&first), &at(30));
        assert_eq!(get(&later, AGENTS_SYNCED).last_transition_time, at(30));
        assert_eq!(get(&later, READY).last_transition_time, at(30));
        assert_eq!(get(&later, RBAC_APPLIED).last_transition_time, at(10));
    }

    #[test]
    fn agents_catching_up_are_written_only_when_the_answer_changes() {
        let o = |in_sync: usize, behind: &[&str]| Observed {
            generation: Some(1),
            agents_in_sync: in_sync,
            agents_behind: behind.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let nodes = outcome(&["n1", "n2", "n3"]);
        let first = compute(&nodes, &o(0, &["n1", "n2", "n3"]), None, &at(10));
        assert!(needs_write(None, &first));
        // One agent, then another, catch up: counts only.
        let one = compute(&nodes, &o(1, &["n2", "n3"]), Some(&first), &at(20));
        assert_ne!(one, first, "the count changed");
        assert!(!needs_write(Some(&first), &one));
        let two = compute(&nodes, &o(2, &["n3"]), Some(&first), &at(30));
        assert!(!needs_write(Some(&first), &two));
        // The last one: AgentsSynced and Ready turn True.
        let all = compute(&nodes, &o(3, &[]), Some(&first), &at(40));
        assert!(needs_write(Some(&first), &all));
        // A new generation, an error, a node more: written.
        let mut newer = o(3, &[]);
        newer.generation = Some(2);
        assert!(needs_write(
            Some(&all),
            &compute(&nodes, &newer, Some(&all), &at(50))
        ));
        let mut failing = o(3, &[]);
        failing.errors = vec!["ClusterRole nodegate:p: forbidden (403)".into()];
        let failed = compute(&nodes, &failing, Some(&all), &at(50));
        assert!(needs_write(Some(&all), &failed));
        failing.errors = vec!["ClusterRole nodegate:p: refused (422)".into()];
        assert!(needs_write(
            Some(&failed),
            &compute(&nodes, &failing, Some(&failed), &at(60))
        ));
        let more = outcome(&["n1", "n2", "n3", "n4"]);
        assert!(needs_write(
            Some(&all),
            &compute(&more, &o(3, &["n4"]), Some(&all), &at(50))
        ));
        // The same status again: nothing.
        assert!(!needs_write(
            Some(&all),
            &compute(&nodes, &o(3, &[]), Some(&all), &at(60))
        ));
    }
}
