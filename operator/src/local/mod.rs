//! Local mode: run one pipeline file without Kubernetes.
//!
//! `signal-operator local -f pipeline.yaml` reconciles the stream, the consumer and the table with
//! the same [`crate::dataplane`] code the controller uses, then runs `spec.workers.replicas`
//! `signal-worker` processes where the controller would run a Deployment ([`supervisor`]). It
//! follows edits of the file ([`watch`]); what an edit calls for (reconcile, rescale, restart the
//! workers) is decided by the pure functions in [`decide`].
//!
//! Workers read a snapshot of the last *valid* manifest rather than the file itself, so that an
//! invalid edit, which local mode refuses, cannot break a worker that happens to restart after it;
//! like the controller's ConfigMap, the snapshot has `deadLetter` resolved. The workers' health
//! reports are read every [`HEALTH_POLL_EVERY`] and logged when what they say changes, the way the
//! controller puts them into the `WorkersHealthy` condition.

pub mod decide;
pub mod supervisor;
pub mod watch;

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use signal_clients::credentials::LoadCredentialsError;
use signal_clients::manifest::{self, ManifestFile, ManifestFileError};
use signal_clients::retry::Backoff;
use signal_model::credentials::PipelineCredentials;
use signal_model::manifest::PipelineManifest;
use tokio::task::{JoinError, JoinHandle};
use tracing::{debug, info, warn};

use crate::dataplane::worker_health::WorkerHealth;
use crate::dataplane::{self, DataPlaneError, DataPlaneReport};
use decide::{desired_replicas, react_to_edit};
use supervisor::{Supervisor, WorkerLaunch};
use watch::{FileEvent, FileWatcher};

/// How often exited workers are noticed and due restarts made.
const SUPERVISE_EVERY: Duration = Duration::from_millis(250);
/// How often the pipeline file is read for changes.
const FILE_POLL_EVERY: Duration = Duration::from_secs(1);
/// Retry delays while a data-plane part is not ready (e.g. a server is unreachable).
const RECONCILE_RETRY_INITIAL: Duration = Duration::from_secs(1);
const RECONCILE_RETRY_MAX: Duration = Duration::from_secs(30);
/// A ready data plane is checked again this often, to repair what was changed behind its back.
const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// How often the workers' health reports are read (they are re-published every 30 s).
pub const HEALTH_POLL_EVERY: Duration = Duration::from_secs(10);

/// How to run a pipeline locally.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The SignalPipeline manifest to run and watch.
    pub pipeline_file: PathBuf,
    /// The `signal-worker` executable.
    pub worker_binary: PathBuf,
    /// Address the workers' metrics endpoints listen on.
    pub metrics_host: IpAddr,
    /// Metrics port of the first worker; worker `n` uses `base + n`.
    pub metrics_base_port: u16,
    /// How long a stopping worker may take to flush and acknowledge before it is killed.
    pub stop_grace: Duration,
    /// Remove the data plane on exit, as deleting the resource would (per `deletionPolicy`).
    pub delete_on_exit: bool,
}

/// Why local mode could not start or finish.
///
/// Each message is complete in itself (the underlying error is part of it rather than a
/// `source`), so that printing the error with its chain still gives one line without repeats.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("invalid pipeline {path}: {problem}")]
    Manifest {
        path: String,
        problem: ManifestFileError,
    },
    #[error("invalid credentials in the environment: {0}")]
    Credentials(LoadCredentialsError),
    #[error(
        "worker binary {0} not found (build it with `cargo build -p signal-worker`, or pass --worker-binary)"
    )]
    WorkerBinaryMissing(String),
    #[error("cannot write the manifest snapshot {path}: {problem}")]
    Snapshot { path: String, problem: io::Error },
    #[error("removing the data plane: {0}")]
    Delete(DataPlaneError),
}

/// Reads and validates a pipeline file, returning its text too (what the workers get to read).
pub fn load_manifest(path: &Path) -> Result<(String, PipelineManifest), LocalError> {
    let ManifestFile { text, manifest } =
        manifest::load(path).map_err(|problem| LocalError::Manifest {
            path: path.display().to_string(),
            problem,
        })?;
    Ok((text, manifest))
}

