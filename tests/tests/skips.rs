//! Tests never pass by skipping: the counted-skip mechanism of `nodegate_tests::skip`, end to end.
//!
//! The first two tests are ordinary cluster tests. The others run them again in a child process
//! (this same test binary, `--exact`), each with a cluster location of its own in the child's
//! environment, and read the child's libtest result and skip log: asked to skip, the test is `ok`
//! and recorded once (xtask then counts it as skipped); with a cluster location that leads
//! nowhere, or nothing configured and no Go, it fails and says how to get a cluster. None of them
//! needs the cluster itself, so they also run (and prove the mechanism) under `--no-cluster`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nodegate_tests::Cluster;
use nodegate_tests::cluster::unique_name;
use nodegate_tests::skip::{Class, Counts, Tally, log_line};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test]
async fn needs_the_cluster() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let version = cluster.admin()?.apiserver_version().await?;
    assert!(!version.git_version.is_empty());
    Ok(())
}

#[tokio::test]
async fn needs_the_local_cluster() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let Some(state) = cluster.local_state_dir()? else {
        return Ok(());
    };
    assert!(state.join("admin.kubeconfig").is_file());
    Ok(())
}

/// Every variable that decides where the cluster is or whether to skip, removed from the child's
/// environment so that only what a test sets counts.
const DECIDING: [&str; 6] = [
    "NODEGATE_SKIP_CLUSTER",
    "NODEGATE_SKIP_LOCAL_CLUSTER",
    "NODEGATE_CLUSTER_DIR",
    "KUBECONFIG",
    "CI",
    "NODEGATE_SKIP_LOG",
];

/// A scratch dir, removed when dropped.
struct Scratch(PathBuf);
impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("nodegate-skips"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.0.join("skips.log")).unwrap_or_default()
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs test `name` of this binary alone, with `env` on top of an environment cleared of
/// [`DECIDING`], logging skips into `scratch`. Returns the output and its stdout+stderr text.
fn run_alone(name: &str, scratch: &Scratch, env: &[(&str, &Path)]) -> (Output, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--test-threads=1"]);
    for key in DECIDING {
        cmd.env_remove(key);
    }
    cmd.env("NODEGATE_SKIP_LOG", scratch.0.join("skips.log"));
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn this_binary() -> String {
    std::env::current_exe()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A syntactically valid kubeconfig for a server nobody answers on: enough for `Cluster::get`,
/// which reads it but calls nothing.
fn kubeconfig_nobody_answers(scratch: &Scratch) -> PathBuf {
    let path = scratch.0.join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
         clusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n\
         users: [{name: u, user: {token: t}}]\n\
         contexts: [{name: c, context: {cluster: c, user: u}}]\n",
    )
    .unwrap();
    path
}

#[test]
fn asked_to_skip_a_cluster_test_passes_in_libtest_and_records_one_counted_skip() {
    let scratch = Scratch::new();
    let one = Path::new("1");
    let (out, text) = run_alone(
        "needs_the_cluster",
        &scratch,
        &[("NODEGATE_SKIP_CLUSTER", one)],
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("test needs_the_cluster ... ok"), "{text}");
    let log = scratch.log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    let fields: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(
        fields[..3],
        [this_binary().as_str(), "needs_the_cluster", "cluster"],
        "{log}"
    );
}

/// The whole path of a `--no-cluster` run: the test binary's real libtest output (behind the
/// `Running` line cargo prints for it) and its skip log, counted by xtask's reader.
#[test]
fn asked_to_skip_the_cluster_tests_are_counted_skipped_and_the_others_passed() {
    let scratch = Scratch::new();
    let one = Path::new("1");
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "needs_the_cluster",
        "needs_the_local_cluster",
        "what_ci_provides_is_a_skip_outside_ci_only",
    ]);
    for key in DECIDING {
        cmd.env_remove(key);
    }
    let out = cmd
        .env("NODEGATE_SKIP_LOG", scratch.0.join("skips.log"))
        .env("NODEGATE_SKIP_CLUSTER", one)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let mut tally = Tally::default();
    tally.line(&format!(
        "     Running tests/skips.rs (target/debug/deps/{})",
        this_binary()
    ));
    for line in stdout.lines() {
        tally.line(line);
    }
    let (counts, unmatched) = tally.counts(&scratch.log());
    assert_eq!(
        counts,
        Counts {
            passed: 1,
            failed: 0,
            skipped: 2
        },
        "{stdout}\n{}",
        scratch.log()
    );
    assert!(unmatched.is_empty(), "{unmatched:?}");
}

