//! The controller: watches policies, nodes, namespaces and nodegate's own outputs, and after any
//! change runs one global reconcile (debounced) that compiles everything, compares the result
//! with the watch caches and writes only the differences.
//!
//! One global loop rather than one reconcile per policy because `compile` is global: a node
//! label or a namespace touches many policies at once, and one NodeAgentConfig holds the rules
//! of many policies. The caches make a round cheap (no reads unless a name is missing), and the
//! diff makes a round with nothing to do send no request.

pub mod diff;
pub mod fence;
pub mod leader;
pub mod metrics;
pub mod objects;
pub mod ownership;
mod reconcile;
pub mod server;
pub mod status;

pub use fence::{Fence, Fenced};
pub use leader::LeaderSettings;
pub use metrics::{Metrics, RoundCause};
/// Re-exported so callers stop the controller without depending on tokio-util themselves.
pub use tokio_util::sync::CancellationToken;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::Client;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use nodegate_crds::{NodeAgentConfig, NodeApiPolicy};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How the controller runs. Every field has a command-line flag in the binary.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Only policies matching this label selector are reconciled (None: all).
    pub policy_selector: Option<String>,
    /// Only nodes matching this label selector get a NodeAgentConfig and count for policies.
    pub node_selector: Option<String>,
    /// A name for this controller instance: its outputs carry `nodegate.io/instance=<name>`
    /// and it never touches outputs of another instance. None in production.
    pub instance: Option<String>,
    /// Quiet time after a watch event before a round starts, so bursts make one round.
    pub debounce: Duration,
    /// Rounds run at least this often, events or not.
    pub resync: Duration,
    /// Write requests in flight at once.
    pub concurrency: usize,
    /// First retry delay of a failed object; doubles per failure up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Publish Events (events.k8s.io) for applies, conflicts and errors.
    pub events: bool,
    /// The reporting controller and instance of Events.
    pub reporter: String,
    pub reporter_instance: Option<String>,
    /// `/healthz` fails while the leader's loop has been in one round (or waiting for its
    /// caches after winning the lease) for longer than this: the loop is stuck.
    pub stall_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            policy_selector: None,
            node_selector: None,
            instance: None,
            debounce: Duration::from_millis(200),
            resync: Duration::from_secs(600),
            concurrency: 16,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            events: true,
            reporter: "nodegate-operator".into(),
            reporter_instance: None,
            stall_after: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("a watch cache writer stopped before the cache was ready")]
    CacheNotReady,
    #[error("leader election settings: {0}")]
    LeaderSettings(String),
    #[error("lost the lease ({0}): stopped reconciling")]
    LeadershipLost(String),
    #[error("metrics and health endpoint on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the controller until `shutdown` is cancelled: with leader election when `leader` is
/// set (standing by while another replica leads), otherwise straight away.
pub async fn run(
    client: Client,
    settings: Settings,
    leader: Option<LeaderSettings>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    match leader {
        Some(leader) => leader::run_elected(client, settings, leader, metrics, shutdown).await,
        None => {
            metrics.set_leader(true);
            let result = run_active(client, settings, metrics.clone(), shutdown).await;
            metrics.set_leader(false);
            result
        }
    }
}

/// Watches and reconciles until `shutdown` is cancelled (this replica leads, unfenced).
pub async fn run_active(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let stop = shutdown.child_token();
    let mut watches = start_watches(client.clone(), &settings, metrics.clone(), stop.clone());
    let result = lead(
        client,
        settings,
        metrics,
        watches.stores.clone(),
        watches.trigger.clone(),
        Fence::unfenced(),
        stop.clone(),
    )
    .await;
    stop.cancel();
    watches.tasks.shutdown().await;
    result
}

/// The watch caches and what they share: a change in any of them notifies `trigger`.
pub(crate) struct Watches {
    pub stores: reconcile::Stores,
    pub trigger: Arc<Notify>,
    pub tasks: tokio::task::JoinSet<()>,
}

/// Starts every watch; they run until `stop` is cancelled, whether or not this replica leads.
pub(crate) fn start_watches(
    client: Client,
    settings: &Settings,
    metrics: Metrics,
    stop: CancellationToken,
) -> Watches {
    let trigger = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    let owned = objects::owned_selector(settings.instance.as_deref());
    let cfg = |selector: Option<&str>| match selector {
        Some(s) => watcher::Config::default().labels(s),
        None => watcher::Config::default(),
    };
    let stores = reconcile::Stores {
        policies: spawn_reflector::<NodeApiPolicy>(
            &mut tasks,
            Api::all(client.clone()),
            cfg(settings.policy_selector.as_deref()),
            &trigger,
            &stop,
            &metrics,
        ),
        nodes: watch_meta(
            &mut tasks,
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            cfg(settings.node_selector.as_deref()),
            &trigger,
            &stop,
            &metrics,
        ),
        namespaces: watch_meta(
            &mut tasks,
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            cfg(None),
            &trigger,
            &stop,
            &metrics,
        ),
        cluster_roles: spawn_reflector::<ClusterRole>(
            &mut tasks,
            Api::all(client.clone()),
            cfg(Some(&owned)),
            &trigger,
            &stop,
            &metrics,
        ),
        cluster_role_bindings: spawn_reflector::<ClusterRoleBinding>(
            &mut tasks,
            Api::all(client.clone()),
            cfg(Some(&owned)),
            &trigger,
            &stop,
            &metrics,
        ),
        role_bindings: spawn_reflector::<RoleBinding>(
            &mut tasks,
            Api::all(client.clone()),
            cfg(Some(&owned)),
            &trigger,
            &stop,
            &metrics,
        ),
        service_accounts: spawn_reflector::<ServiceAccount>(
            &mut tasks,
            Api::all(client.clone()),
            cfg(Some(&owned)),
            &trigger,
            &stop,
            &metrics,
        ),
        node_agent_configs: spawn_reflector::<NodeAgentConfig>(
            &mut tasks,
            Api::all(client.clone()),
            cfg(Some(&owned)),
            &trigger,
            &stop,
            &metrics,
        ),
    };
    Watches {
        stores,
        trigger,
        tasks,
    }
}

