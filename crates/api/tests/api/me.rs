//! `/v1/me`: ETag, If-None-Match, If-Match.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem};

#[tokio::test]
async fn etag_round_trip_and_conditional_update() {
    let app = TestApp::spawn().await;
    let session = app.register("me@example.com").await;

    let response = app
        .authed(Method::GET, "/v1/me", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'));

    // Unchanged: 304 without a body.
    let response = app
        .authed(Method::GET, "/v1/me", &session)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(response.headers()["etag"], etag.as_str());
    assert!(response.bytes().await.unwrap().is_empty());

    // A stale If-Match loses; the current one wins and changes the ETag.
    let response = app
        .authed(Method::PATCH, "/v1/me", &session)
        .header("if-match", "\"stale\"")
        .json(&json!({"display_name": "Ann Lee"}))
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    )
    .await;
    let response = app
        .authed(Method::PATCH, "/v1/me", &session)
        .header("if-match", &etag)
        .json(&json!({"display_name": "  Ann Lee "}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let new_etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["display_name"], "Ann Lee");
    assert_ne!(new_etag, etag);

    // The old ETag no longer matches: a full 200.
    let response = app
        .authed(Method::GET, "/v1/me", &session)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"], new_etag.as_str());

    // Invalid names are refused.
    let response = app
        .authed(Method::PATCH, "/v1/me", &session)
        .json(&json!({"display_name": ""}))
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_display_name",
    )
    .await;
}
