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
//!
//! X.509 **v1** client certificates are refused at the handshake, even when the client CA
//! signed them: webpki (rustls' verifier) accepts only v3, while the kubelet (Go's
//! `crypto/x509`) accepts v1 too. The agent keeps the refusal rather than verify chains with
//! code of its own; the verifier names the reason in the log and
//! [`client_certificate_refusal`] gives it as `x509_v1` for the metrics. Reissue such a
//! certificate as v3 (every Kubernetes signer, cert-manager and `openssl req -x509`/`x509
//! -req` with extensions do).

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::UnixTime;
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
    leaf: CertificateDer<'static>,
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
    /// A certificate and key issued at run time (`--serving-cert-signer`), PEM: when set they
    /// replace the certificate files (the client CA is still read from its file).
    issued: std::sync::Mutex<Option<(Vec<u8>, Vec<u8>)>>,
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
                issued: std::sync::Mutex::new(None),
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

    /// The serving certificate in use (leaf).
    pub fn serving_certificate(&self) -> CertificateDer<'static> {
        self.inner.current.load().leaf.clone()
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
        let Some(sources) = self.sources()? else {
            return Ok(false);
        };
        if current.sources.as_ref() == Some(&sources) {
            return Ok(false);
        }
        let settings = &self.inner.settings;
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

    /// Serves `cert_pem` (chain, leaf first) and `key_pem` from now on, in place of the files
    /// or the self-signed certificate: new connections get it, open ones keep theirs. A pair
    /// that does not load is refused and the current one stays in service.
    pub fn install_issued(&self, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<(), TlsError> {
        let previous = self
            .inner
            .issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace((cert_pem, key_pem));
        match self.reload() {
            Ok(_) => Ok(()),
            Err(error) => {
                *self.inner.issued.lock().unwrap_or_else(|e| e.into_inner()) = previous;
                Err(error)
            }
        }
    }

    /// What the configuration is built from now: the issued pair or the files (`None`: the
    /// self-signed certificate, nothing to re-read).
    fn sources(&self) -> Result<Option<Sources>, TlsError> {
        let settings = &self.inner.settings;
        let issued = self
            .inner
            .issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match issued {
            Some((cert, key)) => Ok(Some(Sources {
                cert,
                key,
                client_ca: settings.client_ca_file.as_deref().map(read).transpose()?,
            })),
            None if settings.cert_file.is_some() => read_sources(settings).map(Some),
            None => Ok(None),
        }
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
            let seen = self.sources().ok().flatten();
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
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in parse_chain(ca_pem, path)? {
        roots
            .add(ca)
            .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    }
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
    Ok(Arc::new(ExplainingVerifier(webpki)))
}

/// Why the agent refused a client certificate that webpki could not even read as one it
/// supports; carried in the handshake error so the listener can count it.
#[derive(Debug, thiserror::Error)]
pub enum UnsupportedClientCertificate {
    #[error(
        "the client certificate is X.509 v1, which the agent's verifier (webpki) does not accept \
         although the kubelet does: reissue it as v3"
    )]
    X509V1,
}

/// webpki's client verifier, unchanged in what it accepts; it only tells a refused v1
/// certificate apart (by reading the leaf's version after webpki refused it), logs why and
/// returns an error the listener can classify.
#[derive(Debug)]
struct ExplainingVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for ExplainingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|error| {
                if is_x509_v1(end_entity) {
                    let refusal = UnsupportedClientCertificate::X509V1;
                    tracing::warn!(%refusal, "client certificate refused at the TLS handshake");
                    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                        Arc::new(refusal),
                    )))
                } else {
                    error
                }
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

fn is_x509_v1(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .is_ok_and(|(_, c)| c.version() == x509_parser::x509::X509Version::V1)
}

