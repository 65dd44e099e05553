//! The Helm chart (charts/nodegate) and the kustomize manifests (config/), checked by the real
//! tools: `helm lint`, `helm template` with the default values and with every option on
//! (charts/nodegate/ci/*.yaml), each applied to the real API server with `--dry-run=server` (the
//! API server is the schema validator, strict field validation included); `kubectl kustomize
//! config` the same way; the RBAC both give the agent and the operator, derived from the endpoint
//! catalogue; the admission policy that keeps the agent to its own node's NodeAgentConfig, on a
//! real API server; and a real `helm upgrade --install` with the images `cargo xtask image` built.
//!
//! helm: `$NODEGATE_HELM` (`cargo xtask test` exports it), else `cargo xtask helm --path`.
//! Images: `$NODEGATE_OPERATOR_IMAGE` and `$NODEGATE_AGENT_IMAGE` (`cargo xtask test` exports
//! them); without them the install test fails, unless the cluster tests are skipped
//! (`NODEGATE_SKIP_CLUSTER=1`).
//!
//! Run with `cargo xtask test`, or after `eval "$(cargo xtask cluster env)"` with
//! `cargo test -p nodegate-tests --test chart`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use nodegate_agent::kubelet_access::KubeletAccess;
use nodegate_crds::{Endpoint, NodeAgentConfig};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{NODE_NAME, NODE2_NAME, TEST_LABEL, unique_name};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The Kubernetes version `helm template` renders for (the local cluster's).
const KUBE_VERSION: &str = "1.37.1";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn chart() -> PathBuf {
    repo("charts/nodegate")
}

/// The values files of charts/nodegate/ci: every option on, and the other upstream credential.
fn ci_values() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "charts/nodegate/ci has too few values files"
    );
    files
}

fn skipping_cluster_tests() -> bool {
    std::env::var_os("NODEGATE_SKIP_CLUSTER").is_some_and(|v| v == "1")
}

/// The helm binary: `$NODEGATE_HELM`, else the one `cargo xtask helm` builds and caches. `None`
/// (the test skips, saying so) only when cluster tests are skipped anyway; otherwise a missing
/// helm is a failure, never a silent pass.
fn helm() -> Option<PathBuf> {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = HELM.get_or_init(|| {
        if let Some(path) = std::env::var_os("NODEGATE_HELM").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        let root = repo("");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // A target dir of its own: the outer `cargo test` may hold the workspace's build lock.
        let out = Command::new(cargo)
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", root.join("target/xtask-from-tests"))
            .args(["xtask", "helm", "--path"])
            .output()
            .map_err(|e| e.to_string())?;
        let path = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        if out.status.success() && Path::new(&path).is_file() {
            Ok(PathBuf::from(path))
        } else {
            Err(format!(
                "NODEGATE_HELM is unset and `cargo xtask helm --path` failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    match found {
        Ok(path) => Some(path.clone()),
        Err(e) if skipping_cluster_tests() => {
            // Counted as a skip (the run asked to skip cluster tests), never as a pass.
            nodegate_tests::skip::record(
                nodegate_tests::skip::Class::Cluster,
                &format!("no helm ({e})"),
            );
            None
        }
        Err(e) => panic!("{e}\nRun `cargo xtask test`, or set NODEGATE_HELM to a helm binary."),
    }
}

/// Runs a command; stdout, or a panic with the command and its stderr.
fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String, String> {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(format!("{stdout}{}", stderr_marker(&stderr)))
    } else {
        Err(format!("{cmd:?} failed:\n{stderr}\n{stdout}"))
    }
}

/// Warnings (stderr of a successful command) are appended after this marker, so callers can
/// check them; YAML parsing stops at it.
const STDERR: &str = "\n#### stderr\n";

fn stderr_marker(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!("{STDERR}{stderr}")
    }
}

fn split_stderr(out: &str) -> (&str, &str) {
    out.split_once(STDERR).unwrap_or((out, ""))
}

/// `helm template <release> charts/nodegate -n <namespace> <args…>`.
fn template(helm: &Path, release: &str, namespace: &str, args: &[&str]) -> Result<String, String> {
    let out = run(
        Command::new(helm)
            .args(["template", release])
            .arg(chart())
            .args(["--namespace", namespace, "--kube-version", KUBE_VERSION])
            .args(args),
        None,
    )?;
    Ok(split_stderr(&out).0.to_string())
}

/// The agent container's arguments in a rendered chart.
fn agent_args(objects: &[Value]) -> Vec<String> {
    let ds = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("the agent DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The objects of a multi-document YAML stream.
fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// A role's rules as (apiGroup, resource, verb, resourceNames) rows, so two ways of writing the
/// same grants compare equal.
fn rule_rows(role: &Value) -> BTreeSet<(String, String, String, String)> {
    let mut rows = BTreeSet::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        let list = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let names = list("resourceNames").join(",");
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    rows.insert((group.clone(), resource.clone(), verb, names.clone()));
                }
            }
        }
    }
    rows
}

fn row(group: &str, resource: &str, verb: &str) -> (String, String, String, String) {
    (group.into(), resource.into(), verb.into(), String::new())
}

/// What the agent asks of the kubelet with the credential `access` says it holds: every
/// granted `nodes/<subresource>` the kubelet checks for an endpoint the agent proxies, with the
/// endpoint's verbs.
fn expected_agent_kubelet_rules(
    access: &KubeletAccess,
) -> BTreeSet<(String, String, String, String)> {
    let mut rows = BTreeSet::new();
    for endpoint in Endpoint::all() {
        for subresource in endpoint
            .spec()
            .subresources
            .iter()
            .filter(|s| access.contains(**s))
        {
            for verb in endpoint.verbs() {
                rows.insert(row(
                    "",
                    &format!("nodes/{}", subresource.as_str()),
                    verb.as_str(),
                ));
            }
        }
    }
    rows
}

/// What the agent asks of the API server (node-agent/src/config.rs, authn.rs, authz.rs).
fn expected_agent_api_rules() -> BTreeSet<(String, String, String, String)> {
    [
        row("nodegate.io", "nodeagentconfigs", "get"),
        row("nodegate.io", "nodeagentconfigs", "list"),
        row("nodegate.io", "nodeagentconfigs", "watch"),
        row("nodegate.io", "nodeagentrulesets", "get"),
        row("nodegate.io", "nodeagentrulesets", "list"),
        row("nodegate.io", "nodeagentrulesets", "watch"),
        row("nodegate.io", "nodeagentconfigs/status", "patch"),
        row("", "nodes", "get"),
        row("", "nodes", "list"),
        row("", "nodes", "watch"),
        row("authentication.k8s.io", "tokenreviews", "create"),
        row("authorization.k8s.io", "subjectaccessreviews", "create"),
    ]
    .into_iter()
    .collect()
}

/// The value of the agent container's `--kubelet-access` flag (it must be given).
fn kubelet_access_arg(daemonset: &Value) -> String {
    let args = &daemonset["spec"]["template"]["spec"]["containers"][0]["args"];
    args.as_array()
        .into_iter()
        .flatten()
        .find_map(|a| a.as_str()?.strip_prefix("--kubelet-access="))
        .unwrap_or_else(|| panic!("the agent has no --kubelet-access: {args}"))
        .to_string()
}

fn read_objects(path: &str) -> Vec<Value> {
    objects(&std::fs::read_to_string(repo(path)).unwrap())
}

