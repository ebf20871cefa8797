//! Poison messages: published to the dead-letter subject with headers that say why, then
//! terminated so JetStream stops redelivering them.
//!
//! The original is terminated only after the dead letter is confirmed (by the stream that captures
//! the subject, or by a flush when no stream does), so a poison message is never lost.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use signal_clients::dead_letter::{HEADER_REASON, HEADER_SEQUENCE, HEADER_STREAM, HEADER_SUBJECT};
use signal_model::row_encoder::Poison;

/// Why a dead letter could not be published.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("publishing to dead-letter subject {subject} failed: {message}")]
    Publish { subject: String, message: String },
}

/// Where poison goes.
#[derive(Clone)]
pub struct DeadLetters {
    pub subject: Option<String>,
    pub stream: String,
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
}

/// A poison message, kept until it is routed.
pub struct PoisonMessage {
    pub message: jetstream::Message,
    pub stream_sequence: u64,
    pub reason: Poison,
}

impl DeadLetters {
    /// Routes one poison message. On error the message is left unacknowledged for redelivery.
    pub async fn route(&self, poison: PoisonMessage) -> Result<(), DeadLetterError> {
        let PoisonMessage {
            message,
            stream_sequence,
            reason,
        } = poison;
        if let Some(subject) = &self.subject {
            let mut headers = message.headers.clone().unwrap_or_default();
            insert_header(&mut headers, HEADER_REASON, &reason.to_string());
            insert_header(&mut headers, HEADER_SUBJECT, message.subject.as_str());
            insert_header(&mut headers, HEADER_SEQUENCE, &stream_sequence.to_string());
            insert_header(&mut headers, HEADER_STREAM, &self.stream);
            self.publish(subject, headers, message.payload.clone())
                .await?;
        }
        message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| DeadLetterError::Publish {
                subject: self.subject.clone().unwrap_or_default(),
                message: format!("terminating the original failed: {e}"),
            })
    }

    async fn publish(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), DeadLetterError> {
        let failed = |message: String| DeadLetterError::Publish {
            subject: subject.to_string(),
            message,
        };
        match self
            .jetstream
            .publish_with_headers(subject.to_string(), headers.clone(), payload.clone())
            .await
        {
            Ok(ack) => match ack.await {
                Ok(_) => return Ok(()),
                Err(error)
                    if error.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {}
                Err(error) => return Err(failed(error.to_string())),
            },
            Err(error) => return Err(failed(error.to_string())),
        }
        // No stream captures the subject: a core publish, flushed, is as durable as NATS gets.
        self.client
            .publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(|e| failed(e.to_string()))?;
        self.client.flush().await.map_err(|e| failed(e.to_string()))
    }
}

fn insert_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    // Header values cannot hold line breaks.
    let value: String = value
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    headers.insert(name, value.as_str());
}
