//! A real ZooKeeper (Debian's `zookeeper` package, 3.8) for tests of replicated ClickHouse tables.
//!
//! [`ZooKeeperServer::start`] runs the standalone server class of `/usr/share/java/zookeeper.jar`
//! with the system `java`, a `zoo.cfg` of its own in a temporary directory (data there too), on a
//! free port of 127.0.0.1, with the admin HTTP server off, and waits until the four-letter word
//! `srvr` reports the server's version: `ruok` is answered `imok` before the server accepts
//! sessions, and clickhouse-server 18.16 can crash on a ZooKeeper that closes its handshake. On drop it gets SIGTERM, then SIGKILL, and the directory is removed.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::binary;
use crate::error::{IoContext, Result};
use crate::ports::{PortReservation, reserve_port};
use crate::process::{self, ServerProcess};

const SERVER: &str = "zookeeper";
const MAIN_CLASS: &str = "org.apache.zookeeper.server.ZooKeeperServerMain";
/// The JVM's start dominates: a few seconds on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A running `zookeeper` on 127.0.0.1.
#[derive(Debug)]
pub struct ZooKeeperServer {
    port: PortReservation,
    process: ServerProcess,
    // Declared last so the process is gone before its directory is removed.
    dir: TempDir,
}

impl ZooKeeperServer {
    /// Starts a standalone server with its own configuration and data in a temporary directory.
    pub fn start() -> Result<ZooKeeperServer> {
        let java = binary::JAVA.locate()?;
        let jar = binary::ZOOKEEPER_JAR.locate_file()?;
        let dir = process::server_dir("zookeeper")?;
        let (port, process) = process::start_retrying(SERVER, || {
            let port = reserve_port()?;
            write_config(dir.path(), port.port())?;
            let _ = std::fs::remove_file(log_path(dir.path()));
            let process = ServerProcess::start(
                || launch(&java, &jar, dir.path()),
                |child| {
                    process::wait_until_ready(
                        SERVER,
                        child,
                        START_TIMEOUT,
                        &[log_path(dir.path())],
                        || is_ready(port.port()),
                    )
                },
            )?;
            Ok((port, process))
        })?;
        Ok(ZooKeeperServer { port, process, dir })
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port.port()
    }

    /// The server's working directory (`zoo.cfg`, `data/`, `zookeeper.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
}

impl Drop for ZooKeeperServer {
    fn drop(&mut self) {
        self.process.stop(STOP_GRACE);
    }
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("zookeeper.log")
}

fn write_config(dir: &Path, port: u16) -> Result<()> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).context(|| format!("creating {}", data.display()))?;
    // A short tick makes sessions of stopped ClickHouse replicas expire within seconds.
    let config = format!(
        "tickTime=500\ndataDir={}\nclientPort={port}\n\
         clientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
         4lw.commands.whitelist=ruok,srvr\n",
        data.display()
    );
    let path = dir.join("zoo.cfg");
    std::fs::write(&path, config).context(|| format!("writing {}", path.display()))
}

fn launch(java: &Path, jar: &Path, dir: &Path) -> Result<Child> {
    let log = process::append_log(&log_path(dir))?;
    let log_err = log
        .try_clone()
        .context(|| "duplicating the log file handle".to_string())?;
    let mut command = Command::new(java);
    command
        .args(["-Xmx256m", "-cp"])
        .arg(jar)
        .arg(MAIN_CLASS)
        .arg(dir.join("zoo.cfg"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    process::spawn(command).context(|| format!("starting {} {MAIN_CLASS}", java.display()))
}

/// The four-letter word `srvr` reports the version once the server serves sessions (until then it
/// says "This ZooKeeper instance is not currently serving requests").
fn is_ready(port: u16) -> bool {
    let answer = || -> std::io::Result<String> {
        let mut stream =
            TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), PROBE_TIMEOUT)?;
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        stream.write_all(b"srvr")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    };
    answer().is_ok_and(|text| text.starts_with("Zookeeper version"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_stops() {
        let zookeeper = ZooKeeperServer::start().unwrap();
        assert!(is_ready(zookeeper.port()));
        let (pid, port) = (zookeeper.pid().unwrap(), zookeeper.port());
        drop(zookeeper);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(crate::ports::is_port_free(port));
    }
}
