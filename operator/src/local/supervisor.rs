//! The worker processes of local mode: starting `signal-worker` processes in numbered slots,
//! restarting the ones that exit on their own (with backoff), and stopping them gracefully.
//!
//! Slot `n` listens for metrics on `base_port + n`. Each worker runs in its own process group,
//! so a Ctrl-C in the terminal reaches only the operator, which then stops the workers in order
//! (SIGTERM, wait for them to flush and acknowledge, SIGKILL after a grace period). Should the
//! operator die without that, `PR_SET_PDEATHSIG` sends each worker SIGTERM, which still lets it
//! flush. The death signal fires when the *thread* that forked the worker ends, which is why
//! local mode runs on a current-thread runtime: every worker is forked by the main thread.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use signal_clients::retry::Backoff;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::decide::plan_scaling;

/// First delay before restarting a worker that exited on its own; doubles up to [`RESTART_MAX`].
const RESTART_INITIAL: Duration = Duration::from_millis(500);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A worker that ran this long before exiting counts as having worked: its backoff starts over.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// How to launch one worker.
#[derive(Clone, Debug)]
pub struct WorkerLaunch {
    /// The `signal-worker` executable.
    pub binary: PathBuf,
    /// The manifest the workers read (`--pipeline`).
    pub pipeline_file: PathBuf,
    /// Address the metrics endpoints listen on.
    pub listen_host: IpAddr,
    /// Metrics port of slot 0; slot `n` uses `base_port + n`.
    pub base_port: u16,
}

impl WorkerLaunch {
    /// The metrics address of `slot`, or `None` when it would pass port 65535.
    pub fn listen_addr(&self, slot: usize) -> Option<SocketAddr> {
        let port = u16::try_from(slot)
            .ok()
            .and_then(|offset| self.base_port.checked_add(offset))?;
        Some(SocketAddr::new(self.listen_host, port))
    }

