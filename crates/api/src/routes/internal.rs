//! `/internal/v1/*`: for the app's other backends, not for apps. Authenticated by the
//! shared `INTERNAL_API_TOKEN` (compared in constant time) before the body is read;
//! without one configured these endpoints do not exist (404). Keep them off the public ingress too: the
//! NetworkPolicy and Ingress in `k8s/` route only `/v1` to the world.

use axum::{
    extract::{FromRequestParts, State},
    http::{StatusCode, header, request::Parts},
};
use mobile_db::{
    jobs::{self, Enqueued, Payload as _},
    push::Notification,
    users,
};
use mobile_domain::{JobId, NotificationText, Title, UserId};
use mobile_events::Channel;
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    error::{ApiError, ErrorCode},
    events,
    extract::Json,
    problems,
    state::AppState,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(notify))
}

/// The most a notification's custom data may take once serialized: APNs and FCM
/// payloads are limited to 4 KB, and the title and body need room too.
const MAX_DATA_BYTES: usize = 2048;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyRequest {
    pub user_id: UserId,
    #[schema(schema_with = mobile_domain::schema::title)]
    pub title: String,
    #[schema(schema_with = mobile_domain::schema::notification_body)]
    pub body: String,
    /// Key/values for the app, at most 2048 bytes as JSON (strings are sent as they
    /// are, other values as JSON text).
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NotifyResponse {
    /// The push job; it fans out to every device of the user.
    pub job_id: JobId,
}

problems!(NotifyProblems: NotFound, InvalidData, Invalid(InvalidTitle), Invalid(InvalidBody));

/// Notify a user on all their devices.
///
/// Enqueues a push job (APNs for iOS devices, FCM for Android) and sends a
/// `notification` event to the user's `user:` channel for apps that are open.
#[utoipa::path(
    post,
    path = "/internal/v1/notifications",
    tag = "internal",
    security(("internal" = [])),
    request_body = NotifyRequest,
    responses(
        (status = 202, description = "Enqueued", body = NotifyResponse),
        NotifyProblems,
    )
)]
#[tracing::instrument(skip_all)]
async fn notify(
    State(state): State<AppState>,
    _caller: InternalCaller,
    Json(request): Json<NotifyRequest>,
) -> Result<(StatusCode, axum::Json<NotifyResponse>), ApiError> {
    let title = Title::parse(&request.title)?;
    let body = NotificationText::parse(&request.body)?;
    match &request.data {
        None => {}
        Some(data @ serde_json::Value::Object(_))
            if data.to_string().len() <= MAX_DATA_BYTES && !has_nul(data) => {}
        Some(_) => return Err(ErrorCode::InvalidData.into()),
    }
    if users::find_user(&state.db, request.user_id)
        .await?
        .is_none()
    {
        return Err(ApiError::new(ErrorCode::NotFound).detail("no such user"));
    }
    let notification = Notification {
        user_id: request.user_id,
        title: title.as_str().to_owned(),
        body: body.as_str().to_owned(),
        data: request.data,
        collapse_id: None,
    };
    let Enqueued::Enqueued(job_id) = jobs::enqueue(&state.db, &notification.to_job()?).await?
    else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "a job without a unique key was a duplicate"
        )));
    };
    let frame = mobile_events::user_event(request.user_id, "notification", &notification);
    events::publish(&state, &[(Channel::User(request.user_id), frame)]).await;
    Ok((StatusCode::ACCEPTED, axum::Json(NotifyResponse { job_id })))
}

/// Whether a NUL hides anywhere in a JSON value: PostgreSQL's `jsonb` cannot hold one.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(text) => text.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(fields) => fields
            .iter()
            .any(|(key, value)| key.contains('\0') || has_nul(value)),
        _ => false,
    }
}

/// A caller that presented `Authorization: Bearer <INTERNAL_API_TOKEN>`. An extractor
/// of the request's head, so a handler taking it (before its body) refuses everyone
/// else without reading a byte of what they sent. Digests are compared, so the time
/// taken says nothing about how much of a guess was right.
#[derive(Debug)]
pub struct InternalCaller;

impl FromRequestParts<AppState> for InternalCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = &state.settings.internal_api_token else {
            return Err(ApiError::new(ErrorCode::NotFound).detail("no route for this path"));
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(mobile_auth::bearer_token)
            .unwrap_or_default();
        let same = Sha256::digest(presented.as_bytes())
            == Sha256::digest(expected.expose_secret().as_bytes());
        if same {
            Ok(Self)
        } else {
            Err(ApiError::new(ErrorCode::Unauthenticated)
                .detail("this endpoint needs the internal API token"))
        }
    }
}
