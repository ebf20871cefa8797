//! A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager.
//!
//! All three come from one binary, `signal-kube` (upstream k8s.io/kubernetes built from the Go
//! module in `testkit/kube` by `scripts/build-kube.sh` into `target/kube/signal-kube`, or the
//! file `SIGNAL_KUBE_BINARY` names). [`KubeCluster::start`] makes a throwaway CA with serving and
//! client certificates, starts etcd, then the API server (client-certificate authentication,
//! `Node,RBAC` authorization, service-account issuer and keys so the TokenRequest API works),
//! waits for `/readyz`, then starts the controller manager (garbage collector, namespace,
//! service-account, deployment... controllers) and waits until its service-account controller
//! has made the `default` ServiceAccount. Everything listens on free 127.0.0.1 ports and lives
//! in one temporary directory; dropping the handle stops the processes and removes it.
//!
//! No node runs: pods stay pending, which is all tests of an operator's objects need. A test that
//! needs pods to run starts a [`crate::KubeNode`] (kube-scheduler, containerd and a kubelet) on
//! top; the control plane already has the credentials for it.
//!
//! [`KubeCluster::kubeconfig_path`] is an admin kubeconfig (a client certificate in group
//! `system:masters`) for kube clients and `kubectl`. A control plane takes seconds to start, so
//! the tests of one binary can share one with [`KubeCluster::shared`] and keep apart through
//! their own namespaces ([`KubeCluster::create_namespace`]).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::binary::GoBuilt;
use crate::certs::{self, CertificateAuthority};
use crate::error::{Error, IoContext, Result};
use crate::https::TlsClient;
use crate::ports::{PortReservation, reserve_port};
use crate::process::{self, ServerProcess};

/// Overrides where the control-plane binary is looked for.
pub const BINARY_ENV_VAR: &str = "SIGNAL_KUBE_BINARY";
/// The Kubernetes release `signal-kube` is built from (testkit/kube/go.mod).
pub const KUBERNETES_VERSION: &str = "v1.36.3";

