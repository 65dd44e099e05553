//! The real kubelet, reached with the agent's own credentials.
//!
//! The caller's credentials never travel upstream: requests are rebuilt from the authorized
//! attributes with a filtered set of headers, and the agent adds its own token (re-read when the
//! projected file rotates) or presents its own client certificate. Redirects are never followed.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of requests sent upstream and of the agent's responses.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// How to reach the kubelet.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `https://host:port` (or `http://` for tests and read-only kubelets).
    pub url: Uri,
    /// CA bundle that verifies the kubelet's serving certificate (the kubelet's own
    /// `kubelet.crt` when it is self-signed). Without it, the system's roots are not used:
    /// verification then needs `insecure_skip_tls_verify`.
    pub ca_file: Option<PathBuf>,
    /// Explicit opt-in: accept any kubelet certificate (logged at startup).
    pub insecure_skip_tls_verify: bool,
    /// The name the kubelet's certificate is checked against, when it differs from the URL's
    /// host (self-signed kubelet certificates name the host, not its IP).
    pub server_name: Option<String>,
    /// A bearer token file (projected service-account token), re-read when it changes.
    pub token_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl UpstreamSettings {
    pub fn new(url: Uri) -> Self {
        UpstreamSettings {
            url,
            ca_file: None,
            insecure_skip_tls_verify: false,
            server_name: None,
            token_file: None,
            client_cert_file: None,
            client_key_file: None,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream URL {0} must be http:// or https:// with a host")]
    BadUrl(String),
    #[error("reading {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("loading PEM from {path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0} needs a CA file or an explicit insecure skip of verification")]
    NoTrust(String),
    #[error("client certificate and key must be given together")]
    HalfClientCert,
    #[error("upstream request failed: {0}")]
    Request(String),
}

/// A bearer token read from a file and re-read when the file changes (kubelet-projected
/// service-account tokens rotate in place, well before they expire).
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    /// How long a read is trusted before the file's mtime is looked at again: a `stat` per
    /// request was one syscall in six on the proxy path.
    recheck: Duration,
    cached: Mutex<Option<CachedToken>>,
}

#[derive(Debug)]
struct CachedToken {
    checked: Instant,
    modified: SystemTime,
    authorization: HeaderValue,
}

impl TokenFile {
    /// Looks at the file at most once a second.
    pub fn new(path: PathBuf) -> Self {
        Self::with_recheck(path, Duration::from_secs(1))
    }

    pub fn with_recheck(path: PathBuf, recheck: Duration) -> Self {
        TokenFile {
            path,
            recheck,
            cached: Mutex::new(None),
        }
    }

    /// `Bearer <token>`, marked sensitive.
    pub fn authorization(&self) -> Result<HeaderValue, UpstreamError> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref()
            && c.checked.elapsed() < self.recheck
        {
            return Ok(c.authorization.clone());
        }
        let file_err = |source| UpstreamError::File {
            path: self.path.clone(),
            source,
        };
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(file_err)?;
        if let Some(c) = cached.as_mut()
            && c.modified == modified
        {
            c.checked = Instant::now();
            return Ok(c.authorization.clone());
        }
        let token = std::fs::read_to_string(&self.path).map_err(file_err)?;
        let mut authorization = HeaderValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| UpstreamError::Request("token is not a valid header value".into()))?;
        authorization.set_sensitive(true);
        *cached = Some(CachedToken {
            checked: Instant::now(),
            modified,
            authorization: authorization.clone(),
        });
        Ok(authorization)
    }
}

/// The connection to the kubelet: plain TCP or TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Connects to the one configured kubelet, whatever URI the client asks for.
#[derive(Clone)]
pub struct Connector {
    addr: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::time::timeout(this.connect_timeout, TcpStream::connect(&this.addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))??;
            tcp.set_nodelay(true)?;
            let stream = match this.tls {
                None => UpstreamStream::Plain(tcp),
                Some((connector, name)) => {
                    let tls =
                        tokio::time::timeout(this.connect_timeout, connector.connect(name, tcp))
                            .await
                            .map_err(|_| {
                                io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout")
                            })??;
                    UpstreamStream::Tls(Box::new(tls))
                }
            };
            Ok(TokioIo::new(stream))
        })
    }
}

