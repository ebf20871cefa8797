//! `signal-worker`: the batch writer the operator launches (and local mode runs as processes).
//!
//! Reads a SignalPipeline manifest, takes secrets from the environment, and moves the pipeline's
//! JetStream consumer into its ClickHouse table until SIGTERM or SIGINT, then flushes and exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use signal_telemetry::LogArgs;
use signal_worker::pipeline::{self, WorkerOptions};
use tokio_util::sync::CancellationToken;

// Every message allocates a few short-lived buffers (replies, headers, futures) that another
// thread often frees; glibc's malloc spent a fifth of a poisoned drain's CPU on them (arena
// locks, consolidation). mimalloc took a fifth off the worker's CPU per signal at 20% poison
// (end_to_end bench), at about 10 MiB more peak RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Moves signals from a NATS JetStream consumer into a ClickHouse table.
#[derive(Parser, Debug)]
#[command(name = "signal-worker", version)]
struct Args {
    /// The SignalPipeline manifest (YAML) to run.
    #[arg(long, env = "SIGNAL_PIPELINE_FILE")]
    pipeline: PathBuf,
    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, default_value = "0.0.0.0:9090", env = "SIGNAL_WORKER_LISTEN")]
    listen: SocketAddr,
    /// Create the durable consumer if it does not exist (standalone use without the operator).
    #[arg(long)]
    ensure_consumer: bool,
    /// This worker's name in its health reports (default: the pod name, else the host name).
    #[arg(long, env = "SIGNAL_WORKER_NAME")]
    worker_name: Option<String>,
    #[command(flatten)]
    log: LogArgs,
}

fn main() {
    let args = Args::parse();
    if let Err(error) = args
        .log
        .init()
        .context("cannot set up logging")
        .and_then(|()| run(args))
    {
        eprintln!("signal-worker: {}", one_line(&error));
        std::process::exit(1);
    }
}

/// The error and its causes on one line. Many errors already quote their cause in their own
/// message (`cannot read FILE: No such file`) and also return it as `source()`, so a cause whose
/// text is already on the line is not repeated.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace(['\r', '\n'], " ")
}

fn run(args: Args) -> anyhow::Result<()> {
    let manifest = signal_clients::manifest::load(&args.pipeline)
        .with_context(|| format!("invalid pipeline {}", args.pipeline.display()))?
        .manifest;
    let credentials = signal_clients::credentials::from_env(&manifest.spec)
        .context("invalid credentials in the environment")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let options = WorkerOptions {
            manifest,
            credentials,
            listen: args.listen,
            ensure_consumer: args.ensure_consumer,
            worker_name: args.worker_name.unwrap_or_else(default_worker_name),
        };
        pipeline::run(options, shutdown, None)
            .await
            .context("worker failed")
    })
}

/// The pod name (downward API `POD_NAME`), else the host name and process id.
fn default_worker_name() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    })
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the worker with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: flushing and stopping"),
        _ = int.recv() => tracing::info!("SIGINT: flushing and stopping"),
    }
    shutdown.cancel();
}