/// Reconciles once the caches are synced, until `stop` is cancelled; every write passes
/// `fence`.
pub(crate) async fn lead(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    stores: reconcile::Stores,
    trigger: Arc<Notify>,
    fence: Fence,
    stop: CancellationToken,
) -> Result<(), Error> {
    // Caches that never sync are a stall as much as a round that never ends.
    metrics.loop_busy(settings.stall_after);
    let result = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        ready = stores.wait_until_ready() => match ready {
            Ok(()) => {
                tracing::info!("watch caches synced; reconciling");
                metrics.set_ready(true);
                let mut reconciler = reconcile::Reconciler::new(client, settings, metrics.clone(), stores, fence);
                reconcile_loop(&mut reconciler, &trigger, &stop).await;
                Ok(())
            }
            Err(()) => Err(Error::CacheNotReady),
        },
    };
    metrics.loop_idle();
    result
}

async fn reconcile_loop(
    reconciler: &mut reconcile::Reconciler,
    trigger: &Notify,
    stop: &CancellationToken,
) {
    let resync = reconciler.settings().resync;
    let debounce = reconciler.settings().debounce;
    let mut next_resync = Instant::now();
    let mut next_retry: Option<Instant> = None;
    loop {
        reconciler.metrics().loop_idle();
        let retry_at = next_retry.unwrap_or(next_resync);
        let cause = tokio::select! {
            _ = stop.cancelled() => return,
            _ = trigger.notified() => {
                // Let a burst of events settle, then take the events that came meanwhile.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(debounce) => {}
                }
                let _ = trigger.notified().now_or_never();
                RoundCause::Event
            }
            _ = tokio::time::sleep_until(next_resync) => RoundCause::Resync,
            _ = tokio::time::sleep_until(retry_at), if next_retry.is_some() => RoundCause::Retry,
        };
        reconciler
            .metrics()
            .loop_busy(reconciler.settings().stall_after);
        // Losing the lease (or shutting down) cancels the round in flight: its remaining
        // writes are never sent.
        let report = tokio::select! {
            _ = stop.cancelled() => return,
            report = reconciler.round(cause) => report,
        };
        reconciler.metrics().loop_idle();
        next_resync = Instant::now() + resync;
        next_retry = report.next_retry;
    }
}

fn spawn_reflector<K>(
    tasks: &mut tokio::task::JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    trigger: &Arc<Notify>,
    stop: &CancellationToken,
    metrics: &Metrics,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).backoff(watch_backoff()));
    let (trigger, stop, metrics) = (trigger.clone(), stop.clone(), metrics.clone());
    let kind = K::kind(&()).into_owned();
    tasks.spawn(async move {
        let events = stream.for_each(|event| {
            match event {
                Ok(_) => trigger.notify_one(),
                Err(error) => {
                    // The watcher resumes by itself (with backoff), also after an API server
                    // restart; a round after it catches up with whatever was missed.
                    metrics.watch_error();
                    tracing::warn!(kind = %kind, %error, "watch failed; retrying");
                }
            }
            futures::future::ready(())
        });
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = events => {}
        }
    });
    reader
}

/// Longest wait between a failed watch and its retry. kube's default backoff grows to 30 s and
/// starts again only after two quiet minutes, so after a few short API server outages a watch
/// could stay down for half a minute with the others up: a narrowed policy unseen, its grant left
/// in force (the chaos test found 15 s). 5 s bounds that lag at little cost (eight watches).
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

fn watch_backoff() -> kube::runtime::watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(WATCH_BACKOFF_MAX)
        .with_factor(2.0)
        .without_max_times()
        .with_jitter()
        .into()
}

fn watch_meta<K>(
    tasks: &mut tokio::task::JoinSet<()>,
    api: Api<PartialObjectMeta<K>>,
    config: watcher::Config,
    trigger: &Arc<Notify>,
    stop: &CancellationToken,
    metrics: &Metrics,
) -> Store<PartialObjectMeta<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    spawn_reflector(tasks, api, config, trigger, stop, metrics)
}
