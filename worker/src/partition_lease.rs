//! Leases on partitions, kept in a NATS KV bucket, so that each partition has one owner at a time.
//!
//! One key per partition (`lease.p<i>`): a worker acquires it with a create (fails while another
//! holds it) and renews it with an update on the revision it wrote (compare-and-set). The
//! bucket's `max_age` is the lease's time to live: a lease not renewed for that long vanishes and
//! can be created again. Live workers also put a `member.<instance>` key each renewal, so that
//! each can take its fair share of the partitions ([`signal_model::partitions::fair_share`]).
//!
//! Safety does not rest on clocks agreeing: the server expires a lease `ttl` after it stored the
//! write, and the holder counts from the moment it *sent* that write, so its own deadlines
//! ([`Fence`]) always fall before the server's.

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures::StreamExt;
use signal_model::partitions::{LeaseTiming, MEMBER_PREFIX, lease_key, member_key};
use tokio::time::Instant;

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease bucket {bucket}: {message}")]
    Bucket { bucket: String, message: String },
    #[error("lease {key}: {message}")]
    Key { key: String, message: String },
}

/// The lease bucket of one pipeline, seen by one worker instance.
pub struct LeaseBoard {
    store: kv::Store,
    bucket: String,
    instance: String,
    timing: LeaseTiming,
}

/// A partition this worker holds: the revision it last wrote, and its deadlines.
pub struct Lease {
    pub partition: u32,
    revision: u64,
    pub fence: std::sync::Arc<Fence>,
}

/// The deadlines of a held lease, moved forward by each renewal: past `pull_deadline` no pull
/// request may be issued, past `ack_deadline` nothing may be acknowledged.
pub struct Fence {
    timing: LeaseTiming,
    written_at: Mutex<Instant>,
}

impl Fence {
    fn new(timing: LeaseTiming, written_at: Instant) -> Fence {
        Fence {
            timing,
            written_at: Mutex::new(written_at),
        }
    }

    fn written_at(&self) -> Instant {
        *self.written_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn renewed(&self, at: Instant) {
        *self.written_at.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    /// Until when a pull request may still be issued.
    pub fn pull_deadline(&self) -> Instant {
        self.written_at() + self.timing.ttl - self.timing.pull_margin
    }

    /// Until when acknowledgements (and in-progress acks) may still be sent.
    pub fn ack_deadline(&self) -> Instant {
        self.written_at() + self.timing.ttl - self.timing.ack_margin
    }

    /// Whether an acknowledgement sent now is still covered by the lease.
    pub fn may_ack(&self) -> bool {
        Instant::now() < self.ack_deadline()
    }
}

/// A KV key made of `name`: characters KV keys do not allow become `_`.
fn key_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A name for this worker process that no other (nor a restart of this one) shares.
pub fn instance_name(worker_name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{}-{}-{:x}",
        key_safe(worker_name),
        std::process::id(),
        nanos & 0xffff_ffff
    )
}

impl LeaseBoard {
    /// Opens (creating when missing) the lease bucket `bucket`, whose `max_age` is the lease TTL.
    /// The bucket's stream is created directly: `create_key_value` asks for account info, which
    /// nats-server 2.9 answers in a form async-nats 0.51 cannot read.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        instance: String,
        timing: LeaseTiming,
    ) -> Result<LeaseBoard, LeaseError> {
        let bucket_error = |message: String| LeaseError::Bucket {
            bucket: bucket.to_string(),
            message,
        };
        let config = stream::Config {
            name: format!("KV_{bucket}"),
            description: Some("signal-worker partition leases".into()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age: timing.ttl,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        };
        match js.get_stream(&config.name).await {
            Ok(existing) if existing.cached_info().config.max_age != timing.ttl => {
                js.update_stream(config)
                    .await
                    .map_err(|e| bucket_error(e.to_string()))?;
            }
            Ok(_) => {}
            Err(_) => {
                js.get_or_create_stream(config)
                    .await
                    .map_err(|e| bucket_error(e.to_string()))?;
            }
        }
        let store = js
            .get_key_value(bucket)
            .await
            .map_err(|e| bucket_error(e.to_string()))?;
        Ok(LeaseBoard {
            store,
            bucket: bucket.to_string(),
            instance,
            timing,
        })
    }

    /// This worker's instance name (the value of the leases it holds).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn key_error(key: &str, error: impl std::fmt::Display) -> LeaseError {
        LeaseError::Key {
            key: key.to_string(),
            message: error.to_string(),
        }
    }

