//! Match history: two users matched once are not matched again until their
//! cooldown deadline (event time). Keyed by the user pair, with a TTL: an
//! entry whose deadline the watermark has reached is dropped.
//!
//! A user's name is stored once (`Arc<str>`) however many pairs it is in:
//! a match then costs reference counts, not string copies, and a day of
//! history holds each name once rather than once per index entry.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::hash::{FastMap, FastSet};

/// A user pair in canonical order (`.0 <= .1`), so either side finds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserPair(pub Arc<str>, pub Arc<str>);

impl UserPair {
    pub fn new(a: &str, b: &str) -> Self {
        let (lo, hi) = canonical(a, b);
        UserPair(Arc::from(lo), Arc::from(hi))
    }
}

/// The two names of a pair in the pair's order.
fn canonical<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
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
/// window's matches all share one deadline, and a set ordered by (deadline,
/// pair) compared user names ~18 times per match. A pair whose deadline
/// moved stays in its old list until that one expires and is skipped then
/// (its deadline in `partners` differs). The lists are also the changelog's
/// unit: one record per deadline, not per pair.
#[derive(Debug, Clone, Default)]
pub struct CooldownBook {
    partners: FastMap<Arc<str>, FastMap<Arc<str>, i64>>,
    deadlines: BTreeMap<i64, Vec<UserPair>>,
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

    pub fn until(&self, pair: &UserPair) -> Option<i64> {
        self.until_users(&pair.0, &pair.1)
    }

    /// Sets the pair's deadline, or moves it later (see [`Self::insert_users`]).
    pub fn insert(&mut self, pair: UserPair, until: i64) -> bool {
        self.insert_users(&pair.0, &pair.1, until)
    }

    /// Sets the deadline of users `a` and `b`, or moves it later: a pair
    /// is in cooldown until its latest deadline, whatever order matches (or
    /// a restore) bring them in. True when the pair is now listed under
    /// `until` (that deadline's list changed).
    pub fn insert_users(&mut self, a: &str, b: &str, until: i64) -> bool {
        let (lo, hi) = canonical(a, b);
        if let Some(old) = self.until_users(lo, hi) {
            if old >= until {
                return false;
            }
        } else {
            self.pairs += 1;
        }
        let pair = UserPair(self.intern(lo), self.intern(hi));
        self.partners
            .entry(pair.0.clone())
            .or_default()
            .insert(pair.1.clone(), until);
        self.partners
            .entry(pair.1.clone())
            .or_default()
            .insert(pair.0.clone(), until);
        self.deadlines.entry(until).or_default().push(pair);
        true
    }

    fn until_users(&self, lo: &str, hi: &str) -> Option<i64> {
        self.partners.get(lo)?.get(hi).copied()
    }

    /// The book's copy of a user's name, or a new one.
    fn intern(&self, user: &str) -> Arc<str> {
        match self.partners.get_key_value(user) {
            Some((name, _)) => name.clone(),
            None => Arc::from(user),
        }
    }

    /// Drops every pair whose deadline is at or before `watermark`,
    /// returning the deadlines whose lists went.
    pub fn expire(&mut self, watermark: i64) -> Vec<i64> {
        let mut gone = Vec::new();
        while let Some(entry) = self.deadlines.first_entry() {
            if *entry.key() > watermark {
                break;
            }
            let (until, listed) = entry.remove_entry();
            for pair in listed {
                if self.until(&pair) != Some(until) {
                    continue; // its deadline moved since it was listed here
                }
                for (a, b) in [(&pair.0, &pair.1), (&pair.1, &pair.0)] {
                    if let Some(partners) = self.partners.get_mut(&**a) {
                        partners.remove(&**b);
                        if partners.is_empty() {
                            self.partners.remove(&**a);
                        }
                    }
                }
                self.pairs -= 1;
            }
            gone.push(until);
        }
        gone
    }

    /// The pairs whose deadline is `until`, each once.
    pub fn listed(&self, until: i64) -> impl Iterator<Item = &UserPair> {
        self.deadlines
            .get(&until)
            .into_iter()
            .flatten()
            .filter(move |p| self.until(p) == Some(until))
    }

