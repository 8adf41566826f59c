//! The results feed: every worker tails the results topic (read_committed,
//! so only committed matches are ever seen) and serves its own connected
//! users - a nudge over their WebSocket, and their recent matches for
//! `GET /matches/{user}`. Any worker can therefore serve any user, whoever
//! owns the user's partition, and a match that was aborted (a fenced
//! owner's) never nudges anyone.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use matchfleet_api::matching::{MatchResult, Nudge};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::metrics::MatchMetrics;
use crate::matching::hash::FastMap;

/// Recent matches kept per user for the polling fallback.
const RECENT_PER_USER: usize = 8;
/// Users whose recent matches are kept; past this the oldest half is dropped.
const USERS_KEPT: usize = 200_000;

/// Every worker stores every match of the pipeline here (twice, once per
/// user): shared, not copied, and hashed with foldhash - this was ~6% of a
/// loaded worker's core with per-user copies and SipHash.
#[derive(Default)]
struct Recent {
    by_user: FastMap<String, VecDeque<Arc<MatchResult>>>,
    /// Users in the order they were first stored, for eviction.
    order: VecDeque<String>,
}

impl Recent {
    fn remember(&mut self, user: &str, result: &Arc<MatchResult>) {
        let list = match self.by_user.get_mut(user) {
            Some(list) => list,
            None => {
                if self.by_user.len() >= USERS_KEPT {
                    for old in self.order.drain(..USERS_KEPT / 2) {
                        self.by_user.remove(&old);
                    }
                }
                self.order.push_back(user.to_string());
                self.by_user.entry(user.to_string()).or_default()
            }
        };
        if list.len() == RECENT_PER_USER {
            list.pop_front();
        }
        list.push_back(result.clone());
    }
}

/// Connected users and recent matches, shared by the tailer and the HTTP handlers.
#[derive(Default)]
pub struct Feed {
    subscribers: Mutex<FastMap<String, Vec<mpsc::UnboundedSender<Nudge>>>>,
    recent: Mutex<Recent>,
}

impl Feed {
    /// A channel of nudges for `user`, until the receiver is dropped.
    pub fn subscribe(&self, user: &str) -> mpsc::UnboundedReceiver<Nudge> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.entry(user.to_string()).or_default().push(tx);
        }
        rx
    }

    /// Drops the user's channels whose receiver is gone (a closed
    /// WebSocket), so users who connect once and never match leak nothing.
    pub fn forget_closed(&self, user: &str) {
        if let Ok(mut subs) = self.subscribers.lock() {
            if let Some(channels) = subs.get_mut(user) {
                channels.retain(|tx| !tx.is_closed());
                if channels.is_empty() {
                    subs.remove(user);
                }
            }
        }
    }

    /// Users with at least one open nudge channel.
    #[cfg(test)]
    pub fn subscribed_users(&self) -> usize {
        self.subscribers.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// The user's recent matches, oldest first.
    pub fn recent(&self, user: &str) -> Vec<MatchResult> {
        self.recent
            .lock()
            .ok()
            .and_then(|r| {
                r.by_user
                    .get(user)
                    .map(|l| l.iter().map(|m| MatchResult::clone(m)).collect())
            })
            .unwrap_or_default()
    }

    /// Records a committed result and nudges its users; returns nudges sent.
    pub fn publish(&self, result: Arc<MatchResult>) -> u64 {
        let MatchResult::Matched {
            match_id, users, ..
        } = result.as_ref()
        else {
            return 0;
        };
        if let Ok(mut recent) = self.recent.lock() {
            for u in users {
                recent.remember(&u.user, &result);
            }
        }
        let Ok(mut subs) = self.subscribers.lock() else {
            return 0;
        };
        let mut sent = 0;
        for u in users {
            if let Some(channels) = subs.get_mut(&u.user) {
                let nudge = Nudge {
                    user: u.user.clone(),
                    match_id: match_id.clone(),
                };
                channels.retain(|tx| tx.send(nudge.clone()).is_ok());
                sent += channels.len() as u64;
                if channels.is_empty() {
                    subs.remove(&u.user);
                }
            }
        }
        sent
    }
}

/// Tails the results topic from its end until `stop`.
pub async fn tail(
    feed: Arc<Feed>,
    bootstrap: String,
    topic: String,
    partitions: i32,
    metrics: Arc<MatchMetrics>,
    stop: CancellationToken,
) {
    let consumer: StreamConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        // No offsets are committed: each worker reads everything new.
        .set("group.id", "matchfleet-results-feed")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot tail the results topic: no nudges");
            return;
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        if let Err(e) = tpl.add_partition_offset(&topic, p, Offset::End) {
            warn!(error = %e, "cannot tail the results topic: no nudges");
            return;
        }
    }
    if let Err(e) = consumer.assign(&tpl) {
        warn!(error = %e, "cannot tail the results topic: no nudges");
        return;
    }
    let mut stream = consumer.stream();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            next = stream.next() => match next {
                Some(Ok(m)) => {
                    let Some(result) = m.payload().and_then(|p| serde_json::from_slice::<MatchResult>(p).ok()) else {
                        continue;
                    };
                    MatchMetrics::add(&metrics.nudges_sent, feed.publish(Arc::new(result)));
                }
                Some(Err(e)) => {
                    warn!(error = %e, "results feed: consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchfleet_api::matching::MatchedUser;

    fn matched(id: &str, a: &str, b: &str) -> MatchResult {
        let user = |u: &str| MatchedUser {
            request_id: format!("r-{u}-{id}"),
            user: u.into(),
            event_time: 0,
        };
        MatchResult::Matched {
            match_id: id.into(),
            segment: "s".into(),
            window_start: 0,
            window_end: 500,
            partition: 0,
            scorer: "cosine".into(),
            score: 0.5,
            users: [user(a), user(b)],
            closed_at: 600,
        }
    }

    #[tokio::test]
    async fn a_connected_user_is_nudged_and_can_poll_recent_matches() {
        let feed = Feed::default();
        let mut alice = feed.subscribe("alice");
        assert_eq!(feed.publish(Arc::new(matched("m1", "alice", "bob"))), 1);
        assert_eq!(
            alice.recv().await,
            Some(Nudge {
                user: "alice".into(),
                match_id: "m1".into()
            })
        );
        assert_eq!(
            feed.recent("bob").len(),
            1,
            "bob was not connected but can poll"
        );
        drop(alice);
        assert_eq!(
            feed.publish(Arc::new(matched("m2", "alice", "carol"))),
            0,
            "gone subscribers are dropped"
        );
    }

    #[test]
    fn closed_channels_are_forgotten_without_a_match() {
        let feed = Feed::default();
        let kept = feed.subscribe("alice");
        let gone = feed.subscribe("alice");
        let bob = feed.subscribe("bob");
        drop(gone);
        drop(bob);
        feed.forget_closed("alice");
        feed.forget_closed("bob");
        assert_eq!(feed.subscribed_users(), 1, "bob had only a closed channel");
        assert_eq!(feed.publish(Arc::new(matched("m1", "alice", "carol"))), 1);
        drop(kept);
    }

    #[test]
    fn recent_matches_are_bounded_per_user() {
        let feed = Feed::default();
        for i in 0..20 {
            feed.publish(Arc::new(matched(
                &format!("m{i}"),
                "alice",
                &format!("u{i}"),
            )));
        }
        let recent = feed.recent("alice");
        assert_eq!(recent.len(), RECENT_PER_USER);
        assert!(
            matches!(&recent[RECENT_PER_USER - 1], MatchResult::Matched { match_id, .. } if match_id == "m19")
        );
    }
}