const ETCD: &str = "etcd";
const APISERVER: &str = "kube-apiserver";
const CONTROLLER_MANAGER: &str = "kube-controller-manager";
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The API server runs its bootstrap hooks (RBAC roles, priority levels...) before `/readyz`.
const APISERVER_START_TIMEOUT: Duration = Duration::from_secs(120);
const CONTROLLER_MANAGER_START_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_GRACE: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A request through [`KubeCluster::request`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where pods would get addresses; nothing routes there, the API server only allocates from it.
const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";
/// The `kubernetes` Service's address in [`SERVICE_CLUSTER_IP_RANGE`], in the serving cert.
const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The name of the one node a control plane has credentials for (see [`crate::KubeNode`]).
pub const NODE_NAME: &str = "signal-node";

/// Paths a node needs from its control plane.
#[derive(Debug, Clone)]
pub(crate) struct NodeCredentials {
    pub ca_cert: PathBuf,
    pub node_kubeconfig: PathBuf,
    pub scheduler_kubeconfig: PathBuf,
}

/// A running control plane on 127.0.0.1; stopped and removed when dropped.
#[derive(Debug)]
pub struct KubeCluster {
    // Stopped in this order by Drop: the controller manager, the API server, etcd.
    controller_manager: ServerProcess,
    apiserver: ServerProcess,
    etcd: ServerProcess,
    apiserver_port: PortReservation,
    _other_ports: Vec<PortReservation>,
    client: TlsClient,
    started_in: Duration,
    // Declared last so the processes are gone before their directory is removed.
    dir: TempDir,
}

impl KubeCluster {
    /// Starts a new control plane (typically 10-20 s on two cores; see [`KubeCluster::started_in`]).
    pub fn start() -> Result<KubeCluster> {
        let started = Instant::now();
        let binary = SIGNAL_KUBE.locate()?;
        let dir = process::server_dir("kube")?;
        let files = Files::new(dir.path());
        let pki = Pki::write(&files)?;

        let (etcd_ports, etcd) = process::start_retrying(ETCD, || {
            let client = reserve_port()?;
            let peer = reserve_port()?;
            let _ = std::fs::remove_file(&files.etcd_log);
            let process = ServerProcess::start(
                || launch_etcd(&binary, &files, client.port(), peer.port()),
                |child| {
                    process::wait_until_ready(
                        ETCD,
                        child,
                        ETCD_START_TIMEOUT,
                        std::slice::from_ref(&files.etcd_log),
                        || etcd_healthy(client.port()),
                    )
                },
            )?;
            Ok(([client, peer], process))
        })?;
        let etcd_client_port = etcd_ports[0].port();

        let (apiserver_port, apiserver) = process::start_retrying(APISERVER, || {
            let port = reserve_port()?;
            let _ = std::fs::remove_file(&files.apiserver_log);
            let process = ServerProcess::start(
                || launch_apiserver(&binary, &files, port.port(), etcd_client_port),
                |child| {
                    process::wait_until_ready(
                        APISERVER,
                        child,
                        APISERVER_START_TIMEOUT,
                        std::slice::from_ref(&files.apiserver_log),
                        || status_of(&pki.admin_client, port.port(), "/readyz") == Some(200),
                    )
                },
            )?;
            Ok((port, process))
        })?;

        let server_url = format!("https://127.0.0.1:{}", apiserver_port.port());
        write_kubeconfig(
            &files.admin_kubeconfig,
            &server_url,
            &files.ca_cert,
            &Credentials::ClientCertificate {
                cert: &files.admin_cert,
                key: &files.admin_key,
            },
            "default",
        )?;
        write_kubeconfig(
            &files.controller_manager_kubeconfig,
            &server_url,
            &files.ca_cert,
            &Credentials::ClientCertificate {
                cert: &files.controller_manager_cert,
                key: &files.controller_manager_key,
            },
            "kube-system",
        )?;

        for (kubeconfig, cert, key) in [
            (&files.node_kubeconfig, &files.node_cert, &files.node_key),
            (
                &files.scheduler_kubeconfig,
                &files.scheduler_cert,
                &files.scheduler_key,
            ),
        ] {
            write_kubeconfig(
                kubeconfig,
                &server_url,
                &files.ca_cert,
                &Credentials::ClientCertificate { cert, key },
                "default",
            )?;
        }

        let (controller_manager_port, controller_manager) =
            process::start_retrying(CONTROLLER_MANAGER, || {
                let port = reserve_port()?;
                let _ = std::fs::remove_file(&files.controller_manager_log);
                let process = ServerProcess::start(
                    || launch_controller_manager(&binary, &files, port.port()),
                    |child| {
                        process::wait_until_ready(
                            CONTROLLER_MANAGER,
                            child,
                            CONTROLLER_MANAGER_START_TIMEOUT,
                            std::slice::from_ref(&files.controller_manager_log),
                            // The service-account controller made the default namespace's account.
                            || {
                                status_of(
                                    &pki.admin_client,
                                    apiserver_port.port(),
                                    "/api/v1/namespaces/default/serviceaccounts/default",
                                ) == Some(200)
                            },
                        )
                    },
                )?;
                Ok((port, process))
            })?;

        let [etcd_client, etcd_peer] = etcd_ports;
        Ok(KubeCluster {
            controller_manager,
            apiserver,
            etcd,
            apiserver_port,
            _other_ports: vec![etcd_client, etcd_peer, controller_manager_port],
            client: pki.admin_client,
            started_in: started.elapsed(),
            dir,
        })
    }

    /// One control plane for the whole test binary, started by the first caller.
    ///
    /// It is stopped and its directory removed when the test process exits (an `atexit` hook);
    /// a killed test process leaves no server behind either (`PR_SET_PDEATHSIG`), and the next
    /// testkit user sweeps its directory. A failed start is reported to every caller.
    pub fn shared() -> Result<&'static KubeCluster> {
        static SHARED: OnceLock<std::result::Result<KubeCluster, String>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            let cluster = KubeCluster::start().map_err(|e| e.to_string())?;
            extern "C" fn stop_shared_at_exit() {
                if let Some(Ok(cluster)) = SHARED.get() {
                    cluster.kill_and_remove_dir();
                }
            }
            // SAFETY: registers a plain `extern "C" fn` without arguments.
            unsafe {
                libc::atexit(stop_shared_at_exit);
            }
            Ok(cluster)
        });
        shared
            .as_ref()
            .map_err(|message| Error::SharedStartFailed(message.clone()))
    }

    /// The admin kubeconfig (client certificate in group `system:masters`, namespace `default`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        Files::new(self.dir.path()).admin_kubeconfig
    }

    /// `https://127.0.0.1:PORT`
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port.port())
    }

    /// The API server's port.
    pub fn port(&self) -> u16 {
        self.apiserver_port.port()
    }

    /// The CA certificate (PEM) that signed the serving and client certificates.
    pub fn ca_cert_path(&self) -> PathBuf {
        Files::new(self.dir.path()).ca_cert
    }

    /// The temporary directory holding certificates, kubeconfigs, etcd's data and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The log files of etcd, the API server and the controller manager.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let files = Files::new(self.dir.path());
        vec![
            files.etcd_log,
            files.apiserver_log,
            files.controller_manager_log,
        ]
    }

    /// How long [`KubeCluster::start`] took, until the controller manager was working.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The process ids of etcd, kube-apiserver and kube-controller-manager, by name, while they
    /// run (for benches that account CPU per process).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        [
            ("etcd", &self.etcd),
            ("kube-apiserver", &self.apiserver),
            ("kube-controller-manager", &self.controller_manager),
        ]
        .into_iter()
        .filter_map(|(name, process)| Some((name, process.pid()?)))
        .collect()
    }

    /// Whether all three processes are alive.
    pub fn is_running(&self) -> bool {
        self.etcd.is_running()
            && self.apiserver.is_running()
            && self.controller_manager.is_running()
    }

    /// One request as the admin, e.g. `request("GET", "/version", b"")`; returns the HTTP status
    /// and the body. For the odd raw call; tests use a kube client with [`Self::kubeconfig_path`].
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
        let response = self
            .client
            .request(self.port(), method, path, body, REQUEST_TIMEOUT)?;
        Ok((
            response.status,
            String::from_utf8_lossy(&response.body).into_owned(),
        ))
    }

    /// Creates a namespace named `<prefix>-<random>` and returns its name, so tests sharing a
    /// control plane stay apart.
    pub fn create_namespace(&self, prefix: &str) -> Result<String> {
        let name = format!("{prefix}-{:08x}", crate::ports::random_u64() as u32);
        let body =
            format!(r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{name}"}}}}"#);
        match self.request("POST", "/api/v1/namespaces", body.as_bytes())? {
            (201, _) => Ok(name),
            (status, message) => Err(Error::Kubernetes { status, message }),
        }
    }

    /// A `kubectl` command using the admin kubeconfig (`KUBECONFIG` set); add arguments and run.
    /// `kubectl` comes from `scripts/install-test-deps.sh`, or the file `SIGNAL_TEST_KUBECTL` names.
    pub fn kubectl(&self) -> Result<Command> {
        let mut command = Command::new(crate::binary::KUBECTL.locate()?);
        command.env("KUBECONFIG", self.kubeconfig_path());
        // Discovery and OpenAPI cached per control plane, not in ~/.kube/cache where an earlier
        // control plane on the same port would leave answers about other resources.
        let kubeconfig = self.kubeconfig_path();
        if let Some(dir) = kubeconfig.parent() {
            command.arg(format!(
                "--cache-dir={}",
                dir.join("kubectl-cache").display()
            ));
        }
        Ok(command)
    }

    /// A `helm` command using the admin kubeconfig (`KUBECONFIG` set); add arguments and run.
    /// `helm` comes from `scripts/install-test-deps.sh`, or the file `SIGNAL_TEST_HELM` names.
    pub fn helm(&self) -> Result<Command> {
        let mut command = Command::new(crate::binary::HELM.locate()?);
        command.env("KUBECONFIG", self.kubeconfig_path());
        Ok(command)
    }

    /// Writes a kubeconfig for this server that authenticates with a bearer token (e.g. one the
    /// TokenRequest API issued for a ServiceAccount), with `namespace` as its default.
    pub fn write_token_kubeconfig(&self, path: &Path, token: &str, namespace: &str) -> Result<()> {
        write_kubeconfig(
            path,
            &self.server_url(),
            &self.ca_cert_path(),
            &Credentials::Token(token),
            namespace,
        )
    }

    /// What a node joining this control plane needs: the CA, and kubeconfigs for the kubelet (as
    /// node [`NODE_NAME`]) and for kube-scheduler.
    pub(crate) fn node_credentials(&self) -> NodeCredentials {
        let files = Files::new(self.dir.path());
        NodeCredentials {
            ca_cert: files.ca_cert,
            node_kubeconfig: files.node_kubeconfig,
            scheduler_kubeconfig: files.scheduler_kubeconfig,
        }
    }

    fn kill_and_remove_dir(&self) {
        for pid in [
            self.controller_manager.pid(),
            self.apiserver.pid(),
            self.etcd.pid(),
        ]
        .into_iter()
        .flatten()
        {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: plain syscall on a child we have not reaped, so the pid is still ours.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        self.controller_manager.stop(STOP_GRACE);
        self.apiserver.stop(STOP_GRACE);
        self.etcd.stop(STOP_GRACE);
    }
}

/// `signal-kube`: `SIGNAL_KUBE_BINARY`, else `target/kube/signal-kube` in this workspace (the
/// node's `pause` is built beside it).
pub(crate) const SIGNAL_KUBE: GoBuilt = GoBuilt {
    what: "the Kubernetes control plane binary",
    in_target: "kube/signal-kube",
    script: "scripts/build-kube.sh",
    env_var: BINARY_ENV_VAR,
};

/// Every file of one control plane, inside its temporary directory.
struct Files {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    apiserver_cert: PathBuf,
    apiserver_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    controller_manager_cert: PathBuf,
    controller_manager_key: PathBuf,
    service_account_key: PathBuf,
    service_account_public_key: PathBuf,
    admin_kubeconfig: PathBuf,
    controller_manager_kubeconfig: PathBuf,
    kubelet_client_cert: PathBuf,
    kubelet_client_key: PathBuf,
    node_cert: PathBuf,
    node_key: PathBuf,
    node_kubeconfig: PathBuf,
    scheduler_cert: PathBuf,
    scheduler_key: PathBuf,
    scheduler_kubeconfig: PathBuf,
    etcd_data: PathBuf,
    controller_manager_certs: PathBuf,
    apiserver_certs: PathBuf,
    etcd_log: PathBuf,
    apiserver_log: PathBuf,
    controller_manager_log: PathBuf,
}

impl Files {
    fn new(dir: &Path) -> Files {
        Files {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            controller_manager_cert: dir.join("controller-manager.crt"),
            controller_manager_key: dir.join("controller-manager.key"),
            service_account_key: dir.join("service-account.key"),
            service_account_public_key: dir.join("service-account.pub"),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            controller_manager_kubeconfig: dir.join("controller-manager.kubeconfig"),
            kubelet_client_cert: dir.join("apiserver-kubelet-client.crt"),
            kubelet_client_key: dir.join("apiserver-kubelet-client.key"),
            node_cert: dir.join("node.crt"),
            node_key: dir.join("node.key"),
            node_kubeconfig: dir.join("node.kubeconfig"),
            scheduler_cert: dir.join("scheduler.crt"),
            scheduler_key: dir.join("scheduler.key"),
            scheduler_kubeconfig: dir.join("scheduler.kubeconfig"),
            etcd_data: dir.join("etcd"),
            controller_manager_certs: dir.join("controller-manager-certs"),
            apiserver_certs: dir.join("apiserver-certs"),
            etcd_log: dir.join("etcd.log"),
            apiserver_log: dir.join("kube-apiserver.log"),
            controller_manager_log: dir.join("kube-controller-manager.log"),
        }
    }
}

/// The certificates and keys, written; the admin's TLS client kept for probes.
struct Pki {
    admin_client: TlsClient,
}

impl Pki {
    fn write(files: &Files) -> Result<Pki> {
        let ca = CertificateAuthority::new("signal-testkit kubernetes CA")?;
        ca.write_cert(&files.ca_cert)?;
        let ca_key = ca.key_pem();
        certs::write_private(&files.ca_key, &ca_key)?;

        let serving = ca.issue_server(
            APISERVER,
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(KUBERNETES_SERVICE_IP),
            ],
        )?;
        write_pair(&serving, &files.apiserver_cert, &files.apiserver_key)?;
        let admin = ca.issue_client("signal-testkit-admin", &["system:masters"])?;
        write_pair(&admin, &files.admin_cert, &files.admin_key)?;
        // The user name the default RBAC policy grants the controller manager's rights to.
        let controller_manager = ca.issue_client("system:kube-controller-manager", &[])?;
        write_pair(
            &controller_manager,
            &files.controller_manager_cert,
            &files.controller_manager_key,
        )?;
        // For a node (crate::KubeNode): the kubelet as the node authorizer expects it, the
        // scheduler under the user its default RBAC role is bound to, and the API server's own
        // client identity towards kubelets (logs, exec), which the kubelets authorize by webhook.
        let node = ca.issue_client(&format!("system:node:{NODE_NAME}"), &["system:nodes"])?;
        write_pair(&node, &files.node_cert, &files.node_key)?;
        let scheduler = ca.issue_client("system:kube-scheduler", &[])?;
        write_pair(&scheduler, &files.scheduler_cert, &files.scheduler_key)?;
        let kubelet_client =
            ca.issue_client("kube-apiserver-kubelet-client", &["system:masters"])?;
        write_pair(
            &kubelet_client,
            &files.kubelet_client_cert,
            &files.kubelet_client_key,
        )?;
        let (signing_key, public_key) = certs::signing_key_pem()?;
        certs::write_private(&files.service_account_key, &signing_key)?;
        std::fs::write(&files.service_account_public_key, public_key)
            .context(|| format!("writing {}", files.service_account_public_key.display()))?;

        let admin_client = TlsClient::new(&ca.cert_der(), &admin.cert_der, &admin.key_der)?;
        Ok(Pki { admin_client })
    }
}

