//! The secure listener's TLS: serving certificate and client CA, reloaded without a restart.
//!
//! Files are re-read by polling and comparing their *contents*, not by file-system events:
//! Kubernetes secret and configmap volumes (and cert-manager's csi driver) update files by an
//! atomic rename of a directory symlink, which inotify watches on the old file never see.
//! A new certificate, key or CA that does not load keeps the old configuration in service
//! (and is logged); connections already open keep the configuration they started with.
//!
//! A client certificate is *requested, not required*, and only when a client CA is given:
//! without one the agent has no x509 authentication at all. A presented certificate that does
//! not verify fails the handshake, so it can never reach the authenticator and become an
//! anonymous request.

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Where the secure listener's certificate, key and client CA come from.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// `--tls-cert-file`: PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// `--tls-private-key-file`: PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// `--client-ca-file`: PEM CA bundle client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
    /// Names and addresses for the self-signed certificate made when no certificate is given.
    pub node_name: String,
    pub node_ips: Vec<IpAddr>,
    /// ALPN protocols offered, most preferred first; empty offers none (HTTP/1.1).
    pub alpn_protocols: Vec<Vec<u8>>,
}

impl TlsSettings {
    /// ALPN for a kubelet-like server: HTTP/2 and HTTP/1.1 (upgrades need HTTP/1.1).
    pub fn default_alpn() -> Vec<Vec<u8>> {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("--tls-cert-file and --tls-private-key-file must be given together")]
    CertWithoutKey,
    #[error("certificate and key do not match or are unusable: {0}")]
    Config(String),
    #[error("client CA: {0}")]
    ClientCa(String),
    #[error("generating a self-signed certificate: {0}")]
    SelfSigned(String),
}

/// The file contents a configuration was built from, to notice changes.
#[derive(Clone, PartialEq, Eq)]
struct Sources {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// One loaded configuration.
struct Loaded {
    config: Arc<ServerConfig>,
    /// `None` for the self-signed certificate (nothing to re-read).
    sources: Option<Sources>,
    expiry: Option<SystemTime>,
    client_ca: bool,
}

struct Inner {
    settings: TlsSettings,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
    /// The contents of the last attempt that failed, so a broken file is logged once, not at
    /// every poll.
    last_failed: std::sync::Mutex<Option<Sources>>,
    last_error: ArcSwap<Option<String>>,
}

/// The secure listener's TLS configuration, swapped atomically when the files change.
#[derive(Clone)]
pub struct ReloadingTls {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("settings", &self.inner.settings)
            .field("expiry", &self.serving_cert_expiry())
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Loads the configured files, or makes a self-signed certificate when no certificate
    /// is configured (logged as a warning: clients cannot verify the agent).
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = match (&settings.cert_file, &settings.key_file) {
            (Some(_), Some(_)) => {
                let sources = read_sources(&settings)?;
                build(&provider, &settings, &sources, true)?
            }
            (None, None) => {
                tracing::warn!(
                    node = %settings.node_name,
                    "no --tls-cert-file given: serving a self-signed certificate"
                );
                self_signed(&provider, &settings)?
            }
            _ => return Err(TlsError::CertWithoutKey),
        };
        Ok(ReloadingTls {
            inner: Arc::new(Inner {
                settings,
                provider,
                current: ArcSwap::from_pointee(loaded),
                last_failed: std::sync::Mutex::new(None),
                last_error: ArcSwap::from_pointee(None),
            }),
        })
    }

