//! nodegate-operator: turns NodeApiPolicies into RBAC, service accounts and per-node agent
//! configuration. The [`compiler`] (its own crate, which the agent shares) decides; the
//! controller reads the cluster and applies.

pub use nodegate_compiler as compiler;
pub mod controller;
pub mod render;
pub mod signer;
