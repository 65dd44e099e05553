//! The async body adapter: gzip and identity upstream bodies give the same filtered bytes, gzip
//! output decodes to them, output streams before the input ends, upstream errors truncate, and
//! bodies the filter cannot read are refused before any byte is relayed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_compression::tokio::bufread::{GzipDecoder, GzipEncoder};
use bytes::Bytes;
use futures::{StreamExt, stream};
use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderValue};
use nodegate_agent::prometheus::negotiate::{check_upstream, check_upstream_values};
use nodegate_agent::prometheus::{
    Decoding, Filter, FilterConfig, FilterRules, Format, Grant, Refusal, filter_body, filter_bytes,
};
use nodegate_crds::ResolvedNamespaces;
use std::io;
use std::sync::Arc;
use tokio::io::AsyncReadExt;

const BODY: &str = "\
# HELP container_cpu_usage_seconds_total Cumulative cpu time consumed.
# TYPE container_cpu_usage_seconds_total counter
container_cpu_usage_seconds_total{container=\"\",id=\"/\",namespace=\"\",pod=\"\"} 4.7 1633253812125
container_cpu_usage_seconds_total{container=\"app\",namespace=\"team-a\",pod=\"a-1\"} 1.5 1633253812125
container_cpu_usage_seconds_total{container=\"app\",namespace=\"team-b\",pod=\"b-1\"} 2.5 1633253812125
# HELP machine_memory_bytes Amount of memory installed on the machine.
# TYPE machine_memory_bytes gauge
machine_memory_bytes 1.6e+10
";

fn rules(names: &[&str]) -> Arc<FilterRules> {
    let config = FilterConfig {
        grants: vec![Grant {
            namespaces: ResolvedNamespaces {
                all: false,
                names: names.iter().map(|s| s.to_string()).collect(),
            },
            metrics: None,
        }],
    };
    Arc::new(FilterRules::new(&config).unwrap())
}

/// A body repeated until it is large enough for several encoder and decoder buffers.
fn big_body() -> Vec<u8> {
    BODY.repeat(2000).into_bytes()
}

async fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    GzipEncoder::new(data).read_to_end(&mut out).await.unwrap();
    out
}

async fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut decoder = GzipDecoder::new(data);
    decoder.multiple_members(true);
    let mut out = Vec::new();
    decoder.read_to_end(&mut out).await.unwrap();
    out
}

fn chunked(
    data: &[u8],
    size: usize,
) -> impl futures::Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    let chunks: Vec<Result<Bytes, io::Error>> = data
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    stream::iter(chunks)
}

async fn collect(
    mut body: futures::stream::BoxStream<'static, io::Result<Bytes>>,
) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[tokio::test]
async fn gzip_and_identity_upstream_give_the_same_bytes() {
    let input = big_body();
    let rules = rules(&["team-a"]);
    let (expected, _) = filter_bytes(rules.clone(), Format::Text, &input);
    assert!(!expected.is_empty() && expected.len() < input.len());
    let compressed = gzip(&input).await;
    for size in [1usize, 100, 8192] {
        let (body, stats) = filter_body(
            chunked(&input, size),
            Decoding::Identity,
            Filter::new(rules.clone(), Format::Text),
            false,
        );
        assert_eq!(
            collect(body).await.unwrap(),
            expected,
            "identity, chunks of {size}"
        );
        assert!(stats.is_complete());
        assert_eq!(stats.snapshot().samples_kept, 2000);
        assert_eq!(stats.snapshot().bytes_in, input.len() as u64);

        let (body, stats) = filter_body(
            chunked(&compressed, size),
            Decoding::Gzip,
            Filter::new(rules.clone(), Format::Text),
            false,
        );
        assert_eq!(
            collect(body).await.unwrap(),
            expected,
            "gzip, chunks of {size}"
        );
        assert!(stats.is_complete());

        let (body, _) = filter_body(
            chunked(&compressed, size),
            Decoding::Gzip,
            Filter::new(rules.clone(), Format::Text),
            true,
        );
        let regzipped = collect(body).await.unwrap();
        assert_eq!(
            gunzip(&regzipped).await,
            expected,
            "gzip out, chunks of {size}"
        );
    }
}

