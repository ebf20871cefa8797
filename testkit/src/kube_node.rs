//! A real Kubernetes node for tests: kube-scheduler, containerd with runc, a CNI bridge and an
//! upstream kubelet, joined to a [`KubeCluster`], so pods really run.
//!
//! kube-scheduler and the kubelet come from the same `signal-kube` binary as the control plane
//! (k8s.io/kubernetes v1.36.3, whose kubelet still accepts Debian's containerd 1.6 and the
//! cgroup v1 hierarchy these machines mount). containerd, runc and the CNI plugins are Debian's
//! (`scripts/install-test-deps.sh`). Images come from no registry: [`KubeNode::import_image`]
//! loads an archive made by [`crate::write_image_archive`], and the sandbox ("pause") image is
//! `target/kube/pause`, built by `scripts/build-kube.sh`, packed the same way.
//!
//! Network: a bridge of our own with a random `10.x.y.0/24`; the node's address (and the
//! kubelet's) is the bridge's `10.x.y.1`, the pods get the rest. Servers the pods use listen on
//! that address too (`NatsServer::start_on(node.address())`...). Two iptables rules keep pods on
//! this machine: nothing is forwarded from the bridge to another interface, and the kubelet's
//! port is closed to the bridge side (the API server reaches it from the host). No cluster DNS
//! and no kube-proxy: pods use addresses.
//!
//! Everything lives in one temporary directory (containerd's root and state, the kubelet's root
//! and pod logs, CNI configuration and address leases, network namespaces), except what the
//! programs fix themselves: `/run/containerd/s/` (the shims' sockets) and `/var/log/containers/`
//! (the kubelet's log links). Dropping the node kills its containers, unmounts what they
//! mounted, removes the bridge and the rules, and the directory. A test process killed before
//! that leaves a directory that the next testkit user sweeps the same way.
//!
//! Needs root (containerd and runc do), which these machines give.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

use crate::binary::Program;
use crate::error::{Error, IoContext, Result};
use crate::kube_cluster::{self, KubeCluster, NODE_NAME};
use crate::oci_image::{ImageSpec, write_image_archive};
use crate::ports::{PortReservation, random_u64, reserve_port};
use crate::process::{self, ServerProcess};

/// The sandbox image the node's containerd is told to use; imported at start, never pulled.
pub const PAUSE_IMAGE: &str = "docker.io/signal-testkit/pause:1";

const CONTAINERD: Program = Program {
    name: "containerd",
    env_var: "SIGNAL_TEST_CONTAINERD",
    install: "apt-get install -y containerd runc containernetworking-plugins iptables",
};
const CTR: Program = Program {
    name: "ctr",
    env_var: "SIGNAL_TEST_CTR",
    install: "apt-get install -y containerd",
};
const RUNC: Program = Program {
    name: "runc",
    env_var: "SIGNAL_TEST_RUNC",
    install: "apt-get install -y runc",
};
const IP: Program = Program {
    name: "ip",
    env_var: "SIGNAL_TEST_IP",
    install: "apt-get install -y iproute2",
};
const IPTABLES: Program = Program {
    name: "iptables",
    env_var: "SIGNAL_TEST_IPTABLES",
    install: "apt-get install -y iptables",
};
/// Where Debian's containernetworking-plugins puts the plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";

const CONTAINERD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Registration, the CNI network and the node-lifecycle controller lifting the not-ready taint.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);
const SCHEDULER_START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Where the kubelet links container logs, whatever its configuration says.
const CONTAINER_LOG_LINKS: &str = "/var/log/containers";
/// The file in the node's directory that says how to undo its network (see [`Network`]).
const NETWORK_RECORD: &str = "network";

/// A running node joined to a control plane; torn down when dropped.
#[derive(Debug)]
pub struct KubeNode {
    // Stopped in this order by Drop, then the containers, mounts and network.
    scheduler: ServerProcess,
    kubelet: ServerProcess,
    containerd: ServerProcess,
    network: Network,
    api_forward: Option<ApiForward>,
    ctr: PathBuf,
    started_in: Duration,
    _ports: Vec<PortReservation>,
    // Declared last so everything above is gone before the directory is removed.
    dir: TempDir,
}

