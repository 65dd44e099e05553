//! Namespace scoping of Prometheus text exposition, on the stream.
//!
//! The kubelet's `/metrics/cadvisor`, `/metrics/resource`, `/metrics/probes` and `/metrics/slis`
//! carry every namespace's series; a caller gets only the samples its grants admit. The pieces:
//! - [`negotiate`]: what to ask the kubelet for (text formats only, gzip or identity) and whether
//!   its answer can be filtered at all (protobuf, zstd, br and unknown types are refused);
//! - [`Filter`]: a pure, push-based line filter over a hand-written scanner (no crate parses the
//!   exposition format on a stream with the byte offsets needed to pass lines through untouched);
//! - [`body`]: the async adapter that decodes gzip, filters and re-encodes without ever holding
//!   the whole body.

pub mod body;
mod filter;
pub mod negotiate;
mod scan;

pub use body::{FilterStatsHandle, filter_body};
pub use filter::{
    DEFAULT_MAX_LINE, Filter, FilterConfig, FilterConfigError, FilterRules, FilterStats, Grant,
    filter_bytes,
};
pub use negotiate::{Decoding, Refusal, Upstream};
pub use scan::Format;
