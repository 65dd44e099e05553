//! Where the agent's rules come from, and how a new version replaces the old one.
//!
//! `--config-source=api` watches this node's own `NodeAgentConfig` and the `NodeAgentRuleSet`
//! it names (and nothing else: the operator has already resolved selectors, so the agent
//! needs no list access);
//! `--config-source=file:PATH` reads a `NodeAgentConfig`, or `NodeApiPolicy` documents that are
//! compiled for this node with the operator's compiler, `nodegate-compiler` (clusters without the operator).
//!
//! Every new version is validated before it is used; an invalid one never replaces the last
//! good one (the agent keeps enforcing what it enforced, and says why in status and logs).
//! The swap is atomic: a request in flight keeps the `Arc` it started with. Before the first
//! good version the agent is not ready and denies everything.
//!
//! Permissions the agent's service account needs for this module: `get`, `list`, `watch` on
//! `nodeagentconfigs.nodegate.io` and `nodeagentrulesets.nodegate.io` (only its own object and
//! the rule set it names are asked for, by field selector),
//! `patch` on `nodeagentconfigs/status`, `get` on `nodes` for [`NodeIdentity::fetch`], and
//! `list`/`watch` on `nodes` for the file source's [`watch_node`] (its own Node only, by field
//! selector).
//! Status is written by server-side apply with field manager `nodegate-agent`, and only when
//! it changes.

use arc_swap::ArcSwapOption;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use nodegate_compiler::validation::{Invalid, validate_agent_spec, validate_policy};
use nodegate_compiler::{self as compiler, NodeInfo};
use nodegate_crds::agent_config::NodeAgentConfigStatus;
use nodegate_crds::decision::RuleSet;
use nodegate_crds::{NodeAgentConfig, NodeAgentConfigSpec, NodeAgentRuleSet, NodeApiPolicy};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Field manager of the status the agent writes.
pub const STATUS_FIELD_MANAGER: &str = "nodegate-agent";

/// Where the configuration comes from.
#[derive(Clone)]
pub enum ConfigSource {
    /// This node's NodeAgentConfig, watched through the API server.
    Api { client: kube::Client },
    /// A local file, polled for changes.
    File(PathBuf),
}

/// The `--config-source` flag: `api` or `file:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSourceFlag {
    Api,
    File(PathBuf),
}

impl FromStr for ConfigSourceFlag {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "api" => Ok(ConfigSourceFlag::Api),
            Some(("file", path)) if !path.is_empty() => Ok(ConfigSourceFlag::File(path.into())),
            _ => Err(format!(
                "--config-source must be `api` or `file:PATH`, not `{s}`"
            )),
        }
    }
}

/// One validated configuration, as enforced.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// The compiled rules, indexed by subject for decisions (namespace names sorted, so
    /// `ResolvedNamespaces::allows` works); derefs to the spec.
    pub spec: RuleSet,
    /// Increases with every swap (0: nothing loaded yet), for logs and metrics.
    pub generation: u64,
}

impl AgentConfig {
    /// The configuration in force before anything loads: no rules, so every request is
    /// denied.
    pub fn deny_all() -> Self {
        AgentConfig {
            spec: RuleSet::default(),
            generation: 0,
        }
    }
}

struct StoreInner {
    current: ArcSwapOption<AgentConfig>,
    deny_all: Arc<AgentConfig>,
    generation: AtomicU64,
    last_error: ArcSwapOption<String>,
    changed: tokio::sync::watch::Sender<u64>,
}

/// The configuration in force; cheap to clone, shared by the loader and every request.
#[derive(Clone)]
pub struct ConfigStore {
    inner: Arc<StoreInner>,
}

impl Default for ConfigStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigStore")
            .field("loaded", &self.is_loaded())
            .field("generation", &self.current().generation)
            .finish_non_exhaustive()
    }
}

impl ConfigStore {
    pub fn new() -> Self {
        let (changed, _) = tokio::sync::watch::channel(0);
        ConfigStore {
            inner: Arc::new(StoreInner {
                current: ArcSwapOption::empty(),
                deny_all: Arc::new(AgentConfig::deny_all()),
                generation: AtomicU64::new(0),
                last_error: ArcSwapOption::empty(),
                changed,
            }),
        }
    }

    /// The configuration to decide a request by; deny-all until one loads. Hold the `Arc`
    /// for the whole request, so a swap in the middle cannot mix two versions.
    pub fn current(&self) -> Arc<AgentConfig> {
        self.inner
            .current
            .load_full()
            .unwrap_or_else(|| self.inner.deny_all.clone())
    }

    /// Whether a valid configuration has loaded (readiness).
    pub fn is_loaded(&self) -> bool {
        self.inner.current.load().is_some()
    }

    /// Why the latest version was not used, until a valid one arrives.
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.load_full().map(|e| (*e).clone())
    }

    /// Notified with the generation after every swap.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Swaps in a validated spec; returns its generation. Unchanged specs are not swapped.
    pub fn publish(&self, spec: NodeAgentConfigSpec) -> u64 {
        self.inner.last_error.store(None);
        if let Some(current) = self.inner.current.load_full()
            && *current.spec == spec
        {
            return current.generation;
        }
        let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(generation, hash = %spec.hash, rules = spec.rules.len(), policies = %spec.policies, "configuration in force");
        self.inner.current.store(Some(Arc::new(AgentConfig {
            spec: RuleSet::new(spec),
            generation,
        })));
        self.inner.changed.send_replace(generation);
        generation
    }

    /// Records a refused version; the configuration in force stays.
    pub fn reject(&self, error: String) {
        tracing::error!(%error, loaded = self.is_loaded(), "configuration refused: keeping the last good one");
        self.inner.last_error.store(Some(Arc::new(error)));
    }

    /// Back to deny-all, with `error` as the reason (a version that must not be enforced at
    /// all, not merely a bad update to skip).
    pub fn refuse(&self, error: String) {
        self.clear(&error);
        self.inner.last_error.store(Some(Arc::new(error)));
    }

    /// Back to deny-all (this node's configuration was deleted).
    pub fn clear(&self, reason: &str) {
        tracing::warn!(%reason, "configuration removed: denying everything");
        self.inner.current.store(None);
        let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner.changed.send_replace(generation);
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("{0}")]
    Document(String),
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