/// Accepts any server certificate: only with `--upstream-insecure-skip-tls-verify`.
#[derive(Debug)]
struct SkipVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for SkipVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn pem_err(path: &std::path::Path, e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Pem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn tls_config(s: &UpstreamSettings) -> Result<ClientConfig, UpstreamError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if s.insecure_skip_tls_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipVerification(provider)))
    } else {
        let Some(ca) = &s.ca_file else {
            return Err(UpstreamError::NoTrust(s.url.to_string()));
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err(ca, e))? {
            roots.add(cert.map_err(|e| pem_err(ca, e))?)?;
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match (&s.client_cert_file, &s.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| pem_err(cert, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(cert, e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
            builder.with_client_auth_cert(chain, key)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(UpstreamError::HalfClientCert),
    };
    // Upgrades (exec, attach, portForward) need HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The kubelet client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<Connector, ProxyBody>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    addr: String,
    connect_timeout: Duration,
    token: Option<Arc<TokenFile>>,
}

impl Upstream {
    pub fn new(s: &UpstreamSettings) -> Result<Self, UpstreamError> {
        let bad = || UpstreamError::BadUrl(s.url.to_string());
        let scheme = s.url.scheme().cloned().ok_or_else(bad)?;
        let authority = s.url.authority().cloned().ok_or_else(bad)?;
        let https = match scheme.as_str() {
            "https" => true,
            "http" => false,
            _ => return Err(bad()),
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let tls = if https {
            let name = s.server_name.clone().unwrap_or(host);
            let name = ServerName::try_from(name).map_err(|_| bad())?;
            Some((
                tokio_rustls::TlsConnector::from(Arc::new(tls_config(s)?)),
                name,
            ))
        } else {
            None
        };
        let connector = Connector {
            addr: addr.clone(),
            tls,
            connect_timeout: s.connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(s.idle_timeout)
            .pool_max_idle_per_host(32)
            .build(connector);
        Ok(Upstream {
            client,
            scheme,
            authority,
            addr,
            connect_timeout: s.connect_timeout,
            token: s.token_file.clone().map(|p| Arc::new(TokenFile::new(p))),
        })
    }

    /// The absolute URI of `target` (a path and query) on the kubelet.
    pub fn uri(&self, target: &str) -> Result<Uri, UpstreamError> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(target)
            .build()
            .map_err(|e| UpstreamError::Request(e.to_string()))
    }

    /// Sends a request built by [`forward_headers`]; adds the agent's token.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if let Some(token) = &self.token {
            req.headers_mut()
                .insert(header::AUTHORIZATION, token.authorization()?);
        }
        self.client
            .request(req)
            .await
            .map_err(|e| UpstreamError::Request(error_chain(&e)))
    }

    /// Whether the kubelet accepts TCP connections (for `/readyz`).
    pub async fn reachable(&self) -> bool {
        matches!(
            tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr)).await,
            Ok(Ok(_))
        )
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Headers of one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The WebSocket subprotocol prefix that carries a bearer token.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

fn is_identity_header(name: &str) -> bool {
    name == "authorization"
        || name == "cookie"
        || name.starts_with("x-remote-")
        || name.starts_with("impersonate-")
        || name.starts_with("x-forwarded-")
        || name == "forwarded"
}

/// Names listed in `Connection` (also hop-by-hop).
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The caller's headers that may go upstream: no credentials or identity claims of the caller,
/// no hop-by-hop headers (but `Connection: Upgrade` and `Upgrade` again for an upgrade), no
/// bearer token in the WebSocket subprotocols, no `Host` (set from the upstream URI).
pub fn forward_headers(incoming: &HeaderMap, upgrade: Option<&HeaderValue>) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || listed.iter().any(|l| l == n)
            || is_identity_header(n)
            || n == "host"
        {
            continue;
        }
        if name == header::SEC_WEBSOCKET_PROTOCOL {
            let Ok(list) = value.to_str() else { continue };
            let kept: Vec<&str> = list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty() && !p.starts_with(BEARER_SUBPROTOCOL_PREFIX))
                .collect();
            if !kept.is_empty()
                && let Ok(v) = HeaderValue::try_from(kept.join(", "))
            {
                out.append(name.clone(), v);
            }
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if let Some(protocol) = upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        out.insert(header::UPGRADE, protocol.clone());
    }
    out
}

