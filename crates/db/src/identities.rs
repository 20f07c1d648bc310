//! Accounts' identities at Sign in with Apple and Google, keyed by the provider's
//! stable subject.
//!
//! [`sign_in`] finds the account of a verified identity, or links it to the account
//! that has its email, or creates an account for it:
//!
//! - a known `(provider, subject)` signs in to its account;
//! - otherwise, an account with the same email is linked only when the provider says
//!   the email is verified, and its address counts as verified from then on. An
//!   account whose address was proven before (a link we mailed, `crate::email`, or the
//!   other provider) keeps its password and sessions. An account with a password whose
//!   address no one proved may have been registered by someone who does not own it:
//!   its password is removed and its sessions end (the caller closes their sockets),
//!   and the provider's word decides. This defeats an attacker who registers a
//!   victim's address first and waits for the victim to sign in with Apple. The
//!   account then signs in with the provider (or resets the password by mail);
//! - an account that already has another identity at the same provider is not linked
//!   to a second one by email (an address a company recycled for a new employee):
//!   [`SignIn::OtherIdentity`];
//! - an email the provider does not vouch for links nothing and makes nothing: no
//!   account may hold an address no one proved ([`SignIn::EmailTaken`],
//!   [`SignIn::EmailUnverified`]);
//! - otherwise a new account, without a password, is created.

use mobile_domain::{DisplayName, Email, SessionId, UserId};
use sqlx::PgConnection;

use crate::metrics::timed;
use crate::users::User;

/// What a provider said, once its token was verified.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedIdentity<'a> {
    /// `apple` or `google`.
    pub provider: &'a str,
    pub subject: &'a str,
    pub email: Option<&'a Email>,
    pub email_verified: bool,
}

/// The outcome of [`sign_in`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignIn {
    /// The identity's account.
    Existing(User),
    /// The account with the identity's email, now linked to it; these sessions (all
    /// of the account's) ended with the password that was removed.
    Linked { user: User, ended: Vec<SessionId> },
    /// A new account.
    Created(User),
    /// An account has the email, which the provider does not vouch for.
    EmailTaken,
    /// The account with the email has another identity at this provider.
    OtherIdentity,
    /// A new account needs an email the provider vouches for, and this one is not.
    EmailUnverified,
    /// A new account needs an email, and the token carries none.
    NoEmail,
    /// Another request created the same account at the same moment; try again.
    Raced,
}

/// The account holding an email, and whether it has a password.
#[derive(Debug, sqlx::FromRow)]
struct Holder {
    #[sqlx(flatten)]
    user: User,
    has_password: bool,
}

const USER_COLUMNS: &str = "u.id, u.email, u.display_name, u.email_verified_at IS NOT NULL AS email_verified, u.created_at, u.updated_at";

/// Signs `identity` in inside the caller's transaction (see the module); a new account
/// is named `display_name`.
pub async fn sign_in(
    conn: &mut PgConnection,
    identity: VerifiedIdentity<'_>,
    display_name: &DisplayName,
) -> Result<SignIn, sqlx::Error> {
    timed("identities.sign_in", async move {
        let known: Option<User> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS} FROM identities i JOIN users u ON u.id = i.user_id
             WHERE i.provider = $1 AND i.subject = $2 AND u.deleted_at IS NULL"
        ))
        .bind(identity.provider)
        .bind(identity.subject)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(user) = known {
            return Ok(SignIn::Existing(user));
        }
        let Some(email) = identity.email else {
            return Ok(SignIn::NoEmail);
        };

        let holder: Option<Holder> = sqlx::query_as(&format!(
            "SELECT {USER_COLUMNS}, u.password_hash <> '' AS has_password
             FROM users u WHERE u.email = $1 AND u.deleted_at IS NULL FOR UPDATE"
        ))
        .bind(email.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(Holder { user, has_password }) = holder {
            if !identity.email_verified {
                return Ok(SignIn::EmailTaken);
            }
            let other: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM identities WHERE user_id = $1 AND provider = $2)",
            )
            .bind(user.id)
            .bind(identity.provider)
            .fetch_one(&mut *conn)
            .await?;
            if other {
                return Ok(SignIn::OtherIdentity);
            }
            if !link(&mut *conn, identity, user.id, email).await? {
                return Ok(SignIn::Raced);
            }
            // An account whose address was proven (by a link we mailed, or by a
            // provider) keeps its password and sessions. One with a password whose
            // address no one proved loses both: whoever registered it may not own it.
            let take_over = has_password && !user.email_verified;
            let user: User = sqlx::query_as(&format!(
                "UPDATE users u
                 SET email_verified_at = coalesce(u.email_verified_at, now()),
                     password_hash = CASE WHEN $2 THEN '' ELSE u.password_hash END,
                     updated_at = CASE WHEN $2 OR u.email_verified_at IS NULL THEN now() ELSE u.updated_at END
                 WHERE u.id = $1
                 RETURNING {USER_COLUMNS}"
            ))
            .bind(user.id)
            .bind(take_over)
            .fetch_one(&mut *conn)
            .await?;
            let ended = if take_over {
                crate::sessions::end_sessions(
                    &mut *conn,
                    user.id,
                    crate::sessions::Ending::All,
                    crate::sessions::RevokeReason::IdentityLinked,
                )
                .await?
            } else {
                Vec::new()
            };
            return Ok(SignIn::Linked { user, ended });
        }

        if !identity.email_verified {
            return Ok(SignIn::EmailUnverified);
        }
        let created: Option<User> = sqlx::query_as(&format!(
            "INSERT INTO users (id, email, password_hash, display_name, email_verified_at)
             VALUES ($1, $2, '', $3, now())
             ON CONFLICT (email) DO NOTHING
             RETURNING {}",
            crate::users::user_columns!()
        ))
        .bind(UserId::new())
        .bind(email.as_str())
        .bind(display_name.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        let Some(user) = created else {
            return Ok(SignIn::Raced);
        };
        if !link(&mut *conn, identity, user.id, email).await? {
            return Ok(SignIn::Raced);
        }
        Ok(SignIn::Created(user))
    })
    .await
}

/// Records the identity for `user_id`; `false` if another request recorded it first.
async fn link(
    conn: &mut PgConnection,
    identity: VerifiedIdentity<'_>,
    user_id: UserId,
    email: &Email,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "INSERT INTO identities (provider, subject, user_id, email) VALUES ($1, $2, $3, $4)
         ON CONFLICT (provider, subject) DO NOTHING",
    )
    .bind(identity.provider)
    .bind(identity.subject)
    .bind(user_id)
    .bind(email.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Whether `user_id` has the identity `(provider, subject)`.
pub async fn has_identity(
    db: impl sqlx::PgExecutor<'_>,
    user_id: UserId,
    provider: &str,
    subject: &str,
) -> Result<bool, sqlx::Error> {
    timed("identities.has_identity", async move {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM identities
                            WHERE provider = $1 AND subject = $2 AND user_id = $3)",
        )
        .bind(provider)
        .bind(subject)
        .bind(user_id)
        .fetch_one(db)
        .await
    })
    .await
}
