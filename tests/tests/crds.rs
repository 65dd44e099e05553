//! The generated CRDs on a real API server: they install (CEL rules within the cost budget),
//! `kubectl apply` admits every valid sample and refuses each invalid one with its rule's
//! message, printer columns and `kubectl explain` work, and status is a subresource.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use kube::core::Message;
use nodegate_crds::rules;
use nodegate_tests::Cluster;
use nodegate_tests::cluster::unique_name;
use std::path::{Path, PathBuf};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The cluster with nodegate's CRDs installed (once per test process).
async fn cluster_with_crds() -> Result<Option<Cluster>, Box<dyn std::error::Error + Send + Sync>> {
    let Some(cluster) = Cluster::get().await? else {
        return Ok(None);
    };
    cluster.install_crds().await?;
    Ok(Some(cluster))
}

/// `kubectl apply --dry-run=server`: the API server runs the full admission (schema + CEL)
/// without storing anything, so tests never collide on cluster-scoped names.
fn dry_run_apply(cluster: &Cluster, file: &Path) -> std::process::Output {
    cluster
        .kubectl()
        .args(["apply", "--dry-run=server", "-f"])
        .arg(file)
        .output()
        .unwrap()
}

/// `kubectl create -f -` with the manifest on stdin.
fn kubectl_create(cluster: &Cluster, manifest: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cluster
        .kubectl()
        .args(["create", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(manifest.as_bytes())?;
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "kubectl create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn valid_samples_are_admitted() -> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let files = yaml_files(&repo("config/samples"));
    assert!(files.len() >= 5);
    for file in files {
        let out = dry_run_apply(&cluster, &file);
        assert!(
            out.status.success(),
            "{} refused: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[tokio::test]
async fn each_invalid_sample_is_refused_with_its_rules_message() -> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let files = yaml_files(&repo("config/samples/invalid"));
    assert_eq!(files.len(), rules::ALL.len());
    for file in files {
        let name = file.file_stem().unwrap().to_str().unwrap().to_string();
        let (_, rule) = rules::ALL.iter().find(|(n, _)| *n == name).unwrap();
        let Some(Message::Message(message)) = rule().message else {
            panic!("{name}: no message")
        };
        let out = dry_run_apply(&cluster, &file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was admitted");
        assert!(
            stderr.contains(&message),
            "{name}: want {message:?} in:\n{stderr}"
        );
    }
    Ok(())
}

/// `spec` (`/spec/`, removed from kubelets in 1.21 and no longer served by nodegate) is not an
/// endpoint a policy can name.
#[tokio::test]
async fn the_removed_spec_endpoint_cannot_be_granted() -> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let file = std::env::temp_dir().join(format!("{}.yaml", unique_name("nodegate-spec")));
    std::fs::write(
        &file,
        "apiVersion: nodegate.io/v1alpha1\nkind: NodeApiPolicy\nmetadata:\n  name: spec\n\
         spec:\n  subjects: [{kind: Group, name: g}]\n  access: [healthz, spec]\n  \
         namespaces: {all: true}\n",
    )?;
    let out = dry_run_apply(&cluster, &file);
    std::fs::remove_file(&file).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a policy granting spec was admitted");
    assert!(stderr.contains("Unsupported value: \"spec\""), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn printer_columns_and_status_subresource() -> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let policy = unique_name("e2e-columns");
    let manifest = format!(
        "apiVersion: nodegate.io/v1alpha1\nkind: NodeApiPolicy\nmetadata:\n  name: {policy}\nspec:\n  \
         subjects: [{{kind: Group, name: g}}]\n  access: [pods]\n  namespaces: {{names: [a]}}\n"
    );
    kubectl_create(&cluster, &manifest)?;
    let result = async {
        // Defaulting: ports defaults to [Secure] on the server.
        let ports = cluster.run_kubectl(&["get", "nap", &policy, "-o", "jsonpath={.spec.ports}"]).await?;
        assert_eq!(ports, r#"["Secure"]"#);
        // Status is a subresource: a status patch through it shows in the printer columns.
        let status = r#"{"status":{"matchedNodes":3,"subjectCount":1,"agentsInSync":"2/3","conditions":[{"type":"Ready","status":"True","reason":"Synced","message":"ok","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
        cluster
            .run_kubectl(&["patch", "nap", &policy, "--subresource=status", "--type=merge", "-p", status])
            .await?;
        let table = cluster.run_kubectl(&["get", "nap", &policy, "-o", "wide"]).await?;
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAME", "READY", "NODES", "SUBJECTS", "AGENTS", "AGE"], "{table}");
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(&row[..5], [policy.as_str(), "True", "3", "1", "2/3"], "{table}");
        // A spec change through the main resource cannot write status.
        let out = cluster
            .run_kubectl(&["patch", "nap", &policy, "--type=merge", "-p", r#"{"status":{"matchedNodes":9}}"#])
            .await;
        let nodes = cluster.run_kubectl(&["get", "nap", &policy, "-o", "jsonpath={.status.matchedNodes}"]).await?;
        assert_eq!(nodes, "3", "status written through the main resource: {out:?}");
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    let _ = cluster
        .run_kubectl(&["delete", "nap", &policy, "--wait=false"])
        .await;
    result
}

/// `kubectl get nars` lists a rule set's policies and hash; `kubectl get nac` the rule set each
/// node's config names.
#[tokio::test]
async fn rule_set_and_config_columns_list_policies_and_the_rule_set() -> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    let name = unique_name("e2e-nac");
    let rule = |policy: &str| {
        format!(
            "{{policy: {policy}, subjects: [0], endpoints: [pods], namespaces: 0, ports: [Secure]}}"
        )
    };
    let manifest = format!(
        "apiVersion: nodegate.io/v1alpha1\nkind: NodeAgentRuleSet\nmetadata:\n  name: {name}\nspec:\n  \
         hash: abc\n  policies: alpha,beta\n  subjects: [{{kind: Group, name: g}}]\n  \
         namespaceSets: [{{names: [a]}}]\n  rules: [{}, {}]\n---\n\
         apiVersion: nodegate.io/v1alpha1\nkind: NodeAgentConfig\nmetadata:\n  name: {name}\nspec:\n  \
         ruleSet: {name}\n",
        rule("alpha"),
        rule("beta")
    );
    kubectl_create(&cluster, &manifest)?;
    let sets = cluster.run_kubectl(&["get", "nars", &name]).await;
    let configs = cluster.run_kubectl(&["get", "nac", &name]).await;
    let _ = cluster
        .run_kubectl(&["delete", "nac,nars", &name, "--wait=false"])
        .await;
    let (sets, configs) = (sets?, configs?);
    let mut lines = sets.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "POLICIES", "HASH", "AGE"], "{sets}");
    assert!(lines.next().unwrap().contains("alpha,beta"), "{sets}");
    let mut lines = configs.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "RULE-SET", "IN-SYNC", "COMPONENTS", "AGE"],
        "{configs}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[1], name, "{configs}");
    Ok(())
}

#[tokio::test]
async fn kubectl_explain_teaches_the_api() -> TestResult {
    let Some(cluster) = cluster_with_crds().await? else {
        return Ok(());
    };
    // Discovery may lag the CRD becoming established by a moment.
    let mut last = String::new();
    for _ in 0..20 {
        match cluster
            .run_kubectl(&["explain", "nodeapipolicy.spec.namespaces"])
            .await
        {
            Ok(out) => {
                let text = out.split_whitespace().collect::<Vec<_>>().join(" ");
                assert!(
                    text.contains("exactly one of `names`, `selector` or `all: true`"),
                    "{out}"
                );
                assert!(text.contains("all <boolean>"), "{out}");
                let out = cluster.run_kubectl(&["explain", "nap.spec.access"]).await?;
                assert!(out.contains("portForward"), "{out}");
                return Ok(());
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    panic!("kubectl explain never worked: {last}");
}

/// The NodeAgentConfig CRD as generated, installed under a group of its own so no other test's
/// objects are touched: the API server accepts its schema and the estimated cost of its CEL rule
/// with the list bounds derived from the byte limit, stores the config of a node that 1,000
/// policies select (the old schema held 512 rules), and refuses a rule whose index names no
/// entry, and a config that names a rule set and holds rules too, each with its rule's message.
#[tokio::test]
async fn node_agent_config_crd_installs_and_refuses_dangling_indices() -> TestResult {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
    use nodegate_crds::{AgentRule, Endpoint, Port, ResolvedNamespaces, Subject, SubjectKind};

    let Some(cluster) = Cluster::get().await? else {
        return Ok(());
    };
    let client = cluster.admin()?;
    let group = format!("{}.nodegate-test.io", unique_name("nac"));
    let mut crd = nodegate_crds::crd::node_agent_config();
    crd.metadata.name = Some(format!("nodeagentconfigs.{group}"));
    crd.spec.group = group.clone();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await?;
    let result = async {
        for _ in 0..100 {
            let established = crds
                .get(crd.metadata.name.as_deref().unwrap())
                .await?
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let resource = ApiResource {
            group: group.clone(),
            version: "v1alpha1".into(),
            api_version: format!("{group}/v1alpha1"),
            kind: "NodeAgentConfig".into(),
            plural: "nodeagentconfigs".into(),
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        // Issue 20's cluster on one node: 1,000 policies, each one of 50 service accounts,
        // 1–5 of 200 namespaces and two endpoints.
        let endpoints = [
            Endpoint::Cadvisor,
            Endpoint::Resource,
            Endpoint::Pods,
            Endpoint::Stats,
        ];
        let rules: Vec<AgentRule> = (0..1000usize)
            .map(|i| AgentRule {
                policy: format!("team-policy-{i:04}"),
                subjects: vec![Subject {
                    kind: SubjectKind::ServiceAccount,
                    name: format!("prometheus-{:02}", i % 50),
                    namespace: Some(format!("monitoring-{:02}", i % 50)),
                }],
                endpoints: vec![endpoints[i % 4], endpoints[(i + 1) % 4]],
                namespaces: ResolvedNamespaces {
                    all: false,
                    names: (0..1 + i % 5)
                        .map(|k| format!("team-{:03}", (i * 7 + k * 13) % 200))
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                },
                ports: vec![Port::Secure],
                metrics: None,
            })
            .collect();
        let spec = serde_json::to_value(nodegate_compiler::agent_spec(&rules))?;
        let object = |name: &str, spec: &serde_json::Value| -> DynamicObject {
            let mut o = DynamicObject::new(name, &resource);
            o.data = serde_json::json!({ "spec": spec });
            o
        };
        let stored = api
            .create(&PostParams::default(), &object("thousand", &spec))
            .await?;
        assert_eq!(
            stored.data["spec"]["rules"].as_array().map(Vec::len),
            Some(1000)
        );
        let mut dangling = spec.clone();
        dangling["rules"][999]["namespaces"] = serde_json::json!(100_000);
        let refused = api
            .create(&PostParams::default(), &object("dangling", &dangling))
            .await
            .expect_err("a rule whose namespace index names nothing was admitted");
        let message = refused.to_string();
        assert!(
            message
                .contains("every rules[].subjects and rules[].namespaces index must name an entry"),
            "{message}"
        );
        // A config that names a rule set holds no rules of its own; one that only names it is
        // admitted.
        let mut both = spec.clone();
        both["ruleSet"] = serde_json::json!("nodegate-rules-0123");
        let refused = api
            .create(&PostParams::default(), &object("both", &both))
            .await
            .expect_err("a config naming a rule set and holding rules was admitted");
        let message = refused.to_string();
        assert!(
            message.contains("a spec that names a ruleSet holds no rules"),
            "{message}"
        );
        let named = serde_json::json!({"ruleSet": "nodegate-rules-0123"});
        api.create(&PostParams::default(), &object("named", &named))
            .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    let _ = crds
        .delete(
            crd.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        )
        .await;
    result
}
