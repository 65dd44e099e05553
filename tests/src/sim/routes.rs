//! One request, start to finish, in the kubelet's order: clean path (else 307), route (else
//! 404, before any authentication, as the kubelet's mux does), authenticate (401), authorize
//! (403), method (405), then the endpoint.

use super::State;
use super::auth::{self, Denial, Identity, SimAuth};
use super::payload::{Payload, text};
use super::prom::PROTOBUF_CONTENT_TYPE;
use super::record::RequestRecord;
use super::server::Peer;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use nodegate_crds::attributes::{kubelet_subresources, match_route, normalise_target};
use nodegate_crds::catalogue::{Endpoint, Verb};
use std::sync::Arc;

pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

const PLAIN: &str = "text/plain; charset=utf-8";
const NOT_FOUND: &str = "404 page not found\n";
/// Bodies are streamed in chunks of this size, like a real server writing a large response.
const CHUNK: usize = 64 * 1024;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
}

/// Go's `http.Error` and `http.NotFound` (and the kubelet's healthz and configz handlers) add
/// `X-Content-Type-Options: nosniff`.
pub(crate) fn nosniff(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn not_found() -> Response<Body> {
    nosniff(respond(404, PLAIN, NOT_FOUND))
}

/// A pre-generated body, gzip when asked for and available, streamed in chunks.
fn payload_response(payload: &Payload, headers: &HeaderMap) -> Response<Body> {
    let wants_gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            e.split(';')
                .next()
                .is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip"))
        });
    let (body, gzip) = match (&payload.gzip, wants_gzip) {
        (Some(g), true) => (g.clone(), true),
        _ => (payload.body.clone(), false),
    };
    let len = body.len();
    let chunks = (0..len.div_ceil(CHUNK)).map(move |i| {
        Ok::<_, std::io::Error>(Frame::data(
            body.slice(i * CHUNK..((i + 1) * CHUNK).min(len)),
        ))
    });
    let mut response = Response::new(StreamBody::new(futures::stream::iter(chunks)).boxed());
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(payload.content_type),
    );
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    response
}

/// The methods the kubelet serves on an endpoint; `None`: any (plain mux handlers).
fn kubelet_methods(endpoint: Endpoint) -> Option<&'static [Method]> {
    const GET: &[Method] = &[Method::GET];
    const GET_POST: &[Method] = &[Method::GET, Method::POST];
    const POST: &[Method] = &[Method::POST];
    const PUT: &[Method] = &[Method::PUT];
    match endpoint {
        Endpoint::Healthz
        | Endpoint::Metrics
        | Endpoint::Cadvisor
        | Endpoint::Resource
        | Endpoint::Probes
        | Endpoint::Slis
        | Endpoint::Configz
        | Endpoint::Statusz
        | Endpoint::Flagz
        | Endpoint::Pprof => None,
        Endpoint::Pods | Endpoint::RunningPods | Endpoint::Logs | Endpoint::ContainerLogs => {
            Some(GET)
        }
        Endpoint::Stats | Endpoint::Exec | Endpoint::Attach | Endpoint::PortForward => {
            Some(GET_POST)
        }
        Endpoint::Run | Endpoint::Checkpoint => Some(POST),
        Endpoint::DebugFlags => Some(PUT),
        // Not the kubelet's: it answers 404 whatever the method.
        _ => None,
    }
}

/// Decoded `key=value` pairs of a query (`+` is a space, as in Go's `ParseQuery`).
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn query_value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The `Upgrade` header, when `Connection` asks for an upgrade.
pub(crate) fn upgrade_header(headers: &HeaderMap) -> Option<String> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return None;
    }
    header_str(headers, header::UPGRADE)
}

