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
    /// Each key and its value's raw JSON text.
    fields: Vec<(Cow<'a, str>, &'a str)>,
    /// Read by [`scan`]: no string anywhere in the message has an escape.
    escape_free: bool,
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
        if let Some(top_level) = scan::object(text) {
            return Ok(top_level);
        }
        // Escapes, broken JSON or not an object: serde_json decides, and names what is wrong.
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

    /// A raw value of this message ([`Self::raw_at`]), parsed.
    pub(super) fn parse_raw(&self, text: &'a str) -> Result<Parsed<'a>, Poison> {
        if self.escape_free
            && let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'))
        {
            return Ok(Parsed::Text(Cow::Borrowed(inner)));
        }
        if let Some(plain) = plain_string(text) {
            return Ok(Parsed::Text(Cow::Borrowed(plain)));
        }
        if let Some(number) = plain_integer(text) {
            return Ok(Parsed::Value(Value::Number(number)));
        }
        let parsed = if text.starts_with('"') {
            serde_json::from_str::<JsonText<'a>>(text).map(|t| Parsed::Text(t.0))
        } else {
            serde_json::from_str::<Value>(text).map(Parsed::Value)
        };
        parsed.map_err(|e| Poison::NotJson(e.to_string()))
    }

    /// The text of a raw number as the payload spells it (`None` for anything other than a
    /// number). Decimals are encoded from it, so no digit is lost to `f64`.
    pub(super) fn number_text(raw: &'a str) -> Option<&'a str> {
        let text = raw.trim();
        text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
            .then_some(text)
    }

    /// The raw value the path leads to. The last of duplicate keys wins, as it does for a
    /// parsed `Value`; a key into an array or an index into an object leads nowhere.
    pub(super) fn raw_at(&self, steps: &[PathStep]) -> Option<&'a str> {
        let Some(PathStep::Key(first)) = steps.first() else {
            // An index into the top level, which is an object: nothing there.
            return None;
        };
        let mut raw: &'a str = self.fields.iter().rev().find(|(key, _)| key == first)?.1;
        for step in &steps[1..] {
            raw = match step {
                PathStep::Key(key) => {
                    let object = match scan::object(raw) {
                        Some(object) => object,
                        None => serde_json::from_str::<TopLevel<'a>>(raw).ok()?,
                    };
                    object.fields.iter().rev().find(|(k, _)| k == key)?.1
                }
                PathStep::Index(index) => {
                    let items: Vec<&'a RawValue> = serde_json::from_str(raw).ok()?;
                    items.get(*index)?.get()
                }
            };
        }
        Some(raw)
    }
}

/// A JSON object's top level read without serde_json, for the common message: no escapes in any
/// of its strings. Every byte is still checked against JSON's grammar, so what it accepts
/// serde_json accepts too, with the same keys and values; anything else (an escape, broken
/// JSON, nesting deeper than [`scan::MAX_DEPTH`]) gives `None` and serde_json reads it instead.
mod scan {
    use std::borrow::Cow;

    use super::TopLevel;

    /// Deeper values are left to serde_json, which has its own limit (128).
    pub(super) const MAX_DEPTH: usize = 64;

    /// The top level of `text` if it is a JSON object (with whitespace around it) that
    /// [`scan`](self) reads.
    pub(in super::super) fn object(text: &str) -> Option<TopLevel<'_>> {
        let mut scan = Scan { text, at: 0 };
        scan.whitespace();
        scan.expect(b'{')?;
        let mut fields = Vec::with_capacity(16);
        scan.whitespace();
        if scan.peek() == Some(b'}') {
            scan.at += 1;
        } else {
            loop {
                scan.whitespace();
                let key = scan.string()?;
                scan.whitespace();
                scan.expect(b':')?;
                scan.whitespace();
                let start = scan.at;
                scan.value(1)?;
                fields.push((Cow::Borrowed(key), &text[start..scan.at]));
                scan.whitespace();
                match scan.next()? {
                    b',' => continue,
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        scan.whitespace();
        (scan.at == text.len()).then_some(TopLevel {
            fields,
            escape_free: true,
        })
    }

    /// Where the first quote, backslash or control character of `bytes` is: eight bytes at a
    /// time, since most of a message is the text of its strings.
    fn string_end(bytes: &[u8]) -> Option<usize> {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGHS: u64 = 0x8080_8080_8080_8080;
        let mut chunks = bytes.chunks_exact(8);
        let mut at = 0;
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            let word = u64::from_le_bytes(word);
            // A byte's high bit is set for the lowest byte that is zero after the XOR (a quote or
            // a backslash) or below 0x20; bytes above the lowest may be flagged wrongly by the
            // borrow, so only the lowest flag is read.
            let quote = word ^ (ONES * u64::from(b'"'));
            let backslash = word ^ (ONES * u64::from(b'\\'));
            let flags = (quote.wrapping_sub(ONES) & !quote
                | backslash.wrapping_sub(ONES) & !backslash
                | word.wrapping_sub(ONES * 0x20) & !word)
                & HIGHS;
            if flags != 0 {
                return Some(at + (flags.trailing_zeros() / 8) as usize);
            }
            at += 8;
        }
        chunks
            .remainder()
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .map(|offset| at + offset)
    }

    struct Scan<'a> {
        text: &'a str,
        at: usize,
    }

