//! The agents' serving-certificate signer: approves and signs CertificateSigningRequests for
//! nodegate's own `signerName` (default `nodegate.io/agent-serving`), so clients can verify
//! the agent's certificate against one published CA bundle instead of skipping verification.
//!
//! A request is approved only when all of these hold, and denied with a reason otherwise:
//! - it was filed by the agents' service account (`spec.username`);
//! - with a **pod-bound** token, which names the pod's node in `spec.extra`
//!   (`authentication.kubernetes.io/node-name`, set by the API server, not by the requester);
//! - its subject is exactly `CN=nodegate:agent:<that node>`;
//! - every subject alternative name is one of that Node's `status.addresses` (IP SANs against
//!   the address types that are IPs, DNS SANs against the names), and there is at least one;
//! - its usages are server auth (with digital signature and key encipherment), never a CA.
//!
//! A stolen agent token can therefore only get a certificate for the addresses of the node its
//! pod runs on: what the agent already serves there.
//!
//! The signer runs on **every replica**, not only on the leader: each step is one optimistic
//! write (approval and certificate are updates carrying the object's `resourceVersion`, the CA
//! Secret a create), so when two replicas race, the API server lets one win and the other gets
//! a conflict and sees the result on its next event. It keeps working while leadership moves.
//!
//! The CA key lives in a Secret (`tls.crt`, `tls.key`) created when absent (or provided by the
//! user, never overwritten); the bundle is published in a ConfigMap (`ca.crt`) and, where the
//! API server serves `certificates.k8s.io/v1` ClusterTrustBundles, in one linked to the signer.

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, ClusterTrustBundle,
    ClusterTrustBundleSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// The signer the chart configures and the agent asks for by default.
pub const DEFAULT_SIGNER_NAME: &str = "nodegate.io/agent-serving";
/// The user extra a pod-bound service-account token carries: the pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The requested subject is `CN=<prefix><node>`.
pub const COMMON_NAME_PREFIX: &str = "nodegate:agent:";
/// Key of the bundle in the ConfigMap (and of the CA certificate in the Secret's `tls.crt`).
pub const BUNDLE_KEY: &str = "ca.crt";
/// The only usages a serving certificate may ask for; `server auth` is required.
const ALLOWED_USAGES: [&str; 3] = ["digital signature", "key encipherment", "server auth"];
/// How far `notBefore` is set back, for clients whose clock is a little behind.
const BACKDATE: Duration = Duration::from_secs(60);
const FIELD_MANAGER: &str = "nodegate";

#[derive(Clone, Debug)]
pub struct SignerSettings {
    pub signer_name: String,
    /// Namespace of the CA Secret and the bundle ConfigMap (the operator's).
    pub namespace: String,
    pub ca_secret: String,
    pub bundle_config_map: String,
    /// `system:serviceaccount:<ns>:<name>` of the agents.
    pub agent_username: String,
    /// Longest certificate issued; a request's `expirationSeconds` may ask for less.
    pub max_duration: Duration,
    /// Interval of a full pass over pending requests (a failed write is retried then).
    pub resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("CA Secret {0}: {1}")]
    Ca(String, String),
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

/// Why a request is denied: the CSR condition's `reason` and `message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refuse(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        message: message.into(),
    }
}

/// The parts of a CertificateSigningRequest the decision reads.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub username: &'a str,
    /// `spec.extra[authentication.kubernetes.io/node-name]`.
    pub node_names: &'a [String],
    pub usages: &'a [String],
    /// `spec.request`: a PEM `CERTIFICATE REQUEST`.
    pub pem: &'a [u8],
}

/// A Node's `status.addresses`, split by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    pub ips: Vec<IpAddr>,
    pub names: Vec<String>,
}

impl NodeAddresses {
    pub fn of(node: &Node) -> NodeAddresses {
        let mut out = NodeAddresses::default();
        for address in node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
        {
            match address.address.parse::<IpAddr>() {
                Ok(ip) => out.ips.push(ip),
                Err(_) => out.names.push(address.address.to_ascii_lowercase()),
            }
        }
        out
    }
}

