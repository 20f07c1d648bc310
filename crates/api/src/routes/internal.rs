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
    push::{Localized, Notification, PushKind},
    users,
};
use mobile_domain::{JobId, NotificationText, Title, UserId};
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
    /// Groups notifications in the notification centre (APNs `thread-id`; on Android
    /// `data.thread_id`, for the app's grouping): a conversation's id, say.
    #[schema(min_length = 1, max_length = 64, pattern = r"^[\x21-\x7e]+$")]
    pub thread_id: Option<String>,
    /// A notification with the same id replaces the previous one on the device.
    #[schema(min_length = 1, max_length = 64, pattern = r"^[\x21-\x7e]+$")]
    pub collapse_id: Option<String>,
    /// `true`: shown to no one; the app is woken to sync (APNs `content-available` at
    /// priority 5, an FCM data-only message at normal priority). Throttled by the
    /// platforms: a hint, never the only way news arrives.
    #[serde(default)]
    pub silent: bool,
    /// The title and body as keys of the app's strings, with arguments, so the phone
    /// shows them in its user's language (`title` and `body` are the fallback).
    pub localized: Option<LocalizedText>,
}

/// Keys of the app's strings (`Localizable.strings`, `strings.xml`) and their
/// arguments.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalizedText {
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,100}$")]
    pub title_key: Option<String>,
    #[serde(default)]
    #[schema(schema_with = loc_args)]
    pub title_args: Vec<String>,
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,100}$")]
    pub body_key: Option<String>,
    #[serde(default)]
    #[schema(schema_with = loc_args)]
    pub body_args: Vec<String>,
}

/// At most 10 arguments of at most 200 characters, without NUL.
fn loc_args() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(200))
                .pattern(Some(r"^[^\x00]*$")),
        )
        .max_items(Some(10))
        .into()
}

/// Checks what [`NotifyRequest`]'s schema says about its push options.
fn push_options(request: &NotifyRequest) -> Result<Option<Localized>, ApiError> {
    let invalid = |what: &str| ApiError::new(ErrorCode::InvalidPushOptions).detail(what.to_owned());
    for (name, value) in [
        ("thread_id", &request.thread_id),
        ("collapse_id", &request.collapse_id),
    ] {
        if let Some(value) = value
            && !((1..=64).contains(&value.len())
                && value.bytes().all(|b| (0x21..=0x7e).contains(&b)))
        {
            return Err(invalid(&format!(
                "{name} must be 1 to 64 printable ASCII characters"
            )));
        }
    }
    let Some(text) = &request.localized else {
        return Ok(None);
    };
    let key_ok = |key: &Option<String>| {
        key.as_ref().is_none_or(|k| {
            (1..=100).contains(&k.len())
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
    };
    let args_ok = |args: &[String]| {
        args.len() <= 10
            && args
                .iter()
                .all(|a| a.chars().count() <= 200 && !a.contains('\0'))
    };
    if !(key_ok(&text.title_key) && key_ok(&text.body_key)) {
        return Err(invalid(
            "a localisation key is 1 to 100 of A-Z a-z 0-9 . _ -",
        ));
    }
    if !(args_ok(&text.title_args) && args_ok(&text.body_args)) {
        return Err(invalid(
            "at most 10 arguments of at most 200 characters, without NUL",
        ));
    }
    Ok(Some(Localized {
        title_key: text.title_key.clone(),
        title_args: text.title_args.clone(),
        body_key: text.body_key.clone(),
        body_args: text.body_args.clone(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NotifyResponse {
    /// The push job; it fans out to every device of the user.
    pub job_id: JobId,
}

problems!(NotifyProblems: NotFound, InvalidData, InvalidPushOptions, Invalid(InvalidTitle), Invalid(InvalidBody));

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
    let localized = push_options(&request)?;
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
        collapse_id: request.collapse_id,
        thread_id: request.thread_id,
        kind: if request.silent {
            PushKind::Silent
        } else {
            PushKind::Alert
        },
        localized,
        badge: None,
        unread_badge: false,
        message_id: None,
    };
    let mut tx = state.db.begin().await?;
    mobile_db::user_events::hold_users(&mut tx, &[request.user_id]).await?;
    let Enqueued::Enqueued(job_id) = jobs::enqueue(&mut *tx, &notification.to_job()?).await? else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "a job without a unique key was a duplicate"
        )));
    };
    let frames = mobile_events::record_user_events(
        &mut tx,
        "notification",
        &[(request.user_id, &notification)],
    )
    .await?;
    tx.commit().await?;
    events::publish(&state, &frames).await;
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
