//! The kubelet endpoint catalogue: the one table of every route nodegate knows.
//!
//! Policies name endpoints ([`Endpoint`]), never raw paths. The operator derives RBAC from this
//! table, the CRD's CEL rules are generated from it, and the agent routes, authorizes and filters
//! by it. Reference: kubelet `pkg/kubelet/server/{server,auth}.go`. The subresources match
//! kubelets 1.33 and later (fine-grained authorization, `KubeletFineGrainedAuthz`, on by default
//! since 1.33; `statusz` and `flagz` without a `proxy` fallback), checked against real kubelets
//! 1.37 and 1.35 ([`CHECKED_KUBELET_MINORS`]) by `nodegate-tests`' `kubelet_attributes`; older
//! kubelets check `/pods`, `/runningpods/`, `/healthz` and `/configz` as `proxy` only. What a
//! kubelet serves differs by version: [`SERVED_SINCE`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A kubelet API endpoint a policy can grant, by name.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Endpoint {
    /// `/healthz` and `/healthz/*`: kubelet health checks.
    Healthz,
    /// `/pods`: the pods bound to this node (filtered to the caller's namespaces).
    Pods,
    /// `/runningpods/`: the pods the container runtime reports (filtered).
    RunningPods,
    /// `/stats/summary`: node, pod and container usage (filtered).
    Stats,
    /// `/metrics`: the kubelet's own metrics (node-wide, needs `all`).
    Metrics,
    /// `/metrics/cadvisor`: container metrics (filtered by the `namespace` label).
    Cadvisor,
    /// `/metrics/resource` (and `/metrics/resource/v1alpha1`): resource metrics (filtered).
    Resource,
    /// `/metrics/probes`: probe results (filtered).
    Probes,
    /// `/metrics/slis`: the kubelet's service level indicators (node-wide: its series carry no
    /// namespace, needs `all`).
    Slis,
    /// `/configz`: the kubelet's configuration (node-wide, needs `all`).
    Configz,
    /// `/statusz`: the kubelet's status page (node-wide, needs `all`).
    Statusz,
    /// `/flagz`: the kubelet's flags (node-wide, needs `all`).
    Flagz,
    /// `/logs/` and `/logs/{path}`: the node's /var/log (node-wide, needs `all`).
    Logs,
    /// `/containerLogs/{namespace}/{pod}/{container}`: a container's log.
    ContainerLogs,
    /// `/exec/{namespace}/{pod}[/{uid}]/{container}`: run a command in a container (streaming).
    Exec,
    /// `/attach/{namespace}/{pod}[/{uid}]/{container}`: attach to a container (streaming).
    Attach,
    /// `/portForward/{namespace}/{pod}[/{uid}]`: forward ports of a pod (streaming).
    PortForward,
    /// `/run/{namespace}/{pod}[/{uid}]/{container}`: run a command, output in the response.
    Run,
    /// `/checkpoint/{namespace}/{pod}/{container}`: checkpoint a container.
    Checkpoint,
    /// `/debug/pprof/*`: the kubelet's profiler (node-wide, needs `all`).
    Pprof,
    /// `/debug/flags/v`: change the kubelet's log verbosity (node-wide, needs `all`).
    DebugFlags,
    /// `/components/kube-proxy/metrics`: kube-proxy's metrics (its port 10249; needs `all`).
    KubeProxyMetrics,
    /// `/components/kube-proxy/metrics/slis`: kube-proxy's health SLIs (10249; needs `all`).
    KubeProxySlis,
    /// `/components/kube-proxy/{healthz,livez}`: kube-proxy's health (its port 10256; needs
    /// `all`).
    KubeProxyHealth,
    /// `/components/kube-controller-manager/metrics`: the controller manager's metrics
    /// (10257; needs `all`).
    ControllerManagerMetrics,
    /// `/components/kube-controller-manager/metrics/slis`: its health SLIs (needs `all`).
    ControllerManagerSlis,
    /// `/components/kube-controller-manager/healthz`: its health (needs `all`).
    ControllerManagerHealth,
    /// `/components/kube-scheduler/metrics`: the scheduler's metrics (10259; needs `all`).
    SchedulerMetrics,
    /// `/components/kube-scheduler/metrics/slis`: its health SLIs (needs `all`).
    SchedulerSlis,
    /// `/components/kube-scheduler/{healthz,livez,readyz}`: its health (needs `all`).
    SchedulerHealth,
    /// `/components/etcd/metrics`: etcd's metrics (its metrics port 2381; needs `all`).
    EtcdMetrics,
    /// `/components/etcd/{health,livez,readyz}`: etcd's health (needs `all`).
    EtcdHealth,
}

/// The kubelet authorization subresource of `nodes` a request is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subresource {
    Proxy,
    Stats,
    Metrics,
    Log,
    Checkpoint,
    Pods,
    Healthz,
    Configz,
    Statusz,
}

impl Subresource {
    pub fn as_str(self) -> &'static str {
        match self {
            Subresource::Proxy => "proxy",
            Subresource::Stats => "stats",
            Subresource::Metrics => "metrics",
            Subresource::Log => "log",
            Subresource::Checkpoint => "checkpoint",
            Subresource::Pods => "pods",
            Subresource::Healthz => "healthz",
            Subresource::Configz => "configz",
            Subresource::Statusz => "statusz",
        }
    }
}