// ---------------------------------------------------------------------------------------------
// File source

/// This node, as the file source compiles policies for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub uid: String,
    /// Node labels, for policies' node selectors.
    pub labels: BTreeMap<String, String>,
}

impl NodeIdentity {
    /// This node's UID and labels as the API server has them, so policy files with a
    /// `nodeSelector` match as they would through the operator.
    pub async fn fetch(client: &kube::Client, name: &str) -> Result<Self, kube::Error> {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        let node = nodes.get(name).await?;
        Ok(NodeIdentity {
            name: name.to_string(),
            uid: node.metadata.uid.unwrap_or_default(),
            labels: node.metadata.labels.unwrap_or_default(),
        })
    }
}

/// What the file source knows of its Node: `None` until the Node has been read (the agent denies
/// everything until then), then its name, UID and labels as they change.
pub type NodeWatch = tokio::sync::watch::Receiver<Option<NodeIdentity>>;

/// A [`NodeWatch`] that never changes: labels given on the command line, or none when there is
/// no API server to ask.
pub fn fixed_node(node: NodeIdentity) -> NodeWatch {
    tokio::sync::watch::channel(Some(node)).1
}

/// Watches this node's Node object (one object, by field selector on its name) and publishes
/// its identity when its UID or labels change, so `nodeSelector` policies of the file source
/// follow relabelling as they do through the operator. A deleted or missing Node has no labels
/// (selectors match nothing). The watcher re-lists and resumes after API server outages.
///
/// Needs `list` and `watch` on `nodes` (RBAC can limit them to the node's name:
/// a single-object watch by `metadata.name` is authorized against `resourceNames`).
pub fn watch_node(client: kube::Client, name: String) -> NodeWatch {
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(run_node_watch(client, name, tx));
    rx
}

async fn run_node_watch(
    client: kube::Client,
    name: String,
    tx: tokio::sync::watch::Sender<Option<NodeIdentity>>,
) {
    use k8s_openapi::api::core::v1::Node;
    let nodes: Api<Node> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let identity = |node: Option<&Node>| NodeIdentity {
        name: name.clone(),
        uid: node
            .and_then(|n| n.metadata.uid.clone())
            .unwrap_or_default(),
        labels: node
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default(),
    };
    let publish = |next: NodeIdentity| {
        tx.send_if_modified(|current| {
            if current.as_ref() == Some(&next) {
                return false;
            }
            tracing::info!(node = %next.name, labels = ?next.labels, "node labels");
            *current = Some(next);
            true
        });
    };
    // Objects seen since the watcher's (re)list began: a Node absent from a list is gone.
    let mut seen = false;
    let mut stream = watcher(nodes, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => seen = false,
            Ok(watcher::Event::InitApply(node) | watcher::Event::Apply(node)) => {
                seen = true;
                publish(identity(Some(&node)));
            }
            Ok(watcher::Event::InitDone) if !seen => publish(identity(None)),
            Ok(watcher::Event::InitDone) => {}
            Ok(watcher::Event::Delete(_)) => publish(identity(None)),
            Err(e) => tracing::warn!(node = %name, error = %e, "watching the node failed"),
        }
    }
}

/// Parses `k=v,k2=v2` (a `--node-labels` flag for the file source without an API server).
pub fn parse_node_labels(flag: &str) -> Result<BTreeMap<String, String>, String> {
    flag.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("node labels are key=value pairs, not {pair:?}")),
        })
        .collect()
}

const API_VERSION: &str = "nodegate.io/v1alpha1";

