//! A real `clickhouse-server` (Debian's 18.16) for tests.
//!
//! [`ClickHouseServer::start`] writes its own `config.xml` and `users.xml` into a temporary
//! directory (data, tmp, user files, format schemas and logs all live there), listens on
//! 127.0.0.1 only with freshly allocated HTTP, native TCP and interserver ports, and keeps its
//! footprint small: no query/part logs, no clusters, macros or dictionaries, tiny caches. It
//! waits until `GET /ping` answers `Ok.` and a query comes back from *this* server (checked by a
//! unique `display_name`). A lost race for a port is retried with a new port set.
//!
//! [`ClickHouseServer::start_with_tls`] also serves HTTPS on its own port (`<https_port>`, and
//! `<openSSL><server>` with `verificationMode` `strict` when client certificates are required);
//! Debian's 18.16 build links OpenSSL and serves it, mutual TLS included. The plain HTTP port
//! stays open for the testkit's own queries.
//!
//! [`ClickHouseServer::query`] posts SQL over plain HTTP and returns the response body.
//! [`ClickHouseServer::restart`] keeps the ports and the data directory, so tables survive. On
//! drop the server gets SIGTERM, then SIGKILL after a short grace, and the directory is removed.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::binary;
use crate::error::{Error, IoContext, Result};
use crate::http;
use crate::ports::{PortReservation, reserve_port};
use crate::process::{self, ServerProcess};
use crate::server_tls::{ServerTls, ServerTlsFiles};

const SERVER: &str = "clickhouse-server";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(15);
const DROP_GRACE: Duration = Duration::from_secs(3);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Queries in tests may be big inserts; allow them time.
const QUERY_TIMEOUT: Duration = Duration::from_secs(300);

/// The three ports a ClickHouse server listens on.
#[derive(Debug)]
pub(crate) struct Ports {
    http: PortReservation,
    tcp: PortReservation,
    interserver: PortReservation,
    https: Option<PortReservation>,
}

impl Ports {
    /// The native protocol port, which a cluster's `remote_servers` names.
    pub(crate) fn tcp(&self) -> u16 {
        self.tcp.port()
    }

    pub(crate) fn reserve(https: bool) -> Result<Ports> {
        Ok(Ports {
            http: reserve_port()?,
            tcp: reserve_port()?,
            interserver: reserve_port()?,
            https: if https { Some(reserve_port()?) } else { None },
        })
    }
}

/// A running (or stopped, restartable) `clickhouse-server` on 127.0.0.1.
#[derive(Debug)]
pub struct ClickHouseServer {
    binary: PathBuf,
    /// The address it listens on besides 127.0.0.1 (127.0.0.1 itself when none).
    host: Ipv4Addr,
    name: String,
    ports: Ports,
    process: ServerProcess,
    tls: Option<ServerTls>,
    // Declared last so the process is gone before its directory is removed.
    dir: TempDir,
}

impl ClickHouseServer {
    /// Starts a new server with its own configuration and data in a temporary directory.
    pub fn start() -> Result<ClickHouseServer> {
        ClickHouseServer::start_on(Ipv4Addr::LOCALHOST)
    }

    /// Like [`ClickHouseServer::start`], listening on `host` as well as on 127.0.0.1 (e.g. a
    /// [`KubeNode`](crate::KubeNode)'s bridge address, so pods reach it); [`Self::http_url`]
    /// names `host`.
    pub fn start_on(host: Ipv4Addr) -> Result<ClickHouseServer> {
        ClickHouseServer::start_with(host, None)
    }

    /// Like [`ClickHouseServer::start`], also serving HTTPS with `tls`'s certificate on
    /// [`Self::https_port`] ([`Self::https_url`]).
    pub fn start_with_tls(tls: ServerTls) -> Result<ClickHouseServer> {
        ClickHouseServer::start_with(Ipv4Addr::LOCALHOST, Some(tls))
    }

    fn start_with(host: Ipv4Addr, tls: Option<ServerTls>) -> Result<ClickHouseServer> {
        let binary = binary::CLICKHOUSE.locate()?;
        let dir = server_dir()?;
        let name = process::unique_name("signal-test-clickhouse");
        write_users(dir.path())?;
        let tls_files = match &tls {
            Some(tls) => Some(tls.write(dir.path())?),
            None => None,
        };
        let (ports, process) = process::start_retrying(SERVER, || {
            let ports = Ports::reserve(tls.is_some())?;
            write_config(dir.path(), &name, &ports, host, "")?;
            if let (Some(tls), Some(files), Some(https)) = (&tls, &tls_files, &ports.https) {
                add_https(dir.path(), https.port(), tls, files)?;
            }
            for log in log_paths(dir.path()) {
                let _ = std::fs::remove_file(log);
            }
            let https = ports.https.as_ref().map(PortReservation::port);
            let process = ServerProcess::start(
                || launch(&binary, dir.path()),
                |child| {
                    wait_ready(
                        child,
                        dir.path(),
                        &name,
                        ports.http.port(),
                        tls.as_ref().zip(https),
                    )
                },
            )?;
            Ok((ports, process))
        })?;
        Ok(ClickHouseServer {
            binary,
            host,
            name,
            ports,
            process,
            tls,
            dir,
        })
    }

