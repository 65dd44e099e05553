//! Content negotiation for filtered metrics paths.
//!
//! The agent must never relay a body it cannot filter: it asks the kubelet only for formats it
//! filters (the delimited protobuf exposition when the caller prefers it, else the text
//! formats), uncompressed (gzip is decoded too), and checks the answer's `Content-Type` and
//! `Content-Encoding` before a byte of it reaches the caller. The answer keeps the kubelet's
//! `Content-Type` as it was (version, escaping): what the filter passes is in that format.
//!
//! Text with UTF-8 names (`text/plain; version=1.0.0; escaping=allow-utf-8`, what Prometheus 3
//! asks for) is negotiated down: the agent's `Accept` names no `escaping`, so a Prometheus
//! client library answers with names escaped to the legacy character set (its default,
//! `escaping=underscores`), which the text scanner reads; every series arrives under that
//! name, none is lost or widened. An answer that still has `escaping=allow-utf-8` (quoted names
//! the scanner does not read) is refused. Protobuf carries names as strings, so its escaping
//! does not matter to the filter.

use super::scan::Format;
use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};

/// `Accept` for upstream when the caller has not asked for OpenMetrics. Without a wildcard, a
/// Prometheus client library that matches none of the offers falls back to text 0.0.4.
pub const ACCEPT_TEXT: &str = "text/plain;version=0.0.4;q=1";

/// `Accept` for upstream when the caller accepts OpenMetrics text.
pub const ACCEPT_OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0;q=0.9,application/openmetrics-text;version=0.0.1;q=0.8,text/plain;version=0.0.4;q=0.5";

/// `Accept` for upstream when the caller prefers the protobuf exposition (Prometheus with native
/// histograms, and Prometheus 3 by default); text 0.0.4 for an upstream that does not serve it.
pub const ACCEPT_PROTOBUF: &str = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=1,text/plain;version=0.0.4;q=0.5";

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

/// Which filter reads an upstream answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    Text(Format),
    /// Delimited `io.prometheus.client.MetricFamily` messages.
    Protobuf,
}

/// An upstream answer the filter can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub exposition: Exposition,
    pub decoding: Decoding,
}

/// Why an upstream answer cannot be filtered; the agent answers 502 rather than relay it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("upstream sent no Content-Type")]
    MissingContentType,
    #[error("upstream sent several Content-Type or Content-Encoding headers")]
    RepeatedHeader,
    #[error("upstream Content-Type {0:?} is not an exposition format the filter reads")]
    UnsupportedContentType(String),
    #[error("upstream Content-Encoding {0:?} is not gzip or identity")]
    UnsupportedEncoding(String),
}

/// The `Accept` to send upstream, given the caller's `Accept`: protobuf when the caller prefers
/// it, OpenMetrics only when the caller takes it, so its answer is always something it asked
/// for or text 0.0.4.
pub fn upstream_accept(client_accept: Option<&str>) -> &'static str {
    if client_accept.is_some_and(prefers_protobuf) {
        return ACCEPT_PROTOBUF;
    }
    let wants_openmetrics = client_accept.is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && quality(parts.filter_map(|p| p.split_once('='))) > 0.0
        })
    });
    if wants_openmetrics {
        ACCEPT_OPENMETRICS
    } else {
        ACCEPT_TEXT
    }
}

/// Whether the caller's `Accept` ranks the delimited protobuf exposition (with its `proto` and
/// `encoding` parameters) at least as high as any text format or wildcard it accepts.
pub fn prefers_protobuf(accept: &str) -> bool {
    let mut protobuf = 0.0f32;
    let mut other = 0.0f32;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let params: Vec<(&str, &str)> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        let q = quality(params.iter().map(|(k, v)| (*k, *v)));
        if media.eq_ignore_ascii_case("application/vnd.google.protobuf") {
            let param = |key: &str| {
                params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(key))
                    .map(|(_, v)| *v)
            };
            if param("proto") == Some("io.prometheus.client.MetricFamily")
                && param("encoding") == Some("delimited")
            {
                protobuf = protobuf.max(q);
            }
        } else {
            other = other.max(q);
        }
    }
    protobuf > 0.0 && protobuf >= other
}

/// The `q` parameter among a media range's or coding's parameters (1 when absent, 0 when
/// malformed, so a garbled preference never enables anything).
fn quality<'a>(params: impl Iterator<Item = (&'a str, &'a str)>) -> f32 {
    for (k, v) in params {
        if k.trim().eq_ignore_ascii_case("q") {
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
        let q = quality(parts.filter_map(|p| p.split_once('=')));
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
    let exposition = parse_content_type(content_type)
        .ok_or_else(|| Refusal::UnsupportedContentType(content_type.to_string()))?;
    let decoding = match content_encoding.map(str::trim) {
        None | Some("") => Decoding::Identity,
        Some(c) if c.eq_ignore_ascii_case("identity") => Decoding::Identity,
        Some(c) if c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip") => {
            Decoding::Gzip
        }
        Some(c) => return Err(Refusal::UnsupportedEncoding(c.to_string())),
    };
    Ok(Upstream {
        exposition,
        decoding,
    })
}

