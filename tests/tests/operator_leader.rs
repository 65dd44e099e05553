//! Fenced leadership of the operator against the real API server (issue 16, items 3 and 11).
//! Replicas that are killed or partitioned are the real `nodegate-operator` binary, on short
//! lease settings (duration 6 s, renew deadline 4 s, retry 1 s), each test with its own Lease
//! and `--instance`, so no other test's objects are touched:
//! - SIGKILL of the leader: the standby, whose watches were open all along (warm caches: its
//!   API traffic holds a connection per watch before it leads), takes the lease within the
//!   lease duration plus one retry period (to see the last renewal), and enforces a change made
//!   after the kill within one more round;
//! - a leader partitioned from the API server (its traffic goes through a FlakyProxy that is
//!   cut) while a policy narrows: once its renew deadline has passed it sends nothing at all (no
//!   connection attempt, no byte at the forwarder, before and after the cut is healed), it has
//!   exited non-zero, and the new leader deletes the RoleBinding of the removed namespace
//!   (a SubjectAccessReview answers no);
//! - a leader whose writes and renewals hang steps down at its renew deadline: the round in
//!   flight is cancelled and the held write is never sent (in-process, an interposing client);
//! - `/healthz` of a controller whose round is stuck on a write fails after the stall bound, and
//!   recovers when the round ends (`/readyz` stays ready);
//! - a crash loop is visible (issue 20): when the Lease says the previous leader stopped in the
//!   middle of a round, the second in a row, the next leader marks every policy not Ready
//!   (`OperatorRestarting`) before its own first round, and its finished round writes the true
//!   status and clears the Lease's count.
//!
//! Needs the binary: `cargo build -p nodegate-operator`, then after
//! `eval "$(cargo xtask cluster env)"`: `cargo test -p nodegate-tests --test operator_leader`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "operator_support.rs"]
mod support;

use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::Api;
use nodegate_operator::controller::{self, CancellationToken, LeaderSettings, Metrics};
use nodegate_tests::cluster::{FlakyProxy, unique_name};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::*;

const LEASE_DURATION: Duration = Duration::from_secs(6);
const RENEW_DEADLINE: Duration = Duration::from_secs(4);
const RETRY_PERIOD: Duration = Duration::from_secs(1);
/// The reflectors a replica runs (policies, nodes, namespaces and five kinds of outputs).
const WATCHES: u64 = 8;