impl fmt::Display for Subresource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The Kubernetes authorization verb of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    Get,
    Create,
    Update,
    Patch,
    Delete,
}

impl Verb {
    /// The verb the kubelet derives from an HTTP method; `None` for methods it gives no verb
    /// (HEAD, OPTIONS, …), which no policy can grant.
    pub fn from_method(method: &str) -> Option<Verb> {
        match method {
            "GET" => Some(Verb::Get),
            "POST" => Some(Verb::Create),
            "PUT" => Some(Verb::Update),
            "PATCH" => Some(Verb::Patch),
            "DELETE" => Some(Verb::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an endpoint's data relates to namespaces, which decides how the agent scopes it.
///
/// One rule for data that belongs to no namespace, whatever the endpoint: it is node-level data
/// (cAdvisor and resource series without a `namespace` label, the `node` and `systemContainers`
/// sections of `/stats/summary`) and is returned only to callers whose grant has
/// `namespaces.all`; [`Scope::node_level_data`] names it for each endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Holds no namespaced data (health): allowed with any namespace scope.
    Unscoped,
    /// Node-wide data that cannot be split by namespace: allowed only with `namespaces.all`.
    NodeWide,
    /// A JSON document whose items carry a namespace: items outside scope are removed, and the
    /// top-level sections in `node_level` (data of no namespace) are removed unless `all`.
    JsonItems {
        /// Where each item's namespace is, e.g. `items[].metadata.namespace`.
        items: &'static str,
        /// Top-level fields holding node-level data.
        node_level: &'static [&'static str],
    },
    /// Prometheus text whose samples carry a `namespace` label; samples without one (or with an
    /// empty one) are node-level.
    MetricsLabel,
    /// The namespace is the `{namespace}` segment of the path, checked before going upstream.
    Path,
}

impl Scope {
    /// Whether responses carry data of several namespaces that the agent filters per caller.
    pub fn is_filtered(self) -> bool {
        matches!(self, Scope::JsonItems { .. } | Scope::MetricsLabel)
    }

    /// Whether the endpoint's data belongs to namespaces, so RBAC answers for it per namespace
    /// (bound by RoleBindings) rather than at cluster scope.
    pub fn is_namespaced(self) -> bool {
        matches!(
            self,
            Scope::JsonItems { .. } | Scope::MetricsLabel | Scope::Path
        )
    }

    /// What happens to the endpoint's data that belongs to no namespace.
    pub fn node_level_data(self) -> &'static str {
        match self {
            Scope::Unscoped => "all of it is node-level: served with any namespace scope",
            Scope::NodeWide => "all of it: the endpoint needs `all`",
            Scope::JsonItems { .. } => "the node-level sections are kept only for `all`",
            Scope::MetricsLabel => "series without a `namespace` label are kept only for `all`",
            Scope::Path => "none: every request names its namespace",
        }
    }
}

/// One endpoint's row of the catalogue.
#[derive(Debug)]
pub struct EndpointSpec {
    pub endpoint: Endpoint,
    /// Path patterns, matched against the normalised path. `{name}` matches one non-empty
    /// segment, `{name*}` the rest of the path (zero or more segments); anything else literally.
    pub patterns: &'static [&'static str],
    /// HTTP methods nodegate serves for it. Where the kubelet accepts any method (metrics,
    /// healthz, configz) nodegate serves GET only, so a grant never means more than a read.
    pub methods: &'static [&'static str],
    /// The kubelet's authorization subresources, in the order the kubelet tries them
    /// (fine-grained first, then the fallback). RBAC grants only the first.
    pub subresources: &'static [Subresource],
    /// Served on the unauthenticated read-only port.
    pub read_only: bool,
    pub scope: Scope,
    /// A streaming endpoint (upgrade to SPDY/WebSocket, or long-running command output):
    /// always authorized as `create`, whatever the HTTP method.
    pub streaming: bool,
    /// For the node's other components: the upstream that serves it (kubelet endpoints:
    /// `None`). A component endpoint's path is `/components/<component>/<path upstream>`.
    pub component: Option<ComponentUpstream>,
}

use Subresource as S;

