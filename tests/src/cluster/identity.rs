//! Restricted identities for authorization tests.
//!
//! Users: an ECDSA key and CSR made with `openssl`, signed through the certificates API
//! (`kubernetes.io/kube-apiserver-client` signer, approved by the admin): the certificate comes
//! from the cluster's client CA, and the same code works against any cluster, not only ours.
//! Service accounts: a token from the TokenRequest API.

use super::error::{Error, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
};
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::AuthInfo;
use kube::{Client, Config};
use serde_json::json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A user's client certificate and key (PEM), certified by the cluster's client CA.
#[derive(Clone)]
pub struct UserCredentials {
    pub certificate_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for UserCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCredentials").finish_non_exhaustive()
    }
}

/// A key and a certificate for user `name` in `groups`, certified by the cluster.
pub async fn user_credentials(
    admin: &Client,
    name: &str,
    groups: &[&str],
) -> Result<UserCredentials> {
    let key = openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
        None,
    )?;
    let subject: String = groups
        .iter()
        .map(|g| format!("/O={g}"))
        .chain(std::iter::once(format!("/CN={name}")))
        .collect();
    let csr_pem = openssl(
        &["req", "-new", "-key", "/dev/stdin", "-subj", &subject],
        Some(&key),
    )?;
    let cert = sign(admin, &csr_pem).await?;
    Ok(UserCredentials {
        certificate_pem: cert,
        key_pem: key,
    })
}

/// Client credentials (`AuthInfo`) for user `name` in `groups`, certified by the cluster.
pub async fn user_auth(admin: &Client, name: &str, groups: &[&str]) -> Result<AuthInfo> {
    let credentials = user_credentials(admin, name, groups).await?;
    Ok(serde_json::from_value(json!({
        "client-certificate-data": BASE64.encode(credentials.certificate_pem),
        "client-key-data": BASE64.encode(credentials.key_pem),
    }))?)
}

/// Creates a CSR object, approves it as admin, waits for the signer, deletes the CSR.
async fn sign(admin: &Client, csr_pem: &[u8]) -> Result<Vec<u8>> {
    let api: Api<CertificateSigningRequest> = Api::all(admin.clone());
    let name = super::unique_name("nodegate-test-user");
    let csr = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(csr_pem.to_vec()),
            signer_name: "kubernetes.io/kube-apiserver-client".into(),
            expiration_seconds: Some(3600),
            usages: Some(vec!["client auth".into(), "digital signature".into()]),
            ..Default::default()
        },
        status: None,
    };
    let mut created = api.create(&PostParams::default(), &csr).await?;
    let approved = CertificateSigningRequestCondition {
        type_: "Approved".into(),
        status: "True".into(),
        reason: Some("NodegateTests".into()),
        message: Some("approved by the nodegate test harness".into()),
        ..Default::default()
    };
    created
        .status
        .get_or_insert_with(Default::default)
        .conditions = Some(vec![approved]);
    api.replace_subresource("approval", &name, &PostParams::default(), &created)
        .await?;
    let result = wait_for_certificate(&api, &name).await;
    let _ = api.delete(&name, &DeleteParams::default()).await;
    result
}

async fn wait_for_certificate(api: &Api<CertificateSigningRequest>, name: &str) -> Result<Vec<u8>> {
    for _ in 0..100 {
        let csr = api.get(name).await?;
        if let Some(cert) = csr.status.and_then(|s| s.certificate) {
            return Ok(cert.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Timeout {
        what: format!(
            "CSR {name} to be signed (is the controller manager's csrsigning controller running?)"
        ),
        secs: 10,
    })
}

/// A bearer token for service account `namespace/name` (TokenRequest API).
pub async fn service_account_auth(admin: &Client, namespace: &str, name: &str) -> Result<AuthInfo> {
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(admin.clone(), namespace);
    let request = TokenRequest {
        spec: Some(k8s_openapi::api::authentication::v1::TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued: TokenRequest = api
        .create_subresource("token", name, &PostParams::default(), &request)
        .await?;
    let token = issued
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| Error::Unexpected("TokenRequest returned no token".into()))?;
    Ok(serde_json::from_value(json!({ "token": token }))?)
}

/// A client for the same server as `admin_config`, with other credentials.
pub fn client_with(admin_config: &Config, auth: AuthInfo) -> Result<Client> {
    let mut config = admin_config.clone();
    config.auth_info = auth;
    Client::try_from(config).map_err(Error::Client)
}

fn openssl(args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>> {
    let command = || format!("openssl {}", args.join(" "));
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command {
            command: command(),
            detail: format!("{e} (install openssl)"),
        })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(Error::Command {
            command: command(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}
