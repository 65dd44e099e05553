//! `cargo xtask demo`: the whole system on the local cluster, in one command.
//!
//! Brings up the local cluster, builds and imports the images, installs the chart, applies the
//! monitoring sample and pods in two namespaces, then runs real commands (curl against the agent
//! and the kubelet, kubectl) and prints them with their real output. Each result is also
//! checked, so the demo fails loudly instead of showing something wrong. `--down` removes what
//! it installed and leaves the cluster running.

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
pub struct Args {
    /// Remove what the demo installed (release, policy, namespaces); the cluster keeps running
    /// (`cargo xtask cluster down` stops it).
    #[arg(long)]
    pub down: bool,
}

const RELEASE: &str = "nodegate";
const NAMESPACE: &str = "nodegate-system";
const SAMPLE: &str = "config/samples/monitoring-team-a.yaml";
const POLICY: &str = "team-a-monitoring";
const TEAMS: [&str; 2] = ["team-a", "team-b"];
/// The demo's second policy: team-a's developers may read their own namespace's container logs
/// and nothing else (so exec, even into their own pods, is refused: streaming is `create`).
const LOGS_POLICY: &str = "demo-team-a-logs";

/// The demo's pods: one chatty container in each team's namespace, and the monitoring
/// namespace the sample's service account lives in.
fn workloads() -> String {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: monitoring\n  labels:\n    nodegate.io/demo: \"true\"\n",
    );
    for team in TEAMS {
        yaml.push_str(&format!(
            r#"---
apiVersion: v1
kind: Namespace
metadata:
  name: {team}
  labels:
    nodegate.io/demo: "true"
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: {team}
spec:
  terminationGracePeriodSeconds: 1
  # The demo asks node-1's agent; with two nodes the pod would otherwise land on either.
  nodeSelector:
    kubernetes.io/hostname: node-1
  containers:
    - name: web
      image: nodegate.local/busybox:1
      imagePullPolicy: Never
      command: ["sh", "-c", "while true; do echo hello from {team}; sleep 5; done"]
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        allowPrivilegeEscalation: false
        capabilities:
          drop: ["ALL"]
        seccompProfile:
          type: RuntimeDefault
"#
        ));
    }
    yaml.push_str(&format!(
        r#"---
apiVersion: nodegate.io/v1alpha1
kind: NodeApiPolicy
metadata:
  name: {LOGS_POLICY}
spec:
  serviceAccounts:
    - name: developer
      namespace: team-a
  access: [containerLogs]
  namespaces:
    names: [team-a]
"#
    ));
    yaml
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let env = phase("local cluster", crate::cluster::ensure_up)?;
    let demo = Demo::new(env)?;
    if args.down {
        return demo.down();
    }
    let helm = phase("helm", crate::helm::ensure)?;
    let images = phase("images (release build, imported into containerd)", || {
        crate::image::build_and_import()
    })?;
    phase("chart", || demo.install(&helm, &images))?;
    phase("workloads and the monitoring sample", || demo.workloads())?;
    phase("policy Ready and agents In-Sync", || demo.wait_ready())?;
    demo.show()?;
    println!(
        "\ndemo done in {:.0?}. Try it yourself: eval \"$(cargo xtask cluster env)\"; \
         remove it: cargo xtask demo --down",
        started.elapsed()
    );
    Ok(())
}

/// Removes the demo when it is installed: its operator reconciles every policy in the cluster,
/// the tests' included, and would fight the tests' own operator instances over them.
pub fn remove_if_installed(env: Vec<(String, String)>, helm: &std::path::Path) -> Result<()> {
    let demo = Demo::new(env)?;
    let helm = helm.display().to_string();
    if demo
        .quiet(&helm, &["status", RELEASE, "--namespace", NAMESPACE])
        .is_ok()
    {
        println!(
            "the demo is installed; removing it (cargo xtask demo --down) so it leaves the tests' policies alone"
        );
        demo.down()?;
    }
    Ok(())
}

fn phase<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    println!("==> {name}");
    let out = f().with_context(|| format!("demo step `{name}` failed"))?;
    println!("<== {name} ({:.1?})", started.elapsed());
    Ok(out)
}

struct Demo {
    env: Vec<(String, String)>,
    root: PathBuf,
    state: PathBuf,
}

