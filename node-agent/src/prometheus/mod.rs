//! Namespace scoping of Prometheus exposition (text, OpenMetrics and protobuf), on the stream.
//!
//! The kubelet's `/metrics/cadvisor`, `/metrics/resource`, `/metrics/probes` and `/metrics/slis`
//! carry every namespace's series; a caller gets only the samples its grants admit. The pieces:
//! - [`negotiate`]: what to ask the kubelet for (protobuf when the caller prefers it, else the
//!   text formats; gzip or identity) and whether its answer can be filtered at all (zstd, br,
//!   UTF-8 text names and unknown types are refused);
//! - [`Filter`]: a pure, push-based line filter over a hand-written scanner (no crate parses the
//!   exposition format on a stream with the byte offsets needed to pass lines through untouched);
//! - [`ProtoFilter`]: the same scoping over the delimited protobuf `MetricFamily` stream, one
//!   family at a time (Prometheus asks for it first: only it carries native histograms);
//! - [`body`]: the async adapter that decodes gzip, filters and re-encodes without ever holding
//!   the whole body.

pub mod body;
mod filter;
pub mod negotiate;
mod proto;
mod scan;

pub use body::{BodyFilter, FilterStatsHandle, filter_body};
pub use filter::{
    DEFAULT_MAX_LINE, Filter, FilterConfig, FilterConfigError, FilterRules, FilterStats, Grant,
    filter_bytes,
};
pub use negotiate::{Decoding, Exposition, Refusal, Upstream};
pub use proto::{DEFAULT_MAX_FAMILY, ProtoError, ProtoFilter, filter_proto_bytes};
pub use scan::Format;
