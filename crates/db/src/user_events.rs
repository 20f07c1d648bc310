//! The `user:` channel's log: each event for a user (`conversation.created`, `.joined`,
//! `.left`, `.read`, `media.ready`, `media.failed`, `notification`) takes the user's next
//! offset in the transaction of the change that caused it, so offsets are 1, 2, 3, ...
//! with no gaps, and an app replays what it missed with `since` as it does on a
//! conversation.
//!
//! Each user keeps their newest [`KEPT`] events; older ones are pruned as new ones are
//! written. An app further behind than that refreshes its state over REST (the
//! conversation list carries read positions and unread counts; a media its status).

use mobile_domain::UserId;
use sqlx::{PgConnection, PgExecutor};

use crate::metrics::timed;

/// Events kept per user.
pub const KEPT: i64 = 1_000;

/// One event of a user's log.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserEvent {
    pub user_id: UserId,
    pub seq: i64,
    pub kind: String,
    /// The JSON text that was published as the frame's `data`.
    pub data: String,
}

/// Records `kind` for each of `events` (user, data), inside the caller's transaction;
/// returns each with the offset it took. The users' counters are taken in id order, so
/// two transactions recording for overlapping users queue instead of deadlocking.
pub async fn record(
    conn: &mut PgConnection,
    kind: &str,
    events: &[(UserId, String)],
) -> Result<Vec<UserEvent>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    timed("user_events.record", async move {
        let mut sorted: Vec<&(UserId, String)> = events.iter().collect();
        sorted.sort_unstable_by_key(|(user, _)| *user);
        sorted.dedup_by_key(|(user, _)| *user);
        let users: Vec<UserId> = sorted.iter().map(|(user, _)| *user).collect();
        let data: Vec<&str> = sorted.iter().map(|(_, data)| data.as_str()).collect();
        let recorded: Vec<UserEvent> = sqlx::query_as(
            "WITH heads AS (
                 INSERT INTO user_event_heads (user_id, last_seq)
                 SELECT user_id, 1 FROM unnest($1::uuid[]) AS u(user_id)
                 ON CONFLICT (user_id) DO UPDATE SET last_seq = user_event_heads.last_seq + 1
                 RETURNING user_id, last_seq
             )
             INSERT INTO user_events (user_id, seq, kind, data)
             SELECT h.user_id, h.last_seq, $2, e.data
             FROM heads h JOIN unnest($1::uuid[], $3::text[]) AS e(user_id, data) ON e.user_id = h.user_id
             RETURNING user_id, seq, kind, data",
        )
        .bind(&users)
        .bind(kind)
        .bind(&data)
        .fetch_all(&mut *conn)
        .await?;
        // Prune what fell out of the window (by the primary key: a short range scan).
        sqlx::query(
            "DELETE FROM user_events e
             USING unnest($1::uuid[]) AS u(user_id)
             JOIN user_event_heads h ON h.user_id = u.user_id
             WHERE e.user_id = u.user_id AND e.seq <= h.last_seq - $2",
        )
        .bind(&users)
        .bind(KEPT)
        .execute(&mut *conn)
        .await?;
        Ok(recorded)
    })
    .await
}

/// Takes `users`' rows in the mode the log's foreign key will (`FOR KEY SHARE`), in id
/// order. A transaction that will record an event for a user calls this before it
/// locks anything else: account deletion locks the user's row first and their
/// conversations, memberships and uploads after, so taking the row later, at the
/// insert, while holding one of those, could deadlock with it.
pub async fn hold_users(conn: &mut PgConnection, users: &[UserId]) -> Result<(), sqlx::Error> {
    let mut users = users.to_vec();
    users.sort_unstable();
    users.dedup();
    sqlx::query("SELECT 1 FROM users WHERE id = ANY($1) ORDER BY id FOR KEY SHARE")
        .bind(&users)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The newest offset of `user`'s log (0 before the first event).
pub async fn last_seq(db: impl PgExecutor<'_>, user: UserId) -> Result<i64, sqlx::Error> {
    timed("user_events.last_seq", async move {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT last_seq FROM user_event_heads WHERE user_id = $1")
                .bind(user)
                .fetch_optional(db)
                .await?;
        Ok(seq.unwrap_or(0))
    })
    .await
}

/// The newest offset of each of `users`' logs that has one (for a gateway catching up
/// after it lost its Redis subscription).
pub async fn last_seqs(
    db: impl PgExecutor<'_>,
    users: &[UserId],
) -> Result<Vec<(UserId, i64)>, sqlx::Error> {
    timed("user_events.last_seqs", async move {
        sqlx::query_as("SELECT user_id, last_seq FROM user_event_heads WHERE user_id = ANY($1)")
            .bind(users)
            .fetch_all(db)
            .await
    })
    .await
}

/// `user`'s events with offsets in `after + 1 ..= upto`, at most `limit`, in order. The
/// first may be later than `after + 1` if older ones were pruned.
pub async fn list(
    db: impl PgExecutor<'_>,
    user: UserId,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<UserEvent>, sqlx::Error> {
    timed("user_events.list", async move {
        sqlx::query_as(
            "SELECT user_id, seq, kind, data FROM user_events
             WHERE user_id = $1 AND seq > $2 AND seq <= $3
             ORDER BY seq LIMIT $4",
        )
        .bind(user)
        .bind(after)
        .bind(upto)
        .bind(limit)
        .fetch_all(db)
        .await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn user(pool: &crate::Db) -> UserId {
        let id = UserId::new();
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, display_name) VALUES ($1, $1::text || '@example.com', '', 'U')",
        )
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
        id
    }

    #[tokio::test]
    async fn each_user_gets_gap_free_offsets_and_keeps_the_newest() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let (ann, bob) = (user(&pool).await, user(&pool).await);
        assert_eq!(last_seq(&pool, ann).await.unwrap(), 0);

        // Concurrent recordings for overlapping users: no gap, no duplicate, no deadlock.
        let writers = (0..20).map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                let events = [
                    (bob, format!("{{\"i\":{i}}}")),
                    (ann, format!("{{\"i\":{i}}}")),
                ];
                record(&mut tx, "test", &events).await.unwrap();
                tx.commit().await.unwrap();
            })
        });
        for writer in writers {
            writer.await.unwrap();
        }
        for who in [ann, bob] {
            let seqs: Vec<i64> = list(&pool, who, 0, 100, 100)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect();
            assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        }
        // A rolled-back recording gives its offset back.
        let mut tx = pool.begin().await.unwrap();
        record(&mut tx, "test", &[(ann, "{}".into())])
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(last_seq(&pool, ann).await.unwrap(), 20);

        // Past KEPT, the oldest go.
        let mut tx = pool.begin().await.unwrap();
        for _ in 0..KEPT {
            record(&mut tx, "test", &[(ann, "{}".into())])
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let kept = list(&pool, ann, 0, i64::MAX, 5).await.unwrap();
        assert_eq!(kept[0].seq, 21, "the first {} went", 20);
        assert_eq!(last_seqs(&pool, &[ann, bob]).await.unwrap().len(), 2);
    }
}
