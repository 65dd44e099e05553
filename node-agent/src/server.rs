//! The listeners and the request pipeline, top to bottom: accept → authenticate → request
//! attributes → authorize → upstream → filter → respond (and audit).
//!
//! [`start`] runs an agent in-process (the binary and the tests use it alike).

use crate::audit::{AuditRecord, AuditedBody};
use crate::authn::{AuthMethod, Authenticator, ConnectionBudget, UserInfo};
use crate::authz::{self, Decision, FilterScope, Requester};
use crate::components::{ComponentSettings, ComponentUpstreams};
use crate::config::ConfigStore;
use crate::connection::{
    Activity, Admitted, ConnectionLimit, ConnectionSettings, Ended, LimitMetrics,
};
use crate::json_filter;
use crate::kubelet_access::{self, KubeletAccess};
use crate::memory_budget::{self, BudgetedBuf, MemoryBudget};
use crate::metrics::Metrics;
use crate::tls::ReloadingTls;
use crate::upgrade;
use crate::upstream::{
    BoxError, ProxyBody, Upstream, UpstreamError, forward_headers, response_headers,
};
use crate::webhook::{AccessQuestion, AccessReviewer};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nodegate_crds::attributes::{RequestAttributes, request_attributes};
use nodegate_crds::catalogue::{Component, ComponentUpstream, Scope, kubelet_path};
use nodegate_crds::{Endpoint, Port};
use rustls_pki_types::CertificateDer;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How requests are authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthorizationMode {
    /// The node's compiled NodeAgentConfig rules only (no API call on the hot path).
    #[value(name = "Policy")]
    Policy,
    /// SubjectAccessReview on nodegate's RBAC resource only.
    #[value(name = "Webhook")]
    Webhook,
    /// Both must allow.
    #[value(name = "PolicyAndWebhook")]
    PolicyAndWebhook,
}

/// What an agent needs besides its collaborators.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    /// The secure (TLS) listener; port 0 picks one.
    pub secure_addr: SocketAddr,
    /// The read-only (plain HTTP, anonymous) listener; `None` disables it.
    pub read_only_addr: Option<SocketAddr>,
    /// `/healthz`, `/livez`, `/readyz`, `/metrics`; `None` disables it.
    pub healthz_addr: Option<SocketAddr>,
    pub authorization_mode: AuthorizationMode,
    /// Largest JSON document filtered (see [`json_filter::DEFAULT_MAX_JSON_BYTES`]).
    pub max_json_bytes: usize,
    /// What the agent's kubelet credential is granted: requests it cannot make are refused
    /// here rather than sent to the kubelet.
    pub kubelet_access: KubeletAccess,
    /// Bytes all JSON filtering may hold at once (see [`crate::memory_budget`]).
    pub json_budget_bytes: usize,
    /// Connection caps and timeouts of every listener.
    pub connections: ConnectionSettings,
    /// The node's other components the agent serves under `/components/…` (none by default).
    pub components: ComponentSettings,
}

impl Settings {
    /// Loopback listeners on free ports, for tests.
    pub fn loopback(node_name: &str) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Settings {
            node_name: node_name.into(),
            secure_addr: any,
            read_only_addr: Some(any),
            healthz_addr: Some(any),
            authorization_mode: AuthorizationMode::Policy,
            max_json_bytes: json_filter::DEFAULT_MAX_JSON_BYTES,
            kubelet_access: KubeletAccess::all(),
            json_budget_bytes: memory_budget::DEFAULT_JSON_BUDGET_BYTES,
            connections: ConnectionSettings::default(),
            components: ComponentSettings::default(),
        }
    }
}