pub(crate) async fn handle(
    state: Arc<State>,
    peer: Arc<Peer>,
    req: Request<Incoming>,
) -> Response<Body> {
    let headers = req.headers();
    let upgrade = upgrade_header(headers);
    let stream_protocols = header_str(headers, header::SEC_WEBSOCKET_PROTOCOL).or_else(|| {
        header_str(
            headers,
            header::HeaderName::from_static("x-stream-protocol-version"),
        )
    });
    let mut record = RequestRecord {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().map(String::from),
        upgrade,
        stream_protocols,
        authorization: header_str(headers, header::AUTHORIZATION),
        client_cert_user: peer.certificate.as_ref().map(|c| c.user.clone()),
        user: None,
        groups: Vec::new(),
        status: 0,
    };
    let (response, identity) = dispatch(&state, &peer, req).await;
    if let Some(identity) = identity {
        record.user = Some(identity.user);
        record.groups = identity.groups;
    }
    record.status = response.status().as_u16();
    tracing::debug!(
        method = %record.method,
        request = %record.target(),
        status = record.status,
        user = record.user.as_deref().unwrap_or(""),
        "kubelet-sim request"
    );
    state.recorder.push(record);
    response
}

async fn dispatch(
    state: &State,
    peer: &Peer,
    req: Request<Incoming>,
) -> (Response<Body>, Option<Identity>) {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let (path, query) = match normalise_target(&target) {
        Ok(x) => x,
        Err(e) => return (respond(400, PLAIN, format!("{e}\n")), None),
    };
    // Go's mux redirects an unclean path to its clean form before any handler runs.
    let raw_path = percent_encoding::percent_decode_str(req.uri().path()).decode_utf8_lossy();
    if raw_path != path {
        let location = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        // Go's `http.Redirect`: an HTML body for GET and HEAD only.
        let mut r = if matches!(*req.method(), Method::GET | Method::HEAD) {
            respond(
                307,
                "text/html; charset=utf-8",
                format!("<a href=\"{location}\">Temporary Redirect</a>.\n\n"),
            )
        } else {
            let mut r = respond(307, PLAIN, Bytes::new());
            r.headers_mut().remove(header::CONTENT_TYPE);
            r
        };
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return (r, None);
    }
    let route = match match_route(&path) {
        Some(r) if path != "/metrics/resource/v1alpha1" => r,
        _ => return (not_found(), None),
    };

    let identity = match &state.options.auth {
        SimAuth::AllowAll => None,
        SimAuth::Cluster { client, .. } => {
            let identity =
                match auth::authenticate(client, peer.certificate.as_ref(), req.headers()).await {
                    Ok(i) => i,
                    Err(d) => return (denied(&d), None),
                };
            // The kubelet's verb: from the method only (a WebSocket exec is `get`).
            let verb = Verb::from_method(req.method().as_str()).map_or("", |v| v.as_str());
            let subresources = kubelet_subresources(&path);
            if let Err(d) = auth::authorize(
                client,
                &identity,
                verb,
                &state.options.node_name,
                &subresources,
            )
            .await
            {
                return (denied(&d), Some(identity));
            }
            Some(identity)
        }
        SimAuth::Static(auth) => {
            let identity = match auth.authenticate(peer.certificate.as_ref(), req.headers()) {
                Ok(i) => i,
                Err(d) => return (denied(&d), None),
            };
            let verb = Verb::from_method(req.method().as_str()).map_or("", |v| v.as_str());
            if let Err(d) = auth.authorize(&identity, verb, &kubelet_subresources(&path)) {
                return (denied(&d), Some(identity));
            }
            Some(identity)
        }
    };

    if let Some(methods) = kubelet_methods(route.endpoint)
        && !methods.contains(req.method())
    {
        return (respond(405, PLAIN, "405: Method Not Allowed"), identity);
    }
    let response = serve_endpoint(state, &route, query.as_deref(), req).await;
    (response, identity)
}

fn denied(d: &Denial) -> Response<Body> {
    respond(d.status(), PLAIN, d.body())
}

