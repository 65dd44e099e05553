//! Throughput of the Prometheus text filter (filled in below).
fn main() {}
