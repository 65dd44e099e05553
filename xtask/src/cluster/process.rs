//! Long-running components: started detached in their own process group, logged to
//! `logs/<name>.log`, tracked by `run/<name>.pid` (pid + start time, so a recycled pid is never
//! taken for ours), stopped by signalling the whole group.

use super::layout::Layout;
use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running component: its pid (also its process group id).
#[derive(Clone, Copy, Debug)]
pub struct Running {
    pub pid: i32,
}

/// Starts `program args` detached unless a component called `name` already runs with exactly
/// this command line. One running with another (a cluster started by an older xtask) is
/// restarted, so `up` after an upgrade applies the new flags without a `down` first.
pub fn start(layout: &Layout, name: &str, program: &Path, args: &[String]) -> Result<Running> {
    start_in(layout, name, None, program, args)
}

/// [`start`], in the network namespace `netns` (a name under /run/netns) when given. It is
/// entered with `nsenter --net` alone, which then execs `program`: the process keeps the
/// machine's mount namespace (`ip netns exec` would give it a private one, and the kubelet's
/// volume mounts would then be invisible to containerd), and its command line is `program`'s.
pub fn start_in(
    layout: &Layout,
    name: &str,
    netns: Option<&str>,
    program: &Path,
    args: &[String],
) -> Result<Running> {
    if let Some(running) = find(layout, name) {
        if command_line(running.pid).is_none_or(|line| same_command(&line, program, args)) {
            return Ok(running);
        }
        println!("restarting {name}: its command line changed");
        stop(layout, name, Duration::from_secs(15))?;
    }
    std::fs::create_dir_all(layout.logs()).context("cannot create the logs dir")?;
    std::fs::create_dir_all(layout.run()).context("cannot create the run dir")?;
    let log_path = layout.log(name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut command = match netns {
        Some(netns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{netns}"))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    };
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot duplicate a log handle")?)
        .stderr(log)
        // Own process group: survives xtask's exit and Ctrl-C, and `down` can kill the group.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    let start_time = start_time(pid).context("the process vanished right after starting")?;
    std::fs::write(pid_file(layout, name), format!("{pid} {start_time}\n"))
        .context("cannot write a pid file")?;
    Ok(Running { pid })
}

/// Writes the config file of the component `name` if its content changes, stopping the
/// component first if it runs, so the `start` that follows applies the new config (as a changed
/// command line does). An unchanged file is not touched: kube-proxy exits on any write to its
/// config file, and every test binary runs `up`.
pub fn write_config(layout: &Layout, name: &str, path: &Path, text: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).ok();
    if old.as_deref() == Some(text) {
        return Ok(());
    }
    if old.is_some() && find(layout, name).is_some() {
        println!("restarting {name}: its config changed");
        stop(layout, name, Duration::from_secs(15))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The arguments a process was started with, program first.
fn command_line(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    Some(
        raw.split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

fn same_command(line: &[String], program: &Path, args: &[String]) -> bool {
    let wanted = std::iter::once(program.display().to_string()).chain(args.iter().cloned());
    line.iter().cloned().eq(wanted)
}

/// The component `name` if its recorded process still runs.
pub fn find(layout: &Layout, name: &str) -> Option<Running> {
    let text = std::fs::read_to_string(pid_file(layout, name)).ok()?;
    let mut parts = text.split_whitespace();
    let pid: i32 = parts.next()?.parse().ok()?;
    let recorded: u64 = parts.next()?.parse().ok()?;
    (start_time(pid) == Some(recorded) && !is_zombie(pid)).then_some(Running { pid })
}

/// Stops the component's process group: SIGTERM, then SIGKILL after `grace`.
pub fn stop(layout: &Layout, name: &str, grace: Duration) -> Result<bool> {
    let Some(running) = find(layout, name) else {
        let _ = std::fs::remove_file(pid_file(layout, name));
        return Ok(false);
    };
    let group = Pid::from_raw(running.pid);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && group_alive(running.pid) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if group_alive(running.pid) {
        let _ = killpg(group, Signal::SIGKILL);
        wait_gone(|| group_alive(running.pid), Duration::from_secs(5))
            .with_context(|| format!("{name} (pgid {}) survived SIGKILL", running.pid))?;
    }
    // Dead now, but until its parent (init, once xtask has exited) reaps it, it still shows up
    // in `ps` as a zombie; give init a moment so `down` really leaves nothing listed.
    let _ = wait_gone(|| start_time(running.pid).is_some(), Duration::from_secs(3));
    let _ = std::fs::remove_file(pid_file(layout, name));
    Ok(true)
}

/// Kills processes that are not in a tracked group (containerd's shims daemonize into their own
/// sessions) together with all their descendants (the containers).
pub fn kill_trees(roots: &[i32]) -> Result<()> {
    let mut all = Vec::new();
    for &root in roots {
        all.extend(descendants(root));
        all.push(root);
    }
    for &pid in &all {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    wait_gone(
        || {
            all.iter()
                .any(|&p| start_time(p).is_some() && !is_zombie(p))
        },
        Duration::from_secs(10),
    )
    .context("container processes survived SIGKILL")
}

/// Pids whose command line contains `needle` (e.g. our containerd socket path).
pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// The last `n` lines of a component's log, to put in an error message.
pub fn log_tail(layout: &Layout, name: &str, n: usize) -> String {
    let text = std::fs::read_to_string(layout.log(name)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `ready` until it returns true, failing early (with the log's tail) if the component died.
pub fn wait_ready(
    layout: &Layout,
    name: &str,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if find(layout, name).is_none() {
            bail!(
                "{name} exited before {what}; see {}:\n{}",
                layout.log(name).display(),
                log_tail(layout, name, 20)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{name} not ready after {}s ({what}); see {}:\n{}",
                timeout.as_secs(),
                layout.log(name).display(),
                log_tail(layout, name, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn pid_file(layout: &Layout, name: &str) -> std::path::PathBuf {
    layout.run().join(format!("{name}.pid"))
}

/// Field 22 of /proc/<pid>/stat: start time in clock ticks since boot.
fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    stat_fields(pid).and_then(|f| f.first().cloned()).as_deref() == Some("Z")
}

fn parent(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

fn group(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, …).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    Some(after_comm.split_whitespace().map(String::from).collect())
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn group_alive(pgid: i32) -> bool {
    all_pids()
        .into_iter()
        .any(|p| group(p) == Some(pgid) && !is_zombie(p))
}

fn descendants(root: i32) -> Vec<i32> {
    let pids = all_pids();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let current = found[i];
        found.extend(pids.iter().copied().filter(|&p| parent(p) == Some(current)));
        i += 1;
    }
    found.remove(0);
    found
}

fn wait_gone(mut alive: impl FnMut() -> bool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while alive() {
        if Instant::now() > deadline {
            bail!("still running after {}s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
