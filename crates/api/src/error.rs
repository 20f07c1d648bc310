//! Errors as RFC 9457 problem documents.
//!
//! Every error a client can see is an [`ApiError`]: an HTTP status, a stable
//! machine-readable `code` clients may branch on, and a human `detail`. The cause of a
//! 5xx is logged with the request id and never shown to the client.
//!
//! ```json
//! {"type":"urn:mobile-backend:problem:weak_password","title":"Unprocessable Entity",
//!  "status":422,"code":"weak_password","detail":"password must have at least 10
//!  characters","request_id":"0193..."}
//! ```

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use mobile_domain::ValidationError;
use serde::Serialize;
use utoipa::ToSchema;

/// The `application/problem+json` media type.
pub const PROBLEM_JSON: &str = "application/problem+json";

tokio::task_local! {
    /// The current request's id, set by the request-id middleware, so an error made
    /// anywhere in the request carries it.
    pub static REQUEST_ID: String;
}

/// An RFC 9457 problem document with this API's `code` and `request_id` extensions.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// `urn:mobile-backend:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status code's reason phrase.
    pub title: String,
    pub status: u16,
    /// A stable, machine-readable error code.
    pub code: String,
    /// What went wrong, for humans; may change between versions.
    pub detail: String,
    /// The `x-request-id` of the request, to quote in a bug report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// An error response. Build one with the constructors; `?` converts database and
/// validation errors.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
    retry_after: Option<u64>,
    /// For a 401: send `WWW-Authenticate: Bearer` as RFC 6750 asks.
    bearer_challenge: bool,
    /// For a 5xx: the cause, logged, never sent.
    source: Option<anyhow::Error>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            bearer_challenge: false,
            source: None,
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn unauthorized(code: &'static str, detail: impl Into<String>) -> Self {
        let mut error = Self::new(StatusCode::UNAUTHORIZED, code, detail);
        error.bearer_challenge = true;
        error
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }

    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }

    pub fn rate_limited(retry_after_seconds: u64) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests; retry after {retry_after_seconds} s"),
        );
        error.retry_after = Some(retry_after_seconds);
        error
    }

    /// A 500 whose cause is logged and hidden.
    pub fn internal(source: impl Into<anyhow::Error>) -> Self {
        let mut error = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; quote the request_id when reporting it",
        );
        error.source = Some(source.into());
        error
    }

    /// A 503 for a dependency that did not answer in time; safe to retry.
    pub fn unavailable(code: &'static str, source: impl Into<anyhow::Error>) -> Self {
        let mut error = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "the service is temporarily unavailable; retry shortly",
        );
        error.retry_after = Some(1);
        error.source = Some(source.into());
        error
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        Self::unprocessable(error.code, error.message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            // The pool could not hand out a connection in time: PostgreSQL is down or
            // saturated. Tell the client to come back rather than calling it a bug.
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::unavailable("database_unavailable", error)
            }
            // The server ended the connection (a restart, a failover, an administrator):
            // the next attempt gets another one.
            sqlx::Error::Database(ref db) if db.code().is_some_and(|c| connection_lost(&c)) => {
                Self::unavailable("database_unavailable", error)
            }
            other => Self::internal(other),
        }
    }
}

/// SQLSTATEs that say the connection, not the statement, failed: class 08 (connection
/// exception) and the 57P0x shutdowns (`admin_shutdown`, `crash_shutdown`,
/// `cannot_connect_now`, `idle_session_timeout`...).
fn connection_lost(sqlstate: &str) -> bool {
    sqlstate.starts_with("08") || sqlstate.starts_with("57P0")
}

impl From<mobile_auth::password::PasswordError> for ApiError {
    fn from(error: mobile_auth::password::PasswordError) -> Self {
        Self::internal(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(source) = &self.source
            && self.status.is_server_error()
        {
            tracing::error!(code = self.code, error = ?source, "request failed");
        }
        let mut response = problem_response(self.status, self.code, self.detail);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.bearer_challenge {
            let challenge = if self.code == "unauthenticated" {
                HeaderValue::from_static("Bearer")
            } else {
                HeaderValue::from_static("Bearer error=\"invalid_token\"")
            };
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

/// A problem+json response for `status` with `code` and `detail`.
pub fn problem_response(status: StatusCode, code: &str, detail: String) -> Response {
    let problem = Problem {
        kind: format!("urn:mobile-backend:problem:{code}"),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        code: code.to_owned(),
        detail,
        request_id: REQUEST_ID.try_with(Clone::clone).ok(),
    };
    let mut response = (status, Json(problem)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}