/// The kubelet's response headers that may go back to the caller: no hop-by-hop headers
/// except, on a 101, the `Connection`/`Upgrade` pair the switch needs.
pub fn response_headers(incoming: &HeaderMap, switching: bool) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        let n = name.as_str();
        let keep_for_switch = switching && (name == header::CONNECTION || name == header::UPGRADE);
        if !keep_for_switch && (HOP_BY_HOP.contains(&n) || listed.iter().any(|l| l == n)) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Header names the agent sets itself on requests it sends.
pub fn header(name: &'static str) -> HeaderName {
    HeaderName::from_static(name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::try_from(*k).unwrap(),
                HeaderValue::try_from(*v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_credentials_identity_and_hop_by_hop_headers() {
        let h = map(&[
            ("authorization", "Bearer secret"),
            ("x-remote-user", "admin"),
            ("x-remote-group", "system:masters"),
            ("impersonate-user", "admin"),
            ("impersonate-group", "system:masters"),
            ("connection", "keep-alive, x-custom"),
            ("x-custom", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "evil"),
            ("accept", "application/json"),
            ("upgrade", "websocket"),
        ]);
        let out = forward_headers(&h, None);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out["accept"], "application/json");
    }

    #[test]
    fn upgrade_keeps_protocol_and_drops_bearer_subprotocol() {
        let h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            (
                "sec-websocket-protocol",
                "v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.c2VjcmV0, v4.channel.k8s.io",
            ),
            ("sec-websocket-key", "abc"),
        ]);
        let out = forward_headers(&h, Some(&HeaderValue::from_static("websocket")));
        assert_eq!(
            out["sec-websocket-protocol"],
            "v5.channel.k8s.io, v4.channel.k8s.io"
        );
        assert_eq!(out["connection"], "Upgrade");
        assert_eq!(out["upgrade"], "websocket");
        assert_eq!(out["sec-websocket-key"], "abc");
        // Only a bearer subprotocol: the header goes entirely.
        let h = map(&[(
            "sec-websocket-protocol",
            "base64url.bearer.authorization.k8s.io.eA",
        )]);
        assert!(forward_headers(&h, None).is_empty());
    }

    #[test]
    fn response_keeps_upgrade_pair_only_when_switching() {
        let h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            ("content-type", "x"),
        ]);
        assert_eq!(response_headers(&h, true).len(), 3);
        assert_eq!(response_headers(&h, false).len(), 1);
    }

    #[test]
    fn token_file_is_reread_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("nodegate-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "one\n").unwrap();
        let t = TokenFile::with_recheck(path.clone(), Duration::ZERO);
        assert_eq!(t.authorization().unwrap(), "Bearer one");
        // A rotation writes a new file (new mtime).
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, "two").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        assert_eq!(t.authorization().unwrap(), "Bearer two");
        assert!(t.authorization().unwrap().is_sensitive());
        // Within the recheck interval the file is not looked at.
        let slow = TokenFile::new(path.clone());
        assert_eq!(slow.authorization().unwrap(), "Bearer two");
        std::fs::write(&path, "three").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(10))
            .unwrap();
        assert_eq!(slow.authorization().unwrap(), "Bearer two");
        assert_eq!(t.authorization().unwrap(), "Bearer three");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn settings_are_checked() {
        let s = UpstreamSettings::new(Uri::from_static("ftp://x"));
        assert!(matches!(Upstream::new(&s), Err(UpstreamError::BadUrl(_))));
        let s = UpstreamSettings::new(Uri::from_static("https://127.0.0.1:10250"));
        assert!(matches!(Upstream::new(&s), Err(UpstreamError::NoTrust(_))));
        let mut s = UpstreamSettings::new(Uri::from_static("https://127.0.0.1:10250"));
        s.insecure_skip_tls_verify = true;
        s.client_cert_file = Some("/nonexistent".into());
        assert!(matches!(
            Upstream::new(&s),
            Err(UpstreamError::HalfClientCert)
        ));
    }
}
