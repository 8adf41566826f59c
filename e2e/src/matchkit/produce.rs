//! Sending a load run to the request topic: paced, keyed by segment,
//! acks=all with idempotence, and every delivery confirmed before the run
//! is reported, so the report lists exactly what Kafka holds.

use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use super::feedback::PlannedOutcome;
use super::generate::{Generator, LoadOptions, Malformed, OptionsError};
use super::pace::TokenBucket;

/// One record as Kafka stored it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SentRequest {
    pub request_id: String,
    pub user: String,
    pub segment: String,
    pub key: String,
    pub event_time: i64,
    pub partition: i32,
    pub offset: i64,
    /// Set for the records meant for the dead-letter topic.
    pub malformed: Option<Malformed>,
}

/// What a run sent, in send order.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sent {
    pub run_id: String,
    pub requests: Vec<SentRequest>,
    /// From the first send to the last delivery.
    pub elapsed_millis: u64,
    /// Records per second actually achieved.
    pub rate: f64,
}

/// The figures of a run without the record list (what the CLI prints).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SentSummary {
    pub run_id: String,
    pub sent: usize,
    pub valid: usize,
    pub malformed: usize,
    pub users: usize,
    pub segments: usize,
    pub elapsed_millis: u64,
    pub rate: f64,
}

impl Sent {
    pub fn valid(&self) -> impl Iterator<Item = &SentRequest> {
        self.requests.iter().filter(|r| r.malformed.is_none())
    }

    pub fn malformed(&self) -> impl Iterator<Item = &SentRequest> {
        self.requests.iter().filter(|r| r.malformed.is_some())
    }