    /// Says this worker is alive, for the others' fair share.
    pub async fn register(&self) -> Result<(), LeaseError> {
        let key = member_key(&self.instance);
        self.store
            .put(&key, Bytes::from(self.instance.clone()))
            .await
            .map(|_| ())
            .map_err(|e| Self::key_error(&key, e))
    }

    /// Removes this worker from the members (at shutdown).
    pub async fn deregister(&self) {
        let key = member_key(&self.instance);
        if let Err(error) = self.store.delete(&key).await {
            tracing::debug!(%error, key, "membership not removed; it expires");
        }
    }

    /// How many workers are alive (registered within the lease TTL), this one included.
    pub async fn live_members(&self) -> Result<usize, LeaseError> {
        let mut keys = self
            .store
            .keys()
            .await
            .map_err(|e| Self::key_error(&self.bucket, e))?;
        let mut live = 0;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| Self::key_error(&self.bucket, e))?;
            if key.starts_with(MEMBER_PREFIX) {
                live += 1;
            }
        }
        Ok(live.max(1))
    }

    /// Takes partition `partition` when no one holds it; `None` when someone does.
    pub async fn try_acquire(&self, partition: u32) -> Result<Option<Lease>, LeaseError> {
        let key = lease_key(partition);
        let sent = Instant::now();
        match self
            .store
            .create(&key, Bytes::from(self.instance.clone()))
            .await
        {
            Ok(revision) => Ok(Some(Lease {
                partition,
                revision,
                fence: std::sync::Arc::new(Fence::new(self.timing, sent)),
            })),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(error) => Err(Self::key_error(&key, error)),
        }
    }

    /// Renews a held lease (compare-and-set on the revision this worker wrote). An error means
    /// the lease could not be renewed now; its fence keeps the old deadlines.
    pub async fn renew(&self, lease: &mut Lease) -> Result<(), LeaseError> {
        let key = lease_key(lease.partition);
        let sent = Instant::now();
        let revision = self
            .store
            .update(&key, Bytes::from(self.instance.clone()), lease.revision)
            .await
            .map_err(|e| Self::key_error(&key, e))?;
        lease.revision = revision;
        lease.fence.renewed(sent);
        Ok(())
    }

    /// Lets a lease go (only if it is still the revision this worker wrote).
    pub async fn release(&self, lease: Lease) {
        let key = lease_key(lease.partition);
        if let Err(error) = self
            .store
            .delete_expect_revision(&key, Some(lease.revision))
            .await
        {
            tracing::warn!(%error, key, "lease not released; it expires");
        }
    }
}

/// How long a worker waits, on taking over a partition whose consumer still has deliveries
/// pending, for them to fall due for redelivery (the previous holder sent its last in-progress ack
/// before its fence, which was before this worker's lease began): the ack wait and a second for
/// the server's redelivery timer.
pub fn takeover_wait(ack_wait: Duration) -> Duration {
    ack_wait + Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_valid_keys_and_differ_between_starts() {
        let a = instance_name("pod/a.b");
        assert!(a.starts_with("pod_a_b-"), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '='))
        );
    }

    #[tokio::test]
    async fn fences_move_with_renewals_and_the_ack_fence_follows_the_pull_fence() {
        let timing = LeaseTiming::for_max_wait(Duration::from_millis(200));
        let start = Instant::now();
        let fence = Fence::new(timing, start);
        assert!(fence.pull_deadline() < fence.ack_deadline());
        assert!(fence.ack_deadline() < start + timing.ttl);
        assert!(fence.may_ack());
        fence.renewed(start + Duration::from_secs(1));
        assert_eq!(
            fence.ack_deadline(),
            start + Duration::from_secs(1) + timing.ttl - timing.ack_margin
        );
    }
}
