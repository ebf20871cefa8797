//! A real `redis-server` for tests.
//!
//! [`RedisServer::start`] runs `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no
//! --dir <tmp>` on a free port and waits until it answers `PING` and reports our child's pid in
//! `INFO server`. [`RedisServer::command`] runs one command through the `redis` crate's synchronous
//! client. Nothing is persisted, so a restart starts empty (on the same port).
//!
//! [`RedisServer::start_with_tls`] also listens for TLS on its own port (`--tls-port`, with
//! `--tls-auth-clients yes` when client certificates are required); the plain port stays open
//! for the testkit's own commands.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::binary;
use crate::error::{Error, IoContext, Result};
use crate::ports::{PortReservation, reserve_port};
use crate::process::{self, ServerProcess};
use crate::server_tls::{ServerTls, ServerTlsFiles};

const SERVER: &str = "redis-server";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(10);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A running (or stopped, restartable) `redis-server` on 127.0.0.1 without persistence.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    /// The address it listens on besides 127.0.0.1 (127.0.0.1 itself when none).
    host: Ipv4Addr,
    port: PortReservation,
    process: ServerProcess,
    tls: Option<RedisTls>,
    // Declared last so the process is gone before its directory is removed.
    dir: TempDir,
}

/// The TLS side of a server started with [`RedisServer::start_with_tls`].
#[derive(Debug)]
struct RedisTls {
    settings: ServerTls,
    files: ServerTlsFiles,
    port: PortReservation,
}

impl RedisServer {
    /// Starts a new server on a free port with its working directory in a temporary directory.
    pub fn start() -> Result<RedisServer> {
        RedisServer::start_on(Ipv4Addr::LOCALHOST)
    }

    /// Like [`RedisServer::start`], listening on `host` as well as on 127.0.0.1 (e.g. a
    /// [`KubeNode`](crate::KubeNode)'s bridge address, so pods reach it, with protected mode off
    /// as no password is set); [`Self::url`] names `host`.
    pub fn start_on(host: Ipv4Addr) -> Result<RedisServer> {
        RedisServer::start_with(host, None)
    }

    /// Like [`RedisServer::start`], also serving TLS with `tls`'s certificate on its own port
    /// ([`Self::tls_url`]).
    pub fn start_with_tls(tls: ServerTls) -> Result<RedisServer> {
        RedisServer::start_with(Ipv4Addr::LOCALHOST, Some(tls))
    }

    fn start_with(host: Ipv4Addr, tls: Option<ServerTls>) -> Result<RedisServer> {
        let binary = binary::REDIS.locate()?;
        let dir = process::server_dir("redis")?;
        let files = match &tls {
            Some(tls) => Some(tls.write(dir.path())?),
            None => None,
        };
        let ((port, tls_port), process) = process::start_retrying(SERVER, || {
            let port = reserve_port()?;
            let tls_port = match &tls {
                Some(_) => Some(reserve_port()?),
                None => None,
            };
            let tls_launch = match (&tls, &files, &tls_port) {
                (Some(tls), Some(files), Some(tls_port)) => Some((tls, files, tls_port.port())),
                _ => None,
            };
            let _ = std::fs::remove_file(log_path(dir.path()));
            let process = ServerProcess::start(
                || launch(&binary, dir.path(), port.port(), host, tls_launch),
                |child| wait_ready(child, dir.path(), port.port(), tls_launch),
            )?;
            Ok(((port, tls_port), process))
        })?;
        let tls = match (tls, files, tls_port) {
            (Some(settings), Some(files), Some(port)) => Some(RedisTls {
                settings,
                files,
                port,
            }),
            _ => None,
        };
        Ok(RedisServer {
            binary,
            host,
            port,
            process,
            tls,
            dir,
        })
    }

    /// `rediss://127.0.0.1:TLS_PORT` when started with [`Self::start_with_tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|tls| format!("rediss://127.0.0.1:{}", tls.port.port()))
    }

    /// `redis://HOST:PORT`, HOST being 127.0.0.1 unless started with [`Self::start_on`].
    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.host, self.port())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port.port()
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

    /// Stops the server if it runs, then starts it again on the same port (empty: nothing is
    /// persisted).
    pub fn restart(&mut self) -> Result<()> {
        let (dir, port, host) = (self.dir.path(), self.port.port(), self.host);
        let tls = self
            .tls
            .as_ref()
            .map(|tls| (&tls.settings, &tls.files, tls.port.port()));
        self.process.restart(
            STOP_GRACE,
            || launch(&self.binary, dir, port, host, tls),
            |child| wait_ready(child, dir, port, tls),
        )
    }

    /// Runs one command and converts its reply, e.g.
    /// `command::<BTreeMap<String, String>>(&["HGETALL", "key"])`. An error reply is
    /// [`Error::Redis`] with the server's words.
    pub fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> Result<T> {
        if self.process.pid().is_none() {
            return Err(Error::NotRunning(SERVER));
        }
        command(self.port(), args, COMMAND_TIMEOUT)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends one command on a new connection to `127.0.0.1:port` and converts the reply.
fn command<T: redis::FromRedisValue>(port: u16, args: &[&str], timeout: Duration) -> Result<T> {
    let name = args.first().copied().unwrap_or_default();
    let failed = |error: redis::RedisError| match (error.code(), error.detail()) {
        // An error reply: the server's own line, `WRONGTYPE Operation against a key …`.
        (Some(code), Some(detail)) => Error::Redis(format!("{code} {detail}")),
        _ => Error::Redis(format!("{name:?} to 127.0.0.1:{port}: {error}")),
    };
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).map_err(failed)?;
    let mut connection = client
        .get_connection_with_timeout(timeout)
        .map_err(failed)?;
    connection.set_read_timeout(Some(timeout)).map_err(failed)?;
    connection
        .set_write_timeout(Some(timeout))
        .map_err(failed)?;
    redis::cmd(name)
        .arg(args.get(1..).unwrap_or_default())
        .query(&mut connection)
        .map_err(failed)
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("redis-server.log")
}

