//! Email: proving the account's address, changing it, and resetting a forgotten
//! password, by links the worker mails (`mobile_db::email` has the rules; the worker's
//! `mail` module sends).
//!
//! - `POST /v1/auth/password/forgot {email}`: 202 whether an account has the address or
//!   not; if one does, a reset link goes to it.
//! - `POST /v1/auth/password/reset {token, password}`: sets the password and ends every
//!   session of the account (its sockets close). The link proved the mailbox, so the
//!   address counts as verified.
//! - `POST /v1/me/email {email, password | provider…}`: asks to change the address,
//!   confirmed like an account deletion. A link goes to the new address, a notice to
//!   the current one (if it was verified); the change happens when the link is used,
//!   and ends the other pending changes and the old address's reset links.
//! - `POST /v1/me/email/verify {token}`: uses a verification link (registration's, or a
//!   change's); answers the user as it is now.
//! - `POST /v1/me/email/verification`: sends the account's address a new link.
//! - `POST /v1/auth/email/restore {token}`: the "this was not me" link of a change's
//!   notice: the old address back, no password, every session ended.
//!
//! Every request for a mail is limited per address (`MAIL_PER_ADDRESS_PER_HOUR`,
//! counted whoever asks and whether or not an account has the address, so the answer
//! says nothing about accounts) and per client IP (`MAIL_PER_IP_PER_HOUR`), on top of
//! the routes' own limits. A registration over either allowance still creates the
//! account but mails nothing (its owner asks for a link later): signing up is not
//! refused to everyone behind a carrier's shared address. The mail's language is the
//! request's `Accept-Language`.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, header},
};
use mobile_auth::password;
use mobile_db::{
    email::{self, Mail, MailJob, Reset, Restore, Verification},
    jobs::{self, Payload as _},
    sessions::{self, Ending, RevokeReason},
    users,
};
use mobile_domain::{Email, Password, UserId};
use mobile_events::Revoke;
use mobile_runtime::client_ip::ClientIp;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    User,
    me::{Confirmation, PasswordConfirmation, ProviderConfirmation, confirm},
};
use crate::{
    error::{ApiError, ErrorCode},
    events,
    extract::{AuthUser, ClientAddr, Json},
    middleware::rate_limit::{self, Class, Rate},
    problems,
    state::AppState,
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    // Per client IP: the unauthenticated ones, and the one that checks a password.
    let per_ip = OpenApiRouter::new()
        .routes(routes!(forgot_password))
        .routes(routes!(reset_password))
        .routes(routes!(restore_email))
        .routes(routes!(change_email))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Auth),
            rate_limit::limit,
        ));
    OpenApiRouter::new()
        .routes(routes!(verify_email))
        .routes(routes!(send_verification))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Write),
            rate_limit::limit,
        ))
        .merge(per_ip)
}

/// The longest token accepted (ours are 43 characters).
const MAX_TOKEN_CHARS: usize = 128;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgotPassword {
    #[schema(schema_with = mobile_domain::schema::email)]
    pub email: String,
}

problems!(ForgotPasswordProblems: Invalid(InvalidEmail));

