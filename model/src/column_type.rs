//! ClickHouse column types: parsing the `type` text of a column, printing it back for DDL, and the
//! oldest server release that understands each type.

use std::fmt;

use crate::server_version::ServerVersion;

/// A ClickHouse column type the worker can encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnType {
    String,
    Bool,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Float32,
    Float64,
    /// Decimal(P, S) with 1 <= P <= 38 and 0 <= S <= P.
    Decimal {
        precision: u8,
        scale: u8,
    },
    Date,
    /// DateTime with an optional time zone, e.g. `DateTime('UTC')`.
    DateTime {
        timezone: Option<String>,
    },
    /// DateTime64(p) with 0 <= p <= 9 and an optional time zone.
    DateTime64 {
        precision: u8,
        timezone: Option<String>,
    },
    Uuid,
    Nullable(Box<ColumnType>),
    LowCardinality(Box<ColumnType>),
    Array(Box<ColumnType>),
    /// Map(String, T).
    Map(Box<ColumnType>),
}

/// Why a type text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid column type `{text}`: {reason}")]
pub struct TypeError {
    pub text: String,
    pub reason: String,
}

impl ColumnType {
    /// Parses a ClickHouse type name such as `Nullable(DateTime64(3, 'UTC'))`.
    pub fn parse(text: &str) -> Result<Self, TypeError> {
        let fail = |reason: String| TypeError {
            text: text.to_string(),
            reason,
        };
        let mut parser = Parser { rest: text.trim() };
        let parsed = parser.parse_type().map_err(fail)?;
        if !parser.rest.trim().is_empty() {
            return Err(fail(format!("unexpected `{}`", parser.rest.trim())));
        }
        parsed.check_nesting().map_err(fail)?;
        Ok(parsed)
    }

    /// Rules ClickHouse itself applies to nesting (and that would otherwise fail only at CREATE TABLE).
    fn check_nesting(&self) -> Result<(), String> {
        match self {
            ColumnType::Nullable(inner) => match inner.as_ref() {
                ColumnType::Nullable(_)
                | ColumnType::Array(_)
                | ColumnType::Map(_)
                | ColumnType::LowCardinality(_) => Err(format!("Nullable cannot wrap {inner}")),
                other => other.check_nesting(),
            },
            ColumnType::LowCardinality(inner) => {
                let base = match inner.as_ref() {
                    ColumnType::Nullable(base) => base.as_ref(),
                    base => base,
                };
                match base {
                    ColumnType::String
                    | ColumnType::Date
                    | ColumnType::DateTime { .. }
                    | ColumnType::Int8
                    | ColumnType::Int16
                    | ColumnType::Int32
                    | ColumnType::Int64
                    | ColumnType::UInt8
                    | ColumnType::UInt16
                    | ColumnType::UInt32
                    | ColumnType::UInt64
                    | ColumnType::Float32
                    | ColumnType::Float64 => Ok(()),
                    other => Err(format!("LowCardinality cannot wrap {other}")),
                }
            }
            ColumnType::Array(inner) | ColumnType::Map(inner) => inner.check_nesting(),
            _ => Ok(()),
        }
    }

    /// True when a missing value may be stored as NULL.
    pub fn is_nullable(&self) -> bool {
        match self {
            ColumnType::Nullable(_) => true,
            ColumnType::LowCardinality(inner) => inner.is_nullable(),
            _ => false,
        }
    }

