//! Reading a run back from Kafka for the checker: the request topic up to
//! its end at the start, then the results (and dead-letter) topics with
//! read_committed until every valid request has a result (and every invalid
//! one a letter) or nothing new arrives for a while, then up to their ends.
//! Partitions are assigned, never subscribed, and no offset is committed:
//! the checker leaves no trace on the cluster.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use matchfleet_api::feedback::FeedbackSample;
use matchfleet_api::match_pipeline::MatchPipelineSpec;
use matchfleet_api::matching::MatchResult;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::check::{
    check, classify, CheckConfig, Classified, DeadLetterRecord, InputRecord, ResultRecord,
};
use super::feedback::RewardRecord;
use super::report::Report;

/// Where the run is and how patient to be.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    pub bootstrap: String,
    pub requests_topic: String,
    pub results_topic: String,
    /// Also checks the dead letters when given.
    pub dead_letter_topic: Option<String>,
    pub config: CheckConfig,
    /// Stop waiting for results after this long without a new record.
    pub idle_timeout: Duration,
    /// Stop waiting for results after this long in any case.
    pub max_wait: Duration,
}

impl CheckOptions {
    pub fn new(
        bootstrap: &str,
        requests_topic: &str,
        results_topic: &str,
        dimension: usize,
    ) -> Self {
        CheckOptions {
            bootstrap: bootstrap.to_string(),
            requests_topic: requests_topic.to_string(),
            results_topic: results_topic.to_string(),
            dead_letter_topic: None,
            config: CheckConfig::new(dimension),
            idle_timeout: Duration::from_secs(60),
            max_wait: Duration::from_secs(600),
        }
    }

