//! The agent's own metrics, served on the healthz port's `/metrics`.
//!
//! One registry per running agent (not the process-global one), so agents started in one test
//! process count separately.

use ::prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by endpoint (catalogue name, or `none`), status code and decision.
    pub requests: IntCounterVec,
    /// Seconds from the request's arrival to the end of its response body.
    pub duration: HistogramVec,
    /// Upstream failures, by kind (connect, timeout, redirect, body, too_large, filter).
    pub upstream_errors: IntCounterVec,
    /// Response body bytes sent to callers, by endpoint.
    pub bytes: IntCounterVec,
    /// Generation of the configuration being enforced.
    pub config_generation: IntGauge,
    /// Authentication results by method (`anonymous`, `x509`, `token`), result (`ok`,
    /// `refused`) and cause (`ok`, or why: see `AuthnError::cause` and
    /// `tls::client_certificate_refusal`; the handshake's refusals are counted there, as no
    /// request follows them).
    pub authentications: IntCounterVec,
}

impl Metrics {
    /// Startup only: the metric definitions are constant, so registration cannot fail.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "nodegate_agent_requests_total",
                "Requests answered by the agent.",
            ),
            &["endpoint", "code", "decision"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "nodegate_agent_request_duration_seconds",
                "Time from a request's arrival to the end of its response.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["endpoint"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "nodegate_agent_upstream_errors_total",
                "Failures reaching or reading the kubelet.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "nodegate_agent_response_bytes_total",
                "Response body bytes sent to callers.",
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        let config_generation = IntGauge::new(
            "nodegate_agent_config_generation",
            "Generation of the NodeAgentConfig being enforced.",
        )
        .expect("valid metric");
        let authentications = IntCounterVec::new(
            Opts::new(
                "nodegate_agent_authentications_total",
                "Authentication results, by credential, result and cause.",
            ),
            &["method", "result", "cause"],
        )
        .expect("valid metric");
        for c in [&requests, &upstream_errors, &bytes, &authentications] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(config_generation.clone()))
            .expect("unique metric");
        Metrics {
            registry,
            requests,
            duration,
            upstream_errors,
            bytes,
            config_generation,
            authentications,
        }
    }

    /// Registers a collector of another module (the authenticator's cache counters).
    pub fn register(
        &self,
        collector: Box<dyn ::prometheus::core::Collector>,
    ) -> Result<(), ::prometheus::Error> {
        self.registry.register(collector)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics; an error leaves what was written.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_counted_requests() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["pods", "200", "allow"])
            .inc();
        m.config_generation.set(3);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(
                r#"nodegate_agent_requests_total{code="200",decision="allow",endpoint="pods"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("nodegate_agent_config_generation 3"));
    }
}
