//! The lease table: who owns each (lane, partition), at which epoch, until
//! when. Pure: every call takes `now` and returns the directives for the
//! worker plus the changes that must be logged before they are acknowledged.
//!
//! Invariants (property-tested below):
//! - a partition has at most one holder, and the epoch rises on every change of owner;
//! - a new owner is granted a partition only once the previous one released
//!   it, its lease expired, or it is the same worker starting over;
//! - a worker reporting an epoch that is not current is fenced.
//!
//! Moving a partition is general, not a special case of a dead worker: the
//! operator changes the assignment, the old owner is told to release by a
//! deadline, and the new owner acquires at epoch + 1 once it has (or once
//! the old lease or the deadline runs out).

use std::collections::BTreeMap;

use matchfleet_api::progress::{Assignment, Directive, HeartbeatRequest, LeaseView};

/// One lease. `holder == None` means free (released, or never taken).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lease {
    pub holder: Option<String>,
    pub epoch: u64,
    pub expires_at: u64,
    /// Set while the holder is draining after a move: it must release by then.
    pub release_by: Option<u64>,
    pub committed: i64,
    /// The holders' cumulative counters, each kept at its highest report.
    pub counters: BTreeMap<String, u64>,
}

/// A change of owner, to be appended to the changelog before it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerChange {
    pub lane: String,
    pub partition: i32,
    pub holder: Option<String>,
    pub epoch: u64,
}

#[derive(Debug, Clone, Default)]
pub struct LeaseTable {
    leases: BTreeMap<(String, i32), Lease>,
    assignment: Assignment,
    lease_millis: u64,
}

impl LeaseTable {
    pub fn new(lease_millis: u64) -> Self {
        LeaseTable {
            lease_millis,
            ..Default::default()
        }
    }

    pub fn set_assignment(&mut self, assignment: Assignment) {
        self.assignment = assignment;
    }

    pub fn assignment(&self) -> &Assignment {
        &self.assignment
    }

    /// Restores an owner from the changelog. After a restart every lease gets a
    /// fresh grace period: renewals are not logged, so expiry is unknown.
    pub fn restore(&mut self, change: &OwnerChange, now: u64) {
        let lease = self
            .leases
            .entry((change.lane.clone(), change.partition))
            .or_default();
        if change.epoch >= lease.epoch {
            lease.holder = change.holder.clone();
            lease.epoch = change.epoch;
            lease.expires_at = now + self.lease_millis;
            lease.release_by = None;
        }
    }

    /// Whether `slot` holds (lane, partition) at `epoch` right now.
    pub fn is_current(&self, lane: &str, partition: i32, slot: &str, epoch: u64, now: u64) -> bool {
        self.leases
            .get(&(lane.to_string(), partition))
            .is_some_and(|l| {
                l.holder.as_deref() == Some(slot) && l.epoch == epoch && l.expires_at > now
            })
    }

    /// The current epoch of (lane, partition), 0 if it never had an owner.
    pub fn epoch(&self, lane: &str, partition: i32) -> u64 {
        self.leases
            .get(&(lane.to_string(), partition))
            .map(|l| l.epoch)
            .unwrap_or(0)
    }

