//! Scanning a JSON message: the raw values of the keys the columns read, recorded while the
//! message is read once and borrowed from the payload, then each parsed only when a column
//! reads it.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::Poison;
use crate::value_source::PathStep;

/// The keys that the columns read, level by level, compiled once per encoder. While a message is
/// read, the value of each of these keys is recorded in its slot, so no column searches the
/// message afterwards, and an object inside the message is read once, not once per column.
#[derive(Clone, Debug, Default)]
pub(super) struct WantedKeys {
    top: KeyLevel,
    slot_count: usize,
}

/// The wanted keys of one object.
#[derive(Clone, Debug, Default)]
struct KeyLevel {
    keys: Vec<WantedKey>,
}

#[derive(Clone, Debug)]
struct WantedKey {
    key: String,
    /// The slot its raw value is recorded in, when a column reads it.
    slot: Option<usize>,
    /// The keys read inside its value, when that is an object.
    inner: KeyLevel,
    /// The slots of `inner`, all of them: emptied when the key comes again (the last of
    /// duplicate keys wins, as it does for a parsed `Value`).
    inner_slots: Range<usize>,
}

impl WantedKeys {
    /// The keys of `paths`, each up to its first array index. Returns them with, for each path,
    /// the slot of its last key and how many of its steps lead there (`None` for a path that
    /// starts with an index, since the top level is an object, or is empty).
    pub(super) fn compile(paths: &[&[PathStep]]) -> (Self, Vec<Option<(usize, usize)>>) {
        let mut top = KeyLevel::default();
        let prefixes: Vec<Vec<&str>> = paths.iter().map(|path| key_prefix(path)).collect();
        for keys in &prefixes {
            top.insert(keys);
        }
        let mut slot_count = 0;
        top.number(&mut slot_count);
        let found = prefixes
            .iter()
            .map(|keys| Some((top.slot_of(keys)?, keys.len())))
            .collect();
        (WantedKeys { top, slot_count }, found)
    }

    /// A slot for each wanted key, none recorded yet.
    fn empty_slots<'a>(&self) -> Vec<Option<&'a str>> {
        vec![None; self.slot_count]
    }
}

impl KeyLevel {
    /// Adds the path `keys` (below this level), marking its last key as read by a column.
    fn insert(&mut self, keys: &[&str]) {
        let Some((first, rest)) = keys.split_first() else {
            return;
        };
        let at = match self.keys.iter().position(|wanted| wanted.key == *first) {
            Some(at) => at,
            None => {
                self.keys.push(WantedKey {
                    key: first.to_string(),
                    slot: None,
                    inner: KeyLevel::default(),
                    inner_slots: 0..0,
                });
                self.keys.len() - 1
            }
        };
        let wanted = &mut self.keys[at];
        if rest.is_empty() {
            // Read by a column; [`Self::number`] gives it its slot.
            wanted.slot = Some(0);
        } else {
            wanted.inner.insert(rest);
        }
    }

    /// Numbers the slots of the keys read depth first, so that the slots below a key are one
    /// range.
    fn number(&mut self, next: &mut usize) {
        for wanted in &mut self.keys {
            if let Some(slot) = &mut wanted.slot {
                *slot = *next;
                *next += 1;
            }
            let first_inner = *next;
            wanted.inner.number(next);
            wanted.inner_slots = first_inner..*next;
        }
    }

    fn slot_of(&self, keys: &[&str]) -> Option<usize> {
        let (first, rest) = keys.split_first()?;
        let wanted = self.keys.iter().find(|wanted| wanted.key == *first)?;
        if rest.is_empty() {
            wanted.slot
        } else {
            wanted.inner.slot_of(rest)
        }
    }

    /// The wanted key `key`, looked for from `hint` on (and then from the start). A message's
    /// keys mostly come in the order the columns read them, so starting after the last key found
    /// mostly finds the next one at once. Returns it with the hint for the next key.
    fn find(&self, key: &str, hint: usize) -> Option<(&WantedKey, usize)> {
        let hint = hint.min(self.keys.len());
        let (earlier, from_hint) = self.keys.split_at(hint);
        let at = from_hint
            .iter()
            .position(|wanted| wanted.key == key)
            .map(|at| hint + at)
            .or_else(|| earlier.iter().position(|wanted| wanted.key == key))?;
        Some((&self.keys[at], at + 1))
    }