/// Parses a config file: one NodeAgentConfig (for this node), or NodeApiPolicy documents
/// compiled for this node. Namespace selectors resolve to no namespace (the file source has
/// no namespace list); use `names` or `all` in files.
pub fn parse_config_file(
    text: &str,
    node: &NodeIdentity,
) -> Result<NodeAgentConfigSpec, ConfigError> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize_any_doc(doc)?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value).map_err(|e| ConfigError::Yaml(e.to_string()))?;
        docs.push(json);
    }
    if docs.is_empty() {
        return Err(ConfigError::Document("the file holds no document".into()));
    }
    let kinds: BTreeSet<&str> = docs
        .iter()
        .map(|d| d.get("kind").and_then(Value::as_str).unwrap_or(""))
        .collect();
    for doc in &docs {
        let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if api_version != API_VERSION {
            return Err(ConfigError::Document(format!(
                "apiVersion must be {API_VERSION}, not {api_version:?}"
            )));
        }
    }
    match kinds.iter().copied().collect::<Vec<_>>().as_slice() {
        ["NodeAgentConfig"] => {
            let [doc] = docs.as_slice() else {
                return Err(ConfigError::Document(
                    "a file holds one NodeAgentConfig".into(),
                ));
            };
            let name = doc.pointer("/metadata/name").and_then(Value::as_str);
            if let Some(name) = name
                && name != node.name
            {
                return Err(ConfigError::Document(format!(
                    "the NodeAgentConfig is for node {name:?}, this is node {:?}",
                    node.name
                )));
            }
            let spec = validate_agent_spec(
                &format!("NodeAgentConfig {:?}", node.name),
                doc.get("spec").unwrap_or(&Value::Null),
            )?;
            if let Some(rule_set) = &spec.rule_set {
                return Err(ConfigError::Document(format!(
                    "the NodeAgentConfig names NodeAgentRuleSet {rule_set:?}: a file holds its \
                     rules in spec.rules (`nodegate-operator render` writes them so)"
                )));
            }
            Ok(spec)
        }
        ["NodeApiPolicy"] => {
            let mut policies = Vec::new();
            let mut errors = Vec::new();
            let mut names = BTreeSet::new();
            for doc in &docs {
                match validate_policy(doc) {
                    Ok(policy) => {
                        if !names.insert(policy.metadata.name.clone()) {
                            errors.push(format!(
                                "NodeApiPolicy {:?} appears twice",
                                policy.metadata.name.as_deref().unwrap_or_default()
                            ));
                        }
                        policies.push(policy);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if !errors.is_empty() {
                return Err(ConfigError::Document(errors.join("; ")));
            }
            compile_for_node(&policies, node)
        }
        other => Err(ConfigError::Document(format!(
            "a config file holds one NodeAgentConfig or NodeApiPolicy documents, not {other:?}"
        ))),
    }
}

/// Compiles policies for this node with the operator's compiler (`nodegate-compiler`).
pub fn compile_for_node(
    policies: &[NodeApiPolicy],
    node: &NodeIdentity,
) -> Result<NodeAgentConfigSpec, ConfigError> {
    let info = NodeInfo {
        name: node.name.clone(),
        uid: node.uid.clone(),
        labels: node.labels.clone(),
    };
    let desired = compiler::compile(policies, &[info], &[]);
    for outcome in &desired.outcomes {
        for problem in &outcome.problems {
            tracing::warn!(policy = %outcome.policy, %problem, "policy compiled with a problem");
        }
    }
    let config = desired
        .node_agent_configs
        .into_iter()
        .next()
        .ok_or_else(|| ConfigError::Document("the compiler produced no configuration".into()))?;
    let spec =
        serde_json::to_value(&config.spec).map_err(|e| ConfigError::Document(e.to_string()))?;
    Ok(validate_agent_spec(
        &format!("compiled configuration of node {:?}", node.name),
        &spec,
    )?)
}

/// Helper so the YAML stream yields values without naming serde's `Deserialize` at the call.
trait DeserializeDoc: Sized {
    fn deserialize_any_doc(doc: serde_yaml::Deserializer<'_>) -> Result<Self, ConfigError>;
}

impl DeserializeDoc for serde_yaml::Value {
    fn deserialize_any_doc(doc: serde_yaml::Deserializer<'_>) -> Result<Self, ConfigError> {
        use serde::Deserialize;
        serde_yaml::Value::deserialize(doc).map_err(|e| ConfigError::Yaml(e.to_string()))
    }
}

/// Loads the file once into the store; `Ok(true)` when the content was new.
pub fn load_file_once(
    path: &std::path::Path,
    node: &NodeIdentity,
    store: &ConfigStore,
    last: &mut Option<Vec<u8>>,
) -> bool {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            let error = ConfigError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            };
            if store.last_error().as_deref() != Some(&error.to_string()) {
                store.reject(error.to_string());
            }
            *last = None;
            return false;
        }
    };
    if last.as_deref() == Some(bytes.as_slice()) {
        return false;
    }
    *last = Some(bytes.clone());
    let text = String::from_utf8_lossy(&bytes);
    match parse_config_file(&text, node) {
        Ok(spec) => {
            store.publish(spec);
            true
        }
        Err(e) => {
            store.reject(format!("{}: {e}", path.display()));
            false
        }
    }
}

/// Polls the file every `interval`, forever, and compiles it again as soon as the node's
/// labels change. Nothing is loaded (every request is denied) until the node is known.
pub async fn run_file(path: PathBuf, mut node: NodeWatch, store: ConfigStore, interval: Duration) {
    let mut last = None;
    let mut compiled_for: Option<NodeIdentity> = None;
    let mut watching = true;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = node.changed(), if watching => {
                // The sender stops only with the runtime; poll the file from then on.
                watching = changed.is_ok();
            }
        }
        let Some(current) = node.borrow_and_update().clone() else {
            if store.last_error().is_none() {
                store.reject("waiting for this node's labels from the API server".into());
            }
            continue;
        };
        if compiled_for.as_ref() != Some(&current) {
            // Same file, other labels: compile it again.
            last = None;
            compiled_for = Some(current.clone());
        }
        load_file_once(&path, &current, &store, &mut last);
    }
}

// ---------------------------------------------------------------------------------------------
// API source

/// What the API source needs besides the client.
#[derive(Clone)]
pub struct ApiSourceSettings {
    /// This node's NodeAgentConfig: the node's name, or `<instance>.<node>` for a named
    /// instance ([`compiler::config_name`]).
    pub config_name: String,
    /// The serving certificate's expiry, reported in status.
    pub serving_cert_expiry: Option<Arc<dyn Fn() -> Option<SystemTime> + Send + Sync>>,
    /// How often status is re-checked (certificate rotations, readiness).
    pub status_interval: Duration,
    /// The node's components found listening, reported in status.
    pub components: Option<crate::components::ComponentPresence>,
}

impl std::fmt::Debug for ApiSourceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSourceSettings")
            .field("config_name", &self.config_name)
            .field("status_interval", &self.status_interval)
            .finish_non_exhaustive()
    }
}

/// Runs the configured source forever.
pub async fn run(
    source: ConfigSource,
    store: ConfigStore,
    node: NodeWatch,
    settings: ApiSourceSettings,
    file_poll: Duration,
) {
    match source {
        ConfigSource::File(path) => run_file(path, node, store, file_poll).await,
        ConfigSource::Api { client } => run_api(client, store, settings).await,
    }
}

/// What was last seen of this node's object.
#[derive(Default)]
struct Observed {
    /// The object exists (as far as the watch knows).
    exists: bool,
    /// The rule set it names, if it names one.
    rule_set: Option<String>,
    /// The hash of the rules it asks for: its own `spec.hash`, or its rule set's.
    spec_hash: Option<String>,
    status: Option<NodeAgentConfigStatus>,
}

type Events = futures::stream::BoxStream<'static, watcher::Result<watcher::Event<DynamicObject>>>;

/// Watches of one object by name (field selector), resumed after API server restarts.
fn watch_one(api: &Api<DynamicObject>, name: &str) -> Events {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api.clone(), config).default_backoff().boxed()
}

