//! Who is in a conversation, and each member's place in it: joining and leaving as
//! events on the conversation's log, the read position, and mute.
//!
//! The role model is small: the creator owns the conversation; the owner adds and
//! removes members; any member leaves (removes themself). When the owner leaves, the
//! member who has been in longest becomes the owner, so a group is never headless;
//! when the last member leaves, the conversation is gone.

use mobile_domain::{
    ConversationEventKind, ConversationId, MemberAdded, MemberRemoved, RemovalReason, UserId,
};
use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;

use crate::{
    conversations::{MAX_MEMBERS, encode, lock_as_member, record},
    metrics::timed,
    user_events,
};

/// The outcome of [`add_members`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddMembers {
    /// `member.added` is at `seq`, with `data`; `added` are the new members.
    Added {
        seq: i64,
        data: String,
        added: Vec<UserId>,
    },
    /// Everyone named is a member already: no event.
    NothingNew,
    /// No such conversation of the caller's.
    NotFound,
    /// Only the owner adds members.
    NotOwner,
    /// These ids name no user (or a deleted account).
    UnknownMembers(Vec<UserId>),
    /// More than [`MAX_MEMBERS`] in all.
    TooMany,
}

/// The owner `by` adds `users` to `conversation`, inside the caller's transaction.
/// Anything but `Added` leaves the database as it was.
pub async fn add_members(
    conn: &mut PgConnection,
    conversation: ConversationId,
    by: UserId,
    users: &[UserId],
) -> Result<AddMembers, sqlx::Error> {
    timed("members.add_members", async move {
        let Some(locked) = lock_as_member(&mut *conn, conversation, by).await? else {
            return Ok(AddMembers::NotFound);
        };
        if locked.owner_id != by {
            return Ok(AddMembers::NotOwner);
        }
        let mut users = users.to_vec();
        users.sort_unstable();
        users.dedup();
        let current: Vec<UserId> = sqlx::query_scalar(
            "SELECT user_id FROM conversation_members WHERE conversation_id = $1",
        )
        .bind(conversation)
        .fetch_all(&mut *conn)
        .await?;
        users.retain(|user| !current.contains(user));
        if users.is_empty() {
            return Ok(AddMembers::NothingNew);
        }
        if current.len() + users.len() > MAX_MEMBERS {
            return Ok(AddMembers::TooMany);
        }
        // The new members' rows are held (as the foreign key would), so an account
        // deleted meanwhile is either refused here or waits for this commit.
        let live: Vec<UserId> = sqlx::query_scalar(
            "SELECT id FROM users WHERE id = ANY($1) AND deleted_at IS NULL ORDER BY id FOR KEY SHARE",
        )
        .bind(&users)
        .fetch_all(&mut *conn)
        .await?;
        if live.len() != users.len() {
            let unknown = users.into_iter().filter(|u| !live.contains(u)).collect();
            return Ok(AddMembers::UnknownMembers(unknown));
        }
        sqlx::query(
            "INSERT INTO conversation_members (conversation_id, user_id)
             SELECT $1, unnest($2::uuid[])",
        )
        .bind(conversation)
        .bind(&users)
        .execute(&mut *conn)
        .await?;
        let data = encode(&MemberAdded {
            user_ids: users.clone(),
            by,
        })?;
        let seq = record(
            conn,
            conversation,
            ConversationEventKind::MemberAdded,
            None,
            Some(&data),
        )
        .await?;
        Ok(AddMembers::Added {
            seq,
            data,
            added: users,
        })
    })
    .await
}

/// The outcome of [`remove_member`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveMember {
    /// `member.removed` is at `seq`, with `data`.
    Removed { seq: i64, data: String },
    /// The last member left: the conversation is gone, and no one is left to tell.
    Dissolved,
    /// No such conversation of the caller's.
    NotFound,
    /// The user named is not a member.
    NotMember,
    /// Only the owner removes others.
    NotOwner,
}

/// `by` removes `user` from `conversation` (themself: leaving), inside the caller's
/// transaction. Anything but `Removed` and `Dissolved` leaves the database as it was.
pub async fn remove_member(
    conn: &mut PgConnection,
    conversation: ConversationId,
    by: UserId,
    user: UserId,
) -> Result<RemoveMember, sqlx::Error> {
    timed("members.remove_member", async move {
        // The removed member's row before the conversation: their `conversation.left`
        // is recorded under it (see `user_events::hold_users`).
        user_events::hold_users(&mut *conn, &[by, user]).await?;
        let Some(locked) = lock_as_member(&mut *conn, conversation, by).await? else {
            return Ok(RemoveMember::NotFound);
        };
        let reason = if by == user {
            RemovalReason::Left
        } else if locked.owner_id == by {
            RemovalReason::Removed
        } else {
            return Ok(RemoveMember::NotOwner);
        };
        remove_locked(conn, conversation, user, by, reason, locked.owner_id).await
    })
    .await
}

