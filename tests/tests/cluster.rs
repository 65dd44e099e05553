//! The local cluster does what issue 3's "done when" list says: real control plane (version,
//! RBAC, service-account tokens, garbage collector, namespace controller) and a real node
//! (pods run; exec, logs, port-forward and the kubelet's stats and metrics work through the
//! API server); and, for issue 10, pods reach the API server through the `kubernetes` Service
//! (kube-proxy, advertised address on the pod bridge).
//!
//! Run with `cargo xtask test`, or after `eval "$(cargo xtask cluster env)"` with
//! `cargo test -p nodegate-tests --test cluster`.

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::ResourceExt;
use kube::api::{Api, AttachParams, DeleteParams, ListParams, LogParams, ObjectMeta, PostParams};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::{NODE_NAME, busybox_pod, unique_name};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const POD_START: Duration = Duration::from_secs(90);

/// The cluster, or `None` to skip (outside CI only; the harness printed why).
async fn cluster() -> Result<Option<Cluster>, nodegate_tests::Error> {
    Cluster::get().await
}

/// Polls `check` every 500 ms until it returns `Some`, or fails after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "timed out after {}s waiting for {what}",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn version_is_1_37() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let version = cluster.admin()?.apiserver_version().await?;
    assert!(
        version.git_version.starts_with("v1.37."),
        "API server reports {}",
        version.git_version
    );
    let raw = cluster.run_kubectl(&["get", "--raw", "/version"]).await?;
    assert!(
        raw.contains("\"gitVersion\": \"v1.37."),
        "kubectl get --raw /version: {raw}"
    );
    Ok(())
}

#[tokio::test]
async fn node_1_is_ready() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let node = Api::<Node>::all(cluster.admin()?).get(NODE_NAME).await?;
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status);
    assert_eq!(
        ready.as_deref(),
        Some("True"),
        "{NODE_NAME} Ready condition"
    );
    Ok(())
}

#[tokio::test]
async fn busybox_pod_runs_and_exec_and_logs_work() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("exec").await?;
    let pod = busybox_pod(
        "shell",
        &["sh", "-c", "echo started-$HOSTNAME; exec sleep 3600"],
    );
    ns.run_pod(&pod, POD_START).await?;
    let pods: Api<Pod> = ns.api();

    // exec through the API server with kube's websocket client …
    let mut attached = pods
        .exec(
            "shell",
            ["echo", "hello from busybox"],
            &AttachParams::default().stderr(false),
        )
        .await?;
    let mut stdout = attached.stdout().ok_or("exec has no stdout")?;
    let mut output = String::new();
    stdout.read_to_string(&mut output).await?;
    attached.join().await?;
    assert_eq!(output, "hello from busybox\n");

    // … and with kubectl (exec and logs).
    let echoed = cluster
        .run_kubectl(&[
            "-n",
            ns.name(),
            "exec",
            "shell",
            "--",
            "echo",
            "via kubectl",
        ])
        .await?;
    assert_eq!(echoed, "via kubectl\n");
    let logs = pods.logs("shell", &LogParams::default()).await?;
    assert_eq!(logs, "started-shell\n");
    let kubectl_logs = cluster
        .run_kubectl(&["-n", ns.name(), "logs", "shell"])
        .await?;
    assert_eq!(kubectl_logs, "started-shell\n");
    Ok(())
}

