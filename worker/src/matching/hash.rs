//! The engine's hash maps and sets: foldhash instead of the standard SipHash.
//! Request ids, user names and pairs are hashed several times per request;
//! SipHash cost ~5% of a loaded worker's core. foldhash keeps a random
//! per-process seed, so keys chosen by a client still cannot be aimed at one
//! bucket ahead of time.

pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
