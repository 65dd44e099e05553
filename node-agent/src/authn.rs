//! Authentication as the kubelet does it: a verified client certificate (user = CN, groups = O),
//! else a bearer token reviewed by the API server (TokenReview), else anonymous.
//!
//! The rule that matters most: a caller who *presents* a credential that does not check out is
//! refused (401), never downgraded to `system:anonymous`, and neither is a caller whose token
//! could not be reviewed because the API server is unreachable. Anonymous is only for callers
//! who presented nothing.
//!
//! Token reviews are cached by the SHA-256 of the token (the token itself is never kept or
//! logged) with the kubelet's TTLs. Concurrent misses for one token share one review, and
//! refused tokens go to a small cache of their own so they never evict good entries.
//!
//! A flood of junk tokens must neither flood the API server nor starve real callers:
//! - what cannot be a token is refused locally, with no review ([`check_token_locally`]: the
//!   RFC 6750 token68 alphabet, at most [`MAX_TOKEN_BYTES`], and a JWT-shaped token must have
//!   JSON-object header and payload and be within its `exp`/`nbf` give or take
//!   [`CLOCK_SKEW`]);
//! - each connection has at most one review in flight or waiting ([`ConnectionBudget`]), so
//!   an HTTP/2 connection with hundreds of streams holds no more than an HTTP/1.1 one, and
//!   the connections from one peer address at most `max_reviews_per_peer`, so a caller who
//!   opens many connections still holds only a few places in the queue;
//! - reviews take one of `max_concurrent_reviews` slots (handed out first come, first
//!   served) and start at most `review_rate` a second after a burst of `review_burst`, so
//!   the TokenReviews one agent sends in any `T` seconds are at most
//!   `review_burst + 1 + review_rate × T`;
//! - the wait for all of that is bounded by `review_wait`, separately from the review itself
//!   (`review_timeout`): a caller who cannot get a review in time is refused (401), never
//!   anonymous, and nothing was sent for it.
//!
//! The agent's service account needs `create` on `tokenreviews.authentication.k8s.io`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use moka::future::Cache;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// The user of unauthenticated requests.
pub const ANONYMOUS_USER: &str = "system:anonymous";
/// The group of unauthenticated requests.
pub const UNAUTHENTICATED_GROUP: &str = "system:unauthenticated";
/// The group every authenticated user gets.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";
/// Prefix of the WebSocket subprotocol that carries a bearer token (browsers cannot set
/// headers on a WebSocket).
pub const WEBSOCKET_TOKEN_PROTOCOL_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// How a caller was authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    Anonymous,
    X509,
    Token,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Anonymous => "anonymous",
            AuthMethod::X509 => "x509",
            AuthMethod::Token => "token",
        }
    }
}

/// Who the caller is. `groups` include `system:authenticated` (or `system:unauthenticated`
/// for anonymous callers), so authorization can match groups without knowing the method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    /// The user's UID from the TokenReview (service accounts have one), for
    /// SubjectAccessReviews.
    pub uid: Option<String>,
    pub groups: Vec<String>,
    /// Extra attributes from the TokenReview (e.g. the service account's pod), for
    /// SubjectAccessReviews.
    pub extra: BTreeMap<String, Vec<String>>,
    pub method: AuthMethod,
}

impl UserInfo {
    /// The caller who presented no credential.
    pub fn anonymous() -> Self {
        UserInfo {
            name: ANONYMOUS_USER.into(),
            uid: None,
            groups: vec![UNAUTHENTICATED_GROUP.into()],
            extra: BTreeMap::new(),
            method: AuthMethod::Anonymous,
        }
    }

    /// Whether the user is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// Why a caller is refused. Every variant answers 401 Unauthorized; none ever becomes
/// anonymous. [`AuthnError::cause`] names it for the `cause` label of
/// `nodegate_agent_authentications_total`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// The API server's TokenReview refused the token (or did earlier: cached), or the token
    /// is not valid for the agent's audiences.
    #[error("invalid credentials")]
    Invalid,
    /// Refused locally, nothing sent: an unusable `Authorization` header or WebSocket token
    /// protocol, several credentials that differ, or a token that cannot be one.
    #[error("malformed credentials: {0}")]
    Malformed(&'static str),
    /// A JWT whose `exp` is past by more than [`CLOCK_SKEW`] (refused locally).
    #[error("token expired")]
    Expired,
    /// A JWT whose `nbf` is ahead by more than [`CLOCK_SKEW`] (refused locally).
    #[error("token not valid yet")]
    NotYetValid,
    /// A verified client certificate the API server could read as another user (no CN,
    /// several CNs, an attribute that is not a string).
    #[error("unusable client certificate: {0}")]
    BadCertificate(&'static str),
    /// No review could start within `review_wait` (this connection's review, the review
    /// slots or the review rate were taken); nothing was sent.
    #[error("no token review capacity: {0}")]
    Busy(&'static str),
    /// The credential could not be checked (the TokenReview failed: API server down,
    /// timeout).
    #[error("credentials could not be verified: {0}")]
    Unavailable(String),
}

impl AuthnError {
    /// The `cause` label of `nodegate_agent_authentications_total`.
    pub fn cause(&self) -> &'static str {
        match self {
            AuthnError::Invalid => "invalid",
            AuthnError::Malformed(_) => "malformed",
            AuthnError::Expired => "expired",
            AuthnError::NotYetValid => "not_yet_valid",
            AuthnError::BadCertificate(_) => "bad_certificate",
            AuthnError::Busy(_) => "review_busy",
            AuthnError::Unavailable(_) => "review_unavailable",
        }
    }

    /// The `method` label: which credential was refused.
    pub fn method(&self) -> &'static str {
        match self {
            AuthnError::BadCertificate(_) => AuthMethod::X509.as_str(),
            _ => AuthMethod::Token.as_str(),
        }
    }
}

/// Longest bearer token looked at (16 KiB): Kubernetes' own tokens are far shorter (a
/// projected service-account token is about 1 KiB) and the API server's request headers are
/// not meant to carry more.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Leeway on a JWT's `exp` and `nbf`: the API server's service-account authenticator allows
/// go-jose's default leeway of one minute, so the agent refuses nothing the API server would
/// still accept.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Judges a bearer token without asking anyone: `Ok` when it may be a token (and must be
/// reviewed), else why it cannot be. Opaque tokens (bootstrap tokens `[a-z0-9]{6}.[a-z0-9]{16}`,
/// static tokens) pass when they are token68; a JWT-shaped one (exactly three non-empty
/// base64url segments) must have a header and a payload that decode to JSON objects, a
/// numeric `exp` and `nbf` when present, and be valid at `now_unix` give or take
/// [`CLOCK_SKEW`]. Signatures are not checked here: that is the API server's job.
pub fn check_token_locally(token: &str, now_unix: i64) -> Result<(), AuthnError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthnError::Malformed("token longer than 16 KiB"));
    }
    if !is_token68(token) {
        return Err(AuthnError::Malformed(
            "token has characters outside RFC 6750's token68",
        ));
    }
    let segments: Vec<&str> = token.split('.').collect();
    let jwt_shaped = segments.len() == 3
        && segments.iter().all(|s| {
            let s = s.trim_end_matches('=');
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !jwt_shaped {
        return Ok(());
    }
    let object = |segment: &str| {
        URL_SAFE_NO_PAD
            .decode(segment.trim_end_matches('='))
            .ok()
            .and_then(|bytes| {
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes).ok()
            })
    };
    if object(segments[0]).is_none() {
        return Err(AuthnError::Malformed(
            "JWT header is not a base64url JSON object",
        ));
    }
    let Some(claims) = object(segments[1]) else {
        return Err(AuthnError::Malformed(
            "JWT payload is not a base64url JSON object",
        ));
    };
    let skew = CLOCK_SKEW.as_secs() as i64;
    let time = |name: &str| match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|t| t.is_finite())
            .map(|t| Some(t as i64))
            .ok_or(AuthnError::Malformed("JWT time claim is not a number")),
    };
    if let Some(exp) = time("exp")?
        && exp < now_unix.saturating_sub(skew)
    {
        return Err(AuthnError::Expired);
    }
    if let Some(nbf) = time("nbf")?
        && nbf > now_unix.saturating_add(skew)
    {
        return Err(AuthnError::NotYetValid);
    }
    Ok(())
}

