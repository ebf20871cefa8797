//! The whole data plane of a pipeline against real servers, through the two entry points the
//! controller and local mode call: [`reconcile_data_plane`] (stream, consumer and table created
//! and reported ready together) and [`delete_data_plane`] (what `deletionPolicy` removes, and the
//! stream kept while another consumer still reads it). Unreachable servers, whether nothing
//! listens or a listener never answers, must come back as a clear not-ready report within a
//! bounded time, never as a hang or a panic, and a NATS that stops answering after the connect
//! costs one request timeout, not one per part; refused credentials are reported as such.

#[path = "support/dataplane.rs"]
mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use signal_model::credentials::{NatsAuth, PipelineCredentials, UserPassword};
use signal_model::{DeletionPolicy, SignalPipelineSpec};
use signal_operator::dataplane::{
    CONNECT_TIMEOUT, DataPlaneError, DataPlaneReport, PART_TIMEOUT, delete_data_plane,
    reconcile_data_plane,
};
use support::{
    STEP_TIMEOUT, closed_port, jetstream_at, live_consumer, live_stream, nats, no_credentials,
    pipeline_spec, shared_pipeline_spec, table_exists, unique,
};

async fn reconcile(name: &str, spec: &SignalPipelineSpec) -> DataPlaneReport {
    tokio::time::timeout(
        STEP_TIMEOUT,
        reconcile_data_plane(name, spec, &no_credentials()),
    )
    .await
    .expect("reconcile_data_plane is bounded")
}

async fn delete(name: &str, spec: &SignalPipelineSpec) -> Result<(), DataPlaneError> {
    tokio::time::timeout(
        STEP_TIMEOUT,
        delete_data_plane(name, spec, &no_credentials()),
    )
    .await
    .expect("delete_data_plane is bounded")
}

#[tokio::test]
async fn a_new_pipeline_gets_its_stream_consumer_and_table_and_is_ready() {
    let name = unique("ready");
    let spec = shared_pipeline_spec(&name);
    let report = reconcile(&name, &spec).await;
    assert!(report.all_ready(), "{report:#?}");
    assert_eq!(
        (
            report.stream.reason.as_str(),
            report.consumer.reason.as_str(),
            report.table.reason.as_str()
        ),
        ("Created", "Created", "Created")
    );
    // Stream, consumer, database and table, and the default dead-letter stream.
    assert_eq!(report.changes().count(), 5, "{report:#?}");
    assert_eq!(report.dead_letter.reason, "Created", "{report:#?}");
    assert!(report.stream_status.is_some() && report.consumer_status.is_some());
    assert_eq!(report.schema_drift, None);

    let again = reconcile(&name, &spec).await;
    assert!(again.all_ready());
    assert_eq!(again.changes().count(), 0, "{again:#?}");
    assert_eq!(
        (
            again.stream.reason.as_str(),
            again.consumer.reason.as_str(),
            again.table.reason.as_str(),
            again.dead_letter.reason.as_str()
        ),
        ("UpToDate", "UpToDate", "UpToDate", "UpToDate")
    );
}

#[tokio::test]
async fn the_consumer_waits_while_the_stream_cannot_be_created() {
    let name = unique("no_stream");
    let mut spec = shared_pipeline_spec(&name);
    // Refused by the server: a duplicate window longer than max_age.
    spec.stream.duplicate_window = Some(signal_model::HumanDuration::from_secs(7200));
    let report = reconcile(&name, &spec).await;
    assert!(!report.stream.ready, "{report:#?}");
    assert_eq!(report.stream.reason, "RequestRefused");
    assert!(
        report.stream.message.contains("duplicates window"),
        "the server's words: {}",
        report.stream.message
    );
    assert!(!report.consumer.ready);
    assert_eq!(report.consumer.reason, "StreamNotReady");
    assert!(report.table.ready, "the table does not depend on NATS");
}

#[tokio::test]
async fn delete_policy_removes_consumer_stream_and_table() {
    let name = unique("delete");
    let spec = SignalPipelineSpec {
        deletion_policy: DeletionPolicy::Delete,
        ..shared_pipeline_spec(&name)
    };
    assert!(reconcile(&name, &spec).await.all_ready());
    let js = jetstream_at(&nats().url()).await;
    let durable = spec.durable_name(&name).to_string();
    assert!(
        live_consumer(&js, &spec.stream.name, &durable)
            .await
            .is_some()
    );

    delete(&name, &spec).await.expect("deleted");
    assert!(
        live_consumer(&js, &spec.stream.name, &durable)
            .await
            .is_none()
    );
    assert!(live_stream(&js, &spec.stream.name).await.is_none());
    assert!(!table_exists(
        &spec.clickhouse.database,
        &spec.clickhouse.table
    ));

    // Deleting again (a retried cleanup) finds nothing left and succeeds.
    delete(&name, &spec)
        .await
        .expect("a repeated delete succeeds");
}

