//! TLS to NATS, ClickHouse and Redis against real servers started by the testkit with a
//! throwaway CA, every one of them requiring client certificates (mutual TLS).
//!
//! A pipeline with verification on stores rows and cache keys end to end: the operator's data
//! plane (stream, consumer, table) and a `signal-worker` process, both given the PEM files the way
//! a pod gets them (paths in `SIGNAL_<SERVER>_TLS_<PART>_FILE`). Then, for each server, a wrong
//! CA, an expired server certificate and a missing client certificate each give one line naming
//! the server and the cause: in the operator's report (the condition message) for NATS and
//! ClickHouse, in the workers' health report for Redis (the operator never connects to Redis),
//! and in the worker's log for all three.

#[path = "support/worker_binary.rs"]
mod worker_binary;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use signal_demo::sample_signals::sample_signal;
use signal_model::credentials::PipelineCredentials;
use signal_model::tls::{TlsPart, TlsServer};
use signal_operator::dataplane::worker_health::WorkerHealth;
use signal_operator::dataplane::{read_worker_health, reconcile_data_plane};
use signal_testkit::certs::{CertificateAuthority, IssuedCertificate};
use signal_testkit::{ChildProcess, ClickHouseServer, NatsServer, RedisServer, ServerTls};

/// Upper bound for what a worker or the operator should do after a step.
const REACT_TIMEOUT: Duration = Duration::from_secs(30);

/// The servers every test shares: a good and an expired instance of each, all with mutual TLS.
struct Servers {
    ca: CertificateAuthority,
    /// A CA that signed nothing the servers present: trusting it instead is the "wrong CA".
    other_ca: CertificateAuthority,
    client: IssuedCertificate,
    nats: NatsServer,
    clickhouse: ClickHouseServer,
    redis: RedisServer,
    expired_nats: NatsServer,
    expired_clickhouse: ClickHouseServer,
    expired_redis: RedisServer,
}

fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let ca = CertificateAuthority::new("signal test CA").unwrap();
        let good = || ServerTls::new(&ca).unwrap().requiring_client_certificate();
        let expired = || {
            ServerTls::expired(&ca)
                .unwrap()
                .requiring_client_certificate()
        };
        Servers {
            other_ca: CertificateAuthority::new("another CA").unwrap(),
            client: ca.issue_client("signal-worker", &[]).unwrap(),
            nats: NatsServer::start_with_tls(good()).unwrap(),
            clickhouse: ClickHouseServer::start_with_tls(good()).unwrap(),
            redis: RedisServer::start_with_tls(good()).unwrap(),
            expired_nats: NatsServer::start_with_tls(expired()).unwrap(),
            expired_clickhouse: ClickHouseServer::start_with_tls(expired()).unwrap(),
            expired_redis: RedisServer::start_with_tls(expired()).unwrap(),
            ca,
        }
    })
}

/// What is wrong with the TLS to one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The client trusts a CA that did not sign the server's certificate.
    WrongCa,
    /// The server presents a certificate that expired in 2001.
    ExpiredCertificate,
    /// The server requires a client certificate and the client has none.
    MissingClientCertificate,
}

impl Fault {
    /// Words the one-line error must contain.
    fn cause(self) -> &'static str {
        match self {
            Fault::WrongCa => "not signed by a trusted CA",
            Fault::ExpiredCertificate => "certificate has expired",
            Fault::MissingClientCertificate => "requires a client certificate",
        }
    }
}

/// One pipeline's files: the manifest, the PEM files, and the variables that name them.
struct Scenario {
    name: String,
    dir: tempfile::TempDir,
    manifest: PathBuf,
    env: BTreeMap<String, String>,
    nats_url: String,
    clickhouse_url: String,
    redis_url: String,
}