async fn serve_endpoint(
    state: &State,
    route: &nodegate_crds::attributes::Route,
    query: Option<&str>,
    req: Request<Incoming>,
) -> Response<Body> {
    let p = &state.payloads;
    let w = &state.world;
    let pairs = query_pairs(query);
    let headers = req.headers();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let protobuf = state.options.metrics_protobuf
        || super::prom::negotiate(accept) == super::prom::Format::Protobuf;
    let metrics = |payload: &Payload| {
        if protobuf {
            // Not real protobuf: what matters is that the agent never passes it on.
            respond(
                200,
                PROTOBUF_CONTENT_TYPE,
                Bytes::from_static(b"\x0a\x0dsim_protobuf\x12\x01x\x18\x00"),
            )
        } else {
            payload_response(payload, headers)
        }
    };
    if route.endpoint.component().is_some() {
        // The node's other components are not the kubelet's: it has no such path.
        return not_found();
    }
    match route.endpoint {
        Endpoint::Healthz => match route.rest.as_deref() {
            None | Some("") | Some("ping") | Some("log") | Some("syncloop") => {
                nosniff(respond(200, PLAIN, "ok"))
            }
            Some(_) => not_found(),
        },
        Endpoint::Pods => payload_response(&p.pods, headers),
        Endpoint::RunningPods => payload_response(&p.running_pods, headers),
        Endpoint::Stats => {
            if query_value(&pairs, "only_cpu_and_memory") == Some("true") {
                payload_response(&p.stats_summary_cpu_memory, headers)
            } else {
                payload_response(&p.stats_summary, headers)
            }
        }
        Endpoint::Metrics => metrics(&p.metrics),
        Endpoint::Cadvisor => metrics(&p.cadvisor),
        Endpoint::Resource => metrics(&p.resource),
        Endpoint::Probes => metrics(&p.probes),
        Endpoint::Slis => metrics(&p.slis),
        Endpoint::Configz => nosniff(payload_response(&p.configz, headers)),
        Endpoint::Statusz | Endpoint::Flagz if !accepts_text(headers) => {
            respond(406, super::payload::JSON, NOT_ACCEPTABLE)
        }
        Endpoint::Statusz => respond(200, PLAIN, text::statusz(w, now_secs())),
        Endpoint::Flagz => respond(200, PLAIN, text::flagz(w)),
        Endpoint::Logs => logs(state, route.rest.as_deref().unwrap_or("")),
        Endpoint::ContainerLogs => container_logs(state, route, &pairs),
        Endpoint::Exec | Endpoint::Attach | Endpoint::PortForward => {
            super::streaming::handle(route, &pairs, req)
        }
        Endpoint::Run => {
            let cmd = query_value(&pairs, "cmd").unwrap_or("");
            respond(200, PLAIN, run_output(cmd))
        }
        Endpoint::Checkpoint => {
            let (ns, pod, ctr) = (
                route.namespace.as_deref().unwrap_or(""),
                route.pod.as_deref().unwrap_or(""),
                route.container.as_deref().unwrap_or(""),
            );
            let file = format!(
                "/var/lib/kubelet/checkpoints/checkpoint-{pod}_{ns}-{ctr}-{}.tar",
                super::world::rfc3339(w.now_ms / 1000)
            );
            respond(
                200,
                super::payload::JSON,
                serde_json::json!({ "items": [file] }).to_string(),
            )
        }
        Endpoint::Pprof => pprof(route.rest.as_deref().unwrap_or("")),
        Endpoint::DebugFlags => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return respond(400, PLAIN, "failed to read request body"),
            };
            let level = String::from_utf8_lossy(&body).trim().to_string();
            match level.parse::<u32>() {
                Ok(v) => respond(
                    200,
                    PLAIN,
                    format!("successfully set klog.logging.verbosity to {v}"),
                ),
                Err(_) => respond(400, PLAIN, format!("invalid log level {level:?}")),
            }
        }
        _ => not_found(),
    }
}

/// The kubelet's answer to a `/statusz` or `/flagz` request that does not accept text.
const NOT_ACCEPTABLE: &str = "{\n  \"kind\": \"Status\",\n  \"apiVersion\": \"v1\",\n  \"metadata\": {},\n  \"status\": \"Failure\",\n  \"message\": \"only the following media types are accepted: application/json, application/yaml, text/plain\",\n  \"reason\": \"NotAcceptable\",\n  \"code\": 406\n}";

