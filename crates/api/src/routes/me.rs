//! `/v1/me`: the signed-in user, with conditional requests.
//!
//! `GET` returns a strong `ETag` (a hash of the representation); a client that sends it
//! back in `If-None-Match` gets `304 Not Modified` and no body, which saves a phone's
//! data plan on every app start. `PATCH` honours `If-Match`, so two devices editing the
//! profile at once cannot silently overwrite each other (412 for the loser).
//!
//! `DELETE /v1/me` deletes the account, given its password (`mobile_db::accounts`
//! says what goes and what stays).
//!
//! `POST /v1/me/password` changes the password given the current one, and ends every
//! other session (their sockets close, their devices go); the session that changed it
//! stays signed in. Wrong current passwords are counted like failed sign-ins
//! (`crate::login_guard`), so a stolen access token cannot be used to guess it.

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use mobile_auth::password;
use mobile_db::{
    accounts::{self, Deletion},
    identities,
    sessions::{self, Ending, RevokeReason},
    users,
};
use mobile_domain::{ConversationEventKind, DisplayName, Email, Password, ValidationCode};
use mobile_events::Revoke;
use mobile_runtime::client_ip::ClientIp;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::User;
use crate::{
    error::{ApiError, ErrorCode},
    events,
    extract::{AuthUser, ClientAddr, Json},
    login_guard,
    middleware::rate_limit::{self, Class},
    oidc::Provider,
    problems,
    state::AppState,
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    let password = OpenApiRouter::new()
        .routes(routes!(change_password))
        .routes(routes!(delete_me))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Auth),
            rate_limit::limit,
        ));
    OpenApiRouter::new()
        .routes(routes!(get_me, patch_me))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Write),
            rate_limit::limit,
        ))
        .merge(password)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchMe {
    /// Left out (or `null`): unchanged.
    #[schema(schema_with = mobile_domain::schema::display_name_or_null)]
    pub display_name: Option<String>,
}

problems!(GetMeProblems: NotFound);
problems!(PatchMeProblems: NotFound, PreconditionFailed, Invalid(InvalidDisplayName));

/// The signed-in user.
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "me",
    security(("bearer" = [])),
    params(("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier response")),
    responses(
        (status = 200, description = "The user", body = User, headers(("ETag" = String))),
        (status = 304, description = "Unchanged since the ETag given", headers(("ETag" = String))),
        GetMeProblems,
    )
)]
async fn get_me(
    State(state): State<AppState>,
    auth: AuthUser,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let user = users::find_user(&state.db, auth.user_id)
        .await?
        .ok_or_else(no_user)?;
    let (body, etag) = representation(user.into())?;
    if matches_any(headers.get(header::IF_NONE_MATCH), &etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok(json_with_etag(StatusCode::OK, body, etag))
}

/// Change the signed-in user's profile.
#[utoipa::path(
    patch,
    path = "/v1/me",
    tag = "me",
    security(("bearer" = [])),
    request_body = PatchMe,
    params(("If-Match" = Option<String>, Header, description = "Update only if the user still has this ETag")),
    responses(
        (status = 200, description = "The updated user", body = User, headers(("ETag" = String))),
        PatchMeProblems,
    )
)]
async fn patch_me(
    State(state): State<AppState>,
    auth: AuthUser,
    headers: HeaderMap,
    Json(patch): Json<PatchMe>,
) -> Result<Response, ApiError> {
    let display_name = patch
        .display_name
        .as_deref()
        .map(DisplayName::parse)
        .transpose()?;

    let mut tx = state.db.begin().await?;
    // Lock the row so the If-Match comparison and the update see the same version.
    let current = users::find_user_for_update(&mut *tx, auth.user_id)
        .await?
        .ok_or_else(no_user)?;
    if let Some(if_match) = headers.get(header::IF_MATCH) {
        let (_, current_etag) = representation(current.clone().into())?;
        if !matches_any(Some(if_match), &current_etag) {
            return Err(ErrorCode::PreconditionFailed.into());
        }
    }
    let updated = match display_name {
        Some(name) => users::update_display_name(&mut *tx, auth.user_id, &name)
            .await?
            .ok_or_else(no_user)?,
        None => current,
    };
    tx.commit().await?;
    let (body, etag) = representation(updated.into())?;
    Ok(json_with_etag(StatusCode::OK, body, etag))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    #[schema(schema_with = mobile_domain::schema::presented_password)]
    pub current_password: String,
    #[schema(schema_with = mobile_domain::schema::new_password)]
    pub new_password: String,
}

problems!(ChangePasswordProblems: WrongPassword, NoPassword, NotFound, Invalid(WeakPassword), Invalid(InvalidPassword));