/// Ask for a password-reset link by mail.
///
/// 202 whether or not an account has the address: the answer says nothing about
/// accounts. If one does, a link goes to the address, valid for
/// `PASSWORD_RESET_TTL_SECONDS` (the worker's setting) and once. Limited per address
/// and per client IP (429).
#[utoipa::path(
    post,
    path = "/v1/auth/password/forgot",
    tag = "auth",
    request_body = ForgotPassword,
    responses(
        (status = 202, description = "If an account has the address, a link is on its way"),
        ForgotPasswordProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn forgot_password(
    State(state): State<AppState>,
    ClientAddr(ip): ClientAddr,
    headers: HeaderMap,
    Json(body): Json<ForgotPassword>,
) -> Result<StatusCode, ApiError> {
    let address = Email::parse(&body.email)?;
    limit_mail(&state, ip, &address).await?;
    let job = MailJob {
        mail: Mail::ResetPassword {
            email: address.as_str().to_owned(),
        },
        languages: languages(&headers),
    };
    // The worker looks the address up: this request does the same work either way.
    jobs::enqueue(&state.db, &job.to_job()?).await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPassword {
    /// The `token` of the link in the mail.
    #[schema(min_length = 1, max_length = 128)]
    pub token: String,
    #[schema(schema_with = mobile_domain::schema::new_password)]
    pub password: String,
}

problems!(ResetPasswordProblems: InvalidEmailToken, Invalid(WeakPassword), Invalid(InvalidPassword));

/// Set a new password with the token of a reset link, and end every session.
///
/// Every session of the account ends (WebSockets close with 4001 `session_revoked`,
/// devices stop getting pushes); sign in with the new password. The token works once:
/// with it, every other reset link of the account stops working. The address counts as
/// verified from now on.
#[utoipa::path(
    post,
    path = "/v1/auth/password/reset",
    tag = "auth",
    request_body = ResetPassword,
    responses(
        (status = 204, description = "The password is set; every session ended"),
        ResetPasswordProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn reset_password(
    State(state): State<AppState>,
    Json(body): Json<ResetPassword>,
) -> Result<StatusCode, ApiError> {
    let new_password = Password::parse(&body.password)?;
    let token = checked_token(&body.token)?;
    // A token that cannot work costs no password hash.
    if !email::token_is_live(&state.db, token, email::Purpose::ResetPassword).await? {
        return Err(ErrorCode::InvalidEmailToken.into());
    }
    let new_hash = password::hash(new_password).await?;

    let mut tx = state.db.begin().await?;
    let user_id = match email::reset_password(&mut tx, token, &new_hash).await? {
        Reset::Reset(user_id) => user_id,
        Reset::InvalidToken => return Err(ErrorCode::InvalidEmailToken.into()),
    };
    let ended =
        sessions::end_sessions(&mut *tx, user_id, Ending::All, RevokeReason::PasswordReset).await?;
    tx.commit().await?;
    tracing::info!(%user_id, ended = ended.len(), "password reset");
    events::revoke(&state, user_id, Revoke::All).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreEmail {
    /// The `token` of the link in the notice of an email change.
    #[schema(min_length = 1, max_length = 128)]
    pub token: String,
}

problems!(RestoreEmailProblems: InvalidEmailToken, EmailTaken);

/// Undo an email change with the link from its notice ("this was not me").
///
/// The account gets back the address the notice went to, verified; its password is
/// removed (whoever asked for the change knew it) and every session ends. Its owner
/// then sets a new password with `forgot`. Works for `EMAIL_RESTORE_TTL_SECONDS` (the
/// worker's setting), once; 409 `email_taken` if another account has the address now.
#[utoipa::path(
    post,
    path = "/v1/auth/email/restore",
    tag = "auth",
    request_body = RestoreEmail,
    responses(
        (status = 204, description = "The old address is back; no password; every session ended"),
        RestoreEmailProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn restore_email(
    State(state): State<AppState>,
    Json(body): Json<RestoreEmail>,
) -> Result<StatusCode, ApiError> {
    let token = checked_token(&body.token)?;
    let mut tx = state.db.begin().await?;
    let user_id = match email::restore_email(&mut tx, token).await? {
        Restore::Restored(user_id) => user_id,
        Restore::InvalidToken => return Err(ErrorCode::InvalidEmailToken.into()),
        Restore::EmailTaken => return Err(ErrorCode::EmailTaken.into()),
    };
    let ended =
        sessions::end_sessions(&mut *tx, user_id, Ending::All, RevokeReason::EmailRestored).await?;
    tx.commit().await?;
    tracing::warn!(%user_id, ended = ended.len(), "email change undone from its notice");
    events::revoke(&state, user_id, Revoke::All).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A new address, confirmed by the account's password or a fresh sign-in with its
/// provider (as `DELETE /v1/me` is).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ChangeEmail {
    Password(ChangeEmailWithPassword),
    Provider(ChangeEmailWithProvider),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeEmailWithPassword {
    /// The new address.
    #[schema(schema_with = mobile_domain::schema::email)]
    pub email: String,
    /// The account's password.
    #[schema(schema_with = mobile_domain::schema::presented_password)]
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeEmailWithProvider {
    /// The new address.
    #[schema(schema_with = mobile_domain::schema::email)]
    pub email: String,
    pub provider: super::me::ProviderName,
    /// An id_token of the account's identity at the provider, issued within
    /// `REAUTH_MAX_AGE_SECONDS`.
    #[schema(max_length = 8192)]
    pub id_token: String,
    /// The raw nonce whose SHA-256 the app gave the provider.
    #[schema(min_length = 16, max_length = 256)]
    pub nonce: String,
}

problems!(ChangeEmailProblems:
    EmailTaken,
    WrongPassword,
    ReauthenticationRequired,
    InvalidIdToken,
    ProviderNotConfigured,
    ProviderUnavailable,
    NotFound,
    Invalid(InvalidEmail),
    Invalid(InvalidPassword),
);

/// Ask to change the account's address.
///
/// A link goes to the new address (valid for `EMAIL_VERIFICATION_TTL_SECONDS`), and a
/// notice to the current one if it was verified. The account keeps its address until the link is used
/// (`POST /v1/me/email/verify`); it is then verified. 409 `email_taken` if another
/// account has the new address; 422 `invalid_email` if it is the account's own.
#[utoipa::path(
    post,
    path = "/v1/me/email",
    tag = "me",
    security(("bearer" = [])),
    request_body = ChangeEmail,
    responses(
        (status = 202, description = "A link is on its way to the new address"),
        ChangeEmailProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn change_email(
    State(state): State<AppState>,
    auth: AuthUser,
    ClientAddr(ip): ClientAddr,
    headers: HeaderMap,
    Json(body): Json<ChangeEmail>,
) -> Result<StatusCode, ApiError> {
    let (new_email, confirmation) = match body {
        ChangeEmail::Password(ChangeEmailWithPassword { email, password }) => (
            email,
            Confirmation::Password(PasswordConfirmation { password }),
        ),
        ChangeEmail::Provider(ChangeEmailWithProvider {
            email,
            provider,
            id_token,
            nonce,
        }) => (
            email,
            Confirmation::Provider(ProviderConfirmation {
                provider,
                id_token,
                nonce,
            }),
        ),
    };
    let new_email = Email::parse(&new_email)?;
    let credentials = users::find_credentials_by_id(&state.db, auth.user_id)
        .await?
        .ok_or_else(no_user)?;
    let current = credentials.user.email.clone();
    if new_email.as_str() == current {
        return Err(
            ApiError::new(mobile_domain::ValidationCode::InvalidEmail.into())
                .detail("that is the account's address already"),
        );
    }
    confirm(&state, auth.user_id, ip, &credentials, confirmation).await?;
    if email::email_taken(&state.db, &new_email, auth.user_id).await? {
        return Err(ErrorCode::EmailTaken.into());
    }
    limit_mail(&state, ip, &new_email).await?;
    // The notice goes only to an address the account proved: not to one an attacker
    // registered without owning it. It counts against that address too.
    let notify = credentials.user.email_verified;
    if notify {
        let address = Email::parse(&current).map_err(ApiError::internal)?;
        limit_mail(&state, ip, &address).await?;
    }

    let languages = languages(&headers);
    let verify = MailJob {
        mail: Mail::VerifyEmail {
            user_id: auth.user_id,
            email: new_email.as_str().to_owned(),
        },
        languages: languages.clone(),
    };
    let notice = MailJob {
        mail: Mail::EmailChangeRequested {
            user_id: auth.user_id,
            email: current,
            new_email: new_email.as_str().to_owned(),
        },
        languages,
    };
    let mut tx = state.db.begin().await?;
    jobs::enqueue(&mut *tx, &verify.to_job()?).await?;
    if notify {
        jobs::enqueue(&mut *tx, &notice.to_job()?).await?;
    }
    tx.commit().await?;
    tracing::info!(user_id = %auth.user_id, "email change asked for");
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyEmail {
    /// The `token` of the link in the mail.
    #[schema(min_length = 1, max_length = 128)]
    pub token: String,
}

problems!(VerifyEmailProblems: InvalidEmailToken, EmailTaken, NotFound);

/// Prove the address with the token of a verification link.
///
/// The link of a registration verifies the account's address; the link of a change
/// makes the new address the account's, verified. Answers the user as it is now
/// (`email_verified: true`). 400 `invalid_email_token` for a token that is unknown,
/// expired, used, or another account's; 409 `email_taken` if another account took the
/// new address meanwhile.
#[utoipa::path(
    post,
    path = "/v1/me/email/verify",
    tag = "me",
    security(("bearer" = [])),
    request_body = VerifyEmail,
    responses(
        (status = 200, description = "The user, with the address verified", body = User),
        VerifyEmailProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn verify_email(
    State(state): State<AppState>,
    auth: AuthUser,
    Json(body): Json<VerifyEmail>,
) -> Result<axum::Json<User>, ApiError> {
    let token = checked_token(&body.token)?;
    let mut tx = state.db.begin().await?;
    match email::verify_email(&mut tx, auth.user_id, token).await? {
        Verification::Verified(user) => {
            tx.commit().await?;
            tracing::info!(user_id = %auth.user_id, "email verified");
            Ok(axum::Json(user.into()))
        }
        Verification::InvalidToken => Err(ErrorCode::InvalidEmailToken.into()),
        Verification::EmailTaken => Err(ErrorCode::EmailTaken.into()),
    }
}

problems!(SendVerificationProblems: EmailAlreadyVerified, NotFound);

/// Send the account's address a new verification link.
///
/// For a mail that did not arrive or a link that expired; the earlier links keep
/// working until they expire. 409 `email_already_verified` when there is nothing to
/// prove.
#[utoipa::path(
    post,
    path = "/v1/me/email/verification",
    tag = "me",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "A link is on its way"),
        SendVerificationProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn send_verification(
    State(state): State<AppState>,
    auth: AuthUser,
    ClientAddr(ip): ClientAddr,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let user = users::find_user(&state.db, auth.user_id)
        .await?
        .ok_or_else(no_user)?;
    if user.email_verified {
        return Err(ErrorCode::EmailAlreadyVerified.into());
    }
    let address = Email::parse(&user.email).map_err(ApiError::internal)?;
    limit_mail(&state, ip, &address).await?;
    enqueue_verification(&state.db, auth.user_id, &address, &headers).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Enqueues a verification mail for `address` of `user_id` (at registration, inside
/// its transaction).
pub async fn enqueue_verification(
    db: impl sqlx::PgExecutor<'_>,
    user_id: UserId,
    address: &Email,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let job = MailJob {
        mail: Mail::VerifyEmail {
            user_id,
            email: address.as_str().to_owned(),
        },
        languages: languages(headers),
    };
    jobs::enqueue(db, &job.to_job()?).await?;
    Ok(())
}

/// One more mail to `address` from `ip`, if both have room (else 429).
async fn limit_mail(state: &AppState, ip: ClientIp, address: &Email) -> Result<(), ApiError> {
    match mail_room(state, ip, address).await {
        None => Ok(()),
        Some(wait) => Err(ApiError::rate_limited(
            wait.as_secs_f64().ceil().max(1.0) as u64
        )),
    }
}

/// Takes one mail to `address` from `ip` from their allowances: `None` if both had
/// room, else how long until they would.
pub async fn mail_room(
    state: &AppState,
    ip: ClientIp,
    address: &Email,
) -> Option<std::time::Duration> {
    let per_ip = Rate::per_hour(state.settings.mail_per_ip_per_hour);
    let per_address = Rate::per_hour(state.settings.mail_per_address_per_hour);
    // Keyed by a hash of the address, not the address itself.
    let hashed = hex::encode(&Sha256::digest(address.as_str().as_bytes())[..16]);
    for (bucket, rate) in [
        (format!("rl:mail:ip:{}", ip.subject()), per_ip),
        (format!("rl:mail:address:{hashed}"), per_address),
    ] {
        if let Some(wait) = rate_limit::allow(state, &bucket, rate).await {
            return Some(wait);
        }
    }
    None
}

/// The request's `Accept-Language`, best first: at most five well-formed tags, `*` and
/// `q=0` left out.
fn languages(headers: &HeaderMap) -> Vec<String> {
    let Some(value) = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
    else {
        return Vec::new();
    };
    let mut tags: Vec<(u16, &str)> = value
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';');
            let tag = parts.next()?.trim();
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .map_or(Some(1000), |q| {
                    q.trim()
                        .parse::<f32>()
                        .ok()
                        .map(|q| (q.clamp(0.0, 1.0) * 1000.0) as u16)
                })?;
            let well_formed = (1..=35).contains(&tag.len())
                && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            (well_formed && q > 0).then_some((q, tag))
        })
        .collect();
    // Stable: equal weights keep the header's order.
    tags.sort_by_key(|(q, _)| std::cmp::Reverse(*q));
    tags.into_iter()
        .take(5)
        .map(|(_, tag)| tag.to_owned())
        .collect()
}

fn checked_token(token: &str) -> Result<&str, ApiError> {
    if token.is_empty() || token.chars().count() > MAX_TOKEN_CHARS {
        return Err(ErrorCode::InvalidEmailToken.into());
    }
    Ok(token)
}

fn no_user() -> ApiError {
    ApiError::new(ErrorCode::NotFound).detail("the user no longer exists")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn parse(value: &'static str) -> Vec<String> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static(value));
        languages(&headers)
    }

    #[test]
    fn accept_language_best_first() {
        assert_eq!(parse("de-AT,de;q=0.9,en;q=0.8"), ["de-AT", "de", "en"]);
        assert_eq!(parse("en;q=0.5, fr"), ["fr", "en"]);
        assert_eq!(parse("*, fr;q=0, x<y>, it"), ["it"]);
        assert_eq!(parse("a,b,c,d,e,f,g").len(), 5);
        assert!(languages(&HeaderMap::new()).is_empty());
    }
}