    fn spawn(&self, slot: usize) -> io::Result<Child> {
        let listen = self.listen_addr(slot).ok_or_else(|| {
            io::Error::other(format!(
                "slot {slot} has no metrics port above base port {}",
                self.base_port
            ))
        })?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--pipeline")
            .arg(&self.pipeline_file)
            .arg("--listen")
            .arg(listen.to_string())
            // The name in its health reports, stable across restarts of the slot.
            .arg("--worker-name")
            .arg(format!("local-{slot}"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
        // functions (setpgid, prctl, getppid, _exit).
        unsafe {
            command.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The operator may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        command.spawn()
    }
}

/// A started worker process.
#[derive(Debug)]
struct Running {
    child: Child,
    pid: u32,
    started: Instant,
}

/// One slot: a running worker, or one waiting for its restart.
#[derive(Debug)]
struct Slot {
    running: Option<Running>,
    restart_at: Option<Instant>,
    backoff: Backoff,
}

/// The worker processes of one pipeline.
#[derive(Debug)]
pub struct Supervisor {
    launch: WorkerLaunch,
    slots: BTreeMap<usize, Slot>,
    stop_grace: Duration,
}

impl Supervisor {
    /// No workers yet; `stop_grace` is how long a stopping worker may take to flush.
    pub fn new(launch: WorkerLaunch, stop_grace: Duration) -> Self {
        Self {
            launch,
            slots: BTreeMap::new(),
            stop_grace,
        }
    }

    /// Points workers started from now on at another manifest file.
    pub fn set_pipeline_file(&mut self, pipeline_file: PathBuf) {
        self.launch.pipeline_file = pipeline_file;
    }

    /// Process ids of the running workers, by slot.
    pub fn pids(&self) -> BTreeMap<usize, u32> {
        self.slots
            .iter()
            .filter_map(|(slot, state)| state.running.as_ref().map(|r| (*slot, r.pid)))
            .collect()
    }

    /// Starts or stops workers so that slots `0..desired` run.
    pub async fn scale_to(&mut self, desired: usize) {
        let occupied: BTreeSet<usize> = self.slots.keys().copied().collect();
        let plan = plan_scaling(desired, &occupied);
        let leaving: Vec<(usize, Slot)> = plan
            .stop
            .iter()
            .filter_map(|slot| self.slots.remove(slot).map(|state| (*slot, state)))
            .collect();
        self.stop_slots(leaving).await;
        for slot in plan.start {
            let mut state = Slot {
                running: None,
                restart_at: None,
                backoff: Backoff::new(RESTART_INITIAL, RESTART_MAX),
            };
            self.start(slot, &mut state);
            self.slots.insert(slot, state);
        }
    }

    /// Replaces every worker (after a spec change they read at start).
    pub async fn restart_all(&mut self, desired: usize) {
        self.stop_all().await;
        self.scale_to(desired).await;
    }

    /// Stops every worker gracefully, all at once.
    pub async fn stop_all(&mut self) {
        let leaving: Vec<(usize, Slot)> = std::mem::take(&mut self.slots).into_iter().collect();
        self.stop_slots(leaving).await;
    }

    /// Notices workers that exited and restarts the ones whose backoff has passed.
    pub fn check(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for (slot, state) in &mut self.slots {
            if let Some(running) = &mut state.running {
                match running.child.try_wait() {
                    Ok(None) => continue,
                    Ok(Some(status)) => {
                        if running.started.elapsed() >= STABLE_RUN {
                            state.backoff.reset();
                        }
                        let delay = state.backoff.next_delay();
                        warn!(
                            slot,
                            pid = running.pid,
                            status = %describe(status),
                            restart_in_ms = delay.as_millis() as u64,
                            "worker exited; restarting it"
                        );
                        state.running = None;
                        state.restart_at = Some(now + delay);
                    }
                    Err(error) => {
                        warn!(slot, pid = running.pid, %error, "cannot check on worker");
                        continue;
                    }
                }
            }
            if state.restart_at.is_some_and(|at| at <= now) {
                due.push(*slot);
            }
        }
        for slot in due {
            if let Some(mut state) = self.slots.remove(&slot) {
                self.start(slot, &mut state);
                self.slots.insert(slot, state);
            }
        }
    }

    fn start(&self, slot: usize, state: &mut Slot) {
        state.restart_at = None;
        match self.launch.spawn(slot) {
            Ok(child) => {
                let pid = child.id().unwrap_or_default();
                let metrics = self
                    .launch
                    .listen_addr(slot)
                    .map(|addr| format!("http://{addr}/metrics"))
                    .unwrap_or_default();
                info!(slot, pid, %metrics, "worker started");
                state.running = Some(Running {
                    child,
                    pid,
                    started: Instant::now(),
                });
            }
            Err(error) => {
                let delay = state.backoff.next_delay();
                warn!(
                    slot,
                    binary = %self.launch.binary.display(),
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot start worker"
                );
                state.restart_at = Some(Instant::now() + delay);
            }
        }
    }

    async fn stop_slots(&self, slots: Vec<(usize, Slot)>) {
        let grace = self.stop_grace;
        let stops = slots.into_iter().filter_map(|(slot, state)| {
            state
                .running
                .map(|running| stop_gracefully(slot, running, grace))
        });
        futures::future::join_all(stops).await;
    }
}

/// SIGTERM, then up to `grace` for the worker to flush and acknowledge, then SIGKILL.
async fn stop_gracefully(slot: usize, mut running: Running, grace: Duration) {
    let pid = running.pid;
    if let Ok(Some(status)) = running.child.try_wait() {
        info!(slot, pid, status = %describe(status), "worker had already exited");
        return;
    }
    if let Ok(raw_pid) = libc::pid_t::try_from(pid) {
        // SAFETY: a plain syscall on our own child, not yet reaped (so the pid is not reused).
        unsafe {
            libc::kill(raw_pid, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(grace, running.child.wait()).await {
        Ok(Ok(status)) => info!(slot, pid, status = %describe(status), "worker stopped"),
        Ok(Err(error)) => warn!(slot, pid, %error, "cannot wait for worker"),
        Err(_) => {
            warn!(
                slot,
                pid,
                grace_s = grace.as_secs(),
                "worker did not stop in time; killing it"
            );
            if let Err(error) = running.child.kill().await {
                warn!(slot, pid, %error, "cannot kill worker");
            }
        }
    }
}

/// `exit code 0`, `signal 9`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(binary: &str) -> WorkerLaunch {
        WorkerLaunch {
            binary: PathBuf::from(binary),
            pipeline_file: PathBuf::from("pipeline.yaml"),
            listen_host: IpAddr::from([127, 0, 0, 1]),
            base_port: 65_534,
        }
    }

    #[test]
    fn each_slot_has_its_own_port_within_range() {
        let launch = launch("signal-worker");
        assert_eq!(
            launch.listen_addr(1).map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:65535")
        );
        assert_eq!(launch.listen_addr(2), None);
    }

    #[tokio::test]
    async fn restarts_an_exited_process_and_stops_the_rest() {
        // `false` exits at once with status 1 whatever its arguments: a crashing worker.
        let mut supervisor = Supervisor::new(launch("/bin/false"), Duration::from_secs(1));
        supervisor.scale_to(1).await;
        let first = supervisor.pids()[&0];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            supervisor.check();
            if supervisor.pids().get(&0).is_some_and(|pid| *pid != first) {
                break;
            }
            assert!(Instant::now() < deadline, "no restart");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        supervisor.stop_all().await;
        assert!(supervisor.pids().is_empty());
    }
}
