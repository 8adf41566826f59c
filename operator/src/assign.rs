//! Sticky assignment of partitions to slots (DESIGN.md §2). Workers use
//! `assign()`, never `subscribe()`, so this map is the only thing that decides
//! who reads what; every partition that changes slot costs a drain on the old
//! owner and a restart from the committed offset on the new one, so a change
//! of replica count must move as few partitions as possible.

use std::collections::BTreeMap;

/// Partition -> slot index.
pub type SlotAssignment = BTreeMap<i32, i32>;

/// The assignment of `partitions` partitions over `slots` slots that keeps as
/// much of `previous` as a balanced assignment allows.
///
/// Balanced: every slot gets `P / S` or `P / S + 1` partitions (so none more
/// than its fair share `ceil(P / S)`). Sticky: a partition stays on its slot
/// when that slot still exists and keeping it does not unbalance the result;
/// among a slot's previous partitions the lowest-numbered ones stay. The rest
/// go one by one (lowest partition first) to the least-loaded slot, lowest
/// index on ties. Deterministic; entries of `previous` outside `0..partitions`
/// or `0..slots` are ignored.
pub fn assign(partitions: i32, slots: i32, previous: &SlotAssignment) -> SlotAssignment {
    let mut out = SlotAssignment::new();
    if partitions <= 0 || slots <= 0 {
        return out;
    }
    let (p, s) = (partitions as usize, slots as usize);
    let base = p / s;
    // How many slots may hold one partition more than `base`.
    let mut extra_left = p % s;

    let mut previous_by_slot: Vec<Vec<i32>> = vec![Vec::new(); s];
    for (&partition, &slot) in previous {
        if (0..partitions).contains(&partition) && (0..slots).contains(&slot) {
            // BTreeMap order: each slot's list is sorted by partition.
            previous_by_slot[slot as usize].push(partition);
        }
    }

    let mut load = vec![0usize; s];
    for (slot, kept) in previous_by_slot.iter().enumerate() {
        let mut keep = kept.len().min(base);
        // A slot that had more than `base` keeps one more while some slot may
        // still go above `base`: this is what makes the result keep the most.
        if kept.len() > base && extra_left > 0 {
            keep += 1;
            extra_left -= 1;
        }
        for &partition in &kept[..keep] {
            out.insert(partition, slot as i32);
        }
        load[slot] = keep;
    }

    for partition in 0..partitions {
        if out.contains_key(&partition) {
            continue;
        }
        let slot = (0..s).min_by_key(|&i| (load[i], i)).unwrap_or(0);
        load[slot] += 1;
        out.insert(partition, slot as i32);
    }
    out
}

/// Like [`assign`], over only the `available` slot indices (the Ready
/// workers): a slot that is stuck or gone gets nothing, so its partitions move
/// to live workers (their leases move once the old ones run out). With no
/// slot available, `previous` is kept as it is: there is nowhere better.
pub fn assign_available(
    partitions: i32,
    available: &[i32],
    previous: &SlotAssignment,
) -> SlotAssignment {
    if available.is_empty() {
        return previous
            .iter()
            .filter(|(p, _)| (0..partitions).contains(*p))
            .map(|(p, s)| (*p, *s))
            .collect();
    }
    let dense: BTreeMap<i32, i32> = available
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i as i32))
        .collect();
    let previous_dense: SlotAssignment = previous
        .iter()
        .filter_map(|(p, s)| Some((*p, *dense.get(s)?)))
        .collect();
    assign(partitions, available.len() as i32, &previous_dense)
        .into_iter()
        .map(|(p, i)| (p, available[i as usize]))
        .collect()
}

/// Like [`assign_available`], over only the listed partitions (the backlog's
/// unfinished ones): the same balance and stickiness among them; entries of
/// `previous` for other partitions are dropped.
pub fn assign_partitions(
    partitions: &[i32],
    available: &[i32],
    previous: &SlotAssignment,
) -> SlotAssignment {
    let mut ids = partitions.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let dense: BTreeMap<i32, i32> = ids
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, i as i32))
        .collect();
    let previous_dense: SlotAssignment = previous
        .iter()
        .filter_map(|(p, s)| Some((*dense.get(p)?, *s)))
        .collect();
    assign_available(ids.len() as i32, available, &previous_dense)
        .into_iter()
        .filter_map(|(i, s)| Some((*ids.get(i as usize)?, s)))
        .collect()
}

