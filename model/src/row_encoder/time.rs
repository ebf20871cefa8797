//! Dates and times: RFC 3339 or plain date-time text, or epoch numbers of any unit.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use serde_json::Value;

use super::values::wrong;
use super::{Column, Found, Poison};
use crate::column_type::ColumnType;

/// Times come as RFC 3339 text, `YYYY-MM-DD[ HH:MM:SS[.f]]` text (UTC), or epoch numbers whose unit
/// is told by magnitude: seconds below 1e11, milliseconds below 1e14, microseconds below 1e17,
/// nanoseconds above.
pub(super) fn time_of(column: &Column, ty: &ColumnType, found: Found<'_>) -> Result<i64, Poison> {
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
