//! One reconcile round: compile, exclude foreign names, diff against the caches, write the
//! differences (each object on its own backoff), then status and events.

use super::Settings;
use super::diff::{self, Existing};
use super::fence::{Fence, Fenced};
use super::metrics::{Metrics, RoundCause};
use super::objects::{self, INSTANCE_LABEL, Key, Kind, Output};
use super::ownership::{self, Skipped};
use super::status::{self, Observed};
use crate::compiler::{self, NamespaceInfo, NodeInfo};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta, Time};
use kube::api::{
    Api, DeleteParams, DynamicObject, PartialObjectMeta, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use nodegate_crds::policy::{GeneratedObjects, NodeApiPolicyStatus};
use nodegate_crds::{FIELD_MANAGER, NodeAgentRuleSet, NodeApiPolicy};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The watch caches a round reads.
#[derive(Clone)]
pub(crate) struct Stores {
    pub policies: Store<NodeApiPolicy>,
    pub nodes: Store<PartialObjectMeta<Node>>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub cluster_roles: Store<ClusterRole>,
    pub cluster_role_bindings: Store<ClusterRoleBinding>,
    pub role_bindings: Store<RoleBinding>,
    pub service_accounts: Store<ServiceAccount>,
    pub node_agent_rule_sets: Store<NodeAgentRuleSet>,
    pub node_agent_configs: Store<nodegate_crds::NodeAgentConfig>,
}

impl Stores {
    pub async fn wait_until_ready(&self) -> Result<(), ()> {
        let all = futures::future::try_join_all([
            self.policies.wait_until_ready().boxed(),
            self.nodes.wait_until_ready().boxed(),
            self.namespaces.wait_until_ready().boxed(),
            self.cluster_roles.wait_until_ready().boxed(),
            self.cluster_role_bindings.wait_until_ready().boxed(),
            self.role_bindings.wait_until_ready().boxed(),
            self.service_accounts.wait_until_ready().boxed(),
            self.node_agent_rule_sets.wait_until_ready().boxed(),
            self.node_agent_configs.wait_until_ready().boxed(),
        ]);
        all.await.map(|_| ()).map_err(|_| ())
    }

    /// Every owned output in the caches, as JSON with empty values stripped. Objects whose resourceVersion is the one
    /// `cache` saw are not serialized again (a big cluster's round is mostly this).
    fn existing(&self, cache: &mut JsonCache) -> BTreeMap<Key, Existing> {
        let mut map = BTreeMap::new();
        add(&mut map, cache, Kind::ClusterRole, &self.cluster_roles);
        add(
            &mut map,
            cache,
            Kind::ClusterRoleBinding,
            &self.cluster_role_bindings,
        );
        add(&mut map, cache, Kind::RoleBinding, &self.role_bindings);
        add(
            &mut map,
            cache,
            Kind::ServiceAccount,
            &self.service_accounts,
        );
        add(
            &mut map,
            cache,
            Kind::NodeAgentRuleSet,
            &self.node_agent_rule_sets,
        );
        add(
            &mut map,
            cache,
            Kind::NodeAgentConfig,
            &self.node_agent_configs,
        );
        cache.retain(|k, _| map.contains_key(k));
        map
    }
}

use futures::FutureExt;

/// JSON of cached objects by key, with the resourceVersion it was made from and the fields
/// nodegate owns in it.
type JsonCache = HashMap<Key, (String, Arc<Value>, Option<Arc<Value>>)>;

fn add<K>(map: &mut BTreeMap<Key, Existing>, cache: &mut JsonCache, kind: Kind, store: &Store<K>)
where
    K: Resource<DynamicType = ()> + Clone + serde::Serialize + 'static,
{
    for object in store.state() {
        let meta = object.meta();
        let key = Key::new(
            kind,
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or_default(),
        );
        let rv = meta.resource_version.clone().unwrap_or_default();
        let (body, owned) = match cache.get(&key) {
            Some((seen, body, owned)) if !rv.is_empty() && *seen == rv => {
                (body.clone(), owned.clone())
            }
            _ => {
                let Ok(mut body) = serde_json::to_value(&*object) else {
                    continue;
                };
                // Kept apart (and unstripped: an owned leaf is an empty map).
                let owned = applied_fields(meta, kind).map(Arc::new);
                if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("managedFields");
                }
                let body = Arc::new(objects::strip_empty(body));
                cache.insert(key.clone(), (rv.clone(), body.clone(), owned.clone()));
                (body, owned)
            }
        };
        map.insert(
            key,
            Existing {
                version: diff::Version {
                    uid: meta.uid.clone(),
                    resource_version: (!rv.is_empty()).then_some(rv),
                },
                body,
                owned,
            },
        );
    }
}

/// The fields nodegate's field manager owns by apply (`fieldsV1` of its Apply entry); for a
/// kind [`owned_by_create`](Kind::owned_by_create), those of its create's Update entry until
/// an apply has taken them over.
fn applied_fields(meta: &ObjectMeta, kind: Kind) -> Option<Value> {
    let entry = |operation: &str| {
        meta.managed_fields.iter().flatten().find(|m| {
            m.manager.as_deref() == Some(FIELD_MANAGER)
                && m.operation.as_deref() == Some(operation)
                && m.subresource.is_none()
        })
    };
    entry("Apply")
        .or_else(|| entry("Update").filter(|_| kind.owned_by_create()))
        .and_then(|m| m.fields_v1.as_ref())
        .map(|f| f.0.clone())
}

/// Phase 1's result: what the caches held when the round started, and what the policies
/// compile to.
struct Snapshot {
    /// Policies not being deleted.
    policies: Vec<NodeApiPolicy>,
    nodes: usize,
    namespaces: usize,
    /// The compiler's output, shared with [`Compiled`]; its NodeAgentRuleSets hold only their
    /// hash.
    desired: Arc<compiler::Desired>,
    /// Their specs, by hash.
    rule_sets: Arc<compiler::RuleSets>,
    /// Whether this round compiled (false: its inputs were those of the last compile).
    compiled: bool,
    /// Every owned object in the caches, as JSON.
    existing: BTreeMap<Key, Existing>,
}

/// Phase 2's result: who holds the names the round would write.
struct Ownership {
    /// What may be written: the compiled objects less those left out below (a copy of the
    /// compiled result only when something is left out).
    desired: Arc<compiler::Desired>,
    /// Left out because an object nodegate does not own holds the name (or the role a binding
    /// would name).
    foreign: Vec<Skipped>,
    /// Left out this round because the name could not be checked, or its check is backing off.
    unchecked: Vec<Skipped>,
    /// Names whose check failed this round.
    unknown: BTreeSet<Key>,
}

/// Phase 3's result: the writes due now, by the order they are sent in.
#[derive(Default)]
struct Writes {
    /// ClusterRoles and ServiceAccounts.
    roles: Vec<Output>,
    /// NodeAgentRuleSets, with the body they were compared on (metadata and hash only).
    rule_sets: Vec<Output>,
    /// NodeAgentConfigs: each names its node's rule set, so it goes after the rule sets.
    configs: Vec<Output>,
    bindings: Vec<Output>,
    /// Owned objects no policy asks for, with the version the delete is conditioned on.
    deletes: Vec<(Key, diff::Version)>,
    /// Desired objects the cluster already holds as desired.
    unchanged: usize,
    /// Per policy, the names of its objects (for status).
    generated: BTreeMap<String, GeneratedObjects>,
}

/// What the agents enforce, read from the configs' status and the rule sets they name.
struct Grants {
    /// Each version other than the one wanted that some node's agent (or written config)
    /// still holds: the policies it holds rules of, and those nodes. Kept per version, not
    /// per policy: a thousand policies on five hundred nodes were half a million entries a
    /// round, while agents caught up.
    stale: Vec<(Arc<PolicyRules>, Vec<String>)>,
    /// Nodes on a version no compile of this operator knows (it may hold anything).
    unknown: Vec<String>,
    /// Per node, the hash its agent reports enforcing.
    observed: HashMap<String, String>,
}

/// Phase 4's result: per policy, what happened to its objects.
#[derive(Default)]
struct Results {
    /// Objects written, by policy.
    applied: BTreeMap<String, Vec<String>>,
    /// Writes refused or failed, one sentence each, by policy.
    failed: BTreeMap<String, Vec<String>>,
    /// Objects left alone because someone else holds their name, one sentence each.
    foreign: BTreeMap<String, Vec<String>>,
    /// Policies with bindings waiting for their role to reach the API server's cache.
    deferred: BTreeSet<String>,
    generated: BTreeMap<String, GeneratedObjects>,
}

