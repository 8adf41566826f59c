//! The matchfleet worker: the progress service, the fleet member machinery
//! (leases, heartbeats) and the modes that run on it (render; match next).

pub mod dead_letters;
pub mod fleet;
pub mod health;
pub mod match_mode;
pub mod matching;
pub mod progress;
pub mod render;
pub mod topics;

use std::net::IpAddr;

/// The pod's own address (`POD_IP`, from the downward API), else loopback.
pub fn pod_ip() -> IpAddr {
    std::env::var("POD_IP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
    tracing::info!("shutting down");
}

/// Logs to stderr (`RUST_LOG` filters; default info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