/// Watches this node's NodeAgentConfig and the NodeAgentRuleSet it names (each by field
/// selector on its name), swaps valid versions in, and writes status back.
pub async fn run_api(client: kube::Client, store: ConfigStore, settings: ApiSourceSettings) {
    let api: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<NodeAgentConfig>(&()));
    let sets: Api<DynamicObject> =
        Api::all_with(client, &ApiResource::erase::<NodeAgentRuleSet>(&()));
    let mut events = watch_one(&api, &settings.config_name);
    // The named rule set's watch; none (pending forever) while the config names none.
    let mut set_events: Events = futures::stream::pending().boxed();
    let mut observed = Observed::default();
    let mut seen_in_init = false;
    let mut set_seen_in_init = false;
    let mut ticker = tokio::time::interval(settings.status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                let named = observed.rule_set.clone();
                match event {
                    Ok(watcher::Event::Init) => seen_in_init = false,
                    Ok(watcher::Event::InitApply(obj)) => {
                        seen_in_init = true;
                        apply_object(&store, &settings, &mut observed, &obj);
                    }
                    Ok(watcher::Event::InitDone) => {
                        if !seen_in_init && observed.exists {
                            observed = Observed::default();
                            store.clear("this node's NodeAgentConfig is gone");
                        } else if !seen_in_init {
                            tracing::warn!(config = %settings.config_name, "no NodeAgentConfig for this node yet: denying everything");
                        }
                    }
                    Ok(watcher::Event::Apply(obj)) => apply_object(&store, &settings, &mut observed, &obj),
                    Ok(watcher::Event::Delete(_)) => {
                        observed = Observed::default();
                        store.clear("this node's NodeAgentConfig was deleted");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "NodeAgentConfig watch failed; retrying");
                        continue;
                    }
                }
                if observed.rule_set != named {
                    // Until the new rule set is seen, the agent keeps what it enforces: the
                    // operator writes a rule set before it names it.
                    set_events = match &observed.rule_set {
                        Some(name) => {
                            tracing::info!(rule_set = %name, "watching the NodeAgentRuleSet this node's NodeAgentConfig names");
                            watch_one(&sets, name)
                        }
                        None => futures::stream::pending().boxed(),
                    };
                }
            }
            event = set_events.next() => {
                let Some(event) = event else { continue };
                let Some(name) = observed.rule_set.clone() else { continue };
                match event {
                    Ok(watcher::Event::Init) => set_seen_in_init = false,
                    Ok(watcher::Event::InitApply(obj)) => {
                        set_seen_in_init = true;
                        apply_rule_set(&store, &name, &mut observed, &obj);
                    }
                    Ok(watcher::Event::Apply(obj)) => apply_rule_set(&store, &name, &mut observed, &obj),
                    Ok(watcher::Event::InitDone) => {
                        if !set_seen_in_init {
                            observed.spec_hash = None;
                            store.refuse(format!("NodeAgentRuleSet {name:?}, which this node's NodeAgentConfig names, does not exist: refusing everything"));
                        }
                    }
                    Ok(watcher::Event::Delete(_)) => {
                        observed.spec_hash = None;
                        store.refuse(format!("NodeAgentRuleSet {name:?}, which this node's NodeAgentConfig names, was deleted: refusing everything"));
                    }
                    Err(error) => {
                        tracing::warn!(%error, rule_set = %name, "NodeAgentRuleSet watch failed; retrying");
                        continue;
                    }
                }
            }
            _ = ticker.tick() => {}
        }
        if observed.exists {
            write_status(&api, &store, &settings, &mut observed).await;
        }
    }
}

/// This node's NodeAgentConfig: its own rules are enforced, or the rule set it names is
/// watched (by the caller, see [`run_api`]).
fn apply_object(
    store: &ConfigStore,
    settings: &ApiSourceSettings,
    observed: &mut Observed,
    obj: &DynamicObject,
) {
    if obj.metadata.name.as_deref() != Some(settings.config_name.as_str()) {
        return;
    }
    observed.exists = true;
    observed.status = obj
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok());
    let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    if let Some(error) = unowned("NodeAgentConfig", obj) {
        observed.rule_set = None;
        observed.spec_hash = None;
        store.refuse(error);
        return;
    }
    let named = spec
        .get("ruleSet")
        .and_then(Value::as_str)
        .map(String::from);
    if named.is_some() {
        if named != observed.rule_set {
            observed.spec_hash = None;
        }
        observed.rule_set = named;
        return;
    }
    observed.rule_set = None;
    observed.spec_hash = spec.get("hash").and_then(Value::as_str).map(String::from);
    match validate_agent_spec(
        &format!("NodeAgentConfig {:?}", settings.config_name),
        &spec,
    ) {
        Ok(spec) => {
            store.publish(spec);
        }
        Err(e) => store.reject(e.to_string()),
    }
}

/// The rule set this node's NodeAgentConfig names: enforced once it is nodegate's, holds
/// rules of its own (never the name of another), and is valid.
fn apply_rule_set(store: &ConfigStore, name: &str, observed: &mut Observed, obj: &DynamicObject) {
    if obj.metadata.name.as_deref() != Some(name) {
        return;
    }
    let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    observed.spec_hash = spec.get("hash").and_then(Value::as_str).map(String::from);
    if let Some(error) = unowned("NodeAgentRuleSet", obj) {
        store.refuse(error);
        return;
    }
    match validate_agent_spec(&format!("NodeAgentRuleSet {name:?}"), &spec) {
        Ok(spec) if spec.rule_set.is_some() => store.refuse(format!(
            "NodeAgentRuleSet {name:?} names another rule set: refusing everything"
        )),
        Ok(spec) => {
            store.publish(spec);
        }
        Err(e) => store.reject(e.to_string()),
    }
}

/// Why a NodeAgentConfig the operator did not write must not be enforced: anyone allowed to
/// create one of this node's name (a leftover, a hand-written copy, a colliding tool) would
/// otherwise decide what this agent lets through. None when it carries nodegate's label.
fn unowned(kind: &str, obj: &DynamicObject) -> Option<String> {
    let managed_by = obj
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL));
    (managed_by.map(String::as_str) != Some(nodegate_crds::MANAGED_BY)).then(|| {
        format!(
            "{kind} {:?} is not managed by nodegate (label {MANAGED_BY_LABEL}={} \
             missing): refusing everything",
            obj.metadata.name.as_deref().unwrap_or_default(),
            nodegate_crds::MANAGED_BY
        )
    })
}

/// `app.kubernetes.io/managed-by`, which the operator sets on everything it writes.
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

