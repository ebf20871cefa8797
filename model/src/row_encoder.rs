//! Where a message is turned into a row: JSON message + metadata in, ClickHouse RowBinary bytes out.
//!
//! A [`RowEncoder`] is compiled once from the spec's columns. For each message it parses the JSON,
//! takes each column's value from its source, and appends the column's RowBinary encoding to the
//! batch buffer. A message that cannot become a row returns a [`Poison`] reason and leaves the
//! buffer exactly as it was, so one bad message never spoils its batch.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::column_type::ColumnType;
use crate::spec::ColumnSpec;
use crate::value_source::{PathStep, ValueSource};

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
    needs_json: bool,
    needs_whole_message: bool,
}

/// The top level of a JSON object message: each key with its raw value text, borrowed from the
/// payload. Parsing a message this way allocates (almost) nothing; only the values columns read
/// are parsed further, so the hot path does not build a whole `Value` tree per message.
#[derive(Default)]
struct TopLevel<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// A column's value parsed out of its top-level field.
enum Parsed<'a> {
    /// A JSON string, borrowed from the payload unless it had escapes.
    Text(Cow<'a, str>),
    Value(Value),
}

impl<'a> TopLevel<'a> {
    fn parse(payload: &'a [u8]) -> Result<Self, Poison> {
        serde_json::from_slice(payload).map_err(|error| {
            // A type error means valid JSON that is not an object, unless the text is broken too.
            if error.classify() == serde_json::error::Category::Data
                && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
            {
                Poison::NotAnObject
            } else {
                Poison::NotJson(error.to_string())
            }
        })
    }

