//! `Idempotency-Key`: replay, 422 on reuse with another body, 409 while in flight.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem};

fn registration(email: &str) -> Value {
    json!({"email": email, "password": "correct horse battery", "display_name": "Idem"})
}

async fn user_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn same_key_and_body_replays_the_first_response() {
    let app = TestApp::spawn().await;
    let post = |key: &'static str, body: Value| {
        app.request(Method::POST, "/v1/auth/register")
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };

    let first = post("key-1", registration("idem@example.com"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body: Value = first.json().await.unwrap();

    let replay = post("key-1", registration("idem@example.com"))
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["content-type"], "application/json");
    let replay_body: Value = replay.json().await.unwrap();
    assert_eq!(
        replay_body, first_body,
        "byte-for-byte the first answer, tokens included"
    );
    assert_eq!(user_count(&app).await, 1);

    // Same key, different body: refused, nothing created.
    let reused = post("key-1", registration("other@example.com"))
        .await
        .unwrap();
    assert_problem(
        reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(user_count(&app).await, 1);

    // Error responses (4xx) replay too: the request will not succeed on retry.
    let conflict = post("key-2", registration("idem@example.com"))
        .await
        .unwrap();
    assert_problem(conflict, StatusCode::CONFLICT, "email_taken").await;
    let again = post("key-2", registration("idem@example.com"))
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_problem(again, StatusCode::CONFLICT, "email_taken").await;
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_in_flight_is_a_conflict() {
    let app = TestApp::spawn().await;
    // Registration hashes a password (tens of milliseconds): identical requests sent
    // together find the first one still in flight.
    let attempts = 8;
    let responses = futures_util::future::join_all((0..attempts).map(|_| {
        app.request(Method::POST, "/v1/auth/register")
            .header("idempotency-key", "together")
            .json(&registration("inflight@example.com"))
            .send()
    }))
    .await;
    let mut created = 0;
    let mut in_flight = 0;
    let mut replayed = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status() {
            StatusCode::CREATED if response.headers().get("idempotent-replayed").is_some() => {
                replayed += 1
            }
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {
                assert_problem(
                    response,
                    StatusCode::CONFLICT,
                    "idempotency_request_in_flight",
                )
                .await;
                in_flight += 1;
            }
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
    }
    assert_eq!(created, 1, "the request ran once");
    assert!(in_flight >= 1, "some duplicates arrived while it ran");
    assert_eq!(created + in_flight + replayed, attempts);
    assert_eq!(user_count(&app).await, 1);
}

#[tokio::test]
async fn keys_are_scoped_to_the_user_and_validated() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let body = json!({"refresh_token": "rt_unknown"});
    // The same key from two users: two separate requests, neither a replay.
    for session in [&ann, &bob] {
        let response = app
            .authed(Method::POST, "/v1/auth/logout", session)
            .header("idempotency-key", "shared-key")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(response.headers().get("idempotent-replayed").is_none());
    }

    let response = app
        .request(Method::POST, "/v1/auth/logout")
        .header("idempotency-key", "x".repeat(256))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_idempotency_key").await;
}