/// Partitions whose slot differs between two assignments (partitions only in
/// one of them do not count: they were added or removed, not moved).
pub fn moves(before: &SlotAssignment, after: &SlotAssignment) -> usize {
    after
        .iter()
        .filter(|(p, s)| before.get(p).is_some_and(|b| b != *s))
        .count()
}

/// The assignment as `status.live.assignment` stores it (partition as a string).
pub fn to_status(a: &SlotAssignment) -> BTreeMap<String, i32> {
    a.iter().map(|(p, s)| (p.to_string(), *s)).collect()
}

/// The assignment from `status.live.assignment`; keys that are not partition
/// numbers are ignored (the status is user-writable, so it may hold anything).
pub fn from_status(a: &BTreeMap<String, i32>) -> SlotAssignment {
    a.iter()
        .filter_map(|(p, s)| Some((p.parse().ok()?, *s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_unavailable_slot_gets_nothing_and_the_others_keep_theirs() {
        let before = assign(12, 3, &SlotAssignment::new());
        let after = assign_available(12, &[1, 2], &before);
        assert!(after.values().all(|s| *s != 0));
        assert_eq!(after.len(), 12);
        // Partitions of slots 1 and 2 stay where they were.
        for (p, s) in &before {
            if *s != 0 {
                assert_eq!(after[p], *s, "partition {p} moved");
            }
        }
        // Slot 0 back: it gets a fair share again, taken from the others.
        let back = assign_available(12, &[0, 1, 2], &after);
        assert_eq!(loads(&back, 3), vec![4, 4, 4]);
    }

    #[test]
    fn a_subset_of_partitions_is_balanced_and_sticky() {
        let all = assign_partitions(&[0, 1, 2, 3, 4, 5], &[0, 1, 2], &SlotAssignment::new());
        assert_eq!(loads(&all, 3), vec![2, 2, 2]);
        // Partitions 1 and 3 finish: the rest stay where they were.
        let fewer = assign_partitions(&[0, 2, 4, 5], &[0, 1, 2], &all);
        assert_eq!(fewer.keys().copied().collect::<Vec<_>>(), [0, 2, 4, 5]);
        assert_eq!(moves(&all, &fewer), 0);
        // Two on one slot finish: one partition moves to it, to balance.
        let rebalanced = assign_partitions(&[1, 2, 4, 5], &[0, 1, 2], &all);
        assert_eq!(moves(&all, &rebalanced), 1);
        assert_eq!(loads(&rebalanced, 3).iter().filter(|n| **n == 0).count(), 0);
        // One slot fewer: only its partitions move.
        let smaller = assign_partitions(&[0, 2, 4, 5], &[0, 1], &fewer);
        assert!(smaller.values().all(|s| *s < 2));
        for (p, s) in &fewer {
            if *s < 2 {
                assert_eq!(smaller[p], *s);
            }
        }
        // No slot available: the previous placements of the listed partitions.
        assert_eq!(
            assign_partitions(&[3, 5], &[], &all),
            [(3, all[&3]), (5, all[&5])].into()
        );
        assert!(assign_partitions(&[], &[0], &all).is_empty());
    }

    #[test]
    fn with_no_slot_available_the_assignment_stays() {
        let before = assign(6, 2, &SlotAssignment::new());
        assert_eq!(assign_available(6, &[], &before), before);
    }

    fn loads(a: &SlotAssignment, slots: i32) -> Vec<usize> {
        let mut l = vec![0; slots as usize];
        for s in a.values() {
            l[*s as usize] += 1;
        }
        l
    }

    /// The most partitions any balanced assignment over `slots` can keep from
    /// `previous`: each slot keeps up to its share, and `P % S` slots (best:
    /// those that had more than `P / S`) have a share one larger.
    fn max_keepable(partitions: i32, slots: i32, previous: &SlotAssignment) -> usize {
        let (p, s) = (partitions as usize, slots as usize);
        let (base, extra) = (p / s, p % s);
        let prev = loads(
            &previous
                .iter()
                .filter(|(pt, sl)| (0..partitions).contains(*pt) && (0..slots).contains(*sl))
                .map(|(a, b)| (*a, *b))
                .collect(),
            slots,
        );
        prev.iter().map(|&n| n.min(base)).sum::<usize>()
            + extra.min(prev.iter().filter(|&&n| n > base).count())
    }

    #[test]
    fn fresh_assignment_is_round_robin_like_and_balanced() {
        let a = assign(8, 3, &SlotAssignment::new());
        assert_eq!(loads(&a, 3), vec![3, 3, 2]);
        assert_eq!(a.len(), 8);
        // Deterministic.
        assert_eq!(a, assign(8, 3, &SlotAssignment::new()));
    }

    #[test]
    fn nothing_to_assign() {
        assert!(assign(0, 3, &SlotAssignment::new()).is_empty());
        assert!(assign(4, 0, &SlotAssignment::new()).is_empty());
        assert!(assign(-1, -1, &SlotAssignment::new()).is_empty());
    }

    #[test]
    fn unchanged_inputs_move_nothing() {
        let a = assign(12, 4, &SlotAssignment::new());
        assert_eq!(assign(12, 4, &a), a);
    }

    #[test]
    fn scale_up_moves_only_what_the_new_slot_needs() {
        let a = assign(12, 3, &SlotAssignment::new()); // 4 each
        let b = assign(12, 4, &a); // 3 each
        assert_eq!(loads(&b, 4), vec![3, 3, 3, 3]);
        assert_eq!(moves(&a, &b), 3);
        // Each old slot kept its three lowest partitions.
        for (p, s) in &b {
            if *s < 3 {
                assert_eq!(a[p], *s);
            }
        }
    }

    #[test]
    fn scale_down_moves_only_the_removed_slots_partitions() {
        let a = assign(12, 4, &SlotAssignment::new());
        let b = assign(12, 3, &a);
        assert_eq!(loads(&b, 3), vec![4, 4, 4]);
        let on_removed = a.values().filter(|s| **s == 3).count();
        assert_eq!(moves(&a, &b), on_removed);
    }

    #[test]
    fn overloaded_slots_give_up_their_highest_partitions() {
        // Everything on slot 0 (say, it was the only slot).
        let prev: SlotAssignment = (0..6).map(|p| (p, 0)).collect();
        let b = assign(6, 2, &prev);
        assert_eq!(b, [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1)].into());
    }

    #[test]
    fn garbage_in_previous_is_ignored() {
        let prev: SlotAssignment = [(-1, 0), (0, 7), (1, -2), (99, 0), (2, 1)].into();
        let b = assign(4, 2, &prev);
        assert_eq!(b.len(), 4);
        assert_eq!(b[&2], 1);
        assert_eq!(loads(&b, 2), vec![2, 2]);
    }

    #[test]
    fn status_round_trip() {
        let a = assign(5, 2, &SlotAssignment::new());
        assert_eq!(from_status(&to_status(&a)), a);
        let junk: BTreeMap<String, i32> = [("x".to_string(), 1), ("3".to_string(), 0)].into();
        assert_eq!(from_status(&junk), [(3, 0)].into());
    }

    proptest! {
        #[test]
        fn assignment_is_complete_balanced_sticky_and_minimal(
            partitions in 1i32..64,
            slots in 1i32..24,
            previous in proptest::collection::btree_map(-2i32..70, -2i32..30, 0..80),
        ) {
            let a = assign(partitions, slots, &previous);
            // Every partition exactly once, on a slot that exists.
            prop_assert_eq!(a.keys().copied().collect::<Vec<_>>(), (0..partitions).collect::<Vec<_>>());
            prop_assert!(a.values().all(|s| (0..slots).contains(s)));
            // Balanced: nobody above ceil(P/S), nobody below floor(P/S).
            let l = loads(&a, slots);
            let (base, ceil) = ((partitions / slots) as usize, ((partitions + slots - 1) / slots) as usize);
            prop_assert!(l.iter().all(|&n| n >= base && n <= ceil), "{:?}", l);
            // Minimal moves: keeps as many previous placements as any balanced assignment could.
            let kept = a.iter().filter(|(p, s)| previous.get(p) == Some(s)).count();
            prop_assert_eq!(kept, max_keepable(partitions, slots, &previous));
            // Deterministic and stable.
            prop_assert_eq!(&assign(partitions, slots, &previous), &a);
            prop_assert_eq!(&assign(partitions, slots, &a), &a);
        }

        #[test]
        fn replica_changes_move_only_what_they_must(
            partitions in 1i32..64,
            from in 1i32..24,
            to in 1i32..24,
        ) {
            let a = assign(partitions, from, &SlotAssignment::new());
            let b = assign(partitions, to, &a);
            let moved = moves(&a, &b);
            prop_assert_eq!(moved, partitions as usize - max_keepable(partitions, to, &a));
            if to < from {
                // Only partitions of removed slots, and partitions no remaining slot can keep, move.
                let on_removed = a.values().filter(|s| **s >= to).count();
                prop_assert!(moved >= on_removed);
            }
        }
    }
}