    pub fn summary(&self) -> SentSummary {
        let distinct = |f: fn(&SentRequest) -> &str| {
            self.valid()
                .map(f)
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        SentSummary {
            run_id: self.run_id.clone(),
            sent: self.requests.len(),
            valid: self.valid().count(),
            malformed: self.malformed().count(),
            users: distinct(|r| &r.user),
            segments: distinct(|r| &r.segment),
            elapsed_millis: self.elapsed_millis,
            rate: self.rate,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("kafka producer: {0}")]
    Producer(#[source] KafkaError),
    #[error("request {request_id} was not delivered: {error}")]
    Delivery {
        request_id: String,
        #[source]
        error: KafkaError,
    },
    #[error("request {request_id}: the producer went away before confirming delivery")]
    Cancelled { request_id: String },
}

/// Records awaiting delivery before the sender stops queueing more; far
/// below librdkafka's own queue (100k) so the queue-full path is rare.
const MAX_IN_FLIGHT: usize = 50_000;

/// How long librdkafka may try to deliver one record.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// A producer for load: acks=all and idempotence (no duplicates on retry),
/// a short linger so batches form at high rates without delaying low ones.
pub fn load_producer(bootstrap: &str) -> Result<FutureProducer, LoadError> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        )
        .create()
        .map_err(LoadError::Producer)
}

/// Sends the run described by `options` to `topic` and waits until Kafka
/// has every record.
pub async fn send_load(
    bootstrap: &str,
    topic: &str,
    options: &LoadOptions,
) -> Result<Sent, LoadError> {
    let producer = load_producer(bootstrap)?;
    send_load_with(&producer, topic, options).await
}

/// As [`send_load`], with a producer the caller keeps (several runs on one
/// connection).
pub async fn send_load_with(
    producer: &FutureProducer,
    topic: &str,
    options: &LoadOptions,
) -> Result<Sent, LoadError> {
    let mut generator = Generator::new(options)?;
    let started = Instant::now();
    let mut bucket = TokenBucket::new(options.rate, started);
    let mut sent: Vec<SentRequest> = Vec::new();
    let mut pending = FuturesUnordered::new();
    loop {
        if let Some(bucket) = bucket.as_mut() {
            let wait = bucket.take(Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let Some(out) = generator.next_record(wall_clock_millis()) else {
            break;
        };
        let index = sent.len();
        sent.push(SentRequest {
            request_id: out.request.request_id.clone(),
            user: out.request.user.clone(),
            segment: out.request.segment.clone(),
            key: out.key.clone(),
            event_time: out.request.event_time,
            partition: -1,
            offset: -1,
            malformed: out.malformed,
        });
        let mut record = FutureRecord::to(topic).key(&out.key).payload(&out.payload);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery.map(move |result| (index, result)));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match pending.next().await {
                        Some(done) => settle(&mut sent, done)?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((error, _)) => return Err(LoadError::Producer(error)),
            }
        }
        while pending.len() >= MAX_IN_FLIGHT {
            if let Some(done) = pending.next().await {
                settle(&mut sent, done)?;
            }
        }
        while let Some(Some(done)) = pending.next().now_or_never() {
            settle(&mut sent, done)?;
        }
    }
    while let Some(done) = pending.next().await {
        settle(&mut sent, done)?;
    }
    let elapsed = started.elapsed();
    let rate = if elapsed.is_zero() {
        0.0
    } else {
        sent.len() as f64 / elapsed.as_secs_f64()
    };
    tracing::info!(
        topic,
        sent = sent.len(),
        elapsed_ms = elapsed.as_millis() as u64,
        rate,
        "load sent"
    );
    Ok(Sent {
        run_id: options.run_id.clone(),
        requests: sent,
        elapsed_millis: elapsed.as_millis() as u64,
        rate,
    })
}

type Delivered = (
    usize,
    Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
);

/// Records where Kafka put a delivered record, or fails the run.
fn settle(sent: &mut [SentRequest], (index, result): Delivered) -> Result<(), LoadError> {
    let request = &mut sent[index];
    match result {
        Ok(Ok(delivery)) => {
            request.partition = delivery.partition;
            request.offset = delivery.offset;
            Ok(())
        }
        Ok(Err((error, _))) => Err(LoadError::Delivery {
            request_id: request.request_id.clone(),
            error,
        }),
        Err(_) => Err(LoadError::Cancelled {
            request_id: request.request_id.clone(),
        }),
    }
}

/// What sending a plan of outcomes took.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SentOutcomes {
    pub sent: usize,
    /// From the first send to the last delivery.
    pub elapsed_millis: u64,
    /// Wall clock (ms since the epoch) when Kafka had the last one: the test
    /// compares it with the matches' deadlines.
    pub finished_at_millis: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum OutcomeSendError {
    #[error(transparent)]
    Setup(#[from] LoadError),
    #[error("kafka producer: {0}")]
    Producer(#[source] KafkaError),
    #[error("the outcome for match {match_id} was not delivered: {error}")]
    Delivery {
        match_id: String,
        #[source]
        error: KafkaError,
    },
    #[error("the outcome for match {match_id}: the producer went away before confirming delivery")]
    Cancelled { match_id: String },
}

/// Sends outcomes to `topic`, each to its planned partition, keyed by its
/// segment, in plan order, and waits until Kafka has all of them. The
/// producer is idempotent, which keeps each partition in send order through
/// retries: the join's result depends on that order.
pub async fn send_outcomes(
    bootstrap: &str,
    topic: &str,
    outcomes: &[PlannedOutcome],
) -> Result<SentOutcomes, OutcomeSendError> {
    let producer = load_producer(bootstrap)?;
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for (index, planned) in outcomes.iter().enumerate() {
        // A MatchOutcome is plain data: serialising it cannot fail.
        let payload = serde_json::to_vec(&planned.outcome).unwrap_or_default();
        let mut record = FutureRecord::to(topic)
            .partition(planned.partition)
            .key(&planned.outcome.segment)
            .payload(&payload);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery.map(move |result| (index, result)));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match pending.next().await {
                        Some(done) => delivered(outcomes, done)?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((error, _)) => return Err(OutcomeSendError::Producer(error)),
            }
        }
        while pending.len() >= MAX_IN_FLIGHT {
            if let Some(done) = pending.next().await {
                delivered(outcomes, done)?;
            }
        }
    }
    while let Some(done) = pending.next().await {
        delivered(outcomes, done)?;
    }
    let elapsed = started.elapsed();
    tracing::info!(
        topic,
        sent = outcomes.len(),
        elapsed_ms = elapsed.as_millis() as u64,
        "outcomes sent"
    );
    Ok(SentOutcomes {
        sent: outcomes.len(),
        elapsed_millis: elapsed.as_millis() as u64,
        finished_at_millis: wall_clock_millis(),
    })
}

/// Fails the send if an outcome was not delivered.
fn delivered(
    outcomes: &[PlannedOutcome],
    (index, result): Delivered,
) -> Result<(), OutcomeSendError> {
    let match_id = || {
        outcomes
            .get(index)
            .map(|o| o.outcome.match_id.clone())
            .unwrap_or_default()
    };
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => Err(OutcomeSendError::Delivery {
            match_id: match_id(),
            error,
        }),
        Err(_) => Err(OutcomeSendError::Cancelled {
            match_id: match_id(),
        }),
    }
}

/// Milliseconds since the epoch (a clock before 1970 counts as 0).
pub fn wall_clock_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
