//! The Redis latest-value cache against a real Redis: each key's hash holds the newest row's
//! fields with a TTL, newest wins across batches and against late writers, and Redis being down
//! never holds back ClickHouse ingestion.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::{TestEnv, wait_for};
use signal_model::credentials::UserPassword;
use signal_model::manifest::PipelineManifest;
use signal_model::{CacheSpec, ColumnSpec, HumanDuration, RedisSpec};
use signal_testkit::RedisServer;
use signal_worker::batch::CacheEntry;
use signal_worker::cache::{self, SEQUENCE_FIELD};
use signal_worker::metrics::Metrics;

const TTL_SECS: u64 = 300;
const WALLETS: u64 = 3;

fn cache_spec(redis_url: &str) -> CacheSpec {
    CacheSpec {
        redis: RedisSpec {
            url: redis_url.into(),
            auth: None,
            tls: None,
        },
        key: "wallet:{wallet}:latest".into(),
        fields: vec!["event_type".into(), "severity".into()],
        ttl: HumanDuration::from_secs(TTL_SECS),
    }
}

fn wallet_manifest(env: &TestEnv) -> PipelineManifest {
    let mut manifest = env.manifest(
        "wallets",
        vec![
            ColumnSpec::new("seq", "UInt64", "@sequence"),
            ColumnSpec::new("wallet", "String", "$.wallet"),
            ColumnSpec::new("event_type", "String", "$.event_type"),
            ColumnSpec::new("severity", "UInt8", "$.severity"),
        ],
    );
    // Small batches, so the same key is updated by many batches.
    manifest.spec.workers.batch.max_rows = 10;
    manifest.spec.cache = Some(cache_spec(&env.redis.as_ref().expect("redis").url()));
    manifest
}

/// Message `index`: wallet `index % WALLETS`, event `e<index>`, severity `index % 6`.
fn wallet_event(index: u64) -> Vec<u8> {
    format!(
        r#"{{"wallet":"w{}","event_type":"e{index}","severity":{}}}"#,
        index % WALLETS,
        index % 6
    )
    .into_bytes()
}

/// What each wallet's hash should hold after messages `0..count` (message i has sequence i+1).
fn expected_hashes(count: u64) -> BTreeMap<String, BTreeMap<String, String>> {
    (0..count)
        .map(|index| {
            let fields = BTreeMap::from([
                ("event_type".to_string(), format!("e{index}")),
                ("severity".to_string(), (index % 6).to_string()),
                (SEQUENCE_FIELD.to_string(), (index + 1).to_string()),
            ]);
            (format!("wallet:w{}:latest", index % WALLETS), fields)
        })
        .collect()
}

fn hashes(redis: &RedisServer) -> BTreeMap<String, BTreeMap<String, String>> {
    (0..WALLETS)
        .map(|wallet| {
            let key = format!("wallet:w{wallet}:latest");
            let hash: BTreeMap<String, String> =
                redis.command(&["HGETALL", &key]).expect("HGETALL");
            (key, hash)
        })
        .filter(|(_, hash)| !hash.is_empty())
        .collect()
}

#[test]
fn the_cache_holds_the_newest_row_per_key_with_a_ttl_and_redis_down_does_not_block_ingestion() {
    let mut env = TestEnv::start_with_redis();
    let manifest = wallet_manifest(&env);
    env.provision(&manifest);
    let worker = env.start_worker(&manifest);
    env.publish_all("wallets.events", (0..100).map(wallet_event));

    wait_for("100 rows", Duration::from_secs(30), || {
        env.row_count(&manifest) == 100
    });
    let redis = env.redis.as_ref().expect("redis");
    wait_for(
        "the newest row of each wallet",
        Duration::from_secs(10),
        || hashes(redis) == expected_hashes(100),
    );
    for wallet in 0..WALLETS {
        let ttl: i64 = redis
            .command(&["TTL", &format!("wallet:w{wallet}:latest")])
            .expect("TTL");
        assert!((1..=TTL_SECS as i64).contains(&ttl), "TTL {ttl}");
    }

    // Redis down: rows keep arriving.
    env.redis.as_mut().expect("redis").stop();
    env.publish_all("wallets.events", (100..200).map(wallet_event));
    wait_for(
        "200 rows while Redis is down",
        Duration::from_secs(30),
        || env.row_count(&manifest) == 200,
    );
    assert!(
        worker.metric("signal_worker_redis_failures_total")
            + worker.metric("signal_worker_redis_skipped_total")
            > 0.0
    );

    // Back up (empty: nothing is persisted): new rows fill the cache again.
    env.redis
        .as_mut()
        .expect("redis")
        .restart()
        .expect("Redis restarts");
    env.publish_all("wallets.events", (200..203).map(wallet_event));
    wait_for("203 rows", Duration::from_secs(30), || {
        env.row_count(&manifest) == 203
    });
    let redis = env.redis.as_ref().expect("redis");
    wait_for("the cache written again", Duration::from_secs(30), || {
        hashes(redis) == expected_hashes(203)
    });
    worker.stop(&env).expect("clean stop");
}

#[test]
fn an_older_row_written_late_does_not_replace_a_newer_one() {
    let redis = RedisServer::start().expect("redis-server");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let entry = |sequence: u64, event: &str| {
        HashMap::from([(
            "wallet:w0:latest".to_string(),
            CacheEntry {
                stream_sequence: sequence,
                fields: vec![("event_type".into(), event.into())],
            },
        )])
    };
    runtime.block_on(async {
        let (queue, writer) = cache::start(
            &cache_spec(&redis.url()),
            &UserPassword::default(),
            None,
            Arc::new(Metrics::new()),
            Arc::new(signal_worker::health::Health::new()),
        )
        .expect("cache writer");
        // As when another worker, or a redelivery after a crash, stores an older row last.
        queue.offer(entry(10, "newer"));
        queue.offer(entry(5, "older"));
        drop(queue);
        writer.await.expect("writer ends once the queue is dropped");
    });
    let hash: BTreeMap<String, String> = redis
        .command(&["HGETALL", "wallet:w0:latest"])
        .expect("HGETALL");
    assert_eq!(hash.get("event_type").map(String::as_str), Some("newer"));
    assert_eq!(hash.get(SEQUENCE_FIELD).map(String::as_str), Some("10"));

    runtime.block_on(async {
        let (queue, writer) = cache::start(
            &cache_spec(&redis.url()),
            &UserPassword::default(),
            None,
            Arc::new(Metrics::new()),
            Arc::new(signal_worker::health::Health::new()),
        )
        .expect("cache writer");
        queue.offer(entry(11, "newest"));
        drop(queue);
        writer.await.expect("writer ends");
    });
    let hash: BTreeMap<String, String> = redis
        .command(&["HGETALL", "wallet:w0:latest"])
        .expect("HGETALL");
    assert_eq!(hash.get("event_type").map(String::as_str), Some("newest"));
}
