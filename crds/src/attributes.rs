//! Request attributes: what a kubelet API request asks for, derived once from the raw request.
//!
//! The path is percent-decoded and dot-segment-normalised here, exactly once, and every later
//! stage (authorization, routing, the upstream request) works on the result, so what is
//! authorized is what is forwarded. Targets that different servers could read differently are
//! rejected before any decision is made.

use crate::catalogue::{CATALOGUE, Endpoint, EndpointSpec, Subresource, Verb};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

/// Longest request target (path and query) accepted, in bytes.
pub const MAX_TARGET_LEN: usize = 4096;

/// Why a request target was refused before any authorization decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("request target is longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
    #[error("request target must be an absolute path")]
    NotAbsolutePath,
    #[error("invalid percent-encoding in path")]
    BadEncoding,
    #[error("encoded slash or backslash in path")]
    EncodedSlash,
    #[error("backslash in path")]
    Backslash,
    #[error("control character or NUL in request target")]
    ControlCharacter,
    #[error("non-ASCII byte in request target")]
    NotAscii,
    #[error("path is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("`;` path parameters are not allowed")]
    PathParameter,
    #[error("fragment in request target")]
    Fragment,
    #[error("empty path segment (`//`)")]
    EmptySegment,
    #[error("`..` escapes the root of the path")]
    EscapesRoot,
    #[error("unsupported upgrade protocol {0:?}")]
    UnsupportedUpgrade(String),
    #[error("{0} does not accept protocol upgrades")]
    UpgradeNotAllowed(String),
    #[error("method {method} is not allowed on {endpoint}")]
    MethodNotAllowed { method: String, endpoint: Endpoint },
}

impl Rejection {
    /// The HTTP status the agent answers with.
    pub fn status(&self) -> u16 {
        match self {
            Rejection::TooLong => 414,
            Rejection::MethodNotAllowed { .. } => 405,
            _ => 400,
        }
    }
}

/// A protocol a streaming request upgrades to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    Spdy31,
    WebSocket,
}

/// The catalogue endpoint a path matched, with the values of its `{…}` segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub endpoint: Endpoint,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub uid: Option<String>,
    pub container: Option<String>,
    /// What a `{name*}` pattern matched (the log file of `/logs/…`, the profile of pprof).
    pub rest: Option<String>,
}

/// Everything authorization, routing and filtering need to know about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAttributes {
    pub method: String,
    /// The decoded, normalised path.
    pub path: String,
    /// The raw query string, without the `?`.
    pub query: Option<String>,
    /// `None` for methods the kubelet gives no verb (HEAD, OPTIONS, …): never authorized.
    pub verb: Option<Verb>,
    /// The kubelet's authorization subresources for this path, in the order it tries them.
    pub subresources: Vec<Subresource>,
    /// `None` when no catalogue endpoint serves the path.
    pub route: Option<Route>,
    pub upgrade: Option<Upgrade>,
}

/// Bytes re-encoded in a path segment sent upstream: everything a server could read as
/// structure (`/`, `?`, `#`, `;`, `%`, `\\`) or that is not a plain visible ASCII character.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b';')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

impl RequestAttributes {
    /// The request target to send upstream: the normalised path, re-encoded, and the query.
    /// Parsing it again yields these same attributes, so the kubelet is asked for exactly what
    /// was authorized (re-encoding can lengthen it: a target near the length limit may come out
    /// longer than `request_attributes` accepts, which is harmless, as it is never parsed again).
    pub fn upstream_target(&self) -> String {
        let mut target = String::with_capacity(self.path.len() + 16);
        let segments: Vec<&str> = self.path[1..].split('/').collect();
        for segment in segments {
            target.push('/');
            target.extend(utf8_percent_encode(segment, SEGMENT));
        }
        if let Some(query) = &self.query {
            target.push('?');
            target.push_str(query);
        }
        target
    }
}