/// RFC 6750's `b64token` (RFC 7235's token68): `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" /
/// "+" / "/" ) *"="`.
fn is_token68(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// One connection's share of review capacity: at most one token review in flight or
/// waiting for a slot, and a place among its peer address's `max_reviews_per_peer`. Made
/// once per connection by the listener ([`Authenticator::connection`]) and passed with each
/// of its requests, so a connection multiplexing many streams (HTTP/2) cannot queue more
/// reviews than a connection that sends one request at a time, and many connections from one
/// address cannot queue more than a few; their other requests wait (at most `review_wait`)
/// behind their own reviews, not in front of everyone else's.
#[derive(Clone, Debug)]
pub struct ConnectionBudget {
    connection: Arc<Semaphore>,
    peer: Option<Arc<Semaphore>>,
}

impl ConnectionBudget {
    /// A connection with no peer address known (one review at a time, no address budget).
    pub fn new() -> Self {
        ConnectionBudget {
            connection: Arc::new(Semaphore::new(1)),
            peer: None,
        }
    }
}

impl Default for ConnectionBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// Generic cell rate algorithm: given the theoretical arrival time `tat` of the next review,
/// when a review asked for at `now` may start, and the new `tat`. Over any window of `T`,
/// at most `burst + 1 + T / interval` reviews start.
fn gcra(
    tat: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
    interval: Duration,
    burst: u32,
) -> (tokio::time::Instant, tokio::time::Instant) {
    let tat = tat.map_or(now, |t| t.max(now));
    let tau = interval.saturating_mul(burst);
    let start = tat.checked_sub(tau).map_or(now, |s| s.max(now));
    (start, tat + interval)
}

/// The API server's verdict on a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReviewOutcome {
    Authenticated {
        name: String,
        uid: Option<String>,
        groups: Vec<String>,
        extra: BTreeMap<String, Vec<String>>,
        /// The audiences the token is valid for (as the API server reports them).
        audiences: Vec<String>,
    },
    Refused,
}

/// A boxed future, so reviewers can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Reviews tokens: the API server in production, a counting fake in tests.
pub trait TokenReviewer: Send + Sync + 'static {
    /// `Ok(outcome)` when the reviewer answered, `Err(reason)` when it could not.
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<ReviewOutcome, String>>;
}

/// TokenReview against the API server with the agent's own credentials (which need
/// `create tokenreviews`).
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: kube::Client,
}

impl KubeTokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        KubeTokenReviewer { client }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<ReviewOutcome, String>> {
        Box::pin(async move {
            let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: token.to_string(),
                    audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
                },
                ..Default::default()
            };
            let answer = api
                .create(&kube::api::PostParams::default(), &review)
                .await
                .map_err(|e| format!("TokenReview failed: {e}"))?;
            let Some(status) = answer.status else {
                return Err("TokenReview returned no status".into());
            };
            if status.authenticated != Some(true) {
                return Ok(ReviewOutcome::Refused);
            }
            let user = status.user.unwrap_or_default();
            let Some(name) = user.username.filter(|n| !n.is_empty()) else {
                return Ok(ReviewOutcome::Refused);
            };
            Ok(ReviewOutcome::Authenticated {
                name,
                uid: user.uid.filter(|u| !u.is_empty()),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
                audiences: status.audiences.unwrap_or_default(),
            })
        })
    }
}

/// Cache and concurrency settings. Defaults follow the kubelet
/// (`--authentication-token-webhook-cache-ttl` 2 min).
#[derive(Clone, Debug)]
pub struct AuthnSettings {
    /// `--authentication-token-audiences`: the audiences a token must be valid for; empty
    /// means the API server's own audience.
    pub audiences: Vec<String>,
    /// Whether client certificates are trusted (only when a client CA is configured).
    pub x509_enabled: bool,
    pub success_ttl: Duration,
    pub failure_ttl: Duration,
    /// Authenticated tokens kept.
    pub success_capacity: u64,
    /// Refused tokens kept (separately, so junk never evicts good entries).
    pub failure_capacity: u64,
    /// Reviews in flight at once; further misses wait for a slot (first come, first served)
    /// up to `review_wait`.
    pub max_concurrent_reviews: usize,
    /// Reviews in flight or waiting for the connections from one peer address.
    pub max_reviews_per_peer: usize,
    /// Reviews started per second, after a burst of `review_burst` (0: no rate limit).
    pub review_rate: u32,
    pub review_burst: u32,
    /// Longest wait for a review to start (this connection's turn, a slot, the rate); past
    /// it the caller is refused (`review_busy`) and nothing is sent.
    pub review_wait: Duration,
    /// Time for one review once started (the wait is not counted).
    pub review_timeout: Duration,
}

impl Default for AuthnSettings {
    fn default() -> Self {
        AuthnSettings {
            audiences: Vec::new(),
            x509_enabled: false,
            success_ttl: Duration::from_secs(120),
            failure_ttl: Duration::from_secs(10),
            success_capacity: 10_000,
            failure_capacity: 1_000,
            max_concurrent_reviews: 16,
            max_reviews_per_peer: 4,
            review_rate: 200,
            review_burst: 32,
            review_wait: Duration::from_secs(2),
            review_timeout: Duration::from_secs(10),
        }
    }
}

/// Parses `--authentication-token-audiences` (comma-separated, blanks ignored).
pub fn parse_audiences(flag: &str) -> Vec<String> {
    flag.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect()
}

type TokenKey = [u8; 32];

