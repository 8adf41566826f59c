//! A partition's user names as small integers. A name is hashed once, when
//! a request of its user is ingested (or its cooldowns restored); a window's
//! close then finds who is who (one request per user, distinct users, the
//! cooldown pairs) with integer ids and no string hashing.
//!
//! An id is held while something refers to it (a pending request, a user's
//! cooldown list) and recycled when the last hold goes, so the table is the
//! size of the partition's live users, not of every user ever seen.

use std::sync::Arc;

use super::hash::FastMap;

/// A user's id within one partition's [`UserTable`].
pub type UserId = u32;

#[derive(Debug, Clone, Default)]
pub struct UserTable {
    ids: FastMap<Arc<str>, UserId>,
    /// By id; `None` for an id free for reuse.
    entries: Vec<Option<Entry>>,
    free: Vec<UserId>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: Arc<str>,
    holds: u32,
}

impl UserTable {
    /// The id of `name` (a new one if unknown), held once more.
    pub fn hold(&mut self, name: &str) -> UserId {
        if let Some(&id) = self.ids.get(name) {
            self.hold_id(id);
            return id;
        }
        let entry = Some(Entry {
            name: Arc::from(name),
            holds: 1,
        });
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = entry;
                id
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as UserId
            }
        };
        if let Some(e) = &self.entries[id as usize] {
            self.ids.insert(e.name.clone(), id);
        }
        id
    }

    /// Holds a known id once more (a no-op for an unknown one).
    pub fn hold_id(&mut self, id: UserId) {
        if let Some(Some(e)) = self.entries.get_mut(id as usize) {
            e.holds += 1;
        }
    }

    /// Lets go of one hold; the id is forgotten (and free for reuse) when it
    /// was the last.
    pub fn release(&mut self, id: UserId) {
        let Some(slot) = self.entries.get_mut(id as usize) else {
            return;
        };
        let Some(e) = slot else {
            return;
        };
        e.holds = e.holds.saturating_sub(1);
        if e.holds == 0 {
            self.ids.remove(&e.name);
            *slot = None;
            self.free.push(id);
        }
    }

    /// The name of a held id ("" for an unknown one).
    pub fn name(&self, id: UserId) -> &str {
        match self.entries.get(id as usize) {
            Some(Some(e)) => &e.name,
            _ => "",
        }
    }

    /// The id of `name`, if held.
    pub fn get(&self, name: &str) -> Option<UserId> {
        self.ids.get(name).copied()
    }

    /// Users held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// One past the largest id ever given (ids are below this).
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_keeps_its_id_while_held_and_its_id_is_reused_after() {
        let mut t = UserTable::default();
        let ann = t.hold("ann");
        let bob = t.hold("bob");
        assert_ne!(ann, bob);
        assert_eq!(t.hold("ann"), ann, "held twice");
        t.release(ann);
        assert_eq!(t.get("ann"), Some(ann), "one hold left");
        assert_eq!(t.name(ann), "ann");
        t.release(ann);
        assert_eq!(t.get("ann"), None, "the last hold went");
        assert_eq!((t.len(), t.name(ann)), (1, ""));
        let cat = t.hold("cat");
        assert_eq!(cat, ann, "the free id is reused");
        assert_eq!((t.name(cat), t.get("cat")), ("cat", Some(cat)));
        assert_eq!(t.capacity(), 2);
        t.hold_id(bob);
        t.release(bob);
        assert_eq!(t.name(bob), "bob", "held by hold_id");
        t.release(bob);
        t.release(bob);
        assert_eq!(t.len(), 1, "releasing a free id changes nothing");
    }
}