fn parse_content_type(value: &str) -> Option<Exposition> {
    let mut parts = value.split(';');
    let media = parts.next()?.trim();
    let format = if media.eq_ignore_ascii_case("text/plain") {
        Format::Text
    } else if media.eq_ignore_ascii_case("application/openmetrics-text") {
        Format::OpenMetrics
    } else if media.eq_ignore_ascii_case("application/vnd.google.protobuf") {
        return parse_protobuf_params(parts);
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
    Some(Exposition::Text(format))
}

/// The delimited `MetricFamily` stream and nothing else (not the text or compact-text
/// encodings of the same media type).
fn parse_protobuf_params<'a>(parts: impl Iterator<Item = &'a str>) -> Option<Exposition> {
    let (mut proto, mut encoding) = (false, false);
    for param in parts {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let (key, raw) = param.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let val = raw.trim().trim_matches('"');
        match key.as_str() {
            "proto" if val == "io.prometheus.client.MetricFamily" => proto = true,
            "encoding" if val == "delimited" => encoding = true,
            // Names are strings in protobuf: any escaping reads the same.
            "escaping" if matches!(val, "underscores" | "dots" | "values" | "allow-utf-8") => {}
            _ => return None,
        }
    }
    (proto && encoding).then_some(Exposition::Protobuf)
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
        assert_eq!(upstream_accept(Some(prom)), ACCEPT_PROTOBUF);
        let om = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(upstream_accept(Some(om)), ACCEPT_OPENMETRICS);
        assert_eq!(
            upstream_accept(Some("application/openmetrics-text;q=0")),
            ACCEPT_TEXT
        );
        for accept in [ACCEPT_TEXT, ACCEPT_OPENMETRICS] {
            assert!(!accept.contains("protobuf") && !accept.contains('*'));
        }
        assert!(!ACCEPT_PROTOBUF.contains('*'));
    }

    #[test]
    fn asks_for_protobuf_only_when_the_caller_prefers_it() {
        // Prometheus 2.42 with native histograms, and Prometheus 3's default.
        let prom2 = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let prom3 = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.4,application/openmetrics-text;version=0.0.1;q=0.3,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.2,text/plain;version=0.0.4;q=0.1,*/*;q=0.05";
        for accept in [prom2, prom3] {
            assert!(prefers_protobuf(accept), "{accept}");
            assert_eq!(upstream_accept(Some(accept)), ACCEPT_PROTOBUF);
        }
        // Prometheus 2.42 without native histograms: OpenMetrics first.
        let prom_text = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(upstream_accept(Some(prom_text)), ACCEPT_OPENMETRICS);
        for accept in [
            "text/plain;q=0.9,application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.5",
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text",
            "application/vnd.google.protobuf;encoding=delimited",
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0",
            "*/*",
        ] {
            assert!(!prefers_protobuf(accept), "{accept}");
            assert_ne!(upstream_accept(Some(accept)), ACCEPT_PROTOBUF);
        }
    }

    #[test]
    fn reads_the_protobuf_exposition_and_nothing_like_it() {
        let pb = |ct: &str| check_upstream_values(ct, None).map(|u| u.exposition);
        // What node-1's kubelet (Kubernetes 1.3x) answers.
        assert_eq!(
            pb(
                "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited; escaping=underscores"
            ),
            Ok(Exposition::Protobuf)
        );
        assert_eq!(
            pb(
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"
            ),
            Ok(Exposition::Protobuf)
        );
        for ct in [
            "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=text",
            "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=compact-text",
            "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily",
            "application/vnd.google.protobuf; encoding=delimited",
            "application/vnd.google.protobuf; proto=other.Message; encoding=delimited",
            "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited; x=y",
        ] {
            assert!(pb(ct).is_err(), "{ct}");
        }
        assert_eq!(
            check_upstream_values(
                "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited",
                Some("gzip")
            ),
            Ok(Upstream {
                exposition: Exposition::Protobuf,
                decoding: Decoding::Gzip
            })
        );
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
                exposition: Exposition::Text(Format::Text),
                decoding: Decoding::Identity
            })
        );
        assert_eq!(
            ok(
                "text/plain; version=0.0.4; charset=utf-8; escaping=underscores",
                Some("gzip")
            ),
            Ok(Upstream {
                exposition: Exposition::Text(Format::Text),
                decoding: Decoding::Gzip
            })
        );
        assert_eq!(
            ok(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                Some("identity")
            ),
            Ok(Upstream {
                exposition: Exposition::Text(Format::OpenMetrics),
                decoding: Decoding::Identity
            })
        );
        assert_eq!(
            ok("text/plain", None).map(|u| u.exposition),
            Ok(Exposition::Text(Format::Text))
        );
    }

    #[test]
    fn refuses_what_it_cannot_filter() {
        let refused_type = |ct: &str| {
            matches!(
                check_upstream_values(ct, None),
                Err(Refusal::UnsupportedContentType(_))
            )
        };
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
                exposition: Exposition::Text(Format::Text),
                decoding: Decoding::Gzip
            })
        );
        headers.append(CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        assert_eq!(check_upstream(&headers), Err(Refusal::RepeatedHeader));
    }
}
