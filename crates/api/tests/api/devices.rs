//! `/v1/devices`: upsert, list with cursors, delete, isolation between users.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, assert_problem};

fn ios(token_byte: &str) -> Value {
    json!({"platform": "ios", "push_token": token_byte.repeat(32), "app_version": "2.1 (7)",
           "locale": "pt_BR", "apns_environment": "sandbox"})
}

#[tokio::test]
async fn put_is_an_idempotent_upsert() {
    let app = TestApp::spawn().await;
    let session = app.register("dev@example.com").await;
    let id = Uuid::new_v4();
    let path = format!("/v1/devices/{id}");

    let response = app
        .authed(Method::PUT, &path, &session)
        .json(&ios("ab"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["device_id"], id.to_string());
    assert_eq!(created["locale"], "pt-BR");
    assert_eq!(created["apns_environment"], "sandbox");

    let response = app
        .authed(Method::PUT, &path, &session)
        .json(&ios("cd"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let updated: Value = response.json().await.unwrap();
    assert_eq!(updated["push_token"], "cd".repeat(32));
    assert_eq!(updated["created_at"], created["created_at"]);

    let list: Value = app.get_json("/v1/devices", &session).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["next_cursor"].is_null());
}

#[tokio::test]
async fn device_validation() {
    let app = TestApp::spawn().await;
    let session = app.register("val@example.com").await;
    let path = format!("/v1/devices/{}", Uuid::new_v4());
    let cases = [
        (
            json!({"platform": "windows", "push_token": "ab".repeat(32)}),
            "invalid_platform",
        ),
        (
            json!({"platform": "ios", "push_token": "xyz"}),
            "invalid_push_token",
        ),
        (
            json!({"platform": "android", "push_token": "has spaces in it, which FCM never uses"}),
            "invalid_push_token",
        ),
        (
            json!({"platform": "android", "push_token": "fcm-token-1234567890", "apns_environment": "sandbox"}),
            "invalid_apns_environment",
        ),
        (
            json!({"platform": "ios", "push_token": "ab".repeat(32), "locale": "not a locale"}),
            "invalid_locale",
        ),
        (
            json!({"platform": "ios", "push_token": "ab".repeat(32), "app_version": ""}),
            "invalid_app_version",
        ),
    ];
    for (body, code) in cases {
        let response = app
            .authed(Method::PUT, &path, &session)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
    }
}

#[tokio::test]
async fn pages_follow_the_cursor_and_users_see_only_their_own() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = Uuid::new_v4();
        let body = json!({"platform": "android", "push_token": format!("fcm-token-of-device-{i}")});
        let response = app
            .authed(Method::PUT, &format!("/v1/devices/{id}"), &ann)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        ids.push(id.to_string());
    }
    ids.sort();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("?limit=2&cursor={c}"),
            None => "?limit=2".to_owned(),
        };
        let page: Value = app.get_json(&format!("/v1/devices{query}"), &ann).await;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["device_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every device once, in order");

    // Bob sees none of them and cannot delete them.
    let bobs: Value = app.get_json("/v1/devices", &bob).await;
    assert!(bobs["items"].as_array().unwrap().is_empty());
    let response = app
        .authed(Method::DELETE, &format!("/v1/devices/{}", ids[0]), &bob)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;

    let response = app
        .authed(Method::DELETE, &format!("/v1/devices/{}", ids[0]), &ann)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = app
        .authed(Method::DELETE, &format!("/v1/devices/{}", ids[0]), &ann)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn another_users_device_id_is_404_and_nothing_moves() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let mallory = app.register("mallory@example.com").await;
    let path = format!("/v1/devices/{}", Uuid::new_v4());
    let response = app
        .authed(Method::PUT, &path, &ann)
        .json(&ios("ab"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    let response = app
        .authed(Method::PUT, &path, &mallory)
        .json(&ios("cd"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;

    let anns: Value = app.get_json("/v1/devices", &ann).await;
    assert_eq!(anns["items"][0]["push_token"], "ab".repeat(32));
    let mallorys: Value = app.get_json("/v1/devices", &mallory).await;
    assert_eq!(mallorys["items"], json!([]));
}
