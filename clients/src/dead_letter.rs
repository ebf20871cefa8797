//! The headers a worker puts on a dead letter, read back by whoever inspects the dead-letter
//! subject (the operator's dead-letter stream, the demo's report, tests).

/// Header with the poison reason (`wrong_type: column ...`).
pub const HEADER_REASON: &str = "Signal-Poison-Reason";
/// Header with the subject the message was first published on.
pub const HEADER_SUBJECT: &str = "Signal-Original-Subject";
/// Header with the message's sequence in its stream.
pub const HEADER_SEQUENCE: &str = "Signal-Stream-Sequence";
/// Header with the stream the message came from.
pub const HEADER_STREAM: &str = "Signal-Stream";