impl KubeNode {
    /// Starts containerd, the kubelet and kube-scheduler, registers node [`NODE_NAME`] with
    /// `cluster`, and waits until it is Ready and schedulable (typically 10-20 s).
    pub fn start(cluster: &KubeCluster) -> Result<KubeNode> {
        let started = Instant::now();
        // SAFETY: a plain query of this process's credentials.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::Node(
                "a node needs root: containerd, runc and the bridge do".to_string(),
            ));
        }
        let signal_kube = kube_cluster::SIGNAL_KUBE.locate()?;
        let pause = signal_kube.with_file_name("pause");
        if !pause.is_file() {
            return Err(kube_cluster::SIGNAL_KUBE.not_built(pause));
        }
        let containerd = CONTAINERD.locate()?;
        let ctr = CTR.locate()?;
        let runc = RUNC.locate()?;
        let (ip, iptables) = (IP.locate()?, IPTABLES.locate()?);
        if !Path::new(CNI_BIN_DIR).join("bridge").is_file() {
            return Err(Error::Node(format!(
                "no CNI bridge plugin in {CNI_BIN_DIR}: apt-get install -y containernetworking-plugins"
            )));
        }
        let credentials = cluster.node_credentials();
        let dir = process::server_dir("node")?;
        let files = Files::new(dir.path());
        for sub in [&files.cni_conf_dir, &files.kubelet_root, &files.pod_logs] {
            std::fs::create_dir_all(sub).context(|| format!("creating {}", sub.display()))?;
        }

        let kubelet_port = reserve_port()?;
        let kubelet_healthz_port = reserve_port()?;
        let scheduler_port = reserve_port()?;
        let network = Network::create(&ip, &iptables, dir.path(), kubelet_port.port())?;
        write_cni_config(&files, &network)?;

        write_containerd_config(&files, &runc)?;
        let containerd = ServerProcess::start(
            || {
                spawn_logged(
                    &containerd,
                    vec![format!("--config={}", files.containerd_config.display())],
                    &files.containerd_log,
                )
            },
            |child| {
                process::wait_until_ready(
                    "containerd",
                    child,
                    CONTAINERD_START_TIMEOUT,
                    std::slice::from_ref(&files.containerd_log),
                    || ctr_command(&ctr, &files.containerd_socket, &["version"]).is_ok(),
                )
            },
        )?;
        let mut node = KubeNode {
            scheduler: ServerProcess::stopped(),
            kubelet: ServerProcess::stopped(),
            containerd,
            network,
            api_forward: None,
            ctr,
            started_in: Duration::ZERO,
            _ports: Vec::new(),
            dir,
        };
        let image_archive = node.dir.path().join("pause-image.tar");
        write_image_archive(
            &ImageSpec {
                name: PAUSE_IMAGE.to_string(),
                program: pause,
                args: Vec::new(),
                user: "65535:65535".to_string(),
            },
            &image_archive,
        )?;
        node.import_image(&image_archive)?;

        write_kubelet_config(
            &files,
            &credentials.ca_cert,
            node.network.address,
            kubelet_port.port(),
            kubelet_healthz_port.port(),
        )?;
        let kubelet_args = vec![
            "kubelet".to_string(),
            format!("--config={}", files.kubelet_config.display()),
            format!("--kubeconfig={}", credentials.node_kubeconfig.display()),
            format!("--root-dir={}", files.kubelet_root.display()),
            format!("--cert-dir={}", files.kubelet_pki.display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={}", node.network.address),
            "--v=1".to_string(),
        ];
        node.kubelet = ServerProcess::start(
            || spawn_logged(&signal_kube, kubelet_args, &files.kubelet_log),
            |child| {
                process::wait_until_ready(
                    "kubelet",
                    child,
                    NODE_READY_TIMEOUT,
                    std::slice::from_ref(&files.kubelet_log),
                    || node_is_ready(cluster),
                )
            },
        )?;

        let scheduler_kubeconfig = credentials.scheduler_kubeconfig.display().to_string();
        let scheduler_args = vec![
            "scheduler".to_string(),
            format!("--kubeconfig={scheduler_kubeconfig}"),
            format!("--authentication-kubeconfig={scheduler_kubeconfig}"),
            format!("--authorization-kubeconfig={scheduler_kubeconfig}"),
            "--leader-elect=false".to_string(),
            "--bind-address=127.0.0.1".to_string(),
            format!("--secure-port={}", scheduler_port.port()),
        ];
        let scheduler_port_number = scheduler_port.port();
        node.scheduler = ServerProcess::start(
            || spawn_logged(&signal_kube, scheduler_args, &files.scheduler_log),
            |child| {
                process::wait_until_ready(
                    "kube-scheduler",
                    child,
                    SCHEDULER_START_TIMEOUT,
                    std::slice::from_ref(&files.scheduler_log),
                    || {
                        std::net::TcpStream::connect_timeout(
                            &(Ipv4Addr::LOCALHOST, scheduler_port_number).into(),
                            PROBE_TIMEOUT,
                        )
                        .is_ok()
                    },
                )
            },
        )?;
        node.api_forward = Some(ApiForward::start(node.network.address, cluster.port())?);
        node._ports = vec![kubelet_port, kubelet_healthz_port, scheduler_port];
        node.started_in = started.elapsed();
        Ok(node)
    }

    /// The node's address: the bridge's, which pods reach and which servers for them listen on.
    pub fn address(&self) -> Ipv4Addr {
        self.network.address
    }

    /// Where pods reach the API server: a port on the node's address forwarded to the API server
    /// on 127.0.0.1 (TCP, so TLS is end to end). The serving certificate names
    /// `kubernetes.default.svc`: a pod gets that name for this address through `hostAliases`, and
    /// `KUBERNETES_SERVICE_HOST=kubernetes.default.svc` with `KUBERNETES_SERVICE_PORT` this port.
    pub fn api_server_for_pods(&self) -> std::net::SocketAddr {
        let port = self.api_forward.as_ref().map_or(0, |f| f.port);
        (self.network.address, port).into()
    }

    /// The node's name in the API.
    pub fn name(&self) -> &'static str {
        NODE_NAME
    }

    /// How long [`KubeNode::start`] took, until the node was Ready.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The logs of containerd, the kubelet and kube-scheduler.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let files = Files::new(self.dir.path());
        vec![files.containerd_log, files.kubelet_log, files.scheduler_log]
    }

    /// Loads an OCI image archive ([`crate::write_image_archive`]) into the node's containerd,
    /// where the kubelet finds it under the name the archive gives (pods then need no pull:
    /// `imagePullPolicy: IfNotPresent` or `Never`).
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let archive = archive.display().to_string();
        ctr_command(
            &self.ctr,
            &Files::new(self.dir.path()).containerd_socket,
            &["-n", "k8s.io", "images", "import", &archive],
        )
        .map(drop)
    }

    /// Whether containerd, the kubelet and kube-scheduler are alive.
    pub fn is_running(&self) -> bool {
        self.containerd.is_running() && self.kubelet.is_running() && self.scheduler.is_running()
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        self.api_forward.take();
        self.scheduler.stop(STOP_GRACE);
        self.kubelet.stop(STOP_GRACE);
        kill_containers(self.dir.path());
        self.containerd.stop(STOP_GRACE);
        unmount_under(self.dir.path());
        self.network.remove();
    }
}

