//! A kubelet simulator for deterministic agent tests and benchmarks.
