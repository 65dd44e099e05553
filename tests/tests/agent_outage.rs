//! The agent while the API server is away: policy mode needs no API call, so it keeps serving;
//! tokens it reviewed before stay valid for their cache TTL; a token it has not seen is 401
//! (the review fails), never let through and never anonymous; once the API server is back, the
//! new token is reviewed and served. The outage is a TCP forwarder that cuts and refuses the
//! agent's connections, so the API server the other tests use keeps running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent_support.rs"]
mod support;

use nodegate_agent::authn::KubeTokenReviewer;
use nodegate_crds::policy::SubjectKind;
use nodegate_crds::{Endpoint, Port, Subject};
use nodegate_tests::Cluster;
use nodegate_tests::cluster::FlakyProxy;
use std::sync::Arc;
use support::*;

fn service_account(namespace: &str, name: &str) -> Subject {
    Subject {
        kind: SubjectKind::ServiceAccount,
        name: name.into(),
        namespace: Some(namespace.into()),
    }
}

#[tokio::test]
async fn policy_mode_keeps_serving_while_the_api_server_is_away() {
    let Some(cluster) = Cluster::get().await.unwrap() else {
        return;
    };
    let ns = cluster.namespace("outage").await.unwrap();
    let seen = service_account_token(&cluster, ns.name(), "seen").await;
    let unseen = service_account_token(&cluster, ns.name(), "unseen").await;

    let url = cluster.admin_config().cluster_url.clone();
    let apiserver = format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap_or(443));
    let proxy = FlakyProxy::start(apiserver).await.unwrap();
    let client = kube::Client::try_from(proxy.config_through(cluster.admin_config())).unwrap();

    let sim = sim().await;
    let pki = Pki::new("outage");
    let rules = vec![rule(
        "outage",
        vec![
            service_account(ns.name(), "seen"),
            service_account(ns.name(), "unseen"),
        ],
        &[Endpoint::Pods],
        namespaces(&[TEAM]),
        &[Port::Secure],
    )];
    let agent = start_agent_with(
        NODE,
        upstream_of(&sim),
        pki.ca_file.clone(),
        Arc::new(KubeTokenReviewer::new(client)),
        rules,
    )
    .await;
    let addr = agent.running.secure_addr;
    let get = |token: &str| {
        let token = token.to_string();
        async move {
            request(addr, true, &Cred::Token(token), "GET", "/pods", &[])
                .await
                .unwrap()
        }
    };

    assert_eq!(get(&seen).await.status, 200, "reviewed while the API is up");

    proxy.outage(true);
    let during = get(&seen).await;
    assert_eq!(
        during.status, 200,
        "a cached token is served during the outage"
    );
    assert!(during.text().contains(TEAM));
    let refused = get(&unseen).await;
    assert_eq!(
        refused.status, 401,
        "an unseen token cannot be reviewed: 401"
    );
    assert_eq!(refused.text(), "Unauthorized");
    assert_eq!(get("not-a-token").await.status, 401);
    let before = sim.request_count();
    assert_eq!(get(&unseen).await.status, 401);
    assert_eq!(
        sim.request_count(),
        before,
        "a refused request never reaches upstream"
    );

    proxy.outage(false);
    // A failed review is not cached, so the token is reviewed again once the API is back.
    let mut status = 0;
    for _ in 0..50 {
        status = get(&unseen).await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(status, 200, "served once the API server is back");
}
