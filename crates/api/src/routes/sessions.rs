//! `/v1/sessions`: where the user is signed in, and ending a session from another one.
//!
//! A session is one sign-in (a refresh-token family, `mobile_db::sessions`). The list
//! shows each live one with what signed in (the app's User-Agent at sign-in) and the
//! device it registered, so a user who lost a phone can tell it from the others and end
//! it. Ending a session revokes its refresh tokens, closes its WebSockets within 2 s
//! (4001 `session_revoked`), and removes the device it registered, so the lost phone
//! gets no more pushes. Its access tokens keep working for REST until they expire (at
//! most `ACCESS_TOKEN_TTL_SECONDS`), as after a logout.

use axum::{extract::State, http::StatusCode};
use mobile_db::sessions::{self, Ending, RevokeReason};
use mobile_domain::{DeviceId, Platform, SessionId};
use mobile_events::Revoke;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::pagination::{self, PageQuery};
use crate::{
    error::{ApiError, ErrorCode},
    events,
    extract::{AuthUser, Path, Query},
    middleware::rate_limit::{self, Class},
    problems,
    state::AppState,
};

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_sessions))
        .routes(routes!(end_session))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Write),
            rate_limit::limit,
        ))
}

/// A live session.
#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    pub id: SessionId,
    /// Whether this is the session of the access token that asked.
    pub current: bool,
    /// When it signed in.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Its sign-in or its last token refresh, whichever is later: an app in use
    /// refreshes at least once per access-token lifetime.
    #[serde(with = "time::serde::rfc3339")]
    pub last_used_at: OffsetDateTime,
    /// The User-Agent the app sent when it signed in (at most 256 characters).
    pub user_agent: Option<String>,
    /// The device this session registered for pushes, if it did.
    pub device: Option<SessionDevice>,
}

/// The device a session registered (`PUT /v1/devices/{device_id}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionDevice {
    pub device_id: DeviceId,
    pub platform: Platform,
    pub app_version: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionPage {
    /// Newest first.
    pub items: Vec<Session>,
    pub next_cursor: Option<String>,
}

problems!(ListSessionsProblems: InvalidCursor);

/// The signed-in user's live sessions, newest first.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    security(("bearer" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "One page of live sessions", body = SessionPage),
        ListSessionsProblems,
    )
)]
async fn list_sessions(
    State(state): State<AppState>,
    auth: AuthUser,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<SessionPage>, ApiError> {
    let limit = pagination::limit(query.limit)?;
    let before = query
        .cursor
        .as_deref()
        .map(pagination::decode_id::<SessionId>)
        .transpose()?;
    // One extra row tells whether another page exists.
    let rows = sessions::list_sessions(
        &state.db,
        auth.user_id,
        state.settings.session_max_age,
        before,
        i64::from(limit) + 1,
    )
    .await?;
    let (rows, more) = pagination::split_page(rows, limit);
    let next_cursor = more
        .then(|| rows.last().map(|last| pagination::encode_id(last.id)))
        .flatten();
    let items = rows
        .into_iter()
        .map(|row| Session {
            id: row.id,
            current: row.id == auth.session_id,
            created_at: row.created_at,
            last_used_at: row.last_refreshed_at,
            user_agent: row.user_agent,
            device: row
                .device_id
                .zip(row.platform)
                .map(|(device_id, platform)| SessionDevice {
                    device_id,
                    platform,
                    app_version: row.app_version,
                }),
        })
        .collect();
    Ok(axum::Json(SessionPage { items, next_cursor }))
}

problems!(EndSessionProblems: NotFound);

/// End one of the signed-in user's sessions (the current one too: that is a logout).
///
/// 204 also when the session had already ended, so the call can be retried; 404 for
/// an id that is not one of the user's sessions.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{session_id}",
    tag = "sessions",
    security(("bearer" = [])),
    params(("session_id" = SessionId, Path, description = "A session's id, from the list")),
    responses(
        (status = 204, description = "Ended"),
        EndSessionProblems,
    )
)]
async fn end_session(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(session_id): Path<SessionId>,
) -> Result<StatusCode, ApiError> {
    let ended = sessions::end_sessions(
        &state.db,
        auth.user_id,
        Ending::One(session_id),
        RevokeReason::Ended,
    )
    .await?;
    if ended.is_empty() {
        if !sessions::is_session_of(&state.db, auth.user_id, session_id).await? {
            return Err(ApiError::new(ErrorCode::NotFound).detail("no such session"));
        }
    } else {
        tracing::info!(user_id = %auth.user_id, %session_id, "session ended by its user");
        events::revoke(&state, auth.user_id, Revoke::Session(session_id)).await;
    }
    Ok(StatusCode::NO_CONTENT)
}
