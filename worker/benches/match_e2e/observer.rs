//! The results as a user-facing reader sees them: a read_committed consumer
//! (configured like the worker's own results feed) notes, per result record,
//! its `closedAt`, its CreateTime and when it arrived, and counts every
//! request id it settles, so the run also checks "exactly once".
//!
//! Arrival is noted as the consumer hands each record over; parsing and
//! counting happen on another (niced) thread. Parsing in line made a large
//! window's last results "arrive" only after the reader had parsed the
//! window's first ~1,700 records, on the core the broker needs.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use matchfleet_api::matching::MatchResult;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::system::wall_millis_f64;
use crate::workload::request_seq;
use crate::Settings;

/// One result record.
#[derive(Clone, Copy)]
pub struct Sample {
    /// Wall clock when the worker closed the window (ms).
    pub closed_at: i64,
    /// The record's CreateTime: when the worker handed it to its producer (ms).
    pub created: Option<i64>,
    /// When this consumer received it (ms, fractional).
    pub visible: f64,
}

#[derive(Default)]
pub struct Observed {
    pub samples: Vec<Sample>,
    /// Times each request (by sequence number) was settled.
    settled: Vec<u8>,
    pub settled_total: u64,
    /// Request ids settled more than once.
    pub duplicates: u64,
    /// Request ids that are not the run's.
    pub unknown: u64,
    pub matched: u64,
    pub expired: u64,
    /// Records that are not a MatchResult.
    pub unparsable: u64,
}

impl Observed {
    /// Requests below `upto` (by sequence) never settled.
    pub fn missing_below(&self, upto: u64) -> u64 {
        self.settled
            .iter()
            .take(upto as usize)
            .filter(|&&n| n == 0)
            .count() as u64
    }

    fn record(&mut self, result: &MatchResult, sample: Sample) {
        self.samples.push(sample);
        match result {
            MatchResult::Matched { .. } => self.matched += 1,
            MatchResult::Expired { .. } => self.expired += 1,
        }
        for id in result.request_ids() {
            let slot = request_seq(id).and_then(|seq| self.settled.get_mut(seq as usize));
            match slot {
                Some(n) => {
                    if *n > 0 {
                        self.duplicates += 1;
                    }
                    *n = n.saturating_add(1);
                    self.settled_total += 1;
                }
                None => self.unknown += 1,
            }
        }
    }
}

pub struct Observer {
    state: Arc<Mutex<Observed>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    parser: std::thread::JoinHandle<()>,
}

/// A record as it arrived, before it is parsed.
struct Arrival {
    payload: Option<Vec<u8>>,
    created: Option<i64>,
    visible: f64,
}

impl Observer {
    /// Starts reading the results topic from the beginning; `capacity` is
    /// the number of requests the run will make.
    pub fn start(s: &Settings, capacity: u64) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &s.bootstrap)
            .set("group.id", format!("{}.observer", s.topic()))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            // As the worker's results feed: a fetch waits at most 5 ms.
            .set("fetch.wait.max.ms", "5")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..s.partitions {
            tpl.add_partition_offset(&s.results_topic(), p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let state = Arc::new(Mutex::new(Observed {
            settled: vec![0; capacity as usize],
            ..Observed::default()
        }));
        let stop = CancellationToken::new();
        let (arrivals, parsing) = mpsc::channel();
        let parser = {
            let state = state.clone();
            std::thread::Builder::new()
                .name("results-parser".into())
                .spawn(move || parse(parsing, state))?
        };
        let task = tokio::spawn(read(consumer, arrivals, stop.clone()));
        Ok(Observer {
            state,
            stop,
            task,
            parser,
        })
    }

    /// Requests settled so far.
    pub fn settled(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.settled_total)
    }

    /// Waits until `n` requests are settled, or `limit` passes.
    pub async fn wait_settled(&self, n: u64, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        while self.settled() < n {
            if tokio::time::Instant::now() > until
                || self.task.is_finished()
                || self.parser.is_finished()
            {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    pub async fn stop(self) -> Observed {
        self.stop.cancel();
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("match_e2e: the results reader failed: {e:#}"),
            Err(e) => eprintln!("match_e2e: the results reader panicked: {e}"),
        }
        // The reader is gone, and with it the channel: the parser finishes.
        let parser = self.parser;
        if let Ok(Err(_)) = tokio::task::spawn_blocking(move || parser.join()).await {
            eprintln!("match_e2e: the results parser panicked");
        }
        match Arc::try_unwrap(self.state) {
            Ok(m) => m.into_inner().unwrap_or_default(),
            Err(shared) => shared
                .lock()
                .map(|mut s| std::mem::take(&mut *s))
                .unwrap_or_default(),
        }
    }
}

async fn read(
    consumer: StreamConsumer,
    arrivals: mpsc::Sender<Arrival>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut stream = consumer.stream();
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = stream.next() => m,
        };
        let Some(message) = message else {
            anyhow::bail!("the results stream ended");
        };
        let message = message?;
        let arrival = Arrival {
            visible: wall_millis_f64(),
            created: message.timestamp().to_millis(),
            payload: message.payload().map(<[u8]>::to_vec),
        };
        if arrivals.send(arrival).is_err() {
            anyhow::bail!("the results parser is gone");
        }
    }
}

/// Parses and counts the arrivals until the reader goes.
fn parse(arrivals: mpsc::Receiver<Arrival>, state: Arc<Mutex<Observed>>) {
    // Behind the reader and the broker on their core: nothing here is timed.
    // SAFETY: a syscall without pointers, on the calling thread's own id.
    #[allow(unsafe_code)]
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
    for arrival in arrivals {
        let parsed = arrival
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_slice::<MatchResult>(p).ok());
        let Ok(mut observed) = state.lock() else {
            return;
        };
        match parsed {
            Some(result) => {
                let closed_at = match &result {
                    MatchResult::Matched { closed_at, .. }
                    | MatchResult::Expired { closed_at, .. } => *closed_at,
                };
                let sample = Sample {
                    closed_at,
                    created: arrival.created,
                    visible: arrival.visible,
                };
                observed.record(&result, sample);
            }
            None => observed.unparsable += 1,
        }
    }
}
