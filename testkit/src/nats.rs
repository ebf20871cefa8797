//! A real `nats-server` with JetStream for tests.
//!
//! [`NatsServer::start`] runs `nats-server -js -sd <tmp>/js -a 127.0.0.1 -p <free port>` with a
//! unique server name and a fixed JetStream store limit (so what a test can place does not depend
//! on the machine's free disk), and waits until the server's INFO line shows that name with
//! `"jetstream":true` *and* the JetStream API answers an account-info request, so a test can
//! create streams right away. [`NatsServer::restart`] reuses the port and store directory, so
//! JetStream data survives. The process is killed on drop and when the test process dies.
//!
//! [`NatsServer::start_current`] runs the current release the suite builds from its Go module
//! (`scripts/build-current-nats.sh`, [`CURRENT_NATS_VERSION`]) instead of Debian's 2.9.10, for
//! what only newer servers have (a stream's subject transform).
//!
//! [`NatsServer::start_with_tls`] serves TLS only (`--tls`, and `--tlsverify` when client
//! certificates are required); its readiness probe speaks the protocol over TLS.
//!
//! The nodes of a [`NatsCluster`](crate::NatsCluster) are servers of this kind started with
//! cluster arguments ([`NatsServer::start_member`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::binary::{self, GoBuilt};
use crate::error::{IoContext, Result};
use crate::ports::{PortReservation, reserve_port};
use crate::process::{self, ServerProcess};
use crate::server_tls::{Duplex, ServerTls, ServerTlsFiles};

const SERVER: &str = "nats-server";

/// The release [`NatsServer::start_current`] runs (pinned by `testkit/nats/go.mod`).
pub const CURRENT_NATS_VERSION: &str = "2.15.2";

/// Overrides where [`NatsServer::start_current`] finds its binary.
pub const CURRENT_NATS_ENV_VAR: &str = "SIGNAL_TEST_CURRENT_NATS_SERVER";

/// The current nats-server: [`CURRENT_NATS_ENV_VAR`], else `target/nats/nats-server`.
const CURRENT_NATS: GoBuilt = GoBuilt {
    what: "the current nats-server",
    in_target: "nats/nats-server",
    script: "scripts/build-current-nats.sh",
    env_var: CURRENT_NATS_ENV_VAR,
};

const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running (or stopped, restartable) `nats-server` with JetStream on 127.0.0.1.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    /// The address it listens on.
    host: Ipv4Addr,
    name: String,
    port: PortReservation,
    /// The HTTP monitoring port (`/varz`, `/connz`), when the server has one.
    monitor_port: Option<PortReservation>,
    /// Extra command-line arguments on every (re)start: a cluster member's routes, the
    /// monitoring port.
    extra_args: Vec<String>,
    process: ServerProcess,
    tls: Option<(ServerTls, ServerTlsFiles)>,
    // Declared last so the process is gone before its directory is removed.
    dir: TempDir,
}

impl NatsServer {
    /// Like [`NatsServer::start`], serving TLS only with `tls`'s certificate; [`Self::url`] is
    /// `tls://127.0.0.1:PORT`.
    pub fn start_with_tls(tls: ServerTls) -> Result<NatsServer> {
        NatsServer::start_with(binary::NATS.locate()?, Ipv4Addr::LOCALHOST, Some(tls), None)
    }

    /// Like [`NatsServer::start`], running the current release ([`CURRENT_NATS_VERSION`]) that
    /// `scripts/build-current-nats.sh` builds into `target/nats/nats-server` (or the binary
    /// [`CURRENT_NATS_ENV_VAR`] names).
    pub fn start_current() -> Result<NatsServer> {
        NatsServer::start_with(CURRENT_NATS.locate()?, Ipv4Addr::LOCALHOST, None, None)
    }

