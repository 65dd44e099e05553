//! Namespace scoping of Prometheus text exposition, on the stream.
