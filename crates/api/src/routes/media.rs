//! `/v1/media`: image uploads and their variants.
//!
//! An upload is streamed to object storage as it arrives (never held whole in memory),
//! within `MEDIA_MAX_BYTES`. Before storing anything, the first bytes are checked:
//! they must be the JPEG, PNG or WebP the request says, and a header that claims more
//! than `MEDIA_MAX_PIXELS` is refused at once. The media row and the `media.process`
//! job commit together; the worker renders `thumb`, `medium` and `large` and announces
//! `media.ready` on the owner's `user:` channel.
//!
//! Uploads are not replayed by `Idempotency-Key` (their bodies are far larger than
//! what the idempotency store keeps): a retried upload makes a second media, which
//! costs storage, never correctness.

use std::io::Cursor;

use axum::{
    body::Body,
    extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _, TryStreamExt as _, stream};
use image::ImageFormat;
use mobile_db::{
    jobs::{self, NewJob},
    media::{self, ProcessJob},
};
use mobile_events::MediaData;
use mobile_storage::PutStreamError;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    error::{ApiError, Problem},
    extract::{AuthUser, Path},
    middleware::rate_limit::{self, Class},
    state::AppState,
};

/// Where uploads go (the idempotency middleware leaves this path alone).
pub const UPLOAD_PATH: &str = "/v1/media";

pub fn router(state: &AppState) -> OpenApiRouter<AppState> {
    // A multipart form may carry the whole image plus a little form overhead.
    let form_limit = usize::try_from(state.settings.media_max_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(SNIFF_BYTES);
    let uploads = OpenApiRouter::new()
        .routes(routes!(upload))
        .layer(DefaultBodyLimit::max(form_limit));
    OpenApiRouter::new()
        .merge(uploads)
        .routes(routes!(get_media))
        .routes(routes!(get_variant))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Class::Write),
            rate_limit::limit,
        ))
}

/// The content types accepted, and the format their bytes must be.
const ACCEPTED: [(&str, ImageFormat); 3] = [
    ("image/jpeg", ImageFormat::Jpeg),
    ("image/png", ImageFormat::Png),
    ("image/webp", ImageFormat::WebP),
];
/// How much of an upload is read before deciding on it: enough for any format's
/// header, including a JPEG's EXIF segment (at most 64 KiB).
const SNIFF_BYTES: usize = 64 * 1024 + 1024;
/// The variants the worker renders.
const VARIANTS: [&str; 3] = ["thumb", "medium", "large"];

type ByteStream<'a> = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UploadError>> + Send + 'a>>;

/// Why reading an upload stopped.
#[derive(Debug)]
enum UploadError {
    TooLarge,
    Read(String),
}

/// Upload an image.
///
/// Send the bytes as the body with `Content-Type: image/jpeg`, `image/png` or
/// `image/webp`, or as `multipart/form-data` with the image in a part named `file`
/// (that part's `Content-Type` says the format). The answer comes before processing:
/// watch for `media.ready` (or `media.failed`) on the WebSocket, or poll
/// `GET /v1/media/{id}`.
#[utoipa::path(
    post,
    path = "/v1/media",
    tag = "media",
    security(("bearer" = [])),
    request_body(content(
        (Vec<u8> = "image/jpeg"), (Vec<u8> = "image/png"), (Vec<u8> = "image/webp"),
        (Vec<u8> = "multipart/form-data"),
    )),
    responses(
        (status = 202, description = "Stored; processing", body = MediaData),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: over `MEDIA_MAX_BYTES`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`, or `content_type_mismatch` when the bytes are not the format declared", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`empty_upload`, `invalid_image`, `image_too_large` (over `MEDIA_MAX_PIXELS`), `missing_file`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`", body = Problem, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %auth.user_id))]
async fn upload(
    State(state): State<AppState>,
    auth: AuthUser,
    request: Request,
) -> Result<(StatusCode, axum::Json<MediaData>), ApiError> {
    let max = state.settings.media_max_bytes;
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > max) {
        return Err(too_large(max));
    }
    let content_type = content_type(request.headers());
    if !content_type.starts_with("multipart/form-data") {
        let body = request
            .into_body()
            .into_data_stream()
            .map_err(|e| UploadError::Read(e.to_string()));
        return store(&state, auth, &content_type, Box::pin(body)).await;
    }
    // The image is the part named `file`; its own Content-Type says the format.
    let mut form = Multipart::from_request(request, &state)
        .await
        .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?
    {
        if field.name() == Some("file") {
            let content_type = field
                .content_type()
                .unwrap_or_default()
                .to_ascii_lowercase();
            let body = field.map_err(|e| UploadError::Read(e.body_text()));
            return store(&state, auth, &content_type, Box::pin(body)).await;
        }
    }
    Err(ApiError::unprocessable(
        "missing_file",
        "the form has no part named `file`",
    ))
}