/// The agent's collaborators, built by the caller (the binary from flags, tests from fakes).
#[derive(Clone)]
pub struct Components {
    pub tls: ReloadingTls,
    pub authenticator: Authenticator,
    pub config: ConfigStore,
    pub upstream: Upstream,
    /// Required in the Webhook modes.
    pub access_reviewer: Option<Arc<dyn AccessReviewer>>,
    pub metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--authorization-mode {0:?} needs a SubjectAccessReview client")]
    NoAccessReviewer(AuthorizationMode),
    #[error("component upstreams: {0}")]
    Components(#[from] UpstreamError),
}

/// A running agent. Dropping it stops its listeners (open connections finish on their own).
pub struct Running {
    pub secure_addr: SocketAddr,
    pub read_only_addr: Option<SocketAddr>,
    pub healthz_addr: Option<SocketAddr>,
    pub metrics: Metrics,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits until a listener stops (they run until the process ends or `Running` drops).
    pub async fn wait(mut self) {
        if let Some(task) = self.tasks.pop() {
            let _ = task.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct State {
    settings: Settings,
    parts: Components,
    components: ComponentUpstreams,
    json_budget: MemoryBudget,
    limit_metrics: LimitMetrics,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

/// Binds the listeners and serves until the returned handle drops.
pub async fn start(settings: Settings, parts: Components) -> Result<Running, StartError> {
    if settings.authorization_mode != AuthorizationMode::Policy && parts.access_reviewer.is_none() {
        return Err(StartError::NoAccessReviewer(settings.authorization_mode));
    }
    let secure = bind(settings.secure_addr).await?;
    let secure_addr = local(&secure, settings.secure_addr);
    let read_only = match settings.read_only_addr {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let healthz = match settings.healthz_addr {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let read_only_addr = read_only.as_ref().map(|l| local(l, secure_addr));
    let healthz_addr = healthz.as_ref().map(|l| local(l, secure_addr));
    let metrics = parts.metrics.clone();
    let limit_metrics = LimitMetrics::new();
    if let Err(e) = limit_metrics.register(&metrics) {
        tracing::warn!(error = %e, "limit metrics (connections, JSON budget) not registered");
    }
    let json_budget = MemoryBudget::new(
        settings.json_budget_bytes,
        memory_budget::DEFAULT_BUDGET_WAIT,
    );
    let components = ComponentUpstreams::new(&settings.components)?;
    let probes = settings
        .components
        .probe_interval
        .filter(|_| !components.is_empty());
    let state = Arc::new(State {
        settings,
        parts,
        components: components.clone(),
        json_budget,
        limit_metrics,
    });
    let mut tasks = vec![tokio::spawn(serve_secure(secure, state.clone()))];
    if let Some(interval) = probes {
        tasks.insert(0, tokio::spawn(components.run_probes(interval)));
    }
    if let Some(l) = read_only {
        tasks.push(tokio::spawn(serve_plain(
            l,
            state.clone(),
            Listener::ReadOnly,
        )));
    }
    if let Some(l) = healthz {
        tasks.push(tokio::spawn(serve_plain(
            l,
            state.clone(),
            Listener::Healthz,
        )));
    }
    tracing::info!(%secure_addr, ?read_only_addr, ?healthz_addr, "nodegate-agent serving");
    Ok(Running {
        secure_addr,
        read_only_addr,
        healthz_addr,
        metrics,
        tasks,
    })
}

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts the next connection a listener may take: past `max_connections` a connection is
/// closed on arrival (counted, and logged at most once a second), so a flood of idle or slow
/// connections holds a bounded number of slots and memory, each for at most the idle timeout.
async fn accept(
    listener: &TcpListener,
    limit: &ConnectionLimit,
    name: &'static str,
    last_refusal_log: &mut Option<Instant>,
) -> (tokio::net::TcpStream, SocketAddr, Admitted) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(admitted) = limit.admit() else {
            if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                *last_refusal_log = Some(Instant::now());
                tracing::warn!(listener = name, %peer, "connection limit reached: connection closed");
            }
            drop(tcp);
            continue;
        };
        // Responses are written in several TLS records: without this, Nagle's algorithm and
        // delayed ACKs add ~40 ms to each.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
        }
        return (tcp, peer, admitted);
    }
}

fn log_end<E: std::fmt::Display>(
    peer: SocketAddr,
    listener: &'static str,
    state: &State,
    ended: Ended<Result<(), E>>,
) {
    match ended {
        Ended::Done(Ok(())) => {}
        Ended::Done(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        Ended::Idle(_) | Ended::Dropped => {
            state
                .limit_metrics
                .idle_closed
                .with_label_values(&[listener])
                .inc();
            tracing::debug!(%peer, listener, "idle connection closed");
        }
    }
}

async fn serve_secure(listener: TcpListener, state: Arc<State>) {
    let limits = state.settings.connections;
    let limit = ConnectionLimit::new(
        limits.max_connections,
        "secure",
        state.limit_metrics.clone(),
    );
    let builder = Arc::new(limits.builder());
    let mut last_refusal_log = None;
    loop {
        let (tcp, peer, admitted) =
            accept(&listener, &limit, "secure", &mut last_refusal_log).await;
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let acceptor = state.parts.tls.acceptor();
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    // A refused client certificate is a refused credential: counted here, as
                    // no request ever comes.
                    if let Some(cause) = crate::tls::client_certificate_refusal(&e) {
                        state
                            .parts
                            .metrics
                            .authentications
                            .with_label_values(&["x509", "refused", cause])
                            .inc();
                        tracing::info!(%peer, cause, error = %e, "client certificate refused");
                    }
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let certs: Option<Arc<Vec<CertificateDer<'static>>>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
            // This connection's share of token-review capacity (one review at a time, within
            // its address's budget).
            let budget = state.parts.authenticator.connection(peer.ip());
            let activity = Activity::default();
            let service = service_fn({
                let state = state.clone();
                let activity = activity.clone();
                move |req| {
                    let state = state.clone();
                    let certs = certs.clone();
                    let budget = budget.clone();
                    let activity = activity.clone();
                    let in_flight = activity.begin();
                    async move {
                        let resp = handle(state, Port::Secure, certs, Some(budget), req).await;
                        let (parts, body) = resp.into_parts();
                        Ok::<_, Infallible>(Response::from_parts(
                            parts,
                            activity.track(body, in_flight),
                        ))
                    }
                }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            let ended = crate::serve_with_idle_timeout!(conn, &activity, limits.idle_timeout);
            log_end(peer, "secure", &state, ended);
        });
    }
}

#[derive(Clone, Copy)]
enum Listener {
    ReadOnly,
    Healthz,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::ReadOnly => "read-only",
            Listener::Healthz => "healthz",
        }
    }
}

async fn serve_plain(listener: TcpListener, state: Arc<State>, which: Listener) {
    let limits = state.settings.connections;
    let limit = ConnectionLimit::new(
        limits.max_connections,
        which.name(),
        state.limit_metrics.clone(),
    );
    let builder = Arc::new(limits.builder().http1_only());
    let mut last_refusal_log = None;
    loop {
        let (tcp, peer, admitted) =
            accept(&listener, &limit, which.name(), &mut last_refusal_log).await;
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let activity = Activity::default();
            let service = service_fn({
                let state = state.clone();
                let activity = activity.clone();
                move |req| {
                    let state = state.clone();
                    let activity = activity.clone();
                    let in_flight = activity.begin();
                    async move {
                        let resp = match which {
                            Listener::ReadOnly => {
                                handle(state, Port::ReadOnly, None, None, req).await
                            }
                            Listener::Healthz => health(state, req).await,
                        };
                        let (parts, body) = resp.into_parts();
                        Ok::<_, Infallible>(Response::from_parts(
                            parts,
                            activity.track(body, in_flight),
                        ))
                    }
                }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            let ended = crate::serve_with_idle_timeout!(conn, &activity, limits.idle_timeout);
            log_end(peer, which.name(), &state, ended);
        });
    }
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

async fn health(state: Arc<State>, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok"),
        "/readyz" => {
            let loaded = state.parts.config.is_loaded();
            let reachable = state.parts.upstream.reachable().await;
            if loaded && reachable {
                text(StatusCode::OK, "ok")
            } else {
                let mut why = String::new();
                if !loaded {
                    why.push_str("configuration not loaded\n");
                }
                if !reachable {
                    why.push_str("kubelet not reachable\n");
                }
                text(StatusCode::SERVICE_UNAVAILABLE, why)
            }
        }
        "/metrics" => {
            state
                .parts
                .metrics
                .config_generation
                .set(state.parts.config.current().generation as i64);
            let mut resp = Response::new(full(state.parts.metrics.render()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

/// The `Upgrade` header, when `Connection` asks for an upgrade.
fn upgrade_header(req: &Request<Incoming>) -> Option<&HeaderValue> {
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    if asks {
        req.headers().get(header::UPGRADE)
    } else {
        None
    }
}

/// Paths the kubelet's read-only port answers 405 for ("debugging handlers disabled").
fn read_only_disabled(endpoint: Endpoint) -> bool {
    matches!(
        endpoint,
        Endpoint::Exec
            | Endpoint::Attach
            | Endpoint::PortForward
            | Endpoint::Run
            | Endpoint::ContainerLogs
            | Endpoint::RunningPods
            | Endpoint::Logs
            | Endpoint::Pprof
            | Endpoint::DebugFlags
            | Endpoint::Checkpoint
    )
}

async fn handle(
    state: Arc<State>,
    port: Port,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    budget: Option<ConnectionBudget>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let mut record = AuditRecord {
        port: match port {
            Port::Secure => "secure",
            Port::ReadOnly => "read-only",
        },
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        decision: "deny",
        ..Default::default()
    };
    let resp = pipeline(&state, port, certs, budget, req, &mut record).await;
    record.status = resp.status().as_u16();
    let metrics = state.parts.metrics.clone();
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        AuditedBody::new(body, record, started, metrics).boxed_unsync(),
    )
}

async fn pipeline(
    state: &State,
    port: Port,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    budget: Option<ConnectionBudget>,
    req: Request<Incoming>,
    record: &mut AuditRecord,
) -> Response<ProxyBody> {
    // Authenticate (the read-only port is anonymous, as the kubelet's).
    let user = match port {
        Port::ReadOnly => UserInfo::anonymous(),
        Port::Secure => {
            match state
                .parts
                .authenticator
                .authenticate_on(
                    &budget.unwrap_or_default(),
                    certs.as_deref().map(Vec::as_slice),
                    req.headers(),
                )
                .await
            {
                Ok(user) => {
                    state
                        .parts
                        .metrics
                        .authentications
                        .with_label_values(&[method_name(user.method), "ok", "ok"])
                        .inc();
                    user
                }
                Err(e) => {
                    state
                        .parts
                        .metrics
                        .authentications
                        .with_label_values(&[e.method(), "refused", e.cause()])
                        .inc();
                    record.reason = e.to_string();
                    record.decision = "unauthenticated";
                    return text(StatusCode::UNAUTHORIZED, "Unauthorized");
                }
            }
        }
    };
    record.user = user.name.clone();
    record.groups = user.groups.clone();
    record.auth_method = method_name(user.method);

    // Attributes: the path normalised once; what is authorized is what is forwarded.
    let raw_target = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    let upgrade = upgrade_header(&req).cloned();
    let upgrade_str = upgrade.as_ref().and_then(|v| v.to_str().ok());
    if upgrade.is_some() && upgrade_str.is_none() {
        record.reason = "unreadable Upgrade header".into();
        return text(StatusCode::BAD_REQUEST, "unreadable Upgrade header\n");
    }
    if port == Port::ReadOnly {
        // The read-only port serves reads only; the kubelet's disabled debugging handlers
        // answer 405 whatever the method.
        let route = nodegate_crds::attributes::normalise_target(&raw_target)
            .ok()
            .and_then(|(path, _)| nodegate_crds::attributes::match_route(&path));
        if let Some(route) = &route
            && read_only_disabled(route.endpoint)
        {
            record.endpoint = route.endpoint.name().into();
            record.reason = "not served on the read-only port".into();
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "Debug endpoints are disabled.\n",
            );
        }
        if req.method() != Method::GET || upgrade.is_some() {
            record.reason = "the read-only port serves GET only".into();
            return text(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed\n");
        }
    }
    let attrs = match request_attributes(req.method().as_str(), &raw_target, upgrade_str) {
        Ok(a) => a,
        Err(rejection) => {
            record.reason = rejection.to_string();
            let status =
                StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return text(status, format!("{rejection}\n"));
        }
    };
    record.path = attrs.path.clone();
    record.verb = attrs
        .verb
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    record.subresources = attrs
        .subresources
        .iter()
        .map(|s| s.as_str().to_string())
        .collect();
    if let Some(route) = &attrs.route {
        record.endpoint = route.endpoint.name().into();
    }

    // Authorize.
    let decision = match decide(state, &user, port, &attrs).await {
        Ok(d) => d,
        Err(e) => {
            record.reason = e.clone();
            record.decision = "error";
            tracing::warn!(error = %e, "authorization failed");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error: authorization failed\n",
            );
        }
    };
    record.policy = decision.policy.clone().unwrap_or_default();
    record.reason = decision.reason.clone();
    if !decision.allowed() {
        return text(
            StatusCode::FORBIDDEN,
            authz::forbidden_body(&user.name, &attrs),
        );
    }
    record.decision = "allow";
    let Some(route) = attrs.route.clone() else {
        // authorize never allows a request without a route.
        return text(
            StatusCode::FORBIDDEN,
            authz::forbidden_body(&user.name, &attrs),
        );
    };

    if let Some(upstream) = route.endpoint.component() {
        return component_request(state, upstream, &attrs, &decision, req, record).await;
    }

    // Upstream, if the agent's own credential may make the request.
    if let Err(missing) = state.settings.kubelet_access.reaches(route.endpoint) {
        record.decision = "unavailable";
        record.reason = format!(
            "the agent's kubelet credential lacks nodes/{missing} ({})",
            kubelet_access::chart_value(missing)
        );
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "Forbidden: this installation does not give nodegate-agent the kubelet's \
                 nodes/{missing}, which {} needs (chart value {})\n",
                route.endpoint,
                kubelet_access::chart_value(missing)
            ),
        );
    }
    // Upstream.
    let mut upstream_attrs = attrs.clone();
    upstream_attrs.path = kubelet_path(&attrs.path).to_string();
    let target = match state.parts.upstream.uri(&upstream_attrs.upstream_target()) {
        Ok(t) => t,
        Err(e) => return bad_gateway(state, "request", &e),
    };
    let scope = route.endpoint.spec().scope;
    let filter = decision.filter.clone().filter(|f| !f.unrestricted());
    let mut headers = forward_headers(req.headers(), upgrade.as_ref());
    let client_gzip = crate::prometheus::negotiate::client_accepts_gzip(
        req.headers()
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    if filter.is_some() {
        headers.remove(header::ACCEPT_ENCODING);
        if route.endpoint.serves_prometheus() {
            // Ask only for what the filter reads: protobuf or text formats, gzip or identity.
            let accept = crate::prometheus::negotiate::upstream_accept(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static(crate::prometheus::negotiate::ACCEPT_ENCODING),
            );
        }
        // JSON: no Accept-Encoding, so the kubelet answers uncompressed.
    }
    if attrs.upgrade.is_some() {
        return match upgrade::proxy_upgrade(&state.parts.upstream, req, target, headers).await {
            Ok(resp) => resp,
            Err(e) => bad_gateway(state, "connect", &e),
        };
    }
    let (parts, body) = req.into_parts();
    let mut upstream_req = Request::new(body.map_err(BoxError::from).boxed_unsync());
    *upstream_req.method_mut() = parts.method;
    *upstream_req.uri_mut() = target;
    *upstream_req.headers_mut() = headers;
    let resp = match state.parts.upstream.send(upstream_req).await {
        Ok(r) => r,
        Err(e) => return bad_gateway(state, "connect", &e),
    };
    if resp.status().is_redirection() {
        state
            .parts
            .metrics
            .upstream_errors
            .with_label_values(&["redirect"])
            .inc();
        record.reason = "upstream redirect refused".into();
        return text(
            StatusCode::BAD_GATEWAY,
            "the kubelet answered with a redirect, which the agent does not follow\n",
        );
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers = response_headers(&parts.headers, false);
    let Some(filter) = filter else {
        return Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    };
    if !parts.status.is_success() {
        // Errors carry no pod data; relay them as the kubelet wrote them.
        return Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    }
    match scope {
        Scope::JsonItems { .. } => filter_json(state, route.endpoint, parts, body, &filter).await,
        _ if route.endpoint.serves_prometheus() => {
            filter_metrics(state, parts, body, &filter, client_gzip)
        }
        // authorize gives a filter only for JSON items and Prometheus text.
        _ => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no filter for this endpoint\n",
        ),
    }
}

/// A request to one of the node's other components, already authorized: only the catalogue's
/// path (without `/components/<name>`) and the caller's query go upstream, with the agent's
/// credential for that component; Prometheus answers get the applying rules' transforms.
async fn component_request(
    state: &State,
    upstream: ComponentUpstream,
    attrs: &RequestAttributes,
    decision: &Decision,
    req: Request<Incoming>,
    record: &mut AuditRecord,
) -> Response<ProxyBody> {
    let component = upstream.component();
    let Some((client, url)) = state.components.get(upstream) else {
        record.decision = "unavailable";
        record.reason = format!("{component} is not enabled on this agent");
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "Not Found: this node's agent does not serve {component} (agent flag \
                 --components, chart value agent.components)\n"
            ),
        );
    };
    let Some(path) = upstream.upstream_path(&attrs.path) else {
        // The catalogue's patterns are all under the component's prefix.
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    };
    let mut target_attrs = attrs.clone();
    target_attrs.path = path.to_string();
    let target = match client.uri(&target_attrs.upstream_target()) {
        Ok(t) => t,
        Err(e) => return component_bad_gateway(state, component, url, "request", &e),
    };
    let filter = decision.filter.clone().filter(|f| !f.unrestricted());
    let mut headers = forward_headers(req.headers(), None);
    let client_gzip = crate::prometheus::negotiate::client_accepts_gzip(
        req.headers()
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    let endpoint = attrs.route.as_ref().map(|r| r.endpoint);
    if filter.is_some() && endpoint.is_some_and(Endpoint::serves_prometheus) {
        headers.remove(header::ACCEPT_ENCODING);
        let accept = crate::prometheus::negotiate::upstream_accept(
            req.headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok()),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static(crate::prometheus::negotiate::ACCEPT_ENCODING),
        );
    }
    let mut upstream_req = Request::new(empty());
    *upstream_req.method_mut() = Method::GET;
    *upstream_req.uri_mut() = target;
    *upstream_req.headers_mut() = headers;
    let resp = match client.send(upstream_req).await {
        Ok(r) => r,
        Err(e) => return component_bad_gateway(state, component, url, "connect", &e),
    };
    if resp.status().is_redirection() {
        state
            .parts
            .metrics
            .upstream_errors
            .with_label_values(&["redirect"])
            .inc();
        record.reason = "upstream redirect refused".into();
        return text(
            StatusCode::BAD_GATEWAY,
            format!("{component} answered with a redirect, which the agent does not follow\n"),
        );
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers = response_headers(&parts.headers, false);
    match filter {
        Some(filter) if parts.status.is_success() => {
            filter_metrics(state, parts, body, &filter, client_gzip)
        }
        _ => Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync()),
    }
}

fn component_bad_gateway(
    state: &State,
    component: Component,
    url: &str,
    kind: &str,
    e: &UpstreamError,
) -> Response<ProxyBody> {
    state
        .parts
        .metrics
        .upstream_errors
        .with_label_values(&[kind])
        .inc();
    tracing::warn!(error = %e, %component, upstream = url, "component request failed");
    text(
        StatusCode::BAD_GATEWAY,
        format!("Bad Gateway: {component} could not be reached at {url}\n"),
    )
}

fn method_name(m: AuthMethod) -> &'static str {
    m.as_str()
}

fn bad_gateway(state: &State, kind: &str, e: &UpstreamError) -> Response<ProxyBody> {
    state
        .parts
        .metrics
        .upstream_errors
        .with_label_values(&[kind])
        .inc();
    tracing::warn!(error = %e, "kubelet request failed");
    text(
        StatusCode::BAD_GATEWAY,
        "Bad Gateway: the kubelet could not be reached\n",
    )
}

/// A first reservation for an answer of unknown length (the kubelet streams large lists
/// chunked); the buffers take more from the budget as they grow.
const JSON_FIRST_RESERVATION: usize = 1024 * 1024;

/// `/pods`, `/runningpods/`, `/stats/summary` scoped to the caller's namespaces.
///
/// The answer is read whole (up to `max_json_bytes`), then filtered item by item: the
/// document is never held as a `Value`. The bytes held (the answer, then the kept items) are
/// charged to the agent's JSON memory budget; a request that cannot get its share answers 503
/// with `Retry-After` (see [`crate::memory_budget`]).
async fn filter_json(
    state: &State,
    endpoint: Endpoint,
    mut parts: http::response::Parts,
    mut body: Incoming,
    filter: &FilterScope,
) -> Response<ProxyBody> {
    let max = state.settings.max_json_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let declared_too_large = declared.is_some_and(|n| n > max);
    if declared_too_large || parts.headers.contains_key(header::CONTENT_ENCODING) {
        let kind = if declared_too_large {
            "too_large"
        } else {
            "encoding"
        };
        state
            .parts
            .metrics
            .upstream_errors
            .with_label_values(&[kind])
            .inc();
        return text(
            StatusCode::BAD_GATEWAY,
            "the kubelet's answer cannot be filtered\n",
        );
    }
    // A known length: the answer and at most as much again of kept items, reserved at once.
    let first = declared.map_or(JSON_FIRST_RESERVATION, |n| n.saturating_mul(2));
    let Ok(reservation) = state.json_budget.reserve(first).await else {
        return over_budget(state, endpoint);
    };
    let mut input = BudgetedBuf::new(reservation);
    let mut leader = None;
    if let Some(n) = declared
        && input.reserve(n).is_err()
    {
        return over_budget(state, endpoint);
    }
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                state
                    .parts
                    .metrics
                    .upstream_errors
                    .with_label_values(&["body"])
                    .inc();
                tracing::warn!(error = %e, %endpoint, "reading the kubelet's answer failed");
                return text(
                    StatusCode::BAD_GATEWAY,
                    "the kubelet's answer could not be read or is too large to filter\n",
                );
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if input.len() + data.len() > max {
            state
                .parts
                .metrics
                .upstream_errors
                .with_label_values(&["too_large"])
                .inc();
            return text(
                StatusCode::BAD_GATEWAY,
                "the kubelet's answer could not be read or is too large to filter\n",
            );
        }
        if input.extend(&data).is_err() {
            // Spent: the leader waits for room (its input, some growth, and as much again
            // for the kept items), every other request gives up and frees what it held.
            let need = input.len() + data.len();
            let want = need.saturating_mul(2) + need / 4 + JSON_FIRST_RESERVATION;
            if !lead_and_hold(state, &mut leader, &mut input, want).await
                || input.extend(&data).is_err()
            {
                return over_budget(state, endpoint);
            }
        }
    }
    drop(body);
    // The leader also holds room for the kept items (at most the input) before it filters, so
    // it cannot fail there; the others take that room as they go, or give up.
    if leader.is_some() {
        let want = input.capacity() + input.len();
        if !lead_and_hold(state, &mut leader, &mut input, want).await {
            return over_budget(state, endpoint);
        }
    }
    let (input, reservation) = input.into_parts();
    let input_capacity = input.capacity();
    let scope = filter.clone();
    // Parsing tens of megabytes is CPU work: off the async workers, so other connections
    // (health probes included) keep being served.
    let filtered = tokio::task::spawn_blocking(move || {
        let mut kept = BudgetedBuf::new(reservation);
        let result = json_filter::filter_into(endpoint, &input, &scope, &mut kept);
        drop(input);
        let (kept, mut reservation) = kept.into_parts();
        reservation.release(input_capacity);
        result.map(|parts| (parts, kept, reservation))
    })
    .await;
    match filtered {
        Ok(Ok((filtered, kept, reservation))) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            // The kept items go out as they are (no copy into one buffer); their bytes stay
            // charged to the budget until the body is sent or dropped.
            let body = memory_budget::HeldBody::new(
                [filtered.head, kept, filtered.tail].map(Bytes::from),
                reservation,
            )
            .map_err(|never| match never {})
            .boxed_unsync();
            Response::from_parts(parts, body)
        }
        Ok(Err(json_filter::FilterError::Budget)) => over_budget(state, endpoint),
        Ok(Err(e)) => {
            state
                .parts
                .metrics
                .upstream_errors
                .with_label_values(&["filter"])
                .inc();
            tracing::warn!(error = %e, %endpoint, "JSON filter refused the kubelet's answer");
            text(
                StatusCode::BAD_GATEWAY,
                "the kubelet's answer could not be filtered\n",
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, %endpoint, "JSON filter task failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the kubelet's answer could not be filtered\n",
            )
        }
    }
}

