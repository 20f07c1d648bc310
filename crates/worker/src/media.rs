//! The `media.process` job: original in, variants stored, media row `ready` (or
//! `failed` with the reason), and the owner told over their `user:` channel.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use bytes::Bytes;
use mobile_db::Db;
use mobile_db::{
    jobs::Job,
    media::{self, ProcessJob, Variant},
};
use mobile_domain::{MediaId, MediaStatus, UserId};
use mobile_events::MediaData;
use mobile_media::Rendition;
use mobile_runtime::redis::Redis;
use mobile_storage::{Storage, StorageError};
use sha2::{Digest as _, Sha256};

use crate::{
    metrics::WorkerMetrics,
    queue::{Done, Handler, JobError, JobFuture, Lease},
};

/// Processes uploads.
#[derive(Debug, Clone)]
pub struct ProcessMedia {
    pub db: Db,
    pub storage: Storage,
    pub redis: Redis,
    pub metrics: WorkerMetrics,
    pub max_pixels: u64,
    pub quality: u8,
}

impl Handler for ProcessMedia {
    fn run(&self, job: Job, _lease: Lease) -> JobFuture {
        let this = Arc::new(self.clone());
        Box::pin(async move { this.process(job).await })
    }
}

impl ProcessMedia {
    async fn process(&self, job: Job) -> Result<Done, JobError> {
        let ProcessJob { media_id } = job.payload().map_err(JobError::permanent)?;
        let Some(row) = media::find(&self.db, media_id).await? else {
            // Deleted with its owner meanwhile: nothing to do.
            return Ok(Done::Complete);
        };
        if row.status != MediaStatus::Processing {
            // An earlier attempt finished but died before deleting the job.
            return Ok(Done::Complete);
        }
        let original = match self
            .storage
            .get(&mobile_storage::original_key(media_id))
            .await
        {
            Ok(bytes) => bytes,
            Err(StorageError::NotFound(_)) => {
                return self
                    .finish_failed(row.owner_id, media_id, "the upload is missing from storage")
                    .await;
            }
            Err(e) => return Err(JobError::transient(e.to_string())),
        };

        let (max_pixels, quality) = (self.max_pixels, self.quality);
        let started = Instant::now();
        let rendered = tokio::task::spawn_blocking(move || {
            mobile_media::render(&original, max_pixels, quality)
        })
        .await
        .map_err(|e| JobError::transient(format!("image task failed: {e}")))?;
        self.metrics
            .image_resize_duration
            .observe(started.elapsed().as_secs_f64());
        let renditions = match rendered {
            Ok(renditions) => renditions,
            Err(reason) => {
                tracing::info!(%media_id, %reason, "image rejected");
                return self
                    .finish_failed(row.owner_id, media_id, &reason.to_string())
                    .await;
            }
        };

        let mut variants = BTreeMap::new();
        for rendition in renditions {
            let (name, variant, bytes) = stored_variant(rendition);
            self.storage
                .put(&mobile_storage::variant_key(media_id, name), bytes)
                .await
                .map_err(|e| JobError::transient(e.to_string()))?;
            variants.insert(name.to_owned(), variant);
        }
        if !self
            .settle(row.owner_id, media_id, Outcome::Ready(&variants))
            .await?
            && media::find(&self.db, media_id).await?.is_none()
        {
            // Its owner deleted the account while it was rendered: the `media.delete`
            // job may have run before these variants were stored, so remove them here.
            crate::erase::delete_objects(&self.storage, media_id)
                .await
                .map_err(|e| JobError::transient(e.to_string()))?;
            return Ok(Done::Complete);
        }
        Ok(Done::Complete)
    }

    async fn finish_failed(
        &self,
        owner: UserId,
        media_id: MediaId,
        reason: &str,
    ) -> Result<Done, JobError> {
        self.settle(owner, media_id, Outcome::Failed(reason))
            .await?;
        Ok(Done::Complete)
    }

    /// Marks the media done and records the owner's event (`media.ready` or
    /// `media.failed`) in one transaction, then tells the owner's apps. Returns false if
    /// it was not `processing` (an earlier attempt finished it, or it is gone). A lost
    /// publish costs immediacy only: the event is in the owner's log, which their apps
    /// replay with `since`.
    async fn settle(
        &self,
        owner: UserId,
        media_id: MediaId,
        outcome: Outcome<'_>,
    ) -> Result<bool, JobError> {
        let mut tx = self.db.begin().await?;
        // The owner's row before the media's (see `user_events::hold_users`): an account
        // deletion takes them in that order.
        mobile_db::user_events::hold_users(&mut tx, &[owner]).await?;
        let (changed, event) = match outcome {
            Outcome::Ready(variants) => (
                media::mark_ready(&mut *tx, media_id, variants).await?,
                "media.ready",
            ),
            Outcome::Failed(reason) => (
                media::mark_failed(&mut *tx, media_id, reason).await?,
                "media.failed",
            ),
        };
        let Some(row) = media::find(&mut *tx, media_id).await?.filter(|_| changed) else {
            return Ok(false);
        };
        let data = MediaData::from(row);
        let frames = mobile_events::record_user_events(&mut tx, event, &[(owner, data)]).await?;
        tx.commit().await?;
        if let Err(error) = mobile_events::publish(&self.redis, &frames).await {
            tracing::warn!(%media_id, %error, event, "publishing the media event failed");
        }
        Ok(true)
    }
}

/// How processing ended.
enum Outcome<'a> {
    Ready(&'a BTreeMap<String, Variant>),
    Failed(&'a str),
}

fn stored_variant(rendition: Rendition) -> (&'static str, Variant, Bytes) {
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(&rendition.bytes)));
    let variant = Variant {
        width: rendition.width,
        height: rendition.height,
        content_type: rendition.content_type.to_owned(),
        byte_size: rendition.bytes.len() as u64,
        etag,
    };
    (rendition.name, variant, Bytes::from(rendition.bytes))
}
