//! Email: proving an account's address, and resetting a forgotten password, by links
//! sent to the address.
//!
//! - The API enqueues a [`MailJob`] (in the transaction of the change that calls for
//!   it: a registration commits with its verification mail). The worker renders and
//!   sends it, and for a link it makes the token then ([`create_token`]), so the token
//!   itself is never stored: only its SHA-256 is, in `email_tokens`, and the raw token
//!   exists only in the worker's memory and the mail.
//! - A token works once (using it deletes its row, in the transaction of what it does)
//!   and until it expires. A verification is bound to its account and to the address
//!   it was sent to; a reset to the address it was sent to, which must still be the
//!   account's.
//! - [`verify_email`] proves the address: the account's own (at registration), or a
//!   new one, which becomes the account's (an email change).
//! - [`reset_password`] sets a new password; the caller ends every session in the same
//!   transaction. The link proved the mailbox, so the address counts as verified too.
//! - [`restore_email`] undoes an email change from the notice sent to the old address:
//!   the old address back, no password, every session ended.

use mobile_domain::{Email, JobKind, UserId};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::{PgConnection, PgExecutor};
use time::{Duration, OffsetDateTime};

use crate::jobs::Payload;
use crate::metrics::timed;
use crate::users::{User, user_columns};

/// The `mail.send` job: one mail, and the reader's languages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailJob {
    #[serde(flatten)]
    pub mail: Mail,
    /// The reader's preferred languages, best first: the `Accept-Language` of the
    /// request that called for the mail (the device's language). Empty: the language
    /// of the user's most recently registered device, else English.
    #[serde(default)]
    pub languages: Vec<String>,
}

/// What a mail says, and to whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "template", rename_all = "snake_case")]
pub enum Mail {
    /// A link that proves `email` to be the account's: its own address (registration),
    /// or the new one of an email change.
    VerifyEmail { user_id: UserId, email: String },
    /// A link that resets the password of the account with `email`, if there is one
    /// (the API does not know, and must not: `forgot` answers the same either way).
    ResetPassword { email: String },
    /// To the account's address (`email`): a change to `new_email` was asked for.
    EmailChangeRequested {
        user_id: UserId,
        email: String,
        new_email: String,
    },
}

impl Mail {
    /// The template's name: `verify_email`, `reset_password`, `email_change_requested`.
    pub const fn template(&self) -> &'static str {
        match self {
            Self::VerifyEmail { .. } => "verify_email",
            Self::ResetPassword { .. } => "reset_password",
            Self::EmailChangeRequested { .. } => "email_change_requested",
        }
    }

    /// The address the mail goes to.
    pub fn to(&self) -> &str {
        match self {
            Self::VerifyEmail { email, .. }
            | Self::ResetPassword { email }
            | Self::EmailChangeRequested { email, .. } => email,
        }
    }
}

impl Payload for MailJob {
    const KIND: JobKind = JobKind::MailSend;
    /// With the runner's backoff (capped at `JOB_BACKOFF_MAX_SECONDS`), about an hour of
    /// trying through a mail server's outage.
    const MAX_ATTEMPTS: i32 = 16;
}

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    VerifyEmail,
    ResetPassword,
    /// Undo an email change, from the notice to the address it would leave.
    RestoreEmail,
}

impl Purpose {
    const fn as_str(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify_email",
            Self::ResetPassword => "reset_password",
            Self::RestoreEmail => "restore_email",
        }
    }
}

