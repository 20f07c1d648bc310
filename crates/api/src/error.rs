//! Errors as RFC 9457 problem documents, and the one list of their codes.
//!
//! Every error a client can see is an [`ApiError`]: an [`ErrorCode`] (its HTTP status,
//! the stable machine-readable `code` clients may branch on, and what it means) and a
//! human `detail`. The cause of a 5xx is logged with the request id and never shown to
//! the client. The OpenAPI document's error responses are generated from the same
//! table (`crate::openapi`), and in debug builds every problem a route answers is
//! checked against what its operation documents (`crate::middleware::contract`).
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
use mobile_domain::{ValidationCode, ValidationError};
use serde::Serialize;
use utoipa::ToSchema;

/// The longest `detail`, in characters (then cut, with an ellipsis).
pub const MAX_DETAIL_CHARS: usize = 300;

/// The `application/problem+json` media type.
pub const PROBLEM_JSON: &str = "application/problem+json";

tokio::task_local! {
    /// The current request's id, set by the request-id middleware, so an error made
    /// anywhere in the request carries it.
    pub static REQUEST_ID: String;
}

/// Declares [`ErrorCode`]: one line per code, with its status and meaning.
macro_rules! error_codes {
    ($($variant:ident = ($status:ident, $code:literal, $meaning:literal)),+ $(,)?) => {
        /// Every `code` the API answers with. Adding one here is the whole of adding it:
        /// its status, its spelling and its documentation come from this line.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($variant,)+
            /// A value in the request that its domain type refused (always 422).
            Invalid(ValidationCode),
        }

        impl ErrorCode {
            /// Every code but the validation ones ([`ValidationCode::ALL`] has those).
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            pub const fn status(self) -> StatusCode {
                match self {
                    $(Self::$variant => StatusCode::$status,)+
                    Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                }
            }

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $code,)+
                    Self::Invalid(code) => code.as_str(),
                }
            }

            /// What it means: the default `detail`, and its line in the OpenAPI document.
            pub const fn meaning(self) -> &'static str {
                match self {
                    $(Self::$variant => $meaning,)+
                    Self::Invalid(code) => code.meaning(),
                }
            }
        }
    };
}

