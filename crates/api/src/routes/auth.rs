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
    email,
    identities::{self, SignIn as IdentitySignIn, VerifiedIdentity},
    sessions::{self, Ending, RevokeReason, Rotation},
    users::{self, InsertUser},
};
use mobile_domain::{DisplayName, Email, Password, SessionId, UserId, ValidationCode};
use mobile_events::Revoke;
use mobile_runtime::redis::Feature;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::User;
use crate::{
    error::{ApiError, ErrorCode},
    events,
    extract::{AuthUser, ClientAddr, Json},
    login_guard,
    metrics::FeatureLabel,
    middleware::rate_limit::{self, Class},
    oidc::{Identity, OidcError, Provider},
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
        .routes(routes!(sign_in_with_apple))
        .routes(routes!(sign_in_with_google))
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
///
/// A link that verifies the address is mailed to it (in the request's
/// `Accept-Language`); the account works before it is used (`email_verified: false`).
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
    ClientAddr(ip): ClientAddr,
    headers: HeaderMap,
    Json(body): Json<RegisterRequest>,
) -> Result<(StatusCode, axum::Json<AuthResponse>), ApiError> {
    let email = Email::parse(&body.email)?;
    let password = Password::parse(&body.password)?;
    let display_name = DisplayName::parse(&body.display_name)?;
    let password_hash = password::hash(password).await?;
    // Registering a stranger's address (and deleting, and again) must not flood it.
    let mail = super::email::mail_room(&state, ip, &email).await.is_none();

    let mut tx = state.db.begin().await?;
    let user = match users::insert_user(&mut *tx, &email, &password_hash, &display_name).await? {
        InsertUser::Inserted(user) => user,
        InsertUser::EmailTaken => return Err(ErrorCode::EmailTaken.into()),
    };
    let (session, refresh_token) = start_session(&mut tx, &state, user.id, &headers)
        .await?
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("a user inserted just now is gone")))?;
    // The link that proves the address commits with the account.
    if mail {
        super::email::enqueue_verification(&mut *tx, user.id, &email, &headers).await?;
    } else {
        tracing::info!(user_id = %user.id, "registered over the mail limits: no verification mail");
    }
    tx.commit().await?;

    let tokens = token_pair(&state, user.id, session, refresh_token)?;
    tracing::info!(user_id = %user.id, "registered");
    state.metrics.sign_in("password", "created");
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
    let stored_hash = credentials.as_ref().and_then(|c| c.password_hash.clone());
    let matches = password::verify(body.password, stored_hash).await?;
    let user = match credentials {
        Some(credentials) if matches => credentials.user,
        _ => {
            login_guard::failed(&state, &email, ip).await;
            state.metrics.sign_in("password", "invalid");
            return Err(ErrorCode::InvalidCredentials.into());
        }
    };
    login_guard::succeeded(&state, &email, ip).await;
    state.metrics.sign_in("password", "existing");

    let mut tx = state.db.begin().await?;
    // The account may have been deleted since its password was checked.
    let (session, refresh_token) = start_session(&mut tx, &state, user.id, &headers)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidCredentials))?;
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
    let mut tx = state.db.begin().await?;
    let ended =
        sessions::end_sessions(&mut *tx, auth.user_id, Ending::All, RevokeReason::LogoutAll)
            .await?;
    // Reset links and pending email changes go too: someone else may have asked for them.
    if let Some(user) = users::find_user(&mut *tx, auth.user_id).await? {
        email::revoke_links(&mut *tx, auth.user_id, &user.email).await?;
    }
    tx.commit().await?;
    tracing::info!(user_id = %auth.user_id, sessions = ended.len(), "signed out everywhere");
    events::revoke(&state, auth.user_id, Revoke::All).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a session of `user`: its first refresh token (returned), and the User-Agent
/// of the sign-in. `None` if the account was deleted since it was read.
async fn start_session(
    conn: &mut sqlx::PgConnection,
    state: &AppState,
    user: UserId,
    headers: &HeaderMap,
) -> Result<Option<(SessionId, String)>, ApiError> {
    let refresh = refresh::generate();
    let session = sessions::create_session(
        conn,
        user,
        &refresh.hash,
        refresh_expiry(state),
        user_agent(headers),
    )
    .await?;
    Ok(session.map(|session| (session, refresh.token)))
}

/// The User-Agent of a sign-in, if it is printable ASCII.
fn user_agent(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::USER_AGENT)
        .and_then(|value| value.to_str().ok())
        .filter(|agent| !agent.is_empty())
}

