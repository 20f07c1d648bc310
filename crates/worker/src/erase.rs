//! What an account deletion leaves to the worker (`mobile_db::accounts`): the objects of
//! each upload in storage (`media.delete`), and what Redis holds under the user's id
//! (`account.forget`). Both are idempotent: a retry deletes what is left, and a key or
//! object already gone counts as deleted.

use std::sync::Arc;

use mobile_db::{
    accounts::{DeleteMediaJob, ForgetAccountJob},
    jobs::Job,
};
use mobile_domain::MediaId;
use mobile_runtime::redis::{Feature, Redis, idempotency_prefix};
use mobile_storage::Storage;
use redis::AsyncCommands as _;

use crate::queue::{Done, Handler, JobError, JobFuture, Lease};

/// Removes an upload's original and variants from storage.
#[derive(Debug, Clone)]
pub struct DeleteMedia {
    pub storage: Storage,
}

impl Handler for DeleteMedia {
    fn run(&self, job: Job, _lease: Lease) -> JobFuture {
        let storage = self.storage.clone();
        Box::pin(async move {
            let DeleteMediaJob { media_id } = job.payload().map_err(JobError::permanent)?;
            delete_objects(&storage, media_id)
                .await
                .map_err(|e| JobError::transient(e.to_string()))?;
            Ok(Done::Complete)
        })
    }
}

/// Deletes every object of `media_id`: its original and each variant.
pub async fn delete_objects(
    storage: &Storage,
    media_id: MediaId,
) -> Result<(), mobile_storage::StorageError> {
    storage
        .delete(&mobile_storage::original_key(media_id))
        .await?;
    for (variant, _) in mobile_media::VARIANTS {
        storage
            .delete(&mobile_storage::variant_key(media_id, variant))
            .await?;
    }
    Ok(())
}

/// Deletes what Redis holds under a deleted user's id: the API's stored responses to
/// their `Idempotency-Key` requests (which carry what they wrote). Their rate-limit,
/// sign-in and presence entries hold nothing but counters and expire within minutes.
#[derive(Debug, Clone)]
pub struct ForgetAccount {
    pub redis: Redis,
}

/// Keys asked for per `SCAN` round trip.
const SCAN_COUNT: usize = 1000;

impl Handler for ForgetAccount {
    fn run(&self, job: Job, _lease: Lease) -> JobFuture {
        let this = Arc::new(self.clone());
        Box::pin(async move {
            let ForgetAccountJob { user_id } = job.payload().map_err(JobError::permanent)?;
            let deleted = this
                .forget(&idempotency_prefix(user_id))
                .await
                .map_err(|e| JobError::transient(format!("redis: {e}")))?;
            tracing::info!(%user_id, deleted, "forgot a deleted account's Redis keys");
            Ok(Done::Complete)
        })
    }
}

impl ForgetAccount {
    /// Deletes every key under `prefix`; returns how many there were.
    async fn forget(&self, prefix: &str) -> redis::RedisResult<usize> {
        let pattern = self.redis.pattern_under(prefix);
        let mut conn = self.redis.conn(Feature::Idempotency);
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let _: usize = conn.unlink(&keys).await?;
                deleted += keys.len();
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}