error_codes! {
    MalformedJson = (BAD_REQUEST, "malformed_json", "the body is not valid JSON"),
    UnreadableBody = (BAD_REQUEST, "unreadable_body", "the body could not be read"),
    InvalidPathParameter = (BAD_REQUEST, "invalid_path_parameter", "a path parameter is malformed (not a UUID)"),
    InvalidQuery = (BAD_REQUEST, "invalid_query", "a query parameter is unknown, malformed or out of range"),
    InvalidCursor = (BAD_REQUEST, "invalid_cursor", "the cursor is not one this API issued"),
    InvalidIdempotencyKey = (BAD_REQUEST, "invalid_idempotency_key", "the Idempotency-Key is not 1 to 255 printable ASCII characters"),
    InvalidMultipart = (BAD_REQUEST, "invalid_multipart", "the multipart form is malformed"),
    UploadInterrupted = (BAD_REQUEST, "upload_interrupted", "the upload ended before its end"),
    InvalidEmailToken = (BAD_REQUEST, "invalid_email_token", "the token from the mail is unknown, expired, used before, or not for this account or its current address"),
    BadRequest = (BAD_REQUEST, "bad_request", "the request could not be handled"),
    Unauthenticated = (UNAUTHORIZED, "unauthenticated", "no credentials were sent, or not the ones this endpoint needs"),
    TokenExpired = (UNAUTHORIZED, "token_expired", "the access token has expired; refresh it"),
    InvalidToken = (UNAUTHORIZED, "invalid_token", "the access token is malformed, forged, or signed by a key this server does not know"),
    InvalidCredentials = (UNAUTHORIZED, "invalid_credentials", "the email or password is wrong"),
    InvalidIdToken = (UNAUTHORIZED, "invalid_id_token", "the id_token is not the provider's for this app, has expired, was used before, or does not match the nonce"),
    InvalidRefreshToken = (UNAUTHORIZED, "invalid_refresh_token", "the refresh token is unknown, expired, spent or revoked; sign in again"),
    ReauthenticationRequired = (FORBIDDEN, "reauthentication_required", "the id_token is of another identity than the account's, or older than REAUTH_MAX_AGE_SECONDS: sign in with the provider again"),
    NotOwner = (FORBIDDEN, "not_owner", "only the conversation's owner adds members and removes others"),
    NotSender = (FORBIDDEN, "not_sender", "only its sender edits or deletes a message"),
    WrongPassword = (FORBIDDEN, "wrong_password", "the current password given is wrong"),
    ProviderNotConfigured = (NOT_FOUND, "provider_not_configured", "this server has no client ids for the provider (APPLE_CLIENT_IDS, GOOGLE_CLIENT_IDS)"),
    NotFound = (NOT_FOUND, "not_found", "no such resource, or not one the caller may see"),
    BodyTimeout = (REQUEST_TIMEOUT, "body_timeout", "the request body did not arrive within REQUEST_BODY_TIMEOUT_SECONDS"),
    UploadTooSlow = (REQUEST_TIMEOUT, "upload_too_slow", "the upload arrived slower than UPLOAD_MIN_BYTES_PER_SECOND over a window of UPLOAD_RATE_WINDOW_SECONDS; nothing was stored"),
    UploadTimeout = (REQUEST_TIMEOUT, "upload_timeout", "the upload did not complete within UPLOAD_TIMEOUT_SECONDS; nothing was stored"),
    MethodNotAllowed = (METHOD_NOT_ALLOWED, "method_not_allowed", "this method is not allowed on this resource"),
    EmailTaken = (CONFLICT, "email_taken", "an account with this email exists"),
    EmailAlreadyVerified = (CONFLICT, "email_already_verified", "the account's address is verified already"),
    NoPassword = (CONFLICT, "no_password", "the account has no password: it signs in with Apple or Google"),
    EmailTakenUnverified = (CONFLICT, "email_taken_unverified", "an account with this email exists, and the provider does not vouch for the address: sign in with the account's password"),
    IdempotencyRequestInFlight = (CONFLICT, "idempotency_request_in_flight", "a request with this Idempotency-Key is still being processed; retry later"),
    MessageDeleted = (CONFLICT, "message_deleted", "the message was deleted; a tombstone cannot be edited"),
    NotReady = (CONFLICT, "not_ready", "the media is still processing, or its processing failed"),
    PreconditionFailed = (PRECONDITION_FAILED, "precondition_failed", "the resource changed since the ETag given; fetch it again"),
    PayloadTooLarge = (PAYLOAD_TOO_LARGE, "payload_too_large", "the request body is too large"),
    UnsupportedMediaType = (UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "the Content-Type is not one this operation takes"),
    ContentTypeMismatch = (UNSUPPORTED_MEDIA_TYPE, "content_type_mismatch", "the bytes are not the format the Content-Type declares"),
    ValidationFailed = (UNPROCESSABLE_ENTITY, "validation_failed", "the body is JSON of the wrong shape: a field missing, unknown or of the wrong type"),
    IdempotencyKeyReused = (UNPROCESSABLE_ENTITY, "idempotency_key_reused", "this Idempotency-Key was used for a different request"),
    EmailUnverified = (UNPROCESSABLE_ENTITY, "email_unverified", "the provider does not vouch for the email, which a new account needs verified"),
    EmailRequired = (UNPROCESSABLE_ENTITY, "email_required", "the provider gave no email, which a new account needs: ask for the email scope"),
    UnknownMembers = (UNPROCESSABLE_ENTITY, "unknown_members", "some member ids name no user"),
    TooManyMembers = (UNPROCESSABLE_ENTITY, "too_many_members", "a conversation has at most 1000 members"),
    UnknownMedia = (UNPROCESSABLE_ENTITY, "unknown_media", "no media of the sender's that can be attached (unknown, or its processing failed)"),
    InvalidPushOptions = (UNPROCESSABLE_ENTITY, "invalid_push_options", "thread_id or collapse_id is not 1 to 64 printable ASCII characters, or a localisation key or its arguments break their limits"),
    InvalidData = (UNPROCESSABLE_ENTITY, "invalid_data", "data is not a JSON object of at most 2048 bytes without NUL"),
    EmptyUpload = (UNPROCESSABLE_ENTITY, "empty_upload", "the upload is empty"),
    InvalidImage = (UNPROCESSABLE_ENTITY, "invalid_image", "the upload is not a JPEG, PNG or WebP image"),
    ImageTooLarge = (UNPROCESSABLE_ENTITY, "image_too_large", "the image has more pixels than MEDIA_MAX_PIXELS"),
    MissingFile = (UNPROCESSABLE_ENTITY, "missing_file", "the form has no part named `file`"),
    RateLimited = (TOO_MANY_REQUESTS, "rate_limited", "too many requests; retry after the Retry-After seconds"),
    Internal = (INTERNAL_SERVER_ERROR, "internal", "an internal error occurred; quote the request_id when reporting it"),
    DatabaseUnavailable = (SERVICE_UNAVAILABLE, "database_unavailable", "the database did not answer; retry shortly"),
    ProviderUnavailable = (SERVICE_UNAVAILABLE, "provider_unavailable", "the provider's signing keys could not be fetched; retry shortly"),
    StorageUnavailable = (SERVICE_UNAVAILABLE, "storage_unavailable", "object storage did not answer; retry shortly"),
    WriteConflict = (SERVICE_UNAVAILABLE, "write_conflict", "a concurrent change to the same data made the database give this one up; retry it"),
    Timeout = (SERVICE_UNAVAILABLE, "timeout", "the request did not complete in time; retry shortly"),
    Overloaded = (SERVICE_UNAVAILABLE, "overloaded", "the server holds as many connections as it may (MAX_CONNECTIONS); retry shortly"),
}