    impl<'a> Scan<'a> {
        fn peek(&self) -> Option<u8> {
            self.text.as_bytes().get(self.at).copied()
        }

        fn next(&mut self) -> Option<u8> {
            let byte = self.peek()?;
            self.at += 1;
            Some(byte)
        }

        fn expect(&mut self, byte: u8) -> Option<()> {
            (self.next()? == byte).then_some(())
        }

        fn whitespace(&mut self) {
            while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
                self.at += 1;
            }
        }

        /// A string without escapes or control characters: its content.
        fn string(&mut self) -> Option<&'a str> {
            self.expect(b'"')?;
            let start = self.at;
            let rest = &self.text.as_bytes()[start..];
            let end = string_end(rest)?;
            if rest[end] != b'"' {
                return None;
            }
            self.at = start + end + 1;
            // Both ends are ASCII quotes, so the slice falls on character boundaries.
            Some(&self.text[start..start + end])
        }

        /// Steps over one value, checking it.
        fn value(&mut self, depth: usize) -> Option<()> {
            if depth > MAX_DEPTH {
                return None;
            }
            match self.peek()? {
                b'"' => self.string().map(|_| ()),
                b'{' => self.nested(depth, b'}', true),
                b'[' => self.nested(depth, b']', false),
                b't' => self.literal("true"),
                b'f' => self.literal("false"),
                b'n' => self.literal("null"),
                b'-' | b'0'..=b'9' => self.number(),
                _ => None,
            }
        }

        /// An object (`keyed`) or an array, from its opening bracket to `close`.
        fn nested(&mut self, depth: usize, close: u8, keyed: bool) -> Option<()> {
            self.at += 1;
            self.whitespace();
            if self.peek() == Some(close) {
                self.at += 1;
                return Some(());
            }
            loop {
                self.whitespace();
                if keyed {
                    self.string()?;
                    self.whitespace();
                    self.expect(b':')?;
                    self.whitespace();
                }
                self.value(depth + 1)?;
                self.whitespace();
                match self.next()? {
                    b',' => continue,
                    byte if byte == close => return Some(()),
                    _ => return None,
                }
            }
        }

        fn literal(&mut self, word: &str) -> Option<()> {
            self.text[self.at..]
                .starts_with(word)
                .then(|| self.at += word.len())
        }

        /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
        fn number(&mut self) -> Option<()> {
            if self.peek() == Some(b'-') {
                self.at += 1;
            }
            match self.next()? {
                b'0' => {}
                b'1'..=b'9' => self.digits(),
                _ => return None,
            }
            if self.peek() == Some(b'.') {
                self.at += 1;
                self.some_digits()?;
            }
            if let Some(b'e' | b'E') = self.peek() {
                self.at += 1;
                if let Some(b'+' | b'-') = self.peek() {
                    self.at += 1;
                }
                self.some_digits()?;
            }
            Some(())
        }

        fn digits(&mut self) {
            while let Some(b'0'..=b'9') = self.peek() {
                self.at += 1;
            }
        }

        fn some_digits(&mut self) -> Option<()> {
            let start = self.at;
            self.digits();
            (self.at > start).then_some(())
        }
    }
}

/// The content of a raw JSON string without escapes, which is its text between the quotes: most
/// strings in a message, taken without parsing them a second time. A raw value has been checked
/// as JSON already (no control characters, quotes only escaped), so without a backslash nothing
/// in it needs decoding.
fn plain_string(raw: &str) -> Option<&str> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.as_bytes().contains(&b'\\')).then_some(inner)
}

