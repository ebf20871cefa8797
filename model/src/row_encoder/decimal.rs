//! Decimals from the number's text, never through `f64`: a `Decimal(38, 18)` keeps every digit.

use serde_json::Value;

use super::values::{out_of_range, wrong};
use super::{Column, Found, Poison};
use crate::column_type::ColumnType;

/// Decimal text (`-12.3400`) to an integer scaled by 10^scale; digits beyond the scale are cut off,
/// as ClickHouse does when it parses decimal text.
pub(super) fn encode_decimal(
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