/// The catalogue. Order matters only for readability; patterns never overlap.
pub static CATALOGUE: &[EndpointSpec] = &[
    EndpointSpec {
        endpoint: Endpoint::Healthz,
        patterns: &["/healthz", "/healthz/{check*}"],
        methods: &["GET"],
        subresources: &[S::Healthz, S::Proxy],
        read_only: true,
        scope: Scope::Unscoped,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Pods,
        patterns: &["/pods"],
        methods: &["GET"],
        subresources: &[S::Pods, S::Proxy],
        read_only: true,
        scope: Scope::JsonItems {
            items: "items[].metadata.namespace",
            node_level: &[],
        },
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::RunningPods,
        patterns: &["/runningpods/"],
        methods: &["GET"],
        subresources: &[S::Pods, S::Proxy],
        read_only: false,
        scope: Scope::JsonItems {
            items: "items[].metadata.namespace",
            node_level: &[],
        },
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Stats,
        patterns: &["/stats/summary"],
        methods: &["GET", "POST"],
        subresources: &[S::Stats],
        read_only: true,
        scope: Scope::JsonItems {
            items: "pods[].podRef.namespace",
            node_level: &["node", "systemContainers"],
        },
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Metrics,
        patterns: &["/metrics"],
        methods: &["GET"],
        subresources: &[S::Metrics],
        read_only: true,
        scope: Scope::NodeWide,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Cadvisor,
        patterns: &["/metrics/cadvisor"],
        methods: &["GET"],
        subresources: &[S::Metrics],
        read_only: true,
        scope: Scope::MetricsLabel,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Resource,
        // `/metrics/resource/v1alpha1` is kube-prometheus-stack's default path.
        patterns: &["/metrics/resource", "/metrics/resource/v1alpha1"],
        methods: &["GET"],
        subresources: &[S::Metrics],
        read_only: true,
        scope: Scope::MetricsLabel,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Probes,
        patterns: &["/metrics/probes"],
        methods: &["GET"],
        subresources: &[S::Metrics],
        read_only: true,
        scope: Scope::MetricsLabel,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Slis,
        patterns: &["/metrics/slis"],
        methods: &["GET"],
        subresources: &[S::Metrics],
        read_only: true,
        // Its series (`kubernetes_healthcheck{name,type}`, …) carry no namespace at all.
        scope: Scope::NodeWide,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Configz,
        patterns: &["/configz"],
        methods: &["GET"],
        subresources: &[S::Configz, S::Proxy],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Statusz,
        patterns: &["/statusz"],
        methods: &["GET"],
        subresources: &[S::Statusz],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Flagz,
        patterns: &["/flagz"],
        methods: &["GET"],
        // Kubelet 1.37 checks /flagz as `configz`, with no fallback.
        subresources: &[S::Configz],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Logs,
        patterns: &["/logs/{path*}"],
        methods: &["GET"],
        subresources: &[S::Log],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::ContainerLogs,
        patterns: &["/containerLogs/{namespace}/{pod}/{container}"],
        methods: &["GET"],
        subresources: &[S::Proxy],
        read_only: false,
        scope: Scope::Path,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Exec,
        patterns: &[
            "/exec/{namespace}/{pod}/{container}",
            "/exec/{namespace}/{pod}/{uid}/{container}",
        ],
        methods: &["GET", "POST"],
        subresources: &[S::Proxy],
        read_only: false,
        scope: Scope::Path,
        streaming: true,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Attach,
        patterns: &[
            "/attach/{namespace}/{pod}/{container}",
            "/attach/{namespace}/{pod}/{uid}/{container}",
        ],
        methods: &["GET", "POST"],
        subresources: &[S::Proxy],
        read_only: false,
        scope: Scope::Path,
        streaming: true,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::PortForward,
        patterns: &[
            "/portForward/{namespace}/{pod}",
            "/portForward/{namespace}/{pod}/{uid}",
        ],
        methods: &["GET", "POST"],
        subresources: &[S::Proxy],
        read_only: false,
        scope: Scope::Path,
        streaming: true,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Run,
        patterns: &[
            "/run/{namespace}/{pod}/{container}",
            "/run/{namespace}/{pod}/{uid}/{container}",
        ],
        methods: &["POST"],
        subresources: &[S::Proxy],
        read_only: false,
        scope: Scope::Path,
        streaming: true,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Checkpoint,
        patterns: &["/checkpoint/{namespace}/{pod}/{container}"],
        methods: &["POST"],
        subresources: &[S::Checkpoint],
        read_only: false,
        scope: Scope::Path,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::Pprof,
        patterns: &["/debug/pprof/{profile*}"],
        methods: &["GET"],
        subresources: &[S::Proxy],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: None,
    },
    EndpointSpec {
        endpoint: Endpoint::DebugFlags,
        patterns: &["/debug/flags/v"],
        methods: &["PUT"],
        subresources: &[S::Proxy],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: None,
    },
    // The node's other components: only their metrics, SLIs and health, never pprof,
    // `/configz`, `/flagz`, `/debug` or etcd's key-value API. Their data belongs to no
    // namespace (cluster-level): every one needs `all`.
    EndpointSpec {
        endpoint: Endpoint::KubeProxyMetrics,
        patterns: &["/components/kube-proxy/metrics"],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::KubeProxy),
    },
    EndpointSpec {
        endpoint: Endpoint::KubeProxySlis,
        patterns: &["/components/kube-proxy/metrics/slis"],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::KubeProxy),
    },
    EndpointSpec {
        endpoint: Endpoint::KubeProxyHealth,
        patterns: &[
            "/components/kube-proxy/healthz",
            "/components/kube-proxy/livez",
        ],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::KubeProxyHealthz),
    },
    EndpointSpec {
        endpoint: Endpoint::ControllerManagerMetrics,
        patterns: &["/components/kube-controller-manager/metrics"],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::KubeControllerManager),
    },
    EndpointSpec {
        endpoint: Endpoint::ControllerManagerSlis,
        patterns: &["/components/kube-controller-manager/metrics/slis"],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::KubeControllerManager),
    },
    EndpointSpec {
        endpoint: Endpoint::ControllerManagerHealth,
        patterns: &["/components/kube-controller-manager/healthz"],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::KubeControllerManager),
    },
    EndpointSpec {
        endpoint: Endpoint::SchedulerMetrics,
        patterns: &["/components/kube-scheduler/metrics"],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::KubeScheduler),
    },
    EndpointSpec {
        endpoint: Endpoint::SchedulerSlis,
        patterns: &["/components/kube-scheduler/metrics/slis"],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::KubeScheduler),
    },
    EndpointSpec {
        endpoint: Endpoint::SchedulerHealth,
        patterns: &[
            "/components/kube-scheduler/healthz",
            "/components/kube-scheduler/livez",
            "/components/kube-scheduler/readyz",
        ],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::KubeScheduler),
    },
    EndpointSpec {
        endpoint: Endpoint::EtcdMetrics,
        patterns: &["/components/etcd/metrics"],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::Etcd),
    },
    EndpointSpec {
        endpoint: Endpoint::EtcdHealth,
        patterns: &[
            "/components/etcd/health",
            "/components/etcd/livez",
            "/components/etcd/readyz",
        ],
        methods: &["GET"],
        subresources: &[],
        read_only: false,
        scope: Scope::NodeWide,
        streaming: false,
        component: Some(ComponentUpstream::Etcd),
    },
];

