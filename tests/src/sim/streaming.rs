//! exec, attach and portForward over WebSocket (the channel protocols `v4.channel.k8s.io` /
//! `v5.channel.k8s.io`: each binary message starts with its channel byte) and SPDY/3.1.
//!
//! WebSocket sessions behave like a container: `exec` of `echo a b` writes `a b\n` to stdout
//! (channel 1), then the `Success` status (channel 3), then closes; any other command, and
//! `attach`, echo stdin (channel 0) to stdout until the client closes (or, on v5, closes stdin
//! with channel 255). `portForward` announces each port on its data and error channels and
//! echoes data back.
//!
//! SPDY: the upgrade is answered (101 with the negotiated `X-Stream-Protocol-Version`) and the
//! connection then echoes raw bytes; SPDY framing (streams per channel) is not implemented.

use super::routes::{Body, nosniff, respond, upgrade_header};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use nodegate_crds::attributes::Route;
use nodegate_crds::catalogue::Endpoint;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

const PLAIN: &str = "text/plain; charset=utf-8";

/// Channel protocols served for exec and attach, newest first.
const CHANNEL_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// WebSocket port forwarding: v4 only (`portforward.k8s.io` is SPDY-only).
const PORT_FORWARD_PROTOCOLS: &[&str] = &["v4.channel.k8s.io"];
/// SPDY stream protocols (`X-Stream-Protocol-Version`); v5 is WebSocket-only.
const SPDY_EXEC_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
const SPDY_PORT_FORWARD_PROTOCOLS: &[&str] = &["portforward.k8s.io"];

const STATUS_SUCCESS: &str = r#"{"metadata":{},"status":"Success"}"#;

/// What a session does once upgraded.
#[derive(Clone, Debug)]
enum Session {
    Echo { v5: bool },
    Command { args: Vec<String>, status: bool },
    PortForward { ports: Vec<u16> },
}

pub(crate) fn handle(
    route: &Route,
    pairs: &[(String, String)],
    req: Request<Incoming>,
) -> Response<Body> {
    let upgrade = upgrade_header(req.headers()).map(|u| u.to_ascii_lowercase());
    match upgrade.as_deref() {
        Some("websocket") => websocket(route, pairs, req),
        Some("spdy/3.1") => spdy(route, req),
        _ => nosniff(respond(500, PLAIN, "Upgrade request required\n")),
    }
}

/// The first protocol the client offers that is in `supported` (the client's order wins, as
/// in the kubelet's wsstream); `Ok(None)` when the client offered none.
fn negotiate<'a>(offered: &[&str], supported: &[&'a str]) -> Result<Option<&'a str>, ()> {
    let offered: Vec<&str> = offered
        .iter()
        .copied()
        .filter(|p| !p.starts_with("base64url.bearer.authorization.k8s.io."))
        .collect();
    if offered.is_empty() {
        return Ok(None);
    }
    offered
        .iter()
        .find_map(|o| {
            supported
                .iter()
                .find(|s| s.eq_ignore_ascii_case(o))
                .copied()
        })
        .map(Some)
        .ok_or(())
}

fn header_list(req: &Request<Incoming>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn websocket(route: &Route, pairs: &[(String, String)], req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return respond(400, PLAIN, "missing Sec-WebSocket-Key");
    };
    let offered = header_list(&req, "sec-websocket-protocol");
    let offered: Vec<&str> = offered.iter().map(String::as_str).collect();
    let supported = if route.endpoint == Endpoint::PortForward {
        PORT_FORWARD_PROTOCOLS
    } else {
        CHANNEL_PROTOCOLS
    };
    let Ok(protocol) = negotiate(&offered, supported) else {
        // The kubelet's wsstream: 403, no body, and the connection closed.
        let mut r = respond(403, PLAIN, Bytes::new());
        r.headers_mut().remove(header::CONTENT_TYPE);
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    };
    let v5 = protocol == Some("v5.channel.k8s.io");
    // v4 and v5 end a command with a JSON status on the error channel; the older protocols
    // (and the unnamed base one) write nothing there on success.
    let status = matches!(protocol, Some("v4.channel.k8s.io" | "v5.channel.k8s.io"));
    let session = match route.endpoint {
        Endpoint::PortForward => {
            let ports: Vec<u16> = pairs
                .iter()
                .filter(|(k, _)| k == "port")
                .filter_map(|(_, v)| v.trim().parse().ok())
                .collect();
            if ports.is_empty() {
                return respond(400, PLAIN, "query parameter \"port\" is required");
            }
            Session::PortForward { ports }
        }
        Endpoint::Exec => {
            let args: Vec<String> = pairs
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect();
            if args.first().is_some_and(|c| c == "echo") {
                Session::Command { args, status }
            } else {
                Session::Echo { v5 }
            }
        }
        _ => Session::Echo { v5 },
    };
    let open = if route.endpoint == Endpoint::PortForward {
        Vec::new()
    } else {
        opened_channels(pairs)
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                if let Err(e) = run_websocket(ws, &open, session).await {
                    tracing::debug!(error = %e, "kubelet-sim: websocket session ended with an error");
                }
            }
            Err(e) => tracing::debug!(error = %e, "kubelet-sim: websocket upgrade failed"),
        }
    });
    let mut response = respond(101, PLAIN, Bytes::new());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    // The kubelet names the protocol, and answers an empty one when none was asked for.
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(protocol.unwrap_or("")),
    );
    response
}

