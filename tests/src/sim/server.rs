//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2, with upgrades. Connections live in
//! a `JoinSet` owned by the loop, so aborting the loop (dropping the [`super::Sim`]) closes
//! them all.

use super::State;
use super::auth::Identity;
use super::tls::certificate_identity;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// What a connection knows about its peer.
#[derive(Clone, Debug, Default)]
pub(crate) struct Peer {
    /// The identity of a client certificate the TLS layer verified.
    pub(crate) certificate: Option<Identity>,
}

pub(crate) async fn serve(listener: TcpListener, acceptor: Option<TlsAcceptor>, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "kubelet-sim: accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            match acceptor {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => {
                        let certificate = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|der| certificate_identity(der));
                        serve_connection(TokioIo::new(tls), Peer { certificate }, state).await;
                    }
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "kubelet-sim: TLS handshake failed")
                    }
                },
                None => serve_connection(TokioIo::new(stream), Peer::default(), state).await,
            }
        });
    }
}

async fn serve_connection<I>(io: I, peer: Peer, state: Arc<State>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = Arc::new(peer);
    let service = service_fn(move |req| {
        let state = state.clone();
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(super::routes::handle(state, peer, req).await) }
    });
    let builder = Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
        tracing::debug!(error = %e, "kubelet-sim: connection ended with an error");
    }
}
