//! The controller: watches policies, nodes, namespaces and nodegate's own outputs, and after a
//! change that a round reads (not a heartbeat, see `watch.rs`) runs one global reconcile, after
//! a quiet window, that compiles everything (unless its inputs are those of the last compile),
//! compares the result with the watch caches and writes only the differences.
//!
//! One global loop rather than one reconcile per policy because `compile` is global: a node
//! label or a namespace touches many policies at once, and one NodeAgentConfig holds the rules
//! of many policies. The caches make a round cheap (no reads unless a name is missing), and the
//! diff makes a round with nothing to do send no request.

pub mod diff;
pub mod fence;
pub mod leader;
pub mod memory;
pub mod metrics;
pub mod objects;
pub mod ownership;
pub mod progress;
mod reconcile;
pub mod server;
pub mod status;
mod watch;

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
use nodegate_crds::{NodeAgentConfig, NodeAgentRuleSet, NodeApiPolicy};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use watch::Watched;

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
    /// The longest a round waits for quiet: events that keep coming (a big rollout) still
    /// get a round this long after the first of them.
    pub debounce_max: Duration,
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
            debounce_max: Duration::from_secs(2),
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
    // Every replica watches its own memory against its limit, leading or not.
    let memory = tokio::spawn(memory::watch(
        metrics.clone(),
        Duration::from_secs(5),
        shutdown.child_token(),
    ));
    let result = run_replica(client, settings, leader, metrics, shutdown).await;
    memory.abort();
    result
}