/// Removes `user` from a conversation whose lock the caller holds; records the event,
/// and hands the ownership on if the owner is the one leaving.
pub(crate) async fn remove_locked(
    conn: &mut PgConnection,
    conversation: ConversationId,
    user: UserId,
    by: UserId,
    reason: RemovalReason,
    owner: UserId,
) -> Result<RemoveMember, sqlx::Error> {
    let removed =
        sqlx::query("DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = $2")
            .bind(conversation)
            .bind(user)
            .execute(&mut *conn)
            .await?;
    if removed.rows_affected() == 0 {
        return Ok(RemoveMember::NotMember);
    }
    let owner_id = if owner == user {
        let Some(next) = next_owner(&mut *conn, conversation).await? else {
            sqlx::query("DELETE FROM conversations WHERE id = $1")
                .bind(conversation)
                .execute(&mut *conn)
                .await?;
            return Ok(RemoveMember::Dissolved);
        };
        sqlx::query("UPDATE conversations SET owner_id = $2 WHERE id = $1")
            .bind(conversation)
            .bind(next)
            .execute(&mut *conn)
            .await?;
        next
    } else {
        owner
    };
    let data = encode(&MemberRemoved {
        user_id: user,
        reason,
        by,
        owner_id,
    })?;
    let seq = record(
        conn,
        conversation,
        ConversationEventKind::MemberRemoved,
        None,
        Some(&data),
    )
    .await?;
    Ok(RemoveMember::Removed { seq, data })
}

/// Who owns `conversation` once its owner has left (their row is gone already): the
/// member who has been in longest, `None` if no one is left.
///
/// Making them the owner takes their user row (`FOR KEY SHARE`, for the foreign key)
/// while this transaction holds the conversation. An account deletion takes its row
/// first and the conversation after, so waiting for the row of a member who is deleting
/// their account right now would be a deadlock: such a member is passed over (they are
/// leaving anyway) for the next one whose row is free (so is, rarely, a member whose
/// own profile change holds their row at that instant). Only when every member left is
/// in that state does this wait, and then PostgreSQL breaks the cycle by failing one of
/// the two transactions, which the API answers with a 503 to retry.
async fn next_owner(
    conn: &mut PgConnection,
    conversation: ConversationId,
) -> Result<Option<UserId>, sqlx::Error> {
    let free: Option<UserId> = sqlx::query_scalar(
        "SELECT m.user_id FROM conversation_members m JOIN users u ON u.id = m.user_id
         WHERE m.conversation_id = $1
         ORDER BY m.joined_at, m.user_id LIMIT 1
         FOR KEY SHARE OF u SKIP LOCKED",
    )
    .bind(conversation)
    .fetch_optional(&mut *conn)
    .await?;
    if free.is_some() {
        return Ok(free);
    }
    sqlx::query_scalar(
        "SELECT user_id FROM conversation_members WHERE conversation_id = $1
         ORDER BY joined_at, user_id LIMIT 1",
    )
    .bind(conversation)
    .fetch_optional(&mut *conn)
    .await
}

/// A member's read position after [`mark_read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadState {
    /// The newest offset read.
    pub read_seq: i64,
    /// Whether this call moved it.
    pub advanced: bool,
}

/// Moves `user`'s read position in `conversation` up to `seq` (at most the newest
/// offset), inside the caller's transaction; an older position is a no-op. `None`: not
/// a member.
pub async fn mark_read(
    conn: &mut PgConnection,
    user: UserId,
    conversation: ConversationId,
    seq: i64,
) -> Result<Option<ReadState>, sqlx::Error> {
    timed("members.mark_read", async move {
        // The reader's row before their membership: `conversation.read` is recorded
        // under it (see `user_events::hold_users`).
        user_events::hold_users(&mut *conn, &[user]).await?;
        let before: Option<(i64, i64)> = sqlx::query_as(
            "SELECT m.read_seq, c.last_seq
             FROM conversation_members m JOIN conversations c ON c.id = m.conversation_id
             WHERE m.conversation_id = $1 AND m.user_id = $2
             FOR NO KEY UPDATE OF m",
        )
        .bind(conversation)
        .bind(user)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((read_seq, last_seq)) = before else {
            return Ok(None);
        };
        let target = seq.min(last_seq);
        if target <= read_seq {
            return Ok(Some(ReadState {
                read_seq,
                advanced: false,
            }));
        }
        sqlx::query(
            "UPDATE conversation_members SET read_seq = $3 WHERE conversation_id = $1 AND user_id = $2",
        )
        .bind(conversation)
        .bind(user)
        .bind(target)
        .execute(&mut *conn)
        .await?;
        Ok(Some(ReadState {
            read_seq: target,
            advanced: true,
        }))
    })
    .await
}

/// Mutes `conversation` for `user` until `until` (`None`: for good), or unmutes it
/// (`mute` false). `false`: not a member.
pub async fn set_mute(
    db: impl PgExecutor<'_>,
    user: UserId,
    conversation: ConversationId,
    mute: bool,
    until: Option<OffsetDateTime>,
) -> Result<bool, sqlx::Error> {
    timed("members.set_mute", async move {
        let updated = sqlx::query(
            "UPDATE conversation_members
             SET muted_until = CASE WHEN $3 THEN coalesce($4::timestamptz, 'infinity') END
             WHERE conversation_id = $1 AND user_id = $2",
        )
        .bind(conversation)
        .bind(user)
        .bind(mute)
        .bind(until)
        .execute(db)
        .await?;
        Ok(updated.rows_affected() == 1)
    })
    .await
}