#[test]
fn chart_version_is_the_workspace_version() {
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
}

/// The chart ships the generated CRDs, unchanged (`cargo xtask generate` writes them; the
/// generated-files check says when they are stale).
#[test]
fn chart_crds_are_the_generated_ones() {
    let generated = nodegate_crds::crd::generated_files().unwrap();
    let mut in_chart: Vec<String> = std::fs::read_dir(chart().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    in_chart.sort();
    let mut expected = Vec::new();
    for (path, text) in &generated {
        if let Some(name) = path.strip_prefix("charts/nodegate/crds/") {
            expected.push(name.to_string());
            let ours = std::fs::read_to_string(chart().join("crds").join(name)).unwrap();
            assert_eq!(
                &ours, text,
                "charts/nodegate/crds/{name} is stale: run `cargo xtask generate`"
            );
            let config = std::fs::read_to_string(repo("config/crd").join(name)).unwrap();
            assert_eq!(
                &config, text,
                "config/crd/{name} is stale: run `cargo xtask generate`"
            );
        }
    }
    expected.sort();
    assert!(!expected.is_empty());
    assert_eq!(in_chart, expected, "charts/nodegate/crds holds other files");
}

/// The chart's example policies are the samples of config/samples (which the CRD tests admit).
#[test]
fn chart_examples_are_the_samples() {
    let dir = chart().join("examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let sample = repo("config/samples").join(name);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            std::fs::read_to_string(&sample)
                .unwrap_or_else(|_| panic!("{} has no config/samples twin", path.display())),
            "{} differs from {}",
            path.display(),
            sample.display()
        );
        count += 1;
    }
    assert!(count >= 5);
}

#[test]
fn helm_lint_passes_strict_with_every_values_file() {
    let Some(helm) = helm() else { return };
    let mut cases: Vec<Vec<String>> = vec![vec![], vec!["--strict".into()]];
    for file in ci_values() {
        cases.push(vec![
            "--strict".into(),
            "-f".into(),
            file.display().to_string(),
        ]);
    }
    for args in cases {
        let out = run(
            Command::new(&helm)
                .arg("lint")
                .arg(chart())
                .args(["--kube-version", KUBE_VERSION])
                .args(&args),
            None,
        )
        .unwrap();
        assert!(out.contains("0 chart(s) failed"), "{args:?}: {out}");
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{args:?}: {out}"
        );
    }
}

/// values.schema.json is strict: a typo'd key or a value outside an enum is an error, not a
/// silent default.
#[test]
fn values_schema_rejects_typos() {
    let Some(helm) = helm() else { return };
    for (set, says) in [
        (
            "operator.replicaz=3",
            "additional properties 'replicaz' not allowed",
        ),
        (
            "agent.upstream.insecureSkipTlsVerify=true",
            "additional properties",
        ),
        (
            "agnet.hostNetwork=true",
            "additional properties 'agnet' not allowed",
        ),
        ("agent.upstream.auth=tokens", "value must be one of"),
        ("agent.tls.mode=self-signed", "value must be one of"),
        ("agent.ports.secure=0", "minimum"),
    ] {
        let err = template(&helm, "typo", "default", &["--set", set]).unwrap_err();
        assert!(err.contains(says), "--set {set}: {err}");
    }
    // And the template's own checks, for what a schema cannot say.
    for (sets, says) in [
        (
            vec!["agent.upstream.auth=clientCertificate"],
            "agent.upstream.clientCertificate.secretName is required",
        ),
        (
            vec!["agent.tls.mode=secret"],
            "agent.tls.secretName is required",
        ),
        (
            vec!["agent.tls.mode=certManager"],
            "agent.tls.certManager.issuerRef.name is required",
        ),
        (
            vec![
                "agent.serviceMonitor.enabled=true",
                "agent.service.enabled=false",
            ],
            "needs agent.service.enabled",
        ),
    ] {
        let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
        let err = template(&helm, "typo", "default", &args).unwrap_err();
        assert!(err.contains(says), "{sets:?}: {err}");
    }
}

/// The agent's RBAC, in the chart (every values file) and in config/rbac/agent, is exactly what
/// the catalogue and the agent's code need; the kubelet grants go to whoever calls the kubelet.
#[test]
fn agent_rbac_is_what_the_catalogue_says() {
    let kubelet = expected_agent_kubelet_rules(&KubeletAccess::fine_grained());
    let api = expected_agent_api_rules();
    // Sanity: the derived lists are what a reader expects: by default no nodes/proxy and no
    // nodes/checkpoint at all; with them, exec etc. are create, never get.
    assert!(kubelet.contains(&row("", "nodes/metrics", "get")));
    assert!(kubelet.contains(&row("", "nodes/log", "get")));
    assert!(!kubelet.contains(&row("", "nodes/metrics", "create")));
    assert!(
        kubelet
            .iter()
            .all(|r| r.1 != "nodes/proxy" && r.1 != "nodes/checkpoint"),
        "{kubelet:?}"
    );
    let with_proxy = expected_agent_kubelet_rules(&KubeletAccess::all());
    assert!(with_proxy.contains(&row("", "nodes/proxy", "create")));
    assert!(with_proxy.contains(&row("", "nodes/checkpoint", "create")));

    // config/rbac/agent
    let config = [
        read_objects("config/rbac/agent/cluster_role.yaml"),
        read_objects("config/rbac/agent/kubelet_cluster_role.yaml"),
    ]
    .concat();
    let role = find(&config, "ClusterRole", "nodegate-agent").unwrap();
    assert_eq!(rule_rows(role), api, "config/rbac/agent/cluster_role.yaml");
    let role = find(&config, "ClusterRole", "nodegate-agent-kubelet").unwrap();
    assert_eq!(
        rule_rows(role),
        kubelet,
        "config/rbac/agent/kubelet_cluster_role.yaml"
    );
    let daemonset = read_objects("config/agent/daemonset.yaml");
    assert_eq!(
        kubelet_access_arg(&daemonset[0]).parse::<KubeletAccess>(),
        Ok(KubeletAccess::fine_grained()),
        "config/agent/daemonset.yaml --kubelet-access"
    );
    let binding = find(&config, "ClusterRoleBinding", "nodegate-agent-kubelet").unwrap();
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "nodegate-agent", "namespace": "nodegate-system"}])
    );

    let Some(helm) = helm() else { return };
    let mut renders = vec![("default values".to_string(), vec![])];
    for file in ci_values() {
        renders.push((
            file.display().to_string(),
            vec!["-f".to_string(), file.display().to_string()],
        ));
    }
    for (what, args) in renders {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let objs = objects(&template(&helm, "rel", "ns", &args).unwrap());
        let agent_sa = objs
            .iter()
            .find(|o| o["kind"] == "DaemonSet")
            .map(|d| d["spec"]["template"]["spec"]["serviceAccountName"].clone())
            .unwrap();
        let role = find(&objs, "ClusterRole", "rel-nodegate-agent").unwrap();
        assert_eq!(rule_rows(role), api, "{what}: agent ClusterRole");
        let daemonset = objs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        let agent_args = daemonset["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        // The agent is told what its credential holds, and RBAC grants exactly that.
        let access: KubeletAccess = kubelet_access_arg(daemonset).parse().unwrap();
        if what == "default values" {
            assert_eq!(access, KubeletAccess::fine_grained(), "{what}");
        }
        let role = find(&objs, "ClusterRole", "rel-nodegate-agent-kubelet").unwrap();
        assert_eq!(
            rule_rows(role),
            expected_agent_kubelet_rules(&access),
            "{what}: agent kubelet ClusterRole"
        );
        let binding = find(&objs, "ClusterRoleBinding", "rel-nodegate-agent-kubelet").unwrap();
        if agent_args.contains("--upstream-token-file") {
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": agent_sa, "namespace": "ns"}]),
                "{what}"
            );
        } else {
            // A client certificate calls the kubelet: its user gets the grants, not the account.
            assert!(agent_args.contains("--upstream-client-cert-file"), "{what}");
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "nodegate-agent"}]),
                "{what}"
            );
        }
        // Nothing else is bound to the agent.
        let roles: Vec<&Value> = objs
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
            .filter(|o| o["metadata"]["name"].as_str().unwrap().contains("-agent"))
            .collect();
        assert_eq!(roles.len(), 2, "{what}");
    }
}

