//! `/metrics`, `/healthz` and `/readyz` on the metrics address.

use super::{Error, Metrics};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds `addr` (port 0 picks one) and returns the bound address and the server future,
/// which ends when `shutdown` is cancelled.
pub async fn bind(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = Result<(), Error>>), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Serve { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Serve { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    let serve = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|source| Error::Serve {
                addr: bound,
                source,
            })
    };
    Ok((bound, serve))
}

async fn metrics_text(
    State(metrics): State<Metrics>,
) -> ([(&'static str, &'static str); 1], String) {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        metrics.render(),
    )
}

/// Fails while the leader's reconcile loop has been in one round (or waiting for its caches
/// after winning the lease) for longer than `--healthz-stall-seconds`: a liveness probe then
/// restarts a replica whose loop is stuck. A replica waiting idle or standing by is healthy.
async fn healthz(State(metrics): State<Metrics>) -> (StatusCode, String) {
    match metrics.stalled() {
        None => (StatusCode::OK, "ok".into()),
        Some(busy) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: the reconcile loop has been busy for {} s without finishing a round",
                busy.as_secs()
            ),
        ),
    }
}

/// Fails until the watch caches are synced, and on a leader whose predecessors stopped in
/// the middle of a round [`super::progress::REPEATED`] times or more in a row until it has
/// finished one itself: the policies' status is then as the last finished round left it
/// (each says `OperatorRestarting`), so nothing this replica serves is current yet.
async fn readyz(State(metrics): State<Metrics>) -> (StatusCode, String) {
    let unfinished = metrics.unfinished();
    if !metrics.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: watch caches not synced".into(),
        )
    } else if unfinished >= super::progress::REPEATED {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: {unfinished} leaders in a row stopped in the middle of a round \
                 (OOM-killed or crashed?) and this one has not finished a round yet"
            ),
        )
    } else {
        (StatusCode::OK, "ok".into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let metrics = Metrics::new().unwrap();
        let shutdown = CancellationToken::new();
        let (addr, serve) = bind(
            "127.0.0.1:0".parse().unwrap(),
            metrics.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let server = tokio::spawn(serve);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        metrics.loop_busy(std::time::Duration::ZERO);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let stalled = get(addr, "/healthz").await;
        assert!(stalled.starts_with("HTTP/1.1 503"), "{stalled}");
        assert!(stalled.contains("stalled"), "{stalled}");
        metrics.loop_idle();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        // Predecessors died in their rounds: not ready until this leader finishes one.
        metrics.unfinished_rounds(1);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        metrics.unfinished_rounds(2);
        let restarting = get(addr, "/readyz").await;
        assert!(restarting.starts_with("HTTP/1.1 503"), "{restarting}");
        assert!(restarting.contains("2 leaders in a row"), "{restarting}");
        metrics.unfinished_rounds(0);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        metrics.write("ClusterRole", "apply");
        let text = get(addr, "/metrics").await;
        assert!(text.contains("text/plain; version=0.0.4"));
        assert!(text.contains(
            "nodegate_operator_write_requests_total{kind=\"ClusterRole\",op=\"apply\"} 1"
        ));
        assert!(get(addr, "/nothing").await.starts_with("HTTP/1.1 404"));
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
