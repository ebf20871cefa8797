//! Child processes that die with the test process.
//!
//! Every child is started with `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so a test binary that is
//! killed (timeout, Ctrl-C, SIGKILL) does not leave servers running. The death signal fires when
//! the *thread* that forked the child exits, not only the process; cargo runs each test in its
//! own thread, so a server shared between tests (e.g. in a `static OnceLock`) would be killed when
//! the first test finishes. To avoid that, all children are forked by one long-lived spawner
//! thread that lives as long as the process.
//!
//! [`ChildProcess`] is the small wrapper tests use to run a workspace binary and stop it hard
//! ([`ChildProcess::kill_hard`]) or gracefully ([`ChildProcess::terminate`]).
//!
//! [`ServerProcess`] and [`start_retrying`] hold what the server types of this crate share:
//! starting a server until it is ready (retrying when a port was taken meanwhile), stopping,
//! killing, restarting, pausing (SIGSTOP: a server that accepts connections but answers nothing)
//! and resuming it. A paused server still stops and is still killed on drop.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// How often a wait loop polls the child.
const POLL: Duration = Duration::from_millis(10);

type SpawnRequest = (Command, Sender<io::Result<Child>>);

/// Spawns `command` from the process-lifetime spawner thread with a parent-death signal set.
pub(crate) fn spawn(mut command: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let sender = spawner()?;
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("spawner thread did not answer"))?
}

fn spawner() -> io::Result<Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();
    if let Some(sender) = SPAWNER.get() {
        return Ok(lock_sender(sender));
    }
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    // Concurrent first callers may each start a thread; only one sender is kept, the other
    // thread ends as soon as its (dropped) sender closes the channel.
    thread::Builder::new()
        .name("signal-testkit-spawner".into())
        .spawn(move || {
            for (mut command, reply) in rx {
                // The requester may have given up; nothing to do then.
                let _ = reply.send(command.spawn());
            }
        })?;
    let sender = SPAWNER.get_or_init(|| Mutex::new(tx));
    Ok(lock_sender(sender))
}

fn lock_sender(sender: &Mutex<Sender<SpawnRequest>>) -> Sender<SpawnRequest> {
    sender
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// Sends `signal` to the process `pid` (ignores "no such process").
pub(crate) fn signal(child: &Child, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain syscall on a pid we own (not yet reaped, so it cannot be reused).
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Polls `child` until it exits or `timeout` passes.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child. A paused child (SIGSTOP)
/// is continued after the SIGTERM, so it handles it instead of sitting out the grace.
pub(crate) fn terminate_then_kill(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    signal(child, libc::SIGTERM);
    signal(child, libc::SIGCONT);
    if let Some(status) = wait_timeout(child, grace)? {
        return Ok(status);
    }
    child.kill()?;
    child.wait()
}

/// SIGKILL and reap.
pub(crate) fn kill_and_reap(child: &mut Child) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    child.kill()?;
    child.wait()
}

/// Whether the process `pid` (a child of ours) has not exited yet, without reaping it.
pub(crate) fn child_running(child: &Child) -> bool {
    let pid: libc::id_t = child.id();
    // SAFETY: waitid with WNOWAIT only inspects the child's state; `info` is a plain C struct
    // for which all-zero bytes are valid.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        rc == 0 && info.si_pid() == 0
    }
}

