//! `cargo xtask bench`: side-by-side throughput of the agent, the kubelet simulator, a Go reverse
//! proxy and the real kubelet of the local cluster, measured with `hey` over loopback (see
//! docs/BENCHMARKS.md for how to read the figures).
//!
//! Everything is started here and stopped at the end (children are killed on drop, even on an
//! error), every load run is bounded by `--duration` plus a grace period, and traffic goes only to
//! 127.0.0.1 and the local node's address. Not part of `cargo xtask test`: the figures depend on
//! the machine and its load.

use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Length of each load run (hey -z), e.g. `10s`.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Concurrent clients (hey -c).
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Runs of each target, taken in turns (every target once, then again): the tables show
    /// each target's median run, so a burst of other work on the machine moves one run, not
    /// the comparison.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// `--worker-threads` of the agents (the chart's 1-CPU limit gives the agent one thread).
    #[arg(long, default_value_t = 1)]
    agent_worker_threads: u16,
    /// kubelet-sim --payload-scale for the large /metrics/cadvisor answer (40: about 8 MB).
    #[arg(long, default_value_t = 40)]
    payload_scale: usize,
    /// Skip the Go reverse proxy (caddy) baseline.
    #[arg(long)]
    no_go_proxy: bool,
    /// Skip the runs against the real kubelet of the local cluster.
    #[arg(long)]
    no_kubelet: bool,
    /// Skip the agent-memory measurement (tests/tests/agent_memory.rs: 20 and 200 MB of
    /// metrics streamed through the release agent, its peak RSS before and after).
    #[arg(long)]
    no_memory: bool,
    /// Write the result tables (markdown) to this file as well as to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Namespace of the bench's service accounts in the local cluster.
const BENCH_NS: &str = "nodegate-bench";
/// Namespace the filtered runs are granted (one of kubelet-sim's namespaces).
const FILTER_NS: &str = "team-a";
const NODE_NAME: &str = "node-1";

/// A child process killed (and reaped) when dropped, so nothing outlives the bench.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped {}", self.name);
    }
}

/// What one hey run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeyResult {
    pub rps: f64,
    pub avg_s: f64,
    pub p50_s: f64,
    pub p99_s: f64,
    pub ok: u64,
    pub other: u64,
}

/// Reads hey's summary: `Requests/sec`, `Average`, the `50%`/`99%` lines of the latency
/// distribution and the status code distribution (anything but 200 is counted as `other`, and
/// errors hey lists are counted too).
pub fn parse_hey(text: &str) -> Option<HeyResult> {
    let mut r = HeyResult::default();
    let num = |s: &str| s.split_whitespace().next()?.parse::<f64>().ok();
    let mut in_errors = false;
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.rps = num(v)?;
        } else if let Some(v) = l.strip_prefix("Average:") {
            r.avg_s = num(v)?;
        } else if let Some(v) = l.strip_prefix("50% in ") {
            r.p50_s = num(v)?;
        } else if let Some(v) = l.strip_prefix("99% in ") {
            r.p99_s = num(v)?;
        } else if l.starts_with("Error distribution:") {
            in_errors = true;
        } else if let Some(rest) = l.strip_prefix('[') {
            let (bracket, after) = rest.split_once(']')?;
            if in_errors {
                // `[count]\tthe error`
                r.other += bracket.parse::<u64>().ok()?;
            } else {
                // `[status]\tcount responses`
                let count = after.split_whitespace().next()?.parse::<u64>().ok()?;
                if bracket == "200" {
                    r.ok += count;
                } else {
                    r.other += count;
                }
            }
        }
    }
    (r.rps > 0.0).then_some(r)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn duration_secs(d: &str) -> Result<u64> {
    let (n, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
    let n: u64 = n.parse().with_context(|| format!("--duration {d}"))?;
    Ok(match unit {
        "" | "s" => n,
        "m" => n * 60,
        _ => bail!("--duration {d}: use seconds (10s) or minutes (1m)"),
    })
}

fn ensure_hey() -> Result<()> {
    if Command::new("hey").arg("-h").output().is_ok() {
        return Ok(());
    }
    eprintln!("hey (HTTP load generator) is missing: installing it with apt-get install -y hey");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "hey"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "could not install hey: install it (apt-get install hey, or `go install github.com/rakyll/hey@latest`) and retry"
        );
    }
    Ok(())
}

