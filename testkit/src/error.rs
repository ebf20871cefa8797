//! The one error type of the testkit.
//!
//! Every failure carries enough context to be understood from a test's panic message alone:
//! a missing binary names the `apt-get install` command, a server that does not come up
//! includes the tail of its log file, and a ClickHouse or Redis error carries the server's
//! own message.

use std::io;
use std::process::ExitStatus;
use std::time::Duration;

/// Result alias used throughout the testkit.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while starting, talking to or stopping a test server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server binary could not be found (or the override points at nothing executable).
    #[error(
        "{program} not found ({searched}); install it with `{install}` \
         (or run scripts/install-test-deps.sh), or point {env_var} at the binary"
    )]
    BinaryNotFound {
        /// The program that was looked for, e.g. `nats-server`.
        program: &'static str,
        /// The environment variable that overrides the lookup.
        env_var: &'static str,
        /// Human-readable description of where it was looked for.
        searched: String,
        /// The command that installs it on Debian.
        install: &'static str,
    },

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The server process started but did not become ready in time.
    #[error("{server} did not become ready within {timeout:?}; last log lines:\n{log_tail}")]
    StartTimeout {
        /// Which server.
        server: &'static str,
        /// How long we waited.
        timeout: Duration,
        /// The end of the server's log file(s).
        log_tail: String,
    },

    /// The server process exited while we were waiting for it to become ready.
    #[error("{server} exited during startup ({status}); last log lines:\n{log_tail}")]
    Exited {
        /// Which server.
        server: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// The end of the server's log file(s).
        log_tail: String,
    },

    /// Several attempts to start a server all lost a race for their ports.
    #[error(
        "{server} could not bind free ports after {attempts} attempts; last log lines:\n{log_tail}"
    )]
    PortsInUse {
        /// Which server.
        server: &'static str,
        /// How many port sets were tried.
        attempts: u32,
        /// The end of the server's log file(s) from the last attempt.
        log_tail: String,
    },

    /// No free loopback port could be found.
    #[error("no free TCP port found on 127.0.0.1")]
    NoFreePort,

    /// The operation needs a running server but it was stopped.
    #[error("{0} is not running")]
    NotRunning(&'static str),

    /// ClickHouse answered a query with a non-200 status.
    #[error("ClickHouse returned HTTP {status}: {message}")]
    ClickHouse {
        /// HTTP status code.
        status: u16,
        /// The server's error message (response body).
        message: String,
    },

    /// Redis answered a command with an error reply (`WRONGTYPE …`), or could not be asked.
    #[error("Redis error: {0}")]
    Redis(String),

    /// A server sent something the tiny HTTP client here does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),

    /// A server the suite builds from Go modules (the Kubernetes control plane, the current
    /// nats-server) has not been built, or the override names nothing.
    #[error(
        "{what} {path} does not exist: build it with `{script}` (Go >= 1.26 and the Go module \
         proxy), or point {env_var} at it"
    )]
    NotBuilt {
        /// What is missing, e.g. "the Kubernetes control plane binary".
        what: &'static str,
        /// Where it was looked for.
        path: std::path::PathBuf,
        /// The script that builds it.
        script: &'static str,
        /// The environment variable that overrides the lookup.
        env_var: &'static str,
    },

    /// The control plane shared by a test binary failed to start (for the first caller).
    #[error("the shared Kubernetes control plane did not start: {0}")]
    SharedStartFailed(String),

    /// The Kubernetes API server refused a request.
    #[error("Kubernetes API returned HTTP {status}: {message}")]
    Kubernetes {
        /// HTTP status code.
        status: u16,
        /// The server's answer (a `Status` object as JSON).
        message: String,
    },

    /// A certificate or key could not be made, or TLS could not be set up with it.
    #[error("certificate: {0}")]
    Certificate(String),

    /// An OCI image archive could not be made.
    #[error("image: {0}")]
    Image(String),

    /// A node could not be set up or torn down: a command failed, or root is needed.
    #[error("node: {0}")]
    Node(String),

    /// A child process did not exit within the allowed time.
    #[error("{what} did not exit within {after:?}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
}

impl Error {
    /// Wraps an [`io::Error`] with a description of what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds context to `io::Result`s.
pub(crate) trait IoContext<T> {
    /// Maps the error into [`Error::Io`] with the given context.
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
