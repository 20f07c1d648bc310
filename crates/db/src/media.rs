//! Media: uploaded images, their processing status and their variants.
//!
//! The API inserts a row (`processing`) in the same transaction as the job that
//! processes it; the worker marks it [`mark_ready`] with the variants it stored, or
//! [`mark_failed`] with the reason.

use crate::metrics::timed;
use std::collections::BTreeMap;

use mobile_domain::{JobKind, MediaId, MediaStatus, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgExecutor;
use time::OffsetDateTime;

use crate::jobs::Payload;

/// A media row as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Media {
    pub id: MediaId,
    pub owner_id: UserId,
    pub status: MediaStatus,
    pub content_type: String,
    pub byte_size: i64,
    pub variants: sqlx::types::Json<BTreeMap<String, Variant>>,
    pub failure_reason: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// One stored rendition (`thumb`, `medium`, `large`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    pub width: u32,
    pub height: u32,
    pub content_type: String,
    pub byte_size: u64,
    /// A strong validator of the bytes (hex SHA-256, quoted as HTTP wants it).
    pub etag: String,
}

/// The `media.process` job: make the variants of one upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessJob {
    pub media_id: MediaId,
}

impl Payload for ProcessJob {
    const KIND: JobKind = JobKind::MediaProcess;
}

/// Records an upload whose original is already in object storage; `false` (nothing
/// recorded) if the owner's account was deleted meanwhile.
pub async fn insert(
    db: impl PgExecutor<'_>,
    id: MediaId,
    owner_id: UserId,
    content_type: &str,
    byte_size: i64,
) -> Result<bool, sqlx::Error> {
    timed("media.insert", async move {
        let result = sqlx::query(
            "INSERT INTO media (id, owner_id, content_type, byte_size)
             SELECT $1, $2, $3, $4
             WHERE EXISTS (SELECT 1 FROM users WHERE id = $2 AND deleted_at IS NULL FOR SHARE)",
        )
        .bind(id)
        .bind(owner_id)
        .bind(content_type)
        .bind(byte_size)
        .execute(db)
        .await?;
        Ok(result.rows_affected() == 1)
    })
    .await
}

pub async fn find(db: impl PgExecutor<'_>, id: MediaId) -> Result<Option<Media>, sqlx::Error> {
    timed("media.find", async move {
        sqlx::query_as(
            "SELECT id, owner_id, status, content_type, byte_size, variants, failure_reason, created_at, updated_at
             FROM media WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(db)
        .await
    })
    .await
}

/// The media, if `user_id` may see it: its owner, or a member of a conversation it was
/// posted to. Anyone else gets `None`, as if it did not exist.
pub async fn find_visible(
    db: impl PgExecutor<'_>,
    id: MediaId,
    user_id: UserId,
) -> Result<Option<Media>, sqlx::Error> {
    timed("media.find_visible", async move {
        sqlx::query_as(
            "SELECT id, owner_id, status, content_type, byte_size, variants, failure_reason, created_at, updated_at
             FROM media m
             WHERE m.id = $1 AND (
                 m.owner_id = $2 OR EXISTS (
                     SELECT 1 FROM messages msg
                     JOIN conversation_members cm ON cm.conversation_id = msg.conversation_id
                     WHERE msg.media_id = m.id AND cm.user_id = $2
                 )
             )",
        )
        .bind(id)
        .bind(user_id)
        .fetch_optional(db)
        .await
    })
    .await
}

/// Whether `owner_id` may attach the media to a message: it is theirs and did not fail.
pub async fn attachable(
    db: impl PgExecutor<'_>,
    id: MediaId,
    owner_id: UserId,
) -> Result<bool, sqlx::Error> {
    timed("media.attachable", async move {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM media WHERE id = $1 AND owner_id = $2 AND status <> 'failed')",
        )
        .bind(id)
        .bind(owner_id)
        .fetch_one(db)
        .await
    })
    .await
}

/// Marks the media ready with its variants. Returns false if it was not `processing`
/// (already done by an earlier attempt).
pub async fn mark_ready(
    db: impl PgExecutor<'_>,
    id: MediaId,
    variants: &BTreeMap<String, Variant>,
) -> Result<bool, sqlx::Error> {
    timed("media.mark_ready", async move {
        let variants = serde_json::to_value(variants).unwrap_or(Value::Null);
        let result = sqlx::query(
            "UPDATE media SET status = 'ready', variants = $2, failure_reason = NULL, updated_at = now()
             WHERE id = $1 AND status = 'processing'",
        )
        .bind(id)
        .bind(variants)
        .execute(db)
        .await?;
        Ok(result.rows_affected() == 1)
    })
    .await
}

/// Marks the media failed with a reason a client can show.
pub async fn mark_failed(
    db: impl PgExecutor<'_>,
    id: MediaId,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    timed("media.mark_failed", async move {
        let result = sqlx::query(
            "UPDATE media SET status = 'failed', failure_reason = $2, updated_at = now()
             WHERE id = $1 AND status = 'processing'",
        )
        .bind(id)
        .bind(reason)
        .execute(db)
        .await?;
        Ok(result.rows_affected() == 1)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn user(pool: &crate::Db) -> UserId {
        let id = UserId::new();
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, display_name) VALUES ($1, $2, 'x', 'U')",
        )
        .bind(id)
        .bind(format!("{id}@example.com"))
        .execute(pool)
        .await
        .unwrap();
        id
    }

    #[tokio::test]
    async fn a_media_row_goes_from_processing_to_ready_once() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let (owner, stranger) = (user(&pool).await, user(&pool).await);
        let id = MediaId::new();
        insert(&pool, id, owner, "image/jpeg", 1234).await.unwrap();
        assert!(attachable(&pool, id, owner).await.unwrap());
        assert!(!attachable(&pool, id, stranger).await.unwrap());
        assert!(find_visible(&pool, id, stranger).await.unwrap().is_none());

        let variants = BTreeMap::from([(
            "thumb".to_owned(),
            Variant {
                width: 256,
                height: 192,
                content_type: "image/jpeg".into(),
                byte_size: 10,
                etag: "\"abc\"".into(),
            },
        )]);
        assert!(mark_ready(&pool, id, &variants).await.unwrap());
        assert!(
            !mark_ready(&pool, id, &variants).await.unwrap(),
            "only once"
        );
        assert!(!mark_failed(&pool, id, "late").await.unwrap());
        let media = find_visible(&pool, id, owner).await.unwrap().unwrap();
        assert_eq!(media.status, MediaStatus::Ready);
        assert_eq!(media.variants.0, variants);
    }

    #[tokio::test]
    async fn failed_media_cannot_be_attached() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let owner = user(&pool).await;
        let id = MediaId::new();
        insert(&pool, id, owner, "image/png", 1).await.unwrap();
        assert!(mark_failed(&pool, id, "not an image").await.unwrap());
        assert!(!attachable(&pool, id, owner).await.unwrap());
        let media = find(&pool, id).await.unwrap().unwrap();
        assert_eq!(media.failure_reason.as_deref(), Some("not an image"));
    }
}
