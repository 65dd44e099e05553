//! Content negotiation for filtered metrics paths.
//!
//! The agent must never relay a body it cannot filter: it asks the kubelet only for the text
//! formats (never the protobuf exposition), uncompressed (gzip is decoded too), and checks the
//! answer's `Content-Type` and `Content-Encoding` before a byte of it reaches the caller.

use super::scan::Format;
use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};

/// `Accept` for upstream when the caller has not asked for OpenMetrics. Without a wildcard, a
/// Prometheus client library that matches none of the offers falls back to text 0.0.4.
pub const ACCEPT_TEXT: &str = "text/plain;version=0.0.4;q=1";

/// `Accept` for upstream when the caller accepts OpenMetrics text.
pub const ACCEPT_OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0;q=0.9,application/openmetrics-text;version=0.0.1;q=0.8,text/plain;version=0.0.4;q=0.5";

/// `Accept-Encoding` for upstream: no compression. The kubelet is on the agent's own node, so
/// gzip there and gunzip here would only spend CPU on both sides (asking for gzip made a
/// filtered scrape of kubelet-sim's 8 MB cAdvisor answer take about 1.5 times as long to the
/// last byte, docs/BENCHMARKS.md). A gzip answer is still read: the filter decodes it.
pub const ACCEPT_ENCODING: &str = "identity";

/// How the upstream body is coded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoding {
    Identity,
    Gzip,
}

/// An upstream answer the filter can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub format: Format,
    pub decoding: Decoding,
}

/// Why an upstream answer cannot be filtered; the agent answers 502 rather than relay it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("upstream sent no Content-Type")]
    MissingContentType,
    #[error("upstream sent several Content-Type or Content-Encoding headers")]
    RepeatedHeader,
    #[error("upstream Content-Type {0:?} is not a text exposition format the filter reads")]
    UnsupportedContentType(String),
    #[error("upstream Content-Encoding {0:?} is not gzip or identity")]
    UnsupportedEncoding(String),
}

/// The `Accept` to send upstream, given the caller's `Accept`: OpenMetrics is requested only
/// when the caller takes it, so its answer is always something it asked for or text 0.0.4.
pub fn upstream_accept(client_accept: Option<&str>) -> &'static str {
    let wants_openmetrics = client_accept.is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("application/openmetrics-text") && quality(parts) > 0.0
        })
    });
    if wants_openmetrics {
        ACCEPT_OPENMETRICS
    } else {
        ACCEPT_TEXT
    }
}

/// The `q` parameter among a media range's or coding's parameters (1 when absent, 0 when
/// malformed, so a garbled preference never enables anything).
fn quality<'a>(params: impl Iterator<Item = &'a str>) -> f32 {
    for p in params {
        if let Some((k, v)) = p.split_once('=')
            && k.trim().eq_ignore_ascii_case("q")
        {
            return v
                .trim()
                .parse::<f32>()
                .ok()
                .filter(|q| (0.0..=1.0).contains(q))
                .unwrap_or(0.0);
        }
    }
    1.0
}

/// Whether the caller's `Accept-Encoding` takes gzip (explicitly or by `*`, with q > 0).
pub fn client_accepts_gzip(accept_encoding: Option<&str>) -> bool {
    let Some(value) = accept_encoding else {
        return false;
    };
    let mut gzip = None;
    let mut star = None;
    for item in value.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = quality(parts);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(q);
        } else if coding == "*" {
            star = Some(q);
        }
    }
    gzip.or(star).is_some_and(|q| q > 0.0)
}

/// Checks the upstream response headers; the result says how to decode and parse the body.
pub fn check_upstream(headers: &HeaderMap) -> Result<Upstream, Refusal> {
    if headers.get_all(CONTENT_TYPE).iter().count() > 1
        || headers.get_all(CONTENT_ENCODING).iter().count() > 1
    {
        return Err(Refusal::RepeatedHeader);
    }
    let content_type = match headers.get(CONTENT_TYPE) {
        None => return Err(Refusal::MissingContentType),
        Some(v) => v.to_str().map_err(|_| {
            Refusal::UnsupportedContentType(String::from_utf8_lossy(v.as_bytes()).into_owned())
        })?,
    };
    let content_encoding = match headers.get(CONTENT_ENCODING) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            Refusal::UnsupportedEncoding(String::from_utf8_lossy(v.as_bytes()).into_owned())
        })?),
    };
    check_upstream_values(content_type, content_encoding)
}

/// [`check_upstream`] on header values.
pub fn check_upstream_values(
    content_type: &str,
    content_encoding: Option<&str>,
) -> Result<Upstream, Refusal> {
    let format = parse_content_type(content_type)
        .ok_or_else(|| Refusal::UnsupportedContentType(content_type.to_string()))?;
    let decoding = match content_encoding.map(str::trim) {
        None | Some("") => Decoding::Identity,
        Some(c) if c.eq_ignore_ascii_case("identity") => Decoding::Identity,
        Some(c) if c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip") => {
            Decoding::Gzip
        }
        Some(c) => return Err(Refusal::UnsupportedEncoding(c.to_string())),
    };
    Ok(Upstream { format, decoding })
}