/// `signal-worker` next to the running executable, where cargo and the release archives put it.
pub fn worker_binary_next_to_current_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join("signal-worker"))
}

/// Runs the pipeline in `options.pipeline_file` until `shutdown` resolves, then stops the workers
/// gracefully (and removes the data plane if asked to).
///
/// Must run on a current-thread runtime (see [`supervisor`] for why).
pub async fn run(
    options: LocalOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LocalError> {
    let (text, mut manifest) = load_manifest(&options.pipeline_file)?;
    let credentials =
        signal_clients::credentials::from_env(&manifest.spec).map_err(LocalError::Credentials)?;
    if !options.worker_binary.is_file() {
        return Err(LocalError::WorkerBinaryMissing(
            options.worker_binary.display().to_string(),
        ));
    }
    warn_about_cluster_only_settings(&manifest);
    let snapshot = Snapshot::create(&manifest.metadata.name)?;
    snapshot.write(&worker_manifest_text(&options.pipeline_file, &manifest)?)?;
    info!(
        pipeline = %manifest.metadata.name,
        file = %options.pipeline_file.display(),
        replicas = desired_replicas(&manifest),
        "running pipeline locally"
    );

    let mut supervisor = Supervisor::new(
        WorkerLaunch {
            binary: options.worker_binary.clone(),
            pipeline_file: snapshot.path.clone(),
            listen_host: options.metrics_host,
            base_port: options.metrics_base_port,
        },
        options.stop_grace,
    );
    let mut watcher = FileWatcher::new(&options.pipeline_file, &text);
    let mut reconciler = Reconciler::new(credentials.clone());
    reconciler.start(&manifest);
    let mut health = HealthWatch::new(credentials.clone());
    // Workers start once the first reconcile has answered, so that they find their consumer
    // instead of waiting for it with their own backoff. They retry on their own after that.
    let mut workers_started = false;

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next_file_poll = Instant::now() + FILE_POLL_EVERY;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => {
                info!("shutdown requested; stopping the workers");
                break;
            }
            finished = reconciler.finished() => {
                reconciler.record(finished);
                if !workers_started {
                    workers_started = true;
                    supervisor.scale_to(desired_replicas(&manifest)).await;
                }
            }
            read = health.finished() => health.record(read),
            _ = tick.tick() => {
                if workers_started {
                    supervisor.check();
                    health.start_if_due(&manifest);
                }
                reconciler.start_if_due(&manifest);
                if Instant::now() >= next_file_poll {
                    next_file_poll = Instant::now() + FILE_POLL_EVERY;
                    match watcher.poll() {
                        FileEvent::Unchanged => {}
                        FileEvent::Unreadable(problem) => warn!(
                            file = %options.pipeline_file.display(),
                            %problem,
                            "cannot read the pipeline file; the running pipeline is kept"
                        ),
                        FileEvent::Changed(edited_text) => {
                            let Some(edited) = accept_edit(&options.pipeline_file, &edited_text, &manifest, &snapshot) else {
                                continue;
                            };
                            let reaction = react_to_edit(&manifest, &edited);
                            manifest = edited;
                            let replicas = desired_replicas(&manifest);
                            if reaction.reconcile_data_plane {
                                reconciler.restart(&manifest);
                            }
                            if workers_started {
                                if reaction.restart_workers {
                                    info!(replicas, "worker settings changed; restarting the workers");
                                    supervisor.restart_all(replicas).await;
                                } else if reaction.rescale {
                                    info!(replicas, "replicas changed");
                                    supervisor.scale_to(replicas).await;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    reconciler.abort();
    health.abort();
    supervisor.stop_all().await;
    if options.delete_on_exit {
        info!(policy = ?manifest.spec.deletion_policy, "removing the data plane as --delete-on-exit asks");
        dataplane::delete_data_plane(&manifest.metadata.name, &manifest.spec, &credentials)
            .await
            .map_err(LocalError::Delete)?;
    }
    info!("stopped");
    Ok(())
}

/// Validates an edited file and makes it what new workers read; `None` (logged) when the edit is
/// refused or changes nothing.
fn accept_edit(
    path: &Path,
    edited_text: &str,
    running: &PipelineManifest,
    snapshot: &Snapshot,
) -> Option<PipelineManifest> {
    let edited = match PipelineManifest::from_yaml(edited_text) {
        Ok(edited) => edited,
        Err(error) => {
            warn!(file = %path.display(), %error, "invalid edit ignored; the running pipeline is kept");
            return None;
        }
    };
    let reaction = react_to_edit(running, &edited);
    if reaction.is_nothing() {
        info!(file = %path.display(), "pipeline file saved; nothing to change");
        return None;
    }
    if let Err(error) = worker_manifest_text(path, &edited).and_then(|text| snapshot.write(&text)) {
        warn!(%error, "edit not applied; the running pipeline is kept");
        return None;
    }
    info!(
        file = %path.display(),
        reconcile = reaction.reconcile_data_plane,
        restart_workers = reaction.restart_workers,
        rescale = reaction.rescale,
        "pipeline file changed"
    );
    warn_about_cluster_only_settings(&edited);
    Some(edited)
}

/// The manifest the workers read: the file's, with `deadLetter` resolved as the controller's
/// ConfigMap has it.
fn worker_manifest_text(path: &Path, manifest: &PipelineManifest) -> Result<String, LocalError> {
    let name = &manifest.metadata.name;
    let resolved = PipelineManifest {
        spec: manifest.spec.with_dead_letter_resolved(name),
        ..manifest.clone()
    };
    resolved.to_yaml().map_err(|problem| LocalError::Manifest {
        path: path.display().to_string(),
        problem: problem.into(),
    })
}

fn warn_about_cluster_only_settings(manifest: &PipelineManifest) {
    let workers = &manifest.spec.workers;
    if workers.autoscale.is_some() {
        warn!(
            "spec.workers.autoscale is not used in local mode; running spec.workers.replicas workers"
        );
    }
    if workers.image.is_some() || workers.resources.is_some() {
        debug!("spec.workers.image and resources apply to Kubernetes only");
    }
}

/// The data-plane reconcile of local mode: one at a time, in the background so that workers are
/// supervised meanwhile, retried with backoff until every part is ready.
struct Reconciler {
    credentials: PipelineCredentials,
    task: Option<JoinHandle<DataPlaneReport>>,
    next_attempt: Option<Instant>,
    backoff: Backoff,
    last_all_ready: bool,
}

impl Reconciler {
    fn new(credentials: PipelineCredentials) -> Self {
        Self {
            credentials,
            task: None,
            next_attempt: None,
            backoff: Backoff::new(RECONCILE_RETRY_INITIAL, RECONCILE_RETRY_MAX),
            last_all_ready: false,
        }
    }

    fn start(&mut self, manifest: &PipelineManifest) {
        let name = manifest.metadata.name.clone();
        let spec = manifest.spec.clone();
        let credentials = self.credentials.clone();
        self.next_attempt = None;
        self.task = Some(tokio::spawn(async move {
            dataplane::reconcile_data_plane(&name, &spec, &credentials).await
        }));
    }

    /// Reconciles again now, for an edited spec (a reconcile of the old one is abandoned).
    fn restart(&mut self, manifest: &PipelineManifest) {
        self.abort();
        self.backoff.reset();
        self.start(manifest);
    }

    fn start_if_due(&mut self, manifest: &PipelineManifest) {
        if self.task.is_none() && self.next_attempt.is_some_and(|at| at <= Instant::now()) {
            self.start(manifest);
        }
    }

    fn abort(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Resolves when the running reconcile ends; never while none runs.
    async fn finished(&mut self) -> Result<DataPlaneReport, JoinError> {
        match self.task.as_mut() {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    }

    fn record(&mut self, finished: Result<DataPlaneReport, JoinError>) {
        self.task = None;
        let report = match finished {
            Ok(report) => report,
            Err(error) => {
                warn!(%error, "data-plane reconcile did not finish");
                self.next_attempt = Some(Instant::now() + self.backoff.next_delay());
                return;
            }
        };
        let quiet = self.last_all_ready && report.all_ready() && report.changes().next().is_none();
        if !quiet {
            log_report(&report);
        }
        self.last_all_ready = report.all_ready();
        if report.all_ready() {
            self.backoff.reset();
            self.next_attempt = Some(Instant::now() + RESYNC_EVERY);
            if !quiet {
                info!("data plane ready");
            }
        } else {
            let delay = self.backoff.next_delay();
            warn!(
                retry_in_ms = delay.as_millis() as u64,
                "data plane not ready; retrying"
            );
            self.next_attempt = Some(Instant::now() + delay);
        }
    }
}

/// One line per part and per change, the way the controller reports conditions and events.
fn log_report(report: &DataPlaneReport) {
    let parts = [
        ("stream", &report.stream),
        ("consumer", &report.consumer),
        ("table", &report.table),
        ("dead letters", &report.dead_letter),
    ];
    for (part, outcome) in parts {
        for change in &outcome.changes {
            info!(part, "{change}");
        }
        if outcome.ready {
            info!(part, reason = %outcome.reason, "{}", outcome.message);
        } else {
            warn!(part, reason = %outcome.reason, "{}", outcome.message);
        }
    }
    if let Some(drift) = &report.schema_drift {
        warn!(part = "table", "schema drift left alone: {drift}");
    }
    for change in &report.health_stream_changes {
        info!(part = "health stream", "{change}");
    }
}

/// Reads the workers' health reports every [`HEALTH_POLL_EVERY`], in the background, and logs
/// what they say when it changes.
struct HealthWatch {
    credentials: PipelineCredentials,
    task: Option<JoinHandle<WorkerHealth>>,
    next_read: Instant,
    last: Option<WorkerHealth>,
}

impl HealthWatch {
    fn new(credentials: PipelineCredentials) -> Self {
        Self {
            credentials,
            task: None,
            next_read: Instant::now() + HEALTH_POLL_EVERY,
            last: None,
        }
    }

    fn start_if_due(&mut self, manifest: &PipelineManifest) {
        if self.task.is_some() || Instant::now() < self.next_read {
            return;
        }
        let name = manifest.metadata.name.clone();
        let spec = manifest.spec.clone();
        let credentials = self.credentials.clone();
        self.task = Some(tokio::spawn(async move {
            dataplane::read_worker_health(&name, &spec, &credentials).await
        }));
    }

    /// Resolves when the running read ends; never while none runs.
    async fn finished(&mut self) -> Result<WorkerHealth, JoinError> {
        match self.task.as_mut() {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    }

    fn record(&mut self, read: Result<WorkerHealth, JoinError>) {
        self.task = None;
        self.next_read = Instant::now() + HEALTH_POLL_EVERY;
        let health = match read {
            Ok(health) => health,
            Err(error) => WorkerHealth::Unknown(error.to_string()),
        };
        if self.last.as_ref() != Some(&health) {
            log_health(&health);
            self.last = Some(health);
        }
    }

    fn abort(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// One line saying what the workers' health reports say, as the `WorkersHealthy` condition would.
fn log_health(health: &WorkerHealth) {
    match health {
        WorkerHealth::Stuck { reason, message } => {
            warn!(part = "workers", reason = %reason, "workers stuck: {message}");
        }
        WorkerHealth::Healthy { workers } => {
            info!(part = "workers", workers, "workers report progress");
        }
        WorkerHealth::NoReports => info!(part = "workers", "no worker reports a problem"),
        WorkerHealth::Unknown(message) => {
            warn!(part = "workers", "health reports unreadable: {message}");
        }
    }
}

/// The copy of the last valid manifest that workers read, in a directory of this process's own.
struct Snapshot {
    dir: PathBuf,
    path: PathBuf,
}

impl Snapshot {
    fn create(pipeline_name: &str) -> Result<Self, LocalError> {
        let dir = std::env::temp_dir().join(format!(
            "signal-operator-local-{}-{pipeline_name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|problem| LocalError::Snapshot {
            path: dir.display().to_string(),
            problem,
        })?;
        let path = dir.join("pipeline.yaml");
        Ok(Self { dir, path })
    }

    /// Replaces the snapshot atomically, so a worker starting meanwhile reads a whole file.
    fn write(&self, text: &str) -> Result<(), LocalError> {
        let partial = self.dir.join("pipeline.yaml.partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &self.path))
            .map_err(|problem| LocalError::Snapshot {
                path: self.path.display().to_string(),
                problem,
            })
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