/// Checks the head of an image stream, stores the whole of it, and records the media
/// and its processing job in one transaction.
async fn store(
    state: &AppState,
    auth: AuthUser,
    content_type: &str,
    body: ByteStream<'_>,
) -> Result<(StatusCode, axum::Json<MediaData>), ApiError> {
    let max = state.settings.media_max_bytes;
    let format = accepted_format(content_type).ok_or_else(|| unsupported(content_type))?;
    let mut body = limited(body, max);

    // Read the head and judge it before storing anything.
    let head = read_head(&mut body, max).await?;
    if head.is_empty() {
        return Err(ApiError::unprocessable(
            "empty_upload",
            "the upload is empty",
        ));
    }
    check_head(&head, format, state.settings.media_max_pixels)?;

    let id = Uuid::now_v7();
    let key = mobile_storage::original_key(id);
    let whole = stream::once(async move { Ok::<_, UploadError>(head.freeze()) }).chain(body);
    let size = match state.storage.put_stream(&key, whole).await {
        Ok(size) => size,
        Err(PutStreamError::Source(UploadError::TooLarge)) => return Err(too_large(max)),
        Err(PutStreamError::Source(UploadError::Read(e))) => {
            return Err(ApiError::bad_request(
                "upload_interrupted",
                format!("reading the upload failed: {e}"),
            ));
        }
        Err(PutStreamError::Storage(e)) => {
            return Err(ApiError::unavailable("storage_unavailable", e));
        }
    };

    let stored_type = format.to_mime_type();
    let mut tx = state.db.begin().await?;
    media::insert(
        &mut *tx,
        id,
        auth.user_id.as_uuid(),
        stored_type,
        i64::try_from(size).unwrap_or(i64::MAX),
    )
    .await?;
    let payload = serde_json::to_value(ProcessJob { media_id: id }).map_err(ApiError::internal)?;
    let unique = id.to_string();
    let mut job = NewJob::new(media::PROCESS_JOB, payload);
    job.unique_key = Some(&unique);
    jobs::enqueue(&mut *tx, &job).await?;
    tx.commit().await?;
    tracing::info!(media_id = %id, bytes = size, content_type = stored_type, "upload stored; processing");

    // What was just committed, without reading it back.
    let data = MediaData {
        id,
        status: media::STATUS_PROCESSING.to_owned(),
        variants: Default::default(),
        failure_reason: None,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(data)))
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The format a declared content type stands for (parameters ignored), if accepted.
fn accepted_format(content_type: &str) -> Option<ImageFormat> {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    ACCEPTED
        .iter()
        .find(|(name, _)| *name == essence)
        .map(|(_, format)| *format)
}

fn unsupported(content_type: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "{content_type:?} is not accepted: send image/jpeg, image/png or image/webp, raw or as the `file` part of multipart/form-data"
        ),
    )
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("uploads are limited to {max} bytes"),
    )
}