/// The `cause` of a handshake that failed on the client's certificate (`unknown_ca`,
/// `expired`, `x509_v1`, `bad_certificate`), for `nodegate_agent_authentications_total`;
/// `None` when the handshake failed for another reason (no credential was refused).
pub fn client_certificate_refusal(error: &std::io::Error) -> Option<&'static str> {
    let rustls::Error::InvalidCertificate(cert_error) =
        error.get_ref()?.downcast_ref::<rustls::Error>()?
    else {
        return None;
    };
    Some(match cert_error {
        CertificateError::UnknownIssuer => "unknown_ca",
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => "expired",
        CertificateError::Other(other)
            if other
                .0
                .downcast_ref::<UnsupportedClientCertificate>()
                .is_some() =>
        {
            "x509_v1"
        }
        _ => "bad_certificate",
    })
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
    let leaf = chain[0].clone();
    let expiry = not_after(&leaf);
    if first && expiry.is_some_and(|e| e < SystemTime::now()) {
        tracing::warn!(?expiry, "the serving certificate has expired");
    }
    let config = server_config(provider, settings, chain, key, sources.client_ca.as_deref())?;
    Ok(Loaded {
        config,
        leaf,
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
    let config = server_config(
        provider,
        settings,
        vec![cert.clone()],
        key,
        client_ca.as_deref(),
    )?;
    Ok(Loaded {
        config,
        leaf: cert,
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

/// A throwaway PKI for tests: CAs, server and client certificates.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod test_pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    pub struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pub pem: String,
    }

    /// A certificate and its key, PEM and DER.
    pub struct Leaf {
        pub cert_pem: String,
        pub key_pem: String,
        pub der: rustls_pki_types::CertificateDer<'static>,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Ca {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A client certificate with CN `name` (none when empty) and O `groups` (rcgen keeps one
        /// value per attribute type, so at most one group; several O values are tested with
        /// openssl-made certificates in the cluster tests).
        pub fn client(&self, name: &str, groups: &[&str]) -> Leaf {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            if !name.is_empty() {
                params.distinguished_name.push(DnType::CommonName, name);
            }
            for g in groups {
                params.distinguished_name.push(DnType::OrganizationName, *g);
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            self.sign(params)
        }

        /// A serving certificate for `names`, valid until 1 January of `until_year`.
        pub fn server(&self, names: &[&str], until_year: i32) -> Leaf {
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, names[0]);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.not_after = rcgen::date_time_ymd(until_year, 1, 1);
            self.sign(params)
        }

        fn sign(&self, params: CertificateParams) -> Leaf {
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            Leaf {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                der: cert.der().clone(),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::test_pki::{Ca, Leaf};
    use super::*;
    use rustls::ClientConfig;
    use rustls_pki_types::ServerName;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "nodegate-tls-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
        /// Writes `name` the way secret volumes do: a new file renamed over the old one.
        fn replace(&self, name: &str, content: &str) {
            let tmp = self.0.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, self.path(name)).unwrap();
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn client_config(server_ca: &Ca, identity: Option<&Leaf>) -> ClientConfig {
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(server_ca.pem.as_bytes())
                .map(|c| c.unwrap())
                .collect();
        client_config_trusting(roots, identity)
    }

    fn client_config_trusting(
        anchors: Vec<CertificateDer<'static>>,
        identity: Option<&Leaf>,
    ) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        for c in anchors {
            roots.add(c).unwrap();
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        match identity {
            Some(leaf) => builder
                .with_client_auth_cert(
                    vec![leaf.der.clone()],
                    PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        }
    }

    /// Runs a handshake over an in-memory pipe; the server's view: the client's verified
    /// chain, or why the handshake failed.
    async fn handshake(
        tls: &ReloadingTls,
        client: ClientConfig,
    ) -> Result<Option<Vec<CertificateDer<'static>>>, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tls.acceptor();
        let server = async move {
            let mut stream = acceptor
                .accept(server_io)
                .await
                .map_err(|e| e.to_string())?;
            // Read one byte: in TLS 1.3 the client's certificate is checked after the
            // client considers the handshake done.
            let mut byte = [0u8; 1];
            stream
                .read_exact(&mut byte)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(stream.get_ref().1.peer_certificates().map(|c| c.to_vec()))
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let client = async move {
            let name = ServerName::try_from("node-a").unwrap();
            if let Ok(mut stream) = connector.connect(name, client_io).await {
                let _ = stream.write_all(b"x").await;
                let _ = stream.flush().await;
                // Keep the stream open until the server has read.
                let mut buf = [0u8; 1];
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await;
            }
        };
        let (result, ()) = tokio::join!(server, client);
        result
    }

    struct Setup {
        dir: TempDir,
        server_ca: Ca,
        client_ca: Ca,
        tls: ReloadingTls,
    }

    fn setup(with_client_ca: bool) -> Setup {
        let dir = TempDir::new();
        let server_ca = Ca::new("server-ca");
        let client_ca = Ca::new("client-ca");
        let serving = server_ca.server(&["node-a"], 2040);
        dir.replace("tls.crt", &serving.cert_pem);
        dir.replace("tls.key", &serving.key_pem);
        dir.replace("ca.crt", &client_ca.pem);
        let tls = ReloadingTls::new(TlsSettings {
            cert_file: Some(dir.path("tls.crt")),
            key_file: Some(dir.path("tls.key")),
            client_ca_file: with_client_ca.then(|| dir.path("ca.crt")),
            node_name: "node-a".into(),
            ..Default::default()
        })
        .unwrap();
        Setup {
            dir,
            server_ca,
            client_ca,
            tls,
        }
    }

    fn year_of(t: SystemTime) -> u64 {
        // Good enough to tell 2040 from 2041.
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() / 31_556_952 + 1970
    }

    #[tokio::test]
    async fn client_certificate_is_requested_not_required() {
        let s = setup(true);
        assert!(s.tls.client_ca_configured());
        let anonymous = handshake(&s.tls, client_config(&s.server_ca, None)).await;
        assert_eq!(
            anonymous,
            Ok(None),
            "a client without a certificate connects"
        );
        let alice = s.client_ca.client("alice", &["team-a"]);
        let chain = handshake(&s.tls, client_config(&s.server_ca, Some(&alice)))
            .await
            .unwrap()
            .expect("the verified chain is available to the authenticator");
        assert_eq!(chain[0], alice.der);
    }

    #[tokio::test]
    async fn certificate_from_another_ca_fails_the_handshake() {
        let s = setup(true);
        let mallory = Ca::new("other-ca").client("mallory", &["system:masters"]);
        let result = handshake(&s.tls, client_config(&s.server_ca, Some(&mallory))).await;
        assert!(result.is_err(), "must not become anonymous: {result:?}");
    }

    #[tokio::test]
    async fn without_client_ca_no_certificate_is_requested() {
        let s = setup(false);
        assert!(!s.tls.client_ca_configured());
        let alice = s.client_ca.client("alice", &[]);
        let result = handshake(&s.tls, client_config(&s.server_ca, Some(&alice))).await;
        assert_eq!(result, Ok(None), "no x509 identity without a client CA");
    }

    #[tokio::test]
    async fn rotation_by_atomic_rename_is_seen_and_broken_files_keep_the_old_config() {
        let s = setup(true);
        assert_eq!(year_of(s.tls.serving_cert_expiry().unwrap()), 2040);
        assert!(!s.tls.reload().unwrap(), "unchanged files: no swap");

        let renewed = s.server_ca.server(&["node-a"], 2041);
        s.dir.replace("tls.crt", &renewed.cert_pem);
        s.dir.replace("tls.key", &renewed.key_pem);
        assert!(s.tls.reload().unwrap());
        assert_eq!(year_of(s.tls.serving_cert_expiry().unwrap()), 2041);
        assert!(
            handshake(&s.tls, client_config(&s.server_ca, None))
                .await
                .is_ok()
        );

        // A key that does not match the certificate: refused, old config kept.
        let other = s.server_ca.server(&["node-a"], 2042);
        s.dir.replace("tls.crt", &other.cert_pem);
        assert!(s.tls.reload().is_err());
        s.tls.reload_logged();
        assert!(s.tls.last_error().is_some());
        assert_eq!(year_of(s.tls.serving_cert_expiry().unwrap()), 2041);
        assert!(
            handshake(&s.tls, client_config(&s.server_ca, None))
                .await
                .is_ok()
        );
        // Garbage: same.
        s.dir.replace("tls.crt", "not a certificate");
        assert!(s.tls.reload().is_err());
        assert_eq!(year_of(s.tls.serving_cert_expiry().unwrap()), 2041);
        // Fixed: picked up.
        s.dir.replace("tls.crt", &other.cert_pem);
        s.dir.replace("tls.key", &other.key_pem);
        assert!(s.tls.reload().unwrap());
        assert_eq!(year_of(s.tls.serving_cert_expiry().unwrap()), 2042);
        assert!(s.tls.last_error().is_none());
    }

    #[tokio::test]
    async fn client_ca_rotation_is_seen() {
        let s = setup(true);
        let alice_old = s.client_ca.client("alice", &[]);
        let new_ca = Ca::new("client-ca-2");
        let alice_new = new_ca.client("alice", &[]);
        assert!(
            handshake(&s.tls, client_config(&s.server_ca, Some(&alice_new)))
                .await
                .is_err()
        );
        s.dir.replace("ca.crt", &new_ca.pem);
        assert!(s.tls.reload().unwrap());
        assert!(
            handshake(&s.tls, client_config(&s.server_ca, Some(&alice_new)))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            handshake(&s.tls, client_config(&s.server_ca, Some(&alice_old)))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn reload_loop_polls() {
        let s = setup(false);
        let task = tokio::spawn(s.tls.clone().run_reload_loop(Duration::from_millis(20)));
        let renewed = s.server_ca.server(&["node-a"], 2041);
        s.dir.replace("tls.crt", &renewed.cert_pem);
        s.dir.replace("tls.key", &renewed.key_pem);
        let mut seen = false;
        for _ in 0..100 {
            if year_of(s.tls.serving_cert_expiry().unwrap()) == 2041 {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        assert!(
            seen,
            "the reload loop did not pick up the renewed certificate"
        );
    }

    #[tokio::test]
    async fn self_signed_when_no_certificate_is_given() {
        let tls = ReloadingTls::new(TlsSettings {
            node_name: "node-a".into(),
            node_ips: vec!["10.0.0.7".parse().unwrap()],
            ..Default::default()
        })
        .unwrap();
        assert!(tls.serving_cert_expiry().is_some());
        assert!(!tls.client_ca_configured());
        assert!(!tls.reload().unwrap(), "nothing to re-read");
        // A client that trusts nothing but this certificate completes a handshake.
        let trusted = vec![tls.serving_certificate()];
        let result = handshake(&tls, client_config_trusting(trusted, None)).await;
        assert_eq!(result, Ok(None));
        let serving = tls.serving_certificate();
        let (_, parsed) = x509_parser::parse_x509_certificate(serving.as_ref()).unwrap();
        let sans = format!(
            "{:?}",
            parsed.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(
            sans.contains("node-a")
                && (sans.contains("10.0.0.7") || sans.contains("[10, 0, 0, 7]")),
            "{sans}"
        );
    }

    /// `--serving-cert-signer`: an issued pair replaces the self-signed certificate in memory
    /// (new handshakes verify against the signer's CA), a renewal replaces it again, and a
    /// pair that does not load is refused with the current one kept.
    #[tokio::test]
    async fn an_issued_certificate_replaces_the_self_signed_one_in_memory() {
        let tls = ReloadingTls::new(TlsSettings {
            node_name: "node-a".into(),
            ..Default::default()
        })
        .unwrap();
        let ca = Ca::new("signer");
        let roots = || {
            let (_, der) = x509_parser::pem::parse_x509_pem(ca.pem.as_bytes()).unwrap();
            vec![CertificateDer::from(der.contents)]
        };
        assert!(
            handshake(&tls, client_config_trusting(roots(), None))
                .await
                .is_err()
        );
        let first = ca.server(&["node-a"], 2090);
        tls.install_issued(first.cert_pem.clone().into(), first.key_pem.clone().into())
            .unwrap();
        assert_eq!(tls.serving_certificate(), first.der);
        assert_eq!(
            handshake(&tls, client_config_trusting(roots(), None)).await,
            Ok(None)
        );
        assert!(!tls.reload().unwrap(), "nothing changed");
        let second = ca.server(&["node-a"], 2091);
        tls.install_issued(
            second.cert_pem.clone().into(),
            second.key_pem.clone().into(),
        )
        .unwrap();
        assert_eq!(tls.serving_certificate(), second.der);
        // A key that is not the certificate's: refused, the second pair stays in service.
        assert!(
            tls.install_issued(first.cert_pem.into(), second.key_pem.into())
                .is_err()
        );
        assert_eq!(tls.serving_certificate(), second.der);
        assert!(!tls.reload().unwrap());
        assert_eq!(tls.serving_certificate(), second.der);
    }

    #[test]
    fn certificate_without_key_is_refused() {
        let dir = TempDir::new();
        let result = ReloadingTls::new(TlsSettings {
            cert_file: Some(dir.path("tls.crt")),
            ..Default::default()
        });
        assert!(matches!(result, Err(TlsError::CertWithoutKey)));
        let result = ReloadingTls::new(TlsSettings {
            cert_file: Some(dir.path("missing.crt")),
            key_file: Some(dir.path("missing.key")),
            ..Default::default()
        });
        assert!(matches!(result, Err(TlsError::Read { .. })));
    }
}
