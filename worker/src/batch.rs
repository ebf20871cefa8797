//! The batcher: rows accumulate in one RowBinary buffer with the acks that settle them, until a
//! row, byte or age limit says the batch is due.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::Acker;
use bytes::Bytes;
use signal_model::BatchSpec;

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
    acks: Vec<Acker>,
    first_sequence: u64,
    last_sequence: u64,
    started: Option<Instant>,
    cache: HashMap<String, CacheEntry>,
}

/// A batch ready to be written: its rows are frozen so a retry resends the same bytes.
pub struct SealedBatch {
    pub rows: Bytes,
    pub acks: Vec<Acker>,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub cache: HashMap<String, CacheEntry>,
}

impl Batch {
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            rows: Vec::with_capacity(bytes),
            acks: Vec::new(),
            first_sequence: 0,
            last_sequence: 0,
            started: None,
            cache: HashMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.acks.is_empty()
    }

    pub fn len(&self) -> usize {
        self.acks.len()
    }

    /// The buffer the next row is encoded into; call [`Batch::push`] once it is there.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.rows
    }

    /// Records the row just encoded, with the ack that settles its message.
    pub fn push(&mut self, ack: Acker, stream_sequence: u64) {
        if self.acks.is_empty() {
            self.first_sequence = stream_sequence;
            self.started = Some(Instant::now());
        }
        self.first_sequence = self.first_sequence.min(stream_sequence);
        self.last_sequence = self.last_sequence.max(stream_sequence);
        self.acks.push(ack);
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
        self.acks.len() >= limits.max_rows || self.rows.len() >= limits.max_bytes
    }

    /// When the oldest row's wait runs out (`None` for an empty batch).
    pub fn deadline(&self, limits: &BatchLimits) -> Option<Instant> {
        self.started.map(|started| started + limits.max_wait)
    }

    /// Every ack held, for progress acks while the batch waits.
    pub fn acks(&self) -> &[Acker] {
        &self.acks
    }

    pub fn seal(self) -> SealedBatch {
        SealedBatch {
            rows: Bytes::from(self.rows),
            acks: self.acks,
            first_sequence: self.first_sequence,
            last_sequence: self.last_sequence,
            cache: self.cache,
        }
    }
}

impl SealedBatch {
    /// A deterministic token for this batch, for servers that deduplicate inserts by token.
    pub fn deduplication_token(&self, stream: &str) -> String {
        format!(
            "{stream}:{}-{}:{}",
            self.first_sequence,
            self.last_sequence,
            self.acks.len()
        )
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
