//! The task table: what is done, what failed, what is being rendered and by
//! whom. A claim is only as good as the lease it was made under: once the
//! partition's lease moves to a new epoch, the old holder's claims and
//! completions are refused, so a zombie can render but never publish.

use std::collections::{BTreeMap, HashMap};

use matchfleet_api::progress::{
    ClaimRequest, ClaimResponse, CompleteRequest, CompleteResponse, FailRequest, FailResponse,
};

use super::leases::LeaseTable;

/// The durable state of a task, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskRecord {
    Done {
        lane: String,
        latency_millis: u64,
        /// The accepted staged output, for roll-forward publication.
        staged: Option<String>,
    },
    Failed {
        attempts: u32,
        reason: String,
    },
    /// Attempts so far of a task that will be retried.
    Attempts {
        attempts: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    slot: String,
    lane: String,
    partition: i32,
    epoch: u64,
}

#[derive(Debug, Default)]
pub struct TaskTable {
    records: HashMap<String, TaskRecord>,
    in_flight: HashMap<String, InFlight>,
    max_attempts: u32,
    slo_millis: Option<u64>,
    pub duplicates_prevented: u64,
    pub slo_breaches: u64,
    done: u64,
    failed: u64,
    done_by_lane: BTreeMap<String, u64>,
    latencies: Latencies,
}

impl TaskTable {
    pub fn new(max_attempts: u32, slo_millis: Option<u64>) -> Self {
        TaskTable {
            max_attempts: max_attempts.max(1),
            slo_millis,
            ..Default::default()
        }
    }

    /// Restores a task from the changelog.
    /// Done is final: a later record for the same key (a replayed duplicate)
    /// changes nothing.
    pub fn restore(&mut self, key: &str, record: TaskRecord) {
        let previous = self.records.get(key).cloned();
        if let Some(TaskRecord::Done { .. }) = previous {
            return;
        }
        if let Some(TaskRecord::Failed { .. }) = previous {
            self.failed -= 1;
        }
        self.count(&record);
        self.records.insert(key.to_string(), record);
    }

    fn count(&mut self, record: &TaskRecord) {
        match record {
            TaskRecord::Done {
                lane,
                latency_millis,
                ..
            } => {
                self.done += 1;
                *self.done_by_lane.entry(lane.clone()).or_default() += 1;
                self.latencies.record(*latency_millis);
                if self.slo_millis.is_some_and(|slo| *latency_millis > slo) {
                    self.slo_breaches += 1;
                }
            }
            TaskRecord::Failed { .. } => self.failed += 1,
            TaskRecord::Attempts { .. } => {}
        }
    }

    fn attempts(&self, key: &str) -> u32 {
        match self.records.get(key) {
            Some(TaskRecord::Attempts { attempts }) | Some(TaskRecord::Failed { attempts, .. }) => {
                *attempts
            }
            _ => 0,
        }
    }

    pub fn claim(&mut self, req: &ClaimRequest, leases: &LeaseTable, now: u64) -> ClaimResponse {
        if !leases.is_current(&req.lane, req.partition, &req.slot, req.epoch, now) {
            return ClaimResponse::Fenced {
                current_epoch: leases.epoch(&req.lane, req.partition),
            };
        }
        match self.records.get(&req.key) {
            Some(TaskRecord::Done { staged, .. }) => {
                self.duplicates_prevented += 1;
                return ClaimResponse::AlreadyDone {
                    staged: staged.clone(),
                };
            }
            Some(TaskRecord::Failed { .. }) => return ClaimResponse::AlreadyFailed,
            _ => {}
        }
        if let Some(holder) = self.in_flight.get(&req.key) {
            let same = holder.slot == req.slot && holder.epoch == req.epoch;
            if !same
                && leases.is_current(
                    &holder.lane,
                    holder.partition,
                    &holder.slot,
                    holder.epoch,
                    now,
                )
            {
                self.duplicates_prevented += 1;
                return ClaimResponse::Busy;
            }
        }
        self.in_flight.insert(
            req.key.clone(),
            InFlight {
                slot: req.slot.clone(),
                lane: req.lane.clone(),
                partition: req.partition,
                epoch: req.epoch,
            },
        );
        ClaimResponse::Granted {
            attempt: self.attempts(&req.key) + 1,
        }
    }

    /// Decides a completion. On `Accepted` the caller must log the returned
    /// record and then `apply` it, before answering.
    pub fn complete(
        &self,
        req: &CompleteRequest,
        leases: &LeaseTable,
        now: u64,
    ) -> Result<TaskRecord, CompleteResponse> {
        if let Some(TaskRecord::Done { staged, .. }) = self.records.get(&req.key) {
            return Err(CompleteResponse::AlreadyDone {
                staged: staged.clone(),
            });
        }
        if !leases.is_current(&req.lane, req.partition, &req.slot, req.epoch, now) {
            return Err(CompleteResponse::Fenced {
                current_epoch: leases.epoch(&req.lane, req.partition),
            });
        }
        let latency = (now as i64 - req.event_time_millis).max(0) as u64;
        Ok(TaskRecord::Done {
            lane: req.lane.clone(),
            latency_millis: latency,
            staged: req.staged.clone(),
        })
    }