impl Demo {
    fn new(env: Vec<(String, String)>) -> Result<Self> {
        let state = env
            .iter()
            .find(|(k, _)| k == "NODEGATE_CLUSTER_DIR")
            .map(|(_, v)| PathBuf::from(v))
            .context("the cluster gave no state dir")?;
        Ok(Self {
            env,
            root: crate::workspace_root(),
            state,
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.root);
        c
    }

    /// Runs a command quietly; its stdout, or an error with its stderr.
    fn quiet(&self, program: &str, args: &[&str]) -> Result<String> {
        self.quiet_stdin(program, args, None)
    }

    fn quiet_stdin(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        use std::io::Write;
        let mut c = self.command(program);
        c.args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            });
        let mut child = c.spawn().with_context(|| format!("cannot run {program}"))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{program} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.quiet("kubectl", args)
    }

    fn install(&self, helm: &std::path::Path, images: &crate::image::Images) -> Result<()> {
        let (op_repo, op_tag) = split_ref(&images.operator)?;
        let (ag_repo, ag_tag) = split_ref(&images.agent)?;
        // Both nodes' kubelet certificates (self-signed, each naming its node), written by
        // `cluster up`; each agent checks its own node's name.
        let ca = self.state.join("kubelets-ca.crt");
        let helm = helm.display().to_string();
        let ca_arg = format!("agent.upstream.ca.bundle={}", ca.display());
        let sets = [
            format!("operator.image.repository={op_repo}"),
            format!("operator.image.tag={op_tag}"),
            format!("agent.image.repository={ag_repo}"),
            format!("agent.image.tag={ag_tag}"),
            // The local kubelets' serving certificates are self-signed and name their node.
            "agent.upstream.serverName=$(NODE_NAME)".to_string(),
            // The demo shows container logs through the agent: they need the kubelet's
            // nodes/proxy, which the chart grants the agent only on request (on every node:
            // docs/security.md says what a thief of the agent's token then gets).
            "agent.kubeletAccess.proxy=true".to_string(),
        ];
        let mut args: Vec<&str> = vec![
            "upgrade",
            "--install",
            RELEASE,
            "charts/nodegate",
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            "5m",
            "--set-file",
            &ca_arg,
        ];
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        let out = self.quiet(&helm, &args)?;
        println!("{}", first_lines(&out, 6));
        Ok(())
    }

    fn workloads(&self) -> Result<()> {
        self.quiet_stdin("kubectl", &["apply", "-f", "-"], Some(&workloads()))?;
        self.kubectl(&["apply", "-f", SAMPLE])?;
        for team in TEAMS {
            self.kubectl(&[
                "wait",
                "--for=condition=Ready",
                "pod/web",
                "-n",
                team,
                "--timeout=120s",
            ])?;
        }
        Ok(())
    }

    fn wait_ready(&self) -> Result<()> {
        self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("nap/{POLICY}"),
            &format!("nap/{LOGS_POLICY}"),
            "--timeout=120s",
        ])?;
        // node-1's config, which the checks below use (a Node object without a kubelet, such
        // as a test's, never gets an agent to bring its config in sync).
        self.kubectl(&[
            "wait",
            "--for=condition=InSync",
            "nac/node-1",
            "--timeout=120s",
        ])?;
        Ok(())
    }

    /// The five results, each a real command with its real output, and checked.
    fn show(&self) -> Result<()> {
        let token = self.kubectl(&["create", "token", "mymonitoring", "-n", "monitoring"])?;
        let developer = self.kubectl(&["create", "token", "developer", "-n", "team-a"])?;
        let agent = self.agent_address()?;
        let node_ip = self.kubectl(&[
            "get",
            "node",
            "node-1",
            "-o",
            "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
        ])?;
        let node_ip = node_ip.trim();
        let env = [
            ("TOKEN", token.trim()),
            ("DEV", developer.trim()),
            ("AGENT", agent.as_str()),
            ("NODE", node_ip),
        ];
        println!(
            "\nTOKEN: monitoring/mymonitoring's token ({SAMPLE}: cadvisor, resource, pods of team-a)\n\
             DEV:   team-a/developer's token (policy {LOGS_POLICY}: containerLogs of team-a)\n\
             AGENT: the agent on node-1 ({agent}); NODE: node-1's kubelet ({node_ip})"
        );

        // 1. A scrape through the agent: only team-a's series.
        let out = self.shown(
            "1. cAdvisor metrics through the agent, series counted by namespace",
            r#"curl -sk -H "Authorization: Bearer $TOKEN" https://$AGENT/metrics/cadvisor | grep -o 'namespace="[^"]*"' | sort | uniq -c"#,
            &env,
        )?;
        let namespaces: Vec<&str> = out.lines().filter_map(|l| l.split('"').nth(1)).collect();
        if namespaces != ["team-a"] {
            bail!("expected only team-a series through the agent, got {namespaces:?}");
        }
        // 2. The same token on the real kubelet: its RBAC is on nodegate's resource, which the
        //    kubelet never consults.
        let out = self.shown(
            "2. the same token on the real kubelet",
            r#"curl -sk -w 'HTTP %{http_code}\n' -H "Authorization: Bearer $TOKEN" https://$NODE:10250/metrics/cadvisor"#,
            &env,
        )?;
        expect_status(&out, 403)?;
        // 3. Container logs: the developer's own namespace, then another one.
        let out = self.shown(
            "3. container logs through the agent: team-a's, then team-b's",
            r#"curl -sk -w 'HTTP %{http_code}\n' -H "Authorization: Bearer $DEV" "https://$AGENT/containerLogs/team-a/web/web?tailLines=1"
curl -sk -w 'HTTP %{http_code}\n' -H "Authorization: Bearer $DEV" "https://$AGENT/containerLogs/team-b/web/web?tailLines=1""#,
            &env,
        )?;
        if !(out.contains("hello from team-a") && out.contains("HTTP 200")) {
            bail!("expected team-a's logs for the developer");
        }
        expect_status(&out, 403)?;
        // 4. A WebSocket exec by a read-only subject: streaming is `create`, never a read.
        let out = self.shown(
            "4. a WebSocket exec into team-a's pod by the developer, who may only read logs",
            r#"curl -sk -w 'HTTP %{http_code}\n' -H "Authorization: Bearer $DEV" -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: ZGVtby1rZXktMDEyMzQ1Ng==' -H 'Sec-WebSocket-Protocol: v5.channel.k8s.io' "https://$AGENT/exec/team-a/web/web?command=id&output=1""#,
            &env,
        )?;
        expect_status(&out, 403)?;
        // 5. The objects' status.
        self.shown("5. policies and agent configs", "kubectl get nap,nac", &env)?;
        // Checked by their conditions, not by the table: any "True" in it would do otherwise.
        for policy in [POLICY, LOGS_POLICY] {
            let ready = self.condition("nodeapipolicy", policy, "Ready")?;
            if ready != "True" {
                bail!("expected policy {policy} Ready=True, it is {ready:?}");
            }
        }
        let in_sync = self.condition("nodeagentconfig", "node-1", "InSync")?;
        if in_sync != "True" {
            bail!("expected node-1's agent config InSync=True, it is {in_sync:?}");
        }
        Ok(())
    }

    /// The status of one condition of an object (empty when it has none of that type).
    fn condition(&self, kind: &str, name: &str, condition: &str) -> Result<String> {
        let path = format!("jsonpath={{.status.conditions[?(@.type==\"{condition}\")].status}}");
        Ok(self
            .kubectl(&["get", kind, name, "-o", &path])?
            .trim()
            .to_string())
    }

    /// Prints `$ command` and its output, through `sh -c` so pipes work as typed.
    fn shown(&self, title: &str, script: &str, env: &[(&str, &str)]) -> Result<String> {
        println!("\n{title}\n$ {script}");
        let out = self
            .command("sh")
            .args(["-c", script])
            .envs(env.iter().copied())
            .output()
            .with_context(|| format!("cannot run {script}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{}", indent(&text));
        Ok(text)
    }

    /// The agent on node-1: its pod IP and secure port (or the node IP with hostNetwork).
    fn agent_address(&self) -> Result<String> {
        let ip = self.kubectl(&[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=agent",
            "--field-selector",
            "spec.nodeName=node-1",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])?;
        if ip.trim().is_empty() {
            bail!("no agent pod on node-1");
        }
        Ok(format!("{}:10350", ip.trim()))
    }

    fn down(&self) -> Result<()> {
        let helm = crate::helm::ensure()?;
        let _ = self.kubectl(&["delete", "-f", SAMPLE, "--ignore-not-found", "--wait"]);
        let _ = self.kubectl(&["delete", "nap", LOGS_POLICY, "--ignore-not-found", "--wait"]);
        match self.quiet(
            &helm.display().to_string(),
            &["uninstall", RELEASE, "--namespace", NAMESPACE, "--wait"],
        ) {
            Ok(_) => println!("helm release {RELEASE} uninstalled"),
            Err(e) if e.to_string().contains("not found") => {
                println!("helm release {RELEASE}: not installed")
            }
            Err(e) => return Err(e),
        }
        // NodeAgentConfigs are owned by their Node and rule sets by no one, so they outlive the
        // operator: remove those the (uninstanced) operator wrote. The CRDs stay, as Helm
        // leaves them.
        self.kubectl(&[
            "delete",
            "nac,nars",
            "-l",
            "app.kubernetes.io/managed-by=nodegate,!nodegate.io/instance",
            "--ignore-not-found",
        ])?;
        println!(
            "the operator's NodeAgentConfigs and NodeAgentRuleSets deleted (the CRDs stay, as with helm uninstall)"
        );
        for ns in ["team-a", "team-b", "monitoring", NAMESPACE] {
            self.kubectl(&[
                "delete",
                "namespace",
                ns,
                "--ignore-not-found",
                "--wait=true",
            ])?;
            println!("namespace {ns} deleted");
        }
        println!("the cluster keeps running; `cargo xtask cluster down` stops it");
        Ok(())
    }
}

fn split_ref(image: &str) -> Result<(&str, &str)> {
    image
        .rsplit_once(':')
        .with_context(|| format!("image reference {image} has no tag"))
}

fn expect_status(out: &str, code: u16) -> Result<()> {
    if !out.contains(&format!("HTTP {code}")) {
        bail!("expected HTTP {code}");
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn first_lines(text: &str, n: usize) -> String {
    text.lines().take(n).collect::<Vec<_>>().join("\n")
}
