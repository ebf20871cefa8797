//! The row encoder alone: nanoseconds per message for the benchmarks' columns
//! ([`benchmark_columns`]) on the sample signals, clean and with each kind of the demo's poison.
//! Prints figures, asserts nothing.
//!
//! `cargo bench -p signal-demo --bench row_encoder` (`SIGNAL_ENCODER_MESSAGES`, default 1,000,000;
//! `SIGNAL_ENCODER_ONLY=clean` times only the clean signals).

use std::hint::black_box;
use std::time::Instant;

use signal_demo::messages::{Malformation, demo_message};
use signal_demo::sample_signals::{benchmark_columns, sample_signal};
use signal_model::row_encoder::{MessageMeta, RowEncoder};

fn main() {
    let messages: u64 = std::env::var("SIGNAL_ENCODER_MESSAGES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1_000_000);
    // For `valgrind --tool=callgrind`, whose instruction counts do not depend on the machine's load.
    let clean_only = std::env::var("SIGNAL_ENCODER_ONLY").is_ok_and(|only| only == "clean");
    let encoder =
        RowEncoder::new(&benchmark_columns(), 1 << 20).expect("the bench's columns are valid");
    let samples: Vec<Vec<u8>> = (0..1024).map(sample_signal).collect();
    // At 1000 per mille every demo message is malformed, the kind chosen by its index.
    let poison: Vec<(Malformation, Vec<u8>)> = (0..3)
        .map(|index| {
            let message = demo_message(index, 1000);
            let kind = message.malformation.expect("every message is malformed");
            (kind, message.payload)
        })
        .collect();
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
    for (kind, payload) in &poison {
        time(&format!("{kind:?}"), &[payload.as_slice()], &mut out);
    }
}