    /// The oldest ClickHouse release that accepts this type, and the feature's name, when it is
    /// newer than the oldest server we support (18.16).
    pub fn minimum_server(&self) -> Option<(ServerVersion, &'static str)> {
        let own = match self {
            ColumnType::Bool => Some((ServerVersion::new(21, 12), "Bool")),
            ColumnType::DateTime64 { .. } => Some((ServerVersion::new(20, 1), "DateTime64")),
            ColumnType::Map(_) => Some((ServerVersion::new(21, 8), "Map")),
            ColumnType::LowCardinality(_) => Some((ServerVersion::new(19, 0), "LowCardinality")),
            _ => None,
        };
        let nested = match self {
            ColumnType::Nullable(inner)
            | ColumnType::LowCardinality(inner)
            | ColumnType::Array(inner)
            | ColumnType::Map(inner) => inner.minimum_server(),
            _ => None,
        };
        match (own, nested) {
            (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tz = |tz: &Option<String>| tz.as_ref().map(|z| format!("'{}'", z.replace('\'', "\\'")));
        match self {
            ColumnType::String => f.write_str("String"),
            ColumnType::Bool => f.write_str("Bool"),
            ColumnType::Int8 => f.write_str("Int8"),
            ColumnType::Int16 => f.write_str("Int16"),
            ColumnType::Int32 => f.write_str("Int32"),
            ColumnType::Int64 => f.write_str("Int64"),
            ColumnType::UInt8 => f.write_str("UInt8"),
            ColumnType::UInt16 => f.write_str("UInt16"),
            ColumnType::UInt32 => f.write_str("UInt32"),
            ColumnType::UInt64 => f.write_str("UInt64"),
            ColumnType::Float32 => f.write_str("Float32"),
            ColumnType::Float64 => f.write_str("Float64"),
            ColumnType::Decimal { precision, scale } => write!(f, "Decimal({precision}, {scale})"),
            ColumnType::Date => f.write_str("Date"),
            ColumnType::DateTime { timezone } => match tz(timezone) {
                Some(z) => write!(f, "DateTime({z})"),
                None => f.write_str("DateTime"),
            },
            ColumnType::DateTime64 {
                precision,
                timezone,
            } => match tz(timezone) {
                Some(z) => write!(f, "DateTime64({precision}, {z})"),
                None => write!(f, "DateTime64({precision})"),
            },
            ColumnType::Uuid => f.write_str("UUID"),
            ColumnType::Nullable(inner) => write!(f, "Nullable({inner})"),
            ColumnType::LowCardinality(inner) => write!(f, "LowCardinality({inner})"),
            ColumnType::Array(inner) => write!(f, "Array({inner})"),
            ColumnType::Map(inner) => write!(f, "Map(String, {inner})"),
        }
    }
}

/// A small recursive-descent parser over the type text.
struct Parser<'a> {
    rest: &'a str,
}

impl<'a> Parser<'a> {
    fn skip_space(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn ident(&mut self) -> &'a str {
        self.skip_space();
        let len = self
            .rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let (ident, rest) = self.rest.split_at(len);
        self.rest = rest;
        ident
    }

    fn eat(&mut self, token: char) -> bool {
        self.skip_space();
        if let Some(rest) = self.rest.strip_prefix(token) {
            self.rest = rest;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: char) -> Result<(), String> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(format!("expected `{token}`"))
        }
    }

    fn number(&mut self) -> Result<u8, String> {
        self.skip_space();
        let len = self.rest.bytes().take_while(u8::is_ascii_digit).count();
        let (digits, rest) = self.rest.split_at(len);
        self.rest = rest;
        digits
            .parse()
            .map_err(|_| "expected a small number".to_string())
    }

    fn quoted(&mut self) -> Result<String, String> {
        self.skip_space();
        let body = self
            .rest
            .strip_prefix('\'')
            .ok_or("expected a quoted time zone")?;
        let end = body.find('\'').ok_or("unterminated quote")?;
        let zone = body[..end].to_string();
        self.rest = &body[end + 1..];
        Ok(zone)
    }

    fn optional_timezone(&mut self) -> Result<Option<String>, String> {
        Ok(if self.rest.trim_start().starts_with('\'') {
            Some(self.quoted()?)
        } else {
            None
        })
    }