/// An approved request: what will be signed.
#[derive(Debug)]
pub struct Approved {
    pub node: String,
    request: CertificateSigningRequestParams,
}

/// The node a request's requester runs on: the single node name of its pod-bound token.
pub fn requester_node<'a>(request: &Request<'a>) -> Option<&'a str> {
    match request.node_names {
        [node] if !node.is_empty() => Some(node),
        _ => None,
    }
}

/// Decides a request against the agent account and the requester's Node (`None`: the Node
/// does not exist). Pure: every input is read before.
pub fn decide(
    request: &Request<'_>,
    agent_username: &str,
    node: Option<&NodeAddresses>,
) -> Result<Approved, Refusal> {
    if request.username != agent_username {
        return Err(refuse(
            "NotAnAgent",
            format!(
                "requested by {:?}; only the agents' service account {agent_username:?} may request these certificates",
                request.username
            ),
        ));
    }
    let Some(node_name) = requester_node(request) else {
        return Err(refuse(
            "NotNodeBound",
            format!(
                "the requester's token names no single node ({NODE_NAME_EXTRA}): request with the agent pod's own service-account token"
            ),
        ));
    };
    let mut usages: Vec<&str> = request.usages.iter().map(String::as_str).collect();
    usages.sort_unstable();
    usages.dedup();
    if !usages.contains(&"server auth") || usages.iter().any(|u| !ALLOWED_USAGES.contains(u)) {
        return Err(refuse(
            "BadUsages",
            format!(
                "usages {usages:?}: a serving certificate needs \"server auth\" and may add only \"digital signature\" and \"key encipherment\""
            ),
        ));
    }
    let pem = std::str::from_utf8(request.pem)
        .map_err(|_| refuse("InvalidRequest", "spec.request is not PEM"))?;
    let parsed = CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        refuse(
            "InvalidRequest",
            format!("spec.request is not a certificate request this signer reads: {e}"),
        )
    })?;
    let expected_cn = format!("{COMMON_NAME_PREFIX}{node_name}");
    let subject: Vec<(DnType, Option<String>)> = parsed
        .params
        .distinguished_name
        .iter()
        .map(|(ty, value)| (ty.clone(), dn_text(value)))
        .collect();
    if subject != [(DnType::CommonName, Some(expected_cn.clone()))] {
        return Err(refuse(
            "WrongNode",
            format!(
                "the subject must be exactly CN={expected_cn} (the requester runs on node {node_name}); it is {subject:?}"
            ),
        ));
    }
    if !matches!(parsed.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
        return Err(refuse("CARequested", "a CA certificate was requested"));
    }
    let Some(addresses) = node else {
        return Err(refuse(
            "UnknownNode",
            format!("node {node_name} does not exist"),
        ));
    };
    if parsed.params.subject_alt_names.is_empty() {
        return Err(refuse(
            "NoAddresses",
            format!("the request names none of node {node_name}'s addresses"),
        ));
    }
    for san in &parsed.params.subject_alt_names {
        let ok = match san {
            SanType::IpAddress(ip) => addresses.ips.contains(ip),
            SanType::DnsName(name) => addresses
                .names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_str())),
            _ => false,
        };
        if !ok {
            return Err(refuse(
                "AddressNotOfNode",
                format!(
                    "{} is not an address of node {node_name} (its addresses: {:?} {:?})",
                    san_text(san),
                    addresses.ips,
                    addresses.names
                ),
            ));
        }
    }
    Ok(Approved {
        node: node_name.to_string(),
        request: parsed,
    })
}

fn dn_text(value: &DnValue) -> Option<String> {
    match value {
        DnValue::Utf8String(s) => Some(s.clone()),
        DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::IpAddress(ip) => format!("IP {ip}"),
        SanType::DnsName(name) => format!("DNS {}", name.as_str()),
        SanType::Rfc822Name(name) => format!("email {}", name.as_str()),
        SanType::URI(uri) => format!("URI {}", uri.as_str()),
        other => format!("{other:?}"),
    }
}

