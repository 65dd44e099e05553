//! Prometheus metrics and health state, shared by the controller and the HTTP endpoints.
//! Tests read the counters directly (e.g. writes sent on a resync).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What started a reconcile round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundCause {
    /// A watch event (after the debounce).
    Event,
    /// The earliest retry of a failed write came due.
    Retry,
    /// The periodic resync.
    Resync,
}

impl RoundCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RoundCause::Event => "event",
            RoundCause::Retry => "retry",
            RoundCause::Resync => "resync",
        }
    }
}

/// Cheap to clone; every clone updates the same series.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    reconciles: IntCounterVec,
    reconcile_duration: Histogram,
    errors: IntCounterVec,
    requests: IntCounterVec,
    reads: IntCounterVec,
    unchanged: IntCounter,
    policies: IntGauge,
    nodes: IntGauge,
    namespaces: IntGauge,
    owned: IntGaugeVec,
    foreign: IntGauge,
    leader: IntGauge,
    unfinished_rounds: IntGauge,
    watch_errors: IntCounter,
    events_ignored: IntCounterVec,
    events_admitted: IntCounterVec,
    compiles: IntCounter,
    memory: IntGaugeVec,
    ready: AtomicBool,
    /// Since when the reconcile loop has been busy (in a round, or waiting for its caches
    /// after winning the lease) and how long it may be; None while it waits idle or stands by.
    busy: Mutex<Option<(Instant, Duration)>>,
}