/// 503 with `Retry-After`: the JSON memory budget cannot take this answer now.
/// Makes this request the JSON budget's leader (unless another request is) and waits until
/// `input`'s reservation holds `bytes`; false when it cannot lead or no room came in time.
async fn lead_and_hold(
    state: &State,
    leader: &mut Option<memory_budget::Leadership>,
    input: &mut BudgetedBuf,
    bytes: usize,
) -> bool {
    if leader.is_none() {
        *leader = state.json_budget.lead();
    }
    let Some(lead) = leader.as_ref() else {
        return false;
    };
    input
        .reservation_mut()
        .hold_at_least(bytes, lead, memory_budget::LEADER_WAIT)
        .await
        .is_ok()
}

fn over_budget(state: &State, endpoint: Endpoint) -> Response<ProxyBody> {
    state.limit_metrics.json_budget_refusals.inc();
    tracing::warn!(%endpoint, budget = state.json_budget.total(), "JSON memory budget spent: 503");
    let mut resp = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the agent is filtering as much as its memory budget allows; retry shortly\n",
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// Prometheus text or protobuf scoped to the caller's namespaces, filtered on the stream (never
/// held whole), gzip re-encoded when the caller takes it. An answer the filter cannot read (an
/// unknown type or coding) is refused, never relayed; the kubelet's `Content-Type` is kept.
fn filter_metrics(
    state: &State,
    mut parts: http::response::Parts,
    body: Incoming,
    filter: &FilterScope,
    client_gzip: bool,
) -> Response<ProxyBody> {
    use crate::prometheus::{Filter, FilterConfig, FilterRules, Grant, filter_body, negotiate};
    let upstream = match negotiate::check_upstream(&parts.headers) {
        Ok(u) => u,
        Err(refusal) => {
            state
                .parts
                .metrics
                .upstream_errors
                .with_label_values(&["unfilterable"])
                .inc();
            tracing::warn!(%refusal, "metrics answer cannot be filtered");
            return text(
                StatusCode::BAD_GATEWAY,
                "the kubelet's metrics cannot be filtered\n",
            );
        }
    };
    let config = FilterConfig {
        grants: filter
            .grants
            .iter()
            .map(|g| Grant {
                namespaces: g.namespaces.clone(),
                metrics: g.metrics.clone(),
            })
            .collect(),
    };
    let rules = match FilterRules::new(&config) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::warn!(error = %e, "policy metrics transform cannot be applied");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the policy's metrics transform cannot be applied\n",
            );
        }
    };
    let filter: crate::prometheus::BodyFilter = match upstream.exposition {
        negotiate::Exposition::Text(format) => Filter::new(rules, format).into(),
        negotiate::Exposition::Protobuf => crate::prometheus::ProtoFilter::new(rules).into(),
    };
    let (stream, _stats) = filter_body(
        body.into_data_stream(),
        upstream.decoding,
        filter,
        client_gzip,
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_ENCODING);
    if client_gzip {
        parts
            .headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    let body = http_body_util::StreamBody::new(futures::TryStreamExt::map_ok(
        stream,
        hyper::body::Frame::data,
    ))
    .map_err(BoxError::from)
    .boxed_unsync();
    Response::from_parts(parts, body)
}

