//! What the agent's own kubelet credential may do, as the installation granted it.
//!
//! RBAC cannot bind a DaemonSet's one service account to the pod's own node, so whatever the
//! agent's credential holds, a thief holds on every node. The chart therefore grants only the
//! kubelet's fine-grained subresources by default, and `nodes/proxy` (exec, attach,
//! portForward, run, containerLogs, pprof) or `nodes/checkpoint` only when the installation
//! opts in. The agent is told which (`--kubelet-access`), so a request its credential cannot
//! make is refused here, with the reason, instead of being sent to a kubelet that would answer
//! with a 403 naming the agent.

use nodegate_crds::{Endpoint, Subresource};
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// The kubelet subresources of `nodes` the agent's credential is granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeletAccess(BTreeSet<Subresource>);

/// The chart's default grant: the fine-grained subresources the kubelet checks since 1.33,
/// no `nodes/proxy` and no `nodes/checkpoint`.
pub const DEFAULT_FLAG: &str = "healthz,pods,stats,metrics,configz,statusz,log";

const ALL: [Subresource; 9] = [
    Subresource::Proxy,
    Subresource::Stats,
    Subresource::Metrics,
    Subresource::Log,
    Subresource::Checkpoint,
    Subresource::Pods,
    Subresource::Healthz,
    Subresource::Configz,
    Subresource::Statusz,
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown kubelet subresource {0:?} (known: {known})", known = ALL.map(|s| s.as_str()).join(", "))]
pub struct UnknownSubresource(String);

impl KubeletAccess {
    /// Every subresource: a credential such as the API server's kubelet client certificate.
    pub fn all() -> Self {
        KubeletAccess(ALL.into_iter().collect())
    }

    /// The chart's default (see [`DEFAULT_FLAG`]).
    pub fn fine_grained() -> Self {
        KubeletAccess(
            ALL.into_iter()
                .filter(|s| !matches!(s, Subresource::Proxy | Subresource::Checkpoint))
                .collect(),
        )
    }

    pub fn contains(&self, subresource: Subresource) -> bool {
        self.0.contains(&subresource)
    }

    /// Whether the kubelet would let the agent's credential call `endpoint`: it tries the
    /// endpoint's subresources in order and allows on the first that is granted. When it
    /// cannot, the subresource to grant (the last the kubelet tries, `proxy` for most).
    pub fn reaches(&self, endpoint: Endpoint) -> Result<(), Subresource> {
        let tried = endpoint.spec().subresources;
        if tried.iter().any(|s| self.contains(*s)) {
            return Ok(());
        }
        Err(tried.last().copied().unwrap_or(Subresource::Proxy))
    }
}

impl Default for KubeletAccess {
    fn default() -> Self {
        Self::all()
    }
}

impl FromStr for KubeletAccess {
    type Err = UnknownSubresource;

    /// A comma-separated list of subresource names (`proxy`, `metrics`, …); blanks ignored.
    fn from_str(flag: &str) -> Result<Self, Self::Err> {
        flag.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| {
                ALL.into_iter()
                    .find(|s| s.as_str() == name)
                    .ok_or_else(|| UnknownSubresource(name.to_string()))
            })
            .collect::<Result<BTreeSet<_>, _>>()
            .map(KubeletAccess)
    }
}

impl fmt::Display for KubeletAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|s| s.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

/// The chart value that grants `subresource` to the agent, for refusal messages.
pub fn chart_value(subresource: Subresource) -> &'static str {
    match subresource {
        Subresource::Proxy => "agent.kubeletAccess.proxy",
        Subresource::Checkpoint => "agent.kubeletAccess.checkpoint",
        _ => "agent.kubeletAccess",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_flag_is_the_fine_grained_set() {
        assert_eq!(
            DEFAULT_FLAG.parse::<KubeletAccess>(),
            Ok(KubeletAccess::fine_grained())
        );
        let fine = KubeletAccess::fine_grained();
        assert!(!fine.contains(Subresource::Proxy));
        assert!(!fine.contains(Subresource::Checkpoint));
    }

    #[test]
    fn streaming_logs_and_debug_need_proxy_and_reads_do_not() {
        let fine = KubeletAccess::fine_grained();
        for e in [
            Endpoint::Exec,
            Endpoint::Attach,
            Endpoint::PortForward,
            Endpoint::Run,
            Endpoint::ContainerLogs,
            Endpoint::Pprof,
            Endpoint::DebugFlags,
        ] {
            assert_eq!(fine.reaches(e), Err(Subresource::Proxy), "{e}");
        }
        assert_eq!(
            fine.reaches(Endpoint::Checkpoint),
            Err(Subresource::Checkpoint)
        );
        for e in [
            Endpoint::Healthz,
            Endpoint::Pods,
            Endpoint::RunningPods,
            Endpoint::Stats,
            Endpoint::Metrics,
            Endpoint::Cadvisor,
            Endpoint::Resource,
            Endpoint::Probes,
            Endpoint::Slis,
            Endpoint::Configz,
            Endpoint::Statusz,
            Endpoint::Flagz,
            Endpoint::Logs,
        ] {
            assert_eq!(fine.reaches(e), Ok(()), "{e}");
        }
        let all = KubeletAccess::all();
        // Component endpoints never go to the kubelet: its credential is not asked about them.
        assert!(Endpoint::kubelet().all(|e| all.reaches(e).is_ok()));
    }

    #[test]
    fn unknown_names_are_refused_and_blanks_ignored() {
        assert!("metrics,nodes/proxy".parse::<KubeletAccess>().is_err());
        assert_eq!(
            " proxy , ,metrics"
                .parse::<KubeletAccess>()
                .map(|a| a.to_string()),
            Ok("proxy,metrics".to_string())
        );
    }
}
