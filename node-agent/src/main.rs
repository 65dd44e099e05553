//! nodegate-agent: serves the kubelet API on a node (see `docs/agent.md`), or explains what it
//! would decide for a request (`nodegate-agent explain`).

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use nodegate_agent::authn::{
    Authenticator, AuthnSettings, BoxFuture, ReviewOutcome, TokenReviewer, parse_audiences,
};
use nodegate_agent::components::{self, ComponentConfigError, ComponentFlags, ComponentSettings};
use nodegate_agent::config::{
    self, ApiSourceSettings, ConfigSource, ConfigSourceFlag, ConfigStore, NodeIdentity,
};
use nodegate_agent::connection::{self, ConnectionSettings};
use nodegate_agent::explain::{Question, explain};
use nodegate_agent::kubelet_access::KubeletAccess;
use nodegate_agent::metrics::Metrics;
use nodegate_agent::server::{self, AuthorizationMode, Components, Settings};
use nodegate_agent::tls::{ReloadingTls, TlsSettings};
use nodegate_agent::upstream::{Upstream, UpstreamSettings};
use nodegate_agent::webhook::{CachedReviewer, KubeAccessReviewer};
use nodegate_crds::{NodeAgentConfig, Port};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Serves the kubelet API on a node: authenticates, authorizes by NodeApiPolicy, proxies to the
/// kubelet and filters responses to the caller's namespaces.
#[derive(Parser)]
#[command(
    name = "nodegate-agent",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Prints, as JSON, what the agent would decide for a request: its attributes, the
    /// decision, the rule that decided and the namespaces the answer would be filtered to.
    Explain(ExplainArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// This node's name (the NodeAgentConfig of the same name is enforced, see `--instance`).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The operator's `--instance`, when it runs as a named one: this node's NodeAgentConfig
    /// is then `<instance>.<node>`, not the node's name.
    #[arg(long, env = "NODEGATE_INSTANCE", value_parser = nodegate_compiler::parse_instance)]
    instance: Option<String>,
    /// This node's IP: the default kubelet address and a name in the self-signed certificate.
    #[arg(long, env = "NODE_IP")]
    node_ip: Option<IpAddr>,
    /// Kubeconfig for the API server; in-cluster configuration when absent.
    #[arg(long, env = "NODEGATE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address of the secure (TLS) listener.
    #[arg(long, env = "NODEGATE_BIND_ADDRESS", default_value = "0.0.0.0")]
    bind_address: IpAddr,
    #[arg(long, env = "NODEGATE_SECURE_PORT", default_value_t = 10350)]
    secure_port: u16,
    /// Plain-HTTP anonymous read-only port (GET only, read-only endpoints); 0 disables it.
    #[arg(long, env = "NODEGATE_READ_ONLY_PORT", default_value_t = 10355)]
    read_only_port: u16,
    /// Port of /healthz, /livez, /readyz and /metrics; 0 disables it.
    #[arg(long, env = "NODEGATE_HEALTHZ_PORT", default_value_t = 10348)]
    healthz_port: u16,
    #[arg(long, env = "NODEGATE_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0")]
    healthz_bind_address: IpAddr,
    /// The kubelet; default `https://$NODE_IP:10250`.
    #[arg(long, env = "NODEGATE_UPSTREAM")]
    upstream: Option<http::Uri>,
    /// CA bundle verifying the kubelet's serving certificate.
    #[arg(long, env = "NODEGATE_UPSTREAM_CA_FILE")]
    upstream_ca_file: Option<PathBuf>,
    /// Do not verify the kubelet's serving certificate (logged at startup).
    #[arg(long, env = "NODEGATE_UPSTREAM_INSECURE_SKIP_TLS_VERIFY")]
    upstream_insecure_skip_tls_verify: bool,
    /// Name checked in the kubelet's certificate when it differs from the upstream host (a
    /// self-signed kubelet certificate names the host, not its IP).
    #[arg(long, env = "NODEGATE_UPSTREAM_SERVER_NAME")]
    upstream_server_name: Option<String>,
    /// Bearer token file for the kubelet (re-read when it rotates).
    #[arg(
        long,
        env = "NODEGATE_UPSTREAM_TOKEN_FILE",
        conflicts_with = "upstream_client_cert_file"
    )]
    upstream_token_file: Option<PathBuf>,
    #[arg(
        long,
        env = "NODEGATE_UPSTREAM_CLIENT_CERT_FILE",
        requires = "upstream_client_key_file"
    )]
    upstream_client_cert_file: Option<PathBuf>,
    #[arg(
        long,
        env = "NODEGATE_UPSTREAM_CLIENT_KEY_FILE",
        requires = "upstream_client_cert_file"
    )]
    upstream_client_key_file: Option<PathBuf>,
    /// The kubelet subresources of `nodes` the agent's credential is granted (comma-separated:
    /// proxy, stats, metrics, log, checkpoint, pods, healthz, configz, statusz). Requests that
    /// need another are refused with 403 and never sent upstream. The default is the chart's
    /// default grant, without `proxy` (exec, attach, portForward, run, containerLogs, pprof)
    /// and `checkpoint`: RBAC cannot bind the credential to one node, so it works on every
    /// node (docs/security.md).
    #[arg(long, env = "NODEGATE_KUBELET_ACCESS", default_value = nodegate_agent::kubelet_access::DEFAULT_FLAG)]
    kubelet_access: KubeletAccess,
    /// The node's other components to serve under `/components/<name>/…` (comma-separated:
    /// kube-proxy, kube-controller-manager, kube-scheduler, etcd). None by default: the agent
    /// offers its token only to ports an installation named (docs/components.md).
    #[arg(long, env = "NODEGATE_COMPONENTS", default_value = "")]
    components: String,
    /// `NAME=URL`: where a component upstream listens, instead of kubeadm's loopback default
    /// (NAME: kube-proxy 10249, kube-proxy-healthz 10256, kube-controller-manager 10257,
    /// kube-scheduler 10259, etcd 2381). Repeatable or comma-separated.
    #[arg(
        long = "component-upstream",
        env = "NODEGATE_COMPONENT_UPSTREAMS",
        value_delimiter = ','
    )]
    component_upstreams: Vec<String>,
    /// A YAML file of per-node upstream URLs (node name → upstream name → URL): this node's
    /// entry overrides `--component-upstream` (the chart writes it from
    /// `agent.components.nodeUpstreams`). A node it does not name keeps the installation's URLs.
    #[arg(long, env = "NODEGATE_COMPONENT_NODE_UPSTREAMS_FILE")]
    component_node_upstreams_file: Option<PathBuf>,
    /// `NAME=PATH`: CA bundle verifying an https component upstream's serving certificate.
    #[arg(
        long = "component-ca-file",
        env = "NODEGATE_COMPONENT_CA_FILES",
        value_delimiter = ','
    )]
    component_ca_files: Vec<String>,
    /// Component upstreams whose serving certificate is not verified (kubeadm's controller
    /// manager and scheduler serve a self-signed certificate made in memory; logged at
    /// startup). Repeatable or comma-separated.
    #[arg(
        long = "component-insecure-skip-tls-verify",
        env = "NODEGATE_COMPONENT_INSECURE_SKIP_TLS_VERIFY",
        value_delimiter = ','
    )]
    component_insecure_skip_tls_verify: Vec<String>,
    /// The agent's token for kube-controller-manager and kube-scheduler (which review it with
    /// the API server); default `--upstream-token-file`.
    #[arg(long, env = "NODEGATE_COMPONENT_TOKEN_FILE")]
    component_token_file: Option<PathBuf>,
    /// Client certificate for etcd's client port (`--component-upstream etcd=https://…:2379`).
    #[arg(
        long,
        env = "NODEGATE_ETCD_CLIENT_CERT_FILE",
        requires = "etcd_client_key_file"
    )]
    etcd_client_cert_file: Option<PathBuf>,
    #[arg(
        long,
        env = "NODEGATE_ETCD_CLIENT_KEY_FILE",
        requires = "etcd_client_cert_file"
    )]
    etcd_client_key_file: Option<PathBuf>,
    #[arg(
        long,
        env = "NODEGATE_AUTHORIZATION_MODE",
        value_enum,
        default_value = "Policy"
    )]
    authorization_mode: AuthorizationMode,
    /// Serving certificate (PEM chain); a self-signed one is made when absent.
    #[arg(
        long,
        env = "NODEGATE_TLS_CERT_FILE",
        requires = "tls_private_key_file"
    )]
    tls_cert_file: Option<PathBuf>,
    #[arg(
        long,
        env = "NODEGATE_TLS_PRIVATE_KEY_FILE",
        requires = "tls_cert_file"
    )]
    tls_private_key_file: Option<PathBuf>,
    /// Obtain the serving certificate from this signer (e.g. `nodegate.io/agent-serving`, the
    /// operator's `--signer-name`) through a CertificateSigningRequest filed with the agent's
    /// own pod-bound token, for its Node's addresses; renewed at two thirds of its lifetime
    /// and swapped in without a restart. Until it is issued, a self-signed one is served.
    #[arg(
        long,
        env = "NODEGATE_SERVING_CERT_SIGNER",
        conflicts_with = "tls_cert_file"
    )]
    serving_cert_signer: Option<String>,
    /// Lifetime asked for the signer's certificate, in seconds (at least 600; the signer may
    /// issue shorter ones).
    #[arg(
        long,
        env = "NODEGATE_SERVING_CERT_DURATION_SECONDS",
        default_value_t = 86400
    )]
    serving_cert_duration_seconds: u64,
    /// CA that client certificates must chain to; without it, client certificates are not
    /// used for authentication.
    #[arg(long, env = "NODEGATE_CLIENT_CA_FILE")]
    client_ca_file: Option<PathBuf>,
    /// Audiences bearer tokens must be valid for (comma-separated); empty: the API server's.
    #[arg(
        long,
        env = "NODEGATE_AUTHENTICATION_TOKEN_AUDIENCES",
        default_value = ""
    )]
    authentication_token_audiences: String,
    /// Where the rules come from: `api` (this node's NodeAgentConfig) or `file:PATH`.
    #[arg(long, env = "NODEGATE_CONFIG_SOURCE", default_value = "api")]
    config_source: ConfigSourceFlag,
    /// This node's labels (`k=v,k2=v2`) for the `nodeSelector` of policies in a `file:` config
    /// source. Without it they are read from the node's Node object and watched, and the file
    /// is compiled again when they change.
    #[arg(long, env = "NODEGATE_NODE_LABELS")]
    node_labels: Option<String>,
    /// Largest kubelet JSON document (pods, stats) the agent filters.
    #[arg(long, env = "NODEGATE_MAX_JSON_BYTES", default_value_t = nodegate_agent::json_filter::DEFAULT_MAX_JSON_BYTES)]
    max_json_bytes: usize,
    /// Bytes all JSON filtering (pods, stats) may hold at once: each answer is charged about
    /// twice its size while it is filtered. A request that cannot get its share within 2 s, or
    /// outgrows the budget, is answered 503 with Retry-After. Default: half the memory limit
    /// of the agent's cgroup (256 MiB under the chart's 512 MiB), 256 MiB without a limit.
    #[arg(long, env = "NODEGATE_JSON_MEMORY_BUDGET_BYTES")]
    json_memory_budget_bytes: Option<usize>,
    /// Open connections per listener (secure, read-only, healthz); past it a new connection
    /// is closed on arrival, logged and counted (nodegate_agent_connections_refused_total).
    #[arg(long, env = "NODEGATE_MAX_CONNECTIONS", default_value_t = connection::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Seconds a connection (HTTP/1.1 or HTTP/2) may stay open with no request in flight. A
    /// request is in flight until its response ends, so followed logs and exec are not cut.
    #[arg(long, env = "NODEGATE_IDLE_TIMEOUT_SECONDS", default_value_t = connection::DEFAULT_IDLE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_seconds: u64,
    /// Seconds an HTTP/1.1 client has to send a request's headers.
    #[arg(long, env = "NODEGATE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = connection::DEFAULT_HEADER_READ_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_seconds: u64,
    /// Seconds between HTTP/2 keep-alive PINGs.
    #[arg(long, env = "NODEGATE_HTTP2_KEEPALIVE_INTERVAL_SECONDS", default_value_t = connection::DEFAULT_KEEP_ALIVE_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    http2_keepalive_interval_seconds: u64,
    /// Seconds an HTTP/2 PING may go unanswered before the connection is closed.
    #[arg(long, env = "NODEGATE_HTTP2_KEEPALIVE_TIMEOUT_SECONDS", default_value_t = connection::DEFAULT_KEEP_ALIVE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    http2_keepalive_timeout_seconds: u64,
    /// Streams an HTTP/2 client may have open at once on one connection.
    #[arg(long, env = "NODEGATE_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = connection::DEFAULT_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    http2_max_concurrent_streams: u32,
    /// Largest request header section in bytes (HTTP/2 header list; HTTP/1.1 read buffer, at
    /// least 8192).
    #[arg(long, env = "NODEGATE_MAX_HEADER_BYTES", default_value_t = connection::DEFAULT_MAX_HEADER_BYTES, value_parser = clap::value_parser!(u32).range(1024..))]
    max_header_bytes: u32,
    /// Worker threads of the async runtime. Default: the CPUs this process may use (its
    /// cgroup's CPU limit included, so the chart's 1-CPU limit gives one thread). Fewer threads
    /// wake each other less, so on a node whose cores the kubelet shares one thread costs less
    /// CPU per request (the `1 thread(s)` and `2 threads` rows of docs/BENCHMARKS.md).
    #[arg(long, env = "NODEGATE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    /// Log lines as JSON (the audit line included).
    #[arg(long, env = "NODEGATE_LOG_JSON", default_value_t = true, action = clap::ArgAction::Set)]
    log_json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum PortArg {
    Secure,
    ReadOnly,
}

