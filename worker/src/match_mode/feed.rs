//! The results feed: every worker tails the results topic (read_committed,
//! so only committed matches are ever seen) and serves its own connected
//! users - a nudge over their WebSocket, and their recent matches for
//! `GET /matches/{user}`. Any worker can therefore serve any user, whoever
//! owns the user's partition, and a match that was aborted (a fenced
//! owner's) never nudges anyone.

use std::borrow::Cow;
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
use super::priority::at_default;
use crate::matching::hash::FastMap;

/// Recent matches kept per user for the polling fallback.
const RECENT_PER_USER: usize = 8;
/// Users whose recent matches are kept; past this the oldest half is dropped.
const USERS_KEPT: usize = 200_000;

/// Every worker stores every match of the pipeline here (twice, once per
/// user), as the record it read: shared, not copied, parsed again only when
/// asked for, and hashed with foldhash.
#[derive(Default)]
struct Recent {
    by_user: FastMap<String, VecDeque<Arc<[u8]>>>,
    /// Users in the order they were first stored, for eviction.
    order: VecDeque<String>,
}

impl Recent {
    fn remember(&mut self, user: &str, result: &Arc<[u8]>) {
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
        let records: Vec<Arc<[u8]>> = self
            .recent
            .lock()
            .ok()
            .and_then(|r| r.by_user.get(user).map(|l| l.iter().cloned().collect()))
            .unwrap_or_default();
        records
            .iter()
            .filter_map(|r| serde_json::from_slice(r).ok())
            .collect()
    }

    /// Records a committed result record (a `MatchResult` as JSON) and
    /// nudges its users; returns nudges sent. Only the fields it needs are
    /// read: every worker reads every result of the pipeline, and parsing
    /// whole results (an internally tagged enum, buffered by serde) cost ~5%
    /// of a loaded worker's core.
    pub fn publish(&self, record: &[u8]) -> u64 {
        let Some((match_id, users)) = read_match(record) else {
            return 0;
        };
        let shared: Arc<[u8]> = Arc::from(record);
        if let Ok(mut recent) = self.recent.lock() {
            for u in &users {
                recent.remember(u, &shared);
            }
        }
        let Ok(mut subs) = self.subscribers.lock() else {
            return 0;
        };
        let mut sent = 0;
        for u in users {
            if let Some(channels) = subs.get_mut(u.as_ref()) {
                let nudge = Nudge {
                    user: u.to_string(),
                    match_id: match_id.to_string(),
                };
                channels.retain(|tx| tx.send(nudge.clone()).is_ok());
                sent += channels.len() as u64;
                if channels.is_empty() {
                    subs.remove(u.as_ref());
                }
            }
        }
        sent
    }
}

/// A match's id and its users' names from a result record; None for an
/// expiry or a record that is not a result. Records in the layout the
/// worker writes (`MatchResult::write_json`) without escapes are read in
/// place; anything else goes through serde.
fn read_match(record: &[u8]) -> Option<(Cow<'_, str>, Vec<Cow<'_, str>>)> {
    match read_plain(record) {
        Some(Some((id, [a, b]))) => Some((Cow::Borrowed(id), vec![a.into(), b.into()])),
        Some(None) => None,
        None => read_with_serde(record),
    }
}

fn read_with_serde(record: &[u8]) -> Option<(Cow<'_, str>, Vec<Cow<'_, str>>)> {
    let view = serde_json::from_slice::<FeedView<'_>>(record).ok()?;
    match (view.match_id, view.kind.as_ref()) {
        (Some(id), "matched") => Some((id, view.users.into_iter().map(|u| u.user).collect())),
        _ => None,
    }
}

const MATCHED_HEAD: &[u8] = br#"{"kind":"matched","matchId":""#;
const EXPIRED_HEAD: &[u8] = br#"{"kind":"expired","#;
const FIRST_USER: &[u8] = br#","users":[{"requestId":""#;
const USER_NAME: &[u8] = br#","user":""#;
const EVENT_TIME: &[u8] = br#","eventTime":"#;
const SECOND_USER: &[u8] = br#"},{"requestId":""#;

/// The write_json layout read in place: Some(Some(..)) a match, Some(None)
/// an expiry, None anything else. Without a backslash no string holds a
/// quote, so each quote ends a string and `"users":[` can only be the key.
fn read_plain(record: &[u8]) -> Option<Option<(&str, [&str; 2])>> {
    if record.contains(&b'\\') {
        return None;
    }
    if record.starts_with(EXPIRED_HEAD) {
        return Some(None);
    }
    let (match_id, rest) = string(record.strip_prefix(MATCHED_HEAD)?)?;
    let at = rest
        .windows(FIRST_USER.len())
        .position(|w| w == FIRST_USER)?;
    let (a, rest) = user(&rest[at + FIRST_USER.len()..])?;
    let (b, rest) = user(skip_event_time(rest)?.strip_prefix(SECOND_USER)?)?;
    skip_event_time(rest)?
        .starts_with(b"}]")
        .then_some(Some((match_id, [a, b])))
}

