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
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )
    })?;
    step("generated files", || crate::generate::run(true))?;
    let env = if args.no_cluster {
        vec![("NODEGATE_SKIP_CLUSTER".to_string(), "1".to_string())]
    } else {
        let mut env = step("local cluster", crate::cluster::ensure_up)?;
        // The chart tests install the chart with this helm and these images (imported into the
        // cluster's containerd, so no registry is involved).
        let helm = step("helm", crate::helm::ensure)?;
        step("no demo installed", || {
            crate::demo::remove_if_installed(env.clone(), &helm)
        })?;
        env.push(("NODEGATE_HELM".into(), helm.display().to_string()));
        let images = step("images", crate::image::build_and_import)?;
        env.extend(images.env());
        env
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let counts = step("cargo test", || {
        cargo_test(&["test", "--workspace", "--no-fail-fast"], &env)
    })?;
    println!(
        "xtask test: all steps passed in {:.0?} ({})",
        started.elapsed(),
        root.display()
    );
    // One closing line with the whole count, rather than the last crate's (often a doc-test
    // run with 0 tests).
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
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

#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs `cargo test`, passing its output through, and adds up libtest's `test result:` lines.
fn cargo_test(args: &[&str], env: &[(&str, &str)]) -> Result<Counts> {
    use std::io::{BufRead, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(crate::workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let mut counts = Counts::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let number = |label: &str| {
                    rest.split(';')
                        .find_map(|part| part.trim().strip_suffix(label))
                        .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                counts.passed += number(" passed");
                counts.failed += number(" failed");
                counts.ignored += number(" ignored");
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "cargo {} exited with {status} ({} passed, {} failed)",
            args.join(" "),
            counts.passed,
            counts.failed
        );
    }
    Ok(counts)
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