    /// The topics and rules of a pipeline, read through its own bootstrap
    /// servers; the dead letters are checked too.
    pub fn for_pipeline(spec: &MatchPipelineSpec) -> Self {
        CheckOptions {
            dead_letter_topic: Some(
                spec.dead_letter_topic
                    .clone()
                    .unwrap_or_else(|| format!("{}.dlq", spec.source.topic)),
            ),
            config: CheckConfig::for_pipeline(spec),
            ..CheckOptions::new(
                &spec.source.bootstrap_servers,
                &spec.source.topic,
                &spec.results_topic,
                0,
            )
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error("reading {topic} made no progress for {idle:?}: {behind}")]
    Stalled {
        topic: String,
        idle: Duration,
        behind: String,
    },
    #[error("the checker's reading task failed: {0}")]
    Task(String),
}

/// A (topic, partition).
type Tp = (String, i32);

/// Reads the topics and checks the run. Blocking: from async code use
/// [`check_topics_async`].
pub fn check_topics(options: &CheckOptions) -> Result<Report, ReadError> {
    let inputs = read_requests(
        &options.bootstrap,
        &options.requests_topic,
        options.idle_timeout,
    )?;
    let classified = classify(&inputs, options.config.dimension);
    let outcomes = read_outcomes(options, &classified)?;
    let mut config = options.config.clone();
    config
        .source_topic
        .get_or_insert_with(|| options.requests_topic.clone());
    Ok(check(
        &inputs,
        &outcomes.results,
        outcomes.dead_letters.as_deref(),
        &config,
    ))
}

pub async fn check_topics_async(options: CheckOptions) -> Result<Report, ReadError> {
    tokio::task::spawn_blocking(move || check_topics(&options))
        .await
        .map_err(|e| ReadError::Task(e.to_string()))?
}

/// As [`check_topics`], also handing back the results it read: the feedback
/// test joins its outcomes to exactly the matches the checker verified.
pub fn check_topics_keeping_results(
    options: &CheckOptions,
) -> Result<(Report, Vec<ResultRecord>), ReadError> {
    let inputs = read_requests(
        &options.bootstrap,
        &options.requests_topic,
        options.idle_timeout,
    )?;
    let classified = classify(&inputs, options.config.dimension);
    let outcomes = read_outcomes(options, &classified)?;
    let mut config = options.config.clone();
    config
        .source_topic
        .get_or_insert_with(|| options.requests_topic.clone());
    let report = check(
        &inputs,
        &outcomes.results,
        outcomes.dead_letters.as_deref(),
        &config,
    );
    Ok((report, outcomes.results))
}

pub async fn check_topics_keeping_results_async(
    options: CheckOptions,
) -> Result<(Report, Vec<ResultRecord>), ReadError> {
    tokio::task::spawn_blocking(move || check_topics_keeping_results(&options))
        .await
        .map_err(|e| ReadError::Task(e.to_string()))?
}

/// Where the feedback join's samples are, which ones must come, and how long
/// to wait for them.
#[derive(Clone, Debug)]
pub struct RewardsOptions {
    pub bootstrap: String,
    pub topic: String,
    /// Match ids that must each get a sample.
    pub awaited: HashSet<String>,
    /// Read on at least until then, even once every awaited sample is in: a
    /// second sample for a match (say, written when its state expires) must
    /// be seen too.
    pub read_until: Instant,
    /// Stop waiting then; what is missing is for the comparison to report.
    pub give_up_at: Instant,
}

/// Reads the rewards topic from the beginning (committed records only) until
/// every awaited match has a sample and `read_until` has passed, then up to
/// the ends the topic has at that moment; or until `give_up_at`. Blocking:
/// from async code use [`read_rewards_async`].
pub fn read_rewards(options: &RewardsOptions) -> Result<Vec<RewardRecord>, ReadError> {
    let consumer = reader(&options.bootstrap)?;
    // The workers create the topic; it may take them a moment.
    let patience = options.give_up_at.saturating_duration_since(Instant::now());
    let tps: Vec<Tp> = partitions(&consumer, &options.topic, patience)?
        .into_iter()
        .map(|p| (options.topic.clone(), p))
        .collect();
    assign_from_start(&consumer, &tps)?;
    let mut awaited: HashSet<&str> = options.awaited.iter().map(String::as_str).collect();
    let mut records = Vec::new();
    let mut progress = EndTracker::default();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                progress.advance((m.topic().to_string(), m.partition()), m.offset() + 1);
                let sample = match m.payload() {
                    Some(p) if !p.is_empty() => {
                        serde_json::from_slice::<FeedbackSample>(p).map_err(|e| e.to_string())
                    }
                    _ => Err("no value".to_string()),
                };
                if let Ok(s) = &sample {
                    awaited.remove(s.match_id.as_str());
                }
                records.push(RewardRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    sample,
                });
            }
            Some(Err(e)) => tracing::warn!(topic = %options.topic, error = %e, "consumer error"),
            None => progress.observe_positions(&consumer.position()?),
        }
        let now = Instant::now();
        if awaited.is_empty() && now >= options.read_until && !progress.has_ends() {
            progress.set_ends(watermarks(&consumer, &tps)?);
        }
        if progress.reached() {
            break;
        }
        if now >= options.give_up_at {
            tracing::warn!(
                missing = awaited.len(),
                read = records.len(),
                "stopped waiting for feedback samples"
            );
            break;
        }
    }
    Ok(records)
}

pub async fn read_rewards_async(options: RewardsOptions) -> Result<Vec<RewardRecord>, ReadError> {
    tokio::task::spawn_blocking(move || read_rewards(&options))
        .await
        .map_err(|e| ReadError::Task(e.to_string()))?
}

/// A consumer that reads committed records only and never commits offsets.
fn reader(bootstrap: &str) -> Result<BaseConsumer, KafkaError> {
    let group = format!(
        "match-check-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or_default()
    );
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
}

