//! Opaque cursors and the `limit` parameter, shared by every list.
//!
//! Cursors are opaque to clients: base64url of whatever the list needs to resume (a
//! last id, a seq with a direction). Only this module knows their inside.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::error::ApiError;

/// `?cursor=&limit=`, for lists ordered by id.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// 1 to 100; default 50.
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
        Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_LIMIT}"),
        ))
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

pub fn encode_id(id: Uuid) -> String {
    encode(&id.to_string())
}

pub fn decode_id(cursor: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(&decode(cursor)?).map_err(|_| invalid())
}

pub fn invalid() -> ApiError {
    ApiError::bad_request("invalid_cursor", "the cursor is not one this API issued")
}

/// Splits `limit + 1` fetched rows into a page and whether more follow.
pub fn split_page<T>(mut rows: Vec<T>, limit: u32) -> (Vec<T>, bool) {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    (rows, more)
}
