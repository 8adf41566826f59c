//! The dead-letter topic: a malformed message is copied there - key, value
//! and the reason in headers - and only then counted as finished, so a bad
//! message is set aside, never lost. Render mode sends letters one by one;
//! match mode writes them inside its transactions with the same headers.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::topics::{self, Retention};

/// Header names of a dead letter.
pub mod header {
    pub const REASON: &str = "matchfleet.reason";
    pub const SOURCE_TOPIC: &str = "matchfleet.source.topic";
    pub const SOURCE_PARTITION: &str = "matchfleet.source.partition";
    pub const SOURCE_OFFSET: &str = "matchfleet.source.offset";
}

pub struct DeadLetters {
    topic: String,
    source_topic: String,
    producer: FutureProducer,
}

/// Where a dead letter came from, and why.
pub struct Letter<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a str,
}

impl Letter<'_> {
    /// The reason and where the message came from, as record headers.
    pub fn headers(&self, source_topic: &str) -> OwnedHeaders {
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        OwnedHeaders::new()
            .insert(Header {
                key: header::REASON,
                value: Some(self.reason),
            })
            .insert(Header {
                key: header::SOURCE_TOPIC,
                value: Some(source_topic),
            })
            .insert(Header {
                key: header::SOURCE_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: header::SOURCE_OFFSET,
                value: Some(&offset),
            })
    }
}

impl DeadLetters {
    /// Creates the topic if it is missing (one partition is plenty for
    /// exceptions) and a producer with idempotence and acks=all.
    pub async fn open(bootstrap: &str, topic: &str, source_topic: &str) -> anyhow::Result<Self> {
        topics::ensure(bootstrap, topic, 1, Retention::Delete).await?;
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(DeadLetters {
            topic: topic.to_string(),
            source_topic: source_topic.to_string(),
            producer,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends one letter and waits until Kafka has it.
    pub async fn send(&self, letter: &Letter<'_>) -> anyhow::Result<()> {
        let headers = letter.headers(&self.source_topic);
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = letter.key {
            record = record.key(k);
        }
        if let Some(v) = letter.value {
            record = record.payload(v);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| anyhow::anyhow!("dead-letter produce failed: {e}"))
    }
}