    /// Like [`NatsServer::start`], with subject mappings in the server's configuration
    /// (`mappings { "src": "dest" }`, applied to the global account), as partitioned consumers
    /// need on nats-server 2.9.
    pub fn start_with_mappings(mappings: &[(String, String)]) -> Result<NatsServer> {
        let lines: Vec<String> = mappings
            .iter()
            .map(|(source, destination)| format!("  \"{source}\": \"{destination}\""))
            .collect();
        let config = format!("mappings {{\n{}\n}}\n", lines.join("\n"));
        NatsServer::start_with(
            binary::NATS.locate()?,
            Ipv4Addr::LOCALHOST,
            None,
            Some(&config),
        )
    }

    /// Starts a new server on a free port with its own JetStream store in a temporary directory.
    pub fn start() -> Result<NatsServer> {
        NatsServer::start_on(Ipv4Addr::LOCALHOST)
    }

    /// Like [`NatsServer::start`], listening on `host` only (nats-server takes one address; e.g.
    /// a [`KubeNode`](crate::KubeNode)'s bridge address, which the pods and this machine both
    /// reach); [`Self::url`] names `host`.
    pub fn start_on(host: Ipv4Addr) -> Result<NatsServer> {
        NatsServer::start_with(binary::NATS.locate()?, host, None, None)
    }

    fn start_with(
        binary: PathBuf,
        host: Ipv4Addr,
        tls: Option<ServerTls>,
        config: Option<&str>,
    ) -> Result<NatsServer> {
        let dir = process::server_dir("nats")?;
        let config_args = write_config(dir.path(), config.unwrap_or_default())?;
        let name = process::unique_name("signal-test-nats");
        let tls = match tls {
            Some(tls) => {
                let files = tls.write(dir.path())?;
                Some((tls, files))
            }
            None => None,
        };
        let tls_ref = tls.as_ref();
        let (port, monitor_port, extra_args, process) = process::start_retrying(SERVER, || {
            let port = reserve_port()?;
            let monitor_port = reserve_port()?;
            // Monitoring on loopback only, whatever address the clients use.
            let mut extra_args = config_args.clone();
            extra_args.extend(["--http_port".to_string(), monitor_port.port().to_string()]);
            let _ = std::fs::remove_file(log_path(dir.path()));
            let process = ServerProcess::start(
                || {
                    launch(
                        &binary,
                        dir.path(),
                        &name,
                        host,
                        port.port(),
                        tls_ref,
                        &extra_args,
                    )
                },
                |child| wait_ready(child, dir.path(), &name, host, port.port(), tls_ref),
            )?;
            Ok((port, monitor_port, extra_args, process))
        })?;
        Ok(NatsServer {
            binary,
            host,
            name,
            port,
            monitor_port: Some(monitor_port),
            extra_args,
            process,
            tls,
            dir,
        })
    }

    /// Starts a cluster member named `name` on the reserved client `port` of 127.0.0.1 with
    /// `extra_args` (its cluster port and routes), and returns once it listens: its JetStream
    /// API answers only when a quorum of the cluster is up, which the cluster waits for. No
    /// retry on a lost port race: the cluster retries as a whole.
    pub(crate) fn start_member(
        name: String,
        port: PortReservation,
        extra_args: Vec<String>,
    ) -> Result<NatsServer> {
        let binary = binary::NATS.locate()?;
        let dir = process::server_dir("nats")?;
        let host = Ipv4Addr::LOCALHOST;
        let mut extra_args = extra_args;
        extra_args.extend(write_config(dir.path(), "")?);
        let process = ServerProcess::start(
            || {
                launch(
                    &binary,
                    dir.path(),
                    &name,
                    host,
                    port.port(),
                    None,
                    &extra_args,
                )
            },
            |child| {
                process::wait_until_ready(
                    SERVER,
                    child,
                    START_TIMEOUT,
                    &[log_path(dir.path())],
                    || server_info(host, port.port(), &name, None).is_ok_and(|info| info.is_some()),
                )
            },
        )?;
        Ok(NatsServer {
            binary,
            host,
            name,
            port,
            monitor_port: None,
            extra_args,
            process,
            tls: None,
            dir,
        })
    }

