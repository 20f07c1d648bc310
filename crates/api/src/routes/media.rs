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

use axum::{
    body::Body,
    extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _, TryStreamExt as _, stream};
use mobile_db::{
    jobs::{self, Payload as _},
    media::{self, ProcessJob},
};
use mobile_domain::{MediaId, MediaStatus};
use mobile_events::MediaData;
use mobile_media::{Format, ImageError};
use mobile_storage::PutStreamError;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    error::{ApiError, ErrorCode},
    extract::{AuthUser, Path},
    middleware::rate_limit::{self, Class},
    problems,
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

/// How much of an upload is read before deciding on it: enough for any format's
/// header, including a JPEG's EXIF segment (at most 64 KiB).
const SNIFF_BYTES: usize = 64 * 1024 + 1024;

type ByteStream<'a> = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, UploadError>> + Send + 'a>>;

/// Why reading an upload stopped.
#[derive(Debug)]
enum UploadError {
    TooLarge,
    Read(String),
}

/// An image's bytes, as a body or a form part.
#[derive(Debug)]
pub struct ImageBytes;

impl utoipa::PartialSchema for ImageBytes {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Binary,
            )))
            .description(Some(
                "A JPEG, PNG or WebP image; its bytes must be the format declared",
            ))
            .into()
    }
}

impl utoipa::ToSchema for ImageBytes {}

/// The multipart form of an upload.
#[derive(Debug, utoipa::ToSchema)]
pub struct UploadForm {
    /// The image; the part's `Content-Type` declares its format (`application/octet-stream`
    /// or none: taken from the bytes).
    #[schema(value_type = ImageBytes)]
    pub file: Vec<u8>,
}

/// Upload an image.
///
/// Send the bytes as the body with `Content-Type: image/jpeg`, `image/png` or
/// `image/webp` (or `application/octet-stream`: the format is then taken from the
/// bytes), or as `multipart/form-data` with the image in a part named `file` (that
/// part's `Content-Type` declares the format the same way). The answer comes before
/// processing: watch for `media.ready` (or `media.failed`) on the WebSocket, or poll
/// `GET /v1/media/{id}`.
#[utoipa::path(
    post,
    path = "/v1/media",
    tag = "media",
    security(("bearer" = [])),
    request_body(content(
        (ImageBytes = "image/jpeg"), (ImageBytes = "image/png"), (ImageBytes = "image/webp"),
        (ImageBytes = "application/octet-stream"),
        (UploadForm = "multipart/form-data"),
    )),
    responses(
        (status = 202, description = "Stored; processing", body = MediaData),
        UploadProblems,
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
        .map_err(|e| ApiError::new(ErrorCode::InvalidMultipart).detail(e.body_text()))?;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::new(ErrorCode::InvalidMultipart).detail(e.body_text()))?
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
    Err(ErrorCode::MissingFile.into())
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
    let declared = declared_format(content_type)?;
    let mut body = limited(body, max);

    // Read the head and judge it before storing anything.
    let head = read_head(&mut body, max).await?;
    let format = check_head(&head, declared, state.settings.media_max_pixels)?;

    let id = MediaId::new();
    let key = mobile_storage::original_key(id);
    let whole = stream::once(async move { Ok::<_, UploadError>(head.freeze()) }).chain(body);
    let size = match state.storage.put_stream(&key, whole).await {
        Ok(size) => size,
        Err(PutStreamError::Source(UploadError::TooLarge)) => return Err(too_large(max)),
        Err(PutStreamError::Source(UploadError::Read(e))) => return Err(interrupted(&e)),
        Err(PutStreamError::Storage(e)) => {
            return Err(ApiError::unavailable(ErrorCode::StorageUnavailable, e));
        }
    };

    let stored_type = format.media_type();
    let mut tx = state.db.begin().await?;
    let recorded = media::insert(
        &mut *tx,
        id,
        auth.user_id,
        stored_type,
        i64::try_from(size).unwrap_or(i64::MAX),
    )
    .await?;
    if !recorded {
        // The account was deleted while its access token was still unexpired.
        if let Err(error) = state.storage.delete(&key).await {
            tracing::warn!(media_id = %id, %error, "removing an upload of a deleted account failed");
        }
        return Err(ApiError::new(ErrorCode::NotFound).detail("the user no longer exists"));
    }
    let unique = id.to_string();
    let mut job = ProcessJob { media_id: id }.to_job()?;
    job.unique_key = Some(&unique);
    jobs::enqueue(&mut *tx, &job).await?;
    tx.commit().await?;
    tracing::info!(media_id = %id, bytes = size, content_type = stored_type, "upload stored; processing");

    // What was just committed, without reading it back.
    let data = MediaData {
        id,
        status: MediaStatus::Processing,
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

/// The format a declared content type stands for; `None` (take it from the bytes)
/// for `application/octet-stream` or no type at all.
fn declared_format(content_type: &str) -> Result<Option<Format>, ApiError> {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence.is_empty() || essence.eq_ignore_ascii_case("application/octet-stream") {
        return Ok(None);
    }
    Format::from_media_type(essence)
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(ErrorCode::UnsupportedMediaType).detail(format!(
                "{content_type:?} is not accepted: send image/jpeg, image/png or image/webp (or application/octet-stream), raw or as the `file` part of multipart/form-data"
            ))
        })
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge).detail(format!("uploads are limited to {max} bytes"))
}

