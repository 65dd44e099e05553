//! nodegate-agent: serves the kubelet API on a node, authorizes by the node's compiled
//! NodeAgentConfig, proxies to the real kubelet and filters responses to the caller's namespaces.

pub mod audit;
pub mod authn;
pub mod authz;
pub mod components;
pub mod config;
pub mod connection;
pub mod explain;
pub mod json_filter;
pub mod kubelet_access;
pub mod memory_budget;
pub mod metrics;
pub mod prometheus;
pub mod server;
pub mod serving_cert;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod webhook;

/// The counted-skip protocol of `nodegate-tests` (std only), for unit tests that read the shared
/// fixtures: a dependency on that crate would be a cycle.
#[cfg(test)]
#[path = "../../tests/src/skip.rs"]
#[allow(dead_code)] // the cluster classes are for nodegate-tests
mod test_skip;