#[derive(Args)]
struct ExplainArgs {
    /// A NodeAgentConfig or NodeApiPolicy YAML file; without it, the node's NodeAgentConfig is
    /// read from the cluster (`--kubeconfig`, `--node-name`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, env = "NODEGATE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// The operator's `--instance`, when it runs as a named one: this node's NodeAgentConfig
    /// is then `<instance>.<node>`, not the node's name.
    #[arg(long, env = "NODEGATE_INSTANCE", value_parser = nodegate_compiler::parse_instance)]
    instance: Option<String>,
    /// The node's labels (`k=v,k2=v2`) for policies' `nodeSelector` with `--config`; without
    /// it they are read from the cluster's Node `--node-name` when it can be reached.
    #[arg(long)]
    node_labels: Option<String>,
    #[arg(long, default_value = "system:anonymous")]
    user: String,
    #[arg(long = "group")]
    groups: Vec<String>,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, value_enum, default_value = "secure")]
    port: PortArg,
    /// `websocket` or `SPDY/3.1` for streaming requests.
    #[arg(long)]
    upgrade: Option<String>,
    /// The request target, e.g. `/containerLogs/team-a/web/nginx?tailLines=10`.
    target: String,
}

/// Refuses every token: used when the agent has no API server to review them with.
struct NoReviews;

