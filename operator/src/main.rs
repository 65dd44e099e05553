//! nodegate-operator binary: flags and environment in, controller out.

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use nodegate_operator::controller::{self, LeaderSettings, Metrics, Settings};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Reconciles NodeApiPolicy objects into ClusterRoles, bindings, ServiceAccounts and one
/// NodeAgentConfig per node.
///
/// `run` (the default) watches policies, nodes, namespaces and the objects it generated, and
/// writes only what differs from the compiled policies in the fields it owns (field manager
/// `nodegate`; fields other managers add are left alone): new objects by create, its own by
/// server-side apply. It never overwrites an object it does not own (label
/// app.kubernetes.io/managed-by=nodegate): the policy reports it in its RBACApplied condition.
/// Run two replicas with leader election for failover. Every flag can be set by the
/// environment variable shown.
#[derive(Parser)]
#[command(name = "nodegate-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

// Parsed once at startup: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the controller (the default).
    Run(RunArgs),
    /// Print, as YAML, every object the operator would write for the given policies, offline:
    /// review a policy's effect in a pull request. Policies are checked by the CRD's own rules.
    Render(nodegate_operator::render::RenderArgs),
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "NODEGATE_METRICS_BIND_ADDRESS",
        default_value = "0.0.0.0:8080"
    )]
    metrics_bind_address: SocketAddr,

    /// Log format.
    #[arg(long, env = "NODEGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `nodegate_operator=debug`.
    #[arg(long, env = "NODEGATE_LOG", default_value = "info")]
    log: String,

    /// Elect a leader among replicas with a Lease; without it this replica always reconciles
    /// (run exactly one).
    #[arg(long, env = "NODEGATE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "NODEGATE_LEASE_NAME", default_value = "nodegate-operator")]
    lease_name: String,

    /// Namespace of the Lease; defaults to the pod's namespace (POD_NAMESPACE) or
    /// nodegate-system.
    #[arg(long, env = "POD_NAMESPACE", default_value = "nodegate-system")]
    lease_namespace: String,

    /// This replica's identity in the Lease and in Events; defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Seconds a standby waits after it last saw the lease renewed before taking it over:
    /// the longest failover after a crash (plus up to a retry period to see the last renewal).
    #[arg(long, env = "NODEGATE_LEASE_DURATION", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// The leader sends no write unless it renewed the lease within this many seconds, and
    /// steps down (the process exits, to restart as a standby) when a renewal has not
    /// succeeded for this long. Less than --lease-duration-seconds: the difference covers
    /// requests in flight.
    #[arg(long, env = "NODEGATE_LEASE_RENEW_DEADLINE", default_value_t = 10)]
    lease_renew_deadline_seconds: u64,

    /// Seconds between the leader's renewals and a standby's attempts to take the lease.
    /// Less than --lease-renew-deadline-seconds.
    #[arg(long, env = "NODEGATE_LEASE_RETRY_PERIOD", default_value_t = 2)]
    lease_retry_period_seconds: u64,

    /// /healthz fails when the leader's reconcile loop, in a round (or waiting for its caches
    /// after winning the lease), has sent no write for longer than this, so a liveness probe
    /// restarts a stuck replica. A long round that keeps writing, waiting idle and standing by
    /// are healthy.
    #[arg(long, env = "NODEGATE_HEALTHZ_STALL_SECONDS", default_value_t = 120)]
    healthz_stall_seconds: u64,

    /// Reconcile only NodeApiPolicies matching this label selector.
    #[arg(long, env = "NODEGATE_POLICY_SELECTOR")]
    policy_selector: Option<String>,

    /// Only nodes matching this label selector get a NodeAgentConfig and count for policies.
    #[arg(long, env = "NODEGATE_NODE_SELECTOR")]
    node_selector: Option<String>,

    /// Run as a named instance: outputs carry nodegate.io/instance=<name> and instances never
    /// touch each other's objects (for canaries and tests; leave unset in production).
    #[arg(long, env = "NODEGATE_INSTANCE", value_parser = nodegate_compiler::parse_instance)]
    instance: Option<String>,

    /// Milliseconds of quiet after a change before a reconcile round starts.
    #[arg(long, env = "NODEGATE_DEBOUNCE_MS", default_value_t = 200)]
    debounce_ms: u64,

    /// Milliseconds after the first of a stream of changes that never goes quiet before a
    /// round starts anyway.
    #[arg(long, env = "NODEGATE_DEBOUNCE_MAX_MS", default_value_t = 2000)]
    debounce_max_ms: u64,

    /// Seconds between rounds when nothing changes (a round with nothing to do sends no
    /// request).
    #[arg(long, env = "NODEGATE_RESYNC_SECONDS", default_value_t = 600)]
    resync_seconds: u64,

    /// Write requests in flight at once.
    #[arg(long, env = "NODEGATE_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,

    /// First retry delay of an object whose write failed, in milliseconds; doubles per
    /// failure.
    #[arg(long, env = "NODEGATE_BACKOFF_BASE_MS", default_value_t = 500)]
    backoff_base_ms: u64,

    /// Longest retry delay, in seconds. A stale binding the API server would not delete still
    /// grants until a retry succeeds, so the cap is also how late a revocation can land once
    /// the refusal is lifted.
    #[arg(long, env = "NODEGATE_BACKOFF_MAX_SECONDS", default_value_t = 60)]
    backoff_max_seconds: u64,

    /// Publish Events (events.k8s.io) for applies, conflicts and errors.
    #[arg(long, env = "NODEGATE_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    events: bool,

    #[command(flatten)]
    signer: SignerArgs,
}

