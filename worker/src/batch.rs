//! The batcher: rows accumulate in one RowBinary buffer with the ack subjects that settle them,
//! until a row, byte or age limit says the batch is due.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use signal_model::BatchSpec;

use crate::dead_letter::DeadLetter;

/// When a batch is due.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

impl From<&BatchSpec> for BatchLimits {
    fn from(spec: &BatchSpec) -> Self {
        Self {
            max_rows: spec.max_rows as usize,
            max_bytes: spec.max_bytes.0 as usize,
            max_wait: spec.max_wait.0,
        }
    }
}

/// The newest cached fields of one key within a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheEntry {
    pub stream_sequence: u64,
    pub fields: Vec<(String, String)>,
}

/// A batch being filled.
pub struct Batch {
    rows: Vec<u8>,
    settle: Settle,
    message_bytes: usize,
    started: Option<Instant>,
    cache: HashMap<String, CacheEntry>,
}

/// What settles a batch's messages, one entry per row, in row order.
#[derive(Default)]
pub struct Settle {
    /// Each row's ack subject.
    pub replies: Vec<Subject>,
    /// Each row's stream sequence.
    pub sequences: Vec<u64>,
    /// Where each row ends in the rows buffer.
    pub row_ends: Vec<usize>,
    /// Rows whose message is on its last allowed delivery, with its dead letter ready: if the
    /// insert fails they are dead-lettered rather than let fall out of the consumer.
    pub last_deliveries: Vec<(usize, DeadLetter)>,
}

/// A batch ready to be written: its rows are frozen so a retry resends the same bytes.
pub struct SealedBatch {
    pub rows: Bytes,
    pub settle: Settle,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub cache: HashMap<String, CacheEntry>,
}

impl Batch {
    pub fn with_capacity(bytes: usize) -> Self {
        Self::with_buffer(Vec::with_capacity(bytes))
    }

    /// A batch that fills `rows` (emptied first), a stored batch's buffer given back by
    /// [`SealedBatch::take_buffer`]: no allocation, and no fresh pages to fault in, per batch.
    pub fn with_buffer(mut rows: Vec<u8>) -> Self {
        rows.clear();
        Self {
            rows,
            settle: Settle::default(),
            message_bytes: 0,
            started: None,
            cache: HashMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.settle.replies.is_empty()
    }

    pub fn len(&self) -> usize {
        self.settle.replies.len()
    }

    /// Bytes the batch holds: its rows or its messages' payloads, whichever is more.
    pub fn bytes(&self) -> usize {
        self.rows.len().max(self.message_bytes)
    }

    /// The buffer the next row is encoded into; call [`Batch::push`] once it is there.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.rows
    }

    /// Records the row just encoded, with the ack subject that settles its message and the size
    /// of its payload. `last_delivery` holds its dead letter when it is on its last delivery.
    pub fn push(
        &mut self,
        reply: Subject,
        stream_sequence: u64,
        payload_bytes: usize,
        last_delivery: Option<DeadLetter>,
    ) {
        if self.settle.replies.is_empty() {
            self.started = Some(Instant::now());
        }
        if let Some(letter) = last_delivery {
            self.settle
                .last_deliveries
                .push((self.settle.replies.len(), letter));
        }
        self.settle.replies.push(reply);
        self.settle.sequences.push(stream_sequence);
        self.settle.row_ends.push(self.rows.len());
        self.message_bytes += payload_bytes;
    }

    /// Keeps the newest fields per key (by stream sequence).
    pub fn cache(&mut self, key: String, entry: CacheEntry) {
        match self.cache.get(&key) {
            Some(existing) if existing.stream_sequence > entry.stream_sequence => {}
            _ => {
                self.cache.insert(key, entry);
            }
        }
    }

    /// True when a row or byte limit is reached.
    pub fn is_full(&self, limits: &BatchLimits) -> bool {
        self.len() >= limits.max_rows || self.bytes() >= limits.max_bytes
    }

    /// When the oldest row's wait runs out (`None` for an empty batch).
    pub fn deadline(&self, limits: &BatchLimits) -> Option<Instant> {
        self.started.map(|started| started + limits.max_wait)
    }

