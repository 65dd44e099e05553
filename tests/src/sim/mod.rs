//! A kubelet simulator for deterministic agent tests and benchmarks.
//!
//! [`Sim::start`] serves every route of nodegate's endpoint catalogue the way a kubelet 1.37
//! does, with payloads generated from one simulated node ([`world::World`]): N pods in M
//! namespaces, the same pods in `/pods`, `/stats/summary` and every metrics endpoint. It
//! authenticates like a kubelet (or lets everything through with [`SimAuth::AllowAll`]),
//! echoes exec/attach/portForward streams, and records every request it receives, so the
//! agent's tests can assert what reached "upstream". The `kubelet-sim` binary serves the
//! same from the command line.

pub mod auth;
pub mod payload;
pub mod prom;
pub mod record;
mod routes;
mod server;
mod streaming;
pub mod tls;
pub mod world;

pub use auth::{Grant, Identity, SimAuth, StaticAuth};
pub use record::RequestRecord;

use payload::Payloads;
use record::Recorder;
use std::net::SocketAddr;
use std::sync::Arc;
use world::World;

/// How a simulated kubelet behaves.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Where to listen; port 0 picks a free one (see [`Sim::addr`]).
    pub listen: SocketAddr,
    /// The node's name: used in payloads and in SubjectAccessReviews (`nodes/<name>`).
    pub node_name: String,
    pub pods: usize,
    /// Pods are spread round-robin over these.
    pub namespaces: Vec<String>,
    pub auth: SimAuth,
    /// Multiplies the metrics series: 1 is about 100–200 KB of cAdvisor for 30 pods; each step
    /// adds cAdvisor families, and past the full family set more containers per pod (30 pods at
    /// scale 40 are about 8 MB).
    pub payload_scale: usize,
    /// Serve HTTPS with a fresh self-signed CA ([`Sim::ca_pem`]).
    pub tls: bool,
    /// Answer `Accept-Encoding: gzip` with gzip on the Prometheus endpoints, as the kubelet does.
    pub gzip: bool,
    /// Answer the metrics endpoints with the protobuf exposition content type (and a body that
    /// is not text) whatever the `Accept` header, to test that the agent refuses what it cannot
    /// filter. Without it, protobuf is answered only when `Accept` prefers it, as the kubelet
    /// does.
    pub metrics_protobuf: bool,
    /// Lines a container log has before `tailLines`.
    pub log_lines: usize,
    /// Seed of the generated node: the same seed gives the same pods and values.
    pub seed: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            node_name: "sim-node".into(),
            pods: 30,
            namespaces: vec!["default".into(), "kube-system".into(), "team-a".into()],
            auth: SimAuth::AllowAll,
            payload_scale: 1,
            tls: false,
            gzip: true,
            metrics_protobuf: false,
            log_lines: 100,
            seed: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("generating payloads: {0}")]
    Payload(std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Shared by every connection of one simulator.
pub(crate) struct State {
    pub(crate) world: World,
    pub(crate) payloads: Payloads,
    pub(crate) options: SimOptions,
    pub(crate) recorder: Arc<Recorder>,
}

/// A running simulated kubelet; stops serving (and closes its connections) when dropped.
pub struct Sim {
    pub addr: SocketAddr,
    /// The CA of the serving certificate, with `tls`.
    pub ca_pem: Option<String>,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("addr", &self.addr)
            .field("tls", &self.ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Containers per pod for a payload scale: one until the cAdvisor family list is exhausted,
/// then one more per further 3 steps, so large scales stay realistic (sidecars) rather than
/// inventing families.
fn containers_per_pod(scale: usize) -> usize {
    let full = payload::cadvisor::families_for_scale(usize::MAX / 8);
    let scale_for_all = full.div_ceil(payload::cadvisor::CORE_FAMILIES);
    1 + scale.saturating_sub(scale_for_all) / 3
}

impl Sim {
    /// Generates the node's payloads and starts serving.
    pub async fn start(options: SimOptions) -> Result<Sim, SimError> {
        if options.auth.client_ca_pem().is_some() && !options.tls {
            // Bearer tokens still work without TLS; client certificates cannot.
            tracing::warn!("kubelet-sim: a client CA without tls: bearer tokens only");
        }
        let world = World::generate(
            &options.node_name,
            &options.namespaces,
            options.pods,
            containers_per_pod(options.payload_scale),
            options.seed,
        );
        let payloads = Payloads::generate(&world, options.payload_scale.max(1), options.gzip)
            .await
            .map_err(SimError::Payload)?;
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: options.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: options.listen,
            source,
        })?;
        let (acceptor, ca_pem) = if options.tls {
            let mut names = vec!["localhost".to_string(), addr.ip().to_string()];
            if !names.contains(&"127.0.0.1".to_string()) {
                names.push("127.0.0.1".into());
            }
            names.push(options.node_name.clone());
            let cert = tls::serving_cert(&options.node_name, &names)?;
            let config = tls::server_config(&cert, options.auth.client_ca_pem())?;
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
                Some(cert.ca_pem),
            )
        } else {
            (None, None)
        };
        let state = Arc::new(State {
            world,
            payloads,
            options,
            recorder: Arc::new(Recorder::default()),
        });
        let task = tokio::spawn(server::serve(listener, acceptor, state.clone()));
        tracing::info!(%addr, tls = ca_pem.is_some(), "kubelet-sim listening");
        Ok(Sim {
            addr,
            ca_pem,
            state,
            task,
        })
    }

    /// `http://127.0.0.1:port` or `https://…`.
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The simulated node (its pods, namespaces, containers).
    pub fn world(&self) -> &World {
        &self.state.world
    }

    /// The generated bodies, to compare what the agent passed on with what the kubelet sent.
    pub fn payloads(&self) -> &Payloads {
        &self.state.payloads
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.recorder.snapshot()
    }

    pub fn request_count(&self) -> usize {
        self.state.recorder.len()
    }

    /// The `Authorization` header of the latest request (`None` when it had none, or there
    /// was no request).
    pub fn last_authorization(&self) -> Option<String> {
        self.state
            .recorder
            .snapshot()
            .last()
            .and_then(|r| r.authorization.clone())
    }

    pub fn clear_requests(&self) {
        self.state.recorder.clear();
    }

    /// Stops serving now (also done on drop).
    pub fn shutdown(&self) {
        self.task.abort();
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.task.abort();
    }
}
