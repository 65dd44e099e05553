//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): replicas stand by and
//! one reconciles. The leader renews the lease `grace` seconds before it expires; a replica
//! that stops renewing (crash, partition) is replaced once the lease expires, and a replica
//! that shuts down releases it so another takes over at once.

use super::{Error, Metrics, Settings, run_active};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;

/// Where the lease lives and how long it lasts.
#[derive(Clone, Debug)]
pub struct LeaderSettings {
    pub lease_name: String,
    pub lease_namespace: String,
    /// This replica's identity in the lease (pod name).
    pub identity: String,
    /// Lease duration in seconds: the longest a dead leader blocks failover.
    pub duration_seconds: u64,
    /// The leader renews this many seconds before the lease expires.
    pub grace_seconds: u64,
}

pub(crate) async fn run_elected(
    client: Client,
    settings: Settings,
    leader: LeaderSettings,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let manager = LeaseManagerBuilder::new(client.clone(), &leader.lease_name)
        .with_namespace(&leader.lease_namespace)
        .with_identity(&leader.identity)
        .with_duration(leader.duration_seconds)
        .with_grace(leader.grace_seconds)
        .with_field_manager(format!("nodegate-lease-{}", leader.identity))
        .build()
        .await?;
    let (mut is_leader, lease_task) = manager.watch().await;
    // Standing by is a ready state: the replica can take over at any time.
    metrics.set_ready(true);
    let mut result = Ok(());
    'outer: loop {
        tracing::info!(identity = %leader.identity, lease = %leader.lease_name, "waiting for the lease");
        while !*is_leader.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                changed = is_leader.changed() => if changed.is_err() { break 'outer },
            }
        }
        tracing::info!(identity = %leader.identity, "leading: starting the controller");
        metrics.set_leader(true);
        metrics.set_ready(false);
        let active = shutdown.child_token();
        let controller = tokio::spawn(run_active(
            client.clone(),
            settings.clone(),
            metrics.clone(),
            active.clone(),
        ));
        let mut controller = std::pin::pin!(controller);
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                changed = is_leader.changed() => {
                    if changed.is_err() || !*is_leader.borrow_and_update() { break true }
                }
                finished = &mut controller => {
                    metrics.set_leader(false);
                    result = match finished {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    };
                    break 'outer;
                }
            }
        };
        active.cancel();
        let _ = controller.await;
        metrics.set_leader(false);
        metrics.set_ready(true);
        if !lost {
            break;
        }
        tracing::warn!(identity = %leader.identity, "lost the lease: controller stopped");
    }
    // Dropping the receiver makes the lease task release the lease before it ends.
    drop(is_leader);
    match lease_task.await {
        Ok(Ok(_)) => tracing::info!("lease released"),
        Ok(Err(error)) => tracing::warn!(%error, "lease not released cleanly"),
        Err(error) => tracing::warn!(%error, "lease task failed"),
    }
    result
}
