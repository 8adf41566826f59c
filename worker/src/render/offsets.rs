//! In-order commits over out-of-order completions: tasks of a partition
//! finish in any order, but the committed offset only moves past an offset
//! once every offset before it is finished (done, failed for good, or dead
//! lettered). So a crash re-reads what was not finished, and nothing is lost.

use std::collections::BTreeSet;

#[derive(Debug, Default)]
pub struct OffsetTracker {
    started: BTreeSet<i64>,
    finished: BTreeSet<i64>,
    /// The next offset to commit: every offset below it is finished.
    commit_point: Option<i64>,
    /// The last commit point known to be committed.
    committed: Option<i64>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A message was read and its task started.
    pub fn start(&mut self, offset: i64) {
        self.started.insert(offset);
    }

    /// Its task finished; advances the commit point over the finished prefix.
    pub fn finish(&mut self, offset: i64) {
        if !self.started.contains(&offset) {
            return;
        }
        self.finished.insert(offset);
        while let Some(&first) = self.started.first() {
            if !self.finished.remove(&first) {
                break;
            }
            self.started.remove(&first);
            self.commit_point = Some(first + 1);
        }
    }

    /// Tasks started and not finished.
    pub fn in_flight(&self) -> usize {
        self.started.len()
    }

    /// The offset to commit, if it moved past the last confirmed commit.
    pub fn pending(&self) -> Option<i64> {
        (self.commit_point > self.committed).then_some(self.commit_point?)
    }

    /// A commit of `next` succeeded.
    pub fn confirm(&mut self, next: i64) {
        self.committed = self.committed.max(Some(next));
    }

    /// The offset to commit, if it moved since the last call, confirmed at once.
    #[cfg(test)]
    fn take_commit(&mut self) -> Option<i64> {
        let next = self.pending()?;
        self.confirm(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commits_only_past_a_finished_prefix() {
        let mut t = OffsetTracker::new();
        for o in 10..14 {
            t.start(o);
        }
        t.finish(12);
        assert_eq!(t.take_commit(), None, "10 and 11 are still running");
        t.finish(10);
        assert_eq!(t.take_commit(), Some(11));
        assert_eq!(t.take_commit(), None, "nothing new");
        t.finish(11);
        assert_eq!(t.take_commit(), Some(13), "11 and 12 are done now");
        assert_eq!(t.in_flight(), 1);
    }

    proptest! {
        #[test]
        fn the_commit_point_never_passes_an_unfinished_offset(
            order in Just((0..40i64).collect::<Vec<_>>()).prop_shuffle(),
            stop in 0usize..40,
        ) {
            let mut t = OffsetTracker::new();
            for o in 0..40 { t.start(o); }
            let mut last = None;
            for &o in &order[..stop] {
                t.finish(o);
                if let Some(c) = t.take_commit() { last = Some(c); }
            }
            let finished: std::collections::BTreeSet<i64> = order[..stop].iter().copied().collect();
            if let Some(c) = last {
                prop_assert!((0..c).all(|o| finished.contains(&o)));
            }
            let expect = (0..40).find(|o| !finished.contains(o)).unwrap_or(40);
            prop_assert_eq!(last.unwrap_or(0), expect);
        }
    }
}
