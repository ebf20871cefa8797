//! The demo's messages: sample signals, a few deliberately malformed, and the subject each goes to.
//!
//! The malformed kinds assume the example pipeline's required columns
//! (`examples/local/demo.yaml`: `wallet_address` and `amount` have no default).

use signal_model::spec::SignalPipelineSpec;

use crate::sample_signals::{EVENT_TYPES, sample_signal};

/// How a malformed demo message is broken, and so which poison reason it earns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformation {
    /// Cut in half: `not_json`.
    Truncated,
    /// `wallet_address` renamed: `missing_value`.
    MissingWallet,
    /// `amount` is a word: `wrong_type`.
    AmountNotANumber,
}

/// One demo message.
#[derive(Clone, Debug)]
pub struct DemoMessage {
    pub event_type: &'static str,
    pub payload: Vec<u8>,
    pub malformation: Option<Malformation>,
}

/// The `index`-th demo message: a sample signal, malformed for about `malformed_per_mille`
/// messages in a thousand (spread evenly, the same for a given index).
pub fn demo_message(index: u64, malformed_per_mille: u64) -> DemoMessage {
    let event_type = EVENT_TYPES[(index % EVENT_TYPES.len() as u64) as usize];
    let payload = sample_signal(index);
    // A multiplicative hash spreads the malformed ones instead of bunching them every 1000.
    let bucket = index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) % 1000;
    if bucket >= malformed_per_mille {
        return DemoMessage {
            event_type,
            payload,
            malformation: None,
        };
    }
    let text = String::from_utf8_lossy(&payload).into_owned();
    let (malformation, broken) = match index % 3 {
        0 => (Malformation::Truncated, text[..text.len() / 2].to_string()),
        1 => (
            Malformation::MissingWallet,
            text.replace("\"wallet_address\"", "\"wallet\""),
        ),
        _ => (
            Malformation::AmountNotANumber,
            text.replace("\"amount\":", "\"amount\":\"lots\",\"was\":"),
        ),
    };
    DemoMessage {
        event_type,
        payload: broken.into_bytes(),
        malformation: Some(malformation),
    }
}

/// The subject a message of `event_type` goes to: `<prefix>.<event_type>` when the consumer's
/// filter (else the stream's first subject) ends in a wildcard, else that literal subject.
pub fn publish_subject(spec: &SignalPipelineSpec, event_type: &str) -> String {
    let pattern = spec
        .consumer
        .filter_subject
        .as_deref()
        .or(spec.stream.subjects.first().map(String::as_str))
        .unwrap_or("signals.>");
    match pattern
        .strip_suffix(".>")
        .or_else(|| pattern.strip_suffix(".*"))
    {
        Some(prefix) => format!("{prefix}.{event_type}"),
        None => pattern.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_the_asked_share_is_malformed_in_every_way() {
        let messages: Vec<DemoMessage> = (0..100_000).map(|i| demo_message(i, 30)).collect();
        let malformed: Vec<Malformation> = messages.iter().filter_map(|m| m.malformation).collect();
        assert!(
            (2_500..3_500).contains(&malformed.len()),
            "{}",
            malformed.len()
        );
        for kind in [
            Malformation::Truncated,
            Malformation::MissingWallet,
            Malformation::AmountNotANumber,
        ] {
            assert!(
                malformed.iter().filter(|m| **m == kind).count() > 500,
                "{kind:?}"
            );
        }
        assert!(
            (0..1000).all(|i| demo_message(i, 0).malformation.is_none()),
            "0 ‰ means none"
        );
    }

    #[test]
    fn malformed_messages_are_broken_the_way_they_say() {
        for index in 0..5000 {
            let message = demo_message(index, 1000);
            let parsed = serde_json::from_slice::<serde_json::Value>(&message.payload);
            match message.malformation {
                Some(Malformation::Truncated) => assert!(parsed.is_err()),
                Some(Malformation::MissingWallet) => {
                    assert!(parsed.unwrap().get("wallet_address").is_none())
                }
                Some(Malformation::AmountNotANumber) => {
                    assert!(parsed.unwrap()["payload"]["amount"].is_string())
                }
                None => panic!("1000 ‰ means all"),
            }
        }
    }

    #[test]
    fn subjects_follow_the_consumer_filter() {
        let mut spec = SignalPipelineSpec::default();
        spec.stream.subjects = vec!["signals.>".into()];
        assert_eq!(publish_subject(&spec, "login"), "signals.login");
        spec.consumer.filter_subject = Some("signals.events.>".into());
        assert_eq!(publish_subject(&spec, "login"), "signals.events.login");
        spec.consumer.filter_subject = Some("signals.transaction".into());
        assert_eq!(publish_subject(&spec, "login"), "signals.transaction");
    }
}
