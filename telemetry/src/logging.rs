//! Logging setup: human-readable lines for a terminal, JSON lines for a cluster's log pipeline.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// The logging flags every command takes (`--log-format`, `--log-level`), for `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "SIGNAL_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `signal_operator=debug,kube=info` (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info", env = "SIGNAL_LOG_LEVEL")]
    pub log_level: String,
}

impl LogArgs {
    /// Installs the global subscriber these flags ask for (see [`init`]).
    pub fn init(&self) -> Result<(), TelemetryError> {
        init(self.log_format, &self.log_level)
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log level `{level}`: {source}")]
    Filter {
        level: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("logging was already set up: {0}")]
    AlreadySet(String),
}

/// Installs the global subscriber, writing to stderr. `level` is an `EnvFilter` directive (`info`,
/// `signal_operator=debug,kube=info`); `RUST_LOG` overrides it when set.
pub fn init(format: LogFormat, level: &str) -> Result<(), TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => EnvFilter::try_new(&directive),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|source| TelemetryError::Filter {
        level: level.to_string(),
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|error| TelemetryError::AlreadySet(error.to_string()))
}