/// The body of `POST /v1/auth/apple` and `POST /v1/auth/google`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderSignInRequest {
    /// The id_token the platform's sign-in SDK returned.
    #[schema(
        max_length = 8192,
        example = "eyJraWQiOiJXNldjT0tCIiwiYWxnIjoiUlMyNTYifQ..."
    )]
    pub id_token: String,
    /// The raw nonce the app generated; it gave the provider its SHA-256 (hex).
    #[schema(
        min_length = 16,
        max_length = 256,
        example = "5f0b2c0c4d3e4a9b8f1a6c7d2e3f4a5b"
    )]
    pub nonce: String,
    /// A name for a new account (Apple gives the app the user's name on the first
    /// sign-in only, and never in the token). Left out: the token's name, or "Apple
    /// user" / "Google user".
    #[schema(schema_with = mobile_domain::schema::display_name_or_null)]
    pub display_name: Option<String>,
}

problems!(ProviderSignInProblems:
    InvalidIdToken,
    ProviderNotConfigured,
    EmailTaken,
    EmailTakenUnverified,
    EmailRequired,
    EmailUnverified,
    ProviderUnavailable,
    Invalid(InvalidDisplayName),
);

/// Sign in with Apple: the id_token of `ASAuthorizationAppleIDCredential`.
///
/// 200 for an existing account, 201 for a new one (without a password). The account is
/// found by Apple's stable user id; failing that, the account with the same email is
/// linked (its password, which no one verified, is removed and its sessions end); failing
/// that, one is made. The id_token's `nonce` claim must be the SHA-256 of `nonce`, and
/// each nonce signs in once.
#[utoipa::path(
    post,
    path = "/v1/auth/apple",
    tag = "auth",
    request_body = ProviderSignInRequest,
    responses(
        (status = 200, description = "Signed in", body = AuthResponse),
        (status = 201, description = "Signed up and in", body = AuthResponse),
        ProviderSignInProblems,
    )
)]
async fn sign_in_with_apple(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<ProviderSignInRequest>,
) -> Result<(StatusCode, axum::Json<AuthResponse>), ApiError> {
    provider_sign_in(&state, Provider::Apple, &headers, body).await
}

/// Sign in with Google: the id_token of Google Sign-In or Credential Manager.
///
/// As `POST /v1/auth/apple`, with Google's issuer and client ids.
#[utoipa::path(
    post,
    path = "/v1/auth/google",
    tag = "auth",
    request_body = ProviderSignInRequest,
    responses(
        (status = 200, description = "Signed in", body = AuthResponse),
        (status = 201, description = "Signed up and in", body = AuthResponse),
        ProviderSignInProblems,
    )
)]
async fn sign_in_with_google(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<ProviderSignInRequest>,
) -> Result<(StatusCode, axum::Json<AuthResponse>), ApiError> {
    provider_sign_in(&state, Provider::Google, &headers, body).await
}

