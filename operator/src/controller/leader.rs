//! Leader election on a coordination.k8s.io Lease, done the way client-go's `leaderelection`
//! does it, with a renew deadline that fences every write.
//!
//! Why not kube-lease-manager (used before): it has no renew deadline. A leader that cannot
//! reach the API server keeps believing it leads (its renewal errors only back off), so a
//! partitioned leader could go on writing after its lease expired and another replica took
//! over; its renewals are also patches without a resourceVersion precondition, and expiry is
//! computed from the holder's own `renewTime`, so clock skew between replicas moves failover.
//! The loop here is small and follows client-go:
//! - every attempt reads the Lease and writes it back with the resourceVersion it read (a
//!   concurrent writer makes it fail with 409, never overwrites);
//! - a standby counts a lease as expired `leaseDurationSeconds` after *it saw the record
//!   change* (its own monotonic clock, not the holder's timestamps);
//! - the leader renews every `retry_period`; a write is allowed only within `renew_deadline`
//!   (shorter than the lease duration) of the last renewal that succeeded ([`Fence`]), and
//!   when that deadline passes without one, or the Lease names another holder, leadership is
//!   lost: the round in flight is cancelled and [`run_elected`] returns
//!   [`Error::LeadershipLost`]. The binary then exits, as kube-controller-manager does, so no
//!   state from the lost term (backoffs, caches a partition left stale, pooled connections)
//!   survives, and the kubelet restarts it as a standby.
//!
//! Standbys run the watch caches from the start, so a takeover costs no relist: only the
//! reconcile loop waits for the lease.

