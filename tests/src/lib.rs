//! End-to-end test support for nodegate.
//!
//! [`cluster`] finds (or starts) the local Kubernetes cluster of `cargo xtask cluster`, or any
//! cluster `KUBECONFIG` points at, and gives tests clients and self-cleaning test objects.
//! [`skip`] is how a test that lacks what it needs fails, or (only when the run asked) is counted
//! as skipped instead of passing.

pub mod binaries;
pub mod cluster;
pub mod configs;
pub mod sim;
pub mod skip;

pub use cluster::{Cluster, Error, FakeNodes, TestNamespace};