/// The last compile and a digest of its inputs: a round whose inputs are unchanged (a resync,
/// a retry, an event about nodegate's own objects or an agent's sync state) reuses it.
struct Compiled {
    inputs: u64,
    desired: Arc<compiler::Desired>,
    /// The NodeAgentRuleSets' specs, one per distinct selection of nodes.
    rule_sets: Arc<compiler::RuleSets>,
}

/// The namespaces `compile` can tell apart for `policies`: every namespace when a policy
/// selects namespaces by label, else only those some policy names (`namespaces.all` binds
/// cluster-wide). Namespaces no policy can reach change no output, so their churn (other
/// teams' namespaces coming and going) costs no compile.
fn reachable_namespaces(
    policies: &[NodeApiPolicy],
    namespaces: Vec<NamespaceInfo>,
) -> Vec<NamespaceInfo> {
    if policies
        .iter()
        .any(|p| p.spec.namespaces.selector.is_some())
    {
        return namespaces;
    }
    let named: BTreeSet<&str> = policies
        .iter()
        .flat_map(|p| p.spec.namespaces.names.iter().flatten())
        .map(String::as_str)
        .collect();
    namespaces
        .into_iter()
        .filter(|n| named.contains(n.name.as_str()))
        .collect()
}

/// A digest of everything `compile` reads: each policy's identity and spec (its generation),
/// each node's and namespace's name and labels, and the instance label.
fn inputs_digest(
    policies: &[NodeApiPolicy],
    nodes: &[NodeInfo],
    namespaces: &[NamespaceInfo],
    instance: Option<&str>,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut policies: Vec<_> = policies
        .iter()
        .map(|p| {
            let meta = &p.metadata;
            // Without a generation (objects not from an API server) the spec itself.
            let spec = match meta.generation {
                Some(_) => Vec::new(),
                None => serde_json::to_vec(&p.spec).unwrap_or_default(),
            };
            (&meta.name, &meta.uid, meta.generation, spec)
        })
        .collect();
    policies.sort();
    let mut nodes: Vec<(&String, &String, &BTreeMap<String, String>)> =
        nodes.iter().map(|n| (&n.name, &n.uid, &n.labels)).collect();
    nodes.sort();
    let mut namespaces: Vec<(&String, &BTreeMap<String, String>)> =
        namespaces.iter().map(|n| (&n.name, &n.labels)).collect();
    namespaces.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (policies, nodes, namespaces, instance).hash(&mut hasher);
    hasher.finish()
}

/// What a round leaves for the loop.
pub(crate) struct RoundReport {
    /// When the earliest object waiting for a retry is due.
    pub next_retry: Option<Instant>,
}

/// A status patch: the policy, the new and previous status, and how the patch went.
type StatusWrite = (
    NodeApiPolicy,
    NodeApiPolicyStatus,
    Option<NodeApiPolicyStatus>,
    Result<(), WriteError>,
);

/// A failing object and when it may be tried again.
struct Failure {
    count: u32,
    until: Instant,
    message: String,
    policies: BTreeSet<String>,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// Leadership not confirmed: nothing is recorded, the round is being cancelled.
    #[error(transparent)]
    Fenced(#[from] Fenced),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Whether a refused write can succeed by itself on a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// The API server (or admission, or RBAC) refused this request as it is: it fails the
    /// same way until someone changes the cluster or the policy.
    Permanent,
    /// Overload, a timeout, a restart or a network fault: it may pass on the next try.
    Transient,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Permanent => "permanent",
            ErrorClass::Transient => "transient",
        }
    }
}