    /// Records the values of the wanted keys among `fields` (an object's keys and raw values, in
    /// order), reading the objects inside them with serde_json: the way for messages the scanner
    /// leaves to serde_json.
    fn record_fields<'a>(&self, fields: &[(Cow<'a, str>, &'a str)], slots: &mut [Option<&'a str>]) {
        for wanted in &self.keys {
            let Some((_, raw)) = fields.iter().rev().find(|(key, _)| *key == wanted.key) else {
                continue;
            };
            if let Some(slot) = wanted.slot {
                slots[slot] = Some(raw);
            }
            if !wanted.inner.keys.is_empty()
                && let Ok(inner) = serde_json::from_str::<Fields<'a>>(raw)
            {
                wanted.inner.record_fields(&inner.0, slots);
            }
        }
    }
}

/// The keys a path starts with, up to its first array index.
fn key_prefix(path: &[PathStep]) -> Vec<&str> {
    path.iter()
        .map_while(|step| match step {
            PathStep::Key(key) => Some(key.as_str()),
            PathStep::Index(_) => None,
        })
        .collect()
}

/// A JSON object message, read: the raw value of each wanted key, borrowed from the payload.
#[derive(Default)]
pub(super) struct Scanned<'a> {
    /// By slot of [`WantedKeys`]: the raw value, if the message has the key.
    slots: Vec<Option<&'a str>>,
    /// Read by [`scan`]: no string anywhere in the message has an escape.
    escape_free: bool,
}

/// A column's value parsed out of its raw value.
pub(super) enum Parsed<'a> {
    /// A JSON string, borrowed from the payload unless it had escapes.
    Text(Cow<'a, str>),
    Value(Value),
}

impl<'a> Scanned<'a> {
    pub(super) fn parse(payload: &'a [u8], wanted: &WantedKeys) -> Result<Self, Poison> {
        // UTF-8 is checked once for the whole message: parsed from a `str`, serde_json does not
        // check each string and each raw value again.
        let text = std::str::from_utf8(payload).map_err(|e| Poison::NotJson(e.to_string()))?;
        let mut slots = wanted.empty_slots();
        if scan::object(text, wanted, &mut slots).is_some() {
            return Ok(Scanned {
                slots,
                escape_free: true,
            });
        }
        // Escapes, broken JSON or not an object: serde_json decides, and names what is wrong.
        let fields = serde_json::from_str::<Fields<'a>>(text).map_err(|error| {
            // A type error means valid JSON that is not an object, unless the text is broken too.
            if error.classify() == serde_json::error::Category::Data
                && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
            {
                Poison::NotAnObject
            } else {
                Poison::NotJson(error.to_string())
            }
        })?;
        // The scan may have recorded some before it gave up.
        slots.fill(None);
        wanted.top.record_fields(&fields.0, &mut slots);
        Ok(Scanned {
            slots,
            escape_free: false,
        })
    }

    /// The raw value a column's path leads to: its slot's, then the steps after the slot's key
    /// (from an array index on), if any.
    pub(super) fn raw_at(&self, slot: usize, steps_after: &[PathStep]) -> Option<&'a str> {
        let mut raw = self.slots[slot]?;
        for step in steps_after {
            raw = match step {
                PathStep::Key(key) => {
                    let object: Fields<'a> = serde_json::from_str(raw).ok()?;
                    object.0.into_iter().rev().find(|(k, _)| k == key)?.1
                }
                PathStep::Index(index) => {
                    let items: Vec<&'a RawValue> = serde_json::from_str(raw).ok()?;
                    items.get(*index)?.get()
                }
            };
        }
        Some(raw)
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
    /// number). Decimals and floats are encoded from it.
    pub(super) fn number_text(raw: &'a str) -> Option<&'a str> {
        let text = raw.trim();
        text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
            .then_some(text)
    }
}

/// A JSON object read without serde_json, for the common message: no escapes in any of its
/// strings. Every byte is still checked against JSON's grammar, so what it accepts serde_json
/// accepts too, with the same values for the same keys; anything else (an escape, broken JSON,
/// nesting deeper than [`scan::MAX_DEPTH`]) gives `None` and serde_json reads it instead.
mod scan {
    use super::{KeyLevel, WantedKeys};

    /// Deeper values are left to serde_json, which has its own limit (128).
    pub(super) const MAX_DEPTH: usize = 64;

    /// Reads `text` if it is a JSON object (with whitespace around it) that [`scan`](self)
    /// reads, recording the raw value of each key in `wanted` in its slot.
    pub(in super::super) fn object<'a>(
        text: &'a str,
        wanted: &WantedKeys,
        slots: &mut [Option<&'a str>],
    ) -> Option<()> {
        let mut scan = Scan { text, at: 0 };
        scan.whitespace();
        if scan.peek() != Some(b'{') {
            return None;
        }
        scan.nested(0, b'}', Some(&wanted.top), slots)?;
        scan.whitespace();
        (scan.at == text.len()).then_some(())
    }