/// Close code 1000, as the kubelet sends when a command ends.
fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: Default::default(),
    }
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut b = BytesMut::with_capacity(data.len() + 1);
    b.put_u8(channel);
    b.put_slice(data);
    Message::Binary(b.freeze())
}

/// The output channels a session opens (stdout 1, stderr 2, from `stdout`/`output` and
/// `stderr`/`error` being `1` or `true`); the kubelet writes an empty frame on each first.
fn opened_channels(pairs: &[(String, String)]) -> Vec<u8> {
    let on = |names: [&str; 2]| {
        pairs
            .iter()
            .any(|(k, v)| names.contains(&k.as_str()) && (v == "1" || v == "true"))
    };
    let mut open = Vec::new();
    if on(["stdout", "output"]) {
        open.push(1);
    }
    if on(["stderr", "error"]) {
        open.push(2);
    }
    open
}

async fn run_websocket<S>(
    mut ws: WebSocketStream<S>,
    open: &[u8],
    session: Session,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for channel in open {
        ws.send(frame(*channel, &[])).await?;
    }
    match session {
        Session::Command { args, status } => {
            let out = format!("{}\n", args[1..].join(" "));
            ws.send(frame(1, out.as_bytes())).await?;
            if status {
                ws.send(frame(3, STATUS_SUCCESS.as_bytes())).await?;
            }
            ws.close(Some(normal_close())).await?;
        }
        Session::Echo { v5 } => {
            while let Some(msg) = ws.next().await {
                match msg? {
                    Message::Binary(data) if !data.is_empty() => match data[0] {
                        0 => ws.send(frame(1, &data[1..])).await?,
                        // v5: the client closed a stream; stdin closed ends the session.
                        255 if v5 && data.get(1) == Some(&0) => {
                            ws.send(frame(3, STATUS_SUCCESS.as_bytes())).await?;
                            ws.close(Some(normal_close())).await?;
                        }
                        _ => {}
                    },
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        }
        Session::PortForward { ports } => {
            for (i, port) in ports.iter().enumerate() {
                let data_channel = (2 * i) as u8;
                ws.send(frame(data_channel, &port.to_le_bytes())).await?;
                ws.send(frame(data_channel + 1, &port.to_le_bytes()))
                    .await?;
            }
            while let Some(msg) = ws.next().await {
                match msg? {
                    Message::Binary(data) if !data.is_empty() && data[0] % 2 == 0 => {
                        ws.send(frame(data[0], &data[1..])).await?
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

fn spdy(route: &Route, req: Request<Incoming>) -> Response<Body> {
    let offered = header_list(&req, "x-stream-protocol-version");
    let offered: Vec<&str> = offered.iter().map(String::as_str).collect();
    let supported = if route.endpoint == Endpoint::PortForward {
        SPDY_PORT_FORWARD_PROTOCOLS
    } else {
        SPDY_EXEC_PROTOCOLS
    };
    if offered.is_empty() {
        return nosniff(respond(
            400,
            PLAIN,
            "unable to upgrade: X-Stream-Protocol-Version is required\n",
        ));
    }
    let protocol = match negotiate(&offered, supported) {
        Ok(p) => p,
        Err(()) => {
            let message = format!(
                "unable to upgrade: unable to negotiate protocol: client supports [{}], server accepts [{}]\n",
                offered.join(" "),
                supported.join(" ")
            );
            // exec and attach write it twice (the handshake, then remotecommand again).
            let times = if route.endpoint == Endpoint::PortForward {
                1
            } else {
                2
            };
            let mut r = respond(403, PLAIN, message.repeat(times));
            for p in supported {
                r.headers_mut().append(
                    "x-accepted-stream-protocol-versions",
                    HeaderValue::from_static(p),
                );
            }
            r.headers_mut().insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            return r;
        }
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                if let Err(e) = tokio::io::copy(&mut r, &mut w).await {
                    tracing::debug!(error = %e, "kubelet-sim: SPDY echo ended with an error");
                }
            }
            Err(e) => tracing::debug!(error = %e, "kubelet-sim: SPDY upgrade failed"),
        }
    });
    let mut response = respond(101, PLAIN, Bytes::new());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    if let Some(p) = protocol {
        h.insert("x-stream-protocol-version", HeaderValue::from_static(p));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_takes_the_clients_first_supported() {
        assert_eq!(negotiate(&[], CHANNEL_PROTOCOLS), Ok(None));
        assert_eq!(
            negotiate(
                &["v4.channel.k8s.io", "v5.channel.k8s.io"],
                CHANNEL_PROTOCOLS
            ),
            Ok(Some("v4.channel.k8s.io"))
        );
        assert_eq!(
            negotiate(
                &[
                    "base64url.bearer.authorization.k8s.io.eA",
                    "v5.channel.k8s.io"
                ],
                CHANNEL_PROTOCOLS
            ),
            Ok(Some("v5.channel.k8s.io"))
        );
        assert_eq!(negotiate(&["x.k8s.io"], CHANNEL_PROTOCOLS), Err(()));
    }
}