    /// Starts a server on ports reserved by the caller, with `extra_config` (XML elements such
    /// as `<remote_servers>`, `<zookeeper>`, `<macros>`) added to its `config.xml`: one replica of
    /// a [`ClickHouseCluster`](crate::ClickHouseCluster), whose members must know each other's
    /// ports before any starts. A lost race for a port is returned, not retried.
    pub(crate) fn start_configured(ports: Ports, extra_config: &str) -> Result<ClickHouseServer> {
        let binary = binary::CLICKHOUSE.locate()?;
        let dir = server_dir()?;
        let name = process::unique_name("signal-test-clickhouse");
        let host = Ipv4Addr::LOCALHOST;
        write_users(dir.path())?;
        write_config(dir.path(), &name, &ports, host, extra_config)?;
        let process = ServerProcess::start(
            || launch(&binary, dir.path()),
            |child| wait_ready(child, dir.path(), &name, ports.http.port(), None),
        )?;
        Ok(ClickHouseServer {
            binary,
            host,
            name,
            ports,
            process,
            tls: None,
            dir,
        })
    }

    /// `https://127.0.0.1:PORT` when started with [`Self::start_with_tls`].
    pub fn https_url(&self) -> Option<String> {
        self.https_port()
            .map(|port| format!("https://127.0.0.1:{port}"))
    }

    /// The HTTPS port when started with [`Self::start_with_tls`].
    pub fn https_port(&self) -> Option<u16> {
        self.ports.https.as_ref().map(PortReservation::port)
    }

    /// `http://HOST:PORT`, HOST being 127.0.0.1 unless started with [`Self::start_on`].
    pub fn http_url(&self) -> String {
        format!("http://{}:{}", self.host, self.http_port())
    }

    /// The HTTP interface port.
    pub fn http_port(&self) -> u16 {
        self.ports.http.port()
    }

    /// The native protocol port.
    pub fn tcp_port(&self) -> u16 {
        self.ports.tcp.port()
    }

    /// The server's working directory (config.xml, users.xml, `data/`, `log/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after 15 s) and waits for it.
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

    /// Stops the server if it runs, then starts it again with the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        let (dir, name, http_port) = (self.dir.path(), &self.name, self.ports.http.port());
        let tls = self.tls.as_ref().zip(self.https_port());
        self.process.restart(
            STOP_GRACE,
            || launch(&self.binary, dir),
            |child| wait_ready(child, dir, name, http_port, tls),
        )
    }

    /// Runs one SQL statement over HTTP (POST body) and returns the response body, e.g.
    /// `"18.16.1\n"` for `SELECT version()`. A non-200 answer is [`Error::ClickHouse`] with the
    /// server's message. Inline data works too: `INSERT INTO t FORMAT JSONEachRow {...}`.
    ///
    /// `wait_end_of_query=1` makes the server buffer the result, so an error that happens after
    /// the first rows is still reported as an HTTP error rather than appended to a 200 body.
    pub fn query(&self, sql: &str) -> Result<String> {
        if self.process.pid().is_none() {
            return Err(Error::NotRunning(SERVER));
        }
        let response = http::request(
            self.http_port(),
            "POST",
            "/?wait_end_of_query=1",
            sql.as_bytes(),
            QUERY_TIMEOUT,
        )?;
        let body = String::from_utf8_lossy(&response.body).into_owned();
        if response.status == 200 {
            Ok(body)
        } else {
            Err(Error::ClickHouse {
                status: response.status,
                message: body.trim().to_string(),
            })
        }
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        self.process.stop(DROP_GRACE);
    }
}

fn log_paths(dir: &Path) -> [PathBuf; 3] {
    [
        dir.join("log/stdout.log"),
        dir.join("log/clickhouse-server.err.log"),
        dir.join("log/clickhouse-server.log"),
    ]
}