/// Why a review did not produce a user; shared between the callers of one collapsed review.
#[derive(Clone, Debug)]
enum Miss {
    Refused,
    Busy(&'static str),
    Unavailable(String),
}

struct Inner {
    reviewer: Arc<dyn TokenReviewer>,
    settings: AuthnSettings,
    authenticated: Cache<TokenKey, Arc<UserInfo>>,
    refused: Cache<TokenKey, ()>,
    reviews: Semaphore,
    /// The review rate's theoretical arrival time ([`gcra`]); a std mutex held for a few
    /// instructions, never across an await.
    pacer: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The review budget of each peer address with a connection open (entries die with the
    /// last connection and are swept when the map has doubled).
    peers: std::sync::Mutex<PeerBudgets>,
}

#[derive(Default)]
struct PeerBudgets {
    budgets: std::collections::HashMap<std::net::IpAddr, std::sync::Weak<Semaphore>>,
    sweep_at: usize,
}

/// Authenticates requests; cheap to clone (one cache shared by all clones).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(reviewer: Arc<dyn TokenReviewer>, settings: AuthnSettings) -> Self {
        let authenticated = Cache::builder()
            .max_capacity(settings.success_capacity)
            .time_to_live(settings.success_ttl)
            .build();
        let refused = Cache::builder()
            .max_capacity(settings.failure_capacity)
            .time_to_live(settings.failure_ttl)
            .build();
        let reviews = Semaphore::new(settings.max_concurrent_reviews.max(1));
        Authenticator {
            inner: Arc::new(Inner {
                reviewer,
                settings,
                authenticated,
                refused,
                reviews,
                pacer: std::sync::Mutex::new(None),
                peers: std::sync::Mutex::new(PeerBudgets::default()),
            }),
        }
    }

    /// An authenticator reviewing tokens with the API server.
    pub fn with_client(client: kube::Client, settings: AuthnSettings) -> Self {
        Self::new(Arc::new(KubeTokenReviewer::new(client)), settings)
    }

    pub fn settings(&self) -> &AuthnSettings {
        &self.inner.settings
    }

    /// Tokens cached as (authenticated, refused), approximately (for metrics).
    pub fn cached_tokens(&self) -> (u64, u64) {
        (
            self.inner.authenticated.entry_count(),
            self.inner.refused.entry_count(),
        )
    }

    /// The review budget of a new connection from `peer` (its address's budget shared with
    /// the other connections from there).
    pub fn connection(&self, peer: std::net::IpAddr) -> ConnectionBudget {
        let peer = peer.to_canonical();
        let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        let shared = match peers.budgets.get(&peer).and_then(std::sync::Weak::upgrade) {
            Some(shared) => shared,
            None => {
                if peers.budgets.len() >= peers.sweep_at {
                    peers.budgets.retain(|_, b| b.strong_count() > 0);
                    peers.sweep_at = (peers.budgets.len() * 2).max(64);
                }
                let shared = Arc::new(Semaphore::new(
                    self.inner.settings.max_reviews_per_peer.max(1),
                ));
                peers.budgets.insert(peer, Arc::downgrade(&shared));
                shared
            }
        };
        ConnectionBudget {
            connection: Arc::new(Semaphore::new(1)),
            peer: Some(shared),
        }
    }

    /// Authenticates a request on the secure port as if it came alone on its connection (see
    /// [`Authenticator::authenticate_on`]).
    pub async fn authenticate(
        &self,
        peer_certs: Option<&[CertificateDer<'static>]>,
        headers: &HeaderMap,
    ) -> Result<UserInfo, AuthnError> {
        self.authenticate_on(&ConnectionBudget::new(), peer_certs, headers)
            .await
    }

    /// Authenticates a request on the secure port. `peer_certs` is the client's certificate
    /// chain as rustls verified it against the client CA (rustls refuses the handshake for a
    /// chain that does not verify, so a chain here is trusted). `connection` is the budget of
    /// the connection the request came on. A token in the query string is never looked at.
    pub async fn authenticate_on(
        &self,
        connection: &ConnectionBudget,
        peer_certs: Option<&[CertificateDer<'static>]>,
        headers: &HeaderMap,
    ) -> Result<UserInfo, AuthnError> {
        // As the kubelet's union authenticator: a verified certificate wins over a token.
        if self.inner.settings.x509_enabled
            && let Some(leaf) = peer_certs.and_then(|c| c.first())
        {
            let user = user_from_certificate(leaf)?;
            tracing::debug!(user = %user.name, "authenticated by client certificate");
            return Ok(user);
        }
        match bearer_token(headers)? {
            Some(token) => self.authenticate_token_on(connection, &token).await,
            None => Ok(UserInfo::anonymous()),
        }
    }

    /// Authenticates a bearer token as if it came alone on its connection.
    pub async fn authenticate_token(&self, token: &str) -> Result<UserInfo, AuthnError> {
        self.authenticate_token_on(&ConnectionBudget::new(), token)
            .await
    }

    /// Authenticates a bearer token: local checks, cache, else one review shared by
    /// concurrent callers, started within `review_wait` or refused.
    pub async fn authenticate_token_on(
        &self,
        connection: &ConnectionBudget,
        token: &str,
    ) -> Result<UserInfo, AuthnError> {
        // Before the cache too: a cached token that has since expired is refused.
        if let Err(e) = check_token_locally(token, unix_now()) {
            tracing::debug!(error = %e, "token refused without review");
            return Err(e);
        }
        let key: TokenKey = Sha256::digest(token.as_bytes()).into();
        if let Some(user) = self.inner.authenticated.get(&key).await {
            return Ok((*user).clone());
        }
        if self.inner.refused.contains_key(&key) {
            tracing::debug!(token_sha256 = %hash_prefix(&key), "token refused (cached)");
            return Err(AuthnError::Invalid);
        }
        let deadline = tokio::time::Instant::now() + self.inner.settings.review_wait;
        let _turn = match tokio::time::timeout_at(deadline, connection.connection.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                tracing::debug!(
                    token_sha256 = %hash_prefix(&key),
                    "this connection's token review did not finish within the wait"
                );
                return Err(AuthnError::Busy(
                    "this connection's review is still running",
                ));
            }
        };
        let _peer_turn = match &connection.peer {
            None => None,
            Some(peer) => match tokio::time::timeout_at(deadline, peer.acquire()).await {
                Ok(Ok(permit)) => Some(permit),
                _ => {
                    tracing::debug!(
                        token_sha256 = %hash_prefix(&key),
                        "this address's token reviews did not finish within the wait"
                    );
                    return Err(AuthnError::Busy("this address's reviews are all taken"));
                }
            },
        };
        let inner = self.inner.clone();
        let review = async move { inner.review(token, &hash_prefix(&key), deadline).await };
        match self.inner.authenticated.try_get_with(key, review).await {
            Ok(user) => Ok((*user).clone()),
            Err(miss) => match &*miss {
                Miss::Refused => {
                    self.inner.refused.insert(key, ()).await;
                    Err(AuthnError::Invalid)
                }
                Miss::Busy(why) => Err(AuthnError::Busy(why)),
                Miss::Unavailable(reason) => Err(AuthnError::Unavailable(reason.clone())),
            },
        }
    }
}

impl Inner {
    /// When a review may start, by the rate ([`gcra`]); `None` when that is past `deadline`
    /// (the schedule is then left as it was).
    fn start_time(&self, deadline: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let rate = self.settings.review_rate;
        let now = tokio::time::Instant::now();
        if rate == 0 {
            return Some(now);
        }
        let interval = Duration::from_secs(1) / rate;
        let mut tat = self.pacer.lock().unwrap_or_else(|e| e.into_inner());
        let (start, next) = gcra(*tat, now, interval, self.settings.review_burst);
        if start > deadline {
            return None;
        }
        *tat = Some(next);
        Some(start)
    }

