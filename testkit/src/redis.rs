//! A real `redis-server` for tests.
//!
//! [`RedisServer::start`] runs `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no
//! --dir <tmp>` on a free port and waits until it answers `PING` and reports our child's pid in
//! `INFO server`. [`RedisServer::command`] runs one command through the tiny RESP client in
//! [`crate::resp`]. Nothing is persisted, so a restart starts empty (on the same port).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::binary;
use crate::error::{Error, IoContext, Result};
use crate::ports::{PortReservation, reserve_port};
use crate::process::{self, ServerProcess};
use crate::resp::{self, RespValue};

const SERVER: &str = "redis-server";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(10);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A running (or stopped, restartable) `redis-server` on 127.0.0.1 without persistence.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    port: PortReservation,
    process: ServerProcess,
    // Declared last so the process is gone before its directory is removed.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a new server on a free port with its working directory in a temporary directory.
    pub fn start() -> Result<RedisServer> {
        let binary = binary::REDIS.locate()?;
        let dir = process::server_dir("redis")?;
        let (port, process) = process::start_retrying(SERVER, || {
            let port = reserve_port()?;
            let _ = std::fs::remove_file(log_path(dir.path()));
            let process = ServerProcess::start(
                || launch(&binary, dir.path(), port.port()),
                |child| wait_ready(child, dir.path(), port.port()),
            )?;
            Ok((port, process))
        })?;
        Ok(RedisServer {
            binary,
            port,
            process,
            dir,
        })
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port())
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
        let (dir, port) = (self.dir.path(), self.port.port());
        self.process.restart(
            STOP_GRACE,
            || launch(&self.binary, dir, port),
            |child| wait_ready(child, dir, port),
        )
    }

    /// Runs one command, e.g. `command(&["HGETALL", "key"])`. An error reply is
    /// [`Error::Redis`].
    pub fn command(&self, args: &[&str]) -> Result<RespValue> {
        if self.process.pid().is_none() {
            return Err(Error::NotRunning(SERVER));
        }
        resp::command(self.port(), args, COMMAND_TIMEOUT)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("redis-server.log")
}

fn launch(binary: &Path, dir: &Path, port: u16) -> Result<Child> {
    let log = process::append_log(&log_path(dir))?;
    let log_err = log
        .try_clone()
        .context(|| "duplicating the log file handle".to_string())?;
    let mut command = Command::new(binary);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    process::spawn(command).context(|| format!("starting {}", binary.display()))
}

fn wait_ready(child: &mut Child, dir: &Path, port: u16) -> Result<()> {
    let pid_line = format!("process_id:{}\r\n", child.id());
    process::wait_until_ready(SERVER, child, START_TIMEOUT, &[log_path(dir)], || {
        let probe = Duration::from_millis(500);
        let pong = resp::command(port, &["PING"], probe)
            .is_ok_and(|v| v == RespValue::Simple("PONG".into()));
        pong && resp::command(port, &["INFO", "server"], probe)
            .is_ok_and(|v| v.as_str().is_some_and(|info| info.contains(&pid_line)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::is_port_free;
    use crate::process::is_address_in_use;

    #[test]
    fn a_taken_port_is_reported_as_address_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let port = reserve_port().unwrap();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", port.port())).unwrap();
        let binary = binary::REDIS.locate().unwrap();
        let mut child = launch(&binary, dir.path(), port.port()).unwrap();
        match wait_ready(&mut child, dir.path(), port.port()) {
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
            redis.command(&["SET", "k", "v", "EX", "100"]).unwrap(),
            RespValue::Simple("OK".into())
        );
        assert_eq!(redis.command(&["GET", "k"]).unwrap().as_str(), Some("v"));
        assert!(redis.command(&["GET", "missing"]).unwrap().is_nil());
        let ttl = redis.command(&["TTL", "k"]).unwrap().as_int().unwrap();
        assert!((1..=100).contains(&ttl), "{ttl}");
        redis.command(&["HSET", "h", "a", "1", "b", "2"]).unwrap();
        let map = redis.command(&["HGETALL", "h"]).unwrap().to_map().unwrap();
        assert_eq!(map.get("b").map(String::as_str), Some("2"));
        let keys = redis.command(&["KEYS", "*"]).unwrap();
        assert_eq!(keys.to_sorted_strings().unwrap(), ["h", "k"]);
        assert_eq!(redis.command(&["DBSIZE"]).unwrap().as_int(), Some(2));
        assert!(matches!(
            redis.command(&["HGETALL", "k"]),
            Err(Error::Redis(m)) if m.starts_with("WRONGTYPE")
        ));

        redis.restart().unwrap();
        assert_eq!(redis.port(), port);
        assert_eq!(redis.command(&["DBSIZE"]).unwrap().as_int(), Some(0));

        let pid = redis.pid().unwrap();
        redis.stop();
        assert!(!redis.is_running());
        assert!(matches!(
            redis.command(&["PING"]),
            Err(Error::NotRunning(_))
        ));
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(is_port_free(port));
    }
}