/// 4xx other than 408 (timeout), 409 (conflict) and 429 (throttled) is permanent; 5xx,
/// those three and every error without an answer (connection, TLS, timeout) are transient.
/// A body that does not (de)serialize cannot change by retrying: permanent.
pub(crate) fn classify(error: &kube::Error) -> ErrorClass {
    match error {
        kube::Error::Api(s) => match s.code {
            408 | 409 | 429 => ErrorClass::Transient,
            400..=499 => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        },
        kube::Error::SerdeError(_) | kube::Error::BuildRequest(_) => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// Delay before retry number `count` (1-based) of a write that failed with `class`: a
/// transient error doubles from `base`; a permanent one starts at a quarter of `max` (it will
/// not pass by itself, so retrying fast only loads the API server) and reaches `max` at the
/// third failure.
pub(crate) fn retry_delay(
    class: ErrorClass,
    base: Duration,
    max: Duration,
    count: u32,
) -> Duration {
    match class {
        ErrorClass::Transient => backoff(base, max, count),
        ErrorClass::Permanent => backoff((max / 4).max(base), max, count),
    }
}

pub(crate) struct Reconciler {
    client: Client,
    settings: Settings,
    metrics: Metrics,
    stores: Stores,
    recorder: Option<Recorder>,
    failures: HashMap<Key, Failure>,
    json: JsonCache,
    /// The last compile, reused while its inputs are unchanged.
    compiled: Option<Compiled>,
    /// A write this round found its object changed since the cache read it.
    behind: bool,
    /// The policies of each rule set this process compiled, by hash, each with a digest of
    /// its rule there; kept while a node's NodeAgentConfig holds it or its agent enforces it.
    /// What a node a policy no longer selects may still grant (a revocation is pending
    /// there), and whether an agent that enforces another version than the current one
    /// already enforces a policy's current rule (a change to one policy must not make every
    /// other policy on those nodes wait for the agents, and patch all their statuses twice).
    policies_by_hash: HashMap<String, Arc<PolicyRules>>,
    /// Every write passes it: none is sent unless leadership is confirmed.
    fence: Fence,
}

impl Reconciler {
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Metrics,
        stores: Stores,
        fence: Fence,
    ) -> Self {
        let recorder = settings.events.then(|| {
            Recorder::new(
                client.clone(),
                Reporter {
                    controller: settings.reporter.clone(),
                    instance: settings.reporter_instance.clone(),
                },
            )
        });
        Self {
            client,
            settings,
            metrics,
            stores,
            recorder,
            failures: HashMap::new(),
            json: HashMap::new(),
            compiled: None,
            behind: false,
            policies_by_hash: HashMap::new(),
            fence,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn api(&self, key: &Key) -> Api<DynamicObject> {
        let ar = key.kind.api_resource();
        match &key.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// One round, in five phases: what the caches hold and what the policies compile to
    /// ([`snapshot`](Self::snapshot)); who holds the names to write
    /// ([`ownership`](Self::ownership)); what differs ([`plan`](Self::plan)); the writes
    /// ([`apply`](Self::apply)); each policy's status and events ([`report`](Self::report)).
    pub async fn round(&mut self, cause: RoundCause) -> RoundReport {
        let started = std::time::Instant::now();
        let snapshot = self.snapshot().await;
        let t_snapshot = started.elapsed();
        let owners = self.ownership(&snapshot).await;
        let t_ownership = started.elapsed();
        let plan = self.plan(&snapshot, &owners);
        let unchanged = plan.unchanged;
        let t_plan = started.elapsed();
        let results = self.apply(&snapshot, &owners, plan).await;
        let t_apply = started.elapsed();
        let next_retry = self.report(&snapshot, &owners, &results).await;

        let elapsed = started.elapsed();
        self.metrics.round(cause, elapsed.as_secs_f64());
        // Cumulative milliseconds at the end of each phase: where a slow round goes.
        tracing::debug!(
            policies = snapshot.policies.len(),
            nodes = snapshot.nodes,
            namespaces = snapshot.namespaces,
            compiled = snapshot.compiled,
            unchanged,
            snapshot_ms = t_snapshot.as_millis() as u64,
            ownership_ms = t_ownership.as_millis() as u64,
            plan_ms = t_plan.as_millis() as u64,
            apply_ms = t_apply.as_millis() as u64,
            elapsed_ms = elapsed.as_millis() as u64,
            "round done"
        );
        RoundReport { next_retry }
    }

    /// Phase 1: the caches' policies, nodes and namespaces, what they compile to (reused when
    /// none of them changed since the last compile), and every owned object the caches hold.
    async fn snapshot(&mut self) -> Snapshot {
        let mut policies: Vec<NodeApiPolicy> = self
            .stores
            .policies
            .state()
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| (**p).clone())
            .collect();
        let nodes: Vec<NodeInfo> = self
            .stores
            .nodes
            .state()
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .map(|n| NodeInfo {
                name: n.name_any(),
                uid: n.metadata.uid.clone().unwrap_or_default(),
                labels: n.labels().clone(),
            })
            .collect();
        // A terminating namespace refuses new objects; its bindings go with it.
        let namespaces: Vec<NamespaceInfo> = self
            .stores
            .namespaces
            .state()
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .map(|n| NamespaceInfo {
                name: n.name_any(),
                labels: n.labels().clone(),
            })
            .collect();
        self.metrics
            .sizes(policies.len(), nodes.len(), namespaces.len());
        let namespace_count = namespaces.len();
        let node_count = nodes.len();
        let namespaces = reachable_namespaces(&policies, namespaces);

        let inputs = inputs_digest(
            &policies,
            &nodes,
            &namespaces,
            self.settings.instance.as_deref(),
        );
        let (desired, compiled) = match &self.compiled {
            Some(last) if last.inputs == inputs => {
                ((last.desired.clone(), last.rule_sets.clone()), false)
            }
            _ => {
                // The last result goes first: two at once would double the peak.
                self.compiled = None;
                // Seconds of CPU at scale: on the blocking pool, so the lease renewals and the
                // watches keep running (on the one worker a 1-CPU limit gives, a compile in
                // place starved the renewals past their deadline and the leader exited).
                let instance = self.settings.instance.clone();
                let (mut desired, rule_sets, back) = tokio::task::spawn_blocking(move || {
                    let (desired, rule_sets) = compiler::compile_shared(
                        &policies,
                        &nodes,
                        &namespaces,
                        instance.as_deref(),
                    );
                    (desired, rule_sets, policies)
                })
                .await
                .unwrap_or_else(|e| match e.try_into_panic() {
                    // A bug in the compiler: the same as had it run in place.
                    Ok(panic) => std::panic::resume_unwind(panic),
                    // Only when the runtime shuts down, which ends this round anyway.
                    Err(e) => std::panic::resume_unwind(Box::new(e.to_string())),
                });
                policies = back;
                if let Some(instance) = &self.settings.instance {
                    objects::label_all(&mut desired, INSTANCE_LABEL, instance);
                }
                for (hash, spec) in &rule_sets {
                    self.policies_by_hash
                        .entry(hash.clone())
                        .or_insert_with(|| Arc::new(policy_rules(spec)));
                }
                let rule_sets = Arc::new(rule_sets);
                self.metrics.compiled();
                let desired = Arc::new(desired);
                self.compiled = Some(Compiled {
                    inputs,
                    desired: desired.clone(),
                    rule_sets: rule_sets.clone(),
                });
                ((desired, rule_sets), true)
            }
        };
        let (desired, rule_sets) = desired;
        let existing = self.stores.existing(&mut self.json);
        for kind in Kind::ALL {
            let n = existing.keys().filter(|k| k.kind == kind).count();
            self.metrics.owned(kind.as_str(), n);
        }
        Snapshot {
            policies,
            nodes: node_count,
            namespaces: namespace_count,
            desired,
            rule_sets,
            compiled,
            existing,
        }
    }

    /// Phase 2: names the caches do not hold may be held by someone else: they are looked up
    /// (unless a failed lookup is backing off), and what a foreign object holds, or could not
    /// be checked, is left out of what the round writes.
    async fn ownership(&mut self, snapshot: &Snapshot) -> Ownership {
        let mut missing = Vec::new();
        objects::for_each_key(&snapshot.desired, |key| {
            if !snapshot.existing.contains_key(&key) {
                missing.push(key);
            }
        });
        // A name whose check failed before is looked at again only when its backoff is over.
        let now = Instant::now();
        let (to_check, backing_off): (Vec<Key>, Vec<Key>) =
            missing.into_iter().partition(|k| self.due(k, now));
        let (foreign, unknown) = self.check_ownership(to_check).await;
        let blocked: BTreeSet<Key> = foreign
            .iter()
            .chain(&unknown)
            .chain(&backing_off)
            .cloned()
            .collect();
        let mut desired = snapshot.desired.clone();
        let skipped = if blocked.is_empty() {
            Vec::new()
        } else {
            // Copied only when something is left out: the compiled result stays as it is.
            ownership::exclude_foreign(Arc::make_mut(&mut desired), &blocked)
        };
        let (foreign_skipped, unchecked): (Vec<_>, Vec<_>) = skipped
            .into_iter()
            .partition(|s| foreign.contains(&s.because_of));
        self.metrics.foreign(foreign_skipped.len());
        for s in &foreign_skipped {
            tracing::debug!(object = %s.key, because_of = %s.because_of, "left alone: not managed by nodegate");
        }
        Ownership {
            desired,
            foreign: foreign_skipped,
            unchecked,
            unknown,
        }
    }

    /// Phase 3: the desired objects compared with the cached ones; what is due now (not
    /// backing off) in the order it is written.
    fn plan(&mut self, snapshot: &Snapshot, owners: &Ownership) -> Writes {
        let outputs = objects::outputs(&owners.desired);
        let generated = generated_by_policy(&outputs);
        let mut plan = diff::plan(outputs, &snapshot.existing);
        // What could not be checked this round stays as it is: a transient error must not
        // delete a binding whose role merely failed a lookup.
        let held: BTreeSet<&Key> = owners.unchecked.iter().map(|s| &s.key).collect();
        plan.delete.retain(|(key, _)| !held.contains(key));
        // A rule set no selection wants any more may still be named by a config on the API
        // server (repointed later this round): deleting it first would leave that node's
        // agent with no rules, denying everything. It goes in the round its last config's
        // watch event starts.
        let named: BTreeSet<&str> = snapshot
            .existing
            .iter()
            .filter(|(key, _)| key.kind == Kind::NodeAgentConfig)
            .filter_map(|(_, e)| e.body["spec"]["ruleSet"].as_str())
            .collect();
        plan.delete.retain(|(key, _)| {
            key.kind != Kind::NodeAgentRuleSet || !named.contains(key.name.as_str())
        });
        self.metrics.unchanged(plan.unchanged);

        let now = Instant::now();
        let (due, waiting): (Vec<Output>, Vec<Output>) =
            plan.apply.into_iter().partition(|o| self.due(&o.key, now));
        let (deletes, deletes_waiting): (Vec<_>, Vec<_>) = plan
            .delete
            .into_iter()
            .partition(|(key, _)| self.due(key, now));
        let wanted: BTreeSet<Key> = due
            .iter()
            .chain(waiting.iter())
            .map(|o| o.key.clone())
            .chain(deletes.iter().map(|(k, _)| k.clone()))
            .chain(deletes_waiting.into_iter().map(|(k, _)| k))
            .chain(owners.unchecked.iter().map(|s| s.key.clone()))
            .collect();
        // Objects that are now as desired, or no longer desired and gone, stop failing.
        self.failures.retain(|k, _| wanted.contains(k));

        let mut writes = Writes {
            unchanged: plan.unchanged,
            generated,
            deletes,
            ..Writes::default()
        };
        for output in due {
            match output.key.kind {
                Kind::ClusterRoleBinding | Kind::RoleBinding => writes.bindings.push(output),
                Kind::NodeAgentRuleSet => writes.rule_sets.push(output),
                Kind::NodeAgentConfig => writes.configs.push(output),
                Kind::ClusterRole | Kind::ServiceAccount => writes.roles.push(output),
            }
        }
        writes
    }

    /// Phase 4: the writes. Deletes, roles and service accounts, and rule sets together; then
    /// the NodeAgentConfigs whose rule set the API server holds, then the bindings whose role
    /// it holds.
    async fn apply(&mut self, snapshot: &Snapshot, owners: &Ownership, writes: Writes) -> Results {
        let concurrency = self.settings.concurrency.max(1);
        let existing = &snapshot.existing;
        let mut results = Results {
            foreign: ownership::messages_by_policy(&owners.foreign),
            ..Results::default()
        };
        // Deletes, roles and rule sets go out together. None needs another in place: removing
        // a grant never does, a rule set is read only through the configs written after it,
        // and roles only have to precede their bindings (below). Sent one after another they
        // queued: at scale the deletes' half second and the roles' lay on every change's path
        // to the agents. Deletes are still sent at once: a narrowing waits for nothing.
        let (deleted, roles, sets) = futures::join!(
            self.delete_all(writes.deletes, concurrency),
            self.apply_all(writes.roles, existing, concurrency),
            self.write_rule_sets(writes.rule_sets, snapshot, owners, concurrency),
        );
        for (key, result) in deleted {
            match result {
                Ok(()) => {
                    tracing::info!(object = %key, "deleted: no policy asks for it");
                    self.failures.remove(&key);
                }
                Err(WriteError::Fenced(fenced)) => {
                    tracing::debug!(object = %key, %fenced, "delete not sent");
                }
                Err(WriteError::Kube(error)) => {
                    // A stale object still grants what no policy asks for any more: the
                    // policies it belonged to are not Ready until it is gone.
                    self.metrics.error(key.kind.as_str(), "delete");
                    let policies = existing
                        .get(&key)
                        .map(|e| policies_of_body(&e.body))
                        .unwrap_or_default();
                    let class = classify(&error);
                    let message = format!(
                        "{key}: no longer wanted but could not be deleted, so it still grants \
                         access: {}",
                        error_message(&error)
                    );
                    tracing::warn!(object = %key, %error, "delete failed; will retry");
                    for p in &policies {
                        results
                            .failed
                            .entry(p.clone())
                            .or_default()
                            .push(message.clone());
                    }
                    self.fail_as(class, key, message, policies);
                }
            }
        }
        self.record_applies(roles, &mut results);
        let written_sets: BTreeSet<String> = sets
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(o, _)| o.key.name.clone())
            .collect();
        self.record_applies(sets, &mut results);
        // A config names its rule set: one whose rule set is not on the API server (its
        // create failed, or is backing off) waits for it, rather than point its agent at
        // nothing, which would deny everything there. A rule set that exists but failed an
        // update is still named: the config is then exactly as wide as those rules.
        let (configs, waiting): (Vec<Output>, Vec<Output>) =
            writes.configs.into_iter().partition(|c| {
                let named = rule_set_named(&c.body);
                written_sets.contains(named)
                    || existing.contains_key(&Key::new(Kind::NodeAgentRuleSet, None, named))
            });
        for config in waiting {
            let key = Key::new(Kind::NodeAgentRuleSet, None, rule_set_named(&config.body));
            let (message, until) = match self.failures.get(&key) {
                Some(f) => (
                    format!("{}: waits for {key}: {}", config.key, f.message),
                    Some(f.until),
                ),
                None => (
                    format!("{}: waits for {key}, not written yet", config.key),
                    None,
                ),
            };
            let policies = policies_of_rule_set(&owners.desired, &config.body);
            self.fail(config.key.clone(), message, policies);
            if let Some(until) = until {
                self.not_before(&config.key, until);
            }
        }
        let mut applied = self.apply_all(configs, existing, concurrency).await;
        // A config belongs to no policy (its owner is its node), but a refused one leaves its
        // agent on older rules: the policies of its rule set, those selecting the node, are
        // told. Looked up only for a failure: every config's list would be a copy of its
        // rule set's, a thousand names each, every round.
        for (config, result) in &mut applied {
            if matches!(result, Err(WriteError::Kube(_))) {
                config.policies = policies_of_rule_set(&owners.desired, &config.body);
            }
        }
        self.record_applies(applied, &mut results);

        // The API server checks a binding against its own cache of roles: a role created
        // this round may not be there yet, so its bindings wait for the round its watch
        // event starts (ours sees it about when the API server's does). A role that is
        // failing (refused this round, or earlier and backing off) takes its bindings with
        // it: they are reported and retried when the role is, never deferred in a loop.
        let mut ready_bindings = Vec::new();
        for binding in writes.bindings {
            let role = binding.body["roleRef"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let role_key = Key::new(Kind::ClusterRole, None, &role);
            if let Some(failure) = self.failures.get(&role_key) {
                let message = format!(
                    "{}: waits for ClusterRole {role}: {}",
                    binding.key, failure.message
                );
                let until = failure.until;
                self.fail(binding.key.clone(), message, binding.policies);
                self.not_before(&binding.key, until);
            } else if existing.contains_key(&role_key) {
                ready_bindings.push(binding);
            } else {
                results.deferred.extend(binding.policies.iter().cloned());
            }
        }
        // Bindings left out because their role is backing off are retried with it.
        for s in owners.unchecked.iter().filter(|s| s.key != s.because_of) {
            if let Some(until) = self.failures.get(&s.because_of).map(|f| f.until) {
                self.not_before(&s.key, until);
            }
        }
        let applied = self.apply_all(ready_bindings, existing, concurrency).await;
        self.record_applies(applied, &mut results);

        // Checks that failed this round back off; names still backing off keep their entry.
        for s in owners
            .unchecked
            .iter()
            .filter(|s| owners.unknown.contains(&s.because_of))
        {
            let message = format!("{}: could not check who owns {}", s.key, s.because_of);
            self.fail(s.key.clone(), message, s.policies.clone());
        }
        results.generated = writes.generated;
        results
    }

    /// Phase 5: each policy's status (patched only when a condition changed) and events;
    /// returns when the next retry is due.
    async fn report(
        &mut self,
        snapshot: &Snapshot,
        owners: &Ownership,
        results: &Results,
    ) -> Option<Instant> {
        // A policy with bindings still to write gets its status next round, not a premature
        // "applied".
        let settled: Vec<NodeApiPolicy> = snapshot
            .policies
            .iter()
            .filter(|p| !results.deferred.contains(&p.name_any()))
            .cloned()
            .collect();
        self.statuses(&settled, &owners.desired, results).await;

        let mut next_retry = self.failures.values().map(|f| f.until).min();
        // A write that found the object newer than the cache is tried again after one backoff
        // step, whether or not that newer version's watch event starts a round by itself.
        if std::mem::take(&mut self.behind) {
            let later = Instant::now() + self.settings.backoff_base;
            next_retry = Some(next_retry.map_or(later, |t| t.min(later)));
        }
        if !results.deferred.is_empty() {
            let soon = Instant::now() + self.settings.debounce.max(Duration::from_millis(100));
            next_retry = Some(next_retry.map_or(soon, |t| t.min(soon)));
        }
        next_retry
    }

    /// Writes `outputs`, `concurrency` at a time: a name the cache does not hold is created
    /// (never applied: an apply would take over an object someone created since the
    /// ownership check), a cached one is applied with its cached resourceVersion as
    /// precondition (it may have been replaced since).
    /// Sends `deletes`, each with its cached uid and resourceVersion as preconditions.
    async fn delete_all(
        &self,
        deletes: Vec<(Key, diff::Version)>,
        concurrency: usize,
    ) -> Vec<(Key, Result<(), WriteError>)> {
        futures::stream::iter(deletes)
            .map(|(key, version)| {
                let api = self.api(&key);
                let metrics = self.metrics.clone();
                let fence = self.fence.clone();
                async move {
                    let result = delete(&api, &key, version, &metrics, &fence).await;
                    (key, result)
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await
    }

    /// Writes rule sets a batch at a time: the whole body of one (up to a few hundred KB) is
    /// made only for its batch and dropped once sent (all of them at once were most of the
    /// operator's peak memory).
    async fn write_rule_sets(
        &self,
        outputs: Vec<Output>,
        snapshot: &Snapshot,
        owners: &Ownership,
        concurrency: usize,
    ) -> Vec<(Output, Result<Written, WriteError>)> {
        let sets: HashMap<&str, &NodeAgentRuleSet> = owners
            .desired
            .node_agent_rule_sets
            .iter()
            .filter_map(|r| Some((r.metadata.name.as_deref()?, r)))
            .collect();
        let mut written = Vec::with_capacity(outputs.len());
        let mut pending = outputs.into_iter().peekable();
        while pending.peek().is_some() {
            let batch: Vec<Output> = pending
                .by_ref()
                .take(concurrency)
                .filter_map(|mut output| {
                    let set = sets.get(output.key.name.as_str())?;
                    let spec = snapshot.rule_sets.get(&set.spec.0.hash)?;
                    output.body = objects::rule_set_body(set, spec)?;
                    Some(output)
                })
                .collect();
            let mut applied = self.apply_all(batch, &snapshot.existing, concurrency).await;
            for (output, _) in &mut applied {
                output.body = Value::Null;
            }
            written.extend(applied);
        }
        written
    }

    async fn apply_all(
        &self,
        outputs: Vec<Output>,
        existing: &BTreeMap<Key, Existing>,
        concurrency: usize,
    ) -> Vec<(Output, Result<Written, WriteError>)> {
        let instance = self.settings.instance.clone();
        futures::stream::iter(outputs)
            .map(|output| {
                let api = self.api(&output.key);
                let metrics = self.metrics.clone();
                let cached = existing
                    .get(&output.key)
                    .and_then(|e| e.version.resource_version.clone());
                let instance = instance.clone();
                let fence = self.fence.clone();
                async move {
                    let result = match cached {
                        Some(rv) => update(&api, &output, rv, &metrics, &fence).await,
                        None => create(&api, &output, instance.as_deref(), &metrics, &fence).await,
                    };
                    (output, result)
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await
    }

    /// Records how applies went: successes clear their failure, refusals back off and are
    /// reported on their policies.
    fn record_applies(
        &mut self,
        results: Vec<(Output, Result<Written, WriteError>)>,
        outcome: &mut Results,
    ) {
        let applied_by_policy = &mut outcome.applied;
        let failed_by_policy = &mut outcome.failed;
        let foreign_by_policy = &mut outcome.foreign;
        for (output, result) in results {
            match result {
                // Our cache is behind the server: its watch event starts the next round.
                Ok(Written::Behind) => {
                    tracing::debug!(object = %output.key, "changed since cached; next round");
                    self.behind = true;
                }
                // Created by someone else since the ownership check: left alone, reported.
                Ok(Written::Foreign) => {
                    tracing::warn!(object = %output.key, "created by someone else meanwhile: left alone");
                    self.failures.remove(&output.key);
                    let message = format!("{} exists and is not managed by nodegate", output.key);
                    for p in &output.policies {
                        foreign_by_policy
                            .entry(p.clone())
                            .or_default()
                            .push(message.clone());
                    }
                }
                Ok(Written::Applied) => {
                    tracing::info!(object = %output.key, "applied");
                    self.failures.remove(&output.key);
                    if !output.announce {
                        continue;
                    }
                    for p in &output.policies {
                        applied_by_policy
                            .entry(p.clone())
                            .or_default()
                            .push(output.key.to_string());
                    }
                }
                Err(WriteError::Fenced(fenced)) => {
                    tracing::debug!(object = %output.key, %fenced, "write not sent");
                }
                Err(WriteError::Kube(error)) => {
                    self.metrics.error(output.key.kind.as_str(), "apply");
                    let class = classify(&error);
                    let message = format!("{}: {}", output.key, error_message(&error));
                    tracing::warn!(object = %output.key, %error, "apply failed; will retry");
                    for p in &output.policies {
                        failed_by_policy
                            .entry(p.clone())
                            .or_default()
                            .push(message.clone());
                    }
                    self.fail_as(class, output.key, message, output.policies);
                }
            }
        }
    }

    /// Holds `key`'s next retry until `until` at the earliest (a binding waits for its role).
    fn not_before(&mut self, key: &Key, until: Instant) {
        if let Some(failure) = self.failures.get_mut(key) {
            failure.until = failure.until.max(until);
        }
    }

    /// Whether `key` may be written (or looked up) now: it is not backing off after a failure.
    fn due(&self, key: &Key, now: Instant) -> bool {
        self.failures.get(key).is_none_or(|f| f.until <= now)
    }

    fn fail(&mut self, key: Key, message: String, policies: BTreeSet<String>) {
        self.fail_as(ErrorClass::Transient, key, message, policies);
    }

    /// Records a failure of `key` and when to retry it, by `class` ([`retry_delay`]).
    fn fail_as(
        &mut self,
        class: ErrorClass,
        key: Key,
        message: String,
        policies: BTreeSet<String>,
    ) {
        let (base, max) = (self.settings.backoff_base, self.settings.backoff_max);
        let entry = self.failures.entry(key).or_insert(Failure {
            count: 0,
            until: Instant::now(),
            message: String::new(),
            policies: BTreeSet::new(),
        });
        entry.count = entry.count.saturating_add(1);
        entry.until = Instant::now() + retry_delay(class, base, max, entry.count);
        entry.message = message;
        entry.policies = policies;
    }

    /// GETs each name: held by an object nodegate does not own → foreign; owned (the cache
    /// lags) or absent → free. A failed check blocks the name for this round (unknown).
    async fn check_ownership(&self, missing: Vec<Key>) -> (BTreeSet<Key>, BTreeSet<Key>) {
        let instance = self.settings.instance.clone();
        let checks: Vec<(Key, Result<bool, kube::Error>)> = futures::stream::iter(missing)
            .map(|key| {
                let api = self.api(&key);
                let metrics = self.metrics.clone();
                let instance = instance.clone();
                async move {
                    metrics.read(key.kind.as_str());
                    let result = api.get_metadata_opt(&key.name).await.map(|found| {
                        found.is_some_and(|o| {
                            !objects::is_owned(o.metadata.labels.as_ref(), instance.as_deref())
                        })
                    });
                    (key, result)
                }
            })
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        let mut foreign = BTreeSet::new();
        let mut unknown = BTreeSet::new();
        for (key, result) in checks {
            match result {
                Ok(true) => {
                    foreign.insert(key);
                }
                Ok(false) => {}
                Err(error) => {
                    self.metrics.error(key.kind.as_str(), "get");
                    tracing::warn!(object = %key, %error, "ownership check failed");
                    unknown.insert(key);
                }
            }
        }
        (foreign, unknown)
    }

    /// Nodes whose NodeAgentConfig, as written or as its agent last confirmed, is not the one
    /// this round wants, by the policies its rules hold: such a node may still grant them.
    /// A rule set this process did not compile (written before it started, or edited by
    /// hand) may hold any policy: its nodes are returned apart, for every policy. Forgets the
    /// rule sets no node holds any more.
    fn stale_grants(&mut self, want: &HashMap<&str, (&str, &str)>) -> Grants {
        let mut stale: HashMap<String, Vec<String>> = HashMap::new();
        let mut unknown = Vec::new();
        let mut observed_by_node = HashMap::new();
        let mut held: HashSet<String> = want.values().map(|(_, h)| h.to_string()).collect();
        for config in self.stores.node_agent_configs.state() {
            // A config whose node is gone goes with it (owner reference); no kubelet, no agent.
            let Some(&(node, wanted)) = want.get(config.name_any().as_str()) else {
                continue;
            };
            let node = node.to_string();
            let observed = config.status.as_ref().and_then(|s| s.observed_hash.clone());
            if let Some(hash) = &observed {
                observed_by_node.insert(node.clone(), hash.clone());
            }
            // As written: the hash of the rule set it names, as the API server holds it (a
            // config of an earlier version holds its own); a named rule set that does not
            // exist holds nothing.
            let written = match &config.spec.rule_set {
                Some(name) => self
                    .stores
                    .node_agent_rule_sets
                    .get(&kube::runtime::reflector::ObjectRef::new(name))
                    .map(|r| r.spec.0.hash.clone()),
                None => Some(config.spec.hash.clone()),
            };
            let mut hashes: Vec<String> = written.into_iter().chain(observed).collect();
            hashes.dedup();
            for hash in hashes {
                held.insert(hash.clone());
                if hash == wanted {
                    continue;
                }
                if self.policies_by_hash.contains_key(&hash) {
                    stale.entry(hash).or_default().push(node.clone());
                } else {
                    unknown.push(node.clone());
                }
            }
        }
        self.policies_by_hash.retain(|hash, _| held.contains(hash));
        unknown.sort();
        unknown.dedup();
        let stale = stale
            .into_iter()
            .filter_map(|(hash, nodes)| Some((self.policies_by_hash.get(&hash)?.clone(), nodes)))
            .collect();
        Grants {
            stale,
            unknown,
            observed: observed_by_node,
        }
    }

    async fn statuses(
        &mut self,
        policies: &[NodeApiPolicy],
        desired: &compiler::Desired,
        results: &Results,
    ) {
        let started = std::time::Instant::now();
        let (foreign, generated) = (&results.foreign, &results.generated);
        let (applied, failed) = (&results.applied, &results.failed);
        let set_hashes: HashMap<&str, &str> = desired
            .node_agent_rule_sets
            .iter()
            .filter_map(|r| Some((r.metadata.name.as_deref()?, r.spec.0.hash.as_str())))
            .collect();
        // Each desired config's node and the hash it should enforce, by the config's name (an
        // instance's configs are not named after their node, see `compiler::config_name`).
        let wanted: HashMap<&str, (&str, &str)> = desired
            .node_agent_configs
            .iter()
            .filter_map(|c| {
                let set = c.spec.rule_set.as_deref()?;
                let node = compiler::config_node(&c.metadata)?;
                Some((c.metadata.name.as_deref()?, (node, *set_hashes.get(set)?)))
            })
            .collect();
        let hashes: HashMap<&str, &str> = wanted.values().copied().collect();
        let Grants {
            stale,
            unknown,
            observed,
        } = self.stale_grants(&wanted);
        // Whether the node's agent enforces the policy's current rule: the current version,
        // or another that holds the same rule for it. It depends on the node only through the
        // pair (version enforced, version wanted), of which there are few: each node is
        // mapped to its pair once, and each policy decides each pair once.
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        let pair_of: HashMap<&str, usize> = hashes
            .iter()
            .filter_map(|(node, want)| {
                let has = observed.get(*node)?.as_str();
                let i = match pairs.iter().position(|p| *p == (has, *want)) {
                    Some(i) => i,
                    None => {
                        pairs.push((has, want));
                        pairs.len() - 1
                    }
                };
                Some((*node, i))
            })
            .collect();
        let pair_in_sync = |(has, want): (&str, &str), policy: &str| -> bool {
            if has == want {
                return true;
            }
            match (
                self.policies_by_hash.get(has),
                self.policies_by_hash.get(want),
            ) {
                (Some(has), Some(want)) => {
                    want.get(policy).is_some() && has.get(policy) == want.get(policy)
                }
                _ => false,
            }
        };
        // The compiler gives every node one config: a policy selecting as many nodes selects
        // them all, and no grant of it is stale anywhere it is not wanted.
        let every_node = desired.node_agent_configs.len();
        let mut errors_by_policy: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for failure in self.failures.values() {
            for p in &failure.policies {
                errors_by_policy
                    .entry(p.clone())
                    .or_default()
                    .push(failure.message.clone());
            }
        }
        let now = Time(
            k8s_openapi::jiff::Timestamp::now()
                .round(k8s_openapi::jiff::Unit::Second)
                .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
        );
        let by_name: HashMap<&str, &NodeApiPolicy> = policies
            .iter()
            .filter_map(|p| Some((p.metadata.name.as_deref()?, p)))
            .collect();
        let mut patches = Vec::new();
        for outcome in &desired.outcomes {
            let Some(policy) = by_name.get(outcome.policy.as_str()) else {
                continue;
            };
            let mut decided: Vec<Option<bool>> = vec![None; pairs.len()];
            let (synced, behind): (Vec<&String>, Vec<&String>) =
                outcome.nodes.iter().partition(|n| {
                    let Some(&i) = pair_of.get(n.as_str()) else {
                        return false;
                    };
                    *decided[i].get_or_insert_with(|| pair_in_sync(pairs[i], &outcome.policy))
                });
            let selects = |node: &str| {
                outcome
                    .nodes
                    .binary_search_by(|n| n.as_str().cmp(node))
                    .is_ok()
            };
            let revoking: BTreeSet<String> = if outcome.nodes.len() >= every_node {
                BTreeSet::new()
            } else {
                stale
                    .iter()
                    .filter(|(rules, _)| rules.contains_key(&outcome.policy))
                    .flat_map(|(_, nodes)| nodes)
                    .chain(&unknown)
                    .filter(|n| !selects(n))
                    .cloned()
                    .collect()
            };
            let mut errors = errors_by_policy
                .get(&outcome.policy)
                .cloned()
                .unwrap_or_default();
            errors.sort();
            let observed = Observed {
                generation: policy.metadata.generation,
                foreign: foreign.get(&outcome.policy).cloned().unwrap_or_default(),
                errors,
                agents_in_sync: synced.len(),
                agents_behind: behind.into_iter().cloned().collect(),
                revoking: revoking.into_iter().collect(),
                generated: generated.get(&outcome.policy).cloned().unwrap_or_default(),
            };
            let previous = policy.status.as_ref();
            let new = status::compute(outcome, &observed, previous, &now);
            // Not on every change of the count of agents in sync: see `needs_write`.
            if status::needs_write(previous, &new) {
                let new_v = objects::strip_empty(serde_json::to_value(&new).unwrap_or(Value::Null));
                patches.push(((*policy).clone(), new, new_v, previous.cloned()));
            }
        }
        let (computed, patched) = (started.elapsed(), patches.len());
        let results = self.send_statuses(patches).await;
        let sent = started.elapsed();
        self.events(policies, &results, applied, failed).await;
        // Cumulative milliseconds, as in "round done": where the report phase goes.
        tracing::debug!(
            patched,
            compute_ms = computed.as_millis() as u64,
            statuses_ms = sent.as_millis() as u64,
            events_ms = started.elapsed().as_millis() as u64,
            "report done"
        );
    }

    /// Applies each policy's whole status (server-side apply, nodegate's field manager), through
    /// the fence; failures are logged and left to the next round.
    async fn send_statuses(
        &self,
        patches: Vec<(
            NodeApiPolicy,
            NodeApiPolicyStatus,
            Value,
            Option<NodeApiPolicyStatus>,
        )>,
    ) -> Vec<StatusWrite> {
        let concurrency = self.settings.concurrency.max(1);
        let api: Api<NodeApiPolicy> = Api::all(self.client.clone());
        let metrics = self.metrics.clone();
        let results: Vec<StatusWrite> = futures::stream::iter(patches)
            .map(|(policy, new, new_v, previous)| {
                let api = api.clone();
                let metrics = metrics.clone();
                let fence = self.fence.clone();
                async move {
                    let body = json!({
                        "apiVersion": NodeApiPolicy::api_version(&()),
                        "kind": NodeApiPolicy::kind(&()),
                        "status": new_v,
                    });
                    let params = PatchParams::apply(FIELD_MANAGER).force();
                    let name = policy.name_any();
                    let result = fence
                        .guard(async {
                            metrics.write("NodeApiPolicy", "status");
                            api.patch_status(&name, &params, &Patch::Apply(&body)).await
                        })
                        .await
                        .map_err(WriteError::from)
                        .and_then(|r| r.map(|_| ()).map_err(WriteError::from));
                    (policy, new, previous, result)
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        for (policy, _, _, result) in &results {
            if let Err(WriteError::Kube(error)) = result {
                self.metrics.error("NodeApiPolicy", "status");
                tracing::warn!(policy = %policy.name_any(), %error, "status update failed; next round retries");
            }
        }
        results
    }

    /// Marks every policy not Ready, reason `OperatorRestarting`: `unfinished` leaders in a row
    /// stopped in a round (see `progress.rs`), so what each policy's status says was written
    /// by the last round that finished, and nothing has been reconciled since. The next round
    /// that finishes writes the true status again.
    pub async fn tell_restarting(&mut self, unfinished: u32) {
        let now = Time(
            k8s_openapi::jiff::Timestamp::now()
                .round(k8s_openapi::jiff::Unit::Second)
                .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
        );
        let message = format!(
            "the operator stopped in the middle of a reconcile round {unfinished} times in a row \
             (restarted: OOM-killed, crashed or lost its lease); this status and what the \
             cluster enforces are as the last finished round left them, and changes since \
             (revocations included) may not be in force: see the operator's logs and \
             nodegate_operator_unfinished_rounds"
        );
        let patches: Vec<_> = self
            .stores
            .policies
            .state()
            .iter()
            .map(|policy| {
                let previous = policy.status.clone();
                let mut new = previous.clone().unwrap_or_default();
                status::mark_not_ready(&mut new, "OperatorRestarting", &message, &now);
                let new_v = objects::strip_empty(serde_json::to_value(&new).unwrap_or(Value::Null));
                ((**policy).clone(), new, new_v, previous)
            })
            .collect();
        tracing::warn!(
            unfinished,
            policies = patches.len(),
            "previous leaders stopped in a round; marking every policy OperatorRestarting"
        );
        self.send_statuses(patches).await;
    }

    async fn events(
        &self,
        policies: &[NodeApiPolicy],
        statuses: &[StatusWrite],
        applied: &BTreeMap<String, Vec<String>>,
        failed: &BTreeMap<String, Vec<String>>,
    ) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let mut events: Vec<(&NodeApiPolicy, Event)> = Vec::new();
        for policy in policies {
            let name = policy.name_any();
            if let Some(objects) = applied.get(&name) {
                events.push((
                    policy,
                    Event {
                        type_: EventType::Normal,
                        reason: "Applied".into(),
                        note: Some(truncate(format!(
                            "applied {} object(s): {}",
                            objects.len(),
                            objects.join(", ")
                        ))),
                        action: "Apply".into(),
                        secondary: None,
                    },
                ));
            }
            if let Some(errors) = failed.get(&name) {
                events.push((
                    policy,
                    Event {
                        type_: EventType::Warning,
                        reason: "ApplyFailed".into(),
                        note: Some(truncate(errors.join("; "))),
                        action: "Apply".into(),
                        secondary: None,
                    },
                ));
            }
        }
        // Conflicts: only when the policy newly reports a foreign object.
        for (policy, new, previous, _) in statuses {
            let rbac = |s: &NodeApiPolicyStatus| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == status::RBAC_APPLIED)
                    .map(|c| (c.reason.clone(), c.message.clone()))
            };
            let now = rbac(new);
            if now.as_ref().is_some_and(|(r, _)| r == "ForeignObject")
                && previous.as_ref().and_then(rbac) != now
            {
                events.push((
                    policy,
                    Event {
                        type_: EventType::Warning,
                        reason: "ForeignObject".into(),
                        note: now.map(|(_, m)| truncate(m)),
                        action: "Apply".into(),
                        secondary: None,
                    },
                ));
            }
        }
        // Sent together, as the statuses are: one after another they were a tenth of a
        // second each on a busy API server, on the path of every change to the next round.
        let concurrency = self.settings.concurrency.max(1);
        futures::stream::iter(events)
            .for_each_concurrent(concurrency, |(policy, event)| async move {
                let reference = policy.object_ref(&());
                let published = self
                    .fence
                    .guard(async {
                        self.metrics.write("Event", "create");
                        recorder.publish(&event, &reference).await
                    })
                    .await;
                match published {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        self.metrics.error("Event", "create");
                        tracing::warn!(policy = %policy.name_any(), %error, "could not publish event");
                    }
                    // Past the renew deadline every guard refuses: nothing more is sent.
                    Err(fenced) => {
                        tracing::debug!(policy = %policy.name_any(), %fenced, "event not sent");
                    }
                }
            })
            .await;
    }
}

/// How a write went, when the API server did not refuse it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    Applied,
    /// The name was taken by an object nodegate does not own: nothing written.
    Foreign,
    /// The object changed since the cache saw it: nothing written, its watch event follows.
    Behind,
}

/// Creates `output`: 409 AlreadyExists means someone took the name since the ownership
/// check, so it is read again and reported as foreign unless it is ours (our cache lags).
async fn create(
    api: &Api<DynamicObject>,
    output: &Output,
    instance: Option<&str>,
    metrics: &Metrics,
    fence: &Fence,
) -> Result<Written, WriteError> {
    let kind = output.key.kind.as_str();
    let object: DynamicObject =
        serde_json::from_value(output.body.clone()).map_err(kube::Error::SerdeError)?;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let created = fence
        .guard(async {
            metrics.write(kind, "create");
            api.create(&params, &object).await
        })
        .await?;
    match created {
        Ok(created) => {
            if !output.key.kind.owned_by_create() {
                own_by_apply(api, kind, &created, metrics, fence).await;
            }
            Ok(Written::Applied)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            metrics.read(kind);
            let now = api
                .get_metadata_opt(&output.key.name)
                .await
                .map_err(WriteError::Kube)?;
            Ok(match now {
                Some(o) if !objects::is_owned(o.metadata.labels.as_ref(), instance) => {
                    Written::Foreign
                }
                _ => Written::Behind,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// A create records nodegate's fields under an Update entry, and server-side apply never
/// removes a field that another entry (its own Update entry included) still owns: a later
/// narrowing (rules or subjects emptied, an owner reference dropped) would leave it. So the
/// entry becomes nodegate's Apply entry, as `kubectl`'s csaupgrade does, guarded by the
/// created resourceVersion. If that fails, the next round finds no Apply entry and applies.
async fn own_by_apply(
    api: &Api<DynamicObject>,
    kind: &str,
    created: &DynamicObject,
    metrics: &Metrics,
    fence: &Fence,
) {
    let (Some(name), Some(rv)) = (
        created.metadata.name.as_deref(),
        created.metadata.resource_version.as_deref(),
    ) else {
        return;
    };
    let entries: Vec<ManagedFieldsEntry> = created
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .cloned()
        .map(|mut m| {
            if m.manager.as_deref() == Some(FIELD_MANAGER) && m.subresource.is_none() {
                m.operation = Some("Apply".into());
            }
            m
        })
        .collect();
    let patch = json!({"metadata": {"resourceVersion": rv, "managedFields": entries}});
    let owned = fence
        .guard(async {
            metrics.write(kind, "own");
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        })
        .await;
    match owned {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            metrics.error(kind, "own");
            tracing::warn!(object = %name, %error, "could not record the created fields as applied");
        }
        Err(fenced) => tracing::debug!(object = %name, %fenced, "not recorded as applied"),
    }
}

/// Applies `output` to the object the cache holds at `rv`: a 409 means it changed (or was
/// replaced) since, so nothing is forced onto it.
async fn update(
    api: &Api<DynamicObject>,
    output: &Output,
    rv: String,
    metrics: &Metrics,
    fence: &Fence,
) -> Result<Written, WriteError> {
    let mut body = output.body.clone();
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv));
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patched = fence
        .guard(async {
            metrics.write(output.key.kind.as_str(), "apply");
            api.patch(&output.key.name, &params, &Patch::Apply(&body))
                .await
        })
        .await?;
    match patched {
        Ok(_) => Ok(Written::Applied),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Written::Behind),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the object the cache holds at `version` (uid and resourceVersion preconditions).
/// 404 is success; a 409 (changed since cached) is read again: success only if the object
/// meant is gone or replaced, else it is still there and the delete is retried.
async fn delete(
    api: &Api<DynamicObject>,
    key: &Key,
    version: diff::Version,
    metrics: &Metrics,
    fence: &Fence,
) -> Result<(), WriteError> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: version.uid.clone(),
            resource_version: version.resource_version,
        }),
        ..DeleteParams::default()
    };
    let deleted = fence
        .guard(async {
            metrics.write(key.kind.as_str(), "delete");
            api.delete(&key.name, &params).await
        })
        .await?;
    match deleted {
        Ok(_) => Ok(()),
        // Gone already (garbage collected with its owner).
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            metrics.read(key.kind.as_str());
            match api.get_metadata_opt(&key.name).await? {
                Some(o) if o.metadata.uid == version.uid => Err(kube::Error::Api(s).into()),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Delay before retry number `count` (1-based): base·2^(count-1), at most `max`.
pub(crate) fn backoff(base: Duration, max: Duration, count: u32) -> Duration {
    let factor = 2u32.saturating_pow(count.saturating_sub(1).min(20));
    base.saturating_mul(factor).min(max)
}

fn truncate(mut s: String) -> String {
    const MAX: usize = 1000;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The API server's message, its code and whether the error is permanent or transient
/// (what the policy's condition and Event say).
fn error_message(error: &kube::Error) -> String {
    let class = classify(error).as_str();
    match error {
        kube::Error::Api(s) => format!("{} ({} {class})", s.message, s.code),
        other => format!("{other} ({class})"),
    }
}

/// The policies a cached object (as JSON) belongs to.
fn policies_of_body(body: &Value) -> BTreeSet<String> {
    serde_json::from_value(body["metadata"].clone())
        .map(|meta| objects::policies_of(&meta))
        .unwrap_or_default()
}

/// Each policy of a rule set with a digest of its rule there (spelled out: indices differ
/// between rule sets).
type PolicyRules = BTreeMap<String, u64>;

fn policy_rules(spec: &nodegate_crds::NodeAgentConfigSpec) -> PolicyRules {
    use std::hash::{Hash, Hasher};
    (0..spec.rules.len())
        .filter_map(|i| {
            let policy = spec.rules.get(i)?.policy.clone();
            // A rule whose index names nothing (never from the compiler) gets a digest no
            // other rule has: it is never taken for the same rule.
            let bytes = spec
                .unpack(i)
                .and_then(|r| serde_json::to_vec(&r).ok())
                .unwrap_or_else(|| format!("unresolved {i} of {}", spec.hash).into_bytes());
            let mut hasher = std::hash::DefaultHasher::new();
            bytes.hash(&mut hasher);
            Some((policy, hasher.finish()))
        })
        .collect()
}

/// The rule set a NodeAgentConfig's apply body names.
fn rule_set_named(body: &Value) -> &str {
    body["spec"]["ruleSet"].as_str().unwrap_or_default()
}

/// The policies whose rules the rule set a config body names holds: the policies selecting
/// the config's node.
fn policies_of_rule_set(desired: &compiler::Desired, config: &Value) -> BTreeSet<String> {
    let named = rule_set_named(config);
    desired
        .node_agent_rule_sets
        .iter()
        .find(|set| set.metadata.name.as_deref() == Some(named))
        .map(objects::rule_set_policies)
        .unwrap_or_default()
}

/// Per policy, the names of its generated objects for status.generated.
fn generated_by_policy(outputs: &[Output]) -> BTreeMap<String, GeneratedObjects> {
    let mut map: BTreeMap<String, GeneratedObjects> = BTreeMap::new();
    for output in outputs {
        for policy in &output.policies {
            let g = map.entry(policy.clone()).or_default();
            let name = output.key.name.clone();
            match output.key.kind {
                Kind::ClusterRole if g.cluster_role.is_none() => g.cluster_role = Some(name),
                Kind::ClusterRoleBinding if g.cluster_role_binding.is_none() => {
                    g.cluster_role_binding = Some(name)
                }
                Kind::ServiceAccount => g.service_accounts.push(format!(
                    "{}/{name}",
                    output.key.namespace.as_deref().unwrap_or_default()
                )),
                _ => {}
            }
        }
    }
    map
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kube::core::Status;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            Status::failure("refused", "Reason").with_code(code),
        ))
    }

    #[test]
    fn refusals_are_permanent_and_overload_or_faults_transient() {
        for code in [400, 401, 403, 404, 410, 413, 415, 422] {
            assert_eq!(classify(&api_error(code)), ErrorClass::Permanent, "{code}");
        }
        for code in [408, 409, 429, 500, 502, 503, 504] {
            assert_eq!(classify(&api_error(code)), ErrorClass::Transient, "{code}");
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            classify(&kube::Error::ReadEvents(io)),
            ErrorClass::Transient
        );
        let serde = serde_json::from_str::<u8>("x").unwrap_err();
        assert_eq!(
            classify(&kube::Error::SerdeError(serde)),
            ErrorClass::Permanent
        );
        assert_eq!(
            error_message(&api_error(422)),
            "refused (422 permanent)",
            "the condition says which"
        );
        assert_eq!(error_message(&api_error(503)), "refused (503 transient)");
    }

    #[test]
    fn permanent_errors_reach_the_cap_by_the_third_failure() {
        let (b, m) = (Duration::from_millis(500), Duration::from_secs(60));
        let transient: Vec<_> = (1..=4)
            .map(|n| retry_delay(ErrorClass::Transient, b, m, n))
            .collect();
        assert_eq!(transient, [0.5, 1.0, 2.0, 4.0].map(Duration::from_secs_f64));
        let permanent: Vec<_> = (1..=4)
            .map(|n| retry_delay(ErrorClass::Permanent, b, m, n))
            .collect();
        assert_eq!(permanent, [15, 30, 60, 60].map(Duration::from_secs));
        // A cap below four bases: a permanent error still waits at least the base.
        let small = Duration::from_secs(1);
        assert_eq!(retry_delay(ErrorClass::Permanent, b, small, 1), b);
        assert_eq!(retry_delay(ErrorClass::Permanent, b, small, 2), small);
    }

    /// A client for a local listener that counts the connections made to it (and closes them).
    async fn counting_client() -> (kube::Client, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        let config = kube::Config::new(url.parse().unwrap());
        (kube::Client::try_from(config).unwrap(), connections)
    }

    fn role_output() -> Output {
        Output {
            key: Key::new(Kind::ClusterRole, None, "nodegate:p"),
            policies: BTreeSet::from(["p".to_string()]),
            body: json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "nodegate:p"},
            }),
            announce: true,
        }
    }

    #[tokio::test]
    async fn past_the_renew_deadline_no_write_is_sent() {
        let (client, connections) = counting_client().await;
        let output = role_output();
        let api = Api::<DynamicObject>::all_with(client, &output.key.kind.api_resource());
        let metrics = Metrics::new().unwrap();
        // Confirmed long enough ago that the deadline has passed.
        let fence = Fence::new(Duration::from_millis(50));
        fence.confirm(Instant::now() - Duration::from_secs(1));
        let version = diff::Version {
            uid: Some("u".into()),
            resource_version: Some("1".into()),
        };

        let created = create(&api, &output, None, &metrics, &fence).await;
        assert!(matches!(
            created,
            Err(WriteError::Fenced(Fenced::NotConfirmed))
        ));
        let updated = update(&api, &output, "1".into(), &metrics, &fence).await;
        assert!(matches!(
            updated,
            Err(WriteError::Fenced(Fenced::NotConfirmed))
        ));
        let deleted = delete(&api, &output.key, version.clone(), &metrics, &fence).await;
        assert!(matches!(
            deleted,
            Err(WriteError::Fenced(Fenced::NotConfirmed))
        ));
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "nodegate:p", "resourceVersion": "1"},
        }))
        .unwrap();
        own_by_apply(&api, "ClusterRole", &object, &metrics, &fence).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(connections.load(Ordering::SeqCst), 0, "no connection made");
        assert_eq!(metrics.writes(), 0, "no write counted as sent");

        // The same write with leadership confirmed does reach the listener.
        fence.confirm(Instant::now());
        let sent = update(&api, &output, "1".into(), &metrics, &fence).await;
        assert!(matches!(sent, Err(WriteError::Kube(_))), "{sent:?}");
        assert!(connections.load(Ordering::SeqCst) >= 1);
        assert_eq!(metrics.writes(), 1);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (b, m) = (Duration::from_millis(500), Duration::from_secs(5));
        assert_eq!(backoff(b, m, 1), Duration::from_millis(500));
        assert_eq!(backoff(b, m, 2), Duration::from_secs(1));
        assert_eq!(backoff(b, m, 4), Duration::from_secs(4));
        assert_eq!(backoff(b, m, 5), m);
        assert_eq!(backoff(b, m, u32::MAX), m);
    }

    #[test]
    fn unreachable_namespaces_change_no_output() {
        let policy = |name: &str, namespaces: Value| -> NodeApiPolicy {
            let mut p = NodeApiPolicy::new(
                name,
                serde_json::from_value(json!({
                    "subjects": [{"kind": "Group", "name": "g"}],
                    "access": ["pods", "healthz"],
                    "namespaces": namespaces,
                }))
                .unwrap(),
            );
            p.metadata.uid = Some(format!("uid-{name}"));
            p
        };
        let ns = |name: &str, team: &str| NamespaceInfo {
            name: name.into(),
            labels: BTreeMap::from([("team".to_string(), team.to_string())]),
        };
        let all: Vec<NamespaceInfo> = (0..20)
            .map(|i| ns(&format!("ns{i}"), &format!("t{}", i % 3)))
            .collect();
        let nodes = vec![NodeInfo {
            name: "n1".into(),
            uid: "u".into(),
            labels: BTreeMap::new(),
        }];
        let named = vec![
            policy("a", json!({"names": ["ns1", "ns2", "missing"]})),
            policy("b", json!({"all": true})),
        ];
        let reachable = reachable_namespaces(&named, all.clone());
        assert_eq!(reachable.len(), 2);
        let compiled = |p: &[NodeApiPolicy], n: &[NamespaceInfo]| {
            serde_json::to_value(compiler::compile(p, &nodes, n)).unwrap()
        };
        assert_eq!(compiled(&named, &all), compiled(&named, &reachable));
        let mut selected = named.clone();
        selected.push(policy(
            "c",
            json!({"selector": {"matchLabels": {"team": "t1"}}}),
        ));
        assert_eq!(
            reachable_namespaces(&selected, all.clone()).len(),
            all.len()
        );
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        let s = "é".repeat(600);
        let t = truncate(s);
        assert!(t.len() <= 1003 && t.ends_with('…'));
    }
}
