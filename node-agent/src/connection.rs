//! What one caller's connections may hold: a cap on connections per listener, an idle timeout
//! for connections with no request in flight (HTTP/1.1 and HTTP/2), HTTP/2 keep-alive PINGs,
//! a cap on concurrent HTTP/2 streams and on the size of a request's headers.
//!
//! hyper and hyper-util provide the PINGs, the stream and header caps and, for HTTP/1.1, a
//! header read timeout. They have no idle timeout for HTTP/2 (a connection that sends no
//! request, or never finishes its preface or a stream's headers, stays open for ever) and no
//! connection cap; tower's layers work per request, not per connection. So this module counts
//! the requests in flight on each connection (a request is in flight until its response body
//! ends, so a followed log or a slow upstream body is never idle) and shuts a connection down
//! gracefully once it has had none for the idle timeout, and closes it outright if it is still
//! open and idle one timeout later (a client that ignores GOAWAY).

use crate::upstream::ProxyBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Connection limits of every listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// Open connections per listener; past it new connections are closed at once.
    pub max_connections: usize,
    /// A connection with no request in flight for this long is shut down.
    pub idle_timeout: Duration,
    /// HTTP/1.1: a request's headers must arrive within this time.
    pub header_read_timeout: Duration,
    /// HTTP/2: a PING every interval; no answer within the timeout closes the connection.
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    /// HTTP/2: streams a client may have open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Largest request header section (HTTP/2 header list; HTTP/1.1 read buffer).
    pub max_header_bytes: u32,
}

pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 64 * 1024;
/// hyper's HTTP/1.1 read buffer cannot be smaller.
const MIN_H1_BUFFER: usize = 8192;

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            keep_alive_interval: DEFAULT_KEEP_ALIVE_INTERVAL,
            keep_alive_timeout: DEFAULT_KEEP_ALIVE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

impl ConnectionSettings {
    /// A hyper-util server builder with these limits (HTTP/1.1 and HTTP/2).
    pub fn builder(
        &self,
    ) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
        use hyper_util::rt::{TokioExecutor, TokioTimer};
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size((self.max_header_bytes as usize).max(MIN_H1_BUFFER));
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(self.keep_alive_interval)
            .keep_alive_timeout(self.keep_alive_timeout)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_bytes);
        builder
    }
}

/// The metrics of the agent's limits (connections, JSON memory), registered on its registry.
#[derive(Clone)]
pub struct LimitMetrics {
    /// Connections open now, by listener.
    pub open: IntGaugeVec,
    /// Connections closed at once because the listener had `max_connections` open.
    pub refused: IntCounterVec,
    /// Connections shut down for having no request in flight for the idle timeout.
    pub idle_closed: IntCounterVec,
    /// JSON answers refused with 503 because the memory budget was spent.
    pub json_budget_refusals: IntCounter,
}

impl LimitMetrics {
    /// Startup only: the definitions are constant.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        LimitMetrics {
            open: IntGaugeVec::new(
                Opts::new(
                    "nodegate_agent_open_connections",
                    "Connections open now, by listener.",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            refused: IntCounterVec::new(
                Opts::new(
                    "nodegate_agent_connections_refused_total",
                    "Connections closed on arrival because the listener was at its limit.",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            idle_closed: IntCounterVec::new(
                Opts::new(
                    "nodegate_agent_idle_connections_closed_total",
                    "Connections shut down after the idle timeout with no request in flight.",
                ),
                &["listener"],
            )
            .expect("valid metric"),
            json_budget_refusals: IntCounter::new(
                "nodegate_agent_json_budget_refusals_total",
                "JSON answers (pods, stats) refused with 503: the filtering memory budget was spent.",
            )
            .expect("valid metric"),
        }
    }

    /// Registers the metrics (an error means they are registered already).
    pub fn register(&self, metrics: &crate::metrics::Metrics) -> Result<(), prometheus::Error> {
        metrics.register(Box::new(self.open.clone()))?;
        metrics.register(Box::new(self.refused.clone()))?;
        metrics.register(Box::new(self.idle_closed.clone()))?;
        metrics.register(Box::new(self.json_budget_refusals.clone()))
    }
}

impl Default for LimitMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The open-connection cap of one listener.
#[derive(Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    listener: &'static str,
    metrics: LimitMetrics,
}

/// One admitted connection: frees its slot when dropped.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
    metrics: LimitMetrics,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.metrics.open.with_label_values(&[self.listener]).dec();
    }
}

impl ConnectionLimit {
    pub fn new(max: usize, listener: &'static str, metrics: LimitMetrics) -> Self {
        ConnectionLimit {
            slots: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            listener,
            metrics,
        }
    }

