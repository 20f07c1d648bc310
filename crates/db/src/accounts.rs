//! Account deletion: what goes at once, what a job removes after, and what stays.
//!
//! [`delete_account`] does, in one transaction (the user's row locked first, so an
//! upload, a device or a conversation created at the same moment with a still-valid
//! access token either commits before and is deleted with the rest, or sees the account
//! gone and is refused):
//!
//! - ends and deletes every session and refresh token, every device, and every identity
//!   at Apple or Google (signing in with them again makes a new account);
//! - deletes every upload's row and enqueues a `media.delete` job per upload for its
//!   objects (the original and the variants) in storage; a message that carried one
//!   keeps no reference to it;
//! - removes the user from every conversation (a `member.removed` event, reason
//!   `account_deleted`, in each, the ownership handed on where they owned it), and
//!   deletes the conversations no one else is in (with their messages);
//! - deletes the jobs that carry the user's data (pushes to them, their uploads'
//!   processing, mails to them) and their email links' tokens, and enqueues one `account.forget` job, which deletes what Redis holds
//!   under their id (stored idempotent responses);
//! - keeps the row as a tombstone: the id, `display_name` "Deleted account", an
//!   address under `.invalid` that no one can sign in with, no password, `deleted_at`.
//!
//! What stays, by policy: the messages the user sent in conversations others are still
//! in, under that tombstone. They are the other members' history too (as an email sent
//! is the recipient's), and their seqs must stay gap-free; their text is kept, their
//! media is not. Everything else of the user is gone from PostgreSQL at commit, from
//! storage and Redis when the jobs have run, and from Redis's short-lived counters
//! (rate limits, sign-in failures, presence) within their TTLs.

use mobile_domain::{ConversationId, JobKind, MediaId, RemovalReason, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;

use crate::jobs::{self, Payload};
use crate::members::{self, RemoveMember};
use crate::metrics::timed;

/// The display name a deleted account shows under its messages.
pub const DELETED_DISPLAY_NAME: &str = "Deleted account";

/// The `media.delete` job: remove one upload's objects from storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteMediaJob {
    pub media_id: MediaId,
}

impl Payload for DeleteMediaJob {
    const KIND: JobKind = JobKind::MediaDelete;
}

/// The `account.forget` job: remove what Redis holds under a deleted user's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetAccountJob {
    pub user_id: UserId,
}

impl Payload for ForgetAccountJob {
    const KIND: JobKind = JobKind::AccountForget;
}

/// The outcome of [`delete_account`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    /// Deleted now; how many uploads wait for their objects to be removed, and the
    /// `member.removed` events of the conversations the user left.
    Deleted { uploads: usize, left: Vec<Left> },
    /// Deleted before: nothing to do.
    AlreadyDeleted,
    /// No such user.
    NotFound,
}

/// A conversation a deleted account left: its `member.removed` event, to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub conversation: ConversationId,
    pub seq: i64,
    pub data: String,
}

/// Deletes the account `user_id` inside the caller's transaction (see the module).
pub async fn delete_account(
    conn: &mut PgConnection,
    user_id: UserId,
) -> Result<Deletion, sqlx::Error> {
    timed("accounts.delete_account", async move {
        let row: Option<(bool, String)> = sqlx::query_as(
            "SELECT deleted_at IS NOT NULL, email FROM users WHERE id = $1 FOR UPDATE",
        )
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
        let email = match row {
            None => return Ok(Deletion::NotFound),
            Some((true, _)) => return Ok(Deletion::AlreadyDeleted),
            Some((false, email)) => email,
        };

        let uploads: Vec<MediaId> = sqlx::query_scalar("SELECT id FROM media WHERE owner_id = $1")
            .bind(user_id)
            .fetch_all(&mut *conn)
            .await?;
        let payloads = uploads
            .iter()
            .map(|&media_id| serde_json::to_value(DeleteMediaJob { media_id }))
            .collect::<Result<Vec<Value>, _>>()
            .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        jobs::enqueue_values(
            &mut *conn,
            JobKind::MediaDelete,
            &payloads,
            DeleteMediaJob::MAX_ATTEMPTS,
        )
        .await?;
        jobs::enqueue(&mut *conn, &ForgetAccountJob { user_id }.to_job()?).await?;

        let upload_ids: Vec<String> = uploads.iter().map(ToString::to_string).collect();
        sqlx::query(
            "DELETE FROM jobs
             WHERE (kind = 'push.notify' AND payload->>'user_id' = $1::uuid::text)
                OR (kind = 'push.send' AND payload->'notification'->>'user_id' = $1::uuid::text)
                OR (kind = 'media.process' AND payload->>'media_id' = ANY($2))
                OR (kind = 'mail.send' AND (payload->>'user_id' = $1::uuid::text OR payload->>'email' = $3))",
        )
        .bind(user_id)
        .bind(&upload_ids)
        .bind(&email)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "UPDATE messages SET media_id = NULL WHERE sender_id = $1 AND media_id IS NOT NULL",
        )
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
        sqlx::query("DELETE FROM media WHERE owner_id = $1")
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
        // Conversations no one else is in go whole; from the others, the user leaves.
        // Their rows are locked first, in id order (as every deletion does), so two
        // members deleting their accounts at once cannot each see the other still in
        // and leave a conversation with no one.
        let memberships: Vec<(ConversationId, UserId)> = sqlx::query_as(
            "SELECT c.id, c.owner_id FROM conversations c
             JOIN conversation_members m ON m.conversation_id = c.id AND m.user_id = $1
             ORDER BY c.id FOR UPDATE OF c",
        )
        .bind(user_id)
        .fetch_all(&mut *conn)
        .await?;
        sqlx::query(
            "DELETE FROM conversations c
             WHERE EXISTS (SELECT 1 FROM conversation_members m
                           WHERE m.conversation_id = c.id AND m.user_id = $1)
               AND NOT EXISTS (SELECT 1 FROM conversation_members m
                               WHERE m.conversation_id = c.id AND m.user_id <> $1)",
        )
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
        // Leaving each of the others is an event the remaining members see.
        let mut left = Vec::new();
        for (conversation, owner) in memberships {
            let removal = members::remove_locked(
                &mut *conn,
                conversation,
                user_id,
                user_id,
                RemovalReason::AccountDeleted,
                owner,
            )
            .await?;
            if let RemoveMember::Removed { seq, data } = removal {
                left.push(Left {
                    conversation,
                    seq,
                    data,
                });
            }
        }
        sqlx::query("DELETE FROM devices WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
        // Their own channel's log; what others' logs say of them (a conversation's
        // member list) is those users' record, pruned with their window.
        sqlx::query("DELETE FROM user_events WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM user_event_heads WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM email_tokens WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM identities WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "UPDATE users
             SET email = id::text || '@deleted.invalid', password_hash = '', email_verified_at = NULL,
                 display_name = $2, deleted_at = now(), updated_at = now()
             WHERE id = $1",
        )
        .bind(user_id)
        .bind(DELETED_DISPLAY_NAME)
        .execute(&mut *conn)
        .await?;
        Ok(Deletion::Deleted {
            uploads: uploads.len(),
            left,
        })
    })
    .await
}

/// Whether `user_id` names an account that was deleted.
pub async fn is_deleted(
    db: impl sqlx::PgExecutor<'_>,
    user_id: UserId,
) -> Result<bool, sqlx::Error> {
    timed("accounts.is_deleted", async move {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1 AND deleted_at IS NOT NULL)",
        )
        .bind(user_id)
        .fetch_one(db)
        .await
    })
    .await
}