/// Bytes of randomness in a token (then base64url: 43 characters).
const TOKEN_BYTES: usize = 32;

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Makes a token for `purpose` and `email`, valid for `ttl`, and returns it: the only
/// copy (the table keeps its hash). Deletes every expired token on the way (by the
/// `expires_at` index), so the table holds the live ones and those that expired since
/// the last mail.
pub async fn create_token(
    conn: &mut PgConnection,
    user_id: UserId,
    purpose: Purpose,
    email: &str,
    ttl: Duration,
) -> Result<String, sqlx::Error> {
    timed("email.create_token", async move {
        let mut bytes = [0u8; TOKEN_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token = base64_url(&bytes);
        sqlx::query("DELETE FROM email_tokens WHERE expires_at <= now()")
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "INSERT INTO email_tokens (token_hash, user_id, purpose, email, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash(&token))
        .bind(user_id)
        .bind(purpose.as_str())
        .bind(email)
        .bind(OffsetDateTime::now_utc() + ttl)
        .execute(&mut *conn)
        .await?;
        Ok(token)
    })
    .await
}

/// Deletes one token, for a mail that could not be sent.
pub async fn delete_token(db: impl PgExecutor<'_>, token: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM email_tokens WHERE token_hash = $1")
        .bind(token_hash(token))
        .execute(db)
        .await?;
    Ok(())
}

/// base64url without padding, the alphabet a URL's query carries as is.
fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The outcome of [`verify_email`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The address is proven, and the account's (changed, if the token was for a new one).
    Verified(User),
    /// Unknown, expired, spent, or another account's.
    InvalidToken,
    /// The new address became another account's since the change was asked for.
    EmailTaken,
}

/// Spends a verification token of `user_id` inside the caller's transaction (see the
/// module). The token is spent only if the caller commits.
pub async fn verify_email(
    conn: &mut PgConnection,
    user_id: UserId,
    token: &str,
) -> Result<Verification, sqlx::Error> {
    timed("email.verify_email", async move {
        let email: Option<String> = sqlx::query_scalar(
            "DELETE FROM email_tokens
             WHERE token_hash = $1 AND purpose = 'verify_email' AND user_id = $2 AND expires_at > now()
             RETURNING email",
        )
        .bind(token_hash(token))
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(email) = email else {
            return Ok(Verification::InvalidToken);
        };
        let previous: Option<String> = sqlx::query_scalar(
            "SELECT email FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
        )
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(previous) = previous else {
            return Ok(Verification::InvalidToken);
        };
        let updated = sqlx::query_as::<_, User>(concat!(
            "UPDATE users
             SET email = $2,
                 email_verified_at = CASE WHEN email = $2 THEN coalesce(email_verified_at, now()) ELSE now() END,
                 updated_at = CASE WHEN email = $2 AND email_verified_at IS NOT NULL THEN updated_at ELSE now() END
             WHERE id = $1
             RETURNING ",
            user_columns!()
        ))
        .bind(user_id)
        .bind(&email)
        .fetch_one(&mut *conn)
        .await;
        let user = match updated {
            Ok(user) => user,
            Err(e) if crate::violated_constraint(&e) == Some("users_email_key") => {
                return Ok(Verification::EmailTaken);
            }
            Err(e) => return Err(e),
        };
        // The other links to this address are moot now. If the address changed, so is
        // every other pending change, and every reset sent to the old address: that
        // mailbox is no longer the account's.
        sqlx::query(
            "DELETE FROM email_tokens
             WHERE user_id = $1 AND ((purpose = 'verify_email' AND (email = $2 OR $3 <> $2))
                                     OR (purpose = 'reset_password' AND email = $3 AND $3 <> $2))",
        )
        .bind(user_id)
        .bind(&email)
        .bind(&previous)
        .execute(&mut *conn)
        .await?;
        Ok(Verification::Verified(user))
    })
    .await
}

/// Whether `token` is a live token for `purpose` (without spending it): a cheap
/// refusal before the work a real one is worth.
pub async fn token_is_live(
    db: impl PgExecutor<'_>,
    token: &str,
    purpose: Purpose,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM email_tokens
                        WHERE token_hash = $1 AND purpose = $2 AND expires_at > now())",
    )
    .bind(token_hash(token))
    .bind(purpose.as_str())
    .fetch_one(db)
    .await
}

/// The outcome of [`reset_password`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reset {
    /// The password is `password_hash` now; the caller ends the account's sessions.
    Reset(UserId),
    /// Unknown, expired or spent, or the account's address changed since it was sent.
    InvalidToken,
}

/// Spends a reset token inside the caller's transaction and sets the password (see the
/// module). Every other reset link of the account stops working, and so do the links of
/// pending email changes ([`revoke_links`]).
pub async fn reset_password(
    conn: &mut PgConnection,
    token: &str,
    password_hash: &str,
) -> Result<Reset, sqlx::Error> {
    timed("email.reset_password", async move {
        let spent: Option<(UserId, String)> = sqlx::query_as(
            "DELETE FROM email_tokens
             WHERE token_hash = $1 AND purpose = 'reset_password' AND expires_at > now()
             RETURNING user_id, email",
        )
        .bind(token_hash(token))
        .fetch_optional(&mut *conn)
        .await?;
        let Some((user_id, email)) = spent else {
            return Ok(Reset::InvalidToken);
        };
        let updated = sqlx::query(
            "UPDATE users
             SET password_hash = $3, email_verified_at = coalesce(email_verified_at, now()), updated_at = now()
             WHERE id = $1 AND email = $2 AND deleted_at IS NULL",
        )
        .bind(user_id)
        .bind(&email)
        .bind(password_hash)
        .execute(&mut *conn)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(Reset::InvalidToken);
        }
        revoke_links(&mut *conn, user_id, &email).await?;
        Ok(Reset::Reset(user_id))
    })
    .await
}