/// The agents' serving-certificate signer (operator/src/signer.rs). It runs on every replica:
/// its writes are optimistic, so racing replicas cannot both issue.
#[derive(Args, Clone)]
struct SignerArgs {
    /// The signerName whose CertificateSigningRequests this operator approves and signs (the
    /// agents' `--serving-cert-signer`); empty disables the signer.
    #[arg(long, env = "NODEGATE_SIGNER_NAME", default_value = "")]
    signer_name: String,
    /// The agents' service account (`namespace:name`): the only requester approved.
    #[arg(
        long,
        env = "NODEGATE_SIGNER_AGENT_SERVICE_ACCOUNT",
        default_value = ""
    )]
    signer_agent_service_account: String,
    /// Secret (in the operator's namespace) with the CA's `tls.crt` and `tls.key`; created with
    /// a new CA when absent, never overwritten.
    #[arg(
        long,
        env = "NODEGATE_SIGNER_CA_SECRET",
        default_value = "nodegate-agent-serving-ca"
    )]
    signer_ca_secret: String,
    /// ConfigMap (in the operator's namespace) the CA bundle is published in, key `ca.crt`.
    #[arg(
        long,
        env = "NODEGATE_SIGNER_BUNDLE_CONFIGMAP",
        default_value = "nodegate-agent-serving-ca"
    )]
    signer_bundle_configmap: String,
    /// Longest certificate issued, in seconds (a request's expirationSeconds may ask less).
    #[arg(
        long,
        env = "NODEGATE_SIGNER_MAX_DURATION_SECONDS",
        default_value_t = 86400
    )]
    signer_max_duration_seconds: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Run(args)) => args,
        Some(Command::Render(args)) => return render(args),
        None => cli.run,
    };
    init_logging(&args)?;
    // At least two workers, also under a 1-CPU limit (one worker by default): a round's
    // synchronous stretches (planning thousands of objects) must never hold up the lease
    // renewals, or the leader exits at its renew deadline.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

fn render(args: nodegate_operator::render::RenderArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let yaml = runtime.block_on(nodegate_operator::render::render(args))?;
    print!("{yaml}");
    Ok(())
}

fn init_logging(args: &RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("invalid --log filter {:?}", args.log))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("nodegate-operator-{}", std::process::id()));
    let settings = Settings {
        policy_selector: args.policy_selector.clone(),
        node_selector: args.node_selector.clone(),
        instance: args.instance.clone(),
        debounce: Duration::from_millis(args.debounce_ms),
        debounce_max: Duration::from_millis(args.debounce_max_ms),
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        concurrency: args.concurrency.max(1),
        backoff_base: Duration::from_millis(args.backoff_base_ms.max(1)),
        backoff_max: Duration::from_secs(args.backoff_max_seconds.max(1)),
        events: args.events,
        reporter: "nodegate-operator".into(),
        reporter_instance: Some(identity.clone()),
        stall_after: Duration::from_secs(args.healthz_stall_seconds.max(1)),
    };
    let leader = args.leader_elect.then(|| LeaderSettings {
        lease_name: args.lease_name.clone(),
        lease_namespace: args.lease_namespace.clone(),
        identity: identity.clone(),
        lease_duration: Duration::from_secs(args.lease_duration_seconds),
        renew_deadline: Duration::from_secs(args.lease_renew_deadline_seconds),
        retry_period: Duration::from_secs(args.lease_retry_period_seconds),
    });
    if let Some(leader) = &leader {
        leader
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid lease flags: {e}"))?;
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let metrics = Metrics::new().context("registering metrics")?;
    let shutdown = CancellationToken::new();
    let (addr, server) =
        controller::server::bind(args.metrics_bind_address, metrics.clone(), shutdown.clone())
            .await?;
    tracing::info!(%addr, identity = %identity, "serving /metrics, /healthz, /readyz");
    let server = tokio::spawn(server);
    tokio::spawn(signals(shutdown.clone()));
    if !args.signer.signer_name.is_empty() {
        let signer = signer_settings(&args.signer, &args.lease_namespace)?;
        tokio::spawn(nodegate_operator::signer::run(
            client.clone(),
            signer,
            shutdown.clone(),
        ));
    }
    let result = controller::run(client, settings, leader, metrics, shutdown.clone()).await;
    shutdown.cancel();
    let _ = server.await;
    tracing::info!("stopped");
    result.map_err(Into::into)
}

fn signer_settings(
    args: &SignerArgs,
    namespace: &str,
) -> anyhow::Result<nodegate_operator::signer::SignerSettings> {
    let Some((sa_namespace, sa_name)) = args.signer_agent_service_account.split_once(':') else {
        anyhow::bail!("--signer-agent-service-account must be namespace:name");
    };
    Ok(nodegate_operator::signer::SignerSettings {
        signer_name: args.signer_name.clone(),
        namespace: namespace.to_string(),
        ca_secret: args.signer_ca_secret.clone(),
        bundle_config_map: args.signer_bundle_configmap.clone(),
        agent_username: format!("system:serviceaccount:{sa_namespace}:{sa_name}"),
        max_duration: Duration::from_secs(args.signer_max_duration_seconds.max(60)),
        resync: Duration::from_secs(30),
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT; the controller abandons its round (every write
/// is idempotent: the next leader completes it), releases the lease and exits.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