/// Undoes what a node whose test process died left behind in `dir` (its containers, mounts and
/// network); the caller then removes the directory.
pub(crate) fn clean_up_stale(dir: &Path) {
    kill_containers(dir);
    unmount_under(dir);
    if let Some(network) = Network::read_record(dir) {
        network.remove();
    }
}

/// A TCP forwarder from a port on the node's address to the API server on 127.0.0.1, a thread per
/// connection and direction; stops accepting when dropped.
#[derive(Debug)]
struct ApiForward {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    address: Ipv4Addr,
}

impl ApiForward {
    fn start(address: Ipv4Addr, api_server_port: u16) -> Result<ApiForward> {
        let listener = std::net::TcpListener::bind((address, 0))
            .context(|| format!("listening on {address} for the API server forward"))?;
        let port = listener
            .local_addr()
            .context(|| "reading the forward's port".to_string())?
            .port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::Builder::new()
            .name("signal-testkit-api-forward".into())
            .spawn(move || {
                for incoming in listener.incoming() {
                    if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let Ok(client) = incoming else { continue };
                    let Ok(server) =
                        std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, api_server_port))
                    else {
                        continue;
                    };
                    for (mut from, mut to) in [
                        (client.try_clone(), server.try_clone()),
                        (server.try_clone(), client.try_clone()),
                    ]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                    {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            })
            .context(|| "starting the API server forward".to_string())?;
        Ok(ApiForward {
            port,
            stop,
            address,
        })
    }
}

