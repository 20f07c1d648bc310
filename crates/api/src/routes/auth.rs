//! `/v1/auth`: register, login, refresh, logout, logout everywhere.
//!
//! Register and login start a session (a refresh-token family) and return an access
//! token plus the session's first refresh token. Refresh rotates: the presented token
//! is spent and a new pair returned; presenting a spent token again revokes the whole
//! session (see `mobile_db::sessions`). Logout revokes the session; logout-all every
//! session of the user. The User-Agent at sign-in is kept with the session, for the
//! user's list of sessions (`/v1/sessions`).

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, header},
};
use mobile_auth::{password, refresh};
use mobile_db::{
    sessions::{self, Ending, RevokeReason, Rotation},
    users::{self, InsertUser},
};
use mobile_domain::{DisplayName, Email, Password, SessionId, UserId, ValidationCode};
use mobile_events::Revoke;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::User;
use crate::{
    error::{ApiError, ErrorCode},
    events,
    extract::{AuthUser, ClientAddr, Json},
    login_guard,
    middleware::rate_limit::{self, Class},
    problems,
    state::AppState,
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(refresh_tokens))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Auth),
            rate_limit::limit,
        ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Lower-cased; must be unique.
    #[schema(schema_with = mobile_domain::schema::email)]
    pub email: String,
    #[schema(schema_with = mobile_domain::schema::new_password)]
    pub password: String,
    #[schema(schema_with = mobile_domain::schema::display_name)]
    pub display_name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[schema(schema_with = mobile_domain::schema::email)]
    pub email: String,
    #[schema(schema_with = mobile_domain::schema::presented_password)]
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token of the last pair.
    #[schema(example = "rt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")]
    pub refresh_token: String,
}

/// The answer to register and login: the user and a fresh token pair.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuthResponse {
    pub user: User,
    #[serde(flatten)]
    pub tokens: TokenPair,
}

/// An access token and the refresh token to get the next one with.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenPair {
    /// EdDSA JWT; send as `Authorization: Bearer <access_token>`.
    pub access_token: String,
    /// Opaque; single use: each refresh returns a new one.
    pub refresh_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    #[schema(example = 900)]
    pub expires_in: u64,
}

problems!(RegisterProblems: EmailTaken, Invalid(InvalidEmail), Invalid(WeakPassword), Invalid(InvalidPassword), Invalid(InvalidDisplayName));

/// Create an account and sign in.
#[utoipa::path(
    post,
    path = "/v1/auth/register",
    tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered and signed in", body = AuthResponse),
        RegisterProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<RegisterRequest>,
) -> Result<(StatusCode, axum::Json<AuthResponse>), ApiError> {
    let email = Email::parse(&body.email)?;
    let password = Password::parse(&body.password)?;
    let display_name = DisplayName::parse(&body.display_name)?;
    let password_hash = password::hash(password).await?;

    let mut tx = state.db.begin().await?;
    let user = match users::insert_user(&mut *tx, &email, &password_hash, &display_name).await? {
        InsertUser::Inserted(user) => user,
        InsertUser::EmailTaken => return Err(ErrorCode::EmailTaken.into()),
    };
    let (session, refresh_token) = start_session(&mut tx, &state, user.id, &headers).await?;
    tx.commit().await?;

    let tokens = token_pair(&state, user.id, session, refresh_token)?;
    tracing::info!(user_id = %user.id, "registered");
    Ok((
        StatusCode::CREATED,
        axum::Json(AuthResponse {
            user: user.into(),
            tokens,
        }),
    ))
}

problems!(LoginProblems: InvalidCredentials, Invalid(InvalidEmail), Invalid(InvalidPassword));

/// Sign in with email and password.
///
/// Unknown email and wrong password get the same answer, after the same password-hash work.
#[utoipa::path(
    post,
    path = "/v1/auth/login",
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Signed in", body = AuthResponse),
        LoginProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn login(
    State(state): State<AppState>,
    ClientAddr(ip): ClientAddr,
    headers: HeaderMap,
    Json(body): Json<LoginRequest>,
) -> Result<axum::Json<AuthResponse>, ApiError> {
    let email = Email::parse(&body.email)?;
    if body.password.chars().count() > Password::MAX_PRESENTED_CHARS {
        return Err(
            ApiError::new(ValidationCode::InvalidPassword.into()).detail("password is too long")
        );
    }
    login_guard::before_attempt(&state, &email, ip).await?;
    let credentials = users::find_credentials(&state.db, &email).await?;
    let stored_hash = credentials.as_ref().map(|c| c.password_hash.clone());
    let matches = password::verify(body.password, stored_hash).await?;
    let user = match credentials {
        Some(credentials) if matches => credentials.user,
        _ => {
            login_guard::failed(&state, &email, ip).await;
            return Err(ErrorCode::InvalidCredentials.into());
        }
    };
    login_guard::succeeded(&state, &email, ip).await;

    let mut tx = state.db.begin().await?;
    let (session, refresh_token) = start_session(&mut tx, &state, user.id, &headers).await?;
    tx.commit().await?;
    let tokens = token_pair(&state, user.id, session, refresh_token)?;
    tracing::info!(user_id = %user.id, "signed in");
    Ok(axum::Json(AuthResponse {
        user: user.into(),
        tokens,
    }))
}