/// Change the password, and end every other session.
///
/// The session that asks stays signed in; every other one ends (its refresh tokens
/// stop working, its WebSockets close, its device is removed). A wrong
/// `current_password` is 403 `wrong_password` and counts as a failed sign-in of the
/// account from this address (429 once too many).
#[utoipa::path(
    post,
    path = "/v1/me/password",
    tag = "me",
    security(("bearer" = [])),
    request_body = ChangePassword,
    responses(
        (status = 204, description = "Changed; the other sessions ended"),
        ChangePasswordProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn change_password(
    State(state): State<AppState>,
    auth: AuthUser,
    ClientAddr(ip): ClientAddr,
    Json(body): Json<ChangePassword>,
) -> Result<StatusCode, ApiError> {
    if body.current_password.chars().count() > Password::MAX_PRESENTED_CHARS {
        return Err(ApiError::new(ValidationCode::InvalidPassword.into())
            .detail("current_password is too long"));
    }
    let new_password = Password::parse(&body.new_password)?;
    let credentials = users::find_credentials_by_id(&state.db, auth.user_id)
        .await?
        .ok_or_else(no_user)?;
    if credentials.password_hash.is_none() {
        return Err(ErrorCode::NoPassword.into());
    }
    check_password(&state, ip, &credentials, body.current_password).await?;
    let new_hash = password::hash(new_password).await?;

    let mut tx = state.db.begin().await?;
    // The hash checked above must still be the one replaced: two changes at once
    // with the same current password cannot both succeed.
    let locked = users::find_credentials_for_update(&mut *tx, auth.user_id)
        .await?
        .ok_or_else(no_user)?;
    if locked.password_hash != credentials.password_hash {
        return Err(ApiError::new(ErrorCode::WrongPassword)
            .detail("the password changed meanwhile; sign in with the new one"));
    }
    users::update_password_hash(&mut *tx, auth.user_id, &new_hash).await?;
    // Links someone may have asked for with the old password go with it.
    mobile_db::email::revoke_links(&mut *tx, auth.user_id, &locked.user.email).await?;
    let ended = sessions::end_sessions(
        &mut *tx,
        auth.user_id,
        Ending::AllBut(auth.session_id),
        RevokeReason::PasswordChanged,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(user_id = %auth.user_id, ended = ended.len(), "password changed");
    events::revoke(&state, auth.user_id, Revoke::AllBut(auth.session_id)).await;
    Ok(StatusCode::NO_CONTENT)
}

/// What confirms a sensitive change (deleting the account, changing its address): its
/// password, or (for an account that signs in with Apple or Google) a fresh id_token of
/// its identity there.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Confirmation {
    Password(PasswordConfirmation),
    Provider(ProviderConfirmation),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordConfirmation {
    /// The account's password.
    #[schema(schema_with = mobile_domain::schema::presented_password)]
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfirmation {
    pub provider: ProviderName,
    /// An id_token of the account's identity at the provider, issued within
    /// `REAUTH_MAX_AGE_SECONDS` (the app signs in with the provider again).
    #[schema(max_length = 8192)]
    pub id_token: String,
    /// The raw nonce whose SHA-256 the app gave the provider.
    #[schema(min_length = 16, max_length = 256)]
    pub nonce: String,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderName {
    Apple,
    Google,
}

impl From<ProviderName> for Provider {
    fn from(name: ProviderName) -> Self {
        match name {
            ProviderName::Apple => Self::Apple,
            ProviderName::Google => Self::Google,
        }
    }
}

problems!(DeleteMeProblems:
    WrongPassword,
    ReauthenticationRequired,
    InvalidIdToken,
    ProviderNotConfigured,
    ProviderUnavailable,
    NotFound,
    Invalid(InvalidPassword),
);

/// Delete the account, confirmed by its password or a fresh sign-in with its provider.
///
/// At once: every session ends (WebSockets close with 4001 `session_revoked`), every
/// device, upload, identity, membership and session is deleted, and conversations no
/// one else is in go whole; uploads' objects leave storage by a job. Messages sent to
/// conversations others are still in stay with them under "Deleted account" (without
/// their media). The email may register a new account right after. Deleting again
/// (the access token is still unexpired) is 204. A wrong password is 403
/// `wrong_password` and counts as a failed sign-in; an id_token of another identity,
/// or older than `REAUTH_MAX_AGE_SECONDS`, is 403 `reauthentication_required`.
#[utoipa::path(
    delete,
    path = "/v1/me",
    tag = "me",
    security(("bearer" = [])),
    request_body = Confirmation,
    responses(
        (status = 204, description = "Deleted (or deleted before)"),
        DeleteMeProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn delete_me(
    State(state): State<AppState>,
    auth: AuthUser,
    ClientAddr(ip): ClientAddr,
    Json(body): Json<Confirmation>,
) -> Result<StatusCode, ApiError> {
    let Some(credentials) = users::find_credentials_by_id(&state.db, auth.user_id).await? else {
        return if accounts::is_deleted(&state.db, auth.user_id).await? {
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(no_user())
        };
    };
    confirm(&state, auth.user_id, ip, &credentials, body).await?;

    let mut tx = state.db.begin().await?;
    match accounts::delete_account(&mut tx, auth.user_id).await? {
        Deletion::Deleted { uploads, left } => {
            tx.commit().await?;
            tracing::info!(user_id = %auth.user_id, uploads, "account deleted");
            events::revoke(&state, auth.user_id, Revoke::All).await;
            let frames: Vec<_> = left
                .iter()
                .map(|left| {
                    mobile_events::conversation_event(
                        left.conversation,
                        ConversationEventKind::MemberRemoved,
                        left.seq,
                        &left.data,
                    )
                })
                .collect();
            events::publish(&state, &frames).await;
        }
        Deletion::AlreadyDeleted => {}
        Deletion::NotFound => return Err(no_user()),
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Checks what the user gave to confirm a sensitive change: the password (under the
/// sign-in guard), or a recent id_token of one of the account's identities.
pub(crate) async fn confirm(
    state: &AppState,
    user: mobile_domain::UserId,
    ip: ClientIp,
    credentials: &users::Credentials,
    confirmation: Confirmation,
) -> Result<(), ApiError> {
    match confirmation {
        Confirmation::Password(PasswordConfirmation { password }) => {
            if password.chars().count() > Password::MAX_PRESENTED_CHARS {
                return Err(ApiError::new(ValidationCode::InvalidPassword.into())
                    .detail("password is too long"));
            }
            check_password(state, ip, credentials, password).await
        }
        Confirmation::Provider(confirmation) => check_provider(state, user, confirmation).await,
    }
}

/// Checks that `confirmation` is a recent id_token of one of `user`'s identities.
async fn check_provider(
    state: &AppState,
    user: mobile_domain::UserId,
    confirmation: ProviderConfirmation,
) -> Result<(), ApiError> {
    let provider = Provider::from(confirmation.provider);
    let identity = crate::routes::auth::verify_id_token(
        state,
        provider,
        &confirmation.id_token,
        &confirmation.nonce,
    )
    .await?;
    let age = time::OffsetDateTime::now_utc().unix_timestamp() - identity.issued_at;
    let max_age =
        i64::try_from(state.settings.sign_in.reauth_max_age.as_secs()).unwrap_or(i64::MAX);
    if age > max_age {
        return Err(
            ApiError::new(ErrorCode::ReauthenticationRequired).detail(format!(
                "the id_token was issued {age} s ago; sign in with {} again (at most {max_age} s)",
                provider.as_str()
            )),
        );
    }
    if !identities::has_identity(&state.db, user, provider.as_str(), &identity.subject).await? {
        return Err(ApiError::new(ErrorCode::ReauthenticationRequired)
            .detail("the id_token is of another account's identity"));
    }
    Ok(())
}

/// Checks a password given to confirm a sensitive change, under the sign-in guard: a
/// wrong one is 403 `wrong_password` and counts as a failed sign-in of the account.
async fn check_password(
    state: &AppState,
    ip: ClientIp,
    credentials: &users::Credentials,
    given: String,
) -> Result<(), ApiError> {
    let email = Email::parse(&credentials.user.email).map_err(ApiError::internal)?;
    login_guard::before_attempt(state, &email, ip).await?;
    if !password::verify(given, credentials.password_hash.clone()).await? {
        login_guard::failed(state, &email, ip).await;
        return Err(ErrorCode::WrongPassword.into());
    }
    login_guard::succeeded(state, &email, ip).await;
    Ok(())
}

fn no_user() -> ApiError {
    ApiError::new(ErrorCode::NotFound).detail("the user no longer exists")
}

/// The JSON body and its strong ETag: the first 128 bits of its SHA-256, quoted.
fn representation(user: User) -> Result<(Vec<u8>, HeaderValue), ApiError> {
    let body = serde_json::to_vec(&user).map_err(ApiError::internal)?;
    let digest = Sha256::digest(&body);
    let etag = format!("\"{}\"", hex::encode(&digest[..16]));
    let etag = HeaderValue::from_str(&etag).map_err(ApiError::internal)?;
    Ok((body, etag))
}

fn json_with_etag(status: StatusCode, body: Vec<u8>, etag: HeaderValue) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-cache"),
            ),
        ],
        body,
    )
        .into_response()
}

/// Whether an `If-None-Match` / `If-Match` value names `etag`: `*`, or a comma-separated
/// list compared weakly (a `W/` prefix is ignored), as RFC 9110 prescribes for GET.
fn matches_any(header: Option<&HeaderValue>, etag: &HeaderValue) -> bool {
    let Some(value) = header.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let ours = etag.to_str().unwrap_or_default();
    value.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == ours
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_matching() {
        let etag = HeaderValue::from_static("\"abc\"");
        let check = |v: &'static str| matches_any(Some(&HeaderValue::from_static(v)), &etag);
        assert!(check("\"abc\""));
        assert!(check("W/\"abc\""));
        assert!(check("\"x\", \"abc\""));
        assert!(check("*"));
        assert!(!check("\"abd\""));
        assert!(!check("abc"));
        assert!(!matches_any(None, &etag));
    }
}