/// The operator's RBAC in the chart is config/rbac's (which operator_rbac checks against the
/// catalogue), with the core `nodes/*` grants only when directKubeletAccess is enabled.
#[test]
fn operator_rbac_is_config_rbac_with_direct_access_optional() {
    let Some(helm) = helm() else { return };
    let config = read_objects("config/rbac/cluster_role.yaml");
    let expected = rule_rows(&config[0]);
    let direct: BTreeSet<_> = expected
        .iter()
        .filter(|r| r.1.starts_with("nodes/"))
        .cloned()
        .collect();
    assert!(!direct.is_empty());

    let on = objects(
        &template(
            &helm,
            "rel",
            "ns",
            &["--set", "operator.directKubeletAccess.enabled=true"],
        )
        .unwrap(),
    );
    let main = rule_rows(find(&on, "ClusterRole", "rel-nodegate-operator").unwrap());
    let extra = rule_rows(find(&on, "ClusterRole", "rel-nodegate-operator-direct").unwrap());
    assert_eq!(
        extra, direct,
        "the -direct role holds exactly the nodes/* grants"
    );
    assert_eq!(
        main.union(&extra).cloned().collect::<BTreeSet<_>>(),
        expected,
        "chart operator roles ≠ config/rbac/cluster_role.yaml"
    );
    assert!(find(&on, "ClusterRoleBinding", "rel-nodegate-operator-direct").is_some());
    let lease = find(&on, "Role", "rel-nodegate-operator-leader-election").unwrap();
    let config_lease = read_objects("config/rbac/leader_election.yaml");
    assert_eq!(rule_rows(lease), rule_rows(&config_lease[0]));

    let off = objects(&template(&helm, "rel", "ns", &[]).unwrap());
    assert!(find(&off, "ClusterRole", "rel-nodegate-operator-direct").is_none());
    assert!(find(&off, "ClusterRoleBinding", "rel-nodegate-operator-direct").is_none());
    for role in off.iter().filter(|o| o["kind"] == "ClusterRole") {
        assert!(
            !rule_rows(role).iter().any(|r| r.1.starts_with("nodes/")
                && !role["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .ends_with("-agent-kubelet")),
            "{role}"
        );
    }
}

/// Both workloads, rendered with the defaults: restricted Pod Security, probes, downward API.
#[test]
fn workloads_are_restricted_and_probed() {
    let Some(helm) = helm() else { return };
    let objs = objects(&template(&helm, "rel", "ns", &[]).unwrap());
    for (kind, probe_port) in [("Deployment", "metrics"), ("DaemonSet", "metrics")] {
        let w = objs.iter().find(|o| o["kind"] == kind).unwrap();
        let pod = &w["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{kind}");
        assert_eq!(pod["securityContext"]["runAsUser"], 65532, "{kind}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{kind}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{kind}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{kind}");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], probe_port, "{kind}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{kind}");
        assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());
        assert!(
            pod["hostNetwork"].is_null(),
            "{kind}: no host network by default"
        );
    }
    let deployment = objs.iter().find(|o| o["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("\"run\"") && args.contains("--leader-elect=true"),
        "{args}"
    );
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(
        env.contains("POD_NAME") && env.contains("POD_NAMESPACE"),
        "{env}"
    );

    let daemonset = objs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    let env = pod["containers"][0]["env"].to_string();
    assert!(
        env.contains("spec.nodeName") && env.contains("status.hostIP"),
        "{env}"
    );
    let token = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "upstream-token")
        .unwrap();
    let projection = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projection["expirationSeconds"], 3600);
    assert!(
        projection["audience"].is_null(),
        "default: the API server's audience"
    );
    let args = pod["containers"][0]["args"].to_string();
    assert!(args.contains("--upstream-token-file="), "{args}");
    assert!(
        args.contains("--upstream-ca-file=/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"),
        "{args}"
    );
    assert!(!args.contains("insecure"), "{args}");
    assert!(
        !args.contains("--tls-cert-file"),
        "self-signed by default: {args}"
    );
    // Nothing optional by default.
    for kind in [
        "ServiceMonitor",
        "Certificate",
        "NodeApiPolicy",
        "ConfigMap",
    ] {
        assert!(
            !objs.iter().any(|o| o["kind"] == kind),
            "{kind} rendered by default"
        );
    }

    // With hostNetwork the agent binds to the node's IP.
    let objs =
        objects(&template(&helm, "rel", "ns", &["--set", "agent.hostNetwork=true"]).unwrap());
    let daemonset = objs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    let args = pod["containers"][0]["args"].to_string();
    assert!(args.contains("--bind-address=$(NODE_IP)"), "{args}");
}

/// Minimal structural CRDs for the kinds the chart writes but Kubernetes does not serve:
/// monitoring.coreos.com/v1 ServiceMonitor and cert-manager.io/v1 Certificate. Each schema is
/// the subset of the upstream CRD's (prometheus-operator, cert-manager) that the chart uses,
/// with the upstream types, enums, patterns and required fields and no
/// `x-kubernetes-preserve-unknown-fields`, so that the API server's strict field validation in
/// `--dry-run=server` refuses a misspelt or mistyped field, as the real CRDs would. Installed
/// only when the cluster has no CRD of that name (a real one is a better validator).
const THIRD_PARTY_CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
  labels: {nodegate.io/test-fixture: subset-of-upstream-schema}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            apiVersion: {type: string}
            kind: {type: string}
            metadata: {type: object}
            spec:
              type: object
              required: [selector]
              properties:
                jobLabel: {type: string}
                selector:
                  type: object
                  properties:
                    matchLabels: {type: object, additionalProperties: {type: string}}
                namespaceSelector:
                  type: object
                  properties:
                    any: {type: boolean}
                    matchNames: {type: array, items: {type: string}}
                endpoints:
                  type: array
                  items:
                    type: object
                    properties:
                      port: {type: string}
                      path: {type: string}
                      scheme: {type: string, enum: [http, https, HTTP, HTTPS]}
                      interval: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                      scrapeTimeout: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                      relabelings:
                        type: array
                        items:
                          type: object
                          properties:
                            action: {type: string}
                            sourceLabels: {type: array, items: {type: string, pattern: '^[a-zA-Z_][a-zA-Z0-9_]*$'}}
                            targetLabel: {type: string}
                            regex: {type: string}
                            replacement: {type: string}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: certificates.cert-manager.io
  labels: {nodegate.io/test-fixture: subset-of-upstream-schema}
