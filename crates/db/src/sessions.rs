//! Login sessions and their rotating refresh tokens.
//!
//! A session is a family of refresh tokens. Each refresh marks the presented token
//! rotated and stores its successor, in one transaction. The `UPDATE ... WHERE
//! rotated_at IS NULL` takes the row lock, so of two concurrent refreshes of one token
//! exactly one rotates it; the other then sees a rotated token, which is what a thief
//! replaying a stolen token looks like, and revokes the family. Two live families can
//! never come out of one token.
//!
//! Ending a session, for whatever reason, also removes the devices it registered
//! (`devices.session_id`): a phone signed out from elsewhere gets no more pushes.

use crate::Db;
use crate::metrics::timed;
use mobile_domain::{DeviceId, Platform, SessionId, UserId};
use sqlx::{PgConnection, PgExecutor};
use time::OffsetDateTime;

/// SHA-256 of a refresh token: the only form in which one is stored.
pub type TokenHash = [u8; 32];

/// Why a session was revoked, as stored in `sessions.revoked_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    Logout,
    RefreshTokenReuse,
    /// Ended by its user from another session (`DELETE /v1/sessions/{id}`).
    Ended,
    /// `POST /v1/auth/logout-all`.
    LogoutAll,
    /// The password changed (every session but the one that changed it).
    PasswordChanged,
    /// The password was reset by mail (every session).
    PasswordReset,
    /// An email change was undone from its notice (every session).
    EmailRestored,
    /// A provider's verified identity took over the account (`crate::identities`).
    IdentityLinked,
}

impl RevokeReason {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Logout => "logout",
            Self::RefreshTokenReuse => "refresh_token_reuse",
            Self::Ended => "ended",
            Self::LogoutAll => "logout_all",
            Self::PasswordChanged => "password_changed",
            Self::PasswordReset => "password_reset",
            Self::EmailRestored => "email_restored",
            Self::IdentityLinked => "identity_linked",
        }
    }
}

/// The longest User-Agent kept with a session, in characters.
pub const MAX_USER_AGENT_CHARS: usize = 256;

/// Starts a session for `user_id` with its first refresh token. `user_agent` is what
/// the app sent at sign-in, shown back in the user's list of sessions (cut to
/// [`MAX_USER_AGENT_CHARS`]). `None` if the account was deleted meanwhile (the check
/// waits for a deletion in progress).
pub async fn create_session(
    conn: &mut PgConnection,
    user_id: UserId,
    token_hash: &TokenHash,
    expires_at: OffsetDateTime,
    user_agent: Option<&str>,
) -> Result<Option<SessionId>, sqlx::Error> {
    timed("sessions.create_session", async move {
        let session_id = SessionId::new();
        let user_agent =
            user_agent.map(
                |agent| match agent.char_indices().nth(MAX_USER_AGENT_CHARS) {
                    Some((end, _)) => &agent[..end],
                    None => agent,
                },
            );
        let created = sqlx::query(
            "INSERT INTO sessions (id, user_id, user_agent)
             SELECT $1, $2, $3
             WHERE EXISTS (SELECT 1 FROM users WHERE id = $2 AND deleted_at IS NULL FOR KEY SHARE)",
        )
        .bind(session_id)
        .bind(user_id)
        .bind(user_agent)
        .execute(&mut *conn)
        .await?;
        if created.rows_affected() == 0 {
            return Ok(None);
        }
        insert_refresh_token(&mut *conn, session_id, token_hash, expires_at).await?;
        Ok(Some(session_id))
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
        let ended: Option<SessionId> = sqlx::query_scalar(
            "WITH ended AS (
                 UPDATE sessions SET revoked_at = now(), revoked_reason = $2
                 WHERE id = $1 AND revoked_at IS NULL
                 RETURNING id
             ), unregistered AS (
                 DELETE FROM devices WHERE session_id IN (SELECT id FROM ended)
             )
             SELECT id FROM ended",
        )
        .bind(session_id)
        .bind(reason.as_str())
        .fetch_optional(db)
        .await?;
        Ok(ended.is_some())
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
            "WITH ended AS (
                 UPDATE sessions SET revoked_at = now(), revoked_reason = $2
                 WHERE id = (SELECT session_id FROM refresh_tokens WHERE token_hash = $1)
                   AND revoked_at IS NULL
                 RETURNING id, user_id
             ), unregistered AS (
                 DELETE FROM devices WHERE session_id IN (SELECT id FROM ended)
             )
             SELECT id, user_id FROM ended",
        )
        .bind(token_hash.as_slice())
        .bind(reason.as_str())
        .fetch_optional(db)
        .await
    })
    .await
}

/// Which of a user's sessions [`end_sessions`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// One session, if it is the user's.
    One(SessionId),
    /// Every session but this one.
    AllBut(SessionId),
    All,
}

