//! Extractors whose rejections are problem documents, and the signed-in user.
//!
//! axum's own `Json`, `Path` and `Query` reject with plain text; these wrappers map each
//! rejection to an [`ApiError`] with a stable code, so no malformed request can produce
//! anything but problem+json.

use std::net::SocketAddr;

use axum::{
    extract::{
        ConnectInfo, FromRequest, FromRequestParts, Request,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::{StatusCode, request::Parts},
};
use mobile_auth::{AccessClaims, TokenError};
use mobile_domain::{SessionId, UserId};
use mobile_runtime::client_ip::ClientIp;
use serde::de::DeserializeOwned;

use crate::{
    error::{ApiError, ErrorCode},
    state::AppState,
};

/// A JSON body. Malformed JSON is 400 `malformed_json`; a body that is JSON but of the
/// wrong shape (wrong types, missing or unknown fields) is 422 `validation_failed`; a
/// body over the size limit is 413 `payload_too_large`; a missing `Content-Type:
/// application/json` is 415.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            ApiError::new(ErrorCode::ValidationFailed).detail(e.body_text())
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::new(ErrorCode::MalformedJson).detail(e.body_text())
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(ErrorCode::UnsupportedMediaType)
            .detail("expected Content-Type: application/json"),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(ErrorCode::PayloadTooLarge)
        }
        other => ApiError::new(ErrorCode::UnreadableBody).detail(other.body_text()),
    }
}

/// Path parameters; a bad UUID is 400 `invalid_path_parameter`.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Self(value))
            .map_err(|rejection: PathRejection| {
                ApiError::new(ErrorCode::InvalidPathParameter).detail(rejection.body_text())
            })
    }
}

/// Query parameters; a bad one is 400 `invalid_query`.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Self(value))
            .map_err(|rejection: QueryRejection| {
                ApiError::new(ErrorCode::InvalidQuery).detail(rejection.body_text())
            })
    }
}

/// The outcome of checking a request's `Authorization` header, stored in the
/// request's extensions by the `authenticate` middleware so the token is verified once
/// however many layers ask.
#[derive(Debug, Clone)]
pub enum Authentication {
    Valid(AccessClaims),
    Invalid(TokenError),
    Malformed,
}

/// The signed-in user. A handler that takes one answers 401 to anyone else.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser {
    pub user_id: UserId,
    pub session_id: SessionId,
}

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Authentication>() {
            Some(Authentication::Valid(claims)) => Ok(Self {
                user_id: claims.sub,
                session_id: claims.sid,
            }),
            Some(Authentication::Invalid(TokenError::Expired)) => {
                Err(ApiError::new(ErrorCode::TokenExpired))
            }
            Some(Authentication::Invalid(TokenError::UnknownKey)) => {
                Err(ApiError::new(ErrorCode::InvalidToken)
                    .detail("the access token was signed by a key this server does not know"))
            }
            Some(Authentication::Invalid(TokenError::Invalid)) => {
                Err(ApiError::new(ErrorCode::InvalidToken).detail("the access token is invalid"))
            }
            Some(Authentication::Malformed) => Err(ApiError::new(ErrorCode::InvalidToken)
                .detail("the Authorization header must be \"Bearer <access token>\"")),
            None => Err(ApiError::new(ErrorCode::Unauthenticated)
                .detail("this endpoint needs an access token (Authorization: Bearer ...)")),
        }
    }
}

/// The client's address: the TCP peer, or what `hops` trusted proxies say
/// (`mobile_runtime::client_ip`).
pub fn client_ip(parts: &Parts, hops: usize) -> ClientIp {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    mobile_runtime::client_ip::client_ip(&parts.headers, peer, hops)
}

/// The client's address as an extractor, behind the configured `TRUSTED_PROXY_HOPS`.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub ClientIp);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(client_ip(parts, state.settings.trusted_proxy_hops)))
    }
}