#[tokio::test]
async fn port_forward_reaches_the_pod() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("portfwd").await?;
    let pod = busybox_pod(
        "web",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo port-forward-ok > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    ns.run_pod(&pod, POD_START).await?;
    let pods: Api<Pod> = ns.api();
    // httpd may need a moment after the container started to listen.
    let body = eventually(
        "httpd to answer through port-forward",
        Duration::from_secs(30),
        || async {
            let mut forwarder = pods.portforward("web", &[8080]).await.ok()?;
            let mut stream = forwarder.take_stream(8080)?;
            stream
                .write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                .await
                .ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await.ok()?;
            drop(stream);
            let _ = forwarder.join().await;
            response.contains("200 OK").then_some(response)
        },
    )
    .await?;
    assert!(body.ends_with("port-forward-ok\n"), "response: {body}");

    // The same through `kubectl port-forward` on a random local port.
    let mut kubectl = tokio::process::Command::from(cluster.kubectl());
    let mut child = kubectl
        .args(["-n", ns.name(), "port-forward", "pod/web", ":8080"])
        .args(["--address", "127.0.0.1"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("kubectl has no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await??
        .ok_or("kubectl port-forward printed nothing")?;
    // "Forwarding from 127.0.0.1:41234 -> 8080"
    let local = first
        .strip_prefix("Forwarding from ")
        .and_then(|rest| rest.split(" -> ").next())
        .ok_or_else(|| format!("unexpected kubectl output: {first}"))?;
    let mut stream = tokio::net::TcpStream::connect(local).await?;
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    assert!(
        response.contains("200 OK") && response.ends_with("port-forward-ok\n"),
        "response: {response}"
    );
    child.kill().await?;
    Ok(())
}

#[tokio::test]
async fn kubelet_stats_and_metrics_show_the_pod() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("stats").await?;
    ns.run_pod(&busybox_pod("measured", &["sleep", "3600"]), POD_START)
        .await?;
    let proxy = format!("/api/v1/nodes/{NODE_NAME}/proxy");

    // The kubelet's resource analyzer refreshes stats periodically; wait for our pod.
    let summary: serde_json::Value = eventually(
        "the pod in /stats/summary",
        Duration::from_secs(90),
        || async {
            let text = cluster
                .run_kubectl(&["get", "--raw", &format!("{proxy}/stats/summary")])
                .await
                .ok()?;
            let summary: serde_json::Value = serde_json::from_str(&text).ok()?;
            let ours = summary["pods"]
                .as_array()?
                .iter()
                .find(|p| p["podRef"]["namespace"] == ns.name())?
                .clone();
            ours["containers"][0]["memory"]["workingSetBytes"]
                .as_u64()
                .is_some()
                .then_some(ours)
        },
    )
    .await?;
    assert_eq!(summary["podRef"]["name"], "measured");
    assert_eq!(summary["containers"][0]["name"], "main");
    assert!(
        summary["cpu"]["usageNanoCores"].is_u64()
            || summary["cpu"]["usageCoreNanoSeconds"].is_u64(),
        "{summary}"
    );

    let pods = cluster
        .run_kubectl(&["get", "--raw", &format!("{proxy}/pods")])
        .await?;
    let pods: serde_json::Value = serde_json::from_str(&pods)?;
    let listed = pods["items"].as_array().ok_or("/pods has no items")?;
    assert!(
        listed
            .iter()
            .any(|p| p["metadata"]["namespace"] == ns.name()),
        "/pods lacks our pod"
    );

    let selector = format!("namespace=\"{}\",pod=\"measured\"", ns.name());
    for (endpoint, metric) in [
        ("metrics/cadvisor", "container_cpu_usage_seconds_total"),
        ("metrics/resource", "pod_memory_working_set_bytes"),
    ] {
        let found = eventually(
            &format!("{metric} of our pod in /{endpoint}"),
            Duration::from_secs(60),
            || async {
                let text = cluster
                    .run_kubectl(&["get", "--raw", &format!("{proxy}/{endpoint}")])
                    .await
                    .ok()?;
                text.lines()
                    .find(|l| l.starts_with(metric) && l.contains(&selector))
                    .map(String::from)
            },
        )
        .await?;
        assert!(found.contains(ns.name()));
    }
    Ok(())
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_pods() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("nsdelete").await?;
    ns.run_pod(&busybox_pod("doomed", &["sleep", "3600"]), POD_START)
        .await?;
    let admin = cluster.admin()?;
    Api::<Namespace>::all(admin.clone())
        .delete(ns.name(), &DeleteParams::default())
        .await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    let namespaces: Api<Namespace> = Api::all(admin);
    eventually(
        "the namespace and its pod to be gone",
        Duration::from_secs(120),
        || async {
            let pod_gone = matches!(pods.get_opt("doomed").await, Ok(None));
            let ns_gone = matches!(namespaces.get_opt(ns.name()).await, Ok(None));
            (pod_gone && ns_gone).then_some(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("gc").await?;
    let maps: Api<ConfigMap> = ns.api();
    let owner = maps
        .create(&PostParams::default(), &config_map("owner", vec![]))
        .await?;
    let reference = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: owner.name_any(),
        uid: owner.uid().ok_or("owner has no uid")?,
        ..Default::default()
    };
    maps.create(
        &PostParams::default(),
        &config_map("dependent", vec![reference]),
    )
    .await?;
    maps.create(&PostParams::default(), &config_map("bystander", vec![]))
        .await?;
    maps.delete("owner", &DeleteParams::background()).await?;
    eventually(
        "the dependent to be garbage-collected",
        Duration::from_secs(60),
        || async { matches!(maps.get_opt("dependent").await, Ok(None)).then_some(()) },
    )
    .await?;
    assert!(
        maps.get_opt("bystander").await?.is_some(),
        "an unrelated object was deleted"
    );
    Ok(())
}

fn config_map(
    name: &str,
    owners: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: Some(owners),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("k".to_string(), "v".to_string())])),
        ..Default::default()
    }
}

