//! Where a message is turned into a row: JSON message + metadata in, ClickHouse RowBinary bytes out.
//!
//! A [`RowEncoder`] is compiled once from the spec's columns. For each message it parses the JSON,
//! takes each column's value from its source, and appends the column's RowBinary encoding to the
//! batch buffer. A message that cannot become a row returns a [`Poison`] reason and leaves the
//! buffer exactly as it was, so one bad message never spoils its batch.

//!
//! One file a seam: [`json`] scans the message, [`values`] encodes integers, floats, strings and
//! composites, [`decimal`] decimals from the number's text, [`time`] dates and times.

mod decimal;
mod json;
mod time;
mod values;

use std::fmt;

use chrono::DateTime;
use serde_json::Value;

use crate::column_type::ColumnType;
use crate::spec::ColumnSpec;
use crate::value_source::{PathStep, ValueSource};

use json::{Parsed, Scanned, WantedKeys};
use values::encode_value;

/// Headers of a message, looked up by name.
pub trait HeaderLookup {
    fn header(&self, name: &str) -> Option<&str>;
}

/// What is known about a message besides its payload.
#[derive(Clone, Copy)]
pub struct MessageMeta<'a> {
    pub subject: &'a str,
    pub stream_sequence: u64,
    /// Stream time, nanoseconds since the Unix epoch.
    pub timestamp_nanos: i64,
    pub headers: Option<&'a dyn HeaderLookup>,
}

/// Why a message cannot become a row. The worker routes it to the dead-letter subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Poison {
    TooLarge {
        size: usize,
        limit: usize,
    },
    NotJson(String),
    NotAnObject,
    Missing {
        column: String,
    },
    WrongType {
        column: String,
        expected: String,
        found: String,
    },
    OutOfRange {
        column: String,
        detail: String,
    },
}

impl Poison {
    /// A short, stable label for metrics and the `Signal-Poison-Reason` header's prefix.
    pub fn label(&self) -> &'static str {
        match self {
            Poison::TooLarge { .. } => "too_large",
            Poison::NotJson(_) => "not_json",
            Poison::NotAnObject => "not_object",
            Poison::Missing { .. } => "missing_value",
            Poison::WrongType { .. } => "wrong_type",
            Poison::OutOfRange { .. } => "out_of_range",
        }
    }

    /// Every label, for pre-registering metrics.
    pub const LABELS: [&'static str; 6] = [
        "too_large",
        "not_json",
        "not_object",
        "missing_value",
        "wrong_type",
        "out_of_range",
    ];
}

impl fmt::Display for Poison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Poison::TooLarge { size, limit } => {
                write!(f, "too_large: message of {size} bytes exceeds {limit}")
            }
            Poison::NotJson(error) => write!(f, "not_json: {error}"),
            Poison::NotAnObject => f.write_str("not_object: message is JSON but not an object"),
            Poison::Missing { column } => write!(
                f,
                "missing_value: column `{column}` has no value and no default"
            ),
            Poison::WrongType {
                column,
                expected,
                found,
            } => {
                write!(
                    f,
                    "wrong_type: column `{column}` expects {expected}, found {found}"
                )
            }
            Poison::OutOfRange { column, detail } => {
                write!(f, "out_of_range: column `{column}`: {detail}")
            }
        }
    }
}

/// A column's spec that could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ColumnError {
    /// Path of the offending field below `spec.clickhouse.columns`, e.g. `[2].type`.
    pub field: String,
    pub message: String,
}

/// One compiled column.
#[derive(Clone, Debug)]
struct Column {
    name: String,
    ty: ColumnType,
    source: ValueSource,
    default: Option<Value>,
    /// A (nullable) decimal or float: a JSON number for it is read from its text. Decimals keep
    /// every digit that way; floats are parsed once, without building a JSON value first.
    number_text: bool,
    /// A string column (`Some(nullable)`): an object or array found for it is stored as the
    /// message's own text, without parsing it into a value and printing it again.
    text: Option<bool>,
    /// A path into the message: the slot of [`WantedKeys`] its keys lead to, and how many of
    /// its steps that slot covers (the rest start at an array index). Set by [`RowEncoder::new`].
    slot: Option<(usize, usize)>,
}