/// The API group of nodegate's RBAC resource for through-agent grants.
pub const AGENT_API_GROUP: &str = "nodegate.io";
/// The resource whose subresources (one per endpoint name) carry through-agent grants: the
/// NodeAgentConfig, which API discovery knows, so `kubectl auth can-i` can resolve it.
pub const AGENT_RESOURCE: &str = "nodeagentconfigs";

/// A component of the node besides the kubelet whose metrics and health the agent serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    KubeProxy,
    KubeControllerManager,
    KubeScheduler,
    Etcd,
}

/// The path prefix of component endpoints on the agent: `/components/<component>/…`.
pub const COMPONENT_PREFIX: &str = "/components/";

impl Component {
    pub const ALL: [Component; 4] = [
        Component::KubeProxy,
        Component::KubeControllerManager,
        Component::KubeScheduler,
        Component::Etcd,
    ];

    /// Its name in paths (`/components/<name>/…`), flags, chart values and status.
    pub fn name(self) -> &'static str {
        match self {
            Component::KubeProxy => "kube-proxy",
            Component::KubeControllerManager => "kube-controller-manager",
            Component::KubeScheduler => "kube-scheduler",
            Component::Etcd => "etcd",
        }
    }

    /// The Prometheus `job` label the kubernetes-mixin dashboards and alerts select
    /// (`job="kube-proxy"`, `job="kube-controller-manager"`, `job="kube-scheduler"`); for etcd,
    /// kube-prometheus-stack's `kube-etcd`, which the etcd mixin's `job=~".*etcd.*"` matches.
    pub fn job(self) -> &'static str {
        match self {
            Component::Etcd => "kube-etcd",
            other => other.name(),
        }
    }

    pub fn from_name(name: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The upstreams that serve it (kube-proxy: metrics 10249 and health 10256).
    pub fn upstreams(self) -> impl Iterator<Item = ComponentUpstream> {
        ComponentUpstream::ALL
            .into_iter()
            .filter(move |u| u.component() == self)
    }

    /// Its endpoints in the catalogue.
    pub fn endpoints(self) -> impl Iterator<Item = Endpoint> {
        Endpoint::components().filter(move |e| e.component().map(|u| u.component()) == Some(self))
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The credential the agent presents to a component upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamCredential {
    /// None: a plain-HTTP port without authentication (kube-proxy, etcd's metrics port).
    None,
    /// The agent's own service-account token: the controller manager and the scheduler
    /// delegate authentication (TokenReview) and authorization (SubjectAccessReview of
    /// `nonResourceURLs`) to the API server, so they see the agent's identity.
    AgentToken,
    /// A client certificate the installation configures (etcd's client port 2379, where a
    /// certificate etcd trusts also opens its whole key space: the agent asks it only for
    /// `/metrics` and health).
    ClientCertificate,
}

impl UpstreamCredential {
    pub fn describe(self) -> &'static str {
        match self {
            UpstreamCredential::None => "none (plain HTTP)",
            UpstreamCredential::AgentToken => "the agent's service-account token",
            UpstreamCredential::ClientCertificate => "a configured client certificate",
        }
    }
}

/// One listening port of a component, which the agent sends that component's requests to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ComponentUpstream {
    /// kube-proxy's metrics port (`--metrics-bind-address`, 127.0.0.1:10249 under kubeadm).
    KubeProxy,
    /// kube-proxy's health port (`--healthz-bind-address`, 10256).
    KubeProxyHealthz,
    /// kube-controller-manager's secure port (127.0.0.1:10257 under kubeadm).
    KubeControllerManager,
    /// kube-scheduler's secure port (127.0.0.1:10259 under kubeadm).
    KubeScheduler,
    /// etcd's metrics listener (`--listen-metrics-urls`, http://127.0.0.1:2381 under kubeadm);
    /// an installation may point it at the client port 2379 with a client certificate.
    Etcd,
}

impl ComponentUpstream {
    pub const ALL: [ComponentUpstream; 5] = [
        ComponentUpstream::KubeProxy,
        ComponentUpstream::KubeProxyHealthz,
        ComponentUpstream::KubeControllerManager,
        ComponentUpstream::KubeScheduler,
        ComponentUpstream::Etcd,
    ];

