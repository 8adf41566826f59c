//! `demo-events BOOTSTRAP TOPIC PARTITIONS COUNT`: creates the topic if it
//! is missing and produces COUNT render events keyed `user-NNNNN`, for
//! `make run`'s example RenderJob.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(bootstrap), Some(topic), Some(partitions), Some(count)) = (
        args.get(1),
        args.get(2),
        args.get(3).and_then(|p| p.parse::<i32>().ok()),
        args.get(4).and_then(|c| c.parse::<u32>().ok()),
    ) else {
        eprintln!("usage: demo-events BOOTSTRAP TOPIC PARTITIONS COUNT");
        std::process::exit(2);
    };
    if let Err(e) = run(bootstrap, topic, partitions, count).await {
        eprintln!("demo-events: {e}");
        std::process::exit(1);
    }
}

async fn run(bootstrap: &str, topic: &str, partitions: i32, count: u32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let created = admin
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in created {
        if let Err((name, code)) = r {
            if code != RDKafkaErrorCode::TopicAlreadyExists {
                anyhow::bail!("creating {name}: {code}");
            }
        }
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    let sends = (0..count).map(|i| {
        let key = format!("user-{i:05}");
        let value = format!("{{\"user\":{i},\"clip\":\"swipe-night\"}}");
        let producer = &producer;
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))
        }
    });
    for r in futures::future::join_all(sends).await {
        r?;
    }
    println!("{count} events on {topic} ({partitions} partitions)");
    Ok(())
}