    fn parse_type(&mut self) -> Result<ColumnType, String> {
        let name = self.ident();
        let simple = match name {
            "String" => Some(ColumnType::String),
            "Bool" | "Boolean" => Some(ColumnType::Bool),
            "Int8" => Some(ColumnType::Int8),
            "Int16" => Some(ColumnType::Int16),
            "Int32" => Some(ColumnType::Int32),
            "Int64" => Some(ColumnType::Int64),
            "UInt8" => Some(ColumnType::UInt8),
            "UInt16" => Some(ColumnType::UInt16),
            "UInt32" => Some(ColumnType::UInt32),
            "UInt64" => Some(ColumnType::UInt64),
            "Float32" => Some(ColumnType::Float32),
            "Float64" => Some(ColumnType::Float64),
            "Date" => Some(ColumnType::Date),
            "UUID" => Some(ColumnType::Uuid),
            _ => None,
        };
        if let Some(simple) = simple {
            return Ok(simple);
        }
        match name {
            "DateTime" => {
                let timezone = if self.eat('(') {
                    let zone = self.quoted()?;
                    self.expect(')')?;
                    Some(zone)
                } else {
                    None
                };
                Ok(ColumnType::DateTime { timezone })
            }
            "DateTime64" => {
                self.expect('(')?;
                let precision = self.number()?;
                if precision > 9 {
                    return Err(format!("DateTime64 precision {precision} is above 9"));
                }
                let timezone = if self.eat(',') {
                    self.optional_timezone()?
                } else {
                    None
                };
                self.expect(')')?;
                Ok(ColumnType::DateTime64 {
                    precision,
                    timezone,
                })
            }
            "Decimal" => {
                self.expect('(')?;
                let precision = self.number()?;
                self.expect(',')?;
                let scale = self.number()?;
                self.expect(')')?;
                if !(1..=38).contains(&precision) {
                    return Err(format!("Decimal precision {precision} is outside 1..=38"));
                }
                if scale > precision {
                    return Err(format!(
                        "Decimal scale {scale} is larger than its precision {precision}"
                    ));
                }
                Ok(ColumnType::Decimal { precision, scale })
            }
            "Nullable" | "LowCardinality" | "Array" => {
                self.expect('(')?;
                let inner = Box::new(self.parse_type()?);
                self.expect(')')?;
                Ok(match name {
                    "Nullable" => ColumnType::Nullable(inner),
                    "LowCardinality" => ColumnType::LowCardinality(inner),
                    _ => ColumnType::Array(inner),
                })
            }
            "Map" => {
                self.expect('(')?;
                let key = self.parse_type()?;
                if key != ColumnType::String {
                    return Err(format!("Map keys must be String, not {key}"));
                }
                self.expect(',')?;
                let value = Box::new(self.parse_type()?);
                self.expect(')')?;
                Ok(ColumnType::Map(value))
            }
            "" => Err("expected a type name".to_string()),
            other => Err(format!(
                "unknown type `{other}` (supported: String, Bool, Int8..Int64, UInt8..UInt64, Float32, Float64, \
                 Decimal(P,S), Date, DateTime, DateTime64(p), UUID, Nullable, LowCardinality, Array, Map)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_supported_type() {
        for text in [
            "String",
            "Bool",
            "Int8",
            "UInt64",
            "Float32",
            "Decimal(18, 4)",
            "Date",
            "DateTime",
            "DateTime('UTC')",
            "DateTime64(3)",
            "DateTime64(6, 'Europe/Paris')",
            "UUID",
            "Nullable(Int32)",
            "LowCardinality(String)",
            "LowCardinality(Nullable(String))",
            "Array(Nullable(Float64))",
            "Map(String, UInt32)",
            "Array(Array(String))",
        ] {
            let parsed = ColumnType::parse(text).unwrap();
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!(
            ColumnType::parse(" Decimal( 9 ,2 ) ").unwrap().to_string(),
            "Decimal(9, 2)"
        );
    }

    #[test]
    fn refuses_bad_types_with_the_reason() {
        let err = |t: &str| ColumnType::parse(t).unwrap_err().to_string();
        assert!(err("Strin").contains("unknown type `Strin`"));
        assert!(err("DateTime64(12)").contains("above 9"));
        assert!(err("Decimal(4, 6)").contains("larger than its precision"));
        assert!(err("Nullable(Array(String))").contains("Nullable cannot wrap Array(String)"));
        assert!(err("LowCardinality(UUID)").contains("LowCardinality cannot wrap UUID"));
        assert!(err("Map(UInt8, String)").contains("Map keys must be String"));
        assert!(err("Array(String").contains("expected `)`"));
        assert!(err("String extra").contains("unexpected `extra`"));
    }

    #[test]
    fn knows_the_oldest_server_for_each_type() {
        let min = |t: &str| ColumnType::parse(t).unwrap().minimum_server();
        assert_eq!(min("String"), None);
        assert_eq!(
            min("Array(DateTime64(3))"),
            Some((ServerVersion::new(20, 1), "DateTime64"))
        );
        assert_eq!(
            min("Map(String, Bool)"),
            Some((ServerVersion::new(21, 12), "Bool"))
        );
    }
}