    pub fn seal(self) -> SealedBatch {
        let first_sequence = self.settle.sequences.iter().copied().min().unwrap_or(0);
        let last_sequence = self.settle.sequences.iter().copied().max().unwrap_or(0);
        SealedBatch {
            rows: Bytes::from(self.rows),
            settle: self.settle,
            first_sequence,
            last_sequence,
            cache: self.cache,
        }
    }
}

impl SealedBatch {
    /// Takes the rows' buffer back, emptied, for the next batch to fill; `None` while something
    /// else (an insert still in progress) refers to it. The rows are gone afterwards.
    pub fn take_buffer(&mut self) -> Option<Vec<u8>> {
        let mut rows = std::mem::take(&mut self.rows).try_into_mut().ok()?;
        // Emptied before the conversion, which would otherwise copy the rows into place.
        rows.clear();
        Some(rows.into())
    }

    pub fn len(&self) -> usize {
        self.settle.replies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.settle.replies.is_empty()
    }

    /// The insert deduplication token: a digest of the stream's identity (name and creation time)
    /// and the batch's exact set of stream sequences, so only the very same rows share a token,
    /// whatever order they were delivered in, and a re-created stream starts new tokens.
    pub fn deduplication_token(&self, stream: &str, stream_created_unix_nanos: i128) -> String {
        let mut sequences = self.settle.sequences.clone();
        sequences.sort_unstable();
        let mut digest = Sha256::new();
        digest.update(stream.as_bytes());
        digest.update([0]);
        digest.update(stream_created_unix_nanos.to_le_bytes());
        for sequence in sequences {
            digest.update(sequence.to_le_bytes());
        }
        let hex: String = digest
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{stream}:{hex}")
    }

