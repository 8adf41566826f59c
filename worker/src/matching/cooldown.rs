//! Match history: two users matched once are not matched again until their
//! cooldown deadline (event time). Keyed by the user pair, with a TTL: an
//! entry whose deadline the watermark has reached is dropped.

use std::collections::BTreeSet;

use super::hash::{FastMap, FastSet};

/// A user pair in canonical order (`.0 <= .1`), so either side finds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserPair(pub String, pub String);

impl UserPair {
    pub fn new(a: &str, b: &str) -> Self {
        if a <= b {
            UserPair(a.to_string(), b.to_string())
        } else {
            UserPair(b.to_string(), a.to_string())
        }
    }
}

/// The cooldown deadlines, indexed three ways: by pair (the truth), by user
/// (to find a window's blocked pairs in O(window + history of its users)
/// rather than O(window²)) and by deadline (to expire in O(expired)).
#[derive(Debug, Clone, Default)]
pub struct CooldownBook {
    until: FastMap<UserPair, i64>,
    partners: FastMap<String, FastSet<String>>,
    deadlines: BTreeSet<(i64, UserPair)>,
}

impl CooldownBook {
    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }

    pub fn until(&self, pair: &UserPair) -> Option<i64> {
        self.until.get(pair).copied()
    }

    /// Sets (or moves) the pair's deadline.
    pub fn insert(&mut self, pair: UserPair, until: i64) {
        if let Some(old) = self.until.insert(pair.clone(), until) {
            self.deadlines.remove(&(old, pair.clone()));
        }
        self.partners
            .entry(pair.0.clone())
            .or_default()
            .insert(pair.1.clone());
        self.partners
            .entry(pair.1.clone())
            .or_default()
            .insert(pair.0.clone());
        self.deadlines.insert((until, pair));
    }

    /// Drops every pair whose deadline is at or before `watermark`, returning them.
    pub fn expire(&mut self, watermark: i64) -> Vec<UserPair> {
        let mut gone = Vec::new();
        while let Some((until, _)) = self.deadlines.first() {
            if *until > watermark {
                break;
            }
            let Some((_, pair)) = self.deadlines.pop_first() else {
                break;
            };
            self.until.remove(&pair);
            for (a, b) in [(&pair.0, &pair.1), (&pair.1, &pair.0)] {
                if let Some(set) = self.partners.get_mut(a) {
                    set.remove(b);
                    if set.is_empty() {
                        self.partners.remove(a);
                    }
                }
            }
            gone.push(pair);
        }
        gone
    }

    /// Index pairs `(i, j)`, `i < j`, of `users` still in cooldown for a
    /// window starting at `start` (deadline after the start).
    pub fn blocked(&self, users: &[&str], start: i64) -> FastSet<(u32, u32)> {
        let mut blocked = FastSet::default();
        if self.until.is_empty() {
            return blocked;
        }
        let mut index: FastMap<&str, Vec<u32>> = FastMap::default();
        for (i, u) in users.iter().enumerate() {
            index.entry(u).or_default().push(i as u32);
        }
        for (i, u) in users.iter().enumerate() {
            let Some(partners) = self.partners.get(*u) else {
                continue;
            };
            for p in partners {
                let Some(js) = index.get(p.as_str()) else {
                    continue;
                };
                if self.until(&UserPair::new(u, p)).is_some_and(|t| t > start) {
                    for &j in js {
                        let i = i as u32;
                        blocked.insert((i.min(j), i.max(j)));
                    }
                }
            }
        }
        blocked
    }

    pub fn iter(&self) -> impl Iterator<Item = (&UserPair, i64)> {
        self.until.iter().map(|(p, &t)| (p, t))
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
    }

    #[test]
    fn expiry_drops_due_entries_and_their_index() {
        let mut book = CooldownBook::default();
        book.insert(UserPair::new("a", "b"), 5000);
        book.insert(UserPair::new("a", "c"), 3000);
        book.insert(UserPair::new("a", "c"), 7000);
        assert_eq!(book.expire(4999), vec![]);
        assert_eq!(book.expire(5000), vec![UserPair::new("a", "b")]);
        assert_eq!(book.len(), 1);
        assert!(book.blocked(&["a", "b"], 0).is_empty());
        assert_eq!(book.expire(i64::MAX), vec![UserPair::new("a", "c")]);
        assert!(book.is_empty());
        assert!(book.partners.is_empty());
    }
}