/// The lifetime of a certificate: the request's `expirationSeconds` when given, at most
/// `max`.
pub fn lifetime(expiration_seconds: Option<i32>, max: Duration) -> Duration {
    match expiration_seconds.and_then(|s| u64::try_from(s).ok()) {
        Some(s) => Duration::from_secs(s).min(max),
        None => max,
    }
}

/// The signing CA.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA valid for ten years.
    pub fn generate(signer_name: &str, now: SystemTime) -> Result<(Ca, String), rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("nodegate CA for {signer_name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 86400)).into();
        params.serial_number = Some(serial(key.der_bytes(), now));
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Ok((Ca::load(&cert_pem, &key_pem)?, key_pem))
    }

    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
        })
    }

    /// Signs an approved request: the subject and SANs it asked for (already checked), server
    /// auth only, valid from `now - BACKDATE` to `now + lifetime`.
    pub fn sign(
        &self,
        approved: &Approved,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<String, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(
            DnType::CommonName,
            format!("{COMMON_NAME_PREFIX}{}", approved.node),
        );
        params.distinguished_name = subject;
        params.subject_alt_names = approved.request.params.subject_alt_names.clone();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(serial(approved.request.public_key.der_bytes(), now));
        let request = CertificateSigningRequestParams {
            params,
            public_key: approved.request.public_key.clone(),
        };
        Ok(request.signed_by(&self.issuer)?.pem())
    }
}

/// A 128-bit positive serial from the key and the time (distinct per issuance).
fn serial(public_key: &[u8], now: SystemTime) -> SerialNumber {
    let nanos = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let digest = Sha256::new()
        .chain_update(public_key)
        .chain_update(nanos.to_be_bytes())
        .finalize();
    let mut bytes = digest[..16].to_vec();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Reads the CA Secret, creating it (with a new CA) when absent. A Secret that exists without
/// a usable `tls.crt`/`tls.key` is an error, never overwritten: the user may have provided it.
pub async fn ensure_ca(client: &Client, settings: &SignerSettings) -> Result<Ca, SignerError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let name = &settings.ca_secret;
    let secret = match secrets.get_opt(name).await? {
        Some(secret) => secret,
        None => {
            let (ca, key_pem) = Ca::generate(&settings.signer_name, SystemTime::now())?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "nodegate".to_string(),
                    )])),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(BTreeMap::from([
                    ("tls.crt".to_string(), ByteString(ca.cert_pem.into_bytes())),
                    ("tls.key".to_string(), ByteString(key_pem.into_bytes())),
                ])),
                ..Default::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(secret = %name, namespace = %settings.namespace, "created the serving CA");
                    created
                }
                // Another replica created it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => secrets.get(name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let field = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or_else(|| SignerError::Ca(name.clone(), format!("no {key}")))
    };
    Ca::load(&field("tls.crt")?, &field("tls.key")?)
        .map_err(|e| SignerError::Ca(name.clone(), e.to_string()))
}

/// The name of the signer's ClusterTrustBundle: the API server requires signer-linked bundles
/// to be named `<signerName with / as :>:<suffix>`.
pub fn trust_bundle_name(signer_name: &str) -> String {
    format!("{}:ca", signer_name.replace('/', ":"))
}

/// Publishes the CA bundle: the ConfigMap always, the ClusterTrustBundle when the API server
/// serves `certificates.k8s.io/v1` ClusterTrustBundles (a failure there is logged, not fatal:
/// the ConfigMap is the bundle every client can mount).
pub async fn publish_bundle(
    client: &Client,
    settings: &SignerSettings,
    ca: &Ca,
) -> Result<(), SignerError> {
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    let labels = BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_string(),
        "nodegate".to_string(),
    )]);
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(settings.bundle_config_map.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            BUNDLE_KEY.to_string(),
            ca.cert_pem.clone(),
        )])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), &settings.namespace)
        .patch(
            &settings.bundle_config_map,
            &ssa,
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": config_map.metadata,
                "data": config_map.data,
            })),
        )
        .await?;
    if trust_bundles_served(client).await {
        let name = trust_bundle_name(&settings.signer_name);
        let bundle = ClusterTrustBundle {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: ClusterTrustBundleSpec {
                signer_name: Some(settings.signer_name.clone()),
                trust_bundle: ca.cert_pem.clone(),
            },
        };
        let result = Api::<ClusterTrustBundle>::all(client.clone())
            .patch(
                &name,
                &ssa,
                &Patch::Apply(serde_json::json!({
                    "apiVersion": "certificates.k8s.io/v1",
                    "kind": "ClusterTrustBundle",
                    "metadata": bundle.metadata,
                    "spec": bundle.spec,
                })),
            )
            .await;
        if let Err(error) = result {
            tracing::warn!(%error, bundle = %name, "could not write the ClusterTrustBundle (the ConfigMap has the bundle)");
        }
    }
    Ok(())
}