problems!(RefreshProblems: InvalidRefreshToken);

/// Exchange a refresh token for a new token pair.
///
/// The presented token is spent. Presenting a spent token again is treated as theft:
/// the whole session is revoked and every token of it stops working.

#[utoipa::path(
    post,
    path = "/v1/auth/refresh",
    tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "A new token pair", body = TokenPair),
        RefreshProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn refresh_tokens(
    State(state): State<AppState>,
    Json(body): Json<RefreshRequest>,
) -> Result<axum::Json<TokenPair>, ApiError> {
    let invalid = || ApiError::new(ErrorCode::InvalidRefreshToken);
    let presented = refresh::parse(&body.refresh_token).ok_or_else(invalid)?;
    let successor = refresh::generate();
    match sessions::rotate_refresh_token(
        &state.db,
        &presented,
        &successor.hash,
        refresh_expiry(&state),
        state.settings.session_max_age,
    )
    .await?
    {
        Rotation::Rotated {
            user_id,
            session_id,
        } => Ok(axum::Json(token_pair(
            &state,
            user_id,
            session_id,
            successor.token,
        )?)),
        Rotation::Reused {
            user_id,
            session_id,
        } => {
            tracing::warn!(%session_id, "spent refresh token presented again; session revoked");
            events::revoke(&state, user_id, Revoke::Session(session_id)).await;
            Err(invalid())
        }
        Rotation::Invalid => Err(invalid()),
    }
}

/// Sign out: revoke the session the refresh token belongs to.
///
/// Always 204, also for an unknown token, so logout can be retried blindly. The
/// session's WebSockets close (4001 `session_revoked`); access tokens already issued
/// stay valid for REST until they expire (at most `ACCESS_TOKEN_TTL_SECONDS`).
#[utoipa::path(
    post,
    path = "/v1/auth/logout",
    tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 204, description = "Signed out"),
    )
)]
#[tracing::instrument(skip_all)]
async fn logout(
    State(state): State<AppState>,
    Json(body): Json<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    if let Some(hash) = refresh::parse(&body.refresh_token)
        && let Some((session, user)) =
            sessions::revoke_session_of_token(&state.db, &hash, RevokeReason::Logout).await?
    {
        events::revoke(&state, user, Revoke::Session(session)).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Sign out everywhere: end every session of the signed-in user, this one included.
///
/// Every refresh token stops working, every WebSocket of the user closes (4001
/// `session_revoked`), and the devices the sessions registered are removed. Access
/// tokens already issued stay valid for REST until they expire.
#[utoipa::path(
    post,
    path = "/v1/auth/logout-all",
    tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Every session ended"),
    )
)]
#[tracing::instrument(skip_all)]
async fn logout_all(State(state): State<AppState>, auth: AuthUser) -> Result<StatusCode, ApiError> {
    let ended = sessions::end_sessions(
        &state.db,
        auth.user_id,
        Ending::All,
        RevokeReason::LogoutAll,
    )
    .await?;
    tracing::info!(user_id = %auth.user_id, sessions = ended.len(), "signed out everywhere");
    events::revoke(&state, auth.user_id, Revoke::All).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a session of `user`: its first refresh token (returned), and the User-Agent
/// of the sign-in.
async fn start_session(
    conn: &mut sqlx::PgConnection,
    state: &AppState,
    user: UserId,
    headers: &HeaderMap,
) -> Result<(SessionId, String), ApiError> {
    let refresh = refresh::generate();
    let session = sessions::create_session(
        conn,
        user,
        &refresh.hash,
        refresh_expiry(state),
        user_agent(headers),
    )
    .await?;
    Ok((session, refresh.token))
}

/// The User-Agent of a sign-in, if it is printable ASCII.
fn user_agent(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::USER_AGENT)
        .and_then(|value| value.to_str().ok())
        .filter(|agent| !agent.is_empty())
}

fn refresh_expiry(state: &AppState) -> OffsetDateTime {
    OffsetDateTime::now_utc() + state.settings.refresh_token_ttl
}

fn token_pair(
    state: &AppState,
    user: UserId,
    session: SessionId,
    refresh_token: String,
) -> Result<TokenPair, ApiError> {
    let access_token = state
        .tokens
        .issue(user, session)
        .map_err(ApiError::internal)?;
    Ok(TokenPair {
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: state.tokens.ttl().as_secs(),
    })
}