async fn write_status(
    api: &Api<DynamicObject>,
    store: &ConfigStore,
    settings: &ApiSourceSettings,
    observed: &mut Observed,
) {
    let expiry = settings.serving_cert_expiry.as_ref().and_then(|f| f());
    let components = settings.components.as_ref().and_then(|p| p.summary());
    let current = store.current();
    let enforced = store.is_loaded().then_some(current.spec.hash.as_str());
    let desired = desired_status(
        &StatusInputs {
            enforced_hash: enforced,
            spec_hash: observed.spec_hash.as_deref(),
            last_error: store.last_error().as_deref(),
            serving_cert_expiry: expiry,
            components: components.as_deref(),
        },
        observed.status.as_ref(),
        SystemTime::now(),
    );
    if observed.status.as_ref() == Some(&desired) {
        return;
    }
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "NodeAgentConfig",
        "metadata": { "name": settings.config_name },
        "status": desired,
    });
    let params = PatchParams::apply(STATUS_FIELD_MANAGER).force();
    match api
        .patch_status(&settings.config_name, &params, &Patch::Apply(&patch))
        .await
    {
        Ok(_) => {
            tracing::debug!("status written");
            observed.status = Some(desired);
        }
        Err(error) => tracing::warn!(%error, "writing NodeAgentConfig status failed"),
    }
}

/// What status reports.
#[derive(Clone, Debug, Default)]
pub struct StatusInputs<'a> {
    /// The hash of the configuration in force (`None`: nothing loaded).
    pub enforced_hash: Option<&'a str>,
    /// The object's `spec.hash`.
    pub spec_hash: Option<&'a str>,
    pub last_error: Option<&'a str>,
    pub serving_cert_expiry: Option<SystemTime>,
    /// The present components, comma-separated.
    pub components: Option<&'a str>,
}

/// The status to write: conditions keep their transition time while their status holds, so
/// an unchanged state yields an identical status and no write.
pub fn desired_status(
    inputs: &StatusInputs<'_>,
    previous: Option<&NodeAgentConfigStatus>,
    now: SystemTime,
) -> NodeAgentConfigStatus {
    let in_sync = inputs.enforced_hash.is_some() && inputs.enforced_hash == inputs.spec_hash;
    let (sync_reason, sync_message) = if in_sync {
        ("Enforced", "the agent enforces this version".to_string())
    } else if let Some(error) = inputs.last_error {
        ("InvalidConfig", truncate(error, 1024))
    } else {
        (
            "Pending",
            "the agent has not loaded this version yet".to_string(),
        )
    };
    let ready = inputs.enforced_hash.is_some();
    let (ready_reason, ready_message) = if ready {
        (
            "ConfigLoaded",
            "the agent serves with a valid configuration",
        )
    } else {
        (
            "NoValidConfig",
            "the agent has no valid configuration and denies every request",
        )
    };
    let conditions = vec![
        condition(previous, "InSync", in_sync, sync_reason, &sync_message, now),
        condition(previous, "Ready", ready, ready_reason, ready_message, now),
    ];
    NodeAgentConfigStatus {
        observed_hash: inputs.enforced_hash.map(String::from),
        conditions,
        serving_cert_expiry: inputs.serving_cert_expiry.and_then(to_time),
        last_error: inputs.last_error.map(|e| truncate(e, 1024)),
        components: inputs.components.map(String::from),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn to_time(t: SystemTime) -> Option<Time> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    let ts = k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).ok()?).ok()?;
    Some(Time(ts))
}