    /// A slot for a new connection, or `None` (counted) when the listener is full.
    pub fn admit(&self) -> Option<Admitted> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                self.metrics.open.with_label_values(&[self.listener]).inc();
                Some(Admitted {
                    _permit: permit,
                    listener: self.listener,
                    metrics: self.metrics.clone(),
                })
            }
            Err(_) => {
                self.metrics
                    .refused
                    .with_label_values(&[self.listener])
                    .inc();
                None
            }
        }
    }
}

/// Counts the requests in flight on one connection.
#[derive(Clone)]
pub struct Activity(Arc<watch::Sender<usize>>);

impl Default for Activity {
    fn default() -> Self {
        Activity(Arc::new(watch::Sender::new(0)))
    }
}

/// A request in flight; it ends when dropped.
pub struct InFlight(Arc<watch::Sender<usize>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Activity {
    pub fn begin(&self) -> InFlight {
        self.0.send_modify(|n| *n += 1);
        InFlight(self.0.clone())
    }

    pub fn in_flight(&self) -> usize {
        *self.0.borrow()
    }

    /// Resolves once the connection has had no request in flight for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            if rx.wait_for(|n| *n == 0).await.is_err() {
                return;
            }
            match tokio::time::timeout(timeout, rx.wait_for(|n| *n > 0)).await {
                Err(_) => return,
                Ok(Err(_)) => return,
                Ok(Ok(_)) => continue,
            }
        }
    }

    /// `body`, with the request counted in flight until the body ends or is dropped.
    pub fn track(&self, body: ProxyBody, in_flight: InFlight) -> ProxyBody {
        Tracked {
            inner: body,
            in_flight: Some(in_flight),
        }
        .boxed_unsync()
    }
}

struct Tracked {
    inner: ProxyBody,
    in_flight: Option<InFlight>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = crate::upstream::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended<T> {
    /// The connection finished by itself (the client closed it, or an error).
    Done(T),
    /// Shut down after the idle timeout; it then finished by itself.
    Idle(T),
    /// Still open one idle timeout after the shutdown: dropped.
    Dropped,
}

/// Drives a hyper connection `$conn` until it ends; starts its graceful shutdown once
/// `$activity` has had no request in flight for `$idle`, and drops it if it is still open and
/// idle one `$idle` later. Evaluates to [`Ended`].
///
/// A macro rather than a generic function: passing hyper-util's connection futures through a
/// generic `async fn` trips rustc's higher-ranked `Send` inference ("implementation of
/// `From` is not general enough").
#[macro_export]
macro_rules! serve_with_idle_timeout {
    ($conn:expr, $activity:expr, $idle:expr) => {{
        let activity: &$crate::connection::Activity = $activity;
        let idle: ::std::time::Duration = $idle;
        let mut conn = ::std::pin::pin!($conn);
        let first = ::tokio::select! {
            out = conn.as_mut() => Some(out),
            () = activity.idle_for(idle) => None,
        };
        match first {
            Some(out) => $crate::connection::Ended::Done(out),
            None => {
                conn.as_mut().graceful_shutdown();
                ::tokio::select! {
                    out = conn.as_mut() => $crate::connection::Ended::Idle(out),
                    () = activity.idle_for(idle) => $crate::connection::Ended::Dropped,
                }
            }
        }
    }};
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_means_no_request_in_flight_for_the_whole_timeout() {
        let activity = Activity::default();
        let t = Duration::from_millis(200);
        let started = tokio::time::Instant::now();
        activity.idle_for(t).await;
        assert!(started.elapsed() >= t);

        // A request in flight for 500 ms, then 200 ms idle: not before 700 ms.
        let started = tokio::time::Instant::now();
        let request = activity.begin();
        let ended = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(request);
        });
        assert_eq!(activity.in_flight(), 1);
        activity.idle_for(t).await;
        ended.await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(700));
        assert_eq!(activity.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_tracked_body_is_in_flight_until_it_ends() {
        let activity = Activity::default();
        let body = http_body_util::Full::new(Bytes::from_static(b"abc"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let body = activity.track(body, activity.begin());
        assert_eq!(activity.in_flight(), 1);
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"abc");
        assert_eq!(activity.in_flight(), 0);
        // Dropped unread: ended too.
        let body = activity.track(crate::server::empty(), activity.begin());
        assert_eq!(activity.in_flight(), 1);
        drop(body);
        assert_eq!(activity.in_flight(), 0);
    }

    #[test]
    fn the_limit_refuses_past_max_and_frees_slots() {
        let metrics = LimitMetrics::new();
        let limit = ConnectionLimit::new(2, "secure", metrics.clone());
        let a = limit.admit().unwrap();
        let _b = limit.admit().unwrap();
        assert!(limit.admit().is_none());
        assert_eq!(metrics.refused.with_label_values(&["secure"]).get(), 1);
        assert_eq!(metrics.open.with_label_values(&["secure"]).get(), 2);
        drop(a);
        assert!(limit.admit().is_some());
    }
}
