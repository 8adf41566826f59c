//! The local Kafka broker (KRaft, single node) does what matchfleet needs:
//! multi-partition topics at volume, and transactions with read_committed
//! isolation. Needs `e2e/cluster/up`.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

use matchfleet_e2e::testkit::Cluster;

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{nanos}")
}

async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics");
    for r in results {
        r.expect("topic created");
    }
}

fn producer(bootstrap: &str, extra: &[(&str, &str)]) -> ThreadedProducer<DefaultProducerContext> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    cfg.create().expect("producer")
}

/// Reads every partition of `topic` from the beginning up to its end,
/// returning the values per partition in order.
fn read_all(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    isolation: &str,
) -> HashMap<i32, Vec<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        ends.insert(p, high);
    }
    consumer.assign(&tpl).expect("assign");
    let mut out: HashMap<i32, Vec<String>> = HashMap::new();
    let mut positions: HashMap<i32, i64> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // Done when every partition's position reached its high watermark (which,
    // under read_committed, the last stable offset equals once no transaction is open).
    while ends
        .iter()
        .any(|(p, end)| positions.get(p).copied().unwrap_or(0) < *end)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out reading {topic}"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(msg) => {
                let msg = msg.expect("message");
                let value = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                out.entry(msg.partition()).or_default().push(value);
                positions.insert(msg.partition(), msg.offset() + 1);
            }
            // Idle: transaction markers and aborted records advance the
            // position without yielding messages, so ask for it.
            None => {
                if let Ok(pos) = consumer.position() {
                    for e in pos.elements_for_topic(topic) {
                        if let Offset::Offset(o) = e.offset() {
                            positions.insert(e.partition(), o);
                        }
                    }
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_partitions_carry_100k_messages_in_order_without_loss() {
    let c = Cluster::get();
    let topic = unique("volume");
    create_topic(&c.kafka, &topic, 8).await;

    const N: usize = 100_000;
    let p = producer(&c.kafka, &[("acks", "all")]);
    let started = std::time::Instant::now();
    for i in 0..N {
        let key = format!("user-{}", i % 997);
        let value = format!("{i}");
        let mut record = BaseRecord::to(&topic).key(&key).payload(&value);
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "send failed: {e}"
                    );
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).expect("flush");
    let produced_in = started.elapsed();

    let started = std::time::Instant::now();
    let read = read_all(&c.kafka, &topic, 8, "read_uncommitted");
    let consumed_in = started.elapsed();
    let total: usize = read.values().map(Vec::len).sum();
    assert_eq!(total, N, "every message read exactly once");
    assert_eq!(read.len(), 8, "messages spread over all 8 partitions");
    let mut seen = vec![false; N];
    for values in read.values() {
        // One producer with idempotence: per partition, values keep send order.
        let nums: Vec<usize> = values.iter().map(|v| v.parse().unwrap()).collect();
        assert!(
            nums.windows(2).all(|w| w[0] < w[1]),
            "partition out of order"
        );
        for n in nums {
            assert!(!seen[n], "duplicate {n}");
            seen[n] = true;
        }
    }
    println!(
        "100k messages over 8 partitions: produced in {produced_in:?}, consumed in {consumed_in:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_committed_sees_only_committed_transactions() {
    let c = Cluster::get();
    let topic = unique("txn");
    create_topic(&c.kafka, &topic, 1).await;
    let txn_id = unique("txn-producer");
    let p = producer(&c.kafka, &[("transactional.id", &txn_id)]);
    p.init_transactions(Duration::from_secs(30))
        .expect("init_transactions");

    p.begin_transaction().expect("begin");
    for i in 0..10 {
        p.send(
            BaseRecord::to(&topic)
                .key("k")
                .payload(&format!("committed-{i}")),
        )
        .map_err(|(e, _)| e)
        .expect("send");
    }
    p.commit_transaction(Duration::from_secs(30))
        .expect("commit");

    p.begin_transaction().expect("begin");
    for i in 0..10 {
        p.send(
            BaseRecord::to(&topic)
                .key("k")
                .payload(&format!("aborted-{i}")),
        )
        .map_err(|(e, _)| e)
        .expect("send");
    }
    p.flush(Duration::from_secs(30)).expect("flush");
    p.abort_transaction(Duration::from_secs(30)).expect("abort");

    let committed = read_all(&c.kafka, &topic, 1, "read_committed");
    let values = committed.get(&0).cloned().unwrap_or_default();
    let expected: Vec<String> = (0..10).map(|i| format!("committed-{i}")).collect();
    assert_eq!(
        values, expected,
        "read_committed sees the committed transaction only"
    );

    // The aborted records are in the log: read_uncommitted sees them, so the
    // filtering above is the broker's transaction handling, not an empty log.
    let uncommitted = read_all(&c.kafka, &topic, 1, "read_uncommitted");
    let aborted = uncommitted[&0]
        .iter()
        .filter(|v| v.starts_with("aborted-"))
        .count();
    assert_eq!(aborted, 10);
}