/// The topic's partitions, waiting up to `patience` for it to appear.
fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
    patience: Duration,
) -> Result<Vec<i32>, ReadError> {
    let deadline = Instant::now() + patience;
    loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
            .filter(|p| !p.is_empty());
        match found {
            Some(p) => return Ok(p),
            None if Instant::now() >= deadline => return Err(ReadError::NoTopic(topic.into())),
            None => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn assign_from_start(consumer: &BaseConsumer, tps: &[Tp]) -> Result<(), KafkaError> {
    let mut list = TopicPartitionList::new();
    for (topic, partition) in tps {
        list.add_partition_offset(topic, *partition, Offset::Beginning)?;
    }
    consumer.assign(&list)
}

/// Reads the request topic from the beginning up to the ends it has now.
pub fn read_requests(
    bootstrap: &str,
    topic: &str,
    idle_timeout: Duration,
) -> Result<Vec<InputRecord>, ReadError> {
    let consumer = reader(bootstrap)?;
    let tps: Vec<Tp> = partitions(&consumer, topic, Duration::ZERO)?
        .into_iter()
        .map(|p| (topic.to_string(), p))
        .collect();
    let mut progress = EndTracker::default();
    progress.set_ends(watermarks(&consumer, &tps)?);
    assign_from_start(&consumer, &tps)?;
    let mut inputs = Vec::new();
    let mut last_progress = Instant::now();
    while !progress.reached() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                progress.advance((m.topic().to_string(), m.partition()), m.offset() + 1);
                inputs.push(InputRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                });
                last_progress = Instant::now();
            }
            // librdkafka retries on its own; a lasting error ends as a stall.
            Some(Err(e)) => tracing::warn!(topic, error = %e, "consumer error"),
            None => progress.observe_positions(&consumer.position()?),
        }
        if last_progress.elapsed() > idle_timeout && !progress.reached() {
            return Err(ReadError::Stalled {
                topic: topic.into(),
                idle: idle_timeout,
                behind: progress.behind(),
            });
        }
    }
    Ok(inputs)
}

/// What the results and dead-letter topics held.
pub struct Outcomes {
    pub results: Vec<ResultRecord>,
    /// `None` when no dead-letter topic was asked for.
    pub dead_letters: Option<Vec<DeadLetterRecord>>,
}

/// What is still awaited: valid request ids without a result, invalid
/// inputs (partition, offset) without a dead letter.
struct Awaited {
    requests: HashSet<String>,
    letters: HashSet<(i32, i64)>,
}

impl Awaited {
    fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.letters.is_empty()
    }
}

/// Reads results (and dead letters) until all are in or patience runs out;
/// missing ones are for the checker to report, not an error.
pub fn read_outcomes(
    options: &CheckOptions,
    classified: &Classified,
) -> Result<Outcomes, ReadError> {
    let mut awaited = Awaited {
        requests: classified
            .valid
            .iter()
            .map(|v| v.request.request_id.clone())
            .collect(),
        letters: HashSet::new(),
    };
    let consumer = reader(&options.bootstrap)?;
    let mut tps: Vec<Tp> = partitions(&consumer, &options.results_topic, options.idle_timeout)?
        .into_iter()
        .map(|p| (options.results_topic.clone(), p))
        .collect();
    let mut dead_letters = None;
    if let Some(dlq) = &options.dead_letter_topic {
        dead_letters = Some(Vec::new());
        awaited.letters = classified
            .invalid
            .iter()
            .map(|i| (i.partition, i.offset))
            .collect();
        // Workers create the topic when they start; with nothing to wait
        // for, a missing topic is simply empty.
        let patience = if awaited.letters.is_empty() {
            Duration::ZERO
        } else {
            options.idle_timeout
        };
        match partitions(&consumer, dlq, patience) {
            Ok(p) => tps.extend(p.into_iter().map(|p| (dlq.clone(), p))),
            Err(ReadError::NoTopic(_)) => {}
            Err(e) => return Err(e),
        }
    }
    assign_from_start(&consumer, &tps)?;

    let mut results = Vec::new();
    let mut progress = EndTracker::default();
    let started = Instant::now();
    let mut last_progress = started;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                progress.advance((m.topic().to_string(), m.partition()), m.offset() + 1);
                last_progress = Instant::now();
                if m.topic() == options.results_topic {
                    let payload = m.payload().map(<[u8]>::to_vec);
                    if let Some(result) = payload
                        .as_deref()
                        .and_then(|p| serde_json::from_slice::<MatchResult>(p).ok())
                    {
                        for id in result.request_ids() {
                            awaited.requests.remove(id);
                        }
                    }
                    results.push(ResultRecord {
                        partition: m.partition(),
                        offset: m.offset(),
                        payload,
                    });
                } else if let Some(letters) = dead_letters.as_mut() {
                    let letter = dead_letter(&m);
                    if let Some(source) = letter.source() {
                        awaited.letters.remove(&source);
                    }
                    letters.push(letter);
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            None => progress.observe_positions(&consumer.position()?),
        }
        // Everything awaited is in: read on to the ends the topics have now,
        // so that duplicates already written are seen too.
        if awaited.is_empty() && !progress.has_ends() {
            progress.set_ends(watermarks(&consumer, &tps)?);
        }
        if progress.reached() {
            break;
        }
        if last_progress.elapsed() > options.idle_timeout || started.elapsed() > options.max_wait {
            tracing::warn!(
                missing_results = awaited.requests.len(),
                missing_letters = awaited.letters.len(),
                "stopped waiting for results"
            );
            break;
        }
    }
    Ok(Outcomes {
        results,
        dead_letters,
    })
}