impl Drop for ApiForward {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect((self.address, self.port));
    }
}

/// Every file of one node, inside its temporary directory.
struct Files {
    containerd_config: PathBuf,
    containerd_root: PathBuf,
    containerd_state: PathBuf,
    containerd_socket: PathBuf,
    containerd_log: PathBuf,
    cni_conf_dir: PathBuf,
    cni_ipam_dir: PathBuf,
    kubelet_config: PathBuf,
    kubelet_root: PathBuf,
    kubelet_pki: PathBuf,
    kubelet_log: PathBuf,
    pod_logs: PathBuf,
    scheduler_log: PathBuf,
}

impl Files {
    fn new(dir: &Path) -> Files {
        Files {
            containerd_config: dir.join("containerd.toml"),
            containerd_root: dir.join("containerd/root"),
            containerd_state: dir.join("containerd/state"),
            containerd_socket: dir.join("containerd.sock"),
            containerd_log: dir.join("containerd.log"),
            cni_conf_dir: dir.join("cni/net.d"),
            cni_ipam_dir: dir.join("cni/ipam"),
            kubelet_config: dir.join("kubelet.json"),
            kubelet_root: dir.join("kubelet"),
            kubelet_pki: dir.join("kubelet-pki"),
            kubelet_log: dir.join("kubelet.log"),
            pod_logs: dir.join("pod-logs"),
            scheduler_log: dir.join("kube-scheduler.log"),
        }
    }
}

/// The node's bridge and the iptables rules that keep its pods on this machine.
#[derive(Debug)]
struct Network {
    ip: PathBuf,
    iptables: PathBuf,
    bridge: String,
    address: Ipv4Addr,
    /// Each rule's specification after the chain, as given to `iptables -I CHAIN 1`.
    rules: Vec<(String, Vec<String>)>,
}

impl Network {
    /// Makes a bridge with a `10.x.y.1/24` no interface of this machine uses yet, and the rules.
    fn create(ip: &Path, iptables: &Path, dir: &Path, kubelet_port: u16) -> Result<Network> {
        let used = run(ip, &["-4", "-o", "addr", "show"])?;
        let mut attempt = 0;
        let (bridge, address) = loop {
            attempt += 1;
            let random = random_u64();
            let address = Ipv4Addr::new(10, 200 + (random % 50) as u8, (random >> 8) as u8, 1);
            let [a, b, c, _] = address.octets();
            let bridge = format!("sigbr{:04x}", (random >> 16) as u16);
            if !used.contains(&format!(" {a}.{b}.{c}.")) {
                break (bridge, address);
            }
            if attempt > 20 {
                return Err(Error::Node(format!(
                    "no free 10.200-249.x.0/24 subnet for the node's bridge among:\n{used}"
                )));
            }
        };
        let tag = format!("signal-testkit {bridge}");
        let rules = vec![
            (
                "FORWARD".to_string(),
                ["-i", &bridge, "!", "-o", &bridge, "-j", "DROP"]
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>(),
            ),
            (
                "INPUT".to_string(),
                [
                    "-i",
                    &bridge,
                    "-p",
                    "tcp",
                    "--dport",
                    &kubelet_port.to_string(),
                ]
                .into_iter()
                .map(String::from)
                .chain(["-j", "DROP"].map(String::from))
                .collect(),
            ),
        ]
        .into_iter()
        .map(|(chain, mut spec)| {
            spec.extend(["-m", "comment", "--comment", &tag].map(String::from));
            (chain, spec)
        })
        .collect();
        let network = Network {
            ip: ip.to_path_buf(),
            iptables: iptables.to_path_buf(),
            bridge,
            address,
            rules,
        };
        // Recorded first, so that a test process killed half-way is still swept clean.
        network.write_record(dir)?;
        let result = network.set_up();
        if result.is_err() {
            network.remove();
        }
        result.map(|()| network)
    }