/// Path prefixes the kubelet serves streaming handlers under.
pub const STREAMING_PREFIXES: [&str; 4] = ["/exec", "/attach", "/portForward", "/run"];

/// Derives the attributes of a request from its method, raw request target and `Upgrade`
/// header (pass it only when `Connection` names `upgrade`).
///
/// Mirrors the kubelet's `GetRequestAttributes` with one deliberate difference: requests to
/// streaming endpoints (exec, attach, portForward, run) are authorized as `create` whatever their
/// HTTP method, because the kubelet's `get` for a WebSocket upgrade lets read-only grants exec.
pub fn request_attributes(
    method: &str,
    target: &str,
    upgrade: Option<&str>,
) -> Result<RequestAttributes, Rejection> {
    let (path, query) = normalise_target(target)?;
    let upgrade = upgrade.map(parse_upgrade).transpose()?;
    let route = match_route(&path);
    if let Some(route) = &route {
        let spec = route.endpoint.spec();
        if !spec.methods.contains(&method) {
            return Err(Rejection::MethodNotAllowed {
                method: method.to_string(),
                endpoint: route.endpoint,
            });
        }
    }
    // Streaming is decided by the path prefix, not by the exact route: anything under
    // `/exec`, `/attach`, `/portForward` or `/run` (extra segments, a trailing slash) is `create`
    // even when no route matches, so no future fallback can turn a WebSocket GET into `get`.
    let streaming = route.as_ref().is_some_and(|r| r.endpoint.spec().streaming)
        || STREAMING_PREFIXES.iter().any(|p| is_subpath(&path, p));
    if upgrade.is_some() && !streaming {
        return Err(Rejection::UpgradeNotAllowed(path));
    }
    let verb = if streaming {
        Some(Verb::Create)
    } else {
        Verb::from_method(method)
    };
    // A component's endpoint is no kubelet path: no kubelet subresource is checked for it.
    let subresources = match &route {
        Some(r) if r.endpoint.component().is_some() => Vec::new(),
        _ => kubelet_subresources(&path),
    };
    Ok(RequestAttributes {
        method: method.to_string(),
        subresources,
        path,
        query,
        verb,
        route,
        upgrade,
    })
}

/// The kubelet's subresources for a path, as kubelet 1.37 checks them (`auth.go`, with
/// KubeletFineGrainedAuthz on by default): `pods`, `healthz` and `configz` first with `proxy` as
/// the fallback; `statusz` and `flagz` (as `configz`) without fallback; `stats`, `metrics`,
/// `log` and `checkpoint` for their subtrees; else `proxy`. `nodegate-tests`' `kubelet_attributes`
/// test checks this against a real kubelet's 403 answers.
pub fn kubelet_subresources(path: &str) -> Vec<Subresource> {
    let fine_grained_with_fallback = [
        ("/pods", Subresource::Pods),
        ("/healthz", Subresource::Healthz),
        ("/configz", Subresource::Configz),
        ("/runningpods/", Subresource::Pods),
    ];
    if let Some((_, s)) = fine_grained_with_fallback
        .iter()
        .find(|(p, _)| is_subpath(path, p))
    {
        return vec![*s, Subresource::Proxy];
    }
    let single = [
        ("/statusz", Subresource::Statusz),
        ("/flagz", Subresource::Configz),
        ("/stats", Subresource::Stats),
        ("/metrics", Subresource::Metrics),
        ("/logs", Subresource::Log),
        ("/checkpoint", Subresource::Checkpoint),
    ];
    match single.iter().find(|(p, _)| is_subpath(path, p)) {
        Some((_, s)) => vec![*s],
        None => vec![Subresource::Proxy],
    }
}

/// The kubelet's `isSubpath`: `path` itself, or below it at a `/` boundary (`/podsx` is not
/// below `/pods`; `/pods/` is).
fn is_subpath(subpath: &str, path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    subpath == path
        || (subpath.starts_with(path) && subpath.as_bytes().get(path.len()) == Some(&b'/'))
}

