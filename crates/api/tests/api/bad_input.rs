//! Every kind of bad input gets a 4xx problem document, never a 500.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{TestApp, assert_problem};

#[tokio::test]
async fn malformed_and_mistyped_bodies() {
    let app = TestApp::spawn().await;
    let session = app.register("bad@example.com").await;
    let register = |body: &'static str| {
        app.request(Method::POST, "/v1/auth/register")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    // Not JSON.
    assert_problem(
        register("{\"email\":").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed_json",
    )
    .await;
    assert_problem(
        register("").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed_json",
    )
    .await;
    // JSON of the wrong shape.
    assert_problem(
        register("[]").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_problem(
        register(r#"{"email": 5, "password": "correct horse battery", "display_name": "x"}"#)
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_problem(
        register(r#"{"email": "a@example.com", "password": "correct horse battery"}"#)
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    let unknown_field = assert_problem(
        register(r#"{"email": "a@example.com", "password": "correct horse battery", "display_name": "x", "admin": true}"#)
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert!(unknown_field["detail"].as_str().unwrap().contains("admin"));

    // No JSON content type.
    let response = app
        .request(Method::POST, "/v1/auth/login")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    // Over the body limit (64 KiB by default), with and without an idempotency key.
    let huge = json!({"display_name": "x".repeat(100 * 1024)});
    let response = app
        .authed(Method::PATCH, "/v1/me", &session)
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    let huge = json!({"email": "x".repeat(100 * 1024), "password": "p"});
    let response = app
        .request(Method::POST, "/v1/auth/login")
        .header("idempotency-key", "big")
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
}

#[tokio::test]
async fn domain_validation_codes() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            json!({"email": "not-an-email", "password": "correct horse battery", "display_name": "A"}),
            "invalid_email",
        ),
        (
            json!({"email": "a@example.com", "password": "short", "display_name": "A"}),
            "weak_password",
        ),
        (
            json!({"email": "a@example.com", "password": "password123", "display_name": "A"}),
            "weak_password",
        ),
        (
            json!({"email": "a@example.com", "password": "correct horse battery", "display_name": "  "}),
            "invalid_display_name",
        ),
    ];
    for (body, code) in cases {
        let response = app.post_json("/v1/auth/register", &body).await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
    }
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap();
    assert_eq!(users, 0, "nothing invalid was stored");
}

#[tokio::test]
async fn bad_paths_queries_methods_and_routes() {
    let app = TestApp::spawn().await;
    let session = app.register("paths@example.com").await;
    let device = json!({"platform": "ios", "push_token": "ab".repeat(32)});

    let response = app
        .authed(Method::PUT, "/v1/devices/not-a-uuid", &session)
        .json(&device)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_path_parameter").await;

    for query in ["?limit=abc", "?limit=0", "?limit=101", "?bogus=1"] {
        let response = app
            .authed(Method::GET, &format!("/v1/devices{query}"), &session)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
    let response = app
        .authed(Method::GET, "/v1/devices?cursor=!!!", &session)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_cursor").await;

    let response = app
        .request(Method::GET, "/v1/nothing-here")
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;

    let response = app
        .request(Method::DELETE, "/v1/auth/login")
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("allow").is_some());
    assert_problem(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_good_one_is_kept() {
    let app = TestApp::spawn().await;
    let response = app
        .request(Method::GET, "/health/live")
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("x-request-id").is_some());

    let response = app
        .request(Method::GET, "/openapi.json")
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-chosen-42");

    // An unusable one is replaced.
    let response = app
        .request(Method::GET, "/health/live")
        .header("x-request-id", "x".repeat(300))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"].len(), 36);
}

#[tokio::test]
async fn http2_without_tls_is_served() {
    let app = TestApp::spawn().await;
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2c
        .get(format!("{}/health/live", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let response = h2c.get(format!("{}/v1/me", app.base)).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_problem(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
}

#[tokio::test]
async fn a_nul_in_any_text_field_is_422_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let nul = "a\u{0}b";
    let registration = json!({"email": "nul@example.com", "password": "correct horse battery", "display_name": nul});
    let response = app.post_json("/v1/auth/register", &registration).await;
    assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_display_name",
    )
    .await;
    let login = json!({"email": "nul@example.com", "password": format!("correct horse{nul}")});
    let response = app.post_json("/v1/auth/login", &login).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let session = app.register("nul@example.com").await;
    let response = app
        .authed(Method::PATCH, "/v1/me", &session)
        .json(&json!({"display_name": nul}))
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_display_name",
    )
    .await;

    let device = format!("/v1/devices/{}", uuid::Uuid::new_v4());
    let push_token = "ab".repeat(32);
    for (field, code) in [
        ("app_version", "invalid_app_version"),
        ("locale", "invalid_locale"),
    ] {
        let mut body = json!({"platform": "ios", "push_token": push_token});
        body[field] = json!(nul);
        let response = app
            .authed(Method::PUT, &device, &session)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
    }

    let response = app
        .authed(Method::POST, "/v1/conversations", &session)
        .json(&json!({"member_ids": [], "title": nul}))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_title").await;
    let conversation: serde_json::Value = app
        .authed(Method::POST, "/v1/conversations", &session)
        .json(&json!({"member_ids": []}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let messages = format!(
        "/v1/conversations/{}/messages",
        conversation["id"].as_str().unwrap()
    );
    for (body, code) in [
        (json!({"client_msg_id": "m1", "body": nul}), "invalid_body"),
        (
            json!({"client_msg_id": nul, "body": "hi"}),
            "invalid_client_msg_id",
        ),
    ] {
        let response = app
            .authed(Method::POST, &messages, &session)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
    }

    let notify = |body: serde_json::Value| {
        app.request(Method::POST, "/internal/v1/notifications")
            .bearer_auth(crate::helpers::INTERNAL_TOKEN)
            .json(&body)
            .send()
    };
    for (body, code) in [
        (
            json!({"user_id": session.user_id, "title": nul, "body": "b"}),
            "invalid_title",
        ),
        (
            json!({"user_id": session.user_id, "title": "t", "body": nul}),
            "invalid_body",
        ),
        (
            json!({"user_id": session.user_id, "title": "t", "body": "b", "data": {"k": nul}}),
            "invalid_data",
        ),
        (
            json!({"user_id": session.user_id, "title": "t", "body": "b", "data": {nul: 1}}),
            "invalid_data",
        ),
    ] {
        let response = notify(body).await.unwrap();
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
    }

    let pool = app.db.pool().await;
    // (Registration enqueued a verification mail: jobs other than mail are counted.)
    for table in ["devices", "messages", "jobs WHERE kind <> 'mail.send'"] {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 0, "{table}");
    }
}
