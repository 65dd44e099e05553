//! What a leader tells its successor about its rounds, on the Lease it renews: whether a round
//! (or the start of its term) was under way when it last renewed, and how many leaders in a row
//! have ended that way.
//!
//! Why: an operator killed in every round (OOM in its first compile, a panic) never writes a
//! status, so every policy goes on saying what the last finished round wrote while nothing is
//! reconciled, and no grant is revoked. Only the Lease outlives such a leader. The next leader
//! reads it when it takes over: it exports the count (`nodegate_operator_unfinished_rounds`), and
//! from [`REPEATED`] in a row it marks every policy not Ready (reason `OperatorRestarting`)
//! before it starts its own round, which is where its predecessors died; a round that finishes
//! writes the true status again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::sync::{Arc, Mutex};

/// `running` while a leader has not finished its first round or is in one; `idle` between
/// rounds.
pub const ROUND_ANNOTATION: &str = "nodegate.io/round";
/// How many leaders in a row before this one ended with a round under way.
pub const UNFINISHED_ANNOTATION: &str = "nodegate.io/unfinished-rounds";
/// From this many unfinished terms in a row, policies are told (one is an ordinary restart or
/// rollout that happened to land in a round).
pub const REPEATED: u32 = 2;

/// Shared by the elector (which writes it on the Lease) and the reconcile loop (which moves it).
#[derive(Clone, Debug, Default)]
pub struct Progress {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    in_round: bool,
    finished_one: bool,
    inherited: u32,
}

impl State {
    fn unfinished(&self) -> u32 {
        if self.finished_one { 0 } else { self.inherited }
    }
}

impl Progress {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A poisoned lock only means a panic elsewhere held it; the counters stay usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }

    pub fn round_started(&self) {
        self.with(|s| s.in_round = true);
    }

    pub fn round_finished(&self) {
        self.with(|s| {
            s.in_round = false;
            s.finished_one = true;
        });
    }

    /// Unfinished terms in a row before this one, as read when it took the lease; 0 once this
    /// leader has finished a round.
    pub fn unfinished(&self) -> u32 {
        self.with(|s| s.unfinished())
    }

    /// Takes over from the Lease's previous record (`previous`: its annotations as read):
    /// one more unfinished term if its holder had a round under way, else none.
    pub fn take_over(&self, previous: &ObjectMeta) -> u32 {
        let annotations = previous.annotations.as_ref();
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        let inherited = match get(ROUND_ANNOTATION) {
            Some("running") => get(UNFINISHED_ANNOTATION)
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0)
                .saturating_add(1),
            _ => 0,
        };
        self.with(|s| {
            *s = State {
                inherited,
                ..State::default()
            }
        });
        inherited
    }

    /// Writes this leader's record into the Lease's annotations.
    pub fn annotate(&self, meta: &mut ObjectMeta) {
        let (round, unfinished) = self.with(|s| {
            let round = if s.in_round || !s.finished_one {
                "running"
            } else {
                "idle"
            };
            (round, s.unfinished())
        });
        let annotations = meta.annotations.get_or_insert_with(Default::default);
        annotations.insert(ROUND_ANNOTATION.into(), round.into());
        annotations.insert(UNFINISHED_ANNOTATION.into(), unfinished.to_string());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta(round: &str, unfinished: &str) -> ObjectMeta {
        ObjectMeta {
            annotations: Some(BTreeMap::from([
                (ROUND_ANNOTATION.to_string(), round.to_string()),
                (UNFINISHED_ANNOTATION.to_string(), unfinished.to_string()),
            ])),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_predecessor_that_died_in_a_round_adds_one_and_a_finished_round_clears_it() {
        let p = Progress::default();
        assert_eq!(p.take_over(&meta("running", "1")), 2);
        assert_eq!(p.unfinished(), 2);
        // Until this leader finishes a round, it passes the count on (and is itself running).
        let mut lease = ObjectMeta::default();
        p.annotate(&mut lease);
        assert_eq!(lease, meta("running", "2"));
        p.round_started();
        p.round_finished();
        assert_eq!(p.unfinished(), 0);
        p.annotate(&mut lease);
        assert_eq!(lease, meta("idle", "0"));
        p.round_started();
        p.annotate(&mut lease);
        assert_eq!(lease, meta("running", "0"));
    }

    #[test]
    fn an_idle_or_unknown_predecessor_counts_nothing() {
        let p = Progress::default();
        assert_eq!(p.take_over(&meta("idle", "5")), 0);
        assert_eq!(p.take_over(&ObjectMeta::default()), 0);
        assert_eq!(p.take_over(&meta("running", "junk")), 1);
    }
}