fn parse_upgrade(value: &str) -> Result<Upgrade, Rejection> {
    match value.trim() {
        v if v.eq_ignore_ascii_case("SPDY/3.1") => Ok(Upgrade::Spdy31),
        v if v.eq_ignore_ascii_case("websocket") => Ok(Upgrade::WebSocket),
        other => Err(Rejection::UnsupportedUpgrade(other.to_string())),
    }
}

/// Splits a raw origin-form target into its decoded, dot-segment-normalised path and raw query.
pub fn normalise_target(target: &str) -> Result<(String, Option<String>), Rejection> {
    if target.len() > MAX_TARGET_LEN {
        return Err(Rejection::TooLong);
    }
    for b in target.bytes() {
        if b < 0x20 || b == 0x7f {
            return Err(Rejection::ControlCharacter);
        }
        if !b.is_ascii() {
            return Err(Rejection::NotAscii);
        }
    }
    if !target.starts_with('/') {
        return Err(Rejection::NotAbsolutePath);
    }
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    if target.contains('#') {
        return Err(Rejection::Fragment);
    }
    if raw_path.contains(';') {
        return Err(Rejection::PathParameter);
    }
    if raw_path.contains('\\') {
        return Err(Rejection::Backslash);
    }
    let decoded = percent_decode(raw_path)?;
    remove_dot_segments(&decoded).map(|path| (path, query.filter(|q| !q.is_empty())))
}

fn percent_decode(raw: &str) -> Result<String, Rejection> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or(Rejection::BadEncoding)?;
        let hex = std::str::from_utf8(hex).map_err(|_| Rejection::BadEncoding)?;
        let value = u8::from_str_radix(hex, 16).map_err(|_| Rejection::BadEncoding)?;
        match value {
            b'/' | b'\\' => return Err(Rejection::EncodedSlash),
            b';' => return Err(Rejection::PathParameter),
            v if v < 0x20 || v == 0x7f => return Err(Rejection::ControlCharacter),
            v => out.push(v),
        }
        i += 3;
    }
    String::from_utf8(out).map_err(|_| Rejection::NotUtf8)
}

