//! Cross-cutting request handling, outermost first:
//!
//! 1. [`observe`]: request id (`x-request-id`), tracing span, access log, and the
//!    `http_requests_total` / `http_request_duration_seconds` metrics by route template.
//! 2. [`problem_safety_net`]: a bodiless or plain-text error response (axum's own 405,
//!    say) becomes problem+json, so clients parse one error format.
//! 3. [`body_deadline`]: a body still arriving after `REQUEST_BODY_TIMEOUT_SECONDS` is
//!    408, whoever was reading it; an upload must keep a minimum pace instead.
//! 4. [`authenticate`]: verifies a bearer token once and records the outcome for the
//!    extractors and layers below.
//! 5. [`idempotency`]: `Idempotency-Key` replay / 422 / 409 for a signed-in user's POST.
//! 6. [`timeout`]: a request still running after `REQUEST_TIMEOUT_SECONDS` is cancelled
//!    and answered 503 (an upload excepted: its body's pace decides).
//! 7. [`rate_limit`]: per IP on auth routes, per user on writes (route layers).
//!
//! In debug builds, [`contract`] sits inside `observe` and holds each route's problems
//! to what its OpenAPI operation documents.

pub mod body_deadline;
pub mod contract;
pub mod idempotency;
pub mod rate_limit;

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tracing::Instrument;

use crate::{
    error::{ApiError, ErrorCode, REQUEST_ID, problem_response},
    extract::Authentication,
    metrics::HttpLabels,
    state::AppState,
};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The route label for requests no route matched: one value, not one per path.
const UNMATCHED_ROUTE: &str = "unmatched";

pub async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_acceptable_request_id(id))
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), ToOwned::to_owned);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        req.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ROUTE, MatchedPath::as_str)
        .to_owned();
    let method = method_label(req.method());
    let span = tracing::info_span!("request", %request_id, %method, %route);

    let mut response = REQUEST_ID
        .scope(request_id.clone(), next.run(req).instrument(span.clone()))
        .await;

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let labels = HttpLabels {
        method,
        route,
        status,
    };
    state.metrics.http_requests.get_or_create(&labels).inc();
    state
        .metrics
        .http_request_duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
    let latency_ms = elapsed.as_secs_f64() * 1e3;
    span.in_scope(|| {
        // Probes arrive every few seconds from every kubelet: keep them out of info logs.
        if labels.route.starts_with("/health/") {
            tracing::debug!(status, latency_ms, "served");
        } else {
            tracing::info!(status, latency_ms, "served");
        }
    });
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    response
}

/// The `method` label: one of HTTP's methods, or `other`.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN
        .iter()
        .find(|known| *known == method)
        .map_or("other", Method::as_str)
}

/// A client's own id is kept for correlation if it is short, printable ASCII.
fn is_acceptable_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

pub async fn problem_safety_net(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    // Only bodiless and plain-text errors (axum's own rejections) are rewritten; a JSON
    // error someone chose to send, like readiness's 503, is left alone.
    let is_plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !is_plain {
        return response;
    }
    let code = match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    };
    let mut problem = problem_response(code, code.meaning().to_owned());
    // Keep headers that mean something to the client (Allow on a 405).
    for (name, value) in response.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            problem.headers_mut().insert(name.clone(), value.clone());
        }
    }
    problem
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound)
}

pub async fn timeout(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // An upload follows its own clock, its body's pace ([`body_deadline`]).
    if req.method() == Method::POST && req.uri().path() == crate::routes::media::UPLOAD_PATH {
        return next.run(req).await;
    }
    let limit = state.settings.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(?limit, "request timed out");
            ApiError::new(ErrorCode::Timeout)
                .detail(format!(
                    "the request did not complete within {} s",
                    limit.as_secs()
                ))
                .into_response()
        }
    }
}

pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if let Some(header) = req.headers().get(header::AUTHORIZATION) {
        let outcome = match header.to_str().ok().and_then(mobile_auth::bearer_token) {
            None => Authentication::Malformed,
            Some(token) => match state.tokens.verify(token) {
                Ok(claims) => Authentication::Valid(claims),
                Err(e) => Authentication::Invalid(e),
            },
        };
        req.extensions_mut().insert(outcome);
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert!(is_acceptable_request_id("abc-123"));
        assert!(!is_acceptable_request_id(""));
        assert!(!is_acceptable_request_id("has space"));
        assert!(!is_acceptable_request_id(&"x".repeat(129)));
    }
}
