//! Match history: two users matched once are not matched again until their
//! cooldown deadline (event time). Keyed by the user pair, with a TTL: an
//! entry whose deadline the watermark has reached is dropped.
//!
//! Users are the partition's integer ids ([`UserTable`]): recording a
//! window's matches and finding its blocked pairs hash no names. The book
//! holds a user's id while the user has a partner in cooldown.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::hash::{FastMap, FastSet};
use super::users::{UserId, UserTable};

/// A user pair by name in canonical order (`.0 <= .1`), so either side
/// finds it: the changelog's form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserPair(pub Arc<str>, pub Arc<str>);

impl UserPair {
    pub fn new(a: &str, b: &str) -> Self {
        let (lo, hi) = canonical(a, b);
        UserPair(Arc::from(lo), Arc::from(hi))
    }
}

/// The two names of a pair in the pair's order.
pub fn canonical<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// The cooldown deadlines, indexed two ways: by user, with each partner's
/// deadline (the truth; finds a window's blocked pairs in O(window +
/// history of its users) rather than O(window²)), and by deadline (to
/// expire in O(expired)).
///
/// The deadline index holds the pairs of each deadline in a list: a
/// window's matches all share one deadline. A pair whose deadline moved
/// stays in its old list until that one expires and is skipped then (its
/// deadline in `partners` differs). The lists are also the changelog's
/// unit: one record per deadline, not per pair.
#[derive(Debug, Clone, Default)]
pub struct CooldownBook {
    /// By user id: the user's partners and their deadlines (a handful: a
    /// list scanned beats a map per user).
    partners: Vec<Vec<(UserId, i64)>>,
    deadlines: BTreeMap<i64, Vec<(UserId, UserId)>>,
    /// Pairs in `partners` (each once).
    pairs: usize,
}

impl CooldownBook {
    pub fn len(&self) -> usize {
        self.pairs
    }

    pub fn is_empty(&self) -> bool {
        self.pairs == 0
    }

    /// The deadline of users `a` and `b`, if they are in cooldown.
    pub fn until(&self, a: UserId, b: UserId) -> Option<i64> {
        self.partners_of(a)
            .iter()
            .find(|&&(p, _)| p == b)
            .map(|&(_, until)| until)
    }

    fn partners_of(&self, user: UserId) -> &[(UserId, i64)] {
        self.partners.get(user as usize).map_or(&[], Vec::as_slice)
    }

    /// Sets the deadline of users `a` and `b` (distinct ids held in
    /// `users`), or moves it later: a pair is in cooldown until its latest
    /// deadline, whatever order matches (or a restore) bring them in. True
    /// when the pair is now listed under `until` (that deadline's list
    /// changed).
    pub fn insert(&mut self, users: &mut UserTable, a: UserId, b: UserId, until: i64) -> bool {
        if a == b {
            return false;
        }
        match self.until(a, b) {
            Some(old) if old >= until => return false,
            Some(_) => {
                for (x, y) in [(a, b), (b, a)] {
                    if let Some(e) = self.partners[x as usize].iter_mut().find(|e| e.0 == y) {
                        e.1 = until;
                    }
                }
            }
            None => {
                let top = a.max(b) as usize;
                if self.partners.len() <= top {
                    self.partners.resize_with(top + 1, Vec::new);
                }
                for (x, y) in [(a, b), (b, a)] {
                    let list = &mut self.partners[x as usize];
                    if list.is_empty() {
                        users.hold_id(x);
                    }
                    list.push((y, until));
                }
                self.pairs += 1;
            }
        }
        self.deadlines
            .entry(until)
            .or_default()
            .push((a.min(b), a.max(b)));
        true
    }

    /// [`Self::insert`] by name (a restore's and the tests' form).
    pub fn insert_names(&mut self, users: &mut UserTable, a: &str, b: &str, until: i64) -> bool {
        let (a, b) = (users.hold(a), users.hold(b));
        let listed = self.insert(users, a, b, until);
        users.release(a);
        users.release(b);
        listed
    }