impl Metrics {
    /// Builds the metrics on a fresh registry. Only fails on a programming error (a bad or
    /// duplicate metric name), so it is called once at startup.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("nodegate_operator");
        let reconciles = IntCounterVec::new(
            opts(
                "reconciles_total",
                "Reconcile rounds run (each compiles every policy and compares every output), by \
                 what started them: a watch event, a retry of failed writes, or the resync.",
            ),
            &["cause"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "reconcile_duration_seconds",
                "Duration of a reconcile round, writes included.",
            )
            .namespace("nodegate_operator")
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        )?;
        let errors = IntCounterVec::new(
            opts(
                "errors_total",
                "Failed requests, by kind of object and operation.",
            ),
            &["kind", "op"],
        )?;
        let requests = IntCounterVec::new(
            opts(
                "write_requests_total",
                "Write requests sent (apply, delete, status), by kind of object.",
            ),
            &["kind", "op"],
        )?;
        let reads = IntCounterVec::new(
            opts(
                "read_requests_total",
                "GETs outside the watches (ownership checks of names not in the cache).",
            ),
            &["kind"],
        )?;
        let unchanged = IntCounter::with_opts(opts(
            "skipped_unchanged_total",
            "Desired objects not written because the cluster already holds them as desired.",
        ))?;
        let policies = IntGauge::with_opts(opts("policies", "NodeApiPolicies watched."))?;
        let nodes = IntGauge::with_opts(opts("nodes", "Nodes watched."))?;
        let namespaces = IntGauge::with_opts(opts("namespaces", "Namespaces watched."))?;
        let owned = IntGaugeVec::new(
            opts("objects_owned", "Objects nodegate owns, by kind."),
            &["kind"],
        )?;
        let foreign = IntGauge::with_opts(opts(
            "foreign_objects",
            "Desired objects skipped because an object nodegate does not own holds the name.",
        ))?;
        let leader = IntGauge::with_opts(opts(
            "leader",
            "1 while this replica holds the lease and reconciles.",
        ))?;
        let unfinished_rounds = IntGauge::with_opts(opts(
            "unfinished_rounds",
            "Leaders in a row before this one that stopped in the middle of a round (killed, \
             OOM, lost lease), as the Lease told this leader when it took over; 0 once it has \
             finished a round. From 2, every policy is marked OperatorRestarting.",
        ))?;
        let watch_errors = IntCounter::with_opts(opts(
            "watch_errors_total",
            "Watch errors (the watch resumes with backoff).",
        ))?;
        let events_ignored = IntCounterVec::new(
            opts(
                "watch_events_ignored_total",
                "Watch events that started no round because they change nothing a round reads \
                 (node heartbeats, agents' status writes that leave their sync state, the \
                 operator's own status patches), by kind.",
            ),
            &["kind"],
        )?;
        let events_admitted = IntCounterVec::new(
            opts(
                "watch_events_total",
                "Watch events that start a round (after the quiet window), by kind.",
            ),
            &["kind"],
        )?;
        let compiles = IntCounter::with_opts(opts(
            "compiles_total",
            "Compilations of every policy: only rounds whose inputs (policies, node and \
             namespace labels) changed compile; the others reuse the last result.",
        ))?;
        let memory = IntGaugeVec::new(
            opts(
                "memory_bytes",
                "The operator's memory by `state`: current, peak (since the container \
                 started) and limit, from its cgroup (else VmRSS/VmHWM, no limit).",
            ),
            &["state"],
        )?;
        registry.register(Box::new(events_ignored.clone()))?;
        registry.register(Box::new(events_admitted.clone()))?;
        registry.register(Box::new(compiles.clone()))?;
        registry.register(Box::new(memory.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(reads.clone()))?;
        registry.register(Box::new(unchanged.clone()))?;
        registry.register(Box::new(policies.clone()))?;
        registry.register(Box::new(nodes.clone()))?;
        registry.register(Box::new(namespaces.clone()))?;
        registry.register(Box::new(owned.clone()))?;
        registry.register(Box::new(foreign.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(unfinished_rounds.clone()))?;
        registry.register(Box::new(watch_errors.clone()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                reconciles,
                reconcile_duration,
                errors,
                requests,
                reads,
                unchanged,
                policies,
                nodes,
                namespaces,
                owned,
                foreign,
                leader,
                unfinished_rounds,
                watch_errors,
                events_ignored,
                events_admitted,
                compiles,
                memory,
                ready: AtomicBool::new(false),
                busy: Mutex::new(None),
            }),
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which `new` rules out.
        let _ = TextEncoder::new().encode(&self.inner.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    pub(crate) fn round(&self, cause: RoundCause, seconds: f64) {
        self.inner
            .reconciles
            .with_label_values(&[cause.as_str()])
            .inc();
        self.inner.reconcile_duration.observe(seconds);
    }

    /// A write request is about to be sent: also progress of a busy loop (see [`Self::stalled`]).
    pub(crate) fn write(&self, kind: &str, op: &str) {
        self.inner.requests.with_label_values(&[kind, op]).inc();
        if let Ok(mut busy) = self.inner.busy.lock()
            && let Some((since, _)) = busy.as_mut()
        {
            *since = Instant::now();
        }
    }

    pub(crate) fn read(&self, kind: &str) {
        self.inner.reads.with_label_values(&[kind]).inc();
    }

    pub(crate) fn error(&self, kind: &str, op: &str) {
        self.inner.errors.with_label_values(&[kind, op]).inc();
    }

    pub(crate) fn unchanged(&self, n: usize) {
        self.inner.unchanged.inc_by(n as u64);
    }

    pub(crate) fn sizes(&self, policies: usize, nodes: usize, namespaces: usize) {
        self.inner.policies.set(policies as i64);
        self.inner.nodes.set(nodes as i64);
        self.inner.namespaces.set(namespaces as i64);
    }

    pub(crate) fn owned(&self, kind: &str, n: usize) {
        self.inner.owned.with_label_values(&[kind]).set(n as i64);
    }

    pub(crate) fn foreign(&self, n: usize) {
        self.inner.foreign.set(n as i64);
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.inner.leader.set(i64::from(leader));
    }

    pub(crate) fn unfinished_rounds(&self, n: u32) {
        self.inner.unfinished_rounds.set(i64::from(n));
    }

    /// Leaders in a row before this one that stopped in a round, while this one has not
    /// finished one yet (0 once it has).
    pub fn unfinished(&self) -> u32 {
        u32::try_from(self.inner.unfinished_rounds.get()).unwrap_or(0)
    }

    pub(crate) fn watch_error(&self) {
        self.inner.watch_errors.inc();
    }

    pub(crate) fn event_ignored(&self, kind: &str) {
        self.inner.events_ignored.with_label_values(&[kind]).inc();
    }

    pub(crate) fn event_admitted(&self, kind: &str) {
        self.inner.events_admitted.with_label_values(&[kind]).inc();
    }

    /// Watch events of `kind` that started a round so far.
    pub fn events_admitted(&self, kind: &str) -> u64 {
        self.inner.events_admitted.with_label_values(&[kind]).get()
    }

    pub(crate) fn compiled(&self) {
        self.inner.compiles.inc();
    }

    pub(crate) fn memory(&self, reading: &super::memory::Reading) {
        let set = |state: &str, v: u64| {
            self.inner
                .memory
                .with_label_values(&[state])
                .set(i64::try_from(v).unwrap_or(i64::MAX))
        };
        set("current", reading.current);
        if let Some(peak) = reading.peak {
            set("peak", peak);
        }
        if let Some(limit) = reading.limit {
            set("limit", limit);
        }
    }

    /// Compilations so far.
    pub fn compiles(&self) -> u64 {
        self.inner.compiles.get()
    }

    /// Watch events that started no round, all kinds.
    pub fn events_ignored(&self) -> u64 {
        sum(&self.inner.events_ignored)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Relaxed);
    }

    /// The reconcile loop starts work that should end within `bound` (a round, or the cache
    /// sync after winning the lease).
    pub(crate) fn loop_busy(&self, bound: Duration) {
        if let Ok(mut busy) = self.inner.busy.lock() {
            *busy = Some((Instant::now(), bound));
        }
    }

    /// The reconcile loop finished its work: it waits idle (or no longer leads).
    pub(crate) fn loop_idle(&self) {
        if let Ok(mut busy) = self.inner.busy.lock() {
            *busy = None;
        }
    }

    /// How long the reconcile loop has been busy without progress past its bound, if it has:
    /// `/healthz` fails. Progress is a write sent: a first round at scale writes thousands of
    /// objects for minutes and is not stuck (a liveness probe that killed it there restarted
    /// every leader in the same round, forever), while a round held on one write, or caches
    /// that never sync, send nothing.
    /// Whether the reconcile loop is in a round, settling the events that start one, or
    /// waiting for its caches, right now.
    /// The round counter moves only when a round ends, so "no new round" is not "idle".
    pub fn is_busy(&self) -> bool {
        self.inner.busy.lock().map(|b| b.is_some()).unwrap_or(false)
    }

    pub fn stalled(&self) -> Option<Duration> {
        let busy = self.inner.busy.lock().map(|b| *b).unwrap_or(None);
        stalled(busy, Instant::now())
    }

    /// Whether the replica is ready: caches synced while leading, or standing by.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// Write requests sent so far (applies, deletes, status patches), all kinds.
    pub fn writes(&self) -> u64 {
        sum(&self.inner.requests)
    }

    /// Failed requests so far.
    pub fn errors(&self) -> u64 {
        sum(&self.inner.errors)
    }

    /// Reconcile rounds so far.
    pub fn reconciles(&self) -> u64 {
        sum(&self.inner.reconciles)
    }

    /// Reconcile rounds so far that `cause` started.
    pub fn reconciles_by(&self, cause: RoundCause) -> u64 {
        self.inner
            .reconciles
            .with_label_values(&[cause.as_str()])
            .get()
    }

    /// Whether this replica currently leads.
    pub fn is_leader(&self) -> bool {
        self.inner.leader.get() == 1
    }

    /// Watch stream errors so far (each one is retried by the watcher).
    pub fn watch_errors(&self) -> u64 {
        self.inner.watch_errors.get()
    }
}

/// How long work that started at `since` with `bound` has been over it at `now`.
fn stalled(busy: Option<(Instant, Duration)>, now: Instant) -> Option<Duration> {
    let (since, bound) = busy?;
    let busy_for = now.saturating_duration_since(since);
    (busy_for > bound).then_some(busy_for)
}

fn sum(vec: &IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    vec.collect()
        .iter()
        .flat_map(|mf| mf.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_write_sent_is_progress() {
        let m = Metrics::new().unwrap();
        m.loop_busy(Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(150));
        m.write("ClusterRole", "apply");
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(m.stalled(), None, "300 ms busy, but a write 150 ms ago");
        std::thread::sleep(Duration::from_millis(100));
        assert!(m.stalled().is_some(), "250 ms without a write");
        m.loop_idle();
        m.write("ClusterRole", "apply");
        assert_eq!(m.stalled(), None, "a write while idle starts nothing");
    }

    #[test]
    fn stalled_only_when_busy_past_the_bound() {
        let t0 = Instant::now();
        let bound = Duration::from_secs(120);
        assert_eq!(stalled(None, t0 + Duration::from_secs(1000)), None, "idle");
        assert_eq!(stalled(Some((t0, bound)), t0 + bound), None);
        let over = bound + Duration::from_secs(1);
        assert_eq!(stalled(Some((t0, bound)), t0 + over), Some(over));
        let m = Metrics::new().unwrap();
        m.loop_busy(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert!(m.stalled().is_some());
        m.loop_idle();
        assert_eq!(m.stalled(), None);
    }

    #[test]
    fn counts_writes_and_renders_prefixed_series() {
        let m = Metrics::new().unwrap();
        m.write("ClusterRole", "apply");
        m.write("ClusterRole", "apply");
        m.write("NodeApiPolicy", "status");
        assert_eq!(m.writes(), 3);
        let text = m.render();
        assert!(text.contains(
            "nodegate_operator_write_requests_total{kind=\"ClusterRole\",op=\"apply\"} 2"
        ));
        assert!(!text.contains("nodegate_operator_reconciles_total"));
        m.round(RoundCause::Retry, 0.1);
        assert_eq!((m.reconciles(), m.reconciles_by(RoundCause::Retry)), (1, 1));
        assert!(
            m.render()
                .contains("nodegate_operator_reconciles_total{cause=\"retry\"} 1")
        );
    }
}
