//! A minimal blocking HTTP/1.1 client over `std::net::TcpStream`.
//!
//! Just enough to ping ClickHouse and POST queries to it: one request per connection
//! (`Connection: close`), the body read to EOF, chunked transfer encoding decoded.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request to `127.0.0.1:port` and reads the whole response.
pub(crate) fn request(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Response> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let what = || format!("HTTP {method} http://{addr}{path}");
    let mut stream = TcpStream::connect_timeout(&addr, timeout).context(what)?;
    stream.set_read_timeout(Some(timeout)).context(what)?;
    stream.set_write_timeout(Some(timeout)).context(what)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: signal-testkit\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).context(what)?;
    stream.write_all(body).context(what)?;
    stream.flush().context(what)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context(what)?;
    parse(&raw)
}

pub(crate) fn parse(raw: &[u8]) -> Result<Response> {
    let end = find(raw, b"\r\n\r\n")
        .ok_or_else(|| Error::Protocol("HTTP response without a complete header".into()))?;
    let head = std::str::from_utf8(&raw[..end])
        .map_err(|_| Error::Protocol("HTTP response header is not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("bad HTTP status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &raw[end + 4..];
    let chunked = response
        .header("Transfer-Encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    response.body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = response
        .header("Content-Length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        rest.get(..len)
            .ok_or_else(|| Error::Protocol("HTTP body shorter than Content-Length".into()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(response)
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")
            .ok_or_else(|| Error::Protocol("truncated chunked HTTP body".into()))?;
        let size_text = std::str::from_utf8(&data[..line_end])
            .map_err(|_| Error::Protocol("bad chunk size".into()))?;
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| Error::Protocol(format!("bad chunk size {size_text:?}")))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = data
            .get(..size)
            .ok_or_else(|| Error::Protocol("truncated HTTP chunk".into()))?;
        body.extend_from_slice(chunk);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n\
                    3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n";
        let r = parse(raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-a"), Some("b"));
        assert_eq!(r.body, b"abcde");
    }

    #[test]
    fn parses_content_length_and_eof() {
        let r = parse(b"HTTP/1.0 404 Not Found\r\nContent-Length: 2\r\n\r\nnoXX").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"no"[..]));
        let r = parse(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(r.body, b"all of it");
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
