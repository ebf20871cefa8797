//! Sample signals shaped like the seed systems' events, for the demo, the benchmark and tests.
//!
//! Deterministic for a given index, about 240 bytes of JSON each.

use signal_model::ColumnSpec;

/// Event types the samples cycle through.
pub const EVENT_TYPES: [&str; 5] = [
    "transaction",
    "login",
    "transfer",
    "withdrawal",
    "risk_alert",
];

/// Columns for the sample signals: the raw-signals example's, the nested `amount` (so that
/// `amount` as a word is poison) and the `payload` object as text, in the types ClickHouse 18.16
/// has. The benchmarks' table.
pub fn benchmark_columns() -> Vec<ColumnSpec> {
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

/// The `index`-th sample signal as JSON bytes.
pub fn sample_signal(index: u64) -> Vec<u8> {
    let event_type = EVENT_TYPES[(index % EVENT_TYPES.len() as u64) as usize];
    // A fixed start time keeps the samples reproducible; one signal every millisecond.
    let millis = 1_767_225_600_000 + index;
    let secs = millis / 1000;
    let (day_secs, millis_part) = (secs % 86_400, millis % 1000);
    let days = secs / 86_400;
    // 2026-01-01 is day 20454 after the epoch; samples stay within 2026.
    let day_of_year = days - 20_454;
    let (month, day) = (1 + day_of_year / 28 % 12, 1 + day_of_year % 28);
    format!(
        concat!(
            r#"{{"event_time":"2026-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z","source_id":"src-{}","event_type":"{}","#,
            r#""severity":{},"trace_id":"{:016x}","user_id":"user-{}","wallet_address":"0x{:040x}","#,
            r#""payload":{{"amount":{}.{:02},"currency":"USD"}}}}"#
        ),
        month,
        day,
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        millis_part,
        index % 17,
        event_type,
        index % 6,
        index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        index % 1000,
        index % 257,
        index % 10_000,
        index % 100,
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_json_of_the_expected_size() {
        for index in [0, 1, 99_999, 999_999] {
            let bytes = sample_signal(index);
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(value["payload"]["currency"], "USD");
            assert!((200..=280).contains(&bytes.len()), "{} bytes", bytes.len());
        }
    }
}
