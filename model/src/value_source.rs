//! Where a column's value comes from: the `from` of a column, parsed.
//!
//! `$.a.b[0]` is a path into the JSON message (`$` alone is the whole message); `@subject`,
//! `@sequence`, `@timestamp` and `@header:Name` are message metadata.

use std::fmt;

/// One step of a JSON path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// The parsed `from` of a column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueSource {
    /// A path into the message; empty means the whole message.
    Json(Vec<PathStep>),
    /// The subject the message was published on.
    Subject,
    /// The message's stream sequence.
    Sequence,
    /// The time the stream stored the message.
    Timestamp,
    /// A NATS header, by name.
    Header(String),
}

impl ValueSource {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "@subject" => return Ok(Self::Subject),
            "@sequence" => return Ok(Self::Sequence),
            "@timestamp" => return Ok(Self::Timestamp),
            _ => {}
        }
        if let Some(name) = text.strip_prefix("@header:") {
            if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ':') {
                return Err(format!("invalid header name in `{text}`"));
            }
            return Ok(Self::Header(name.to_string()));
        }
        if text.starts_with('@') {
            return Err(format!(
                "unknown metadata `{text}` (use @subject, @sequence, @timestamp or @header:Name)"
            ));
        }
        let Some(mut rest) = text.strip_prefix('$') else {
            return Err(format!(
                "`{text}` is neither a JSON path (`$.field`) nor metadata (`@subject`)"
            ));
        };
        let mut steps = Vec::new();
        while !rest.is_empty() {
            if let Some(after_dot) = rest.strip_prefix('.') {
                let len = after_dot.find(['.', '[']).unwrap_or(after_dot.len());
                if len == 0 {
                    return Err(format!("empty field name in `{text}`"));
                }
                steps.push(PathStep::Key(after_dot[..len].to_string()));
                rest = &after_dot[len..];
            } else if let Some(after_bracket) = rest.strip_prefix('[') {
                let end = after_bracket
                    .find(']')
                    .ok_or_else(|| format!("missing `]` in `{text}`"))?;
                let inside = &after_bracket[..end];
                let step = if let Some(quoted) = inside
                    .strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .or_else(|| inside.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                {
                    PathStep::Key(quoted.to_string())
                } else {
                    PathStep::Index(inside.parse().map_err(|_| {
                        format!("`[{inside}]` in `{text}` is neither an index nor a quoted key")
                    })?)
                };
                steps.push(step);
                rest = &after_bracket[end + 1..];
            } else {
                return Err(format!(
                    "unexpected `{rest}` in `{text}`: expected `.field` or `[index]`"
                ));
            }
        }
        Ok(Self::Json(steps))
    }

    /// Follows a JSON path into a message; `None` when any step is missing.
    pub fn lookup<'a>(
        steps: &[PathStep],
        message: &'a serde_json::Value,
    ) -> Option<&'a serde_json::Value> {
        steps.iter().try_fold(message, |value, step| match step {
            PathStep::Key(key) => value.get(key.as_str()),
            PathStep::Index(index) => value.get(*index),
        })
    }
}

impl fmt::Display for ValueSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueSource::Subject => f.write_str("@subject"),
            ValueSource::Sequence => f.write_str("@sequence"),
            ValueSource::Timestamp => f.write_str("@timestamp"),
            ValueSource::Header(name) => write!(f, "@header:{name}"),
            ValueSource::Json(steps) => {
                f.write_str("$")?;
                for step in steps {
                    match step {
                        PathStep::Key(key) if key.contains(['.', '[', ']']) => {
                            write!(f, "['{key}']")?
                        }
                        PathStep::Key(key) => write!(f, ".{key}")?,
                        PathStep::Index(index) => write!(f, "[{index}]")?,
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_metadata() {
        assert_eq!(ValueSource::parse("$").unwrap(), ValueSource::Json(vec![]));
        assert_eq!(
            ValueSource::parse("$.a.b[2]['x.y']").unwrap(),
            ValueSource::Json(vec![
                PathStep::Key("a".into()),
                PathStep::Key("b".into()),
                PathStep::Index(2),
                PathStep::Key("x.y".into())
            ])
        );
        assert_eq!(
            ValueSource::parse("@header:Nats-Msg-Id").unwrap(),
            ValueSource::Header("Nats-Msg-Id".into())
        );
        assert_eq!(ValueSource::parse("$.a[0]").unwrap().to_string(), "$.a[0]");
        assert!(
            ValueSource::parse("a.b")
                .unwrap_err()
                .contains("neither a JSON path")
        );
        assert!(
            ValueSource::parse("@time")
                .unwrap_err()
                .contains("unknown metadata")
        );
        assert!(
            ValueSource::parse("$..a")
                .unwrap_err()
                .contains("empty field name")
        );
        assert!(
            ValueSource::parse("$[x]")
                .unwrap_err()
                .contains("neither an index")
        );
    }

    #[test]
    fn looks_up_nested_values() {
        let message = serde_json::json!({"a": {"b": [10, {"c": true}]}});
        let ValueSource::Json(steps) = ValueSource::parse("$.a.b[1].c").unwrap() else {
            panic!()
        };
        assert_eq!(
            ValueSource::lookup(&steps, &message),
            Some(&serde_json::json!(true))
        );
        let ValueSource::Json(missing) = ValueSource::parse("$.a.z").unwrap() else {
            panic!()
        };
        assert_eq!(ValueSource::lookup(&missing, &message), None);
    }
}