    /// Its name in the agent's flags and the chart's values.
    pub fn name(self) -> &'static str {
        match self {
            ComponentUpstream::KubeProxy => "kube-proxy",
            ComponentUpstream::KubeProxyHealthz => "kube-proxy-healthz",
            ComponentUpstream::KubeControllerManager => "kube-controller-manager",
            ComponentUpstream::KubeScheduler => "kube-scheduler",
            ComponentUpstream::Etcd => "etcd",
        }
    }

    pub fn from_name(name: &str) -> Option<ComponentUpstream> {
        ComponentUpstream::ALL
            .into_iter()
            .find(|u| u.name() == name)
    }

    pub fn component(self) -> Component {
        match self {
            ComponentUpstream::KubeProxy | ComponentUpstream::KubeProxyHealthz => {
                Component::KubeProxy
            }
            ComponentUpstream::KubeControllerManager => Component::KubeControllerManager,
            ComponentUpstream::KubeScheduler => Component::KubeScheduler,
            ComponentUpstream::Etcd => Component::Etcd,
        }
    }

    /// Where kubeadm makes it listen: loopback, the reason users cannot scrape it.
    pub fn default_url(self) -> &'static str {
        match self {
            ComponentUpstream::KubeProxy => "http://127.0.0.1:10249",
            ComponentUpstream::KubeProxyHealthz => "http://127.0.0.1:10256",
            ComponentUpstream::KubeControllerManager => "https://127.0.0.1:10257",
            ComponentUpstream::KubeScheduler => "https://127.0.0.1:10259",
            ComponentUpstream::Etcd => "http://127.0.0.1:2381",
        }
    }

    /// The credential the agent uses there by default (etcd: a client certificate when the
    /// installation points it at the client port over https).
    pub fn credential(self) -> UpstreamCredential {
        match self {
            ComponentUpstream::KubeControllerManager | ComponentUpstream::KubeScheduler => {
                UpstreamCredential::AgentToken
            }
            ComponentUpstream::KubeProxy
            | ComponentUpstream::KubeProxyHealthz
            | ComponentUpstream::Etcd => UpstreamCredential::None,
        }
    }

    /// The path to ask it for: a component endpoint's path without `/components/<component>`.
    /// `None` when the path is not under this upstream's component.
    pub fn upstream_path(self, path: &str) -> Option<&str> {
        let rest = path.strip_prefix(COMPONENT_PREFIX)?;
        let rest = rest.strip_prefix(self.component().name())?;
        rest.starts_with('/').then_some(rest)
    }
}

impl fmt::Display for ComponentUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kubelet minor versions (1.x) the catalogue was checked against: the local cluster's node-2
/// (1.35, the oldest the 1.37 API server supports that is built here) and node-1 (1.37), by
/// `nodegate-tests`' `kubelet_attributes` and `agent_kubelet`. Both derive the same request
/// attributes for every catalogue path; they differ only in what they serve ([`SERVED_SINCE`]).
pub const CHECKED_KUBELET_MINORS: std::ops::RangeInclusive<u32> = 35..=37;

/// Endpoints a kubelet serves (with its default feature gates) only from a minor version on:
/// `/statusz` and `/flagz` sit behind the `ComponentStatusz` and `ComponentFlagz` feature gates,
/// alpha (off) in 1.32 to 1.35 and beta (on) from 1.36. An older kubelet answers them 404 before
/// any authorization; the agent relays that 404 (a grant of them then reads nothing).
pub static SERVED_SINCE: &[(Endpoint, u32)] = &[(Endpoint::Statusz, 36), (Endpoint::Flagz, 36)];

/// The kubelet minor version (1.x) from which the kubelet itself speaks the WebSocket stream
/// protocol `v5.channel.k8s.io` on exec, attach and portForward (feature gate
/// `ExtendWebSocketsToKubelet`, beta and on from 1.36: it translates to the runtime's SPDY).
/// Older kubelets hand a WebSocket upgrade to the container runtime's stream server as it is;
/// containerd 1.6's speaks `v4.channel.k8s.io` and older and refuses a request offering only v5
/// in the handshake, with a bare 403. The agent forwards the caller's subprotocol list as it
/// came (less a bearer-token protocol), so a client that also offers v4, as kubectl does, gets v4
/// from an older kubelet and v5 from a newer one; checked on both by `agent_kubelet`.
pub const WEBSOCKET_V5_SINCE: u32 = 36;

