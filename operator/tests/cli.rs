//! The `nodegate-operator` binary's command line. Also makes `cargo test --workspace` build the
//! binary, which `nodegate-tests`' `operator_leader` runs (killed, partitioned).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn operator() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nodegate-operator"));
    // Never reaches a cluster: the flags are refused before any connection.
    command.env("KUBECONFIG", "/nonexistent/kubeconfig");
    command
}

/// A renew deadline not below the lease duration, or a retry period not below the deadline,
/// would let a partitioned leader write while another leads: refused at startup, naming the
/// flag, before the API server is contacted.
#[test]
fn inconsistent_lease_timing_is_refused_at_startup() {
    for (flags, names) in [
        (
            [
                "--lease-duration-seconds=6",
                "--lease-renew-deadline-seconds=6",
            ],
            "renew deadline",
        ),
        (
            [
                "--lease-renew-deadline-seconds=4",
                "--lease-retry-period-seconds=4",
            ],
            "retry period",
        ),
    ] {
        let out = operator()
            .args([
                "run",
                "--metrics-bind-address=127.0.0.1:0",
                "--log-format=text",
            ])
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} accepted");
        assert!(
            stderr.contains("invalid lease flags") && stderr.contains(names),
            "{flags:?}: {stderr}"
        );
    }
}

#[test]
fn help_documents_the_lease_timing_and_the_stall_bound() {
    let out = operator().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--lease-duration-seconds",
        "--lease-renew-deadline-seconds",
        "--lease-retry-period-seconds",
        "--healthz-stall-seconds",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(!help.contains("--lease-grace-seconds"));
}