async fn trust_bundles_served(client: &Client) -> bool {
    client
        .list_api_group_resources("certificates.k8s.io/v1")
        .await
        .is_ok_and(|list| {
            list.resources
                .iter()
                .any(|r| r.name == "clustertrustbundles")
        })
}

fn has_condition(csr: &CertificateSigningRequest, kind: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

fn with_condition(
    mut csr: CertificateSigningRequest,
    kind: &str,
    reason: &str,
    message: &str,
) -> CertificateSigningRequest {
    let status = csr.status.get_or_insert_with(Default::default);
    status
        .conditions
        .get_or_insert_with(Vec::new)
        .push(CertificateSigningRequestCondition {
            type_: kind.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            ..Default::default()
        });
    csr
}

/// One request: decided, then approved and signed, or denied (failed, when someone else
/// approved what this signer refuses). Requests already issued, denied or failed are left.
pub async fn handle(
    client: &Client,
    settings: &SignerSettings,
    ca: &Ca,
    csr: CertificateSigningRequest,
) -> Result<(), SignerError> {
    if csr.spec.signer_name != settings.signer_name
        || csr
            .status
            .as_ref()
            .and_then(|s| s.certificate.as_ref())
            .is_some_and(|c| !c.0.is_empty())
        || has_condition(&csr, "Denied")
        || has_condition(&csr, "Failed")
    {
        return Ok(());
    }
    let name = csr.metadata.name.clone().unwrap_or_default();
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let empty = Vec::new();
    let spec = &csr.spec;
    let request = Request {
        username: spec.username.as_deref().unwrap_or(""),
        node_names: spec
            .extra
            .as_ref()
            .and_then(|e| e.get(NODE_NAME_EXTRA))
            .unwrap_or(&empty),
        usages: spec.usages.as_deref().unwrap_or(&empty),
        pem: &spec.request.0,
    };
    let node = match requester_node(&request) {
        Some(node) => Api::<Node>::all(client.clone())
            .get_opt(node)
            .await?
            .map(|n| NodeAddresses::of(&n)),
        None => None,
    };
    let approved_already = has_condition(&csr, "Approved");
    match decide(&request, &settings.agent_username, node.as_ref()) {
        Err(refusal) => {
            tracing::info!(csr = %name, user = %request.username, reason = refusal.reason, message = %refusal.message, "certificate request denied");
            let pp = PostParams::default();
            if approved_already {
                let failed = with_condition(csr, "Failed", refusal.reason, &refusal.message);
                api.replace_status(&name, &pp, &failed).await?;
            } else {
                let denied = with_condition(csr, "Denied", refusal.reason, &refusal.message);
                api.replace_subresource("approval", &name, &pp, &denied)
                    .await?;
            }
        }
        Ok(approved) => {
            let pp = PostParams::default();
            let csr = if approved_already {
                csr
            } else {
                let message = format!(
                    "the agent on node {} asked for its own addresses",
                    approved.node
                );
                let with = with_condition(csr, "Approved", "NodegateAgentServing", &message);
                api.replace_subresource("approval", &name, &pp, &with)
                    .await?
            };
            let lifetime = lifetime(csr.spec.expiration_seconds, settings.max_duration);
            let pem = ca.sign(&approved, lifetime, SystemTime::now())?;
            let mut issued = csr;
            issued
                .status
                .get_or_insert_with(Default::default)
                .certificate = Some(ByteString(pem.into_bytes()));
            api.replace_status(&name, &pp, &issued).await?;
            tracing::info!(csr = %name, node = %approved.node, lifetime_s = lifetime.as_secs(), "serving certificate issued");
        }
    }
    Ok(())
}

/// Runs the signer until `shutdown`: ensures the CA, publishes the bundle, then handles every
/// request for the signer as it arrives, and all pending ones every `resync` (a write that
/// failed is retried then; a conflict means another replica did it).
pub async fn run(client: Client, settings: SignerSettings, shutdown: CancellationToken) {
    let ca = loop {
        let attempt = async {
            let ca = ensure_ca(&client, &settings).await?;
            publish_bundle(&client, &settings, &ca).await?;
            Ok::<_, SignerError>(ca)
        };
        match attempt.await {
            Ok(ca) => break ca,
            Err(error) => {
                tracing::warn!(%error, "signer: CA not ready, retrying in 5 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    };
    tracing::info!(signer = %settings.signer_name, "signer running");
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let selector = format!("spec.signerName={}", settings.signer_name);
    let mut events = watcher(api.clone(), watcher::Config::default().fields(&selector))
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut resync = tokio::time::interval(settings.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let handle_logged = |csr: CertificateSigningRequest| {
        let (client, settings, ca) = (&client, &settings, &ca);
        async move {
            let name = csr.metadata.name.clone().unwrap_or_default();
            match handle(client, settings, ca, csr).await {
                Ok(()) => {}
                Err(SignerError::Kube(kube::Error::Api(e))) if e.code == 409 => {
                    tracing::debug!(csr = %name, "changed meanwhile (another replica?): next event");
                }
                Err(error) => {
                    tracing::warn!(csr = %name, %error, "certificate request not handled; retried at the next resync")
                }
            }
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => match event {
                Some(Ok(csr)) => handle_logged(csr).await,
                Some(Err(error)) => tracing::warn!(%error, "signer: watching requests"),
                None => return,
            },
            _ = resync.tick() => {
                match api.list(&ListParams::default().fields(&selector)).await {
                    Ok(list) => for csr in list.items { handle_logged(csr).await },
                    Err(error) => tracing::warn!(%error, "signer: listing requests"),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const AGENT: &str = "system:serviceaccount:nodegate-system:nodegate-agent";

    fn csr_pem(cn: &str, sans: &[&str]) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn node1() -> NodeAddresses {
        NodeAddresses {
            ips: vec!["192.0.2.2".parse().unwrap()],
            names: vec!["node-1".into()],
        }
    }

    fn usages() -> Vec<String> {
        vec!["digital signature".into(), "server auth".into()]
    }

    fn decide_for(
        username: &str,
        nodes: &[&str],
        pem: &str,
        usages: &[String],
    ) -> Result<Approved, Refusal> {
        let nodes: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
        decide(
            &Request {
                username,
                node_names: &nodes,
                usages,
                pem: pem.as_bytes(),
            },
            AGENT,
            Some(&node1()),
        )
    }

    #[test]
    fn the_agent_on_its_node_gets_its_addresses() {
        let pem = csr_pem("nodegate:agent:node-1", &["192.0.2.2", "node-1"]);
        let approved = decide_for(AGENT, &["node-1"], &pem, &usages()).unwrap();
        assert_eq!(approved.node, "node-1");
        let (ca, _) = Ca::generate(DEFAULT_SIGNER_NAME, SystemTime::now()).unwrap();
        let now = SystemTime::now();
        let cert = ca.sign(&approved, Duration::from_secs(30), now).unwrap();
        let der = rustls_pki_der(&cert);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let validity = parsed.validity();
        assert_eq!(
            validity.not_after.timestamp() - validity.not_before.timestamp(),
            30 + BACKDATE.as_secs() as i64
        );
        assert!(!parsed.is_ca());
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert_eq!(parsed.subject().to_string(), "CN=nodegate:agent:node-1");
    }

    fn rustls_pki_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }

    #[test]
    fn another_account_is_denied() {
        let pem = csr_pem("nodegate:agent:node-1", &["192.0.2.2"]);
        let r = decide_for(
            "system:serviceaccount:team-a:default",
            &["node-1"],
            &pem,
            &usages(),
        );
        assert_eq!(r.unwrap_err().reason, "NotAnAgent");
    }

    #[test]
    fn a_token_not_bound_to_a_node_is_denied() {
        let pem = csr_pem("nodegate:agent:node-1", &["192.0.2.2"]);
        assert_eq!(
            decide_for(AGENT, &[], &pem, &usages()).unwrap_err().reason,
            "NotNodeBound"
        );
        assert_eq!(
            decide_for(AGENT, &["node-1", "node-2"], &pem, &usages())
                .unwrap_err()
                .reason,
            "NotNodeBound"
        );
    }

    #[test]
    fn another_nodes_name_or_address_is_denied() {
        let pem = csr_pem("nodegate:agent:node-2", &["192.0.2.2"]);
        assert_eq!(
            decide_for(AGENT, &["node-1"], &pem, &usages())
                .unwrap_err()
                .reason,
            "WrongNode"
        );
        for san in ["10.87.0.2", "node-2", "*.node-1", "example.com"] {
            let pem = csr_pem("nodegate:agent:node-1", &["192.0.2.2", san]);
            let r = decide_for(AGENT, &["node-1"], &pem, &usages()).unwrap_err();
            assert_eq!(r.reason, "AddressNotOfNode", "{san}");
            assert!(r.message.contains(san), "{}", r.message);
        }
        let pem = csr_pem("nodegate:agent:node-1", &[]);
        assert_eq!(
            decide_for(AGENT, &["node-1"], &pem, &usages())
                .unwrap_err()
                .reason,
            "NoAddresses"
        );
    }

    #[test]
    fn an_unknown_node_is_denied() {
        let pem = csr_pem("nodegate:agent:node-9", &["192.0.2.2"]);
        let nodes = vec!["node-9".to_string()];
        let r = decide(
            &Request {
                username: AGENT,
                node_names: &nodes,
                usages: &usages(),
                pem: pem.as_bytes(),
            },
            AGENT,
            None,
        );
        assert_eq!(r.unwrap_err().reason, "UnknownNode");
    }

    #[test]
    fn client_auth_or_ca_or_extra_subject_is_denied() {
        let pem = csr_pem("nodegate:agent:node-1", &["192.0.2.2"]);
        let client = vec!["client auth".to_string(), "server auth".to_string()];
        assert_eq!(
            decide_for(AGENT, &["node-1"], &pem, &client)
                .unwrap_err()
                .reason,
            "BadUsages"
        );
        let none = vec!["digital signature".to_string()];
        assert_eq!(
            decide_for(AGENT, &["node-1"], &pem, &none)
                .unwrap_err()
                .reason,
            "BadUsages"
        );
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["192.0.2.2".to_string()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "nodegate:agent:node-1");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        assert_eq!(
            decide_for(AGENT, &["node-1"], &pem, &usages())
                .unwrap_err()
                .reason,
            "WrongNode"
        );
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "nodegate:agent:node-1");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        assert_eq!(
            decide_for(AGENT, &["node-1"], &pem, &usages())
                .unwrap_err()
                .reason,
            "CARequested"
        );
        assert_eq!(
            decide_for(AGENT, &["node-1"], "garbage", &usages())
                .unwrap_err()
                .reason,
            "InvalidRequest"
        );
    }

    #[test]
    fn lifetime_is_capped() {
        let max = Duration::from_secs(3600);
        assert_eq!(lifetime(None, max), max);
        assert_eq!(lifetime(Some(600), max), Duration::from_secs(600));
        assert_eq!(lifetime(Some(86400), max), max);
        assert_eq!(lifetime(Some(-5), max), max);
    }

    #[test]
    fn trust_bundle_names_are_signer_linked() {
        assert_eq!(
            trust_bundle_name("nodegate.io/agent-serving"),
            "nodegate.io:agent-serving:ca"
        );
    }
}