fn cargo_build() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(crate::workspace_root())
        .args([
            "build",
            "--release",
            "-p",
            "nodegate-agent",
            "-p",
            "nodegate-tests",
            "--bin",
            "kubelet-sim",
            "--bin",
            "nodegate-agent",
        ])
        .status()?;
    if !status.success() {
        bail!("release build failed");
    }
    Ok(())
}

/// Runs the agent-memory measurement against the release agent; its figures (the lines it
/// prints about VmRSS and VmHWM).
fn agent_memory() -> Result<String> {
    eprintln!("agent memory: tests/tests/agent_memory.rs (--ignored) on the release agent");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(crate::workspace_root())
        .env("NODEGATE_AGENT_BIN", release_bin("nodegate-agent"))
        .args([
            "test",
            "-p",
            "nodegate-tests",
            "--test",
            "agent_memory",
            "--",
            "--ignored",
            "--nocapture",
            "agent_peak_rss_stays_flat",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running the agent-memory measurement")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("the agent-memory measurement failed:\n{stdout}");
    }
    Ok(stdout
        .lines()
        .filter(|l| l.contains("MiB") || l.contains(" MB"))
        .map(|l| format!("{l}\n"))
        .collect())
}

fn release_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    target.join("release").join(name)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// VmRSS and VmHWM of a process, in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Requests `url` with curl until it answers 200 (or `timeout` passes): the warm-up that fills
/// the token and authorization caches before the measured run.
fn warm_up(url: &str, token: Option<&str>, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let mut cmd = Command::new("curl");
        cmd.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-m", "20"]);
        if let Some(t) = token {
            cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
        }
        let out = cmd.arg(url).output()?;
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        if code == "200" {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("{url} did not answer 200 within {timeout:?} (last: {code:?})");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

struct Runner {
    duration: String,
    secs: u64,
    concurrency: u32,
    rounds: u32,
}

/// Linux reports process CPU time in USER_HZ ticks, 100 per second on every architecture
/// nodegate runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system) of a process so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    match (tick(11), tick(12)) {
        (Some(u), Some(s)) => (u + s) / TICKS_PER_SECOND,
        _ => 0.0,
    }
}

/// The pid of the process whose command name is `comm` (the local cluster's kubelet).
fn pid_of(comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (name.trim() == comm).then_some(pid)
    })
}

/// One thing measured: a URL, the caller's token, and the processes whose CPU time per
/// request is reported beside it.
struct Target {
    path: &'static str,
    label: String,
    url: String,
    token: Option<String>,
    /// Extra request headers (`Name: value`).
    headers: Vec<String>,
    cpu: Vec<(&'static str, u32)>,
}

impl Target {
    fn new(path: &'static str, label: &str, url: String, token: Option<&str>) -> Self {
        Target {
            path,
            label: label.to_string(),
            url,
            token: token.map(str::to_string),
            headers: vec![],
            cpu: vec![],
        }
    }

    fn header(mut self, header: &str) -> Self {
        self.headers.push(header.to_string());
        self
    }

    fn cpu_of(mut self, name: &'static str, pid: u32) -> Self {
        self.cpu.push((name, pid));
        self
    }
}

/// A target's runs: the median one (by requests/s) stands for it, the others give the range.
struct Row {
    path: &'static str,
    target: String,
    runs: Vec<HeyResult>,
    /// Per watched process: CPU milliseconds per answered request, one figure per run.
    cpu: Vec<(&'static str, Vec<f64>)>,
}

impl Row {
    fn median(&self) -> HeyResult {
        let mut runs = self.runs.clone();
        runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        runs.get(runs.len() / 2).cloned().unwrap_or_default()
    }

    fn range(&self) -> (f64, f64) {
        let min = self
            .runs
            .iter()
            .map(|r| r.rps)
            .fold(f64::INFINITY, f64::min);
        let max = self.runs.iter().map(|r| r.rps).fold(0.0, f64::max);
        (min, max)
    }