spec:
  group: cert-manager.io
  names: {kind: Certificate, listKind: CertificateList, plural: certificates, singular: certificate}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            apiVersion: {type: string}
            kind: {type: string}
            metadata: {type: object}
            spec:
              type: object
              required: [issuerRef, secretName]
              properties:
                secretName: {type: string}
                commonName: {type: string}
                duration: {type: string}
                renewBefore: {type: string}
                dnsNames: {type: array, items: {type: string}}
                ipAddresses: {type: array, items: {type: string}}
                usages:
                  type: array
                  items:
                    type: string
                    enum: [signing, digital signature, content commitment, key encipherment, key agreement, data encipherment, cert sign, crl sign, encipher only, decipher only, any, server auth, client auth, code signing, email protection, s/mime, ipsec end system, ipsec tunnel, ipsec user, timestamping, ocsp signing, microsoft sgc, netscape sgc]
                privateKey:
                  type: object
                  properties:
                    algorithm: {type: string, enum: [RSA, ECDSA, Ed25519]}
                    encoding: {type: string, enum: [PKCS1, PKCS8]}
                    rotationPolicy: {type: string, enum: [Never, Always]}
                    size: {type: integer}
                issuerRef:
                  type: object
                  required: [name]
                  properties:
                    name: {type: string}
                    kind: {type: string}
                    group: {type: string}
"#;

/// Installs [`THIRD_PARTY_CRDS`] where the cluster has no CRD of that name; once per process.
async fn ensure_third_party_crds(cluster: &Cluster) -> TestResult {
    static DONE: tokio::sync::Mutex<bool> = tokio::sync::Mutex::const_new(false);
    let mut done = DONE.lock().await;
    if *done {
        return Ok(());
    }
    for crd in objects(THIRD_PARTY_CRDS) {
        let name = crd["metadata"]["name"].as_str().unwrap();
        if cluster
            .run_kubectl(&["get", "crd", name, "-o", "name"])
            .await
            .is_ok()
        {
            continue;
        }
        let yaml = serde_yaml::to_string(&crd)?;
        let out = run(
            cluster
                .kubectl()
                .args(["apply", "--server-side", "-f", "-"]),
            Some(&yaml),
        );
        out.map_err(|e| format!("installing {name}: {e}"))?;
        cluster
            .run_kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{name}"),
            ])
            .await?;
    }
    *done = true;
    Ok(())
}

/// `kubectl apply --dry-run=server` of a YAML stream (server-side apply, so fields are
/// validated strictly); the warnings it printed.
fn dry_run(cluster: &Cluster, what: &str, yaml: &str) -> String {
    let out = run(
        cluster.kubectl().args([
            "apply",
            "--dry-run=server",
            "--server-side",
            "--force-conflicts",
            "--field-manager=nodegate-chart-test",
            "-f",
            "-",
        ]),
        Some(yaml),
    )
    .unwrap_or_else(|e| panic!("{what}: the API server refused it: {e}"));
    let (stdout, warnings) = split_stderr(&out);
    let applied = stdout
        .lines()
        .filter(|l| l.contains("(server dry run)"))
        .count();
    assert_eq!(
        applied,
        objects(yaml).len(),
        "{what}: not every object was applied:\n{stdout}"
    );
    warnings.to_string()
}

/// A namespace of this run where the restricted Pod Security profile is enforced and warned
/// about (a workload that breaks it gets a warning on apply).
async fn restricted_namespace(
    cluster: &Cluster,
    prefix: &str,
) -> Result<nodegate_tests::TestNamespace, Box<dyn std::error::Error + Send + Sync>> {
    let ns = cluster.namespace(prefix).await?;
    let labels = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
    }}});
    Api::<Namespace>::all(cluster.admin()?)
        .patch(ns.name(), &PatchParams::default(), &Patch::Merge(&labels))
        .await?;
    Ok(ns)
}

/// The chart, rendered with the default values and with each ci/ values file (CRDs included),
/// is accepted by the real API server; the defaults meet the restricted Pod Security profile.
#[tokio::test]
async fn chart_renders_objects_the_api_server_accepts() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let helm = helm().expect("helm, when the cluster tests run");
    cluster.install_crds().await?;
    ensure_third_party_crds(&cluster).await?;
    let ns = restricted_namespace(&cluster, "chart").await?;
    let release = unique_name("chart");
    let mut renders = vec![("default values".to_string(), vec![], true)];
    for file in ci_values() {
        let has_host_network = std::fs::read_to_string(&file)?.contains("hostNetwork: true");
        renders.push((
            file.display().to_string(),
            vec!["-f".to_string(), file.display().to_string()],
            !has_host_network,
        ));
    }
    for (what, args, restricted) in renders {
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.push("--include-crds");
        let yaml = template(&helm, &release, ns.name(), &args).unwrap();
        let kinds: BTreeSet<String> = objects(&yaml)
            .iter()
            .map(|o| o["kind"].as_str().unwrap().to_string())
            .collect();
        eprintln!("{what}: {kinds:?}");
        let warnings = dry_run(&cluster, &what, &yaml);
        if restricted {
            assert!(
                !warnings.contains("PodSecurity"),
                "{what} breaks the restricted profile:\n{warnings}"
            );
        } else {
            // hostNetwork is the one thing the restricted profile refuses.
            assert!(warnings.contains("host namespaces"), "{what}:\n{warnings}");
        }
    }
    Ok(())
}

/// `kubectl kustomize config` builds, holds what the chart holds, and the API server accepts it.
#[tokio::test]
async fn kustomize_config_builds_and_the_api_server_accepts_it() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    cluster.install_crds().await?;
    // Its objects live in nodegate-system; a dry run does not create the namespace for them.
    let _ = cluster
        .run_kubectl(&["create", "namespace", "nodegate-system"])
        .await;
    let yaml = cluster
        .run_kubectl(&["kustomize", &repo("config").display().to_string()])
        .await?;
    let objs = objects(&yaml);
    for (kind, name) in [
        ("CustomResourceDefinition", "nodeapipolicies.nodegate.io"),
        ("CustomResourceDefinition", "nodeagentconfigs.nodegate.io"),
        ("CustomResourceDefinition", "nodeagentrulesets.nodegate.io"),
        ("Namespace", "nodegate-system"),
        ("Deployment", "nodegate-operator"),
        ("PodDisruptionBudget", "nodegate-operator"),
        ("ClusterRole", "nodegate-operator"),
        ("Role", "nodegate-operator-leader-election"),
        ("DaemonSet", "nodegate-agent"),
        ("Service", "nodegate-agent"),
        ("ClusterRole", "nodegate-agent"),
        ("ClusterRole", "nodegate-agent-kubelet"),
        ("ValidatingAdmissionPolicy", "nodegate-agent-status"),
        ("ValidatingAdmissionPolicyBinding", "nodegate-agent-status"),
    ] {
        assert!(
            find(&objs, kind, name).is_some(),
            "kustomize config has no {kind} {name}"
        );
    }
    let warnings = dry_run(&cluster, "kubectl kustomize config", &yaml);
    assert!(!warnings.contains("PodSecurity"), "{warnings}");
    Ok(())
}

/// Deletes cluster-scoped objects of this test when dropped.
struct ClusterScoped<'a> {
    cluster: &'a Cluster,
    args: Vec<String>,
}