    /// One TokenReview: a slot and a start within `deadline`, then `review_timeout` for the
    /// review itself.
    async fn review(
        &self,
        token: &str,
        hash: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<UserInfo>, Miss> {
        let _slot = match tokio::time::timeout_at(deadline, self.reviews.acquire()).await {
            Ok(Ok(slot)) => slot,
            _ => {
                tracing::debug!(token_sha256 = %hash, "no token review slot within the wait");
                return Err(Miss::Busy("every review slot is taken"));
            }
        };
        let Some(start) = self.start_time(deadline) else {
            tracing::debug!(token_sha256 = %hash, "token review rate exhausted for the wait");
            return Err(Miss::Busy("the review rate is exhausted"));
        };
        tokio::time::sleep_until(start).await;
        let outcome = tokio::time::timeout(
            self.settings.review_timeout,
            self.reviewer.review(token, &self.settings.audiences),
        )
        .await;
        let outcome = match outcome {
            Err(_) => {
                tracing::warn!(token_sha256 = %hash, "token review timed out");
                return Err(Miss::Unavailable("token review timed out".into()));
            }
            Ok(Err(reason)) => {
                tracing::warn!(token_sha256 = %hash, %reason, "token review failed");
                return Err(Miss::Unavailable(reason));
            }
            Ok(Ok(outcome)) => outcome,
        };
        match outcome {
            ReviewOutcome::Refused => {
                tracing::info!(token_sha256 = %hash, "token refused by TokenReview");
                Err(Miss::Refused)
            }
            ReviewOutcome::Authenticated {
                name,
                uid,
                groups,
                extra,
                audiences,
            } => {
                // As the API server's audience-agnostic check: when we asked for audiences,
                // the token must be valid for at least one of them.
                let wanted = &self.settings.audiences;
                if !wanted.is_empty() && !audiences.iter().any(|a| wanted.contains(a)) {
                    tracing::info!(token_sha256 = %hash, ?audiences, "token not valid for our audiences");
                    return Err(Miss::Refused);
                }
                tracing::debug!(token_sha256 = %hash, user = %name, "token authenticated");
                Ok(Arc::new(UserInfo {
                    name,
                    uid,
                    groups: with_authenticated(groups),
                    extra,
                    method: AuthMethod::Token,
                }))
            }
        }
    }
}

/// The first 8 hex digits of a token's SHA-256: enough to correlate log lines, useless to
/// an attacker.
fn hash_prefix(key: &TokenKey) -> String {
    key.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

fn with_authenticated(mut groups: Vec<String>) -> Vec<String> {
    if !groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
        groups.push(AUTHENTICATED_GROUP.into());
    }
    groups
}

/// User = CN, groups = every O, of a verified client certificate, read so that the API
/// server and the kubelet (Go's `pkix.Name`) cannot read another user from the same
/// certificate: Go keeps the *last* of several CNs, so a certificate must have exactly one;
/// every CN and O must be a string type Go reads the same way (UTF8String, PrintableString,
/// IA5String, NumericString, each within its alphabet), else the certificate is refused. A
/// certificate with no or an empty CN is refused too (the kubelet would fall through to
/// anonymous; we do not downgrade).
pub fn user_from_certificate(leaf: &CertificateDer<'_>) -> Result<UserInfo, AuthnError> {
    let refuse = |why: &'static str| {
        tracing::info!(reason = why, "client certificate refused");
        AuthnError::BadCertificate(why)
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| refuse("unreadable certificate"))?;
    let subject = cert.subject();
    let mut names = subject.iter_common_name();
    let (Some(cn), None) = (names.next(), names.next()) else {
        return Err(refuse("not exactly one common name"));
    };
    let name = attribute_string(cn)
        .ok_or_else(|| refuse("common name is not a plain string"))?
        .to_string();
    if name.is_empty() {
        return Err(refuse("empty common name"));
    }
    let groups = subject
        .iter_organization()
        .map(|o| attribute_string(o).map(String::from))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| refuse("organization is not a plain string"))?;
    Ok(UserInfo {
        name,
        uid: None,
        groups: with_authenticated(groups),
        extra: BTreeMap::new(),
        method: AuthMethod::X509,
    })
}

/// A subject attribute's string, only for the string types Go's `encoding/asn1` reads to the
/// same characters (and only within their alphabets, which Go enforces and x509-parser does
/// not): anything else could be read differently by the API server.
fn attribute_string<'a>(
    attribute: &'a x509_parser::x509::AttributeTypeAndValue<'_>,
) -> Option<&'a str> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let value = attribute.as_str().ok()?;
    let printable = |c: char| c.is_ascii_alphanumeric() || " '()+,-./:=?".contains(c);
    let fits = match attribute.attr_value().tag() {
        Tag::Utf8String => true,
        Tag::PrintableString => value.chars().all(printable),
        Tag::Ia5String => value.is_ascii(),
        Tag::NumericString => value.chars().all(|c| c.is_ascii_digit() || c == ' '),
        _ => false,
    };
    fits.then_some(value)
}