impl TokenReviewer for NoReviews {
    fn review<'a>(
        &'a self,
        _: &'a str,
        _: &'a [String],
    ) -> BoxFuture<'a, Result<ReviewOutcome, String>> {
        Box::pin(async { Err("no API server configured to review tokens".to_string()) })
    }
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let workers = cli.serve.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    match cli.command {
        Some(Command::Explain(args)) => runtime.block_on(run_explain(args)),
        None => {
            init_logging(cli.serve.log_json);
            runtime.block_on(serve(cli.serve))
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn run_explain(args: ExplainArgs) -> anyhow::Result<()> {
    let spec = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let node = explain_node(&args).await?;
            config::parse_config_file(&text, &node)?
        }
        None => {
            if args.node_name.is_empty() {
                bail!("give --config FILE, or --node-name to read the node's NodeAgentConfig");
            }
            let client = kube_client(args.kubeconfig.as_ref()).await?;
            let api: kube::Api<NodeAgentConfig> = kube::Api::all(client.clone());
            let name = nodegate_compiler::config_name(&args.node_name, args.instance.as_deref());
            let spec = api
                .get(&name)
                .await
                .with_context(|| format!("reading NodeAgentConfig {name}"))?
                .spec;
            // The rules of the rule set it names, as its agent enforces them.
            match &spec.rule_set {
                Some(set) => {
                    let sets: kube::Api<nodegate_crds::NodeAgentRuleSet> = kube::Api::all(client);
                    sets.get(set)
                        .await
                        .with_context(|| {
                            format!(
                                "reading NodeAgentRuleSet {set}, which NodeAgentConfig {name} \
                                 names"
                            )
                        })?
                        .spec
                        .0
                }
                None => spec,
            }
        }
    };
    let question = Question {
        user: args.user,
        groups: args.groups,
        method: args.method,
        port: match args.port {
            PortArg::Secure => Port::Secure,
            PortArg::ReadOnly => Port::ReadOnly,
        },
        target: args.target,
        upgrade: args.upgrade,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&explain(&spec, &question))?
    );
    Ok(())
}

