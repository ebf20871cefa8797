//! The `signal-operator` command: `run` the controller, print the `crd`, or run a pipeline `local`ly.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kube::Client;
use signal_operator::controller::{self, Settings};
use signal_operator::http::{self, Readiness};
use signal_operator::leader_election::{LeaderElector, LeaseTiming, default_identity};
use signal_operator::metrics::Metrics;
use signal_operator::telemetry::{self, LogFormat};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(name = "signal-operator", version, about = "Runs SignalPipelines: NATS JetStream into ClickHouse")]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "human", env = "SIGNAL_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `signal_operator=debug,kube=info` (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info", env = "SIGNAL_LOG_LEVEL")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller against the cluster of the current kubeconfig or service account.
    Run(RunArgs),
    /// Print the SignalPipeline CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Namespace to watch; repeat for several. All namespaces when absent.
    #[arg(long = "namespace", short = 'n')]
    namespaces: Vec<String>,
    /// Worker image for pipelines that do not set `spec.workers.image`.
    #[arg(long, env = "SIGNAL_WORKER_IMAGE", default_value = concat!("ghcr.io/signal-operator/signal-worker:", env!("CARGO_PKG_VERSION")))]
    worker_image: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Reconcile only while holding the leader Lease (for more than one replica).
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the leader Lease (default: POD_NAMESPACE, else the client's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, &cli.log_level).context("setting up logging")?;
    match cli.command {
        Command::Crd => {
            print!("{}", signal_operator::crd::crd_yaml().context("building the CRD")?);
            Ok(())
        }
        Command::Run(args) => tokio::runtime::Runtime::new()
            .context("starting the async runtime")?
            .block_on(run(args)),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster service account or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let readiness = Readiness::default();

    let server = tokio::spawn(http::serve(
        args.metrics_addr,
        metrics.clone(),
        readiness.clone(),
    ));
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");

    let settings = Settings::new(args.worker_image.clone());
    let controllers = async {
        if !args.leader_election {
            let ready = readiness.clone();
            return controller::run(client.clone(), &args.namespaces, settings, metrics, move || {
                ready.set(true)
            })
            .await
            .map_err(anyhow::Error::from);
        }
        let namespace = args
            .leader_election_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let elector = LeaderElector::new(
            client.clone(),
            &namespace,
            default_identity(),
            LeaseTiming::default(),
        );
        // A standby is healthy and ready: it serves probes and waits for the Lease.
        readiness.set(true);
        loop {
            tokio::select! {
                () = elector.acquire() => {}
                () = shutdown_signal() => {
                    info!("shutdown signal while standing by");
                    return Ok(());
                }
            }
            let run = controller::run(
                client.clone(),
                &args.namespaces,
                settings.clone(),
                metrics.clone(),
                || {},
            );
            tokio::select! {
                result = run => {
                    elector.release().await;
                    return result.map_err(anyhow::Error::from);
                }
                () = elector.hold() => {
                    warn!(identity = elector.identity(), "lost the leader lease; standing by again");
                }
            }
        }
    };

    tokio::select! {
        result = controllers => result,
        served = server => {
            let outcome = served.context("metrics server task")?;
            error!("metrics server stopped");
            outcome.with_context(|| format!("serving on {}", args.metrics_addr))
        }
    }
}

/// Resolves on SIGINT or SIGTERM, for a standby; a running controller reacts to them itself.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