    fn cpu_median(&self, name: &str) -> Option<f64> {
        let (_, runs) = self.cpu.iter().find(|(n, _)| *n == name)?;
        let mut v = runs.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }
}

impl Runner {
    fn hey(
        &self,
        label: &str,
        url: &str,
        token: Option<&str>,
        headers: &[String],
        hey_args: &[&str],
    ) -> Result<HeyResult> {
        warm_up(url, token, Duration::from_secs(60))?;
        eprintln!("hey {label}: {url} (load {})", loadavg());
        let mut cmd = Command::new("timeout");
        cmd.arg(format!("{}s", self.secs + 60))
            .arg("hey")
            .args(hey_args)
            .arg("-disable-compression");
        if let Some(t) = token {
            cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
        }
        for h in headers {
            cmd.arg("-H").arg(h);
        }
        let out = cmd.arg(url).output().context("running hey")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let r = parse_hey(&text).with_context(|| format!("unreadable hey output:\n{text}"))?;
        eprintln!(
            "  {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms, {} ok, {} other",
            r.rps,
            r.p50_s * 1e3,
            r.p99_s * 1e3,
            r.avg_s * 1e3,
            r.ok,
            r.other
        );
        Ok(r)
    }

    /// Loads every target in turn, `rounds` times over (so slow drifts in the machine's load
    /// fall on all of them alike), with `hey -z <duration> -c <concurrency>`.
    fn load(&self, targets: &[Target]) -> Result<Vec<Row>> {
        let c = self.concurrency.to_string();
        self.measure(targets, &["-z", &self.duration, "-c", &c])
    }

    fn measure(&self, targets: &[Target], hey_args: &[&str]) -> Result<Vec<Row>> {
        let mut rows: Vec<Row> = targets
            .iter()
            .map(|t| Row {
                path: t.path,
                target: t.label.clone(),
                runs: vec![],
                cpu: t.cpu.iter().map(|(n, _)| (*n, vec![])).collect(),
            })
            .collect();
        for round in 1..=self.rounds {
            for (t, row) in targets.iter().zip(rows.iter_mut()) {
                let label = format!("{} (round {round}/{})", t.label, self.rounds);
                let before: Vec<f64> = t.cpu.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
                let r = self.hey(&label, &t.url, t.token.as_deref(), &t.headers, hey_args)?;
                for (i, (_, pid)) in t.cpu.iter().enumerate() {
                    let used = cpu_seconds(*pid) - before[i];
                    let per_request = if r.ok > 0 {
                        used * 1e3 / r.ok as f64
                    } else {
                        0.0
                    };
                    row.cpu[i].1.push(per_request);
                }
                row.runs.push(r);
            }
        }
        Ok(rows)
    }
}

fn policy_yaml(name: &str, sa: &str, access: &str, namespaces: &str, ports: &str) -> String {
    format!(
        "apiVersion: nodegate.io/v1alpha1\nkind: NodeApiPolicy\nmetadata:\n  name: {name}\nspec:\n  \
         serviceAccounts:\n    - name: {sa}\n      namespace: {BENCH_NS}\n  access: [{access}]\n  \
         namespaces:\n    {namespaces}\n  ports: [{ports}]\n"
    )
}

/// The agent's rules: `bench-ns` sees one namespace (filter on), `bench-all` everything (no
/// filtering), anonymous callers on the read-only port everything (plain HTTP without
/// authentication, to compare with a plain proxy).
fn agent_config() -> String {
    let anonymous = "apiVersion: nodegate.io/v1alpha1\nkind: NodeApiPolicy\nmetadata:\n  \
        name: bench-anonymous\nspec:\n  subjects:\n    - kind: User\n      name: system:anonymous\n  \
        access: [cadvisor, resource]\n  namespaces:\n    all: true\n  ports: [ReadOnly]\n";
    [
        policy_yaml(
            "bench-ns",
            "bench-ns",
            "cadvisor, resource",
            &format!("names: [{FILTER_NS}]"),
            "Secure",
        ),
        policy_yaml(
            "bench-all",
            "bench-all",
            "cadvisor, resource",
            "all: true",
            "Secure",
        ),
        anonymous.to_string(),
    ]
    .join("---\n")
}

struct Agent {
    proc: Proc,
    /// `https://<loopback address>` (port 443, see [`start_agent`]).
    secure: String,
    read_only: String,
}

/// Starts an agent on its own loopback address `ip` with the secure port on 443: hey (0.1.4,
/// Debian's) sends the URL's `host:port` as TLS SNI, which rustls rejects as illegal, while a URL
/// without a port sends an IP, for which no SNI is sent at all.
fn start_agent(
    dir: &Path,
    name: &str,
    ip: &str,
    kubeconfig: &str,
    upstream_args: &[String],
) -> Result<Agent> {
    let config = dir.join(format!("{name}-config.yaml"));
    std::fs::write(&config, agent_config())?;
    let (read_only, healthz) = (free_port()?, free_port()?);
    let mut cmd = Command::new(release_bin("nodegate-agent"));
    cmd.args(["--node-name", NODE_NAME, "--bind-address", ip])
        .args(["--healthz-bind-address", "127.0.0.1"])
        .arg("--secure-port=443")
        .arg(format!("--read-only-port={read_only}"))
        .arg(format!("--healthz-port={healthz}"))
        .arg(format!("--kubeconfig={kubeconfig}"))
        .arg(format!("--config-source=file:{}", config.display()))
        .args(upstream_args);
    let proc = Proc::spawn(name, &mut cmd, &dir.join(format!("{name}.log")))?;
    warm_up(
        &format!("http://127.0.0.1:{healthz}/readyz"),
        None,
        Duration::from_secs(30),
    )
    .with_context(|| {
        format!(
            "{name} did not become ready (log {}/{name}.log)",
            dir.display()
        )
    })?;
    Ok(Agent {
        proc,
        secure: format!("https://{ip}"),
        read_only: format!("http://{ip}:{read_only}"),
    })
}

fn kubectl(env: &[(String, String)], args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("kubectl")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The bench's identities in the cluster: `bench-ns` and `bench-all`; `bench-all` may also get
/// `nodes/metrics` and `nodes/proxy`, for the kubelet's secure port and the API server's node
/// proxy. `bench-agent` is the agent's own identity towards the kubelet (the chart's default
/// upstream credential is the agent's service-account token).
const RBAC: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: nodegate-bench}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bench-ns, namespace: nodegate-bench}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bench-all, namespace: nodegate-bench}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bench-agent, namespace: nodegate-bench}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: nodegate-bench-kubelet}
rules:
  - apiGroups: [""]
    resources: [nodes/metrics, nodes/proxy]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: nodegate-bench-kubelet}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: nodegate-bench-kubelet}