/// A new temporary directory for one server, with the subdirectories its config names.
fn server_dir() -> Result<TempDir> {
    let dir = process::server_dir("clickhouse")?;
    for sub in ["data", "tmp", "user_files", "format_schemas", "log"] {
        std::fs::create_dir_all(dir.path().join(sub))
            .context(|| format!("creating {}", dir.path().join(sub).display()))?;
    }
    Ok(dir)
}

fn launch(binary: &Path, dir: &Path) -> Result<Child> {
    let [stdout_path, ..] = log_paths(dir);
    let log = process::append_log(&stdout_path)?;
    let log_err = log
        .try_clone()
        .context(|| "duplicating the log file handle".to_string())?;
    let mut command = Command::new(binary);
    command
        .arg(format!(
            "--config-file={}",
            dir.join("config.xml").display()
        ))
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
    http_port: u16,
    tls: Option<(&ServerTls, u16)>,
) -> Result<()> {
    // Only the error log and stdout: the main log is long and would bury the cause.
    let logs = &log_paths(dir)[..2];
    process::wait_until_ready(SERVER, child, START_TIMEOUT, logs, || {
        is_ready(http_port, name)
            && tls.is_none_or(|(tls, https_port)| tls.handshake_succeeds(https_port))
    })
}

/// Adds the HTTPS port and the server's OpenSSL settings to the written `config.xml`.
fn add_https(dir: &Path, port: u16, tls: &ServerTls, files: &ServerTlsFiles) -> Result<()> {
    let path = dir.join("config.xml");
    let config =
        std::fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
    let verification = if tls.requires_client_certificate() {
        "strict"
    } else {
        "none"
    };
    let https = format!(
        "    <https_port>{port}</https_port>\n    <openSSL><server>\
         <certificateFile>{cert}</certificateFile><privateKeyFile>{key}</privateKeyFile>\
         <caConfig>{ca}</caConfig><verificationMode>{verification}</verificationMode>\
         <loadDefaultCAFile>false</loadDefaultCAFile><cacheSessions>true</cacheSessions>\
         <disableProtocols>sslv2,sslv3</disableProtocols><preferServerCiphers>true</preferServerCiphers>\
         </server></openSSL>\n</yandex>",
        cert = files.cert.display(),
        key = files.key.display(),
        ca = files.ca.display(),
    );
    let config = config.replacen("</yandex>", &https, 1);
    std::fs::write(&path, config).context(|| format!("writing {}", path.display()))
}

/// `/ping` answers `Ok.`, and a query is answered by the server with our display name (not some
/// other test's server that happens to hold the port).
fn is_ready(http_port: u16, name: &str) -> bool {
    let ping_ok = http::request(http_port, "GET", "/ping", b"", PROBE_TIMEOUT)
        .is_ok_and(|r| r.status == 200 && r.body.starts_with(b"Ok."));
    ping_ok
        && http::request(http_port, "POST", "/", b"SELECT 1", PROBE_TIMEOUT).is_ok_and(|r| {
            r.status == 200 && r.header("X-ClickHouse-Server-Display-Name") == Some(name)
        })
}

/// The server configuration, shared with `scripts/demo.sh`; `@NAME@` placeholders are filled in.
const CONFIG_TEMPLATE: &str = include_str!("../clickhouse/config.xml.in");
/// The users file (passwordless `default` on loopback), shared with `scripts/demo.sh`.
const USERS: &str = include_str!("../clickhouse/users.xml");

fn write_config(
    dir: &Path,
    name: &str,
    ports: &Ports,
    host: Ipv4Addr,
    extra_config: &str,
) -> Result<()> {
    // A fixed time zone makes DateTime text deterministic; only set it when the zone database
    // is installed (clickhouse-server does not depend on tzdata and refuses unknown zones).
    let timezone = if Path::new("/usr/share/zoneinfo/UTC").exists() {
        "<timezone>UTC</timezone>"
    } else {
        ""
    };
    let config = CONFIG_TEMPLATE
        .replace("@DIR@", &dir.display().to_string())
        .replace("@NAME@", name)
        .replace("@HTTP_PORT@", &ports.http.port().to_string())
        .replace("@TCP_PORT@", &ports.tcp.port().to_string())
        .replace("@INTERSERVER_PORT@", &ports.interserver.port().to_string())
        .replace("@TIMEZONE@", timezone);
    let loopback = "<listen_host>127.0.0.1</listen_host>";
    let config = if host.is_loopback() {
        config
    } else {
        config.replace(
            loopback,
            &format!("{loopback}<listen_host>{host}</listen_host>"),
        )
    };
    let config = config.replace("</yandex>", &format!("{extra_config}\n</yandex>"));
    let path = dir.join("config.xml");
    std::fs::write(&path, config).context(|| format!("writing {}", path.display()))
}

