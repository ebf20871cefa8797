//! The row encoder alone: nanoseconds per message for the end-to-end bench's columns (the
//! raw-signals example's, a nested `amount` and the `payload` object as text) on sample signals
//! shaped like the demo's, clean and with each kind of poison. Prints figures, asserts nothing.
//!
//! `cargo bench -p signal-model --bench row_encoder` (`SIGNAL_ENCODER_MESSAGES`, default 1,000,000;
//! `SIGNAL_ENCODER_ONLY=clean` times only the clean signals).

use std::hint::black_box;
use std::time::Instant;

use signal_model::ColumnSpec;
use signal_model::row_encoder::{MessageMeta, RowEncoder};

fn columns() -> Vec<ColumnSpec> {
    vec![
        ColumnSpec::new("event_time", "DateTime", "$.event_time"),
        ColumnSpec::new("source_id", "String", "$.source_id"),
        ColumnSpec::new("event_type", "String", "$.event_type"),
        ColumnSpec::new("severity", "UInt8", "$.severity"),
        ColumnSpec::new("trace_id", "String", "$.trace_id"),
        ColumnSpec::new("user_id", "String", "$.user_id"),
        ColumnSpec::new("wallet_address", "String", "$.wallet_address"),
        ColumnSpec::new("amount", "Float64", "$.payload.amount"),
        ColumnSpec::new("payload", "String", "$.payload"),
        ColumnSpec::new("subject", "String", "@subject"),
        ColumnSpec::new("stream_seq", "UInt64", "@sequence"),
    ]
}

/// A signal like the demo's (`signal_demo::sample_signals`, which this crate cannot depend on).
fn sample(index: u64) -> Vec<u8> {
    format!(
        concat!(
            r#"{{"event_time":"2026-03-{:02}T10:{:02}:{:02}.{:03}Z","source_id":"src-{}","event_type":"transfer","#,
            r#""severity":{},"trace_id":"{:016x}","user_id":"user-{}","wallet_address":"0x{:040x}","#,
            r#""payload":{{"amount":{}.{:02},"currency":"USD"}}}}"#
        ),
        1 + index % 28,
        index / 60 % 60,
        index % 60,
        index % 1000,
        index % 17,
        index % 6,
        index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        index % 1000,
        index % 257,
        index % 10_000,
        index % 100,
    )
    .into_bytes()
}

fn main() {
    let messages: u64 = std::env::var("SIGNAL_ENCODER_MESSAGES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1_000_000);
    // For `valgrind --tool=callgrind`, whose instruction counts do not depend on the machine's load.
    let clean_only = std::env::var("SIGNAL_ENCODER_ONLY").is_ok_and(|only| only == "clean");
    let encoder = RowEncoder::new(&columns(), 1 << 20).expect("the bench's columns are valid");
    let samples: Vec<Vec<u8>> = (0..1024).map(sample).collect();
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("not_json (cut in half)", {
            let text = sample(7);
            text[..text.len() / 2].to_vec()
        }),
        (
            "missing_value",
            String::from_utf8(sample(8))
                .expect("utf-8")
                .replace("\"wallet_address\"", "\"wallet\"")
                .into_bytes(),
        ),
        (
            "wrong_type",
            String::from_utf8(sample(9))
                .expect("utf-8")
                .replace("\"amount\":", "\"amount\":\"lots\",\"was\":")
                .into_bytes(),
        ),
    ];
    let mut out = Vec::with_capacity(16 << 20);
    let time = |name: &str, payloads: &[&[u8]], out: &mut Vec<u8>| {
        let started = Instant::now();
        for index in 0..messages {
            if out.len() > 8 << 20 {
                out.clear();
            }
            let payload = payloads[(index % payloads.len() as u64) as usize];
            let meta = MessageMeta {
                subject: "signals.transfer",
                stream_sequence: index,
                timestamp_nanos: 1_767_225_600_000_000_000,
                headers: None,
            };
            let _ = black_box(encoder.encode(black_box(payload), &meta, out));
        }
        let nanos = started.elapsed().as_nanos() as f64 / messages as f64;
        println!("{name:>24}: {nanos:7.0} ns per message");
    };
    let clean: Vec<&[u8]> = samples.iter().map(Vec::as_slice).collect();
    time("clean", &clean, &mut out);
    if clean_only {
        return;
    }
    for (name, payload) in &poison {
        time(name, &[payload.as_slice()], &mut out);
    }
}