/// Whether `Accept` admits `text/plain` (no header admits anything). Plain `application/json`
/// does not: the kubelet wants a versioned JSON media type there.
pub(crate) fn accepts_text(headers: &HeaderMap) -> bool {
    let values: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    values.is_empty()
        || values
            .iter()
            .flat_map(|v| v.split(','))
            .map(|m| {
                m.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .any(|m| m == "*/*" || m == "text/*" || m == "text/plain")
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `/run`'s output: what `cmd` would print — `echo`'s arguments, else the command itself.
pub(crate) fn run_output(cmd: &str) -> String {
    match cmd.strip_prefix("echo ") {
        Some(rest) => format!("{rest}\n"),
        None => format!("{cmd}\n"),
    }
}

fn logs(state: &State, rest: &str) -> Response<Body> {
    let html = "text/html; charset=utf-8";
    match rest {
        "" => respond(200, html, text::log_listing()),
        "pods/" | "containers/" => {
            let mut s = String::from(
                "<!doctype html>\n<meta name=\"viewport\" content=\"width=device-width\">\n<pre>\n",
            );
            for pod in &state.world.pods {
                let name = if rest == "pods/" {
                    format!("{}_{}_{}/", pod.namespace, pod.name, pod.uid)
                } else {
                    format!(
                        "{}_{}_{}-{}.log",
                        pod.name, pod.namespace, pod.containers[0].name, pod.containers[0].id
                    )
                };
                s.push_str(&format!("<a href=\"{name}\">{name}</a>\n"));
            }
            s.push_str("</pre>\n");
            respond(200, html, s)
        }
        f if text::LOG_FILES.contains(&f) => respond(
            200,
            PLAIN,
            text::log_file(&state.world, f, state.options.log_lines),
        ),
        _ => not_found(),
    }
}

fn container_logs(
    state: &State,
    route: &nodegate_crds::attributes::Route,
    pairs: &[(String, String)],
) -> Response<Body> {
    let tail = query_value(pairs, "tailLines").and_then(|v| v.parse::<usize>().ok());
    let timestamps = query_value(pairs, "timestamps") == Some("true");
    let mut body = text::container_log(
        &state.world,
        route.namespace.as_deref().unwrap_or(""),
        route.pod.as_deref().unwrap_or(""),
        route.container.as_deref().unwrap_or(""),
        state.options.log_lines,
        tail,
        timestamps,
    );
    if let Some(limit) = query_value(pairs, "limitBytes").and_then(|v| v.parse::<usize>().ok()) {
        let mut cut = limit.min(body.len());
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    // `follow=true` is served like a finished container: the log, then the end.
    respond(200, PLAIN, body)
}

fn pprof(rest: &str) -> Response<Body> {
    match rest {
        "" => respond(200, "text/html; charset=utf-8", text::pprof_index()),
        "cmdline" => respond(
            200,
            PLAIN,
            "/usr/bin/kubelet\x00--config=/var/lib/kubelet/config.yaml",
        ),
        p if text::PPROF_PROFILES.contains(&p) => respond(
            200,
            "application/octet-stream",
            // A gzip header and a little data: profiles are gzipped protobuf.
            Bytes::from_static(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xffsim-profile"),
        ),
        _ => respond(404, PLAIN, "Unknown profile\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = query_pairs(Some("command=echo&command=hi+there&x=%2Fa&flag"));
        assert_eq!(
            q,
            vec![
                ("command".into(), "echo".into()),
                ("command".into(), "hi there".into()),
                ("x".into(), "/a".into()),
                ("flag".into(), String::new()),
            ]
        );
    }

    #[test]
    fn accept_header() {
        let mut h = HeaderMap::new();
        assert!(accepts_text(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!accepts_text(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/plain;q=0.5"),
        );
        assert!(accepts_text(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(accepts_text(&h));
    }

    #[test]
    fn run_echoes() {
        assert_eq!(run_output("echo hi"), "hi\n");
        assert_eq!(run_output("date"), "date\n");
    }

    #[test]
    fn upgrade_needs_connection_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_header(&h), None);
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade_header(&h).as_deref(), Some("websocket"));
    }
}