/// Authorizes by the configured mode.
async fn decide(
    state: &State,
    user: &UserInfo,
    port: Port,
    attrs: &RequestAttributes,
) -> Result<Decision, String> {
    let config = state.parts.config.current();
    let who = Requester {
        name: &user.name,
        groups: &user.groups,
    };
    let policy = authz::authorize(who, port, attrs, &config.spec);
    let mode = state.settings.authorization_mode;
    if mode == AuthorizationMode::Policy || port == Port::ReadOnly {
        // The read-only port is anonymous: RBAC has nothing to say about it.
        return Ok(policy);
    }
    if mode == AuthorizationMode::PolicyAndWebhook && !policy.allowed() {
        return Ok(policy);
    }
    let (Some(route), Some(verb)) = (&attrs.route, attrs.verb) else {
        return Ok(policy);
    };
    if port == Port::ReadOnly && !route.endpoint.spec().read_only {
        return Ok(policy);
    }
    let namespace = match route.endpoint.spec().scope {
        Scope::Path => route.namespace.clone().unwrap_or_default(),
        _ => String::new(),
    };
    let Some(reviewer) = &state.parts.access_reviewer else {
        return Err("no SubjectAccessReview client".into());
    };
    let question = AccessQuestion::new(
        user,
        verb.as_str(),
        route.endpoint.name(),
        &state.settings.node_name,
        &namespace,
    );
    let allowed = reviewer.allowed(&question).await?;
    let webhook = Decision {
        verdict: if allowed {
            authz::Verdict::Allow
        } else {
            authz::Verdict::Deny
        },
        policy: None,
        policies: vec![],
        reason: format!(
            "SubjectAccessReview {} {verb} nodeagentconfigs/{} in namespace {namespace:?}",
            if allowed { "allows" } else { "denies" },
            route.endpoint.name()
        ),
        // RBAC at cluster scope means every namespace: unfiltered but for the metric
        // transforms of the node's rules that grant this caller the request.
        filter: if allowed {
            authz::webhook_filter(who, port, attrs, &config.spec)
        } else {
            None
        },
    };
    Ok(match mode {
        AuthorizationMode::Webhook => webhook,
        // Both allowed: the policy's (narrower or equal) filter applies.
        _ if allowed => Decision {
            reason: format!("{}; {}", policy.reason, webhook.reason),
            ..policy
        },
        _ => webhook,
    })
}