#[tokio::test]
async fn deleting_a_pipeline_whose_parts_were_never_created_succeeds() {
    // E.g. a pipeline that never got past UnsupportedByServer: no stream, no database.
    let name = unique("never");
    let spec = SignalPipelineSpec {
        deletion_policy: DeletionPolicy::Delete,
        ..shared_pipeline_spec(&name)
    };
    delete(&name, &spec)
        .await
        .expect("nothing to delete is not an error");
}

#[tokio::test]
async fn retain_policy_keeps_everything() {
    let name = unique("retain");
    let spec = shared_pipeline_spec(&name);
    assert_eq!(spec.deletion_policy, DeletionPolicy::Retain);
    assert!(reconcile(&name, &spec).await.all_ready());

    delete(&name, &spec).await.expect("nothing to do");
    let js = jetstream_at(&nats().url()).await;
    assert!(
        live_consumer(&js, &spec.stream.name, spec.durable_name(&name))
            .await
            .is_some()
    );
    assert!(live_stream(&js, &spec.stream.name).await.is_some());
    assert!(table_exists(
        &spec.clickhouse.database,
        &spec.clickhouse.table
    ));
}

#[tokio::test]
async fn a_stream_another_consumer_still_reads_is_kept_on_delete() {
    let name = unique("shared");
    let spec = SignalPipelineSpec {
        deletion_policy: DeletionPolicy::Delete,
        ..shared_pipeline_spec(&name)
    };
    assert!(reconcile(&name, &spec).await.all_ready());
    let js = jetstream_at(&nats().url()).await;
    js.create_consumer_on_stream(
        consumer::pull::Config {
            durable_name: Some("audit".to_string()),
            ..Default::default()
        },
        &spec.stream.name,
    )
    .await
    .expect("another tool's consumer");

    delete(&name, &spec).await.expect("deleted");
    assert!(
        live_consumer(&js, &spec.stream.name, spec.durable_name(&name))
            .await
            .is_none(),
        "the pipeline's own consumer is removed"
    );
    assert!(
        live_consumer(&js, &spec.stream.name, "audit")
            .await
            .is_some(),
        "the other consumer is left alone"
    );
    assert!(
        live_stream(&js, &spec.stream.name).await.is_some(),
        "the stream is kept"
    );
    assert!(!table_exists(
        &spec.clickhouse.database,
        &spec.clickhouse.table
    ));
}

