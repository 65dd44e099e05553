//! nodegate-agent: serves the kubelet API on a node, authorizes by the node's compiled
//! NodeAgentConfig, proxies to the real kubelet and filters responses to the caller's namespaces.

pub mod prometheus;
pub mod authn;
pub mod config;
pub mod tls;