fn dead_letter(m: &BorrowedMessage<'_>) -> DeadLetterRecord {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                    (h.key.to_string(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    DeadLetterRecord {
        partition: m.partition(),
        offset: m.offset(),
        headers,
    }
}

/// (low, high) watermarks per partition.
fn watermarks(consumer: &BaseConsumer, tps: &[Tp]) -> Result<BTreeMap<Tp, (i64, i64)>, KafkaError> {
    tps.iter()
        .map(|(topic, partition)| {
            let marks = consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10))?;
            Ok(((topic.clone(), *partition), marks))
        })
        .collect()
}

/// Whether every partition has been read up to a captured end. Positions
/// come from records and, when idle, from the consumer: transaction markers
/// and aborted records move the position without yielding a record.
#[derive(Debug, Default)]
struct EndTracker {
    positions: BTreeMap<Tp, i64>,
    /// (low, high) per partition; `None` until captured.
    ends: Option<BTreeMap<Tp, (i64, i64)>>,
}

impl EndTracker {
    fn set_ends(&mut self, ends: BTreeMap<Tp, (i64, i64)>) {
        self.ends = Some(ends);
    }

    fn has_ends(&self) -> bool {
        self.ends.is_some()
    }

    /// The next offset to read on a partition is at least `next`.
    fn advance(&mut self, tp: Tp, next: i64) {
        let position = self.positions.entry(tp).or_insert(next);
        *position = (*position).max(next);
    }

    fn observe_positions(&mut self, list: &TopicPartitionList) {
        for e in list.elements() {
            if let Offset::Offset(next) = e.offset() {
                self.advance((e.topic().to_string(), e.partition()), next);
            }
        }
    }

    fn reached(&self) -> bool {
        let Some(ends) = &self.ends else {
            return false;
        };
        ends.iter().all(|(tp, (low, high))| {
            high <= low || self.positions.get(tp).is_some_and(|p| p >= high)
        })
    }

    /// The partitions not read to their end yet, for an error message.
    fn behind(&self) -> String {
        let Some(ends) = &self.ends else {
            return "no ends captured".into();
        };
        ends.iter()
            .filter(|(tp, (low, high))| {
                high > low && self.positions.get(*tp).is_none_or(|p| p < high)
            })
            .map(|((topic, partition), (_, high))| {
                let at = self.positions.get(&(topic.clone(), *partition)).copied();
                format!("{topic}[{partition}] at {at:?} of {high}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".to_string(), p)
    }

    #[test]
    fn the_end_is_reached_when_every_partition_is() {
        let mut t = EndTracker::default();
        t.advance(tp(0), 5);
        assert!(!t.reached(), "no ends captured yet");
        t.set_ends([(tp(0), (0, 5)), (tp(1), (3, 9)), (tp(2), (4, 4))].into());
        assert!(!t.reached());
        assert_eq!(t.behind(), "t[1] at None of 9");
        t.advance(tp(1), 8);
        assert!(!t.reached());
        // A transaction marker at offset 8: the position moves past it
        // without a record.
        t.advance(tp(1), 9);
        assert!(
            t.reached(),
            "an empty partition (low == high) needs no reading"
        );
    }

    #[test]
    fn positions_never_move_back() {
        let mut t = EndTracker::default();
        t.set_ends([(tp(0), (0, 3))].into());
        t.advance(tp(0), 3);
        t.advance(tp(0), 1);
        assert!(t.reached());
    }
}