fn write_users(dir: &Path) -> Result<()> {
    let path = dir.join("users.xml");
    std::fs::write(&path, USERS).context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::is_port_free;
    use crate::process::is_address_in_use;

    #[test]
    fn query_restart_persistence_and_stop() {
        let mut ch = ClickHouseServer::start().unwrap();
        assert_eq!(
            ch.http_url(),
            format!("http://127.0.0.1:{}", ch.http_port())
        );
        let version = ch.query("SELECT version()").unwrap();
        assert!(version.starts_with("18.16"), "{version}");

        ch.query("CREATE TABLE t (id UInt64, name String) ENGINE = MergeTree ORDER BY id")
            .unwrap();
        ch.query("INSERT INTO t VALUES (1, 'a'), (2, 'b')").unwrap();
        ch.query(r#"INSERT INTO t FORMAT JSONEachRow {"id":3,"name":"c"}"#)
            .unwrap();
        // A large result comes back chunked.
        let numbers = ch
            .query("SELECT number FROM system.numbers LIMIT 100000")
            .unwrap();
        assert_eq!(numbers.lines().count(), 100_000);

        let (http, tcp) = (ch.http_port(), ch.tcp_port());
        ch.restart().unwrap();
        assert_eq!((ch.http_port(), ch.tcp_port()), (http, tcp));
        assert_eq!(
            ch.query("SELECT id, name FROM t ORDER BY id").unwrap(),
            "1\ta\n2\tb\n3\tc\n"
        );

        // Also after a crash.
        ch.kill();
        assert!(!ch.is_running());
        assert!(matches!(ch.query("SELECT 1"), Err(Error::NotRunning(_))));
        ch.restart().unwrap();
        assert_eq!(ch.query("SELECT count() FROM t").unwrap(), "3\n");

        let pid = ch.pid().unwrap();
        ch.stop();
        assert!(!ch.is_running());
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(is_port_free(http) && is_port_free(tcp));
    }

    #[test]
    fn a_paused_server_answers_nothing_until_resumed_and_still_stops() {
        let mut ch = ClickHouseServer::start().unwrap();
        let port = ch.http_port();
        ch.pause();
        // The kernel accepts the connection; no answer comes.
        assert!(http::request(port, "GET", "/ping", b"", PROBE_TIMEOUT).is_err());
        ch.resume();
        assert_eq!(ch.query("SELECT 1").unwrap(), "1\n");

        // Stopping, restarting and dropping work on a paused server.
        ch.pause();
        let pid = ch.pid().unwrap();
        ch.stop();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        ch.restart().unwrap();
        ch.pause();
        let pid = ch.pid().unwrap();
        drop(ch);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(is_port_free(port));
    }

    #[test]
    fn a_taken_port_is_reported_as_address_in_use() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["data", "tmp", "user_files", "format_schemas", "log"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let ports = Ports::reserve(false).unwrap();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", ports.tcp.port())).unwrap();
        write_users(dir.path()).unwrap();
        write_config(dir.path(), "taken", &ports, Ipv4Addr::LOCALHOST, "").unwrap();
        let binary = binary::CLICKHOUSE.locate().unwrap();
        let mut child = launch(&binary, dir.path()).unwrap();
        match wait_ready(&mut child, dir.path(), "taken", ports.http.port(), None) {
            Err(Error::Exited { log_tail, .. }) => {
                assert!(is_address_in_use(&log_tail), "{log_tail}")
            }
            other => panic!("expected an early exit, got {other:?}"),
        }
    }

    #[test]
    fn errors_carry_the_server_message_and_drop_cleans_up() {
        let ch = ClickHouseServer::start().unwrap();
        match ch.query("SELECT * FROM no_such_table") {
            Err(Error::ClickHouse { status, message }) => {
                assert_eq!(status, 404, "{message}");
                assert!(message.contains("doesn't exist"), "{message}");
            }
            other => panic!("expected a ClickHouse error, got {other:?}"),
        }
        // An error after the first rows is still an error thanks to wait_end_of_query.
        let late = ch.query("SELECT throwIf(number = 70000) FROM system.numbers LIMIT 100000");
        assert!(matches!(late, Err(Error::ClickHouse { .. })), "{late:?}");

        let (pid, port, dir) = (ch.pid().unwrap(), ch.http_port(), ch.dir().to_path_buf());
        drop(ch);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(is_port_free(port));
        assert!(!dir.exists());
    }
}