fn parse_content_type(value: &str) -> Option<Format> {
    let mut parts = value.split(';');
    let media = parts.next()?.trim();
    let format = if media.eq_ignore_ascii_case("text/plain") {
        Format::Text
    } else if media.eq_ignore_ascii_case("application/openmetrics-text") {
        Format::OpenMetrics
    } else {
        return None;
    };
    for param in parts {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let (key, raw) = param.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let val = raw.trim().trim_matches('"');
        let ok = match (key.as_str(), format) {
            ("version", Format::Text) => val == "0.0.4",
            ("version", Format::OpenMetrics) => val == "1.0.0" || val == "0.0.1",
            ("charset", _) => val.eq_ignore_ascii_case("utf-8"),
            // Names escaped to the legacy character set; `allow-utf-8` would bring quoted
            // names the scanner does not read.
            ("escaping", _) => matches!(val, "underscores" | "dots" | "values"),
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    Some(format)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn asks_for_openmetrics_only_when_the_caller_takes_it() {
        assert_eq!(upstream_accept(None), ACCEPT_TEXT);
        assert_eq!(upstream_accept(Some("*/*")), ACCEPT_TEXT);
        let prom = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(upstream_accept(Some(prom)), ACCEPT_TEXT);
        let om = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(upstream_accept(Some(om)), ACCEPT_OPENMETRICS);
        assert_eq!(
            upstream_accept(Some("application/openmetrics-text;q=0")),
            ACCEPT_TEXT
        );
        for accept in [ACCEPT_TEXT, ACCEPT_OPENMETRICS] {
            assert!(!accept.contains("protobuf") && !accept.contains('*'));
        }
    }

    #[test]
    fn gzip_to_the_caller_only_when_accepted() {
        assert!(client_accepts_gzip(Some("gzip")));
        assert!(client_accepts_gzip(Some("br, gzip;q=0.5")));
        assert!(client_accepts_gzip(Some("*")));
        assert!(!client_accepts_gzip(None));
        assert!(!client_accepts_gzip(Some("identity")));
        assert!(!client_accepts_gzip(Some("gzip;q=0")));
        assert!(!client_accepts_gzip(Some("gzip;q=0, *")));
        assert!(!client_accepts_gzip(Some("gzip;q=abc")));
    }

    #[test]
    fn accepts_text_formats_with_gzip_or_identity() {
        let ok = |ct: &str, ce: Option<&str>| check_upstream_values(ct, ce);
        assert_eq!(
            ok("text/plain; version=0.0.4; charset=utf-8", None),
            Ok(Upstream {
                format: Format::Text,
                decoding: Decoding::Identity
            })
        );
        assert_eq!(
            ok(
                "text/plain; version=0.0.4; charset=utf-8; escaping=underscores",
                Some("gzip")
            ),
            Ok(Upstream {
                format: Format::Text,
                decoding: Decoding::Gzip
            })
        );
        assert_eq!(
            ok(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                Some("identity")
            ),
            Ok(Upstream {
                format: Format::OpenMetrics,
                decoding: Decoding::Identity
            })
        );
        assert_eq!(ok("text/plain", None).map(|u| u.format), Ok(Format::Text));
    }

    #[test]
    fn refuses_what_it_cannot_filter() {
        let refused_type = |ct: &str| {
            matches!(
                check_upstream_values(ct, None),
                Err(Refusal::UnsupportedContentType(_))
            )
        };
        assert!(refused_type(
            "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
        ));
        assert!(refused_type("application/json"));
        assert!(refused_type("text/html"));
        assert!(refused_type("text/plain; version=1.0.0"));
        assert!(refused_type(
            "text/plain; version=0.0.4; escaping=allow-utf-8"
        ));
        assert!(refused_type("text/plain; charset=latin1"));
        assert!(refused_type("text/plain; version"));
        assert!(refused_type(""));
        for ce in ["zstd", "br", "deflate", "gzip, gzip", "compress"] {
            assert_eq!(
                check_upstream_values("text/plain; version=0.0.4", Some(ce)),
                Err(Refusal::UnsupportedEncoding(ce.to_string()))
            );
        }
        let mut headers = HeaderMap::new();
        assert_eq!(check_upstream(&headers), Err(Refusal::MissingContentType));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        headers.append(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(
            check_upstream(&headers),
            Ok(Upstream {
                format: Format::Text,
                decoding: Decoding::Gzip
            })
        );
        headers.append(CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        assert_eq!(check_upstream(&headers), Err(Refusal::RepeatedHeader));
    }
}