    /// Decides a failure report: the record to log, and the answer.
    pub fn fail(
        &self,
        req: &FailRequest,
        leases: &LeaseTable,
        now: u64,
    ) -> Result<(TaskRecord, FailResponse), FailResponse> {
        if !leases.is_current(&req.lane, req.partition, &req.slot, req.epoch, now) {
            return Err(FailResponse::Fenced {
                current_epoch: leases.epoch(&req.lane, req.partition),
            });
        }
        let attempts = self.attempts(&req.key) + 1;
        if attempts >= self.max_attempts {
            Ok((
                TaskRecord::Failed {
                    attempts,
                    reason: req.reason.clone(),
                },
                FailResponse::Failed,
            ))
        } else {
            Ok((
                TaskRecord::Attempts { attempts },
                FailResponse::Retry {
                    attempt: attempts + 1,
                },
            ))
        }
    }

    /// Applies a logged record to the table.
    pub fn apply(&mut self, key: &str, record: TaskRecord) {
        if !matches!(record, TaskRecord::Attempts { .. }) {
            self.in_flight.remove(key);
        }
        self.restore(key, record);
    }

    /// Tasks claimed under a lease that is still current.
    pub fn in_flight(&self, leases: &LeaseTable, now: u64) -> u64 {
        self.in_flight
            .values()
            .filter(|f| leases.is_current(&f.lane, f.partition, &f.slot, f.epoch, now))
            .count() as u64
    }

    pub fn done(&self) -> u64 {
        self.done
    }
    pub fn failed(&self) -> u64 {
        self.failed
    }
    pub fn done_by_lane(&self) -> &BTreeMap<String, u64> {
        &self.done_by_lane
    }
    pub fn percentile(&self, p: f64) -> Option<u64> {
        self.latencies.percentile(p)
    }
}

/// Event-to-done latencies in a log-linear histogram: 1 ms resolution up to
/// 1 s, then about 1% relative error, bounded memory however many tasks.
#[derive(Debug, Default)]
pub struct Latencies {
    buckets: BTreeMap<u64, u64>,
    count: u64,
}

impl Latencies {
    fn bucket(ms: u64) -> u64 {
        if ms < 1000 {
            ms
        } else {
            // Keep the top 7 significant bits.
            let shift = 64 - ms.leading_zeros() - 7;
            (ms >> shift) << shift
        }
    }

