//! The `signal-operator` command: `run` the controller, print the `crd`, or run a pipeline `local`ly.
//! (The demo's publisher and report are the `signal-demo` command.)

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kube::Client;
use signal_operator::controller::{self, Settings};
use signal_operator::dataplane::connections::ConnectionLimits;
use signal_operator::leader_election::{LeaderElector, LeaseTiming, default_identity};
use signal_operator::local::{self, LocalOptions};
use signal_operator::metrics::Metrics;
use signal_telemetry::LogArgs;
use signal_telemetry::http::{self, Readiness};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "signal-operator",
    version,
    about = "Runs SignalPipelines: NATS JetStream into ClickHouse"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller against the cluster of the current kubeconfig or service account.
    Run(RunArgs),
    /// Print the SignalPipeline CustomResourceDefinition as YAML.
    Crd,
    /// Run one pipeline file without Kubernetes: reconcile its stream, consumer and table, run its
    /// workers as processes, and follow edits of the file until SIGINT or SIGTERM.
    Local(LocalArgs),
}

#[derive(clap::Args, Debug)]
struct LocalArgs {
    /// The SignalPipeline manifest (YAML) to run; edits are picked up while running.
    #[arg(long = "file", short = 'f')]
    file: PathBuf,
    /// The `signal-worker` executable (default: next to this executable).
    #[arg(long, env = "SIGNAL_WORKER_BINARY")]
    worker_binary: Option<PathBuf>,
    /// Metrics port of the first worker; worker N listens on this port + N.
    #[arg(long, env = "SIGNAL_LOCAL_METRICS_BASE_PORT", default_value_t = 9090)]
    metrics_base_port: u16,
    /// Address the workers' metrics endpoints listen on.
    #[arg(long, default_value = "127.0.0.1")]
    metrics_host: IpAddr,
    /// Seconds a stopping worker may take to flush and acknowledge before it is killed.
    #[arg(long, default_value_t = 30)]
    stop_grace_seconds: u64,
    /// On exit, remove the stream, consumer and table as deleting the resource would (only with
    /// `deletionPolicy: Delete`).
    #[arg(long)]
    delete_on_exit: bool,
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
    /// How long a `deletionPolicy: Delete` cleanup may keep failing (servers unreachable) before
    /// the finalizer is released anyway, with a `CleanupAbandoned` event, e.g. `5m`.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    cleanup_timeout: std::time::Duration,
    /// How often a healthy pipeline's stream, consumer and table are looked at again; also how
    /// fresh the status figures (the LAG column) are, e.g. `60s`.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    resync_interval: std::time::Duration,
    /// Reconciles running at once (of different pipelines).
    #[arg(long, default_value_t = 32)]
    concurrency: u16,
    /// Reconciles working on one NATS server at once; the rest wait their turn.
    #[arg(long, default_value_t = 16)]
    max_per_nats_server: usize,
    /// Reconciles working on one ClickHouse server at once; the rest wait their turn.
    #[arg(long, default_value_t = 8)]
    max_per_clickhouse_server: usize,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    signal_model::HumanDuration::parse(text).map(|duration| duration.0)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log.init().context("setting up logging")?;
    match cli.command {
        Command::Crd => {
            print!(
                "{}",
                signal_operator::crd::crd_yaml().context("building the CRD")?
            );
            Ok(())
        }
        Command::Run(args) => tokio::runtime::Runtime::new()
            .context("starting the async runtime")?
            .block_on(run(args)),
        Command::Local(args) => exit_on_error(run_local(args)),
    }
}

/// Ends the process with status 1 and one line that names what is wrong (e.g. the invalid field
/// of a pipeline file), for commands people run by hand or from scripts.
fn exit_on_error(result: Result<()>) -> Result<()> {
    if let Err(error) = result {
        eprintln!("signal-operator: {error:#}");
        std::process::exit(1);
    }
    Ok(())
}

fn run_local(args: LocalArgs) -> Result<()> {
    let worker_binary = match args.worker_binary {
        Some(path) => path,
        None => local::worker_binary_next_to_current_exe().context(
            "cannot locate this executable to find signal-worker next to it; pass --worker-binary",
        )?,
    };
    let options = LocalOptions {
        pipeline_file: args.file,
        worker_binary,
        metrics_host: args.metrics_host,
        metrics_base_port: args.metrics_base_port,
        stop_grace: Duration::from_secs(args.stop_grace_seconds),
        delete_on_exit: args.delete_on_exit,
    };
    // Current-thread: every worker is then forked by the main thread, which lives as long as the
    // process; PR_SET_PDEATHSIG would fire early if a forking runtime thread ended.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(local::run(options, shutdown_signal()))?;
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster service account or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let readiness = Readiness::default();

    let (_, server) = http::serve(
        args.metrics_addr,
        metrics.clone(),
        readiness.check(),
        CancellationToken::new(),
    )
    .await
    .with_context(|| format!("serving on {}", args.metrics_addr))?;
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");

    let settings = Settings {
        cleanup_timeout: args.cleanup_timeout,
        resync_interval: args.resync_interval,
        concurrency: args.concurrency.max(1),
        connection_limits: ConnectionLimits {
            nats_per_server: args.max_per_nats_server.max(1),
            clickhouse_per_server: args.max_per_clickhouse_server.max(1),
        },
        ..Settings::new(args.worker_image.clone())
    };
    let controllers = async {
        if !args.leader_election {
            let ready = readiness.clone();
            return controller::run(
                client.clone(),
                &args.namespaces,
                settings,
                metrics,
                move || ready.set(true),
            )
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
            served.context("metrics server task")?;
            error!("metrics server stopped");
            anyhow::bail!("the metrics server on {} stopped", args.metrics_addr)
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