subjects:
  - {kind: ServiceAccount, name: bench-all, namespace: nodegate-bench}
  - {kind: ServiceAccount, name: bench-agent, namespace: nodegate-bench}
"#;

pub fn run(args: Args) -> Result<()> {
    let secs = duration_secs(&args.duration)?;
    ensure_hey()?;
    cargo_build()?;
    let runner = Runner {
        duration: args.duration.clone(),
        secs,
        concurrency: args.concurrency,
        rounds: args.rounds,
    };
    let dir = std::env::temp_dir().join(format!("nodegate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    eprintln!("logs in {}", dir.display());
    let load_start = loadavg();
    let started = Instant::now();

    let env = crate::cluster::ensure_up().context("the local cluster (cargo xtask cluster up)")?;
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let kubeconfig = get("KUBECONFIG");
    let state = PathBuf::from(get("NODEGATE_CLUSTER_DIR"));
    kubectl(&env, &["apply", "-f", "-"], Some(RBAC))?;
    let token = |sa: &str| {
        kubectl(
            &env,
            &["create", "token", sa, "-n", BENCH_NS, "--duration=2h"],
            None,
        )
    };
    let (tok_ns, tok_all) = (token("bench-ns")?, token("bench-all")?);
    let threads = format!("--worker-threads={}", args.agent_worker_threads);
    let mut rss_rows: Vec<(String, (f64, f64))> = Vec::new();

    // 1. kubelet-sim, straight and through the agent (and caddy).
    let sim_port = free_port()?;
    let mut cmd = Command::new(release_bin("kubelet-sim"));
    cmd.arg(format!("--listen=127.0.0.1:{sim_port}"))
        .arg("--allow-all")
        .arg(format!("--payload-scale={}", args.payload_scale))
        .arg("--node-name")
        .arg(NODE_NAME)
        .env("RUST_LOG", "warn");
    let sim_log = dir.join("kubelet-sim.log");
    let sim_proc = Proc::spawn("kubelet-sim", &mut cmd, &sim_log)?;
    let sim = format!("http://127.0.0.1:{sim_port}");
    warm_up(
        &format!("{sim}/metrics/resource"),
        None,
        Duration::from_secs(60),
    )?;
    let sim_line = std::fs::read_to_string(&sim_log)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("kubelet-sim serving"))
        .unwrap_or_default()
        .to_string();
    let agent = start_agent(
        &dir,
        "agent-sim",
        "127.0.0.2",
        &kubeconfig,
        &[format!("--upstream={sim}"), threads.clone()],
    )?;
    rss_rows.push(("agent (kubelet-sim) idle".into(), rss(agent.proc.pid())));
    let caddy = if args.no_go_proxy {
        None
    } else {
        start_caddy(&dir, sim_port)?
    };
    let (secure, ro) = (agent.secure.clone(), agent.read_only.clone());
    let (sim_pid, agent_pid) = (sim_proc.pid(), agent.proc.pid());
    // The agent's three ways in: read-only port, TLS + token unfiltered, TLS + token filtered.
    let through_agent = |path: &'static str| {
        [
            ("agent read-only port (http, anonymous, all)", &ro, None),
            (
                "agent TLS + token, `all` (no filter)",
                &secure,
                Some(tok_all.as_str()),
            ),
            (
                "agent TLS + token, one namespace (filter)",
                &secure,
                Some(tok_ns.as_str()),
            ),
        ]
        .map(|(label, base, token)| {
            Target::new(path, label, format!("{base}{path}"), token)
                .cpu_of("upstream", sim_pid)
                .cpu_of("proxy", agent_pid)
        })
    };
    let mut rows = Vec::new();
    for path in ["/metrics/resource", "/metrics/cadvisor"] {
        let mut targets = vec![
            Target::new(
                path,
                "kubelet-sim direct (http)",
                format!("{sim}{path}"),
                None,
            )
            .cpu_of("upstream", sim_pid),
        ];
        if let Some(caddy) = &caddy {
            for (label, base) in [
                ("caddy reverse proxy (http, no auth)", &caddy.http),
                ("caddy reverse proxy (TLS, no auth)", &caddy.https),
            ] {
                targets.push(
                    Target::new(path, label, format!("{base}{path}"), None)
                        .cpu_of("upstream", sim_pid)
                        .cpu_of("proxy", caddy.proc.pid()),
                );
            }
        }
        targets.extend(through_agent(path));
        rows.extend(runner.load(&targets)?);
        rss_rows.push((
            format!("agent (kubelet-sim) after {path}"),
            rss(agent.proc.pid()),
        ));
    }
    // Time to the last byte of one large answer, one client at a time.
    let large = "/metrics/cadvisor";
    let mut ttlb_targets = vec![Target::new(
        large,
        "kubelet-sim direct (http)",
        format!("{sim}{large}"),
        None,
    )];
    ttlb_targets.extend(through_agent(large));
    // What Prometheus sends: the filtered answer gzip-encoded on the way.
    ttlb_targets.push(
        Target::new(
            large,
            "agent TLS + token, one namespace (filter), `Accept-Encoding: gzip`",
            format!("{secure}{large}"),
            Some(&tok_ns),
        )
        .header("Accept-Encoding: gzip"),
    );
    let one_client = ["-n", "40", "-c", "1"];
    let mut ttlb = vec![(
        format!("kubelet-sim `{large}`"),
        runner.measure(&ttlb_targets, &one_client)?,
    )];
    drop(caddy);
    drop(agent);
    drop(sim_proc);

    // 2. The real kubelet.
    let mut kubelet_rows: Vec<Row> = Vec::new();
    if !args.no_kubelet {
        let ip = kubectl(
            &env,
            &[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
            ],
            None,
        )?;
        let kubelet_pid = pid_of("kubelet").context("no kubelet process")?;
        let apiserver_pid = pid_of("kube-apiserver").context("no kube-apiserver process")?;
        let upstream = |credential: Vec<String>| {
            let mut args = vec![
                format!("--upstream=https://{ip}:10250"),
                format!(
                    "--upstream-ca-file={}",
                    state.join("kubelet/pki/kubelet.crt").display()
                ),
                format!("--upstream-server-name={NODE_NAME}"),
            ];
            args.extend(credential);
            args
        };
        // As the chart deploys it: the agent's own service-account token (TokenReview on the
        // kubelet, cached there).
        let token_file = dir.join("agent-upstream-token");
        std::fs::write(&token_file, token("bench-agent")?)?;
        let token_upstream = || {
            upstream(vec![format!(
                "--upstream-token-file={}",
                token_file.display()
            )])
        };
        let agent = start_agent(
            &dir,
            "agent-kubelet",
            "127.0.0.3",
            &kubeconfig,
            &[token_upstream(), vec![threads.clone()]].concat(),
        )?;
        // The alternative for kubelets that accept only x509: a client certificate (the API
        // server's kubelet client certificate here).
        let agent_x509 = start_agent(
            &dir,
            "agent-kubelet-x509",
            "127.0.0.4",
            &kubeconfig,
            &[
                upstream(vec![
                    format!(
                        "--upstream-client-cert-file={}",
                        state.join("pki/apiserver-kubelet-client.crt").display()
                    ),
                    format!(
                        "--upstream-client-key-file={}",
                        state.join("pki/apiserver-kubelet-client.key").display()
                    ),
                ]),
                vec![threads.clone()],
            ]
            .concat(),
        )?;
        // The agent with a runtime thread per CPU of this machine (no CPU limit).
        let agent_default = start_agent(
            &dir,
            "agent-kubelet-default-threads",
            "127.0.0.5",
            &kubeconfig,
            &token_upstream(),
        )?;
        let path = "/metrics/resource";
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let t = args.agent_worker_threads;
        let targets = vec![
            Target::new(
                path,
                "kubelet read-only port :10255 (http)",
                format!("http://{ip}:10255{path}"),
                None,
            ),
            Target::new(
                path,
                "kubelet secure port :10250 (token, webhook authn/authz)",
                format!("https://{ip}:10250{path}"),
                Some(&tok_all),
            ),
            Target::new(
                path,
                "API server node proxy",
                format!("https://127.0.0.1:6443/api/v1/nodes/{NODE_NAME}/proxy{path}"),
                Some(&tok_all),
            )
            .cpu_of("proxy", apiserver_pid),
            Target::new(
                path,
                &format!("agent TLS + token, `all` (no filter), token upstream, {t} thread(s)"),
                format!("{}{path}", agent.secure),
                Some(&tok_all),
            )
            .cpu_of("proxy", agent.proc.pid()),
            Target::new(
                path,
                &format!(
                    "agent TLS + token, one namespace (filter), token upstream, {t} thread(s)"
                ),
                format!("{}{path}", agent.secure),
                Some(&tok_ns),
            )
            .cpu_of("proxy", agent.proc.pid()),
            Target::new(
                path,
                &format!("agent TLS + token, `all`, client certificate upstream, {t} thread(s)"),
                format!("{}{path}", agent_x509.secure),
                Some(&tok_all),
            )
            .cpu_of("proxy", agent_x509.proc.pid()),
            Target::new(
                path,
                &format!("agent TLS + token, `all`, token upstream, {cores} threads (one per CPU)"),
                format!("{}{path}", agent_default.secure),
                Some(&tok_all),
            )
            .cpu_of("proxy", agent_default.proc.pid()),
        ];
        let targets: Vec<Target> = targets
            .into_iter()
            .map(|t| t.cpu_of("upstream", kubelet_pid))
            .collect();
        kubelet_rows = runner.load(&targets)?;
        // The kubelet's own cAdvisor answer (small on this one-node cluster), one client.
        let cadvisor = "/metrics/cadvisor";
        let ttlb_targets = [
            Target::new(
                cadvisor,
                "kubelet secure port :10250 (token)",
                format!("https://{ip}:10250{cadvisor}"),
                Some(&tok_all),
            ),
            Target::new(
                cadvisor,
                "agent TLS + token, `all` (no filter)",
                format!("{}{cadvisor}", agent.secure),
                Some(&tok_all),
            ),
            Target::new(
                cadvisor,
                "agent TLS + token, one namespace (filter)",
                format!("{}{cadvisor}", agent.secure),
                Some(&tok_ns),
            ),
        ];
        ttlb.push((
            format!("node-1's kubelet `{cadvisor}`"),
            runner.measure(&ttlb_targets, &one_client)?,
        ));
        rss_rows.push((
            "agent (node-1 kubelet) after load".into(),
            rss(agent.proc.pid()),
        ));
    }

    // 3. The agent's memory while streaming: the `#[ignore]`d measurement of the test suite,
    // on the release binary (in a debug build it takes minutes and measures the wrong thing).
    let memory = if args.no_memory {
        String::new()
    } else {
        agent_memory()?
    };

    let mut report = render(
        &args,
        &sim_line,
        &load_start,
        &loadavg(),
        started.elapsed(),
        &rows,
        &ttlb,
        &kubelet_rows,
        &rss_rows,
    );
    if !memory.is_empty() {
        report.push_str(&format!(
            "\nagent memory while streaming (`NODEGATE_AGENT_BIN=target/release/nodegate-agent \
             cargo test -p nodegate-tests --test agent_memory -- --ignored --nocapture`):\n\n\
             ```\n{memory}```\n"
        ));
    }
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report)?;
    }
    Ok(())
}

