//! One audit line per request (tracing target `audit`), written when the response body ends
//! (or the caller goes away), so it carries the bytes sent and the whole duration.
//!
//! The record holds who asked and what was decided, never a credential: tokens, certificates
//! and the `Authorization` header are not in it.

use crate::metrics::Metrics;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// What the audit line says about one request.
#[derive(Debug, Clone, Default)]
pub struct AuditRecord {
    pub port: &'static str,
    pub user: String,
    pub groups: Vec<String>,
    pub auth_method: &'static str,
    pub method: String,
    pub verb: String,
    pub path: String,
    pub endpoint: String,
    pub subresources: Vec<String>,
    pub decision: &'static str,
    pub policy: String,
    pub reason: String,
    pub status: u16,
}

/// A response body that counts what it sends and writes the audit line and request metrics
/// when it is dropped.
pub struct AuditedBody<B> {
    inner: B,
    bytes: u64,
    record: Option<AuditRecord>,
    started: Instant,
    metrics: Metrics,
}

impl<B> AuditedBody<B> {
    pub fn new(inner: B, record: AuditRecord, started: Instant, metrics: Metrics) -> Self {
        AuditedBody {
            inner,
            bytes: 0,
            record: Some(record),
            started,
            metrics,
        }
    }
}

impl<B> Drop for AuditedBody<B> {
    fn drop(&mut self) {
        let Some(r) = self.record.take() else { return };
        let elapsed = self.started.elapsed();
        let endpoint = if r.endpoint.is_empty() {
            "none"
        } else {
            r.endpoint.as_str()
        };
        self.metrics
            .requests
            .with_label_values(&[endpoint, &r.status.to_string(), r.decision])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[endpoint])
            .observe(elapsed.as_secs_f64());
        self.metrics
            .bytes
            .with_label_values(&[endpoint])
            .inc_by(self.bytes);
        tracing::info!(
            target: "audit",
            port = r.port,
            user = %r.user,
            groups = %r.groups.join(","),
            auth_method = r.auth_method,
            method = %r.method,
            verb = %r.verb,
            path = %r.path,
            endpoint = endpoint,
            subresources = %r.subresources.join(","),
            decision = r.decision,
            policy = %r.policy,
            reason = %r.reason,
            status = r.status,
            bytes = self.bytes,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

impl<B> Body for AuditedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
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