/// The last `max_lines` lines of each existing file, for error messages.
pub(crate) fn log_tail(paths: &[PathBuf], max_lines: usize) -> String {
    let mut out = String::new();
    for path in paths {
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(max_lines);
        out.push_str(&format!("==> {} <==\n", path.display()));
        for line in &lines[start..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    if out.is_empty() {
        out.push_str("(no log output)\n");
    }
    out
}

/// Whether a startup failure was a lost race for a port.
pub(crate) fn is_address_in_use(log_tail: &str) -> bool {
    log_tail
        .to_ascii_lowercase()
        .contains("address already in use")
}

/// Polls `probe` until it reports the server ready, the child exits, or `timeout` passes.
pub(crate) fn wait_until_ready(
    server: &'static str,
    child: &mut Child,
    timeout: Duration,
    logs: &[PathBuf],
    mut probe: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .context(|| format!("waiting for {server}"))?
        {
            return Err(Error::Exited {
                server,
                status,
                log_tail: log_tail(logs, 30),
            });
        }
        if probe() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::StartTimeout {
                server,
                timeout,
                log_tail: log_tail(logs, 30),
            });
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// How many port sets a server start tries before giving up with [`Error::PortsInUse`].
const START_ATTEMPTS: u32 = 5;

/// Runs `attempt` (pick ports, launch, wait until ready) until it succeeds.
///
/// Only a server that exited because one of its ports was taken between the check and its bind
/// (see [`crate::ports`]) is retried; any other error is returned at once.
pub(crate) fn start_retrying<T>(
    server: &'static str,
    mut attempt: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut last_tail = String::new();
    for _ in 0..START_ATTEMPTS {
        match attempt() {
            Ok(started) => return Ok(started),
            Err(Error::Exited { log_tail, .. }) if is_address_in_use(&log_tail) => {
                last_tail = log_tail;
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::PortsInUse {
        server,
        attempts: START_ATTEMPTS,
        log_tail: last_tail,
    })
}

/// The process of a test server, absent while the server is stopped.
///
/// Dropping it kills the process. The servers still stop it in their own `Drop`, so that it is
/// gone before their port reservations are released, and with the grace they choose.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Option<Child>,
}

impl ServerProcess {
    /// Launches a server and waits until `wait_ready` accepts it; one that does not become ready
    /// is killed, so a failed start leaves nothing running.
    pub(crate) fn start(
        launch: impl FnOnce() -> Result<Child>,
        wait_ready: impl FnOnce(&mut Child) -> Result<()>,
    ) -> Result<ServerProcess> {
        let mut child = launch()?;
        match wait_ready(&mut child) {
            Ok(()) => Ok(ServerProcess { child: Some(child) }),
            Err(e) => {
                let _ = kill_and_reap(&mut child);
                Err(e)
            }
        }
    }

    /// A server not started (yet): stopping or dropping it does nothing.
    pub(crate) fn stopped() -> ServerProcess {
        ServerProcess { child: None }
    }

    /// The process id, while the server runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive.
    pub(crate) fn is_running(&self) -> bool {
        self.child.as_ref().is_some_and(child_running)
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the process.
    pub(crate) fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = terminate_then_kill(&mut child, grace);
        }
    }

    /// SIGSTOP: the process keeps its ports, and the kernel still accepts connections on them,
    /// but nothing answers (a hung server, as far as its clients are concerned).
    pub(crate) fn pause(&mut self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGSTOP);
            // The stop reaches each thread on its own; until all are stopped one may still
            // answer a request, so the pause returns only once none can.
            wait_all_threads_stopped(child.id(), Duration::from_secs(5));
        }
    }

    /// SIGCONT: a paused server carries on.
    pub(crate) fn resume(&mut self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGCONT);
        }
    }

    /// SIGKILL (a crash, as far as the server is concerned); waits for the process.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill_and_reap(&mut child);
        }
    }

    /// Stops the server if it runs (see [`ServerProcess::stop`]), then starts it again like
    /// [`ServerProcess::start`]. If the new process does not become ready the server stays
    /// stopped.
    pub(crate) fn restart(
        &mut self,
        grace: Duration,
        launch: impl FnOnce() -> Result<Child>,
        wait_ready: impl FnOnce(&mut Child) -> Result<()>,
    ) -> Result<()> {
        self.stop(grace);
        *self = ServerProcess::start(launch, wait_ready)?;
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `/proc/<pid>/task/*/stat` until every thread is in state `T` (stopped) or `timeout`.
fn wait_all_threads_stopped(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let all_stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return true; // gone: nothing left to answer
        };
        tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                // "tid (comm) STATE ...": comm may hold spaces and parentheses.
                stat.rfind(')')
                    .and_then(|end| stat[end + 1..].split_whitespace().next())
                    .is_some_and(|state| state == "T" || state == "t")
            })
        })
    };
    while !all_stopped() && Instant::now() < deadline {
        thread::sleep(POLL);
    }
}

/// Opens `path` for appending, for a child's stdout/stderr.
pub(crate) fn append_log(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .context(|| format!("opening log file {}", path.display()))
}

/// Creates the temporary directory of one server: `$TMPDIR/signal-<kind>-<pid>-XXXXXX`.
///
/// Once per process, directories of this crate left behind by test processes that no longer
/// exist (killed before their `Drop` ran) are removed first.
pub(crate) fn server_dir(kind: &str) -> Result<tempfile::TempDir> {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(sweep_stale_dirs);
    tempfile::Builder::new()
        .prefix(&format!("signal-{kind}-{}-", std::process::id()))
        .tempdir()
        .context(|| format!("creating a temporary directory for {kind}"))
}

fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("signal-")) else {
            continue;
        };
        let Some((kind, rest)) = rest.split_once('-') else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let stale = matches!(
            kind,
            "nats" | "clickhouse" | "redis" | "zookeeper" | "kube" | "node"
        ) && pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if stale {
            if kind == "node" {
                crate::kube_node::clean_up_stale(&entry.path());
            }
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A unique name for a server instance (used to recognise our own server on a port).
pub(crate) fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:016x}",
        std::process::id(),
        crate::ports::random_u64()
    )
}

/// A child process (typically a workspace binary under test) that is killed when dropped and
/// when the test process dies.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildProcess {
    /// Starts `command` (configure args, env and stdio on it first).
    pub fn spawn(command: Command) -> Result<ChildProcess> {
        let name = command.get_program().to_string_lossy().into_owned();
        let child = spawn(command).context(|| format!("starting {name}"))?;
        Ok(ChildProcess {
            name,
            child,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = wait_timeout(&mut self.child, timeout)
                .context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit; an error if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.wait_timeout(timeout)?.ok_or_else(|| Error::Timeout {
            what: self.name.clone(),
            after: timeout,
        })
    }

    /// Sends SIGKILL (a crash, as far as the process is concerned) and reaps it.
    pub fn kill_hard(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = kill_and_reap(&mut self.child).context(|| format!("killing {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Sends SIGTERM and waits up to `grace` for a graceful exit. If the process is still running
    /// after that it is killed with SIGKILL and [`Error::Timeout`] is returned, so a test of
    /// graceful shutdown fails loudly.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        signal(&self.child, libc::SIGTERM);
        match self.wait_timeout(grace)? {
            Some(status) => Ok(status),
            None => {
                self.kill_hard()?;
                Err(Error::Timeout {
                    what: format!("{} after SIGTERM", self.name),
                    after: grace,
                })
            }
        }
    }

    /// Sends an arbitrary signal (e.g. `libc::SIGINT`, `libc::SIGSTOP`) without waiting.
    pub fn send_signal(&mut self, signal_number: i32) {
        if self.status.is_none() {
            signal(&self.child, signal_number);
        }
    }

    /// The underlying [`Child`], e.g. to take its piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = kill_and_reap(&mut self.child);
        }
    }
}

/// Path of a binary built from this workspace (`target/<profile>/<name>`), found next to the
/// running test executable (`target/<profile>/deps/<test>-<hash>`).
///
/// Within the binary's own package prefer `env!("CARGO_BIN_EXE_<name>")`. Cargo builds the
/// binaries of a package for that package's integration tests only, so a test of another package
/// must depend on it being built (e.g. `cargo test --workspace` builds all of them).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context(|| "locating the test executable".to_string())?;
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(name))
        .collect::<Vec<_>>();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            Error::io(
                format!(
                    "workspace binary {name} not found next to {} (build it first, e.g. \
                     `cargo build --workspace --bins`)",
                    exe.display()
                ),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminate_returns_status() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut child = ChildProcess::spawn(cmd).unwrap();
        assert!(child.is_running());
        let status = child.terminate(Duration::from_secs(5)).unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(!child.is_running());
    }

    #[test]
    fn terminate_times_out_on_a_process_ignoring_sigterm() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; exec sleep 30"]);
        let mut child = ChildProcess::spawn(cmd).unwrap();
        thread::sleep(Duration::from_millis(200));
        let err = child.terminate(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(!child.is_running());
    }

    #[test]
    fn kill_hard_and_wait_exit() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut child = ChildProcess::spawn(cmd).unwrap();
        assert!(
            child
                .wait_timeout(Duration::from_millis(50))
                .unwrap()
                .is_none()
        );
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.kill_hard().unwrap().signal(), Some(libc::SIGKILL));

        let mut quick = ChildProcess::spawn(Command::new("true")).unwrap();
        assert!(quick.wait_exit(Duration::from_secs(5)).unwrap().success());
    }

    #[test]
    fn stale_server_dirs_are_swept() {
        // Above the kernel's maximum pid (2^22), so never a live process.
        let stale = std::env::temp_dir().join("signal-redis-4194305-sweeptest");
        std::fs::create_dir_all(stale.join("sub")).unwrap();
        let live = server_dir("redis").unwrap();
        sweep_stale_dirs();
        assert!(!stale.exists());
        assert!(live.path().is_dir());
    }

    #[test]
    fn children_survive_the_thread_that_started_them() {
        let mut child = thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            ChildProcess::spawn(cmd).unwrap()
        })
        .join()
        .unwrap();
        thread::sleep(Duration::from_millis(200));
        assert!(child.is_running());
        child.kill_hard().unwrap();
    }
}