/// caddy in front of kubelet-sim: plain HTTP on 127.0.0.1, and HTTPS (its internal CA, no
/// client authentication) on 127.0.0.6:443, for hey's SNI (see [`start_agent`]).
struct Caddy {
    proc: Proc,
    http: String,
    https: String,
}

/// Address of caddy's HTTPS site.
const CADDY_TLS_IP: &str = "127.0.0.6";

/// Starts caddy if a binary is in `~/.cache/nodegate/bench-bin` or on PATH (built by hand, see
/// docs/BENCHMARKS.md); None when there is none. Its state stays in the bench's directory and
/// its CA is never installed in the system's trust store.
fn start_caddy(dir: &Path, sim_port: u16) -> Result<Option<Caddy>> {
    let cached = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/nodegate/bench-bin/caddy"))
        .filter(|p| p.exists());
    let bin = match cached {
        Some(p) => p,
        None if Command::new("caddy").arg("version").output().is_ok() => PathBuf::from("caddy"),
        None => {
            eprintln!(
                "no caddy: skipping the Go proxy baseline (build it with GOBIN=~/.cache/nodegate/bench-bin go install github.com/caddyserver/caddy/v2/cmd/caddy@latest)"
            );
            return Ok(None);
        }
    };
    let (port, admin) = (free_port()?, free_port()?);
    let storage = dir.join("caddy-storage");
    let caddyfile = dir.join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n\tadmin 127.0.0.1:{admin}\n\tskip_install_trust\n\tauto_https disable_redirects\n\tlocal_certs\n\tdefault_sni {CADDY_TLS_IP}\n\tstorage file_system {}\n}}\n\
             http://127.0.0.1:{port} {{\n\treverse_proxy 127.0.0.1:{sim_port}\n}}\n\
             https://{CADDY_TLS_IP}:443 {{\n\tbind {CADDY_TLS_IP}\n\ttls internal\n\treverse_proxy 127.0.0.1:{sim_port}\n}}\n",
            storage.display()
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(&caddyfile)
        .args(["--adapter", "caddyfile"])
        .env("XDG_DATA_HOME", dir.join("caddy-data"))
        .env("XDG_CONFIG_HOME", dir.join("caddy-config"));
    let proc = Proc::spawn("caddy", &mut cmd, &dir.join("caddy.log"))?;
    let caddy = Caddy {
        proc,
        http: format!("http://127.0.0.1:{port}"),
        https: format!("https://{CADDY_TLS_IP}"),
    };
    for base in [&caddy.http, &caddy.https] {
        warm_up(
            &format!("{base}/metrics/resource"),
            None,
            Duration::from_secs(30),
        )?;
    }
    Ok(Some(caddy))
}