    /// An acceptor with the current configuration; take one per connection so rotations
    /// apply to new connections.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server_config())
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner.current.load().config.clone()
    }

    /// When the serving certificate in use expires (`notAfter`).
    pub fn serving_cert_expiry(&self) -> Option<SystemTime> {
        self.inner.current.load().expiry
    }

    /// Whether client certificates are requested and verified (a client CA is configured).
    /// The authenticator trusts x509 identities only when this is true.
    pub fn client_ca_configured(&self) -> bool {
        self.inner.current.load().client_ca
    }

    /// The last reload failure, until a reload succeeds.
    pub fn last_error(&self) -> Option<String> {
        (**self.inner.last_error.load()).clone()
    }

    /// Re-reads the files and swaps in a new configuration when their contents changed.
    /// `Ok(true)` when swapped; on error the current configuration stays in service.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let current = self.inner.current.load();
        let Some(old) = &current.sources else {
            return Ok(false);
        };
        let settings = &self.inner.settings;
        let sources = read_sources(settings)?;
        if &sources == old {
            return Ok(false);
        }
        let loaded = build(&self.inner.provider, settings, &sources, false)?;
        let expiry = loaded.expiry;
        self.inner.current.store(Arc::new(loaded));
        self.inner.last_error.store(Arc::new(None));
        tracing::info!(
            ?expiry,
            "TLS certificate, key or client CA changed: reloaded"
        );
        Ok(true)
    }

    /// Polls the files every `interval`, forever. Failures keep the old configuration and
    /// are logged once per distinct broken content.
    pub async fn run_reload_loop(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            self.reload_logged();
        }
    }

    /// One poll, logging a failure once per distinct content.
    pub fn reload_logged(&self) {
        if let Err(error) = self.reload() {
            let seen = read_sources(&self.inner.settings).ok();
            let mut last = self
                .inner
                .last_failed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if seen.is_none() || *last != seen {
                tracing::error!(%error, "TLS reload failed: keeping the previous certificate");
            }
            *last = seen;
            self.inner
                .last_error
                .store(Arc::new(Some(error.to_string())));
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_sources(settings: &TlsSettings) -> Result<Sources, TlsError> {
    let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) else {
        return Err(TlsError::CertWithoutKey);
    };
    Ok(Sources {
        cert: read(cert)?,
        key: read(key)?,
        client_ca: settings.client_ca_file.as_deref().map(read).transpose()?,
    })
}

fn parse_chain(pem: &[u8], path: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let parse_err = |reason: String| TlsError::Parse {
        path: path.map(Path::to_path_buf).unwrap_or_default(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(parse_err("no certificate found".into()));
    }
    Ok(certs)
}

/// A verifier that asks for a client certificate, accepts a connection without one, and
/// fails the handshake for one that does not chain to `ca_pem`.
fn client_verifier(
    provider: &Arc<CryptoProvider>,
    ca_pem: &[u8],
    path: Option<&Path>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in parse_chain(ca_pem, path)? {
        roots
            .add(ca)
            .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::ClientCa(e.to_string()))
}

fn build(
    provider: &Arc<CryptoProvider>,
    settings: &TlsSettings,
    sources: &Sources,
    first: bool,
) -> Result<Loaded, TlsError> {
    let chain = parse_chain(&sources.cert, settings.cert_file.as_deref())?;
    let key = PrivateKeyDer::from_pem_slice(&sources.key).map_err(|e| TlsError::Parse {
        path: settings.key_file.clone().unwrap_or_default(),
        reason: format!("bad PEM private key: {e}"),
    })?;
    let expiry = not_after(&chain[0]);
    if first && expiry.is_some_and(|e| e < SystemTime::now()) {
        tracing::warn!(?expiry, "the serving certificate has expired");
    }
    let config = server_config(provider, settings, chain, key, sources.client_ca.as_deref())?;
    Ok(Loaded {
        config,
        sources: Some(sources.clone()),
        expiry,
        client_ca: sources.client_ca.is_some(),
    })
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    settings: &TlsSettings,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(client_verifier(
            provider,
            ca,
            settings.client_ca_file.as_deref(),
        )?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = settings.alpn_protocols.clone();
    Ok(Arc::new(config))
}

/// A self-signed certificate for the node's name and addresses. The client CA still
/// applies when configured (it is re-read only with a configured certificate, as the
/// self-signed mode is for development).
fn self_signed(provider: &Arc<CryptoProvider>, settings: &TlsSettings) -> Result<Loaded, TlsError> {
    let mut names = vec![if settings.node_name.is_empty() {
        "localhost".to_string()
    } else {
        settings.node_name.clone()
    }];
    names.extend(settings.node_ips.iter().map(IpAddr::to_string));
    let certified = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der())
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let expiry = not_after(&cert);
    let client_ca = match &settings.client_ca_file {
        Some(path) => Some(read(path)?),
        None => None,
    };
    let config = server_config(provider, settings, vec![cert], key, client_ca.as_deref())?;
    Ok(Loaded {
        config,
        sources: None,
        expiry,
        client_ca: client_ca.is_some(),
    })
}

/// The certificate's `notAfter`.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = parsed.validity().not_after.timestamp();
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}