#[tokio::test]
async fn concatenated_gzip_members_are_all_read() {
    let rules = rules(&["team-a"]);
    let mut two = gzip(BODY.as_bytes()).await;
    two.extend(gzip(BODY.as_bytes()).await);
    let (body, _) = filter_body(
        chunked(&two, 64),
        Decoding::Gzip,
        Filter::new(rules.clone(), Format::Text),
        false,
    );
    let (expected, _) = filter_bytes(rules, Format::Text, BODY.repeat(2).as_bytes());
    assert_eq!(collect(body).await.unwrap(), expected);
}

#[tokio::test]
async fn output_flows_before_the_input_ends() {
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, io::Error>>();
    let (mut body, stats) = filter_body(
        rx,
        Decoding::Identity,
        Filter::new(rules(&["team-a"]), Format::Text),
        false,
    );
    tx.unbounded_send(Ok(Bytes::from_static(
        b"m{namespace=\"team-a\"} 1\nm{namespace=\"team-b\"} 2\nm{namespace=\"te",
    )))
    .unwrap();
    assert_eq!(
        body.next().await.unwrap().unwrap(),
        &b"m{namespace=\"team-a\"} 1\n"[..]
    );
    assert!(!stats.is_complete());
    tx.unbounded_send(Ok(Bytes::from_static(b"am-a\"} 3")))
        .unwrap();
    drop(tx);
    assert_eq!(
        body.next().await.unwrap().unwrap(),
        &b"m{namespace=\"team-a\"} 3\n"[..]
    );
    assert!(body.next().await.is_none());
    assert!(stats.is_complete());
    assert_eq!(stats.snapshot().samples_kept, 2);
}

#[tokio::test]
async fn an_upstream_error_truncates_and_drops_the_partial_line() {
    let chunks: Vec<Result<Bytes, io::Error>> = vec![
        Ok(Bytes::from_static(
            b"m{namespace=\"team-a\"} 1\nm{namespace=\"team-a\"} 2",
        )),
        Err(io::Error::other("connection reset")),
        Ok(Bytes::from_static(b"3\n")),
    ];
    let (mut body, stats) = filter_body(
        stream::iter(chunks),
        Decoding::Identity,
        Filter::new(rules(&["team-a"]), Format::Text),
        false,
    );
    assert_eq!(
        body.next().await.unwrap().unwrap(),
        &b"m{namespace=\"team-a\"} 1\n"[..]
    );
    assert!(body.next().await.unwrap().is_err());
    assert!(body.next().await.is_none());
    assert!(!stats.is_complete());
}

#[tokio::test]
async fn corrupt_gzip_is_an_error_not_a_pass_through() {
    let mut data = gzip(big_body().as_slice()).await;
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 64] {
        *b ^= 0x5a;
    }
    let (body, stats) = filter_body(
        chunked(&data, 4096),
        Decoding::Gzip,
        Filter::new(rules(&["team-a"]), Format::Text),
        false,
    );
    assert!(collect(body).await.is_err());
    assert!(!stats.is_complete());
}

#[test]
fn protobuf_text_zstd_and_unknown_bodies_are_refused() {
    let refused = |ct: &str, ce: Option<&str>| {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        if let Some(ce) = ce {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_str(ce).unwrap());
        }
        check_upstream(&headers).is_err()
    };
    // The delimited protobuf exposition is filtered (prometheus_proto.rs); its text encodings
    // are not.
    let protobuf = "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";
    assert!(!refused(protobuf, None));
    assert!(!refused(protobuf, Some("gzip")));
    assert!(refused(protobuf, Some("zstd")));
    let protobuf_text =
        "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=text";
    assert!(refused(protobuf_text, None));
    assert!(refused("text/plain; version=0.0.4", Some("zstd")));
    assert!(refused("text/plain; version=0.0.4", Some("br")));
    assert!(refused("application/octet-stream", None));
    assert!(!refused(
        "text/plain; version=0.0.4; charset=utf-8",
        Some("gzip")
    ));
    assert_eq!(
        check_upstream_values("text/plain; version=0.0.4", Some("zstd")),
        Err(Refusal::UnsupportedEncoding("zstd".into()))
    );
    assert_eq!(
        check_upstream(&HeaderMap::new()),
        Err(Refusal::MissingContentType)
    );
}