/// RFC 3986 dot-segment removal on a decoded absolute path; `..` above the root and empty
/// interior segments are ambiguous and refused. A trailing slash (or a trailing `.`/`..`) is
/// kept as a trailing slash, since the kubelet routes `/pods` and `/runningpods/` differently.
fn remove_dot_segments(path: &str) -> Result<String, Rejection> {
    let mut segments: Vec<&str> = Vec::new();
    let raw: Vec<&str> = path[1..].split('/').collect();
    let last = raw.len() - 1;
    let mut trailing_slash = false;
    for (i, segment) in raw.iter().enumerate() {
        match *segment {
            "" if i == last => trailing_slash = !segments.is_empty(),
            "" => return Err(Rejection::EmptySegment),
            "." => trailing_slash = i == last,
            ".." => {
                segments.pop().ok_or(Rejection::EscapesRoot)?;
                trailing_slash = i == last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Finds the catalogue endpoint serving a normalised path.
pub fn match_route(path: &str) -> Option<Route> {
    CATALOGUE.iter().find_map(|spec| {
        spec.patterns
            .iter()
            .find_map(|p| match_pattern(spec, p, path))
    })
}

fn match_pattern(spec: &EndpointSpec, pattern: &str, path: &str) -> Option<Route> {
    let mut route = Route {
        endpoint: spec.endpoint,
        namespace: None,
        pod: None,
        uid: None,
        container: None,
        rest: None,
    };
    let mut want = pattern[1..].split('/');
    let mut have = path[1..].split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(route),
            // A rest pattern needs the slash before it: `/logs/{path*}` matches `/logs/` but
            // not `/logs`.
            (Some(p), Some(first)) if p.starts_with('{') && p.ends_with("*}") => {
                let rest: Vec<&str> = std::iter::once(first).chain(have).collect();
                route.rest = Some(rest.join("/"));
                return Some(route);
            }
            (Some(p), Some(s)) if p.starts_with('{') => {
                if s.is_empty() {
                    return None;
                }
                let value = Some(s.to_string());
                match p {
                    "{namespace}" => route.namespace = value,
                    "{pod}" => route.pod = value,
                    "{uid}" => route.uid = value,
                    "{container}" => route.container = value,
                    _ => {}
                }
            }
            (Some(p), Some(s)) if p == s => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Subresource::*;

    fn attrs(method: &str, target: &str) -> Result<RequestAttributes, Rejection> {
        request_attributes(method, target, None)
    }

    fn endpoint(method: &str, target: &str) -> Option<Endpoint> {
        attrs(method, target).unwrap().route.map(|r| r.endpoint)
    }

    /// Every route × every method: served methods get the catalogue's subresources and verbs,
    /// other methods are refused with 405, and the catalogue agrees with the kubelet's rules.
    #[test]
    fn every_route_and_method() {
        let examples: &[(&str, Endpoint)] = &[
            ("/healthz", Endpoint::Healthz),
            ("/healthz/ping", Endpoint::Healthz),
            ("/healthz/", Endpoint::Healthz),
            ("/pods", Endpoint::Pods),
            ("/runningpods/", Endpoint::RunningPods),
            ("/stats/summary", Endpoint::Stats),
            ("/metrics", Endpoint::Metrics),
            ("/metrics/cadvisor", Endpoint::Cadvisor),
            ("/metrics/resource", Endpoint::Resource),
            ("/metrics/resource/v1alpha1", Endpoint::Resource),
            ("/metrics/probes", Endpoint::Probes),
            ("/metrics/slis", Endpoint::Slis),
            ("/configz", Endpoint::Configz),
            ("/statusz", Endpoint::Statusz),
            ("/flagz", Endpoint::Flagz),
            ("/logs/", Endpoint::Logs),
            ("/logs/syslog", Endpoint::Logs),
            ("/logs/pods/x.log", Endpoint::Logs),
            ("/containerLogs/ns/p/c", Endpoint::ContainerLogs),
            ("/exec/ns/p/c", Endpoint::Exec),
            ("/exec/ns/p/uid/c", Endpoint::Exec),
            ("/attach/ns/p/c", Endpoint::Attach),
            ("/attach/ns/p/uid/c", Endpoint::Attach),
            ("/portForward/ns/p", Endpoint::PortForward),
            ("/portForward/ns/p/uid", Endpoint::PortForward),
            ("/run/ns/p/c", Endpoint::Run),
            ("/run/ns/p/uid/c", Endpoint::Run),
            ("/checkpoint/ns/p/c", Endpoint::Checkpoint),
            ("/debug/pprof/", Endpoint::Pprof),
            ("/debug/pprof/heap", Endpoint::Pprof),
            ("/debug/flags/v", Endpoint::DebugFlags),
            ("/components/kube-proxy/metrics", Endpoint::KubeProxyMetrics),
            (
                "/components/kube-proxy/metrics/slis",
                Endpoint::KubeProxySlis,
            ),
            ("/components/kube-proxy/healthz", Endpoint::KubeProxyHealth),
            ("/components/kube-proxy/livez", Endpoint::KubeProxyHealth),
            (
                "/components/kube-controller-manager/metrics",
                Endpoint::ControllerManagerMetrics,
            ),
            (
                "/components/kube-controller-manager/metrics/slis",
                Endpoint::ControllerManagerSlis,
            ),
            (
                "/components/kube-controller-manager/healthz",
                Endpoint::ControllerManagerHealth,
            ),
            (
                "/components/kube-scheduler/metrics",
                Endpoint::SchedulerMetrics,
            ),
            (
                "/components/kube-scheduler/metrics/slis",
                Endpoint::SchedulerSlis,
            ),
            (
                "/components/kube-scheduler/readyz",
                Endpoint::SchedulerHealth,
            ),
            ("/components/etcd/metrics", Endpoint::EtcdMetrics),
            ("/components/etcd/health", Endpoint::EtcdHealth),
        ];
        // Kubelets removed `/spec/` in 1.21 and nodegate does not serve it either.
        assert_eq!(match_route("/spec/"), None);
        assert_eq!(match_route("/spec"), None);
        for e in Endpoint::all() {
            assert!(examples.iter().any(|(_, x)| *x == e), "no example for {e}");
        }
        let methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
        for (path, want) in examples {
            let spec = want.spec();
            for method in methods {
                let got = attrs(method, path);
                if !spec.methods.contains(&method) {
                    assert_eq!(
                        got,
                        Err(Rejection::MethodNotAllowed {
                            method: method.into(),
                            endpoint: *want
                        }),
                        "{method} {path}"
                    );
                    continue;
                }
                let got = got.unwrap();
                assert_eq!(
                    got.route.as_ref().map(|r| r.endpoint),
                    Some(*want),
                    "{path}"
                );
                assert_eq!(got.subresources, spec.subresources, "{method} {path}");
                let verb = if spec.streaming {
                    Verb::Create
                } else {
                    Verb::from_method(method).unwrap()
                };
                assert_eq!(got.verb, Some(verb), "{method} {path}");
                assert!(want.verbs().contains(&verb), "{method} {path}");
            }
        }
    }

    #[test]
    fn kubelet_subresource_rules() {
        let cases: &[(&str, &[Subresource])] = &[
            ("/pods", &[Pods, Proxy]),
            ("/pods/", &[Pods, Proxy]),
            ("/podsx", &[Proxy]),
            ("/runningpods/", &[Pods, Proxy]),
            ("/runningpods", &[Pods, Proxy]),
            ("/healthz/syncloop", &[Healthz, Proxy]),
            ("/healthzx", &[Proxy]),
            ("/configz", &[Configz, Proxy]),
            ("/statusz", &[Statusz]),
            ("/flagz", &[Configz]),
            ("/flagzx", &[Proxy]),
            ("/stats/summary", &[Stats]),
            ("/stats", &[Stats]),
            ("/statsx", &[Proxy]),
            ("/metrics/cadvisor", &[Metrics]),
            ("/metricsx", &[Proxy]),
            ("/logs/", &[Log]),
            ("/checkpoint/a/b/c", &[Checkpoint]),
            ("/exec/a/b/c", &[Proxy]),
            ("/", &[Proxy]),
        ];
        for (path, want) in cases {
            assert_eq!(kubelet_subresources(path), *want, "{path}");
        }
    }

    #[test]
    fn near_misses_match_no_endpoint() {
        for path in [
            "/podsx",
            "/pods/",
            "/pods/x",
            "/Pods",
            "/runningpods",
            "/stats/summaryx",
            "/stats/",
            "/metrics/",
            "/metrics/cadvisorx",
            "/metrics/resource/v1beta1",
            "/logs",
            "/containerLogs/ns/p",
            "/containerLogs/ns/p/c/x",
            "/exec/ns/p",
            "/exec/ns/p/u/c/x",
            "/portforward/ns/p",
            "/debug/flags/x",
            "/",
        ] {
            let got = attrs("GET", path).unwrap();
            assert_eq!(got.route, None, "{path}");
        }
        // Unknown paths still get the kubelet's attributes, so they are denied by the same rules.
        assert_eq!(attrs("GET", "/podsx").unwrap().subresources, vec![Proxy]);
        assert_eq!(
            attrs("GET", "/pods/").unwrap().subresources,
            vec![Pods, Proxy]
        );
    }

    #[test]
    fn dot_segments_are_resolved_before_any_decision() {
        let a = attrs("POST", "/metrics/../exec/ns/p/c").unwrap();
        assert_eq!(a.path, "/exec/ns/p/c");
        assert_eq!(a.route.as_ref().unwrap().endpoint, Endpoint::Exec);
        assert_eq!(a.subresources, vec![Proxy]);
        assert_eq!(a.verb, Some(Verb::Create));

        let a = attrs("GET", "/healthz/../configz").unwrap();
        assert_eq!(a.path, "/configz");
        assert_eq!(a.subresources, vec![Configz, Proxy]);
        assert_eq!(
            endpoint("GET", "/healthz/../configz"),
            Some(Endpoint::Configz)
        );

        for (target, path) in [
            ("/metrics/%2e%2e/exec/ns/p/c", "/exec/ns/p/c"),
            ("/metrics/%2E%2E/configz", "/configz"),
            ("/metrics/.%2e/configz", "/configz"),
            ("/./pods", "/pods"),
            ("/pods/.", "/pods/"),
            ("/stats/summary/..", "/stats/"),
            ("/metrics/cadvisor/../..", "/"),
            ("/%70ods", "/pods"),
        ] {
            assert_eq!(attrs("GET", target).unwrap().path, path, "{target}");
        }
        // Decoding happens once: a double-encoded dot stays a literal segment.
        let a = attrs("GET", "/metrics/%252e%252e/configz").unwrap();
        assert_eq!(a.path, "/metrics/%2e%2e/configz");
        assert_eq!(a.route, None);
        assert_eq!(a.subresources, vec![Metrics]);
    }

    #[test]
    fn ambiguous_targets_are_rejected() {
        let long = format!("/pods?{}", "a".repeat(MAX_TARGET_LEN));
        let cases: &[(&str, Rejection)] = &[
            ("/logs/../../etc/shadow", Rejection::EscapesRoot),
            ("/..", Rejection::EscapesRoot),
            ("/logs/%2e%2e/%2e%2e/etc/shadow", Rejection::EscapesRoot),
            ("/exec%2Fns/p/c", Rejection::EncodedSlash),
            ("/logs/a%2fb", Rejection::EncodedSlash),
            ("/logs/a%5cb", Rejection::EncodedSlash),
            ("/logs/a\\b", Rejection::Backslash),
            ("//exec/ns/p/c", Rejection::EmptySegment),
            ("/exec//ns/p/c", Rejection::EmptySegment),
            ("/exec;x/ns/p/c", Rejection::PathParameter),
            ("/pods;jsessionid=1", Rejection::PathParameter),
            ("/exec%3bx/ns/p/c", Rejection::PathParameter),
            ("/pods%00", Rejection::ControlCharacter),
            ("/pods\0", Rejection::ControlCharacter),
            ("/pods\t", Rejection::ControlCharacter),
            ("/logs/%ff", Rejection::NotUtf8),
            ("/logs/%c3%28", Rejection::NotUtf8),
            ("/logs/é", Rejection::NotAscii),
            ("/pods%", Rejection::BadEncoding),
            ("/pods%2", Rejection::BadEncoding),
            ("/pods%zz", Rejection::BadEncoding),
            ("/pods#x", Rejection::Fragment),
            ("pods", Rejection::NotAbsolutePath),
            ("*", Rejection::NotAbsolutePath),
            ("http://evil/pods", Rejection::NotAbsolutePath),
            ("", Rejection::NotAbsolutePath),
            (&long, Rejection::TooLong),
        ];
        for (target, want) in cases {
            assert_eq!(attrs("GET", target), Err(want.clone()), "{target:?}");
        }
        assert_eq!(Rejection::TooLong.status(), 414);
        assert_eq!(Rejection::EscapesRoot.status(), 400);
        // 4 KiB exactly is still accepted.
        let edge = format!("/pods?{}", "a".repeat(MAX_TARGET_LEN - 6));
        assert!(attrs("GET", &edge).is_ok());
    }

    #[test]
    fn query_is_kept_raw_and_separate() {
        let a = attrs("GET", "/containerLogs/ns/p/c?follow=true&tailLines=10").unwrap();
        assert_eq!(a.query.as_deref(), Some("follow=true&tailLines=10"));
        let r = a.route.unwrap();
        assert_eq!(
            (
                r.namespace.as_deref(),
                r.pod.as_deref(),
                r.container.as_deref()
            ),
            (Some("ns"), Some("p"), Some("c"))
        );
        // A `..` in the query is not a path segment.
        let a = attrs("GET", "/pods?x=/../../exec").unwrap();
        assert_eq!(a.path, "/pods");
        // A `;` in the query is an ordinary query character.
        assert!(attrs("GET", "/pods?a=1;b=2").is_ok());
    }

    #[test]
    fn streaming_requests_are_create_whatever_the_method() {
        for (method, upgrade) in [
            ("GET", Some("websocket")),
            ("GET", Some("WebSocket")),
            ("POST", Some("SPDY/3.1")),
            ("GET", None),
            ("POST", None),
        ] {
            for target in [
                "/exec/ns/p/c?command=sh",
                "/attach/ns/p/c",
                "/portForward/ns/p",
            ] {
                let a = request_attributes(method, target, upgrade).unwrap();
                assert_eq!(a.verb, Some(Verb::Create), "{method} {target} {upgrade:?}");
                assert_eq!(a.subresources, vec![Proxy]);
            }
        }
        let a = request_attributes("POST", "/run/ns/p/c", None).unwrap();
        assert_eq!(a.verb, Some(Verb::Create));
        let a = request_attributes("GET", "/exec/ns/p/uid/c", Some("SPDY/3.1")).unwrap();
        assert_eq!(a.upgrade, Some(Upgrade::Spdy31));
        assert_eq!(a.route.unwrap().uid.as_deref(), Some("uid"));
    }

    #[test]
    fn anything_under_a_streaming_prefix_is_create_or_refused() {
        let targets = [
            "/exec/ns/p/c/",
            "/exec/ns/p/uid/c/extra",
            "/exec/ns",
            "/exec",
            "/exec/",
            "/attach/ns/p/c/x/y",
            "/portForward/ns/p/uid/extra",
            "/portForward/",
            "/run/ns/p/c/",
            "/run/ns/p/uid/c/more/segments",
            "/metrics/../exec/ns/p/c/",
            "/exec/./ns/p/c",
        ];
        for target in targets {
            for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] {
                for upgrade in [None, Some("websocket"), Some("SPDY/3.1")] {
                    match request_attributes(method, target, upgrade) {
                        Ok(a) => assert_eq!(
                            a.verb,
                            Some(Verb::Create),
                            "{method} {target} {upgrade:?} -> {a:?}"
                        ),
                        Err(e) => assert!(e.status() >= 400, "{e}"),
                    }
                }
            }
        }
        // `/execute` is not under `/exec`: no streaming, no upgrade.
        let a = request_attributes("GET", "/execute/x", None).unwrap();
        assert_eq!(a.verb, Some(Verb::Get));
        assert!(a.route.is_none());
    }

    #[test]
    fn upgrades_only_on_streaming_endpoints_and_known_protocols() {
        assert_eq!(
            request_attributes("GET", "/pods", Some("websocket")),
            Err(Rejection::UpgradeNotAllowed("/pods".into()))
        );
        assert_eq!(
            request_attributes("GET", "/metrics/../podsx", Some("websocket")),
            Err(Rejection::UpgradeNotAllowed("/podsx".into()))
        );
        assert_eq!(
            request_attributes("GET", "/exec/ns/p/c", Some("h2c")),
            Err(Rejection::UnsupportedUpgrade("h2c".into()))
        );
        assert_eq!(
            request_attributes("GET", "/exec/ns/p/c", Some("websocket, h2c")),
            Err(Rejection::UnsupportedUpgrade("websocket, h2c".into()))
        );
    }

    #[test]
    fn head_and_unknown_methods_get_no_verb() {
        let a = attrs("HEAD", "/podsx").unwrap();
        assert_eq!(a.verb, None);
        let a = attrs("TRACE", "/unknown").unwrap();
        assert_eq!(a.verb, None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Targets built from pieces that matter: real route names, dot segments, encodings,
        /// separators and odd bytes.
        fn arb_target() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("pods".to_string()),
                Just("metrics".to_string()),
                Just("exec".to_string()),
                Just("logs".to_string()),
                Just("healthz".to_string()),
                Just("configz".to_string()),
                Just("cadvisor".to_string()),
                Just("..".to_string()),
                Just(".".to_string()),
                Just("%2e%2e".to_string()),
                Just("%2E".to_string()),
                Just("%2f".to_string()),
                Just("%25".to_string()),
                Just("%3F".to_string()),
                Just("%23".to_string()),
                Just("%c3%a9".to_string()),
                Just("%20".to_string()),
                Just(";".to_string()),
                Just("".to_string()),
                "[a-z0-9._~-]{1,6}",
            ];
            (
                prop::collection::vec(piece, 0..7),
                prop::option::of("[a-z=&/.%0-9]{0,12}"),
                any::<bool>(),
            )
                .prop_map(|(pieces, query, slash)| {
                    let mut t = format!("/{}", pieces.join("/"));
                    if slash {
                        t.push('/');
                    }
                    if let Some(q) = query {
                        t.push('?');
                        t.push_str(&q);
                    }
                    t
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// What goes upstream parses to exactly the attributes that were authorized.
            #[test]
            fn upstream_target_round_trips(target in arb_target()) {
                if let Ok(a) = request_attributes("GET", &target, None) {
                    let upstream = a.upstream_target();
                    let b = request_attributes("GET", &upstream, None).unwrap();
                    prop_assert_eq!(&a, &b, "{} -> {}", target, upstream);
                    prop_assert_eq!(upstream, b.upstream_target());
                }
            }

            /// A normalised path has no dot segments or empty segments left.
            #[test]
            fn normalised_paths_are_clean(target in arb_target()) {
                if let Ok((path, _)) = normalise_target(&target) {
                    prop_assert!(path.starts_with('/'));
                    prop_assert!(!path.contains("//"), "{}", path);
                    for segment in path.split('/') {
                        prop_assert!(segment != "." && segment != "..", "{}", path);
                    }
                }
            }

            /// Whatever follows a streaming prefix, and whatever the method and upgrade, the
            /// request is `create` or refused.
            #[test]
            fn streaming_prefixes_are_create_or_refused(
                prefix in prop::sample::select(STREAMING_PREFIXES.to_vec()),
                rest in arb_target(),
                method in prop::sample::select(vec!["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "X"]),
                upgrade in prop::option::of(prop::sample::select(vec!["websocket", "SPDY/3.1"])),
            ) {
                let target = format!("{prefix}{rest}");
                if let Ok(a) = request_attributes(method, &target, upgrade)
                    && STREAMING_PREFIXES.iter().any(|p| is_subpath(&a.path, p))
                {
                    prop_assert_eq!(a.verb, Some(Verb::Create), "{} {}", method, target);
                }
            }

            /// Arbitrary input never panics and long input is refused.
            #[test]
            fn arbitrary_input_never_panics(method in "[A-Z]{0,8}", target in any::<String>(), upgrade in prop::option::of(any::<String>())) {
                let result = request_attributes(&method, &target, upgrade.as_deref());
                if target.len() > MAX_TARGET_LEN {
                    prop_assert_eq!(result, Err(Rejection::TooLong));
                }
            }
        }
    }
}