    /// The value of the path's first key, parsed (`None` when the key is absent). Later steps
    /// are left to [`ValueSource::lookup`] on the parsed value.
    fn parse_path(&self, steps: &[PathStep]) -> Result<Option<Parsed<'a>>, Poison> {
        let Some(PathStep::Key(first)) = steps.first() else {
            // An index into the top level, which is an object: nothing there.
            return Ok(None);
        };
        // The last of duplicate keys wins, as it does for a parsed `Value`.
        let Some((_, raw)) = self.fields.iter().rev().find(|(key, _)| key == first) else {
            return Ok(None);
        };
        let text = raw.get();
        let parsed = if steps.len() == 1 && text.starts_with('"') {
            serde_json::from_str::<JsonText<'a>>(text).map(|t| Parsed::Text(t.0))
        } else {
            serde_json::from_str::<Value>(text).map(Parsed::Value)
        };
        parsed.map(Some).map_err(|e| Poison::NotJson(e.to_string()))
    }
}

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = TopLevel<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(key) = map.next_key::<JsonText<'de>>()? {
                    fields.push((key.0, map.next_value::<&'de RawValue>()?));
                }
                Ok(TopLevel { fields })
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// A JSON string, borrowed when it has no escapes (serde's own `Cow<str>` always copies).
struct JsonText<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for JsonText<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = JsonText<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                text: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(JsonText(Cow::Borrowed(text)))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(JsonText(Cow::Owned(text.to_string())))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(JsonText(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
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
                    let column = Column {
                        name: spec.name.clone(),
                        ty,
                        source,
                        default,
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
        let needs_json = compiled
            .iter()
            .any(|c| matches!(c.source, ValueSource::Json(_)));
        let needs_whole_message = compiled
            .iter()
            .any(|c| matches!(&c.source, ValueSource::Json(steps) if steps.is_empty()));
        Ok(Self {
            columns: compiled,
            max_message_bytes,
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
        let top_level = if self.needs_json {
            TopLevel::parse(payload)?
        } else {
            TopLevel::default()
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
                let parsed = match &column.source {
                    ValueSource::Json(steps) if !steps.is_empty() => top_level.parse_path(steps)?,
                    _ => None,
                };
                let found = match (&column.source, &parsed) {
                    (ValueSource::Json(steps), _) if steps.is_empty() => {
                        Some(Found::from_json(&whole))
                    }
                    (ValueSource::Json(steps), Some(Parsed::Text(text))) if steps.len() == 1 => {
                        Some(Found::Text(text))
                    }
                    (ValueSource::Json(steps), Some(Parsed::Value(value))) => {
                        ValueSource::lookup(&steps[1..], value).map(Found::from_json)
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

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn write_string(out: &mut Vec<u8>, text: &[u8]) {
    write_varint(out, text.len() as u64);
    out.extend_from_slice(text);
}

fn wrong(column: &Column, expected: &dyn fmt::Display, found: Found<'_>) -> Poison {
    Poison::WrongType {
        column: column.name.clone(),
        expected: expected.to_string(),
        found: found.describe(),
    }
}

fn out_of_range(column: &Column, detail: String) -> Poison {
    Poison::OutOfRange {
        column: column.name.clone(),
        detail,
    }
}

fn encode_value(column: &Column, found: Found<'_>, out: &mut Vec<u8>) -> Result<(), Poison> {
    encode_typed(column, &column.ty, found, out)
}

fn is_null(found: Found<'_>) -> bool {
    matches!(found, Found::Json(Value::Null))
}

fn encode_typed(
    column: &Column,
    ty: &ColumnType,
    found: Found<'_>,
    out: &mut Vec<u8>,
) -> Result<(), Poison> {
    if is_null(found) && !ty.is_nullable() {
        return Err(Poison::Missing {
            column: column.name.clone(),
        });
    }
    match ty {
        ColumnType::Nullable(inner) => {
            if is_null(found) {
                out.push(1);
                Ok(())
            } else {
                out.push(0);
                encode_typed(column, inner, found, out)
            }
        }
        // LowCardinality is a storage detail: RowBinary carries the inner type.
        ColumnType::LowCardinality(inner) => encode_typed(column, inner, found, out),
        ColumnType::String => {
            match found {
                Found::Text(s) => write_string(out, s.as_bytes()),
                Found::Json(other) => write_string(out, other.to_string().as_bytes()),
                Found::Unsigned(_) | Found::TimeNanos(_) => {
                    write_string(out, text_of(found).as_bytes())
                }
            }
            Ok(())
        }
        ColumnType::Bool => {
            let value = match found {
                Found::Json(Value::Bool(b)) => *b,
                Found::Json(Value::Number(n)) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
                    n.as_u64() == Some(1)
                }
                Found::Text(s) if matches!(s, "true" | "false") => s == "true",
                other => return Err(wrong(column, ty, other)),
            };
            out.push(u8::from(value));
            Ok(())
        }
        ColumnType::Int8 => {
            encode_signed(column, ty, found, out, i8::MIN as i64, i8::MAX as i64, 1)
        }
        ColumnType::Int16 => {
            encode_signed(column, ty, found, out, i16::MIN as i64, i16::MAX as i64, 2)
        }
        ColumnType::Int32 => {
            encode_signed(column, ty, found, out, i32::MIN as i64, i32::MAX as i64, 4)
        }
        ColumnType::Int64 => encode_signed(column, ty, found, out, i64::MIN, i64::MAX, 8),
        ColumnType::UInt8 => encode_unsigned(column, ty, found, out, u8::MAX as u64, 1),
        ColumnType::UInt16 => encode_unsigned(column, ty, found, out, u16::MAX as u64, 2),
        ColumnType::UInt32 => encode_unsigned(column, ty, found, out, u32::MAX as u64, 4),
        ColumnType::UInt64 => encode_unsigned(column, ty, found, out, u64::MAX, 8),
        ColumnType::Float32 => {
            let value = float_of(found).ok_or_else(|| wrong(column, ty, found))?;
            if value.is_finite() && value.abs() > f32::MAX as f64 {
                return Err(out_of_range(
                    column,
                    format!("{value} does not fit Float32"),
                ));
            }
            out.extend_from_slice(&(value as f32).to_le_bytes());
            Ok(())
        }
        ColumnType::Float64 => {
            let value = float_of(found).ok_or_else(|| wrong(column, ty, found))?;
            out.extend_from_slice(&value.to_le_bytes());
            Ok(())
        }
        ColumnType::Decimal { precision, scale } => {
            encode_decimal(column, ty, found, out, *precision, *scale)
        }
        ColumnType::Date => {
            let nanos = time_of(column, ty, found)?;
            let days = nanos.div_euclid(86_400 * 1_000_000_000);
            let days = u16::try_from(days).map_err(|_| {
                out_of_range(
                    column,
                    format!(
                        "{} is outside Date's range 1970-01-01..2149-06-06",
                        text_of(found)
                    ),
                )
            })?;
            out.extend_from_slice(&days.to_le_bytes());
            Ok(())
        }
        ColumnType::DateTime { .. } => {
            let nanos = time_of(column, ty, found)?;
            let secs = u32::try_from(nanos.div_euclid(1_000_000_000)).map_err(|_| {
                out_of_range(
                    column,
                    format!("{} is outside DateTime's range 1970..2106", text_of(found)),
                )
            })?;
            out.extend_from_slice(&secs.to_le_bytes());
            Ok(())
        }
        ColumnType::DateTime64 { precision, .. } => {
            let nanos = time_of(column, ty, found)?;
            let ticks = nanos.div_euclid(10_i64.pow(9 - u32::from(*precision)));
            out.extend_from_slice(&ticks.to_le_bytes());
            Ok(())
        }
        ColumnType::Uuid => {
            let text = match found {
                Found::Text(s) => s,
                other => return Err(wrong(column, ty, other)),
            };
            let uuid = uuid::Uuid::parse_str(text).map_err(|_| wrong(column, ty, found))?;
            // RowBinary stores a UUID as two little-endian UInt64 halves, high half first.
            let (high, low) = uuid.as_u64_pair();
            out.extend_from_slice(&high.to_le_bytes());
            out.extend_from_slice(&low.to_le_bytes());
            Ok(())
        }
        ColumnType::Array(inner) => {
            let Found::Json(Value::Array(items)) = found else {
                return Err(wrong(column, ty, found));
            };
            write_varint(out, items.len() as u64);
            items
                .iter()
                .try_for_each(|item| encode_typed(column, inner, Found::from_json(item), out))
        }
        ColumnType::Map(inner) => {
            let Found::Json(Value::Object(entries)) = found else {
                return Err(wrong(column, ty, found));
            };
            write_varint(out, entries.len() as u64);
            entries.iter().try_for_each(|(key, value)| {
                write_string(out, key.as_bytes());
                encode_typed(column, inner, Found::from_json(value), out)
            })
        }
    }
}

/// Integers come as JSON integers, or as text holding one (producers often quote large numbers).
fn integer_of(found: Found<'_>) -> Option<i128> {
    match found {
        Found::Json(Value::Number(n)) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 1e38)
                    .map(|f| f as i128)
            }),
        Found::Json(Value::Bool(b)) => Some(i128::from(*b)),
        Found::Text(s) => s.trim().parse().ok(),
        Found::Unsigned(n) => Some(i128::from(n)),
        Found::TimeNanos(n) => Some(i128::from(n)),
        Found::Json(_) => None,
    }
}

fn encode_signed(
    column: &Column,
    ty: &ColumnType,
    found: Found<'_>,
    out: &mut Vec<u8>,
    min: i64,
    max: i64,
    width: usize,
) -> Result<(), Poison> {
    let value = integer_of(found).ok_or_else(|| wrong(column, ty, found))?;
    if value < i128::from(min) || value > i128::from(max) {
        return Err(out_of_range(column, format!("{value} does not fit {ty}")));
    }
    out.extend_from_slice(&(value as i64).to_le_bytes()[..width]);
    Ok(())
}

fn encode_unsigned(
    column: &Column,
    ty: &ColumnType,
    found: Found<'_>,
    out: &mut Vec<u8>,
    max: u64,
    width: usize,
) -> Result<(), Poison> {
    let value = integer_of(found).ok_or_else(|| wrong(column, ty, found))?;
    if value < 0 || value > i128::from(max) {
        return Err(out_of_range(column, format!("{value} does not fit {ty}")));
    }
    out.extend_from_slice(&(value as u64).to_le_bytes()[..width]);
    Ok(())
}

fn float_of(found: Found<'_>) -> Option<f64> {
    match found {
        Found::Json(Value::Number(n)) => n.as_f64(),
        Found::Text(s) => s.trim().parse().ok(),
        Found::Unsigned(n) => Some(n as f64),
        _ => None,
    }
}

/// Decimal text (`-12.3400`) to an integer scaled by 10^scale; digits beyond the scale are cut off,
/// as ClickHouse does when it parses decimal text.
fn encode_decimal(
    column: &Column,
    ty: &ColumnType,
    found: Found<'_>,
    out: &mut Vec<u8>,
    precision: u8,
    scale: u8,
) -> Result<(), Poison> {
    let text = match found {
        Found::Json(Value::Number(n)) => n.to_string(),
        Found::Text(s) => s.trim().to_string(),
        Found::Unsigned(n) => n.to_string(),
        other => return Err(wrong(column, ty, other)),
    };
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(&text)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let valid = !whole.is_empty() || !fraction.is_empty();
    if !valid
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(wrong(column, ty, found));
    }
    let whole = whole.trim_start_matches('0');
    if whole.len() > usize::from(precision - scale) {
        return Err(out_of_range(
            column,
            format!(
                "{text} has more than {} integer digits for {ty}",
                precision - scale
            ),
        ));
    }
    let mut scaled: i128 = 0;
    let fraction_digits = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(usize::from(scale));
    for digit in whole.bytes().chain(fraction_digits) {
        scaled = scaled * 10 + i128::from(digit - b'0');
    }
    if negative {
        scaled = -scaled;
    }
    match precision {
        1..=9 => out.extend_from_slice(&(scaled as i32).to_le_bytes()),
        10..=18 => out.extend_from_slice(&(scaled as i64).to_le_bytes()),
        _ => out.extend_from_slice(&scaled.to_le_bytes()),
    }
    Ok(())
}

/// Times come as RFC 3339 text, `YYYY-MM-DD[ HH:MM:SS[.f]]` text (UTC), or epoch numbers whose unit
/// is told by magnitude: seconds below 1e11, milliseconds below 1e14, microseconds below 1e17,
/// nanoseconds above.
fn time_of(column: &Column, ty: &ColumnType, found: Found<'_>) -> Result<i64, Poison> {
    let nanos = match found {
        Found::TimeNanos(n) => Some(n),
        Found::Json(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                epoch_to_nanos(i as f64, Some(i))
            } else {
                n.as_f64().and_then(|f| epoch_to_nanos(f, None))
            }
        }
        Found::Unsigned(n) => i64::try_from(n)
            .ok()
            .and_then(|i| epoch_to_nanos(i as f64, Some(i))),
        Found::Text(s) => parse_time_text(s.trim()),
        Found::Json(_) => None,
    };
    nanos.ok_or_else(|| wrong(column, ty, found))
}

fn epoch_to_nanos(value: f64, exact: Option<i64>) -> Option<i64> {
    let magnitude = value.abs();
    let nanos_per_unit: i64 = if magnitude < 1e11 {
        1_000_000_000
    } else if magnitude < 1e14 {
        1_000_000
    } else if magnitude < 1e17 {
        1_000
    } else {
        1
    };
    match exact {
        Some(i) => i.checked_mul(nanos_per_unit),
        None => {
            let nanos = value * nanos_per_unit as f64;
            (nanos.abs() < 9.2e18).then(|| nanos.round() as i64)
        }
    }
}

fn parse_time_text(text: &str) -> Option<i64> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return time.timestamp_nanos_opt();
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(time) = NaiveDateTime::parse_from_str(text, format) {
            return time.and_utc().timestamp_nanos_opt();
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .and_then(|time| time.and_utc().timestamp_nanos_opt())
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

        // Broken JSON is not_json even when it starts like an array or an object.
        for broken in [&b"[1, 2"[..], br#"{"d": "#, br#"{"d": 1} x"#] {
            let poison = encoder.encode(broken, &meta(), &mut out).unwrap_err();
            let text = String::from_utf8_lossy(broken);
            assert_eq!(poison.label(), "not_json", "{text}");
        }
        let poison = encoder.encode(br#""text""#, &meta(), &mut out).unwrap_err();
        assert_eq!(poison.label(), "not_object");
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
