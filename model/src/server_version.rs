//! ClickHouse server versions, as reported by `SELECT version()`, for deciding which types and clauses
//! a server accepts.

use std::fmt;

/// A `major.minor` ClickHouse release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Parses `18.16.1`, `24.3.2.23` or `26.9.1.1-stable`; `None` for text that is not a version.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor_text = parts.next().unwrap_or("0");
        let digits: String = minor_text
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some(Self {
            major,
            minor: digits.parse().ok()?,
        })
    }

    /// Servers before 22.2 ignore `insert_deduplication_token`, so batches are deduplicated only by
    /// their content hash (see the README's delivery guarantees).
    pub fn supports_insert_deduplication_token(self) -> bool {
        self >= Self::new(22, 2)
    }

    /// Table-level TTL arrived in 19.6.
    pub fn supports_ttl(self) -> bool {
        self >= Self::new(19, 6)
    }

    /// `ADD COLUMN IF NOT EXISTS` arrived in 19.?; older servers need a plain `ADD COLUMN`.
    pub fn supports_add_column_if_not_exists(self) -> bool {
        self >= Self::new(19, 1)
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_strings() {
        assert_eq!(
            ServerVersion::parse("18.16.1"),
            Some(ServerVersion::new(18, 16))
        );
        assert_eq!(
            ServerVersion::parse("26.9.1.1-stable"),
            Some(ServerVersion::new(26, 9))
        );
        assert_eq!(ServerVersion::parse("nonsense"), None);
        assert!(ServerVersion::new(18, 16) < ServerVersion::new(20, 1));
        assert!(!ServerVersion::new(18, 16).supports_insert_deduplication_token());
    }
}
