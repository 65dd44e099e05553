//! `kubelet-sim`: serves the kubelet API with generated payloads (see `nodegate_tests::sim`),
//! for running the agent against a predictable kubelet by hand or in benchmarks.

use anyhow::Context;
use clap::Parser;
use nodegate_tests::sim::{Sim, SimAuth, SimOptions};
use std::net::SocketAddr;
use std::path::PathBuf;

/// A simulated kubelet: every route of nodegate's endpoint catalogue, N pods in M namespaces,
/// kubelet authentication (or none), exec/attach/portForward echo.
#[derive(Parser, Debug)]
#[command(name = "kubelet-sim", version)]
struct Args {
    /// Address to listen on (port 0: pick one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:10250")]
    listen: SocketAddr,
    /// Node name (payloads, and `nodes/<name>` in SubjectAccessReviews).
    #[arg(long, default_value = "sim-node")]
    node_name: String,
    /// Number of pods on the node.
    #[arg(long, default_value_t = 30)]
    pods: usize,
    /// Namespaces the pods are spread over (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "default,kube-system,team-a"
    )]
    namespaces: Vec<String>,
    /// Serve every request without authentication or authorization.
    #[arg(long, conflicts_with = "kubeconfig")]
    allow_all: bool,
    /// Authenticate and authorize like a kubelet against this cluster (TokenReview,
    /// SubjectAccessReview; client certificates from --client-ca). Defaults to $KUBECONFIG.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Client CA bundle (PEM) for client certificates, with --tls. Defaults to the cluster CA
    /// of the kubeconfig.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Multiplies the metrics series (1: ~150 KB of cAdvisor for 30 pods; 40: ~8 MB).
    #[arg(long, default_value_t = 1)]
    payload_scale: usize,
    /// Serve HTTPS with a fresh self-signed CA, written to --ca-out (its path is printed).
    #[arg(long)]
    tls: bool,
    /// Where to write the serving CA with --tls.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Never gzip, even when the client accepts it.
    #[arg(long)]
    no_gzip: bool,
    /// Answer metrics with the protobuf content type (to test that the agent refuses it).
    #[arg(long)]
    metrics_protobuf: bool,
    /// Seed of the generated node.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

async fn cluster_auth(args: &Args) -> anyhow::Result<SimAuth> {
    let kubeconfig = match &args.kubeconfig {
        Some(p) => kube::config::Kubeconfig::read_from(p)
            .with_context(|| format!("reading {}", p.display()))?,
        None => kube::config::Kubeconfig::read().context("reading $KUBECONFIG")?,
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .context("kubeconfig")?;
    let client_ca_pem = match &args.client_ca {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => config
            .root_cert
            .as_ref()
            .map(|certs| {
                certs
                    .iter()
                    .map(|der| pem_block(der))
                    .collect::<String>()
                    .into_bytes()
            })
            .unwrap_or_default(),
    };
    let client = kube::Client::try_from(config).context("cluster client")?;
    Ok(SimAuth::Cluster {
        client,
        client_ca_pem,
    })
}

fn pem_block(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let auth = if args.allow_all {
        SimAuth::AllowAll
    } else {
        cluster_auth(&args)
            .await
            .context("cluster authentication (use --allow-all to serve without it)")?
    };
    let sim = Sim::start(SimOptions {
        listen: args.listen,
        node_name: args.node_name.clone(),
        pods: args.pods,
        namespaces: args.namespaces.clone(),
        auth,
        payload_scale: args.payload_scale,
        tls: args.tls,
        gzip: !args.no_gzip,
        metrics_protobuf: args.metrics_protobuf,
        seed: args.seed,
        ..SimOptions::default()
    })
    .await?;
    if let Some(ca) = &sim.ca_pem {
        let path = args.ca_out.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("kubelet-sim-{}-ca.crt", sim.addr.port()))
        });
        std::fs::write(&path, ca).with_context(|| format!("writing {}", path.display()))?;
        println!("serving CA: {}", path.display());
    }
    let sizes = sim.payloads();
    println!(
        "kubelet-sim serving {} ({} pods in {} namespaces; /metrics/cadvisor {} bytes, /pods {} bytes)",
        sim.url(),
        sim.world().pods.len(),
        sim.world().namespaces().len(),
        sizes.cadvisor.body.len(),
        sizes.pods.body.len()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    Ok(())
}