/// The outcome of [`restore_email`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// The account has its old address back, verified, without a password; the caller
    /// ends every session.
    Restored(UserId),
    /// Unknown, expired or spent.
    InvalidToken,
    /// Another account took the old address meanwhile.
    EmailTaken,
}

/// Spends a restore token inside the caller's transaction: the account gets back the
/// address the change would have left, verified (its owner just proved the mailbox),
/// and loses its password (whoever asked for the change knew it; the owner sets a new
/// one by reset). Every other link of the account stops working.
pub async fn restore_email(conn: &mut PgConnection, token: &str) -> Result<Restore, sqlx::Error> {
    timed("email.restore_email", async move {
        let spent: Option<(UserId, String)> = sqlx::query_as(
            "DELETE FROM email_tokens
             WHERE token_hash = $1 AND purpose = 'restore_email' AND expires_at > now()
             RETURNING user_id, email",
        )
        .bind(token_hash(token))
        .fetch_optional(&mut *conn)
        .await?;
        let Some((user_id, email)) = spent else {
            return Ok(Restore::InvalidToken);
        };
        let restored = sqlx::query(
            "UPDATE users
             SET email = $2, email_verified_at = now(), password_hash = '', updated_at = now()
             WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(user_id)
        .bind(&email)
        .execute(&mut *conn)
        .await;
        match restored {
            Ok(done) if done.rows_affected() == 0 => return Ok(Restore::InvalidToken),
            Ok(_) => {}
            Err(e) if crate::violated_constraint(&e) == Some("users_email_key") => {
                return Ok(Restore::EmailTaken);
            }
            Err(e) => return Err(e),
        }
        sqlx::query("DELETE FROM email_tokens WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *conn)
            .await?;
        Ok(Restore::Restored(user_id))
    })
    .await
}

/// Deletes the account's reset links, and its verification links for addresses other
/// than `email` (pending changes): what a password change, a reset or signing out
/// everywhere must take from whoever may have had the password or the session. Restore
/// links stay: they are the owner's way back.
pub async fn revoke_links(
    db: impl PgExecutor<'_>,
    user_id: UserId,
    email: &str,
) -> Result<u64, sqlx::Error> {
    timed("email.revoke_links", async move {
        let deleted = sqlx::query(
            "DELETE FROM email_tokens
             WHERE user_id = $1
               AND (purpose = 'reset_password' OR (purpose = 'verify_email' AND email <> $2))",
        )
        .bind(user_id)
        .bind(email)
        .execute(db)
        .await?;
        Ok(deleted.rows_affected())
    })
    .await
}

/// Who a mail is for, as the worker needs it: the account holding an address.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Recipient {
    pub user_id: UserId,
    pub email: String,
    pub email_verified: bool,
    /// The locale of the account's most recently registered device, if it sent one.
    pub device_locale: Option<String>,
}

const RECIPIENT: &str =
    "SELECT u.id AS user_id, u.email, u.email_verified_at IS NOT NULL AS email_verified,
        (SELECT d.locale FROM devices d WHERE d.user_id = u.id AND d.locale IS NOT NULL
         ORDER BY d.updated_at DESC LIMIT 1) AS device_locale
     FROM users u WHERE u.deleted_at IS NULL AND ";

/// The live account `user_id`, locked against its deletion until the transaction ends
/// (a token made in that transaction is deleted with the account, never left behind).
pub async fn recipient_by_id(
    db: impl PgExecutor<'_>,
    user_id: UserId,
) -> Result<Option<Recipient>, sqlx::Error> {
    sqlx::query_as(&format!("{RECIPIENT} u.id = $1 FOR KEY SHARE OF u"))
        .bind(user_id)
        .fetch_optional(db)
        .await
}

/// The live account holding `email`, locked as [`recipient_by_id`] locks it.
pub async fn recipient_by_email(
    db: impl PgExecutor<'_>,
    email: &Email,
) -> Result<Option<Recipient>, sqlx::Error> {
    sqlx::query_as(&format!("{RECIPIENT} u.email = $1 FOR KEY SHARE OF u"))
        .bind(email.as_str())
        .fetch_optional(db)
        .await
}

/// Whether a live account other than `user_id` holds `email`.
pub async fn email_taken(
    db: impl PgExecutor<'_>,
    email: &Email,
    user_id: UserId,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM users WHERE email = $1 AND id <> $2 AND deleted_at IS NULL)",
    )
    .bind(email.as_str())
    .bind(user_id)
    .fetch_one(db)
    .await
}