#[tokio::test]
async fn minted_user_is_refused_until_rbac_grants_it() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("rbac").await?;
    let user_name = unique_name("alice");
    let user = cluster
        .user(&user_name, &["nodegate:testers", "nodegate:second-group"])
        .await?;

    // Authenticated as the minted identity, groups included …
    let review = Api::<SelfSubjectReview>::all(user.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let info = review
        .status
        .and_then(|s| s.user_info)
        .ok_or("no user info")?;
    assert_eq!(info.username.as_deref(), Some(user_name.as_str()));
    let groups = info.groups.unwrap_or_default();
    assert!(
        groups.contains(&"nodegate:testers".to_string())
            && groups.contains(&"nodegate:second-group".to_string()),
        "{groups:?}"
    );

    // … refused what RBAC does not grant …
    let pods: Api<Pod> = Api::namespaced(user.clone(), ns.name());
    let err = pods
        .list(&ListParams::default())
        .await
        .err()
        .ok_or("listing pods was allowed")?;
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "expected 403, got {err}"
    );

    // … and allowed once a RoleBinding grants `view` to one of its groups.
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("testers-view".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: "view".into(),
        },
        subjects: Some(vec![Subject {
            kind: "Group".into(),
            name: "nodegate:testers".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            namespace: None,
        }]),
    };
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await?;
    eventually(
        "the RoleBinding to take effect",
        Duration::from_secs(10),
        || async { pods.list(&ListParams::default()).await.ok().map(|_| ()) },
    )
    .await?;
    let nodes = Api::<Node>::all(user).list(&ListParams::default()).await;
    assert!(
        matches!(&nodes, Err(kube::Error::Api(s)) if s.code == 403),
        "a namespaced grant leaked: {nodes:?}"
    );
    Ok(())
}

#[tokio::test]
async fn service_account_token_authenticates() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let ns = cluster.namespace("satoken").await?;
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("robot".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &account)
        .await?;
    let robot = cluster.service_account(ns.name(), "robot").await?;
    let review = Api::<SelfSubjectReview>::all(robot.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let username = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username);
    assert_eq!(
        username,
        Some(format!("system:serviceaccount:{}:robot", ns.name()))
    );
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(robot, ns.name())
        .list(&ListParams::default())
        .await;
    assert!(
        matches!(&secrets, Err(kube::Error::Api(s)) if s.code == 403),
        "SA without grants listed secrets: {secrets:?}"
    );
    Ok(())
}

#[tokio::test]
async fn fake_nodes_are_created_labelled_and_cleaned_up() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(cluster.admin()?);
    let selector = {
        let fakes = cluster
            .fake_nodes("scale", 5, &[("nodegate.io/pool", "fake")])
            .await?;
        let listed = nodes
            .list(&ListParams::default().labels(&fakes.selector()))
            .await?;
        assert_eq!(listed.items.len(), 5);
        for node in &listed.items {
            assert_eq!(
                node.labels().get("nodegate.io/pool").map(String::as_str),
                Some("fake")
            );
            let addresses = node
                .status
                .as_ref()
                .and_then(|s| s.addresses.clone())
                .unwrap_or_default();
            assert!(
                addresses.iter().any(|a| a.type_ == "InternalIP"),
                "{addresses:?}"
            );
        }
        fakes.selector()
    };
    let left = nodes.list(&ListParams::default().labels(&selector)).await?;
    assert!(
        left.items.is_empty(),
        "fake nodes left behind: {:?}",
        left.items.iter().map(|n| n.name_any()).collect::<Vec<_>>()
    );
    Ok(())
}

/// The address the local cluster's API server advertises (the pod bridge's), and its port.
const ADVERTISED: (&str, i32) = ("10.89.0.1", 6443);
/// kube-proxy's healthz on the local cluster.
const KUBE_PROXY_HEALTHZ: &str = "127.0.0.1:10256";