    fn set_up(&self) -> Result<()> {
        let bridge = self.bridge.as_str();
        run(&self.ip, &["link", "add", "name", bridge, "type", "bridge"])?;
        run(
            &self.ip,
            &[
                "addr",
                "add",
                &format!("{}/24", self.address),
                "dev",
                bridge,
            ],
        )?;
        run(&self.ip, &["link", "set", bridge, "up"])?;
        for (chain, spec) in &self.rules {
            let mut args = vec!["-w", "-I", chain.as_str(), "1"];
            args.extend(spec.iter().map(String::as_str));
            run(&self.iptables, &args)?;
        }
        Ok(())
    }

    /// Best effort: each step is tried whatever the previous one did.
    fn remove(&self) {
        for (chain, spec) in &self.rules {
            let mut args = vec!["-w", "-D", chain.as_str()];
            args.extend(spec.iter().map(String::as_str));
            let _ = run(&self.iptables, &args);
        }
        let _ = run(&self.ip, &["link", "del", self.bridge.as_str()]);
    }

    fn write_record(&self, dir: &Path) -> Result<()> {
        let record = json!({
            "ip": self.ip, "iptables": self.iptables, "bridge": self.bridge,
            "address": self.address.to_string(), "rules": self.rules,
        });
        let path = dir.join(NETWORK_RECORD);
        std::fs::write(&path, record.to_string()).context(|| format!("writing {}", path.display()))
    }

    fn read_record(dir: &Path) -> Option<Network> {
        let text = std::fs::read_to_string(dir.join(NETWORK_RECORD)).ok()?;
        let record: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(Network {
            ip: PathBuf::from(record["ip"].as_str()?),
            iptables: PathBuf::from(record["iptables"].as_str()?),
            bridge: record["bridge"].as_str()?.to_string(),
            address: record["address"].as_str()?.parse().ok()?,
            rules: serde_json::from_value(record["rules"].clone()).ok()?,
        })
    }
}

fn write_cni_config(files: &Files, network: &Network) -> Result<()> {
    let [a, b, c, _] = network.address.octets();
    let config = json!({
        "cniVersion": "0.4.0",
        "name": "signal-node",
        "plugins": [{
            "type": "bridge",
            "bridge": network.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{
                    "subnet": format!("{a}.{b}.{c}.0/24"),
                    "rangeStart": format!("{a}.{b}.{c}.10"),
                    "gateway": network.address.to_string(),
                }]],
                "dataDir": files.cni_ipam_dir,
            },
        }],
    });
    let path = files.cni_conf_dir.join("10-signal-node.conflist");
    std::fs::write(&path, config.to_string()).context(|| format!("writing {}", path.display()))
}

fn write_containerd_config(files: &Files, runc: &Path) -> Result<()> {
    let quoted = |path: &Path| json!(path.display().to_string()).to_string();
    let config = format!(
        r#"version = 2
root = {root}
state = {state}
# Snapshotters and plugins that need what these machines lack, or write outside the directory.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE here: containers may only raise their OOM score.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = {runc}
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = {cni}
"#,
        root = quoted(&files.containerd_root),
        state = quoted(&files.containerd_state),
        socket = quoted(&files.containerd_socket),
        ttrpc = quoted(&files.containerd_socket.with_extension("sock.ttrpc")),
        runc = quoted(runc),
        cni = quoted(&files.cni_conf_dir),
    );
    std::fs::write(&files.containerd_config, config)
        .context(|| format!("writing {}", files.containerd_config.display()))
}