/// The minor version of a kubelet version string (`v1.35.4` → 35), as Node objects report it
/// in `status.nodeInfo.kubeletVersion`.
pub fn kubelet_minor(version: &str) -> Option<u32> {
    let rest = version.strip_prefix('v').unwrap_or(version);
    let mut parts = rest.split('.');
    if parts.next()? != "1" {
        return None;
    }
    let minor = parts.next()?;
    let digits: String = minor.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Paths nodegate serves that current kubelets no longer do, and the kubelet path that answers
/// them. Kubelet 1.37 answers 404 for `/metrics/resource/v1alpha1`, which kube-prometheus-stack
/// still scrapes by default.
pub static KUBELET_ALIASES: &[(&str, &str)] =
    &[("/metrics/resource/v1alpha1", "/metrics/resource")];

/// The path to ask the kubelet for, given a normalised request path.
pub fn kubelet_path(path: &str) -> &str {
    KUBELET_ALIASES
        .iter()
        .find(|(alias, _)| *alias == path)
        .map_or(path, |(_, canonical)| canonical)
}

impl Endpoint {
    /// Whether a kubelet of minor version `minor` (1.`minor`) serves this endpoint with its
    /// default feature gates ([`SERVED_SINCE`]).
    pub fn served_by_kubelet(self, minor: u32) -> bool {
        SERVED_SINCE
            .iter()
            .find(|(endpoint, _)| *endpoint == self)
            .is_none_or(|(_, since)| minor >= *since)
    }

    /// Every endpoint, in catalogue order.
    pub fn all() -> impl Iterator<Item = Endpoint> {
        CATALOGUE.iter().map(|spec| spec.endpoint)
    }

    /// This endpoint's row of the catalogue.
    pub fn spec(self) -> &'static EndpointSpec {
        // The catalogue has a row for every variant (checked by a test), so the fallback to the
        // first row is never taken.
        CATALOGUE
            .iter()
            .find(|spec| spec.endpoint == self)
            .unwrap_or(&CATALOGUE[0])
    }

    /// The name a policy uses (`containerLogs`, `portForward`, …).
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Healthz => "healthz",
            Endpoint::Pods => "pods",
            Endpoint::RunningPods => "runningPods",
            Endpoint::Stats => "stats",
            Endpoint::Metrics => "metrics",
            Endpoint::Cadvisor => "cadvisor",
            Endpoint::Resource => "resource",
            Endpoint::Probes => "probes",
            Endpoint::Slis => "slis",
            Endpoint::Configz => "configz",
            Endpoint::Statusz => "statusz",
            Endpoint::Flagz => "flagz",
            Endpoint::Logs => "logs",
            Endpoint::ContainerLogs => "containerLogs",
            Endpoint::Exec => "exec",
            Endpoint::Attach => "attach",
            Endpoint::PortForward => "portForward",
            Endpoint::Run => "run",
            Endpoint::Checkpoint => "checkpoint",
            Endpoint::Pprof => "pprof",
            Endpoint::DebugFlags => "debugFlags",
            Endpoint::KubeProxyMetrics => "kubeProxyMetrics",
            Endpoint::KubeProxySlis => "kubeProxySlis",
            Endpoint::KubeProxyHealth => "kubeProxyHealth",
            Endpoint::ControllerManagerMetrics => "controllerManagerMetrics",
            Endpoint::ControllerManagerSlis => "controllerManagerSlis",
            Endpoint::ControllerManagerHealth => "controllerManagerHealth",
            Endpoint::SchedulerMetrics => "schedulerMetrics",
            Endpoint::SchedulerSlis => "schedulerSlis",
            Endpoint::SchedulerHealth => "schedulerHealth",
            Endpoint::EtcdMetrics => "etcdMetrics",
            Endpoint::EtcdHealth => "etcdHealth",
        }
    }

    /// The RBAC verbs a grant of this endpoint needs: streaming endpoints are `create` only,
    /// others the verbs of their methods.
    pub fn verbs(self) -> Vec<Verb> {
        let spec = self.spec();
        let mut verbs: Vec<Verb> = if spec.streaming {
            vec![Verb::Create]
        } else {
            spec.methods
                .iter()
                .filter_map(|m| Verb::from_method(m))
                .collect()
        };
        verbs.sort();
        verbs.dedup();
        verbs
    }

    /// The resource of nodegate's own RBAC that grants this endpoint through the agent:
    /// `nodeagentconfigs/<endpoint>` in `nodegate.io`. The kubelet and the API server's node
    /// proxy never consult it, so such a grant cannot bypass the agent's filters.
    pub fn agent_resource(self) -> String {
        format!("{AGENT_RESOURCE}/{}", self.name())
    }

    /// The core `nodes/<subresource>` RBAC the real kubelet checks for this endpoint: the most
    /// specific one. Written only for policies that opt into direct kubelet access. `None` for
    /// component endpoints: nothing but the agent serves them, so no core RBAC grants them.
    pub fn rbac_subresource(self) -> Option<Subresource> {
        self.spec().subresources.first().copied()
    }

    /// Endpoints whose data is node-wide, which a policy may grant only with `namespaces.all`.
    pub fn node_wide() -> impl Iterator<Item = Endpoint> {
        CATALOGUE
            .iter()
            .filter(|s| s.scope == Scope::NodeWide)
            .map(|s| s.endpoint)
    }

    /// Endpoints the unauthenticated read-only port serves.
    pub fn read_only() -> impl Iterator<Item = Endpoint> {
        CATALOGUE.iter().filter(|s| s.read_only).map(|s| s.endpoint)
    }

    /// Whether the endpoint answers with Prometheus text, which the agent filters on the
    /// stream and to which a policy's `metrics` transforms (keep, drop, addLabels) apply:
    /// the namespace-labelled ones and the node-wide `/metrics` and `/metrics/slis` alike.
    pub fn serves_prometheus(self) -> bool {
        matches!(
            self,
            Endpoint::Metrics
                | Endpoint::Cadvisor
                | Endpoint::Resource
                | Endpoint::Probes
                | Endpoint::Slis
                | Endpoint::KubeProxyMetrics
                | Endpoint::KubeProxySlis
                | Endpoint::ControllerManagerMetrics
                | Endpoint::ControllerManagerSlis
                | Endpoint::SchedulerMetrics
                | Endpoint::SchedulerSlis
                | Endpoint::EtcdMetrics
        )
    }

    /// The component upstream serving this endpoint; `None` for the kubelet's.
    pub fn component(self) -> Option<ComponentUpstream> {
        self.spec().component
    }

    /// The endpoints of the node's other components (kube-proxy, controller manager,
    /// scheduler, etcd).
    pub fn components() -> impl Iterator<Item = Endpoint> {
        CATALOGUE
            .iter()
            .filter(|s| s.component.is_some())
            .map(|s| s.endpoint)
    }

    /// The kubelet's endpoints.
    pub fn kubelet() -> impl Iterator<Item = Endpoint> {
        CATALOGUE
            .iter()
            .filter(|s| s.component.is_none())
            .map(|s| s.endpoint)
    }

    /// Streaming endpoints (exec, attach, portForward, run).
    pub fn streaming() -> impl Iterator<Item = Endpoint> {
        CATALOGUE.iter().filter(|s| s.streaming).map(|s| s.endpoint)
    }

    /// Endpoints whose direct grant is `nodes/proxy`: the kubelet also accepts `get nodes/proxy`
    /// for exec, attach and portForward over a WebSocket GET, so such a grant is only honest
    /// when the policy lists those too.
    pub fn direct_proxy() -> impl Iterator<Item = Endpoint> {
        Endpoint::all().filter(|e| e.rbac_subresource() == Some(Subresource::Proxy))
    }

    /// What a `get nodes/proxy` grant already allows on a kubelet (WebSocket GET upgrades).
    pub const PROXY_IMPLIES: [Endpoint; 3] =
        [Endpoint::Exec, Endpoint::Attach, Endpoint::PortForward];
}

