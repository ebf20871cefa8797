//! Encoding a found value as its column's RowBinary bytes: integers, floats, strings, UUIDs,
//! and the composites (`Nullable`, `Array`, `Map`) around them.

use std::fmt;

use serde_json::Value;

use super::decimal::encode_decimal;
use super::time::time_of;
use super::{Column, Found, Poison, text_of};
use crate::column_type::ColumnType;

fn write_varint(out: &mut Vec<u8>, value: u64) {
    // Most lengths fit one byte.
    if value < 0x80 {
        out.push(value as u8);
        return;
    }
    let (bytes, len) = varint(value);
    out.extend_from_slice(&bytes[..len]);
}

/// LEB128, as RowBinary prefixes lengths: the bytes and how many of them are used.
fn varint(mut value: u64) -> ([u8; 10], usize) {
    let mut bytes = [0; 10];
    let mut len = 0;
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes[len] = byte;
            return (bytes, len + 1);
        }
        bytes[len] = byte | 0x80;
        len += 1;
    }
}

pub(super) fn write_string(out: &mut Vec<u8>, text: &[u8]) {
    write_varint(out, text.len() as u64);
    out.extend_from_slice(text);
}

/// Writes the text of a JSON object or array, as the message spelled it, as a RowBinary string,
/// without the whitespace between its tokens (so a payload reads the same whatever its
/// producer's formatting).
pub(super) fn write_compact_json_string(out: &mut Vec<u8>, raw: &str) {
    // Compact already: written as it is, its length known, no prefix to put in front after.
    if is_compact(raw) {
        write_string(out, raw.as_bytes());
        return;
    }
    let start = out.len();
    remove_whitespace(raw, out);
    let (prefix, len) = varint((out.len() - start) as u64);
    out.splice(start..start, prefix[..len].iter().copied());
}

/// Whether `raw` has no whitespace byte at all, as most producers write JSON: then nothing is
/// to be taken out of it.
fn is_compact(raw: &str) -> bool {
    !raw.bytes()
        .any(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
}

/// `raw`, valid JSON, without the whitespace outside its strings (the Redis cache's copy of
/// what [`write_compact_json_string`] stores).
pub(super) fn compact_json(raw: &str) -> String {
    if is_compact(raw) {
        return raw.to_owned();
    }
    let mut compact = String::with_capacity(raw.len());
    for_each_token_run(raw, |run| compact.push_str(run));
    compact
}

/// Appends `raw`, valid JSON, to `out`, leaving out the whitespace outside its strings.
fn remove_whitespace(raw: &str, out: &mut Vec<u8>) {
    for_each_token_run(raw, |run| out.extend_from_slice(run.as_bytes()));
}

/// Hands `raw`, valid JSON, to `emit` in runs between the whitespace outside its strings. Each
/// run ends at an ASCII byte, so it is still a `str`: no UTF-8 to check again.
fn for_each_token_run<'a>(raw: &'a str, mut emit: impl FnMut(&'a str)) {
    let bytes = raw.as_bytes();
    let (mut in_string, mut escaped) = (false, false);
    let mut run_start = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if byte == b'"' {
            in_string = true;
        } else if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            emit(&raw[run_start..at]);
            run_start = at + 1;
        }
    }
    emit(&raw[run_start..]);
}

/// Writes a JSON value's compact text as a RowBinary string. The text is serialized straight
/// into `out` and its length prefix put in front afterwards, sparing a `String` per value.
fn write_json_string(out: &mut Vec<u8>, value: &Value) {
    let start = out.len();
    if serde_json::to_writer(&mut *out, value).is_err() {
        // Serializing a `Value` into memory does not fail; should it ever, the slow way.
        out.truncate(start);
        write_string(out, value.to_string().as_bytes());
        return;
    }
    let (prefix, len) = varint((out.len() - start) as u64);
    out.splice(start..start, prefix[..len].iter().copied());
}

pub(super) fn wrong(column: &Column, expected: &dyn fmt::Display, found: Found<'_>) -> Poison {
    Poison::WrongType {
        column: column.name.clone(),
        expected: expected.to_string(),
        found: found.describe(),
    }
}

pub(super) fn out_of_range(column: &Column, detail: String) -> Poison {
    Poison::OutOfRange {
        column: column.name.clone(),
        detail,
    }
}

pub(super) fn encode_value(
    column: &Column,
    found: Found<'_>,
    out: &mut Vec<u8>,
) -> Result<(), Poison> {
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
                Found::Json(other) => write_json_string(out, other),
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

/// Floats come as JSON numbers (read from their text, see `reads_number_text`) or as text holding
/// one; beyond `f64`'s range they are infinite, as ClickHouse reads them.
fn float_of(found: Found<'_>) -> Option<f64> {
    match found {
        Found::Json(Value::Number(n)) => n.as_f64(),
        Found::Text(s) => s.trim().parse().ok(),
        Found::Unsigned(n) => Some(n as f64),
        _ => None,
    }
}
