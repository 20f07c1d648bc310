//! `/internal/v1/*`: for the app's other backends, not for apps. Authenticated by the
//! shared `INTERNAL_API_TOKEN` (compared in constant time); without one configured
//! these endpoints do not exist (404). Keep them off the public ingress too: the
//! NetworkPolicy and Ingress in `k8s/` route only `/v1` to the world.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, header},
};
use mobile_db::{
    jobs::{self, Enqueued, NewJob},
    push::{self, Notification},
    users,
};
use mobile_domain::{MessageText, Title, UserId};
use mobile_events::Channel;
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    error::{ApiError, Problem},
    events,
    extract::Json,
    state::AppState,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(notify))
}

/// The most a notification's custom data may take once serialized: APNs and FCM
/// payloads are limited to 4 KB, and the title and body need room too.
const MAX_DATA_BYTES: usize = 2048;
/// The longest notification body: what a lock screen shows, and then some.
const MAX_BODY_CHARS: usize = 1000;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyRequest {
    pub user_id: Uuid,
    #[schema(example = "Your order shipped")]
    pub title: String,
    #[schema(example = "It arrives on Thursday.")]
    pub body: String,
    /// String key/values for the app (non-string values are sent as JSON text).
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NotifyResponse {
    /// The push job; it fans out to every device of the user.
    pub job_id: Uuid,
}

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
        (status = 401, description = "`unauthenticated`: not the internal token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such user, or internal endpoints are disabled", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_body`, `invalid_title`, `invalid_data`, `validation_failed`", body = Problem, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(skip_all)]
async fn notify(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(request): Json<NotifyRequest>,
) -> Result<(StatusCode, axum::Json<NotifyResponse>), ApiError> {
    authorize(&state, &headers)?;
    let title = Title::parse(&request.title)?;
    let body = MessageText::parse(&request.body)?;
    if body.as_str().chars().count() > MAX_BODY_CHARS {
        return Err(ApiError::unprocessable(
            "invalid_body",
            format!("body must have at most {MAX_BODY_CHARS} characters"),
        ));
    }
    match &request.data {
        None => {}
        Some(data @ serde_json::Value::Object(_)) if data.to_string().len() <= MAX_DATA_BYTES => {}
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_data",
                format!("data must be a JSON object of at most {MAX_DATA_BYTES} bytes"),
            ));
        }
    }
    let user = UserId::from_uuid(request.user_id);
    if users::find_user(&state.db, user).await?.is_none() {
        return Err(ApiError::not_found("no such user"));
    }
    let notification = Notification {
        user_id: request.user_id,
        title: title.as_str().to_owned(),
        body: body.as_str().to_owned(),
        data: request.data,
        collapse_id: None,
    };
    let payload = serde_json::to_value(&notification).map_err(ApiError::internal)?;
    let Enqueued::Enqueued(job_id) =
        jobs::enqueue(&state.db, &NewJob::new(push::NOTIFY_JOB, payload)).await?
    else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "a job without a unique key was a duplicate"
        )));
    };
    let frame = mobile_events::user_event(request.user_id, "notification", &notification);
    events::publish(&state, &[(Channel::User(request.user_id), frame)]).await;
    Ok((StatusCode::ACCEPTED, axum::Json(NotifyResponse { job_id })))
}

/// Checks `Authorization: Bearer <INTERNAL_API_TOKEN>`, comparing digests so the time
/// taken says nothing about how much of a guess was right.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.settings.internal_api_token else {
        return Err(ApiError::not_found("no route for this path"));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or_default();
    let same =
        Sha256::digest(presented.as_bytes()) == Sha256::digest(expected.expose_secret().as_bytes());
    if same {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "unauthenticated",
            "this endpoint needs the internal API token",
        ))
    }
}