async fn run_replica(
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
        Term {
            fence: Fence::unfenced(),
            progress: progress::Progress::default(),
        },
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
        node_agent_rule_sets: spawn_reflector::<NodeAgentRuleSet>(
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
/// What a term of leadership writes with: the fence every write passes, and the record of its
/// rounds that its successor reads (see `progress.rs`). Unfenced and unrecorded without leader
/// election.
pub(crate) struct Term {
    pub fence: Fence,
    pub progress: progress::Progress,
}

pub(crate) async fn lead(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    stores: reconcile::Stores,
    trigger: Arc<Notify>,
    term: Term,
    stop: CancellationToken,
) -> Result<(), Error> {
    let Term { fence, progress } = term;
    // Caches that never sync are a stall as much as a round that never ends.
    metrics.loop_busy(settings.stall_after);
    let result = tokio::select! {
        _ = stop.cancelled() => Ok(()),
        ready = stores.wait_until_ready() => match ready {
            Ok(()) => {
                tracing::info!("watch caches synced; reconciling");
                metrics.set_ready(true);
                let mut reconciler = reconcile::Reconciler::new(client, settings, metrics.clone(), stores, fence);
                reconcile_loop(&mut reconciler, &trigger, &progress, &stop).await;
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
    progress: &progress::Progress,
    stop: &CancellationToken,
) {
    // Predecessors that died in a round, again and again: every policy says so before this
    // leader's first round, which is where they died.
    let unfinished = progress.unfinished();
    reconciler.metrics().unfinished_rounds(unfinished);
    if unfinished >= progress::REPEATED {
        tokio::select! {
            _ = stop.cancelled() => return,
            () = reconciler.tell_restarting(unfinished) => {}
        }
    }
    let resync = reconciler.settings().resync;
    let debounce = reconciler.settings().debounce;
    let debounce_max = reconciler.settings().debounce_max;
    let mut next_resync = Instant::now();
    let mut next_retry: Option<Instant> = None;
    loop {
        reconciler.metrics().loop_idle();
        let retry_at = next_retry.unwrap_or(next_resync);
        let cause = tokio::select! {
            _ = stop.cancelled() => return,
            _ = trigger.notified() => {
                // A round is coming once events settle: the loop is no longer idle (what
                // `Metrics::is_busy` tells, e.g. a test waiting for a quiet controller).
                reconciler
                    .metrics()
                    .loop_busy(reconciler.settings().stall_after);
                if !settle(trigger, stop, debounce, debounce_max).await {
                    return;
                }
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
        progress.round_started();
        let report = tokio::select! {
            _ = stop.cancelled() => return,
            report = reconciler.round(cause) => report,
        };
        progress.round_finished();
        reconciler.metrics().unfinished_rounds(0);
        reconciler.metrics().loop_idle();
        next_resync = Instant::now() + resync;
        next_retry = report.next_retry;
    }
}

/// After a first event: waits for a quiet window (`debounce` without another event), but no
/// longer than `max` after the first event, so a burst makes one round and a stream of events
/// that never pauses still gets one. Events that come meanwhile are taken with it. False when
/// `stop` was cancelled.
async fn settle(
    trigger: &Notify,
    stop: &CancellationToken,
    debounce: Duration,
    max: Duration,
) -> bool {
    let deadline = Instant::now() + max.max(debounce);
    let mut quiet_at = Instant::now() + debounce;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep_until(quiet_at.min(deadline)) => break,
            _ = trigger.notified() => quiet_at = Instant::now() + debounce,
        }
    }
    let _ = trigger.notified().now_or_never();
    true
}

fn spawn_reflector<K: Watched>(
    tasks: &mut tokio::task::JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    trigger: &Arc<Notify>,
    stop: &CancellationToken,
    metrics: &Metrics,
) -> Store<K> {
    let (reader, writer) = reflector::store();
    // Slimmed before the cache stores it; listed in pages sized for the kind.
    let config = config.page_size(K::PAGE_SIZE);
    let stream = reflector::reflector(
        writer,
        watcher(api, config)
            .modify(K::slim)
            .backoff(watch_backoff()),
    );
    let (trigger, stop, metrics) = (trigger.clone(), stop.clone(), metrics.clone());
    let kind = K::kind(&()).into_owned();
    let mut gate = watch::Gate::default();
    tasks.spawn(async move {
        let events = stream.for_each(|event| {
            match event {
                // Only an event that may change a round's outcome starts one.
                Ok(event) => {
                    if gate.admit(&event) {
                        metrics.event_admitted(&kind);
                        trigger.notify_one();
                    } else {
                        metrics.event_ignored(&kind);
                    }
                }
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
    PartialObjectMeta<K>: Watched,
{
    spawn_reflector(tasks, api, config, trigger, stop, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events every 150 ms, `n` of them, from the start.
    fn events(trigger: &Arc<Notify>, n: usize) -> tokio::task::JoinHandle<()> {
        let trigger = trigger.clone();
        tokio::spawn(async move {
            for _ in 0..n {
                trigger.notify_one();
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_waits_for_a_quiet_window() {
        let trigger = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let start = Instant::now();
        // Events at 0, 150 and 300 ms: quiet from 300 ms on, so the round starts at 500 ms
        // (a fixed delay after the first event would start it at 200 ms, mid-burst).
        let burst = events(&trigger, 3);
        trigger.notified().await;
        let (debounce, max) = (Duration::from_millis(200), Duration::from_secs(2));
        assert!(settle(&trigger, &stop, debounce, max).await);
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        burst.await.unwrap();
        // The burst's events were taken with it: no second round is pending.
        assert!(trigger.notified().now_or_never().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn events_that_never_pause_still_get_a_round_after_the_max_delay() {
        let trigger = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let start = Instant::now();
        let stream = events(&trigger, 100);
        trigger.notified().await;
        let (debounce, max) = (Duration::from_millis(200), Duration::from_secs(2));
        assert!(settle(&trigger, &stop, debounce, max).await);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        stream.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn settling_ends_when_stopped() {
        let trigger = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        stop.cancel();
        let (debounce, max) = (Duration::from_millis(200), Duration::from_secs(2));
        assert!(!settle(&trigger, &stop, debounce, max).await);
    }
}
