//! Login sessions and their rotating refresh tokens.
//!
//! A session is a family of refresh tokens. Each refresh marks the presented token
//! rotated and stores its successor, in one transaction. The `UPDATE ... WHERE
//! rotated_at IS NULL` takes the row lock, so of two concurrent refreshes of one token
//! exactly one rotates it; the other then sees a rotated token, which is what a thief
//! replaying a stolen token looks like, and revokes the family. Two live families can
//! never come out of one token.

use crate::Db;
use crate::metrics::timed;
use mobile_domain::{SessionId, UserId};
use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;

/// SHA-256 of a refresh token: the only form in which one is stored.
pub type TokenHash = [u8; 32];

/// Why a session was revoked, as stored in `sessions.revoked_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    Logout,
    RefreshTokenReuse,
}

impl RevokeReason {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Logout => "logout",
            Self::RefreshTokenReuse => "refresh_token_reuse",
        }
    }
}

/// Starts a session for `user_id` with its first refresh token.
pub async fn create_session(
    conn: &mut PgConnection,
    user_id: UserId,
    token_hash: &TokenHash,
    expires_at: OffsetDateTime,
) -> Result<SessionId, sqlx::Error> {
    timed("sessions.create_session", async move {
        let session_id = SessionId::new();
        sqlx::query("INSERT INTO sessions (id, user_id) VALUES ($1, $2)")
            .bind(session_id)
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
        insert_refresh_token(&mut *conn, session_id, token_hash, expires_at).await?;
        Ok(session_id)
    })
    .await
}

async fn insert_refresh_token(
    db: impl PgExecutor<'_>,
    session_id: SessionId,
    token_hash: &TokenHash,
    expires_at: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, session_id, expires_at) VALUES ($1, $2, $3)",
    )
    .bind(token_hash.as_slice())
    .bind(session_id)
    .bind(expires_at)
    .execute(db)
    .await?;
    Ok(())
}

/// The outcome of [`rotate_refresh_token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The token was live; its successor is now the family's live token.
    Rotated {
        user_id: UserId,
        session_id: SessionId,
    },
    /// The token had already been rotated: the family is now revoked.
    Reused {
        user_id: UserId,
        session_id: SessionId,
    },
    /// Unknown, expired, or its session is revoked.
    Invalid,
}