    pub fn record(&mut self, ms: u64) {
        *self.buckets.entry(Self::bucket(ms)).or_default() += 1;
        self.count += 1;
    }

    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some(*bucket);
            }
        }
        self.buckets.keys().last().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchfleet_api::progress::{Assignment, HeartbeatRequest, Holding};

    fn leases_with(owner: &str) -> LeaseTable {
        let mut t = LeaseTable::new(1000);
        t.set_assignment(Assignment {
            lanes: BTreeMap::from([("live".to_string(), BTreeMap::from([(0, owner.to_string())]))]),
            drain_millis: 100,
        });
        t.heartbeat(
            &HeartbeatRequest {
                slot: owner.into(),
                holdings: vec![],
                released: vec![],
            },
            0,
        );
        t
    }

    fn claim(key: &str, slot: &str, epoch: u64) -> ClaimRequest {
        ClaimRequest {
            key: key.into(),
            lane: "live".into(),
            partition: 0,
            epoch,
            slot: slot.into(),
            offset: 0,
        }
    }

    fn complete(key: &str, slot: &str, epoch: u64) -> CompleteRequest {
        CompleteRequest {
            key: key.into(),
            lane: "live".into(),
            partition: 0,
            epoch,
            slot: slot.into(),
            event_time_millis: 0,
            staged: None,
        }
    }

    #[test]
    fn a_task_is_done_once_and_later_claims_are_duplicates() {
        let leases = leases_with("a");
        let mut tasks = TaskTable::new(3, None);
        assert_eq!(
            tasks.claim(&claim("u1", "a", 1), &leases, 10),
            ClaimResponse::Granted { attempt: 1 }
        );
        let record = tasks
            .complete(&complete("u1", "a", 1), &leases, 50)
            .unwrap();
        tasks.apply("u1", record);
        assert_eq!(tasks.done(), 1);
        assert_eq!(
            tasks.claim(&claim("u1", "a", 1), &leases, 60),
            ClaimResponse::AlreadyDone { staged: None }
        );
        assert_eq!(
            tasks.complete(&complete("u1", "a", 1), &leases, 70),
            Err(CompleteResponse::AlreadyDone { staged: None })
        );
        assert_eq!(tasks.duplicates_prevented, 1);
        assert_eq!(tasks.percentile(99.0), Some(50));
    }

    #[test]
    fn a_zombie_cannot_complete_after_the_lease_moved() {
        let mut leases = leases_with("a");
        let mut tasks = TaskTable::new(3, None);
        tasks.claim(&claim("u1", "a", 1), &leases, 10);
        // a goes silent; b takes over at epoch 2 after expiry.
        leases.set_assignment(Assignment {
            lanes: BTreeMap::from([("live".to_string(), BTreeMap::from([(0, "b".to_string())]))]),
            drain_millis: 100,
        });
        leases.heartbeat(
            &HeartbeatRequest {
                slot: "b".into(),
                holdings: vec![],
                released: vec![],
            },
            2000,
        );
        // b may claim the task the zombie held: the zombie's claim is void.
        assert_eq!(
            tasks.claim(&claim("u1", "b", 2), &leases, 2001),
            ClaimResponse::Granted { attempt: 1 }
        );
        assert_eq!(
            tasks.complete(&complete("u1", "a", 1), &leases, 2002),
            Err(CompleteResponse::Fenced { current_epoch: 2 })
        );
        assert!(tasks
            .complete(&complete("u1", "b", 2), &leases, 2003)
            .is_ok());
    }

    #[test]
    fn a_live_holder_blocks_a_second_claim_of_the_same_key() {
        // Partition 0 is a's, partition 1 is b's; the same key arrives on both.
        let mut leases = LeaseTable::new(1000);
        leases.set_assignment(Assignment {
            lanes: BTreeMap::from([(
                "live".to_string(),
                BTreeMap::from([(0, "a".to_string()), (1, "b".to_string())]),
            )]),
            drain_millis: 100,
        });
        for slot in ["a", "b"] {
            leases.heartbeat(
                &HeartbeatRequest {
                    slot: slot.into(),
                    holdings: vec![],
                    released: vec![],
                },
                0,
            );
        }
        let mut tasks = TaskTable::new(3, None);
        assert_eq!(
            tasks.claim(&claim("u1", "a", 1), &leases, 10),
            ClaimResponse::Granted { attempt: 1 }
        );
        let mut from_b = claim("u1", "b", 1);
        from_b.partition = 1;
        assert_eq!(tasks.claim(&from_b, &leases, 20), ClaimResponse::Busy);
        // The holder itself may claim again (a retry after a lost answer).
        assert_eq!(
            tasks.claim(&claim("u1", "a", 1), &leases, 30),
            ClaimResponse::Granted { attempt: 1 }
        );
        // Once a's lease has expired (b kept beating), b may take the task over.
        let b_holds = Holding {
            lane: "live".into(),
            partition: 1,
            epoch: 1,
            committed: 0,
            counters: Default::default(),
        };
        leases.heartbeat(
            &HeartbeatRequest {
                slot: "b".into(),
                holdings: vec![b_holds],
                released: vec![],
            },
            900,
        );
        assert_eq!(
            tasks.claim(&from_b, &leases, 1500),
            ClaimResponse::Granted { attempt: 1 }
        );
    }

    #[test]
    fn failures_retry_until_max_attempts() {
        let leases = leases_with("a");
        let mut tasks = TaskTable::new(2, None);
        let fail = FailRequest {
            key: "u1".into(),
            lane: "live".into(),
            partition: 0,
            epoch: 1,
            slot: "a".into(),
            reason: "exit 1".into(),
        };
        tasks.claim(&claim("u1", "a", 1), &leases, 10);
        let (r, resp) = tasks.fail(&fail, &leases, 20).unwrap();
        assert_eq!(resp, FailResponse::Retry { attempt: 2 });
        tasks.apply("u1", r);
        assert_eq!(
            tasks.claim(&claim("u1", "a", 1), &leases, 30),
            ClaimResponse::Granted { attempt: 2 }
        );
        let (r, resp) = tasks.fail(&fail, &leases, 40).unwrap();
        assert_eq!(resp, FailResponse::Failed);
        tasks.apply("u1", r);
        assert_eq!(tasks.failed(), 1);
        assert_eq!(
            tasks.claim(&claim("u1", "a", 1), &leases, 50),
            ClaimResponse::AlreadyFailed
        );
    }

    #[test]
    fn restore_counts_each_key_once() {
        let mut tasks = TaskTable::new(3, Some(100));
        tasks.restore("k", TaskRecord::Attempts { attempts: 1 });
        tasks.restore(
            "k",
            TaskRecord::Done {
                lane: "live".into(),
                latency_millis: 150,
                staged: None,
            },
        );
        tasks.restore(
            "k",
            TaskRecord::Done {
                lane: "live".into(),
                latency_millis: 150,
                staged: None,
            },
        );
        assert_eq!(tasks.done(), 1);
        assert_eq!(tasks.done_by_lane()["live"], 1);
    }

    #[test]
    fn percentiles_are_close() {
        let mut l = Latencies::default();
        for ms in 1..=10_000 {
            l.record(ms);
        }
        let p50 = l.percentile(50.0).unwrap();
        let p99 = l.percentile(99.0).unwrap();
        assert!((4900..=5000).contains(&p50), "p50 {p50}");
        assert!((9800..=9900).contains(&p99), "p99 {p99}");
        assert_eq!(Latencies::default().percentile(50.0), None);
    }
}
