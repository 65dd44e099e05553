//! Skips that are counted, never passes.
//!
//! libtest cannot skip a test at run time: a test that returns early is reported `ok`. So a test
//! that lacks something it needs either fails, saying what is missing and how to get it, or — only
//! when the run asked to skip that class of test — records the skip here and returns.
//! `cargo xtask test` names a file in [`LOG_ENV`]; each skip appends one line
//! `<test binary>\t<test name>\t<class>\t<reason>`, and xtask moves every recorded test that
//! libtest reports `ok` from "passed" to "skipped" in its closing line; [`Tally`], the reading
//! half, is here too (xtask includes this file by path) so that writer and reader stay one protocol.
//!
//! The test name is the running thread's: libtest runs every test on a thread named after it
//! (also with `--test-threads=1`), and `#[tokio::test]` polls the test body on that thread. Call
//! [`skip_or_fail`] from the test body, not from a spawned task.
//!
//! This file uses std only: `node-agent`'s tests include it by path (`#[path]`), since they
//! cannot depend on `nodegate-tests`, which depends on the agent. Its tests are in
//! `tests/tests/skips.rs`.

use std::collections::BTreeSet;
use std::io::Write;

/// Environment variable naming the file skips are appended to (`cargo xtask test` sets it).
pub const LOG_ENV: &str = "NODEGATE_SKIP_LOG";
/// `1` skips every test that needs a Kubernetes cluster (`cargo xtask test --no-cluster`).
pub const SKIP_CLUSTER_ENV: &str = "NODEGATE_SKIP_CLUSTER";
/// `1` skips the tests that need the local cluster of `cargo xtask cluster` itself (its PKI, its
/// kubelet's certificates) when the tests run against another cluster (`KUBECONFIG`).
pub const SKIP_LOCAL_CLUSTER_ENV: &str = "NODEGATE_SKIP_LOCAL_CLUSTER";

/// What a test can lack, and when lacking it may be a skip rather than a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A Kubernetes cluster (and what only cluster tests use, such as helm): skipped only with
    /// `NODEGATE_SKIP_CLUSTER=1`.
    Cluster,
    /// The local cluster of `cargo xtask cluster` rather than any cluster: skipped only with
    /// `NODEGATE_SKIP_CLUSTER=1` or `NODEGATE_SKIP_LOCAL_CLUSTER=1`.
    LocalCluster,
    /// What CI always provides (`../shared/fixtures/kubelet/`, promtool): a failure in CI (`CI`
    /// set), a skip elsewhere.
    ProvidedByCi,
}

impl Class {
    /// The word written to the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Cluster => "cluster",
            Class::LocalCluster => "local-cluster",
            Class::ProvidedByCi => "provided-by-ci",
        }
    }

    /// Whether this run may skip a test of this class: a pure function of the environment
    /// (`get` reads one variable).
    pub fn may_skip(self, get: impl Fn(&str) -> Option<String>) -> bool {
        let is_one = |key: &str| get(key).is_some_and(|v| v == "1");
        match self {
            Class::Cluster => is_one(SKIP_CLUSTER_ENV),
            Class::LocalCluster => is_one(SKIP_CLUSTER_ENV) || is_one(SKIP_LOCAL_CLUSTER_ENV),
            Class::ProvidedByCi => get("CI").is_none_or(|v| v.is_empty()),
        }
    }

    /// How to make a run skip this class instead of failing.
    fn how_to_skip(self) -> &'static str {
        match self {
            Class::Cluster => {
                "or set NODEGATE_SKIP_CLUSTER=1 (`cargo xtask test --no-cluster`) to skip the cluster tests"
            }
            Class::LocalCluster => {
                "or set NODEGATE_SKIP_LOCAL_CLUSTER=1 to skip the tests that need the local cluster"
            }
            Class::ProvidedByCi => "(CI always has it; outside CI this is a counted skip)",
        }
    }
}

/// The running test lacks `missing`. If this run may skip `class`, records the skip and returns
/// (the caller then returns early); otherwise panics with `missing`, `how` to get it, and how to
/// skip instead — a test never passes for want of what it tests.
pub fn skip_or_fail(class: Class, missing: &str, how: &str) {
    if let Err(message) = skip_or_error(class, missing, how) {
        panic!("{message}");
    }
}

