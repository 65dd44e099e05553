//! Authentication and authorization the way a kubelet does them (`pkg/kubelet/server/auth.go`
//! and the delegating authenticator): x509 client certificate, else bearer token by
//! TokenReview (header or WebSocket subprotocol); then one SubjectAccessReview per
//! subresource of `nodes`, fine-grained first, allowed when any allows.

use base64::Engine;
use http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use nodegate_crds::catalogue::Subresource;
use std::collections::BTreeMap;

/// How the simulator authenticates and authorizes callers.
#[derive(Clone)]
pub enum SimAuth {
    /// Every request is served, whatever its credentials (they are still recorded).
    AllowAll,
    /// Like a kubelet in a cluster with webhook authn/authz: client certificates from
    /// `client_ca_pem` (needs `tls`), bearer tokens by TokenReview and decisions by
    /// SubjectAccessReview, both made with `client` (which must be allowed to create them).
    Cluster {
        client: kube::Client,
        client_ca_pem: Vec<u8>,
    },
    /// A kubelet without a cluster, for tests that need a refusing kubelet but no API server:
    /// fixed bearer tokens, client certificates from `client_ca_pem` (with `tls`), and a fixed
    /// list of grants.
    Static(StaticAuth),
}

/// Fixed credentials and grants ([`SimAuth::Static`]).
#[derive(Clone, Debug, Default)]
pub struct StaticAuth {
    /// Bearer token → the identity it authenticates as.
    pub tokens: Vec<(String, Identity)>,
    pub client_ca_pem: Option<Vec<u8>>,
    pub grants: Vec<Grant>,
}

/// `verb` on `nodes/<subresource>` for a user or a group; `*` matches anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// A user name, or `group:<name>`.
    pub subject: String,
    pub verb: String,
    pub subresource: String,
}

impl Grant {
    pub fn new(subject: &str, verb: &str, subresource: &str) -> Grant {
        Grant {
            subject: subject.into(),
            verb: verb.into(),
            subresource: subresource.into(),
        }
    }

    fn allows(&self, identity: &Identity, verb: &str, subresource: Subresource) -> bool {
        let subject = self.subject == "*"
            || self.subject == identity.user
            || self
                .subject
                .strip_prefix("group:")
                .is_some_and(|g| identity.groups.iter().any(|x| x == g));
        let wild = |want: &str, have: &str| want == "*" || want == have;
        subject && wild(&self.verb, verb) && wild(&self.subresource, subresource.as_str())
    }
}

impl StaticAuth {
    pub fn authenticate(
        &self,
        cert_identity: Option<&Identity>,
        headers: &HeaderMap,
    ) -> Result<Identity, Denial> {
        if let Some(identity) = cert_identity {
            return Ok(with_authenticated_group(identity.clone()));
        }
        let token = bearer_token(headers).ok_or(Denial::Unauthorized)?;
        self.tokens
            .iter()
            .find(|(t, _)| *t == token)
            .map(|(_, identity)| with_authenticated_group(identity.clone()))
            .ok_or(Denial::Unauthorized)
    }

    /// Allowed when a grant allows one of the subresources, as with SubjectAccessReviews.
    pub fn authorize(
        &self,
        identity: &Identity,
        verb: &str,
        subresources: &[Subresource],
    ) -> Result<(), Denial> {
        let allowed = subresources
            .iter()
            .any(|s| self.grants.iter().any(|g| g.allows(identity, verb, *s)));
        if allowed {
            Ok(())
        } else {
            Err(Denial::Forbidden(forbidden_message(
                &identity.user,
                verb,
                subresources,
            )))
        }
    }
}

impl std::fmt::Debug for SimAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SimAuth::AllowAll => f.write_str("AllowAll"),
            SimAuth::Cluster { .. } => f.write_str("Cluster"),
            SimAuth::Static(s) => f.debug_tuple("Static").field(s).finish(),
        }
    }
}

impl SimAuth {
    /// The CA client certificates are verified against, when one is configured.
    pub fn client_ca_pem(&self) -> Option<&[u8]> {
        match self {
            SimAuth::AllowAll => None,
            SimAuth::Cluster { client_ca_pem, .. } => Some(client_ca_pem),
            SimAuth::Static(s) => s.client_ca_pem.as_deref(),
        }
    }
}

/// An authenticated user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
    pub uid: Option<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Why a request was not served, with the kubelet's status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    Unauthorized,
    Forbidden(String),
    AuthorizationError(String),
}

impl Denial {
    pub fn status(&self) -> u16 {
        match self {
            Denial::Unauthorized => 401,
            Denial::Forbidden(_) => 403,
            Denial::AuthorizationError(_) => 500,
        }
    }

    /// The kubelet's body: `Unauthorized` as is, the others with Go's `http.Error` newline
    /// (checked against a real kubelet by `refusals_match_the_real_kubelet`).
    pub fn body(&self) -> String {
        match self {
            Denial::Unauthorized => "Unauthorized".into(),
            Denial::Forbidden(m) | Denial::AuthorizationError(m) => format!("{m}\n"),
        }
    }
}

/// The kubelet's 403 text: `Forbidden (user=u, verb=get, resource=nodes, subresource(s)=[pods proxy])`.
pub fn forbidden_message(user: &str, verb: &str, subresources: &[Subresource]) -> String {
    let list: Vec<&str> = subresources.iter().map(|s| s.as_str()).collect();
    format!(
        "Forbidden (user={user}, verb={verb}, resource=nodes, subresource(s)=[{}])",
        list.join(" ")
    )
}