/// Ends the live sessions of `user_id` that `which` names, with their devices, and
/// returns those it ended (none of another user's).
pub async fn end_sessions(
    db: impl PgExecutor<'_>,
    user_id: UserId,
    which: Ending,
    reason: RevokeReason,
) -> Result<Vec<SessionId>, sqlx::Error> {
    timed("sessions.end_sessions", async move {
        let (only, keep) = match which {
            Ending::One(id) => (Some(id), None),
            Ending::AllBut(id) => (None, Some(id)),
            Ending::All => (None, None),
        };
        sqlx::query_scalar(
            "WITH ended AS (
                 UPDATE sessions SET revoked_at = now(), revoked_reason = $4
                 WHERE user_id = $1 AND revoked_at IS NULL
                   AND ($2::uuid IS NULL OR id = $2)
                   AND ($3::uuid IS NULL OR id <> $3)
                 RETURNING id
             ), unregistered AS (
                 -- Devices of the ended sessions; when every session but one (or all)
                 -- ended, also those registered before devices knew their session.
                 DELETE FROM devices
                 WHERE session_id IN (SELECT id FROM ended)
                    OR (user_id = $1 AND session_id IS NULL AND $2::uuid IS NULL)
             )
             SELECT id FROM ended",
        )
        .bind(user_id)
        .bind(only)
        .bind(keep)
        .bind(reason.as_str())
        .fetch_all(db)
        .await
    })
    .await
}

/// Whether `session_id` is (or was) a session of `user_id`.
pub async fn is_session_of(
    db: impl PgExecutor<'_>,
    user_id: UserId,
    session_id: SessionId,
) -> Result<bool, sqlx::Error> {
    timed("sessions.is_session_of", async move {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1 AND user_id = $2)")
            .bind(session_id)
            .bind(user_id)
            .fetch_one(db)
            .await
    })
    .await
}

/// A live session as its user sees it: what signed in, and the device it registered.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SessionSummary {
    pub id: SessionId,
    pub created_at: OffsetDateTime,
    /// The sign-in or the last refresh, whichever is later.
    pub last_refreshed_at: OffsetDateTime,
    pub user_agent: Option<String>,
    pub device_id: Option<DeviceId>,
    pub platform: Option<Platform>,
    pub app_version: Option<String>,
}

/// One page of the live sessions of `user_id`, newest first, starting after (older
/// than) `before`. Live: not revoked, younger than `session_max_age`, and holding a
/// refresh token that can still be used.
pub async fn list_sessions(
    db: impl PgExecutor<'_>,
    user_id: UserId,
    session_max_age: std::time::Duration,
    before: Option<SessionId>,
    limit: i64,
) -> Result<Vec<SessionSummary>, sqlx::Error> {
    timed("sessions.list_sessions", async move {
        let max_age_seconds = i64::try_from(session_max_age.as_secs()).unwrap_or(i64::MAX);
        sqlx::query_as(
            "SELECT s.id, s.created_at, s.last_refreshed_at, s.user_agent,
                    d.id AS device_id, d.platform, d.app_version
             FROM sessions s
             LEFT JOIN LATERAL (
                 SELECT id, platform, app_version FROM devices
                 WHERE session_id = s.id ORDER BY updated_at DESC LIMIT 1
             ) d ON true
             WHERE s.user_id = $1 AND s.revoked_at IS NULL
               AND s.created_at > now() - $2::bigint * interval '1 second'
               AND EXISTS (SELECT 1 FROM refresh_tokens t
                           WHERE t.session_id = s.id AND t.rotated_at IS NULL
                             AND t.expires_at > now())
               AND ($3::uuid IS NULL OR s.id < $3)
             ORDER BY s.id DESC
             LIMIT $4",
        )
        .bind(user_id)
        .bind(max_age_seconds)
        .bind(before)
        .bind(limit)
        .fetch_all(db)
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
        let session = create_session(&mut conn, user_id, &[1; 32], later(), None)
            .await
            .unwrap()
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
        create_session(&mut conn, user_id, &[1; 32], past, None)
            .await
            .unwrap()
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
        let session = create_session(&mut conn, user_id, &[1; 32], later(), None)
            .await
            .unwrap()
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
    async fn a_deleted_account_gets_no_new_session() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let user_id = user(&pool).await;
        let mut conn = pool.pool().acquire().await.unwrap();
        // Signed in (password checked), then deleted before the session was made.
        crate::accounts::delete_account(&mut conn, user_id)
            .await
            .unwrap();
        let session = create_session(&mut conn, user_id, &[1; 32], later(), None)
            .await
            .unwrap();
        assert_eq!(session, None);
    }

    #[tokio::test]
    async fn logout_revokes_once() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let user_id = user(&pool).await;
        let mut conn = pool.pool().acquire().await.unwrap();
        let session = create_session(&mut conn, user_id, &[1; 32], later(), None)
            .await
            .unwrap()
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