use super::fence::Fence;
use super::progress::Progress;
use super::{Error, Metrics, Settings};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where the lease lives and its timing (client-go's names and meaning).
#[derive(Clone, Debug)]
pub struct LeaderSettings {
    pub lease_name: String,
    pub lease_namespace: String,
    /// This replica's identity in the lease (pod name).
    pub identity: String,
    /// How long a standby waits after it last saw the lease change before taking it: the
    /// longest failover after a crash (plus up to one retry period to see the last renewal). Whole
    /// seconds (the Lease stores seconds).
    pub lease_duration: Duration,
    /// The leader writes only within this long of its last successful renewal, and steps
    /// down when it passes. Shorter than `lease_duration`: the difference covers requests in
    /// flight and clock rate.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby tries to acquire.
    pub retry_period: Duration,
}

impl LeaderSettings {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    pub fn new(
        lease_name: impl Into<String>,
        lease_namespace: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            lease_name: lease_name.into(),
            lease_namespace: lease_namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// `retry_period < renew_deadline < lease_duration`, the duration at least 1 s and in
    /// whole seconds, and an identity: otherwise the fence cannot hold.
    pub fn validate(&self) -> Result<(), String> {
        if self.identity.is_empty() {
            return Err("the lease identity is empty".into());
        }
        if self.lease_duration < Duration::from_secs(1) || self.lease_duration.subsec_nanos() != 0 {
            return Err(format!(
                "lease duration {:?} must be whole seconds, at least 1",
                self.lease_duration
            ));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "renew deadline {:?} must be shorter than the lease duration {:?}",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(format!(
                "retry period {:?} must be positive and shorter than the renew deadline {:?}",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// This replica holds the lease (acquired or renewed by this attempt).
    Held,
    /// Another replica holds a lease this replica counts as valid until `until`.
    HeldBy { holder: String, until: Instant },
    /// Someone wrote the Lease between our read and our write (409): try again.
    Conflict,
}

/// Until when another replica's lease keeps this one out: the record's duration after
/// `observed_at` (when this replica last saw the record change). None when nobody else holds
/// it (free, released, missing, or ours).
fn held_until(spec: Option<&LeaseSpec>, me: &str, observed_at: Instant) -> Option<Instant> {
    let spec = spec?;
    match spec.holder_identity.as_deref() {
        None | Some("") => None,
        Some(holder) if holder == me => None,
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(0);
            Some(observed_at + Duration::from_secs(duration))
        }
    }
}

/// Whether this replica may write the Lease at `now`.
#[cfg(test)]
fn may_take(spec: Option<&LeaseSpec>, me: &str, observed_at: Instant, now: Instant) -> bool {
    held_until(spec, me, observed_at).is_none_or(|until| now >= until)
}

/// The record this replica writes to take or renew the lease: a new holder gets a new
/// acquireTime and one more transition; a renewal changes only renewTime (and the duration).
fn taken(
    current: Option<&LeaseSpec>,
    me: &str,
    duration_seconds: i32,
    now: MicroTime,
) -> LeaseSpec {
    let current = current.cloned().unwrap_or_default();
    let ours = current.holder_identity.as_deref() == Some(me);
    let transitions = current.lease_transitions.unwrap_or(0);
    let had_holder = current
        .holder_identity
        .as_deref()
        .is_some_and(|h| !h.is_empty());
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration_seconds),
        acquire_time: if ours {
            current.acquire_time.clone()
        } else {
            Some(now.clone())
        },
        renew_time: Some(now),
        lease_transitions: Some(if ours || !had_holder {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..current
    }
}

/// The record a leader that stops writes: no holder, so a standby takes it at its next try
/// (client-go's ReleaseOnCancel).
fn released(current: &LeaseSpec, now: MicroTime) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(now.clone()),
        renew_time: Some(now),
        ..current.clone()
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// One replica's side of the election.
struct Elector {
    api: Api<Lease>,
    settings: LeaderSettings,
    fence: Fence,
    /// The resourceVersion last seen and when (this replica's monotonic clock).
    observed: Option<(String, Instant)>,
    /// This leader's rounds, written on the Lease at every renewal for its successor.
    progress: Progress,
    /// Whether this process holds the lease (set by its first successful write).
    holding: bool,
}

impl Elector {
    fn new(client: Client, settings: LeaderSettings, fence: Fence) -> Self {
        Self {
            api: Api::namespaced(client, &settings.lease_namespace),
            settings,
            fence,
            observed: None,
            progress: Progress::default(),
            holding: false,
        }
    }

    /// Records `lease` as seen now if its record changed; returns when it was first seen.
    fn observe(&mut self, lease: &Lease, now: Instant) -> Instant {
        let rv = lease.resource_version().unwrap_or_default();
        match &self.observed {
            Some((seen, at)) if *seen == rv => *at,
            _ => {
                self.observed = Some((rv, now));
                now
            }
        }
    }

    /// client-go's tryAcquireOrRenew: read the Lease, and write it back (guarded by the
    /// resourceVersion read) if this replica may hold it. On success the fence is confirmed
    /// to the instant the attempt began, which is before the API server stored the renewal.
    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let began = Instant::now();
        let me = self.settings.identity.clone();
        let name = self.settings.lease_name.clone();
        let Some(mut lease) = self.api.get_opt(&name).await? else {
            self.progress.take_over(&ObjectMeta::default());
            let mut metadata = ObjectMeta {
                name: Some(name),
                ..ObjectMeta::default()
            };
            self.progress.annotate(&mut metadata);
            let lease = Lease {
                metadata,
                spec: Some(taken(
                    None,
                    &me,
                    self.settings.duration_seconds(),
                    now_micro(),
                )),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created, Instant::now());
                    self.holding = true;
                    self.fence.confirm(began);
                    Ok(Attempt::Held)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            };
        };
        let now = Instant::now();
        let observed_at = self.observe(&lease, now);
        if let Some(until) = held_until(lease.spec.as_ref(), &me, observed_at)
            && now < until
        {
            let holder = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.clone())
                .unwrap_or_default();
            return Ok(Attempt::HeldBy { holder, until });
        }
        if !self.holding {
            // Taking over (also from this replica's own earlier process, same identity):
            // what the previous record says of its holder's rounds.
            let unfinished = self.progress.take_over(&lease.metadata);
            if unfinished > 0 {
                tracing::warn!(
                    unfinished,
                    "the previous leader stopped in the middle of a round; {unfinished} leader(s) \
                     in a row have"
                );
            }
        }
        self.progress.annotate(&mut lease.metadata);
        lease.spec = Some(taken(
            lease.spec.as_ref(),
            &me,
            self.settings.duration_seconds(),
            now_micro(),
        ));
        // `replace` sends the resourceVersion read above: 409 if anyone wrote since.
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated, Instant::now());
                self.holding = true;
                self.fence.confirm(began);
                Ok(Attempt::Held)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if this replica still holds it, so a standby takes over at its next
    /// try instead of after the lease duration. Guarded by the resourceVersion read: it never
    /// clears another holder's record.
    async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.lease_name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_ref() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        lease.spec = Some(released(spec, now_micro()));
        self.api
            .replace(&self.settings.lease_name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

/// `period` stretched by up to a quarter at random, so standbys do not poll in step.
fn jittered(period: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded per instance from the OS: enough randomness for a jitter.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    period + period.mul_f64((random % 1000) as f64 / 4000.0)
}

/// How a term as leader ended.
enum Ended {
    Shutdown,
    Lost(String),
    Controller(Result<(), Error>),
}

pub(crate) async fn run_elected(
    client: Client,
    settings: Settings,
    leader: LeaderSettings,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    leader.validate().map_err(Error::LeaderSettings)?;
    let stop = shutdown.child_token();
    // Warm standby: the caches fill now and stay current, whoever leads.
    let mut watches =
        super::start_watches(client.clone(), &settings, metrics.clone(), stop.clone());
    let fence = Fence::new(leader.renew_deadline);
    let mut elector = Elector::new(client.clone(), leader.clone(), fence.clone());
    let result = elected(
        &client,
        settings,
        &leader,
        &metrics,
        &shutdown,
        &watches,
        &mut elector,
    )
    .await;
    stop.cancel();
    watches.tasks.shutdown().await;
    result
}

async fn elected(
    client: &Client,
    settings: Settings,
    leader: &LeaderSettings,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    watches: &super::Watches,
    elector: &mut Elector,
) -> Result<(), Error> {
    // Standing by is a ready state: the replica can take over at any time.
    metrics.set_ready(true);
    tracing::info!(identity = %leader.identity, lease = %leader.lease_name, "standing by for the lease");
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            attempt = elector.try_acquire_or_renew() => attempt,
        };
        let mut next = Instant::now() + jittered(leader.retry_period);
        match attempt {
            Ok(Attempt::Held) => break,
            Ok(Attempt::HeldBy { holder, until }) => {
                tracing::debug!(%holder, "the lease is held");
                // Try again as soon as it would expire, not up to a retry period later.
                next = next.min(until);
            }
            Ok(Attempt::Conflict) => tracing::debug!("lease changed meanwhile; trying again"),
            Err(error) => tracing::warn!(%error, "could not read or take the lease"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(next) => {}
        }
    }

    tracing::info!(identity = %leader.identity, "leading: starting the reconcile loop");
    metrics.set_ready(false);
    metrics.set_leader(true);
    let fence = elector.fence.clone();
    let active = shutdown.child_token();
    let mut controller = tokio::spawn(super::lead(
        client.clone(),
        settings,
        metrics.clone(),
        watches.stores.clone(),
        watches.trigger.clone(),
        super::Term {
            fence: fence.clone(),
            progress: elector.progress.clone(),
        },
        active.clone(),
    ));
    let mut next_renewal = Instant::now() + leader.retry_period;
    let ended = loop {
        // Open: the acquisition or a renewal confirmed it within the deadline.
        let Ok(Some(deadline)) = fence.deadline() else {
            break Ended::Lost("the renew deadline passed".into());
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ended::Shutdown,
            finished = &mut controller => {
                break Ended::Controller(finished.unwrap_or(Ok(())));
            }
            _ = tokio::time::sleep_until(deadline) => {}
            _ = tokio::time::sleep_until(next_renewal) => {
                next_renewal = Instant::now() + leader.retry_period;
                // A renewal that has not answered by the deadline is given up with it.
                match tokio::time::timeout_at(deadline, elector.try_acquire_or_renew()).await {
                    Ok(Ok(Attempt::Held)) => {}
                    Ok(Ok(Attempt::HeldBy { holder, .. })) => {
                        break Ended::Lost(format!("the lease is held by {holder}"));
                    }
                    Ok(Ok(Attempt::Conflict)) => {
                        tracing::warn!("lease changed meanwhile; renewing again");
                    }
                    Ok(Err(error)) => tracing::warn!(%error, "could not renew the lease"),
                    Err(_) => tracing::warn!("lease renewal did not answer before the deadline"),
                }
            }
        }
    };
    let stopped = match ended {
        Ended::Lost(reason) => {
            // Closed before anything else: a write racing the cancellation is refused.
            fence.revoke();
            active.cancel();
            let _ = controller.await;
            metrics.set_leader(false);
            tracing::error!(identity = %leader.identity, %reason, "lost the lease: reconciling stopped");
            return Err(Error::LeadershipLost(reason));
        }
        Ended::Shutdown => {
            active.cancel();
            controller.await.unwrap_or(Ok(()))
        }
        Ended::Controller(result) => result,
    };
    metrics.set_leader(false);
    fence.revoke();
    match tokio::time::timeout(leader.retry_period, elector.release()).await {
        Ok(Ok(())) => tracing::info!("lease released"),
        Ok(Err(error)) => tracing::warn!(%error, "lease not released; it expires by itself"),
        Err(_) => tracing::warn!("lease release did not answer; it expires by itself"),
    }
    stopped
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, duration: i32, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(transitions),
            acquire_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            ..LeaseSpec::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn another_holders_lease_is_taken_only_after_its_duration_since_seen() {
        let seen = Instant::now();
        let other = spec(Some("b"), 6, 0);
        assert!(!may_take(Some(&other), "a", seen, seen));
        assert!(!may_take(
            Some(&other),
            "a",
            seen,
            seen + Duration::from_millis(5999)
        ));
        assert!(may_take(
            Some(&other),
            "a",
            seen,
            seen + Duration::from_secs(6)
        ));
        assert_eq!(
            held_until(Some(&other), "a", seen),
            Some(seen + Duration::from_secs(6))
        );
        // Ours, free, released or missing: take it now.
        assert!(may_take(Some(&spec(Some("a"), 6, 0)), "a", seen, seen));
        assert!(may_take(Some(&spec(None, 6, 0)), "a", seen, seen));
        assert!(may_take(Some(&spec(Some(""), 6, 0)), "a", seen, seen));
        assert!(may_take(None, "a", seen, seen));
    }

    #[test]
    fn taking_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::from_second(100).unwrap());
        let from_b = taken(Some(&spec(Some("b"), 6, 2)), "a", 6, now.clone());
        assert_eq!(from_b.holder_identity.as_deref(), Some("a"));
        assert_eq!(from_b.lease_transitions, Some(3));
        assert_eq!(from_b.acquire_time, Some(now.clone()));
        let renewed = taken(
            Some(&from_b),
            "a",
            6,
            MicroTime(k8s_openapi::jiff::Timestamp::from_second(102).unwrap()),
        );
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, Some(now.clone()));
        assert_ne!(renewed.renew_time, renewed.acquire_time);
        let fresh = taken(None, "a", 6, now.clone());
        assert_eq!(fresh.lease_transitions, Some(0));
        let gone = released(&renewed, now);
        assert_eq!(gone.holder_identity, None);
        assert_eq!(gone.lease_transitions, Some(3));
    }

    #[test]
    fn settings_need_retry_below_deadline_below_duration() {
        let ok = LeaderSettings::new("l", "ns", "a");
        assert_eq!(ok.validate(), Ok(()));
        let mut s = ok.clone();
        s.renew_deadline = s.lease_duration;
        assert!(s.validate().unwrap_err().contains("renew deadline"));
        let mut s = ok.clone();
        s.retry_period = s.renew_deadline;
        assert!(s.validate().unwrap_err().contains("retry period"));
        let mut s = ok.clone();
        s.lease_duration = Duration::from_millis(1500);
        assert!(s.validate().unwrap_err().contains("whole seconds"));
        let mut s = ok;
        s.identity.clear();
        assert!(s.validate().is_err());
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(d >= Duration::from_secs(2) && d < Duration::from_millis(2500));
        }
    }
}