    /// Index pairs `(i, j)`, `i < j`, of `users` still in cooldown for a
    /// window starting at `start` (deadline after the start).
    pub fn blocked(&self, users: &[&str], start: i64) -> FastSet<(u32, u32)> {
        let mut blocked = FastSet::default();
        if self.partners.is_empty() {
            return blocked;
        }
        // Each user's first index, and a chain through its other indices
        // (users are mostly distinct in a window: no list per user).
        let mut first: FastMap<&str, u32> = FastMap::default();
        first.reserve(users.len());
        let mut next = vec![u32::MAX; users.len()];
        for (i, u) in users.iter().enumerate().rev() {
            if let Some(later) = first.insert(u, i as u32) {
                next[i] = later;
            }
        }
        for (i, u) in users.iter().enumerate() {
            let Some(partners) = self.partners.get(*u) else {
                continue;
            };
            for (p, &until) in partners {
                if until <= start {
                    continue;
                }
                let mut j = first.get(&**p).copied().unwrap_or(u32::MAX);
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
    pub fn iter(&self) -> impl Iterator<Item = (&UserPair, i64)> {
        self.deadlines
            .iter()
            .flat_map(|(&t, listed)| listed.iter().map(move |p| (p, t)))
            .filter(|&(p, t)| self.until(p) == Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_canonical() {
        assert_eq!(UserPair::new("b", "a"), UserPair::new("a", "b"));
    }

    #[test]
    fn blocked_pairs_follow_the_deadline() {
        let mut book = CooldownBook::default();
        book.insert(UserPair::new("ann", "bob"), 5000);
        book.insert(UserPair::new("cat", "ann"), 3000);
        let users = ["bob", "cat", "ann", "dan"];
        let blocked = book.blocked(&users, 2000);
        assert_eq!(blocked, FastSet::from_iter([(0, 2), (1, 2)]));
        let blocked = book.blocked(&users, 3000);
        assert_eq!(
            blocked,
            FastSet::from_iter([(0, 2)]),
            "deadline 3000 is not after start 3000"
        );
        assert!(book.blocked(&["bob", "dan"], 0).is_empty());
        // A user twice: every index of both users is blocked.
        let users = ["bob", "ann", "dan", "bob", "ann"];
        assert_eq!(
            book.blocked(&users, 0),
            FastSet::from_iter([(0, 1), (0, 4), (1, 3), (3, 4)])
        );
    }

    #[test]
    fn expiry_drops_due_entries_and_their_index() {
        let mut book = CooldownBook::default();
        book.insert(UserPair::new("a", "b"), 5000);
        book.insert(UserPair::new("a", "c"), 3000);
        book.insert(UserPair::new("a", "c"), 7000);
        assert_eq!(
            book.expire(4999),
            vec![3000],
            "a-c moved on: only its old list goes"
        );
        assert_eq!(book.len(), 2);
        assert_eq!(book.expire(5000), vec![5000]);
        assert_eq!(book.len(), 1);
        assert!(book.blocked(&["a", "b"], 0).is_empty());
        assert_eq!(book.expire(i64::MAX), vec![7000]);
        assert!(book.is_empty());
        assert!(book.partners.is_empty());
    }

    #[test]
    fn a_deadline_only_moves_later() {
        let mut book = CooldownBook::default();
        let ab = UserPair::new("ann", "bob");
        assert!(book.insert_users("bob", "ann", 5000), "listed under 5000");
        assert!(
            !book.insert_users("ann", "bob", 5000),
            "already listed there"
        );
        assert!(
            !book.insert_users("ann", "bob", 4000),
            "an earlier deadline changes nothing"
        );
        assert_eq!(book.until(&ab), Some(5000));
        assert!(book.insert_users("ann", "bob", 9000));
        assert_eq!(book.len(), 1, "moving a deadline keeps one entry");
        assert_eq!(book.listed(5000).count(), 0, "moved out of its old list");
        assert_eq!(book.listed(9000).collect::<Vec<_>>(), vec![&ab]);
        assert_eq!(book.iter().map(|(_, t)| t).collect::<Vec<_>>(), vec![9000]);
        assert_eq!(book.expire(5000), vec![5000]);
        assert_eq!(
            book.until(&ab),
            Some(9000),
            "its old deadline passed: it stays"
        );
        assert_eq!(book.expire(9000), vec![9000]);
        assert!(book.is_empty() && book.deadlines.is_empty());
    }

    #[test]
    fn a_user_name_is_stored_once() {
        let mut book = CooldownBook::default();
        book.insert_users("ann", "bob", 5000);
        book.insert_users("cat", "ann", 6000);
        let pairs: Vec<&UserPair> = book.iter().map(|(p, _)| p).collect();
        assert_eq!(
            pairs,
            vec![&UserPair::new("ann", "bob"), &UserPair::new("ann", "cat")]
        );
        assert!(
            Arc::ptr_eq(&pairs[0].0, &pairs[1].0),
            "both pairs share ann's name"
        );
        assert_eq!(book.until(&UserPair::new("cat", "bob")), None);
    }
}
