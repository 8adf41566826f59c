//! `matchfleet-operator`: admin endpoints always; the RenderJob and
//! MatchPipeline controllers while this replica holds the leader Lease (or
//! always, without election).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgAction, Parser, ValueEnum};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::watch;

use matchfleet_operator::controller::Context;
use matchfleet_operator::http::{self, Health, Phase};
use matchfleet_operator::leader::{self, LeaderConfig};
use matchfleet_operator::metrics::Metrics;
use matchfleet_operator::progress_client::ProgressClient;
use matchfleet_operator::{pipeline, reconcile};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "matchfleet-operator",
    version,
    about = "The matchfleet operator: reconciles RenderJobs and MatchPipelines into progress services, worker fleets and assignments"
)]
struct Args {
    /// Run the controller only while holding the leader Lease (`--leader-elect=false` to run it unconditionally).
    #[arg(
        long,
        env = "LEADER_ELECT",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = ArgAction::Set
    )]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "matchfleet-operator")]
    lease_name: String,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "matchfleet-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease and in Events; default `$HOSTNAME-<pid>`.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of /metrics, /healthz and /readyz; default `$POD_IP:8080`, else `0.0.0.0:8080`.
    #[arg(long, env = "OPERATOR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Log format on stderr (`RUST_LOG` filters; default info).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in pod log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Pods bind to their own IP (the local cluster gives each pod a loopback
/// address), so `$POD_IP` wins over the wildcard.
fn listen_addr(flag: Option<SocketAddr>, pod_ip: Option<String>) -> SocketAddr {
    flag.unwrap_or_else(|| {
        let ip = pod_ip
            .and_then(|s| s.parse::<IpAddr>().ok())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        SocketAddr::new(ip, 8080)
    })
}

/// Completes on SIGTERM or SIGINT.
async fn signal() {
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
}

/// Completes once shutdown was asked for.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Both controllers, on one context (one Kafka client cache, one set of
/// metrics), until shutdown was asked for and their reconciles ended.
async fn controllers(ctx: Arc<Context>, stop: watch::Receiver<bool>) {
    tokio::join!(
        reconcile::run(ctx.clone(), stopped(stop.clone())),
        pipeline::reconcile::run(ctx, stopped(stop)),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "matchfleet-operator".to_string());
        format!("{host}-{}", std::process::id())
    });
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        %identity,
        leader_elect = args.leader_elect,
        "matchfleet-operator starting"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let metrics = Arc::new(Metrics::default());
    let health = Health::default();
    let addr = listen_addr(args.listen, std::env::var("POD_IP").ok());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the admin endpoints"))?;
    let (http_stop_tx, http_stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        stopped(http_stop_rx),
    ));

    let client = Client::try_default()
        .await
        .context("no Kubernetes client configuration (KUBECONFIG or in-cluster)")?;
    let progress = ProgressClient::new().context("building the HTTP client")?;
    let ctx = Arc::new(Context::new(
        client.clone(),
        progress,
        metrics.clone(),
        identity.clone(),
    ));

    if args.leader_elect {
        health.set(Phase::StandingBy);
        let cfg = LeaderConfig::new(
            args.lease_name.clone(),
            args.lease_namespace.clone(),
            identity,
        );
        let leases: Api<Lease> = Api::namespaced(client, &args.lease_namespace);
        let mut leadership = tokio::select! {
            l = leader::acquire(leases, cfg) => l,
            _ = stopped(stop_rx.clone()) => {
                health.set(Phase::Stopping);
                let _ = http_stop_tx.send(true);
                let _ = server.await;
                return Ok(());
            }
        };
        metrics.set_leader(true);
        health.set(Phase::Leading);
        let controller = controllers(ctx, stop_rx.clone());
        tokio::select! {
            lost = leadership.hold() => {
                // Exit rather than wind down: a fresh process drops every
                // watch and in-flight reconcile at once, and the Deployment
                // restarts us as a candidate.
                tracing::error!(reason = %lost, "lost the leader Lease; exiting so one leader acts at a time");
                std::process::exit(1);
            }
            _ = controller => {}
        }
        health.set(Phase::Stopping);
        metrics.set_leader(false);
        let _ = tokio::time::timeout(Duration::from_secs(5), leadership.release()).await;
    } else {
        health.set(Phase::Leading);
        controllers(ctx, stop_rx.clone()).await;
        health.set(Phase::Stopping);
    }
    let _ = http_stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_elect_flag_forms() {
        let parse =
            |a: &[&str]| Args::try_parse_from([&["matchfleet-operator"], a].concat()).unwrap();
        assert!(parse(&[]).leader_elect);
        assert!(parse(&["--leader-elect"]).leader_elect);
        assert!(!parse(&["--leader-elect=false"]).leader_elect);
        assert!(parse(&["--leader-elect=true"]).leader_elect);
    }

    #[test]
    fn listens_on_the_pod_ip() {
        assert_eq!(
            listen_addr(None, Some("127.1.0.5".into())),
            "127.1.0.5:8080".parse().unwrap()
        );
        assert_eq!(listen_addr(None, None), "0.0.0.0:8080".parse().unwrap());
        assert_eq!(
            listen_addr(None, Some("junk".into())),
            "0.0.0.0:8080".parse().unwrap()
        );
        let flag = Some("127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            listen_addr(flag, Some("127.1.0.5".into())),
            "127.0.0.1:9000".parse().unwrap()
        );
    }
}
