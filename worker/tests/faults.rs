//! The fault suite: two worker binaries over 200k seed-shaped signals with 1% poison while one
//! worker is SIGKILLed every few seconds and restarted, ClickHouse is stopped for 20 s, nats-server
//! is restarted once and Redis is stopped for 10 s. Afterwards every valid stream sequence is in
//! the table, duplicates stay within the README's bound, the dead letters equal the poison
//! exactly, the consumer has nothing pending or unacknowledged, and Redis holds the newest value
//! of every key. The figures are printed (`cargo test -p signal-worker --test faults --
//! --nocapture`).
//!
//! Soak mode: `SIGNAL_FAULT_SOAK_SECS=600` repeats the one-minute fault cycle for that long, with
//! 200k signals a cycle.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{TestEnv, sample_columns, wait_for};
use signal_clients::dead_letter::HEADER_SEQUENCE;
use signal_model::manifest::PipelineManifest;
use signal_model::{CacheSpec, ColumnSpec, DeadLetterSpec, HumanDuration, RedisSpec};

/// Signals published per fault cycle.
const SIGNALS_PER_CYCLE: u64 = 200_000;
/// One message in this many is poison.
const POISON_EVERY: u64 = 100;
/// Length of one fault cycle; publishing runs through all of it.
const CYCLE: Duration = Duration::from_secs(60);
/// Publishing and fault steps happen on this tick.
const TICK: Duration = Duration::from_millis(250);
/// The worker that is killed is killed this often.
const KILL_EVERY: Duration = Duration::from_secs(4);
/// No kill in this last stretch of publishing (each user has several signals in it).
const LAST_KILL_BEFORE_END: Duration = Duration::from_secs(5);
const CLICKHOUSE_DOWN: (Duration, Duration) = (Duration::from_secs(6), Duration::from_secs(26));
const NATS_RESTART_AT: Duration = Duration::from_secs(30);
const REDIS_DOWN: (Duration, Duration) = (Duration::from_secs(34), Duration::from_secs(44));
/// Distinct cache keys (`user-N`), each updated many times after Redis is back.
const USERS: u64 = 1000;
const DEAD_LETTER_SUBJECT: &str = "dlq.faults";

fn is_poison(index: u64) -> bool {
    index % POISON_EVERY == POISON_EVERY / 2
}