    /// Handles one heartbeat.
    pub fn heartbeat(
        &mut self,
        req: &HeartbeatRequest,
        now: u64,
    ) -> (Vec<Directive>, Vec<OwnerChange>) {
        let mut directives = Vec::new();
        let mut changes = Vec::new();
        let slot = req.slot.as_str();

        // Releases first, so a partition given up in this beat can move at once.
        for r in &req.released {
            let key = (r.lane.clone(), r.partition);
            if let Some(lease) = self.leases.get_mut(&key) {
                if lease.holder.as_deref() == Some(slot) && lease.epoch == r.epoch {
                    lease.holder = None;
                    lease.release_by = None;
                    lease.committed = lease.committed.max(r.committed);
                    merge_counters(&mut lease.counters, &r.counters);
                    changes.push(OwnerChange {
                        lane: r.lane.clone(),
                        partition: r.partition,
                        holder: None,
                        epoch: lease.epoch,
                    });
                }
            }
        }

        // Leases this slot holds but neither reports nor released: it no
        // longer works on them (it restarted, or killed that work), so they
        // are free now rather than when they expire.
        for ((lane, partition), lease) in self.leases.iter_mut() {
            let reported = req
                .holdings
                .iter()
                .chain(&req.released)
                .any(|h| &h.lane == lane && h.partition == *partition);
            if lease.holder.as_deref() == Some(slot) && !reported {
                lease.holder = None;
                lease.release_by = None;
                changes.push(OwnerChange {
                    lane: lane.clone(),
                    partition: *partition,
                    holder: None,
                    epoch: lease.epoch,
                });
            }
        }

        let mut held = Vec::new();
        for h in &req.holdings {
            let key = (h.lane.clone(), h.partition);
            let desired_here = self.desired_owner(&h.lane, h.partition) == Some(slot);
            let lease = self.leases.entry(key.clone()).or_default();
            let current = lease.holder.as_deref() == Some(slot)
                && lease.epoch == h.epoch
                && lease.expires_at > now;
            if !current {
                directives.push(Directive::Fenced {
                    lane: h.lane.clone(),
                    partition: h.partition,
                    current_epoch: lease.epoch,
                });
                continue;
            }
            held.push(key);
            lease.committed = lease.committed.max(h.committed);
            merge_counters(&mut lease.counters, &h.counters);
            if desired_here {
                lease.release_by = None;
                lease.expires_at = now + self.lease_millis;
                directives.push(Directive::Keep {
                    lane: h.lane.clone(),
                    partition: h.partition,
                    epoch: h.epoch,
                    expires_in_millis: self.lease_millis,
                });
            } else {
                // Moved elsewhere (or unassigned): drain by a deadline. The lease
                // lives until then, so the new owner cannot start early.
                let deadline = *lease
                    .release_by
                    .get_or_insert(now + self.assignment.drain_millis.max(1));
                // A draining owner must still heartbeat: if it dies mid-drain
                // the lease runs out after one lease length, not at the deadline.
                lease.expires_at = deadline.min(now + self.lease_millis);
                directives.push(Directive::Release {
                    lane: h.lane.clone(),
                    partition: h.partition,
                    epoch: h.epoch,
                    deadline_millis: deadline.saturating_sub(now),
                    expires_in_millis: lease.expires_at.saturating_sub(now),
                });
            }
        }

        // Partitions assigned to this slot that it does not hold yet.
        let wanted: Vec<(String, i32)> = self
            .assignment
            .lanes
            .iter()
            .flat_map(|(lane, parts)| {
                parts
                    .iter()
                    .filter(|(_, owner)| owner.as_str() == slot)
                    .map(move |(p, _)| (lane.clone(), *p))
            })
            .collect();
        for key in wanted {
            if held.contains(&key) {
                continue;
            }
            let lease = self.leases.entry(key.clone()).or_default();
            let free = match lease.holder.as_deref() {
                None => true,
                // The same worker no longer holds it (it restarted or dropped it).
                Some(h) if h == slot => true,
                Some(_) => lease.expires_at <= now,
            };
            if !free {
                continue;
            }
            lease.holder = Some(slot.to_string());
            lease.epoch += 1;
            lease.expires_at = now + self.lease_millis;
            lease.release_by = None;
            changes.push(OwnerChange {
                lane: key.0.clone(),
                partition: key.1,
                holder: Some(slot.to_string()),
                epoch: lease.epoch,
            });
            directives.push(Directive::Acquire {
                lane: key.0,
                partition: key.1,
                epoch: lease.epoch,
                expires_in_millis: self.lease_millis,
            });
        }
        (directives, changes)
    }

