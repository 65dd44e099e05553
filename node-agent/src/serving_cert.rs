//! The serving certificate from nodegate's signer (`--serving-cert-signer`): the agent files a
//! CertificateSigningRequest with its pod's own service-account token, for `CN=nodegate:agent:
//! <node>` and its Node's addresses, and serves what the operator's signer issues
//! (operator/src/signer.rs says what it checks). Clients then verify the agent against the
//! published CA bundle.
//!
//! The key never leaves the process: a new one is made for every request and the pair is
//! swapped into the listener in memory ([`ReloadingTls::install_issued`]). A new certificate
//! is requested at two thirds of the current one's lifetime, so a signer that is down for a
//! while (retried with backoff up to 5 minutes) does not let it expire.

use crate::tls::ReloadingTls;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// The subject the signer requires: `CN=<prefix><node>`.
pub const COMMON_NAME_PREFIX: &str = "nodegate:agent:";

#[derive(Clone, Debug)]
pub struct ServingCertSettings {
    pub signer_name: String,
    pub node_name: String,
    /// `spec.expirationSeconds` asked for (the signer may issue less; at least 600).
    pub requested_duration: Duration,
    /// How long to wait for one request to be issued before filing a new one.
    pub wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("the request {name} was {kind}: {reason}: {message}")]
    Refused {
        name: String,
        kind: String,
        reason: String,
        message: String,
    },
    #[error("the request {0} was not issued in time")]
    Timeout(String),
    #[error("node {0} has no addresses to certify")]
    NoAddresses(String),
    #[error("making the key or request: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the issued certificate is unusable: {0}")]
    Certificate(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// A certificate issued for the agent, PEM, with its validity.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The SANs the agent asks for: its Node's addresses (IPs as IP SANs, the rest as DNS names).
pub fn subject_alt_names(node: &Node) -> Vec<SanType> {
    let mut sans = Vec::new();
    for address in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        let san = match address.address.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => match address.address.clone().try_into() {
                Ok(name) => SanType::DnsName(name),
                Err(_) => continue,
            },
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    sans
}

/// When to ask for the next certificate: two thirds into its lifetime, counted from when it
/// was received (or its `notBefore`, if later), so a backdated `notBefore` does not shorten it.
pub fn renew_at(received: SystemTime, not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let start = received.max(not_before);
    let life = not_after.duration_since(start).unwrap_or_default();
    start + life * 2 / 3
}

/// A key and a PEM certificate request for the node's addresses.
pub fn certificate_request(
    node_name: &str,
    sans: Vec<SanType>,
) -> Result<(KeyPair, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("{COMMON_NAME_PREFIX}{node_name}"),
    );
    params.subject_alt_names = sans;
    let pem = params.serialize_request(&key)?.pem()?;
    Ok((key, pem))
}

/// Files one request and waits for its certificate.
pub async fn obtain(
    client: &kube::Client,
    settings: &ServingCertSettings,
) -> Result<Issued, ServingCertError> {
    let node = Api::<Node>::all(client.clone())
        .get(&settings.node_name)
        .await?;
    let sans = subject_alt_names(&node);
    if sans.is_empty() {
        return Err(ServingCertError::NoAddresses(settings.node_name.clone()));
    }
    let (key, request_pem) = certificate_request(&settings.node_name, sans)?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("nodegate-agent-{}-", settings.node_name)),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request_pem.into_bytes()),
            signer_name: settings.signer_name.clone(),
            usages: Some(vec!["digital signature".into(), "server auth".into()]),
            expiration_seconds: Some(
                i32::try_from(settings.requested_duration.as_secs().max(600)).unwrap_or(i32::MAX),
            ),
            ..Default::default()
        },
        status: None,
    };
    let created = api.create(&PostParams::default(), &csr).await?;
    let name = created.metadata.name.unwrap_or_default();
    tracing::info!(csr = %name, signer = %settings.signer_name, "serving certificate requested");
    let deadline = tokio::time::Instant::now() + settings.wait;
    loop {
        let csr = api.get(&name).await?;
        let status = csr.status.unwrap_or_default();
        if let Some(refusal) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
        {
            return Err(ServingCertError::Refused {
                name,
                kind: refusal.type_.to_lowercase(),
                reason: refusal.reason.clone().unwrap_or_default(),
                message: refusal.message.clone().unwrap_or_default(),
            });
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            let (not_before, not_after) = validity(&cert.0)?;
            return Ok(Issued {
                cert_pem: cert.0,
                key_pem: key.serialize_pem().into_bytes(),
                not_before,
                not_after,
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ServingCertError::Timeout(name));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The leaf's `notBefore` and `notAfter`.
fn validity(pem: &[u8]) -> Result<(SystemTime, SystemTime), ServingCertError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|e| ServingCertError::Certificate(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents)
        .map_err(|e| ServingCertError::Certificate(e.to_string()))?;
    let at = |t: i64| {
        u64::try_from(t)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| ServingCertError::Certificate("validity before 1970".into()))
    };
    Ok((
        at(cert.validity().not_before.timestamp())?,
        at(cert.validity().not_after.timestamp())?,
    ))
}

/// Obtains a certificate, serves it, and renews it at two thirds of its lifetime, forever.
/// Failures are retried with backoff (5 s doubling to 5 min); until the first certificate
/// arrives the listener serves the self-signed one, which verifying clients refuse.
pub async fn run(client: kube::Client, settings: ServingCertSettings, tls: ReloadingTls) {
    const FIRST_RETRY: Duration = Duration::from_secs(5);
    const LAST_RETRY: Duration = Duration::from_secs(300);
    let mut retry = FIRST_RETRY;
    loop {
        let outcome = match obtain(&client, &settings).await {
            Ok(issued) => tls
                .install_issued(issued.cert_pem.clone(), issued.key_pem.clone())
                .map(|()| issued)
                .map_err(ServingCertError::from),
            Err(error) => Err(error),
        };
        match outcome {
            Ok(issued) => {
                let next = renew_at(SystemTime::now(), issued.not_before, issued.not_after);
                tracing::info!(
                    not_after = ?issued.not_after,
                    renew_at = ?next,
                    "serving certificate from the signer installed"
                );
                retry = FIRST_RETRY;
                let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_s = retry.as_secs(), "no serving certificate from the signer");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(LAST_RETRY);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    #[test]
    fn renewal_is_two_thirds_into_the_lifetime_from_receipt() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // Backdated by 60 s, 30 s of life left at receipt: renew 20 s after receipt.
        let at = renew_at(
            t0,
            t0 - Duration::from_secs(60),
            t0 + Duration::from_secs(30),
        );
        assert_eq!(at, t0 + Duration::from_secs(20));
        let at = renew_at(t0, t0, t0 + Duration::from_secs(86400 * 3));
        assert_eq!(at, t0 + Duration::from_secs(86400 * 2));
        // Already expired: now.
        assert_eq!(
            renew_at(
                t0,
                t0 - Duration::from_secs(10),
                t0 - Duration::from_secs(1)
            ),
            t0
        );
    }

    #[test]
    fn the_request_names_the_node_and_its_addresses() {
        let node = Node {
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.0.2.2".into(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "node-1".into(),
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sans = subject_alt_names(&node);
        assert_eq!(sans.len(), 2);
        let (_, pem) = certificate_request("node-1", sans).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der.contents)
                .unwrap();
        assert_eq!(
            csr.certification_request_info.subject.to_string(),
            "CN=nodegate:agent:node-1"
        );
    }
}