impl Drop for ClusterScoped<'_> {
    fn drop(&mut self) {
        let out = self
            .cluster
            .kubectl()
            .arg("delete")
            .args(&self.args)
            .args(["--ignore-not-found", "--wait=false"])
            .output();
        if let Err(e) = out {
            eprintln!(
                "warning: cleanup `kubectl delete {:?}` failed: {e}",
                self.args
            );
        }
    }
}

/// A client for the API server that authenticates with `token` only.
fn token_client(cluster: &Cluster, token: &str) -> kube::Client {
    cluster.with_token(token).unwrap()
}

/// The chart's ValidatingAdmissionPolicy, on a real API server: the agent's service account may
/// write the status of the NodeAgentConfig of the node its (pod-bound) token names, and of no
/// other; a token bound to no pod names no node and may write none.
#[tokio::test]
async fn agent_may_write_only_its_own_nodes_config_status() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let helm = helm().expect("helm, when the cluster tests run");
    cluster.install_crds().await?;
    let ns = cluster.namespace("chart-vap").await?;
    let release = unique_name("vap");
    let yaml = template(
        &helm,
        &release,
        ns.name(),
        &[
            "--show-only",
            "templates/agent/serviceaccount.yaml",
            "--show-only",
            "templates/agent/rbac.yaml",
            "--show-only",
            "templates/agent/admission-policy.yaml",
        ],
    )
    .unwrap();
    let _cleanup = ClusterScoped {
        cluster: &cluster,
        args: vec![
            "clusterrole,clusterrolebinding,validatingadmissionpolicy,validatingadmissionpolicybinding".into(),
            "-l".into(),
            format!("app.kubernetes.io/instance={release}"),
        ],
    };
    run(cluster.kubectl().args(["apply", "-f", "-"]), Some(&yaml)).unwrap();
    let account = format!("{release}-nodegate-agent");

    // Two nodes without kubelets, their configs, and a pod of the agent's account on the first
    // (it never runs: the node has no kubelet; its token is bound to it all the same).
    let nodes = cluster.fake_nodes("vap", 2, &[]).await?;
    let (own, other) = (nodes.names()[0].clone(), nodes.names()[1].clone());
    let _configs = ClusterScoped {
        cluster: &cluster,
        args: vec!["nodeagentconfigs".into(), own.clone(), other.clone()],
    };
    let configs = Api::<NodeAgentConfig>::all(cluster.admin()?);
    for node in [&own, &other] {
        let config = json!({
            "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeAgentConfig",
            "metadata": {"name": node, "labels": {TEST_LABEL: release}},
            "spec": {"hash": "test"},
        });
        configs
            .patch(
                node,
                &PatchParams::apply("nodegate-test"),
                &Patch::Apply(&config),
            )
            .await?;
    }
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "agent", "namespace": ns.name()},
        "spec": {
            "nodeName": own, "serviceAccountName": account,
            "containers": [{"name": "agent", "image": nodegate_tests::cluster::BUSYBOX_IMAGE}],
        },
    });
    run(
        cluster.kubectl().args(["apply", "-f", "-"]),
        Some(&pod.to_string()),
    )
    .unwrap();
    let bound = cluster
        .run_kubectl(&[
            "create",
            "token",
            &account,
            "-n",
            ns.name(),
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "agent",
        ])
        .await?;
    let unbound = cluster
        .run_kubectl(&["create", "token", &account, "-n", ns.name()])
        .await?;

    let write = |token: &str, node: &str| {
        let api = Api::<NodeAgentConfig>::all(token_client(&cluster, token));
        let node = node.to_string();
        let status = json!({
            "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeAgentConfig",
            "metadata": {"name": node},
            "status": {"observedHash": "test", "lastError": null},
        });
        async move {
            api.patch_status(
                &node,
                &PatchParams::apply("nodegate-agent"),
                &Patch::Apply(&status),
            )
            .await
        }
    };
    // The binding takes a moment to be enforced: wait until the other node's write is refused.
    let started = Instant::now();
    loop {
        match write(bound.trim(), &other).await {
            Err(kube::Error::Api(e))
                if e.code == 403 && e.message.contains("ValidatingAdmissionPolicy") =>
            {
                assert!(e.message.contains("its own node"), "{}", e.message);
                break;
            }
            other_result => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "another node's config status: expected the admission policy's 403, got {other_result:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    write(bound.trim(), &own)
        .await
        .expect("the agent writes its own node's config status");
    match write(unbound.trim(), &own).await {
        Err(kube::Error::Api(e)) if e.code == 403 => {
            assert!(e.message.contains("names no node"), "{}", e.message)
        }
        r => panic!("a token bound to no pod: expected 403, got {r:?}"),
    }
    // Other users are not affected (the admin writes any status). Forced: while the binding
    // was not yet enforced, the loop above may have written this status as `nodegate-agent`.
    let status = json!({
        "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeAgentConfig",
        "metadata": {"name": other}, "status": {"observedHash": "admin"},
    });
    configs
        .patch_status(
            &other,
            &PatchParams::apply("nodegate-test").force(),
            &Patch::Apply(&status),
        )
        .await?;
    Ok(())
}

/// `repository:tag` of an image reference.
fn split_image(reference: &str) -> (String, String) {
    let slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[slash..].rfind(':') {
        Some(i) => (
            reference[..slash + i].to_string(),
            reference[slash + i + 1..].to_string(),
        ),
        None => (reference.to_string(), "latest".to_string()),
    }
}

/// Prints what a failed rollout looked like.
async fn diagnose(cluster: &Cluster, ns: &str) -> String {
    let mut text = String::new();
    for args in [
        vec!["get", "pods,daemonsets,deployments", "-o", "wide", "-n", ns],
        vec!["describe", "pods", "-n", ns],
        vec![
            "logs",
            "-n",
            ns,
            "-l",
            "app.kubernetes.io/part-of=nodegate",
            "--all-containers",
            "--tail=40",
            "--prefix",
        ],
        vec!["get", "events", "-n", ns, "--sort-by=.lastTimestamp"],
    ] {
        let out = cluster.run_kubectl(&args).await;
        text.push_str(&format!(
            "$ kubectl {}\n{}\n",
            args.join(" "),
            out.unwrap_or_else(|e| e.to_string())
        ));
    }
    text
}

/// curl with the given extra arguments; (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// The real thing: `helm upgrade --install` with the images `cargo xtask image` built and
/// imported into the node, the values the local cluster needs (its kubelet's self-signed CA and
/// server name), the operator Deployment Available, the agent DaemonSet ready, and the agent
/// answering: /healthz, and an authenticated, policy-filtered /pods.
///
/// The operator runs as a named instance with a policy selector of its own, so it touches only
/// this test's policy and objects; the agent on node-1 enforces node-1's NodeAgentConfig.
#[tokio::test]
async fn helm_install_runs_operator_and_agents() -> TestResult {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let helm = helm().expect("helm, when the cluster tests run");
    let (Some(operator_image), Some(agent_image)) = (
        std::env::var("NODEGATE_OPERATOR_IMAGE")
            .ok()
            .filter(|v| !v.is_empty()),
        std::env::var("NODEGATE_AGENT_IMAGE")
            .ok()
            .filter(|v| !v.is_empty()),
    ) else {
        panic!(
            "NODEGATE_OPERATOR_IMAGE and NODEGATE_AGENT_IMAGE are not set: run `cargo xtask test` \
             (it builds the images and imports them into the node), or `cargo xtask image` and \
             export what it prints; NODEGATE_SKIP_CLUSTER=1 skips the cluster tests"
        );
    };
    cluster.install_crds().await?;
    let ns = restricted_namespace(&cluster, "chart-install").await?;
    let release = unique_name("ng");
    let fullname = format!("{release}-nodegate");
    let (op_repo, op_tag) = split_image(&operator_image);
    let (agent_repo, agent_tag) = split_image(&agent_image);

    let _outputs = ClusterScoped {
        cluster: &cluster,
        args: vec![
            "nodeagentconfigs,nodeagentrulesets,clusterroles,clusterrolebindings,nodeapipolicies"
                .into(),
            "-l".into(),
            format!("nodegate.io/instance={release}"),
        ],
    };
    let _policies = ClusterScoped {
        cluster: &cluster,
        args: vec![
            "nodeapipolicies".into(),
            "-l".into(),
            format!("{TEST_LABEL}={release}"),
        ],
    };
    let _release = ClusterScoped {
        cluster: &cluster,
        args: vec![
            "clusterrole,clusterrolebinding,validatingadmissionpolicy,validatingadmissionpolicybinding".into(),
            "-l".into(),
            format!("app.kubernetes.io/instance={release}"),
        ],
    };

    let mut sets = vec![
        format!("operator.image.repository={op_repo}"),
        format!("operator.image.tag={op_tag}"),
        "operator.image.pullPolicy=Never".to_string(),
        format!("agent.image.repository={agent_repo}"),
        format!("agent.image.tag={agent_tag}"),
        "agent.image.pullPolicy=Never".to_string(),
        format!("operator.instance={release}"),
        format!("operator.policySelector={TEST_LABEL}={release}"),
    ];
    let mut args: Vec<String> = vec![];
    if let Some(state) = &cluster.location().state_dir {
        // The real nodes only (not the fake Node objects of tests running alongside): the
        // DaemonSet's agent on each real node becomes ready once its config is loaded. Helm's
        // --set splits on an unescaped comma.
        sets.push(format!(
            "operator.nodeLabelSelector=kubernetes.io/hostname in ({NODE_NAME}\\,{NODE2_NAME})"
        ));
        // The DaemonSet on the nodes a kubelet registered (they carry kubernetes.io/os), not on
        // Node objects without a kubelet that other tests' fake nodes are: a pod there never
        // becomes ready and the rollout would never finish.
        sets.push("agent.nodeSelector.kubernetes\\.io/os=linux".to_string());
        // The local kubelets' serving certificates are self-signed and name their node: the
        // bundle of both, and each agent checks its own node's name.
        args.push("--set-file".into());
        args.push(format!(
            "agent.upstream.ca.bundle={}",
            state.join("kubelets-ca.crt").display()
        ));
        sets.push("agent.upstream.serverName=$(NODE_NAME)".to_string());
    } else {
        sets.push(format!(
            "operator.nodeLabelSelector=kubernetes.io/hostname={NODE_NAME}"
        ));
    }
    for s in &sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let install = run(
        Command::new(&helm)
            .env("KUBECONFIG", &cluster.location().kubeconfig)
            .args(["upgrade", "--install", &release])
            .arg(chart())
            .args(["--namespace", ns.name()])
            .args(&args),
        None,
    );
    struct Uninstall<'a>(&'a Path, &'a Cluster, String, String);
    impl Drop for Uninstall<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.0)
                .env("KUBECONFIG", &self.1.location().kubeconfig)
                .args(["uninstall", &self.2, "--namespace", &self.3, "--wait=false"])
                .output();
        }
    }
    let _uninstall = Uninstall(&helm, &cluster, release.clone(), ns.name().to_string());
    let install = install.unwrap();
    assert!(install.contains("STATUS: deployed"), "{install}");

    for (what, args) in [
        (
            "operator Deployment Available",
            vec![
                "wait",
                "--for=condition=Available",
                "--timeout=180s",
                "-n",
                ns.name(),
            ],
        ),
        (
            "agent DaemonSet rolled out",
            vec!["rollout", "status", "--timeout=180s", "-n", ns.name()],
        ),
    ] {
        let target = if what.starts_with("operator") {
            format!("deployment/{fullname}-operator")
        } else {
            format!("daemonset/{fullname}-agent")
        };
        let mut args = args.clone();
        args.push(&target);
        if let Err(e) = cluster.run_kubectl(&args).await {
            panic!("{what}: {e}\n{}", diagnose(&cluster, ns.name()).await);
        }
    }

    // On the local cluster the DaemonSet runs a ready agent on each real node: node-2's (its own
    // address, kubelet 1.35) got its config and verifies its own kubelet by the bundle.
    if cluster.location().state_dir.is_some() {
        let ready = cluster
            .run_kubectl(&[
                "get",
                "pods",
                "-n",
                ns.name(),
                "-l",
                "app.kubernetes.io/component=agent",
                "-o",
                r#"jsonpath={range .items[?(@.status.containerStatuses[0].ready==true)]}{.spec.nodeName}{"\n"}{end}"#,
            ])
            .await?;
        let mut nodes: Vec<&str> = ready.lines().collect();
        nodes.sort();
        assert_eq!(nodes, [NODE_NAME, NODE2_NAME], "nodes with a ready agent");
    }

    // A policy for this release's operator: a caller may read /healthz and /pods of this
    // namespace through the agent.
    let caller = "caller";
    cluster
        .run_kubectl(&["create", "serviceaccount", caller, "-n", ns.name()])
        .await?;
    let policy_name = format!("{release}-pods");
    let policy = json!({
        "apiVersion": "nodegate.io/v1alpha1", "kind": "NodeApiPolicy",
        "metadata": {"name": policy_name, "labels": {TEST_LABEL: release}},
        "spec": {
            "subjects": [{"kind": "ServiceAccount", "name": caller, "namespace": ns.name()}],
            "access": ["healthz", "pods"],
            "namespaces": {"names": [ns.name()]},
        },
    });
    run(
        cluster.kubectl().args(["apply", "-f", "-"]),
        Some(&policy.to_string()),
    )
    .unwrap();

    // The agent on node-1: its pod IP (the node routes to it) or, with hostNetwork, the node's.
    let ip = cluster
        .run_kubectl(&[
            "get",
            "pods",
            "-n",
            ns.name(),
            "-l",
            "app.kubernetes.io/component=agent",
            "--field-selector",
            &format!("spec.nodeName={NODE_NAME}"),
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])
        .await?;
    let ip = ip.trim().to_string();
    assert!(!ip.is_empty(), "no agent pod on {NODE_NAME}");
    let (code, body) = curl(&[&format!("http://{ip}:10348/healthz")]);
    assert_eq!(code, 200, "agent /healthz: {body}");

    // Once node-1's config carries the policy, the caller's token reads /pods, filtered to
    // this namespace; a stranger's token is refused.
    let token = cluster
        .run_kubectl(&["create", "token", caller, "-n", ns.name()])
        .await?;
    let stranger = cluster
        .run_kubectl(&["create", "token", "default", "-n", ns.name()])
        .await?;
    let url = format!("https://{ip}:10350/pods");
    let started = Instant::now();
    let body = loop {
        let (code, body) = curl(&[
            "-k",
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            &url,
        ]);
        if code == 200 {
            break body;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let config = cluster
                .run_kubectl(&["get", "nodeagentconfig", NODE_NAME, "-o", "yaml"])
                .await
                .unwrap_or_else(|e| e.to_string());
            panic!(
                "the caller's /pods through the agent: {code} {body}\nnode-1's config:\n{config}\n{}",
                diagnose(&cluster, ns.name()).await
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let pods: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    for item in pods["items"].as_array().unwrap() {
        assert_eq!(
            item["metadata"]["namespace"],
            ns.name(),
            "a pod of another namespace came through"
        );
    }
    let (code, body) = curl(&[
        "-k",
        "-H",
        &format!("Authorization: Bearer {}", stranger.trim()),
        &url,
    ]);
    assert_eq!(code, 403, "a caller no policy names: {body}");
    // No credential: anonymous, whom no policy names on the secure port.
    let (code, body) = curl(&["-k", &url]);
    assert!(code == 401 || code == 403, "no credential: {code} {body}");

    // The same caller through node-2's agent on the local cluster: answered by node-2's own
    // kubelet (1.35), which the agent verified by the bundle and its node's name (with node-1's
    // name it would answer 502).
    if cluster.location().state_dir.is_some() {
        let ip2 = cluster
            .run_kubectl(&[
                "get",
                "pods",
                "-n",
                ns.name(),
                "-l",
                "app.kubernetes.io/component=agent",
                "--field-selector",
                &format!("spec.nodeName={NODE2_NAME}"),
                "-o",
                "jsonpath={.items[0].status.podIP}",
            ])
            .await?;
        let url2 = format!("https://{}:10350/pods", ip2.trim());
        let started = Instant::now();
        loop {
            let (code, body) = curl(&[
                "-k",
                "-H",
                &format!("Authorization: Bearer {}", token.trim()),
                &url2,
            ]);
            if code == 200 {
                let pods: Value =
                    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
                assert!(pods["items"].is_array(), "{body}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the caller's /pods through node-2's agent: {code} {body}\n{}",
                diagnose(&cluster, ns.name()).await
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    // The agent reports its node's config as in sync (the status write the admission policy
    // allows it).
    let configs = Api::<NodeAgentConfig>::all(cluster.admin()?);
    let started = Instant::now();
    loop {
        let config = configs
            .get(&nodegate_compiler::config_name(NODE_NAME, Some(&release)))
            .await?;
        let synced = config
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .is_some_and(|s| {
                s["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "InSync" && c["status"] == "True")
            });
        if synced {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node-1's config status never said InSync: {:?}",
            config.status
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// The node's other components (docs/components.md): nothing by default; enabled, the agent's
/// flags, the ClusterRole that lets its token get the controller manager's and scheduler's
/// /metrics (and /metrics/slis) and nothing else, the scrape configs and ServiceMonitors with
/// the kubernetes-mixin job names; refused without host networking or a CA for Prometheus.
#[test]
fn components_render_flags_rbac_and_scrape_jobs() {
    let Some(helm) = helm() else { return };
    let args_of = agent_args;
    let default = objects(&template(&helm, "rel", "ns", &[]).unwrap());
    assert!(
        !args_of(&default)
            .iter()
            .any(|a| a.starts_with("--component"))
    );
    assert!(find(&default, "ClusterRole", "rel-nodegate-agent-components").is_none());
    assert!(
        !default
            .iter()
            .any(|o| o["metadata"]["name"] == "rel-nodegate-agent-component-scrape-configs")
    );

    let all = [
        "--set",
        "agent.hostNetwork=true",
        "--set",
        "agent.components.enabled={kube-proxy,kube-controller-manager,kube-scheduler,etcd}",
        "--set",
        "agent.components.scrape.caFile=/etc/prometheus/agent-ca.crt",
        "--set",
        "agent.components.scrape.serviceMonitors=true",
    ];
    let objs = objects(&template(&helm, "rel", "ns", &all).unwrap());
    let args = args_of(&objs);
    for want in [
        "--components=kube-proxy,kube-controller-manager,kube-scheduler,etcd",
        "--component-insecure-skip-tls-verify=kube-controller-manager",
        "--component-insecure-skip-tls-verify=kube-scheduler",
        "--component-token-file=/var/run/secrets/nodegate/component-token/token",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
    }
    let role = find(&objs, "ClusterRole", "rel-nodegate-agent-components").unwrap();
    assert_eq!(
        role["rules"],
        json!([{"nonResourceURLs": ["/metrics", "/metrics/slis"], "verbs": ["get"]}])
    );
    let binding = find(&objs, "ClusterRoleBinding", "rel-nodegate-agent-components").unwrap();
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "rel-nodegate-agent", "namespace": "ns"}])
    );
    let map = find(
        &objs,
        "ConfigMap",
        "rel-nodegate-agent-component-scrape-configs",
    )
    .unwrap();
    let jobs: Vec<Value> =
        serde_yaml::from_str(map["data"]["scrape-configs.yaml"].as_str().unwrap()).unwrap();
    let rows: Vec<(String, String)> = jobs
        .iter()
        .map(|j| {
            assert_eq!(j["scheme"], "https");
            assert_eq!(j["tls_config"]["ca_file"], "/etc/prometheus/agent-ca.crt");
            assert_eq!(j["relabel_configs"][0]["replacement"], "${1}:10350");
            (
                j["job_name"].as_str().unwrap().to_string(),
                j["metrics_path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = nodegate_crds::catalogue::Component::ALL
        .iter()
        .map(|c| (c.job().to_string(), format!("/components/{c}/metrics")))
        .collect();
    assert_eq!(rows, expected);
    let monitors: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "ServiceMonitor")
        .filter(|o| o["metadata"]["name"] != "rel-nodegate-agent")
        .collect();
    let monitored: Vec<(String, String)> = monitors
        .iter()
        .map(|m| {
            let e = &m["spec"]["endpoints"][0];
            assert_eq!(e["port"], "secure");
            assert_eq!(e["relabelings"][0]["targetLabel"], "job");
            (
                e["relabelings"][0]["replacement"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(monitored, expected);
    let ds = objs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);

    // kube-proxy alone: no token, no RBAC, no skipped verification.
    let proxy = objects(
        &template(
            &helm,
            "rel",
            "ns",
            &[
                "--set",
                "agent.hostNetwork=true",
                "--set",
                "agent.components.enabled={kube-proxy}",
                "--set",
                "agent.components.scrape.caFile=/ca.crt",
            ],
        )
        .unwrap(),
    );
    let args = args_of(&proxy);
    assert!(
        args.iter().any(|a| a == "--components=kube-proxy"),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--component-token-file")
            || a.starts_with("--component-insecure-skip-tls-verify")),
        "{args:?}"
    );
    assert!(find(&proxy, "ClusterRole", "rel-nodegate-agent-components").is_none());

    // Refused: components without host networking, scrape jobs without a CA.
    let e = template(
        &helm,
        "rel",
        "ns",
        &[
            "--set",
            "agent.components.enabled={kube-proxy}",
            "--set",
            "agent.components.scrape.caFile=/ca.crt",
        ],
    )
    .unwrap_err();
    assert!(e.contains("needs agent.hostNetwork: true"), "{e}");
    let e = template(
        &helm,
        "rel",
        "ns",
        &[
            "--set",
            "agent.hostNetwork=true",
            "--set",
            "agent.components.enabled={etcd}",
        ],
    )
    .unwrap_err();
    assert!(
        e.contains("agent.components.scrape.caFile is required"),
        "{e}"
    );
    let e = template(
        &helm,
        "rel",
        "ns",
        &[
            "--set",
            "agent.hostNetwork=true",
            "--set",
            "agent.components.enabled={kubelet}",
        ],
    )
    .unwrap_err();
    assert!(e.contains("enabled"), "{e}");
}

/// The kubelet's metrics through the agents (issue 19): nothing by default; a ServiceMonitor
/// (job `kubelet`, one endpoint per path) that verifies the agents with nodegate's signer bundle
/// or cert-manager's CA, and scrape configs with a CA file; never `insecureSkipVerify`, and
/// refused when nothing could verify the agents (a self-signed certificate without a CA file).
/// The components' ServiceMonitors verify the same way.
#[test]
fn kubelet_scrape_verifies_the_agents_with_nodegates_ca() {
    let Some(helm) = helm() else { return };
    let render = |sets: &[&str]| -> Result<Vec<Value>, String> {
        let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", *s]).collect();
        template(&helm, "rel", "ns", &args).map(|y| objects(&y))
    };
    let monitor =
        |objs: &[Value]| find(objs, "ServiceMonitor", "rel-nodegate-agent-kubelet").cloned();
    let default = render(&[]).unwrap();
    assert!(monitor(&default).is_none());
    assert!(
        find(
            &default,
            "ConfigMap",
            "rel-nodegate-agent-kubelet-scrape-configs"
        )
        .is_none()
    );

    let on = [
        "agent.service.enabled=true",
        "agent.kubeletScrape.serviceMonitor=true",
    ];
    let signer = render(&[on[0], on[1], "agent.tls.mode=signer"]).unwrap();
    let m = monitor(&signer).expect("the kubelet ServiceMonitor");
    let endpoints = m["spec"]["endpoints"].as_array().unwrap();
    let paths: Vec<&str> = endpoints
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/metrics",
            "/metrics/cadvisor",
            "/metrics/resource",
            "/metrics/probes"
        ]
    );
    for e in endpoints {
        assert_eq!(e["port"], "secure");
        assert_eq!(e["scheme"], "https");
        assert_eq!(
            e["tlsConfig"],
            json!({"ca": {"configMap": {"name": "rel-nodegate-agent-serving-ca", "key": "ca.crt"}}})
        );
        assert_eq!(
            e["relabelings"][0],
            json!({"targetLabel": "job", "replacement": "kubelet"})
        );
    }
    let bundle = find(&signer, "Deployment", "rel-nodegate-operator").unwrap();
    assert!(
        bundle.to_string().contains("rel-nodegate-agent-serving-ca"),
        "the operator publishes the bundle the ServiceMonitor names"
    );

    let cert_manager = render(&[
        on[0],
        on[1],
        "agent.tls.mode=certManager",
        "agent.tls.certManager.issuerRef.name=ca-issuer",
    ])
    .unwrap();
    assert_eq!(
        monitor(&cert_manager).unwrap()["spec"]["endpoints"][0]["tlsConfig"],
        json!({"ca": {"secret": {"name": "rel-nodegate-agent-tls", "key": "ca.crt"}}})
    );
    let file = render(&[
        on[0],
        on[1],
        "agent.kubeletScrape.caFile=/etc/ca.crt",
        "agent.kubeletScrape.serverName=agent",
    ])
    .unwrap();
    assert_eq!(
        monitor(&file).unwrap()["spec"]["endpoints"][0]["tlsConfig"],
        json!({"caFile": "/etc/ca.crt", "serverName": "agent"})
    );
    let e = render(&[on[0], on[1]]).unwrap_err();
    assert!(
        e.contains("agent.kubeletScrape.caFile is required with agent.tls.mode selfSigned"),
        "{e}"
    );

    let configs = render(&[
        "agent.kubeletScrape.scrapeConfigs=true",
        "agent.kubeletScrape.caFile=/etc/ca.crt",
    ])
    .unwrap();
    let map = find(
        &configs,
        "ConfigMap",
        "rel-nodegate-agent-kubelet-scrape-configs",
    )
    .unwrap();
    let jobs: Vec<Value> =
        serde_yaml::from_str(map["data"]["scrape-configs.yaml"].as_str().unwrap()).unwrap();
    let names: Vec<&str> = jobs
        .iter()
        .map(|j| j["job_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "kubelet",
            "kubelet-cadvisor",
            "kubelet-resource",
            "kubelet-probes"
        ]
    );
    for j in &jobs {
        assert_eq!(j["tls_config"], json!({"ca_file": "/etc/ca.crt"}));
        assert!(
            j["relabel_configs"]
                .as_array()
                .unwrap()
                .contains(&json!({"target_label": "job", "replacement": "kubelet"}))
        );
    }
    let e = render(&["agent.kubeletScrape.scrapeConfigs=true"]).unwrap_err();
    assert!(
        e.contains("agent.kubeletScrape.caFile is required with scrapeConfigs"),
        "{e}"
    );

    // The components' ServiceMonitors: the signer's bundle, without a CA file.
    let components = render(&[
        "agent.hostNetwork=true",
        "agent.service.enabled=true",
        "agent.tls.mode=signer",
        "agent.components.enabled={kube-proxy}",
        "agent.components.scrape.scrapeConfigs=false",
        "agent.components.scrape.serviceMonitors=true",
    ])
    .unwrap();
    let proxy = find(
        &components,
        "ServiceMonitor",
        "rel-nodegate-agent-kube-proxy",
    )
    .unwrap();
    assert_eq!(
        proxy["spec"]["endpoints"][0]["tlsConfig"]["ca"]["configMap"]["name"],
        "rel-nodegate-agent-serving-ca"
    );
    for objs in [&signer, &cert_manager, &file, &configs, &components] {
        let text = serde_json::to_string(objs).unwrap();
        assert!(!text.contains("insecureSkipVerify") && !text.contains("insecure_skip_verify"));
    }
}

/// A named instance (`operator.instance`) reaches the agents too: they read
/// `<instance>.<node>`, and the admission policy lets them write that config's status only.
/// Without one, the names are the nodes'.
#[test]
fn a_named_instance_names_the_agents_configs() {
    let Some(helm) = helm() else { return };
    let render = |sets: &[&str]| -> Vec<Value> {
        let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", *s]).collect();
        objects(&template(&helm, "rel", "ns", &args).unwrap())
    };
    let vap_rule = |objs: &[Value]| -> String {
        let vap = find(
            objs,
            "ValidatingAdmissionPolicy",
            "rel-nodegate-agent-status",
        )
        .expect("the agent's admission policy");
        vap["spec"]["validations"][0]["expression"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let node_name = "request.userInfo.extra['authentication.kubernetes.io/node-name'][0]";

    let default = render(&[]);
    assert!(
        !agent_args(&default)
            .iter()
            .any(|a| a.starts_with("--instance"))
    );
    assert!(
        vap_rule(&default).contains(&format!("object.metadata.name == '' + {node_name}")),
        "{}",
        vap_rule(&default)
    );

    let blue = render(&["operator.instance=blue"]);
    assert!(agent_args(&blue).contains(&"--instance=blue".to_string()));
    assert!(
        vap_rule(&blue).contains(&format!("object.metadata.name == 'blue.' + {node_name}")),
        "{}",
        vap_rule(&blue)
    );
    // Not a DNS label: refused at render, not at the agents' start.
    let args = ["--set", "operator.instance=Blue.1"];
    assert!(template(&helm, "rel", "ns", &args).is_err());
}