fn write_pair(issued: &certs::IssuedCertificate, cert: &Path, key: &Path) -> Result<()> {
    std::fs::write(cert, &issued.cert_pem).context(|| format!("writing {}", cert.display()))?;
    certs::write_private(key, &issued.key_pem)
}

fn log_files(log: &Path) -> Result<(std::fs::File, std::fs::File)> {
    let out = process::append_log(log)?;
    let err = out
        .try_clone()
        .context(|| "duplicating the log file handle".to_string())?;
    Ok((out, err))
}

pub(crate) fn spawn_logged(
    binary: &Path,
    args: Vec<String>,
    log: &Path,
    dir: &Path,
) -> Result<Child> {
    let (out, err) = log_files(log)?;
    let mut command = Command::new(binary);
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    process::spawn(command).context(|| format!("starting {}", binary.display()))
}

fn launch_etcd(binary: &Path, files: &Files, client_port: u16, peer_port: u16) -> Result<Child> {
    let args = vec![
        "etcd".to_string(),
        format!("--data-dir={}", files.etcd_data.display()),
        format!("--listen-client-url=http://127.0.0.1:{client_port}"),
        format!("--listen-peer-url=http://127.0.0.1:{peer_port}"),
    ];
    let dir = files.etcd_log.parent().unwrap_or(Path::new("."));
    spawn_logged(binary, args, &files.etcd_log, dir)
}

