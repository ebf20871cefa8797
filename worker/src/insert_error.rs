//! Telling insert errors apart: permanent ones (the server refuses these rows and will go on
//! refusing them until a person changes the table, the spec or the credentials) from transient
//! ones (the server is unreachable, slow or busy, and a retry may succeed).
//!
//! ClickHouse says which by the error code at the start of its message (`Code: 60, e.displayText()
//! = DB::Exception: Table x doesn't exist`). An error without a code (connection refused, a
//! timeout, a reset) is transient; so is an unknown code: retrying a permanent error costs a log
//! line, giving up on a transient one would stall the pipeline for nothing.

/// What a failed insert calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertFailure {
    /// Retrying will not help: stop pulling, hold the batch, report it.
    Permanent { code: u32, message: String },
    /// Retry with backoff.
    Transient(String),
}

/// Codes of errors retrying will not fix: the table, its columns or the credentials are wrong.
const PERMANENT_CODES: &[(u32, &str)] = &[
    (16, "NO_SUCH_COLUMN_IN_TABLE"),
    (47, "UNKNOWN_IDENTIFIER"),
    (53, "TYPE_MISMATCH"),
    (60, "UNKNOWN_TABLE"),
    (81, "UNKNOWN_DATABASE"),
    (164, "READONLY"),
    (192, "UNKNOWN_USER"),
    (193, "WRONG_PASSWORD"),
    (194, "REQUIRED_PASSWORD"),
    (195, "IP_ADDRESS_NOT_ALLOWED"),
    (497, "ACCESS_DENIED"),
    (516, "AUTHENTICATION_FAILED"),
];

/// Classifies the text of a failed insert.
pub fn classify(error_text: &str) -> InsertFailure {
    match error_code(error_text) {
        Some(code) if PERMANENT_CODES.iter().any(|(c, _)| *c == code) => InsertFailure::Permanent {
            code,
            message: server_message(error_text),
        },
        _ => InsertFailure::Transient(error_text.to_string()),
    }
}

/// The number after the first `Code: ` in the text.
fn error_code(text: &str) -> Option<u32> {
    let after = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The server's own words, on one line, without the client's prefix and the trailing
/// `e.what()` noise of old servers.
fn server_message(text: &str) -> String {
    let from_code = text.find("Code: ").map_or(text, |at| &text[at..]);
    let trimmed = from_code
        .split(", e.what() = ")
        .next()
        .unwrap_or(from_code)
        .replace(['\r', '\n'], " ");
    trimmed.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_and_auth_errors_are_permanent() {
        let missing_table = "bad response: Code: 60, e.displayText() = DB::Exception: Table signal_test.t doesn't exist., e.what() = DB::Exception\n";
        assert_eq!(
            classify(missing_table),
            InsertFailure::Permanent {
                code: 60,
                message:
                    "Code: 60, e.displayText() = DB::Exception: Table signal_test.t doesn't exist."
                        .into()
            }
        );
        for text in [
            "Code: 16, e.displayText() = DB::Exception: No such column x in table t",
            "Code: 53, e.displayText() = DB::Exception: Type mismatch",
            "Code: 81, e.displayText() = DB::Exception: Database nope doesn't exist",
            "Code: 192, e.displayText() = DB::Exception: Unknown user bob",
            "Code: 193, e.displayText() = DB::Exception: Wrong password for user default",
            "Code: 516. DB::Exception: default: Authentication failed",
        ] {
            assert!(
                matches!(classify(text), InsertFailure::Permanent { .. }),
                "{text}"
            );
        }
    }

    #[test]
    fn outages_and_overload_are_transient() {
        for text in [
            "network error: client error (Connect): tcp connect error: Connection refused (os error 111)",
            "timeout expired",
            "Code: 252, e.displayText() = DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts.",
            "Code: 241, e.displayText() = DB::Exception: Memory limit (for query) exceeded",
            "Code: 209, e.displayText() = DB::NetException: Timeout exceeded while reading from socket",
            "Code: 999999, something new",
        ] {
            assert!(
                matches!(classify(text), InsertFailure::Transient(_)),
                "{text}"
            );
        }
    }
}