/// `target/<profile>/nodegate-operator`, next to this test's `deps/` directory.
fn operator_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NODEGATE_OPERATOR_BIN") {
        return Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p);
    }
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("nodegate-operator");
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p nodegate-operator` (or set NODEGATE_OPERATOR_BIN)",
        binary.display()
    );
    binary
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A copy of the cluster's kubeconfig whose API server is reached through `proxy`.
fn kubeconfig_through(
    cluster: &nodegate_tests::Cluster,
    proxy: &FlakyProxy,
    dir: &Path,
) -> PathBuf {
    let original = std::fs::read_to_string(&cluster.location().kubeconfig).unwrap();
    let rewritten: Vec<String> = original
        .lines()
        .map(|line| match line.split_once("server:") {
            Some((indent, _)) => format!("{indent}server: https://{}", proxy.addr),
            None => line.to_string(),
        })
        .collect();
    let path = dir.join(format!("proxied-{}.kubeconfig", proxy.addr.port()));
    std::fs::write(&path, rewritten.join("\n")).unwrap();
    path
}

fn api_server(cluster: &nodegate_tests::Cluster) -> String {
    let url = &cluster.admin_config().cluster_url;
    format!(
        "{}:{}",
        url.host().unwrap_or("127.0.0.1"),
        url.port_u16().unwrap_or(443)
    )
}

/// One operator process; killed on drop. Its log goes to `log` (printed when a test fails).
struct Operator {
    identity: String,
    child: Child,
    metrics: u16,
    log: PathBuf,
}

impl Operator {
    fn start(w: &World, kubeconfig: &Path, lease_ns: &str, lease: &str, identity: &str) -> Self {
        let settings = w.settings();
        let metrics = free_port();
        let log = std::env::temp_dir().join(format!("{}-{identity}.log", w.run));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(operator_binary())
            .arg("run")
            .arg(format!("--metrics-bind-address=127.0.0.1:{metrics}"))
            .args(["--log-format=text", "--log=info,nodegate_operator=debug"])
            .args(["--leader-elect=true", "--lease-name", lease])
            .args(["--lease-namespace", lease_ns, "--identity", identity])
            .arg(format!(
                "--lease-duration-seconds={}",
                LEASE_DURATION.as_secs()
            ))
            .arg(format!(
                "--lease-renew-deadline-seconds={}",
                RENEW_DEADLINE.as_secs()
            ))
            .arg(format!(
                "--lease-retry-period-seconds={}",
                RETRY_PERIOD.as_secs()
            ))
            .arg(format!(
                "--policy-selector={}",
                settings.policy_selector.unwrap()
            ))
            .arg(format!(
                "--node-selector={}",
                settings.node_selector.unwrap()
            ))
            .arg(format!("--instance={}", w.run))
            .args(["--debounce-ms=100", "--backoff-base-ms=200"])
            .args(["--backoff-max-seconds=5", "--resync-seconds=3600"])
            .env("KUBECONFIG", kubeconfig)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap();
        Self {
            identity: identity.into(),
            child,
            metrics,
            log,
        }
    }

    /// `GET path` on its metrics address with curl: the HTTP status (0: no answer).
    async fn status(&self, path: &str) -> u16 {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics));
        curl_status(addr, path).await.0
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.identity, self.log_tail());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn holder(client: &kube::Client, ns: &str, lease: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(lease)
        .await
        .ok()??
        .spec?
        .holder_identity
}

async fn role_binding(client: &kube::Client, ns: &str, name: &str) -> Option<RoleBinding> {
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()?
}

/// Starts `first`, waits until it holds the lease, then starts `second` and waits until it
/// stands by (ready).
async fn leader_then_standby(
    client: &kube::Client,
    lease_ns: &str,
    lease: &str,
    first: impl FnOnce() -> Operator,
    second: impl FnOnce() -> Operator,
) -> Result<(Operator, Operator), BoxError> {
    let a = first();
    let id = a.identity.clone();
    eventually("the first replica leads", WAIT, || async {
        (holder(client, lease_ns, lease).await.as_deref() == Some(id.as_str())).then_some(())
    })
    .await?;
    let b = second();
    eventually("the second replica stands by, ready", WAIT, || async {
        (b.status("/readyz").await == 200).then_some(())
    })
    .await?;
    Ok((a, b))
}

#[tokio::test]
async fn a_killed_leader_is_replaced_by_the_warm_standby_within_the_lease_duration() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let lease_ns = cluster.namespace("leader").await?;
    let granted = cluster.namespace("kill-a").await?;
    let later = cluster.namespace("kill-b").await?;
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let lease = unique_name("kill-lease");
    let dir = std::env::temp_dir();
    let kubeconfig = cluster.location().kubeconfig.clone();
    // The standby's traffic is counted: its watches hold one connection each.
    let proxy_b = FlakyProxy::start(api_server(&cluster)).await?;
    let kubeconfig_b = kubeconfig_through(&cluster, &proxy_b, &dir);
    let (mut a, b) = leader_then_standby(
        &w.client,
        lease_ns.name(),
        &lease,
        || Operator::start(&w, &kubeconfig, lease_ns.name(), &lease, "kill-a"),
        || Operator::start(&w, &kubeconfig_b, lease_ns.name(), &lease, "kill-b"),
    )
    .await?;
    let name = unique_name("kill");
    let binding = format!("nodegate:{name}");
    let spec = |namespaces: Vec<&str>| {
        json!({
            "subjects": [{"kind": "User", "name": "kim"}],
            "access": ["pods"],
            "namespaces": {"names": namespaces},
        })
    };
    w.create(&w.policy(&name, spec(vec![granted.name()])))
        .await?;
    eventually("the leader binds the granted namespace", WAIT, || async {
        role_binding(&w.client, granted.name(), &binding).await
    })
    .await?;
    // Warm standby: before it leads, the standby already holds a watch per cache open.
    let open = eventually("the standby's watches open", WAIT, || async {
        let open = proxy_b.open();
        (open >= WATCHES).then_some(open)
    })
    .await?;
    assert_eq!(
        holder(&w.client, lease_ns.name(), &lease).await.as_deref(),
        Some("kill-a")
    );

    a.child.kill()?; // SIGKILL: no release of the lease, no goodbye.
    let killed = Instant::now();
    w.replace_spec(&name, spec(vec![granted.name(), later.name()]))
        .await?;
    let takeover = eventually("the standby takes the lease", WAIT, || async {
        (holder(&w.client, lease_ns.name(), &lease).await.as_deref() == Some("kill-b"))
            .then(|| killed.elapsed())
    })
    .await?;
    let enforced = eventually(
        "the change made after the kill is enforced",
        WAIT,
        || async {
            role_binding(&w.client, later.name(), &binding)
                .await
                .map(|_| killed.elapsed())
        },
    )
    .await?;
    eprintln!(
        "standby held {open} connections before leading; takeover {takeover:?}, change enforced \
         {enforced:?} after SIGKILL"
    );
    // A standby sees the last renewal at most one (jittered, ×1.25) retry period after it was
    // made and tries again exactly a lease duration later; 1 s for the requests (GET and PUT
    // of the Lease, this test's polling) on a loaded machine.
    let takeover_bound = LEASE_DURATION + RETRY_PERIOD.mul_f64(1.25) + Duration::from_secs(1);
    assert!(
        takeover <= takeover_bound,
        "takeover took {takeover:?}, bound {takeover_bound:?}"
    );
    // One round on warm caches (this world's rounds take well under a second).
    let round = Duration::from_secs(3);
    assert!(
        enforced <= takeover_bound + round,
        "enforced after {enforced:?}, bound {:?}",
        takeover_bound + round
    );
    assert_eq!(b.status("/healthz").await, 200);
    drop(b);
    w.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_partitioned_leader_sends_nothing_after_its_renew_deadline_and_the_new_one_revokes()
-> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let lease_ns = cluster.namespace("leader").await?;
    let kept = cluster.namespace("part-a").await?;
    let removed = cluster.namespace("part-b").await?;
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let node = w.node_names()[0].clone();
    let lease = unique_name("part-lease");
    let dir = std::env::temp_dir();
    let proxy_a = FlakyProxy::start(api_server(&cluster)).await?;
    let kubeconfig_a = kubeconfig_through(&cluster, &proxy_a, &dir);
    let kubeconfig = cluster.location().kubeconfig.clone();
    let (mut a, b) = leader_then_standby(
        &w.client,
        lease_ns.name(),
        &lease,
        || Operator::start(&w, &kubeconfig_a, lease_ns.name(), &lease, "part-a"),
        || Operator::start(&w, &kubeconfig, lease_ns.name(), &lease, "part-b"),
    )
    .await?;
    let name = unique_name("part");
    let binding = format!("nodegate:{name}");
    let user = unique_name("lee");
    let spec = |namespaces: Vec<&str>| {
        json!({
            "subjects": [{"kind": "User", "name": user}],
            "access": ["pods"],
            "namespaces": {"names": namespaces},
        })
    };
    w.create(&w.policy(&name, spec(vec![kept.name(), removed.name()])))
        .await?;
    for ns in [kept.name(), removed.name()] {
        eventually("the leader binds both namespaces", WAIT, || async {
            role_binding(&w.client, ns, &binding).await
        })
        .await?;
    }
    assert!(allowed(&w.client, &user, "get", "pods", &node, removed.name()).await);
    assert_eq!(
        holder(&w.client, lease_ns.name(), &lease).await.as_deref(),
        Some("part-a")
    );

    // Partition the leader, then narrow: only the standby can see the change.
    proxy_a.outage(true);
    let cut = Instant::now();
    w.replace_spec(&name, spec(vec![kept.name()])).await?;

    // The last renewal that reached the API server was sent before the cut, so the deadline
    // has passed by `cut + RENEW_DEADLINE`; half a second more for the process to wind down.
    let quiet_from = cut + RENEW_DEADLINE + Duration::from_millis(500);
    tokio::time::sleep_until(quiet_from.into()).await;
    let (connections, bytes) = (proxy_a.connections(), proxy_a.bytes_from_client());
    let status = a.child.try_wait()?;
    assert!(
        status.is_some_and(|s| !s.success()),
        "the partitioned leader has stepped down (exited non-zero) by its renew deadline: {status:?}"
    );

    let revoked = eventually(
        "the new leader deletes the removed namespace's binding",
        WAIT,
        || async {
            role_binding(&w.client, removed.name(), &binding)
                .await
                .is_none()
                .then(|| cut.elapsed())
        },
    )
    .await?;
    assert_eq!(
        holder(&w.client, lease_ns.name(), &lease).await.as_deref(),
        Some("part-b")
    );
    assert!(!allowed(&w.client, &user, "get", "pods", &node, removed.name()).await);
    assert!(allowed(&w.client, &user, "get", "pods", &node, kept.name()).await);
    // Heal the partition: nothing of the old leader arrives late either.
    proxy_a.outage(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (proxy_a.connections(), proxy_a.bytes_from_client()),
        (connections, bytes),
        "the old leader sent nothing after its renew deadline"
    );
    assert!(
        role_binding(&w.client, removed.name(), &binding)
            .await
            .is_none()
    );
    eprintln!(
        "partitioned leader: {connections} connections, {bytes} bytes before its deadline, none \
         after; binding revoked {revoked:?} after the cut"
    );
    drop(b);
    w.cleanup().await;
    Ok(())
}

/// What a [`hanging_client`] does: while `on`, every request other than a GET (or a watch)
/// waits, as a write stuck on a dead connection would.
#[derive(Default)]
struct Hang {
    on: AtomicBool,
    /// Requests that were held.
    held: AtomicUsize,
    /// Held requests sent on once `on` was cleared (a dropped one never is).
    released: AtomicUsize,
}

fn hanging_client(admin: kube::Client, hang: Arc<Hang>) -> kube::Client {
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let inner = admin.clone();
        let hang = hang.clone();
        async move {
            if request.method() != Method::GET && hang.on.load(Ordering::SeqCst) {
                hang.held.fetch_add(1, Ordering::SeqCst);
                while hang.on.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                hang.released.fetch_add(1, Ordering::SeqCst);
            }
            inner.send(request).await
        }
    });
    kube::Client::new(service, "default")
}

/// `GET path` with curl (not blocking the runtime that serves it): status and body.
async fn curl_status(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-m", "2"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_string())
}

#[tokio::test]
async fn healthz_fails_while_a_round_is_stuck_past_the_stall_bound() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let hang = Arc::new(Hang::default());
    let stall = Duration::from_secs(3);
    let settings = controller::Settings {
        stall_after: stall,
        ..w.settings()
    };
    let client = hanging_client(w.client.clone(), hang.clone());
    let metrics: Metrics = w.start_with(settings, None, client);
    let shutdown = CancellationToken::new();
    let (addr, server) =
        controller::server::bind("127.0.0.1:0".parse()?, metrics.clone(), shutdown.clone()).await?;
    let server = tokio::spawn(server);
    eventually("synced and idle", WAIT, || async {
        let (ready, healthy) = (
            curl_status(addr, "/readyz").await,
            curl_status(addr, "/healthz").await,
        );
        (ready.0 == 200 && healthy.0 == 200).then_some(())
    })
    .await?;

    hang.on.store(true, Ordering::SeqCst);
    let name = unique_name("stall");
    let role_name = format!("nodegate:{name}");
    let created = Instant::now();
    w.create(&w.policy(
        &name,
        json!({"subjects": [{"kind": "User", "name": "sam"}], "access": ["pods"], "namespaces": {"all": true}}),
    ))
    .await?;
    // Within the bound a busy round is healthy.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        curl_status(addr, "/healthz").await.0,
        200,
        "busy for less than the bound"
    );
    let (code, body) = eventually("/healthz reports the stall", WAIT, || async {
        let (code, body) = curl_status(addr, "/healthz").await;
        (code == 503).then_some((code, body))
    })
    .await?;
    let reported = created.elapsed();
    assert!(
        reported >= stall,
        "reported after {reported:?}, before the bound"
    );
    assert!(body.contains("stalled"), "{code}: {body}");
    assert_eq!(
        curl_status(addr, "/readyz").await.0,
        200,
        "readiness is not affected"
    );
    assert!(
        w.cluster_role(&role_name).await.is_none(),
        "the write is stuck"
    );

    hang.on.store(false, Ordering::SeqCst);
    eventually("the round finishes and /healthz recovers", WAIT, || async {
        let role = w.cluster_role(&role_name).await;
        (role.is_some() && curl_status(addr, "/healthz").await.0 == 200).then_some(())
    })
    .await?;
    shutdown.cancel();
    server.await??;
    w.cleanup().await;
    Ok(())
}

/// A leader whose writes and renewals hang (as on a dead connection) steps down at its renew
/// deadline: the round in flight is cancelled, the controller ends with LeadershipLost, and the
/// held write is dropped, never sent, also once the connection would work again.
#[tokio::test]
async fn passing_the_renew_deadline_cancels_the_round_in_flight() -> TestResult {
    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let lease_ns = cluster.namespace("leader").await?;
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let hang = Arc::new(Hang::default());
    let client = hanging_client(w.client.clone(), hang.clone());
    let leader = LeaderSettings {
        lease_duration: LEASE_DURATION,
        renew_deadline: RENEW_DEADLINE,
        retry_period: RETRY_PERIOD,
        ..LeaderSettings::new(unique_name("cancel-lease"), lease_ns.name(), "cancel")
    };
    let settings = w.settings();
    let metrics = w.start_with(settings, Some(leader), client);
    eventually("leading, caches synced", WAIT, || async {
        (metrics.is_leader() && metrics.is_ready()).then_some(())
    })
    .await?;

    hang.on.store(true, Ordering::SeqCst);
    let hung = Instant::now();
    let name = unique_name("cancel");
    let role_name = format!("nodegate:{name}");
    w.create(&w.policy(
        &name,
        json!({"subjects": [{"kind": "User", "name": "cal"}], "access": ["pods"], "namespaces": {"all": true}}),
    ))
    .await?;
    let running = w.controllers.pop().unwrap();
    let ended = tokio::time::timeout(WAIT, running.task).await??;
    let stepped_down = hung.elapsed();
    assert!(
        matches!(ended, Err(controller::Error::LeadershipLost(_))),
        "{ended:?}"
    );
    assert!(
        stepped_down <= RENEW_DEADLINE + Duration::from_secs(1),
        "stepped down {stepped_down:?} after the hang, deadline {RENEW_DEADLINE:?}"
    );
    assert!(!metrics.is_leader());
    let held = hang.held.load(Ordering::SeqCst);
    assert!(
        held >= 2,
        "the round's write and a renewal were held: {held}"
    );

    hang.on.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        hang.released.load(Ordering::SeqCst),
        0,
        "no held request was sent after the step-down"
    );
    assert!(w.cluster_role(&role_name).await.is_none());
    eprintln!("stepped down {stepped_down:?} after the hang; {held} requests held, none sent");
    w.cleanup().await;
    Ok(())
}

/// Two leaders in a row died in a round (the Lease its predecessor left says so): the next one
/// marks every policy `OperatorRestarting` before its own round, then writes the true status
/// once that round finishes, and the Lease it renews says `idle` and 0.
#[tokio::test]
async fn leaders_dying_in_their_rounds_again_and_again_are_reported_on_every_policy() -> TestResult
{
    use futures::StreamExt;
    use kube::runtime::watcher;
    use nodegate_operator::controller::progress::{ROUND_ANNOTATION, UNFINISHED_ANNOTATION};

    let Some(cluster) = cluster().await? else {
        return Ok(());
    };
    let lease_ns = cluster.namespace("leader").await?;
    let ns = cluster.namespace("crashloop").await?;
    let mut w = World::new(cluster.clone(), 1, &[]).await?;
    let name = unique_name("crashloop");
    // Selects no node: Ready as soon as its RBAC is in place (no agent to wait for).
    w.create(&w.policy(
        &name,
        json!({
            "subjects": [{"kind": "User", "name": "lou"}],
            "nodeSelector": {"matchLabels": {"nodegate.io/no-such-pool": "none"}},
            "access": ["pods"],
            "namespaces": {"names": [ns.name()]},
        }),
    ))
    .await?;
    // What the last leader left: it held the lease (1 s, long expired by the time anyone
    // looks) with a round under way, after one predecessor that did the same.
    let lease = unique_name("crash-lease");
    let leases: Api<Lease> = Api::namespaced(w.client.clone(), lease_ns.name());
    leases
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": lease, "annotations": {
                    ROUND_ANNOTATION: "running", UNFINISHED_ANNOTATION: "1"}},
                "spec": {"holderIdentity": "crashed-leader", "leaseDurationSeconds": 1,
                         "leaseTransitions": 3},
            }))?,
        )
        .await?;
    // Every Ready reason the policy's status goes through, in order.
    let reasons = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = reasons.clone();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let watch = tokio::spawn(watcher(w.policies(), config).for_each(move |event| {
        if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = event {
            let reason = p
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .find(|c| c.type_ == "Ready")
                .map(|c| format!("{}:{}", c.status, c.reason));
            if let Some(reason) = reason {
                let mut seen = seen.lock().unwrap();
                if seen.last() != Some(&reason) {
                    seen.push(reason);
                }
            }
        }
        futures::future::ready(())
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let kubeconfig = cluster.location().kubeconfig.clone();
    let operator = Operator::start(&w, &kubeconfig, lease_ns.name(), &lease, "after-crashes");
    eventually(
        "the policy Ready after the new leader's round",
        WAIT,
        || async {
            let (status, _, _) = w.condition(&name, "Ready").await?;
            (status == "True").then_some(())
        },
    )
    .await?;
    let lease_now = eventually("the Lease says idle and 0", WAIT, || async {
        let l = leases.get(&lease).await.ok()?;
        let a = l.metadata.annotations.clone()?;
        (a.get(ROUND_ANNOTATION).map(String::as_str) == Some("idle")
            && a.get(UNFINISHED_ANNOTATION).map(String::as_str) == Some("0"))
        .then_some(l)
    })
    .await?;
    assert_eq!(
        lease_now.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("after-crashes")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    watch.abort();
    let reasons = reasons.lock().unwrap().clone();
    let marked = reasons
        .iter()
        .position(|r| r == "False:OperatorRestarting")
        .unwrap_or_else(|| panic!("never marked OperatorRestarting: {reasons:?}"));
    assert_eq!(
        reasons.last().map(String::as_str),
        Some("True:Ready"),
        "{reasons:?}"
    );
    assert!(marked < reasons.len() - 1, "{reasons:?}");
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(
        log.contains("marking every policy OperatorRestarting"),
        "{}",
        operator.log_tail()
    );
    drop(operator);
    w.cleanup().await;
    Ok(())
}
