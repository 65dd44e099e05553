//! A budget of bytes that JSON filtering may hold at once, across every request.
//!
//! `/pods`, `/runningpods/` and `/stats/summary` answers are read whole before they are
//! filtered (up to `--max-json-bytes` each), and a caller can ask for many at once. Without a
//! bound, eight concurrent 30 MB answers outgrow the pod's memory limit. Each such request
//! reserves bytes from one shared budget before it reads (its `Content-Length` twice over:
//! the input and the kept items, or a first slab when the length is unknown) and takes more
//! as its buffers grow. The first reservation waits (briefly, holding nothing). A request that
//! cannot grow may wait only if it is the budget's one *leader* (the first to find the budget
//! spent); every other one gives up at once and releases what it held, so the leader gets
//! room and a burst of large answers serves at least one of them instead of refusing all (no
//! two growing requests ever wait on each other, so nothing deadlocks). The caller of a
//! request that gives up gets 503 with `Retry-After`.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

/// Budget without a memory limit to derive it from: half the chart's 512 MiB limit, enough
/// for two documents of the largest size filtered (64 MiB, held twice) or many ordinary ones.
pub const DEFAULT_JSON_BUDGET_BYTES: usize = 256 * 1024 * 1024;

/// The smallest budget derived from a memory limit.
const MIN_DERIVED_BUDGET_BYTES: usize = 16 * 1024 * 1024;

/// The default budget: half the memory limit of this process's cgroup (v2 `memory.max`, else
/// v1 `memory.limit_in_bytes`), so a pod given less memory than the chart's default filters
/// less at once; [`DEFAULT_JSON_BUDGET_BYTES`] without a limit.
pub fn default_budget_bytes() -> usize {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let limit = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
    budget_for_limit(limit.as_deref())
}

/// Half of a cgroup memory limit as the file holds it; `max` (v2), v1's "unlimited" (a
/// number near 2^63) or nothing readable give [`DEFAULT_JSON_BUDGET_BYTES`].
pub fn budget_for_limit(limit: Option<&str>) -> usize {
    match limit.map(str::trim).and_then(|l| l.parse::<u64>().ok()) {
        Some(bytes) if bytes < 1 << 60 => usize::try_from(bytes / 2)
            .unwrap_or(DEFAULT_JSON_BUDGET_BYTES)
            .max(MIN_DERIVED_BUDGET_BYTES),
        _ => DEFAULT_JSON_BUDGET_BYTES,
    }
}

/// How long a request waits for its first reservation before it is refused.
pub const DEFAULT_BUDGET_WAIT: Duration = Duration::from_secs(2);

/// The budget shared by every request of one agent.
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
    wait: Duration,
    /// Held by the one request that may wait to grow.
    leader: Arc<Mutex<()>>,
}

/// The right to wait for room to grow; one request holds it at a time.
#[derive(Debug)]
pub struct Leadership(#[allow(dead_code)] OwnedMutexGuard<()>);

/// How long the leader waits for room before it gives up too.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);

/// The budget is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the memory budget is spent")]
pub struct Exhausted;

impl MemoryBudget {
    /// A budget of `total` bytes (clamped to what a semaphore can count); requests wait at
    /// most `wait` for their first reservation.
    pub fn new(total: usize, wait: Duration) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        MemoryBudget {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
            wait,
            leader: Arc::new(Mutex::new(())),
        }
    }

    /// The leadership, when no other request holds it.
    pub fn lead(&self) -> Option<Leadership> {
        self.leader.clone().try_lock_owned().ok().map(Leadership)
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes not reserved by anyone now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// Reserves `bytes` (at most the whole budget), waiting up to the budget's wait.
    pub async fn reserve(&self, bytes: usize) -> Result<Reservation, Exhausted> {
        let n = permits(bytes.min(self.total))?;
        let acquire = self.semaphore.clone().acquire_many_owned(n);
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => Ok(Reservation {
                semaphore: self.semaphore.clone(),
                permit: Some(permit),
                used: 0,
            }),
            _ => Err(Exhausted),
        }
    }
}

