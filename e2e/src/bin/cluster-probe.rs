//! Health checks for `e2e/cluster/up` and `status`: `cluster-probe kafka ADDR`
//! exits 0 once the broker answers a metadata request.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ok = match args.get(1).map(String::as_str) {
        Some("kafka") => kafka(args.get(2).map(String::as_str).unwrap_or("127.0.0.1:9092")),
        _ => {
            eprintln!("usage: cluster-probe kafka BOOTSTRAP");
            std::process::exit(2);
        }
    };
    std::process::exit(if ok { 0 } else { 1 });
}

fn kafka(bootstrap: &str) -> bool {
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "3")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kafka client: {e}");
            return false;
        }
    };
    match consumer.fetch_metadata(None, Duration::from_secs(3)) {
        Ok(md) => !md.brokers().is_empty(),
        Err(e) => {
            eprintln!("kafka metadata: {e}");
            false
        }
    }
}
