//! Opaque cursors and the `limit` parameter, shared by every list.
//!
//! Cursors are opaque to clients: base64url of whatever the list needs to resume (a
//! last id, a seq with a direction). Only this module knows their inside.

use std::str::FromStr;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ApiError, ErrorCode};

/// `?cursor=&limit=`, for lists ordered by id.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// From a previous page's `next_cursor`.
    #[param(max_length = 256)]
    pub cursor: Option<String>,
    /// 1 to 100; default 50.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
}

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 100;

/// `limit`, defaulted and checked.
pub fn limit(requested: Option<u32>) -> Result<u32, ApiError> {
    let limit = requested.unwrap_or(DEFAULT_LIMIT);
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::new(ErrorCode::InvalidQuery)
            .detail(format!("limit must be between 1 and {MAX_LIMIT}")))
    }
}

pub fn encode(position: &str) -> String {
    URL_SAFE_NO_PAD.encode(position)
}

/// The position inside a cursor this API issued.
pub fn decode(cursor: &str) -> Result<String, ApiError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)
}

/// A cursor that resumes after the id `id`.
pub fn encode_id(id: impl std::fmt::Display) -> String {
    encode(&id.to_string())
}

pub fn decode_id<Id: FromStr>(cursor: &str) -> Result<Id, ApiError> {
    decode(cursor)?.parse().map_err(|_| invalid())
}

pub fn invalid() -> ApiError {
    ApiError::new(ErrorCode::InvalidCursor)
}

/// Splits `limit + 1` fetched rows into a page and whether more follow.
pub fn split_page<T>(mut rows: Vec<T>, limit: u32) -> (Vec<T>, bool) {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    (rows, more)
}