/// The catalogue as a Markdown table, for `docs/endpoints.md` (written by `cargo xtask generate`).
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| endpoint | paths | methods | kubelet subresources (in order) | nodegate RBAC (through the agent) | core RBAC (`directKubeletAccess` only) | read-only port | namespace scope | data of no namespace |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for spec in CATALOGUE {
        let join = |items: Vec<String>| items.join(", ");
        let scope = match spec.scope {
            Scope::Unscoped => "none (no namespaced data)".to_string(),
            Scope::NodeWide => "node-wide: needs `all`".to_string(),
            Scope::JsonItems { items, .. } => format!("JSON `{items}`"),
            Scope::MetricsLabel => "`namespace` label".to_string(),
            Scope::Path => "`{namespace}` in the path".to_string(),
        };
        let verbs = join(
            spec.endpoint
                .verbs()
                .iter()
                .map(|v| v.to_string())
                .collect(),
        );
        let (subresources, core) = match spec.endpoint.rbac_subresource() {
            Some(first) => (
                join(spec.subresources.iter().map(|s| s.to_string()).collect()),
                format!("`nodes/{first}`: {verbs}"),
            ),
            None => (
                "– (not the kubelet's)".to_string(),
                "none: only the agent serves it".to_string(),
            ),
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {subresources} | `{}`: {verbs} | {core} | {} | {} | {} |\n",
            spec.endpoint,
            join(spec.patterns.iter().map(|p| format!("`{p}`")).collect()),
            spec.methods.join(", "),
            spec.endpoint.agent_resource(),
            if spec.read_only { "yes" } else { "no" },
            scope,
            spec.scope.node_level_data(),
        ));
    }
    out
}

