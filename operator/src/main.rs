//! The `signal-operator` command: `run` the controller, print the `crd`, run a pipeline `local`ly, or
//! the `demo` helpers of scripts/demo.sh.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kube::Client;
use signal_operator::controller::{self, Settings};
use signal_operator::http::{self, Readiness};
use signal_operator::leader_election::{LeaderElector, LeaseTiming, default_identity};
use signal_operator::local::{self, LocalOptions, demo};
use signal_operator::metrics::Metrics;
use signal_operator::telemetry::{self, LogFormat};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "signal-operator",
    version,
    about = "Runs SignalPipelines: NATS JetStream into ClickHouse"
)]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "SIGNAL_LOG_FORMAT"
    )]
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
    /// Run one pipeline file without Kubernetes: reconcile its stream, consumer and table, run its
    /// workers as processes, and follow edits of the file until SIGINT or SIGTERM.
    Local(LocalArgs),
    /// Helpers of scripts/demo.sh: publish sample signals, report what arrived.
    #[command(subcommand)]
    Demo(DemoCommand),
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

#[derive(Subcommand, Debug)]
enum DemoCommand {
    /// Publish sample signals, a few malformed, to a pipeline's stream with a live progress line,
    /// then wait until the pipeline has written them.
    Publish(DemoPublishArgs),
    /// Show rows per event type in ClickHouse, cached values in Redis and the dead letters.
    Report(DemoReportArgs),
}

#[derive(clap::Args, Debug)]
struct DemoPublishArgs {
    /// The pipeline manifest (addresses, stream, consumer and table come from it).
    #[arg(long = "file", short = 'f')]
    file: PathBuf,
    /// Number of signals to publish.
    #[arg(long, env = "SIGNAL_DEMO_MESSAGES", default_value_t = 200_000)]
    count: u64,
    /// Share of deliberately malformed signals, in percent.
    #[arg(long, env = "SIGNAL_DEMO_MALFORMED_PERCENT", default_value_t = 3.0)]
    malformed_percent: f64,
    /// Publish acknowledgements awaited at most at once.
    #[arg(long, default_value_t = 1024)]
    in_flight: usize,
    /// Seconds to wait after publishing for the pipeline to catch up.
    #[arg(long, default_value_t = 120)]
    drain_timeout_seconds: u64,
}

#[derive(clap::Args, Debug)]
struct DemoReportArgs {
    /// The pipeline manifest.
    #[arg(long = "file", short = 'f')]
    file: PathBuf,
    /// Column whose values the row counts are grouped by.
    #[arg(long, default_value = "event_type")]
    group_by: String,
    /// How many cached values and dead letters to print.
    #[arg(long, default_value_t = 3)]
    show: usize,
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
        Command::Demo(command) => exit_on_error(run_demo(command)),
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

fn run_demo(command: DemoCommand) -> Result<()> {
    let file = match &command {
        DemoCommand::Publish(args) => &args.file,
        DemoCommand::Report(args) => &args.file,
    };
    let (_, manifest) = local::load_manifest(file)?;
    let credentials = signal_model::credentials::PipelineCredentials::from_env()
        .context("invalid credentials in the environment")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match command {
        DemoCommand::Publish(args) => {
            let options = demo::PublishOptions {
                count: args.count,
                malformed_percent: args.malformed_percent,
                in_flight: args.in_flight,
                drain_timeout: Duration::from_secs(args.drain_timeout_seconds),
            };
            runtime
                .block_on(demo::publish(&manifest, &credentials, &options))
                .context("demo publisher")
        }
        DemoCommand::Report(args) => runtime
            .block_on(demo::report(
                &manifest,
                &credentials,
                &args.group_by,
                args.show,
            ))
            .context("demo report"),
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