#[allow(clippy::too_many_arguments)]
fn render(
    args: &Args,
    sim_line: &str,
    load_start: &str,
    load_end: &str,
    took: Duration,
    rows: &[Row],
    ttlb: &[(String, Vec<Row>)],
    kubelet_rows: &[Row],
    rss_rows: &[(String, (f64, f64))],
) -> String {
    let mut s = String::new();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        s,
        "hey -z {} -c {} -disable-compression, {} rounds (medians shown, req/s range beside); agents with --worker-threads={}; {nproc} CPUs; load average (1/5/15 min) {load_start} at start, {load_end} at end; {:.0} s in all",
        args.duration,
        args.concurrency,
        args.rounds,
        args.agent_worker_threads,
        took.as_secs_f64()
    );
    let _ = writeln!(s, "{sim_line}\n");
    let header = |s: &mut String, ratios: &[&str]| {
        let _ = writeln!(
            s,
            "| path | target | req/s | range | {} | p50 ms | p99 ms | mean (last byte) ms | CPU ms/req upstream | CPU ms/req proxy | non-200 |",
            ratios.join(" | ")
        );
        let _ = writeln!(
            s,
            "|---|---|---:|---|{}---:|---:|---:|---:|---:|---:|",
            "---:|".repeat(ratios.len())
        );
    };
    header(&mut s, &["× direct"]);
    for r in rows {
        let direct = rows
            .iter()
            .find(|d| d.path == r.path)
            .map_or(0.0, |d| d.median().rps);
        line(&mut s, r, &[direct]);
    }
    for (title, rows) in ttlb {
        let _ = writeln!(
            s,
            "\nOne client (`hey -n 40 -c 1`), time to the last byte, {title}:\n"
        );
        let _ = writeln!(
            s,
            "| target | mean ms | × first row | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|"
        );
        let first = rows.first().map_or(0.0, |d| d.median().avg_s);
        for r in rows {
            // The median run by requests/s, i.e. by mean time for one client.
            let m = r.median();
            let ratio = if first > 0.0 { m.avg_s / first } else { 0.0 };
            let _ = writeln!(
                s,
                "| {} | {} | {ratio:.2} | {} | {} |",
                r.target,
                ms(m.avg_s),
                ms(m.p50_s),
                ms(m.p99_s)
            );
        }
    }
    if !kubelet_rows.is_empty() {
        let _ = writeln!(
            s,
            "\nnode-1 (real kubelet), ratios to its read-only and its secure port:\n"
        );
        header(&mut s, &["× read-only", "× secure"]);
        let bases: Vec<f64> = kubelet_rows
            .iter()
            .take(2)
            .map(|d| d.median().rps)
            .collect();
        for r in kubelet_rows {
            line(&mut s, r, &bases);
        }
    }
    let _ = writeln!(
        s,
        "\n| agent process | VmRSS MiB | VmHWM MiB |\n|---|---:|---:|"
    );
    for (what, (rss, hwm)) in rss_rows {
        let _ = writeln!(s, "| {what} | {rss:.1} | {hwm:.1} |");
    }
    s
}

