//! `cargo xtask test`: everything CI runs, in the order that fails fastest.

use anyhow::{Context, Result, bail};
use clap::Parser;
use skip::{Counts, Tally};
use std::process::Command;
use std::time::Instant;

/// The counted-skip protocol, reader and writer in one file (std only) shared with the tests.
#[path = "../../tests/src/skip.rs"]
#[allow(dead_code)] // the writing half is for the tests
mod skip;

#[derive(Parser)]
pub struct Args {
    /// Skip the tests that need a cluster (sets NODEGATE_SKIP_CLUSTER=1): they are counted as
    /// skipped in the closing line. Without it, a cluster that cannot be started fails the run.
    #[arg(long)]
    pub no_cluster: bool,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let root = crate::workspace_root();
    step("cargo fmt --check", || {
        cargo(&["fmt", "--all", "--", "--check"], &[])
    })?;
    // On a cold machine the Go side (Kubernetes twice, helm, Prometheus, metrics-server: 22
    // minutes of `go build` measured) and the Rust side (clippy, the release images, the test
    // binaries) each leave a core idle for minutes (linking, one crate or package waiting for
    // another): run side by side they fill each other's gaps. Warm, the Go side takes seconds.
    let go_side = (!args.no_cluster).then(|| std::thread::spawn(go_side));
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
    let archives = if go_side.is_some() {
        Some(step("images (build)", crate::image::build_archives)?)
    } else {
        None
    };
    // Cargo builds a package's binaries only for that package's own integration tests; the
    // tests that run the operator or the agent as a process (to SIGKILL it, to measure it)
    // find them beside their own executable (`nodegate_tests::binaries`).
    step("binaries", || {
        cargo(
            &[
                "build",
                "-p",
                "nodegate-operator",
                "-p",
                "nodegate-agent",
                "--bins",
            ],
            &[],
        )
    })?;
    step("test build", || {
        cargo(&["test", "--workspace", "--no-run"], &[])
    })?;
    let env = match go_side.zip(archives) {
        Some((go_side, archives)) => {
            let mut env = step("waiting for the Go side", || {
                go_side
                    .join()
                    .map_err(|_| anyhow::anyhow!("the Go side panicked"))?
            })?;
            let images = step("images (import)", || crate::image::import(archives))?;
            env.extend(images.env());
            env
        }
        None => vec![("NODEGATE_SKIP_CLUSTER".to_string(), "1".to_string())],
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
    // `skipped`: `#[ignore]`d tests and tests that recorded a skip because the run asked to skip
    // their class (`--no-cluster`); a test that lacks what it needs otherwise fails.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.skipped
    );
    Ok(())
}

/// The cluster up and the tools the tests run, built from the Go module proxy on first use;
/// returns the tests' environment for them. Its steps are marked `[go]`: they print between
/// the Rust side's.
fn go_side() -> Result<Vec<(String, String)>> {
    let mut env = step("[go] local cluster", crate::cluster::ensure_up)?;
    // The chart tests install the chart with this helm and these images (imported into the
    // cluster's containerd, so no registry is involved).
    let helm = step("[go] helm", crate::helm::ensure)?;
    step("[go] no demo installed", || {
        crate::demo::remove_if_installed(env.clone(), &helm)
    })?;
    env.push(("NODEGATE_HELM".into(), helm.display().to_string()));
    // Prometheus 3 with Kubernetes service discovery, for tests/tests/two_nodes.rs.
    let prometheus = step("[go] prometheus", crate::prometheus::ensure)?;
    env.push((
        "NODEGATE_PROMETHEUS_K8S_SD".into(),
        prometheus.display().to_string(),
    ));
    // agent_serving_cert runs metrics-server against the agent.
    let metrics_server = step("[go] metrics-server", crate::metrics_server::ensure)?;
    env.push((
        "NODEGATE_METRICS_SERVER".into(),
        metrics_server.display().to_string(),
    ));
    Ok(env)
}

fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    println!("==> {name}");
    let out = f().with_context(|| format!("step `{name}` failed"))?;
    println!("<== {name} ({:.1?})", started.elapsed());
    Ok(out)
}

