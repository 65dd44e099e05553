//! `cargo xtask scale`: the operator's scale test at the size the project claims, against the
//! installed chart (tests/tests/operator_scale.rs with `NODEGATE_SCALE=full`): 1,000 policies ×
//! 500 heartbeating nodes × 200 namespaces. `cargo xtask test` runs the same test reduced
//! (200 × 100 × 40). Figures in docs/BENCHMARKS.md.

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::process::Command;

#[derive(Parser)]
pub struct Args {
    /// The reduced shape (200 policies × 100 nodes × 40 namespaces), as `cargo xtask test`
    /// runs it.
    #[arg(long, conflicts_with = "shape")]
    pub reduced: bool,
    /// Another size, as policies x nodes x namespaces (e.g. `500x250x100`).
    #[arg(long)]
    pub shape: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let mut env = crate::cluster::ensure_up()?;
    let helm = crate::helm::ensure()?;
    crate::demo::remove_if_installed(env.clone(), &helm)?;
    env.push(("NODEGATE_HELM".into(), helm.display().to_string()));
    let images = crate::image::build_and_import()?;
    env.extend(images.env());
    match (args.reduced, args.shape) {
        (true, _) => {}
        (false, Some(shape)) => env.push(("NODEGATE_SCALE".into(), shape)),
        (false, None) => env.push(("NODEGATE_SCALE".into(), "full".into())),
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let test = [
        "test",
        "-p",
        "nodegate-tests",
        "--test",
        "operator_scale",
        "--",
        "--nocapture",
    ];
    let status = Command::new(cargo)
        .args(test)
        .envs(env)
        .current_dir(crate::workspace_root())
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("cargo {} exited with {status}", test.join(" "));
    }
    Ok(())
}