fn write_kubelet_config(
    files: &Files,
    ca_cert: &Path,
    address: Ipv4Addr,
    port: u16,
    healthz_port: u16,
) -> Result<()> {
    let config = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address.to_string(),
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        // The API server (logs, exec) proves itself with a client certificate of the cluster's CA
        // and is authorized by webhook; nobody else gets in.
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": ca_cert.display().to_string()},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": format!("unix://{}", files.containerd_socket.display()),
        "podLogsDir": files.pod_logs.display().to_string(),
        // These machines mount cgroup v1 and give containerd 1.6, which does not tell the kubelet
        // its cgroup driver: cgroupfs, no per-QoS hierarchy, nothing enforced on node allocatable.
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": false,
        "enforceNodeAllocatable": ["none"],
        "failCgroupV1": false,
        "failSwapOn": false,
        // A shared test machine: evict only when truly out of room, never collect images (ours
        // cannot be pulled again).
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "localStorageCapacityIsolation": false,
        // The host's iptables belong to the host: only our two rules (see Network) are added.
        "makeIPTablesUtilChains": false,
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": false,
        "rotateCertificates": false,
        "volumePluginDir": files.kubelet_root.join("volume-plugins").display().to_string(),
        // Pods and their status follow sooner than the defaults, as tests wait for them.
        "syncFrequency": "10s",
        "nodeStatusReportFrequency": "10s",
    });
    std::fs::write(&files.kubelet_config, config.to_string())
        .context(|| format!("writing {}", files.kubelet_config.display()))
}

