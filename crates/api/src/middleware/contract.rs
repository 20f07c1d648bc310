//! Debug builds hold every route to its OpenAPI operation: a problem it answers with
//! must be one the operation documents (status and code). One that is not becomes a
//! logged 500 naming it, so a test, or the contract tester run by CI, fails on the
//! drift instead of shipping it. Release builds skip the check (it buffers error
//! bodies).

use std::sync::Arc;

use axum::{
    body::{Body, to_bytes},
    extract::{MatchedPath, Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::{
    error::{ApiError, PROBLEM_JSON, Problem},
    openapi::Contract,
};

/// The largest problem body read to check it.
const MAX_PROBLEM_BYTES: usize = 64 * 1024;

pub async fn check(State(contract): State<Arc<Contract>>, req: Request, next: Next) -> Response {
    let key = req
        .extensions()
        .get::<MatchedPath>()
        .map(|path| (req.method().clone(), path.as_str().to_owned()));
    let response = next.run(req).await;
    let Some(allowed) = key.as_ref().and_then(|key| contract.get(key)) else {
        return response;
    };
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if !is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_PROBLEM_BYTES).await else {
        return ApiError::internal(anyhow::anyhow!("unreadable problem body")).into_response();
    };
    let documented = serde_json::from_slice::<Problem>(&bytes)
        .is_ok_and(|problem| allowed.contains(&(problem.status, problem.code)));
    if documented {
        return Response::from_parts(parts, Body::from(bytes));
    }
    let (method, route) = key.unwrap_or_default();
    let answered = String::from_utf8_lossy(&bytes);
    tracing::error!(%method, %route, %answered, "a problem this operation does not document");
    ApiError::internal(anyhow::anyhow!("undocumented problem"))
        .detail(format!(
            "contract violation: {method} {route} answered a problem it does not document: {answered}"
        ))
        .into_response()
}
