//! Scanning a JSON message: its top level as raw values borrowed from the payload, and the value
//! a column's path leads to, parsed only when a column reads it.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::Poison;
use crate::value_source::PathStep;

/// The top level of a JSON object message: each key with its raw value text, borrowed from the
/// payload. Parsing a message this way allocates (almost) nothing; only the values columns read
/// are parsed further, so the hot path does not build a whole `Value` tree per message.
#[derive(Default)]
pub(super) struct TopLevel<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// A column's value parsed out of its top-level field.
pub(super) enum Parsed<'a> {
    /// A JSON string, borrowed from the payload unless it had escapes.
    Text(Cow<'a, str>),
    Value(Value),
}

impl<'a> TopLevel<'a> {
    pub(super) fn parse(payload: &'a [u8]) -> Result<Self, Poison> {
        // UTF-8 is checked once for the whole message: parsed from a `str`, serde_json does not
        // check each string and each raw value again.
        let text = std::str::from_utf8(payload).map_err(|e| Poison::NotJson(e.to_string()))?;
        serde_json::from_str(text).map_err(|error| {
            // A type error means valid JSON that is not an object, unless the text is broken too.
            if error.classify() == serde_json::error::Category::Data
                && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
            {
                Poison::NotAnObject
            } else {
                Poison::NotJson(error.to_string())
            }
        })
    }

    /// The value the path leads to, parsed (`None` when the path leads nowhere). Only that
    /// value is parsed: the objects and arrays on the way are walked as raw text.
    pub(super) fn parse_path(&self, steps: &[PathStep]) -> Result<Option<Parsed<'a>>, Poison> {
        let Some(raw) = self.raw_at(steps) else {
            return Ok(None);
        };
        let text = raw.get();
        let parsed = if text.starts_with('"') {
            serde_json::from_str::<JsonText<'a>>(text).map(|t| Parsed::Text(t.0))
        } else {
            serde_json::from_str::<Value>(text).map(Parsed::Value)
        };
        parsed.map(Some).map_err(|e| Poison::NotJson(e.to_string()))
    }

    /// The text of the number the path leads to, as the payload spells it (`None` when the path
    /// leads nowhere or to something other than a number). Decimals are encoded from it, so no
    /// digit is lost to `f64`.
    pub(super) fn number_text(&self, steps: &[PathStep]) -> Option<&'a str> {
        let text = self.raw_at(steps)?.get().trim();
        text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
            .then_some(text)
    }

    /// The raw value the path leads to. The last of duplicate keys wins, as it does for a
    /// parsed `Value`; a key into an array or an index into an object leads nowhere.
    fn raw_at(&self, steps: &[PathStep]) -> Option<&'a RawValue> {
        let Some(PathStep::Key(first)) = steps.first() else {
            // An index into the top level, which is an object: nothing there.
            return None;
        };
        let mut raw: &'a RawValue = self.fields.iter().rev().find(|(key, _)| key == first)?.1;
        for step in &steps[1..] {
            raw = match step {
                PathStep::Key(key) => {
                    let object: TopLevel<'a> = serde_json::from_str(raw.get()).ok()?;
                    object.fields.iter().rev().find(|(k, _)| k == key)?.1
                }
                PathStep::Index(index) => {
                    let items: Vec<&'a RawValue> = serde_json::from_str(raw.get()).ok()?;
                    *items.get(*index)?
                }
            };
        }
        Some(raw)
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
