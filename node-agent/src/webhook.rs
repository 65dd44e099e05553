//! Authorization by SubjectAccessReview (`--authorization-mode=Webhook|PolicyAndWebhook`).
//!
//! The question asked is the one nodegate's RBAC answers like the node's rules: verb on
//! `nodeagentconfigs/<endpoint>` in `nodegate.io`, resource name = this node, namespace = the
//! data's namespace. For path-scoped endpoints that is the path's namespace; for everything
//! else the cluster scope (`""`), which RBAC grants only through a ClusterRoleBinding, i.e. a
//! policy with `namespaces.all`. So in Webhook mode a filtered endpoint (pods, stats, metrics)
//! is served only unfiltered to callers RBAC allows node-wide: sound, never wider than RBAC.
//! Answers are cached: 5 minutes when allowed, 30 seconds when denied.

use crate::authn::{BoxFuture, UserInfo};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use moka::future::Cache;
use std::sync::Arc;
use std::time::Duration;

/// The API group of nodegate's RBAC resource.
pub const GROUP: &str = "nodegate.io";
/// The resource whose subresources name catalogue endpoints.
pub const RESOURCE: &str = "nodeagentconfigs";

/// One access question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccessQuestion {
    pub user: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: Vec<(String, Vec<String>)>,
    pub verb: String,
    /// The catalogue endpoint name (the subresource).
    pub endpoint: String,
    pub node: String,
    pub namespace: String,
}

impl AccessQuestion {
    pub fn new(user: &UserInfo, verb: &str, endpoint: &str, node: &str, namespace: &str) -> Self {
        AccessQuestion {
            user: user.name.clone(),
            uid: user.uid.clone(),
            groups: user.groups.clone(),
            extra: user
                .extra
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            verb: verb.into(),
            endpoint: endpoint.into(),
            node: node.into(),
            namespace: namespace.into(),
        }
    }

    /// The SubjectAccessReview that asks it.
    pub fn review(&self) -> SubjectAccessReview {
        SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(self.user.clone()),
                uid: self.uid.clone(),
                groups: Some(self.groups.clone()),
                extra: (!self.extra.is_empty()).then(|| self.extra.iter().cloned().collect()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.into()),
                    resource: Some(RESOURCE.into()),
                    subresource: Some(self.endpoint.clone()),
                    name: Some(self.node.clone()),
                    namespace: (!self.namespace.is_empty()).then(|| self.namespace.clone()),
                    verb: Some(self.verb.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// Answers access questions: the API server in production, a fake in tests.
pub trait AccessReviewer: Send + Sync + 'static {
    /// `Ok(allowed)` when answered, `Err(reason)` when the question could not be asked.
    fn allowed<'a>(&'a self, question: &'a AccessQuestion) -> BoxFuture<'a, Result<bool, String>>;
}

/// SubjectAccessReview with the agent's credentials (which need `create
/// subjectaccessreviews`).
pub struct KubeAccessReviewer {
    api: Api<SubjectAccessReview>,
}

impl KubeAccessReviewer {
    pub fn new(client: kube::Client) -> Self {
        KubeAccessReviewer {
            api: Api::all(client),
        }
    }
}

impl AccessReviewer for KubeAccessReviewer {
    fn allowed<'a>(&'a self, question: &'a AccessQuestion) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let answer = self
                .api
                .create(&PostParams::default(), &question.review())
                .await
                .map_err(|e| e.to_string())?;
            Ok(answer
                .status
                .is_some_and(|s| s.allowed && !s.denied.unwrap_or(false)))
        })
    }
}

/// Caches another reviewer's answers (errors are not cached).
pub struct CachedReviewer {
    inner: Arc<dyn AccessReviewer>,
    allowed: Cache<AccessQuestion, ()>,
    denied: Cache<AccessQuestion, ()>,
}

impl CachedReviewer {
    pub fn new(inner: Arc<dyn AccessReviewer>) -> Self {
        Self::with_ttls(inner, Duration::from_secs(300), Duration::from_secs(30))
    }

    pub fn with_ttls(
        inner: Arc<dyn AccessReviewer>,
        allow_ttl: Duration,
        deny_ttl: Duration,
    ) -> Self {
        CachedReviewer {
            inner,
            allowed: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(allow_ttl)
                .build(),
            denied: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(deny_ttl)
                .build(),
        }
    }
}

impl AccessReviewer for CachedReviewer {
    fn allowed<'a>(&'a self, question: &'a AccessQuestion) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            if self.allowed.contains_key(question) {
                return Ok(true);
            }
            if self.denied.contains_key(question) {
                return Ok(false);
            }
            let answer = self.inner.allowed(question).await?;
            if answer {
                self.allowed.insert(question.clone(), ()).await;
            } else {
                self.denied.insert(question.clone(), ()).await;
            }
            Ok(answer)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    impl AccessReviewer for Counting {
        fn allowed<'a>(&'a self, q: &'a AccessQuestion) -> BoxFuture<'a, Result<bool, String>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { Ok(q.namespace == "a") })
        }
    }

    #[tokio::test]
    async fn caches_both_answers() {
        let inner = Arc::new(Counting(AtomicUsize::new(0)));
        let cached = CachedReviewer::new(inner.clone());
        let user = UserInfo::anonymous();
        let a = AccessQuestion::new(&user, "get", "containerLogs", "n", "a");
        let b = AccessQuestion::new(&user, "get", "containerLogs", "n", "b");
        for _ in 0..3 {
            assert!(cached.allowed(&a).await.unwrap());
            assert!(!cached.allowed(&b).await.unwrap());
        }
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn review_names_nodegate_resource() {
        let q = AccessQuestion::new(&UserInfo::anonymous(), "create", "exec", "node-1", "");
        let r = serde_json::to_value(q.review()).unwrap();
        let ra = &r["spec"]["resourceAttributes"];
        assert_eq!(ra["group"], "nodegate.io");
        assert_eq!(ra["resource"], "nodeagentconfigs");
        assert_eq!(ra["subresource"], "exec");
        assert_eq!(ra["name"], "node-1");
        assert!(ra.get("namespace").is_none());
    }
}