fn unique(label: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{label}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A pipeline over TLS to the shared servers, with `fault` (if any) on one server's connection.
fn scenario(label: &str, fault: Option<(TlsServer, Fault)>) -> Scenario {
    scenario_with(label, fault, None)
}

/// Like [`scenario`], with `insecureSkipVerify: true` (and no CA) for the `insecure` server.
fn scenario_with(
    label: &str,
    fault: Option<(TlsServer, Fault)>,
    insecure: Option<TlsServer>,
) -> Scenario {
    let servers = servers();
    let name = unique(label);
    let dir = tempfile::tempdir().unwrap();
    let write = |file: &str, text: &str| {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca = write("ca.crt", &servers.ca.cert_pem());
    let other_ca = write("other-ca.crt", &servers.other_ca.cert_pem());
    let cert = write("client.crt", &servers.client.cert_pem);
    let key = write("client.key", &servers.client.key_pem);
    let faulty = |server: TlsServer, wanted: Fault| fault == Some((server, wanted));

    let mut env = BTreeMap::new();
    for server in TlsServer::ALL {
        let trusted = if faulty(server, Fault::WrongCa) {
            &other_ca
        } else {
            &ca
        };
        env.insert(
            server.file_variable(TlsPart::Ca).to_string(),
            trusted.clone(),
        );
        if !faulty(server, Fault::MissingClientCertificate) {
            env.insert(
                server.file_variable(TlsPart::Cert).to_string(),
                cert.clone(),
            );
            env.insert(server.file_variable(TlsPart::Key).to_string(), key.clone());
        }
    }
    let expired = |server| faulty(server, Fault::ExpiredCertificate);
    let nats_url = if expired(TlsServer::Nats) {
        servers.expired_nats.url()
    } else {
        servers.nats.url()
    };
    let clickhouse_url = if expired(TlsServer::ClickHouse) {
        servers.expired_clickhouse.https_url()
    } else {
        servers.clickhouse.https_url()
    }
    .unwrap();
    let redis_url = if expired(TlsServer::Redis) {
        servers.expired_redis.tls_url()
    } else {
        servers.redis.tls_url()
    }
    .unwrap();
    // Without a client certificate the block has no cert/key (as a user's spec would); the
    // Secret names are what a cluster would use and local files stand in for them here.
    let tls_block = |server: TlsServer| {
        let client = if faulty(server, Fault::MissingClientCertificate) {
            String::new()
        } else {
            ", cert: {secretKeyRef: {name: signal-client, key: tls.crt}}, \
             key: {secretKeyRef: {name: signal-client, key: tls.key}}"
                .to_string()
        };
        if insecure == Some(server) {
            format!("{{insecureSkipVerify: true{client}}}")
        } else {
            format!("{{ca: {{configMapKeyRef: {{name: signal-ca, key: ca.crt}}}}{client}}}")
        }
    };
    let text = format!(
        r#"apiVersion: signals.dev/v1alpha1
kind: SignalPipeline
metadata:
  name: {name}
spec:
  nats:
    url: {nats_url}
    tls: {nats_tls}
  stream:
    name: {stream}
    subjects: ["{name}.>"]
  consumer:
    ackWait: 10s
  clickhouse:
    url: {clickhouse_url}
    tls: {clickhouse_tls}
    database: tls_test
    table: {name}
    orderBy: [stream_seq]
    columns:
      - {{ name: event_type, type: String, from: $.event_type }}
      - {{ name: wallet_address, type: String, from: $.wallet_address }}
      - {{ name: stream_seq, type: UInt64, from: "@sequence" }}
  workers:
    batch:
      maxRows: 100
      maxWait: 200ms
  cache:
    redis:
      url: {redis_url}
      tls: {redis_tls}
    key: "{name}:{{wallet_address}}"
    fields: [event_type]
    ttl: 10m
"#,
        stream = name.to_uppercase(),
        nats_tls = tls_block(TlsServer::Nats),
        clickhouse_tls = tls_block(TlsServer::ClickHouse),
        redis_tls = tls_block(TlsServer::Redis),
    );
    let manifest = dir.path().join("pipeline.yaml");
    std::fs::write(&manifest, text).unwrap();
    Scenario {
        name,
        dir,
        manifest,
        env,
        nats_url,
        clickhouse_url,
        redis_url,
    }
}

impl Scenario {
    fn spec(&self) -> signal_model::SignalPipelineSpec {
        signal_clients::manifest::load(&self.manifest)
            .unwrap()
            .manifest
            .spec
    }

    /// The credentials the worker assembles from these variables; the operator's come from the
    /// Secrets and ConfigMap with the same PEM text.
    fn credentials(&self) -> PipelineCredentials {
        signal_clients::credentials::from_lookup(&self.spec(), |name| self.env.get(name).cloned())
            .unwrap()
    }

    fn start_worker(&self) -> Worker {
        let log = self.dir.path().join("worker.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(worker_binary::worker_binary());
        command
            .arg("--pipeline")
            .arg(&self.manifest)
            .args(["--listen", "127.0.0.1:0", "--worker-name", "tls-test"])
            .envs(&self.env)
            .env("SIGNAL_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        Worker {
            _process: ChildProcess::spawn(command).unwrap(),
            log,
        }
    }

    /// Publishes `count` sample signals over TLS with the scenario's own (good) NATS material.
    fn publish(&self, count: u64) {
        let good = scenario("publisher", None).credentials();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let client = signal_clients::connect::nats(
                &self.nats_url,
                "tls test publisher",
                &good.nats,
                good.tls.nats.as_ref(),
            )
            .await
            .unwrap();
            let js = async_nats::jetstream::new(client);
            let mut acks = Vec::new();
            for index in 0..count {
                let subject = format!("{}.signal", self.name);
                acks.push(
                    js.publish(subject, sample_signal(index).into())
                        .await
                        .unwrap(),
                );
            }
            for ack in acks {
                ack.await.unwrap();
            }
        });
    }

    fn row_count(&self) -> Option<u64> {
        servers()
            .clickhouse
            .query(&format!("SELECT count() FROM tls_test.{}", self.name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn cache_keys(&self) -> usize {
        servers()
            .redis
            .command::<Vec<String>>(&["KEYS", &format!("{}:*", self.name)])
            .map(|keys| keys.len())
            .unwrap_or(0)
    }
}

/// A `signal-worker` process and its log.
struct Worker {
    _process: ChildProcess,
    log: PathBuf,
}

impl Worker {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing every one of `words`, and returns it.
    fn wait_for_line(&self, words: &[&str]) -> String {
        wait_for(
            &format!("a worker log line with {words:?}"),
            || {
                self.log()
                    .lines()
                    .find(|line| words.iter().all(|word| line.contains(word)))
                    .map(str::to_string)
            },
            || self.log(),
        )
    }
}

fn wait_for<T>(
    what: &str,
    mut check: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + REACT_TIMEOUT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn reconcile(scenario: &Scenario) -> signal_operator::dataplane::DataPlaneReport {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(reconcile_data_plane(
        &scenario.name,
        &scenario.spec(),
        &scenario.credentials(),
    ))
}

/// `message` is one line naming `server` at `url` and the fault's cause.
fn assert_names_server_and_cause(message: &str, server: &str, url: &str, fault: Fault) {
    eprintln!("{server} {fault:?}: {message}");
    assert!(!message.contains('\n'), "not one line: {message}");
    assert!(
        message.contains(&format!("{server} at {url}")),
        "does not name {server} at {url}: {message}"
    );
    assert!(
        message.contains(fault.cause()),
        "does not say `{}`: {message}",
        fault.cause()
    );
}

#[test]
fn a_pipeline_over_mutual_tls_to_all_three_servers_stores_rows_and_cache_keys() {
    let scenario = scenario("tls_ok", None);
    let report = reconcile(&scenario);
    for (part, ready) in [
        ("stream", &report.stream),
        ("consumer", &report.consumer),
        ("table", &report.table),
    ] {
        assert!(ready.ready, "{part} not ready: {ready:?}");
    }
    let worker = scenario.start_worker();
    scenario.publish(300);
    wait_for(
        "300 rows",
        || (scenario.row_count() == Some(300)).then_some(()),
        || worker.log(),
    );
    // sample_signal repeats wallets; each distinct one is a key.
    wait_for(
        "cache keys",
        || (scenario.cache_keys() > 0).then_some(()),
        || worker.log(),
    );
    assert!(
        !worker.log().contains("\"level\":\"WARN\""),
        "warnings on a healthy TLS pipeline:\n{}",
        worker.log()
    );
}

/// A NATS or ClickHouse fault: the operator's report and the worker's log both name it.
fn fault_in_status_and_worker_log(server: TlsServer, fault: Fault) {
    let scenario = scenario("tls_fault", Some((server, fault)));
    let report = reconcile(&scenario);
    let (name, url, part) = match server {
        TlsServer::Nats => ("NATS", &scenario.nats_url, &report.stream),
        TlsServer::ClickHouse => ("ClickHouse", &scenario.clickhouse_url, &report.table),
        TlsServer::Redis => unreachable!("the operator does not connect to Redis"),
    };
    assert!(!part.ready, "{part:?}");
    assert_eq!(part.reason, "TlsFailed", "{part:?}");
    assert_names_server_and_cause(&part.message, name, url, fault);
    if server == TlsServer::ClickHouse {
        // The probe behind both: it must find the cause on its own, whatever hyper reported.
        let tls = scenario.credentials().tls.clickhouse.unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let failure = runtime
            .block_on(signal_clients::connect::clickhouse_tls_probe(url, &tls))
            .expect("the probe names the TLS failure");
        assert_names_server_and_cause(&failure.to_string(), name, url, fault);
    }

    let worker = scenario.start_worker();
    let line = worker.wait_for_line(&[&format!("{name} at {url}"), fault.cause()]);
    assert_names_server_and_cause(&line, name, url, fault);
}

/// A Redis fault: rows are stored, the worker's log and its health report name the fault.
fn redis_fault_in_health_and_worker_log(fault: Fault) {
    let scenario = scenario("tls_redis_fault", Some((TlsServer::Redis, fault)));
    let report = reconcile(&scenario);
    assert!(report.stream.ready && report.consumer.ready && report.table.ready);
    let worker = scenario.start_worker();
    scenario.publish(5);
    let url = &scenario.redis_url;
    let line = worker.wait_for_line(&[&format!("Redis at {url}"), fault.cause()]);
    assert_names_server_and_cause(&line, "Redis", url, fault);
    wait_for(
        "5 rows despite the cache",
        || (scenario.row_count() == Some(5)).then_some(()),
        || worker.log(),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let health = wait_for(
        "a health report naming the Redis fault",
        || {
            let health = runtime.block_on(read_worker_health(
                &scenario.name,
                &scenario.spec(),
                &scenario.credentials(),
            ));
            matches!(&health, WorkerHealth::Stuck { message, .. } if message.contains(fault.cause()))
                .then_some(health)
        },
        || worker.log(),
    );
    let WorkerHealth::Stuck { reason, message } = health else {
        unreachable!()
    };
    assert_eq!(reason, "CacheTlsFailed");
    assert!(message.contains(&format!("Redis at {url}")), "{message}");
}

#[test]
fn insecure_skip_verify_reaches_an_expired_server_and_says_so() {
    let scenario = scenario_with(
        "tls_insecure",
        Some((TlsServer::Redis, Fault::ExpiredCertificate)),
        Some(TlsServer::Redis),
    );
    let report = reconcile(&scenario);
    assert!(report.stream.ready && report.table.ready, "{report:?}");
    let worker = scenario.start_worker();
    worker.wait_for_line(&["WARN", "insecureSkipVerify is on for spec.cache.redis.tls"]);
    scenario.publish(5);
    wait_for(
        "cache keys on the expired server",
        || {
            let keys = servers()
                .expired_redis
                .command::<Vec<String>>(&["KEYS", &format!("{}:*", scenario.name)])
                .map(|keys| keys.len())
                .unwrap_or(0);
            (keys > 0).then_some(())
        },
        || worker.log(),
    );
}

#[test]
fn nats_with_a_wrong_ca_an_expired_certificate_or_no_client_certificate() {
    for fault in [
        Fault::WrongCa,
        Fault::ExpiredCertificate,
        Fault::MissingClientCertificate,
    ] {
        fault_in_status_and_worker_log(TlsServer::Nats, fault);
    }
}

#[test]
fn clickhouse_with_a_wrong_ca_an_expired_certificate_or_no_client_certificate() {
    for fault in [
        Fault::WrongCa,
        Fault::ExpiredCertificate,
        Fault::MissingClientCertificate,
    ] {
        fault_in_status_and_worker_log(TlsServer::ClickHouse, fault);
    }
}

#[test]
fn redis_with_a_wrong_ca_an_expired_certificate_or_no_client_certificate() {
    for fault in [
        Fault::WrongCa,
        Fault::ExpiredCertificate,
        Fault::MissingClientCertificate,
    ] {
        redis_fault_in_health_and_worker_log(fault);
    }
}
