//! The requests waiting in windows, by slot. A window lists its members'
//! slots, so a close reaches each of them directly (it visits every member
//! three or four times: who takes part, the filter, settling, carrying
//! over) instead of hashing its id and missing the cache each time; the id
//! index is only for refusing a duplicate and for settling.

use matchfleet_api::matching::MatchRequest;

use super::hash::FastMap;
use super::users::UserId;

/// A request's place in [`PendingRequests`].
pub(crate) type Slot = u32;

/// A request waiting in a window.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) request: MatchRequest,
    /// Its user's id, held while it is pending.
    pub(crate) user: UserId,
    /// Its offset in the request partition: where a restore re-reads it, and
    /// the ingest order (the tie-breaker everywhere).
    pub(crate) offset: i64,
    pub(crate) window: i64,
    pub(crate) windows: u32,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct PendingRequests {
    /// By slot; `None` for a slot free for reuse.
    slots: Vec<Option<Pending>>,
    free: Vec<Slot>,
    /// Slot by request id; also the ids of settled requests not yet
    /// forgotten ([`Self::settle`]).
    by_id: FastMap<String, Slot>,
    /// Requests in `slots`.
    live: usize,
}

impl PendingRequests {
    /// Whether a request with this id is pending.
    pub(crate) fn contains_id(&self, request_id: &str) -> bool {
        self.by_id.contains_key(request_id)
    }

    /// Adds a request whose id is not pending (see [`Self::contains_id`]).
    pub(crate) fn insert(&mut self, p: Pending) -> Slot {
        let id = p.request.request_id.clone();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(p);
                slot
            }
            None => {
                self.slots.push(Some(p));
                (self.slots.len() - 1) as Slot
            }
        };
        self.by_id.insert(id, slot);
        self.live += 1;
        slot
    }

    pub(crate) fn get(&self, slot: Slot) -> Option<&Pending> {
        self.slots.get(slot as usize)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, slot: Slot) -> Option<&mut Pending> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    pub(crate) fn remove(&mut self, slot: Slot) -> Option<Pending> {
        let p = self.settle(slot)?;
        self.forget(&p.request.request_id);
        Some(p)
    }

    /// Takes a request out, its id still known (a request with that id is
    /// still refused) until [`Self::forget`]: a close settles a thousand
    /// requests, and unindexing their ids (a hash and a cache miss each)
    /// can wait until its results are on their way.
    pub(crate) fn settle(&mut self, slot: Slot) -> Option<Pending> {
        let p = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        self.live -= 1;
        Some(p)
    }

    /// Forgets a settled request's id.
    pub(crate) fn forget(&mut self, request_id: &str) {
        self.by_id.remove(request_id);
    }

    /// Requests pending.
    pub(crate) fn len(&self) -> usize {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matching::pairing::tests::request;

    fn pending(id: &str) -> Pending {
        Pending {
            request: request(id, "ann", "f", 30, &[], 18, 99),
            user: 0,
            offset: 0,
            window: 0,
            windows: 0,
        }
    }

    #[test]
    fn a_slot_finds_its_request_until_removed_and_is_reused_after() {
        let mut p = PendingRequests::default();
        let a = p.insert(pending("a"));
        let b = p.insert(pending("b"));
        assert_ne!(a, b);
        assert!(p.contains_id("a") && p.contains_id("b"));
        assert_eq!(p.get(a).map(|x| x.request.request_id.as_str()), Some("a"));
        p.get_mut(b).unwrap().windows = 3;
        assert_eq!(p.get(b).map(|x| x.windows), Some(3));
        assert_eq!(p.remove(a).map(|x| x.request.request_id), Some("a".into()));
        assert!(p.get(a).is_none() && p.remove(a).is_none());
        assert!(!p.contains_id("a"));
        assert_eq!(p.len(), 1);
        let c = p.insert(pending("c"));
        assert_eq!(c, a, "the free slot is reused");
        assert!(p.get(99).is_none() && p.remove(99).is_none());

        let settled = p.settle(b).unwrap();
        assert!(p.get(b).is_none() && p.settle(b).is_none());
        assert_eq!(p.len(), 1, "c");
        assert!(p.contains_id("b"), "known until forgotten");
        let d = p.insert(pending("d"));
        assert_eq!(d, b, "its slot is free at once");
        p.forget(&settled.request.request_id);
        assert!(!p.contains_id("b") && p.contains_id("d"));
        assert_eq!(p.get(d).map(|x| x.request.request_id.as_str()), Some("d"));
    }
}
