//! The `signal-demo` command of scripts/demo.sh: `publish` sample signals to a pipeline, then
//! `report` what arrived. Addresses come from the pipeline manifest, secrets from the environment
//! (the same variables the worker reads).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use signal_demo::{publish, report};
use signal_telemetry::LogArgs;

#[derive(Parser, Debug)]
#[command(
    name = "signal-demo",
    version,
    about = "Publishes sample signals to a pipeline and reports what arrived"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish sample signals, a few malformed, to a pipeline's stream with a live progress line,
    /// then wait until the pipeline has written them.
    Publish(PublishArgs),
    /// Show rows per event type in ClickHouse, cached values in Redis and the dead letters.
    Report(ReportArgs),
}

#[derive(clap::Args, Debug)]
struct PublishArgs {
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
struct ReportArgs {
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

fn main() {
    let cli = Cli::parse();
    if let Err(error) = cli
        .log
        .init()
        .context("setting up logging")
        .and_then(|()| run(cli.command))
    {
        eprintln!("signal-demo: {error:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    let file = match &command {
        Command::Publish(args) => &args.file,
        Command::Report(args) => &args.file,
    };
    let manifest = signal_clients::manifest::load(file)
        .with_context(|| format!("invalid pipeline {}", file.display()))?
        .manifest;
    let credentials = signal_clients::credentials::from_env(&manifest.spec)
        .context("invalid credentials in the environment")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match command {
        Command::Publish(args) => {
            let options = publish::PublishOptions {
                count: args.count,
                malformed_percent: args.malformed_percent,
                in_flight: args.in_flight,
                drain_timeout: Duration::from_secs(args.drain_timeout_seconds),
            };
            runtime
                .block_on(publish::publish(&manifest, &credentials, &options))
                .context("demo publisher")
        }
        Command::Report(args) => runtime
            .block_on(report::report(
                &manifest,
                &credentials,
                &args.group_by,
                args.show,
            ))
            .context("demo report"),
    }
}