/// The node `explain --config` compiles policies for: labels from `--node-labels`, else from
/// the cluster's Node, else none (said on stderr: `nodeSelector` policies then match nothing).
async fn explain_node(args: &ExplainArgs) -> anyhow::Result<NodeIdentity> {
    let unlabelled = NodeIdentity {
        name: args.node_name.clone(),
        ..Default::default()
    };
    if let Some(flag) = &args.node_labels {
        return Ok(NodeIdentity {
            labels: config::parse_node_labels(flag).map_err(anyhow::Error::msg)?,
            ..unlabelled
        });
    }
    if args.node_name.is_empty() {
        eprintln!("note: no --node-name: nodeSelector policies match nothing");
        return Ok(unlabelled);
    }
    let fetched = match kube_client(args.kubeconfig.as_ref()).await {
        Ok(client) => NodeIdentity::fetch(&client, &args.node_name)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    match fetched {
        Ok(node) => Ok(node),
        Err(e) => {
            eprintln!(
                "note: the labels of node {:?} could not be read ({e}); give --node-labels: \
                 nodeSelector policies match nothing",
                args.node_name
            );
            Ok(unlabelled)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let Some(node_name) = args.node_name.clone().filter(|n| !n.is_empty()) else {
        bail!("--node-name (or NODE_NAME) is required");
    };
    let upstream_url = match (&args.upstream, args.node_ip) {
        (Some(url), _) => url.clone(),
        (None, Some(ip)) => {
            let host = if ip.is_ipv6() {
                format!("[{ip}]")
            } else {
                ip.to_string()
            };
            format!("https://{host}:10250").parse()?
        }
        (None, None) => bail!("give --upstream or --node-ip (NODE_IP)"),
    };
    let mut upstream = UpstreamSettings::new(upstream_url);
    upstream.ca_file = args.upstream_ca_file.clone();
    upstream.insecure_skip_tls_verify = args.upstream_insecure_skip_tls_verify;
    upstream.server_name = args.upstream_server_name.clone();
    upstream.token_file = args.upstream_token_file.clone();
    upstream.client_cert_file = args.upstream_client_cert_file.clone();
    upstream.client_key_file = args.upstream_client_key_file.clone();
    if upstream.insecure_skip_tls_verify && upstream.url.scheme_str() == Some("https") {
        // Said here, not in `Upstream::new`: component upstreams say so in their own words.
        tracing::warn!(upstream = %upstream.url, "kubelet serving certificate is NOT verified (--upstream-insecure-skip-tls-verify)");
    }
    let upstream = Upstream::new(&upstream)?;
    let components = component_settings(&args, &node_name)?;

    let tls = ReloadingTls::new(TlsSettings {
        cert_file: args.tls_cert_file.clone(),
        key_file: args.tls_private_key_file.clone(),
        client_ca_file: args.client_ca_file.clone(),
        node_name: node_name.clone(),
        node_ips: args.node_ip.into_iter().collect(),
        alpn_protocols: TlsSettings::default_alpn(),
    })?;

    let client = match kube_client(args.kubeconfig.as_ref()).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "no API server client: tokens cannot be reviewed");
            None
        }
    };
    if let Some(signer_name) = &args.serving_cert_signer {
        let Some(c) = &client else {
            bail!("--serving-cert-signer needs an API server");
        };
        tokio::spawn(nodegate_agent::serving_cert::run(
            c.clone(),
            nodegate_agent::serving_cert::ServingCertSettings {
                signer_name: signer_name.clone(),
                node_name: node_name.clone(),
                requested_duration: Duration::from_secs(args.serving_cert_duration_seconds),
                wait: Duration::from_secs(300),
            },
            tls.clone(),
        ));
    }
    let authn_settings = AuthnSettings {
        audiences: parse_audiences(&args.authentication_token_audiences),
        x509_enabled: tls.client_ca_configured(),
        ..Default::default()
    };
    let authenticator = match &client {
        Some(c) => Authenticator::with_client(c.clone(), authn_settings),
        None => Authenticator::new(Arc::new(NoReviews), authn_settings),
    };
    let access_reviewer = match (&client, args.authorization_mode) {
        (_, AuthorizationMode::Policy) => None,
        (Some(c), _) => Some(
            Arc::new(CachedReviewer::new(Arc::new(KubeAccessReviewer::new(
                c.clone(),
            )))) as Arc<dyn nodegate_agent::webhook::AccessReviewer>,
        ),
        (None, mode) => bail!("--authorization-mode {mode:?} needs an API server"),
    };

    let store = ConfigStore::new();
    let source = match &args.config_source {
        ConfigSourceFlag::File(path) => ConfigSource::File(path.clone()),
        ConfigSourceFlag::Api => match &client {
            Some(c) => ConfigSource::Api { client: c.clone() },
            None => bail!("--config-source api needs an API server"),
        },
    };
    let expiry_tls = tls.clone();
    let source_settings = ApiSourceSettings {
        config_name: nodegate_compiler::config_name(&node_name, args.instance.as_deref()),
        serving_cert_expiry: Some(Arc::new(move || expiry_tls.serving_cert_expiry())),
        status_interval: Duration::from_secs(60),
        components: Some(components.presence.clone()),
    };
    let unlabelled = NodeIdentity {
        name: node_name.clone(),
        ..Default::default()
    };
    let node = match (&args.config_source, &args.node_labels, &client) {
        // The API source reads rules the operator compiled: it needs no labels.
        (ConfigSourceFlag::Api, _, _) => config::fixed_node(unlabelled),
        (ConfigSourceFlag::File(_), Some(flag), _) => config::fixed_node(NodeIdentity {
            labels: config::parse_node_labels(flag).map_err(anyhow::Error::msg)?,
            ..unlabelled
        }),
        (ConfigSourceFlag::File(_), None, Some(c)) => {
            config::watch_node(c.clone(), node_name.clone())
        }
        (ConfigSourceFlag::File(_), None, None) => {
            tracing::warn!(
                "no API server and no --node-labels: nodeSelector policies match nothing"
            );
            config::fixed_node(unlabelled)
        }
    };
    tokio::spawn(config::run(
        source,
        store.clone(),
        node,
        source_settings,
        Duration::from_secs(5),
    ));
    tokio::spawn(tls.clone().run_reload_loop(Duration::from_secs(60)));

    let json_budget_bytes = args
        .json_memory_budget_bytes
        .unwrap_or_else(nodegate_agent::memory_budget::default_budget_bytes);
    tracing::info!(
        json_budget_bytes,
        "JSON filtering memory budget (--json-memory-budget-bytes)"
    );
    let port = |p: u16, ip: IpAddr| (p != 0).then(|| SocketAddr::new(ip, p));
    let settings = Settings {
        node_name,
        secure_addr: SocketAddr::new(args.bind_address, args.secure_port),
        read_only_addr: port(args.read_only_port, args.bind_address),
        healthz_addr: port(args.healthz_port, args.healthz_bind_address),
        authorization_mode: args.authorization_mode,
        max_json_bytes: args.max_json_bytes,
        kubelet_access: args.kubelet_access.clone(),
        json_budget_bytes,
        connections: ConnectionSettings {
            max_connections: args.max_connections as usize,
            idle_timeout: Duration::from_secs(args.idle_timeout_seconds),
            header_read_timeout: Duration::from_secs(args.header_read_timeout_seconds),
            keep_alive_interval: Duration::from_secs(args.http2_keepalive_interval_seconds),
            keep_alive_timeout: Duration::from_secs(args.http2_keepalive_timeout_seconds),
            max_concurrent_streams: args.http2_max_concurrent_streams,
            max_header_bytes: args.max_header_bytes,
        },
        components,
    };
    let running = server::start(
        settings,
        Components {
            tls,
            authenticator,
            config: store,
            upstream,
            access_reviewer,
            metrics: Metrics::new(),
        },
    )
    .await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = running.wait() => bail!("a listener stopped"),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: shutting down");
            Ok(())
        }
        _ = terminate.recv() => {
            tracing::info!("terminated: shutting down");
            Ok(())
        }
    }
}