/// [`skip_or_fail`] for callers that return errors: `Err` carries the failure message.
pub fn skip_or_error(class: Class, missing: &str, how: &str) -> Result<(), String> {
    if !class.may_skip(|key| std::env::var(key).ok()) {
        return Err(format!("{missing}: {how}, {}", class.how_to_skip()));
    }
    record(class, missing);
    Ok(())
}

/// Appends the skip of the running test to the file in [`LOG_ENV`] and says so on stderr.
/// Without [`LOG_ENV`] (a plain `cargo test`) libtest will report the test `ok`; the stderr line
/// says so.
pub fn record(class: Class, reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_string();
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let line = log_line(&binary, &test, class, reason);
    let Some(path) = std::env::var_os(LOG_ENV).filter(|v| !v.is_empty()) else {
        eprintln!(
            "SKIPPED ({}): {reason} — libtest reports this test `ok`; run `cargo xtask test` to \
             have skips counted",
            class.as_str()
        );
        return;
    };
    eprintln!("SKIPPED ({}): {reason}", class.as_str());
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        // One write of one line: O_APPEND keeps parallel tests' lines whole.
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        // A skip that cannot be counted would be reported as a pass.
        panic!("cannot record the skip in {}: {e}", path.to_string_lossy());
    }
}

/// One log line; tabs and newlines in the fields become spaces so the line stays parseable.
pub fn log_line(binary: &str, test: &str, class: Class, reason: &str) -> String {
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    format!(
        "{}\t{}\t{}\t{}\n",
        clean(binary),
        clean(test),
        class.as_str(),
        clean(reason)
    )
}

/// What the closing line reports.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tests libtest reported `ok` that did not record a skip.
    pub passed: u64,
    pub failed: u64,
    /// `#[ignore]`d tests plus tests that recorded a skip.
    pub skipped: u64,
}

/// Reads `cargo test`'s output (stdout and stderr in one stream, so that each test's result line
/// comes after cargo's `Running … (<binary>)` line), remembering which tests of which binary
/// passed.
///
/// Why a log of skips rather than name prefixes and `--skip`: whether a test lacks what it needs
/// (a cluster, the local cluster's PKI, the shared fixtures, promtool) is known only when it runs,
/// and a prefix a new test forgets would make it pass silently again; a recorded skip is written
/// at the very line that would have returned early.
#[derive(Debug, Default)]
pub struct Tally {
    binary: String,
    passed: BTreeSet<(String, String)>,
    libtest_passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    pub fn line(&mut self, line: &str) {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("Running ") {
            // `Running tests/cluster.rs (target/debug/deps/cluster-0123abcd)`
            if let Some((_, path)) = rest
                .trim_end()
                .strip_suffix(')')
                .and_then(|r| r.rsplit_once('('))
            {
                self.binary = path.rsplit('/').next().unwrap_or(path).to_string();
            }
        } else if let Some(krate) = trimmed.strip_prefix("Doc-tests ") {
            self.binary = format!("doc-tests {}", krate.trim());
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            let number = |label: &str| {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(label))
                    .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            self.libtest_passed += number(" passed");
            self.failed += number(" failed");
            self.ignored += number(" ignored");
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|r| r.strip_suffix(" ... ok"))
        {
            let name = name.strip_suffix(" - should panic").unwrap_or(name);
            self.passed.insert((self.binary.clone(), name.to_string()));
        }
    }

    /// The counts once the tests that recorded a skip in `log` (lines
    /// `<binary>\t<test>\t<class>\t<reason>`) are moved from passed to skipped. A record that
    /// names no passing test is returned as unmatched: it cannot be counted truly.
    pub fn counts(&self, log: &str) -> (Counts, Vec<String>) {
        let mut skipped = BTreeSet::new();
        let mut unmatched = Vec::new();
        for record in log.lines().filter(|l| !l.trim().is_empty()) {
            let mut fields = record.splitn(4, '\t');
            let key = (
                fields.next().unwrap_or_default().to_string(),
                fields.next().unwrap_or_default().to_string(),
            );
            if self.passed.contains(&key) {
                skipped.insert(key);
            } else {
                unmatched.push(record.to_string());
            }
        }
        let skipped = skipped.len() as u64;
        let counts = Counts {
            passed: self.libtest_passed.saturating_sub(skipped),
            failed: self.failed,
            skipped: self.ignored + skipped,
        };
        (counts, unmatched)
    }
}