/// The component upstreams as a Markdown table, for `docs/endpoints.md`.
pub fn component_markdown_table() -> String {
    let mut out = String::from(
        "| component | Prometheus `job` | upstream (agent flag name) | default URL | credential | endpoints |\n\
         |---|---|---|---|---|---|\n",
    );
    for upstream in ComponentUpstream::ALL {
        let endpoints: Vec<String> = Endpoint::components()
            .filter(|e| e.component() == Some(upstream))
            .map(|e| format!("`{e}`"))
            .collect();
        out.push_str(&format!(
            "| {} | `{}` | `{}` | `{}` | {} | {} |\n",
            upstream.component(),
            upstream.component().job(),
            upstream,
            upstream.default_url(),
            upstream.credential().describe(),
            endpoints.join(", "),
        ));
    }
    out
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_minor_reads_node_info_versions() {
        assert_eq!(kubelet_minor("v1.35.4"), Some(35));
        assert_eq!(kubelet_minor("v1.37.1"), Some(37));
        assert_eq!(kubelet_minor("v1.36.0-rc.1"), Some(36));
        assert_eq!(kubelet_minor("v2.0.0"), None);
        assert_eq!(kubelet_minor("garbage"), None);
    }

    #[test]
    fn statusz_and_flagz_are_served_from_1_36() {
        for minor in [35, 36, 37] {
            assert!(Endpoint::Pods.served_by_kubelet(minor));
            assert_eq!(Endpoint::Statusz.served_by_kubelet(minor), minor >= 36);
            assert_eq!(Endpoint::Flagz.served_by_kubelet(minor), minor >= 36);
        }
    }

    #[test]
    fn every_variant_has_exactly_one_row_and_serde_name_matches() {
        let variants: Vec<Endpoint> = CATALOGUE.iter().map(|s| s.endpoint).collect();
        for e in &variants {
            assert_eq!(variants.iter().filter(|v| *v == e).count(), 1, "{e}");
            let json = serde_json::to_string(e).unwrap();
            assert_eq!(json, format!("\"{}\"", e.name()));
        }
        // A variant missing from the catalogue would silently map to the first row.
        assert_eq!(variants.len(), 32);
    }

    #[test]
    fn streaming_endpoints_are_never_read_only_and_create_only() {
        for e in Endpoint::streaming() {
            assert!(!e.spec().read_only, "{e}");
            assert_eq!(e.verbs(), vec![Verb::Create], "{e}");
        }
        let streaming: Vec<_> = Endpoint::streaming().collect();
        assert_eq!(
            streaming,
            vec![
                Endpoint::Exec,
                Endpoint::Attach,
                Endpoint::PortForward,
                Endpoint::Run
            ]
        );
    }

    #[test]
    fn read_only_endpoints_are_reads() {
        for e in Endpoint::read_only() {
            assert!(e.spec().scope != Scope::Path, "{e}");
            assert!(
                e.verbs()
                    .iter()
                    .all(|v| *v == Verb::Get || e == Endpoint::Stats)
            );
        }
    }

    #[test]
    fn aliases_map_to_served_paths_of_the_same_endpoint() {
        assert_eq!(
            kubelet_path("/metrics/resource/v1alpha1"),
            "/metrics/resource"
        );
        assert_eq!(kubelet_path("/metrics/cadvisor"), "/metrics/cadvisor");
        for (alias, canonical) in KUBELET_ALIASES {
            let a = crate::attributes::match_route(alias).unwrap();
            let c = crate::attributes::match_route(canonical).unwrap();
            assert_eq!(a.endpoint, c.endpoint);
        }
    }

    #[test]
    fn rbac_grants_the_fine_grained_subresource() {
        assert_eq!(Endpoint::Pods.rbac_subresource(), Some(Subresource::Pods));
        assert_eq!(
            Endpoint::Healthz.rbac_subresource(),
            Some(Subresource::Healthz)
        );
        assert_eq!(
            Endpoint::Cadvisor.rbac_subresource(),
            Some(Subresource::Metrics)
        );
        assert_eq!(Endpoint::Exec.rbac_subresource(), Some(Subresource::Proxy));
        assert_eq!(Endpoint::Stats.verbs(), vec![Verb::Get, Verb::Create]);
    }

    /// Component endpoints: GET only, node-wide (so they need `all`), never on the read-only
    /// port, no kubelet subresource (so no core RBAC), every path under its component's prefix,
    /// and nothing but metrics, SLIs and health.
    #[test]
    fn component_endpoints_serve_only_metrics_slis_and_health() {
        let mut count = 0;
        for e in Endpoint::components() {
            count += 1;
            let spec = e.spec();
            let upstream = spec.component.unwrap();
            assert_eq!(spec.methods, &["GET"], "{e}");
            assert_eq!(spec.scope, Scope::NodeWide, "{e}");
            assert!(!spec.read_only && !spec.streaming, "{e}");
            assert_eq!(e.rbac_subresource(), None, "{e}");
            assert!(Endpoint::node_wide().any(|n| n == e), "{e}");
            assert!(!Endpoint::direct_proxy().any(|n| n == e), "{e}");
            for pattern in spec.patterns {
                let path = upstream.upstream_path(pattern).unwrap();
                assert!(
                    [
                        "/metrics",
                        "/metrics/slis",
                        "/healthz",
                        "/livez",
                        "/readyz",
                        "/health"
                    ]
                    .contains(&path),
                    "{e}: {pattern}"
                );
                assert_eq!(
                    e.serves_prometheus(),
                    path.starts_with("/metrics"),
                    "{e}: {pattern}"
                );
                let route = crate::attributes::match_route(pattern).unwrap();
                assert_eq!(route.endpoint, e);
            }
        }
        assert_eq!(count, 11);
        assert_eq!(Endpoint::kubelet().count() + count, CATALOGUE.len());
        for c in Component::ALL {
            assert!(c.endpoints().count() >= 2, "{c}");
            assert_eq!(Component::from_name(c.name()), Some(c));
        }
        for u in ComponentUpstream::ALL {
            assert_eq!(ComponentUpstream::from_name(u.name()), Some(u));
        }
        for (path, served) in [
            ("/components/kube-scheduler/configz", false),
            ("/components/kube-scheduler/flagz", false),
            ("/components/kube-scheduler/debug/pprof/profile", false),
            ("/components/kube-controller-manager/livez", false),
            ("/components/etcd/v3/kv/range", false),
            ("/components/etcd/version", false),
            ("/components/kube-proxy/proxyMode", false),
            ("/components/kube-proxy/metrics/", false),
            ("/components/etcd/health", true),
        ] {
            assert_eq!(
                crate::attributes::match_route(path).is_some(),
                served,
                "{path}"
            );
        }
        assert_eq!(
            ComponentUpstream::Etcd.upstream_path("/components/etcd/metrics"),
            Some("/metrics")
        );
        assert_eq!(
            ComponentUpstream::Etcd.upstream_path("/components/etcdx/metrics"),
            None
        );
        assert_eq!(
            ComponentUpstream::KubeProxyHealthz.upstream_path("/components/kube-proxy/livez"),
            Some("/livez")
        );
    }
}
