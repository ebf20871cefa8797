//! The Redis cache key template: `wallet:{wallet_address}:latest` rendered from a row's columns.

/// One piece of a key template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Column(String),
}

/// A parsed key template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTemplate {
    pieces: Vec<Piece>,
}

impl KeyTemplate {
    /// Parses `{column}` placeholders; `{{` and `}}` stand for literal braces.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(format!(
                            "invalid placeholder `{{{name}}}` in key template `{text}`"
                        ));
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Column(name));
                }
                '}' => return Err(format!("unmatched `}}` in key template `{text}`")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Column(_))) {
            return Err(format!(
                "key template `{text}` has no `{{column}}` placeholder, so every row would share one key"
            ));
        }
        Ok(Self { pieces })
    }

    /// Column names the template refers to.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Column(name) => Some(name.as_str()),
            Piece::Literal(_) => None,
        })
    }

    /// Renders the key, asking `value_of` for each placeholder's text.
    pub fn render<'a>(&self, value_of: impl Fn(&str) -> &'a str) -> String {
        let mut key = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => key.push_str(text),
                Piece::Column(name) => key.push_str(value_of(name)),
            }
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_placeholders_from_columns() {
        let template = KeyTemplate::parse("wallet:{wallet_address}:{{latest}}").unwrap();
        assert_eq!(template.columns().collect::<Vec<_>>(), ["wallet_address"]);
        assert_eq!(template.render(|_| "0xabc"), "wallet:0xabc:{latest}");
        assert!(
            KeyTemplate::parse("static")
                .unwrap_err()
                .contains("no `{column}`")
        );
        assert!(
            KeyTemplate::parse("a:{b c}")
                .unwrap_err()
                .contains("invalid placeholder")
        );
        assert!(KeyTemplate::parse("a}").unwrap_err().contains("unmatched"));
    }
}