    fn desired_owner(&self, lane: &str, partition: i32) -> Option<&str> {
        self.assignment
            .lanes
            .get(lane)?
            .get(&partition)
            .map(String::as_str)
    }

    /// Lane -> partition -> holder and epoch, for `GET /status`.
    pub fn view(&self, now: u64) -> BTreeMap<String, BTreeMap<i32, LeaseView>> {
        let mut out: BTreeMap<String, BTreeMap<i32, LeaseView>> = BTreeMap::new();
        for ((lane, p), l) in &self.leases {
            out.entry(lane.clone()).or_default().insert(
                *p,
                LeaseView {
                    holder: l.holder.clone().filter(|_| l.expires_at > now),
                    epoch: l.epoch,
                    committed: l.committed,
                    counters: l.counters.clone(),
                },
            );
        }
        out
    }
}

/// Counters are cumulative and restored with a partition's state, so the
/// highest report is the truth; a late report from a fenced owner never
/// reaches here (it is not current).
fn merge_counters(into: &mut BTreeMap<String, u64>, reported: &BTreeMap<String, u64>) {
    for (name, value) in reported {
        let c = into.entry(name.clone()).or_default();
        *c = (*c).max(*value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchfleet_api::progress::Holding;
    use proptest::prelude::*;

    const LEASE: u64 = 1000;

    fn assign(pairs: &[(i32, &str)]) -> Assignment {
        Assignment {
            lanes: BTreeMap::from([(
                "live".to_string(),
                pairs.iter().map(|(p, s)| (*p, s.to_string())).collect(),
            )]),
            drain_millis: 500,
        }
    }

    fn beat(slot: &str, holdings: &[(i32, u64)], released: &[(i32, u64)]) -> HeartbeatRequest {
        let h = |&(partition, epoch): &(i32, u64)| Holding {
            lane: "live".into(),
            partition,
            epoch,
            committed: 0,
            counters: BTreeMap::new(),
        };
        HeartbeatRequest {
            slot: slot.into(),
            holdings: holdings.iter().map(h).collect(),
            released: released.iter().map(h).collect(),
        }
    }

    #[test]
    fn first_owner_acquires_at_epoch_one_and_keeps_it() {
        let mut t = LeaseTable::new(LEASE);
        t.set_assignment(assign(&[(0, "a")]));
        let (d, c) = t.heartbeat(&beat("a", &[], &[]), 0);
        assert!(matches!(
            d[..],
            [Directive::Acquire {
                epoch: 1,
                partition: 0,
                ..
            }]
        ));
        assert_eq!(c.len(), 1);
        let (d, c) = t.heartbeat(&beat("a", &[(0, 1)], &[]), 500);
        assert!(matches!(d[..], [Directive::Keep { epoch: 1, .. }]));
        assert!(c.is_empty(), "renewals are not logged");
        assert!(t.is_current("live", 0, "a", 1, 1400));
    }

    #[test]
    fn a_move_drains_the_old_owner_before_the_new_one_starts() {
        let mut t = LeaseTable::new(LEASE);
        t.set_assignment(assign(&[(0, "a")]));
        t.heartbeat(&beat("a", &[], &[]), 0);
        t.set_assignment(assign(&[(0, "b")]));
        // b must wait while a holds the lease.
        let (d, _) = t.heartbeat(&beat("b", &[], &[]), 100);
        assert!(d.is_empty());
        let (d, _) = t.heartbeat(&beat("a", &[(0, 1)], &[]), 200);
        assert!(matches!(
            d[..],
            [Directive::Release {
                deadline_millis: 500,
                ..
            }]
        ));
        // a releases; b acquires at epoch 2.
        let (_, c) = t.heartbeat(&beat("a", &[], &[(0, 1)]), 300);
        assert_eq!(c[0].holder, None);
        let (d, _) = t.heartbeat(&beat("b", &[], &[]), 310);
        assert!(matches!(d[..], [Directive::Acquire { epoch: 2, .. }]));
    }

    #[test]
    fn an_owner_that_dies_while_draining_loses_the_lease_after_one_lease_length() {
        let mut t = LeaseTable::new(LEASE);
        t.set_assignment(Assignment {
            drain_millis: 60_000,
            ..assign(&[(0, "a")])
        });
        t.heartbeat(&beat("a", &[], &[]), 0);
        t.set_assignment(Assignment {
            drain_millis: 60_000,
            ..assign(&[(0, "b")])
        });
        let (d, _) = t.heartbeat(&beat("a", &[(0, 1)], &[]), 100);
        assert!(matches!(
            d[..],
            [Directive::Release {
                deadline_millis: 60_000,
                expires_in_millis: LEASE,
                ..
            }]
        ));
        // a dies mid-drain: b gets the partition once the lease runs out, not after the drain deadline.
        let (d, _) = t.heartbeat(&beat("b", &[], &[]), 100 + LEASE - 1);
        assert!(d.is_empty());
        let (d, _) = t.heartbeat(&beat("b", &[], &[]), 100 + LEASE);
        assert!(matches!(d[..], [Directive::Acquire { epoch: 2, .. }]));
    }

    #[test]
    fn a_restarted_owner_frees_what_it_no_longer_reports() {
        let mut t = LeaseTable::new(LEASE);
        t.set_assignment(assign(&[(0, "a"), (1, "a")]));
        t.heartbeat(&beat("a", &[], &[]), 0);
        t.set_assignment(assign(&[(0, "a"), (1, "b")]));
        // a restarts and reports nothing: partition 1 is free for b at once,
        // and a starts over on partition 0 at a new epoch.
        let (d, c) = t.heartbeat(&beat("a", &[], &[]), 10);
        assert!(
            matches!(
                d[..],
                [Directive::Acquire {
                    partition: 0,
                    epoch: 2,
                    ..
                }]
            ),
            "{d:?}"
        );
        assert!(c.iter().any(|c| c.partition == 1 && c.holder.is_none()));
        let (d, _) = t.heartbeat(&beat("b", &[], &[]), 20);
        assert!(
            matches!(
                d[..],
                [Directive::Acquire {
                    partition: 1,
                    epoch: 2,
                    ..
                }]
            ),
            "{d:?}"
        );
    }

    #[test]
    fn a_silent_owner_loses_the_lease_and_is_fenced_when_it_wakes() {
        let mut t = LeaseTable::new(LEASE);
        t.set_assignment(assign(&[(0, "a")]));
        t.heartbeat(&beat("a", &[], &[]), 0);
        // a freezes; the operator moves the partition to b.
        t.set_assignment(assign(&[(0, "b")]));
        let (d, _) = t.heartbeat(&beat("b", &[], &[]), 999);
        assert!(d.is_empty(), "not before the lease expires");
        let (d, _) = t.heartbeat(&beat("b", &[], &[]), 1000);
        assert!(matches!(d[..], [Directive::Acquire { epoch: 2, .. }]));
        // a wakes up and reports epoch 1: fenced.
        let (d, _) = t.heartbeat(&beat("a", &[(0, 1)], &[]), 1200);
        assert!(matches!(
            d[..],
            [Directive::Fenced {
                current_epoch: 2,
                ..
            }]
        ));
        assert!(!t.is_current("live", 0, "a", 1, 1200));
    }

    #[test]
    fn an_expired_holder_is_fenced_even_if_nobody_took_over() {
        let mut t = LeaseTable::new(LEASE);
        t.set_assignment(assign(&[(0, "a")]));
        t.heartbeat(&beat("a", &[], &[]), 0);
        let (d, _) = t.heartbeat(&beat("a", &[(0, 1)], &[]), 5000);
        // Its work may already be duplicated elsewhere; it must drop it and re-acquire.
        assert!(matches!(d[0], Directive::Fenced { .. }));
        assert!(matches!(d[1], Directive::Acquire { epoch: 2, .. }));
    }

    #[test]
    fn a_restarted_service_gives_leases_a_fresh_grace_period() {
        let mut t = LeaseTable::new(LEASE);
        t.restore(
            &OwnerChange {
                lane: "live".into(),
                partition: 3,
                holder: Some("a".into()),
                epoch: 7,
            },
            10_000,
        );
        t.set_assignment(assign(&[(3, "a")]));
        let (d, _) = t.heartbeat(&beat("a", &[(3, 7)], &[]), 10_500);
        assert!(matches!(d[..], [Directive::Keep { epoch: 7, .. }]));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Assign(Vec<u8>),
        Beat { slot: u8, drop: bool, release: bool },
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            prop::collection::vec(0u8..3, 4).prop_map(Op::Assign),
            (0u8..3, any::<bool>(), any::<bool>()).prop_map(|(slot, drop, release)| Op::Beat {
                slot,
                drop,
                release
            }),
            (0u64..1500).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Simulates workers that follow directives (sometimes dropping work or
        /// releasing late) under random reassignments and clock jumps, and
        /// checks that no partition ever has two workers processing it at one
        /// time under a current lease, and that epochs only rise.
        #[test]
        fn no_partition_has_two_current_owners(ops in prop::collection::vec(op(), 1..120)) {
            let slots = ["s0", "s1", "s2"];
            let mut t = LeaseTable::new(LEASE);
            t.set_assignment(Assignment { lanes: BTreeMap::new(), drain_millis: 300 });
            let mut now = 0u64;
            // What each worker believes it holds: partition -> epoch.
            let mut believes: Vec<BTreeMap<i32, u64>> = vec![BTreeMap::new(); 3];
            let mut last_epoch: BTreeMap<i32, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Assign(owners) => {
                        let pairs: Vec<(i32, &str)> = owners.iter().enumerate().map(|(p, s)| (p as i32, slots[*s as usize])).collect();
                        t.set_assignment(assign(&pairs));
                    }
                    Op::Advance(ms) => now += ms,
                    Op::Beat { slot, drop, release } => {
                        let s = slot as usize;
                        let mut held: Vec<(i32, u64)> = believes[s].iter().map(|(p, e)| (*p, *e)).collect();
                        let mut released = Vec::new();
                        if drop && !held.is_empty() {
                            held.pop();
                        }
                        if release && !held.is_empty() {
                            released.push(held.remove(0));
                        }
                        let (dirs, changes) = t.heartbeat(&beat(slots[s], &held, &released), now);
                        believes[s] = held.into_iter().collect();
                        for d in dirs {
                            match d {
                                Directive::Acquire { partition, epoch, .. } => { believes[s].insert(partition, epoch); }
                                Directive::Fenced { partition, .. } => { believes[s].remove(&partition); }
                                Directive::Keep { .. } | Directive::Release { .. } => {}
                            }
                        }
                        for c in changes {
                            let last = last_epoch.entry(c.partition).or_insert(0);
                            prop_assert!(c.epoch >= *last, "epoch went down");
                            *last = c.epoch;
                        }
                    }
                }
                // At most one worker holds a *current* lease for each partition.
                for p in 0..4 {
                    let current = (0..3).filter(|s| believes[*s].get(&p).is_some_and(|e| t.is_current("live", p, slots[*s], *e, now))).count();
                    prop_assert!(current <= 1, "partition {} has {} current owners", p, current);
                    let epochs: Vec<u64> = (0..3).filter_map(|s| believes[s].get(&p).copied()).collect();
                    let mut dedup = epochs.clone();
                    dedup.sort();
                    dedup.dedup();
                    prop_assert_eq!(dedup.len(), epochs.len(), "two workers believe in the same epoch of partition {}", p);
                }
            }
        }
    }
}
