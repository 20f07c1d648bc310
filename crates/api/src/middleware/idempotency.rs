//! `Idempotency-Key` for a signed-in user's POST, after the IETF httpapi draft.
//!
//! A client that sends `Idempotency-Key: <unique value>` may retry a POST safely:
//!
//! - first time: the request runs and its response is stored for
//!   `IDEMPOTENCY_TTL_SECONDS`;
//! - same key, same request: the stored response is replayed (with
//!   `Idempotent-Replayed: true`), nothing runs again;
//! - same key, different request (method, path or body): 422
//!   `idempotency_key_reused`;
//! - same key while the first is still running: 409 `idempotency_request_in_flight`.
//!
//! Nothing a client sends is stored before it is authenticated: records are kept only
//! for requests with a valid access token, under that user's id, so one user can
//! neither read nor fill another's. The auth endpoints are never recorded (their
//! responses carry tokens, which must not rest in Redis, and a replayed refresh would
//! hand out a pair after logout), nor is `/internal/*` or an upload. What one user can
//! store is bounded: a record per key, keys per minute by the write rate limit, each
//! record at most `IDEMPOTENCY_MAX_RESPONSE_BYTES` of body (a larger response is
//! answered but not stored, and the key is released), every record with a TTL.
//!
//! A 5xx, 429 or 405 is not stored, nor is anything for a path no route matches: the
//! client is meant to retry the first two, and the others are not operations. If Redis does not
//! answer, or is full, the request runs without the guarantee (and
//! `redis_degraded_total{feature="idempotency"}` counts it); operations that must never
//! duplicate have a durable guard of their own in PostgreSQL (a message's
//! `client_msg_id`).

use axum::{
    body::{Body, Bytes},
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use futures_util::{StreamExt as _, stream};
use mobile_runtime::redis::Feature;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    error::{ApiError, ErrorCode},
    extract::Authentication,
    metrics::FeatureLabel,
    state::AppState,
};

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Response headers worth replaying; the rest (dates, request ids) belong to the replay.
const REPLAYED_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::LOCATION, header::ETAG];

/// Whether requests of this method and path may be recorded (for a signed-in user):
/// POSTs, but neither the auth endpoints, the internal ones, nor uploads. The OpenAPI
/// document says the same from this function.
pub fn applies(method: &str, path: &str) -> bool {
    method.eq_ignore_ascii_case(Method::POST.as_str())
        && !path.starts_with("/v1/auth/")
        && !path.starts_with("/internal/")
        && path != crate::routes::media::UPLOAD_PATH
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Record {
    InFlight {
        fingerprint: String,
    },
    Done {
        fingerprint: String,
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
}

impl Record {
    fn fingerprint(&self) -> &str {
        match self {
            Self::InFlight { fingerprint } | Self::Done { fingerprint, .. } => fingerprint,
        }
    }
}

pub async fn idempotency(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !applies(req.method().as_str(), req.uri().path()) {
        return next.run(req).await;
    }
    let Some(key) = req.headers().get(&IDEMPOTENCY_KEY).cloned() else {
        return next.run(req).await;
    };
    // Only on a route: a path that matches none (404) or a method it does not take
    // (405) is answered without a record, so records cannot be made past the write
    // rate limit, which lives on the routes.
    if req.extensions().get::<MatchedPath>().is_none() {
        return next.run(req).await;
    }
    // Anyone else is refused by the handler (401) without anything stored.
    let Some(Authentication::Valid(claims)) = req.extensions().get::<Authentication>() else {
        return next.run(req).await;
    };
    let user = claims.sub;
    let key = match key.to_str() {
        Ok(key)
            if (1..=255).contains(&key.len())
                && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') =>
        {
            key.to_owned()
        }
        _ => {
            return ApiError::new(ErrorCode::InvalidIdempotencyKey).into_response();
        }
    };

    // The body is part of the fingerprint, so read it (within the usual limit) first.
    let (parts, body) = req.into_parts();
    let body = match read_body(body, state.settings.max_body_bytes).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let fingerprint = {
        let mut hasher = Sha256::new();
        hasher.update(parts.method.as_str());
        hasher.update([0]);
        hasher.update(parts.uri.path_and_query().map_or("", |pq| pq.as_str()));
        hasher.update([0]);
        hasher.update(&body);
        hex::encode(hasher.finalize())
    };
    let redis_key = state.redis.key(format_args!(
        "{}{}",
        mobile_runtime::redis::idempotency_prefix(user),
        hex::encode(Sha256::digest(key.as_bytes()))
    ));
    let req = Request::from_parts(parts, Body::from(body));

    match claim(&state, &redis_key, &fingerprint).await {
        Ok(Claim::Ours) => {}
        Ok(Claim::Existing(record)) => return answer_existing(record, &fingerprint),
        Err(e) => {
            tracing::warn!(error = %e, "idempotency store unavailable; running without it");
            state
                .metrics
                .redis_degraded
                .get_or_create(&FeatureLabel {
                    feature: "idempotency",
                })
                .inc();
            return next.run(req).await;
        }
    }

    let response = next.run(req).await;
    store(&state, &redis_key, fingerprint, response).await
}

/// Reads a request body of at most `limit` bytes: 413 beyond, 400 if it breaks off.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::new(ErrorCode::UnreadableBody))?;
        if read.len() + chunk.len() > limit {
            return Err(ApiError::new(ErrorCode::PayloadTooLarge));
        }
        read.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(read))
}