#[tokio::test]
async fn servers_nobody_listens_on_are_reported_unreachable_at_once() {
    let name = unique("closed");
    let nats_url = format!("nats://127.0.0.1:{}", closed_port());
    let clickhouse_url = format!("http://127.0.0.1:{}", closed_port());
    let spec = SignalPipelineSpec {
        deletion_policy: DeletionPolicy::Delete,
        ..pipeline_spec(&name, &nats_url, &clickhouse_url)
    };

    let started = Instant::now();
    let report = reconcile(&name, &spec).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    for (part, report) in [
        ("stream", &report.stream),
        ("consumer", &report.consumer),
        ("table", &report.table),
    ] {
        assert!(!report.ready, "{part}: {report:?}");
        assert_eq!(report.reason, "Unreachable", "{part}: {report:?}");
    }
    assert!(
        report.stream.message.contains(&nats_url),
        "{}",
        report.stream.message
    );
    assert!(
        report.table.message.contains(&clickhouse_url)
            && report.table.message.contains("Connection refused"),
        "{}",
        report.table.message
    );

    let started = Instant::now();
    let deleted = delete(&name, &spec).await;
    assert!(
        matches!(deleted, Err(DataPlaneError::NatsUnreachable { .. })),
        "{deleted:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn credentials_the_servers_refuse_are_reported_as_such_not_as_unreachable() {
    // A nats-server of its own that wants a user and password.
    let port = closed_port();
    let binary =
        std::env::var("SIGNAL_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_string());
    let mut command = std::process::Command::new(binary);
    command
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .args(["--user", "signal", "--pass", "right"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _server = signal_testkit::ChildProcess::spawn(command).expect("nats-server starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let name = unique("auth");
    let spec = pipeline_spec(
        &name,
        &format!("nats://127.0.0.1:{port}"),
        &support::clickhouse().http_url(),
    );
    let credentials = PipelineCredentials {
        nats: NatsAuth::UserPassword {
            user: "signal".to_string(),
            password: "wrong".to_string(),
        },
        clickhouse: UserPassword {
            user: Some("nobody".to_string()),
            password: Some("wrong".to_string()),
        },
        ..PipelineCredentials::default()
    };
    let started = Instant::now();
    let report = tokio::time::timeout(
        STEP_TIMEOUT,
        reconcile_data_plane(&name, &spec, &credentials),
    )
    .await
    .expect("bounded");
    assert!(started.elapsed() < Duration::from_secs(5), "{report:#?}");
    for (part, report) in [
        ("stream", &report.stream),
        ("consumer", &report.consumer),
        ("table", &report.table),
    ] {
        assert!(!report.ready, "{part}: {report:?}");
        assert_eq!(report.reason, "AuthenticationFailed", "{part}: {report:?}");
        assert!(
            report
                .message
                .contains("did not accept the pipeline's credentials"),
            "{part}: {}",
            report.message
        );
    }
    assert!(
        report.stream.message.contains("authorization violation"),
        "{}",
        report.stream.message
    );
    assert!(
        report.table.message.contains("nobody"),
        "the server's words: {}",
        report.table.message
    );
}

/// Accepts TCP connections and never says a word: a hung server or a black-holing proxy.
async fn silent_listener() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (address.to_string(), task)
}

/// Speaks just enough of the NATS protocol for a client to connect (INFO, PONG), then leaves
/// every request unanswered: a server that hangs after the connection was made.
async fn mute_nats() -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let info = format!(
        "INFO {{\"server_id\":\"mute\",\"server_name\":\"mute\",\"version\":\"2.9.10\",\
         \"proto\":1,\"headers\":true,\"max_payload\":1048576,\"jetstream\":true,\
         \"host\":\"127.0.0.1\",\"port\":{}}}\r\n",
        address.port()
    );
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let info = info.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                if write.write_all(info.as_bytes()).await.is_err() {
                    return;
                }
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with("PING") && write.write_all(b"PONG\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (address.to_string(), task)
}

#[tokio::test]
async fn a_nats_that_stops_answering_after_the_connect_costs_one_request_timeout() {
    let (nats_address, nats_task) = mute_nats().await;
    let name = unique("mute");
    let spec = pipeline_spec(
        &name,
        &format!("nats://{nats_address}"),
        &support::clickhouse().http_url(),
    );
    let started = Instant::now();
    let report = reconcile(&name, &spec).await;
    eprintln!(
        "a NATS that answers no request held the data plane for {:?}",
        started.elapsed()
    );
    // The dead-letter stream's request went unanswered; nothing after it was sent.
    assert_eq!(report.dead_letter.reason, "Unreachable", "{report:#?}");
    for (part, report) in [("stream", &report.stream), ("consumer", &report.consumer)] {
        assert_eq!(report.reason, "Unreachable", "{part}: {report:?}");
        assert!(
            report
                .message
                .starts_with("not checked, NATS left an earlier request unanswered"),
            "{part}: {}",
            report.message
        );
    }
    assert!(report.table.ready, "ClickHouse answers: {report:#?}");
    nats_task.abort();
}

#[tokio::test]
async fn servers_that_never_answer_are_reported_unreachable_within_the_bound() {
    let (nats_address, nats_task) = silent_listener().await;
    let (clickhouse_address, clickhouse_task) = silent_listener().await;
    let name = unique("silent");
    let spec = pipeline_spec(
        &name,
        &format!("nats://{nats_address}"),
        &format!("http://{clickhouse_address}"),
    );

    let started = Instant::now();
    let report = tokio::time::timeout(
        PART_TIMEOUT + Duration::from_secs(5),
        reconcile_data_plane(&name, &spec, &no_credentials()),
    )
    .await
    .expect("bounded by the data plane's own timeouts");
    let took = started.elapsed();
    // Connecting and each request are bounded separately; both sides run concurrently.
    assert!(
        took < CONNECT_TIMEOUT + Duration::from_secs(4),
        "took {took:?}: {report:#?}"
    );
    for (part, report) in [
        ("stream", &report.stream),
        ("consumer", &report.consumer),
        ("table", &report.table),
    ] {
        assert!(!report.ready, "{part}: {report:?}");
        assert_eq!(report.reason, "Unreachable", "{part}: {report:?}");
    }
    // The conditions name the server a person has to look at.
    assert!(report.stream.message.contains("NATS"), "{report:?}");
    assert!(report.table.message.contains("ClickHouse"), "{report:?}");
    nats_task.abort();
    clickhouse_task.abort();
}