    /// Whether `word`, eight bytes of a string, holds a quote, a backslash or a control
    /// character, and if so the offset of the first.
    fn string_stop(word: u64) -> Option<usize> {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGHS: u64 = 0x8080_8080_8080_8080;
        // A byte's high bit is set for the lowest byte that is zero after the XOR (a quote or a
        // backslash) or below 0x20; bytes above the lowest may be flagged wrongly by the borrow,
        // so only the lowest flag is read.
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        let flags = (quote.wrapping_sub(ONES) & !quote
            | backslash.wrapping_sub(ONES) & !backslash
            | word.wrapping_sub(ONES * 0x20) & !word)
            & HIGHS;
        (flags != 0).then(|| (flags.trailing_zeros() / 8) as usize)
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
            let bytes = self.text.as_bytes();
            if bytes.get(self.at) != Some(&b'"') {
                return None;
            }
            let start = self.at + 1;
            let mut end = start;
            // Eight bytes at a time, since most of a message is the text of its strings; the
            // last few of the message one by one.
            loop {
                match bytes.get(end..end + 8) {
                    Some(&[b0, b1, b2, b3, b4, b5, b6, b7]) => {
                        let word = u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
                        if let Some(offset) = string_stop(word) {
                            end += offset;
                            break;
                        }
                        end += 8;
                    }
                    _ => match bytes.get(end)? {
                        b'"' | b'\\' | 0..0x20 => break,
                        _ => end += 1,
                    },
                }
            }
            if bytes[end] != b'"' {
                return None;
            }
            self.at = end + 1;
            // Both ends are ASCII quotes, so the slice falls on character boundaries.
            self.text.get(start..end)
        }