/// A raw JSON number that is a plain integer (an optional minus and at most 18 digits, so it
/// fits `i64` and `u64` alike), as serde_json would have parsed it, without its parser.
fn plain_integer(raw: &str) -> Option<serde_json::Number> {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // serde_json parses non-negative integers as u64, negative ones as i64, and `-0` as a float.
    if raw.starts_with('-') {
        if digits == "0" {
            return None;
        }
        raw.parse::<i64>().ok().map(serde_json::Number::from)
    } else {
        raw.parse::<u64>().ok().map(serde_json::Number::from)
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
                    fields.push((key.0, map.next_value::<&'de RawValue>()?.get()));
                }
                Ok(TopLevel {
                    fields,
                    escape_free: false,
                })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What `parse_raw` makes of the value at `$.v` of `{"v": <raw>}`.
    fn found(raw: &str) -> Option<String> {
        let message = format!(r#"{{"v": {raw}}}"#);
        let top = TopLevel::parse(message.as_bytes()).unwrap();
        let path = [PathStep::Key("v".into())];
        match top.parse_raw(top.raw_at(&path)?).unwrap() {
            Parsed::Text(text) => Some(format!(
                "text {text:?} borrowed {}",
                matches!(text, Cow::Borrowed(_))
            )),
            Parsed::Value(value) => Some(format!("value {value:?}")),
        }
    }

    /// serde_json's reading of `text`'s top level, as (key, raw value) pairs.
    fn serde_fields(text: &str) -> Option<Vec<(String, String)>> {
        let top: TopLevel<'_> = serde_json::from_str(text).ok()?;
        Some(fields(&top))
    }

    fn fields(top: &TopLevel<'_>) -> Vec<(String, String)> {
        top.fields
            .iter()
            .map(|(key, raw)| (key.to_string(), raw.to_string()))
            .collect()
    }

    #[test]
    fn the_scanner_accepts_only_what_serde_json_accepts_and_reads_it_alike() {
        let bases = [
            r#"{"event_time":"2026-03-01T10:00:00.123Z","severity":3,"ok":true,"no":false,"n":null,"payload":{"amount":-12.5e+3,"list":[0,1.0,{"k":[]}],"e":{}},"s":""}"#,
            " { \"a\" : [ 1 , 2 ] ,\n\t\"b\":\r\"é ✓\" } ",
            "{}",
            r#"{"a":"x\"y"}"#,
        ];
        // Every base, and every base with one byte removed, doubled or replaced by each of a
        // few bytes that JSON's grammar cares about.
        let mut texts: Vec<Vec<u8>> = Vec::new();
        for base in bases {
            let bytes = base.as_bytes();
            texts.push(bytes.to_vec());
            for at in 0..bytes.len() {
                let mut removed = bytes.to_vec();
                removed.remove(at);
                texts.push(removed);
                let mut doubled = bytes.to_vec();
                doubled.insert(at, bytes[at]);
                texts.push(doubled);
                for byte in b"\"{}[],:0-.eE+ xtn\\\x01" {
                    let mut replaced = bytes.to_vec();
                    replaced[at] = *byte;
                    texts.push(replaced);
                }
            }
        }
        let mut scanned = 0;
        for bytes in &texts {
            let Ok(text) = std::str::from_utf8(bytes) else {
                continue;
            };
            if let Some(top) = scan::object(text) {
                scanned += 1;
                assert_eq!(
                    Some(fields(&top)),
                    serde_fields(text),
                    "the scanner read {text:?} otherwise than serde_json"
                );
            }
        }
        assert!(scanned > 100, "only {scanned} texts were scanned");
        // Escapes and deep nesting are left to serde_json.
        assert!(scan::object(r#"{"a":"x\"y"}"#).is_none());
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert!(scan::object(&deep).is_none());
        assert!(serde_fields(&deep).is_some());
    }

    #[test]
    fn plain_strings_and_integers_are_taken_as_serde_json_parses_them() {
        // What serde_json makes of each, the slow way.
        let slow = |raw: &str| -> String {
            if raw.starts_with('"') {
                let text: String = serde_json::from_str(raw).unwrap();
                format!("text {text:?}")
            } else {
                format!("value {:?}", serde_json::from_str::<Value>(raw).unwrap())
            }
        };
        for raw in [
            r#""""#,
            r#""plain""#,
            r#""caf\u00e9""#,
            r#""a\"b""#,
            r#""é ✓""#,
            "0",
            "-0",
            "7",
            "-7",
            "255",
            "123456789012345678",
            "-123456789012345678",
            "12345678901234567890",
            "18446744073709551616",
            "-9223372036854775809",
            "1.5",
            "1e3",
            "-0.0",
        ] {
            let fast = found(raw).unwrap();
            let expected = slow(raw);
            assert!(
                fast.starts_with(&expected),
                "{raw}: fast path {fast}, serde_json {expected}"
            );
        }
        assert_eq!(
            found(r#""plain""#).unwrap(),
            r#"text "plain" borrowed true"#
        );
    }
}
