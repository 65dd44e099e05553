//! The write fence of an elected leader: every request that changes the cluster passes it, and
//! it lets one through only while leadership was confirmed within the renew deadline.
//!
//! The lease loop (`leader.rs`) confirms the fence with the instant a successful renewal was
//! *sent*. Another replica takes the lease only `lease_duration` after it saw that renewal
//! land, which is later still, so a leader that writes only before `sent + renew_deadline`
//! (with `renew_deadline < lease_duration`) never writes while another one leads: the
//! difference is the margin for a request in flight and for clocks running at different
//! rates. A request still in flight at the deadline is abandoned (its future dropped), so a
//! connection that has not been established yet by then never carries it.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Why a write was not sent (or was abandoned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    #[error("not sent: leadership was not confirmed within the renew deadline")]
    NotConfirmed,
    #[error("abandoned in flight: the renew deadline passed before the API server answered")]
    Expired,
}

/// Cheap to clone; every clone sees the same confirmations.
#[derive(Clone, Debug)]
pub struct Fence {
    /// None: no election (a single replica run without a lease), so nothing is fenced.
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    renew_deadline: Duration,
    /// When the last successful renewal (or the acquisition) was sent; None: not leading.
    confirmed: Mutex<Option<Instant>>,
}

impl Fence {
    /// A fence that always lets writes through: for a controller run without election.
    pub fn unfenced() -> Self {
        Self { inner: None }
    }

    /// A fence that lets writes through for `renew_deadline` after each confirmation; closed
    /// until the first.
    pub fn new(renew_deadline: Duration) -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                renew_deadline,
                confirmed: Mutex::new(None),
            })),
        }
    }

    /// Leadership held as of `sent` (when the renewal that succeeded was sent). Never moves
    /// the confirmation back.
    pub fn confirm(&self, sent: Instant) {
        if let Some(inner) = &self.inner
            && let Ok(mut confirmed) = inner.confirmed.lock()
        {
            *confirmed = Some(confirmed.map_or(sent, |c| c.max(sent)));
        }
    }

    /// Leadership lost: closed at once, whatever the deadline.
    pub fn revoke(&self) {
        if let Some(inner) = &self.inner
            && let Ok(mut confirmed) = inner.confirmed.lock()
        {
            *confirmed = None;
        }
    }

    /// Until when writes may be sent: `Ok(None)` when unfenced, `Err` when closed now.
    pub fn deadline(&self) -> Result<Option<Instant>, Fenced> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        // A poisoned lock means a panic while confirming: fail closed.
        let confirmed = inner.confirmed.lock().map_err(|_| Fenced::NotConfirmed)?;
        match *confirmed {
            Some(at) if Instant::now() < at + inner.renew_deadline => {
                Ok(Some(at + inner.renew_deadline))
            }
            _ => Err(Fenced::NotConfirmed),
        }
    }

    /// Whether a write may be sent now.
    pub fn check(&self) -> Result<(), Fenced> {
        self.deadline().map(|_| ())
    }

    /// Runs `request` only if the fence is open, and abandons it if the deadline passes before
    /// it completes (a renewal meanwhile moves the deadline on). `request` is not polled at
    /// all when the fence is closed, so a refused write costs no I/O.
    pub async fn guard<F: Future>(&self, request: F) -> Result<F::Output, Fenced> {
        let Some(mut deadline) = self.deadline()? else {
            return Ok(request.await);
        };
        let mut request = std::pin::pin!(request);
        loop {
            if let Ok(output) = tokio::time::timeout_at(deadline, request.as_mut()).await {
                return Ok(output);
            }
            // The deadline passed in flight: go on only if a renewal moved it.
            match self.deadline() {
                Ok(Some(later)) => deadline = later,
                _ => return Err(Fenced::Expired),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DEADLINE: Duration = Duration::from_secs(4);

    #[tokio::test(start_paused = true)]
    async fn open_only_within_the_deadline_of_the_last_confirmation() {
        let fence = Fence::new(DEADLINE);
        assert_eq!(
            fence.check(),
            Err(Fenced::NotConfirmed),
            "closed until confirmed"
        );
        let t0 = Instant::now();
        fence.confirm(t0);
        assert_eq!(fence.deadline(), Ok(Some(t0 + DEADLINE)));
        tokio::time::advance(DEADLINE - Duration::from_millis(1)).await;
        assert_eq!(fence.check(), Ok(()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            fence.check(),
            Err(Fenced::NotConfirmed),
            "closed at the deadline"
        );
        // A renewal sent later opens it again; an older one arriving late does not move it back.
        let t1 = Instant::now();
        fence.confirm(t1);
        fence.confirm(t0);
        assert_eq!(fence.deadline(), Ok(Some(t1 + DEADLINE)));
        fence.revoke();
        assert_eq!(
            fence.check(),
            Err(Fenced::NotConfirmed),
            "revoked: closed at once"
        );
        assert_eq!(Fence::unfenced().deadline(), Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_fence_never_polls_the_request() {
        let fence = Fence::new(DEADLINE);
        fence.confirm(Instant::now());
        tokio::time::advance(DEADLINE).await;
        let polled = Arc::new(AtomicUsize::new(0));
        let p = polled.clone();
        let result = fence
            .guard(async move {
                p.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        assert_eq!(result, Err(Fenced::NotConfirmed));
        assert_eq!(polled.load(Ordering::SeqCst), 0, "nothing sent");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_at_the_deadline_is_abandoned_unless_renewed() {
        let fence = Fence::new(DEADLINE);
        let t0 = Instant::now();
        fence.confirm(t0);
        let hung = fence.guard(std::future::pending::<()>()).await;
        assert_eq!(hung, Err(Fenced::Expired));
        assert_eq!(
            Instant::now(),
            t0 + DEADLINE,
            "abandoned exactly at the deadline"
        );

        // A renewal during the request carries it past the first deadline.
        let t1 = Instant::now();
        fence.confirm(t1);
        let renewer = {
            let fence = fence.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                fence.confirm(Instant::now());
            })
        };
        let slow = fence
            .guard(async {
                tokio::time::sleep(Duration::from_secs(6)).await;
                "answered"
            })
            .await;
        renewer.await.unwrap();
        assert_eq!(slow, Ok("answered"));
    }
}