/// Exchanges the token hashed as `presented` for the one hashed as `successor`, if its
/// session is live and younger than `session_max_age`: refreshing slides a session's
/// end forward, never past that absolute lifetime.
pub async fn rotate_refresh_token(
    db: &Db,
    presented: &TokenHash,
    successor: &TokenHash,
    successor_expires_at: OffsetDateTime,
    session_max_age: std::time::Duration,
) -> Result<Rotation, sqlx::Error> {
    timed("sessions.rotate_refresh_token", async move {
        let max_age_seconds = i64::try_from(session_max_age.as_secs()).unwrap_or(i64::MAX);
        let mut tx = db.begin().await?;
        let rotated: Option<(SessionId, UserId)> = sqlx::query_as(
            "UPDATE refresh_tokens AS t
             SET rotated_at = now()
             FROM sessions AS s
             WHERE t.token_hash = $1
               AND t.rotated_at IS NULL
               AND t.expires_at > now()
               AND s.id = t.session_id
               AND s.revoked_at IS NULL
               AND s.created_at > now() - $2::bigint * interval '1 second'
             RETURNING s.id, s.user_id",
        )
        .bind(presented.as_slice())
        .bind(max_age_seconds)
        .fetch_optional(&mut *tx)
        .await?;

        if let Some((session_id, user_id)) = rotated {
            insert_refresh_token(&mut *tx, session_id, successor, successor_expires_at).await?;
            sqlx::query("UPDATE sessions SET last_refreshed_at = now() WHERE id = $1")
                .bind(session_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(Rotation::Rotated {
                user_id,
                session_id,
            });
        }

        // Not rotatable. A token that exists and was rotated before is a replay.
        let previous: Option<(SessionId, UserId, Option<OffsetDateTime>)> = sqlx::query_as(
            "SELECT t.session_id, s.user_id, t.rotated_at
             FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
             WHERE t.token_hash = $1",
        )
        .bind(presented.as_slice())
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = match previous {
            Some((session_id, user_id, Some(_))) => {
                revoke_session(&mut *tx, session_id, RevokeReason::RefreshTokenReuse).await?;
                Rotation::Reused {
                    user_id,
                    session_id,
                }
            }
            _ => Rotation::Invalid,
        };
        tx.commit().await?;
        Ok(outcome)
    })
    .await
}

/// Revokes a session; revoking a revoked session keeps the first reason.
pub async fn revoke_session(
    db: impl PgExecutor<'_>,
    session_id: SessionId,
    reason: RevokeReason,
) -> Result<bool, sqlx::Error> {
    timed("sessions.revoke_session", async move {
        let result = sqlx::query(
            "UPDATE sessions SET revoked_at = now(), revoked_reason = $2
             WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(session_id)
        .bind(reason.as_str())
        .execute(db)
        .await?;
        Ok(result.rows_affected() == 1)
    })
    .await
}

/// Revokes the session a refresh token belongs to (logout). Returns the session (and
/// its user) if a live one was revoked; an unknown token is not an error.
pub async fn revoke_session_of_token(
    db: impl PgExecutor<'_>,
    token_hash: &TokenHash,
    reason: RevokeReason,
) -> Result<Option<(SessionId, UserId)>, sqlx::Error> {
    timed("sessions.revoke_session_of_token", async move {
        sqlx::query_as(
            "UPDATE sessions SET revoked_at = now(), revoked_reason = $2
             WHERE id = (SELECT session_id FROM refresh_tokens WHERE token_hash = $1)
               AND revoked_at IS NULL
             RETURNING id, user_id",
        )
        .bind(token_hash.as_slice())
        .bind(reason.as_str())
        .fetch_optional(db)
        .await
    })
    .await
}

/// Of `sessions`, those that are live: not revoked, and not deleted with their user.
/// The gateway asks this of the sessions it holds sockets for, in case a revocation's
/// Redis message was lost.
pub async fn live_sessions(
    db: impl PgExecutor<'_>,
    sessions: &[SessionId],
) -> Result<Vec<SessionId>, sqlx::Error> {
    timed("sessions.live_sessions", async move {
        sqlx::query_scalar("SELECT id FROM sessions WHERE id = ANY($1) AND revoked_at IS NULL")
            .bind(sessions)
            .fetch_all(db)
            .await
    })
    .await
}

/// The revocation reason of a session, `None` while it is live.
pub async fn revoked_reason(
    db: impl PgExecutor<'_>,
    session_id: SessionId,
) -> Result<Option<String>, sqlx::Error> {
    timed("sessions.revoked_reason", async move {
        sqlx::query_scalar("SELECT revoked_reason FROM sessions WHERE id = $1")
            .bind(session_id)
            .fetch_one(db)
            .await
    })
    .await
}

#[cfg(test)]
mod tests {
    use mobile_domain::{DisplayName, Email};
    use time::Duration;

    use super::*;
    use crate::users::{InsertUser, insert_user};

    async fn user(pool: &crate::Db) -> UserId {
        let email = Email::parse("ann@example.com").unwrap();
        let name = DisplayName::parse("Ann").unwrap();
        match insert_user(pool, &email, "hash", &name).await.unwrap() {
            InsertUser::Inserted(user) => user.id,
            InsertUser::EmailTaken => unreachable!(),
        }
    }

    fn later() -> OffsetDateTime {
        OffsetDateTime::now_utc() + Duration::days(1)
    }

    const MAX_AGE: std::time::Duration = std::time::Duration::from_secs(90 * 86_400);

    #[tokio::test]
    async fn rotation_then_reuse_revokes_the_family() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let user_id = user(&pool).await;
        let mut conn = pool.pool().acquire().await.unwrap();
        let session = create_session(&mut conn, user_id, &[1; 32], later())
            .await
            .unwrap();

        let first = rotate_refresh_token(&pool, &[1; 32], &[2; 32], later(), MAX_AGE)
            .await
            .unwrap();
        assert_eq!(
            first,
            Rotation::Rotated {
                user_id,
                session_id: session
            }
        );

        let replay = rotate_refresh_token(&pool, &[1; 32], &[3; 32], later(), MAX_AGE)
            .await
            .unwrap();
        assert_eq!(
            replay,
            Rotation::Reused {
                user_id,
                session_id: session
            }
        );
        assert_eq!(
            revoked_reason(&pool, session).await.unwrap().as_deref(),
            Some("refresh_token_reuse")
        );

        // The successor died with its family.
        let successor = rotate_refresh_token(&pool, &[2; 32], &[4; 32], later(), MAX_AGE)
            .await
            .unwrap();
        assert_eq!(successor, Rotation::Invalid);
    }

    #[tokio::test]
    async fn expired_and_unknown_tokens_are_invalid() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let user_id = user(&pool).await;
        let mut conn = pool.pool().acquire().await.unwrap();
        let past = OffsetDateTime::now_utc() - Duration::seconds(1);
        create_session(&mut conn, user_id, &[1; 32], past)
            .await
            .unwrap();

        assert_eq!(
            rotate_refresh_token(&pool, &[1; 32], &[2; 32], later(), MAX_AGE)
                .await
                .unwrap(),
            Rotation::Invalid
        );
        assert_eq!(
            rotate_refresh_token(&pool, &[9; 32], &[2; 32], later(), MAX_AGE)
                .await
                .unwrap(),
            Rotation::Invalid
        );
    }

    #[tokio::test]
    async fn a_session_ends_at_its_absolute_lifetime_however_often_it_refreshed() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let user_id = user(&pool).await;
        let mut conn = pool.pool().acquire().await.unwrap();
        let session = create_session(&mut conn, user_id, &[1; 32], later())
            .await
            .unwrap();
        sqlx::query("UPDATE sessions SET created_at = now() - interval '89 days' WHERE id = $1")
            .bind(session)
            .execute(&pool)
            .await
            .unwrap();
        assert!(matches!(
            rotate_refresh_token(&pool, &[1; 32], &[2; 32], later(), MAX_AGE)
                .await
                .unwrap(),
            Rotation::Rotated { .. }
        ));
        sqlx::query("UPDATE sessions SET created_at = now() - interval '91 days' WHERE id = $1")
            .bind(session)
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(
            rotate_refresh_token(&pool, &[2; 32], &[3; 32], later(), MAX_AGE)
                .await
                .unwrap(),
            Rotation::Invalid
        );
    }

    #[tokio::test]
    async fn logout_revokes_once() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let user_id = user(&pool).await;
        let mut conn = pool.pool().acquire().await.unwrap();
        let session = create_session(&mut conn, user_id, &[1; 32], later())
            .await
            .unwrap();

        assert_eq!(
            live_sessions(&pool, &[session, SessionId::new()])
                .await
                .unwrap(),
            [session]
        );
        assert_eq!(
            revoke_session_of_token(&pool, &[1; 32], RevokeReason::Logout)
                .await
                .unwrap(),
            Some((session, user_id))
        );
        assert_eq!(
            revoke_session_of_token(&pool, &[1; 32], RevokeReason::Logout)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            revoke_session_of_token(&pool, &[7; 32], RevokeReason::Logout)
                .await
                .unwrap(),
            None
        );
        assert!(live_sessions(&pool, &[session]).await.unwrap().is_empty());
        assert_eq!(
            revoked_reason(&pool, session).await.unwrap().as_deref(),
            Some("logout")
        );
        assert_eq!(
            rotate_refresh_token(&pool, &[1; 32], &[2; 32], later(), MAX_AGE)
                .await
                .unwrap(),
            Rotation::Invalid
        );
    }
}