/// Whether `ty` is a string column, and if so whether it is nullable.
fn string_column(ty: &ColumnType) -> Option<bool> {
    match ty {
        ColumnType::String => Some(false),
        ColumnType::LowCardinality(inner) => string_column(inner),
        ColumnType::Nullable(inner) => string_column(inner).map(|_| true),
        _ => None,
    }
}

/// Whether a JSON number for a column of type `ty` is encoded from the number's text.
fn reads_number_text(ty: &ColumnType) -> bool {
    match ty {
        ColumnType::Nullable(inner) => reads_number_text(inner),
        ColumnType::Decimal { .. } | ColumnType::Float32 | ColumnType::Float64 => true,
        _ => false,
    }
}

/// A value as found in the message, before encoding.
#[derive(Clone, Copy)]
enum Found<'a> {
    Json(&'a Value),
    Text(&'a str),
    Unsigned(u64),
    TimeNanos(i64),
}

impl<'a> Found<'a> {
    /// JSON strings become `Text`, so every text value is matched in one place.
    fn from_json(value: &'a Value) -> Self {
        match value {
            Value::String(s) => Found::Text(s),
            other => Found::Json(other),
        }
    }

    fn describe(&self) -> String {
        match self {
            Found::Json(Value::Null) => "null".into(),
            Found::Json(Value::Bool(b)) => format!("boolean {b}"),
            Found::Json(Value::Number(n)) => format!("number {n}"),
            Found::Json(Value::Array(_)) => "an array".into(),
            Found::Json(Value::Object(_)) => "an object".into(),
            Found::Text(s) => format!("string {}", shorten(s)),
            Found::Json(Value::String(s)) => format!("string {}", shorten(s)),
            Found::Unsigned(n) => format!("number {n}"),
            Found::TimeNanos(n) => format!("timestamp {n}ns"),
        }
    }
}

fn shorten(text: &str) -> String {
    let mut short: String = text.chars().take(40).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    format!("{short:?}")
}

/// Encodes messages as RowBinary rows of one table.
#[derive(Clone, Debug)]
pub struct RowEncoder {
    columns: Vec<Column>,
    max_message_bytes: usize,
    /// The keys the columns read, recorded while a message is scanned.
    wanted: WantedKeys,
    needs_json: bool,
    needs_whole_message: bool,
}

impl RowEncoder {
    /// Compiles the columns; each error names the column's index and field.
    pub fn new(columns: &[ColumnSpec], max_message_bytes: usize) -> Result<Self, Vec<ColumnError>> {
        let mut compiled = Vec::with_capacity(columns.len());
        let mut errors = Vec::new();
        for (index, spec) in columns.iter().enumerate() {
            let ty = ColumnType::parse(&spec.type_name).map_err(|e| ColumnError {
                field: format!("[{index}].type"),
                message: e.to_string(),
            });
            let source = ValueSource::parse(&spec.from).map_err(|message| ColumnError {
                field: format!("[{index}].from"),
                message,
            });
            match (ty, source) {
                (Ok(ty), Ok(source)) => {
                    let default = spec.default.as_deref().map(|text| default_value(&ty, text));
                    let number_text = reads_number_text(&ty);
                    let text = string_column(&ty);
                    let column = Column {
                        name: spec.name.clone(),
                        ty,
                        source,
                        default,
                        number_text,
                        text,
                        slot: None,
                    };
                    if let Some(default) = &column.default {
                        let mut scratch = Vec::new();
                        if let Err(poison) =
                            encode_value(&column, Found::from_json(default), &mut scratch)
                        {
                            errors.push(ColumnError {
                                field: format!("[{index}].default"),
                                message: format!("default does not fit the column type: {poison}"),
                            });
                        }
                    }
                    compiled.push(column);
                }
                (ty, source) => errors.extend(ty.err().into_iter().chain(source.err())),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let paths: Vec<&[PathStep]> = compiled
            .iter()
            .map(|column| match &column.source {
                ValueSource::Json(steps) => steps.as_slice(),
                _ => &[],
            })
            .collect();
        let (wanted, slots) = WantedKeys::compile(&paths);
        for (column, slot) in compiled.iter_mut().zip(slots) {
            column.slot = slot;
        }
        let needs_json = compiled
            .iter()
            .any(|c| matches!(c.source, ValueSource::Json(_)));
        let needs_whole_message = compiled
            .iter()
            .any(|c| matches!(&c.source, ValueSource::Json(steps) if steps.is_empty()));
        Ok(Self {
            columns: compiled,
            max_message_bytes,
            wanted,
            needs_json,
            needs_whole_message,
        })
    }

    /// Column names in table order, back-quoted for an INSERT's column list.
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| format!("`{}`", c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Names of the columns, in order.
    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// Appends one row to `out`, or leaves `out` untouched and says why the message is poison.
    pub fn encode(
        &self,
        payload: &[u8],
        meta: &MessageMeta<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Poison> {
        self.encode_inner(payload, meta, out, None)
    }

    /// Like [`encode`](Self::encode), and also sets `texts[i]` to the value of each column `i` in
    /// `wanted`, as text (strings as they are, other JSON as JSON text, times as RFC 3339). The
    /// Redis cache uses it; other columns cost nothing extra.
    pub fn encode_with_texts(
        &self,
        payload: &[u8],
        meta: &MessageMeta<'_>,
        out: &mut Vec<u8>,
        wanted: &[usize],
        texts: &mut Vec<String>,
    ) -> Result<(), Poison> {
        texts.clear();
        texts.resize(self.columns.len(), String::new());
        self.encode_inner(payload, meta, out, Some((wanted, texts)))
    }

    fn encode_inner(
        &self,
        payload: &[u8],
        meta: &MessageMeta<'_>,
        out: &mut Vec<u8>,
        mut texts: Option<(&[usize], &mut Vec<String>)>,
    ) -> Result<(), Poison> {
        if payload.len() > self.max_message_bytes {
            return Err(Poison::TooLarge {
                size: payload.len(),
                limit: self.max_message_bytes,
            });
        }
        let scanned = if self.needs_json {
            Scanned::parse(payload, &self.wanted)?
        } else {
            Scanned::default()
        };
        // Only a column that takes the whole message (`$`) needs it as one parsed value.
        let whole: Value = if self.needs_whole_message {
            serde_json::from_slice(payload).map_err(|e| Poison::NotJson(e.to_string()))?
        } else {
            Value::Null
        };
        let start = out.len();
        let result = self
            .columns
            .iter()
            .enumerate()
            .try_for_each(|(index, column)| {
                // The path is walked once, whatever the value turns out to be.
                let raw = match (&column.source, column.slot) {
                    (ValueSource::Json(steps), Some((slot, keys))) => {
                        scanned.raw_at(slot, &steps[keys..])
                    }
                    _ => None,
                };
                // An object or array into a string column: the message's own text.
                if let (Some(nullable), Some(composite)) = (column.text, raw)
                    && composite.starts_with(['{', '['])
                {
                    if nullable {
                        out.push(0);
                    }
                    values::write_compact_json_string(out, composite);
                    if let Some((wanted, texts)) = texts.as_mut()
                        && wanted.contains(&index)
                    {
                        texts[index] = values::compact_json(composite);
                    }
                    return Ok(());
                }
                let number = raw
                    .filter(|_| column.number_text)
                    .and_then(Scanned::number_text);
                let parsed = match raw {
                    Some(text) if number.is_none() => Some(scanned.parse_raw(text)?),
                    _ => None,
                };
                let found = match (&column.source, &parsed) {
                    _ if number.is_some() => number.map(Found::Text),
                    (ValueSource::Json(steps), _) if steps.is_empty() => {
                        Some(Found::from_json(&whole))
                    }
                    (ValueSource::Json(_), Some(Parsed::Text(text))) => Some(Found::Text(text)),
                    (ValueSource::Json(_), Some(Parsed::Value(value))) => {
                        Some(Found::from_json(value))
                    }
                    (ValueSource::Json(_), _) => None,
                    _ => self.find_metadata(column, meta),
                };
                let found = match (found, &column.default) {
                    (None | Some(Found::Json(Value::Null)), Some(default)) => {
                        Some(Found::from_json(default))
                    }
                    (found, _) => found,
                };
                let found = found.unwrap_or(Found::Json(&Value::Null));
                encode_value(column, found, out)?;
                if let Some((wanted, texts)) = texts.as_mut()
                    && wanted.contains(&index)
                {
                    texts[index] = text_of(found);
                }
                Ok(())
            });
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn find_metadata<'a>(&self, column: &Column, meta: &MessageMeta<'a>) -> Option<Found<'a>> {
        match &column.source {
            ValueSource::Json(_) => None,
            ValueSource::Subject => Some(Found::Text(meta.subject)),
            ValueSource::Sequence => Some(Found::Unsigned(meta.stream_sequence)),
            ValueSource::Timestamp => Some(Found::TimeNanos(meta.timestamp_nanos)),
            ValueSource::Header(name) => meta.headers.and_then(|h| h.header(name)).map(Found::Text),
        }
    }
}

/// A default is written as ClickHouse would print it: raw text for text-like types, JSON otherwise
/// (`0`, `true`, `[1,2]`), falling back to text (`1970-01-01`).
fn default_value(ty: &ColumnType, text: &str) -> Value {
    let base = match ty {
        ColumnType::Nullable(inner) | ColumnType::LowCardinality(inner) => inner.as_ref(),
        other => other,
    };
    match base {
        ColumnType::String | ColumnType::Uuid => Value::String(text.to_string()),
        _ => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())),
    }
}

fn text_of(found: Found<'_>) -> String {
    match found {
        Found::Text(s) => s.to_string(),
        Found::Json(Value::Null) => String::new(),
        Found::Json(other) => other.to_string(),
        Found::Unsigned(n) => n.to_string(),
        Found::TimeNanos(nanos) => DateTime::from_timestamp_nanos(nanos).to_rfc3339(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> MessageMeta<'static> {
        MessageMeta {
            subject: "signals.tx",
            stream_sequence: 42,
            timestamp_nanos: 1_700_000_000_123_456_789,
            headers: None,
        }
    }

    fn encode_one(ty: &str, value: Value) -> Result<Vec<u8>, Poison> {
        let encoder = RowEncoder::new(&[ColumnSpec::new("c", ty, "$.v")], 1 << 20).unwrap();
        let payload = serde_json::to_vec(&serde_json::json!({ "v": value })).unwrap();
        let mut out = Vec::new();
        encoder.encode(&payload, &meta(), &mut out).map(|()| out)
    }

    #[test]
    fn encodes_scalars_as_rowbinary() {
        assert_eq!(
            encode_one("String", "hé".into()).unwrap(),
            [3, b'h', 0xc3, 0xa9]
        );
        assert_eq!(encode_one("UInt16", 513.into()).unwrap(), [1, 2]);
        assert_eq!(encode_one("Int8", (-2).into()).unwrap(), [0xfe]);
        assert_eq!(encode_one("Int32", "7".into()).unwrap(), [7, 0, 0, 0]);
        assert_eq!(encode_one("Bool", true.into()).unwrap(), [1]);
        assert_eq!(
            encode_one("Float64", 1.5.into()).unwrap(),
            1.5f64.to_le_bytes()
        );
        assert_eq!(
            encode_one("Decimal(9, 2)", "-12.345".into()).unwrap(),
            (-1234i32).to_le_bytes()
        );
        assert_eq!(
            encode_one("Decimal(18, 4)", 3.25.into()).unwrap(),
            32500i64.to_le_bytes()
        );
        assert_eq!(encode_one("Date", "1970-01-03".into()).unwrap(), [2, 0]);
        assert_eq!(
            encode_one("DateTime", "1970-01-01T00:01:00Z".into()).unwrap(),
            60u32.to_le_bytes()
        );
        assert_eq!(
            encode_one("DateTime", 1_700_000_000_000i64.into()).unwrap(),
            1_700_000_000u32.to_le_bytes()
        );
        assert_eq!(
            encode_one("DateTime64(3)", "2023-11-14T22:13:20.5+00:00".into()).unwrap(),
            1_700_000_000_500i64.to_le_bytes()
        );
        let uuid = encode_one("UUID", "00112233-4455-6677-8899-aabbccddeeff".into()).unwrap();
        assert_eq!(
            uuid,
            [
                0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa,
                0x99, 0x88
            ]
        );
    }

    #[test]
    fn encodes_composites() {
        assert_eq!(encode_one("Nullable(UInt8)", Value::Null).unwrap(), [1]);
        assert_eq!(encode_one("Nullable(UInt8)", 5.into()).unwrap(), [0, 5]);
        assert_eq!(
            encode_one("LowCardinality(String)", "ab".into()).unwrap(),
            [2, b'a', b'b']
        );
        assert_eq!(
            encode_one("Array(UInt8)", serde_json::json!([1, 2])).unwrap(),
            [2, 1, 2]
        );
        assert_eq!(
            encode_one("Map(String, UInt8)", serde_json::json!({"k": 9})).unwrap(),
            [1, 1, b'k', 9]
        );
        // An object taken whole into a String column is its JSON text.
        assert_eq!(
            encode_one("String", serde_json::json!({"a": 1})).unwrap(),
            [7, b'{', b'"', b'a', b'"', b':', b'1', b'}']
        );
        // A longer one needs a two-byte length in front of its text.
        let long = serde_json::json!({"text": "x".repeat(200)});
        let text = long.to_string();
        let mut expected = vec![(text.len() as u8 & 0x7f) | 0x80, (text.len() >> 7) as u8];
        expected.extend_from_slice(text.as_bytes());
        assert_eq!(encode_one("String", long).unwrap(), expected);
    }

    #[test]
    fn poison_reasons_name_the_column_and_leave_the_buffer_alone() {
        let encoder = RowEncoder::new(
            &[
                ColumnSpec::new("seq", "UInt64", "@sequence"),
                ColumnSpec::new("severity", "UInt8", "$.severity"),
            ],
            64,
        )
        .unwrap();
        let mut out = vec![9, 9];
        let err = encoder
            .encode(br#"{"severity": 300}"#, &meta(), &mut out)
            .unwrap_err();
        assert_eq!(err.label(), "out_of_range");
        assert!(err.to_string().contains("`severity`"), "{err}");
        assert_eq!(out, [9, 9]);
        assert_eq!(
            encoder
                .encode(b"{}", &meta(), &mut out)
                .unwrap_err()
                .label(),
            "missing_value"
        );
        assert_eq!(
            encoder
                .encode(b"not json", &meta(), &mut out)
                .unwrap_err()
                .label(),
            "not_json"
        );
        assert_eq!(
            encoder
                .encode(b"[1]", &meta(), &mut out)
                .unwrap_err()
                .label(),
            "not_object"
        );
        assert_eq!(
            encoder
                .encode(&[b' '; 65], &meta(), &mut out)
                .unwrap_err()
                .label(),
            "too_large"
        );
        let wrong = encoder
            .encode(br#"{"severity": "high"}"#, &meta(), &mut out)
            .unwrap_err();
        assert_eq!(wrong.label(), "wrong_type");
        assert!(wrong.to_string().contains("string \"high\""), "{wrong}");
        assert_eq!(out, [9, 9]);
        encoder
            .encode(br#"{"severity": 3}"#, &meta(), &mut out)
            .unwrap();
        assert_eq!(out, [9, 9, 42, 0, 0, 0, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn defaults_and_metadata_fill_columns() {
        struct Headers;
        impl HeaderLookup for Headers {
            fn header(&self, name: &str) -> Option<&str> {
                (name == "Trace").then_some("t-1")
            }
        }
        let encoder = RowEncoder::new(
            &[
                ColumnSpec::new("severity", "UInt8", "$.severity").with_default("7"),
                ColumnSpec::new("source", "String", "$.source").with_default("0"),
                ColumnSpec::new("subject", "String", "@subject"),
                ColumnSpec::new("trace", "String", "@header:Trace"),
                ColumnSpec::new("stored", "DateTime64(6)", "@timestamp"),
            ],
            1024,
        )
        .unwrap();
        let mut out = Vec::new();
        let mut texts = Vec::new();
        let meta = MessageMeta {
            headers: Some(&Headers),
            ..meta()
        };
        encoder
            .encode_with_texts(
                br#"{"severity": null}"#,
                &meta,
                &mut out,
                &[0, 4],
                &mut texts,
            )
            .unwrap();
        let mut expected = vec![7, 1, b'0', 10];
        expected.extend_from_slice(b"signals.tx");
        expected.extend_from_slice(&[3, b't', b'-', b'1']);
        expected.extend_from_slice(&1_700_000_000_123_456i64.to_le_bytes());
        assert_eq!(out, expected);
        assert_eq!(
            texts,
            ["7", "", "", "", "2023-11-14T22:13:20.123456789+00:00"]
        );
    }

    #[test]
    fn json_paths_read_escaped_nested_duplicate_and_whole_values() {
        let encoder = RowEncoder::new(
            &[
                ColumnSpec::new("escaped", "String", "$.s"),
                ColumnSpec::new("nested", "Int16", "$.o.list[1]"),
                ColumnSpec::new("quoted", "UInt8", "$['k.j']"),
                ColumnSpec::new("object", "String", "$.o"),
                ColumnSpec::new("whole", "String", "$"),
                ColumnSpec::new("duplicate", "UInt8", "$.d"),
                ColumnSpec::new("index_at_top", "Nullable(UInt8)", "$[0]"),
            ],
            1024,
        )
        .unwrap();
        let payload = br#"{"s":"a\"b\u00e9","o":{"list":[1,-2]},"k.j":7,"d":1,"d":2}"#;
        let mut out = Vec::new();
        encoder.encode(payload, &meta(), &mut out).unwrap();
        let mut expected = vec![5, b'a', b'"', b'b', 0xc3, 0xa9, 0xfe, 0xff, 7];
        let object = br#"{"list":[1,-2]}"#;
        expected.push(object.len() as u8);
        expected.extend_from_slice(object);
        // `$` is the whole message as compact JSON, keys in the message's order (a payload stored
        // as text reads as it was sent); a repeated key keeps its first place and its last value.
        let whole = "{\"s\":\"a\\\"b\u{e9}\",\"o\":{\"list\":[1,-2]},\"k.j\":7,\"d\":2}";
        expected.push(whole.len() as u8);
        expected.extend_from_slice(whole.as_bytes());
        expected.extend_from_slice(&[2, 1]);
        assert_eq!(out, expected);

        // Broken JSON is not_json even when it starts like an array or an object, and so is
        // text that is not UTF-8, inside a string or not.
        for broken in [
            &b"[1, 2"[..],
            br#"{"d": "#,
            br#"{"d": 1} x"#,
            b"{\"s\": \"\xff\"}",
            b"\xfe{}",
        ] {
            let poison = encoder.encode(broken, &meta(), &mut out).unwrap_err();
            let text = String::from_utf8_lossy(broken);
            assert_eq!(poison.label(), "not_json", "{text}");
        }
        let poison = encoder.encode(br#""text""#, &meta(), &mut out).unwrap_err();
        assert_eq!(poison.label(), "not_object");
    }

    #[test]
    fn compact_objects_in_string_columns_are_stored_and_cached_as_they_are() {
        let encoder = RowEncoder::new(&[ColumnSpec::new("object", "String", "$.o")], 1024).unwrap();
        let object = br#"{"b":1.50,"a":"x\u0020y","l":[1,{"k":null}]}"#;
        let payload = [br#"{"o":"#.as_slice(), object, b"}"].concat();
        let (mut out, mut texts) = (Vec::new(), Vec::new());
        encoder
            .encode_with_texts(&payload, &meta(), &mut out, &[0], &mut texts)
            .unwrap();
        assert_eq!(out, [&[object.len() as u8][..], object].concat());
        assert_eq!(texts, [String::from_utf8(object.to_vec()).unwrap()]);
    }

    #[test]
    fn objects_and_arrays_in_string_columns_keep_the_messages_text_without_whitespace() {
        let encoder = RowEncoder::new(
            &[
                ColumnSpec::new("object", "String", "$.o"),
                ColumnSpec::new("list", "Nullable(String)", "$.l"),
                ColumnSpec::new("low", "LowCardinality(String)", "$.o.inner"),
            ],
            1024,
        )
        .unwrap();
        let payload = b"{\"o\": {\"b\" : 1.50, \"a\":\t\"x y \\\" z\", \"b\": 2e0,\n \"inner\": [ ]},\r\n \"l\": [1, {\"k\": null}]}";
        let mut out = Vec::new();
        let mut texts = Vec::new();
        encoder
            .encode_with_texts(payload, &meta(), &mut out, &[0, 1], &mut texts)
            .unwrap();
        // Keys in the message's order, repeated keys and numbers as spelled; spaces inside
        // strings stay.
        let object = br#"{"b":1.50,"a":"x y \" z","b":2e0,"inner":[]}"#;
        let mut expected = vec![object.len() as u8];
        expected.extend_from_slice(object);
        let list = br#"[1,{"k":null}]"#;
        expected.extend_from_slice(&[0, list.len() as u8]);
        expected.extend_from_slice(list);
        expected.extend_from_slice(&[2, b'[', b']']);
        assert_eq!(out, expected);
        assert_eq!(
            texts,
            [
                String::from_utf8(object.to_vec()).unwrap(),
                String::from_utf8(list.to_vec()).unwrap(),
                String::new()
            ]
        );
        // A null or a missing value is still null or missing, and a string is still text.
        let mut out = Vec::new();
        encoder
            .encode(br#"{"o": "text", "l": null}"#, &meta(), &mut out)
            .unwrap_err();
        let encoder =
            RowEncoder::new(&[ColumnSpec::new("list", "Nullable(String)", "$.l")], 1024).unwrap();
        encoder
            .encode(br#"{"l": null}"#, &meta(), &mut out)
            .unwrap();
        assert_eq!(out, [1]);
    }

    #[test]
    fn decimals_keep_every_digit_of_the_numbers_text() {
        let encoder = RowEncoder::new(
            &[
                ColumnSpec::new("top", "Decimal(38, 18)", "$.amount"),
                ColumnSpec::new("nested", "Nullable(Decimal(38, 18))", "$.p.list[1]"),
            ],
            1 << 20,
        )
        .unwrap();
        let payload = br#"{"amount": 12345678901234567890.123456789012345678, "p": {"list": [0, -0.000000000000000001]}}"#;
        let mut out = Vec::new();
        encoder.encode(payload, &meta(), &mut out).unwrap();
        let top = i128::from_le_bytes(out[..16].try_into().unwrap());
        assert_eq!(top, 12_345_678_901_234_567_890_123_456_789_012_345_678);
        assert_eq!(out[16], 0, "not null");
        let nested = i128::from_le_bytes(out[17..33].try_into().unwrap());
        assert_eq!(nested, -1);
        // Through f64 the first would have been 12345678901234567168.
        let mut null = Vec::new();
        encoder
            .encode(
                br#"{"amount": 1, "p": {"list": [0, null]}}"#,
                &meta(),
                &mut null,
            )
            .unwrap();
        assert_eq!(null[16], 1, "null");
    }

    #[test]
    fn bad_columns_are_reported_with_their_field() {
        let errors = RowEncoder::new(
            &[
                ColumnSpec::new("a", "Strin", "$.a"),
                ColumnSpec::new("b", "UInt8", "b"),
                ColumnSpec::new("c", "UInt8", "$.c").with_default("x"),
            ],
            10,
        )
        .unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["[0].type", "[1].from", "[2].default"]);
    }
}