    /// The server's name (`server_name`, as stream and consumer cluster info names peers).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the server answers as itself and its JetStream API answers (in a cluster: a
    /// meta leader is elected).
    pub fn jetstream_ready(&self) -> bool {
        let tls = self.tls.as_ref().map(|(tls, _)| tls);
        jetstream_ready(self.host, self.port(), &self.name, tls).unwrap_or(false)
    }

    /// `nats://HOST:PORT` (`tls://` when started with [`Self::start_with_tls`]), HOST being
    /// 127.0.0.1 unless started with [`Self::start_on`].
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "nats" };
        format!("{scheme}://{}:{}", self.host, self.port())
    }

    /// The monitoring endpoint's base URL (`http://HOST:PORT`; its `/varz` has
    /// `total_connections`), for servers started alone (cluster members have none).
    pub fn monitoring_url(&self) -> Option<String> {
        self.monitor_port
            .as_ref()
            .map(|port| format!("http://{}:{}", self.host, port.port()))
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port.port()
    }

    /// The JetStream store directory (`-sd`).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// The server's log file (its stdout and stderr, across restarts).
    pub fn log_file(&self) -> PathBuf {
        log_path(self.dir.path())
    }

    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub fn stop(&mut self) {
        self.process.stop(STOP_GRACE);
    }

    /// Kills the server with SIGKILL (a crash) and waits for it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Freezes the server (SIGSTOP): connections are still accepted on its port, but nothing
    /// answers, as with a hung server. [`Self::resume`] undoes it; stopping, restarting and
    /// dropping work on a paused server.
    pub fn pause(&mut self) {
        self.process.pause();
    }

    /// Lets a paused server carry on (SIGCONT).
    pub fn resume(&mut self) {
        self.process.resume();
    }

    /// Stops the server if it runs, then starts it again on the same port with the same store
    /// directory (JetStream streams, consumers and messages survive).
    pub fn restart(&mut self) -> Result<()> {
        let (dir, name, host, port) = (self.dir.path(), &self.name, self.host, self.port.port());
        let tls = self.tls.as_ref();
        self.process.restart(
            STOP_GRACE,
            || launch(&self.binary, dir, name, host, port, tls, &self.extra_args),
            |child| wait_ready(child, dir, name, host, port, tls),
        )
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes the server's configuration file into `dir` and returns the arguments that load it:
/// what has no command-line flag (`extra`, e.g. mappings) plus a fixed JetStream file-store
/// limit. Without that limit nats-server takes 75 % of the free disk at startup, so a stream's
/// `maxBytes` (10 GiB in the production example) would be placeable or not depending on the
/// free disk of the machine running the tests. The limit is accounting only: nothing is
/// preallocated. Command-line flags still set the rest.
fn write_config(dir: &Path, extra: &str) -> Result<Vec<String>> {
    let path = dir.join("server.conf");
    let text = format!("jetstream {{\n  max_file_store: 1TB\n}}\n{extra}");
    std::fs::write(&path, text).context(|| format!("writing {}", path.display()))?;
    Ok(vec!["-c".to_string(), path.display().to_string()])
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("nats-server.log")
}

fn launch(
    binary: &Path,
    dir: &Path,
    name: &str,
    host: Ipv4Addr,
    port: u16,
    tls: Option<&(ServerTls, ServerTlsFiles)>,
    extra_args: &[String],
) -> Result<Child> {
    let log = process::append_log(&log_path(dir))?;
    let log_err = log
        .try_clone()
        .context(|| "duplicating the log file handle".to_string())?;
    let mut command = Command::new(binary);
    command.arg("-js").arg("-sd").arg(dir.join("js")).args([
        "-a",
        &host.to_string(),
        "-p",
        &port.to_string(),
        "-n",
        name,
    ]);
    if let Some((tls, files)) = tls {
        command
            .arg(if tls.requires_client_certificate() {
                "--tlsverify"
            } else {
                "--tls"
            })
            .arg("--tlscert")
            .arg(&files.cert)
            .arg("--tlskey")
            .arg(&files.key)
            .arg("--tlscacert")
            .arg(&files.ca);
    }
    command
        .args(extra_args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    process::spawn(command).context(|| format!("starting {}", binary.display()))
}

fn wait_ready(
    child: &mut Child,
    dir: &Path,
    name: &str,
    host: Ipv4Addr,
    port: u16,
    tls: Option<&(ServerTls, ServerTlsFiles)>,
) -> Result<()> {
    let tls = tls.map(|(tls, _)| tls);
    process::wait_until_ready(SERVER, child, START_TIMEOUT, &[log_path(dir)], || {
        jetstream_ready(host, port, name, tls).unwrap_or(false)
    })
}

/// Reads the server's INFO line byte by byte, so nothing after it (the TLS handshake) is
/// buffered away.
fn read_info_line(stream: &TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut reader = stream;
    while line.len() < 64 * 1024 {
        reader.read_exact(&mut byte)?;
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// A connection to the server named `name` whose INFO line says JetStream is on (and TLS
/// required when `tls` is given), or `None` when another server (or none) answers on the port.
fn server_info(
    host: Ipv4Addr,
    port: u16,
    name: &str,
    tls: Option<&ServerTls>,
) -> std::io::Result<Option<TcpStream>> {
    let addr = SocketAddr::from((host, port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;
    let info = read_info_line(&stream)?;
    let ours = info.starts_with("INFO ")
        && info.contains(&format!("\"server_name\":\"{name}\""))
        && info.contains("\"jetstream\":true")
        && (tls.is_none() || info.contains("\"tls_required\":true"));
    Ok(ours.then_some(stream))
}

/// Connects, checks the INFO line ([`server_info`]), continues over TLS when `tls` is given, and
/// checks that the JetStream API answers `$JS.API.INFO` without an error.
fn jetstream_ready(
    host: Ipv4Addr,
    port: u16,
    name: &str,
    tls: Option<&ServerTls>,
) -> std::io::Result<bool> {
    let Some(stream) = server_info(host, port, name, tls)? else {
        return Ok(false);
    };
    let stream: Box<dyn Duplex> = match tls {
        Some(tls) => Box::new(tls.client_stream(stream).map_err(std::io::Error::other)?),
        None => Box::new(stream),
    };
    let mut reader = BufReader::new(stream);

    reader.get_mut().write_all(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"name\":\"signal-testkit\"}\r\n\
          SUB _INBOX.signal_testkit 1\r\n\
          PUB $JS.API.INFO _INBOX.signal_testkit 0\r\n\r\n",
    )?;
    reader.get_mut().flush()?;
    Ok(read_reply(&mut reader)?.is_some_and(|payload| {
        payload.contains("account_info_response") && !payload.contains("\"error\"")
    }))
}

/// Reads protocol lines from `reader` (answering PINGs through it) until the first message:
/// its payload, or `None` when the server sends `-ERR` or closes the connection.
pub(crate) fn read_reply<S: Read + Write>(
    reader: &mut BufReader<S>,
) -> std::io::Result<Option<String>> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.starts_with("-ERR") {
            return Ok(None);
        }
        if line.starts_with("PING") {
            reader.get_mut().write_all(b"PONG\r\n")?;
        } else if let Some(rest) = line.strip_prefix("MSG ") {
            let len: usize = rest
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let mut payload = vec![0; len + 2];
            reader.read_exact(&mut payload)?;
            payload.truncate(len);
            return Ok(Some(String::from_utf8_lossy(&payload).into_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::ports::is_port_free;
    use crate::process::is_address_in_use;

    fn read_info(port: u16) -> String {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line
    }

    /// Sends one request over the raw NATS protocol and returns the reply payload.
    fn request(port: u16, subject: &str, payload: &[u8]) -> String {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let mut req = Vec::new();
        req.extend_from_slice(b"CONNECT {\"verbose\":false}\r\nSUB _INBOX.t 1\r\n");
        req.extend_from_slice(format!("PUB {subject} _INBOX.t {}\r\n", payload.len()).as_bytes());
        req.extend_from_slice(payload);
        req.extend_from_slice(b"\r\n");
        writer.write_all(&req).unwrap();
        loop {
            let mut line = String::new();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "connection closed"
            );
            if let Some(rest) = line.strip_prefix("MSG ") {
                let len: usize = rest.split_whitespace().last().unwrap().parse().unwrap();
                let mut payload = vec![0; len + 2];
                reader.read_exact(&mut payload).unwrap();
                payload.truncate(len);
                return String::from_utf8(payload).unwrap();
            }
        }
    }

    #[test]
    fn starts_with_jetstream_restarts_and_stops() {
        let mut nats = NatsServer::start().unwrap();
        let port = nats.port();
        assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
        assert!(nats.is_running());
        let info = read_info(port);
        assert!(info.contains("\"jetstream\":true"), "{info}");
        assert!(info.contains("\"version\":\"2."), "{info}");

        let created = request(
            port,
            "$JS.API.STREAM.CREATE.T",
            br#"{"name":"T","subjects":["t.>"],"storage":"file"}"#,
        );
        assert!(!created.contains("\"error\""), "{created}");
        // The store limit is fixed, not 75 % of the free disk: 200 GiB is reservable here.
        let big = request(
            port,
            "$JS.API.STREAM.CREATE.BIG",
            br#"{"name":"BIG","subjects":["big.>"],"storage":"file","max_bytes":214748364800}"#,
        );
        assert!(!big.contains("\"error\""), "{big}");
        let ack = request(port, "t.one", b"hello");
        assert!(ack.contains("\"seq\":1"), "{ack}");

        nats.restart().unwrap();
        assert_eq!(nats.port(), port);
        // The stream and its message survived the restart.
        let info = request(port, "$JS.API.STREAM.INFO.T", b"");
        assert!(info.contains("\"messages\":1"), "{info}");

        let pid = nats.pid().unwrap();
        nats.stop();
        assert!(!nats.is_running());
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(is_port_free(port));
    }

    #[test]
    fn a_taken_port_is_reported_as_address_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let port = reserve_port().unwrap();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", port.port())).unwrap();
        let binary = binary::NATS.locate().unwrap();
        let mut child = launch(
            &binary,
            dir.path(),
            "taken",
            Ipv4Addr::LOCALHOST,
            port.port(),
            None,
            &[],
        )
        .unwrap();
        match wait_ready(
            &mut child,
            dir.path(),
            "taken",
            Ipv4Addr::LOCALHOST,
            port.port(),
            None,
        ) {
            Err(Error::Exited { log_tail, .. }) => {
                assert!(is_address_in_use(&log_tail), "{log_tail}")
            }
            other => panic!("expected an early exit, got {other:?}"),
        }
    }

    #[test]
    fn a_paused_server_answers_nothing_until_resumed_and_still_stops() {
        let mut nats = NatsServer::start().unwrap();
        let (port, name) = (nats.port(), nats.name.clone());
        nats.pause();
        // The kernel accepts the connection; the INFO line never comes.
        assert!(!jetstream_ready(Ipv4Addr::LOCALHOST, port, &name, None).unwrap_or(false));
        nats.resume();
        assert!(jetstream_ready(Ipv4Addr::LOCALHOST, port, &name, None).unwrap());

        nats.pause();
        let pid = nats.pid().unwrap();
        drop(nats);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(is_port_free(port));
    }

    #[test]
    fn kill_then_restart_and_drop() {
        let mut nats = NatsServer::start().unwrap();
        let port = nats.port();
        nats.kill();
        assert!(!nats.is_running());
        assert!(is_port_free(port));
        nats.restart().unwrap();
        assert!(nats.is_running());
        let pid = nats.pid().unwrap();
        drop(nats);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(is_port_free(port));
    }
}