/// Node [`NODE_NAME`] is Ready and no longer carries the not-ready taint.
fn node_is_ready(cluster: &KubeCluster) -> bool {
    let Ok((200, body)) = cluster.request("GET", &format!("/api/v1/nodes/{NODE_NAME}"), b"") else {
        return false;
    };
    let Ok(node) = serde_json::from_str::<serde_json::Value>(&body) else {
        return false;
    };
    let ready = node["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
    let tainted = node["spec"]["taints"].as_array().is_some_and(|taints| {
        taints.iter().any(|t| {
            t["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("node.kubernetes.io/"))
        })
    });
    ready && !tainted
}

/// The kube_cluster launcher, run from the node's directory.
fn spawn_logged(binary: &Path, args: Vec<String>, log: &Path) -> Result<Child> {
    kube_cluster::spawn_logged(binary, args, log, log.parent().unwrap_or(Path::new("/")))
}

fn ctr_command(ctr: &Path, socket: &Path, args: &[&str]) -> Result<String> {
    let socket = socket.display().to_string();
    let mut all = vec!["--address", socket.as_str()];
    all.extend_from_slice(args);
    run(ctr, &all)
}

/// Runs a command to completion; its stdout, or an error with its stderr.
fn run(program: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context(|| format!("running {}", program.display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Node(format!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// SIGKILLs the containerd shims started for the node in `dir` and every process under them
/// (the containers). Shims outlive containerd by design, so stopping containerd is not enough.
fn kill_containers(dir: &Path) {
    let socket = Files::new(dir).containerd_socket.display().to_string();
    let processes = process_table();
    let shims: Vec<u32> = processes
        .iter()
        .filter(|p| p.command.contains(&socket) && p.command.contains("containerd-shim"))
        .map(|p| p.pid)
        .collect();
    let sockets = listening_sockets(&shims);
    let mut doomed = shims.clone();
    let mut index = 0;
    while index < doomed.len() {
        let parent = doomed[index];
        doomed.extend(
            processes
                .iter()
                .filter(|p| p.parent == parent)
                .map(|p| p.pid),
        );
        index += 1;
    }
    // Containers first, so no shim is left to restart or report them.
    for pid in doomed.iter().rev() {
        if let Ok(pid) = libc::pid_t::try_from(*pid) {
            // SAFETY: plain syscall; the pids were just read from /proc.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    while doomed
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    // A killed shim leaves its socket in /run/containerd/s/, and the kubelet its log links.
    for socket in sockets {
        let _ = std::fs::remove_file(socket);
    }
    let pod_logs = Files::new(dir).pod_logs;
    if let Ok(links) = std::fs::read_dir(CONTAINER_LOG_LINKS) {
        for link in links.flatten() {
            if std::fs::read_link(link.path()).is_ok_and(|target| target.starts_with(&pod_logs)) {
                let _ = std::fs::remove_file(link.path());
            }
        }
    }
}

/// The paths of the Unix sockets the processes `pids` listen on.
fn listening_sockets(pids: &[u32]) -> Vec<PathBuf> {
    let mut inodes = std::collections::HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Some(inode) = std::fs::read_link(fd.path()).ok().and_then(|target| {
                target
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')
                    .map(String::from)
            }) {
                inodes.insert(inode);
            }
        }
    }
    // /proc/net/unix: "Num RefCount Protocol Flags Type St Inode Path".
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (inode, path) = (fields.get(6)?, fields.get(7)?);
            (inodes.contains(*inode) && path.starts_with('/')).then(|| PathBuf::from(path))
        })
        .collect()
}

struct ProcessEntry {
    pid: u32,
    parent: u32,
    command: String,
}

fn process_table() -> Vec<ProcessEntry> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let parent = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            let command = std::fs::read(entry.path().join("cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
                .unwrap_or_default();
            Some(ProcessEntry {
                pid,
                parent,
                command,
            })
        })
        .collect()
}

/// Lazily unmounts everything mounted under `dir` (overlay root filesystems, volumes, network
/// namespaces), deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        // mountinfo escapes spaces and the like as octal; our paths have none.
        .filter(|point| point.starts_with(&prefix))
        .map(String::from)
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in points {
        if let Ok(path) = std::ffi::CString::new(point) {
            // SAFETY: a plain syscall with a valid C string.
            unsafe {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_phase_and_ip(cluster: &KubeCluster, namespace: &str, name: &str) -> (String, String) {
        let (_, body) = cluster
            .request(
                "GET",
                &format!("/api/v1/namespaces/{namespace}/pods/{name}"),
                b"",
            )
            .unwrap();
        let pod: serde_json::Value = serde_json::from_str(&body).unwrap();
        (
            pod["status"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            pod["status"]["podIP"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }

    #[test]
    fn runs_a_pod_from_an_imported_image_and_leaves_nothing_behind() {
        let cluster = KubeCluster::start().unwrap();
        let node = KubeNode::start(&cluster).unwrap();
        eprintln!(
            "node {} at {} ready in {:?}",
            node.name(),
            node.address(),
            node.started_in()
        );
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("sleep.tar");
        write_image_archive(
            &ImageSpec {
                name: "docker.io/library/signal-sleep:test".to_string(),
                program: PathBuf::from("/bin/sleep"),
                args: vec!["3600".to_string()],
                user: "65532:65532".to_string(),
            },
            &archive,
        )
        .unwrap();
        node.import_image(&archive).unwrap();

        let namespace = cluster.create_namespace("node").unwrap();
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "sleeper"},
            "spec": {
                "containers": [{
                    "name": "sleep", "image": "signal-sleep:test", "imagePullPolicy": "Never",
                    "securityContext": {
                        "runAsNonRoot": true, "readOnlyRootFilesystem": true,
                        "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                }],
                "terminationGracePeriodSeconds": 1,
            },
        });
        let (status, body) = cluster
            .request(
                "POST",
                &format!("/api/v1/namespaces/{namespace}/pods"),
                pod.to_string().as_bytes(),
            )
            .unwrap();
        assert_eq!(status, 201, "{body}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let (phase, ip) = loop {
            let (phase, ip) = pod_phase_and_ip(&cluster, &namespace, "sleeper");
            if phase == "Running" || Instant::now() > deadline {
                break (phase, ip);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let logs: Vec<String> = node
            .log_files()
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap_or_default())
            .collect();
        assert_eq!(phase, "Running", "kubelet log:\n{}", logs[1]);
        let [a, b, c, _] = node.address().octets();
        assert!(ip.starts_with(&format!("{a}.{b}.{c}.")), "pod IP {ip}");

        let node_dir = node.dir.path().to_path_buf();
        let bridge = node.network.bridge.clone();
        drop(node);
        assert!(!node_dir.exists(), "{} is left behind", node_dir.display());
        let links = run(Path::new("/usr/sbin/ip"), &["-o", "link", "show"]).unwrap();
        assert!(
            !links.contains(&bridge),
            "{bridge} is left behind:\n{links}"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&node_dir.display().to_string()),
            "mounts are left behind"
        );
        assert!(
            !process_table()
                .iter()
                .any(|p| p.command.contains("sleep 3600")),
            "the container runs on"
        );
        let links: Vec<_> = std::fs::read_dir(CONTAINER_LOG_LINKS)
            .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            !links
                .iter()
                .any(|name| name.to_string_lossy().contains(&namespace)),
            "log links are left behind: {links:?}"
        );
    }
}