fn etcd_healthy(port: u16) -> bool {
    crate::http::request(port, "GET", "/health", b"", PROBE_TIMEOUT)
        .is_ok_and(|r| r.status == 200 && String::from_utf8_lossy(&r.body).contains("true"))
}

fn launch_apiserver(binary: &Path, files: &Files, port: u16, etcd_port: u16) -> Result<Child> {
    let path = |p: &PathBuf| p.display().to_string();
    let args = vec![
        "apiserver".to_string(),
        "--bind-address=127.0.0.1".to_string(),
        "--advertise-address=127.0.0.1".to_string(),
        format!("--secure-port={port}"),
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        format!("--cert-dir={}", path(&files.apiserver_certs)),
        format!("--tls-cert-file={}", path(&files.apiserver_cert)),
        format!("--tls-private-key-file={}", path(&files.apiserver_key)),
        format!("--client-ca-file={}", path(&files.ca_cert)),
        "--authorization-mode=Node,RBAC".to_string(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!(
            "--service-account-key-file={}",
            path(&files.service_account_public_key)
        ),
        format!(
            "--service-account-signing-key-file={}",
            path(&files.service_account_key)
        ),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        // A node's kubelet (crate::KubeNode) is reached at its bridge address, not by host name.
        "--kubelet-preferred-address-types=InternalIP".to_string(),
        format!(
            "--kubelet-client-certificate={}",
            path(&files.kubelet_client_cert)
        ),
        format!("--kubelet-client-key={}", path(&files.kubelet_client_key)),
        // Endpoints may not hold loopback addresses, and no pod would reach them anyway.
        "--endpoint-reconciler-type=none".to_string(),
        "--profiling=false".to_string(),
    ];
    spawn_logged(
        binary,
        args,
        &files.apiserver_log,
        files.apiserver_log.parent().unwrap_or(Path::new(".")),
    )
}

fn launch_controller_manager(binary: &Path, files: &Files, port: u16) -> Result<Child> {
    let path = |p: &PathBuf| p.display().to_string();
    let kubeconfig = path(&files.controller_manager_kubeconfig);
    let args = vec![
        "controller-manager".to_string(),
        "--bind-address=127.0.0.1".to_string(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", path(&files.controller_manager_certs)),
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        // One controller manager per control plane: no election to wait for.
        "--leader-elect=false".to_string(),
        // Each controller acts as its own ServiceAccount, as in a real cluster.
        "--use-service-account-credentials=true".to_string(),
        format!(
            "--service-account-private-key-file={}",
            path(&files.service_account_key)
        ),
        format!("--root-ca-file={}", path(&files.ca_cert)),
        format!("--cluster-signing-cert-file={}", path(&files.ca_cert)),
        format!("--cluster-signing-key-file={}", path(&files.ca_key)),
        "--profiling=false".to_string(),
    ];
    spawn_logged(
        binary,
        args,
        &files.controller_manager_log,
        files
            .controller_manager_log
            .parent()
            .unwrap_or(Path::new(".")),
    )
}

/// The HTTP status of a GET as the admin, or `None` when the server does not answer (yet).
fn status_of(client: &TlsClient, port: u16, path: &str) -> Option<u16> {
    client
        .request(port, "GET", path, b"", PROBE_TIMEOUT)
        .ok()
        .map(|r| r.status)
}

/// How a kubeconfig's user authenticates.
enum Credentials<'a> {
    ClientCertificate { cert: &'a Path, key: &'a Path },
    Token(&'a str),
}

fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    credentials: &Credentials<'_>,
    namespace: &str,
) -> Result<()> {
    // JSON is YAML, and needs no YAML library here.
    let user = match credentials {
        Credentials::ClientCertificate { cert, key } => format!(
            r#"{{"client-certificate":{},"client-key":{}}}"#,
            json_string(&cert.display().to_string()),
            json_string(&key.display().to_string())
        ),
        Credentials::Token(token) => format!(r#"{{"token":{}}}"#, json_string(token)),
    };
    let kubeconfig = format!(
        r#"{{"apiVersion":"v1","kind":"Config",
"clusters":[{{"name":"signal-test","cluster":{{"server":{},"certificate-authority":{}}}}}],
"users":[{{"name":"signal-test","user":{user}}}],
"contexts":[{{"name":"signal-test","context":{{"cluster":"signal-test","user":"signal-test","namespace":{}}}}}],
"current-context":"signal-test"}}
"#,
        json_string(server),
        json_string(&ca.display().to_string()),
        json_string(namespace),
    );
    certs::write_private(path, &kubeconfig)
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::is_port_free;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(json_string("x\ny"), r#""x\u000ay""#);
    }

    #[test]
    fn a_missing_binary_names_the_build_script() {
        let dir = tempfile::tempdir().unwrap();
        let error = SIGNAL_KUBE.not_built(dir.path().join("nothing"));
        assert!(
            error.to_string().contains("scripts/build-kube.sh"),
            "{error}"
        );
    }

    #[test]
    fn starts_serves_and_leaves_nothing_behind() {
        let cluster = KubeCluster::start().unwrap();
        eprintln!("control plane started in {:?}", cluster.started_in());
        assert!(cluster.is_running());
        let (status, version) = cluster.request("GET", "/version", b"").unwrap();
        assert_eq!(status, 200, "{version}");
        assert!(
            version.contains(&format!("\"gitVersion\": \"{KUBERNETES_VERSION}\"")),
            "{version}"
        );
        let namespace = cluster.create_namespace("testkit").unwrap();
        let (status, body) = cluster
            .request("GET", &format!("/api/v1/namespaces/{namespace}"), b"")
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let kubeconfig = std::fs::read_to_string(cluster.kubeconfig_path()).unwrap();
        assert!(kubeconfig.contains(&cluster.server_url()), "{kubeconfig}");

        let (dir, port) = (cluster.dir().to_path_buf(), cluster.port());
        let pids: Vec<u32> = [
            cluster.etcd.pid(),
            cluster.apiserver.pid(),
            cluster.controller_manager.pid(),
        ]
        .into_iter()
        .flatten()
        .collect();
        assert_eq!(pids.len(), 3);
        drop(cluster);
        assert!(!dir.exists(), "{} is left behind", dir.display());
        assert!(is_port_free(port));
        for pid in pids {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "pid {pid} runs on"
            );
        }
    }
}