/// A user's name after the opening quote of its request id.
fn user(b: &[u8]) -> Option<(&str, &[u8])> {
    let (_request_id, rest) = string(b)?;
    string(rest.strip_prefix(USER_NAME)?)
}

fn skip_event_time(b: &[u8]) -> Option<&[u8]> {
    let b = b.strip_prefix(EVENT_TIME)?;
    let b = b.strip_prefix(b"-").unwrap_or(b);
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    (digits > 0).then_some(&b[digits..])
}

/// The text up to the next quote, and what follows that quote.
fn string(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == b'"')?;
    Some((std::str::from_utf8(&b[..end]).ok()?, &b[end + 1..]))
}

/// What the feed reads of a result record (`MatchResult`'s JSON): a plain
/// struct, so serde skips the rest without buffering it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct FeedView<'a> {
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    match_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    users: Vec<UserView<'a>>,
}

#[derive(serde::Deserialize)]
struct UserView<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
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
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &bootstrap)
        // No offsets are committed: each worker reads everything new.
        .set("group.id", "matchfleet-results-feed")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5");
    // librdkafka's threads at the process's priority (see `priority`).
    let created = at_default(move || config.create::<StreamConsumer>()).await;
    let consumer = match created.and_then(|c| c.map_err(anyhow::Error::from)) {
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
                    if let Some(record) = m.payload() {
                        MatchMetrics::add(&metrics.nudges_sent, feed.publish(record));
                    }
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
    use matchfleet_api::matching::{ExpiryReason, MatchedUser};
    use proptest::prelude::*;

    /// Ids and names: mostly plain, sometimes with quotes, backslashes,
    /// control characters or other Unicode.
    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z0-9-]{0,12}",
            1 => prop::collection::vec(
                prop_oneof![
                    any::<char>(),
                    prop::sample::select(vec!['"', '\\', '\n', '\u{1}', ':', ',', '{', '}', '[', ']']),
                ],
                0..8,
            )
            .prop_map(|c| c.into_iter().collect()),
        ]
    }

    fn arb_result() -> impl Strategy<Value = MatchResult> {
        let user = || {
            (arb_text(), arb_text(), any::<i64>()).prop_map(|(request_id, user, event_time)| {
                MatchedUser {
                    request_id,
                    user,
                    event_time,
                }
            })
        };
        let matched = (
            arb_text(),
            arb_text(),
            arb_text(),
            any::<f32>(),
            user(),
            user(),
            any::<i64>(),
        )
            .prop_map(
                |(match_id, segment, scorer, score, a, b, t)| MatchResult::Matched {
                    match_id,
                    segment,
                    window_start: t,
                    window_end: t.wrapping_add(1000),
                    partition: 3,
                    scorer,
                    score,
                    users: [a, b],
                    closed_at: t,
                },
            );
        let expired = (arb_text(), arb_text(), any::<i64>()).prop_map(|(request_id, user, t)| {
            MatchResult::Expired {
                request_id,
                segment: user.clone(),
                user,
                partition: 1,
                event_time: t,
                windows: 5,
                reason: ExpiryReason::NoPartner,
                closed_at: t,
            }
        });
        prop_oneof![matched, expired]
    }

    proptest! {
        #[test]
        fn records_read_in_place_read_as_serde_reads_them(r in arb_result()) {
            let mut record = Vec::new();
            r.write_json(&mut record);
            let plain = read_plain(&record);
            // Without an escape the in-place reader always answers.
            prop_assert_eq!(plain.is_some(), !record.contains(&b'\\'));
            prop_assert_eq!(read_match(&record), read_with_serde(&record));
            if let MatchResult::Matched { match_id, users, .. } = &r {
                let (id, names) = read_match(&record).expect("a match is read");
                prop_assert_eq!(id.as_ref(), match_id.as_str());
                prop_assert_eq!(names, vec![users[0].user.as_str(), users[1].user.as_str()]);
            } else {
                prop_assert!(read_match(&record).is_none());
            }
        }
    }

    fn record(r: MatchResult) -> Vec<u8> {
        serde_json::to_vec(&r).unwrap()
    }

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
        assert_eq!(feed.publish(&record(matched("m1", "alice", "bob"))), 1);
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
            feed.publish(&record(matched("m2", "alice", "carol"))),
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
        assert_eq!(feed.publish(&record(matched("m1", "alice", "carol"))), 1);
        drop(kept);
    }

    #[test]
    fn recent_matches_are_bounded_per_user() {
        let feed = Feed::default();
        for i in 0..20 {
            feed.publish(&record(matched(
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