impl From<ValidationCode> for ErrorCode {
    fn from(code: ValidationCode) -> Self {
        Self::Invalid(code)
    }
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
    /// A stable, machine-readable error code; each operation documents the codes it
    /// can answer with.
    pub code: String,
    /// What went wrong, for humans; may change between versions.
    pub detail: String,
    /// The `x-request-id` of the request, to quote in a bug report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// An error response. Build one from its [`ErrorCode`]; `?` converts database and
/// validation errors.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    detail: Option<String>,
    retry_after: Option<u64>,
    /// For a 5xx: the cause, logged, never sent.
    source: Option<anyhow::Error>,
}

impl ApiError {
    /// The error `code`, its meaning as the detail.
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            detail: None,
            retry_after: None,
            source: None,
        }
    }

    /// A more specific detail than the code's meaning.
    /// Sets the human `detail`, cut to [`MAX_DETAIL_CHARS`]: a detail may quote the
    /// request (serde names an unknown field), and a client must not be able to make
    /// an error, or anything stored of it, as large as what it sent.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if let Some((cut, _)) = detail.char_indices().nth(MAX_DETAIL_CHARS) {
            detail.truncate(cut);
            detail.push('…');
        }
        self.detail = Some(detail);
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn rate_limited(retry_after_seconds: u64) -> Self {
        let mut error = Self::new(ErrorCode::RateLimited).detail(format!(
            "too many requests; retry after {retry_after_seconds} s"
        ));
        error.retry_after = Some(retry_after_seconds);
        error
    }

    /// A 500 whose cause is logged and hidden.
    pub fn internal(source: impl Into<anyhow::Error>) -> Self {
        let mut error = Self::new(ErrorCode::Internal);
        error.source = Some(source.into());
        error
    }

    /// A 503 for a dependency that did not answer in time; safe to retry.
    pub fn unavailable(code: ErrorCode, source: impl Into<anyhow::Error>) -> Self {
        let mut error = Self::new(code);
        error.retry_after = Some(1);
        error.source = Some(source.into());
        error
    }
}

impl From<ErrorCode> for ApiError {
    fn from(code: ErrorCode) -> Self {
        Self::new(code)
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        Self::new(error.code.into()).detail(error.message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            // The pool could not hand out a connection in time: PostgreSQL is down or
            // saturated. Tell the client to come back rather than calling it a bug.
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::unavailable(ErrorCode::DatabaseUnavailable, error)
            }
            // The server ended the connection (a restart, a failover, an administrator):
            // the next attempt gets another one.
            sqlx::Error::Database(ref db) if db.code().is_some_and(|c| connection_lost(&c)) => {
                Self::unavailable(ErrorCode::DatabaseUnavailable, error)
            }
            // Class 40, transaction rollback (a deadlock broken, a serialization
            // failure): nothing was written, and the same request again succeeds.
            sqlx::Error::Database(ref db) if db.code().is_some_and(|c| c.starts_with("40")) => {
                Self::unavailable(ErrorCode::WriteConflict, error)
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
        let status = self.code.status();
        if let Some(source) = &self.source
            && status.is_server_error()
        {
            tracing::error!(code = self.code.as_str(), error = ?source, "request failed");
        }
        let detail = self
            .detail
            .unwrap_or_else(|| self.code.meaning().to_owned());
        let mut response = problem_response(self.code, detail);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: say which scheme, and whether the token was the problem.
            let challenge = match self.code {
                ErrorCode::TokenExpired | ErrorCode::InvalidToken => {
                    HeaderValue::from_static("Bearer error=\"invalid_token\"")
                }
                _ => HeaderValue::from_static("Bearer"),
            };
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

/// A problem+json response for `code` with `detail`.
pub fn problem_response(code: ErrorCode, detail: String) -> Response {
    let status = code.status();
    let problem = Problem {
        kind: format!("urn:mobile-backend:problem:{}", code.as_str()),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        code: code.as_str().to_owned(),
        detail,
        request_id: REQUEST_ID.try_with(Clone::clone).ok(),
    };
    let mut response = (status, Json(problem)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_code_is_spelled_once_and_is_an_error_status() {
        let all: Vec<ErrorCode> = ErrorCode::ALL
            .iter()
            .copied()
            .chain(ValidationCode::ALL.into_iter().map(ErrorCode::Invalid))
            .collect();
        let spellings: HashSet<&str> = all.iter().map(|code| code.as_str()).collect();
        assert_eq!(spellings.len(), all.len(), "two codes share a spelling");
        for code in all {
            assert!(
                code.status().is_client_error() || code.status().is_server_error(),
                "{code:?}"
            );
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code:?}"
            );
        }
    }

    /// What PostgreSQL says when it breaks a deadlock or gives up a serializable
    /// transaction is a reason to retry, not a bug.
    #[tokio::test]
    async fn a_rolled_back_transaction_is_a_503_to_retry() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = db.pool().await;
        for sqlstate in ["40P01", "40001"] {
            let error = sqlx::query(&format!(
                "DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{sqlstate}'; END $$"
            ))
            .execute(&pool)
            .await
            .unwrap_err();
            let error = ApiError::from(error);
            assert_eq!(error.code(), ErrorCode::WriteConflict, "{sqlstate}");
            assert_eq!(error.retry_after, Some(1));
        }
    }
}
