//! The lease guard of one (lane, partition) held at one epoch. Work on the
//! partition asks it before every side effect that must not outlive the lease
//! (publishing, committing). It is fenced - and the work killed - when the
//! progress service says the lease moved, or when the local deadline passes
//! without a renewal: the service never grants the partition to anyone else
//! before that deadline (it is measured from before the renewal was sent), so
//! a worker that obeys its guard never overlaps with the next owner.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::clock;

#[derive(Debug)]
pub struct LeaseGuard {
    pub lane: String,
    pub partition: i32,
    pub epoch: u64,
    deadline: AtomicU64,
    fenced: CancellationToken,
    release: CancellationToken,
    committed: AtomicI64,
    counters: Mutex<BTreeMap<String, u64>>,
}

impl LeaseGuard {
    /// A guard valid until `deadline` (a [`clock::now`] reading). It fences
    /// itself when the deadline passes without a renewal.
    pub fn start(lane: &str, partition: i32, epoch: u64, deadline: u64) -> Arc<Self> {
        let guard = Arc::new(LeaseGuard {
            lane: lane.to_string(),
            partition,
            epoch,
            deadline: AtomicU64::new(deadline),
            fenced: CancellationToken::new(),
            release: CancellationToken::new(),
            committed: AtomicI64::new(-1),
            counters: Mutex::new(BTreeMap::new()),
        });
        tokio::spawn(watch_deadline(guard.clone()));
        guard
    }

    /// Extends the lease (never shortens it).
    pub fn renew(&self, deadline: u64) {
        self.deadline.fetch_max(deadline, Ordering::SeqCst);
    }

    pub fn deadline(&self) -> u64 {
        self.deadline.load(Ordering::SeqCst)
    }

    /// True while the lease is held: not fenced and not expired.
    pub fn valid(&self) -> bool {
        !self.fenced.is_cancelled() && clock::now() < self.deadline()
    }

    /// Kill the partition's work now; commit and publish nothing more.
    pub fn fence(&self) {
        self.fenced.cancel();
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.is_cancelled()
    }

    /// Completes once the guard is fenced.
    pub async fn fenced(&self) {
        self.fenced.cancelled().await
    }

    /// Stop fetching, finish in-flight work, commit, then stop.
    pub fn release(&self) {
        self.release.cancel();
    }

    pub fn is_releasing(&self) -> bool {
        self.release.is_cancelled()
    }

    pub async fn releasing(&self) {
        self.release.cancelled().await
    }

    /// The next offset the work committed (-1 before the first commit).
    pub fn committed(&self) -> i64 {
        self.committed.load(Ordering::SeqCst)
    }

    pub fn set_committed(&self, next_offset: i64) {
        self.committed.fetch_max(next_offset, Ordering::SeqCst);
    }

    /// The partition's cumulative counters as of its last commit (reported
    /// with every heartbeat).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.counters.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn set_counters(&self, counters: BTreeMap<String, u64>) {
        if let Ok(mut c) = self.counters.lock() {
            *c = counters;
        }
    }
}

/// Fences the guard as soon as its deadline passes without a renewal.
async fn watch_deadline(guard: Arc<LeaseGuard>) {
    loop {
        let deadline = guard.deadline();
        tokio::select! {
            _ = guard.fenced() => return,
            _ = tokio::time::sleep_until(clock::instant(deadline).into()) => {}
        }
        if clock::now() >= guard.deadline() {
            tracing::warn!(
                lane = %guard.lane,
                partition = guard.partition,
                epoch = guard.epoch,
                "lease expired without a renewal; killing the partition's work"
            );
            guard.fence();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_guard_fences_itself_when_its_deadline_passes() {
        let g = LeaseGuard::start("live", 0, 1, clock::now() + 50);
        assert!(g.valid());
        tokio::time::timeout(std::time::Duration::from_secs(2), g.fenced())
            .await
            .expect("fenced at the deadline");
        assert!(!g.valid());
    }

    #[tokio::test]
    async fn renewal_extends_and_never_shortens() {
        let g = LeaseGuard::start("live", 0, 1, clock::now() + 80);
        g.renew(clock::now() + 10_000);
        g.renew(clock::now() + 1);
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        assert!(g.valid(), "renewed past the first deadline");
        g.fence();
        assert!(!g.valid());
    }

    #[test]
    fn committed_only_moves_forward() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let g = LeaseGuard::start("live", 0, 1, clock::now() + 1000);
            g.set_committed(10);
            g.set_committed(4);
            assert_eq!(g.committed(), 10);
        });
    }
}
