//! `signal-operator local` against real servers (testkit's nats-server and clickhouse-server):
//! the data plane is created, published signals land as rows, replica edits start and stop worker
//! processes, an invalid edit is refused without disturbing the workers, a worker killed with
//! SIGKILL is restarted, and SIGTERM stops everything with exit code 0.
//!
//! Worker processes are counted as the operator's children named `signal-worker` in `/proc`.
//!
//! The `signal-worker` binary comes from `support/worker_binary.rs`.

#[path = "support/worker_binary.rs"]
mod worker_binary;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use signal_demo::sample_signals::sample_signal;
use signal_testkit::{ChildProcess, ClickHouseServer, NatsServer, free_port, is_port_free};

const OPERATOR: &str = env!("CARGO_BIN_EXE_signal-operator");
/// Upper bound for anything the operator should do after a file edit or a crash.
const REACT_TIMEOUT: Duration = Duration::from_secs(30);

/// A pipeline manifest for the test servers.
fn manifest(nats_url: &str, clickhouse_url: &str, replicas: u32, max_rows: u32) -> String {
    format!(
        r#"apiVersion: signals.dev/v1alpha1
kind: SignalPipeline
metadata:
  name: local-test
spec:
  nats:
    url: {nats_url}
  stream:
    name: LOCAL_TEST
    subjects: ["local.>"]
    maxAge: 1h
  consumer:
    durableName: local-test
    ackWait: 10s
  clickhouse:
    url: {clickhouse_url}
    database: local_test
    table: signals
    orderBy: [stream_seq]
    columns:
      - {{ name: event_type, type: String, from: $.event_type }}
      - {{ name: wallet_address, type: String, from: $.wallet_address }}
      - {{ name: stream_seq, type: UInt64, from: "@sequence" }}
  workers:
    replicas: {replicas}
    batch:
      maxRows: {max_rows}
      maxWait: 200ms
"#
    )
}

/// Writes a file the way an editor's save does: a new file renamed over the old one.
fn save(path: &Path, text: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// Three consecutive free ports for the workers' metrics endpoints.
fn free_port_range(len: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port().unwrap();
        if base < u16::MAX - len && (1..len).all(|offset| is_port_free(base + offset)) {
            return base;
        }
    }
    panic!("no {len} consecutive free ports");
}

/// A running `signal-operator local`, its output in a log file.
struct LocalOperator {
    process: ChildProcess,
    log: PathBuf,
}