fn permits(bytes: usize) -> Result<u32, Exhausted> {
    u32::try_from(bytes).map_err(|_| Exhausted)
}

/// Bytes one request holds; returned to the budget when dropped.
#[derive(Debug)]
pub struct Reservation {
    semaphore: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    used: usize,
}

impl Reservation {
    pub fn held(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Accounts `bytes` more, taking permits without waiting when what is held does not
    /// cover them (a request holding budget never waits: two such requests could wait on
    /// each other for ever).
    pub fn charge(&mut self, bytes: usize) -> Result<(), Exhausted> {
        let want = self.used.checked_add(bytes).ok_or(Exhausted)?;
        let held = self.held();
        if want > held {
            let more = self
                .semaphore
                .clone()
                .try_acquire_many_owned(permits(want - held)?)
                .map_err(|_| Exhausted)?;
            match &mut self.permit {
                Some(p) => p.merge(more),
                None => self.permit = Some(more),
            }
        }
        self.used = want;
        Ok(())
    }

    /// Gives back `bytes` that were charged, and every permit held beyond what is used.
    /// Waits (the leader only: see the module doc) until this reservation holds at least
    /// `bytes`, at most the whole budget, for up to `timeout`.
    pub async fn hold_at_least(
        &mut self,
        bytes: usize,
        _leader: &Leadership,
        timeout: Duration,
    ) -> Result<(), Exhausted> {
        let held = self.held();
        if bytes <= held {
            return Ok(());
        }
        let total = held + self.semaphore.available_permits();
        let more = permits(bytes - held)?;
        let acquire = self.semaphore.clone().acquire_many_owned(more);
        match tokio::time::timeout(timeout, acquire).await {
            Ok(Ok(more)) => {
                match &mut self.permit {
                    Some(p) => p.merge(more),
                    None => self.permit = Some(more),
                }
                Ok(())
            }
            _ => {
                tracing::debug!(bytes, total, "JSON budget: the leader found no room");
                Err(Exhausted)
            }
        }
    }

    pub fn release(&mut self, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
        let spare = self.held().saturating_sub(self.used);
        if spare > 0
            && let Some(p) = &mut self.permit
        {
            drop(p.split(spare));
        }
    }
}

/// A byte buffer whose capacity is charged to a [`Reservation`]: it grows only as far as the
/// budget lets it (by a quarter at a time, so a buffer never holds twice what it needs).
#[derive(Debug)]
pub struct BudgetedBuf {
    buf: Vec<u8>,
    reservation: Reservation,
}

impl BudgetedBuf {
    pub fn new(reservation: Reservation) -> Self {
        BudgetedBuf {
            buf: Vec::new(),
            reservation,
        }
    }

    /// Makes room for `additional` more bytes, charged to the reservation.
    pub fn reserve(&mut self, additional: usize) -> Result<(), Exhausted> {
        let need = self.buf.len().checked_add(additional).ok_or(Exhausted)?;
        let cap = self.buf.capacity();
        if need <= cap {
            return Ok(());
        }
        let new_cap = need.max(cap + cap / 4).max(64 * 1024);
        self.reservation.charge(new_cap - cap)?;
        self.buf.reserve_exact(new_cap - self.buf.len());
        // The allocator may round up: charge what it actually gave.
        let extra = self.buf.capacity().saturating_sub(new_cap);
        if extra > 0 {
            self.reservation.charge(extra)?;
        }
        Ok(())
    }

