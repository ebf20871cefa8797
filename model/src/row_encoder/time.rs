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
    if let Some(nanos) = rfc3339_nanos(text) {
        return Some(nanos);
    }
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

/// The common RFC 3339 time, `2026-01-01T00:00:00.123Z` or with an offset `+02:00`, read without
/// chrono's general parser: most signals carry one, in every message. `None` for anything else
/// (a leap second, more than nine fraction digits, an invalid date), which chrono then reads.
fn rfc3339_nanos(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        bytes.get(range)?.iter().try_fold(0, |value, &byte| {
            byte.is_ascii_digit()
                .then(|| value * 10 + i64::from(byte - b'0'))
        })
    };
    let separators = (
        bytes.get(4),
        bytes.get(7),
        bytes.get(10),
        bytes.get(13),
        bytes.get(16),
    );
    if !matches!(
        separators,
        (
            Some(b'-'),
            Some(b'-'),
            Some(b'T' | b't' | b' '),
            Some(b':'),
            Some(b':')
        )
    ) {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if !(1..=month_days).contains(&day) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut at = 19;
    let mut fraction_nanos = 0;
    if bytes.get(at) == Some(&b'.') {
        let digits = bytes[at + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if !(1..=9).contains(&digits) {
            return None;
        }
        fraction_nanos = number(at + 1..at + 1 + digits)? * 10_i64.pow(9 - digits as u32);
        at += 1 + digits;
    }
    let offset_seconds = match bytes.get(at..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (hours, minutes) = (number(at + 1..at + 3)?, number(at + 4..at + 6)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let seconds = hours * 3600 + minutes * 60;
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a proleptic Gregorian date, counted in 400-year eras from March.
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    seconds
        .checked_mul(1_000_000_000)?
        .checked_add(fraction_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_rfc3339_times_are_read_as_chrono_reads_them() {
        let chrono = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .ok()
                .and_then(|time| time.timestamp_nanos_opt())
        };
        let mut read = 0;
        let mut texts = Vec::new();
        for year in [
            1, 1600, 1900, 1969, 1970, 2000, 2024, 2026, 2100, 2262, 2263, 9999,
        ] {
            for (month, day) in [
                (1, 1),
                (2, 28),
                (2, 29),
                (2, 30),
                (3, 1),
                (4, 31),
                (12, 31),
                (13, 1),
                (0, 5),
                (6, 0),
            ] {
                for time in [
                    "00:00:00",
                    "23:59:59",
                    "12:34:56.7",
                    "01:02:03.123456789",
                    "01:02:03.1234567891",
                    "24:00:00",
                    "10:60:00",
                    "23:59:60",
                    "1:02:03",
                ] {
                    for zone in [
                        "Z", "z", "+00:00", "-05:30", "+23:59", "+24:00", "+0100", "",
                    ] {
                        for separator in ['T', 't', ' '] {
                            texts.push(format!(
                                "{year:04}-{month:02}-{day:02}{separator}{time}{zone}"
                            ));
                        }
                    }
                }
            }
        }
        texts.extend(
            [
                "2026-01-01T00:00:00.Z",
                "2026-01-01X00:00:00Z",
                "2026-1-01T00:00:00Z",
                "２026-01-01T00:00:00Z",
                "2026-01-01T00:00:00Z ",
            ]
            .map(String::from),
        );
        for text in &texts {
            let expected = chrono(text);
            match rfc3339_nanos(text) {
                Some(nanos) => {
                    read += 1;
                    assert_eq!(Some(nanos), expected, "{text}");
                }
                // Left to chrono: a leap second, too many digits, or not RFC 3339 at all.
                None => assert!(
                    expected.is_none() || text.contains(":60") || text.contains(".1234567891"),
                    "{text} is RFC 3339 ({expected:?}) and was left to chrono"
                ),
            }
        }
        assert!(read > 1000, "only {read} read");
    }
}
