//! matchfleet's local cluster support: the node agent that runs pods as local
//! processes, small programs the tests deploy, and helpers for the e2e tests.

pub mod fleetkit;
pub mod http;
pub mod matchkit;
pub mod node_agent;
pub mod testkit;

/// Logs to stderr in the format every matchfleet binary uses (`RUST_LOG` filters).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
