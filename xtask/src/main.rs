//! `cargo xtask …`: the project's automation, in Rust so it runs wherever cargo does.

mod bench;
mod cluster;
mod demo;
mod generate;
mod helm;
mod image;
mod metrics_server;
mod prometheus;
mod scale;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "nodegate project automation",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the generated files from the Rust API types: the CRD YAML (crds/, the Helm chart's and
    /// config/crd/ copies) and docs/endpoints.md.
    Generate {
        /// Do not write; fail if a committed generated file differs from a fresh generation.
        #[arg(long)]
        check: bool,
    },
    /// Run everything CI runs: fmt, clippy, the generated-files check, unit and integration tests.
    Test(test::Args),
    /// Build (once, cached) and run a local Kubernetes control plane on loopback and two real nodes
    /// (node-1 with kubelet 1.37 on the host, node-2 with kubelet 1.35 in its own network namespace).
    Cluster(cluster::Args),
    /// Measure the agent side by side with kubelet-sim, a Go reverse proxy and the local
    /// cluster's kubelet with hey (not run in CI; see docs/BENCHMARKS.md).
    Bench(bench::Args),
    /// The operator's scale test at full size (1,000 policies × 500 heartbeating nodes × 200
    /// namespaces) against the installed chart, its image and its limits (see
    /// docs/BENCHMARKS.md); `--reduced` for the size `cargo xtask test` runs.
    Scale(scale::Args),
    /// Build the operator and agent images (binary + its shared libraries only) and import them
    /// into the local cluster's containerd.
    Image(image::Args),
    /// Run helm, built once from its Go module and cached: `cargo xtask helm -- version`.
    Helm(helm::Args),
    /// Build (once, cached) Prometheus 3 from its Go module, for the test that discovers the nodes
    /// with kubernetes_sd_configs (Debian's Prometheus lacks it); `--path` prints where it is.
    Prometheus(prometheus::Args),
    /// Build metrics-server (once, cached from the Go module proxy) and print its path.
    MetricsServer,
    /// The whole system on the local cluster: cluster, images, chart, a sample policy, and five
    /// real requests showing what is allowed, filtered and refused (`--down` removes it).
    Demo(demo::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate { check } => generate::run(check),
        Command::Test(args) => test::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Scale(args) => scale::run(args),
        Command::Image(args) => image::run(args),
        Command::Helm(args) => helm::run(args),
        Command::Prometheus(args) => prometheus::run(args),
        Command::MetricsServer => {
            println!("{}", metrics_server::ensure()?.display());
            Ok(())
        }
        Command::Demo(args) => demo::run(args),
    }
}

/// The workspace root, so xtask works from any directory cargo was called in.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}