#[tracing::instrument(skip_all, fields(provider = provider.as_str()))]
async fn provider_sign_in(
    state: &AppState,
    provider: Provider,
    headers: &HeaderMap,
    body: ProviderSignInRequest,
) -> Result<(StatusCode, axum::Json<AuthResponse>), ApiError> {
    let name = provider.as_str();
    let count = |outcome| state.metrics.sign_in(name, outcome);
    let display_name = body
        .display_name
        .as_deref()
        .map(DisplayName::parse)
        .transpose()?;
    let identity = match verify_id_token(state, provider, &body.id_token, &body.nonce).await {
        Ok(identity) => identity,
        Err(error) => {
            count(if error.code() == ErrorCode::ProviderUnavailable {
                "unavailable"
            } else {
                "invalid"
            });
            return Err(error);
        }
    };
    let email = identity.email.as_deref().and_then(|e| Email::parse(e).ok());
    let display_name = match display_name.or_else(|| {
        identity
            .name
            .as_deref()
            .and_then(|n| DisplayName::parse(n).ok())
    }) {
        Some(name) => name,
        None => DisplayName::parse(match provider {
            Provider::Apple => "Apple user",
            Provider::Google => "Google user",
        })
        .map_err(ApiError::internal)?,
    };
    let verified = VerifiedIdentity {
        provider: name,
        subject: &identity.subject,
        email: email.as_ref(),
        email_verified: identity.email_verified,
    };
    // Two first sign-ins of one person at once: the loser finds the winner's account.
    for _ in 0..2 {
        let mut tx = state.db.begin().await?;
        let (user, outcome, ended) =
            match identities::sign_in(&mut tx, verified, &display_name).await? {
                IdentitySignIn::Existing(user) => (user, "existing", Vec::new()),
                IdentitySignIn::Linked { user, ended } => (user, "linked", ended),
                IdentitySignIn::Created(user) => (user, "created", Vec::new()),
                IdentitySignIn::EmailTaken => {
                    count("refused");
                    return Err(ErrorCode::EmailTakenUnverified.into());
                }
                IdentitySignIn::OtherIdentity => {
                    count("refused");
                    return Err(ApiError::new(ErrorCode::EmailTaken).detail(format!(
                        "the account with this email signs in with another {name} account"
                    )));
                }
                IdentitySignIn::EmailUnverified => {
                    count("refused");
                    return Err(ErrorCode::EmailUnverified.into());
                }
                IdentitySignIn::NoEmail => {
                    count("refused");
                    return Err(ErrorCode::EmailRequired.into());
                }
                IdentitySignIn::Raced => continue,
            };
        // Deleted since it was found: the next round finds no identity and starts over.
        let Some((session, refresh_token)) =
            start_session(&mut tx, state, user.id, headers).await?
        else {
            continue;
        };
        tx.commit().await?;
        if !ended.is_empty() {
            tracing::warn!(user_id = %user.id, sessions = ended.len(), "a provider identity took over an account with the same email; its password was removed");
            events::revoke(state, user.id, Revoke::AllBut(session)).await;
        }
        count(outcome);
        let status = if outcome == "created" {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let tokens = token_pair(state, user.id, session, refresh_token)?;
        tracing::info!(user_id = %user.id, "signed in");
        return Ok((
            status,
            axum::Json(AuthResponse {
                user: user.into(),
                tokens,
            }),
        ));
    }
    Err(ApiError::internal(anyhow::anyhow!(
        "two first sign-ins of one identity raced twice"
    )))
}

/// The longest id_token taken (Apple's and Google's are about 1 KiB).
const MAX_ID_TOKEN_BYTES: usize = 8192;

/// Verifies an id_token of `provider` and spends its nonce: each nonce signs in once
/// (kept in Redis until the token expires; without Redis, the token's expiry alone
/// bounds a replay, and `redis_degraded_total{feature="nonces"}` counts it).
pub(crate) async fn verify_id_token(
    state: &AppState,
    provider: Provider,
    id_token: &str,
    nonce: &str,
) -> Result<Identity, ApiError> {
    if id_token.len() > MAX_ID_TOKEN_BYTES || !(16..=256).contains(&nonce.chars().count()) {
        return Err(ApiError::new(ErrorCode::ValidationFailed).detail(format!(
            "id_token is at most {MAX_ID_TOKEN_BYTES} bytes, and nonce 16 to 256 characters"
        )));
    }
    let verifier = state.sign_in.verifier(provider);
    if !verifier.enabled() {
        return Err(ErrorCode::ProviderNotConfigured.into());
    }
    let identity = verifier.verify(id_token, nonce).await.map_err(|error| match error {
        OidcError::Invalid(reason) => {
            tracing::info!(provider = provider.as_str(), %reason, "id_token refused");
            ApiError::new(ErrorCode::InvalidIdToken).detail(reason)
        }
        OidcError::Unavailable(reason) => {
            tracing::warn!(provider = provider.as_str(), %reason, "the provider's keys could not be fetched");
            ApiError::new(ErrorCode::ProviderUnavailable)
        }
    })?;
    let key = state.redis.key(format_args!(
        "nonce:{}:{}",
        provider.as_str(),
        hex::encode(Sha256::digest(nonce.as_bytes()))
    ));
    let ttl =
        (identity.expires_at - OffsetDateTime::now_utc().unix_timestamp()).clamp(1, 86_400) + 60;
    let first: Result<Option<String>, _> = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(ttl)
        .query_async(&mut state.redis.conn(Feature::Nonces))
        .await;
    match first {
        Ok(Some(_)) => Ok(identity),
        Ok(None) => Err(ApiError::new(ErrorCode::InvalidIdToken)
            .detail("this nonce was used for a sign-in before")),
        Err(error) => {
            tracing::warn!(%error, "the nonce store is unavailable; accepting the id_token on its expiry alone");
            state
                .metrics
                .redis_degraded
                .get_or_create(&FeatureLabel { feature: "nonces" })
                .inc();
            Ok(identity)
        }
    }
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
