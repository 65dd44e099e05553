//! nodegate-operator: turns NodeApiPolicies into RBAC, service accounts and per-node agent
//! configuration. [`compiler`] decides; the controller (next) reads the cluster and applies.

pub mod compiler;
pub mod controller;
pub mod render;