/// The bearer token of a request: the `Authorization: Bearer` header, or for a WebSocket
/// upgrade the `base64url.bearer.authorization.k8s.io.<token>` subprotocol. `Ok(None)` when
/// the request carries no credential; `Invalid` when it carries one we cannot use (another
/// scheme, an empty or undecodable token, several tokens that differ). This is stricter than
/// the kubelet, which ignores unusable headers: a caller who sent a credential meant to be
/// someone, and must not silently become anonymous.
pub fn bearer_token(headers: &HeaderMap) -> Result<Option<String>, AuthnError> {
    let mut header_token = None;
    for value in headers.get_all(http::header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| AuthnError::Malformed("unreadable Authorization header"))?
            .trim();
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(AuthnError::Malformed("Authorization is not a Bearer token"));
        }
        if header_token.replace(token.to_string()).is_some() {
            return Err(AuthnError::Malformed("several Authorization headers"));
        }
    }
    let protocol_token = websocket_protocol_token(headers)?;
    match (header_token, protocol_token) {
        (Some(a), Some(b)) if a != b => Err(AuthnError::Malformed(
            "Authorization and WebSocket token protocol differ",
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

/// The token in the WebSocket subprotocol list, as the API server's websocket authenticator
/// reads it: only on a WebSocket upgrade, exactly one such protocol, base64url without
/// padding.
fn websocket_protocol_token(headers: &HeaderMap) -> Result<Option<String>, AuthnError> {
    let is_websocket = headers
        .get_all(http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        });
    if !is_websocket {
        return Ok(None);
    }
    let mut found = None;
    for value in headers.get_all(http::header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for protocol in value.split(',').map(str::trim) {
            let Some(encoded) = protocol.strip_prefix(WEBSOCKET_TOKEN_PROTOCOL_PREFIX) else {
                continue;
            };
            let decoded = URL_SAFE_NO_PAD
                .decode(encoded)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|t| !t.is_empty())
                .ok_or(AuthnError::Malformed(
                    "WebSocket token protocol is not base64url",
                ))?;
            if found.replace(decoded).is_some() {
                return Err(AuthnError::Malformed("several WebSocket token protocols"));
            }
        }
    }
    Ok(found)
}

/// The `Sec-WebSocket-Protocol` value with the token protocol removed, so the token is never
/// forwarded upstream. `None` when nothing is left.
pub fn strip_token_protocol(value: &str) -> Option<String> {
    let kept: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.starts_with(WEBSOCKET_TOKEN_PROTOCOL_PREFIX))
        .collect();
    (!kept.is_empty()).then(|| kept.join(", "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::tls::test_pki::Ca;
    use http::HeaderValue;
    use serde_json::json;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A reviewer that knows some tokens, counts reviews, can be slow or down.
    #[derive(Default)]
    struct FakeReviewer {
        users: HashMap<String, (String, Vec<String>, Vec<String>)>,
        reviews: AtomicUsize,
        per_token: Mutex<HashMap<String, usize>>,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        delay: Duration,
        down: AtomicBool,
    }

    impl FakeReviewer {
        fn with(tokens: &[(&str, &str, &[&str])]) -> Self {
            FakeReviewer {
                users: tokens
                    .iter()
                    .map(|(t, u, g)| {
                        (
                            t.to_string(),
                            (
                                u.to_string(),
                                g.iter().map(|g| g.to_string()).collect(),
                                vec!["https://kubernetes.default.svc".to_string()],
                            ),
                        )
                    })
                    .collect(),
                ..Default::default()
            }
        }
        fn count(&self, token: &str) -> usize {
            self.per_token
                .lock()
                .unwrap()
                .get(token)
                .copied()
                .unwrap_or(0)
        }
    }

    impl TokenReviewer for FakeReviewer {
        fn review<'a>(
            &'a self,
            token: &'a str,
            _audiences: &'a [String],
        ) -> BoxFuture<'a, Result<ReviewOutcome, String>> {
            Box::pin(async move {
                self.reviews.fetch_add(1, Ordering::SeqCst);
                *self
                    .per_token
                    .lock()
                    .unwrap()
                    .entry(token.to_string())
                    .or_default() += 1;
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_in_flight.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                if self.down.load(Ordering::SeqCst) {
                    return Err("connection refused".into());
                }
                Ok(match self.users.get(token) {
                    Some((name, groups, audiences)) => ReviewOutcome::Authenticated {
                        name: name.clone(),
                        uid: Some("uid-1".into()),
                        groups: groups.clone(),
                        extra: BTreeMap::new(),
                        audiences: audiences.clone(),
                    },
                    None => ReviewOutcome::Refused,
                })
            })
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn authenticator(reviewer: Arc<FakeReviewer>, settings: AuthnSettings) -> Authenticator {
        Authenticator::new(reviewer, settings)
    }

    const SA: &str = "system:serviceaccount:monitoring:prom";

    #[tokio::test]
    async fn token_user_gets_authenticated_group_and_is_cached() {
        let reviewer = Arc::new(FakeReviewer::with(&[(
            "good",
            SA,
            &[
                "system:serviceaccounts",
                "system:serviceaccounts:monitoring",
            ],
        )]));
        let a = authenticator(reviewer.clone(), AuthnSettings::default());
        let user = a.authenticate(None, &bearer("good")).await.unwrap();
        assert_eq!(user.name, SA);
        assert_eq!(user.method, AuthMethod::Token);
        assert_eq!(user.uid.as_deref(), Some("uid-1"));
        assert_eq!(
            user.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:monitoring",
                AUTHENTICATED_GROUP
            ]
        );
        a.authenticate(None, &bearer("good")).await.unwrap();
        assert_eq!(
            reviewer.count("good"),
            1,
            "the second request is served from cache"
        );
    }

    #[tokio::test]
    async fn refused_token_is_invalid_and_negatively_cached() {
        let reviewer = Arc::new(FakeReviewer::default());
        let a = authenticator(reviewer.clone(), AuthnSettings::default());
        for _ in 0..3 {
            assert_eq!(
                a.authenticate(None, &bearer("junk")).await,
                Err(AuthnError::Invalid)
            );
        }
        assert_eq!(reviewer.count("junk"), 1);
    }

    #[tokio::test]
    async fn failure_ttl_expires() {
        let reviewer = Arc::new(FakeReviewer::default());
        let settings = AuthnSettings {
            failure_ttl: Duration::from_millis(50),
            ..Default::default()
        };
        let a = authenticator(reviewer.clone(), settings);
        assert!(a.authenticate_token("junk").await.is_err());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(a.authenticate_token("junk").await.is_err());
        assert_eq!(reviewer.count("junk"), 2);
    }

    #[tokio::test]
    async fn api_down_is_unavailable_never_anonymous_and_not_cached() {
        let reviewer = Arc::new(FakeReviewer::with(&[("good", SA, &[])]));
        reviewer.down.store(true, Ordering::SeqCst);
        let a = authenticator(reviewer.clone(), AuthnSettings::default());
        let result = a.authenticate(None, &bearer("good")).await;
        assert!(
            matches!(result, Err(AuthnError::Unavailable(_))),
            "{result:?}"
        );
        reviewer.down.store(false, Ordering::SeqCst);
        let user = a.authenticate(None, &bearer("good")).await.unwrap();
        assert_eq!(user.name, SA, "a failed review is not cached");
        assert_eq!(reviewer.count("good"), 2);
    }

    #[tokio::test]
    async fn cached_tokens_stay_valid_while_the_api_is_down() {
        let reviewer = Arc::new(FakeReviewer::with(&[("good", SA, &[])]));
        let a = authenticator(reviewer.clone(), AuthnSettings::default());
        a.authenticate_token("good").await.unwrap();
        reviewer.down.store(true, Ordering::SeqCst);
        assert_eq!(a.authenticate_token("good").await.unwrap().name, SA);
    }

    #[tokio::test]
    async fn review_timeout_is_unavailable() {
        let reviewer = Arc::new(FakeReviewer {
            delay: Duration::from_millis(500),
            ..FakeReviewer::with(&[("good", SA, &[])])
        });
        let settings = AuthnSettings {
            review_timeout: Duration::from_millis(50),
            ..Default::default()
        };
        let a = authenticator(reviewer, settings);
        assert!(matches!(
            a.authenticate_token("good").await,
            Err(AuthnError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_review() {
        let reviewer = Arc::new(FakeReviewer {
            delay: Duration::from_millis(100),
            ..FakeReviewer::with(&[("good", SA, &[])])
        });
        let a = authenticator(reviewer.clone(), AuthnSettings::default());
        let results = futures::future::join_all((0..50).map(|_| {
            let a = a.clone();
            async move { a.authenticate(None, &bearer("good")).await }
        }))
        .await;
        assert!(results.iter().all(|r| r.as_ref().unwrap().name == SA));
        assert_eq!(reviewer.count("good"), 1);
        // Same for a refused token.
        let results = futures::future::join_all((0..50).map(|_| {
            let a = a.clone();
            async move { a.authenticate_token("junk").await }
        }))
        .await;
        assert!(results.iter().all(|r| *r == Err(AuthnError::Invalid)));
        assert_eq!(reviewer.count("junk"), 1);
    }

    #[tokio::test]
    async fn reviews_in_flight_are_capped() {
        let reviewer = Arc::new(FakeReviewer {
            delay: Duration::from_millis(20),
            ..FakeReviewer::default()
        });
        let settings = AuthnSettings {
            max_concurrent_reviews: 3,
            ..Default::default()
        };
        let a = authenticator(reviewer.clone(), settings);
        futures::future::join_all((0..40).map(|i| {
            let a = a.clone();
            async move { a.authenticate_token(&format!("junk-{i}")).await }
        }))
        .await;
        assert_eq!(reviewer.reviews.load(Ordering::SeqCst), 40);
        assert_eq!(reviewer.max_in_flight.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn junk_flood_does_not_evict_good_tokens() {
        let reviewer = Arc::new(FakeReviewer::with(&[("good", SA, &[])]));
        let settings = AuthnSettings {
            success_capacity: 8,
            failure_capacity: 8,
            review_rate: 0,
            ..Default::default()
        };
        let a = authenticator(reviewer.clone(), settings);
        a.authenticate_token("good").await.unwrap();
        for i in 0..2000 {
            let _ = a.authenticate_token(&format!("junk-{i}")).await;
        }
        a.inner.authenticated.run_pending_tasks().await;
        reviewer.down.store(true, Ordering::SeqCst);
        assert_eq!(a.authenticate_token("good").await.unwrap().name, SA);
        assert_eq!(reviewer.count("good"), 1);
    }

    #[tokio::test]
    async fn audiences_must_match() {
        let reviewer = Arc::new(FakeReviewer::with(&[("good", SA, &[])]));
        let settings = AuthnSettings {
            audiences: parse_audiences(" nodegate , other,"),
            ..Default::default()
        };
        assert_eq!(settings.audiences, ["nodegate", "other"]);
        let a = authenticator(reviewer, settings);
        assert_eq!(
            a.authenticate_token("good").await,
            Err(AuthnError::Invalid),
            "the fake's token is for the API server's audience only"
        );
    }

    #[tokio::test]
    async fn no_credential_is_anonymous() {
        let a = authenticator(Arc::new(FakeReviewer::default()), AuthnSettings::default());
        let user = a.authenticate(None, &HeaderMap::new()).await.unwrap();
        assert_eq!(user, UserInfo::anonymous());
        assert_eq!(user.groups, [UNAUTHENTICATED_GROUP]);
        assert!(!user.in_group(AUTHENTICATED_GROUP));
    }

    #[test]
    fn token_extraction() {
        assert_eq!(bearer_token(&HeaderMap::new()), Ok(None));
        assert_eq!(bearer_token(&bearer("abc")), Ok(Some("abc".into())));
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("bearer   abc "),
        );
        assert_eq!(
            bearer_token(&h),
            Ok(Some("abc".into())),
            "scheme is case-insensitive"
        );
        for bad in [
            "Basic YWxhZGRpbjpvcGVuc2VzYW1l",
            "Bearer",
            "Bearer  ",
            "abc",
        ] {
            let mut h = HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, HeaderValue::from_static(bad));
            assert!(
                matches!(bearer_token(&h), Err(AuthnError::Malformed(_))),
                "{bad:?}"
            );
        }
        let mut two = bearer("a");
        two.append(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer b"),
        );
        assert!(matches!(bearer_token(&two), Err(AuthnError::Malformed(_))));
    }

    fn websocket(protocols: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        );
        h.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(protocols).unwrap(),
        );
        h
    }

    #[test]
    fn websocket_subprotocol_token() {
        let encoded = URL_SAFE_NO_PAD.encode("my.jwt.token");
        let protocols = format!("v5.channel.k8s.io, {WEBSOCKET_TOKEN_PROTOCOL_PREFIX}{encoded}");
        assert_eq!(
            bearer_token(&websocket(&protocols)),
            Ok(Some("my.jwt.token".into()))
        );
        assert_eq!(
            strip_token_protocol(&protocols).as_deref(),
            Some("v5.channel.k8s.io")
        );
        // Not an upgrade: the protocol header means nothing.
        let mut plain = websocket(&protocols);
        plain.remove(http::header::UPGRADE);
        assert_eq!(bearer_token(&plain), Ok(None));
        // Undecodable or empty: invalid, not anonymous.
        for bad in ["!!!", ""] {
            let p = format!("{WEBSOCKET_TOKEN_PROTOCOL_PREFIX}{bad}");
            assert!(
                matches!(bearer_token(&websocket(&p)), Err(AuthnError::Malformed(_))),
                "{bad:?}"
            );
        }
        // Two tokens: ambiguous.
        let other = URL_SAFE_NO_PAD.encode("other");
        let p = format!(
            "{WEBSOCKET_TOKEN_PROTOCOL_PREFIX}{encoded},{WEBSOCKET_TOKEN_PROTOCOL_PREFIX}{other}"
        );
        assert!(matches!(
            bearer_token(&websocket(&p)),
            Err(AuthnError::Malformed(_))
        ));
        // Header and protocol disagree: ambiguous; agree: fine.
        let mut both = websocket(&protocols);
        both.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer something-else"),
        );
        assert!(matches!(bearer_token(&both), Err(AuthnError::Malformed(_))));
        both.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer my.jwt.token"),
        );
        assert_eq!(bearer_token(&both), Ok(Some("my.jwt.token".into())));
    }

    #[tokio::test]
    async fn websocket_token_is_reviewed() {
        let reviewer = Arc::new(FakeReviewer::with(&[("ws-token", SA, &[])]));
        let a = authenticator(reviewer, AuthnSettings::default());
        let p = format!(
            "{WEBSOCKET_TOKEN_PROTOCOL_PREFIX}{}",
            URL_SAFE_NO_PAD.encode("ws-token")
        );
        assert_eq!(a.authenticate(None, &websocket(&p)).await.unwrap().name, SA);
    }

    #[tokio::test]
    async fn x509_maps_cn_and_o_and_wins_over_a_token() {
        let ca = Ca::new("ca");
        let leaf = ca.client("alice", &["team-a"]);
        let reviewer = Arc::new(FakeReviewer::default());
        let settings = AuthnSettings {
            x509_enabled: true,
            ..Default::default()
        };
        let a = authenticator(reviewer.clone(), settings);
        let chain = [leaf.der.clone()];
        let user = a.authenticate(Some(&chain), &bearer("junk")).await.unwrap();
        assert_eq!(user.name, "alice");
        assert_eq!(user.method, AuthMethod::X509);
        assert_eq!(user.groups, ["team-a", AUTHENTICATED_GROUP]);
        assert_eq!(reviewer.reviews.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn certificate_without_cn_is_invalid() {
        let leaf = Ca::new("ca").client("", &["team-a"]);
        let settings = AuthnSettings {
            x509_enabled: true,
            ..Default::default()
        };
        let a = authenticator(Arc::new(FakeReviewer::default()), settings);
        let chain = [leaf.der.clone()];
        assert_eq!(
            a.authenticate(Some(&chain), &HeaderMap::new()).await,
            Err(AuthnError::BadCertificate("not exactly one common name"))
        );
        let garbage = [CertificateDer::from(vec![1u8, 2, 3])];
        assert_eq!(
            a.authenticate(Some(&garbage), &HeaderMap::new()).await,
            Err(AuthnError::BadCertificate("unreadable certificate"))
        );
    }

    #[tokio::test]
    async fn certificates_are_ignored_without_a_client_ca() {
        let leaf = Ca::new("ca").client("alice", &[]);
        let a = authenticator(Arc::new(FakeReviewer::default()), AuthnSettings::default());
        let chain = [leaf.der.clone()];
        let user = a
            .authenticate(Some(&chain), &HeaderMap::new())
            .await
            .unwrap();
        assert_eq!(user.method, AuthMethod::Anonymous);
    }

    proptest::proptest! {
        /// Whatever the headers, extraction never panics and never yields an empty token.
        #[test]
        fn extraction_never_yields_an_empty_token(
            auth in proptest::option::of("[ -~]{0,40}"),
            protocols in proptest::option::of("[ -~]{0,80}"),
            upgrade in proptest::bool::ANY,
        ) {
            let mut h = HeaderMap::new();
            if let Some(a) = auth.as_deref().and_then(|a| HeaderValue::from_str(a).ok()) {
                h.insert(http::header::AUTHORIZATION, a);
            }
            if let Some(p) = protocols.as_deref().and_then(|p| HeaderValue::from_str(p).ok()) {
                h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, p);
            }
            if upgrade {
                h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
            }
            if let Ok(Some(token)) = bearer_token(&h) {
                proptest::prop_assert!(!token.is_empty());
                proptest::prop_assert!(!token.starts_with(' ') && !token.ends_with(' '));
            }
            if auth.is_none() && !upgrade {
                proptest::prop_assert_eq!(bearer_token(&h), Ok(None));
            }
        }
    }

    #[tokio::test]
    async fn cache_sizes_are_reported() {
        let reviewer = Arc::new(FakeReviewer::with(&[("good", SA, &[])]));
        let a = authenticator(reviewer, AuthnSettings::default());
        a.authenticate_token("good").await.unwrap();
        let _ = a.authenticate_token("junk").await;
        a.inner.authenticated.run_pending_tasks().await;
        a.inner.refused.run_pending_tasks().await;
        assert_eq!(a.cached_tokens(), (1, 1));
    }

    /// An unsigned JWT-shaped token with these claims (the signature is junk: only the API
    /// server checks it).
    fn jwt(claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"k"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header}.{payload}.c2lnbmF0dXJl")
    }

    #[test]
    fn local_checks_refuse_what_cannot_be_a_token_and_pass_the_rest() {
        let now = 1_800_000_000;
        let ok = |t: &str| assert_eq!(check_token_locally(t, now), Ok(()), "{t:?}");
        let malformed = |t: &str| {
            assert!(
                matches!(check_token_locally(t, now), Err(AuthnError::Malformed(_))),
                "{t:?}: {:?}",
                check_token_locally(t, now)
            )
        };
        // Opaque tokens are for the API server to judge.
        ok("abcdef.0123456789abcdef"); // bootstrap token
        ok("static-token_with~all+token68/chars==");
        ok("junk-1-abc");
        ok(&"a".repeat(MAX_TOKEN_BYTES));
        malformed(&"a".repeat(MAX_TOKEN_BYTES + 1));
        for bad in [
            "with space",
            "quote\"",
            "comma,",
            "semi;colon",
            "=",
            "==abc",
            "ümlaut",
            "a=b",
        ] {
            malformed(bad);
        }
        // JWTs: valid, no exp (legacy service-account secrets), within the skew.
        ok(&jwt(json!({"exp": now + 3600, "nbf": now - 10})));
        ok(&jwt(json!({"sub": "legacy"})));
        ok(&jwt(json!({"exp": now - 59, "nbf": now + 59})));
        ok(&jwt(json!({"exp": (now + 3600) as f64 + 0.5})));
        assert_eq!(
            check_token_locally(&jwt(json!({"exp": now - 61})), now),
            Err(AuthnError::Expired)
        );
        assert_eq!(
            check_token_locally(&jwt(json!({"nbf": now + 61})), now),
            Err(AuthnError::NotYetValid)
        );
        // JWT-shaped junk: refused without a review.
        malformed("abc.def.ghi");
        malformed(&format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("[1]")));
        malformed(&format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode("[1,2]")));
        malformed(&format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode("not json")));
        malformed(&jwt(json!({"exp": "tomorrow"})));
        malformed(&jwt(json!({"nbf": null})));
        // Three segments with characters outside base64url: not JWT-shaped, reviewed.
        ok("a+b.c/d.e~f");
        ok("e30.e30.sig");
    }

    #[tokio::test]
    async fn locally_refused_tokens_send_no_review_even_when_cached() {
        let expired = jwt(json!({"exp": unix_now() - 120}));
        let garbage = "abc.def.ghi";
        let reviewer = Arc::new(FakeReviewer::with(&[
            (expired.as_str(), SA, &[]),
            (garbage, SA, &[]),
        ]));
        let a = authenticator(reviewer.clone(), AuthnSettings::default());
        assert_eq!(
            a.authenticate(None, &bearer(&expired)).await,
            Err(AuthnError::Expired)
        );
        assert!(matches!(
            a.authenticate(None, &bearer(garbage)).await,
            Err(AuthnError::Malformed(_))
        ));
        assert_eq!(reviewer.reviews.load(Ordering::SeqCst), 0);
        // A token cached as authenticated is refused once it has expired.
        let key: TokenKey = Sha256::digest(expired.as_bytes()).into();
        a.inner
            .authenticated
            .insert(
                key,
                Arc::new(UserInfo {
                    name: SA.into(),
                    ..UserInfo::anonymous()
                }),
            )
            .await;
        assert_eq!(
            a.authenticate_token(&expired).await,
            Err(AuthnError::Expired)
        );
    }

    #[tokio::test]
    async fn one_connection_has_at_most_one_review_at_a_time() {
        let reviewer = Arc::new(FakeReviewer {
            delay: Duration::from_millis(100),
            ..FakeReviewer::default()
        });
        let a = authenticator(
            reviewer.clone(),
            AuthnSettings {
                review_rate: 0,
                ..Default::default()
            },
        );
        let connection = ConnectionBudget::new();
        let results = futures::future::join_all((0..8).map(|i| {
            let (a, connection) = (a.clone(), connection.clone());
            async move {
                a.authenticate_token_on(&connection, &format!("junk-{i}"))
                    .await
            }
        }))
        .await;
        assert!(results.iter().all(|r| *r == Err(AuthnError::Invalid)));
        assert_eq!(reviewer.max_in_flight.load(Ordering::SeqCst), 1);
        // Eight connections: eight reviews at once.
        reviewer.max_in_flight.store(0, Ordering::SeqCst);
        futures::future::join_all((0..8).map(|i| {
            let a = a.clone();
            async move { a.authenticate_token(&format!("other-{i}")).await }
        }))
        .await;
        assert_eq!(reviewer.max_in_flight.load(Ordering::SeqCst), 8);
    }

    #[tokio::test]
    async fn connections_from_one_address_share_its_review_budget() {
        let reviewer = Arc::new(FakeReviewer {
            delay: Duration::from_millis(100),
            ..FakeReviewer::default()
        });
        let a = authenticator(
            reviewer.clone(),
            AuthnSettings {
                max_reviews_per_peer: 2,
                review_rate: 0,
                ..Default::default()
            },
        );
        let attacker: std::net::IpAddr = "10.0.0.66".parse().unwrap();
        let run = |ip: std::net::IpAddr, n: usize, prefix: &'static str| {
            let a = a.clone();
            futures::future::join_all((0..n).map(move |i| {
                let (a, budget) = (a.clone(), a.connection(ip));
                async move {
                    a.authenticate_token_on(&budget, &format!("{prefix}-{i}"))
                        .await
                }
            }))
        };
        // Eight connections from one address: two reviews at a time.
        let results = run(attacker, 8, "a").await;
        assert!(results.iter().all(|r| *r == Err(AuthnError::Invalid)));
        assert_eq!(reviewer.max_in_flight.load(Ordering::SeqCst), 2);
        // The same address as IPv4-mapped IPv6 is the same peer.
        reviewer.max_in_flight.store(0, Ordering::SeqCst);
        let mapped: std::net::IpAddr = "::ffff:10.0.0.66".parse().unwrap();
        let (x, y) = tokio::join!(run(attacker, 4, "b"), run(mapped, 4, "c"));
        assert_eq!(x.len() + y.len(), 8);
        assert_eq!(reviewer.max_in_flight.load(Ordering::SeqCst), 2);
        // Another address is not held up by them.
        reviewer.max_in_flight.store(0, Ordering::SeqCst);
        let other: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        let (x, y) = tokio::join!(run(attacker, 4, "d"), run(other, 4, "e"));
        assert_eq!(x.len() + y.len(), 8);
        assert_eq!(reviewer.max_in_flight.load(Ordering::SeqCst), 4);
        // Budgets of closed connections are swept.
        for i in 0..200u8 {
            drop(a.connection(std::net::IpAddr::from([10, 1, 0, i])));
        }
        assert!(a.inner.peers.lock().unwrap().budgets.len() <= 130);
    }

    #[tokio::test]
    async fn the_wait_is_bounded_apart_from_the_review() {
        let reviewer = Arc::new(FakeReviewer {
            delay: Duration::from_millis(300),
            ..FakeReviewer::with(&[("good", SA, &[]), ("good-2", SA, &[])])
        });
        let settings = AuthnSettings {
            max_concurrent_reviews: 1,
            review_wait: Duration::from_millis(50),
            review_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let a = authenticator(reviewer.clone(), settings);
        // A review longer than the wait is fine: the wait ends when the review starts.
        let (first, second) = tokio::join!(a.authenticate_token("good"), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            a.authenticate_token("good-2").await
        });
        assert_eq!(first.unwrap().name, SA);
        // The only slot was taken for longer than the wait: refused, nothing sent, not cached.
        assert_eq!(second, Err(AuthnError::Busy("every review slot is taken")));
        assert_eq!(reviewer.count("good-2"), 0);
        assert_eq!(a.authenticate_token("good-2").await.unwrap().name, SA);
        // Same connection, its review still running past the wait.
        let connection = ConnectionBudget::new();
        let (first, second) = tokio::join!(a.authenticate_token_on(&connection, "junk-a"), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            a.authenticate_token_on(&connection, "junk-b").await
        });
        assert_eq!(first, Err(AuthnError::Invalid));
        assert_eq!(
            second,
            Err(AuthnError::Busy(
                "this connection's review is still running"
            ))
        );
        assert_eq!(reviewer.count("junk-b"), 0);
    }

    #[tokio::test]
    async fn reviews_started_are_bounded_by_the_rate() {
        let reviewer = Arc::new(FakeReviewer::default());
        let settings = AuthnSettings {
            review_rate: 10,
            review_burst: 2,
            review_wait: Duration::from_millis(150),
            ..Default::default()
        };
        let a = authenticator(reviewer.clone(), settings);
        let results = futures::future::join_all((0..20).map(|i| {
            let a = a.clone();
            async move { a.authenticate_token(&format!("junk-{i}")).await }
        }))
        .await;
        // burst + 1 at once, then one every 100 ms: at most 4 start within 150 ms.
        let sent = reviewer.reviews.load(Ordering::SeqCst);
        assert!((3..=4).contains(&sent), "{sent} reviews");
        assert_eq!(
            results
                .iter()
                .filter(|r| **r == Err(AuthnError::Busy("the review rate is exhausted")))
                .count(),
            20 - sent
        );
    }

    #[test]
    fn gcra_lets_a_burst_through_then_paces() {
        let t0 = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        let mut tat = None;
        let mut starts = vec![];
        for _ in 0..5 {
            let (start, next) = gcra(tat, t0, ms(100), 2);
            starts.push(start - t0);
            tat = Some(next);
        }
        assert_eq!(starts, [ms(0), ms(0), ms(0), ms(100), ms(200)]);
        // Idle long enough, the burst is back.
        let later = t0 + ms(10_000);
        assert_eq!(gcra(tat, later, ms(100), 2).0, later);
    }

    #[test]
    fn causes_are_distinct_labels() {
        let all = [
            AuthnError::Invalid,
            AuthnError::Malformed("x"),
            AuthnError::Expired,
            AuthnError::NotYetValid,
            AuthnError::BadCertificate("x"),
            AuthnError::Busy("x"),
            AuthnError::Unavailable("x".into()),
        ];
        let causes: std::collections::BTreeSet<_> = all.iter().map(AuthnError::cause).collect();
        assert_eq!(causes.len(), all.len());
        assert_eq!(AuthnError::BadCertificate("x").method(), "x509");
        assert_eq!(AuthnError::Expired.method(), "token");
    }

    #[test]
    fn hash_prefix_is_short_hex() {
        let key: TokenKey = Sha256::digest(b"secret").into();
        let p = hash_prefix(&key);
        assert_eq!(p.len(), 8);
        assert!(!p.contains("secret"));
    }
}