    /// Takes the dead letters of the rows on their last delivery out of the batch, leaving the
    /// other rows (and their cache entries) to be inserted.
    pub fn take_last_deliveries(&mut self) -> Vec<DeadLetter> {
        if self.settle.last_deliveries.is_empty() {
            return Vec::new();
        }
        let taken = std::mem::take(&mut self.settle.last_deliveries);
        let removed: Vec<usize> = taken.iter().map(|(index, _)| *index).collect();
        let old = std::mem::take(&mut self.settle);
        let mut rows = Vec::with_capacity(self.rows.len());
        let mut start = 0;
        for (index, end) in old.row_ends.iter().enumerate() {
            if !removed.contains(&index) {
                rows.extend_from_slice(&self.rows[start..*end]);
                self.settle.replies.push(old.replies[index].clone());
                self.settle.sequences.push(old.sequences[index]);
                self.settle.row_ends.push(rows.len());
            }
            start = *end;
        }
        let gone: Vec<u64> = removed.iter().map(|i| old.sequences[*i]).collect();
        self.cache
            .retain(|_, entry| !gone.contains(&entry.stream_sequence));
        self.rows = Bytes::from(rows);
        taken.into_iter().map(|(_, letter)| letter).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keeps_the_newest_row_per_key() {
        let mut batch = Batch::with_capacity(0);
        let entry = |seq: u64, v: &str| CacheEntry {
            stream_sequence: seq,
            fields: vec![("f".into(), v.into())],
        };
        batch.cache("k".into(), entry(5, "five"));
        batch.cache("k".into(), entry(3, "three"));
        batch.cache("j".into(), entry(4, "four"));
        batch.cache("k".into(), entry(9, "nine"));
        let sealed = batch.seal();
        assert_eq!(sealed.cache["k"], entry(9, "nine"));
        assert_eq!(sealed.cache["j"], entry(4, "four"));
    }

    fn letter(sequence: u64) -> DeadLetter {
        DeadLetter {
            payload: Bytes::from_static(b"{}"),
            headers: None,
            subject: Subject::from("in"),
            reply: Subject::from(format!("ack.{sequence}")),
            stream_sequence: sequence,
            label: crate::dead_letter::MAX_DELIVERIES,
            reason: String::new(),
        }
    }

    /// A batch of one-byte rows `[sequence]` for each sequence.
    fn batch_of(sequences: &[u64], last: &[u64]) -> SealedBatch {
        let mut batch = Batch::with_capacity(16);
        for &sequence in sequences {
            batch.buffer().push(sequence as u8);
            let reply = Subject::from(format!("ack.{sequence}"));
            let last_delivery = last.contains(&sequence).then(|| letter(sequence));
            batch.push(reply, sequence, 1, last_delivery);
        }
        batch.seal()
    }

    #[test]
    fn deduplication_token_is_the_exact_set_of_sequences_and_the_streams_identity() {
        let token = batch_of(&[1, 2, 3, 7], &[]).deduplication_token("S", 10);
        // Same set, another order: same rows, same token.
        assert_eq!(
            token,
            batch_of(&[7, 3, 1, 2], &[]).deduplication_token("S", 10)
        );
        // Same first, last and count, other rows.
        assert_ne!(
            token,
            batch_of(&[1, 4, 5, 7], &[]).deduplication_token("S", 10)
        );
        // A re-created stream restarts its sequences.
        assert_ne!(
            token,
            batch_of(&[1, 2, 3, 7], &[]).deduplication_token("S", 11)
        );
        assert_ne!(
            token,
            batch_of(&[1, 2, 3, 7], &[]).deduplication_token("T", 10)
        );
    }

    #[test]
    fn last_deliveries_leave_the_batch_with_their_rows_and_cache_entries() {
        let mut batch = Batch::with_capacity(16);
        for sequence in [4u64, 5, 6] {
            batch.buffer().push(sequence as u8);
            batch.cache(
                format!("k{sequence}"),
                CacheEntry {
                    stream_sequence: sequence,
                    fields: vec![],
                },
            );
            let last_delivery = (sequence == 5).then(|| letter(sequence));
            batch.push(
                Subject::from(format!("ack.{sequence}")),
                sequence,
                1,
                last_delivery,
            );
        }
        let mut sealed = batch.seal();
        let letters = sealed.take_last_deliveries();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].stream_sequence, 5);
        assert_eq!(sealed.rows.as_ref(), &[4, 6]);
        assert_eq!(sealed.settle.sequences, vec![4, 6]);
        assert_eq!(sealed.settle.row_ends, vec![1, 2]);
        assert_eq!(sealed.settle.replies[1].as_str(), "ack.6");
        assert!(!sealed.cache.contains_key("k5") && sealed.cache.contains_key("k6"));
        assert!(sealed.take_last_deliveries().is_empty());
        assert_eq!(batch_of(&[1, 2], &[1, 2]).take_last_deliveries().len(), 2);
    }

    #[test]
    fn a_stored_batchs_buffer_is_taken_back_without_reallocating() {
        let sealed_row = || {
            let mut batch = Batch::with_capacity(64);
            batch.buffer().extend_from_slice(b"row");
            batch.push(Subject::from("ack.1"), 1, 3, None);
            batch.seal()
        };
        let mut sealed = sealed_row();
        let _in_flight = sealed.rows.clone();
        assert!(
            sealed.take_buffer().is_none(),
            "an insert still holds the rows"
        );
        let mut sealed = sealed_row();
        let address = sealed.rows.as_ptr();
        let buffer = sealed.take_buffer().expect("nothing else holds the rows");
        assert!(buffer.is_empty() && buffer.capacity() >= 64);
        assert_eq!(buffer.as_ptr(), address, "the same allocation");
        let next = Batch::with_buffer(buffer);
        assert!(next.is_empty() && next.bytes() == 0);
    }

    #[test]
    fn limits_make_a_batch_due() {
        let limits = BatchLimits {
            max_rows: 2,
            max_bytes: 10,
            max_wait: Duration::from_secs(1),
        };
        let mut batch = Batch::with_capacity(16);
        assert!(!batch.is_full(&limits));
        assert!(batch.deadline(&limits).is_none());
        batch.buffer().extend_from_slice(&[0; 10]);
        assert!(batch.is_full(&limits), "byte limit");
    }
}