const WS_TOKEN_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// The bearer token of a request: the `Authorization: Bearer` header, else the WebSocket
/// subprotocol `base64url.bearer.authorization.k8s.io.<token>` (how browsers and kubectl's
/// WebSocket client pass it).
pub fn bearer_token(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = value.trim().splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next())
            && scheme.eq_ignore_ascii_case("bearer")
            && !token.trim().is_empty()
        {
            return Some(token.trim().to_string());
        }
    }
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(WS_TOKEN_PREFIX))
        .and_then(|encoded| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
}

/// What the kubelet authenticates a request as: the verified client certificate's identity
/// wins; else the bearer token; no credential at all is 401 (anonymous auth off), and so is a
/// token the API server does not accept.
pub async fn authenticate(
    client: &kube::Client,
    cert_identity: Option<&Identity>,
    headers: &HeaderMap,
) -> Result<Identity, Denial> {
    if let Some(identity) = cert_identity {
        return Ok(with_authenticated_group(identity.clone()));
    }
    let Some(token) = bearer_token(headers) else {
        return Err(Denial::Unauthorized);
    };
    let review = TokenReview {
        spec: TokenReviewSpec {
            token,
            audiences: None,
        },
        ..Default::default()
    };
    let result = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await;
    let status = match result {
        Ok(r) => r.status,
        Err(e) => {
            tracing::warn!(error = %e, "kubelet-sim: TokenReview failed");
            return Err(Denial::Unauthorized);
        }
    };
    let Some(status) = status.filter(|s| s.authenticated == Some(true)) else {
        return Err(Denial::Unauthorized);
    };
    let user = status.user.unwrap_or_default();
    Ok(with_authenticated_group(Identity {
        user: user.username.unwrap_or_default(),
        groups: user.groups.unwrap_or_default(),
        uid: user.uid,
        extra: user.extra.unwrap_or_default(),
    }))
}

fn with_authenticated_group(mut identity: Identity) -> Identity {
    if !identity.groups.iter().any(|g| g == "system:authenticated") {
        identity.groups.push("system:authenticated".into());
    }
    identity
}

/// Asks the API server about each subresource in turn; allowed when one is allowed.
pub async fn authorize(
    client: &kube::Client,
    identity: &Identity,
    verb: &str,
    node: &str,
    subresources: &[Subresource],
) -> Result<(), Denial> {
    let api = Api::<SubjectAccessReview>::all(client.clone());
    for sub in subresources {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(identity.user.clone()),
                groups: Some(identity.groups.clone()),
                uid: identity.uid.clone(),
                extra: (!identity.extra.is_empty()).then(|| identity.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.to_string()),
                    group: Some(String::new()),
                    version: Some("v1".into()),
                    resource: Some("nodes".into()),
                    subresource: Some(sub.as_str().to_string()),
                    name: Some(node.to_string()),
                    ..Default::default()
                }),
                non_resource_attributes: None,
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => return Ok(()),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "kubelet-sim: SubjectAccessReview failed");
                return Err(Denial::AuthorizationError(format!(
                    "Authorization error (user={}, verb={verb}, resource=nodes, subresource={sub})",
                    identity.user
                )));
            }
        }
    }
    Err(Denial::Forbidden(forbidden_message(
        &identity.user,
        verb,
        subresources,
    )))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn forbidden_text_is_the_kubelets() {
        assert_eq!(
            forbidden_message("u", "get", &[Subresource::Pods, Subresource::Proxy]),
            "Forbidden (user=u, verb=get, resource=nodes, subresource(s)=[pods proxy])"
        );
        assert_eq!(
            forbidden_message("u", "", &[Subresource::Metrics]),
            "Forbidden (user=u, verb=, resource=nodes, subresource(s)=[metrics])"
        );
    }

    #[test]
    fn static_grants() {
        let alice = Identity {
            user: "alice".into(),
            groups: vec!["team-a".into()],
            ..Default::default()
        };
        let auth = StaticAuth {
            tokens: vec![("t".into(), alice.clone())],
            client_ca_pem: None,
            grants: vec![
                Grant::new("alice", "get", "metrics"),
                Grant::new("group:team-a", "*", "proxy"),
            ],
        };
        let mut h = HeaderMap::new();
        assert_eq!(auth.authenticate(None, &h), Err(Denial::Unauthorized));
        h.insert("authorization", "Bearer wrong".parse().unwrap());
        assert_eq!(auth.authenticate(None, &h), Err(Denial::Unauthorized));
        h.insert("authorization", "Bearer t".parse().unwrap());
        let id = auth.authenticate(None, &h).unwrap();
        assert_eq!(id.user, "alice");
        assert!(id.groups.contains(&"system:authenticated".to_string()));
        assert_eq!(auth.authorize(&id, "get", &[Subresource::Metrics]), Ok(()));
        assert_eq!(auth.authorize(&id, "create", &[Subresource::Proxy]), Ok(()));
        assert_eq!(
            auth.authorize(&id, "get", &[Subresource::Stats]),
            Err(Denial::Forbidden(
                "Forbidden (user=alice, verb=get, resource=nodes, subresource(s)=[stats])".into()
            ))
        );
        assert_eq!(
            auth.authorize(&id, "create", &[Subresource::Metrics])
                .map_err(|d| d.status()),
            Err(403)
        );
    }

    #[test]
    fn bearer_from_header_or_websocket_protocol() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
        h.insert(
            "sec-websocket-protocol",
            "v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.dG9rLTE"
                .parse()
                .unwrap(),
        );
        assert_eq!(bearer_token(&h).as_deref(), Some("tok-1"));
        h.insert("authorization", "Bearer  tok-2 ".parse().unwrap());
        assert_eq!(bearer_token(&h).as_deref(), Some("tok-2"));
    }
}