impl LocalOperator {
    fn start(dir: &Path, pipeline: &Path, metrics_base_port: u16) -> LocalOperator {
        let log = dir.join("operator.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(OPERATOR);
        command
            .arg("local")
            .arg("-f")
            .arg(pipeline)
            .arg("--worker-binary")
            .arg(worker_binary::worker_binary())
            .arg("--metrics-base-port")
            .arg(metrics_base_port.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        LocalOperator {
            process: ChildProcess::spawn(command).unwrap(),
            log,
        }
    }

    /// The operator's and workers' output, without the colour codes of the human log format.
    fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut plain = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                // CSI sequences end with a letter: `ESC [ 2 m`.
                for end in chars.by_ref() {
                    if end.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        plain
    }

    /// Process ids of the operator's `signal-worker` children, sorted.
    fn worker_pids(&self) -> Vec<u32> {
        let parent = self.process.pid();
        let mut pids: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                // `pid (comm) state ppid …`; comm may hold spaces, so split after the last ')'.
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                let Some((head, rest)) = stat.rsplit_once(')') else {
                    return false;
                };
                let mut fields = rest.split_whitespace();
                let state = fields.next();
                let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
                head.ends_with("(signal-worker") && ppid == Some(parent) && state != Some("Z")
            })
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Polls `check` until it holds, failing with the operator's log after `timeout`.
    fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check() {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; operator log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_for_workers(&self, count: usize) -> Vec<u32> {
        self.wait_for(&format!("{count} workers"), REACT_TIMEOUT, || {
            let pids = self.worker_pids();
            (pids.len() == count).then_some(pids)
        })
    }
}

fn publish(nats_url: &str, range: std::ops::Range<u64>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(nats_url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut acks = Vec::new();
        for index in range {
            acks.push(
                js.publish("local.signal", sample_signal(index).into())
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    });
}

fn consumer_exists(nats_url: &str) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let Ok(client) = async_nats::connect(nats_url).await else {
            return false;
        };
        let js = async_nats::jetstream::new(client);
        match js.get_stream("LOCAL_TEST").await {
            Ok(stream) => stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>("local-test")
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
}

fn row_count(clickhouse: &ClickHouseServer) -> Option<u64> {
    clickhouse
        .query("SELECT count() FROM local_test.signals")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn runs_a_pipeline_follows_edits_restarts_crashed_workers_and_stops_cleanly() {
    let nats = NatsServer::start().unwrap();
    let clickhouse = ClickHouseServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    let write = |replicas, max_rows| {
        save(
            &pipeline,
            &manifest(&nats.url(), &clickhouse.http_url(), replicas, max_rows),
        )
    };
    write(1, 500);
    let base_port = free_port_range(3);
    let mut operator = LocalOperator::start(dir.path(), &pipeline, base_port);

    // Stream, consumer and table are created; one worker runs.
    operator.wait_for("the table", REACT_TIMEOUT, || row_count(&clickhouse));
    operator.wait_for("the stream and consumer", REACT_TIMEOUT, || {
        consumer_exists(&nats.url()).then_some(())
    });
    let first = operator.wait_for_workers(1);

    // Published signals land as rows.
    publish(&nats.url(), 0..1000);
    operator.wait_for("1000 rows", REACT_TIMEOUT, || {
        (row_count(&clickhouse) == Some(1000)).then_some(())
    });

    // 1 → 3 replicas: two more workers, each on its own metrics port; the first one stays.
    write(3, 500);
    let three = operator.wait_for_workers(3);
    assert!(three.contains(&first[0]), "{three:?} lost {first:?}");
    operator.wait_for("metrics port of the third worker", REACT_TIMEOUT, || {
        std::net::TcpStream::connect(("127.0.0.1", base_port + 2))
            .is_ok()
            .then_some(())
    });

    // An invalid edit is refused and the workers keep running.
    save(
        &pipeline,
        &manifest(&nats.url(), &clickhouse.http_url(), 3, 500)
            .replace("maxAge: 1h", "maxAge: 1 hour"),
    );
    operator.wait_for("the invalid edit to be refused", REACT_TIMEOUT, || {
        operator
            .log()
            .contains("invalid edit ignored")
            .then_some(())
    });
    assert_eq!(operator.worker_pids(), three);
    assert!(
        operator.log().contains("spec.stream.maxAge"),
        "{}",
        operator.log()
    );

    // 3 → 1: the highest slots stop, slot 0 (the first worker) keeps running.
    write(1, 500);
    assert_eq!(operator.wait_for_workers(1), first);

    // Another setting the workers read at start replaces them.
    write(1, 600);
    let replaced = operator.wait_for("a replaced worker", REACT_TIMEOUT, || {
        let pids = operator.worker_pids();
        (pids.len() == 1 && pids != first).then_some(pids)
    });

    // A worker killed with SIGKILL is restarted, and the new one works.
    // SAFETY: plain syscall on a pid that the operator has not reaped yet (checked just above).
    unsafe {
        libc::kill(replaced[0] as libc::pid_t, libc::SIGKILL);
    }
    let restarted = operator.wait_for("a restarted worker", REACT_TIMEOUT, || {
        let pids = operator.worker_pids();
        (pids.len() == 1 && pids != replaced).then_some(pids)
    });
    publish(&nats.url(), 1000..1500);
    operator.wait_for("1500 rows", REACT_TIMEOUT, || {
        (row_count(&clickhouse) == Some(1500)).then_some(())
    });

    // SIGTERM: workers stop gracefully, the operator exits 0.
    let status = operator.process.terminate(Duration::from_secs(40)).unwrap();
    assert!(status.success(), "{status:?}; log:\n{}", operator.log());
    assert!(
        !Path::new(&format!("/proc/{}", restarted[0])).exists(),
        "worker {} outlived the operator",
        restarted[0]
    );
    let log = operator.log();
    for expected in [
        "part=\"stream\"",
        "part=\"consumer\"",
        "part=\"table\"",
        "worker stopped",
    ] {
        assert!(log.contains(expected), "no {expected} in:\n{log}");
    }
}

#[test]
fn unreachable_servers_are_retried_without_crashing() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    // Nothing listens on these ports.
    let (nats_port, clickhouse_port) = (free_port().unwrap(), free_port().unwrap());
    save(
        &pipeline,
        &manifest(
            &format!("nats://127.0.0.1:{nats_port}"),
            &format!("http://127.0.0.1:{clickhouse_port}"),
            1,
            500,
        ),
    );
    let mut operator = LocalOperator::start(dir.path(), &pipeline, free_port_range(1));
    operator.wait_for("a retry", REACT_TIMEOUT, || {
        operator
            .log()
            .contains("data plane not ready; retrying")
            .then_some(())
    });
    assert!(operator.process.is_running(), "{}", operator.log());
    let log = operator.log();
    assert!(log.contains("Unreachable"), "{log}");
    let status = operator.process.terminate(Duration::from_secs(40)).unwrap();
    assert!(status.success(), "{status:?}; log:\n{}", operator.log());
}

#[test]
fn an_invalid_file_exits_non_zero_with_one_line_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    save(
        &pipeline,
        &manifest("nats://127.0.0.1:4222", "http://127.0.0.1:8123", 1, 500)
            .replace("UInt64", "UInt65"),
    );
    let output = Command::new(OPERATOR)
        .arg("local")
        .arg("-f")
        .arg(&pipeline)
        .arg("--worker-binary")
        .arg("/bin/true")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("spec.clickhouse.columns[2].type"),
        "{stderr}"
    );
}