    /// Drops every pair whose deadline is at or before `watermark`,
    /// returning the deadlines whose lists went.
    pub fn expire(&mut self, users: &mut UserTable, watermark: i64) -> Vec<i64> {
        let mut gone = Vec::new();
        while let Some(entry) = self.deadlines.first_entry() {
            if *entry.key() > watermark {
                break;
            }
            let (until, listed) = entry.remove_entry();
            for (a, b) in listed {
                if self.until(a, b) != Some(until) {
                    continue; // its deadline moved since it was listed here
                }
                for (x, y) in [(a, b), (b, a)] {
                    let list = &mut self.partners[x as usize];
                    if let Some(at) = list.iter().position(|e| e.0 == y) {
                        list.swap_remove(at);
                    }
                    if list.is_empty() {
                        *list = Vec::new();
                        users.release(x);
                    }
                }
                self.pairs -= 1;
            }
            gone.push(until);
        }
        gone
    }

    /// The pairs whose deadline is `until`, each once.
    pub fn listed(&self, until: i64) -> impl Iterator<Item = (UserId, UserId)> + '_ {
        self.deadlines
            .get(&until)
            .into_iter()
            .flatten()
            .copied()
            .filter(move |&(a, b)| self.until(a, b) == Some(until))
    }

    /// Index pairs `(i, j)`, `i < j`, of `users` (a window's, by index)
    /// still in cooldown for a window starting at `start` (deadline after
    /// the start).
    pub fn blocked(&self, users: &[UserId], start: i64) -> FastSet<(u32, u32)> {
        let mut blocked = FastSet::default();
        // Only users with partners can be in a blocked pair (both sides):
        // each one's first index, and a chain through its other indices.
        let mut first: FastMap<UserId, u32> = FastMap::default();
        let mut next: Vec<u32> = Vec::new();
        for (i, &u) in users.iter().enumerate().rev() {
            if self.partners_of(u).is_empty() {
                continue;
            }
            if next.is_empty() {
                next = vec![u32::MAX; users.len()];
            }
            if let Some(later) = first.insert(u, i as u32) {
                next[i] = later;
            }
        }
        for (i, &u) in users.iter().enumerate() {
            for &(p, until) in self.partners_of(u) {
                if until <= start {
                    continue;
                }
                let mut j = first.get(&p).copied().unwrap_or(u32::MAX);
                while j != u32::MAX {
                    let i = i as u32;
                    blocked.insert((i.min(j), i.max(j)));
                    j = next[j as usize];
                }
            }
        }
        blocked
    }

    /// Every pair with its deadline, each once, by deadline.
    pub fn iter(&self) -> impl Iterator<Item = (UserId, UserId, i64)> + '_ {
        self.deadlines
            .iter()
            .flat_map(|(&t, listed)| listed.iter().map(move |&(a, b)| (a, b, t)))
            .filter(|&(a, b, t)| self.until(a, b) == Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A book and its users, by name.
    #[derive(Default)]
    struct Names {
        book: CooldownBook,
        users: UserTable,
    }

    impl Names {
        fn insert(&mut self, a: &str, b: &str, until: i64) -> bool {
            self.book.insert_names(&mut self.users, a, b, until)
        }

        fn until(&self, a: &str, b: &str) -> Option<i64> {
            self.book.until(self.users.get(a)?, self.users.get(b)?)
        }

        fn expire(&mut self, watermark: i64) -> Vec<i64> {
            self.book.expire(&mut self.users, watermark)
        }

        fn blocked(&mut self, names: &[&str], start: i64) -> FastSet<(u32, u32)> {
            let ids: Vec<UserId> = names.iter().map(|n| self.users.hold(n)).collect();
            let blocked = self.book.blocked(&ids, start);
            for id in ids {
                self.users.release(id);
            }
            blocked
        }

        fn listed(&self, until: i64) -> Vec<UserPair> {
            let name = |id| self.users.name(id);
            self.book
                .listed(until)
                .map(|(a, b)| UserPair::new(name(a), name(b)))
                .collect()
        }
    }

    #[test]
    fn pairs_are_canonical() {
        assert_eq!(UserPair::new("b", "a"), UserPair::new("a", "b"));
        let mut n = Names::default();
        n.insert("bob", "ann", 5000);
        assert_eq!(n.until("ann", "bob"), Some(5000));
        assert_eq!(n.until("bob", "ann"), Some(5000));
        assert!(
            !n.insert("ann", "ann", 5000),
            "nobody is in cooldown with themselves"
        );
        assert_eq!(n.book.len(), 1);
    }

    #[test]
    fn blocked_pairs_follow_the_deadline() {
        let mut n = Names::default();
        n.insert("ann", "bob", 5000);
        n.insert("cat", "ann", 3000);
        let users = ["bob", "cat", "ann", "dan"];
        assert_eq!(
            n.blocked(&users, 2000),
            FastSet::from_iter([(0, 2), (1, 2)])
        );
        assert_eq!(
            n.blocked(&users, 3000),
            FastSet::from_iter([(0, 2)]),
            "deadline 3000 is not after start 3000"
        );
        assert!(n.blocked(&["bob", "dan"], 0).is_empty());
        // A user twice: every index of both users is blocked.
        let users = ["bob", "ann", "dan", "bob", "ann"];
        assert_eq!(
            n.blocked(&users, 0),
            FastSet::from_iter([(0, 1), (0, 4), (1, 3), (3, 4)])
        );
    }

    #[test]
    fn expiry_drops_due_entries_and_lets_go_of_their_users() {
        let mut n = Names::default();
        n.insert("a", "b", 5000);
        n.insert("a", "c", 3000);
        n.insert("a", "c", 7000);
        assert_eq!(n.users.len(), 3, "held by the book");
        assert_eq!(
            n.expire(4999),
            vec![3000],
            "a-c moved on: only its old list goes"
        );
        assert_eq!(n.book.len(), 2);
        assert_eq!(n.expire(5000), vec![5000]);
        assert_eq!(n.book.len(), 1);
        assert_eq!(n.users.get("b"), None, "b has no partner left");
        assert!(n.blocked(&["a", "b"], 0).is_empty());
        assert_eq!(n.expire(i64::MAX), vec![7000]);
        assert!(n.book.is_empty() && n.users.is_empty());
        assert!(n.book.partners.iter().all(Vec::is_empty));
    }

    #[test]
    fn a_deadline_only_moves_later() {
        let mut n = Names::default();
        let ab = UserPair::new("ann", "bob");
        assert!(n.insert("bob", "ann", 5000), "listed under 5000");
        assert!(!n.insert("ann", "bob", 5000), "already listed there");
        assert!(
            !n.insert("ann", "bob", 4000),
            "an earlier deadline changes nothing"
        );
        assert_eq!(n.until("ann", "bob"), Some(5000));
        assert!(n.insert("ann", "bob", 9000));
        assert_eq!(n.book.len(), 1, "moving a deadline keeps one entry");
        assert_eq!(n.listed(5000), vec![], "moved out of its old list");
        assert_eq!(n.listed(9000), vec![ab]);
        assert_eq!(
            n.book.iter().map(|(.., t)| t).collect::<Vec<_>>(),
            vec![9000]
        );
        assert_eq!(n.expire(5000), vec![5000]);
        assert_eq!(
            n.until("bob", "ann"),
            Some(9000),
            "its old deadline passed: it stays"
        );
        assert_eq!(n.expire(9000), vec![9000]);
        assert!(n.book.is_empty() && n.book.deadlines.is_empty());
    }

    #[test]
    fn a_user_s_id_is_held_by_the_book_and_by_others_independently() {
        let mut n = Names::default();
        let ann = n.users.hold("ann"); // a pending request of ann's
        n.insert("ann", "bob", 5000);
        n.insert("cat", "ann", 6000);
        assert_eq!(n.users.get("ann"), Some(ann));
        n.expire(i64::MAX);
        assert_eq!(n.users.get("ann"), Some(ann), "still held by the request");
        assert_eq!((n.users.get("bob"), n.users.get("cat")), (None, None));
        n.users.release(ann);
        assert!(n.users.is_empty());
    }
}