enum Claim {
    /// No record existed; an in-flight one is now ours.
    Ours,
    Existing(Record),
}

async fn claim(
    state: &AppState,
    redis_key: &str,
    fingerprint: &str,
) -> Result<Claim, redis::RedisError> {
    let mut conn = state.redis.conn(Feature::Idempotency);
    let in_flight = serde_json::to_string(&Record::InFlight {
        fingerprint: fingerprint.to_owned(),
    })
    .map_err(|e| redis::RedisError::from((redis::ErrorKind::Client, "serialize", e.to_string())))?;
    // The in-flight claim outlives the request timeout a little, so a request that dies
    // with its process does not lock the key for the whole TTL.
    let lock_seconds = state.settings.request_timeout.as_secs() + 5;
    let claimed: bool = redis::cmd("SET")
        .arg(redis_key)
        .arg(&in_flight)
        .arg("NX")
        .arg("EX")
        .arg(lock_seconds)
        .query_async::<Option<String>>(&mut conn)
        .await?
        .is_some();
    if claimed {
        return Ok(Claim::Ours);
    }
    let existing: Option<String> = conn.get(redis_key).await?;
    match existing.and_then(|raw| serde_json::from_str::<Record>(&raw).ok()) {
        Some(record) => Ok(Claim::Existing(record)),
        // Expired between SET and GET, or unreadable: treat as in flight; a retry settles it.
        None => Ok(Claim::Existing(Record::InFlight {
            fingerprint: fingerprint.to_owned(),
        })),
    }
}

fn answer_existing(record: Record, fingerprint: &str) -> Response {
    if record.fingerprint() != fingerprint {
        return ApiError::new(ErrorCode::IdempotencyKeyReused).into_response();
    }
    match record {
        Record::InFlight { .. } => {
            ApiError::new(ErrorCode::IdempotencyRequestInFlight).into_response()
        }
        Record::Done {
            status,
            headers,
            body,
            ..
        } => replay(status, &headers, &body),
    }
}

fn replay(status: u16, headers: &[(String, String)], body: &str) -> Response {
    let body = STANDARD.decode(body).unwrap_or_default();
    let mut response =
        (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body).into_response();
    let map = response.headers_mut();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::from_str(value),
        ) {
            map.insert(name, value);
        }
    }
    map.insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    response
}

/// Stores a final response for replay, or releases the key for a retryable one or one
/// too large to keep.
async fn store(
    state: &AppState,
    redis_key: &str,
    fingerprint: String,
    response: Response,
) -> Response {
    let status = response.status();
    let mut conn = state.redis.conn(Feature::Idempotency);
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::METHOD_NOT_ALLOWED
    {
        let _: Result<(), _> = conn.del(redis_key).await;
        return response;
    }
    let (parts, body) = response.into_parts();
    let limit = state.settings.idempotency_max_response_bytes;
    let mut stream = body.into_data_stream();
    let mut kept: Vec<Bytes> = Vec::new();
    let mut size = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                let _: Result<(), _> = conn.del(redis_key).await;
                return ApiError::internal(anyhow::anyhow!("response body failed: {e}"))
                    .into_response();
            }
        };
        size += chunk.len();
        kept.push(chunk);
        if size > limit {
            // Too large to keep: answered as it is, not stored, and the key released
            // so a retry runs again (the route's own guard makes that safe).
            tracing::info!(limit, "response too large to store for idempotency");
            let _: Result<(), _> = conn.del(redis_key).await;
            let head = stream::iter(kept.into_iter().map(Ok::<_, axum::Error>));
            return Response::from_parts(parts, Body::from_stream(head.chain(stream)));
        }
    }
    let body = kept.concat();
    let record = Record::Done {
        fingerprint,
        status: status.as_u16(),
        headers: replayed_headers(&parts.headers),
        body: STANDARD.encode(&body),
    };
    if let Ok(record) = serde_json::to_string(&record) {
        let ttl = state.settings.idempotency_ttl.as_secs();
        let stored: Result<(), _> = conn.set_ex(redis_key, record, ttl).await;
        if let Err(e) = stored {
            tracing::warn!(error = %e, "could not store the idempotent response");
            state
                .metrics
                .redis_degraded
                .get_or_create(&FeatureLabel {
                    feature: "idempotency",
                })
                .inc();
            let _: Result<(), _> = conn.del(redis_key).await;
        }
    }
    Response::from_parts(parts, Body::from(body))
}

fn replayed_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    REPLAYED_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name.as_str().to_owned(), value.to_owned()))
        })
        .collect()
}