/// Signal `index`: a sample signal, or one of two kinds of poison.
fn signal(index: u64) -> Vec<u8> {
    if !is_poison(index) {
        return signal_demo::sample_signals::sample_signal(index);
    }
    if index.is_multiple_of(2) {
        format!("not json {index}").into_bytes()
    } else {
        format!(r#"{{"severity":"high","index":{index}}}"#).into_bytes()
    }
}

fn fault_manifest(env: &TestEnv) -> PipelineManifest {
    let mut columns = sample_columns();
    columns.push(ColumnSpec::new("user_id", "String", "$.user_id"));
    let mut manifest = env.manifest("faults", columns);
    let spec = &mut manifest.spec;
    spec.consumer.ack_wait = HumanDuration::from_secs(3);
    // Messages are redelivered by every kill; maxDeliver exhaustion is tested on its own
    // (dead_letters.rs), here it must not turn an outage into dead letters.
    spec.consumer.max_deliver = -1;
    spec.workers.batch.max_rows = 1000;
    spec.workers.batch.max_wait = HumanDuration(Duration::from_millis(500));
    spec.dead_letter = Some(DeadLetterSpec {
        subject: Some(DEAD_LETTER_SUBJECT.into()),
        ..DeadLetterSpec::default()
    });
    spec.cache = Some(CacheSpec {
        redis: RedisSpec {
            url: env.redis.as_ref().expect("redis").url(),
            auth: None,
            tls: None,
        },
        key: "user:{user_id}:latest".into(),
        fields: vec!["seq".into(), "event_type".into()],
        ttl: HumanDuration::from_secs(3600),
    });
    spec.validate("faults").expect("valid spec");
    manifest
}

/// What happened during the run.
#[derive(Default, Debug)]
struct Faults {
    kills: u64,
    clickhouse_stops: u64,
    nats_restarts: u64,
    redis_stops: u64,
}

#[test]
fn two_workers_under_kills_and_server_outages_lose_nothing_and_dead_letter_exactly_once() {
    let soak = std::env::var("SIGNAL_FAULT_SOAK_SECS")
        .ok()
        .and_then(|secs| secs.parse::<u64>().ok());
    let cycles = soak.map_or(1, |secs| secs.div_ceil(CYCLE.as_secs()).max(1));
    let total = SIGNALS_PER_CYCLE * cycles;
    let poison: Vec<u64> = (0..total).filter(|i| is_poison(*i)).collect();
    let valid = total - poison.len() as u64;

    let mut env = TestEnv::start_with_redis();
    let manifest = fault_manifest(&env);
    env.provision(&manifest);
    let dead_letters = env.runtime.block_on(async {
        env.jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: "FAULTS_DLQ".into(),
                subjects: vec![DEAD_LETTER_SUBJECT.into()],
                storage: async_nats::jetstream::stream::StorageType::File,
                // The default duplicate window (2 min) drops a dead letter published again.
                ..Default::default()
            })
            .await
            .expect("dead-letter stream")
    });

    let started = Instant::now();
    let mut steady = env.spawn_binary(&manifest, "steady");
    let mut killed = env.spawn_binary(&manifest, "killed-0");
    let mut faults = Faults::default();
    let mut published = 0u64;
    let ticks_per_cycle = (CYCLE.as_millis() / TICK.as_millis()) as u64;
    let per_tick = SIGNALS_PER_CYCLE.div_ceil(ticks_per_cycle);
    let mut last_kill = Instant::now();
    // The last seconds are not killed: a killed worker loses the cache updates it queued
    // but had not written, and only a key's next update makes them good (README, "Delivery
    // guarantees"). Every user has signals in them.
    let kills_end =
        ticks_per_cycle * cycles - (LAST_KILL_BEFORE_END.as_millis() / TICK.as_millis()) as u64;
    let mut clickhouse_down = false;
    let mut redis_down = false;
    for tick in 0..ticks_per_cycle * cycles {
        let tick_started = Instant::now();
        let in_cycle = TICK * (tick % ticks_per_cycle) as u32;
        let end = (published + per_tick).min(total);
        env.publish_all("faults.signals", (published..end).map(signal));
        published = end;

        if !clickhouse_down && in_cycle >= CLICKHOUSE_DOWN.0 && in_cycle < CLICKHOUSE_DOWN.1 {
            env.clickhouse.stop();
            clickhouse_down = true;
            faults.clickhouse_stops += 1;
        }
        if clickhouse_down && in_cycle >= CLICKHOUSE_DOWN.1 {
            env.clickhouse.restart().expect("ClickHouse restarts");
            clickhouse_down = false;
        }
        if in_cycle == NATS_RESTART_AT {
            env.nats.restart().expect("nats-server restarts");
            faults.nats_restarts += 1;
            wait_for(
                "the test's client reconnected",
                Duration::from_secs(30),
                || {
                    env.client.connection_state() == async_nats::connection::State::Connected
                        && env
                            .runtime
                            .block_on(env.jetstream.get_stream("FAULTS"))
                            .is_ok()
                },
            );
        }
        if !redis_down && in_cycle >= REDIS_DOWN.0 && in_cycle < REDIS_DOWN.1 {
            env.redis.as_mut().expect("redis").stop();
            redis_down = true;
            faults.redis_stops += 1;
        }
        if redis_down && in_cycle >= REDIS_DOWN.1 {
            env.redis
                .as_mut()
                .expect("redis")
                .restart()
                .expect("Redis restarts");
            redis_down = false;
        }
        if tick < kills_end && last_kill.elapsed() >= KILL_EVERY {
            killed.process.kill_hard().expect("SIGKILL");
            faults.kills += 1;
            killed = env.spawn_binary(&manifest, &format!("killed-{}", faults.kills));
            last_kill = Instant::now();
        }
        assert!(
            steady.process.is_running(),
            "the steady worker died:\n{}",
            steady.log_text()
        );
        std::thread::sleep(TICK.saturating_sub(tick_started.elapsed()));
    }
    assert_eq!(published, total);
    let published_in = started.elapsed();

    wait_for(
        "every valid sequence stored",
        Duration::from_secs(240),
        || env.sequences(&manifest).distinct >= valid,
    );
    wait_for(
        "nothing pending or unacknowledged",
        Duration::from_secs(60),
        || env.consumer_settled(&manifest),
    );
    let dead_letter_count = || {
        let mut stream = dead_letters.clone();
        env.runtime
            .block_on(stream.info())
            .expect("dead-letter stream info")
            .state
            .messages
    };
    wait_for("every dead letter", Duration::from_secs(60), || {
        dead_letter_count() >= poison.len() as u64
    });
    let settled_in = started.elapsed();

    // No loss: exactly the valid sequences, each at least once.
    let table = "signal_test.faults";
    let summary = env.sequences(&manifest);
    let poison_rows = env.query(&format!(
        "SELECT count() FROM {table} WHERE (seq - 1) % {POISON_EVERY} = {}",
        POISON_EVERY / 2
    ));
    assert_eq!(poison_rows, "0", "no poison became a row");
    assert_eq!(summary.distinct, valid, "{summary:?}");
    assert_eq!((summary.min, summary.max), (1, total), "{summary:?}");

    // Dead letters: one per poison message, each poison sequence once.
    let letters = dead_letter_count();
    let mut lettered = BTreeSet::new();
    for sequence in 1..=letters {
        let letter = env
            .runtime
            .block_on(dead_letters.get_raw_message(sequence))
            .expect("dead letter");
        let header = letter
            .headers
            .get(HEADER_SEQUENCE)
            .expect("sequence header");
        lettered.insert(header.as_str().parse::<u64>().expect("a sequence"));
    }
    let expected: BTreeSet<u64> = poison.iter().map(|i| i + 1).collect();

    // Redis: each user's key holds its newest valid row. The cache is written after the ack, by
    // its own task: the last batch's keys may land a moment after the consumer settled.
    let redis = env.redis.as_ref().expect("redis");
    // Users whose signals are all poison (every 100th index) have no key.
    let newest: Vec<(u64, u64)> = (0..USERS)
        .filter_map(|user| {
            (0..total)
                .rev()
                .find(|i| i % USERS == user && !is_poison(*i))
                .map(|index| (user, index + 1))
        })
        .collect();
    let keyed_users = newest.len();
    let stale_keys = || {
        newest
            .iter()
            .filter_map(|&(user, want)| {
                let held: Option<String> = redis
                    .command(&["HGET", &format!("user:user-{user}:latest"), "seq"])
                    .expect("HGET");
                let held = held.unwrap_or_else(|| "(no value)".into());
                (held != want.to_string()).then_some((user, want, held))
            })
            .collect::<Vec<_>>()
    };
    let mut stale = stale_keys();
    let cache_deadline = Instant::now() + Duration::from_secs(30);
    while !stale.is_empty() && Instant::now() < cache_deadline {
        std::thread::sleep(Duration::from_millis(200));
        stale = stale_keys();
    }
    let newest_keys = keyed_users - stale.len();

    let info = env.consumer_info(&manifest);
    // README, "Duplicate bound": at most one batch per worker death and per NATS restart per
    // worker (acks lost in flight), and one per ClickHouse stop per worker (an insert stored
    // whose answer was lost), on servers without deduplication tokens.
    let workers = 2;
    let events = faults.kills + workers * faults.nats_restarts + workers * faults.clickhouse_stops;
    let bound = events * u64::from(manifest.spec.workers.batch.max_rows);
    println!(
        "fault suite: {total} signals ({valid} valid, {} poison) published in {:.0?}, settled after {:.0?}; \
         faults: {faults:?}",
        poison.len(),
        published_in,
        settled_in,
    );
    println!(
        "fault suite: rows {}, distinct sequences {} of {valid}, duplicates {} (bound {bound} = {events} events x {} rows)",
        summary.rows,
        summary.distinct,
        summary.duplicates(),
        manifest.spec.workers.batch.max_rows,
    );
    println!(
        "fault suite: dead letters {letters} for {} poison ({} distinct sequences); consumer pending {} ack-pending {}; \
         redis keys holding the newest row {newest_keys} of {keyed_users}",
        poison.len(),
        lettered.len(),
        info.num_pending,
        info.num_ack_pending,
    );
    assert_eq!(letters, poison.len() as u64, "one dead letter per poison");
    assert_eq!(lettered, expected, "each poison sequence dead-lettered");
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");
    assert!(
        summary.duplicates() <= bound,
        "{} duplicates exceed {bound}",
        summary.duplicates()
    );
    assert!(
        stale.is_empty(),
        "{} stale keys (user, want, held), first: {:?}",
        stale.len(),
        &stale[..stale.len().min(10)]
    );
    drop(killed);
    steady
        .process
        .terminate(Duration::from_secs(30))
        .expect("the steady worker stops");
}
