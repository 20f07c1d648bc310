//! `/openapi.json`: OpenAPI 3.1, generated from the handlers, snapshotted so any change
//! to the contract shows up in review.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::TestApp;

#[tokio::test]
async fn the_document_covers_every_route() {
    let app = TestApp::spawn().await;
    let response = app
        .request(Method::GET, "/openapi.json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/json");
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");

    let expected = [
        ("/v1/auth/register", "post"),
        ("/v1/auth/login", "post"),
        ("/v1/auth/refresh", "post"),
        ("/v1/auth/logout", "post"),
        ("/v1/auth/logout-all", "post"),
        ("/v1/auth/apple", "post"),
        ("/v1/auth/google", "post"),
        ("/v1/me", "get"),
        ("/v1/me", "patch"),
        ("/v1/me", "delete"),
        ("/v1/me/password", "post"),
        ("/v1/sessions", "get"),
        ("/v1/sessions/{session_id}", "delete"),
        ("/v1/devices", "get"),
        ("/v1/devices/{device_id}", "put"),
        ("/v1/devices/{device_id}", "delete"),
        ("/v1/conversations", "post"),
        ("/v1/conversations", "get"),
        ("/v1/conversations/{id}", "get"),
        ("/v1/conversations/{id}", "patch"),
        ("/v1/conversations/{id}/messages", "post"),
        ("/v1/conversations/{id}/messages", "get"),
        ("/v1/conversations/{id}/messages/{message_id}", "patch"),
        ("/v1/conversations/{id}/messages/{message_id}", "delete"),
        ("/v1/conversations/{id}/events", "get"),
        ("/v1/conversations/{id}/members", "post"),
        ("/v1/conversations/{id}/members/{user_id}", "delete"),
        ("/v1/conversations/{id}/read", "post"),
        ("/v1/conversations/{id}/mute", "put"),
        ("/v1/conversations/{id}/mute", "delete"),
        ("/v1/media", "post"),
        ("/v1/media/{id}", "get"),
        ("/v1/media/{id}/{variant}", "get"),
        ("/internal/v1/notifications", "post"),
        ("/v1/auth/password/forgot", "post"),
        ("/v1/auth/password/reset", "post"),
        ("/v1/auth/email/restore", "post"),
        ("/v1/me/email", "post"),
        ("/v1/me/email/verify", "post"),
        ("/v1/me/email/verification", "post"),
    ];
    for (path, method) in expected {
        assert!(
            document["paths"][path][method].is_object(),
            "{method} {path} is documented"
        );
    }
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        operations,
        expected.len(),
        "and nothing undocumented or stale"
    );
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    insta::assert_json_snapshot!("openapi", document, {".info.version" => "[version]"});
}