fn interrupted(why: &str) -> ApiError {
    ApiError::new(ErrorCode::UploadInterrupted).detail(format!("reading the upload failed: {why}"))
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
            Some(Err(UploadError::Read(e))) => return Err(interrupted(&e)),
            None => break,
        }
    }
    Ok(head)
}

/// The head must be an image of the declared format (if one was declared) whose
/// header, if it lies within the head, claims no more pixels than allowed (one that
/// does not fit is left to the worker, which inspects the whole original the same
/// way). Returns the format.
fn check_head(head: &[u8], declared: Option<Format>, max_pixels: u64) -> Result<Format, ApiError> {
    let inspection = mobile_media::inspect(head, max_pixels).map_err(|error| match error {
        ImageError::Empty => ApiError::new(ErrorCode::EmptyUpload),
        ImageError::TooManyPixels { .. } => {
            ApiError::new(ErrorCode::ImageTooLarge).detail(error.to_string())
        }
        ImageError::UnsupportedFormat | ImageError::Corrupt(_) => {
            ApiError::new(ErrorCode::InvalidImage)
        }
    })?;
    if let Some(declared) = declared
        && inspection.format != declared
    {
        return Err(
            ApiError::new(ErrorCode::ContentTypeMismatch).detail(format!(
                "the Content-Type says {} but the bytes are {}",
                declared.media_type(),
                inspection.format.media_type()
            )),
        );
    }
    Ok(inspection.format)
}

problems!(UploadProblems:
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    ContentTypeMismatch,
    EmptyUpload,
    InvalidImage,
    ImageTooLarge,
    MissingFile,
    InvalidMultipart,
    UploadInterrupted,
    UploadTooSlow,
    UploadTimeout,
    StorageUnavailable,
);
problems!(MediaProblems: NotFound);
problems!(VariantProblems: NotFound, NotReady, StorageUnavailable);

/// An upload's status and variants.
#[utoipa::path(
    get,
    path = "/v1/media/{id}",
    tag = "media",
    security(("bearer" = [])),
    params(("id" = MediaId, Path, description = "The media")),
    responses(
        (status = 200, description = "Status and, once ready, the variants", body = MediaData),
        MediaProblems,
    )
)]
async fn get_media(
    State(state): State<AppState>,
    auth: AuthUser,
    Path(id): Path<MediaId>,
) -> Result<axum::Json<MediaData>, ApiError> {
    let row = media::find_visible(&state.db, id, auth.user_id)
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
        ("id" = MediaId, Path, description = "The media"),
        ("variant" = String, Path, description = "`thumb` (256 px), `medium` (1024 px) or `large` (2048 px) on the long edge"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier response"),
    ),
    responses(
        (status = 200, description = "The image", content(("image/jpeg"), ("image/png")), headers(("ETag" = String), ("Cache-Control" = String))),
        (status = 304, description = "Unchanged since the ETag given", headers(("ETag" = String), ("Cache-Control" = String))),
        VariantProblems,
    )
)]
async fn get_variant(
    State(state): State<AppState>,
    auth: AuthUser,
    Path((id, variant)): Path<(MediaId, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !mobile_media::is_variant(&variant) {
        return Err(ApiError::new(ErrorCode::NotFound).detail(format!(
            "no variant {variant:?}: use thumb, medium or large"
        )));
    }
    let row = media::find_visible(&state.db, id, auth.user_id)
        .await?
        .ok_or_else(no_such_media)?;
    let Some(stored) = row.variants.0.get(&variant) else {
        return Err(ApiError::new(ErrorCode::NotReady).detail(format!(
            "the media is {}; variants exist once it is ready",
            row.status
        )));
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
        .map_err(|e| ApiError::unavailable(ErrorCode::StorageUnavailable, e))?;
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
    ApiError::new(ErrorCode::NotFound).detail("no such media")
}