/// Counts bytes and ends the stream with `TooLarge` past `max`.
fn limited(body: ByteStream<'_>, max: u64) -> ByteStream<'_> {
    let mut seen = 0u64;
    Box::pin(body.map(move |chunk| {
        let chunk = chunk?;
        seen += chunk.len() as u64;
        if seen > max {
            return Err(UploadError::TooLarge);
        }
        Ok(chunk)
    }))
}

async fn read_head(body: &mut ByteStream<'_>, max: u64) -> Result<BytesMut, ApiError> {
    let mut head = BytesMut::new();
    while head.len() < SNIFF_BYTES {
        match body.next().await {
            Some(Ok(chunk)) => head.extend_from_slice(&chunk),
            Some(Err(UploadError::TooLarge)) => return Err(too_large(max)),
            Some(Err(UploadError::Read(e))) => {
                return Err(ApiError::bad_request(
                    "upload_interrupted",
                    format!("reading the upload failed: {e}"),
                ));
            }
            None => break,
        }
    }
    Ok(head)
}

/// The bytes must be the declared format, and their header must not claim more pixels
/// than allowed. A header too long to fit the head is left to the worker.
fn check_head(head: &[u8], declared: ImageFormat, max_pixels: u64) -> Result<(), ApiError> {
    let actual = image::guess_format(head)
        .ok()
        .filter(|format| ACCEPTED.iter().any(|(_, accepted)| accepted == format));
    match actual {
        None => {
            return Err(ApiError::unprocessable(
                "invalid_image",
                "the upload is not a JPEG, PNG or WebP image",
            ));
        }
        Some(actual) if actual != declared => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content_type_mismatch",
                format!(
                    "the Content-Type says {} but the bytes are {}",
                    declared.to_mime_type(),
                    actual.to_mime_type()
                ),
            ));
        }
        Some(_) => {}
    }
    if let Ok((width, height)) =
        image::ImageReader::with_format(Cursor::new(head), declared).into_dimensions()
        && u64::from(width) * u64::from(height) > max_pixels
    {
        return Err(ApiError::unprocessable(
            "image_too_large",
            format!("the image is {width}×{height} pixels; the limit is {max_pixels}"),
        ));
    }
    Ok(())
}

/// An upload's status and variants.
#[utoipa::path(
    get,
    path = "/v1/media/{id}",
    tag = "media",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The media")),
    responses(
        (status = 200, description = "Status and, once ready, the variants", body = MediaData),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such media, or not the owner's nor posted to a conversation of the caller", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_media(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<MediaData>, ApiError> {
    let row = media::find_visible(&state.db, id, auth.user_id.as_uuid())
        .await?
        .ok_or_else(no_such_media)?;
    Ok(axum::Json(MediaData::from(row)))
}

/// The bytes of one variant.
///
/// Variants never change once written, so the response may be cached for a year; the
/// `ETag` answers `If-None-Match` with 304.
#[utoipa::path(
    get,
    path = "/v1/media/{id}/{variant}",
    tag = "media",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The media"),
        ("variant" = String, Path, description = "`thumb` (256 px), `medium` (1024 px) or `large` (2048 px) on the long edge"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier response"),
    ),
    responses(
        (status = 200, description = "The image", content_type = "image/jpeg", headers(("ETag" = String), ("Cache-Control" = String))),
        (status = 304, description = "Unchanged since the ETag given"),
        (status = 401, description = "`unauthenticated`, `token_expired`, `invalid_token`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no such media or variant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`not_ready`: still processing, or processing failed", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_variant(
    State(state): State<AppState>,
    auth: AuthUser,
    Path((id, variant)): Path<(Uuid, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !VARIANTS.contains(&variant.as_str()) {
        return Err(ApiError::not_found(format!(
            "no variant {variant:?}: use thumb, medium or large"
        )));
    }
    let row = media::find_visible(&state.db, id, auth.user_id.as_uuid())
        .await?
        .ok_or_else(no_such_media)?;
    let Some(stored) = row.variants.0.get(&variant) else {
        return Err(ApiError::conflict(
            "not_ready",
            format!(
                "the media is {}; variants exist once it is ready",
                row.status
            ),
        ));
    };
    let etag = HeaderValue::from_str(&stored.etag).map_err(ApiError::internal)?;
    let cache = HeaderValue::from_static("private, max-age=31536000, immutable");
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == stored.etag || tag.trim() == "*")
        });
    if matches {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag), (header::CACHE_CONTROL, cache)],
        )
            .into_response());
    }
    let bytes = state
        .storage
        .get_stream(&mobile_storage::variant_key(id, &variant))
        .await
        .map_err(|e| ApiError::unavailable("storage_unavailable", e))?;
    let content_type = HeaderValue::from_str(&stored.content_type).map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_LENGTH, HeaderValue::from(stored.byte_size)),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache),
        ],
        Body::from_stream(bytes),
    )
        .into_response())
}

fn no_such_media() -> ApiError {
    ApiError::not_found("no such media")
}