/// A latency in ms; hey leaves a percentile out (read as 0) when a run had too few requests.
fn ms(secs: f64) -> String {
    if secs > 0.0 {
        format!("{:.2}", secs * 1e3)
    } else {
        "n/a".into()
    }
}

fn line(s: &mut String, r: &Row, bases: &[f64]) {
    let m = r.median();
    let ratios: Vec<String> = bases
        .iter()
        .map(|b| format!("{:.2}", if *b > 0.0 { m.rps / b } else { 0.0 }))
        .collect();
    let (min, max) = r.range();
    let cpu = |name| {
        r.cpu_median(name)
            .map_or_else(|| "–".to_string(), |v| format!("{v:.3}"))
    };
    let other: u64 = r.runs.iter().map(|r| r.other).sum();
    let _ = writeln!(
        s,
        "| `{}` | {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {} | {} | {} | {} |",
        r.path,
        r.target,
        m.rps,
        min,
        max,
        ratios.join(" | "),
        ms(m.p50_s),
        ms(m.p99_s),
        ms(m.avg_s),
        cpu("upstream"),
        cpu("proxy"),
        other,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEY: &str = "
Summary:
  Total:\t10.0154 secs
  Slowest:\t0.0936 secs
  Fastest:\t0.0002 secs
  Average:\t0.0061 secs
  Requests/sec:\t2611.0950

  Total data:\t1234 bytes
  Size/request:\t47 bytes

Latency distribution:
  10% in 0.0012 secs
  50% in 0.0040 secs
  90% in 0.0130 secs
  99% in 0.0311 secs

Status code distribution:
  [200]\t26130 responses
  [403]\t2 responses

Error distribution:
  [3]\tGet http://127.0.0.1:1/: dial tcp: connection refused
";

    #[test]
    fn reads_hey_summary_latencies_and_failures() {
        let r = parse_hey(HEY).unwrap_or_default();
        assert_eq!(
            r,
            HeyResult {
                rps: 2611.095,
                avg_s: 0.0061,
                p50_s: 0.004,
                p99_s: 0.0311,
                ok: 26130,
                other: 5,
            }
        );
        assert_eq!(parse_hey("Error: no such host"), None);
    }

    #[test]
    fn durations_in_seconds_or_minutes() {
        assert_eq!(duration_secs("10s").ok(), Some(10));
        assert_eq!(duration_secs("3").ok(), Some(3));
        assert_eq!(duration_secs("1m").ok(), Some(60));
        assert!(duration_secs("1h").is_err());
    }
}