fn condition(
    previous: Option<&NodeAgentConfigStatus>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: SystemTime,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let previous = previous
        .into_iter()
        .flat_map(|p| &p.conditions)
        .find(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => to_time(now).unwrap_or(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time,
        observed_generation: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use nodegate_compiler::validation::{agent_spec_violations, is_dns_label, message};
    use nodegate_crds::{Endpoint, Port, rules};
    use serde_json::json;
    use std::path::Path;

    fn repo(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    }

    fn node(labels: &[(&str, &str)]) -> NodeIdentity {
        NodeIdentity {
            name: "node-a".into(),
            uid: "uid-a".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn rule(policy: &str) -> Value {
        json!({
            "policy": policy,
            "subjects": [{"kind": "ServiceAccount", "name": "prom", "namespace": "monitoring"}],
            "endpoints": ["cadvisor", "pods"],
            "namespaces": {"names": ["team-b", "team-a"]},
            "ports": ["Secure"],
        })
    }

    /// A spec of rules written with their subjects and namespaces spelled out (as the old
    /// format had them), packed into the tables and indices of the format the agent reads.
    /// Values that are not a list of subjects or a namespace scope are left in place, for the
    /// refusals to see.
    fn spec(rules: Vec<Value>) -> Value {
        let mut subjects: Vec<Value> = Vec::new();
        let mut sets: Vec<Value> = Vec::new();
        let rules: Vec<Value> = rules
            .into_iter()
            .map(|mut rule| {
                if let Some(list) = rule["subjects"].as_array().cloned() {
                    let indices: Vec<usize> = list
                        .into_iter()
                        .map(|s| {
                            subjects.push(s);
                            subjects.len() - 1
                        })
                        .collect();
                    rule["subjects"] = json!(indices);
                }
                if rule["namespaces"].is_object() {
                    sets.push(rule["namespaces"].take());
                    rule["namespaces"] = json!(sets.len() - 1);
                }
                rule
            })
            .collect();
        json!({"policies": "p", "hash": "h1", "subjects": subjects, "namespaceSets": sets, "rules": rules})
    }

    fn refusal(spec: &Value) -> String {
        validate_agent_spec("test", spec).unwrap_err().to_string()
    }

    #[test]
    fn config_source_flag() {
        assert_eq!("api".parse(), Ok(ConfigSourceFlag::Api));
        assert_eq!(
            "file:/etc/nodegate/config.yaml".parse(),
            Ok(ConfigSourceFlag::File("/etc/nodegate/config.yaml".into()))
        );
        for bad in ["", "file:", "files:/x", "API", "api:x"] {
            assert!(bad.parse::<ConfigSourceFlag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn valid_spec_is_accepted_with_sorted_namespaces() {
        let parsed = validate_agent_spec("test", &spec(vec![rule("p")])).unwrap();
        let namespaces = parsed.unpack(0).unwrap().namespaces;
        assert_eq!(namespaces.names, ["team-a", "team-b"]);
        assert!(namespaces.allows("team-b"));
        assert!(!namespaces.allows("team-c"));
    }

    #[test]
    fn invalid_specs_are_refused_with_a_reason() {
        let mut unknown_field = rule("p");
        unknown_field["verbs"] = json!(["get"]);
        assert!(refusal(&spec(vec![unknown_field])).contains("unknown field \"verbs\""));

        let mut top_unknown = spec(vec![rule("p")]);
        top_unknown["extra"] = json!(1);
        assert!(refusal(&top_unknown).contains("unknown field \"extra\""));

        let mut unknown_endpoint = rule("p");
        unknown_endpoint["endpoints"] = json!(["cadvisor", "shell"]);
        assert!(refusal(&spec(vec![unknown_endpoint])).contains("shell"));

        let mut duplicate_endpoint = rule("p");
        duplicate_endpoint["endpoints"] = json!(["cadvisor", "cadvisor"]);
        assert!(refusal(&spec(vec![duplicate_endpoint])).contains("duplicate endpoint"));

        assert!(refusal(&spec(vec![rule("p"), rule("p")])).contains("duplicate policy"));

        let mut bad_namespace = rule("p");
        bad_namespace["namespaces"] = json!({"names": ["Team_A"]});
        assert!(refusal(&spec(vec![bad_namespace])).contains("DNS-1123"));

        let mut duplicate_namespace = rule("p");
        duplicate_namespace["namespaces"] = json!({"names": ["a", "a"]});
        assert!(refusal(&spec(vec![duplicate_namespace])).contains("duplicate namespace"));

        let mut node_wide = rule("p");
        node_wide["endpoints"] = json!(["metrics"]);
        assert!(refusal(&spec(vec![node_wide])).contains("need namespaces.all: true"));

        let mut anonymous_secure = rule("p");
        anonymous_secure["subjects"] = json!([{"kind": "Group", "name": "system:unauthenticated"}]);
        assert!(refusal(&spec(vec![anonymous_secure])).contains("ReadOnly port"));

        let mut read_only_exec = rule("p");
        read_only_exec["subjects"] = json!([{"kind": "User", "name": "system:anonymous"}]);
        read_only_exec["ports"] = json!(["ReadOnly"]);
        read_only_exec["endpoints"] = json!(["exec"]);
        read_only_exec["namespaces"] = json!({"all": true});
        assert!(
            refusal(&spec(vec![read_only_exec])).contains("never served on the read-only port")
        );

        let mut user_with_namespace = rule("p");
        user_with_namespace["subjects"] = json!([{"kind": "User", "name": "u", "namespace": "x"}]);
        assert!(
            refusal(&spec(vec![user_with_namespace])).contains("User and Group subjects have none")
        );

        let mut no_subjects = rule("p");
        no_subjects["subjects"] = json!([]);
        assert!(refusal(&spec(vec![no_subjects])).contains("at least one subject"));

        let mut bad_label = rule("p");
        bad_label["metrics"] = json!({"addLabels": {"namespace": "x"}});
        assert!(refusal(&spec(vec![bad_label])).contains("metrics.addLabels"));

        let mut dangling_namespaces = spec(vec![rule("p")]);
        dangling_namespaces["rules"][0]["namespaces"] = json!(1);
        assert!(
            refusal(&dangling_namespaces)
                .contains("namespace index 1 names no entry of spec.namespaceSets (1 entries)")
        );
        let mut dangling_subject = spec(vec![rule("p")]);
        dangling_subject["rules"][0]["subjects"] = json!([0, 3]);
        assert!(
            refusal(&dangling_subject)
                .contains("subject index 3 names no entry of spec.subjects (1 entries)")
        );
    }

    /// A spec in the format before subjects and namespace scopes were shared (an operator of
    /// the previous version, during an upgrade) is refused, not misread: its rules' subjects
    /// and namespaces are not indices.
    #[test]
    fn the_previous_format_is_refused() {
        let old = json!({"policies": "p", "hash": "h1", "rules": [rule("p")]});
        let err = refusal(&old);
        assert!(
            err.contains(
                "spec.rules[0].namespaces: Invalid value: \"object\": must be of type integer"
            ),
            "{err}"
        );
        assert!(
            err.contains(
                "spec.rules[0].subjects[0]: Invalid value: \"object\": must be of type integer"
            ),
            "{err}"
        );
    }

    #[test]
    fn store_denies_until_loaded_and_keeps_the_last_good_version() {
        let store = ConfigStore::new();
        assert!(!store.is_loaded());
        assert!(
            store.current().spec.rules.is_empty(),
            "deny-all before loading"
        );
        let changes = store.subscribe();

        let v1 = validate_agent_spec("t", &spec(vec![rule("p")])).unwrap();
        assert_eq!(store.publish(v1.clone()), 1);
        assert!(store.is_loaded());
        assert!(changes.has_changed().unwrap());
        let in_flight = store.current();

        store.reject("bad update".into());
        assert_eq!(
            *store.current().spec,
            v1,
            "an invalid version keeps the old one"
        );
        assert_eq!(store.last_error().as_deref(), Some("bad update"));

        assert_eq!(
            store.publish(v1.clone()),
            1,
            "an unchanged spec is not swapped"
        );
        assert!(store.last_error().is_none());

        let mut v2 = v1.clone();
        v2.hash = "h2".into();
        assert_eq!(store.publish(v2.clone()), 2);
        assert_eq!(store.current().spec.hash, "h2");
        assert_eq!(
            in_flight.spec.hash, "h1",
            "a request in flight keeps its version"
        );

        store.clear("deleted");
        assert!(!store.is_loaded());
        assert!(store.current().spec.rules.is_empty());
    }

    fn yaml_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn every_invalid_sample_is_refused_with_its_rules_message() {
        let dir = repo("config/samples/invalid");
        let files = yaml_files(&dir);
        assert_eq!(files.len(), rules::ALL.len(), "one invalid sample per rule");
        for file in files {
            let stem = file.file_stem().unwrap().to_str().unwrap().to_string();
            let rule = rules::ALL
                .iter()
                .find(|(name, _)| *name == stem)
                .unwrap_or_else(|| panic!("{stem}: no rule of that name"))
                .1;
            let text = std::fs::read_to_string(&file).unwrap();
            let err = parse_config_file(&text, &node(&[("pool", "gpu")]))
                .expect_err(&stem)
                .to_string();
            assert!(
                err.contains(&message(rule)),
                "{stem}: refused with {err:?}, not its rule's message"
            );
        }
    }

    #[test]
    fn every_valid_sample_is_accepted_alone_and_together() {
        let mut all = String::new();
        for file in yaml_files(&repo("config/samples")) {
            let text = std::fs::read_to_string(&file).unwrap();
            parse_config_file(&text, &node(&[("pool", "gpu")]))
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            all.push_str("---\n");
            all.push_str(&text);
        }
        let gpu = parse_config_file(&all, &node(&[("pool", "gpu")])).unwrap();
        let plain = parse_config_file(&all, &node(&[])).unwrap();
        let policies = |s: &NodeAgentConfigSpec| -> Vec<String> {
            s.rules.iter().map(|r| r.policy.clone()).collect()
        };
        assert!(policies(&gpu).contains(&"team-a-gpu-metrics".to_string()));
        assert!(
            !policies(&plain).contains(&"team-a-gpu-metrics".to_string()),
            "the node selector applies to this node's labels"
        );
        assert_eq!(gpu.hash, compiler::spec_hash(&gpu));
    }

    #[test]
    fn policy_files_are_checked_like_the_crd() {
        let policy = |spec: &str| {
            format!(
                "apiVersion: nodegate.io/v1alpha1\nkind: NodeApiPolicy\nmetadata:\n  name: p\nspec:\n{spec}"
            )
        };
        let unknown = policy(
            "  subjects: [{kind: Group, name: g}]\n  access: [pods]\n  namespaces: {names: [a]}\n  verbs: [get]\n",
        );
        let err = parse_config_file(&unknown, &node(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field \"verbs\""), "{err}");
        let duplicate = format!(
            "{}---\n{}",
            policy(
                "  subjects: [{kind: Group, name: g}]\n  access: [pods]\n  namespaces: {names: [a]}\n"
            ),
            policy(
                "  subjects: [{kind: Group, name: h}]\n  access: [pods]\n  namespaces: {names: [a]}\n"
            )
        );
        let err = parse_config_file(&duplicate, &node(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("appears twice"), "{err}");
    }

    fn agent_config_yaml(name: &str, hash: &str) -> String {
        format!(
            "apiVersion: nodegate.io/v1alpha1\nkind: NodeAgentConfig\nmetadata:\n  name: {name}\nspec:\n  hash: {hash}\n  subjects: [{{kind: Group, name: team-a}}]\n  namespaceSets: [{{names: [team-a]}}]\n  rules:\n  - policy: p\n    subjects: [0]\n    endpoints: [pods]\n    namespaces: 0\n    ports: [Secure]\n"
        )
    }

    #[test]
    fn file_with_a_node_agent_config() {
        let spec = parse_config_file(&agent_config_yaml("node-a", "h1"), &node(&[])).unwrap();
        assert_eq!(spec.hash, "h1");
        assert_eq!(spec.rules.len(), 1);
        let err = parse_config_file(&agent_config_yaml("node-b", "h1"), &node(&[])).unwrap_err();
        assert!(err.to_string().contains("node-b"), "{err}");
        let mixed = format!(
            "{}---\n{}",
            agent_config_yaml("node-a", "h1"),
            std::fs::read_to_string(repo("config/samples/monitoring-team-a.yaml")).unwrap()
        );
        assert!(parse_config_file(&mixed, &node(&[])).is_err());
        assert!(parse_config_file("", &node(&[])).is_err());
        assert!(parse_config_file("---\n", &node(&[])).is_err());
        assert!(parse_config_file("{not yaml", &node(&[])).is_err());
        let other_kind = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n";
        assert!(parse_config_file(other_kind, &node(&[])).is_err());
    }

    #[tokio::test]
    async fn file_source_waits_for_the_node_and_recompiles_when_its_labels_change() {
        let dir =
            std::env::temp_dir().join(format!("nodegate-config-labels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.yaml");
        std::fs::write(
            &path,
            "apiVersion: nodegate.io/v1alpha1\nkind: NodeApiPolicy\nmetadata: {name: gpu}\n\
             spec: {subjects: [{kind: Group, name: g}], nodeSelector: {matchLabels: {pool: gpu}}, \
             access: [pods], namespaces: {names: [a]}}\n",
        )
        .unwrap();
        let (tx, rx) = tokio::sync::watch::channel(None);
        let store = ConfigStore::new();
        let task = tokio::spawn(run_file(
            path.clone(),
            rx,
            store.clone(),
            Duration::from_secs(3600),
        ));
        let policies = |store: ConfigStore| async move {
            for _ in 0..300 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if store.is_loaded() {
                    return Some(store.current().spec.policies.clone());
                }
            }
            None
        };
        // The node is not known yet: nothing loaded, and the store says why.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!store.is_loaded());
        assert!(store.last_error().unwrap().contains("labels"));
        tx.send(Some(node(&[("pool", "cpu")]))).unwrap();
        assert_eq!(policies(store.clone()).await.as_deref(), Some(""));
        // Relabelled: compiled again at once (the file poll is an hour away).
        let generation = store.current().generation;
        tx.send(Some(node(&[("pool", "gpu")]))).unwrap();
        for _ in 0..300 {
            if store.current().generation > generation {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.current().spec.policies, "gpu");
        tx.send(Some(node(&[]))).unwrap();
        let generation = store.current().generation;
        for _ in 0..300 {
            if store.current().generation > generation {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.current().spec.policies, "");
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn file_source_sees_atomic_renames_and_keeps_the_last_good_version() {
        let dir = std::env::temp_dir().join(format!("nodegate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.yaml");
        let replace = |content: &str| {
            let tmp = dir.join(".config.yaml.tmp");
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        let store = ConfigStore::new();
        let task = tokio::spawn(run_file(
            path.clone(),
            fixed_node(node(&[])),
            store.clone(),
            Duration::from_millis(10),
        ));
        let wait_for = |hash: &'static str| {
            let store = store.clone();
            async move {
                for _ in 0..300 {
                    if store.is_loaded() && store.current().spec.hash == hash {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!store.is_loaded(), "no file: not ready");
        assert!(store.last_error().is_some());

        replace(&agent_config_yaml("node-a", "h1"));
        assert!(wait_for("h1").await);
        replace(
            "apiVersion: nodegate.io/v1alpha1\nkind: NodeAgentConfig\nspec: {hash: h2, rules: [{policy: p, subjects: [], endpoints: [shell], namespaces: 0, ports: []}]}\n",
        );
        for _ in 0..300 {
            if store.last_error().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(store.last_error().is_some());
        assert_eq!(
            store.current().spec.hash,
            "h1",
            "kept the last good version"
        );
        replace(&agent_config_yaml("node-a", "h3"));
        assert!(wait_for("h3").await);
        assert!(store.last_error().is_none());
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn status_reports_sync_readiness_and_errors() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let t1 = t0 + Duration::from_secs(60);
        let expiry = t0 + Duration::from_secs(86_400);
        let cond = |s: &NodeAgentConfigStatus, t: &str| {
            s.conditions.iter().find(|c| c.type_ == t).unwrap().clone()
        };

        let pending = desired_status(&StatusInputs::default(), None, t0);
        assert_eq!(cond(&pending, "Ready").status, "False");
        assert_eq!(cond(&pending, "InSync").reason, "Pending");
        assert_eq!(pending.observed_hash, None);

        let inputs = StatusInputs {
            enforced_hash: Some("h1"),
            spec_hash: Some("h1"),
            last_error: None,
            serving_cert_expiry: Some(expiry),
            components: Some("kube-proxy,etcd"),
        };
        let synced = desired_status(&inputs, Some(&pending), t0);
        assert_eq!(synced.components.as_deref(), Some("kube-proxy,etcd"));
        assert_eq!(synced.observed_hash.as_deref(), Some("h1"));
        assert_eq!(cond(&synced, "InSync").status, "True");
        assert_eq!(cond(&synced, "Ready").reason, "ConfigLoaded");
        assert!(synced.serving_cert_expiry.is_some());
        // Nothing changed: identical status (no write), transition times kept.
        assert_eq!(desired_status(&inputs, Some(&synced), t1), synced);

        let broken = StatusInputs {
            enforced_hash: Some("h1"),
            spec_hash: Some("h2"),
            last_error: Some("NodeAgentConfig \"node-a\" is invalid: unknown endpoint"),
            serving_cert_expiry: Some(expiry),
            components: None,
        };
        let invalid = desired_status(&broken, Some(&synced), t1);
        assert_eq!(invalid.observed_hash.as_deref(), Some("h1"));
        assert_eq!(cond(&invalid, "InSync").status, "False");
        assert_eq!(cond(&invalid, "InSync").reason, "InvalidConfig");
        assert_ne!(
            cond(&invalid, "InSync").last_transition_time,
            cond(&synced, "InSync").last_transition_time
        );
        assert_eq!(cond(&invalid, "Ready").status, "True", "still serving h1");
        assert_eq!(
            cond(&invalid, "Ready").last_transition_time,
            cond(&synced, "Ready").last_transition_time
        );
        assert!(invalid.last_error.unwrap().contains("unknown endpoint"));
    }

    proptest::proptest! {
        /// Arbitrary text never panics the file parser, and anything it accepts is valid.
        #[test]
        fn file_parser_never_panics(text in "[ -~\n]{0,300}") {
            if let Ok(spec) = parse_config_file(&text, &node(&[])) {
                proptest::prop_assert!(agent_spec_violations(&spec).is_empty());
            }
        }

        /// Random mutations of a valid spec are either refused or still valid.
        #[test]
        fn accepted_specs_satisfy_every_check(
            endpoints in proptest::collection::vec(proptest::sample::select(Endpoint::all().map(|e| e.name()).collect::<Vec<_>>()), 0..4),
            names in proptest::collection::vec("[a-zA-Z0-9_.-]{0,8}", 0..4),
            all in proptest::bool::ANY,
            read_only in proptest::bool::ANY,
            anonymous in proptest::bool::ANY,
        ) {
            let mut r = rule("p");
            r["endpoints"] = json!(endpoints);
            r["namespaces"] = if all { json!({"all": true}) } else { json!({"names": names}) };
            r["ports"] = if read_only { json!(["ReadOnly"]) } else { json!(["Secure"]) };
            if anonymous {
                r["subjects"] = json!([{"kind": "User", "name": "system:anonymous"}]);
            }
            if let Ok(spec) = validate_agent_spec("t", &spec(vec![r])) {
                let rule = &spec.unpack(0).unwrap();
                proptest::prop_assert!(rule.namespaces.names.windows(2).all(|w| w[0] < w[1]));
                proptest::prop_assert!(rule.namespaces.names.iter().all(|n| is_dns_label(n)));
                proptest::prop_assert_eq!(rule.ports.contains(&Port::ReadOnly), anonymous);
                proptest::prop_assert!(!rule.endpoints.is_empty());
                if rule.endpoints.iter().any(|e| Endpoint::node_wide().any(|n| n == *e)) {
                    proptest::prop_assert!(rule.namespaces.all);
                }
            }
        }
    }

    #[test]
    fn node_labels_flag() {
        let labels = parse_node_labels("pool=gpu, zone = a,,empty=").unwrap();
        assert_eq!(labels.get("pool").map(String::as_str), Some("gpu"));
        assert_eq!(labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(labels.get("empty").map(String::as_str), Some(""));
        assert!(parse_node_labels("").unwrap().is_empty());
        assert!(parse_node_labels("pool").is_err());
        assert!(parse_node_labels("=x").is_err());
    }
}