#[test]
fn a_cluster_dir_without_a_cluster_fails_the_test_and_says_how_to_get_one() {
    let scratch = Scratch::new();
    let missing = scratch.0.join("no-such-state-dir");
    let (out, text) = run_alone(
        "needs_the_cluster",
        &scratch,
        &[("NODEGATE_CLUSTER_DIR", &missing)],
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("test needs_the_cluster ... FAILED"), "{text}");
    assert!(text.contains("NODEGATE_CLUSTER_DIR points at"), "{text}");
    assert!(text.contains("cargo xtask cluster up"), "{text}");
    assert!(text.contains("NODEGATE_SKIP_CLUSTER=1"), "{text}");
    assert_eq!(scratch.log(), "");
}

#[test]
fn nothing_configured_and_no_go_fails_the_test_instead_of_skipping() {
    let scratch = Scratch::new();
    // A PATH with nothing on it: no `go`, so the harness cannot build the local cluster.
    let empty = scratch.0.join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let (out, text) = run_alone("needs_the_cluster", &scratch, &[("PATH", &empty)]);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("test needs_the_cluster ... FAILED"), "{text}");
    assert!(text.contains("no Go to build the local cluster"), "{text}");
    assert_eq!(scratch.log(), "");
}

#[test]
fn a_kubeconfig_cluster_fails_a_local_cluster_test_unless_that_class_is_skipped() {
    let scratch = Scratch::new();
    let kubeconfig = kubeconfig_nobody_answers(&scratch);
    let (out, text) = run_alone(
        "needs_the_local_cluster",
        &scratch,
        &[("KUBECONFIG", &kubeconfig)],
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("needs the local cluster of `cargo xtask cluster`"),
        "{text}"
    );
    assert!(text.contains("NODEGATE_SKIP_LOCAL_CLUSTER=1"), "{text}");
    assert_eq!(scratch.log(), "");

    let (out, text) = run_alone(
        "needs_the_local_cluster",
        &scratch,
        &[
            ("KUBECONFIG", &kubeconfig),
            ("NODEGATE_SKIP_LOCAL_CLUSTER", Path::new("1")),
        ],
    );
    assert!(out.status.success(), "{text}");
    let log = scratch.log();
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(
        log.starts_with(&format!(
            "{}\tneeds_the_local_cluster\tlocal-cluster\t",
            this_binary()
        )),
        "{log}"
    );
}

// The decisions and the log format, as pure functions.

fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |key| {
        vars.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn only_an_explicit_request_skips_cluster_tests() {
    assert!(!Class::Cluster.may_skip(env(&[])));
    assert!(!Class::Cluster.may_skip(env(&[("NODEGATE_SKIP_CLUSTER", "0")])));
    assert!(!Class::Cluster.may_skip(env(&[("NODEGATE_SKIP_LOCAL_CLUSTER", "1")])));
    assert!(Class::Cluster.may_skip(env(&[("NODEGATE_SKIP_CLUSTER", "1")])));
    assert!(!Class::LocalCluster.may_skip(env(&[])));
    assert!(Class::LocalCluster.may_skip(env(&[("NODEGATE_SKIP_CLUSTER", "1")])));
    assert!(Class::LocalCluster.may_skip(env(&[("NODEGATE_SKIP_LOCAL_CLUSTER", "1")])));
}

#[test]
fn what_ci_provides_is_a_skip_outside_ci_only() {
    assert!(Class::ProvidedByCi.may_skip(env(&[])));
    assert!(Class::ProvidedByCi.may_skip(env(&[("CI", "")])));
    assert!(!Class::ProvidedByCi.may_skip(env(&[("CI", "true")])));
    // Asking to skip the cluster does not excuse missing fixtures in CI.
    assert!(!Class::ProvidedByCi.may_skip(env(&[("CI", "1"), ("NODEGATE_SKIP_CLUSTER", "1")])));
}

#[test]
fn a_log_line_has_four_tab_separated_fields_whatever_the_reason_says() {
    let line = log_line("sim-0a1b", "a_test", Class::Cluster, "no\thelm\n(at all)");
    assert_eq!(line, "sim-0a1b\ta_test\tcluster\tno helm (at all)\n");
}