        /// Steps over one value, checking it; an object's wanted keys are recorded.
        fn value(
            &mut self,
            depth: usize,
            wanted: Option<&KeyLevel>,
            slots: &mut [Option<&'a str>],
        ) -> Option<()> {
            if depth > MAX_DEPTH {
                return None;
            }
            match self.peek()? {
                b'"' => self.string().map(|_| ()),
                b'{' => self.nested(depth, b'}', wanted, slots),
                b'[' => self.nested(depth, b']', None, slots),
                b't' => self.literal("true"),
                b'f' => self.literal("false"),
                b'n' => self.literal("null"),
                b'-' | b'0'..=b'9' => self.number(),
                _ => None,
            }
        }

        /// An object (`close` is `}`; `wanted` its keys to record) or an array, from its opening
        /// bracket to `close`.
        fn nested(
            &mut self,
            depth: usize,
            close: u8,
            wanted: Option<&KeyLevel>,
            slots: &mut [Option<&'a str>],
        ) -> Option<()> {
            let keyed = close == b'}';
            self.at += 1;
            self.whitespace();
            if self.peek() == Some(close) {
                self.at += 1;
                return Some(());
            }
            let mut hint = 0;
            loop {
                self.whitespace();
                let mut this = None;
                if keyed {
                    let key = self.string()?;
                    if let Some((found, next)) = wanted.and_then(|wanted| wanted.find(key, hint)) {
                        this = Some(found);
                        hint = next;
                    }
                    self.whitespace();
                    self.expect(b':')?;
                    self.whitespace();
                }
                let start = self.at;
                match this {
                    Some(this) => {
                        // Only this value of the key counts: forget what an earlier one left.
                        slots[this.inner_slots.clone()].fill(None);
                        let inner = (!this.inner.keys.is_empty()).then_some(&this.inner);
                        self.value(depth + 1, inner, slots)?;
                        if let Some(slot) = this.slot {
                            slots[slot] = Some(&self.text[start..self.at]);
                        }
                    }
                    None => self.value(depth + 1, None, slots)?,
                }
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

/// An object's keys and raw values, in order, as serde_json reads them.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a str)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(key) = map.next_key::<JsonText<'de>>()? {
                    fields.push((key.0, map.next_value::<&'de RawValue>()?.get()));
                }
                Ok(Fields(fields))
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

    fn path(text: &str) -> Vec<PathStep> {
        match crate::value_source::ValueSource::parse(text).unwrap() {
            crate::value_source::ValueSource::Json(steps) => steps,
            other => panic!("{text} is not a path: {other:?}"),
        }
    }

    /// What `parse_raw` makes of the value at `$.v` of `{"v": <raw>}`.
    fn found(raw: &str) -> Option<String> {
        let message = format!(r#"{{"v": {raw}}}"#);
        let steps = path("$.v");
        let (wanted, slots) = WantedKeys::compile(&[&steps]);
        let (slot, keys) = slots[0].unwrap();
        let top = Scanned::parse(message.as_bytes(), &wanted).unwrap();
        match top.parse_raw(top.raw_at(slot, &steps[keys..])?).unwrap() {
            Parsed::Text(text) => Some(format!(
                "text {text:?} borrowed {}",
                matches!(text, Cow::Borrowed(_))
            )),
            Parsed::Value(value) => Some(format!("value {value:?}")),
        }
    }

    #[test]
    fn the_scanner_accepts_only_what_serde_json_accepts_and_finds_the_same_values() {
        let bases = [
            r#"{"event_time":"2026-03-01T10:00:00.123Z","severity":3,"ok":true,"no":false,"n":null,"payload":{"amount":-12.5e+3,"list":[0,1.0,{"k":[]}],"e":{}},"s":""}"#,
            " { \"a\" : [ 1 , 2 ] ,\n\t\"b\":\r\"é ✓\" } ",
            "{}",
            r#"{"a":"x\"y"}"#,
            r#"{"payload":{"amount":1,"e":2},"payload":{"amount":3},"s":"1","s":2}"#,
            r#"{"payload":{"amount":1},"payload":"text","a":{"b":{"c":[1,{"d":5}]}}}"#,
        ];
        let paths: Vec<Vec<PathStep>> = [
            "$.event_time",
            "$.severity",
            "$.n",
            "$.payload",
            "$.payload.amount",
            "$.payload.list[2].k",
            "$.payload.e",
            "$.s",
            "$.a",
            "$.a.b.c[1].d",
            "$.a[0]",
            "$.b",
            "$.missing",
        ]
        .iter()
        .map(|text| path(text))
        .collect();
        let path_refs: Vec<&[PathStep]> = paths.iter().map(Vec::as_slice).collect();
        let (wanted, slots) = WantedKeys::compile(&path_refs);
        // What serde_json's own `Value` has at each path: a key leads into an object only, an
        // index into an array only.
        let at_path = |value: &Value, steps: &[PathStep]| -> Option<Value> {
            steps
                .iter()
                .try_fold(value, |value, step| match step {
                    PathStep::Key(key) => value.as_object()?.get(key),
                    PathStep::Index(index) => value.as_array()?.get(*index),
                })
                .cloned()
        };
        let values = |scanned: &Scanned<'_>| -> Vec<Option<Value>> {
            paths
                .iter()
                .zip(&slots)
                .map(|(steps, slot)| {
                    let (slot, keys) = (*slot)?;
                    let raw = scanned.raw_at(slot, &steps[keys..])?;
                    Some(serde_json::from_str(raw).unwrap())
                })
                .collect()
        };
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
        let (mut scanned, mut objects) = (0, 0);
        for bytes in &texts {
            let Ok(text) = std::str::from_utf8(bytes) else {
                continue;
            };
            let serde_value = serde_json::from_str::<Value>(text).ok();
            let mut scan_slots = wanted.empty_slots();
            if scan::object(text, &wanted, &mut scan_slots).is_some() {
                scanned += 1;
                assert!(
                    serde_value.as_ref().is_some_and(Value::is_object),
                    "the scanner read {text:?}, which serde_json does not read as an object"
                );
            }
            let Some(value) = serde_value.filter(Value::is_object) else {
                assert!(Scanned::parse(bytes, &wanted).is_err(), "{text:?}");
                continue;
            };
            objects += 1;
            let expected: Vec<Option<Value>> =
                paths.iter().map(|steps| at_path(&value, steps)).collect();
            let parsed = Scanned::parse(bytes, &wanted).unwrap();
            assert_eq!(values(&parsed), expected, "{text:?}");
            let mut fallback = wanted.empty_slots();
            wanted.top.record_fields(
                &serde_json::from_str::<Fields<'_>>(text).unwrap().0,
                &mut fallback,
            );
            let fallback = Scanned {
                slots: fallback,
                escape_free: false,
            };
            assert_eq!(values(&fallback), expected, "serde_json's way, {text:?}");
        }
        assert!(scanned > 100, "only {scanned} texts were scanned");
        assert!(objects > scanned, "no text was left to serde_json");
        // Escapes and deep nesting are left to serde_json.
        let mut unused = wanted.empty_slots();
        assert!(scan::object(r#"{"a":"x\"y"}"#, &wanted, &mut unused).is_none());
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert!(scan::object(&deep, &wanted, &mut unused).is_none());
        assert!(Scanned::parse(deep.as_bytes(), &wanted).is_ok());
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