/// Runs `cargo test`, passing its output through, adds up libtest's `test result:` lines, and
/// counts the skips the tests recorded in a log named by `NODEGATE_SKIP_LOG`.
fn cargo_test(args: &[&str], env: &[(&str, &str)]) -> Result<Counts> {
    use std::io::{BufRead, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let log = crate::workspace_root()
        .join("target")
        .join(format!("test-skips-{}.log", std::process::id()));
    std::fs::create_dir_all(log.parent().unwrap_or(&log))?;
    std::fs::write(&log, "").with_context(|| format!("creating {}", log.display()))?;
    // One pipe for stdout and stderr: cargo's `Running` lines (stderr) stay in order with the
    // test binaries' result lines (stdout).
    let (reader, writer) = std::io::pipe()?;
    let mut child = Command::new(cargo)
        .args(args)
        .envs(env.iter().copied())
        .env("NODEGATE_SKIP_LOG", &log)
        .current_dir(crate::workspace_root())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let mut tally = Tally::default();
    for line in BufReader::new(reader).lines() {
        let line = line?;
        println!("{line}");
        tally.line(&line);
    }
    let status = child.wait()?;
    let recorded =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let _ = std::fs::remove_file(&log);
    let (counts, unmatched) = tally.counts(&recorded);
    if !status.success() {
        bail!(
            "cargo {} exited with {status} ({} passed, {} failed, {} skipped)",
            args.join(" "),
            counts.passed,
            counts.failed,
            counts.skipped
        );
    }
    if !unmatched.is_empty() {
        bail!(
            "{} recorded skip(s) name no test that passed, so the counts cannot be told:\n{}",
            unmatched.len(),
            unmatched.join("\n")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like `cargo test`'s stdout and stderr in one stream (a unit test binary with a
    /// should-panic test, two integration test binaries sharing a test name, a doc-test run).
    const OUTPUT: &str = "\
   Compiling nodegate-tests v0.1.0 (/work/nodegate/tests)
    Finished `test` profile [unoptimized + debuginfo] target(s) in 1.00s
     Running unittests src/lib.rs (target/debug/deps/nodegate_tests-aaaa)

running 2 tests
test skip::tests::it_works ... ok
test sim::tests::refuses - should panic ... ok

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

     Running tests/cluster.rs (target/debug/deps/cluster-bbbb)

running 3 tests
test the_api_server_answers ... ok
test nodes_are_ready ... ok
test slow_one ... ignored

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/sim.rs (target/debug/deps/sim-cccc)

running 3 tests
test the_api_server_answers ... ok
test cadvisor_is_shaped_like_the_capture ... FAILED
test streaming_matches_the_real_kubelet ... ok

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

   Doc-tests nodegate_crds

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";

    fn tally() -> Tally {
        let mut tally = Tally::default();
        for line in OUTPUT.lines() {
            tally.line(line);
        }
        tally
    }

    #[test]
    fn without_skips_the_counts_are_libtests() {
        let (counts, unmatched) = tally().counts("");
        assert_eq!(
            counts,
            Counts {
                passed: 6,
                failed: 1,
                skipped: 1
            }
        );
        assert!(unmatched.is_empty());
    }

    #[test]
    fn recorded_skips_move_from_passed_to_skipped_per_binary() {
        // The same test name in two binaries: only the recording binary's test is a skip; a
        // test that records twice (helm and cluster) counts once.
        let log = "\
cluster-bbbb\tthe_api_server_answers\tcluster\tNODEGATE_SKIP_CLUSTER=1
cluster-bbbb\tnodes_are_ready\tcluster\tNODEGATE_SKIP_CLUSTER=1
cluster-bbbb\tnodes_are_ready\tcluster\tno helm
sim-cccc\tstreaming_matches_the_real_kubelet\tlocal-cluster\tnot the local cluster
nodegate_tests-aaaa\tsim::tests::refuses\tprovided-by-ci\tno captures
";
        let (counts, unmatched) = tally().counts(log);
        assert_eq!(
            counts,
            Counts {
                passed: 2,
                failed: 1,
                skipped: 5
            }
        );
        assert!(unmatched.is_empty(), "{unmatched:?}");
    }

    #[test]
    fn a_skip_that_names_no_passing_test_is_not_counted_but_reported() {
        let log = "\
sim-cccc\tcadvisor_is_shaped_like_the_capture\tprovided-by-ci\tabsent
cluster-zzzz\tthe_api_server_answers\tcluster\tstale binary
";
        let (counts, unmatched) = tally().counts(log);
        assert_eq!(
            counts,
            Counts {
                passed: 6,
                failed: 1,
                skipped: 1
            }
        );
        assert_eq!(unmatched.len(), 2);
    }
}
