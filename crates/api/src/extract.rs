//! Extractors whose rejections are problem documents, and the signed-in user.
//!
//! axum's own `Json`, `Path` and `Query` reject with plain text; these wrappers map each
//! rejection to an [`ApiError`] with a stable code, so no malformed request can produce
//! anything but problem+json.

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{
        ConnectInfo, FromRequest, FromRequestParts, Request,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::{StatusCode, request::Parts},
};
use mobile_auth::{AccessClaims, TokenError};
use mobile_domain::{SessionId, UserId};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};

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

/// The client's IP address: the TCP peer, or, behind `hops` trusted proxies, the
/// address the outermost trusted proxy saw (the `hops`-th entry from the right of
/// `X-Forwarded-For`; entries further left are whatever the client claimed).
pub fn client_ip(parts: &Parts, hops: usize) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    if hops == 0 {
        return peer;
    }
    let forwarded: Vec<IpAddr> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|entry| entry.trim().parse().ok())
        .collect();
    forwarded.iter().rev().nth(hops - 1).copied().or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(xff: &[&str]) -> Parts {
        let mut builder = axum::http::Request::builder();
        for value in xff {
            builder = builder.header("x-forwarded-for", *value);
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        parts
            .extensions
            .insert(ConnectInfo(SocketAddr::from(([10, 0, 0, 1], 4000))));
        parts
    }

    #[test]
    fn client_ip_trusts_only_the_configured_hops() {
        let spoofed = parts(&["6.6.6.6, 203.0.113.7"]);
        assert_eq!(client_ip(&spoofed, 0), Some(IpAddr::from([10, 0, 0, 1])));
        assert_eq!(client_ip(&spoofed, 1), Some(IpAddr::from([203, 0, 113, 7])));
        assert_eq!(client_ip(&spoofed, 2), Some(IpAddr::from([6, 6, 6, 6])));
        // More hops configured than entries present: fall back to the peer.
        assert_eq!(client_ip(&spoofed, 3), Some(IpAddr::from([10, 0, 0, 1])));
        let split = parts(&["6.6.6.6", "203.0.113.7"]);
        assert_eq!(client_ip(&split, 1), Some(IpAddr::from([203, 0, 113, 7])));
    }
}
