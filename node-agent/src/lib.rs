//! nodegate-agent: serves the kubelet API on a node, authorizes by the node's compiled
//! NodeAgentConfig, proxies to the real kubelet and filters responses to the caller's namespaces.

pub mod prometheus;
pub mod authn;
pub mod config;
pub mod tls;
pub mod audit;
pub mod authz;
pub mod json_filter;
pub mod metrics;
pub mod spec;
pub mod upstream;
pub mod server;
pub mod upgrade;
pub mod webhook;
pub mod explain;
