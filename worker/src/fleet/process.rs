//! The life of a fleet worker process, the same for every mode: health and
//! metrics endpoints, SIGTERM turned into a drain, the lease keeper until it
//! has handed everything back, then the endpoints stop.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::keeper::{KeeperStats, LeaseKeeper, PartitionWorker};
use crate::health::{self, Probe};

/// Runs `keeper` until it has drained (after SIGTERM/SIGINT, within
/// `drain_timeout`), serving `/healthz`, `/readyz` (ready = the keeper is)
/// and `/metrics` (`metrics` renders the mode's counters with the keeper's)
/// on `listen` meanwhile. Cancels `http_stop` when the work is over, which
/// ends these endpoints and any the mode serves on the same token.
pub async fn run<W: PartitionWorker>(
    keeper: LeaseKeeper<W>,
    listen: SocketAddr,
    metrics: impl Fn(&KeeperStats) -> String + Send + Sync + 'static,
    drain_timeout: Duration,
    http_stop: CancellationToken,
) -> std::io::Result<()> {
    let stats = keeper.stats.clone();
    let ready: Probe<bool> = {
        let stats = stats.clone();
        Arc::new(move || stats.ready.load(Ordering::SeqCst))
    };
    let metrics_text: Probe<String> = Arc::new(move || metrics(&stats));
    let endpoints = health::serve(
        listen,
        ready,
        metrics_text,
        http_stop.clone().cancelled_owned(),
    );
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        signal.cancel();
    });
    let work = async {
        keeper.run(shutdown, drain_timeout).await;
        http_stop.cancel();
    };
    // Joined rather than spawned: the endpoints live exactly as long as the work.
    let ((), served) = tokio::join!(work, endpoints);
    served
}
