//! What reached the simulated kubelet: one record per request, in arrival order.
//!
//! Agent tests assert on these: a refused request leaves no record (it never went upstream),
//! the caller's token never appears in `authorization` (the agent uses its own credentials),
//! an exec arrives with the upgrade protocol the caller asked for.

use std::sync::Mutex;

/// One request as the simulator saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// The path as sent (still percent-encoded).
    pub path: String,
    /// The raw query, without `?`.
    pub query: Option<String>,
    /// The `Upgrade` header (`websocket`, `SPDY/3.1`) when `Connection` asked for an upgrade.
    pub upgrade: Option<String>,
    /// The streaming subprotocol asked for: `Sec-WebSocket-Protocol` or
    /// `X-Stream-Protocol-Version` (all values, comma-joined).
    pub stream_protocols: Option<String>,
    /// The `Authorization` header, verbatim.
    pub authorization: Option<String>,
    /// Subject CN of the client certificate the caller presented over TLS, if any.
    pub client_cert_user: Option<String>,
    /// The authenticated user (`None` with `SimAuth::AllowAll`, or when authentication failed).
    pub user: Option<String>,
    pub groups: Vec<String>,
    /// The status answered (101 for an accepted upgrade).
    pub status: u16,
}

impl RequestRecord {
    /// The request target, `path?query`.
    pub fn target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// The request log shared by the server and the [`super::Sim`] handle.
#[derive(Debug, Default)]
pub struct Recorder {
    records: Mutex<Vec<RequestRecord>>,
}

impl Recorder {
    pub fn push(&self, record: RequestRecord) {
        if let Ok(mut r) = self.records.lock() {
            r.push(record);
        }
    }

    pub fn snapshot(&self) -> Vec<RequestRecord> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.records.lock().map(|r| r.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        if let Ok(mut r) = self.records.lock() {
            r.clear();
        }
    }
}
