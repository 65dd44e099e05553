//! Protocol upgrades (exec, attach, portForward over SPDY/3.1 or WebSocket).
//!
//! The upgrade request is forwarded as is (minus the caller's credentials), and bytes are
//! spliced between caller and kubelet only once the kubelet has answered `101 Switching
//! Protocols`. Any other answer is relayed and the caller's connection closed, so a refused
//! upgrade can never leave an open tunnel to the kubelet (CVE-2018-1002105).

use crate::upstream::{ProxyBody, Upstream, UpstreamError, response_headers};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Forwards an upgrade request; the response is what the caller gets (a 101 whose tunnel is
/// spliced in the background, or the kubelet's refusal with `Connection: close`).
pub async fn proxy_upgrade(
    upstream: &Upstream,
    mut req: Request<Incoming>,
    target: Uri,
    headers: HeaderMap,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let client_side = hyper::upgrade::on(&mut req);
    let method = req.method().clone();
    let mut upstream_req = Request::builder()
        .method(method)
        .uri(target)
        .body(req.into_body().map_err(Into::into).boxed_unsync())
        .map_err(|e| UpstreamError::Request(e.to_string()))?;
    *upstream_req.headers_mut() = headers;
    let mut resp = upstream.send(upstream_req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        parts.headers = response_headers(&parts.headers, false);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed_unsync(),
        ));
    }
    let upstream_side = hyper::upgrade::on(&mut resp);
    let mut out = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .body(crate::server::empty())
        .map_err(|e| UpstreamError::Request(e.to_string()))?;
    *out.headers_mut() = response_headers(resp.headers(), true);
    tokio::spawn(async move {
        let (client, kubelet) = match tokio::try_join!(client_side, upstream_side) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut kubelet = TokioIo::new(kubelet);
        match tokio::io::copy_bidirectional(&mut client, &mut kubelet).await {
            Ok((up, down)) => tracing::debug!(up, down, "upgraded stream closed"),
            Err(e) => tracing::debug!(error = %e, "upgraded stream ended with an error"),
        }
    });
    Ok(out)
}
