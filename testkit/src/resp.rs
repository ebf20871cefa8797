//! A tiny blocking RESP2 client, enough for tests to inspect Redis (`HGETALL`, `TTL`, `KEYS`,
//! `DBSIZE`, `GET`, `SET`, ...).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespValue {
    /// `+OK`
    Simple(String),
    /// `-ERR ...` (only nested inside arrays; a top-level error reply is [`Error::Redis`]).
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo` (binary-safe).
    Bulk(Vec<u8>),
    /// `*2 ...`
    Array(Vec<RespValue>),
    /// `$-1` or `*-1`
    Nil,
}

impl RespValue {
    /// The text of a simple or (UTF-8) bulk string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            RespValue::Simple(s) => Some(s),
            RespValue::Bulk(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value of an integer reply.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            RespValue::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// The elements of an array reply.
    pub fn as_array(&self) -> Option<&[RespValue]> {
        match self {
            RespValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// Whether this is a nil reply.
    pub fn is_nil(&self) -> bool {
        matches!(self, RespValue::Nil)
    }

    /// An array of strings (e.g. `KEYS`), sorted for stable assertions.
    pub fn to_sorted_strings(&self) -> Option<Vec<String>> {
        let mut out = self
            .as_array()?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()?;
        out.sort();
        Some(out)
    }

    /// A flat field/value array (e.g. `HGETALL`, `CONFIG GET`) as a map.
    pub fn to_map(&self) -> Option<BTreeMap<String, String>> {
        let items = self.as_array()?;
        if items.len() % 2 != 0 {
            return None;
        }
        items
            .chunks(2)
            .map(|pair| Some((pair[0].as_str()?.to_string(), pair[1].as_str()?.to_string())))
            .collect()
    }
}

/// Sends one command on a new connection to `127.0.0.1:port` and reads the reply.
pub(crate) fn command(port: u16, args: &[&str], timeout: Duration) -> Result<RespValue> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let what = || format!("Redis command {:?} to {addr}", args.first().unwrap_or(&""));
    let stream = TcpStream::connect_timeout(&addr, timeout).context(what)?;
    stream.set_read_timeout(Some(timeout)).context(what)?;
    stream.set_write_timeout(Some(timeout)).context(what)?;
    let mut writer = stream.try_clone().context(what)?;
    writer.write_all(&encode(args)).context(what)?;
    writer.flush().context(what)?;
    match read_value(&mut BufReader::new(stream))? {
        RespValue::Error(message) => Err(Error::Redis(message)),
        value => Ok(value),
    }
}

/// Encodes a command as a RESP array of bulk strings.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply.
fn read_value(reader: &mut impl BufRead) -> Result<RespValue> {
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .context(|| "reading a Redis reply".to_string())?;
    if !line.ends_with(b"\r\n") {
        return Err(Error::Protocol("truncated Redis reply".into()));
    }
    line.truncate(line.len() - 2);
    let (kind, rest) = line
        .split_first()
        .ok_or_else(|| Error::Protocol("empty Redis reply line".into()))?;
    let text = String::from_utf8_lossy(rest).into_owned();
    let number = || -> Result<i64> {
        text.parse()
            .map_err(|_| Error::Protocol(format!("bad number in Redis reply: {text:?}")))
    };
    match kind {
        b'+' => Ok(RespValue::Simple(text)),
        b'-' => Ok(RespValue::Error(text)),
        b':' => Ok(RespValue::Integer(number()?)),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(RespValue::Nil);
            };
            let mut data = vec![0; len + 2];
            reader
                .read_exact(&mut data)
                .context(|| "reading a Redis bulk string".to_string())?;
            data.truncate(len);
            Ok(RespValue::Bulk(data))
        }
        b'*' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(RespValue::Nil);
            };
            (0..len)
                .map(|_| read_value(reader))
                .collect::<Result<_>>()
                .map(RespValue::Array)
        }
        other => Err(Error::Protocol(format!(
            "unknown Redis reply type {:?}",
            char::from(*other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> RespValue {
        read_value(&mut BufReader::new(bytes)).unwrap()
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(encode(&["GET", "k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }

    #[test]
    fn parses_all_reply_types() {
        assert_eq!(parse(b"+OK\r\n"), RespValue::Simple("OK".into()));
        assert_eq!(parse(b"-ERR x\r\n"), RespValue::Error("ERR x".into()));
        assert_eq!(parse(b":-2\r\n").as_int(), Some(-2));
        assert_eq!(parse(b"$5\r\na\r\nbc\r\n").as_str(), Some("a\r\nbc"));
        assert!(parse(b"$-1\r\n").is_nil());
        assert!(parse(b"*-1\r\n").is_nil());
        let map = parse(b"*4\r\n$1\r\nb\r\n$1\r\n2\r\n$1\r\na\r\n$1\r\n1\r\n")
            .to_map()
            .unwrap();
        assert_eq!(map.get("a").map(String::as_str), Some("1"));
        let keys = parse(b"*2\r\n$1\r\nz\r\n+y\r\n")
            .to_sorted_strings()
            .unwrap();
        assert_eq!(keys, ["y", "z"]);
        assert!(read_value(&mut BufReader::new(&b"$3\r\nab"[..])).is_err());
    }
}