    pub fn extend(&mut self, bytes: &[u8]) -> Result<(), Exhausted> {
        self.reserve(bytes.len())?;
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The bytes and the reservation, its capacity still charged.
    pub fn reservation_mut(&mut self) -> &mut Reservation {
        &mut self.reservation
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    pub fn into_parts(self) -> (Vec<u8>, Reservation) {
        (self.buf, self.reservation)
    }
}

impl std::io::Write for BudgetedBuf {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.extend(bytes).map_err(std::io::Error::other)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::json_filter::ListSink for BudgetedBuf {
    fn clear(&mut self) {
        self.buf.clear();
    }
}

/// A response body of a few chunks that keeps their reservation until it is sent or dropped.
pub struct HeldBody {
    chunks: std::collections::VecDeque<bytes::Bytes>,
    _reservation: Reservation,
}

impl HeldBody {
    pub fn new(chunks: impl IntoIterator<Item = bytes::Bytes>, reservation: Reservation) -> Self {
        HeldBody {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
            _reservation: reservation,
        }
    }
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.chunks
                .pop_front()
                .map(|c| Ok(http_body::Frame::data(c))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_default_is_half_the_cgroup_memory_limit() {
        const MIB: usize = 1024 * 1024;
        assert_eq!(budget_for_limit(Some("536870912\n")), 256 * MIB);
        assert_eq!(budget_for_limit(Some("268435456")), 128 * MIB);
        assert_eq!(budget_for_limit(Some("1048576")), 16 * MIB);
        for none in [
            Some("max\n"),
            Some("9223372036854771712\n"),
            Some("junk"),
            None,
        ] {
            assert_eq!(
                budget_for_limit(none),
                DEFAULT_JSON_BUDGET_BYTES,
                "{none:?}"
            );
        }
    }

    #[tokio::test]
    async fn reservations_come_back_when_dropped() {
        let budget = MemoryBudget::new(1000, Duration::from_millis(10));
        let mut a = budget.reserve(400).await.unwrap();
        assert_eq!(budget.available(), 600);
        a.charge(300).unwrap();
        a.charge(300).unwrap();
        assert_eq!((a.held(), budget.available()), (600, 400));
        a.release(500);
        assert_eq!((a.held(), budget.available()), (100, 900));
        drop(a);
        assert_eq!(budget.available(), 1000);
    }

    #[tokio::test]
    async fn the_first_reservation_waits_then_gives_up() {
        let budget = MemoryBudget::new(1000, Duration::from_millis(50));
        let all = budget.reserve(1000).await.unwrap();
        assert_eq!(budget.reserve(1).await.unwrap_err(), Exhausted);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(10).await.map(|r| r.held()) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(all);
        assert_eq!(waiting.await.unwrap(), Ok(10));
        // Never more than the whole budget, so a large ask does not wait for ever.
        assert_eq!(budget.reserve(5000).await.unwrap().held(), 1000);
    }

    #[tokio::test]
    async fn one_leader_waits_for_room_the_others_give_up() {
        let budget = MemoryBudget::new(1000, Duration::from_millis(10));
        let mut a = budget.reserve(600).await.unwrap();
        let mut b = budget.reserve(400).await.unwrap();
        let leader = budget.lead().unwrap();
        assert!(budget.lead().is_none(), "one leader at a time");
        // a leads and waits for b's bytes; b, no leader, gives up and releases them.
        let waiting = tokio::spawn(async move {
            let r = a.hold_at_least(900, &leader, Duration::from_secs(5)).await;
            (r, a.held())
        });
        assert_eq!(b.charge(500), Err(Exhausted));
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(b);
        assert_eq!(waiting.await.unwrap(), (Ok(()), 900));
        assert!(budget.lead().is_some(), "leadership ends with its holder");
        // A leader that cannot get room in time gives up too.
        let mut c = budget.reserve(100).await.unwrap();
        let _held = budget.reserve(900).await.unwrap();
        let leader = budget.lead().unwrap();
        let r = c
            .hold_at_least(500, &leader, Duration::from_millis(20))
            .await;
        assert_eq!(r, Err(Exhausted));
    }

    #[tokio::test]
    async fn growth_never_waits_and_never_exceeds_the_budget() {
        let budget = MemoryBudget::new(200 * 1024, Duration::from_millis(10));
        let mut buf = BudgetedBuf::new(budget.reserve(1).await.unwrap());
        let chunk = vec![7u8; 16 * 1024];
        let mut written = 0;
        while buf.write_all(&chunk).is_ok() {
            written += chunk.len();
            assert!(buf.as_slice().len() == written);
        }
        assert!(written >= 128 * 1024, "{written}");
        assert!(buf.reservation.held() <= 200 * 1024);
        assert!(buf.buf.capacity() <= buf.reservation.held());
        drop(buf);
        assert_eq!(budget.available(), 200 * 1024);
    }
}