/// A TLS server's settings, files and port, as `launch` and `wait_ready` need them.
type TlsLaunch<'a> = Option<(&'a ServerTls, &'a ServerTlsFiles, u16)>;

fn launch(
    binary: &Path,
    dir: &Path,
    port: u16,
    host: Ipv4Addr,
    tls: TlsLaunch<'_>,
) -> Result<Child> {
    let log = process::append_log(&log_path(dir))?;
    let log_err = log
        .try_clone()
        .context(|| "duplicating the log file handle".to_string())?;
    let mut command = Command::new(binary);
    command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
    if !host.is_loopback() {
        command
            .arg(host.to_string())
            .args(["--protected-mode", "no"]);
    }
    if let Some((tls, files, tls_port)) = tls {
        let auth_clients = if tls.requires_client_certificate() {
            "yes"
        } else {
            "no"
        };
        command
            .args(["--tls-port", &tls_port.to_string()])
            .arg("--tls-cert-file")
            .arg(&files.cert)
            .arg("--tls-key-file")
            .arg(&files.key)
            .arg("--tls-ca-cert-file")
            .arg(&files.ca)
            .args(["--tls-auth-clients", auth_clients]);
    }
    command
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    process::spawn(command).context(|| format!("starting {}", binary.display()))
}

fn wait_ready(child: &mut Child, dir: &Path, port: u16, tls: TlsLaunch<'_>) -> Result<()> {
    let pid_line = format!("process_id:{}\r\n", child.id());
    process::wait_until_ready(SERVER, child, START_TIMEOUT, &[log_path(dir)], || {
        let probe = Duration::from_millis(500);
        let pong = command::<String>(port, &["PING"], probe).is_ok_and(|reply| reply == "PONG");
        pong && command::<String>(port, &["INFO", "server"], probe)
            .is_ok_and(|info| info.contains(&pid_line))
            && tls.is_none_or(|(tls, _, tls_port)| tls.handshake_succeeds(tls_port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::is_port_free;
    use crate::process::is_address_in_use;
    use std::collections::BTreeMap;

    #[test]
    fn a_taken_port_is_reported_as_address_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let port = reserve_port().unwrap();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", port.port())).unwrap();
        let binary = binary::REDIS.locate().unwrap();
        let mut child =
            launch(&binary, dir.path(), port.port(), Ipv4Addr::LOCALHOST, None).unwrap();
        match wait_ready(&mut child, dir.path(), port.port(), None) {
            Err(Error::Exited { log_tail, .. }) => {
                assert!(is_address_in_use(&log_tail), "{log_tail}")
            }
            other => panic!("expected an early exit, got {other:?}"),
        }
    }

    #[test]
    fn commands_restart_and_stop() {
        let mut redis = RedisServer::start().unwrap();
        let port = redis.port();
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
        assert_eq!(
            redis
                .command::<String>(&["SET", "k", "v", "EX", "100"])
                .unwrap(),
            "OK"
        );
        assert_eq!(
            redis.command::<Option<String>>(&["GET", "k"]).unwrap(),
            Some("v".to_string())
        );
        assert_eq!(
            redis
                .command::<Option<String>>(&["GET", "missing"])
                .unwrap(),
            None
        );
        let ttl: i64 = redis.command(&["TTL", "k"]).unwrap();
        assert!((1..=100).contains(&ttl), "{ttl}");
        redis
            .command::<()>(&["HSET", "h", "a", "1", "b", "2"])
            .unwrap();
        let map: BTreeMap<String, String> = redis.command(&["HGETALL", "h"]).unwrap();
        assert_eq!(map.get("b").map(String::as_str), Some("2"));
        let mut keys: Vec<String> = redis.command(&["KEYS", "*"]).unwrap();
        keys.sort();
        assert_eq!(keys, ["h", "k"]);
        assert_eq!(redis.command::<i64>(&["DBSIZE"]).unwrap(), 2);
        assert!(matches!(
            redis.command::<BTreeMap<String, String>>(&["HGETALL", "k"]),
            Err(Error::Redis(m)) if m.starts_with("WRONGTYPE")
        ));

        redis.restart().unwrap();
        assert_eq!(redis.port(), port);
        assert_eq!(redis.command::<i64>(&["DBSIZE"]).unwrap(), 0);

        let pid = redis.pid().unwrap();
        redis.stop();
        assert!(!redis.is_running());
        assert!(matches!(
            redis.command::<String>(&["PING"]),
            Err(Error::NotRunning(_))
        ));
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(is_port_free(port));
    }
}
