//! The dead-letter topic: a malformed message is copied there - key, value
//! and the reason in headers - and only then counted as finished, so a bad
//! message is set aside, never lost.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

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

impl DeadLetters {
    /// Creates the topic if it is missing (one partition is plenty for
    /// exceptions) and a producer with idempotence and acks=all.
    pub async fn open(bootstrap: &str, topic: &str, source_topic: &str) -> anyhow::Result<Self> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()?;
        let created = admin
            .create_topics(
                [&NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        for result in created {
            if let Err((name, code)) = result {
                if code != RDKafkaErrorCode::TopicAlreadyExists {
                    anyhow::bail!("cannot create dead-letter topic {name}: {code}");
                }
            }
        }
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
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "matchfleet.reason",
                value: Some(letter.reason),
            })
            .insert(Header {
                key: "matchfleet.source.topic",
                value: Some(&self.source_topic),
            })
            .insert(Header {
                key: "matchfleet.source.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "matchfleet.source.offset",
                value: Some(&offset),
            });
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