/// Sends a plain HTTP request to the Service's address from inside the pod: only an HTTPS server
/// written in Go answers it with "Client sent an HTTP request to an HTTPS server". busybox's wget
/// cannot do better: its TLS fails the handshake with Go's TLS stack.
const PROBE_API_SERVER: &str = r#"echo "$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"; printf 'GET /version HTTP/1.0\r\n\r\n' | nc -w 5 "$KUBERNETES_SERVICE_HOST" "$KUBERNETES_SERVICE_PORT""#;

#[tokio::test]
async fn pods_reach_the_api_server_through_the_kubernetes_service() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let admin = cluster.admin()?;
    let local = cluster.location().state_dir.is_some();

    // The Service has an endpoint, in the legacy and in the EndpointSlice API …
    let endpoints = Api::<Endpoints>::namespaced(admin.clone(), "default")
        .get("kubernetes")
        .await?;
    let listed: Vec<(String, i32)> = endpoints
        .subsets
        .unwrap_or_default()
        .into_iter()
        .flat_map(|subset| {
            let ports: Vec<i32> = subset
                .ports
                .unwrap_or_default()
                .iter()
                .map(|p| p.port)
                .collect();
            subset
                .addresses
                .unwrap_or_default()
                .into_iter()
                .flat_map(move |a| ports.clone().into_iter().map(move |p| (a.ip.clone(), p)))
        })
        .collect();
    let slices = Api::<EndpointSlice>::namespaced(admin.clone(), "default")
        .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await?;
    let sliced: Vec<(String, i32)> = slices
        .items
        .iter()
        .flat_map(|slice| {
            let ports: Vec<i32> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.port)
                .collect();
            slice.endpoints.iter().flatten().flat_map(move |e| {
                let ports = ports.clone();
                e.addresses
                    .iter()
                    .flat_map(move |a| ports.clone().into_iter().map(move |p| (a.clone(), p)))
            })
        })
        .collect();
    assert!(!listed.is_empty(), "the kubernetes Endpoints are empty");
    assert_eq!(sliced, listed, "EndpointSlices and Endpoints disagree");
    if local {
        let advertised = (ADVERTISED.0.to_string(), ADVERTISED.1);
        assert_eq!(listed, vec![advertised], "the kubernetes Endpoints");
    }

    // … and pods reach it through the Service's cluster IP, on the pod network and on the
    // host's (kube-proxy's rules cover both).
    let ns = cluster.namespace("apisvc").await?;
    let mut on_host = busybox_pod("host-network", &["sleep", "3600"]);
    if let Some(spec) = on_host.spec.as_mut() {
        spec.host_network = Some(true);
    }
    for pod in [busybox_pod("pod-network", &["sleep", "3600"]), on_host] {
        let name = pod.name_any();
        ns.run_pod(&pod, POD_START).await?;
        let out = cluster
            .run_kubectl(&[
                "-n",
                ns.name(),
                "exec",
                &name,
                "--",
                "sh",
                "-c",
                PROBE_API_SERVER,
            ])
            .await?;
        let (service, answer) = out.split_once('\n').ok_or("no output")?;
        if local {
            assert_eq!(service, "10.0.0.1:443", "{name}: the Service's address");
        }
        assert!(
            answer.starts_with("HTTP/1.0 400 Bad Request")
                && answer.contains("Client sent an HTTP request to an HTTPS server"),
            "{name}: not the API server's answer: {out:?}"
        );
    }

    if local {
        // From this machine, with TLS verified against the cluster CA: the serving
        // certificate names the Service's IP and the advertised address.
        for url in [
            "https://10.0.0.1:443".to_string(),
            format!("https://{}:{}", ADVERTISED.0, ADVERTISED.1),
        ] {
            let mut config = cluster.admin_config().clone();
            config.cluster_url = url.parse()?;
            let version = kube::Client::try_from(config)?.apiserver_version().await?;
            assert!(
                version.git_version.starts_with("v1.37."),
                "{url}: {version:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn kube_proxy_is_healthy() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    if cluster.local_state_dir()?.is_none() {
        // Not the local cluster and skipping such tests was asked: its kube-proxy, if any, is
        // elsewhere.
        return Ok(());
    }
    let mut stream = tokio::net::TcpStream::connect(KUBE_PROXY_HEALTHZ).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {response:?}"))?;
    assert_eq!(head.split_whitespace().nth(1), Some("200"), "{response}");
    let health: serde_json::Value = serde_json::from_str(body)?;
    assert_eq!(health["healthy"], true, "{body}");
    assert_eq!(health["nodeEligible"], true, "{body}");
    Ok(())
}