/// The component upstreams from the `--component*` and `--etcd-client-*` flags.
fn component_settings(args: &ServeArgs, node: &str) -> anyhow::Result<ComponentSettings> {
    let mut flags = ComponentFlags {
        enabled: components::parse_components(&args.components)?,
        token_file: args
            .component_token_file
            .clone()
            .or_else(|| args.upstream_token_file.clone()),
        etcd_client_cert_file: args.etcd_client_cert_file.clone(),
        etcd_client_key_file: args.etcd_client_key_file.clone(),
        ..Default::default()
    };
    for item in args
        .component_upstreams
        .iter()
        .filter(|s| !s.trim().is_empty())
    {
        let (upstream, url) = components::parse_assignment(item)?;
        let url: http::Uri = url
            .parse()
            .map_err(|_| ComponentConfigError::BadUrl(upstream, url.clone()))?;
        flags.urls.push((upstream, url));
    }
    if let Some(path) = &args.component_node_upstreams_file {
        let document = std::fs::read_to_string(path).with_context(|| {
            format!("reading --component-node-upstreams-file {}", path.display())
        })?;
        let overrides = components::node_upstreams(&document, node)
            .with_context(|| format!("in {}", path.display()))?;
        for (upstream, url) in &overrides {
            tracing::info!(node, %upstream, %url, "component upstream set for this node");
        }
        flags.urls.extend(overrides);
    }
    for item in args
        .component_ca_files
        .iter()
        .filter(|s| !s.trim().is_empty())
    {
        let (upstream, path) = components::parse_assignment(item)?;
        flags.ca_files.push((upstream, PathBuf::from(path)));
    }
    for name in args
        .component_insecure_skip_tls_verify
        .iter()
        .filter(|s| !s.trim().is_empty())
    {
        flags
            .insecure_skip_tls_verify
            .push(components::parse_upstream(name)?);
    }
    let settings = ComponentSettings::from_flags(&flags)?;
    for (upstream, s) in &settings.upstreams {
        tracing::info!(
            component = %upstream.component(),
            %upstream,
            url = %s.url,
            credential = upstream.credential().describe(),
            "serving a node component"
        );
    }
    Ok(settings)
}
