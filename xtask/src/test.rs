//! `cargo xtask test`: everything CI runs, in the order that fails fastest.

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
pub struct Args {
    /// Skip the tests that need the local cluster (unit tests, lints and checks only).
    #[arg(long)]
    pub no_cluster: bool,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let root = crate::workspace_root();
    step("cargo fmt --check", || {
        cargo(&["fmt", "--all", "--", "--check"], &[])
    })?;
    step("cargo clippy", || {
        cargo(
            &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"],
            &[],
        )
    })?;
    step("generated files", || crate::generate::run(true))?;
    let env = if args.no_cluster {
        vec![("NODEGATE_SKIP_CLUSTER".to_string(), "1".to_string())]
    } else {
        step("local cluster", crate::cluster::ensure_up)?
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    step("cargo test", || {
        cargo(&["test", "--workspace", "--no-fail-fast"], &env)
    })?;
    println!(
        "xtask test: all steps passed in {:.0?} ({})",
        started.elapsed(),
        root.display()
    );
    Ok(())
}

fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    println!("==> {name}");
    let out = f().with_context(|| format!("step `{name}` failed"))?;
    println!("<== {name} ({:.1?})", started.elapsed());
    Ok(out)
}

fn cargo(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(crate::workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} exited with {status}", args.join(" "));
    }
    Ok(())
}
