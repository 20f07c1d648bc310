//! Users: registration, lookup for login, profile updates.

use crate::metrics::timed;
use mobile_domain::{DisplayName, Email, UserId};
use sqlx::PgExecutor;
use time::OffsetDateTime;

/// A user as stored, without the password hash.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct User {
    pub id: UserId,
    pub email: String,
    pub display_name: String,
    /// Whether the address was proven to be the account's (`crate::email`).
    pub email_verified: bool,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// The columns of a [`User`], for `SELECT` and `RETURNING` on `users`: a macro, so
/// `concat!` builds each query at compile time (`GET /v1/me` allocates no SQL).
macro_rules! user_columns {
    () => {
        "id, email, display_name, email_verified_at IS NOT NULL AS email_verified, created_at, updated_at"
    };
}
pub(crate) use user_columns;

/// A user with the password hash, for the login check only.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Credentials {
    #[sqlx(flatten)]
    pub user: User,
    /// `None` for an account without a password (signed up with Apple or Google).
    pub password_hash: Option<String>,
}

/// The outcome of [`insert_user`].
#[derive(Debug)]
pub enum InsertUser {
    Inserted(User),
    EmailTaken,
}

pub async fn insert_user(
    db: impl PgExecutor<'_>,
    email: &Email,
    password_hash: &str,
    display_name: &DisplayName,
) -> Result<InsertUser, sqlx::Error> {
    timed("users.insert_user", async move {
        let result = sqlx::query_as::<_, User>(concat!(
            "INSERT INTO users (id, email, password_hash, display_name)
             VALUES ($1, $2, $3, $4)
             RETURNING ",
            user_columns!()
        ))
        .bind(UserId::new())
        .bind(email.as_str())
        .bind(password_hash)
        .bind(display_name.as_str())
        .fetch_one(db)
        .await;
        match result {
            Ok(user) => Ok(InsertUser::Inserted(user)),
            Err(e) if crate::violated_constraint(&e) == Some("users_email_key") => {
                Ok(InsertUser::EmailTaken)
            }
            Err(e) => Err(e),
        }
    })
    .await
}

pub async fn find_credentials(
    db: impl PgExecutor<'_>,
    email: &Email,
) -> Result<Option<Credentials>, sqlx::Error> {
    timed("users.find_credentials", async move {
        sqlx::query_as(concat!(
            "SELECT ",
            user_columns!(),
            ", NULLIF(password_hash, '') AS password_hash
             FROM users WHERE email = $1 AND deleted_at IS NULL"
        ))
        .bind(email.as_str())
        .fetch_optional(db)
        .await
    })
    .await
}

/// The credentials of the user `id`.
pub async fn find_credentials_by_id(
    db: impl PgExecutor<'_>,
    id: UserId,
) -> Result<Option<Credentials>, sqlx::Error> {
    timed("users.find_credentials_by_id", async move {
        sqlx::query_as(concat!(
            "SELECT ",
            user_columns!(),
            ", NULLIF(password_hash, '') AS password_hash
             FROM users WHERE id = $1 AND deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(db)
        .await
    })
    .await
}

/// The credentials of the user `id`, locked until the transaction ends (a password
/// change reads the hash it checks and writes the new one in one transaction).
pub async fn find_credentials_for_update(
    db: impl PgExecutor<'_>,
    id: UserId,
) -> Result<Option<Credentials>, sqlx::Error> {
    timed("users.find_credentials_for_update", async move {
        sqlx::query_as(concat!(
            "SELECT ",
            user_columns!(),
            ", NULLIF(password_hash, '') AS password_hash
             FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(db)
        .await
    })
    .await
}

/// Replaces the password hash.
pub async fn update_password_hash(
    db: impl PgExecutor<'_>,
    id: UserId,
    password_hash: &str,
) -> Result<(), sqlx::Error> {
    timed("users.update_password_hash", async move {
        sqlx::query("UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(password_hash)
            .execute(db)
            .await?;
        Ok(())
    })
    .await
}

pub async fn find_user(db: impl PgExecutor<'_>, id: UserId) -> Result<Option<User>, sqlx::Error> {
    timed("users.find_user", async move {
        sqlx::query_as(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE id = $1 AND deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(db)
        .await
    })
    .await
}

/// Reads a user and locks the row until the transaction ends, for read-compare-write.
pub async fn find_user_for_update(
    db: impl PgExecutor<'_>,
    id: UserId,
) -> Result<Option<User>, sqlx::Error> {
    timed("users.find_user_for_update", async move {
        sqlx::query_as(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(db)
        .await
    })
    .await
}

/// Sets the display name; `updated_at` moves only when the name really changes, so a
/// no-op PATCH keeps the ETag clients have cached.
pub async fn update_display_name(
    db: impl PgExecutor<'_>,
    id: UserId,
    display_name: &DisplayName,
) -> Result<Option<User>, sqlx::Error> {
    timed("users.update_display_name", async move {
        sqlx::query_as(concat!(
            "UPDATE users
             SET display_name = $2,
                 updated_at = CASE WHEN display_name = $2 THEN updated_at ELSE now() END
             WHERE id = $1
             RETURNING ",
            user_columns!()
        ))
        .bind(id)
        .bind(display_name.as_str())
        .fetch_optional(db)
        .await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn insert_find_and_update() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let email = Email::parse("Ann@Example.com").unwrap();
        let name = DisplayName::parse("Ann").unwrap();

        let InsertUser::Inserted(user) = insert_user(&pool, &email, "hash", &name).await.unwrap()
        else {
            panic!("first insert must succeed");
        };
        assert_eq!(user.email, "ann@example.com");
        assert!(matches!(
            insert_user(&pool, &email, "hash", &name).await.unwrap(),
            InsertUser::EmailTaken
        ));

        let found = find_credentials(&pool, &email).await.unwrap().unwrap();
        assert_eq!(found.user, user);
        assert_eq!(found.password_hash.as_deref(), Some("hash"));

        let same = update_display_name(&pool, user.id, &name)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            same.updated_at, user.updated_at,
            "a no-op update keeps updated_at"
        );
        let renamed = update_display_name(&pool, user.id, &DisplayName::parse("Annie").unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(renamed.display_name, "Annie");
        assert!(renamed.updated_at > user.updated_at);
        assert!(find_user(&pool, UserId::new()).await.unwrap().is_none());
    }
}
