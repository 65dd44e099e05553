//! Every response body the simulator serves, generated once at start from the [`World`].
//!
//! Bodies are kept as `Bytes` (and, for Prometheus text, a gzip copy), so a request costs a
//! reference count and the simulator measures the agent, not itself.

pub mod cadvisor;
pub mod json;
pub mod metrics;
pub mod text;

use super::world::World;
use bytes::Bytes;

/// A pre-generated body with its content type and, when gzip is on, its gzip encoding.
#[derive(Clone, Debug)]
pub struct Payload {
    pub content_type: &'static str,
    pub body: Bytes,
    pub gzip: Option<Bytes>,
}

/// All generated bodies of one simulator.
#[derive(Clone, Debug)]
pub struct Payloads {
    pub pods: Payload,
    pub running_pods: Payload,
    pub stats_summary: Payload,
    pub stats_summary_cpu_memory: Payload,
    pub metrics: Payload,
    pub cadvisor: Payload,
    pub resource: Payload,
    pub probes: Payload,
    pub slis: Payload,
    pub configz: Payload,
}

pub const JSON: &str = "application/json";

impl Payloads {
    /// Generates every body; with `gzip`, also the gzip encodings of the Prometheus bodies.
    pub async fn generate(world: &World, scale: usize, gzip: bool) -> std::io::Result<Payloads> {
        let prom = super::prom::TEXT_CONTENT_TYPE;
        Ok(Payloads {
            pods: plain(JSON, json::pods(world).to_string()),
            running_pods: plain(JSON, json::running_pods(world).to_string()),
            stats_summary: plain(JSON, json::stats_summary(world, false).to_string()),
            stats_summary_cpu_memory: plain(JSON, json::stats_summary(world, true).to_string()),
            metrics: encoded(prom, metrics::kubelet(world, scale), gzip).await?,
            cadvisor: encoded(prom, cadvisor::generate(world, scale), gzip).await?,
            resource: encoded(prom, metrics::resource(world), gzip).await?,
            probes: encoded(prom, metrics::probes(world), gzip).await?,
            slis: encoded(prom, metrics::slis(world), gzip).await?,
            configz: plain(JSON, text::configz(world)),
        })
    }
}

fn plain(content_type: &'static str, body: String) -> Payload {
    Payload {
        content_type,
        body: Bytes::from(body),
        gzip: None,
    }
}

async fn encoded(content_type: &'static str, body: String, gzip: bool) -> std::io::Result<Payload> {
    let body = Bytes::from(body);
    let gzip = if gzip {
        Some(gzip_bytes(&body).await?)
    } else {
        None
    };
    Ok(Payload {
        content_type,
        body,
        gzip,
    })
}

pub async fn gzip_bytes(data: &[u8]) -> std::io::Result<Bytes> {
    use tokio::io::AsyncReadExt;
    let mut encoder = async_compression::tokio::bufread::GzipEncoder::new(data);
    let mut out = Vec::with_capacity(data.len() / 4);
    encoder.read_to_end(&mut out).await?;
    Ok(Bytes::from(out))
}
